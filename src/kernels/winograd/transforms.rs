//! The transforms of Winograd's F(2×2, 3×3) and F(4×4, 3×3): `V = Bᵀ d B` of the input
//! tiles, `U = G g Gᵀ` of the kernels and `Y = Aᵀ M A` back to output pixels, each applied to
//! a whole row of tiles at once (one value per tile in every slice, so that vector lanes run
//! across tiles). The matrices are constants, so the compiler folds their zeros and ones
//! away; every transform is one pass over its values per dimension.

use super::super::simd::multiversion;

/// One minimal filtering algorithm F(m×m, 3×3), n = m + 2: `Bᵀ` (n × n), `G` (n × 3) and
/// `Aᵀ` (m × n).
struct Scheme<const M: usize, const N: usize> {
    bt: [[f32; N]; N],
    g: [[f32; 3]; N],
    at: [[f32; N]; M],
}

impl<const M: usize, const N: usize> Scheme<M, N> {
    /// Output pixels per tile side.
    const fn m(&self) -> usize {
        M
    }
}

/// F(2×2, 3×3), interpolation points 0, ±1 and ∞.
const F2: Scheme<2, 4> = Scheme {
    bt: [
        [1.0, 0.0, -1.0, 0.0],
        [0.0, 1.0, 1.0, 0.0],
        [0.0, -1.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, -1.0],
    ],
    g: [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ],
    at: [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]],
};

/// F(4×4, 3×3) with interpolation points 0, 1, -1, 2, -1/2 and ∞ (rather than Lavin's ±2:
/// 2.6× less f32 rounding in a simulation over random tiles, 6× F(2×2, 3×3)'s, where ±2
/// gave 16×), `Bᵀ`'s rows scaled to small integers and `G`'s by the inverse.
const F4: Scheme<4, 6> = Scheme {
    bt: [
        [2.0, 3.0, -4.0, -3.0, 2.0, 0.0],
        [0.0, 2.0, 5.0, 1.0, -2.0, 0.0],
        [0.0, 2.0, 1.0, -5.0, 2.0, 0.0],
        [0.0, -1.0, -2.0, 1.0, 2.0, 0.0],
        [0.0, -2.0, 1.0, 2.0, -1.0, 0.0],
        [0.0, 2.0, 3.0, -4.0, -3.0, 2.0],
    ],
    g: [
        [1.0 / 2.0, 0.0, 0.0],
        [1.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0],
        [1.0 / 6.0, -1.0 / 6.0, 1.0 / 6.0],
        [1.0 / 30.0, 1.0 / 15.0, 2.0 / 15.0],
        [16.0 / 15.0, -8.0 / 15.0, 4.0 / 15.0],
        [0.0, 0.0, 1.0 / 2.0],
    ],
    at: [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -0.5, 0.0],
        [0.0, 1.0, 1.0, 4.0, 0.25, 0.0],
        [0.0, 1.0, -1.0, 8.0, -0.125, 1.0],
    ],
};

/// Where the n² positions of a row of tiles lie in a buffer: position ξ from `at + ξ·stride`.
#[derive(Debug, Clone, Copy)]
pub(in crate::kernels) struct Strided {
    pub at: usize,
    pub stride: usize,
}

impl Strided {
    fn position(self, xi: usize) -> usize {
        self.at + xi * self.stride
    }
}

/// `Aᵀ M A + bias` of a row of tiles (position ξ of every tile in the products from
/// `positions.position(ξ)`), written as up to m output rows of `width` pixels (fewer past
/// the image's last row); the scratch holds `(n + 1) · m · tiles` values.
pub(in crate::kernels) type OutputTransform = fn(
    products: &[f32],
    positions: Strided,
    bias: f32,
    temp: &mut [f32],
    out: &mut [f32],
    width: usize,
);

