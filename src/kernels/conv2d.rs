//! 2-D convolution (with its bias) as one CPU op, forward and backward.
//!
//! candle's CPU conv2d copies the input to NHWC and repacks the kernel on every call, then
//! gathers im2col tiles pixel by pixel and scatters the result back: in a profile of SD 1.5 at
//! 256² that bookkeeping took more time than the matrix products. Here the input stays NCHW and
//! the weight `[c_out, c_in, kh, kw]` is used as it is stored (a `c_out × c_in·kh·kw` matrix).
//! Work items are tiles of whole output rows: each builds its im2col columns row-segment by
//! row-segment (contiguous copies for stride 1), and one gemm writes the tile straight into
//! the NCHW output, on top of the broadcast bias. 1×1 convolutions skip im2col entirely. The
//! backward pass (over chunks of batch items) accumulates the weight gradient from the same
//! columns and scatters `Wᵀ dY` back with col2im: no naive `conv_transpose2d`.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul, matmul_raw, Matrix, SharedOut};
use super::winograd::Winograd;
use super::{
    contiguous_f32, for_each_work_item, read_f32, simd, sum_partials, uses_cpu_kernel, with_scratch,
};

/// Output pixels per work item (whole rows): enough columns for an efficient gemm, few enough
/// that `c_in·9 × TILE_PIXELS` columns stay a few MiB.
const TILE_PIXELS: usize = 256;
/// Batch items per backward work item; fixed, so that weight gradients are summed in the same
/// order on every machine.
const BATCH_CHUNK: usize = 2;

/// `conv2d(xs, weight) + bias` with square stride and zero padding: `xs` `[batch, c_in, h, w]`,
/// `weight` `[c_out, c_in, kh, kw]`, `bias` `[c_out]`.
pub fn conv2d(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if !uses_cpu_kernel(xs) {
        return if unfolded_on_gpu(xs) {
            conv2d_unfolded(xs, weight, bias, stride, padding)
        } else {
            conv2d_composed(xs, weight, bias, stride, padding)
        };
    }
    Geometry::new(xs.dims(), weight.dims(), stride, padding)?;
    let dtype = xs.dtype();
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    f32(xs)?
        .contiguous()?
        .apply_op3(
            &f32(weight)?.contiguous()?,
            &f32(bias)?,
            Conv2dOp { stride, padding },
        )?
        .to_dtype(dtype)
}

/// Whether a GPU convolution takes [`conv2d_unfolded`]: half precision (see there), or any
/// precision with `LDM_GPU_CONV=unfold` (`cudnn`: candle's cuDNN call for all), for measuring
/// one against the other.
fn unfolded_on_gpu(xs: &Tensor) -> bool {
    match std::env::var("LDM_GPU_CONV").as_deref() {
        Ok("unfold") => true,
        Ok("cudnn") => false,
        _ => matches!(xs.dtype(), DType::F16 | DType::BF16),
    }
}

/// The same with candle's convolution (reference and GPU path).
pub fn conv2d_composed(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    xs.conv2d(weight, padding, stride, 1, 1)?
        .broadcast_add(&bias.reshape((1, (), 1, 1))?)
}

/// The same as one matrix product over unfolded patches, from candle's primitive ops (so it
/// is differentiable on every device): the GPU path in half precision, where candle's cuDNN
/// call multiplies and sums in half precision (cuDNN's "true half" configuration) while a
/// half-precision matrix product on cuBLAS sums in f32 on the tensor cores, as PyTorch does.
pub fn conv2d_unfolded(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let g = Geometry::new(xs.dims(), weight.dims(), stride, padding)?;
    let taps = g.c_in * g.kh * g.kw;
    let patches = if g.kh * g.kw == 1 && stride == 1 && padding == 0 {
        xs.reshape((g.batch, taps, g.out_h * g.out_w))?
    } else {
        let padded = xs
            .pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)?;
        let mut windows = Vec::with_capacity(g.kh * g.kw);
        for ky in 0..g.kh {
            let rows = every_stride(&padded, 2, ky, g.out_h, stride)?;
            for kx in 0..g.kw {
                windows.push(every_stride(&rows, 3, kx, g.out_w, stride)?);
            }
        }
        // [batch, c_in, kh·kw, out_h, out_w]: the (c_in, ky, kx) order of the weight's rows.
        Tensor::stack(&windows, 2)?.reshape((g.batch, taps, g.out_h * g.out_w))?
    };
    weight
        .reshape((g.c_out, taps))?
        .broadcast_matmul(&patches)?
        .reshape((g.batch, g.c_out, g.out_h, g.out_w))?
        .broadcast_add(&bias.reshape((1, (), 1, 1))?)
}

