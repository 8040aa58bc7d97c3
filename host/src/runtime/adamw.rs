//! AdamW's update in place: three kernels per parameter tensor (first moment, second
//! moment, parameter) that write into the existing storages, where the composed update
//! allocates about 16 fresh tensors. The arithmetic is the composed update's, operation for
//! operation in the parameter's own float type, so both give the same bits (tested).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, WithDType};

/// One step's constants.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub beta1: f64,
    pub beta2: f64,
    /// Bias corrections 1 - beta^t.
    pub c1: f64,
    pub c2: f64,
    pub lr: f64,
    pub weight_decay: f64,
    pub eps: f64,
    /// Gradient multiplier (clipping); 1 leaves the gradient as it is.
    pub grad_scale: f64,
}

/// Whether the in-place kernels serve this parameter and its state: contiguous CPU floats of
/// one shape and dtype (the gradient may be any layout: it is copied once if it must be).
pub fn applies(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> bool {
    let same = |t: &Tensor| t.device().is_cpu() && t.dtype() == p.dtype() && t.dims() == p.dims();
    [p, m, v].iter().all(|t| same(t) && t.is_contiguous()) && same(g) && matches!(p.dtype(), DType::F32 | DType::F64)
}

/// Update `p`, `m` and `v` in place from the gradient `g`; see [`applies`].
pub fn step(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, c: AdamWStep) -> Result<()> {
    // A weight's gradient arrives transposed (its matmul read `w.t()`).
    let g = g.contiguous()?;
    m.inplace_op2(&g, &Moment { c, second: false })?;
    v.inplace_op2(&g, &Moment { c, second: true })?;
    p.inplace_op3(m, v, &Update { c })
}

fn slice<'a, T: WithDType>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("{op}: the input is not contiguous"),
    }
}

fn slice_mut<'a, T: WithDType>(op: &str, s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [T]> {
    let Some((a, b)) = l.contiguous_offsets() else { bail!("{op}: the target is not contiguous") };
    match T::DTYPE {
        DType::F32 => match s {
            CpuStorage::F32(v) => Ok(cast_mut(&mut v[a..b])),
            _ => bail!("{op}: the target is not {:?}", T::DTYPE),
        },
        DType::F64 => match s {
            CpuStorage::F64(v) => Ok(cast_mut(&mut v[a..b])),
            _ => bail!("{op}: the target is not {:?}", T::DTYPE),
        },
        other => bail!("{op}: no kernel for {other:?}"),
    }
}

/// A slice of the storage's element type as the generic `T` that names the same type.
fn cast_mut<S: 'static, T: 'static>(s: &mut [S]) -> &mut [T] {
    assert_eq!(std::any::TypeId::of::<S>(), std::any::TypeId::of::<T>());
    // SAFETY: S and T are the same type (checked above).
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<T>(), s.len()) }
}

/// The gradient as the composed update sees it: multiplied by the clip factor when that is
/// not 1 (`affine(scale, 0)`).
fn scaled<T: WithDType>(g: T, c: &AdamWStep) -> T {
    if c.grad_scale != 1.0 {
        g * T::from_f64(c.grad_scale) + T::from_f64(0.0)
    } else {
        g
    }
}

/// m = m b1 + g (1 - b1), or v = v b2 + g^2 (1 - b2), each product an `affine` as composed.
struct Moment {
    c: AdamWStep,
    second: bool,
}

impl Moment {
    fn apply<T: WithDType>(&self, state: &mut [T], g: &[T]) {
        let c = &self.c;
        let (beta, zero) = if self.second { (c.beta2, T::from_f64(0.0)) } else { (c.beta1, T::from_f64(0.0)) };
        let (keep, take) = (T::from_f64(beta), T::from_f64(1.0 - beta));
        for (s, &g) in state.iter_mut().zip(g) {
            let g = scaled(g, c);
            let new = if self.second { g * g } else { g };
            *s = (*s * keep + zero) + (new * take + zero);
        }
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw_moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        match s1.dtype() {
            DType::F32 => self.apply::<f32>(slice_mut(self.name(), s1, l1)?, slice(self.name(), s2, l2)?),
            DType::F64 => self.apply::<f64>(slice_mut(self.name(), s1, l1)?, slice(self.name(), s2, l2)?),
            other => bail!("adamw_moment: no kernel for {other:?}"),
        }
        Ok(())
    }
}

/// p = p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), as the composed update's ops.
struct Update {
    c: AdamWStep,
}

