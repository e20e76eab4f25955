//! The forward pass of 3×3, stride-1, padding-1 convolutions by Winograd's minimal filtering
//! F(2×2, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2×2 block of output pixels is computed from a 4×4 input patch with 16 products per
//! (input, output) channel pair instead of 36: the patch and the kernel are transformed
//! (`V = Bᵀ d B`, `U = G g Gᵀ`), multiplied elementwise over the 16 positions — which across
//! channels is 16 matrix products `M_ξ = U_ξ · V_ξ` — and transformed back (`Y = Aᵀ M A`). The
//! arithmetic drops 2.25×; the transforms are additions only and cost a few percent. These
//! are most of the convolutions of SD's U-Net and VAE. In training, the input gradient is
//! such a convolution too (of the output gradient, with the kernel flipped and transposed)
//! and takes the same path; the kernel gradient keeps the im2col products.

use rayon::prelude::*;

use super::gemm::{matmul, Matrix};
use super::with_scratch;

/// Positions of the 4×4 transformed tile: one matrix product each.
const POSITIONS: usize = 16;
/// Output pixels per image below which the kernel transform costs more than it saves
/// (measured on SD 1.5's U-Net: its 8×8 and 4×4 levels with 1,280 channels lose). Images this
/// size make at least four work items each.
const MIN_PIXELS: usize = 1024;
/// Tiles per work item (whole rows of tiles): enough columns for an efficient product.
const TILES_PER_ITEM: usize = 64;

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
    /// Only where the 2.25× saving is not eaten by the transforms: of the kernel (per call,
    /// `16·c_out·c_in` values, worth it only over enough output pixels) or of the tiles (few
    /// channels). The choice depends on one image's size, never on the batch or the threads,
    /// so that an image comes out the same whatever else is in its batch.
    pub fn worthwhile(&self) -> bool {
        self.h * self.w >= MIN_PIXELS && self.c_in >= 16 && self.c_out >= 16
    }

    fn tile_rows(&self) -> usize {
        self.h.div_ceil(2)
    }

    fn tile_cols(&self) -> usize {
        self.w.div_ceil(2)
    }

    /// Work items `(image, first tile row, tile rows)`.
    fn items(&self) -> Vec<(usize, usize, usize)> {
        let per_item = (TILES_PER_ITEM / self.tile_cols()).clamp(1, self.tile_rows());
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
    /// `[c_out, c_in, 3, 3]`) + `bias`.
    pub fn forward(&self, xs: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32]) {
        let kernels = self.transformed_kernels(weight);
        let plane = self.h * self.w;
        let (image_len, out_len) = (self.c_in * plane, self.c_out * plane);
        assert_eq!(out.len(), self.batch * out_len, "output size");
        let shared = super::gemm::SharedOut(out.as_mut_ptr());
        let shared = &shared;
        self.items().par_iter().for_each(|&(b, first, rows)| {
            let image = &xs[b * image_len..(b + 1) * image_len];
            // SAFETY: image b's output lies inside `out`, and the items own disjoint tile rows.
            unsafe {
                self.band(
                    image,
                    &kernels,
                    bias,
                    first,
                    rows,
                    shared.0.add(b * out_len),
                )
            };
        });
    }

    /// The input gradient `dx` `[batch, c_in, h, w]` of this convolution from the output
    /// gradient `grad` `[batch, c_out, h, w]`: itself a 3×3 same convolution, of `grad` with
    /// the kernel flipped in space and its channel roles swapped, so the same path computes it.
    pub fn input_gradient(&self, grad: &[f32], weight: &[f32], dx: &mut [f32]) {
        let mut flipped = vec![0f32; weight.len()];
        for (o, kernels) in weight.chunks_exact(9 * self.c_in).enumerate() {
            for (i, g) in kernels.chunks_exact(9).enumerate() {
                let at = (i * self.c_out + o) * 9;
                for (t, &value) in g.iter().enumerate() {
                    flipped[at + 8 - t] = value;
                }
            }
        }
        let transposed = Self {
            c_in: self.c_out,
            c_out: self.c_in,
            ..*self
        };
        transposed.forward(grad, &flipped, &vec![0.0; self.c_in], dx);
    }

    /// `U_ξ` for every output channel: `[c_out, 16, c_in]`, so that `U_ξ` is the
    /// `[c_out, c_in]` matrix at offset `ξ·c_in` with rows `16·c_in` apart.
    fn transformed_kernels(&self, weight: &[f32]) -> Vec<f32> {
        let mut u = vec![0f32; self.c_out * POSITIONS * self.c_in];
        u.par_chunks_exact_mut(POSITIONS * self.c_in)
            .zip(weight.par_chunks_exact(9 * self.c_in))
            .for_each(|(u, kernels)| {
                for (c, g) in kernels.chunks_exact(9).enumerate() {
                    let values = kernel_transform(g.try_into().expect("3×3 kernel"));
                    for (xi, value) in values.into_iter().enumerate() {
                        u[xi * self.c_in + c] = value;
                    }
                }
            });
        u
    }

    /// Output rows `2·first .. 2·(first + rows)` of one image, whose `[c_out, h, w]` output
    /// starts at `out`.
    ///
    /// # Safety
    /// `out` must be valid for `c_out·h·w` writes, and no other thread may touch those rows of
    /// any channel during the call.
    unsafe fn band(
        &self,
        image: &[f32],
        kernels: &[f32],
        bias: &[f32],
        first: usize,
        rows: usize,
        out: *mut f32,
    ) {
        let tw = self.tile_cols();
        let tiles = rows * tw;
        let (pad_h, half) = (2 * rows + 2, tw + 1);
        let split_len = self.c_in * pad_h * 2 * half;
        let (v_len, m_len) = (
            POSITIONS * self.c_in * tiles,
            POSITIONS * self.c_out * tiles,
        );
        with_scratch(split_len + v_len + m_len + 8 * half, |scratch| {
            let (split, rest) = scratch.split_at_mut(split_len);
            let (v, rest) = rest.split_at_mut(v_len);
            let (m, temp) = rest.split_at_mut(m_len);
            self.split_band(image, first, pad_h, half, split);
            for c in 0..self.c_in {
                for ty in 0..rows {
                    // Rows 2·ty .. 2·ty + 4 of the band, as (even, odd) columns.
                    let row = |a: usize, parity: usize| {
                        let at = ((c * pad_h + 2 * ty + a) * 2 + parity) * half;
                        &split[at..at + half]
                    };
                    let at = c * tiles + ty * tw;
                    let rows = std::array::from_fn(|i| row(i / 2, i % 2));
                    input_transform(rows, temp, v, |xi| xi * self.c_in * tiles + at);
                }
            }
            let row_stride = POSITIONS * self.c_in;
            for xi in 0..POSITIONS {
                let u = Matrix::rows(
                    &kernels[xi * self.c_in..],
                    self.c_out,
                    self.c_in,
                    row_stride,
                );
                let vx = Matrix::rows(&v[xi * self.c_in * tiles..], self.c_in, tiles, tiles);
                let mx = &mut m[xi * self.c_out * tiles..(xi + 1) * self.c_out * tiles];
                matmul(mx, tiles, u, vx, 1.0, false);
            }
            let plane = self.h * self.w;
            for (k, &b) in bias.iter().enumerate() {
                for ty in 0..rows {
                    let at = k * tiles + ty * tw;
                    let tile = std::array::from_fn(|xi| {
                        let offset = xi * self.c_out * tiles + at;
                        &m[offset..offset + tw]
                    });
                    let y = 2 * (first + ty);
                    let len = self.w * (self.h - y).min(2);
                    // SAFETY: rows y and y + 1 (within the image) of channel k are this band's
                    // (caller's contract).
                    let pair = unsafe {
                        std::slice::from_raw_parts_mut(out.add(k * plane + y * self.w), len)
                    };
                    let (upper, lower) = pair.split_at_mut(self.w);
                    output_transform(tile, b, temp, upper, (!lower.is_empty()).then_some(lower));
                }
            }
        });
    }

    /// The input rows the band's tiles read (`2·first - 1 ..`, with the zero border), split
    /// into even and odd columns: `[c_in, pad_h, 2, half]`, so that every position of every
    /// tile of a row is a contiguous run.
    fn split_band(&self, image: &[f32], first: usize, pad_h: usize, half: usize, out: &mut [f32]) {
        out.fill(0.0);
        let plane = self.h * self.w;
        for (c, channel) in out.chunks_exact_mut(pad_h * 2 * half).enumerate() {
            for (r, pair) in channel.chunks_exact_mut(2 * half).enumerate() {
                let Some(y) = (2 * first + r).checked_sub(1).filter(|&y| y < self.h) else {
                    continue;
                };
                let src = &image[c * plane + y * self.w..c * plane + (y + 1) * self.w];
                let (even, odd) = pair.split_at_mut(half);
                // Padded column p holds input column p - 1: odd p are even inputs.
                for (d, &x) in odd.iter_mut().zip(src.iter().step_by(2)) {
                    *d = x;
                }
                for (d, &x) in even[1..].iter_mut().zip(src.iter().skip(1).step_by(2)) {
                    *d = x;
                }
            }
        }
    }
}

