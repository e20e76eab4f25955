//! The CPU passes of the convolution: forward, input gradient and kernel gradient, as matrix
//! products over im2col columns (Winograd's products where they pay).
//!
//! Each work item is a tile of output rows of one image or, where a gradient flows, several
//! whole small images side by side (training's 16×16 to 4×4 latents give products of a useful
//! width that way; see `Geometry::group_images` for why not in inference). A single-image
//! tile is written straight into the NCHW output; a group is computed into a scratch buffer
//! and copied out per image.

use candle_core::TensorId;
use rayon::prelude::*;

use super::super::gemm::{matmul, matmul_raw, Matrix, SharedOut};
use super::super::winograd::Winograd;
use super::super::{for_each_work_item, simd, with_scratch};
use super::geometry::{Geometry, Tile};

/// Batch items per kernel-gradient work item at least (more for small images: a whole
/// group); fixed, so that weight gradients are summed in the same order on every machine.
const BATCH_CHUNK: usize = 2;

/// `out` `[batch, c_out, out_h, out_w]` = conv(`xs`, `weight`) + `bias`; every value of
/// `out` is written. `constant_weight`: see `Winograd::forward`.
pub(super) fn forward(
    g: &Geometry,
    xs: &[f32],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
    constant_weight: Option<TensorId>,
) {
    if let Some(winograd) = g.winograd().filter(Winograd::worthwhile) {
        return winograd.forward(xs, weight, bias, out, constant_weight);
    }
    let kernel = Matrix::rows(weight, g.c_out, g.patch_len(), g.patch_len());
    let shared = SharedOut(out.as_mut_ptr());
    let shared = &shared;
    for_each_work_item(&g.tiles(0..g.batch), |tile, gemm_threads| {
        let n = g.tile_pixels(tile);
        let columns_len = input_columns_len(g, tile);
        if tile.images == 1 {
            let offset = tile.first_image * g.out_len() + tile.first_row * g.out_w;
            // The tile starts as the bias; the product is accumulated onto it.
            for (c, &value) in bias.iter().enumerate() {
                // SAFETY: row c of this tile lies inside `out` and belongs to this item only.
                unsafe {
                    std::slice::from_raw_parts_mut(shared.0.add(offset + c * g.out_pixels()), n)
                }
                .fill(value);
            }
            with_scratch(columns_len, |scratch| {
                let columns = input_columns(g, xs, tile, scratch);
                // SAFETY: the tile's rows (c_out rows of n values, out_pixels apart) are
                // inside `out` and written by this item only.
                unsafe {
                    let dst = shared.0.add(offset);
                    matmul_raw(
                        dst,
                        g.out_pixels(),
                        kernel,
                        columns,
                        1.0,
                        true,
                        gemm_threads,
                    )
                }
            });
            return;
        }
        let width = n * tile.images;
        with_scratch(g.c_out * width + columns_len, |scratch| {
            let (product, scratch) = scratch.split_at_mut(g.c_out * width);
            let columns = input_columns(g, xs, tile, scratch);
            // SAFETY: `product` holds c_out rows of `width` values.
            unsafe {
                let dst = product.as_mut_ptr();
                matmul_raw(dst, width, kernel, columns, 1.0, false, gemm_threads)
            };
            for i in 0..tile.images {
                let image_out = (tile.first_image + i) * g.out_len();
                for (c, &value) in bias.iter().enumerate() {
                    // SAFETY: image `first_image + i` belongs to this item only.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            shared.0.add(image_out + c * g.out_pixels()),
                            n,
                        )
                    };
                    let src = &product[c * width + i * n..][..n];
                    for (d, &s) in dst.iter_mut().zip(src) {
                        *d = s + value;
                    }
                }
            }
        });
    });
}

/// The input gradient `dx` `[batch, c_in, h, w]` from the output gradient `grad`; every
/// value of `dx` is written.
pub(super) fn input_gradient(g: &Geometry, grad: &[f32], weight: &[f32], dx: &mut [f32]) {
    if let Some(transposed) = g.transposed() {
        let flipped = flipped_and_swapped(g, weight);
        return forward(&transposed, grad, &flipped, &vec![0.0; g.c_in], dx, None);
    }
    // Strided: `Wᵀ dY` scattered back by col2im. A group's tiles add into the same images,
    // so each group is one task.
    dx.fill(0.0);
    let kernel = Matrix::rows(weight, g.c_out, g.patch_len(), g.patch_len());
    let per_group = g.images_per_tile();
    dx.par_chunks_mut(per_group * g.image_len())
        .enumerate()
        .for_each(|(group, dx)| {
            let first = group * per_group;
            for tile in g.tiles(first..(first + per_group).min(g.batch)) {
                let n = g.tile_pixels(&tile);
                let width = n * tile.images;
                let dcols_len = g.patch_len() * width;
                with_scratch(dcols_len + output_columns_len(g, &tile), |scratch| {
                    let (dcols, scratch) = scratch.split_at_mut(dcols_len);
                    let dy = output_columns(g, grad, &tile, scratch);
                    matmul(dcols, width, kernel.t(), dy, 1.0, false);
                    for i in 0..tile.images {
                        let image = &mut dx[(tile.first_image - first + i) * g.image_len()..];
                        g.col2im_add(&dcols[i * n..], width, tile.first_row, tile.rows, image);
                    }
                });
            }
        });
}