/// One scheme's transforms, for the convolution driver.
pub(in crate::kernels) struct Transforms {
    /// Output pixels per tile side (m).
    pub m: usize,
    /// `Bᵀ d B` of a row of tiles. The input slice holds the tiles' n input rows, each as m
    /// column phases of `phase_len` values (phase p: columns `m·i + p`); tile t reads columns
    /// `m·t .. m·t + n`, column j of it at index `t + j / m` of phase `j % m`. The tiles'
    /// position ξ goes to the output from `positions.position(ξ)`; the scratch holds
    /// `(n + 1) · m · phase_len` values.
    pub input: fn(rows: &[f32], temp: &mut [f32], dst: &mut [f32], positions: Strided),
    /// `Aᵀ M A + bias` of a row of tiles: see [`OutputTransform`].
    pub output: OutputTransform,
    /// `G g Gᵀ` of one output channel's kernels (`[c_in, 3, 3]`) into `[n², c_in]`.
    pub kernel: fn(kernels: &[f32], u: &mut [f32]),
}

impl Transforms {
    /// Input pixels per tile side (n).
    pub fn n(&self) -> usize {
        self.m + 2
    }

    pub fn positions(&self) -> usize {
        self.n() * self.n()
    }
}

/// A scheme's [`Transforms`]: its three transforms as functions compiled for each
/// instruction set (`multiversion!` takes no generic functions, so one per scheme).
macro_rules! transforms_of {
    ($scheme:ident, $input:ident, $output:ident, $kernel:ident) => {{
        multiversion! {
            pub fn $input(rows: &[f32], temp: &mut [f32], dst: &mut [f32], positions: Strided) {
                input_transform(&$scheme, rows, temp, dst, positions)
            }
        }
        multiversion! {
            pub fn $output(
                products: &[f32],
                positions: Strided,
                bias: f32,
                temp: &mut [f32],
                out: &mut [f32],
                width: usize
            ) {
                output_transform(&$scheme, products, positions, bias, temp, out, width)
            }
        }
        pub fn $kernel(kernels: &[f32], u: &mut [f32]) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2(kernels: &[f32], u: &mut [f32]) {
                    // SAFETY: this function runs only where the CPU has AVX2.
                    kernel_transform(&$scheme, kernels, u, |block| unsafe {
                        gather_taps_avx2(block)
                    })
                }
                // SAFETY: the CPU supports every feature the function is compiled for.
                return unsafe { avx2(kernels, u) };
            }
            kernel_transform(&$scheme, kernels, u, gather_taps)
        }
        Transforms {
            m: $scheme.m(),
            input: $input,
            output: $output,
            kernel: $kernel,
        }
    }};
}

pub(in crate::kernels) const F2_TRANSFORMS: Transforms =
    transforms_of!(F2, input_f2, output_f2, kernel_f2);

pub(in crate::kernels) const F4_TRANSFORMS: Transforms =
    transforms_of!(F4, input_f4, output_f4, kernel_f4);

/// Values per pass of [`transform`]: two AVX2 or one AVX-512 register per slice.
const LANES: usize = 16;

/// `dst[k][i] = Σ_j matrix[k][j] · src[j][i]` for every i < `dst[k].len()`, the nonzero
/// terms in order of j. `LANES` values at a time through local arrays, which do not alias,
/// so the compiler keeps them in vector registers.
#[inline(always)]
fn transform<const IN: usize, const OUT: usize>(
    matrix: &[[f32; IN]; OUT],
    src: [&[f32]; IN],
    mut dst: [&mut [f32]; OUT],
) {
    let len = dst[0].len();
    for start in (0..len).step_by(LANES) {
        let width = LANES.min(len - start);
        let mut x = [[0f32; LANES]; IN];
        for (x, src) in x.iter_mut().zip(&src) {
            copy(&mut x[..width], &src[start..start + width]);
        }
        for (row, dst) in matrix.iter().zip(dst.iter_mut()) {
            let mut y = [0f32; LANES];
            for (lane, y) in y.iter_mut().enumerate() {
                *y = dot(row, |j| x[j][lane]);
            }
            copy(&mut dst[start..start + width], &y[..width]);
        }
    }
}

/// `dst.copy_from_slice(src)`, as plain vector moves for whole `LANES` (a `memcpy` call
/// otherwise).
#[inline(always)]
fn copy(dst: &mut [f32], src: &[f32]) {
    match (
        <&mut [f32; LANES]>::try_from(&mut *dst),
        <&[f32; LANES]>::try_from(src),
    ) {
        (Ok(dst), Ok(src)) => *dst = *src,
        _ => dst.copy_from_slice(src),
    }
}

