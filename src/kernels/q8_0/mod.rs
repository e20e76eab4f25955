//! 8-bit weights: ggml's q8_0 (blocks of 32 values along a weight row sharing one scale, the
//! scale rounded to f16), and products with them, for opt-in quantized inference
//! (`--quantize q8_0`, as stable-diffusion.cpp offers).
//!
//! A product quantizes each row of the activations the same way (per block of 32, on the
//! fly) and multiplies 8-bit integers into exact i32 sums; each block's sum is then scaled by
//! the two scales and added in f32. On CPUs with AVX-512-VNNI, `vpdpbusd` does 64 byte
//! products per instruction, four times an f32 FMA's products; with AVX2, `vpmaddubsw` and
//! `vpmaddwd` do 32 in three instructions (plus one to move the activation's sign onto the
//! weight), about an f32 FMA's rate: there q8_0 saves memory rather than time. candle's q8_0
//! matmul computes the same thing one dot product at a time and ran 5x slower than ldm's f32
//! product at SD's 320-wide layers (1024 × 320 -> 2560: 291 vs 58 ms at 2 threads).
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so the VNNI kernel reads activations offset
//! by 128 (`u = q + 128`) and each weight block carries `-128 · Σ q`, which starts its integer
//! sum. Every kernel (VNNI, AVX2, scalar) computes the same integers and the same f32
//! operations in the same order, so results are identical on every CPU.

use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;

mod tiles;

use tiles::{store, tile_avx2, tile_scalar, tile_vnni, Tile};

use super::gemm::SharedOut;
use super::read_f32;
use super::simd::multiversion;

/// Values per block (one scale each).
pub const BLOCK: usize = 32;
/// Output columns per packed panel: one vector of 16 i32 sums.
const PANEL: usize = 16;
/// Groups of four consecutive values per block (`vpdpbusd` sums four byte products per lane).
const GROUPS: usize = BLOCK / 4;
/// Rows of the output tile one kernel call computes.
const MR: usize = 4;
/// Panels of the output tile (32 columns).
const NP: usize = 2;
/// Rows per work item: the tile rows share one pass over a panel pair's weights (kept in L2).
const ROW_CHUNK: usize = 32;
/// Panel pairs per work item.
const PAIR_CHUNK: usize = 4;

/// The product kernels, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Vnni,
    Avx2,
    Scalar,
}

impl Kernel {
    /// The best kernel this CPU runs (checked once).
    fn best() -> Self {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            [Self::Vnni, Self::Avx2]
                .into_iter()
                .find(|kernel| kernel.available())
                .unwrap_or(Self::Scalar)
        })
    }

    fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Self::Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
                Self::Avx2 => has!("avx2") && has!("fma"),
                Self::Scalar => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        matches!(self, Self::Scalar)
    }
}

/// A weight `[out, in]` in q8_0, packed for the product: panels of 16 output rows; in a
/// panel, block by block, the block's groups of four values, each group as 16 rows × 4
/// bytes (the instruction's operand layout).
#[derive(Debug)]
pub struct Q8Matrix {
    out_dim: usize,
    in_dim: usize,
    quants: Vec<i8>,
    /// `[panel][block][16]`: each row's scale for the block (zero past the last row).
    scales: Vec<f32>,
    /// `[panel][block][16]`: `-128 · Σ q` of each row's block.
    offsets: Vec<i32>,
}

impl Q8Matrix {
    /// Whether a weight with rows of `in_dim` values can be stored in blocks.
    pub fn fits(in_dim: usize) -> bool {
        in_dim > 0 && in_dim.is_multiple_of(BLOCK)
    }

