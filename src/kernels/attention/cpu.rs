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

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::super::gemm::{matmul, matmul_raw, Matrix, SharedOut};
use super::super::{cpu_f32, simd, with_scratch};

/// Queries per work item: each key block's products are shared by this many queries (128
/// was 5-10% faster than 64 on one thread with SD 1.5's shapes, the same on two).
const QUERY_BLOCK: usize = 128;

/// Keys per step of the forward's online softmax: a `QUERY_BLOCK × KEY_BLOCK` score tile is
/// 256 KiB, which stays in a 512 KiB L2 cache with the key block beside it (a whole 4096-key
/// row block, as SD at 512² has, was 1-2 MiB and spilled).
const KEY_BLOCK: usize = 512;

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

/// The fused attention of `heads` heads (`causal`: CLIP's mask), as a candle op on f32 q, k, v.
pub(super) struct AttentionOp {
    heads: usize,
    causal: bool,
    /// `[batch, heads, q_len]` log-sum-exp of each score row, kept for the backward pass.
    log_sum_exp: Mutex<Option<Vec<f32>>>,
}

impl AttentionOp {
    pub fn new(heads: usize, causal: bool) -> Self {
        Self {
            heads,
            causal,
            log_sum_exp: Mutex::new(None),
        }
    }

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
    HeadsView::new(super::super::storage_f32(storage)?, layout, heads)
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
