//! GroupNorm with an optional fused SiLU, as one CPU pass forward and one backward.
//!
//! candle-nn's GroupNorm is ~11 separate single-threaded ops, and the U-Net and VAE follow
//! almost every GroupNorm with SiLU: here both are one parallel pass over `(batch, group)`.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{read_f32, simd, sum_partials, uses_cpu_kernel};

/// `silu?(GroupNorm(xs) · weight + bias)` over `xs: [batch, channels, ...]` (statistics per
/// batch item and group of `channels / groups` channels, in f32 for half-precision inputs).
pub fn group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    check(xs, groups)?;
    if !uses_cpu_kernel(xs) {
        return group_norm_composed(xs, weight, bias, groups, eps, silu);
    }
    let dtype = xs.dtype();
    let op = GroupNormOp {
        groups,
        eps: eps as f32,
        silu,
    };
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    f32(xs)?
        .contiguous()?
        .apply_op3(&f32(weight)?, &f32(bias)?, op)?
        .to_dtype(dtype)
}

/// The same from candle's primitive ops (reference and GPU path).
pub fn group_norm_composed(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    check(xs, groups)?;
    let dtype = xs.dtype();
    let internal = super::internal_dtype(dtype);
    let dims = xs.dims().to_vec();
    let grouped = xs.to_dtype(internal)?.reshape((dims[0], groups, ()))?;
    let centered = grouped.broadcast_sub(&grouped.mean_keepdim(2)?)?;
    let var = centered.sqr()?.mean_keepdim(2)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let mut channel_shape = vec![1; dims.len()];
    channel_shape[1] = dims[1];
    let ys = normed
        .reshape(dims.as_slice())?
        .to_dtype(dtype)?
        .broadcast_mul(&weight.reshape(channel_shape.as_slice())?)?
        .broadcast_add(&bias.reshape(channel_shape.as_slice())?)?;
    if silu {
        ys.silu()
    } else {
        Ok(ys)
    }
}

fn check(xs: &Tensor, groups: usize) -> Result<()> {
    let dims = xs.dims();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        bail!("group norm: {groups} groups do not divide the channels of {dims:?}");
    }
    Ok(())
}

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

/// `(batch, channels, elements per channel)` of a `[batch, channels, ...]` shape.
fn sizes(shape: &Shape) -> (usize, usize, usize) {
    let dims = shape.dims();
    (dims[0], dims[1], dims[2..].iter().product())
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "ldm-group-norm"
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
        let (_, channels, spatial) = sizes(xs_layout.shape());
        let xs = super::contiguous_f32(xs, xs_layout, "group norm: the input")?;
        let weight = super::channel_values(weight, weight_layout, channels)?;
        let bias = super::channel_values(bias, bias_layout, channels)?;
        let per_group = channels / self.groups * spatial;
        let mut ys = vec![0f32; xs.len()];
        if per_group > 0 {
            ys.par_chunks_mut(per_group)
                .zip(xs.par_chunks(per_group))
                .enumerate()
                .for_each(|(bg, (ys, xs))| {
                    let first_channel = bg % self.groups * (channels / self.groups);
                    let (mean, rstd) = simd::moments(xs, self.eps);
                    for (c, (ys, xs)) in ys.chunks_mut(spatial).zip(xs.chunks(spatial)).enumerate()
                    {
                        let scale = rstd * weight[first_channel + c];
                        let shift = bias[first_channel + c] - mean * scale;
                        simd::affine_into(xs, ys, scale, shift, self.silu);
                    }
                });
        }
        Ok((CpuStorage::F32(ys), xs_layout.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, channels, spatial) = sizes(xs.shape());
        let per_group_channels = channels / self.groups;
        let per_group = per_group_channels * spatial;
        let weight = weight.to_vec1::<f32>()?;
        let bias = bias.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xs.elem_count()];
        // Per batch item and channel: Σ dz and Σ dz · x̂, summed over the batch below.
        let mut dbias = vec![0f32; batch * channels];
        let mut dweight = vec![0f32; batch * channels];
        read_f32(xs, |xs| {
            read_f32(grad, |grad| {
                if per_group == 0 {
                    return Ok(());
                }
                dx.par_chunks_mut(per_group)
                    .zip(dbias.par_chunks_mut(per_group_channels))
                    .zip(dweight.par_chunks_mut(per_group_channels))
                    .enumerate()
                    .for_each(|(bg, ((dx, dbias), dweight))| {
                        let range = bg * per_group..(bg + 1) * per_group;
                        let (xs, dy) = (&xs[range.clone()], &grad[range]);
                        let first = bg % self.groups * per_group_channels;
                        let (mean, rstd) = simd::moments(xs, self.eps);
                        // dz (gradient of the normalised, affine output) goes into dx first.
                        let (mut sum_gdz, mut sum_gdzx) = (0f32, 0f32);
                        for c in 0..per_group_channels {
                            let span = c * spatial..(c + 1) * spatial;
                            let gamma = weight[first + c];
                            let scale = rstd * gamma;
                            let shift = bias[first + c] - mean * scale;
                            let (sdz, sdzx) = simd::affine_backward(
                                &xs[span.clone()],
                                &dy[span.clone()],
                                &mut dx[span],
                                scale,
                                shift,
                                self.silu,
                            );
                            let sdz_xhat = rstd * (sdzx - mean * sdz);
                            dbias[c] = sdz;
                            dweight[c] = sdz_xhat;
                            sum_gdz += gamma * sdz;
                            sum_gdzx += gamma * sdz_xhat;
                        }
                        // dx = rstd (γ dz − mean(γ dz) − x̂ mean(γ dz x̂)), affine in dz and x.
                        let n = per_group as f32;
                        let (c1, c2) = (sum_gdz / n, sum_gdzx / n);
                        for c in 0..per_group_channels {
                            let span = c * spatial..(c + 1) * spatial;
                            let a = rstd * weight[first + c];
                            let b = -rstd * rstd * c2;
                            let offset = rstd * (rstd * c2 * mean - c1);
                            simd::axpbyc(&mut dx[span.clone()], &xs[span], a, b, offset);
                        }
                    });
                Ok(())
            })
        })?;
        let device = xs.device();
        let dx = Tensor::from_vec(dx, xs.shape(), device)?;
        let per_channel = |v: Vec<f32>| sum_partials(v, batch, channels, device);
        Ok((
            Some(dx),
            Some(per_channel(dweight)?),
            Some(per_channel(dbias)?),
        ))
    }
}