/// `Σ_j row[j] · x(j)` over the nonzero coefficients, in order, each term after the first
/// one fused multiply-add (an add or subtract where the coefficient is ±1).
#[inline(always)]
fn dot<const IN: usize>(row: &[f32; IN], x: impl Fn(usize) -> f32) -> f32 {
    let mut sum: Option<f32> = None;
    for (j, &c) in row.iter().enumerate() {
        if c != 0.0 {
            sum = Some(sum.map_or(c * x(j), |sum| c.mul_add(x(j), sum)));
        }
    }
    sum.unwrap_or(0.0)
}

#[inline(always)]
fn input_transform<const M: usize, const N: usize>(
    scheme: &Scheme<M, N>,
    rows: &[f32],
    temp: &mut [f32],
    dst: &mut [f32],
    positions: Strided,
) {
    let phase_len = rows.len() / (N * M);
    let tiles = phase_len - 1;
    let temp = &mut temp[..N * M * phase_len];
    // Bᵀ over the rows, phase by phase: t[i·M + p] from rows[a·M + p].
    for p in 0..M {
        let src = std::array::from_fn(|a| &rows[(a * M + p) * phase_len..][..phase_len]);
        let mut outputs = temp.chunks_exact_mut(phase_len).skip(p).step_by(M);
        let dst = std::array::from_fn(|_| outputs.next().expect("N rows of M phases"));
        transform(&scheme.bt, src, dst);
    }
    // … then B over the columns: position i·N + k of every tile from its columns j.
    let temp = &*temp;
    for i in 0..N {
        let src = std::array::from_fn(|j| &temp[(i * M + j % M) * phase_len + j / M..][..tiles]);
        let dst = split_positions::<N>(dst, positions, i * N, tiles);
        transform(&scheme.bt, src, dst);
    }
}

/// The `COUNT` consecutive positions from `first` of a row of `tiles` tiles in `buffer`, as
/// disjoint mutable slices (positions lie `positions.stride ≥ tiles` apart).
#[inline(always)]
fn split_positions<const COUNT: usize>(
    buffer: &mut [f32],
    positions: Strided,
    first: usize,
    tiles: usize,
) -> [&mut [f32]; COUNT] {
    let mut rest = &mut buffer[positions.position(first)..];
    std::array::from_fn(|_| {
        let taken = std::mem::take(&mut rest);
        let at = positions.stride.min(taken.len());
        let (slice, tail) = taken.split_at_mut(at);
        rest = tail;
        &mut slice[..tiles]
    })
}

#[inline(always)]
fn output_transform<const M: usize, const N: usize>(
    scheme: &Scheme<M, N>,
    products: &[f32],
    positions: Strided,
    bias: f32,
    temp: &mut [f32],
    out: &mut [f32],
    width: usize,
) {
    let tiles = width.div_ceil(M);
    let (s, columns) = temp.split_at_mut(M * N * tiles);
    // Aᵀ over the rows: s[r·N + j] from positions i·N + j.
    for j in 0..N {
        let src = std::array::from_fn(|i| &products[positions.position(i * N + j)..][..tiles]);
        let mut outputs = s.chunks_exact_mut(tiles).skip(j).step_by(N);
        let dst = std::array::from_fn(|_| outputs.next().expect("M rows of N"));
        transform(&scheme.at, src, dst);
    }
    let s = &*s;
    for (r, out) in out.chunks_exact_mut(width).enumerate() {
        // … then A over the columns: output column M·t + c of every tile t.
        let src = std::array::from_fn(|j| &s[(r * N + j) * tiles..][..tiles]);
        let mut outputs = columns.chunks_exact_mut(tiles);
        let dst = std::array::from_fn(|_| outputs.next().expect("M columns"));
        transform(&scheme.at, src, dst);
        for (t, pixels) in out.chunks_mut(M).enumerate() {
            for (c, pixel) in pixels.iter_mut().enumerate() {
                *pixel = columns[c * tiles + t] + bias;
            }
        }
    }
}

