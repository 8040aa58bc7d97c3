//! Softmaxes over the last dimension: attention's scaled (and optionally causal) softmax, and
//! log-softmax; each one kernel forward and one backward, max-subtracted.

use super::{output_buffer, same_dtype, slice, Real};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `softmax(scale * x)` over the last dimension; with `causal`, key j of query row i is kept
/// only for j <= i + (Lk - Lq); with `padding` ([B, Lk], 0 for a padded key, as values in
/// batch-row order), padded keys of batch row b are dropped. Dropped keys get probability 0
/// and no mask tensor is built; a row with every key dropped is all zeros.
struct ScaledSoftmax {
    scale: f64,
    causal: bool,
    padding: Option<Vec<u32>>,
}

impl ScaledSoftmax {
    /// Keys row `r` of a [.., Lq, Lk] input may attend to: a prefix of the row (causal).
    fn keys(&self, r: usize, lq: usize, lk: usize) -> usize {
        if self.causal {
            ((r % lq) + lk.saturating_sub(lq) + 1).min(lk)
        } else {
            lk
        }
    }

    /// The padding flags of row `r`'s batch row, `rows_per_batch` rows per batch row.
    fn padding_of(&self, r: usize, rows_per_batch: usize, lk: usize) -> Option<&[u32]> {
        let b = r / rows_per_batch.max(1);
        self.padding.as_ref().map(|p| &p[b * lk..(b + 1) * lk])
    }
}

fn softmax_fwd<T: Real>(op: &ScaledSoftmax, x: &[T], (rows_per_batch, lq, lk): (usize, usize, usize)) -> CpuStorage {
    let mut y = output_buffer(x.len());
    let scale = T::of(op.scale);
    y.par_chunks_mut(lk).zip(x.par_chunks(lk)).enumerate().for_each(|(r, (out, row))| {
        let keep = op.keys(r, lq, lk);
        let padding = op.padding_of(r, rows_per_batch, lk);
        let attends = |j: usize| padding.is_none_or(|p| p[j] != 0);
        let max = (0..keep).filter(|&j| attends(j)).fold(T::of(f64::NEG_INFINITY), |m, j| Real::max(m, row[j] * scale));
        // Every key's exp first (one loop the compiler vectorises), then the keys past the
        // causal limit or padded out set to 0, before the sum sees them.
        out.iter_mut().zip(row).for_each(|(o, &v)| *o = (v * scale - max).exp());
        out[keep..].iter_mut().for_each(|o| *o = T::of(0.0));
        if let Some(p) = padding {
            out.iter_mut().zip(p).filter(|(_, &p)| p == 0).for_each(|(o, _)| *o = T::of(0.0));
        }
        let sum = out[..keep].iter().fold(T::of(0.0), |s, &e| s + e);
        if sum > T::of(0.0) {
            out[..keep].iter_mut().for_each(|o| *o /= sum);
        } else {
            // No key attends (a fully padded row): all zeros, never 0/0.
            out.iter_mut().for_each(|o| *o = T::of(0.0));
        }
    });
    T::to_cpu_storage_owned(y)
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled_softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: Real>(op: &ScaledSoftmax, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            let dims = l.dims();
            let (lq, lk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
            let rows_per_batch = dims[1..dims.len() - 1].iter().product();
            Ok(softmax_fwd(op, slice::<T>("scaled_softmax", s, l)?, (rows_per_batch, lq, lk)))
        }
        let out = by_dtype!("scaled_softmax", s, go(self, s, l))?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBackward { scale: self.scale })?))
    }
}

/// dx = scale * y * (g - sum_j g_j y_j), row by row; masked keys (y = 0) get 0.
struct SoftmaxBackward {
    scale: f64,
}

