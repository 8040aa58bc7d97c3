//! AdamW's update in place: three kernels per parameter tensor (first moment, second
//! moment, parameter) that write into the existing storages, where the composed update
//! allocates about 16 fresh tensors. The arithmetic is the composed update's, operation for
//! operation in the parameter's own float type, so both give the same bits (tested).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

use super::fused::{slice, Real};

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

/// The sum of the squares of every element of `grads`, accumulated in f64 straight from
/// their CPU storages, in parallel and in a fixed order: no tensor is created (the composed
/// norm made about four per parameter tensor: a square, a sum, a reshape and a stack entry)
/// and nothing waits on a device. `None` when any gradient is not a contiguous f32 or f64
/// CPU tensor; the caller composes the norm then.
pub fn sum_of_squares(grads: &[&Tensor]) -> Option<f64> {
    use rayon::prelude::*;
    fn squares<T: Real>(v: &[T]) -> f64 {
        // Eight running sums: a sum with no serial chain of adds, which vectorises.
        let mut acc = [0f64; 8];
        let chunks = v.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, x) in acc.iter_mut().zip(c) {
                *a += x.to_f64() * x.to_f64();
            }
        }
        rest.iter().map(|x| x.to_f64() * x.to_f64()).sum::<f64>() + acc.iter().sum::<f64>()
    }
    const BLOCK: usize = 1 << 15;
    let guards: Vec<_> = grads.iter().map(|g| g.storage_and_layout()).collect();
    let mut blocks = Vec::new();
    for (storage, layout) in &guards {
        let (a, b) = layout.contiguous_offsets()?;
        match &**storage {
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => blocks.extend(v[a..b].chunks(BLOCK).map(Block::F32)),
            candle_core::Storage::Cpu(CpuStorage::F64(v)) => blocks.extend(v[a..b].chunks(BLOCK).map(Block::F64)),
            _ => return None,
        }
    }
    enum Block<'a> {
        F32(&'a [f32]),
        F64(&'a [f64]),
    }
    // Blocks are summed in parallel, their sums then added in order: the same value for any
    // number of threads.
    let sums: Vec<f64> = blocks
        .par_iter()
        .map(|b| match b {
            Block::F32(v) => squares(v),
            Block::F64(v) => squares(v),
        })
        .collect();
    Some(sums.iter().sum())
}

/// The contiguous elements of a target the kernel writes.
fn target<'a, T>(op: &str, v: &'a mut [T], l: &Layout) -> Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => bail!("{op}: the target is not contiguous"),
    }
}

/// The gradient as the composed update sees it: multiplied by the clip factor when that is
/// not 1 (`affine(scale, 0)`).
fn scaled<T: Real>(g: T, c: &AdamWStep) -> T {
    if c.grad_scale != 1.0 {
        g * T::of(c.grad_scale) + T::of(0.0)
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
    fn apply<T: Real>(&self, state: &mut [T], g: &[T]) {
        let c = &self.c;
        let beta = if self.second { c.beta2 } else { c.beta1 };
        let (keep, take, zero) = (T::of(beta), T::of(1.0 - beta), T::of(0.0));
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
        let n = self.name();
        match s1 {
            CpuStorage::F32(v) => self.apply::<f32>(target(n, v, l1)?, slice(n, s2, l2)?),
            CpuStorage::F64(v) => self.apply::<f64>(target(n, v, l1)?, slice(n, s2, l2)?),
            other => bail!("{n}: no kernel for {:?}", other.dtype()),
        }
        Ok(())
    }
}

/// p = p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), as the composed update's ops.
struct Update {
    c: AdamWStep,
}

impl Update {
    fn apply<T: Real>(&self, p: &mut [T], m: &[T], v: &[T]) {
        let c = &self.c;
        let zero = T::of(0.0);
        let (inv_c1, inv_c2) = (T::of(1.0 / c.c1), T::of(1.0 / c.c2));
        let (one, eps, lr) = (T::of(1.0), T::of(c.eps), T::of(c.lr));
        let decay = T::of(1.0 - c.lr * c.weight_decay);
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
        match s1 {
            CpuStorage::F32(v) => self.apply::<f32>(target(n, v, l1)?, slice(n, s2, l2)?, slice(n, s3, l3)?),
            CpuStorage::F64(v) => self.apply::<f64>(target(n, v, l1)?, slice(n, s2, l2)?, slice(n, s3, l3)?),
            other => bail!("{n}: no kernel for {:?}", other.dtype()),
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
    fn the_sum_of_squares_is_the_composed_one_and_declines_what_it_cannot_read() {
        let a = randt(&[300, 257], 3).to_dtype(DType::F32).unwrap();
        let b = randt(&[7], 4);
        let composed: f64 = [&a, &b]
            .iter()
            .map(|t| t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap())
            .sum();
        let fused = super::sum_of_squares(&[&a, &b]).unwrap();
        assert!((fused - composed).abs() <= 1e-12 * composed, "{fused} against {composed}");
        assert_eq!(super::sum_of_squares(&[]), Some(0.0));
        assert_eq!(super::sum_of_squares(&[&a.t().unwrap()]), None);
        assert_eq!(super::sum_of_squares(&[&a.to_dtype(DType::BF16).unwrap()]), None);
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
