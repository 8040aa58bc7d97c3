//! Layer norm over the last dimension: one kernel forward, one backward that also gives the
//! weight and bias gradients (composed, about 10 candle ops forward and 55 backward).

use super::{output_buffer, same_dtype, slice, Real};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `(x - mean) / sqrt(var + eps) * weight + bias` per row (biased variance, as PyTorch).
struct LayerNorm {
    eps: f64,
}

/// The statistics of one row: mean and 1 / sqrt(var + eps), the variance in two passes.
fn row_stats<T: Real>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn layer_norm_fwd<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64) -> CpuStorage {
    let n = w.len();
    let mut y = output_buffer(x.len());
    y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(out, row)| {
        let (mean, rstd) = row_stats(row, eps);
        for i in 0..n {
            let h = (row[i].to_f64() - mean) * rstd;
            out[i] = T::of(h * w[i].to_f64() + b[i].to_f64());
        }
    });
    T::to_cpu_storage_owned(y)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm"
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
        same_dtype("layer_norm", s1, s2)?;
        same_dtype("layer_norm", s1, s3)?;
        fn go<T: Real>(s: [(&CpuStorage, &Layout); 3], eps: f64) -> Result<CpuStorage> {
            let [x, w, b] = s.map(|(s, l)| slice::<T>("layer_norm", s, l));
            Ok(layer_norm_fwd(x?, w?, b?, eps))
        }
        let out = by_dtype!("layer_norm", s1, go([(s1, l1), (s2, l2), (s3, l3)], self.eps))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = w.elem_count();
        let rows = x.elem_count() / n;
        // One kernel: rows 0..R hold dx, row R dweight, row R + 1 dbias.
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormBackward { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows, 1)?.reshape(w.shape())?;
        let db = packed.narrow(0, rows + 1, 1)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct LayerNormBackward {
    eps: f64,
}

fn layer_norm_bwd<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> CpuStorage {
    let n = w.len();
    let rows = x.len() / n;
    let mut out = output_buffer((rows + 2) * n);
    let (dx, params) = out.split_at_mut(rows * n);
    // dx per row; the weight and bias gradients are column sums, gathered per block of rows
    // and the blocks' sums added in order (the same bits for any number of threads).
    let block = super::ROWS_PER_BLOCK * n;
    let partial: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(g.par_chunks(block)))
        .map(|(dx, (x, g))| {
            let (mut dw, mut db) = (vec![0f64; n], vec![0f64; n]);
            for (dx, (row, grow)) in dx.chunks_mut(n).zip(x.chunks(n).zip(g.chunks(n))) {
                let (mean, rstd) = row_stats(row, eps);
                let (mut sum_gw, mut sum_gwh) = (0.0, 0.0);
                for i in 0..n {
                    let h = (row[i].to_f64() - mean) * rstd;
                    let gi = grow[i].to_f64();
                    let gw = gi * w[i].to_f64();
                    sum_gw += gw;
                    sum_gwh += gw * h;
                    dw[i] += gi * h;
                    db[i] += gi;
                }
                let (mean_gw, mean_gwh) = (sum_gw / n as f64, sum_gwh / n as f64);
                for i in 0..n {
                    let h = (row[i].to_f64() - mean) * rstd;
                    dx[i] = T::of(rstd * (grow[i].to_f64() * w[i].to_f64() - mean_gw - h * mean_gwh));
                }
            }
            (dw, db)
        })
        .collect();
    let (mut dw, mut db) = (vec![0f64; n], vec![0f64; n]);
    for (pw, pb) in partial {
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    for i in 0..n {
        params[i] = T::of(dw[i]);
        params[n + i] = T::of(db[i]);
    }
    T::to_cpu_storage_owned(out)
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer_norm_backward"
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
        same_dtype("layer_norm_backward", s1, s2)?;
        same_dtype("layer_norm_backward", s1, s3)?;
        fn go<T: Real>(s: [(&CpuStorage, &Layout); 3], eps: f64) -> Result<CpuStorage> {
            let [x, w, g] = s.map(|(s, l)| slice::<T>("layer_norm_backward", s, l));
            Ok(layer_norm_bwd(x?, w?, g?, eps))
        }
        let n = l2.shape().elem_count();
        let rows = l1.shape().elem_count() / n;
        let out = by_dtype!("layer_norm_backward", s1, go([(s1, l1), (s2, l2), (s3, l3)], self.eps))?;
        Ok((out, Shape::from((rows + 2, n))))
    }
}

/// Fused layer norm; the caller has checked shapes and dtypes and that [`applies`].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNorm { eps })
}

#[cfg(test)]
mod tests {
    use crate::runtime::fused::testing::{agree, relative};
    use crate::runtime::ops::{self, tests::grad_check, tests::randt};
    use candle_core::{DType, Tensor};

    #[test]
    fn layer_norm_gradients_match_finite_differences_and_the_composed_op() {
        let (x, w, b) = (randt(&[3, 5, 16], 1), (randt(&[16], 2) + 1.5).unwrap(), randt(&[16], 3));
        grad_check("fused layer_norm", &[x.clone(), w.clone(), b.clone()], |t| {
            super::layer_norm(&t[0], &t[1], &t[2], 1e-5)
        });
        agree(
            "layer_norm",
            &[(x * 3.0).unwrap(), w, b],
            |t| super::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            |t| ops::layer_norm_composed(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        );
    }

    #[test]
    fn layer_norm_is_stable_for_rows_far_from_zero() {
        // A one-pass E[x^2] - E[x]^2 loses every digit here; two passes do not.
        let x = (randt(&[4, 64], 5) + 1e4).unwrap();
        let (w, b) =
            (Tensor::ones(64, DType::F64, x.device()).unwrap(), Tensor::zeros(64, DType::F64, x.device()).unwrap());
        let fused = super::layer_norm(&x, &w, &b, 1e-5).unwrap();
        let composed = ops::layer_norm_composed(&x, &w, &b, 1e-5).unwrap();
        assert!(relative(&fused, &composed) < 1e-9, "{:e}", relative(&fused, &composed));
    }
}