/// Input channels per pass of the kernel transform: one AVX2 register of lanes.
const KERNEL_LANES: usize = 8;

/// The taps of `KERNEL_LANES` consecutive kernels (`[lane][tap]` in memory) as one slice of
/// lanes per tap.
type Taps = [[f32; KERNEL_LANES]; 9];

/// `G g Gᵀ` of one output channel's kernels (`[c_in, 3, 3]`) into `u` (`[n², c_in]`),
/// `KERNEL_LANES` input channels at a time, each block's taps fetched by `gather` and its
/// transform kept in registers. The taps' transposition was most of the scalar version's
/// time, so it is one hardware gather per tap where the CPU has one (see `transforms_of!`);
/// what remains is bound by writing `u`.
#[inline(always)]
fn kernel_transform<const M: usize, const N: usize>(
    scheme: &Scheme<M, N>,
    kernels: &[f32],
    u: &mut [f32],
    gather: impl Fn(&[f32]) -> Taps,
) {
    let c_in = kernels.len() / 9;
    let blocks = kernels.chunks_exact(9 * KERNEL_LANES);
    let rest = blocks.remainder();
    for (b, block) in blocks.enumerate() {
        kernel_block(
            scheme,
            &gather(block),
            u,
            b * KERNEL_LANES..(b + 1) * KERNEL_LANES,
        );
    }
    if !rest.is_empty() {
        kernel_block(scheme, &gather_taps(rest), u, c_in - rest.len() / 9..c_in);
    }
}

/// The taps of up to `KERNEL_LANES` kernels, one value at a time (missing lanes zero).
#[inline(always)]
fn gather_taps(kernels: &[f32]) -> Taps {
    let mut taps = [[0f32; KERNEL_LANES]; 9];
    for (lane, kernel) in kernels.chunks_exact(9).enumerate() {
        for (tap, &value) in taps.iter_mut().zip(kernel) {
            tap[lane] = value;
        }
    }
    taps
}

/// [`gather_taps`] of a whole block by AVX2's gather instruction, one per tap.
///
/// # Safety
/// The CPU must support AVX2; `kernels` holds `9 · KERNEL_LANES` values.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn gather_taps_avx2(kernels: &[f32]) -> Taps {
    use std::arch::x86_64::{_mm256_i32gather_ps, _mm256_setr_epi32, _mm256_storeu_ps};
    assert_eq!(kernels.len(), 9 * KERNEL_LANES, "one block of kernels");
    let mut taps = [[0f32; KERNEL_LANES]; 9];
    let lanes = _mm256_setr_epi32(0, 9, 18, 27, 36, 45, 54, 63);
    for (k, tap) in taps.iter_mut().enumerate() {
        // SAFETY: lane l reads kernels[9·l + k] < 9 · KERNEL_LANES; the store writes the
        // eight values of `tap`.
        unsafe {
            let values = _mm256_i32gather_ps::<4>(kernels.as_ptr().add(k), lanes);
            _mm256_storeu_ps(tap.as_mut_ptr(), values);
        }
    }
    taps
}

/// `G g Gᵀ` of the kernels of input channels `channels` (their taps in `taps`) into `u`.
/// Every coefficient is applied, zeros included: with the lanes across channels these are
/// whole-vector fused multiply-adds, and a sum gains nothing from an exact zero term.
#[inline(always)]
fn kernel_block<const M: usize, const N: usize>(
    scheme: &Scheme<M, N>,
    taps: &Taps,
    u: &mut [f32],
    channels: std::ops::Range<usize>,
) {
    let c_in = u.len() / (N * N);
    let lanes = channels.len();
    for i in 0..N {
        // G over the kernel rows: r[j] = Σ_k G[i][k] · g[k][j] …
        let mut r = [[0f32; KERNEL_LANES]; 3];
        for (j, r) in r.iter_mut().enumerate() {
            combine(r, &scheme.g[i], [&taps[j], &taps[3 + j], &taps[6 + j]]);
        }
        // … then over the columns: position i·N + l = Σ_k G[l][k] · r[k].
        for l in 0..N {
            let mut y = [0f32; KERNEL_LANES];
            combine(&mut y, &scheme.g[l], [&r[0], &r[1], &r[2]]);
            let at = (i * N + l) * c_in + channels.start;
            match <&mut [f32; KERNEL_LANES]>::try_from(&mut u[at..at + lanes]) {
                // A whole block as plain vector moves (`copy_from_slice` is a `memcpy` call).
                Ok(whole) => *whole = y,
                Err(_) => u[at..at + lanes].copy_from_slice(&y[..lanes]),
            }
        }
    }
}

