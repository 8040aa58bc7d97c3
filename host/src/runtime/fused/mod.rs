//! Fused host ops: one kernel forward and one backward where the composed versions in
//! [`super::ops`] issue many candle ops (layer norm: about 10 forward and 55 backward).
//!
//! Each is a candle custom op with an analytic backward, so it joins the one autograd graph
//! like any primitive. The CPU kernels run rows in parallel (rayon) in f32 or f64 with a
//! two-pass variance and max-subtracted softmaxes. Other dtypes and devices use the composed
//! version (the public functions in [`super::ops`] choose), so every caller gets the same
//! function either way; tests check both agree and check each backward by finite differences.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Tensor};

/// Run `f` on the storage's float type (f32 or f64); any other is an error naming the op.
macro_rules! by_dtype {
    ($op:expr, $s:expr, $f:ident ( $($arg:expr),* )) => {
        match $s.dtype() {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F64 => $f::<f64>($($arg),*),
            other => candle_core::bail!("{}: no CPU kernel for {other:?}", $op),
        }
    };
}

mod activation;
mod attention;
mod bias;
mod cross_entropy;
mod exp;
mod gemm;
mod layer_norm;
pub(crate) mod linear;
mod softmax;

pub use activation::{gelu, quick_gelu};
pub use attention::attention_heads;
pub use bias::{bias_add, bias_delta_add};
pub use cross_entropy::cross_entropy;
pub use layer_norm::layer_norm;
pub use linear::matmul_nt;
pub use softmax::{log_softmax, masked_softmax, scaled_softmax};

/// A vector of `len` elements that the calling kernel writes in full before anything reads
/// it, so it is not zeroed first: zeroing was a serial memset on the step's critical path
/// (about 4 % of a CPU training step under `perf`), where the kernel's own writes run in
/// parallel. A kernel that leaves an element (a masked key, say) must write its zero itself.
pub(crate) fn output_buffer<T: Real>(len: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    // SAFETY: T is f32 or f64, for which any bit pattern is a value, and every caller
    // writes each element before the vector is read or handed to candle.
    #[allow(clippy::uninit_vec)]
    unsafe {
        out.set_len(len)
    };
    out
}

/// The float types the CPU kernels are written for.
pub(crate) trait Real:
    candle_core::WithDType + Copy + Send + Sync + std::ops::AddAssign + std::ops::SubAssign + std::ops::DivAssign
{
    fn of(v: f64) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn erf(self) -> Self;
    fn max(self, o: Self) -> Self;
}

macro_rules! real {
    ($t:ty, $exp:path, $erf:path) => {
        impl Real for $t {
            fn of(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn erf(self) -> Self {
                $erf(self)
            }
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
        }
    };
}
// f32's exp is the inlinable, vectorisable one; f64 (the gradient checks) keeps libm's.
real!(f32, exp::exp_f32, candle_core::cpu::erf::erf_f32);
real!(f64, f64::exp, candle_core::cpu::erf::erf_f64);

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
pub(crate) fn slice<'a, T: candle_core::WithDType>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("{op}: the input is not contiguous (shape {:?}, stride {:?})", l.dims(), l.stride()),
    }
}

fn same_dtype(op: &str, a: &CpuStorage, b: &CpuStorage) -> Result<()> {
    if a.dtype() != b.dtype() {
        bail!("{op}: inputs of {:?} and {:?}; both must have one float type", a.dtype(), b.dtype());
    }
    Ok(())
}

/// Rows per parallel task of a column sum: the tasks' partial sums are added in task order,
/// so a sum has the same bits for any number of threads and any scheduling.
const ROWS_PER_BLOCK: usize = 64;

/// Column sums of a [rows, n] block in f64 (a bias's or a norm weight's gradient: one pass
/// over the rows, where a strided reduction walks them per column), in a fixed order.
fn column_sums<T: Real>(rows: &[T], n: usize) -> Vec<f64> {
    use rayon::prelude::*;
    let partial: Vec<Vec<f64>> = rows
        .par_chunks(ROWS_PER_BLOCK * n)
        .map(|block| {
            let mut acc = vec![0f64; n];
            for row in block.chunks(n) {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v.to_f64());
            }
            acc
        })
        .collect();
    let mut total = vec![0f64; n];
    for p in partial {
        total.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    total
}

