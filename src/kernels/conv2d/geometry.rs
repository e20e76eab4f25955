//! The sizes of one convolution, its work items, and the im2col / col2im copies between an
//! NCHW image and the columns of the matrix products.

use candle_core::{bail, Result};

use super::super::winograd::Winograd;

/// Output pixels per work item: enough columns for an efficient product, few enough that
/// `c_in·9 × TILE_PIXELS` columns stay a few MiB. Larger images are cut into tiles of whole
/// output rows; smaller ones are grouped, several whole images to an item, where
/// [`Geometry::group_images`] allows.
const TILE_PIXELS: usize = 256;

/// The sizes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub out_h: usize,
    pub out_w: usize,
    /// Whether small images are grouped several to a work item. Products of another width
    /// may sum in another order (the gemm crate's blocking depends on it), so an image's
    /// result would depend on its batch neighbours: only where a gradient flows (training,
    /// whose batch is fixed), never in inference, where an image must come out the same
    /// whatever else is in its batch (and at any thread count, which decides how classifier-free
    /// guidance's halves are batched).
    pub group_images: bool,
}

/// One work item: output rows `first_row..first_row + rows` of images
/// `first_image..first_image + images` (several images only when each is a whole item's
/// rows, so either `images == 1` or the rows are all of them).
#[derive(Debug, Clone, Copy)]
pub(super) struct Tile {
    pub first_image: usize,
    pub images: usize,
    pub first_row: usize,
    pub rows: usize,
}

