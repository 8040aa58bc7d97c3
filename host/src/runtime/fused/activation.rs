//! Element-wise activations, QuickGELU (OpenAI CLIP) and exact GELU (open_clip's ViTs): one
//! kernel forward and one backward each, in the tensor's own float type (an f64 `exp` per
//! element cost a few per cent of a whole f32 training step).

use super::{output_buffer, same_dtype, slice, Real};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
enum Activation {
    /// `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// `x/2 (1 + erf(x / sqrt 2))`.
    Gelu,
}

/// `1 / (1 + e^-v)`.
fn sigmoid<T: Real>(v: T) -> T {
    let one = T::of(1.0);
    one / (one + (T::of(0.0) - v).exp())
}

impl Activation {
    fn name(self) -> &'static str {
        match self {
            Activation::QuickGelu => "quick_gelu",
            Activation::Gelu => "gelu",
        }
    }

    fn backward_name(self) -> &'static str {
        match self {
            Activation::QuickGelu => "quick_gelu_backward",
            Activation::Gelu => "gelu_backward",
        }
    }

    fn value<T: Real>(self, x: T) -> T {
        match self {
            Activation::QuickGelu => x * sigmoid(T::of(1.702) * x),
            Activation::Gelu => T::of(0.5) * x * (T::of(1.0) + (x * T::of(std::f64::consts::FRAC_1_SQRT_2)).erf()),
        }
    }

    /// d value / dx.
    fn derivative<T: Real>(self, x: T) -> T {
        let one = T::of(1.0);
        match self {
            // s(ax) (1 + a x (1 - s(ax))), a = 1.702.
            Activation::QuickGelu => {
                let a = T::of(1.702);
                let s = sigmoid(a * x);
                s * (one + a * x * (one - s))
            }
            // Phi(x) + x phi(x), with Phi the normal CDF and phi its density.
            Activation::Gelu => {
                let cdf = T::of(0.5) * (one + (x * T::of(std::f64::consts::FRAC_1_SQRT_2)).erf());
                let density = (T::of(-0.5) * x * x).exp()
                    * T::of(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
                cdf + x * density
            }
        }
    }
}

/// Elements per parallel task: large enough to amortise the task, small enough to balance.
const BLOCK: usize = 1 << 14;

/// `f` over `x` (and `g`) in parallel blocks, each a plain loop the compiler vectorises
/// (each arm below passes `f` with its activation fixed, so no `match` is left in the loop).
fn pointwise<T: Real>(x: &[T], g: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut y = output_buffer(x.len());
    y.par_chunks_mut(BLOCK).zip(x.par_chunks(BLOCK)).enumerate().for_each(|(i, (y, x))| {
        let g = if g.is_empty() { x } else { &g[i * BLOCK..i * BLOCK + x.len()] };
        y.iter_mut().zip(x).zip(g).for_each(|((y, &x), &g)| *y = f(x, g));
    });
    y
}

/// The activation applied element-wise.
struct Pointwise(Activation);

impl CustomOp1 for Pointwise {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: Real>(act: Activation, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            let x = slice::<T>(act.name(), s, l)?;
            let y = match act {
                Activation::QuickGelu => pointwise(x, &[], |v, _| Activation::QuickGelu.value(v)),
                Activation::Gelu => pointwise(x, &[], |v, _| Activation::Gelu.value(v)),
            };
            Ok(T::to_cpu_storage_owned(y))
        }
        Ok((by_dtype!(self.0.name(), s, go(self.0, s, l))?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &PointwiseBackward(self.0))?))
    }
}

/// `g * activation'(x)`.
struct PointwiseBackward(Activation);

impl CustomOp2 for PointwiseBackward {
    fn name(&self) -> &'static str {
        self.0.backward_name()
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.0.backward_name();
        same_dtype(op, s1, s2)?;
        fn go<T: Real>(
            act: Activation,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<CpuStorage> {
            let op = act.backward_name();
            let (x, g) = (slice::<T>(op, s1, l1)?, slice::<T>(op, s2, l2)?);
            let dx = match act {
                Activation::QuickGelu => pointwise(x, g, |x, g| g * Activation::QuickGelu.derivative(x)),
                Activation::Gelu => pointwise(x, g, |x, g| g * Activation::Gelu.derivative(x)),
            };
            Ok(T::to_cpu_storage_owned(dx))
        }
        Ok((by_dtype!(op, s1, go(self.0, s1, l1, s2, l2))?, l1.shape().clone()))
    }
}

/// Fused QuickGELU; the caller has checked that [`applies`](super::applies).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Pointwise(Activation::QuickGelu))
}

/// Fused exact GELU; the caller has checked that [`applies`](super::applies).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Pointwise(Activation::Gelu))
}

#[cfg(test)]
mod tests {
    use crate::runtime::fused::testing::agree;
    use crate::runtime::ops::{self, tests::grad_check, tests::randt};

    #[test]
    fn quick_gelu_gradient_matches_finite_differences_and_the_composed_op() {
        let x = (randt(&[4, 9], 31) * 4.0).unwrap();
        grad_check("fused quick_gelu", std::slice::from_ref(&x), |t| super::quick_gelu(&t[0]));
        agree("quick_gelu", &[x], |t| super::quick_gelu(&t[0]).unwrap(), |t| ops::quick_gelu_composed(&t[0]).unwrap());
    }

    #[test]
    fn gelu_gradient_matches_finite_differences_and_the_composed_op() {
        let x = (randt(&[4, 9], 32) * 4.0).unwrap();
        grad_check("fused gelu", std::slice::from_ref(&x), |t| super::gelu(&t[0]));
        agree("gelu", &[x], |t| super::gelu(&t[0]).unwrap(), |t| ops::gelu_erf_composed(&t[0]).unwrap());
    }
}
