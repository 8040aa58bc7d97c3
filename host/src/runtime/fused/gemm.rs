//! One GEMM over strided matrices in slices, for the kernels that address their operands
//! in place (attention's heads, a linear layer's transposed weight) instead of copying them
//! into candle's layouts first.

use super::Real;

/// A strided matrix inside a slice: element (i, j) at `offset + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(super) struct Strided {
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Strided {
    /// The largest index a `rows` x `cols` matrix reads, for the bounds check.
    fn last(&self, rows: usize, cols: usize) -> usize {
        self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs
    }
}

/// `dst = lhs (m x k) rhs (k x n)`; `parallel` lets gemm split it over rayon's threads
/// (attention parallelises over its many small matrices instead).
pub(super) fn gemm_into<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: (&mut [T], Strided),
    lhs: (&[T], Strided),
    rhs: (&[T], Strided),
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let ((dst, d), (a, ls), (b, rs)) = (dst, lhs, rhs);
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                dst[d.offset + i * d.rs + j * d.cs] = T::of(0.0);
            }
        }
        return;
    }
    assert!(d.last(m, n) < dst.len() && ls.last(m, k) < a.len() && rs.last(k, n) < b.len(), "gemm_into bounds");
    // SAFETY: the assert above keeps every element the three strided matrices address inside
    // its slice; `dst` is borrowed mutably, so nothing else reads or writes it meanwhile, and
    // it does not overlap the inputs (distinct borrows). gemm reads lhs and rhs only.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(d.offset),
            d.cs as isize,
            d.rs as isize,
            false,
            a.as_ptr().add(ls.offset),
            ls.cs as isize,
            ls.rs as isize,
            b.as_ptr().add(rs.offset),
            rs.cs as isize,
            rs.rs as isize,
            T::of(0.0),
            T::of(1.0),
            false,
            false,
            false,
            match parallel.then(candle_core::utils::get_num_threads) {
                Some(n) if n > 1 => gemm::Parallelism::Rayon(n),
                _ => gemm::Parallelism::None,
            },
        );
    }
}
