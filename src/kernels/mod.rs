//! ldm's own hot operations: candle custom ops with fused CPU forward AND backward passes,
//! used by the one model code for inference and training alike.
//!
//! candle's fused `softmax_last_dim`/`layer_norm` have no backward pass and its GroupNorm is
//! ~11 single-threaded passes; each op here is one parallel pass each way (vectorised for
//! AVX-512/AVX2 at run time, see `simd`). Every public op `x` has an `x_composed` twin built
//! from candle's primitive ops: the reference the tests hold the kernel to, and the path on
//! devices without a kernel here (CUDA, Metal) and for f64. On a GPU, inference (tensors no
//! gradient flows through) takes candle's own fused kernels where candle has them (softmax,
//! layer norm, and attention built on its softmax); training keeps the differentiable
//! composed ops. Half-precision convolutions on a GPU are one matrix product over unfolded
//! patches (`conv2d_unfolded`), differentiable too.

pub mod activation;
pub mod attention;
pub mod conv2d;
pub mod geglu;
mod gemm;
mod gemm_bf16;
pub mod group_norm;
mod kept_buffer;
pub mod layer_norm;
pub mod linear;
pub mod optimizer;
pub mod q8_0;
mod simd;
pub mod softmax;
mod winograd;

pub use activation::Activation;
pub use attention::{attention, attention_composed};
pub use conv2d::{conv2d, conv2d_composed, conv2d_unfolded};
pub use geglu::{geglu, geglu_composed};
pub use group_norm::{group_norm, group_norm_composed};
pub use kept_buffer::release_kept_buffers;
pub use layer_norm::{layer_norm, layer_norm_composed};
pub use linear::{linear, linear_composed};
pub use softmax::{softmax_last_dim, softmax_last_dim_composed};
pub use winograd::keeping_transformed_kernels;

use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor};

/// Whether `xs` runs through the CPU kernels: CPU tensors in f32, f16 or bf16 (half
/// precision is computed in f32). f64 stays on the composed path, which is exact.
fn uses_cpu_kernel(xs: &Tensor) -> bool {
    xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F16 | DType::BF16)
}

/// Whether `xs` takes candle's fused GPU kernels (softmax, layer norm): a half or single
/// precision tensor on a GPU that no gradient flows through (those kernels have no backward).
fn uses_gpu_kernel(xs: &Tensor) -> bool {
    !xs.device().is_cpu()
        && !xs.track_op()
        && matches!(xs.dtype(), DType::F32 | DType::F16 | DType::BF16)
}

fn cpu_f32(storage: &CpuStorage) -> Result<&[f32]> {
    match storage {
        CpuStorage::F32(data) => Ok(data),
        _ => bail!("ldm kernel: expected an f32 tensor"),
    }
}

fn storage_f32(storage: &Storage) -> Result<&[f32]> {
    match storage {
        Storage::Cpu(storage) => cpu_f32(storage),
        _ => bail!("ldm kernel: expected a CPU tensor"),
    }
}

/// The f32 contents of a contiguous CPU tensor; `what` names it in the error.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&cpu_f32(storage)?[start..end]),
        None => bail!("{what} must be contiguous"),
    }
}

/// A `[channels]` parameter as a slice (contiguous, as candle stores parameters).
fn channel_values<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    channels: usize,
) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) if end - start == channels => Ok(&cpu_f32(storage)?[start..end]),
        _ => bail!("per-channel parameters (norm weights, biases) must be contiguous vectors of {channels} values"),
    }
}

/// Runs `f` on the row-major f32 contents of a CPU tensor (copied only when `xs` is a
/// strided view or another dtype).
fn read_f32<R>(xs: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let xs = xs.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = xs.storage_and_layout();
    let start = layout.start_offset();
    f(&storage_f32(&storage)?[start..start + xs.elem_count()])
}

/// f32 for statistics over half-precision tensors, otherwise the tensor's own dtype.
pub fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Work items for reductions over rows: a fixed count (not the thread count) so that
/// gradient sums are bit-identical on every machine.
const ROW_CHUNKS: usize = 64;

thread_local! {
    static SCRATCH: kept_buffer::KeptBuffer = const { kept_buffer::KeptBuffer::new() };
}

/// Runs `run(item, gemm_threads)` for every work item: side by side on the pool, or, with
/// fewer than two items per thread (small images), one after another with each product split
/// across the threads by gemm instead.
fn for_each_work_item<T: Sync>(items: &[T], run: impl Fn(&T, usize) + Sync) {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    if items.len() < 2 * threads {
        items.iter().for_each(|item| run(item, threads));
    } else {
        items.par_iter().for_each(|item| run(item, 1));
    }
}

/// Runs `f` on a per-thread scratch buffer of `len` values (contents unspecified), reused
/// across calls so that per-tile buffers of several MiB are not allocated and page-faulted
/// in again for every tile. Nested calls get their own buffer.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buffer = SCRATCH.with(kept_buffer::KeptBuffer::take);
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    let result = f(&mut buffer[..len]);
    SCRATCH.with(|kept| kept.keep(buffer));
    result
}

/// Sums `parts` equal slices of `partials` (per-task gradient shares) elementwise, in a
/// fixed order, as a tensor of `shape`. candle's `sum(0)` over such a buffer walks it with a
/// stride and took more time than the convolution backward itself.
fn sum_partials(
    mut partials: Vec<f32>,
    parts: usize,
    shape: impl Into<candle_core::Shape>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    use rayon::prelude::*;
    let len = partials.len() / parts.max(1);
    let (total, rest) = partials.split_at_mut(len);
    const SPAN: usize = 4096;
    total
        .par_chunks_mut(SPAN)
        .enumerate()
        .for_each(|(i, total)| {
            for part in rest.chunks_exact(len) {
                let part = &part[i * SPAN..i * SPAN + total.len()];
                for (t, &p) in total.iter_mut().zip(part) {
                    *t += p;
                }
            }
        });
    partials.truncate(len);
    Tensor::from_vec(partials, shape, device)
}