fn softmax_bwd<T: Real>(y: &[T], g: &[T], lk: usize, scale: f64) -> CpuStorage {
    let mut dx = output_buffer(y.len());
    dx.par_chunks_mut(lk).zip(y.par_chunks(lk).zip(g.par_chunks(lk))).for_each(|(dx, (y, g))| {
        let dot: f64 = y.iter().zip(g).map(|(y, g)| y.to_f64() * g.to_f64()).sum();
        for j in 0..lk {
            dx[j] = T::of(scale * y[j].to_f64() * (g[j].to_f64() - dot));
        }
    });
    T::to_cpu_storage_owned(dx)
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "scaled_softmax_backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_dtype("scaled_softmax_backward", s1, s2)?;
        fn go<T: Real>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, scale: f64) -> Result<CpuStorage> {
            let lk = l1.dims()[l1.dims().len() - 1];
            let (y, g) =
                (slice::<T>("scaled_softmax_backward", s1, l1)?, slice::<T>("scaled_softmax_backward", s2, l2)?);
            Ok(softmax_bwd(y, g, lk, scale))
        }
        let out = by_dtype!("scaled_softmax_backward", s1, go(s1, l1, s2, l2, self.scale))?;
        Ok((out, l1.shape().clone()))
    }
}

/// Fused `softmax(scale * x)` over the last dimension of a tensor of rank >= 2, causal if
/// asked; the caller has checked that [`applies`].
pub fn scaled_softmax(x: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    if x.rank() < 2 {
        bail!("scaled_softmax: expected a tensor of rank >= 2, got {:?}", x.dims());
    }
    x.contiguous()?.apply_op1(ScaledSoftmax { scale, causal, padding: None })
}

/// [`scaled_softmax`] of attention scores [B, .., Lq, Lk], with a key padding mask [B, Lk]
/// (1: attend, 0: padded) applied inside the kernel.
pub fn masked_softmax(x: &Tensor, scale: f64, causal: bool, padding: Option<&Tensor>) -> Result<Tensor> {
    if x.rank() < 3 {
        bail!("masked_softmax: expected scores of rank >= 3, got {:?}", x.dims());
    }
    let padding = match padding {
        None => None,
        Some(m) => {
            let (b, lk) = (x.dims()[0], x.dims()[x.rank() - 1]);
            if m.dims() != [b, lk] {
                bail!("attention: key padding mask is {:?}, expected [{b}, {lk}]", m.dims());
            }
            Some(m.to_dtype(candle_core::DType::U32)?.flatten_all()?.to_vec1::<u32>()?)
        }
    };
    x.contiguous()?.apply_op1(ScaledSoftmax { scale, causal, padding })
}

// ---------------------------------------------------------------------------------------
// Log-softmax over the last dimension.

/// `x - max - ln(sum exp(x - max))` per row.
struct LogSoftmax;

fn log_softmax_fwd<T: Real>(x: &[T], n: usize) -> CpuStorage {
    let mut y = output_buffer(x.len());
    y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(out, row)| {
        let max = row.iter().fold(T::of(f64::NEG_INFINITY), |m, &v| Real::max(m, v));
        let sum = row.iter().fold(T::of(0.0), |s, &v| s + (v - max).exp());
        let shift = max + sum.ln();
        out.iter_mut().zip(row).for_each(|(o, &v)| *o = v - shift);
    });
    T::to_cpu_storage_owned(y)
}

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "log_softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: Real>(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            let n = l.dims().last().copied().unwrap_or(1).max(1);
            Ok(log_softmax_fwd(slice::<T>("log_softmax", s, l)?, n))
        }
        Ok((by_dtype!("log_softmax", s, go(s, l))?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &LogSoftmaxBackward)?))
    }
}

/// dx = g - exp(y) * sum_j g_j, row by row.
struct LogSoftmaxBackward;

