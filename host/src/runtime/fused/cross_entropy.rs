//! Mean cross-entropy of logits [N, C] against class indices [N] (CLIP's loss and CKC's
//! InfoNCE): one kernel forward and one backward, where the composed loss is a log-softmax,
//! a gather, a negation and a mean, each with its own backward.

use super::{output_buffer, slice, Real};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `mean_i (logsumexp(x_i) - x_i[label_i])`.
struct CrossEntropy;

/// The labels as indices, each checked against the number of classes.
fn labels<'a>(op: &str, s: &'a CpuStorage, l: &Layout, classes: usize) -> Result<&'a [u32]> {
    let labels = slice::<u32>(op, s, l)?;
    if let Some((row, &bad)) = labels.iter().enumerate().find(|(_, &c)| c as usize >= classes) {
        bail!("{op}: label {bad} of row {row} is out of range for {classes} classes");
    }
    Ok(labels)
}

/// Max and log-sum-exp of one row.
fn max_and_lse<T: Real>(row: &[T]) -> (T, T) {
    let max = row.iter().fold(T::of(f64::NEG_INFINITY), |m, &v| Real::max(m, v));
    let sum = row.iter().fold(T::of(0.0), |s, &v| s + (v - max).exp());
    (max, max + sum.ln())
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: Real>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<CpuStorage> {
            let classes = l1.dims()[1];
            let x = slice::<T>("cross_entropy", s1, l1)?;
            let labels = labels("cross_entropy", s2, l2, classes)?;
            let total: f64 = x
                .par_chunks(classes)
                .zip(labels.par_iter())
                .map(|(row, &c)| (max_and_lse(row).1 - row[c as usize]).to_f64())
                .sum();
            Ok(T::to_cpu_storage_owned(vec![T::of(total / labels.len() as f64)]))
        }
        Ok((by_dtype!("cross_entropy", s1, go(s1, l1, s2, l2))?, Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, labels: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The loss's gradient is read inside the kernel: no host read, no device sync.
        Ok((Some(x.apply_op3_no_bwd(labels, &g.contiguous()?, &CrossEntropyBackward)?), None))
    }
}

/// dx_i = g / N (softmax(x_i) - onehot(label_i)).
struct CrossEntropyBackward;

impl CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross_entropy_backward"
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
        fn go<T: Real>(s: [(&CpuStorage, &Layout); 3]) -> Result<CpuStorage> {
            let [(s1, l1), (s2, l2), (s3, l3)] = s;
            let classes = l1.dims()[1];
            let x = slice::<T>("cross_entropy_backward", s1, l1)?;
            let labels = labels("cross_entropy_backward", s2, l2, classes)?;
            let g = slice::<T>("cross_entropy_backward", s3, l3)?[0] / T::of(labels.len() as f64);
            let mut dx = output_buffer(x.len());
            dx.par_chunks_mut(classes).zip(x.par_chunks(classes).zip(labels.par_iter())).for_each(|(dx, (row, &c))| {
                let (_, lse) = max_and_lse(row);
                dx.iter_mut().zip(row).for_each(|(dx, &v)| *dx = g * (v - lse).exp());
                dx[c as usize] -= g;
            });
            Ok(T::to_cpu_storage_owned(dx))
        }
        Ok((by_dtype!("cross_entropy_backward", s1, go([(s1, l1), (s2, l2), (s3, l3)]))?, l1.shape().clone()))
    }
}

/// Fused mean cross-entropy of `logits` [N, C] (f32 or f64, on the CPU) against u32
/// `labels` [N]; the caller has checked that [`applies`](super::applies).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (n, _) = match logits.dims() {
        [n, c] if *n > 0 && *c > 0 => (*n, *c),
        other => bail!("cross_entropy: logits are {other:?}; expected [N, C] with N, C > 0"),
    };
    if labels.dims() != [n] || labels.dtype() != DType::U32 {
        bail!(
            "cross_entropy: labels are {:?} of {:?} for logits {:?}; expected [{n}] of U32",
            labels.dims(),
            labels.dtype(),
            logits.dims()
        );
    }
    logits.contiguous()?.apply_op2(&labels.contiguous()?, CrossEntropy)
}

#[cfg(test)]
mod tests {
    use crate::runtime::fused::testing::agree;
    use crate::runtime::ops::{self, tests::grad_check, tests::randt};
    use candle_core::{Device, Tensor};

    fn labels(v: &[u32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences_and_the_composed_loss() {
        let y = labels(&[2, 0, 4, 4]);
        let x = (randt(&[4, 5], 61) * 6.0).unwrap();
        grad_check("fused cross_entropy", std::slice::from_ref(&x), |t| super::cross_entropy(&t[0], &y));
        // Transposed logits (CLIP's text->image direction) are a view: copied, then fused.
        grad_check("fused cross_entropy, transposed", &[randt(&[5, 4], 62)], |t| super::cross_entropy(&t[0].t()?, &y));
        agree(
            "cross_entropy",
            &[x, y],
            |t| super::cross_entropy(&t[0], &t[1]).unwrap(),
            |t| ops::cross_entropy_composed(&t[0], &t[1]).unwrap(),
        );
    }

    #[test]
    fn bad_labels_and_shapes_are_errors_naming_the_op() {
        let x = randt(&[3, 4], 63);
        let err = super::cross_entropy(&x, &labels(&[0, 4, 1])).unwrap_err().to_string();
        assert!(err.contains("cross_entropy: label 4 of row 1 is out of range for 4 classes"), "{err}");
        let err = super::cross_entropy(&x, &labels(&[0, 1])).unwrap_err().to_string();
        assert!(err.contains("labels are [2] of U32 for logits [3, 4]; expected [3] of U32"), "{err}");
        let err = super::cross_entropy(&randt(&[2, 3, 4], 1), &labels(&[0, 1])).unwrap_err().to_string();
        assert!(err.contains("cross_entropy: logits are [2, 3, 4]; expected [N, C]"), "{err}");
    }
}