    /// Quantizes `weight` (`[out, in]`, `in` a multiple of [`BLOCK`]).
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        if !Self::fits(in_dim) {
            bail!("q8_0: rows of {in_dim} values are not whole blocks of {BLOCK}");
        }
        let blocks = in_dim / BLOCK;
        let panels = out_dim.div_ceil(PANEL);
        let mut quants = vec![0i8; panels * blocks * PANEL * BLOCK];
        let mut scales = vec![0f32; panels * blocks * PANEL];
        let mut offsets = vec![0i32; panels * blocks * PANEL];
        // Panel by panel in parallel: a model's weights are quantized at load.
        read_f32(weight, |weight| {
            quants
                .par_chunks_mut(blocks * PANEL * BLOCK)
                .zip(scales.par_chunks_mut(blocks * PANEL))
                .zip(offsets.par_chunks_mut(blocks * PANEL))
                .zip(weight.par_chunks(PANEL * in_dim))
                .for_each(|(((quants, scales), offsets), rows)| {
                    pack_panel(rows, in_dim, quants, scales, offsets)
                });
            Ok(())
        })?;
        Ok(Self {
            out_dim,
            in_dim,
            quants,
            scales,
            offsets,
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// The weight as f32 values (each the stored byte times its block's scale).
    pub fn dequantize(&self) -> Vec<f32> {
        let blocks = self.in_dim / BLOCK;
        let mut weight = vec![0f32; self.out_dim * self.in_dim];
        for (row, values) in weight.chunks_exact_mut(self.in_dim).enumerate() {
            let (panel, lane) = (row / PANEL, row % PANEL);
            for (i, value) in values.iter_mut().enumerate() {
                let (block, within) = (i / BLOCK, i % BLOCK);
                let base = (panel * blocks + block) * PANEL * BLOCK;
                let q = self.quants[base + ((within / 4) * PANEL + lane) * 4 + within % 4];
                *value = f32::from(q) * self.scales[(panel * blocks + block) * PANEL + lane];
            }
        }
        weight
    }

    /// The packed bytes, scales and offsets of `panel`.
    fn panel(&self, panel: usize) -> Panel<'_> {
        let blocks = self.in_dim / BLOCK;
        let (start, len) = (panel * blocks * PANEL, blocks * PANEL);
        Panel {
            quants: &self.quants[start * BLOCK..(start + len) * BLOCK],
            scales: &self.scales[start..start + len],
            offsets: &self.offsets[start..start + len],
        }
    }
}

#[derive(Clone, Copy)]
struct Panel<'a> {
    quants: &'a [i8],
    scales: &'a [f32],
    offsets: &'a [i32],
}

multiversion! {
    /// Quantizes up to 16 weight rows into one panel's bytes, scales and offsets.
    pub fn pack_panel(
        rows: &[f32],
        in_dim: usize,
        quants: &mut [i8],
        scales: &mut [f32],
        offsets: &mut [i32]
    ) {
        let mut block_quants = [0i8; BLOCK];
        for (lane, values) in rows.chunks_exact(in_dim).enumerate() {
            for (block, values) in values.chunks_exact(BLOCK).enumerate() {
                let at = block * PANEL + lane;
                scales[at] = quantize_weight_block(values, &mut block_quants);
                offsets[at] = -128 * block_quants.iter().map(|&q| i32::from(q)).sum::<i32>();
                for (g, group) in block_quants.chunks_exact(4).enumerate() {
                    let dst = (block * GROUPS + g) * PANEL * 4 + lane * 4;
                    quants[dst..dst + 4].copy_from_slice(group);
                }
            }
        }
    }
}

/// ggml's q8_0 rounding of one block: `d = max |x| / 127` (stored as f16), `q = round(x / d)`.
#[inline(always)]
fn quantize_weight_block(values: &[f32], quants: &mut [i8; BLOCK]) -> f32 {
    let scale = max_abs(values) / 127.0;
    let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
    for (q, &v) in quants.iter_mut().zip(values) {
        *q = (v * inverse).round() as i8;
    }
    half::f16::from_f32(scale).to_f32()
}

/// The largest magnitude in a block, in lanes that vectorise (max is exact in any order).
#[inline(always)]
fn max_abs(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for eight in values.chunks_exact(8) {
        for (lane, &x) in lanes.iter_mut().zip(eight) {
            *lane = lane.max(x.abs());
        }
    }
    lanes.into_iter().fold(0f32, f32::max)
}

/// Rows of activations in blocks: 8-bit values and one f32 scale per block.
struct QuantizedRows {
    quants: Vec<i8>,
    scales: Vec<f32>,
    blocks: usize,
}

impl QuantizedRows {
    fn new(xs: &[f32], in_dim: usize) -> Self {
        let blocks = in_dim / BLOCK;
        let rows = xs.len() / in_dim;
        let mut quants = vec![0i8; rows * in_dim];
        let mut scales = vec![0f32; rows * blocks];
        quants
            .par_chunks_mut(in_dim)
            .zip(scales.par_chunks_mut(blocks))
            .zip(xs.par_chunks(in_dim))
            .for_each(|((quants, scales), xs)| quantize_row(xs, quants, scales));
        Self {
            quants,
            scales,
            blocks,
        }
    }

    fn row(&self, row: usize) -> (&[i8], &[f32]) {
        let in_dim = self.blocks * BLOCK;
        (
            &self.quants[row * in_dim..(row + 1) * in_dim],
            &self.scales[row * self.blocks..(row + 1) * self.blocks],
        )
    }
}

