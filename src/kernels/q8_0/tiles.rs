//! The output tiles of a q8_0 product: one `MR × 32` block of outputs from `MR` quantized
//! activation rows and two weight panels, by AVX-512-VNNI, AVX2 or scalar code. All three
//! compute the same integer sums and the same f32 operations in the same order.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{Panel, BLOCK, GROUPS, MR, NP, PANEL};

/// The operands of one `MR × 32` output tile: `MR` activation rows (repeated past the last
/// row) and two weight panels (the second repeats the first past the last panel).
pub(super) struct Tile<'a> {
    pub(super) activations: [(&'a [i8], &'a [f32]); MR],
    pub(super) panels: [Panel<'a>; NP],
    pub(super) bias: Option<&'a [f32]>,
}

/// A tile's f32 sums, before the bias.
pub(super) type TileSums = [[f32; PANEL * NP]; MR];

/// Writes `rows × cols` of `sums` plus the bias to `dst` (rows `row_stride` apart).
///
/// # Safety
/// `dst` must be valid for the tile's `rows × cols` values.
pub(super) unsafe fn store(
    sums: &TileSums,
    bias: Option<&[f32]>,
    dst: *mut f32,
    row_stride: usize,
    rows: usize,
    cols: usize,
) {
    for (r, sums) in sums.iter().enumerate().take(rows) {
        for (col, &sum) in sums.iter().enumerate().take(cols) {
            // SAFETY: (r, col) is inside the caller's tile.
            unsafe { *dst.add(r * row_stride + col) = sum + bias.map_or(0.0, |b| b[col]) };
        }
    }
}

/// The reference: per output, per block, the exact integer sum, then
/// `acc = fma(sum, weight scale · row scale, acc)`, the vector kernels' order.
pub(super) fn tile_scalar(tile: &Tile) -> TileSums {
    let mut sums = [[0f32; PANEL * NP]; MR];
    for (sums, &(quants, row_scales)) in sums.iter_mut().zip(&tile.activations) {
        for (col, acc) in sums.iter_mut().enumerate() {
            let (panel, lane) = (tile.panels[col / PANEL], col % PANEL);
            for (block, &row_scale) in row_scales.iter().enumerate() {
                let mut sum = 0i32;
                for (i, &q) in quants[block * BLOCK..(block + 1) * BLOCK]
                    .iter()
                    .enumerate()
                {
                    let group = (block * GROUPS + i / 4) * PANEL * 4;
                    let w = panel.quants[group + lane * 4 + i % 4];
                    sum += i32::from(q) * i32::from(w);
                }
                let scale = panel.scales[block * PANEL + lane] * row_scale;
                *acc = (sum as f32).mul_add(scale, *acc);
            }
        }
    }
    sums
}

/// The tile with `vpdpbusd`: activations offset to unsigned (`q ^ 0x80 = q + 128`), sums
/// started at the weights' `-128 · Σ q`.
///
/// # Safety
/// The CPU must have AVX-512-VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tile_vnni(tile: &Tile) -> TileSums {
    let blocks = tile.activations[0].1.len();
    let unsigned = _mm512_set1_epi8(-128);
    let mut acc = [[_mm512_setzero_ps(); NP]; MR];
    for block in 0..blocks {
        // SAFETY: every panel holds `blocks` blocks of 16 lanes and 16 × 32 bytes; every
        // activation row `blocks` blocks of 32 bytes.
        unsafe {
            let offsets = tile
                .panels
                .map(|p| _mm512_loadu_si512(p.offsets.as_ptr().add(block * PANEL).cast()));
            let mut sums = [offsets; MR];
            for g in 0..GROUPS {
                let weights = tile.panels.map(|p| {
                    let at = (block * GROUPS + g) * PANEL * 4;
                    _mm512_loadu_si512(p.quants.as_ptr().add(at).cast())
                });
                for (sums, (quants, _)) in sums.iter_mut().zip(&tile.activations) {
                    let four = quants.as_ptr().add(block * BLOCK + 4 * g).cast::<i32>();
                    let four = _mm512_xor_si512(_mm512_set1_epi32(four.read_unaligned()), unsigned);
                    for (sum, &w) in sums.iter_mut().zip(&weights) {
                        *sum = _mm512_dpbusd_epi32(*sum, four, w);
                    }
                }
            }
            let scales = tile
                .panels
                .map(|p| _mm512_loadu_ps(p.scales.as_ptr().add(block * PANEL)));
            for ((acc, sums), (_, row_scales)) in acc.iter_mut().zip(&sums).zip(&tile.activations) {
                let row_scale = _mm512_set1_ps(row_scales[block]);
                for ((acc, &sum), &scale) in acc.iter_mut().zip(sums).zip(&scales) {
                    let scale = _mm512_mul_ps(scale, row_scale);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, *acc);
                }
            }
        }
    }
    let mut out = [[0f32; PANEL * NP]; MR];
    for (out, acc) in out.iter_mut().zip(&acc) {
        for (p, &acc) in acc.iter().enumerate() {
            // SAFETY: 16 values fit from `16p` in a row of 32.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(p * PANEL), acc) };
        }
    }
    out
}

/// The tile with AVX2: `vpmaddubsw` multiplies |q| by the weight carrying q's sign (pairs of
/// products stay within i16: 2 · 127 · 127), `vpmaddwd` sums the pairs into i32.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_avx2(tile: &Tile) -> TileSums {
    let blocks = tile.activations[0].1.len();
    let ones = _mm256_set1_epi16(1);
    let mut out = [[0f32; PANEL * NP]; MR];
    // One panel at a time: four rows × 16 columns keep the integer sums in 8 registers.
    for (p, panel) in tile.panels.iter().enumerate() {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for block in 0..blocks {
            // SAFETY: as in `tile_vnni`.
            unsafe {
                let mut sums = [[_mm256_setzero_si256(); 2]; MR];
                for g in 0..GROUPS {
                    let at = panel.quants.as_ptr().add((block * GROUPS + g) * PANEL * 4);
                    let weights = [0, 1].map(|h| _mm256_loadu_si256(at.add(32 * h).cast()));
                    for (sums, (quants, _)) in sums.iter_mut().zip(&tile.activations) {
                        let four = quants.as_ptr().add(block * BLOCK + 4 * g).cast::<i32>();
                        let four = _mm256_set1_epi32(four.read_unaligned());
                        let magnitude = _mm256_sign_epi8(four, four);
                        for (sum, &w) in sums.iter_mut().zip(&weights) {
                            let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w, four));
                            *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
                        }
                    }
                }
                for ((acc, sums), (_, row_scales)) in
                    acc.iter_mut().zip(&sums).zip(&tile.activations)
                {
                    let row_scale = _mm256_set1_ps(row_scales[block]);
                    for (h, (acc, &sum)) in acc.iter_mut().zip(sums).enumerate() {
                        let scale =
                            _mm256_loadu_ps(panel.scales.as_ptr().add(block * PANEL + 8 * h));
                        let scale = _mm256_mul_ps(scale, row_scale);
                        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, *acc);
                    }
                }
            }
        }
        for (out, acc) in out.iter_mut().zip(&acc) {
            for (h, &acc) in acc.iter().enumerate() {
                // SAFETY: 8 values fit from `16p + 8h` in a row of 32.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(p * PANEL + 8 * h), acc) };
            }
        }
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn tile_vnni(_: &Tile) -> TileSums {
    unreachable!("VNNI is x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn tile_avx2(_: &Tile) -> TileSums {
    unreachable!("AVX2 is x86-64 only")
}
