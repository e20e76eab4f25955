//! Vectorised f32 math for the kernels' inner loops, compiled for AVX-512 and AVX2 as well as
//! the baseline and chosen at run time.
//!
//! The loops are written so that LLVM vectorises them (fixed-width lane accumulators, no
//! branches); `multiversion!` instantiates each one under `#[target_feature]`, because a
//! default build targets baseline x86-64 (SSE2) and would use 4 lanes out of 16.

/// Defines `pub fn $name(..) -> $ret` that runs `$body` compiled for the best instruction
/// set the CPU has (AVX-512, AVX2+FMA, else baseline).
macro_rules! multiversion {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the CPU supports every feature the function is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(super) use multiversion;

use super::activation::Activation;

/// Lanes of the accumulators that reductions keep (one AVX-512 register of f32).
pub const LANES: usize = 16;

/// `e^x` to about 2 ulp for x in [-87, 88] (Cephes' `expf` polynomial); smaller inputs
/// (masked attention scores among them) give exactly 0, larger ones saturate. Never a
/// subnormal: on Intel cores every arithmetic op on one costs a ~100-cycle microcode assist,
/// and the ~1e-38 that masked scores once gave made CLIP's causal attention 8x slower there
/// (its products with the values were subnormal). Branch-free so that it vectorises; the
/// fused multiply-adds are single instructions in the AVX2/AVX-512 builds (and on aarch64).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let underflows = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let n = x.mul_add(LOG2E, 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = p.mul_add(r, c);
    }
    let y = (p * r).mul_add(r, r + 1.0);
    // 2^n built in the float unit: adding 2^23 + 127 leaves the biased exponent n + 127
    // (1..=254 after the clamp) in the low mantissa bits, and the shift moves it into the
    // exponent field. A float-to-int `as` cast would saturate and check for NaN lane by lane,
    // which kept every loop calling this scalar.
    let two_to_n = f32::from_bits((n + 8_388_735.0).to_bits() << 23);
    let value = y * two_to_n;
    if underflows {
        0.0
    } else {
        value
    }
}

/// The logistic sigmoid `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// The error function to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26), branch-free.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let magnitude = 1.0 - poly * exp(-ax * ax);
    magnitude.copysign(x)
}

/// `x Φ(x)`: GELU with the exact (erf) form that diffusers' GEGLU uses.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// d/dx of [`gelu`]: `Φ(x) + x φ(x)`.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)) + x * INV_SQRT_2PI * exp(-0.5 * x * x)
}

/// Sum of a slice with `LANES` independent accumulators (vectorises; the order is fixed, so
/// results do not depend on the thread count).
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Maximum of a slice (`-inf` when empty).
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = a.max(x);
        }
    }
    acc.iter().fold(tail, |m, &x| m.max(x))
}

/// Sum of `xs[i] * ys[i]`.
#[inline(always)]
pub fn dot(xs: &[f32], ys: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = xs.len().min(ys.len());
    let (xs, ys) = (&xs[..n], &ys[..n]);
    let split = n - n % LANES;
    for (xc, yc) in xs[..split]
        .chunks_exact(LANES)
        .zip(ys[..split].chunks_exact(LANES))
    {
        for i in 0..LANES {
            acc[i] += xc[i] * yc[i];
        }
    }
    let tail: f32 = xs[split..]
        .iter()
        .zip(&ys[split..])
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

multiversion! {
    /// Softmax of one row in place; returns its log-sum-exp (`max + ln Σ e^(x - max)`).
    pub fn softmax_in_place(row: &mut [f32]) -> f32 {
        let max = max(row);
        if max == f32::NEG_INFINITY {
            // A fully masked row: attend to nothing rather than divide 0 by 0.
            row.fill(0.0);
            return f32::NEG_INFINITY;
        }
        for x in row.iter_mut() {
            *x = exp(*x - max);
        }
        let total = sum(row);
        let inv = 1.0 / total;
        for x in row.iter_mut() {
            *x *= inv;
        }
        max + total.ln()
    }
}

multiversion! {
    /// One block of an online (streaming) softmax over a row: raises the running maximum to
    /// the block's, exponentiates the block in place against it, and returns the new maximum,
    /// the new running total and the factor by which everything accumulated against the old
    /// maximum must be scaled (1 when it did not move). A block that leaves the maximum at
    /// `-inf` (all masked so far) becomes zeros.
    pub fn online_softmax_block(row: &mut [f32], max_so_far: f32, total: f32) -> (f32, f32, f32) {
        let new_max = max_so_far.max(max(row));
        if new_max == f32::NEG_INFINITY {
            row.fill(0.0);
            return (new_max, total, 1.0);
        }
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (a, x) in acc.iter_mut().zip(chunk.iter_mut()) {
                *x = exp(*x - new_max);
                *a += *x;
            }
        }
        let mut block_total = 0.0;
        for x in chunks.into_remainder() {
            *x = exp(*x - new_max);
            block_total += *x;
        }
        block_total += acc.iter().sum::<f32>();
        let rescale = if max_so_far == new_max { 1.0 } else { exp(max_so_far - new_max) };
        (new_max, total * rescale + block_total, rescale)
    }
}