/// The kernel and bias gradients as per-chunk partial sums: `(dweight, dbias, chunks)` with
/// `chunks` slices of `[c_out, patch_len]` and `[c_out]` values, to be summed in order.
pub(super) fn kernel_gradient(
    g: &Geometry,
    xs: &[f32],
    grad: &[f32],
) -> (Vec<f32>, Vec<f32>, usize) {
    let patch = g.patch_len();
    let chunk_images = BATCH_CHUNK.max(g.images_per_tile());
    let chunks = g.batch.div_ceil(chunk_images);
    let mut dweight = vec![0f32; chunks * g.c_out * patch];
    let mut dbias = vec![0f32; chunks * g.c_out];
    // Few chunks (a small batch): each product split across the threads instead.
    let gemm_threads = if chunks >= rayon::current_num_threads() {
        1
    } else {
        rayon::current_num_threads()
    };
    dweight
        .par_chunks_mut(g.c_out * patch)
        .zip(dbias.par_chunks_mut(g.c_out))
        .enumerate()
        .for_each(|(chunk, (dweight, dbias))| {
            let first = chunk * chunk_images;
            let images = first..(first + chunk_images).min(g.batch);
            for b in images.clone() {
                let dy_image = &grad[b * g.out_len()..(b + 1) * g.out_len()];
                for (c, db) in dbias.iter_mut().enumerate() {
                    *db += simd::sum(&dy_image[c * g.out_pixels()..(c + 1) * g.out_pixels()]);
                }
            }
            for tile in g.tiles(images) {
                let dy_len = output_columns_len(g, &tile);
                with_scratch(dy_len + input_columns_len(g, &tile), |scratch| {
                    let (dy, columns) = scratch.split_at_mut(dy_len);
                    let dy = output_columns(g, grad, &tile, dy);
                    let columns = input_columns(g, xs, &tile, columns);
                    // SAFETY: `dweight` is this chunk's own `[c_out, patch]` slice.
                    unsafe {
                        let dst = dweight.as_mut_ptr();
                        matmul_raw(dst, patch, dy, columns.t(), 1.0, true, gemm_threads)
                    }
                });
            }
        });
    (dweight, dbias, chunks)
}

/// The kernel `[c_in, c_out, kh, kw]` of the transposed convolution: `weight` flipped in
/// space, its channel roles swapped.
fn flipped_and_swapped(g: &Geometry, weight: &[f32]) -> Vec<f32> {
    let taps = g.kh * g.kw;
    let mut flipped = vec![0f32; weight.len()];
    for (o, kernels) in weight.chunks_exact(taps * g.c_in).enumerate() {
        for (i, kernel) in kernels.chunks_exact(taps).enumerate() {
            let at = (i * g.c_out + o) * taps;
            for (t, &value) in kernel.iter().enumerate() {
                flipped[at + taps - 1 - t] = value;
            }
        }
    }
    flipped
}

/// Whether a tile's columns are the input itself (a pointwise convolution of one image).
fn input_is_columns(g: &Geometry, tile: &Tile) -> bool {
    g.is_pointwise() && tile.images == 1
}

/// Scratch values [`input_columns`] needs for `tile`.
fn input_columns_len(g: &Geometry, tile: &Tile) -> usize {
    if input_is_columns(g, tile) {
        return 0;
    }
    g.patch_len() * g.tile_pixels(tile) * tile.images + g.padded_len(tile.rows)
}

/// The tile's im2col matrix `[patch_len, images · pixels]`, built in `scratch` (of
/// [`input_columns_len`] values at least; one buffer per work item, as a nested scratch
/// would allocate afresh on every call).
fn input_columns<'a>(
    g: &Geometry,
    xs: &'a [f32],
    tile: &Tile,
    scratch: &'a mut [f32],
) -> Matrix<'a> {
    let n = g.tile_pixels(tile);
    let image = |i: usize| &xs[(tile.first_image + i) * g.image_len()..][..g.image_len()];
    if input_is_columns(g, tile) {
        let pixels = &image(0)[tile.first_row * g.w..];
        return Matrix::rows(pixels, g.c_in, n, g.h * g.w);
    }
    let width = n * tile.images;
    let cols_len = g.patch_len() * width;
    let (cols, padded) = scratch.split_at_mut(cols_len);
    for i in 0..tile.images {
        let rows = (tile.first_row, tile.rows);
        g.im2col(image(i), rows, &mut cols[i * n..], width, padded);
    }
    Matrix::rows(cols, g.patch_len(), width, width)
}

/// Scratch values [`output_columns`] needs for `tile`.
fn output_columns_len(g: &Geometry, tile: &Tile) -> usize {
    if tile.images == 1 {
        return 0;
    }
    g.c_out * g.tile_pixels(tile) * tile.images
}

/// The tile's output gradient as a `[c_out, images · pixels]` matrix (gathered into
/// `scratch`, of [`output_columns_len`] values at least, for a group of images).
fn output_columns<'a>(
    g: &Geometry,
    grad: &'a [f32],
    tile: &Tile,
    scratch: &'a mut [f32],
) -> Matrix<'a> {
    let n = g.tile_pixels(tile);
    let image = |i: usize| &grad[(tile.first_image + i) * g.out_len()..][..g.out_len()];
    if tile.images == 1 {
        let pixels = &image(0)[tile.first_row * g.out_w..];
        return Matrix::rows(pixels, g.c_out, n, g.out_pixels());
    }
    let width = n * tile.images;
    let dy = &mut scratch[..g.c_out * width];
    for i in 0..tile.images {
        for c in 0..g.c_out {
            dy[c * width + i * n..][..n].copy_from_slice(&image(i)[c * g.out_pixels()..][..n]);
        }
    }
    Matrix::rows(dy, g.c_out, width, width)
}