/// `count` entries of dimension `dim`, from `first` in steps of `stride`.
fn every_stride(
    xs: &Tensor,
    dim: usize,
    first: usize,
    count: usize,
    stride: usize,
) -> Result<Tensor> {
    let span = xs.narrow(dim, first, (count - 1) * stride + 1)?;
    if stride == 1 {
        return Ok(span);
    }
    // Padded to `count · stride` entries, split into (count, stride), the first of each kept.
    let padded = span.pad_with_zeros(dim, 0, stride - 1)?;
    let mut split = padded.dims().to_vec();
    split[dim] = count;
    split.insert(dim + 1, stride);
    padded
        .reshape(split)?
        .narrow(dim + 1, 0, 1)?
        .squeeze(dim + 1)
}

/// The sizes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    out_h: usize,
    out_w: usize,
}

impl Geometry {
    fn new(input: &[usize], kernel: &[usize], stride: usize, padding: usize) -> Result<Self> {
        let (&[batch, c_in, h, w], &[c_out, k_c_in, kh, kw]) = (input, kernel) else {
            bail!("conv2d: expected 4-D input and kernel, got {input:?} and {kernel:?}");
        };
        if k_c_in != c_in || stride == 0 {
            bail!("conv2d: kernel {kernel:?} does not fit input {input:?} (stride {stride})");
        }
        if h + 2 * padding < kh || w + 2 * padding < kw {
            bail!("conv2d: input {input:?} is smaller than the kernel {kernel:?}");
        }
        Ok(Self {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride,
            padding,
            out_h: (h + 2 * padding - kh) / stride + 1,
            out_w: (w + 2 * padding - kw) / stride + 1,
        })
    }