impl CustomOp2 for LogSoftmaxBackward {
    fn name(&self) -> &'static str {
        "log_softmax_backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_dtype("log_softmax_backward", s1, s2)?;
        fn go<T: Real>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<CpuStorage> {
            let n = l1.dims().last().copied().unwrap_or(1).max(1);
            let (y, g) = (slice::<T>("log_softmax_backward", s1, l1)?, slice::<T>("log_softmax_backward", s2, l2)?);
            let mut dx = output_buffer(y.len());
            dx.par_chunks_mut(n).zip(y.par_chunks(n).zip(g.par_chunks(n))).for_each(|(dx, (y, g))| {
                let total = g.iter().fold(T::of(0.0), |s, &v| s + v);
                dx.iter_mut().zip(y).zip(g).for_each(|((dx, &y), &g)| *dx = g - y.exp() * total);
            });
            Ok(T::to_cpu_storage_owned(dx))
        }
        Ok((by_dtype!("log_softmax_backward", s1, go(s1, l1, s2, l2))?, l1.shape().clone()))
    }
}

/// Fused log-softmax over the last dimension of a tensor of rank >= 1; the caller has
/// checked that [`applies`](super::applies).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        bail!("log_softmax: expected a tensor of rank >= 1, got a scalar");
    }
    x.contiguous()?.apply_op1(LogSoftmax)
}

#[cfg(test)]
mod tests {
    use crate::runtime::fused::testing::agree;
    use crate::runtime::ops::{self, tests::grad_check, tests::randt};
    use candle_core::Tensor;

    #[test]
    fn scaled_softmax_gradients_match_finite_differences_and_the_composed_op() {
        for causal in [false, true] {
            // Lk > Lq: the causal window is aligned to the end.
            let x = randt(&[2, 3, 4, 6], 11);
            grad_check("fused scaled_softmax", std::slice::from_ref(&x), |t| super::scaled_softmax(&t[0], 0.7, causal));
            let composed = |t: &[Tensor]| {
                let (lq, lk) = (4, 6);
                let mask: Vec<f32> =
                    (0..lq).flat_map(|i| (0..lk).map(move |j| if causal && j > i + 2 { -1e30 } else { 0.0 })).collect();
                let mask = Tensor::from_vec(mask, (lq, lk), t[0].device()).unwrap();
                ops::softmax(&t[0].affine(0.7, 0.0).unwrap().broadcast_add(&mask).unwrap(), 3).unwrap()
            };
            agree(
                "scaled_softmax",
                &[(x * 4.0).unwrap()],
                |t| super::scaled_softmax(&t[0], 0.7, causal).unwrap(),
                composed,
            );
        }
    }

    #[test]
    fn attention_through_the_fused_softmax_matches_the_composed_attention() {
        let (q, k, v) = (randt(&[2, 2, 5, 4], 21), randt(&[2, 2, 5, 4], 22), randt(&[2, 2, 5, 4], 23));
        let pad = Tensor::from_vec(vec![1u32, 1, 1, 0, 0, 1, 1, 1, 1, 1], (2, 5), q.device()).unwrap();
        for causal in [false, true] {
            agree(
                "attention",
                &[q.clone(), k.clone(), v.clone()],
                |t| ops::attention(&t[0], &t[1], &t[2], causal, Some(&pad), 0.5).unwrap(),
                |t| {
                    let scores = ops::matmul(&t[0], &t[1].t().unwrap()).unwrap();
                    let p = ops::attention_probabilities_composed(&scores, causal, Some(&pad), 0.5).unwrap();
                    ops::matmul(&p, &t[2]).unwrap()
                },
            );
        }
    }

    #[test]
    fn log_softmax_gradient_matches_finite_differences_and_the_composed_op() {
        let x = randt(&[3, 4, 7], 13);
        grad_check("fused log_softmax", std::slice::from_ref(&x), |t| super::log_softmax(&t[0]));
        // Rows far apart in scale: the max-subtraction keeps exp from overflowing.
        let wide = (randt(&[5, 9], 14) * 40.0).unwrap();
        agree(
            "log_softmax",
            &[wide],
            |t| super::log_softmax(&t[0]).unwrap(),
            |t| ops::log_softmax_composed(&t[0], 1).unwrap(),
        );
    }
}
