//! Scaled dot-product attention as one fused CPU operation, forward and backward.
//!
//! Work is split over (batch, head, block of `QUERY_BLOCK` queries). Each block walks the keys
//! `KEY_BLOCK` at a time with an online softmax (FlashAttention's scheme): the scores of one
//! key block live in a per-task scratch tile that stays in L2 cache, the running maximum and
//! total of each query row rescale what the earlier key blocks added to the output, and the
//! division by the total happens once, on the `head_dim`-wide output row. So the
//! `[batch·heads, L, L]` score matrix is never materialised (1 GiB per tensor for SD at 512²
//! in f32), each score is read twice after its product writes it (max, then exp-and-sum)
//! before the product with the values, and each product is one single-threaded gemm on
//! strided views of q/k/v: no transposes, no `contiguous()` copies.
//! The backward pass recomputes the probabilities from the saved log-sum-exp (as
//! FlashAttention and PyTorch's CPU kernel do) and parallelises over (batch, head).

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use super::gemm::{matmul, matmul_raw, Matrix, SharedOut};
use super::{cpu_f32, simd, uses_cpu_kernel, uses_gpu_kernel, with_scratch};

/// Queries per work item: each key block's products are shared by this many queries (128
/// was 5-10% faster than 64 on one thread with SD 1.5's shapes, the same on two).
const QUERY_BLOCK: usize = 128;

/// Keys per step of the forward's online softmax: a `QUERY_BLOCK × KEY_BLOCK` score tile is
/// 256 KiB, which stays in a 512 KiB L2 cache with the key block beside it (a whole 4096-key
/// row block, as SD at 512² has, was 1-2 MiB and spilled).
const KEY_BLOCK: usize = 512;

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
    let op = AttentionOp {
        heads,
        causal,
        log_sum_exp: Mutex::new(None),
    };
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

/// Strided view of a `[batch, len, heads·head_dim]` tensor with a unit last stride.
#[derive(Clone, Copy)]
struct HeadsView<'a> {
    data: &'a [f32],
    len: usize,
    head_dim: usize,
    /// Batch and row strides.
    strides: [usize; 2],
}

impl<'a> HeadsView<'a> {
    fn new(data: &'a [f32], layout: &Layout, heads: usize) -> Result<Self> {
        let (_, len, width) = layout.shape().dims3()?;
        let stride = layout.stride();
        if stride[2] != 1 && width > 1 {
            bail!("attention: the head dimension must be contiguous");
        }
        Ok(Self {
            data: &data[layout.start_offset()..],
            len,
            head_dim: width / heads,
            strides: [stride[0], stride[1]],
        })
    }

    /// Rows `start..start + rows` of head `head` in batch `batch`, as a `rows × head_dim` matrix.
    fn rows(&self, batch: usize, head: usize, start: usize, rows: usize) -> Matrix<'a> {
        let offset = batch * self.strides[0] + head * self.head_dim + start * self.strides[1];
        Matrix::rows(&self.data[offset..], rows, self.head_dim, self.strides[1])
    }

    /// Row `row` of head `head` in batch `batch`.
    fn row(&self, batch: usize, head: usize, row: usize) -> &'a [f32] {
        let offset = batch * self.strides[0] + head * self.head_dim + row * self.strides[1];
        &self.data[offset..offset + self.head_dim]
    }
}

struct AttentionOp {
    heads: usize,
    causal: bool,
    /// `[batch, heads, q_len]` log-sum-exp of each score row, kept for the backward pass.
    log_sum_exp: Mutex<Option<Vec<f32>>>,
}

impl AttentionOp {
    /// Keys visible to the queries `start..end`.
    fn visible_keys(&self, end: usize, kv_len: usize) -> usize {
        if self.causal {
            end
        } else {
            kv_len
        }
    }

    /// Scaled scores of queries `start..start+rows` against keys `first_key..first_key+k.rows`,
    /// causally masked.
    fn scores(
        &self,
        scores: &mut [f32],
        q: Matrix,
        k: Matrix,
        start: usize,
        first_key: usize,
        scale: f32,
    ) {
        let keys = k.rows;
        matmul(scores, keys, q, k.t(), scale, false);
        if self.causal {
            for (row, scores) in scores.chunks_exact_mut(keys).enumerate() {
                let visible = (start + row + 1).saturating_sub(first_key).min(keys);
                scores[visible..].fill(f32::NEG_INFINITY);
            }
        }
    }