#[cfg(test)]
mod testing {
    use crate::runtime::ops::tests::randt;
    use candle_core::{DType, Tensor, Var};

    /// Largest |a - b| / (|b|max + tiny): the relative disagreement of two tensors.
    pub fn relative(a: &Tensor, b: &Tensor) -> f64 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap();
        let scale = b.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap();
        diff.to_scalar::<f64>().unwrap() / (scale.to_scalar::<f64>().unwrap() + 1e-30)
    }

    /// The fused and the composed version of one function agree in f32, forward and the
    /// gradient of every float input, to `tol` relative. Integer inputs (labels) are passed
    /// through as constants.
    pub fn agree(
        name: &str,
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
    ) {
        let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
            let vars: Vec<Option<Var>> = inputs
                .iter()
                .map(|t| t.dtype().is_float().then(|| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap()))
                .collect();
            let ts: Vec<Tensor> =
                vars.iter().zip(inputs).map(|(v, t)| v.as_ref().map_or(t.clone(), |v| v.as_tensor().clone())).collect();
            let y = f(&ts);
            let r = randt(y.dims(), 7).to_dtype(DType::F32).unwrap();
            let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let g: Vec<Tensor> = vars.iter().flatten().map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect();
            (y, g)
        };
        let (yf, gf) = run(&fused);
        let (yc, gc) = run(&composed);
        assert!(relative(&yf, &yc) <= 1e-5, "{name}: forward differs by {:e}", relative(&yf, &yc));
        for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
            assert!(relative(a, b) <= 1e-5, "{name}: gradient of input {i} differs by {:e}", relative(a, b));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::runtime::ops::{self, tests::randt};
    use candle_core::{DType, Tensor, Var};

    /// Runs `f` on a rayon pool of `threads` workers.
    fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
    }

    #[test]
    fn column_sums_have_the_same_bits_for_any_number_of_threads() {
        // Each column mixes magnitudes from 1e-12 to 1e12, beyond what f64 sums exactly, so a
        // different summation order changes low bits.
        let rows: Vec<f32> = (0..1000 * 7).map(|i| (i as f32 * 0.37).sin() * 10f32.powi((i / 7) % 25 - 12)).collect();
        let one = on_threads(1, || super::column_sums(&rows, 7));
        for threads in [2, 3, 8] {
            let many = on_threads(threads, || super::column_sums(&rows, 7));
            let same = one.iter().zip(&many).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{threads} threads: {many:?} against {one:?}");
        }
    }

    #[test]
    fn layer_norm_parameter_gradients_have_the_same_bits_for_any_number_of_threads() {
        // In f64, so that no rounding to f32 hides a different order; the upstream gradient's
        // rows range over 1e-8..1e8, so the order of the column sums shows in the low bits.
        let (x, w, b) = (randt(&[700, 24], 11), randt(&[24], 12), randt(&[24], 13));
        let scale: Vec<f64> = (0..700).map(|r| 10f64.powi(r % 17 - 8)).collect();
        let r = randt(&[700, 24], 14).broadcast_mul(&Tensor::from_vec(scale, (700, 1), x.device()).unwrap()).unwrap();
        let grads = || {
            let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
            let y = super::layer_norm(&x, wv.as_tensor(), bv.as_tensor(), 1e-5).unwrap();
            let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let bits = |v: &Var| -> Vec<u64> {
                g.get(v.as_tensor()).unwrap().to_vec1::<f64>().unwrap().iter().map(|v| v.to_bits()).collect()
            };
            (bits(&wv), bits(&bv))
        };
        let one = on_threads(1, grads);
        for threads in [2, 5] {
            assert_eq!(on_threads(threads, grads), one, "{threads} threads");
        }
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