multiversion! {
    /// One activation row's blocks: `d = max |x| / 127`, `q = round_ties_even(x · (1 / d))`
    /// (the same values whichever instructions run it: max and the rounding are exact).
    pub fn quantize_row(xs: &[f32], quants: &mut [i8], scales: &mut [f32]) {
        for ((xs, quants), scale) in xs
            .chunks_exact(BLOCK)
            .zip(quants.chunks_exact_mut(BLOCK))
            .zip(scales.iter_mut())
        {
            *scale = max_abs(xs) / 127.0;
            let inverse = if *scale == 0.0 { 0.0 } else { 1.0 / *scale };
            for (q, &x) in quants.iter_mut().zip(xs) {
                *q = (x * inverse).round_ties_even() as i8;
            }
        }
    }
}

/// `xs · weightᵀ (+ bias)` for `xs: [..., in]` with a q8_0 weight, on the CPU; the result in
/// `xs`'s dtype. Inference only: no gradient flows through a quantized weight.
pub fn linear_q8(xs: &Tensor, weight: &Q8Matrix, bias: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = weight.dims();
    if !xs.device().is_cpu() {
        bail!("q8_0 weights run on the CPU only");
    }
    if xs.dims().last() != Some(&in_dim) || bias.is_some_and(|b| b.dims() != [out_dim]) {
        bail!(
            "linear (q8_0): input {:?} does not fit weight {:?} and bias {:?}",
            xs.dims(),
            weight.dims(),
            bias.map(|b| b.dims())
        );
    }
    let mut dims = xs.dims().to_vec();
    *dims.last_mut().expect("checked above") = out_dim;
    let bias = bias
        .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
        .transpose()?;
    let ys = read_f32(xs, |xs| Ok(product(xs, weight, bias.as_deref())))?;
    Tensor::from_vec(ys, dims, xs.device())?.to_dtype(xs.dtype())
}

/// The rows of `xs` times the weight, plus `bias`, with the best kernel this CPU has.
fn product(xs: &[f32], weight: &Q8Matrix, bias: Option<&[f32]>) -> Vec<f32> {
    product_with(Kernel::best(), xs, weight, bias)
}