multiversion! {
    /// Recovers attention probabilities from raw scores and their saved log-sum-exp.
    pub fn exp_shifted(row: &mut [f32], lse: f32) {
        for x in row.iter_mut() {
            *x = exp(*x - lse);
        }
    }
}

multiversion! {
    /// `dst = act(src · scale + shift)`, with SiLU as the activation when `silu`.
    pub fn affine_into(src: &[f32], dst: &mut [f32], scale: f32, shift: f32, silu: bool) {
        if silu {
            for (y, &x) in dst.iter_mut().zip(src) {
                let z = x * scale + shift;
                *y = z * sigmoid(z);
            }
        } else {
            for (y, &x) in dst.iter_mut().zip(src) {
                *y = x * scale + shift;
            }
        }
    }
}

multiversion! {
    /// Mean and `1/√(var + eps)` of a slice (two passes, f32 lane accumulators).
    pub fn moments(xs: &[f32], eps: f32) -> (f32, f32) {
        let n = xs.len().max(1) as f32;
        let mean = sum(xs) / n;
        let mut acc = [0f32; LANES];
        let chunks = xs.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().map(|&x| (x - mean) * (x - mean)).sum();
        for chunk in chunks {
            for (a, &x) in acc.iter_mut().zip(chunk) {
                *a += (x - mean) * (x - mean);
            }
        }
        let var = (acc.iter().sum::<f32>() + tail) / n;
        (mean, 1.0 / (var + eps).sqrt())
    }
}

multiversion! {
    /// Backward through `act(x · scale + shift)`: writes `dz` (the gradient before the
    /// activation) into `dz` and returns `(Σ dz, Σ dz · x)`.
    pub fn affine_backward(x: &[f32], dy: &[f32], dz: &mut [f32], scale: f32, shift: f32, silu: bool) -> (f32, f32) {
        if silu {
            for ((d, &g), &x) in dz.iter_mut().zip(dy).zip(x) {
                let z = x * scale + shift;
                let s = sigmoid(z);
                *d = g * s * (1.0 + z * (1.0 - s));
            }
        } else {
            dz.copy_from_slice(&dy[..dz.len()]);
        }
        (sum(dz), dot(dz, x))
    }
}

multiversion! {
    /// `ys = ys · a + xs · b + c`, in place.
    pub fn axpbyc(ys: &mut [f32], xs: &[f32], a: f32, b: f32, c: f32) {
        for (y, &x) in ys.iter_mut().zip(xs) {
            *y = *y * a + x * b + c;
        }
    }
}

multiversion! {
    /// `ys = (xs − mean) · rstd · weight + bias`, elementwise over one row.
    pub fn normalize_affine(xs: &[f32], ys: &mut [f32], mean: f32, rstd: f32, weight: &[f32], bias: &[f32]) {
        for (((y, &x), &w), &b) in ys.iter_mut().zip(xs).zip(weight).zip(bias) {
            *y = (x - mean) * rstd * w + b;
        }
    }
}

multiversion! {
    /// One row of LayerNorm's backward pass: writes `dx` and adds this row's share of the
    /// weight and bias gradients into `dweight`/`dbias`.
    pub fn layer_norm_backward(
        xs: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        stats: (f32, f32),
        weight: &[f32],
        dweight: &mut [f32],
        dbias: &mut [f32]
    ) {
        let (mean, rstd) = stats;
        let n = xs.len() as f32;
        let mut acc_g = [0f32; LANES];
        let mut acc_gx = [0f32; LANES];
        for (i, (((&x, &g), &w), (dw, db))) in xs
            .iter()
            .zip(dy)
            .zip(weight)
            .zip(dweight.iter_mut().zip(dbias.iter_mut()))
            .enumerate()
        {
            let xhat = (x - mean) * rstd;
            *dw += g * xhat;
            *db += g;
            acc_g[i % LANES] += g * w;
            acc_gx[i % LANES] += g * w * xhat;
        }
        let mean_g = acc_g.iter().sum::<f32>() / n;
        let mean_gx = acc_gx.iter().sum::<f32>() / n;
        for (((d, &x), &g), &w) in dx.iter_mut().zip(xs).zip(dy).zip(weight) {
            let xhat = (x - mean) * rstd;
            *d = rstd * (g * w - mean_g - xhat * mean_gx);
        }
    }
}