impl Update {
    fn apply<T: WithDType + num_float::Sqrt + std::ops::SubAssign>(&self, p: &mut [T], m: &[T], v: &[T]) {
        let c = &self.c;
        let zero = T::from_f64(0.0);
        let (inv_c1, inv_c2) = (T::from_f64(1.0 / c.c1), T::from_f64(1.0 / c.c2));
        let (one, eps, lr) = (T::from_f64(1.0), T::from_f64(c.eps), T::from_f64(c.lr));
        let decay = T::from_f64(1.0 - c.lr * c.weight_decay);
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            let m_hat = m * inv_c1 + zero;
            let v_hat = v * inv_c2 + zero;
            let update = m_hat / (v_hat.sqrt() * one + eps);
            if c.weight_decay != 0.0 {
                *p = *p * decay + zero;
            }
            *p -= update * lr + zero;
        }
    }
}

mod num_float {
    /// Square root of the two float types the kernels serve.
    pub trait Sqrt {
        fn sqrt(self) -> Self;
    }
    impl Sqrt for f32 {
        fn sqrt(self) -> Self {
            f32::sqrt(self)
        }
    }
    impl Sqrt for f64 {
        fn sqrt(self) -> Self {
            f64::sqrt(self)
        }
    }
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw_update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let n = self.name();
        match s1.dtype() {
            DType::F32 => self.apply::<f32>(slice_mut(n, s1, l1)?, slice(n, s2, l2)?, slice(n, s3, l3)?),
            DType::F64 => self.apply::<f64>(slice_mut(n, s1, l1)?, slice(n, s2, l2)?, slice(n, s3, l3)?),
            other => bail!("adamw_update: no kernel for {other:?}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use crate::config::OptimizerSection;
    use crate::optim::AdamW;
    use crate::runtime::ops::tests::randt;
    use crate::runtime::params::{Param, ParamStore};

    /// Three steps of both updates from the same start, with decay, clipping and a group
    /// without decay: every parameter and moment ends with the same bits.
    #[test]
    fn the_in_place_update_gives_the_composed_updates_bits() {
        let run = |fused: bool| -> Vec<Vec<f32>> {
            let mut store = ParamStore::default();
            let w = Var::from_tensor(&randt(&[6, 5], 1).to_dtype(DType::F32).unwrap()).unwrap();
            let b = Var::from_tensor(&randt(&[5], 2).to_dtype(DType::F32).unwrap()).unwrap();
            for (name, var) in [("layer.weight", &w), ("layer.bias", &b)] {
                let init = recall_sdk::ParamInit::zeros();
                store.insert(Param { name: name.into(), var: var.clone(), trainable: true, init });
            }
            let cfg: OptimizerSection = toml::from_str("lr = 0.01\nweight_decay = 0.1").unwrap();
            let mut opt = AdamW::new(&store, &cfg).unwrap();
            opt.set_fused(fused);
            for step in 0..3 {
                let x = randt(&[4, 6], 10 + step).to_dtype(DType::F32).unwrap();
                let loss = x
                    .matmul(w.as_tensor())
                    .unwrap()
                    .broadcast_add(b.as_tensor())
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let grads = loss.backward().unwrap();
                opt.step(&grads, 0.9, if step == 1 { 0.37 } else { 1.0 }).unwrap();
            }
            let mut out: Vec<Vec<f32>> =
                [&w, &b].iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect();
            out.extend(opt.moments_for_test().into_iter().map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()));
            out
        };
        let bits = |v: Vec<Vec<f32>>| {
            v.into_iter().map(|r| r.into_iter().map(f32::to_bits).collect::<Vec<_>>()).collect::<Vec<_>>()
        };
        assert_eq!(bits(run(true)), bits(run(false)));
    }

    #[test]
    fn the_kernels_serve_only_contiguous_cpu_floats_of_one_shape() {
        let t = |d: &[usize], dt| Tensor::zeros(d, dt, &Device::Cpu).unwrap();
        let f = t(&[2, 3], DType::F32);
        assert!(super::applies(&f, &f, &f, &f));
        assert!(!super::applies(&f, &f, &f, &t(&[3, 2], DType::F32)));
        assert!(!super::applies(&f, &f, &f, &t(&[2, 3], DType::F64)));
        assert!(!super::applies(&f.t().unwrap(), &f, &f, &f));
        // A transposed gradient is served (copied once).
        let g = t(&[3, 2], DType::F32).t().unwrap();
        assert!(super::applies(&f, &f, &f, &g));
        let h = t(&[2, 3], DType::BF16);
        assert!(!super::applies(&h, &h, &h, &h));
    }
}