impl Geometry {
    pub fn new(input: &[usize], kernel: &[usize], stride: usize, padding: usize) -> Result<Self> {
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
            group_images: false,
        })
    }

    /// Rows of the im2col matrix: `c_in · kh · kw`, in the weight's own order.
    pub fn patch_len(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    pub fn image_len(&self) -> usize {
        self.c_in * self.h * self.w
    }

    pub fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    pub fn out_len(&self) -> usize {
        self.c_out * self.out_pixels()
    }

    /// Whole images per work item (1 for images of `TILE_PIXELS` or more, or ungrouped).
    pub fn images_per_tile(&self) -> usize {
        if !self.group_images {
            return 1;
        }
        (TILE_PIXELS / self.out_pixels().max(1)).max(1)
    }

    /// The work items covering `images` (a range of the batch), in order.
    pub fn tiles(&self, images: std::ops::Range<usize>) -> Vec<Tile> {
        let per_tile = self.images_per_tile();
        if per_tile > 1 {
            return images
                .clone()
                .step_by(per_tile)
                .map(|first_image| Tile {
                    first_image,
                    images: per_tile.min(images.end - first_image),
                    first_row: 0,
                    rows: self.out_h,
                })
                .collect();
        }
        let rows_per_tile = (TILE_PIXELS / self.out_w.max(1)).clamp(1, self.out_h.max(1));
        images
            .flat_map(|image| {
                (0..self.out_h)
                    .step_by(rows_per_tile)
                    .map(move |first_row| Tile {
                        first_image: image,
                        images: 1,
                        first_row,
                        rows: rows_per_tile.min(self.out_h - first_row),
                    })
            })
            .collect()
    }

    /// Output pixels of one image in `tile` (the product's columns are `images` times this).
    pub fn tile_pixels(&self, tile: &Tile) -> usize {
        tile.rows * self.out_w
    }

    /// The Winograd path's sizes, for a 3×3, stride-1, padding-1 convolution.
    pub fn winograd(&self) -> Option<Winograd> {
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
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// The convolution whose output is this one's input gradient, when there is one: for
    /// stride 1 and a square kernel, the output gradient convolved with the kernel flipped in
    /// space and its channel roles swapped, padded by `k - 1 - padding`.
    pub fn transposed(&self) -> Option<Self> {
        (self.stride == 1 && self.kh == self.kw && self.padding < self.kh).then(|| Self {
            c_in: self.c_out,
            h: self.out_h,
            w: self.out_w,
            c_out: self.c_in,
            padding: self.kh - 1 - self.padding,
            out_h: self.h,
            out_w: self.w,
            ..*self
        })
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

    /// The taps `(c, ky, kx)` of the im2col rows in order (counted, not divided out of the
    /// row index: two integer divisions per row cost more than copying a 4×4 image's row).
    fn taps(&self) -> impl Iterator<Item = (usize, usize, usize)> {
        let (kh, kw) = (self.kh, self.kw);
        (0..self.c_in)
            .flat_map(move |c| (0..kh).flat_map(move |ky| (0..kw).map(move |kx| (c, ky, kx))))
    }

    /// Values of the zero-padded input rows [`Self::im2col`] works from, for tiles of `rows`
    /// output rows (stride 1; 0 otherwise).
    pub fn padded_len(&self, rows: usize) -> usize {
        if self.stride != 1 {
            return 0;
        }
        self.c_in * (rows + self.kh - 1) * (self.w + 2 * self.padding)
    }

    /// im2col of output rows `first..first + rows` of one image `[c_in, h, w]` into the
    /// columns `cols`: im2col row `k` (`rows · out_w` values) at `cols[k · cols_stride..]`.
    /// `padded` is scratch space of [`Self::padded_len`] values (the caller's, so that no
    /// buffer is allocated per tile).
    pub fn im2col(
        &self,
        image: &[f32],
        (first, rows): (usize, usize),
        cols: &mut [f32],
        cols_stride: usize,
        padded: &mut [f32],
    ) {
        if self.stride != 1 {
            return self.im2col_strided(image, first, rows, cols, cols_stride);
        }
        // The rows this tile reads, zero-padded once; every im2col row segment is then a
        // whole-width copy from it (SD's images are 4 to 64 pixels wide: short copies, where
        // per-segment bounds and `memcpy` calls cost more than the values).
        let (padded_w, padded_h) = (self.w + 2 * self.padding, rows + self.kh - 1);
        let padded = &mut padded[..self.padded_len(rows)];
        // One pass of zeros, then the rows that exist: no short fills per row.
        padded.fill(0.0);
        for (c, plane) in padded.chunks_exact_mut(padded_h * padded_w).enumerate() {
            let channel = &image[c * self.h * self.w..(c + 1) * self.h * self.w];
            for (pr, row) in plane.chunks_exact_mut(padded_w).enumerate() {
                let iy = (first + pr).checked_sub(self.padding);
                if let Some(iy) = iy.filter(|&iy| iy < self.h) {
                    copy_short(
                        &mut row[self.padding..self.padding + self.w],
                        &channel[iy * self.w..(iy + 1) * self.w],
                    );
                }
            }
        }
        // SD's widths get a copy of a length known at compile time (no division by the row
        // length, no remainder loops: a 4×4 image's tap is four moves).
        let copy_taps = match self.out_w {
            4 => Self::copy_taps::<4>,
            8 => Self::copy_taps::<8>,
            16 => Self::copy_taps::<16>,
            32 => Self::copy_taps::<32>,
            64 => Self::copy_taps::<64>,
            _ => Self::copy_taps::<0>,
        };
        copy_taps(self, padded, (padded_h, padded_w), rows, cols, cols_stride);
    }

    /// The im2col rows from the zero-padded rows `padded` (`padded_h × padded_w` per
    /// channel), for output rows `W` wide (`W == 0`: `self.out_w`, known at run time only).
    fn copy_taps<const W: usize>(
        &self,
        padded: &[f32],
        (padded_h, padded_w): (usize, usize),
        rows: usize,
        cols: &mut [f32],
        cols_stride: usize,
    ) {
        let width = if W == 0 { self.out_w } else { W };
        // Plain loops over (c, ky, kx): the `taps()` iterator did not inline here.
        let mut k = 0;
        for plane in padded.chunks_exact(padded_h * padded_w) {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let taps = &plane[ky * padded_w + kx..];
                    let col = &mut cols[k * cols_stride..][..rows * width];
                    for (r, seg) in col.chunks_exact_mut(width).enumerate() {
                        let src = &taps[r * padded_w..][..width];
                        if W == 0 {
                            copy_short(seg, src);
                        } else {
                            seg.copy_from_slice(src);
                        }
                    }
                    k += 1;
                }
            }
        }
    }

    /// [`Self::im2col`] for strided convolutions (SD's downsamplers), value by value.
    fn im2col_strided(
        &self,
        image: &[f32],
        first: usize,
        rows: usize,
        cols: &mut [f32],
        cols_stride: usize,
    ) {
        let n = rows * self.out_w;
        for (k, (c, ky, kx)) in self.taps().enumerate() {
            let channel = &image[c * self.h * self.w..(c + 1) * self.h * self.w];
            let col = &mut cols[k * cols_stride..k * cols_stride + n];
            for (r, seg) in col.chunks_exact_mut(self.out_w).enumerate() {
                let Some(iy) = self.input_row(first + r, ky) else {
                    seg.fill(0.0);
                    continue;
                };
                let input = &channel[iy * self.w..(iy + 1) * self.w];
                for (ox, v) in seg.iter_mut().enumerate() {
                    *v = self.input_col(ox, kx).map_or(0.0, |ix| input[ix]);
                }
            }
        }
    }

    /// Adds the columns `cols` (laid out as [`Self::im2col`] writes them) back onto the image
    /// gradient (col2im).
    pub fn col2im_add(
        &self,
        cols: &[f32],
        cols_stride: usize,
        first: usize,
        rows: usize,
        image: &mut [f32],
    ) {
        let n = rows * self.out_w;
        for (k, (c, ky, kx)) in self.taps().enumerate() {
            let channel = &mut image[c * self.h * self.w..(c + 1) * self.h * self.w];
            let col = &cols[k * cols_stride..k * cols_stride + n];
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

/// `dst = src` for short rows, in fixed-size blocks the compiler keeps in registers (no
/// `memcpy` call per row; SD's 4×4 level copies rows of 4).
fn copy_short(dst: &mut [f32], src: &[f32]) {
    let mut dst = dst.chunks_exact_mut(8);
    let mut src = src.chunks_exact(8);
    for (d, s) in (&mut dst).zip(&mut src) {
        let d: &mut [f32; 8] = d.try_into().expect("chunk of 8");
        *d = s.try_into().expect("chunk of 8");
    }
    let mut dst = dst.into_remainder().chunks_exact_mut(4);
    let mut src = src.remainder().chunks_exact(4);
    for (d, s) in (&mut dst).zip(&mut src) {
        let d: &mut [f32; 4] = d.try_into().expect("chunk of 4");
        *d = s.try_into().expect("chunk of 4");
    }
    for (d, s) in dst.into_remainder().iter_mut().zip(src.remainder()) {
        *d = *s;
    }
}
