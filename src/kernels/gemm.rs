//! Single-threaded f32 matrix products on strided views, for kernels that parallelise over
//! their own work items (attention blocks, convolution tiles) instead of inside each product.

/// A read-only `rows × cols` matrix: element `(i, j)` is at `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Matrix<'a> {
    /// A row-major matrix whose rows are `row_stride` apart.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose, as a view of the same data.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// An output buffer shared by tasks that each write their own disjoint elements through it.
pub struct SharedOut(pub *mut f32);
// SAFETY: users write disjoint elements only (each `unsafe` write states which).
unsafe impl Sync for SharedOut {}

/// `dst = scale · lhs · rhs` (or `dst += ...` with `accumulate`), where `dst` is row-major
/// with rows `dst_row_stride` apart.
pub fn matmul(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: Matrix,
    rhs: Matrix,
    scale: f32,
    accumulate: bool,
) {
    if lhs.rows > 0 && rhs.cols > 0 {
        let needed = (lhs.rows - 1) * dst_row_stride + rhs.cols;
        assert!(needed <= dst.len(), "destination out of bounds");
    }
    // SAFETY: the destination was bounds-checked above and is exclusively borrowed.
    unsafe {
        matmul_raw(
            dst.as_mut_ptr(),
            dst_row_stride,
            lhs,
            rhs,
            scale,
            accumulate,
            1,
        )
    }
}

/// [`matmul`] into a raw destination, for tasks that write disjoint strided regions of one
/// buffer; `threads > 1` lets gemm split the product itself.
///
/// # Safety
/// `dst` must be valid for writes at `i * dst_row_stride + j` for every `i < lhs.rows`,
/// `j < rhs.cols`, and no other thread may access those elements during the call.
pub unsafe fn matmul_raw(
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: Matrix,
    rhs: Matrix,
    scale: f32,
    accumulate: bool,
    threads: usize,
) {
    assert_eq!(lhs.cols, rhs.rows, "inner dimensions differ");
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    if m == 0 || n == 0 {
        return;
    }
    lhs.check();
    rhs.check();
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                // SAFETY: the caller's contract covers these elements.
                unsafe { std::ptr::write_bytes(dst.add(row * dst_row_stride), 0, n) };
            }
        }
        return;
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `lhs`/`rhs` were bounds-checked above; `dst` is the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products_match_a_naive_loop() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k * 2).map(|i| (i as f32 * 0.7).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.3).cos()).collect();
        // lhs: every other column of a [m, 2k] buffer; rhs used transposed from [n, k].
        let lhs = Matrix {
            data: &a,
            rows: m,
            cols: k,
            row_stride: 2 * k,
            col_stride: 2,
        };
        let rhs = Matrix::rows(&b, n, k, k).t();
        let mut dst = vec![1f32; m * (n + 1)];
        matmul(&mut dst, n + 1, lhs, rhs, 0.5, true);
        for i in 0..m {
            for j in 0..n {
                let exact: f32 = (0..k).map(|p| a[i * 2 * k + 2 * p] * b[j * k + p]).sum();
                assert!((dst[i * (n + 1) + j] - (1.0 + 0.5 * exact)).abs() < 1e-5);
            }
            assert_eq!(dst[i * (n + 1) + n], 1.0, "padding column untouched");
        }
    }
}