    /// Attention of the query block `q` (queries `start..`) over the keys `k` and values `v`,
    /// written to `dst` (rows `dst_stride` apart), with each row's log-sum-exp in `lse`.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `q.rows` rows of `v.cols` values, `dst_stride` apart,
    /// that no other thread accesses during the call.
    #[allow(clippy::too_many_arguments)]
    unsafe fn attend_block(
        &self,
        q: Matrix,
        k: HeadsView,
        v: HeadsView,
        (batch, head, start): (usize, usize, usize),
        keys: usize,
        scale: f32,
        dst: *mut f32,
        dst_stride: usize,
        lse: &mut [f32],
    ) {
        let rows = q.rows;
        let mut max = [f32::NEG_INFINITY; QUERY_BLOCK];
        let mut total = [0f32; QUERY_BLOCK];
        with_scratch(rows * KEY_BLOCK.min(keys), |tile| {
            for first in (0..keys).step_by(KEY_BLOCK) {
                let width = KEY_BLOCK.min(keys - first);
                let tile = &mut tile[..rows * width];
                self.scores(
                    tile,
                    q,
                    k.rows(batch, head, first, width),
                    start,
                    first,
                    scale,
                );
                for (r, row) in tile.chunks_exact_mut(width).enumerate() {
                    let rescale;
                    (max[r], total[r], rescale) = simd::online_softmax_block(row, max[r], total[r]);
                    if first > 0 && rescale != 1.0 {
                        // SAFETY: row r of the block, inside the caller's region.
                        unsafe { scale_row(dst.add(r * dst_stride), v.head_dim, rescale) };
                    }
                }
                let probs = Matrix::rows(tile, rows, width, width);
                let values = v.rows(batch, head, first, width);
                // SAFETY: the caller's contract.
                unsafe { matmul_raw(dst, dst_stride, probs, values, 1.0, first > 0, 1) };
            }
        });
        for r in 0..rows {
            lse[r] = if total[r] > 0.0 {
                // SAFETY: as above.
                unsafe { scale_row(dst.add(r * dst_stride), v.head_dim, 1.0 / total[r]) };
                max[r] + total[r].ln()
            } else {
                // A fully masked row attends to nothing (its output stayed zero).
                f32::NEG_INFINITY
            };
        }
    }
}

/// `row[..len] *= factor`.
///
/// # Safety
/// `row` must be valid for reads and writes of `len` values.
unsafe fn scale_row(row: *mut f32, len: usize, factor: f32) {
    // SAFETY: the caller's contract.
    for x in unsafe { std::slice::from_raw_parts_mut(row, len) } {
        *x *= factor;
    }
}