/// `dst[i] = Σ sign·src[i]`, in one pass the compiler vectorises.
fn combine<const N: usize>(dst: &mut [f32], terms: [(&[f32], f32); N]) {
    let len = dst.len();
    let terms = terms.map(|(src, sign)| (&src[..len], sign));
    for (i, d) in dst.iter_mut().enumerate() {
        *d = terms.iter().map(|&(src, sign)| sign * src[i]).sum();
    }
}

/// `Bᵀ d B` of a row of tiles, `Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`. `rows[2a + p]`
/// holds row a's even (p = 0) or odd (p = 1) columns; tile t reads columns 2t .. 2t + 4, i.e.
/// even[t], odd[t], even[t + 1], odd[t + 1]. Position ξ of every tile goes to
/// `dst[offset(ξ)..]`; `temp` holds `8 · (tiles + 1)` values.
fn input_transform(
    rows: [&[f32]; 8],
    temp: &mut [f32],
    dst: &mut [f32],
    offset: impl Fn(usize) -> usize,
) {
    let half = rows[0].len();
    let tiles = half - 1;
    // Bᵀ over the rows, for even and odd columns: t[2i + p].
    let mut t: Vec<&mut [f32]> = temp.chunks_exact_mut(half).take(8).collect();
    for p in 0..2 {
        let d = |a: usize| rows[2 * a + p];
        combine(t[p], [(d(0), 1.0), (d(2), -1.0)]);
        combine(t[2 + p], [(d(1), 1.0), (d(2), 1.0)]);
        combine(t[4 + p], [(d(2), 1.0), (d(1), -1.0)]);
        combine(t[6 + p], [(d(1), 1.0), (d(3), -1.0)]);
    }
    // … then B over the columns: x0 = even[t], x1 = odd[t], x2 = even[t + 1], x3 = odd[t + 1].
    for i in 0..4 {
        let (even, odd) = (&*t[2 * i], &*t[2 * i + 1]);
        let (x0, x1, x2, x3) = (&even[..tiles], &odd[..tiles], &even[1..], &odd[1..]);
        let terms = [
            [(x0, 1.0), (x2, -1.0)],
            [(x1, 1.0), (x2, 1.0)],
            [(x2, 1.0), (x1, -1.0)],
            [(x1, 1.0), (x3, -1.0)],
        ];
        for (j, terms) in terms.into_iter().enumerate() {
            let at = offset(4 * i + j);
            combine(&mut dst[at..at + tiles], terms);
        }
    }
}