    /// Rows of the im2col matrix: `c_in · kh · kw`, in the weight's own order.
    fn patch_len(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    fn rows_per_tile(&self) -> usize {
        (TILE_PIXELS / self.out_w.max(1)).clamp(1, self.out_h.max(1))
    }

    /// Output-row ranges `(first_row, rows)` of the tiles.
    fn tiles(&self) -> impl Iterator<Item = (usize, usize)> {
        let per_tile = self.rows_per_tile();
        let out_h = self.out_h;
        (0..out_h)
            .step_by(per_tile)
            .map(move |row| (row, per_tile.min(out_h - row)))
    }

    /// The Winograd path's sizes, for a 3×3, stride-1, padding-1 convolution.
    fn winograd(&self) -> Option<Winograd> {
        let fits = (self.kh, self.kw, self.stride, self.padding) == (3, 3, 1, 1);
        fits.then_some(Winograd {
            batch: self.batch,
            c_in: self.c_in,
            c_out: self.c_out,
            h: self.h,
            w: self.w,
        })
    }

    /// A 1×1, stride-1, unpadded convolution is a plain product with the input.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// Input column of output column `ox` for kernel column `kx` (None in the padding).
    fn input_col(&self, ox: usize, kx: usize) -> Option<usize> {
        (ox * self.stride + kx)
            .checked_sub(self.padding)
            .filter(|&ix| ix < self.w)
    }

    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.padding)
            .filter(|&iy| iy < self.h)
    }

    /// Output columns `lo..hi` whose input column exists for kernel column `kx` (stride 1).
    fn valid_cols(&self, kx: usize) -> (usize, usize) {
        let lo = self.padding.saturating_sub(kx).min(self.out_w);
        let hi = (self.w + self.padding)
            .saturating_sub(kx)
            .min(self.out_w)
            .max(lo);
        (lo, hi)
    }

    /// im2col of output rows `first..first + rows` of one image `[c_in, h, w]` into
    /// `cols` `[patch_len, rows · out_w]`.
    fn im2col(&self, image: &[f32], first: usize, rows: usize, cols: &mut [f32]) {
        let n = rows * self.out_w;
        for (k, col) in cols.chunks_exact_mut(n).enumerate() {
            let (c, ky, kx) = (k / (self.kh * self.kw), k / self.kw % self.kh, k % self.kw);
            let channel = &image[c * self.h * self.w..(c + 1) * self.h * self.w];
            for (r, seg) in col.chunks_exact_mut(self.out_w).enumerate() {
                let Some(iy) = self.input_row(first + r, ky) else {
                    seg.fill(0.0);
                    continue;
                };
                let input = &channel[iy * self.w..(iy + 1) * self.w];
                if self.stride == 1 {
                    let (lo, hi) = self.valid_cols(kx);
                    seg[..lo].fill(0.0);
                    seg[hi..].fill(0.0);
                    seg[lo..hi]
                        .copy_from_slice(&input[lo + kx - self.padding..hi + kx - self.padding]);
                } else {
                    for (ox, v) in seg.iter_mut().enumerate() {
                        *v = self.input_col(ox, kx).map_or(0.0, |ix| input[ix]);
                    }
                }
            }
        }
    }

    /// Adds `cols` `[patch_len, rows · out_w]` back onto the image gradient (col2im).
    fn col2im_add(&self, cols: &[f32], first: usize, rows: usize, image: &mut [f32]) {
        let n = rows * self.out_w;
        for (k, col) in cols.chunks_exact(n).enumerate() {
            let (c, ky, kx) = (k / (self.kh * self.kw), k / self.kw % self.kh, k % self.kw);
            let channel = &mut image[c * self.h * self.w..(c + 1) * self.h * self.w];
            for (r, seg) in col.chunks_exact(self.out_w).enumerate() {
                let Some(iy) = self.input_row(first + r, ky) else {
                    continue;
                };
                let input = &mut channel[iy * self.w..(iy + 1) * self.w];
                if self.stride == 1 {
                    let (lo, hi) = self.valid_cols(kx);
                    let shifted = &mut input[lo + kx - self.padding..hi + kx - self.padding];
                    for (d, &g) in shifted.iter_mut().zip(&seg[lo..hi]) {
                        *d += g;
                    }
                } else {
                    for (ox, &g) in seg.iter().enumerate() {
                        if let Some(ix) = self.input_col(ox, kx) {
                            input[ix] += g;
                        }
                    }
                }
            }
        }
    }
}

struct Conv2dOp {
    stride: usize,
    padding: usize,
}

