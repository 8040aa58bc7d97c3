//! AdamW with parameter groups, warmup + cosine schedule, and global gradient-norm clipping.
//!
//! PyTorch semantics: decoupled weight decay `p <- p - lr * wd * p`, bias-corrected moments,
//! `eps` added to the square root. Biases, norms, scalars and `logit_scale` get no weight
//! decay (open_clip's rule: ndim < 2, or `ln`/`bias`/`logit_scale` in the name).

use candle_core::{backprop::GradStore, Tensor, Var};
use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::config::OptimizerSection;
use crate::runtime::adamw::{self, AdamWStep};
use crate::runtime::params::ParamStore;

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    lr: f64,
    weight_decay: f64,
}

/// AdamW over a fixed set of trainable parameters.
pub struct AdamW {
    slots: Vec<Slot>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: usize,
    /// Update in place where [`adamw::applies`] (off: the composed update, for comparison).
    fused: bool,
}

fn no_decay(name: &str, rank: usize) -> bool {
    rank < 2
        || name.contains("ln_")
        || name.contains(".bias")
        || name.contains("logit_scale")
        || name.contains("layer_norm")
}

fn glob_set(patterns: &[String]) -> Result<GlobSet, String> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|e| format!("invalid parameter pattern `{p}`: {e}"))?);
    }
    b.build().map_err(|e| e.to_string())
}

/// One row of the optimizer's parameter table (for logs and run records).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupSummary {
    pub group: String,
    pub n_tensors: usize,
    pub n_values: usize,
    pub lr: f64,
}

/// An optimizer group that cannot be applied: `group` is its index in `optimizer.groups`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct GroupError {
    pub group: Option<usize>,
    pub message: String,
}

impl GroupError {
    /// The dotted config key the error is about.
    pub fn key(&self) -> String {
        self.group.map_or("optimizer".into(), |g| format!("optimizer.groups[{g}].params"))
    }
}

/// (lr, weight decay) of every trainable parameter of `params`, in order. A group matching
/// no trainable parameter is an error: a typo would otherwise silently change nothing. Cheap
/// (no tensors), so a run checks its groups before it writes anything.
pub fn group_settings(params: &ParamStore, cfg: &OptimizerSection) -> Result<Vec<(f64, f64)>, GroupError> {
    let sets: Vec<GlobSet> = cfg
        .groups
        .iter()
        .enumerate()
        .map(|(g, grp)| glob_set(&grp.params).map_err(|message| GroupError { group: Some(g), message }))
        .collect::<Result<_, _>>()?;
    let mut used = vec![false; sets.len()];
    let mut out = Vec::new();
    for p in params.iter().filter(|p| p.trainable) {
        let (lr, wd) = match sets.iter().position(|s| s.is_match(&p.name)) {
            Some(g) => {
                used[g] = true;
                (cfg.groups[g].lr.unwrap_or(cfg.lr), cfg.groups[g].weight_decay.unwrap_or(cfg.weight_decay))
            }
            None => (cfg.lr, cfg.weight_decay),
        };
        out.push((lr, if no_decay(&p.name, p.var.rank()) { 0.0 } else { wd }));
    }
    match used.iter().position(|u| !u) {
        Some(g) => Err(GroupError {
            group: Some(g),
            message: format!(
                "optimizer group {g} ({}) matches no trainable parameter; check the patterns against the \
                 parameter names (`recall run -v` logs them) and the [model] frozen list",
                cfg.groups[g].params.join(", ")
            ),
        }),
        None => Ok(out),
    }
}

impl AdamW {
    /// Build over the trainable parameters of `params`, grouped by `cfg.groups` (first match
    /// wins; unmatched parameters use the base lr and weight decay).
    pub fn new(params: &ParamStore, cfg: &OptimizerSection) -> Result<Self, GroupError> {
        let settings = group_settings(params, cfg)?;
        let mut slots = Vec::with_capacity(settings.len());
        for (p, (lr, weight_decay)) in params.iter().filter(|p| p.trainable).zip(settings) {
            // Two storages: the moments are updated in place.
            let zeros = || p.var.zeros_like().map_err(|e| GroupError { group: None, message: e.to_string() });
            slots.push(Slot { name: p.name.clone(), var: p.var.clone(), m: zeros()?, v: zeros()?, lr, weight_decay });
        }
        Ok(AdamW {
            slots,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            step: 0,
            fused: crate::runtime::fused::enabled(),
        })
    }