multiversion! {
    /// `ys = value · gelu(gate)`.
    pub fn geglu_row(value: &[f32], gate: &[f32], ys: &mut [f32]) {
        for ((y, &v), &g) in ys.iter_mut().zip(value).zip(gate) {
            *y = v * gelu(g);
        }
    }
}

multiversion! {
    /// The backward pass of [`geglu_row`].
    pub fn geglu_row_backward(value: &[f32], gate: &[f32], dy: &[f32], dvalue: &mut [f32], dgate: &mut [f32]) {
        for ((((dv, dg), &v), &g), &d) in dvalue.iter_mut().zip(dgate.iter_mut()).zip(value).zip(gate).zip(dy) {
            *dv = d * gelu(g);
            *dg = d * v * gelu_grad(g);
        }
    }
}

/// `σ(alpha · x)` and `x · σ(alpha · x)`'s derivative `σ + alpha · x · σ · (1 − σ)`.
#[inline(always)]
fn gated_sigmoid_grad(x: f32, alpha: f32) -> f32 {
    let s = sigmoid(alpha * x);
    s + alpha * x * s * (1.0 - s)
}

/// The gate slope of the sigmoid-gated activations (QuickGELU, SiLU), `None` for GELU.
fn sigmoid_slope(act: Activation) -> Option<f32> {
    match act {
        Activation::QuickGelu => Some(1.702),
        Activation::Silu => Some(1.0),
        Activation::Gelu => None,
    }
}

multiversion! {
    /// `ys = act(xs)`.
    pub fn activation(act: Activation, xs: &[f32], ys: &mut [f32]) {
        match sigmoid_slope(act) {
            Some(alpha) => {
                for (y, &x) in ys.iter_mut().zip(xs) {
                    *y = x * sigmoid(alpha * x);
                }
            }
            None => {
                for (y, &x) in ys.iter_mut().zip(xs) {
                    *y = gelu(x);
                }
            }
        }
    }
}

multiversion! {
    /// `dx = dy · act'(xs)`.
    pub fn activation_backward(act: Activation, xs: &[f32], dy: &[f32], dx: &mut [f32]) {
        match sigmoid_slope(act) {
            Some(alpha) => {
                for ((d, &x), &g) in dx.iter_mut().zip(xs).zip(dy) {
                    *d = g * gated_sigmoid_grad(x, alpha);
                }
            }
            None => {
                for ((d, &x), &g) in dx.iter_mut().zip(xs).zip(dy) {
                    *d = g * gelu_grad(x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approximations_match_std_and_libm() {
        let mut worst = (0f64, 0f64, 0f64);
        for i in -4000..=4000 {
            let x = i as f32 * 0.0215;
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst.0 = worst.0.max(rel);
            worst.1 = worst.1.max((erf(x) as f64 - libm::erf(x as f64)).abs());
            let exact_gelu = 0.5 * x as f64 * (1.0 + libm::erf(x as f64 / 2f64.sqrt()));
            worst.2 = worst.2.max((gelu(x) as f64 - exact_gelu).abs());
        }
        assert!(worst.0 < 4e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 1e-6, "erf absolute error {}", worst.1);
        assert!(worst.2 < 3e-6, "gelu absolute error {}", worst.2);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-87.5), 0.0);
        assert!(exp(-87.0).is_normal() && exp(-86.9) > exp(-87.0));
    }

    #[test]
    fn gelu_gradient_matches_finite_differences() {
        for i in -60..=60 {
            let x = i as f64 * 0.1;
            let h = 1e-4;
            let g = |x: f64| 0.5 * x * (1.0 + libm::erf(x / 2f64.sqrt()));
            let numeric = (g(x + h) - g(x - h)) / (2.0 * h);
            assert!(
                (gelu_grad(x as f32) as f64 - numeric).abs() < 2e-6,
                "x = {x}"
            );
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_return_the_log_sum_exp() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let exact: f64 = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        let lse = softmax_in_place(&mut row);
        assert!((lse as f64 - exact).abs() < 1e-5);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let mut masked = vec![f32::NEG_INFINITY; 5];
        assert_eq!(softmax_in_place(&mut masked), f32::NEG_INFINITY);
        assert!(masked.iter().all(|&p| p == 0.0));
    }
}
