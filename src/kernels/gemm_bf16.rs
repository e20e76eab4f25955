//! Matrix products with bf16 operands and f32 accumulation, on CPUs with AVX-512-BF16.
//!
//! `vdpbf16ps` multiplies 32 bf16 pairs and adds them into 16 f32 lanes: twice the products of
//! an f32 FMA per instruction, from half the memory. The right-hand side (a layer's weight) is
//! packed once per call into panels of [`NR`] columns whose rows come in interleaved pairs
//! (row 2p and 2p + 1 of a column side by side, the instruction's operand layout), and each
//! [`MR`]-row strip of the left-hand side into broadcastable pairs. Operands are given as f32
//! views and rounded to bf16 when packed: exact for tensors that are bf16 already, which is
//! the only use (`--dtype bf16`). Single-threaded: callers parallelise over their own blocks.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::gemm::Matrix;

/// Rows of the output tile one kernel call computes (one broadcast pair each).
const MR: usize = 8;
/// Columns of the output tile: two vectors of 16 f32.
const NR: usize = 32;
/// Row pairs of the inner dimension per block (the packed panel of one block is
/// `KP · NR · 2` bf16 = 16 KiB, kept in L1 while the strips go by).
const KP: usize = 128;

/// Whether this CPU has the instructions (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn to_bf16(value: f32) -> u16 {
    half::bf16::from_f32(value).to_bits()
}

/// A right-hand side `k × n` rounded to bf16 and packed for [`matmul`].
pub struct PackedRhs {
    data: Vec<u16>,
    k: usize,
    n: usize,
}

impl PackedRhs {
    /// Layout: blocks of `KP` row pairs; in each block, panels of `NR` columns; in each panel,
    /// row pair by row pair, column by column, the two rows' values side by side (zero past
    /// the matrix's edges).
    pub fn new(rhs: Matrix) -> Self {
        let (k, n) = (rhs.rows, rhs.cols);
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u16; pairs * panels * NR * 2];
        let at = |row: usize, col: usize| rhs.data[row * rhs.row_stride + col * rhs.col_stride];
        for block_start in (0..pairs).step_by(KP) {
            let block_pairs = KP.min(pairs - block_start);
            for panel in 0..panels {
                let offset = (block_start * panels + panel * block_pairs) * NR * 2;
                let cols = NR.min(n - panel * NR);
                for p in 0..block_pairs {
                    let row = 2 * (block_start + p);
                    let dst = &mut data[offset + p * NR * 2..offset + (p + 1) * NR * 2];
                    for c in 0..cols {
                        let col = panel * NR + c;
                        dst[2 * c] = to_bf16(at(row, col));
                        if row + 1 < k {
                            dst[2 * c + 1] = to_bf16(at(row + 1, col));
                        }
                    }
                }
            }
        }
        Self { data, k, n }
    }

    fn panel(&self, block_start: usize, block_pairs: usize, panel: usize) -> &[u16] {
        let panels = self.n.div_ceil(NR);
        let offset = (block_start * panels + panel * block_pairs) * NR * 2;
        &self.data[offset..offset + block_pairs * NR * 2]
    }
}