/// `y = c[0]·x[0] + c[1]·x[1] + c[2]·x[2]`, lane by lane.
#[inline(always)]
fn combine(y: &mut [f32; KERNEL_LANES], c: &[f32; 3], x: [&[f32; KERNEL_LANES]; 3]) {
    for (lane, y) in y.iter_mut().enumerate() {
        *y = c[2].mul_add(x[2][lane], c[1].mul_add(x[1][lane], c[0] * x[0][lane]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several input channels at once (a whole block of lanes, by the CPU's gather where it
    /// has one, then a partial block) give each channel's own transform.
    #[test]
    fn kernel_blocks_match_single_kernels() {
        for transforms in [&F2_TRANSFORMS, &F4_TRANSFORMS] {
            let positions = transforms.positions();
            let c_in = KERNEL_LANES + 3;
            let kernels: Vec<f32> = (0..9 * c_in)
                .map(|i| ((i * 13 + 5) % 17) as f32 * 0.125 - 1.0)
                .collect();
            let mut u = vec![0f32; positions * c_in];
            (transforms.kernel)(&kernels, &mut u);
            for (c, kernel) in kernels.chunks_exact(9).enumerate() {
                let mut single = vec![0f32; positions];
                (transforms.kernel)(kernel, &mut single);
                for (xi, &value) in single.iter().enumerate() {
                    assert_eq!(
                        u[xi * c_in + c],
                        value,
                        "m = {}, channel {c}, position {xi}",
                        transforms.m
                    );
                }
            }
        }
    }

    /// The transforms of one tile compute the direct 3×3 correlation of its n×n patch (plus
    /// the bias), for both schemes.
    #[test]
    fn transforms_compute_a_correlation() {
        for transforms in [&F2_TRANSFORMS, &F4_TRANSFORMS] {
            let (m, n) = (transforms.m, transforms.n());
            let d: Vec<f32> = (0..n * n)
                .map(|i| ((i * 7 + 3) % 11) as f32 - 5.0)
                .collect();
            let g: Vec<f32> = (0..9)
                .map(|i| ((i * 5 + 1) % 7) as f32 * 0.25 - 0.75)
                .collect();
            // One tile: row a's phase p holds columns p and m + p (zero past the patch).
            let rows: Vec<f32> = (0..n * m)
                .flat_map(|i| {
                    let (a, p) = (i / m, i % m);
                    [d[n * a + p], if m + p < n { d[n * a + m + p] } else { 0.0 }]
                })
                .collect();
            let mut temp = vec![0f32; (n + 1) * m * 2];
            let mut v = vec![0f32; n * n];
            let positions = Strided { at: 0, stride: 1 };
            (transforms.input)(&rows, &mut temp, &mut v, positions);
            let mut u = vec![0f32; n * n];
            (transforms.kernel)(&g, &mut u);
            let products: Vec<f32> = u.iter().zip(&v).map(|(u, v)| u * v).collect();
            let mut out = vec![0f32; m * m];
            (transforms.output)(&products, positions, 0.5, &mut temp, &mut out, m);
            for (i, &value) in out.iter().enumerate() {
                let (oy, ox) = (i / m, i % m);
                let direct: f32 = (0..9)
                    .map(|k| g[k] * d[(oy + k / 3) * n + ox + k % 3])
                    .sum::<f32>()
                    + 0.5;
                assert!(
                    (value - direct).abs() < 1e-4,
                    "F({m}): {i}: {value} vs {direct}"
                );
            }
        }
    }
}