    /// Use the in-place kernels (the default unless `RECALL_FUSED=0`) or the composed update.
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// Summary of the per-parameter learning rates.
    pub fn summary(&self) -> Vec<GroupSummary> {
        let mut rows: Vec<GroupSummary> = Vec::new();
        for s in &self.slots {
            let group = s.name.split('.').next().unwrap_or("").to_string();
            match rows.iter_mut().find(|r| r.group == group && r.lr == s.lr) {
                Some(r) => {
                    r.n_tensors += 1;
                    r.n_values += s.var.elem_count();
                }
                None => rows.push(GroupSummary { group, n_tensors: 1, n_values: s.var.elem_count(), lr: s.lr }),
            }
        }
        rows
    }

    /// Why the gradient norm is not finite, for the error: the first trained parameter whose
    /// gradient holds NaN or infinity, or, when every gradient is finite, the one with the
    /// largest magnitude (the sum of squares overflowed the gradients' float type).
    pub fn diagnose_non_finite_norm(&self, grads: &GradStore) -> candle_core::Result<String> {
        let mut largest: Option<(f64, &str)> = None;
        for s in &self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else { continue };
            if !crate::finite::all_finite(g)? {
                return Ok(format!("first non-finite gradient: `{}`", s.name));
            }
            let max = g.abs()?.max_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if largest.is_none_or(|(m, _)| max > m) {
                largest = Some((max, &s.name));
            }
        }
        Ok(match largest {
            Some((max, name)) => format!(
                "every gradient is finite, but the sum of their squares overflows; the largest is `{name}`, \
                 |g| up to {max:e}"
            ),
            None => "no parameter has a gradient".into(),
        })
    }

    /// Global L2 norm of the gradients of the optimized parameters. On the CPU (with the fused
    /// kernels on) one pass over the gradients' storages, accumulated in f64; elsewhere one sum
    /// of squares per tensor on the device, one reduction over them, and a single read back.
    pub fn grad_norm(&self, grads: &GradStore) -> candle_core::Result<f64> {
        let present: Vec<&Tensor> = self.slots.iter().filter_map(|s| grads.get(s.var.as_tensor())).collect();
        if self.fused {
            if let Some(total) = crate::runtime::adamw::sum_of_squares(&present) {
                // The composed norm (and so every device) sums in f32: a total beyond f32's
                // range is the overflow it reports, not a finite norm only the CPU could see.
                return Ok(if total > f64::from(f32::MAX) { f64::INFINITY } else { total.sqrt() });
            }
        }
        let squares = present
            .iter()
            .map(|g| g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if squares.is_empty() {
            return Ok(0.0);
        }
        let total = Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f32>()?;
        Ok(f64::from(total).sqrt())
    }

    /// One update with every group's lr multiplied by `lr_factor` (the schedule) and the
    /// gradients multiplied by `grad_scale` (clipping).
    pub fn step(&mut self, grads: &GradStore, lr_factor: f64, grad_scale: f64) -> candle_core::Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else { continue };
            let lr = s.lr * lr_factor;
            if self.fused && adamw::applies(s.var.as_tensor(), &s.m, &s.v, g) {
                let c = AdamWStep {
                    beta1: b1,
                    beta2: b2,
                    c1,
                    c2,
                    lr,
                    weight_decay: s.weight_decay,
                    eps: self.eps,
                    grad_scale,
                };
                adamw::step(s.var.as_tensor(), &s.m, &s.v, g, c)?;
                continue;
            }
            let g = if grad_scale != 1.0 { g.affine(grad_scale, 0.0)? } else { g.clone() };
            s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
            s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&s.m / c1)?;
            let v_hat = (&s.v / c2)?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let mut p = s.var.as_tensor().detach();
            if s.weight_decay != 0.0 {
                p = (&p * (1.0 - lr * s.weight_decay))?;
            }
            s.var.set(&(p - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The state a mid-task checkpoint keeps: every slot's moments (`m.NAME`, `v.NAME`,
    /// copies) and the number of steps taken (the bias correction's `t`).
    pub fn state(&self) -> candle_core::Result<(std::collections::HashMap<String, Tensor>, usize)> {
        let mut moments = std::collections::HashMap::new();
        for s in &self.slots {
            moments.insert(format!("m.{}", s.name), s.m.copy()?);
            moments.insert(format!("v.{}", s.name), s.v.copy()?);
        }
        Ok((moments, self.step))
    }

    /// Continue from a [`AdamW::state`]: every slot's moments must be there with its shape.
    pub fn restore(&mut self, moments: &std::collections::HashMap<String, Tensor>, step: usize) -> anyhow::Result<()> {
        for s in &mut self.slots {
            for (kind, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{kind}.{}", s.name);
                let saved = moments.get(&key).ok_or_else(|| {
                    anyhow::anyhow!("the checkpoint's optimizer state has no `{key}`: it was written for another model")
                })?;
                if saved.dims() != slot.dims() {
                    anyhow::bail!(
                        "the checkpoint's `{key}` has shape {:?}, the parameter {:?}",
                        saved.dims(),
                        slot.dims()
                    );
                }
                // A storage of its own: the fused update writes the moments in place.
                *slot = saved.to_dtype(slot.dtype())?.to_device(slot.device())?.copy()?;
            }
        }
        self.step = step;
        Ok(())
    }

    /// Every slot's moments, m then v (tests compare the two updates' state).
    #[cfg(test)]
    pub fn moments_for_test(&self) -> Vec<Tensor> {
        self.slots.iter().flat_map(|s| [s.m.clone(), s.v.clone()]).collect()
    }

    /// Number of optimized parameter values.
    pub fn n_values(&self) -> usize {
        self.slots.iter().map(|s| s.var.elem_count()).sum()
    }
}

/// Linear warmup for `warmup` units (steps or epochs), then cosine decay to `min_ratio` at
/// `total` units: the factor multiplying each group's lr at unit `step` (0-based). Warmup
/// rises from `start` to 1 (`start + (1 - start) k / warmup`), or without a start as
/// `(k + 1) / warmup`.
pub fn lr_factor(step: usize, warmup: usize, total: usize, min_ratio: f64, start: Option<f64>) -> f64 {
    if step < warmup {
        return match start {
            Some(s) => s + (1.0 - s) * step as f64 / warmup as f64,
            None => (step + 1) as f64 / warmup as f64,
        };
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The factor that scales gradients down to `max_norm` (1 when already within it).
pub fn clip_factor(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(m) if norm > m => m / (norm + 1e-6),
        _ => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn schedule_shape() {
        assert!((lr_factor(0, 10, 100, 0.0, None) - 0.1).abs() < 1e-12);
        assert!((lr_factor(9, 10, 100, 0.0, None) - 1.0).abs() < 1e-12);
        assert!((lr_factor(10, 10, 100, 0.0, None) - 1.0).abs() < 1e-12);
        assert!((lr_factor(55, 10, 100, 0.0, None) - 0.5).abs() < 1e-12);
        assert!((lr_factor(100, 10, 100, 0.1, None) - 0.1).abs() < 1e-12);
        assert_eq!(clip_factor(0.5, Some(1.0)), 1.0);
        assert!((clip_factor(4.0, Some(1.0)) - 0.25).abs() < 1e-6);
    }

    /// Two AdamW steps against values computed by hand with PyTorch's formula
    /// (torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5)).
    #[test]
    fn adamw_matches_pytorch_formula() {
        let mut store = ParamStore::default();
        let var = Var::from_tensor(&Tensor::new(&[[1.0f64, -2.0]], &Device::Cpu).unwrap()).unwrap();
        store.insert(crate::runtime::params::Param {
            name: "w".into(),
            var: var.clone(),
            trainable: true,
            init: recall_sdk::ParamInit::zeros(),
        });
        let cfg = OptimizerSection {
            lr: 0.1,
            weight_decay: 0.5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
            schedule_unit: Default::default(),
            warmup_epochs: 0,
            warmup_start_ratio: None,
            grad_clip: None,
            groups: vec![],
        };
        let mut opt = AdamW::new(&store, &cfg).unwrap();
        // loss = sum(w^2) -> grad 2w.
        let mut expected = vec![1.0f64, -2.0];
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        for t in 1..=2 {
            let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 1.0, 1.0).unwrap();
            for i in 0..2 {
                let g = 2.0 * expected[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                expected[i] = expected[i] * (1.0 - 0.1 * 0.5) - 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        for i in 0..2 {
            assert!((got[i] - expected[i]).abs() < 1e-12, "{got:?} vs {expected:?}");
        }
    }
}