/// `dst = scale · lhs · rhs` (or `dst += ...` with `accumulate`), `dst` row-major with rows
/// `dst_row_stride` apart. Panics if [`available`] is false.
pub fn matmul(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: Matrix,
    rhs: &PackedRhs,
    scale: f32,
    accumulate: bool,
) {
    assert!(available(), "this CPU has no AVX-512-BF16");
    assert_eq!(lhs.cols, rhs.k, "inner dimensions differ");
    let (m, n) = (lhs.rows, rhs.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_row_stride + n <= dst.len(),
        "destination out of bounds"
    );
    let pairs = rhs.k.div_ceil(2);
    if pairs == 0 {
        if !accumulate {
            dst.chunks_mut(dst_row_stride)
                .take(m)
                .for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    let strips = m.div_ceil(MR);
    let mut strip_pairs = vec![0u32; strips * KP * MR];
    let at = |row: usize, col: usize| lhs.data[row * lhs.row_stride + col * lhs.col_stride];
    for block_start in (0..pairs).step_by(KP) {
        let block_pairs = KP.min(pairs - block_start);
        // The block's strips: for each pair of columns, MR rows' (even, odd) values.
        for strip in 0..strips {
            let packed = &mut strip_pairs[strip * KP * MR..][..block_pairs * MR];
            for (p, row_pairs) in packed.chunks_exact_mut(MR).enumerate() {
                let col = 2 * (block_start + p);
                for (r, pair) in row_pairs.iter_mut().enumerate() {
                    let row = strip * MR + r;
                    *pair = if row < m {
                        let odd = if col + 1 < rhs.k {
                            at(row, col + 1)
                        } else {
                            0.0
                        };
                        u32::from(to_bf16(at(row, col))) | u32::from(to_bf16(odd)) << 16
                    } else {
                        0
                    };
                }
            }
        }
        let add = accumulate || block_start > 0;
        for panel in 0..n.div_ceil(NR) {
            let b = rhs.panel(block_start, block_pairs, panel);
            let cols = NR.min(n - panel * NR);
            for strip in 0..strips {
                let rows = MR.min(m - strip * MR);
                let a = &strip_pairs[strip * KP * MR..][..block_pairs * MR];
                let tile = &mut dst[strip * MR * dst_row_stride + panel * NR..];
                // SAFETY: the CPU has the instructions (asserted above); `a` and `b` hold
                // `block_pairs` pairs; the tile's `rows × cols` elements are inside `dst`
                // (bounds checked above).
                unsafe {
                    kernel(
                        a,
                        b,
                        block_pairs,
                        tile,
                        dst_row_stride,
                        rows,
                        cols,
                        scale,
                        add,
                    )
                };
            }
        }
    }
}

/// One `MR × NR` tile: `tile = (add ? tile : 0) + scale · a · b` over `pairs` row pairs,
/// stored to its first `rows × cols` elements.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(
    a: &[u32],
    b: &[u16],
    pairs: usize,
    tile: &mut [f32],
    row_stride: usize,
    rows: usize,
    cols: usize,
    scale: f32,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..pairs {
        // SAFETY: `b` holds `pairs · NR · 2` values, `a` holds `pairs · MR`.
        let (b0, b1) = unsafe {
            let at = b.as_ptr().add(p * NR * 2);
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(at.cast())),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(at.add(32).cast())),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = _mm512_set1_epi32(a[p * MR + r] as i32);
            let pair = unsafe { std::mem::transmute::<__m512i, __m512bh>(pair) };
            acc[0] = _mm512_dpbf16_ps(acc[0], pair, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], pair, b1);
        }
    }
    let scale = _mm512_set1_ps(scale);
    let masks = [0, 16].map(|first| {
        let lanes = cols.saturating_sub(first).min(16);
        ((1u32 << lanes) - 1) as __mmask16
    });
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for (half, (&sum, &mask)) in acc.iter().zip(&masks).enumerate() {
            if mask == 0 {
                continue;
            }
            // SAFETY: the masked lanes are the tile's columns `16·half ..` of row r, inside
            // `tile` (caller's contract).
            unsafe {
                let at = tile.as_mut_ptr().add(r * row_stride + 16 * half);
                let base = if add {
                    _mm512_maskz_loadu_ps(mask, at)
                } else {
                    _mm512_setzero_ps()
                };
                _mm512_mask_storeu_ps(at, mask, _mm512_fmadd_ps(scale, sum, base));
            }
        }
    }
}

/// Never called: [`available`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    _: &[u32],
    _: &[u16],
    _: usize,
    _: &mut [f32],
    _: usize,
    _: usize,
    _: usize,
    _: f32,
    _: bool,
) {
    unreachable!("bf16 products need AVX-512-BF16")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(value: f32) -> f32 {
        half::bf16::from_f32(value).to_f32()
    }

    /// Products of bf16-rounded operands equal an f64 product of the same values to f32
    /// accumulation error, for edge sizes in every dimension (odd k, partial tiles and
    /// panels, more than one block of k) and strided or transposed views.
    #[test]
    fn products_match_the_rounded_operands() {
        if !available() {
            eprintln!("skipped: no AVX-512-BF16 on this CPU");
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (9, 7, 33),
            (16, 300, 64),
            (3, 257, 5),
            (20, 64, 31),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            // rhs given transposed: a weight `[n, k]` used as `k × n`.
            let lhs = Matrix::rows(&a, m, k, k);
            let rhs = PackedRhs::new(Matrix::rows(&b, n, k, k).t());
            let stride = n + 3;
            let mut dst = vec![1f32; m * stride];
            matmul(&mut dst, stride, lhs, &rhs, 0.5, true);
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|p| round(a[i * k + p]) as f64 * round(b[j * k + p]) as f64)
                        .sum();
                    let want = 1.0 + 0.5 * exact;
                    let got = dst[i * stride + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-5 * (k as f64).sqrt() * (1.0 + want.abs()),
                        "({m}, {k}, {n}) at ({i}, {j}): {got} vs {want}"
                    );
                }
                assert!(dst[i * stride + n..(i + 1) * stride]
                    .iter()
                    .all(|&v| v == 1.0));
            }
            let mut fresh = vec![7f32; m * n];
            matmul(&mut fresh, n, lhs, &rhs, 1.0, false);
            let expected = (0..k)
                .map(|p| round(a[p]) as f64 * round(b[p]) as f64)
                .sum::<f64>();
            assert!((fresh[0] as f64 - expected).abs() < 1e-4, "overwrite");
        }
    }
}
