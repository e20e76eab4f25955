//! A linear layer, `xs · weightᵀ + bias` over the last dimension, as one CPU op with its
//! backward pass.
//!
//! Composed from candle ops a linear layer is five graph nodes (flatten, product, weight
//! transpose, bias, unflatten), and candle's backward pass gives each node's inputs a
//! zero-filled gradient buffer plus an add, on one thread: four extra passes over the
//! activations per layer, and a strided add for the transposed weight. As one node, the
//! products run over row blocks of the pool, the weight gradient `dYᵀ·X` is written in the
//! weight's own layout and the bias gradient is one parallel column sum.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul, matmul_raw, Matrix};
use super::gemm_bf16;
use super::{channel_values, contiguous_f32, read_f32, sum_partials, ROW_CHUNKS};

/// Rows per work item of the products: enough for an efficient gemm, few enough that the
/// activations of one layer give every thread work.
const ROW_BLOCK: usize = 256;

/// Whether bf16 layers on the CPU multiply in one op (AVX-512-BF16, f32 sums, one rounding of
/// the output); elsewhere candle's product is rounded to bf16 before the bias is added.
pub fn multiplies_bf16_in_one_op() -> bool {
    gemm_bf16::available()
}

/// `xs · weightᵀ (+ bias)` for `xs: [..., in]`, `weight: [out, in]`, `bias: [out]`.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let on_cpu_as = |t: &Tensor, dtype: DType| t.device().is_cpu() && t.dtype() == dtype;
    let all_cpu = |dtype: DType| {
        on_cpu_as(xs, dtype) && on_cpu_as(weight, dtype) && bias.is_none_or(|b| on_cpu_as(b, dtype))
    };
    // bf16 multiplies as bf16 where the CPU can; f16 (and bf16 elsewhere) keeps candle's
    // half-precision path (no f32 copy of the weights).
    let bf16_products = all_cpu(DType::BF16) && gemm_bf16::available();
    if !(all_cpu(DType::F32) || bf16_products) {
        return linear_composed(xs, weight, bias);
    }
    let (out_dim, in_dim) = weight.dims2()?;
    if xs.dims().last() != Some(&in_dim) || bias.is_some_and(|b| b.dims() != [out_dim]) {
        bail!(
            "linear: input {:?} does not fit weight {:?} and bias {:?}",
            xs.dims(),
            weight.dims(),
            bias.map(|b| b.dims())
        );
    }
    // bf16 values are exact in f32: the op reads f32 and rounds nothing when it packs them.
    let f32 = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let (xs_f32, weight) = (f32(xs)?, f32(weight)?);
    let op = LinearOp { bf16_products };
    let ys = match bias {
        Some(bias) => xs_f32.apply_op3(&weight, &f32(bias)?, op)?,
        None => xs_f32.apply_op2(&weight, op)?,
    };
    ys.to_dtype(xs.dtype())
}

/// The same from candle's ops (reference and GPU path): one flattened product, so the
/// weight is not broadcast over the leading dimensions.
pub fn linear_composed(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut dims = xs.dims().to_vec();
    let in_dim = dims.pop().unwrap_or(1);
    let rows = dims.iter().product::<usize>();
    let ys = xs.reshape((rows, in_dim))?.matmul(&weight.t()?)?;
    let ys = match bias {
        Some(bias) => ys.broadcast_add(bias)?,
        None => ys,
    };
    dims.push(weight.dim(0)?);
    ys.reshape(dims)
}

/// `bf16_products`: the operands are bf16 values (in f32), multiplied as bf16.
struct LinearOp {
    bf16_products: bool,
}

