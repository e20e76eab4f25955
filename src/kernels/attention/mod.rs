//! Scaled dot-product attention: the fused CPU operation with its backward pass (`cpu.rs`),
//! candle's fused kernels for GPU inference, and the composed reference the tests hold both to.

mod cpu;

use std::sync::Mutex;

use candle_core::{bail, DType, Result, Tensor, D};

use super::{uses_cpu_kernel, uses_gpu_kernel};
use cpu::AttentionOp;

/// Softmax(q kᵀ / √d) v over `heads` heads.
///
/// `q`: `[batch, q_len, heads·head_dim]`, `k` and `v`: `[batch, kv_len, heads·head_dim]` (the
/// projections' own layout, head `h` in columns `h·head_dim..(h+1)·head_dim`: no reshapes or
/// head transposes in the graph); returns `[batch, q_len, heads·head_dim]`. `causal` lets
/// query `i` see keys `0..=i` (CLIP), and needs `q_len == kv_len`. Half-precision inputs are
/// computed in f32 on the CPU; GPU inference uses [`attention_gpu`], everything else
/// [`attention_composed`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    check_shapes(q, k, v, heads, causal)?;
    if [q, k, v].iter().all(|t| uses_gpu_kernel(t)) {
        return attention_gpu(q, k, v, heads, causal);
    }
    if !uses_cpu_kernel(q) {
        return attention_composed(q, k, v, heads, causal);
    }
    let dtype = q.dtype();
    let op = AttentionOp::new(heads, causal);
    let (q, k, v) = (
        q.to_dtype(DType::F32)?,
        k.to_dtype(DType::F32)?,
        v.to_dtype(DType::F32)?,
    );
    q.apply_op3(&k, &v, op)?.to_dtype(dtype)
}

/// The same attention from candle's primitive ops (the reference, and the differentiable GPU
/// path of training).
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
) -> Result<Tensor> {
    check_shapes(q, k, v, heads, causal)?;
    let split = |xs: &Tensor| split_heads(xs, heads);
    heads_composed(&split(q)?, &split(k)?, &split(v)?, causal)?.flatten_from(2)
}

/// `[batch, len, heads·head_dim]` -> `[batch, len, heads, head_dim]`.
fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (batch, len, width) = xs.dims3()?;
    xs.reshape((batch, len, heads, width / heads))
}

/// [`attention_composed`] on `[batch, len, heads, head_dim]` tensors. Scores and softmax run in
/// f32 for f16 inputs (diffusers' `upcast_attention`).
fn heads_composed(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    let dtype = q.dtype();
    let score_dtype = if dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    };
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let q = (q.transpose(1, 2)?.to_dtype(score_dtype)? * scale)?.contiguous()?;
    let k_t = k
        .permute((0, 2, 3, 1))?
        .to_dtype(score_dtype)?
        .contiguous()?;
    let mut scores = q.matmul(&k_t)?;
    if causal {
        let mask = causal_mask(scores.dim(D::Minus1)?, scores.device())?;
        scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    }
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
    probs
        .matmul(&v.transpose(1, 2)?.contiguous()?)?
        .transpose(1, 2)
}

/// Bytes of scores one GPU attention chunk may hold: larger problems are split over
/// batch × heads, so that the score matrix (2 GiB in f16 for 4 SD images at 512² with CFG)
/// never exists whole; its softmax doubles it while both are alive.
const GPU_SCORE_BUDGET: usize = 256 << 20;

/// Inference on a GPU: the products in the inputs' own precision (f16/bf16 run on the tensor
/// cores), the softmax as candle's fused kernel, which accumulates half precision in f32
/// (where PyTorch's fused attention upcasts too).
fn attention_gpu(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    let split = |xs: &Tensor| split_heads(xs, heads);
    attention_chunked(&split(q)?, &split(k)?, &split(v)?, causal, GPU_SCORE_BUDGET)?.flatten_from(2)
}

