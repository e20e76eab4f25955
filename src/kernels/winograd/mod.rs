//! The forward pass of 3×3, stride-1, padding-1 convolutions by Winograd's minimal filtering
//! F(m×m, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each m×m block of output pixels is computed from an n×n input patch (n = m + 2) with n²
//! products per (input, output) channel pair instead of 9m²: the patch and the kernel are
//! transformed (`V = Bᵀ d B`, `U = G g Gᵀ`), multiplied elementwise over the n² positions —
//! which across channels is n² matrix products `M_ξ = U_ξ · V_ξ` — and transformed back
//! (`Y = Aᵀ M A`). F(2×2, 3×3) saves 2.25× of the multiplications, F(4×4, 3×3) 4×, but its
//! transformed kernels are 36 values per channel pair, written on every call: it pays only over
//! larger images. These are most of the convolutions of SD's U-Net and VAE. In training, the
//! input gradient is such a convolution too (see `conv2d`) and takes the same path; the
//! kernel gradient keeps the im2col products.

use candle_core::TensorId;
use rayon::prelude::*;

use super::gemm::{matmul_raw, Matrix};
use super::kept_buffer::KeptBuffer;
use super::{for_each_work_item, with_scratch};

mod kernel_cache;
mod transforms;

pub use kernel_cache::keeping_transformed_kernels;
use transforms::{Strided, Transforms, F2_TRANSFORMS, F4_TRANSFORMS};

/// The fewest input and output channels with which Winograd pays, by output pixels per image
/// (largest first): the kernel transform per call is worth it only over enough pixels, the
/// tile transforms only over enough channels. Measured with SD's shapes (batch 2): at 16 × 16,
/// F(2×2) wins 1.15-1.45× from 320 channels (SD 1.5's 640-1,280) but loses 1.4-3× at 32-128
/// (the default model's training); at 8 × 8 it loses even with 1,280 channels.
const MIN_CHANNELS_BY_PIXELS: [(usize, usize); 2] = [(1024, 16), (256, 256)];
/// Output pixels per image from which F(4×4, 3×3) replaces F(2×2, 3×3): 1.0-1.3× faster from
/// 64 × 64. At 32 × 32 it is faster too (1.1-1.35× with SD 1.5's channels), but its rounding,
/// about 6× F(2×2)'s, put the tiny SD pipeline's final latents 2.2e-4 from diffusers', over
/// the 2e-4 the parity tests hold them to; so F(4×4) stays with the large images.
const F4_MIN_PIXELS: usize = 4096;
/// Tiles per work item (whole rows of tiles): enough columns for an efficient product, but
/// at most half an image's, so that one image is two work items for two threads (F(2×2) at
/// 16 × 16 has 64 tiles: as one item its transforms ran on one thread while the other waited).
const TILES_PER_ITEM: usize = 64;

thread_local! {
    /// The buffer of the transformed kernels, kept between calls: a fresh one of tens of MiB
    /// was zeroed (or page-faulted in) on every call, ~10% of the VAE decoder's 512-channel
    /// 64×64 convolution.
    static TRANSFORMED_KERNELS: KeptBuffer = const { KeptBuffer::new() };
}

/// The sizes of one convolution this path handles: output size = input size.
#[derive(Debug, Clone, Copy)]
pub(super) struct Winograd {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub h: usize,
    pub w: usize,
}

impl Winograd {
    /// Only where the saving is not eaten by the transforms: of the kernel (per call,
    /// `n²·c_out·c_in` values, worth it only over enough output pixels) or of the tiles (few
    /// channels). The choice depends on one image's size, never on the batch or the threads,
    /// so that an image comes out the same whatever else is in its batch.
    pub fn worthwhile(&self) -> bool {
        let pixels = self.h * self.w;
        MIN_CHANNELS_BY_PIXELS
            .iter()
            .find(|&&(min_pixels, _)| pixels >= min_pixels)
            .is_some_and(|&(_, channels)| self.c_in.min(self.c_out) >= channels)
    }

