//! A bias added over the last dimension, the second half of a linear layer: one kernel
//! forward; backward hands the gradient through and sums its columns for the bias (candle's
//! broadcast add reduces over the leading dimensions with a strided walk per column).

use super::{column_sums, output_buffer, same_dtype, slice, Real};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `y + b` with b: [n] broadcast over y's rows.
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias_add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_dtype("bias_add", s1, s2)?;
        fn go<T: Real>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<CpuStorage> {
            let (y, b) = (slice::<T>("bias_add", s1, l1)?, slice::<T>("bias_add", s2, l2)?);
            let mut out = y.to_vec();
            out.par_chunks_mut(b.len()).for_each(|row| row.iter_mut().zip(b).for_each(|(o, &b)| *o += b));
            Ok(T::to_cpu_storage_owned(out))
        }
        Ok((by_dtype!("bias_add", s1, go(s1, l1, s2, l2))?, l1.shape().clone()))
    }

    fn bwd(&self, _y: &Tensor, b: &Tensor, _out: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = g.contiguous()?.apply_op1_no_bwd(&ColumnSum { n: b.elem_count() })?;
        Ok((Some(g.clone()), Some(db)))
    }
}

/// The sums of the columns of a [rows, n] view of the input -> [n].
struct ColumnSum {
    n: usize,
}

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column_sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: Real>(s: &CpuStorage, l: &Layout, n: usize) -> Result<CpuStorage> {
            let sums = column_sums(slice::<T>("column_sum", s, l)?, n);
            Ok(T::to_cpu_storage_owned(sums.into_iter().map(T::of).collect()))
        }
        Ok((by_dtype!("column_sum", s, go(s, l, self.n))?, Shape::from(self.n)))
    }
}

/// `y + b + d`: a linear layer's output, its bias [n] and one adapter's delta (y's shape).
struct BiasDeltaAdd;

impl CustomOp3 for BiasDeltaAdd {
    fn name(&self) -> &'static str {
        "bias_delta_add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype("bias_delta_add", s1, s2)?;
        same_dtype("bias_delta_add", s1, s3)?;
        fn go<T: Real>(s: [(&CpuStorage, &Layout); 3]) -> Result<CpuStorage> {
            let [y, b, d] = s.map(|(s, l)| slice::<T>("bias_delta_add", s, l));
            let (y, b, d) = (y?, b?, d?);
            let n = b.len();
            let mut out = output_buffer(y.len());
            out.par_chunks_mut(n).zip(y.par_chunks(n).zip(d.par_chunks(n))).for_each(|(o, (y, d))| {
                for j in 0..n {
                    o[j] = y[j] + b[j] + d[j];
                }
            });
            Ok(T::to_cpu_storage_owned(out))
        }
        Ok((by_dtype!("bias_delta_add", s1, go([(s1, l1), (s2, l2), (s3, l3)]))?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _d: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let db = g.apply_op1_no_bwd(&ColumnSum { n: b.elem_count() })?;
        Ok((Some(g.clone()), Some(db), Some(g)))
    }
}

/// Fused `y + b + d` with b: [n] over y's last dimension and d of y's shape; the caller has
/// checked that [`applies`](super::applies).
pub fn bias_delta_add(y: &Tensor, b: &Tensor, d: &Tensor) -> Result<Tensor> {
    let n = y.dims().last().copied().unwrap_or(0);
    if b.dims() != [n] || n == 0 || d.dims() != y.dims() {
        bail!(
            "bias_delta_add: y is {:?}, bias {:?} and delta {:?}; the bias must be [{n}] and the delta y's shape",
            y.dims(),
            b.dims(),
            d.dims()
        );
    }
    y.contiguous()?.apply_op3(&b.contiguous()?, &d.contiguous()?, BiasDeltaAdd)
}

/// Fused `y + b` over the last dimension; the caller has checked that
/// [`applies`](super::applies).
pub fn bias_add(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = y.dims().last().copied().unwrap_or(0);
    if b.dims() != [n] || n == 0 {
        bail!(
            "bias_add: y is {:?} and bias {:?}; the bias must be [{n}], the size of y's last dimension",
            y.dims(),
            b.dims()
        );
    }
    y.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
}

#[cfg(test)]
mod tests {
    use crate::runtime::fused::testing::agree;
    use crate::runtime::ops::tests::{grad_check, randt};

    #[test]
    fn bias_add_gradient_matches_finite_differences_and_the_broadcast_add() {
        let (y, b) = (randt(&[3, 4, 6], 51), randt(&[6], 52));
        grad_check("fused bias_add", &[y.clone(), b.clone()], |t| super::bias_add(&t[0], &t[1]));
        agree("bias_add", &[y, b], |t| super::bias_add(&t[0], &t[1]).unwrap(), |t| t[0].broadcast_add(&t[1]).unwrap());
    }

    #[test]
    fn bias_delta_add_gradient_matches_finite_differences_and_two_adds() {
        let (y, b, d) = (randt(&[3, 4, 6], 53), randt(&[6], 54), randt(&[3, 4, 6], 55));
        grad_check("fused bias_delta_add", &[y.clone(), b.clone(), d.clone()], |t| {
            super::bias_delta_add(&t[0], &t[1], &t[2])
        });
        agree(
            "bias_delta_add",
            &[y, b, d],
            |t| super::bias_delta_add(&t[0], &t[1], &t[2]).unwrap(),
            |t| t[0].broadcast_add(&t[1]).unwrap().add(&t[2]).unwrap(),
        );
        let err = super::bias_delta_add(&randt(&[2, 5], 1), &randt(&[5], 2), &randt(&[2, 4], 3)).unwrap_err();
        assert!(err.to_string().contains("delta [2, 4]; the bias must be [5] and the delta y's shape"), "{err}");
    }

    #[test]
    fn a_bias_of_the_wrong_size_is_an_error_naming_both_shapes() {
        let err = super::bias_add(&randt(&[2, 5], 1), &randt(&[4], 2)).unwrap_err().to_string();
        assert!(err.contains("bias_add: y is [2, 5] and bias [4]; the bias must be [5]"), "{err}");
    }
}
