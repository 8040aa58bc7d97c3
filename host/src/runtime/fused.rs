//! Fused host ops: one kernel forward and one backward where the composed versions in
//! [`super::ops`] issue many candle ops (layer norm: about 10 forward and 55 backward).
//!
//! Each is a candle custom op with an analytic backward, so it joins the one autograd graph
//! like any primitive. The CPU kernels run rows in parallel (rayon) in f32 or f64 with a
//! two-pass variance and a max-subtracted softmax. Other dtypes and devices use the composed
//! version (the public functions in [`super::ops`] choose), so every caller gets the same
//! function either way; tests check both agree and check each backward by finite differences.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The float types the CPU kernels are written for.
pub(crate) trait Real:
    candle_core::WithDType + Copy + Send + Sync + std::ops::AddAssign + std::ops::SubAssign + std::ops::DivAssign
{
    fn of(v: f64) -> Self;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn max(self, o: Self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            fn of(v: f64) -> Self {
                v as $t
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
        }
    };
}
real!(f32);
real!(f64);

/// Whether fused ops are used at all: yes unless `RECALL_FUSED=0` (which measures the
/// composed ops against them, e.g. under `recall bench`).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RECALL_FUSED").map_or(true, |v| v != "0"))
}

/// Whether the fused kernel serves `x`: CPU tensors of f32 or f64, fused ops enabled.
pub fn applies(x: &Tensor) -> bool {
    enabled() && x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// The contiguous elements of an input.
pub(crate) fn slice<'a, T: Real>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("{op}: the input is not contiguous (shape {:?}, stride {:?})", l.dims(), l.stride()),
    }
}

/// Run `f` on the storage's float type.
macro_rules! by_dtype {
    ($op:expr, $s:expr, $f:ident ( $($arg:expr),* )) => {
        match $s.dtype() {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            other => bail!("{}: no CPU kernel for {other:?}", $op),
        }
    };
}

fn same_dtype(op: &str, a: &CpuStorage, b: &CpuStorage) -> Result<()> {
    if a.dtype() != b.dtype() {
        bail!("{op}: inputs of {:?} and {:?}; both must have one float type", a.dtype(), b.dtype());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Layer norm over the last dimension.

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
    let mut y = vec![T::of(0.0); x.len()];
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
    let mut out = vec![T::of(0.0); (rows + 2) * n];
    let (dx, params) = out.split_at_mut(rows * n);
    // dx per row; the weight and bias gradients are column sums, gathered per thread.
    let (dw, db) = dx
        .par_chunks_mut(n)
        .zip(x.par_chunks(n).zip(g.par_chunks(n)))
        .fold(
            || (vec![0f64; n], vec![0f64; n]),
            |(mut dw, mut db), (dx, (row, grow))| {
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
                (dw, db)
            },
        )
        .reduce(
            || (vec![0f64; n], vec![0f64; n]),
            |(mut a, mut b), (c, d)| {
                a.iter_mut().zip(c).for_each(|(a, c)| *a += c);
                b.iter_mut().zip(d).for_each(|(b, d)| *b += d);
                (a, b)
            },
        );
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

// ---------------------------------------------------------------------------------------
// Softmax over the last dimension, scaled and optionally causal (attention's).

/// `softmax(scale * x)` over the last dimension; with `causal`, key j of query row i is kept
/// only for j <= i + (Lk - Lq), the others get probability 0 (no mask tensor is built).
struct ScaledSoftmax {
    scale: f64,
    causal: bool,
}

impl ScaledSoftmax {
    /// Keys row `r` of a [.., Lq, Lk] input may attend to.
    fn keys(&self, r: usize, lq: usize, lk: usize) -> usize {
        if self.causal {
            ((r % lq) + lk.saturating_sub(lq) + 1).min(lk)
        } else {
            lk
        }
    }
}

fn softmax_fwd<T: Real>(op: &ScaledSoftmax, x: &[T], lq: usize, lk: usize) -> CpuStorage {
    let mut y = vec![T::of(0.0); x.len()];
    let scale = T::of(op.scale);
    y.par_chunks_mut(lk).zip(x.par_chunks(lk)).enumerate().for_each(|(r, (out, row))| {
        let keep = op.keys(r, lq, lk);
        let max = row[..keep].iter().fold(T::of(f64::NEG_INFINITY), |m, &v| Real::max(m, v * scale));
        let mut sum = T::of(0.0);
        for j in 0..keep {
            let e = (row[j] * scale - max).exp();
            out[j] = e;
            sum += e;
        }
        for o in &mut out[..keep] {
            *o /= sum;
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
            Ok(softmax_fwd(op, slice::<T>("scaled_softmax", s, l)?, lq, lk))
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
    let mut dx = vec![T::of(0.0); y.len()];
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
    x.contiguous()?.apply_op1(ScaledSoftmax { scale, causal })
}

// ---------------------------------------------------------------------------------------
// QuickGELU.

/// `x * sigmoid(1.702 x)` (OpenAI CLIP).
struct QuickGelu;

/// `1 / (1 + e^-v)` in the tensor's own type (an f64 `exp` per element cost a few per cent
/// of a whole f32 training step).
fn sigmoid<T: Real>(v: T) -> T {
    let one = T::of(1.0);
    one / (one + (T::of(0.0) - v).exp())
}

fn quick_gelu_fwd<T: Real>(x: &[T]) -> CpuStorage {
    let a = T::of(1.702);
    let y: Vec<T> = x.par_iter().map(|&v| v * sigmoid(a * v)).collect();
    T::to_cpu_storage_owned(y)
}

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "quick_gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: Real>(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            Ok(quick_gelu_fwd(slice::<T>("quick_gelu", s, l)?))
        }
        Ok((by_dtype!("quick_gelu", s, go(s, l))?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &QuickGeluBackward)?))
    }
}

/// d/dx [x s(ax)] = s(ax) (1 + a x (1 - s(ax))), a = 1.702.
struct QuickGeluBackward;

impl CustomOp2 for QuickGeluBackward {
    fn name(&self) -> &'static str {
        "quick_gelu_backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_dtype("quick_gelu_backward", s1, s2)?;
        fn go<T: Real>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<CpuStorage> {
            let (x, g) = (slice::<T>("quick_gelu_backward", s1, l1)?, slice::<T>("quick_gelu_backward", s2, l2)?);
            let dx: Vec<T> = x
                .par_iter()
                .zip(g)
                .map(|(&x, &g)| {
                    let (a, one) = (T::of(1.702), T::of(1.0));
                    let s = sigmoid(a * x);
                    g * s * (one + a * x * (one - s))
                })
                .collect();
            Ok(T::to_cpu_storage_owned(dx))
        }
        Ok((by_dtype!("quick_gelu_backward", s1, go(s1, l1, s2, l2))?, l1.shape().clone()))
    }
}

