//! `x W^T` for a linear layer's weight W [out, in], read in place: one GEMM forward and, in
//! backward, one GEMM per input that needs a gradient. Composed, the same product took a
//! transpose view of W, a reshape of x to rows and one back, and backward transposed both
//! sides and copied W's gradient out of its transposed layout; a frozen W got none anyway.

use super::gemm::{gemm_into, Strided};
use super::{output_buffer, same_dtype, slice, Real};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Which product of two row-major operands, a [.., p] and b [q, r].
#[derive(Clone, Copy, Debug)]
enum Form {
    /// a [.., k] b[n, k]^T -> [.., n]: the forward.
    Nt,
    /// a [.., n] b [n, k] -> [.., k]: the input's gradient, g W.
    Nn,
    /// a [.., n]^T b [.., k] -> [n, k]: the weight's gradient, g^T x over all rows.
    Tn,
}

struct Gemm(Form);

impl Gemm {
    fn name(&self) -> &'static str {
        match self.0 {
            Form::Nt => "matmul_nt",
            Form::Nn => "matmul_nt_backward_input",
            Form::Tn => "matmul_nt_backward_weight",
        }
    }

    /// (m, n, k) of the product and the output's shape, or an error naming both shapes.
    fn dims(&self, a: &[usize], b: &[usize]) -> Result<((usize, usize, usize), Shape)> {
        let (lead, last) = match a.split_last() {
            Some((&last, lead)) if b.len() == 2 || matches!(self.0, Form::Tn) => (lead, last),
            _ => bail!("{}: operands {a:?} and {b:?}; expected [.., k] and [n, k]", self.name()),
        };
        let rows: usize = lead.iter().product();
        let with_last = |n: usize| Shape::from([lead, &[n]].concat());
        match self.0 {
            Form::Nt if b[1] == last => Ok(((rows, b[0], last), with_last(b[0]))),
            Form::Nn if b[0] == last => Ok(((rows, b[1], last), with_last(b[1]))),
            Form::Tn if b.split_last().is_some_and(|(_, l)| l.iter().product::<usize>() == rows) => {
                let k = *b.last().unwrap_or(&0);
                Ok(((last, k, rows), Shape::from((last, k))))
            }
            _ => bail!("{}: operands {a:?} and {b:?} do not fit", self.name()),
        }
    }
}

impl CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        Gemm::name(self)
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_dtype(self.name(), s1, s2)?;
        let ((m, n, k), shape) = self.dims(l1.dims(), l2.dims())?;
        let form = self.0;
        fn go<T: Real>(
            op: &Gemm,
            s: [(&CpuStorage, &Layout); 2],
            (m, n, k): (usize, usize, usize),
            form: Form,
        ) -> Result<CpuStorage> {
            let [a, b] = s.map(|(s, l)| slice::<T>(op.name(), s, l));
            let (a, b) = (a?, b?);
            let mut out = output_buffer(m * n);
            let (lhs, rhs) = match form {
                // a [m, k] as stored; b [n, k] read as its transpose [k, n].
                Form::Nt => (Strided { offset: 0, rs: k, cs: 1 }, Strided { offset: 0, rs: 1, cs: k }),
                // a [m, k], b [k, n], both as stored.
                Form::Nn => (Strided { offset: 0, rs: k, cs: 1 }, Strided { offset: 0, rs: n, cs: 1 }),
                // a is [k, m] stored (rows of g), read transposed; b [k, n] as stored.
                Form::Tn => (Strided { offset: 0, rs: 1, cs: m }, Strided { offset: 0, rs: n, cs: 1 }),
            };
            gemm_into((m, n, k), (&mut out, Strided { offset: 0, rs: n, cs: 1 }), (a, lhs), (b, rhs), true);
            Ok(T::to_cpu_storage_owned(out))
        }
        let out = by_dtype!(self.name(), s1, go(self, [(s1, l1), (s2, l2)], (m, n, k), form))?;
        Ok((out, shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !matches!(self.0, Form::Nt) {
            bail!("{}: no second-order gradient", self.name());
        }
        let g = g.contiguous()?;
        // Only the inputs on a path to a variable need theirs (a frozen weight's is skipped).
        let dx = x.track_op().then(|| g.apply_op2_no_bwd(w, &Gemm(Form::Nn))).transpose()?;
        let dw = w.track_op().then(|| g.apply_op2_no_bwd(x, &Gemm(Form::Tn))).transpose()?;
        Ok((dx, dw))
    }
}

/// Whether [`matmul_nt`] serves x and w: CPU floats of one type, fused ops on, both
/// contiguous, w a matrix.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    super::applies(x)
        && x.dtype() == w.dtype()
        && w.rank() == 2
        && x.rank() >= 1
        && x.is_contiguous()
        && w.is_contiguous()
}

/// `x W^T` for x [.., k] and W [n, k]: [.., n]. The caller has checked [`applies`].
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2(w, Gemm(Form::Nt))
}

#[cfg(test)]
mod tests {
    use crate::runtime::fused::testing::agree;
    use crate::runtime::ops::tests::{grad_check, randt};
    use candle_core::{DType, Var};

    #[test]
    fn matmul_nt_gradient_matches_finite_differences_and_the_composed_product() {
        let (x, w) = (randt(&[2, 3, 5], 61), randt(&[4, 5], 62));
        grad_check("fused matmul_nt", &[x.clone(), w.clone()], |t| super::matmul_nt(&t[0], &t[1]));
        grad_check("fused matmul_nt on rows", &[randt(&[3, 5], 63), w.clone()], |t| super::matmul_nt(&t[0], &t[1]));
        agree(
            "matmul_nt",
            &[x, w],
            |t| super::matmul_nt(&t[0], &t[1]).unwrap(),
            |t| t[0].broadcast_matmul(&t[1].t().unwrap()).unwrap(),
        );
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient_and_costs_no_gemm() {
        let x = Var::from_tensor(&randt(&[3, 5], 64).to_dtype(DType::F32).unwrap()).unwrap();
        let w = randt(&[4, 5], 65).to_dtype(DType::F32).unwrap();
        let grads = super::matmul_nt(x.as_tensor(), &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none());
        let dx: Vec<Vec<f32>> = grads.get(x.as_tensor()).unwrap().to_vec2().unwrap();
        let column_sums: Vec<f32> = (0..5)
            .map(|j| (0..4).map(|i| w.get(i).unwrap().get(j).unwrap().to_scalar::<f32>().unwrap()).sum())
            .collect();
        for row in dx {
            for (a, b) in row.iter().zip(&column_sums) {
                assert!((a - b).abs() < 1e-5, "{a} against {b}");
            }
        }
    }

    #[test]
    fn mismatched_shapes_and_dtypes_are_errors_naming_the_op() {
        let err = super::matmul_nt(&randt(&[3, 5], 1), &randt(&[4, 6], 2)).unwrap_err().to_string();
        assert!(err.contains("matmul_nt: operands [3, 5] and [4, 6] do not fit"), "{err}");
        let err = super::matmul_nt(&randt(&[3, 5], 1), &randt(&[4, 5], 2).to_dtype(DType::F32).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("matmul_nt: inputs of F64 and F32"), "{err}");
        let err = super::matmul_nt(&randt(&[3, 5], 1), &randt(&[2, 4, 5], 2)).unwrap_err().to_string();
        assert!(err.contains("matmul_nt: operands [3, 5] and [2, 4, 5]"), "{err}");
    }
}
