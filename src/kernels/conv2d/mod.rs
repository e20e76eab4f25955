//! 2-D convolution (with its bias) as one CPU op, forward and backward.
//!
//! candle's CPU conv2d copies the input to NHWC and repacks the kernel on every call, then
//! gathers im2col tiles pixel by pixel and scatters the result back: in a profile of SD 1.5 at
//! 256² that bookkeeping took more time than the matrix products. Here the input stays NCHW and
//! the weight `[c_out, c_in, kh, kw]` is used as it is stored (a `c_out × c_in·kh·kw` matrix);
//! `cpu` has the passes, `geometry` the sizes, work items and im2col copies. The input
//! gradient of a stride-1 convolution is itself a convolution (of the output gradient, with
//! the kernel flipped and transposed) and takes the forward path, Winograd included; strided
//! ones scatter `Wᵀ dY` back with col2im. No naive `conv_transpose2d`.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::{contiguous_f32, read_f32, sum_partials, uses_cpu_kernel};

mod cpu;
mod geometry;

use geometry::Geometry;

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
            Conv2dOp {
                stride,
                padding,
                group_images: [xs, weight, bias].iter().any(|t| t.track_op()),
                constant_weight: (!weight.track_op()).then(|| weight.id()),
            },
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

struct Conv2dOp {
    stride: usize,
    padding: usize,
    /// See [`Geometry::group_images`]: set where a gradient flows.
    group_images: bool,
    /// The weight's id when it is a constant (inference): its Winograd transform may be
    /// kept between calls.
    constant_weight: Option<candle_core::TensorId>,
}

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
        let g = Geometry {
            group_images: self.group_images,
            ..Geometry::new(
                xs_layout.dims(),
                weight_layout.dims(),
                self.stride,
                self.padding,
            )?
        };
        let xs = contiguous_f32(xs, xs_layout, "conv2d: the input")?;
        let weight = contiguous_f32(weight, weight_layout, "conv2d: the kernel")?;
        let bias = super::channel_values(bias, bias_layout, g.c_out)?;
        let mut out = vec![0f32; g.batch * g.out_len()];
        cpu::forward(&g, xs, weight, bias, &mut out, self.constant_weight);
        let shape = Shape::from((g.batch, g.c_out, g.out_h, g.out_w));
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
        let g = Geometry {
            group_images: true,
            ..Geometry::new(xs.dims(), weight.dims(), self.stride, self.padding)?
        };
        let mut dx = vec![0f32; g.batch * g.image_len()];
        let (dweight, dbias, chunks) = read_f32(xs, |xs| {
            read_f32(weight, |weight| {
                read_f32(grad, |grad| {
                    cpu::input_gradient(&g, grad, weight, &mut dx);
                    Ok(cpu::kernel_gradient(&g, xs, grad))
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