/// `Aᵀ m A + bias` of a row of tiles (`m[ξ]` position ξ of every tile), `Aᵀ = [1 1 1 0;
/// 0 1 -1 -1]`, written as output rows `upper` and `lower` (None past the image's last row);
/// `temp` holds `8 · (tiles + 1)` values.
fn output_transform(
    m: [&[f32]; 16],
    bias: f32,
    temp: &mut [f32],
    upper: &mut [f32],
    lower: Option<&mut [f32]>,
) {
    let tiles = m[0].len();
    let mut s: Vec<&mut [f32]> = temp.chunks_exact_mut(tiles).take(8).collect();
    // Aᵀ over the rows: s[4r + j].
    for j in 0..4 {
        combine(s[j], [(m[j], 1.0), (m[4 + j], 1.0), (m[8 + j], 1.0)]);
        combine(
            s[4 + j],
            [(m[4 + j], 1.0), (m[8 + j], -1.0), (m[12 + j], -1.0)],
        );
    }
    let write = |row: &mut [f32], s: &[&mut [f32]]| {
        let (s0, s1, s2, s3) = (&*s[0], &*s[1], &*s[2], &*s[3]);
        for (t, pair) in row.chunks_mut(2).enumerate() {
            pair[0] = s0[t] + s1[t] + s2[t] + bias;
            if let Some(second) = pair.get_mut(1) {
                *second = s1[t] - s2[t] - s3[t] + bias;
            }
        }
    };
    write(upper, &s[..4]);
    if let Some(lower) = lower {
        write(lower, &s[4..]);
    }
}