/// The output buffer shared by the forward tasks, each writing its own tile.
impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "ldm-conv2d"
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
        let g = Geometry::new(
            xs_layout.dims(),
            weight_layout.dims(),
            self.stride,
            self.padding,
        )?;
        let xs = contiguous_f32(xs, xs_layout, "conv2d: the input")?;
        let weight = contiguous_f32(weight, weight_layout, "conv2d: the kernel")?;
        let bias = super::channel_values(bias, bias_layout, g.c_out)?;
        let (image_len, out_len) = (g.c_in * g.h * g.w, g.c_out * g.out_pixels());
        let mut out = vec![0f32; g.batch * out_len];
        let shape = Shape::from((g.batch, g.c_out, g.out_h, g.out_w));
        if let Some(winograd) = g.winograd().filter(Winograd::worthwhile) {
            winograd.forward(xs, weight, bias, &mut out);
            return Ok((CpuStorage::F32(out), shape));
        }
        let tiles: Vec<(usize, usize, usize)> = (0..g.batch)
            .flat_map(|b| g.tiles().map(move |(first, rows)| (b, first, rows)))
            .collect();
        let shared = SharedOut(out.as_mut_ptr());
        for_each_work_item(&tiles, |&(b, first, rows), gemm_threads| {
            let image = &xs[b * image_len..(b + 1) * image_len];
            let n = rows * g.out_w;
            let offset = b * out_len + first * g.out_w;
            let shared = &shared;
            // The tile starts as the bias; the product is accumulated onto it.
            for (c, &value) in bias.iter().enumerate() {
                // SAFETY: row c of this tile lies inside `out` and belongs to this task only.
                unsafe {
                    std::slice::from_raw_parts_mut(shared.0.add(offset + c * g.out_pixels()), n)
                }
                .fill(value);
            }
            let kernel = Matrix::rows(weight, g.c_out, g.patch_len(), g.patch_len());
            // SAFETY (both products): the tile's rows (c_out rows of n values, out_pixels
            // apart) are inside `out` and written by this task only.
            let product = |columns: Matrix<'_>| unsafe {
                matmul_raw(
                    shared.0.add(offset),
                    g.out_pixels(),
                    kernel,
                    columns,
                    1.0,
                    true,
                    gemm_threads,
                )
            };
            if g.is_pointwise() {
                product(Matrix::rows(&image[first * g.w..], g.c_in, n, g.h * g.w));
            } else {
                with_scratch(g.patch_len() * n, |cols| {
                    g.im2col(image, first, rows, cols);
                    product(Matrix::rows(cols, g.patch_len(), n, n));
                });
            }
        });
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geometry::new(xs.dims(), weight.dims(), self.stride, self.padding)?;
        let (image_len, out_len) = (g.c_in * g.h * g.w, g.c_out * g.out_pixels());
        let patch = g.patch_len();
        let chunks = g.batch.div_ceil(BATCH_CHUNK);
        let mut dx = vec![0f32; g.batch * image_len];
        let mut dweight = vec![0f32; chunks * g.c_out * patch];
        let mut dbias = vec![0f32; chunks * g.c_out];
        read_f32(xs, |xs| {
            read_f32(weight, |weight| {
                read_f32(grad, |grad| {
                    if image_len == 0 || out_len == 0 {
                        return Ok(());
                    }
                    let winograd = g.winograd().filter(Winograd::worthwhile);
                    if let Some(winograd) = winograd {
                        winograd.input_gradient(grad, weight, &mut dx);
                    }
                    dx.par_chunks_mut(BATCH_CHUNK * image_len)
                        .zip(dweight.par_chunks_mut(g.c_out * patch))
                        .zip(dbias.par_chunks_mut(g.c_out))
                        .enumerate()
                        .for_each(|(chunk, ((dx, dweight), dbias))| {
                            let kernel = Matrix::rows(weight, g.c_out, patch, patch);
                            for (i, dx) in dx.chunks_mut(image_len).enumerate() {
                                let b = chunk * BATCH_CHUNK + i;
                                let image = &xs[b * image_len..(b + 1) * image_len];
                                let dy_image = &grad[b * out_len..(b + 1) * out_len];
                                for (c, db) in dbias.iter_mut().enumerate() {
                                    *db += simd::sum(
                                        &dy_image[c * g.out_pixels()..(c + 1) * g.out_pixels()],
                                    );
                                }
                                for (first, rows) in g.tiles() {
                                    let n = rows * g.out_w;
                                    let dy = Matrix::rows(
                                        &dy_image[first * g.out_w..],
                                        g.c_out,
                                        n,
                                        g.out_pixels(),
                                    );
                                    if g.is_pointwise() {
                                        let columns = Matrix::rows(
                                            &image[first * g.w..],
                                            g.c_in,
                                            n,
                                            g.h * g.w,
                                        );
                                        matmul(dweight, patch, dy, columns.t(), 1.0, true);
                                        matmul(
                                            &mut dx[first * g.w..],
                                            g.h * g.w,
                                            kernel.t(),
                                            dy,
                                            1.0,
                                            false,
                                        );
                                        continue;
                                    }
                                    with_scratch(patch * n, |cols| {
                                        g.im2col(image, first, rows, cols);
                                        let cols = Matrix::rows(cols, patch, n, n);
                                        matmul(dweight, patch, dy, cols.t(), 1.0, true);
                                    });
                                    if winograd.is_some() {
                                        continue;
                                    }
                                    with_scratch(patch * n, |dcols| {
                                        matmul(dcols, n, kernel.t(), dy, 1.0, false);
                                        g.col2im_add(dcols, first, rows, dx);
                                    });
                                }
                            }
                        });
                    Ok(())
                })
            })
        })?;
        let device = xs.device();
        let dx = Tensor::from_vec(dx, xs.shape(), device)?;
        let dweight = sum_partials(dweight, chunks, weight.shape(), device)?;
        let dbias = sum_partials(dbias, chunks, g.c_out, device)?;
        Ok((Some(dx), Some(dweight), Some(dbias)))
    }
}