/// [`attention_gpu`] on `[batch, len, heads, head_dim]` tensors, with at most `budget` bytes of
/// scores per chunk of (batch, head) pairs.
fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    budget: usize,
) -> Result<Tensor> {
    let (batch, q_len, heads, head_dim) = q.dims4()?;
    let kv_len = k.dim(1)?;
    let rows = batch * heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let q = (q.transpose(1, 2)? * scale)?
        .contiguous()?
        .reshape((rows, q_len, head_dim))?;
    let k_t = k
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((rows, head_dim, kv_len))?;
    let v = v
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, kv_len, head_dim))?;
    let mask = if causal {
        Some(causal_mask(kv_len, q.device())?.to_dtype(q.dtype())?)
    } else {
        None
    };
    let row_bytes = q_len * kv_len * q.dtype().size_in_bytes();
    let chunk = (budget / row_bytes.max(1)).clamp(1, rows.max(1));
    let mut outputs = Vec::with_capacity(rows.div_ceil(chunk));
    for start in (0..rows).step_by(chunk) {
        let len = chunk.min(rows - start);
        let mut scores = q
            .narrow(0, start, len)?
            .matmul(&k_t.narrow(0, start, len)?)?;
        if let Some(mask) = &mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outputs.push(probs.matmul(&v.narrow(0, start, len)?)?);
    }
    Tensor::cat(&outputs, 0)?
        .reshape((batch, heads, q_len, head_dim))?
        .transpose(1, 2)
}

/// The additive causal mask `[len, len]` in f32 (0 where a query may look, −∞ ahead of it),
/// built on the host once per length and device and then reused: CLIP asks for it in every
/// layer of every forward pass.
fn causal_mask(len: usize, device: &candle_core::Device) -> Result<Tensor> {
    static MASKS: Mutex<Vec<Tensor>> = Mutex::new(Vec::new());
    let mut masks = MASKS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cached = masks
        .iter()
        .find(|m| m.dim(0).is_ok_and(|l| l == len) && m.device().same_device(device));
    if let Some(mask) = cached {
        return Ok(mask.clone());
    }
    let values: Vec<f32> = (0..len * len)
        .map(|i| {
            if i % len > i / len {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(values, (len, len), device)?;
    // A handful of lengths and devices at most; keep the newest few.
    if masks.len() >= 8 {
        masks.remove(0);
    }
    masks.push(mask.clone());
    Ok(mask)
}

fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<()> {
    let (batch, q_len, width) = q.dims3()?;
    let (kb, kv_len, kw) = k.dims3()?;
    if (kb, kw) != (batch, width) || k.dims() != v.dims() {
        bail!(
            "attention: q {:?}, k {:?} and v {:?} disagree",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if heads == 0 || !width.is_multiple_of(heads) {
        bail!("attention: {heads} heads do not divide the width {width}");
    }
    if causal && q_len != kv_len {
        bail!("causal attention needs as many queries as keys ({q_len} vs {kv_len})");
    }
    Ok(())
}

#[cfg(test)]
mod gpu_path_tests {
    use super::*;
    use candle_core::Device;

    /// The GPU inference path is plain candle ops, so it runs on the CPU too: here against the
    /// composed reference, whole and split into chunks of one and three (batch, head) pairs.
    #[test]
    fn chunked_gpu_attention_matches_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 7, 3, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 7, 3, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 7, 3, 8), &dev)?;
        for causal in [false, true] {
            let want = heads_composed(&q, &k, &v, causal)?;
            let row_bytes = 7 * 7 * 4;
            for budget in [usize::MAX, row_bytes, 3 * row_bytes] {
                let got = attention_chunked(&q, &k, &v, causal, budget)?;
                assert_eq!(got.dims(), want.dims());
                let diff = (got - &want)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(diff < 1e-5, "causal {causal}, budget {budget}: {diff}");
            }
        }
        Ok(())
    }
}