/// `G g Gᵀ` for a 3×3 kernel (row-major), with `G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]`.
fn kernel_transform(g: [f32; 9]) -> [f32; 16] {
    let apply = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    let cols: [[f32; 4]; 3] = std::array::from_fn(|j| apply(g[j], g[3 + j], g[6 + j]));
    std::array::from_fn(|i| {
        let r = i / 4;
        apply(cols[0][r], cols[1][r], cols[2][r])[i % 4]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transforms of one tile compute the direct 3×3 correlation of its 4×4 patch.
    #[test]
    fn transforms_compute_a_correlation() {
        let d: [f32; 16] = std::array::from_fn(|i| ((i * 7 + 3) % 11) as f32 - 5.0);
        let g: [f32; 9] = std::array::from_fn(|i| ((i * 5 + 1) % 7) as f32 * 0.25 - 0.75);
        // One tile: each row's even columns (0, 2) and odd columns (1, 3).
        let split: Vec<[f32; 2]> = (0..8)
            .map(|i| {
                let (a, p) = (i / 2, i % 2);
                [d[4 * a + p], d[4 * a + p + 2]]
            })
            .collect();
        let mut temp = [0f32; 16];
        let mut v = [0f32; 16];
        let rows = std::array::from_fn(|i| &split[i][..]);
        input_transform(rows, &mut temp, &mut v, |xi| xi);
        let u = kernel_transform(g);
        let product: Vec<[f32; 1]> = (0..16).map(|xi| [u[xi] * v[xi]]).collect();
        let (mut upper, mut lower) = ([0f32; 2], [0f32; 2]);
        let m = std::array::from_fn(|xi| &product[xi][..]);
        output_transform(m, 0.0, &mut temp, &mut upper, Some(&mut lower));
        for (i, &value) in upper.iter().chain(&lower).enumerate() {
            let (oy, ox) = (i / 2, i % 2);
            let direct: f32 = (0..9)
                .map(|k| g[k] * d[(oy + k / 3) * 4 + ox + k % 3])
                .sum();
            assert!((value - direct).abs() < 1e-5, "{i}: {value} vs {direct}");
        }
    }
}