/// [`product`] with `kernel`, in parallel over tiles of rows and panels.
fn product_with(kernel: Kernel, xs: &[f32], weight: &Q8Matrix, bias: Option<&[f32]>) -> Vec<f32> {
    let (out_dim, in_dim) = weight.dims();
    let rows = xs.len() / in_dim;
    let mut ys = vec![0f32; rows * out_dim];
    if rows == 0 || out_dim == 0 {
        return ys;
    }
    let activations = QuantizedRows::new(xs, in_dim);
    let pairs = out_dim.div_ceil(PANEL * NP);
    let (row_chunks, pair_chunks) = (rows.div_ceil(ROW_CHUNK), pairs.div_ceil(PAIR_CHUNK));
    let out = &SharedOut(ys.as_mut_ptr());
    (0..row_chunks * pair_chunks)
        .into_par_iter()
        .for_each(|item| {
            let (row_chunk, pair_chunk) = (item / pair_chunks, item % pair_chunks);
            let row_end = rows.min((row_chunk + 1) * ROW_CHUNK);
            for pair in pair_chunk * PAIR_CHUNK..pairs.min((pair_chunk + 1) * PAIR_CHUNK) {
                let first_col = pair * PANEL * NP;
                let cols = (out_dim - first_col).min(PANEL * NP);
                let panels = [0, 1].map(|p| {
                    weight.panel((first_col / PANEL + p).min(out_dim.div_ceil(PANEL) - 1))
                });
                for first_row in (row_chunk * ROW_CHUNK..row_end).step_by(MR) {
                    let tile_rows = (row_end - first_row).min(MR);
                    let tile = Tile {
                        activations: std::array::from_fn(|r| {
                            activations.row(first_row + r.min(tile_rows - 1))
                        }),
                        panels,
                        bias: bias.map(|b| &b[first_col..first_col + cols]),
                    };
                    // SAFETY: this item alone writes rows `first_row..+tile_rows`, columns
                    // `first_col..+cols` of `ys` (`rows × out_dim`); the CPU runs `kernel`.
                    unsafe {
                        let dst = out.0.add(first_row * out_dim + first_col);
                        let sums = match kernel {
                            Kernel::Vnni => tile_vnni(&tile),
                            Kernel::Avx2 => tile_avx2(&tile),
                            Kernel::Scalar => tile_scalar(&tile),
                        };
                        store(&sums, tile.bias, dst, out_dim, tile_rows, cols);
                    }
                }
            }
        });
    ys
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 + seed) * 0.37).sin() * (1.0 + (i % 7) as f32))
            .collect()
    }

    /// Sizes with partial row tiles and panels, one block and many, more rows than one chunk.
    const SIZES: [(usize, usize, usize); 5] = [
        (1, 32, 1),
        (5, 64, 17),
        (37, 96, 33),
        (70, 320, 130),
        (3, 1280, 16),
    ];

    /// The vector kernels compute the scalar reference's integers and f32 operations in the
    /// same order: equal to the bit.
    #[test]
    fn vector_products_equal_the_scalar_reference() {
        for kernel in [Kernel::Vnni, Kernel::Avx2] {
            if !kernel.available() {
                eprintln!("skipped {kernel:?}: not on this CPU");
                continue;
            }
            for (m, k, n) in SIZES {
                let xs = values(m * k, 1.0);
                let weight = Tensor::from_vec(values(n * k, 2.0), (n, k), &Device::Cpu).unwrap();
                let weight = Q8Matrix::quantize(&weight).unwrap();
                let bias = values(n, 3.0);
                let fast = product_with(kernel, &xs, &weight, Some(&bias));
                let reference = product_with(Kernel::Scalar, &xs, &weight, Some(&bias));
                assert_eq!(fast, reference, "{kernel:?} ({m}, {k}, {n})");
            }
        }
    }

    /// Against an f64 product of the unquantized values: within the rounding of both
    /// operands (half a step of each block's scale per value).
    #[test]
    fn products_approximate_the_f32_product() {
        for (m, k, n) in SIZES {
            let xs = values(m * k, 1.0);
            let weights = values(n * k, 2.0);
            let weight = Tensor::from_vec(weights.clone(), (n, k), &Device::Cpu).unwrap();
            let weight = Q8Matrix::quantize(&weight).unwrap();
            let ys = product(&xs, &weight, None);
            for i in 0..m {
                for j in 0..n {
                    let (x, w) = (&xs[i * k..(i + 1) * k], &weights[j * k..(j + 1) * k]);
                    let exact: f64 = x.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
                    // |x·w - x̂·ŵ| ≤ Σ |x| |w - ŵ| + |ŵ| |x - x̂|: a weight is off by at most
                    // half a step plus 127 steps' f16 rounding of the scale (0.57 steps of
                    // max/127), an activation by half a step.
                    let bound: f64 = x
                        .chunks(BLOCK)
                        .zip(w.chunks(BLOCK))
                        .map(|(xb, wb)| {
                            let xmax = xb.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
                            let wmax = wb.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
                            BLOCK as f64 * xmax * wmax * (0.57 + 0.51) / 127.0
                        })
                        .sum();
                    let got = ys[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= bound + 1e-4,
                        "({m}, {k}, {n}) at ({i}, {j}): {got} vs {exact} (bound {bound})"
                    );
                }
            }
        }
    }

    #[test]
    fn dequantized_weights_are_within_a_step_and_the_scales_rounding() {
        let weights = values(48 * 64, 4.0);
        let tensor = Tensor::from_vec(weights.clone(), (48, 64), &Device::Cpu).unwrap();
        let back = Q8Matrix::quantize(&tensor).unwrap().dequantize();
        for (block, (w, b)) in weights.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
            let step = w.iter().fold(0f32, |m, &v| m.max(v.abs())) / 127.0;
            for (&w, &b) in w.iter().zip(b) {
                assert!((w - b).abs() <= 0.57 * step, "block {block}: {w} vs {b}");
            }
        }
    }

    /// Leading dimensions are rows, and the bias is added after the product (to the bit).
    #[test]
    fn a_linear_layer_keeps_leading_dimensions_and_adds_the_bias() {
        let device = Device::Cpu;
        let xs = Tensor::from_vec(values(2 * 3 * 64, 5.0), (2, 3, 64), &device).unwrap();
        let weight = Tensor::from_vec(values(10 * 64, 6.0), (10, 64), &device).unwrap();
        let bias = Tensor::from_vec(values(10, 7.0), 10, &device).unwrap();
        let q8 = Q8Matrix::quantize(&weight).unwrap();
        let ys = linear_q8(&xs, &q8, Some(&bias)).unwrap();
        assert_eq!(ys.dims(), [2, 3, 10]);
        let flat = linear_q8(&xs.reshape((6, 64)).unwrap(), &q8, None).unwrap();
        let flat_plus_bias = flat
            .broadcast_add(&bias)
            .unwrap()
            .reshape((2, 3, 10))
            .unwrap();
        let diff = (ys - flat_plus_bias)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        assert!(linear_q8(&xs.narrow(2, 0, 32).unwrap(), &q8, None).is_err());
    }
}