    /// The algorithm for this image size (never the batch or the threads).
    fn scheme(&self) -> &'static Transforms {
        if self.h * self.w >= F4_MIN_PIXELS {
            &F4_TRANSFORMS
        } else {
            &F2_TRANSFORMS
        }
    }

    fn tile_rows(&self) -> usize {
        self.h.div_ceil(self.scheme().m)
    }

    fn tile_cols(&self) -> usize {
        self.w.div_ceil(self.scheme().m)
    }

    /// Work items `(image, first tile row, tile rows)`.
    fn items(&self) -> Vec<(usize, usize, usize)> {
        let tiles = TILES_PER_ITEM.min(self.tile_rows() * self.tile_cols() / 2);
        let per_item = (tiles / self.tile_cols()).clamp(1, self.tile_rows());
        let tile_rows = self.tile_rows();
        (0..self.batch)
            .flat_map(|b| {
                (0..tile_rows)
                    .step_by(per_item)
                    .map(move |row| (b, row, per_item.min(tile_rows - row)))
            })
            .collect()
    }

    /// `out` `[batch, c_out, h, w]` = conv3×3(`xs` `[batch, c_in, h, w]`, `weight`
    /// `[c_out, c_in, 3, 3]`) + `bias`. `constant_weight` names a weight that cannot change
    /// (no gradient), whose transform a denoising loop may keep (see `kernel_cache`).
    pub fn forward(
        &self,
        xs: &[f32],
        weight: &[f32],
        bias: &[f32],
        out: &mut [f32],
        constant_weight: Option<TensorId>,
    ) {
        let len = self.c_out * self.scheme().positions() * self.c_in;
        if let Some(key) = constant_weight.map(|id| (id, self.scheme().m)) {
            if let Some(kernels) = kernel_cache::find(key) {
                return self.products(xs, &kernels, bias, out);
            }
            if kernel_cache::has_room(len) {
                let mut kernels = vec![0f32; len];
                self.transform_kernels(weight, &mut kernels);
                let kernels = kernel_cache::keep(key, kernels);
                return self.products(xs, &kernels, bias, out);
            }
        }
        let mut kernels = TRANSFORMED_KERNELS.with(KeptBuffer::take);
        kernels.resize(len, 0.0);
        self.transform_kernels(weight, &mut kernels);
        self.products(xs, &kernels, bias, out);
        TRANSFORMED_KERNELS.with(|kept| kept.keep(kernels));
    }

    /// The products and output transforms of every band of tiles, with the kernels transformed.
    fn products(&self, xs: &[f32], kernels: &[f32], bias: &[f32], out: &mut [f32]) {
        let plane = self.h * self.w;
        let (image_len, out_len) = (self.c_in * plane, self.c_out * plane);
        assert_eq!(out.len(), self.batch * out_len, "output size");
        let shared = super::gemm::SharedOut(out.as_mut_ptr());
        let shared = &shared;
        for_each_work_item(&self.items(), |&(b, first, rows), gemm_threads| {
            let image = &xs[b * image_len..(b + 1) * image_len];
            // SAFETY: image b's output lies inside `out`, and the items own disjoint tile rows.
            unsafe {
                self.band(
                    image,
                    kernels,
                    bias,
                    (first, rows),
                    shared.0.add(b * out_len),
                    gemm_threads,
                )
            };
        });
    }

    /// `U_ξ` for every output channel into `u` (every value is written): `[c_out, n², c_in]`,
    /// so that `U_ξ` is the `[c_out, c_in]` matrix at offset `ξ·c_in` with rows `n²·c_in`
    /// apart.
    fn transform_kernels(&self, weight: &[f32], u: &mut [f32]) {
        let scheme = self.scheme();
        u.par_chunks_exact_mut(scheme.positions() * self.c_in)
            .zip(weight.par_chunks_exact(9 * self.c_in))
            .for_each(|(u, kernels)| (scheme.kernel)(kernels, u));
    }

    /// Output rows `m·first .. m·(first + rows)` of one image, whose `[c_out, h, w]` output
    /// starts at `out`, the products on `gemm_threads` threads.
    ///
    /// # Safety
    /// `out` must be valid for `c_out·h·w` writes, and no other thread may touch those rows of
    /// any channel during the call.
    unsafe fn band(
        &self,
        image: &[f32],
        kernels: &[f32],
        bias: &[f32],
        (first, rows): (usize, usize),
        out: *mut f32,
        gemm_threads: usize,
    ) {
        let scheme = self.scheme();
        let (m_px, positions) = (scheme.m, scheme.positions());
        let tw = self.tile_cols();
        let tiles = rows * tw;
        let (pad_h, phase_len) = (m_px * rows + 2, tw + 1);
        let split_len = self.c_in * pad_h * m_px * phase_len;
        let (v_len, m_len) = (
            positions * self.c_in * tiles,
            positions * self.c_out * tiles,
        );
        let temp_len = (scheme.n() + 1) * m_px * phase_len;
        with_scratch(split_len + v_len + m_len + temp_len, |scratch| {
            let (split, rest) = scratch.split_at_mut(split_len);
            let (v, rest) = rest.split_at_mut(v_len);
            let (m, temp) = rest.split_at_mut(m_len);
            self.split_band(image, first, pad_h, phase_len, split);
            let rows_len = scheme.n() * m_px * phase_len;
            for c in 0..self.c_in {
                for ty in 0..rows {
                    // Rows m·ty .. m·ty + n of the band, as m phases of columns.
                    let start = (c * pad_h + m_px * ty) * m_px * phase_len;
                    let positions = Strided {
                        at: c * tiles + ty * tw,
                        stride: self.c_in * tiles,
                    };
                    let rows = &split[start..start + rows_len];
                    (scheme.input)(rows, temp, v, positions);
                }
            }
            let row_stride = positions * self.c_in;
            for xi in 0..positions {
                let u = Matrix::rows(
                    &kernels[xi * self.c_in..],
                    self.c_out,
                    self.c_in,
                    row_stride,
                );
                let vx = Matrix::rows(&v[xi * self.c_in * tiles..], self.c_in, tiles, tiles);
                let mx = &mut m[xi * self.c_out * tiles..(xi + 1) * self.c_out * tiles];
                // SAFETY: `mx` holds the `c_out × tiles` product.
                unsafe { matmul_raw(mx.as_mut_ptr(), tiles, u, vx, 1.0, false, gemm_threads) };
            }
            let plane = self.h * self.w;
            for (k, &b) in bias.iter().enumerate() {
                for ty in 0..rows {
                    let positions = Strided {
                        at: k * tiles + ty * tw,
                        stride: self.c_out * tiles,
                    };
                    let y = m_px * (first + ty);
                    let out_rows = (self.h - y).min(m_px);
                    // SAFETY: rows y .. y + out_rows (within the image) of channel k are this
                    // band's (caller's contract).
                    let block = unsafe {
                        std::slice::from_raw_parts_mut(
                            out.add(k * plane + y * self.w),
                            out_rows * self.w,
                        )
                    };
                    (scheme.output)(m, positions, b, temp, block, self.w);
                }
            }
        });
    }

    /// The input rows the band's tiles read (`m·first - 1 ..`, with the zero border), split
    /// into the m phases of their columns: `[c_in, pad_h, m, phase_len]`, so that every
    /// position of every tile of a row is a contiguous run.
    fn split_band(
        &self,
        image: &[f32],
        first: usize,
        pad_h: usize,
        phase_len: usize,
        out: &mut [f32],
    ) {
        out.fill(0.0);
        let plane = self.h * self.w;
        let m = self.scheme().m;
        for (c, channel) in out.chunks_exact_mut(pad_h * m * phase_len).enumerate() {
            for (r, phases) in channel.chunks_exact_mut(m * phase_len).enumerate() {
                let Some(y) = (m * first + r).checked_sub(1).filter(|&y| y < self.h) else {
                    continue;
                };
                let src = &image[c * plane + y * self.w..c * plane + (y + 1) * self.w];
                match m {
                    2 => split_row::<2>(src, phases, phase_len),
                    4 => split_row::<4>(src, phases, phase_len),
                    _ => unreachable!("Winograd schemes have m = 2 or 4"),
                }
            }
        }
    }
}

/// One input row into its `M` column phases (`phase_len` values each) of the zero-padded
/// row: padded column `x + 1` holds input column `x`, padded column `P` goes to phase
/// `P % M` at index `P / M`. `M` is a constant so that each phase's gather is a fixed-stride
/// loop the compiler vectorises (a run-time stride kept it one value at a time).
#[inline(always)]
fn split_row<const M: usize>(src: &[f32], phases: &mut [f32], phase_len: usize) {
    for (phase, dst) in phases.chunks_exact_mut(phase_len).enumerate() {
        // Input columns offset, offset + M, ... land at dst[start], dst[start + 1], ...
        let offset = (phase + M - 1) % M;
        let start = usize::from(phase == 0);
        let Some(src) = src.get(offset..) else {
            continue;
        };
        let chunks = src.chunks_exact(M);
        let last = chunks.remainder().first();
        let dst = &mut dst[start..];
        let whole = chunks.len().min(dst.len());
        for (d, chunk) in dst[..whole].iter_mut().zip(chunks) {
            *d = chunk[0];
        }
        if let (Some(&x), Some(d)) = (last, dst.get_mut(whole)) {
            *d = x;
        }
    }
}