impl LinearOp {
    fn forward(
        &self,
        xs: (&CpuStorage, &Layout),
        weight: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<CpuStorage> {
        let (out_dim, in_dim) = weight.1.shape().dims2()?;
        let xs = contiguous_f32(xs.0, xs.1, "linear: the input")?;
        let weight = contiguous_f32(weight.0, weight.1, "linear: the weight")?;
        let bias = bias
            .map(|(storage, layout)| channel_values(storage, layout, out_dim))
            .transpose()?;
        let rows = xs.len() / in_dim.max(1);
        let mut ys = vec![0f32; rows * out_dim];
        let start_with_bias = |block: &mut [f32]| {
            if let Some(bias) = bias {
                block
                    .chunks_exact_mut(out_dim)
                    .for_each(|row| row.copy_from_slice(bias));
            }
        };
        if self.bf16_products {
            let weight_t =
                gemm_bf16::PackedRhs::new(Matrix::rows(weight, out_dim, in_dim, in_dim).t());
            row_block_products(&mut ys, out_dim, xs, in_dim, |block, inputs| {
                start_with_bias(block);
                gemm_bf16::matmul(block, out_dim, inputs, &weight_t, 1.0, bias.is_some());
            });
            return Ok(CpuStorage::F32(ys));
        }
        // With several row blocks the weight is transposed once here rather than gathered
        // by every block's packing; one block's packing gathers it once anyway.
        let transposed;
        let weight_t = if rows > ROW_BLOCK {
            transposed = transpose(weight, out_dim, in_dim);
            Matrix::rows(&transposed, in_dim, out_dim, out_dim)
        } else {
            Matrix::rows(weight, out_dim, in_dim, in_dim).t()
        };
        row_block_products(&mut ys, out_dim, xs, in_dim, |block, inputs| {
            start_with_bias(block);
            matmul(block, out_dim, inputs, weight_t, 1.0, bias.is_some());
        });
        Ok(CpuStorage::F32(ys))
    }

    /// The gradients of the input, the weight and (with `bias`) the bias.
    fn backward(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        with_bias: bool,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (out_dim, in_dim) = weight.dims2()?;
        let rows = xs.elem_count() / in_dim.max(1);
        let device = xs.device();
        read_f32(grad, |grad| {
            let dxs = read_f32(weight, |weight| {
                let mut dxs = vec![0f32; rows * in_dim];
                let weight = Matrix::rows(weight, out_dim, in_dim, in_dim);
                row_block_products(&mut dxs, in_dim, grad, out_dim, |block, grads| {
                    matmul(block, in_dim, grads, weight, 1.0, false)
                });
                Tensor::from_vec(dxs, xs.shape(), device)
            })?;
            let dweight = read_f32(xs, |xs| {
                let mut dweight = vec![0f32; out_dim * in_dim];
                let grad_t = Matrix::rows(grad, rows, out_dim, out_dim).t();
                let xs = Matrix::rows(xs, rows, in_dim, in_dim);
                // SAFETY: `dweight` is an exclusively borrowed `out_dim × in_dim` buffer.
                unsafe {
                    let threads = rayon::current_num_threads();
                    matmul_raw(
                        dweight.as_mut_ptr(),
                        in_dim,
                        grad_t,
                        xs,
                        1.0,
                        false,
                        threads,
                    )
                };
                Tensor::from_vec(dweight, (out_dim, in_dim), device)
            })?;
            let dbias = with_bias
                .then(|| column_sums(grad, out_dim, device))
                .transpose()?;
            Ok((dxs, dweight, dbias))
        })
    }
}

/// Runs `product(block, input_rows)` on blocks of [`ROW_BLOCK`] rows of `out` (rows of
/// `out_cols`) and the matching rows of `inputs` (rows of `in_cols`), in parallel.
fn row_block_products(
    out: &mut [f32],
    out_cols: usize,
    inputs: &[f32],
    in_cols: usize,
    product: impl Fn(&mut [f32], Matrix) + Sync,
) {
    if out_cols == 0 {
        return;
    }
    out.par_chunks_mut(ROW_BLOCK * out_cols)
        .enumerate()
        .for_each(|(i, block)| {
            let rows = block.len() / out_cols;
            let start = i * ROW_BLOCK * in_cols;
            let inputs = Matrix::rows(
                &inputs[start..start + rows * in_cols],
                rows,
                in_cols,
                in_cols,
            );
            product(block, inputs);
        });
}

/// `matrix` (`rows × cols`, row-major) transposed, in parallel bands of output rows, each
/// filled in square tiles so that reads and writes stay within a few cache lines per row (an
/// element-by-element transpose of SD 1.5's larger weights took a third of a denoising step).
fn transpose(matrix: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return out;
    }
    out.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(band, dst)| {
            let (first_col, width) = (band * TILE, dst.len() / rows);
            for tile_row in (0..rows).step_by(TILE) {
                for r in tile_row..(tile_row + TILE).min(rows) {
                    let src = &matrix[r * cols + first_col..r * cols + first_col + width];
                    for (c, &value) in src.iter().enumerate() {
                        dst[c * rows + r] = value;
                    }
                }
            }
        });
    out
}

/// Sums the rows of `values` (rows of `channels`) in [`ROW_CHUNKS`] parallel chunks, added in
/// a fixed order so that the result does not depend on the thread count.
fn column_sums(values: &[f32], channels: usize, device: &candle_core::Device) -> Result<Tensor> {
    let rows = values.len() / channels.max(1);
    let chunk_rows = rows.div_ceil(ROW_CHUNKS).max(1);
    let chunks = rows.div_ceil(chunk_rows).max(1);
    let mut partial = vec![0f32; chunks * channels];
    if channels > 0 {
        partial
            .par_chunks_mut(channels)
            .zip(values.par_chunks(chunk_rows * channels))
            .for_each(|(sums, rows)| {
                for row in rows.chunks_exact(channels) {
                    for (s, &v) in sums.iter_mut().zip(row) {
                        *s += v;
                    }
                }
            });
    }
    sum_partials(partial, chunks, channels, device)
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "ldm-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ys = self.forward((xs, xs_layout), (weight, weight_layout), None)?;
        Ok((ys, output_shape(xs_layout, weight_layout)?))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dxs, dweight, _) = self.backward(xs, weight, false, grad)?;
        Ok((Some(dxs), Some(dweight)))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "ldm-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ys = self.forward(
            (xs, xs_layout),
            (weight, weight_layout),
            Some((bias, bias_layout)),
        )?;
        Ok((ys, output_shape(xs_layout, weight_layout)?))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dxs, dweight, dbias) = self.backward(xs, weight, true, grad)?;
        Ok((Some(dxs), Some(dweight), dbias))
    }
}

/// `[..., in]` -> `[..., out]`.
fn output_shape(xs_layout: &Layout, weight_layout: &Layout) -> Result<Shape> {
    let (out_dim, _) = weight_layout.shape().dims2()?;
    let mut dims = xs_layout.dims().to_vec();
    match dims.last_mut() {
        Some(last) => *last = out_dim,
        None => bail!("linear: the input must have at least one dimension"),
    }
    Ok(Shape::from(dims))
}