/// Fused QuickGELU; the caller has checked that [`applies`].
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(QuickGelu)
}

#[cfg(test)]
mod tests {
    use super::super::ops::{self, tests::grad_check, tests::randt};
    use candle_core::{DType, Tensor, Var};

    /// Largest |a - b| / (|b|max + tiny): the relative disagreement of two tensors.
    fn relative(a: &Tensor, b: &Tensor) -> f64 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap();
        let scale = b.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap();
        diff.to_scalar::<f64>().unwrap() / (scale.to_scalar::<f64>().unwrap() + 1e-30)
    }

    /// The fused and the composed version of one function agree in f32, forward and every
    /// input's gradient, to `tol` relative.
    fn agree(
        name: &str,
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
    ) {
        let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
            let vars: Vec<Var> =
                inputs.iter().map(|t| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap()).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts);
            let r = randt(y.dims(), 7).to_dtype(DType::F32).unwrap();
            let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let g: Vec<Tensor> = vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect();
            (y, g)
        };
        let (yf, gf) = run(&fused);
        let (yc, gc) = run(&composed);
        assert!(relative(&yf, &yc) <= 1e-5, "{name}: forward differs by {:e}", relative(&yf, &yc));
        for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
            assert!(relative(a, b) <= 1e-5, "{name}: gradient of input {i} differs by {:e}", relative(a, b));
        }
    }

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
    fn quick_gelu_gradient_matches_finite_differences_and_the_composed_op() {
        let x = (randt(&[4, 9], 31) * 4.0).unwrap();
        grad_check("fused quick_gelu", std::slice::from_ref(&x), |t| super::quick_gelu(&t[0]));
        agree("quick_gelu", &[x], |t| super::quick_gelu(&t[0]).unwrap(), |t| ops::quick_gelu_composed(&t[0]).unwrap());
    }

    #[test]
    fn a_shape_or_dtype_mismatch_is_an_error_naming_the_op() {
        let x = randt(&[2, 8], 41);
        let err = ops::layer_norm(&x, &randt(&[7], 1), &randt(&[8], 2), 1e-5).unwrap_err().to_string();
        assert!(err.contains("layer_norm: x is [2, 8], weight [7], bias [8]"), "{err}");
        let w32 = randt(&[8], 1).to_dtype(DType::F32).unwrap();
        let err = super::layer_norm(&x, &w32, &randt(&[8], 2), 1e-5).unwrap_err().to_string();
        assert!(err.contains("layer_norm: inputs of F64 and F32"), "{err}");
        let err = super::scaled_softmax(&randt(&[5], 3), 1.0, false).unwrap_err().to_string();
        assert!(err.contains("scaled_softmax: expected a tensor of rank >= 2"), "{err}");
    }
}
