//! The fused kernels against candle's composed ops, forward and backward.
//!
//! The reference is each op's `_composed` twin run in f64 (exact to ~1e-15), so the stated
//! tolerances measure the kernels' f32 error alone; half-precision inputs are checked against
//! the f32 kernel within their own rounding. One directional finite-difference check per op
//! guards the reference's gradients themselves.

mod common;

use candle_core::{DType, Result, Tensor, Var};
use common::values;
use ldm::kernels;

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Runs `op` on f32 copies of `inputs` (the kernel) and on the f64 originals (the composed
/// reference), then backpropagates `Σ out · probe` through both; returns the largest output
/// difference and the largest gradient difference relative to the gradient's scale.
fn compare(inputs: &[Tensor], op: impl Fn(&[Tensor]) -> Result<Tensor>) -> (f64, f64) {
    let run = |dtype: DType| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = op(&tensors).unwrap();
        let probe = values(out.dims(), 99, 1.0).to_dtype(dtype).unwrap();
        let grads = (&out * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grads: Vec<Tensor> = vars.iter().map(|v| grads.get(v).unwrap().clone()).collect();
        (out, grads)
    };
    let (out32, grads32) = run(DType::F32);
    let (out64, grads64) = run(DType::F64);
    let grad_err = grads32
        .iter()
        .zip(&grads64)
        .map(|(a, b)| {
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .max(1e-3);
            max_diff(a, b) / scale
        })
        .fold(0.0, f64::max);
    (max_diff(&out32, &out64), grad_err)
}

/// Directional finite difference of `Σ op(x) · probe` along `direction` (f64 composed path)
/// against the kernel's f32 gradient.
fn check_finite_difference(input: &Tensor, op: impl Fn(&Tensor) -> Result<Tensor>) {
    let direction = values(input.dims(), 7, 1.0);
    let loss = |x: &Tensor| {
        let out = op(x).unwrap();
        let probe = values(out.dims(), 99, 1.0).to_dtype(out.dtype()).unwrap();
        (out * probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-5;
    let numeric = (loss(&(input + (&direction * h).unwrap()).unwrap())
        - loss(&(input - (&direction * h).unwrap()).unwrap()))
        / (2.0 * h);
    let var = Var::from_tensor(&input.to_dtype(DType::F32).unwrap()).unwrap();
    let out = op(var.as_tensor()).unwrap();
    let probe = values(out.dims(), 99, 1.0).to_dtype(DType::F32).unwrap();
    let grads = (out * probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let analytic = (grads.get(&var).unwrap().to_dtype(DType::F64).unwrap() * direction)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let rel = (analytic - numeric).abs() / numeric.abs().max(1e-3);
    assert!(
        rel < 1e-3,
        "finite difference {numeric} vs kernel gradient {analytic}"
    );
}

#[test]
fn attention_matches_composed_ops_forward_and_backward() {
    // (batch, q_len, kv_len, heads, head_dim, causal): SD's head dims 40/64/80/160, lengths that
    // are not multiples of the 128-query block, cross-attention (77 keys), CLIP's causal mask,
    // and more keys than one 512-key block of the forward's online softmax (the last block
    // partial; causal rows that see none of a later block).
    let cases = [
        (2, 70, 70, 2, 40, false),
        (1, 129, 77, 3, 64, false),
        (2, 33, 17, 1, 80, false),
        (1, 65, 65, 2, 160, false),
        (2, 77, 77, 4, 16, true),
        (1, 1, 1, 1, 8, true),
        (1, 70, 1100, 2, 40, false),
        (1, 600, 600, 1, 8, true),
    ];
    for (i, &(b, l, s, h, d, causal)) in cases.iter().enumerate() {
        let q = values(&[b, l, h * d], 3 * i as u64, 2.0);
        let k = values(&[b, s, h * d], 3 * i as u64 + 1, 2.0);
        let v = values(&[b, s, h * d], 3 * i as u64 + 2, 1.0);
        let (out_err, grad_err) = compare(&[q, k, v], |t| {
            if t[0].dtype() == DType::F64 {
                kernels::attention_composed(&t[0], &t[1], &t[2], h, causal)
            } else {
                kernels::attention(&t[0], &t[1], &t[2], h, causal)
            }
        });
        assert!(out_err < 2e-6, "case {i}: forward error {out_err}");
        assert!(grad_err < 1e-5, "case {i}: gradient error {grad_err}");
    }
}

#[test]
fn attention_accepts_strided_views_and_half_precision() {
    // q and k as column slices of wider rows (a fused projection's output), v as a batch
    // transpose: every stride but the last differs from a contiguous tensor's.
    let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    let q = f32(values(&[2, 50, 360], 1, 2.0))
        .narrow(2, 120, 120)
        .unwrap();
    let k = f32(values(&[2, 50, 240], 2, 2.0))
        .narrow(2, 0, 120)
        .unwrap();
    let v = f32(values(&[50, 2, 120], 3, 1.0)).transpose(0, 1).unwrap();
    let fused = kernels::attention(&q, &k, &v, 3, false).unwrap();
    let reference = kernels::attention_composed(&q, &k, &v, 3, false).unwrap();
    assert!(max_diff(&fused, &reference) < 2e-6);
    for dtype in [DType::F16, DType::BF16] {
        let half = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let out = kernels::attention(&half(&q), &half(&k), &half(&v), 3, false).unwrap();
        assert_eq!(out.dtype(), dtype);
        let tolerance = if dtype == DType::F16 { 3e-3 } else { 2e-2 };
        assert!(
            max_diff(&out, &reference) < tolerance,
            "{dtype:?}: {}",
            max_diff(&out, &reference)
        );
    }
}

#[test]
fn attention_refuses_heads_that_do_not_divide_the_width() {
    let x = values(&[1, 4, 10], 1, 1.0);
    let err = kernels::attention(&x, &x, &x, 3, false).unwrap_err();
    assert!(err.to_string().contains("3 heads"), "{err}");
}

#[test]
fn attention_gradient_matches_finite_differences() {
    let k = values(&[1, 9, 16], 11, 1.0);
    let v = values(&[1, 9, 16], 12, 1.0);
    check_finite_difference(&values(&[1, 9, 16], 10, 1.0), |q| {
        if q.dtype() == DType::F64 {
            kernels::attention_composed(q, &k, &v, 2, true)
        } else {
            kernels::attention(
                q,
                &k.to_dtype(DType::F32)?,
                &v.to_dtype(DType::F32)?,
                2,
                true,
            )
        }
    });
}

#[test]
fn group_norm_matches_composed_ops_with_and_without_silu() {
    // (shape, groups): SD's 32 groups, a group of one channel, a 3-D (1-D spatial) input.
    let cases: [(&[usize], usize); 4] = [
        (&[2, 64, 9, 7], 32),
        (&[3, 6, 5, 5], 6),
        (&[1, 8, 33], 2),
        (&[2, 4, 1, 1], 1),
    ];
    for (i, (shape, groups)) in cases.into_iter().enumerate() {
        for silu in [false, true] {
            let channels = shape[1];
            let xs = (values(shape, i as u64, 3.0) + 0.5).unwrap();
            let weight = (values(&[channels], 40 + i as u64, 0.5) + 1.0).unwrap();
            let bias = values(&[channels], 80 + i as u64, 0.5);
            let (out_err, grad_err) = compare(&[xs, weight, bias], |t| {
                let f = if t[0].dtype() == DType::F64 {
                    kernels::group_norm_composed
                } else {
                    kernels::group_norm
                };
                f(&t[0], &t[1], &t[2], groups, 1e-6, silu)
            });
            assert!(
                out_err < 1e-5,
                "case {i} silu {silu}: forward error {out_err}"
            );
            assert!(
                grad_err < 1e-5,
                "case {i} silu {silu}: gradient error {grad_err}"
            );
        }
    }
}

#[test]
fn layer_norm_matches_composed_ops() {
    for (i, shape) in [&[2usize, 77, 32][..], &[3, 5, 320], &[1, 1, 7], &[200, 3]]
        .into_iter()
        .enumerate()
    {
        let dim = *shape.last().unwrap();
        let xs = (values(shape, i as u64, 2.0) + 1.0).unwrap();
        let weight = (values(&[dim], 10 + i as u64, 0.5) + 1.0).unwrap();
        let bias = values(&[dim], 20 + i as u64, 0.5);
        let (out_err, grad_err) = compare(&[xs, weight, bias], |t| {
            let f = if t[0].dtype() == DType::F64 {
                kernels::layer_norm_composed
            } else {
                kernels::layer_norm
            };
            f(&t[0], &t[1], &t[2], 1e-5)
        });
        assert!(out_err < 1e-5, "case {i}: forward error {out_err}");
        assert!(grad_err < 1e-5, "case {i}: gradient error {grad_err}");
    }
}

#[test]
fn softmax_and_geglu_match_composed_ops() {
    for (i, shape) in [&[4usize, 7, 33][..], &[2, 1], &[3, 1000]]
        .into_iter()
        .enumerate()
    {
        let xs = values(shape, i as u64, 6.0);
        let (out_err, grad_err) = compare(&[xs], |t| {
            if t[0].dtype() == DType::F64 {
                kernels::softmax_last_dim_composed(&t[0])
            } else {
                kernels::softmax_last_dim(&t[0])
            }
        });
        assert!(out_err < 1e-6, "softmax case {i}: forward error {out_err}");
        assert!(
            grad_err < 1e-5,
            "softmax case {i}: gradient error {grad_err}"
        );
    }
    for (i, shape) in [&[2usize, 9, 40][..], &[1, 2], &[3, 5, 1280]]
        .into_iter()
        .enumerate()
    {
        let xs = values(shape, 30 + i as u64, 4.0);
        let (out_err, grad_err) = compare(&[xs], |t| {
            if t[0].dtype() == DType::F64 {
                kernels::geglu_composed(&t[0])
            } else {
                kernels::geglu(&t[0])
            }
        });
        assert!(out_err < 2e-5, "geglu case {i}: forward error {out_err}");
        assert!(grad_err < 1e-5, "geglu case {i}: gradient error {grad_err}");
    }
}

#[test]
fn norm_and_activation_gradients_match_finite_differences() {
    let xs = values(&[2, 4, 3, 3], 5, 2.0);
    let (w, b) = ((values(&[4], 6, 0.5) + 1.0).unwrap(), values(&[4], 7, 0.5));
    let pick = |x: &Tensor, t: &Tensor| t.to_dtype(x.dtype());
    check_finite_difference(&xs, |x| {
        let f = if x.dtype() == DType::F64 {
            kernels::group_norm_composed
        } else {
            kernels::group_norm
        };
        f(x, &pick(x, &w)?, &pick(x, &b)?, 2, 1e-6, true)
    });
    let rows = values(&[3, 4], 8, 2.0);
    check_finite_difference(&rows, |x| {
        let f = if x.dtype() == DType::F64 {
            kernels::layer_norm_composed
        } else {
            kernels::layer_norm
        };
        f(x, &pick(x, &w)?, &pick(x, &b)?, 1e-5)
    });
    check_finite_difference(&rows, |x| {
        if x.dtype() == DType::F64 {
            kernels::softmax_last_dim_composed(x)
        } else {
            kernels::softmax_last_dim(x)
        }
    });
    check_finite_difference(&rows, |x| {
        if x.dtype() == DType::F64 {
            kernels::geglu_composed(x)
        } else {
            kernels::geglu(x)
        }
    });
}

#[test]
fn half_precision_norms_follow_the_f32_kernel() {
    let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    let xs = f32(values(&[2, 8, 5, 5], 1, 2.0));
    let (w, b) = (f32(values(&[8], 2, 1.0)), f32(values(&[8], 3, 1.0)));
    let (w5, b5) = (f32(values(&[5], 4, 1.0)), f32(values(&[5], 5, 1.0)));
    let group_ref = kernels::group_norm(&xs, &w, &b, 4, 1e-5, true).unwrap();
    let layer_ref = kernels::layer_norm(&xs, &w5, &b5, 1e-5).unwrap();
    for (dtype, tolerance) in [(DType::F16, 1e-2), (DType::BF16, 6e-2)] {
        let h = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let group = kernels::group_norm(&h(&xs), &h(&w), &h(&b), 4, 1e-5, true).unwrap();
        let layer = kernels::layer_norm(&h(&xs), &h(&w5), &h(&b5), 1e-5).unwrap();
        assert_eq!((group.dtype(), layer.dtype()), (dtype, dtype));
        assert!(
            max_diff(&group, &group_ref) < tolerance,
            "{dtype:?} group norm"
        );
        assert!(
            max_diff(&layer, &layer_ref) < tolerance,
            "{dtype:?} layer norm"
        );
    }
}

/// `(batch, c_in, c_out, kernel, stride, padding, h, w)`.
type ConvCase = (usize, usize, usize, usize, usize, usize, usize, usize);
type Conv = fn(&Tensor, &Tensor, &Tensor, usize, usize) -> Result<Tensor>;

/// [`compare`] of `conv` (in f32) against candle's convolution (in f64) on seeded inputs.
fn conv_errors(case: ConvCase, seed: u64, conv: Conv) -> (f64, f64) {
    let (b, cin, cout, k, stride, pad, h, w) = case;
    let xs = values(&[b, cin, h, w], seed, 1.0);
    let weight = values(&[cout, cin, k, k], seed + 10, 0.5);
    let bias = values(&[cout], seed + 20, 0.5);
    compare(&[xs, weight, bias], |t| {
        let f = if t[0].dtype() == DType::F64 {
            kernels::conv2d_composed
        } else {
            conv
        };
        f(&t[0], &t[1], &t[2], stride, pad)
    })
}

#[test]
fn conv2d_matches_candle_forward_and_backward() {
    // (batch, c_in, c_out, kernel, stride, padding, h, w): SD's 3×3 same convs, the strided
    // downsampler with and without padding, 1×1 projections, an odd batch (the backward pass
    // works in chunks of two images) and images narrower than a tile or many tiles tall;
    // small images grouped several to a work item (16 pixels: 16 images to a group, 19 = a
    // full group and a partial one; strided and 1×1 too), an unpadded 3×3 (its input
    // gradient a convolution padded by 2); the last six but one take the Winograd path for
    // 3×3 same convolutions (≥ 16 channels each way), F(2×2, 3×3) from 1024 pixels per image
    // (from 256 with ≥ 256 channels each way: 16×17 here, and 15×17 just below it by im2col)
    // and F(4×4, 3×3) from 4096, odd sizes included; im2col at the widths it copies with a
    // length fixed at compile time (4, 8, 16, 32, 64) beside others; one thread and two.
    let cases = [
        (2, 3, 4, 3, 1, 1, 7, 8),
        (3, 5, 6, 1, 1, 0, 5, 6),
        (1, 4, 4, 3, 2, 1, 9, 11),
        (2, 4, 3, 3, 2, 0, 9, 11),
        (19, 6, 5, 3, 1, 1, 4, 4),
        (5, 4, 3, 3, 2, 1, 8, 8),
        (5, 3, 4, 1, 1, 0, 6, 6),
        (3, 4, 5, 3, 1, 0, 6, 7),
        (1, 2, 3, 3, 1, 1, 40, 9),
        (2, 64, 32, 3, 1, 1, 6, 6),
        (1, 16, 24, 3, 1, 1, 33, 33),
        (3, 20, 16, 3, 1, 1, 31, 35),
        (1, 16, 20, 3, 1, 1, 65, 67),
        (2, 24, 16, 3, 1, 1, 64, 64),
        (1, 256, 256, 3, 1, 1, 15, 17),
        (1, 256, 256, 3, 1, 1, 16, 17),
        (2, 8, 6, 3, 1, 1, 16, 16),
        (1, 4, 5, 3, 1, 1, 9, 32),
        (1, 3, 2, 3, 1, 1, 5, 64),
    ];
    let pools = [1, 2].map(|threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    });
    for (i, &case) in cases.iter().enumerate() {
        let (out_err, grad_err) =
            pools[i % 2].install(|| conv_errors(case, 50 + i as u64, kernels::conv2d));
        let (c_in, kernel, h, w) = (case.1, case.3, case.6, case.7);
        // F(4×4, 3×3) scales values by up to 8 and 1/8 on the way: its f32 rounding is several
        // times F(2×2)'s (measured 1.5e-5 and 1.8e-5 here, on outputs of up to about ±10).
        // Every path's error grows with the c_in·k² terms of each sum: at 256 channels
        // (2304 terms) measured 2.0e-5 by im2col (15×17) and 2.7e-5 by F(2×2) (16×17).
        let terms = (c_in * kernel * kernel) as f64;
        let tolerance = if h * w >= 4096 { 3e-5 } else { 1e-5 } * (terms / 576.0).max(1.0);
        assert!(out_err < tolerance, "case {i}: forward error {out_err}");
        assert!(grad_err < 1e-5, "case {i}: gradient error {grad_err}");
    }
}

#[test]
fn inference_convolution_of_an_image_does_not_depend_on_its_batch() {
    // Without a gradient, each image is its own product (one tile per image), so an image
    // comes out bit for bit the same alone or batched. Training groups small images into one
    // product, which for the 64-channel 8×8 case here sums in another order (checked: this
    // test fails with grouping switched on in inference).
    for (c_in, c_out, size) in [(8, 12, 4), (64, 64, 8)] {
        let batch = values(&[3, c_in, size, size], 7, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let weight = values(&[c_out, c_in, 3, 3], 8, 0.5)
            .to_dtype(DType::F32)
            .unwrap();
        let bias = values(&[c_out], 9, 0.5).to_dtype(DType::F32).unwrap();
        let batched = kernels::conv2d(&batch, &weight, &bias, 1, 1).unwrap();
        for i in 0..3 {
            let alone =
                kernels::conv2d(&batch.narrow(0, i, 1).unwrap(), &weight, &bias, 1, 1).unwrap();
            assert_eq!(
                max_diff(&alone, &batched.narrow(0, i, 1).unwrap()),
                0.0,
                "image {i} of {size}×{size}"
            );
        }
    }
}

#[test]
fn unfolded_conv2d_matches_candle_forward_and_backward() {
    // (batch, c_in, c_out, kernel, stride, padding, h, w): 3×3 same, the strided downsampler
    // with and without padding on odd and even sizes, 1×1 projections.
    let cases = [
        (2, 3, 4, 3, 1, 1, 7, 8),
        (3, 5, 6, 1, 1, 0, 5, 6),
        (1, 4, 4, 3, 2, 1, 9, 11),
        (2, 4, 3, 3, 2, 0, 9, 11),
        (2, 4, 5, 3, 2, 1, 8, 8),
    ];
    for (i, &case) in cases.iter().enumerate() {
        let (out_err, grad_err) = conv_errors(case, 80 + i as u64, kernels::conv2d_unfolded);
        assert!(out_err < 1e-5, "case {i}: forward error {out_err}");
        assert!(grad_err < 1e-5, "case {i}: gradient error {grad_err}");
    }
}

#[test]
fn conv2d_gradient_matches_finite_differences_and_half_precision_runs() {
    let weight = values(&[3, 2, 3, 3], 2, 0.5);
    let bias = values(&[3], 3, 0.5);
    check_finite_difference(&values(&[2, 2, 5, 4], 1, 1.0), |x| {
        let (w, b) = (weight.to_dtype(x.dtype())?, bias.to_dtype(x.dtype())?);
        if x.dtype() == DType::F64 {
            kernels::conv2d_composed(x, &w, &b, 2, 1)
        } else {
            kernels::conv2d(x, &w, &b, 2, 1)
        }
    });
    let xs = values(&[1, 2, 6, 6], 4, 1.0).to_dtype(DType::F32).unwrap();
    let (w32, b32) = (
        weight.to_dtype(DType::F32).unwrap(),
        bias.to_dtype(DType::F32).unwrap(),
    );
    let reference = kernels::conv2d(&xs, &w32, &b32, 1, 1).unwrap();
    let h = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
    let half = kernels::conv2d(&h(&xs), &h(&w32), &h(&b32), 1, 1).unwrap();
    assert_eq!(half.dtype(), DType::F16);
    assert!(max_diff(&half, &reference) < 1e-2);
}

#[test]
fn linear_matches_composed_ops_with_and_without_bias() {
    // (input shape, out features, bias): leading dims flattened, rows not a multiple of the
    // 128-row block, a single row, a wide output.
    let cases: [(&[usize], usize, bool); 4] = [
        (&[3, 70, 9], 5, true),
        (&[2, 5], 7, false),
        (&[300, 33], 130, true),
        (&[1, 1, 16], 64, false),
    ];
    for (i, &(shape, out_dim, with_bias)) in cases.iter().enumerate() {
        let in_dim = *shape.last().unwrap();
        let seed = 90 + 3 * i as u64;
        let mut inputs = vec![
            values(shape, seed, 1.0),
            values(&[out_dim, in_dim], seed + 1, 1.0),
        ];
        if with_bias {
            inputs.push(values(&[out_dim], seed + 2, 1.0));
        }
        let (out_err, grad_err) = compare(&inputs, |t| {
            let op = if t[0].dtype() == DType::F64 {
                kernels::linear_composed
            } else {
                kernels::linear
            };
            op(&t[0], &t[1], t.get(2))
        });
        assert!(out_err < 1e-5, "case {i}: forward error {out_err}");
        assert!(grad_err < 1e-5, "case {i}: gradient error {grad_err}");
    }
}

#[test]
fn linear_gradient_matches_finite_differences_and_refuses_bad_shapes() {
    let weight = values(&[6, 4], 21, 1.0);
    let bias = values(&[6], 22, 1.0);
    check_finite_difference(&values(&[2, 3, 4], 20, 1.0), |x| {
        let f32 = |t: &Tensor| t.to_dtype(x.dtype());
        kernels::linear(x, &f32(&weight)?, Some(&f32(&bias)?))
    });
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let err = kernels::linear(&f32(&values(&[2, 5], 1, 1.0)), &f32(&weight), None).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
}

/// bf16 layers multiply bf16 values (with AVX-512-BF16, as bf16 with f32 sums; elsewhere
/// through candle): the result is the f64 product of the same bf16 values, rounded to bf16
/// (once in one op, twice through candle).
#[test]
fn bf16_linear_matches_the_product_of_its_rounded_values() {
    for (rows, in_dim, out_dim) in [(300, 70, 33), (5, 257, 64)] {
        let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let xs = bf16(values(&[rows, in_dim], 31, 1.0));
        let weight = bf16(values(&[out_dim, in_dim], 32, 0.3));
        let bias = bf16(values(&[out_dim], 33, 1.0));
        let ys = kernels::linear(&xs, &weight, Some(&bias)).unwrap();
        assert_eq!(ys.dtype(), DType::BF16);
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let exact = kernels::linear_composed(&f64(&xs), &f64(&weight), Some(&f64(&bias))).unwrap();
        let scale = exact
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        // One bf16 rounding of the output (2^-9 of a value at most, 2^-8 of the largest with
        // margin); two through candle (the product, then its sum with the bias).
        let roundings = if kernels::linear::multiplies_bf16_in_one_op() {
            1.0
        } else {
            2.0
        };
        let err = max_diff(&ys, &exact);
        assert!(
            err <= roundings * scale / 256.0,
            "({rows}, {in_dim}, {out_dim}): {err} of {scale}"
        );
    }
}

#[test]
fn activations_match_composed_ops() {
    use kernels::Activation;
    // Odd lengths around the 16 Ki-element work item, values past the sigmoid's saturation.
    for (i, act) in [Activation::QuickGelu, Activation::Gelu, Activation::Silu]
        .into_iter()
        .enumerate()
    {
        let xs = values(&[3, 16 * 1024 / 3 + 5], 40 + i as u64, 12.0);
        let (out_err, grad_err) = compare(std::slice::from_ref(&xs), |t| {
            if t[0].dtype() == DType::F64 {
                act.apply_composed(&t[0])
            } else {
                act.apply(&t[0])
            }
        });
        assert!(out_err < 1e-5, "{act:?}: forward error {out_err}");
        assert!(grad_err < 1e-5, "{act:?}: gradient error {grad_err}");
        check_finite_difference(&values(&[4, 33], 50 + i as u64, 3.0), |x| act.apply(x));
        let half = act.apply(&xs.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(half.dtype(), DType::BF16);
    }
}