/// A [`HeadsView`] of a CPU tensor's storage.
fn heads_view<'a>(storage: &'a Storage, layout: &Layout, heads: usize) -> Result<HeadsView<'a>> {
    HeadsView::new(super::storage_f32(storage)?, layout, heads)
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "ldm-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, q_len, width) = q_layout.shape().dims3()?;
        let heads = self.heads;
        let q = HeadsView::new(cpu_f32(q)?, q_layout, heads)?;
        let k = HeadsView::new(cpu_f32(k)?, k_layout, heads)?;
        let v = HeadsView::new(cpu_f32(v)?, v_layout, heads)?;
        let head_dim = q.head_dim;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut out = vec![0f32; batch * q_len * width];
        let mut lse = vec![0f32; batch * heads * q_len];
        let shared = SharedOut(out.as_mut_ptr());
        if !out.is_empty() {
            lse.par_chunks_mut(q_len).enumerate().for_each(|(bh, lse)| {
                let (b, h) = (bh / heads, bh % heads);
                let shared = &shared;
                lse.par_chunks_mut(QUERY_BLOCK)
                    .enumerate()
                    .for_each(|(block, lse)| {
                        let start = block * QUERY_BLOCK;
                        let rows = lse.len();
                        let keys = self.visible_keys(start + rows, k.len);
                        let q_rows = q.rows(b, h, start, rows);
                        let offset = (b * q_len + start) * width + h * head_dim;
                        // SAFETY: rows start..start+rows of head h in batch b (rows `width`
                        // apart) are inside `out` and written by this task only.
                        unsafe {
                            let dst = shared.0.add(offset);
                            self.attend_block(
                                q_rows,
                                k,
                                v,
                                (b, h, start),
                                keys,
                                scale,
                                dst,
                                width,
                                lse,
                            )
                        };
                    });
            });
        }
        *self.log_sum_exp.lock().expect("attention state poisoned") = Some(lse);
        Ok((CpuStorage::F32(out), Shape::from((batch, q_len, width))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.log_sum_exp.lock().expect("attention state poisoned");
        let Some(lse) = lse.as_ref() else {
            bail!("attention backward without a forward pass");
        };
        let heads = self.heads;
        let (batch, q_len, width) = q.dims3()?;
        let kv_len = k.dim(1)?;
        let grad_out = grad_out.contiguous()?;
        let (q_storage, q_layout) = q.storage_and_layout();
        let (k_storage, k_layout) = k.storage_and_layout();
        let (v_storage, v_layout) = v.storage_and_layout();
        let (o_storage, o_layout) = out.storage_and_layout();
        let (g_storage, g_layout) = grad_out.storage_and_layout();
        let qv = heads_view(&q_storage, q_layout, heads)?;
        let kv = heads_view(&k_storage, k_layout, heads)?;
        let vv = heads_view(&v_storage, v_layout, heads)?;
        let ov = heads_view(&o_storage, o_layout, heads)?;
        let gv = heads_view(&g_storage, g_layout, heads)?;
        let head_dim = qv.head_dim;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut dq = vec![0f32; batch * q_len * width];
        let mut dk = vec![0f32; batch * kv_len * width];
        let mut dv = vec![0f32; batch * kv_len * width];
        let (dq_out, dk_out, dv_out) = (
            SharedOut(dq.as_mut_ptr()),
            SharedOut(dk.as_mut_ptr()),
            SharedOut(dv.as_mut_ptr()),
        );
        if q_len > 0 && kv_len > 0 && width > 0 {
            (0..batch * heads).into_par_iter().for_each(|bh| {
                let (b, h) = (bh / heads, bh % heads);
                let lse = &lse[bh * q_len..(bh + 1) * q_len];
                let (dq_out, dk_out, dv_out) = (&dq_out, &dk_out, &dv_out);
                let kv_offset = b * kv_len * width + h * head_dim;
                for start in (0..q_len).step_by(QUERY_BLOCK) {
                    let rows = QUERY_BLOCK.min(q_len - start);
                    let keys = self.visible_keys(start + rows, kv_len);
                    let q_rows = qv.rows(b, h, start, rows);
                    let k_rows = kv.rows(b, h, 0, keys);
                    let g_rows = gv.rows(b, h, start, rows);
                    let mut probs = vec![0f32; rows * keys];
                    self.scores(&mut probs, q_rows, k_rows, start, 0, scale);
                    for (row, &lse) in probs.chunks_exact_mut(keys).zip(&lse[start..]) {
                        if lse == f32::NEG_INFINITY {
                            row.fill(0.0);
                        } else {
                            simd::exp_shifted(row, lse);
                        }
                    }
                    let p = Matrix::rows(&probs, rows, keys, keys);
                    // dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)).
                    let mut grad_scores = vec![0f32; rows * keys];
                    matmul(
                        &mut grad_scores,
                        keys,
                        g_rows,
                        vv.rows(b, h, 0, keys).t(),
                        1.0,
                        false,
                    );
                    for (r, (ds, p)) in grad_scores
                        .chunks_exact_mut(keys)
                        .zip(probs.chunks_exact(keys))
                        .enumerate()
                    {
                        let delta = simd::dot(gv.row(b, h, start + r), ov.row(b, h, start + r));
                        for (ds, &p) in ds.iter_mut().zip(p) {
                            *ds = p * (*ds - delta);
                        }
                    }
                    let ds = Matrix::rows(&grad_scores, rows, keys, keys);
                    let q_offset = (b * q_len + start) * width + h * head_dim;
                    // SAFETY: head h of batch b (rows `width` apart) belongs to this task only,
                    // in dq, dk and dv alike; the views lie inside the buffers.
                    unsafe {
                        matmul_raw(dv_out.0.add(kv_offset), width, p.t(), g_rows, 1.0, true, 1);
                        matmul_raw(dq_out.0.add(q_offset), width, ds, k_rows, scale, false, 1);
                        matmul_raw(
                            dk_out.0.add(kv_offset),
                            width,
                            ds.t(),
                            q_rows,
                            scale,
                            true,
                            1,
                        );
                    }
                }
            });
        }
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (batch, q_len, width), device)?),
            Some(Tensor::from_vec(dk, (batch, kv_len, width), device)?),
            Some(Tensor::from_vec(dv, (batch, kv_len, width), device)?),
        ))
    }
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
