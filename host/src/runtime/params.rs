//! The parameter store: every parameter of every plugin, by scoped name.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};
use recall_sdk::ParamInit;

/// One host-owned parameter.
pub struct Param {
    pub name: String,
    pub var: Var,
    pub trainable: bool,
    pub init: ParamInit,
}

/// Named parameters in creation order (which is deterministic, so initialisation from one
/// seed is reproducible).
#[derive(Default)]
pub struct ParamStore {
    params: Vec<Param>,
    by_name: HashMap<String, usize>,
    by_tensor: HashMap<candle_core::TensorId, usize>,
    /// How many times master values were overwritten outside the optimizer (loads, assigns,
    /// resets, copies): casts of frozen parameters taken before a write are stale.
    writes: std::cell::Cell<u64>,
}

/// Draw an initial value.
pub fn init_tensor(
    init: ParamInit,
    shape: &[usize],
    dtype: DType,
    device: &Device,
    rng: &mut StdRng,
) -> Result<Tensor, String> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = match init.kind {
        ParamInit::KIND_CONSTANT => vec![init.a as f32; n],
        ParamInit::KIND_NORMAL => {
            let d = Normal::new(init.a, init.b)
                .map_err(|e| format!("invalid normal init ({}, {}): {e}", init.a, init.b))?;
            (0..n).map(|_| d.sample(rng) as f32).collect()
        }
        ParamInit::KIND_UNIFORM => {
            if init.a >= init.b {
                return Tensor::full(init.a as f32, shape, device)
                    .and_then(|t| t.to_dtype(dtype))
                    .map_err(|e| e.to_string());
            }
            let d = Uniform::new(init.a, init.b).map_err(|e| format!("invalid uniform init: {e}"))?;
            (0..n).map(|_| d.sample(rng) as f32).collect()
        }
        other => return Err(format!("unknown parameter init kind {other}: the plugin was built for a newer recall")),
    };
    Tensor::from_vec(data, shape, device).and_then(|t| t.to_dtype(dtype)).map_err(|e| e.to_string())
}

impl ParamStore {
    /// Record that master values were overwritten outside the optimizer.
    pub fn note_write(&self) {
        self.writes.set(self.writes.get() + 1);
    }

    /// The number of [`ParamStore::note_write`]s so far.
    pub fn writes(&self) -> u64 {
        self.writes.get()
    }

    pub fn get(&self, name: &str) -> Option<&Param> {
        self.by_name.get(name).map(|&i| &self.params[i])
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Param> {
        self.by_name.get(name).map(|&i| &mut self.params[i])
    }

    /// The parameter whose tensor is `t` (a parameter's own tensor, not a computed one).
    pub fn by_tensor(&self, t: &Tensor) -> Option<&Param> {
        self.by_tensor.get(&t.id()).map(|&i| &self.params[i])
    }

    /// Let `alias` (a constant view of parameter `name`'s storage) stand for the parameter in
    /// `by_tensor`, so `param_assign` and `param_reset` keep working through it.
    pub fn alias(&mut self, name: &str, alias: &Tensor) {
        if let Some(&i) = self.by_name.get(name) {
            self.by_tensor.insert(alias.id(), i);
        }
    }

    /// Forget a view made by `alias` (a superseded cast), never a parameter's own tensor.
    pub fn unalias(&mut self, view: &Tensor) {
        if let Some(&i) = self.by_tensor.get(&view.id()) {
            if self.params[i].var.as_tensor().id() != view.id() {
                self.by_tensor.remove(&view.id());
            }
        }
    }

    pub fn insert(&mut self, param: Param) -> &Param {
        let i = self.params.len();
        self.by_name.insert(param.name.clone(), i);
        self.by_tensor.insert(param.var.as_tensor().id(), i);
        self.params.push(param);
        &self.params[i]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        self.params.iter_mut()
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Number of scalar values in trainable parameters.
    pub fn trainable_count(&self) -> usize {
        self.params.iter().filter(|p| p.trainable).map(|p| p.var.elem_count()).sum()
    }

    /// Every parameter's current value, by name (values are copied, so later updates do not
    /// change a snapshot).
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>, candle_core::Error> {
        self.params.iter().map(|p| Ok((p.name.clone(), p.var.as_tensor().copy()?.detach()))).collect()
    }

    /// Save every parameter to a safetensors file (atomically: temp file + rename).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tensors = self.snapshot()?;
        crate::fsutil::write_atomic_with(path, |tmp| candle_core::safetensors::save(&tensors, tmp).map_err(Into::into))
    }

    /// Load the values a checkpoint has, by name: every tensor in the file must exist in the
    /// model with the same shape (all mismatches reported together); parameters the file
    /// lacks keep their values and are returned.
    pub fn load_present(&self, path: &Path) -> anyhow::Result<Vec<String>> {
        self.load_selected(path, |_| true)
    }

    /// [`ParamStore::load_present`] restricted to the file's tensors whose names `select`
    /// accepts; the others are ignored.
    pub fn load_selected(&self, path: &Path, select: impl Fn(&str) -> bool) -> anyhow::Result<Vec<String>> {
        let device = self.params.first().map(|p| p.var.device().clone()).unwrap_or(Device::Cpu);
        let mut loaded = candle_core::safetensors::load(path, &device)
            .map_err(|e| anyhow::anyhow!("cannot read checkpoint {}: {e}", path.display()))?;
        loaded.retain(|name, _| select(name));
        if loaded.is_empty() {
            anyhow::bail!("checkpoint {} has no tensor the selection takes", path.display());
        }
        let mut problems = Vec::new();
        for (name, t) in &loaded {
            match self.get(name) {
                None => problems.push(format!("unexpected: {name} {:?}", t.dims())),
                Some(p) if p.var.dims() != t.dims() => problems.push(format!(
                    "mis-shaped: {name} is {:?} in the file, {:?} in the model",
                    t.dims(),
                    p.var.dims()
                )),
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            problems.sort();
            anyhow::bail!("checkpoint {} does not fit the model:\n  {}", path.display(), problems.join("\n  "));
        }
        let mut absent = Vec::new();
        self.note_write();
        for p in &self.params {
            match loaded.get(&p.name) {
                Some(t) => p.var.set(&t.to_dtype(p.var.dtype())?)?,
                None => absent.push(p.name.clone()),
            }
        }
        Ok(absent)
    }

    /// Load values by name. Every name in the file must exist with the same shape, and every
    /// parameter must be present; all mismatches are reported together.
    pub fn load(&self, path: &Path) -> anyhow::Result<()> {
        self.load_ignoring(path, |_| false)
    }

    /// [`ParamStore::load`], with the file's tensors that `ignore` names left out (a run's
    /// strategy parameters, e.g. CKC's projector, when only its model is wanted).
    pub fn load_ignoring(&self, path: &Path, ignore: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        let device = self.params.first().map(|p| p.var.device().clone()).unwrap_or(Device::Cpu);
        let mut loaded = candle_core::safetensors::load(path, &device)
            .map_err(|e| anyhow::anyhow!("cannot read checkpoint {}: {e}", path.display()))?;
        loaded.retain(|name, _| !ignore(name));
        let mut problems = Vec::new();
        for p in &self.params {
            match loaded.get(&p.name) {
                None => problems.push(format!("missing: {} {:?}", p.name, p.var.dims())),
                Some(t) if t.dims() != p.var.dims() => problems.push(format!(
                    "mis-shaped: {} is {:?} in the file, {:?} in the model",
                    p.name,
                    t.dims(),
                    p.var.dims()
                )),
                Some(_) => {}
            }
        }
        for (name, t) in &loaded {
            if !self.by_name.contains_key(name) {
                problems.push(format!("unexpected: {name} {:?}", t.dims()));
            }
        }
        if !problems.is_empty() {
            problems.sort();
            anyhow::bail!("checkpoint {} does not fit the model:\n  {}", path.display(), problems.join("\n  "));
        }
        self.note_write();
        for p in &self.params {
            p.var.set(&loaded[&p.name].to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn store(shapes: &[(&str, &[usize])]) -> ParamStore {
        let mut rng = StdRng::seed_from_u64(1);
        let mut s = ParamStore::default();
        for (name, shape) in shapes {
            let t = init_tensor(ParamInit::normal(0.0, 1.0), shape, DType::F32, &Device::Cpu, &mut rng).unwrap();
            s.insert(Param {
                name: name.to_string(),
                var: Var::from_tensor(&t).unwrap(),
                trainable: true,
                init: ParamInit::zeros(),
            });
        }
        s
    }

    #[test]
    fn save_load_round_trip_and_mismatches_listed_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let a = store(&[("w", &[2, 3]), ("b", &[3])]);
        a.save(&path).unwrap();
        let b = store(&[("w", &[2, 3]), ("b", &[3])]);
        b.load(&path).unwrap();
        let get = |s: &ParamStore, n: &str| {
            s.get(n).unwrap().var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(get(&a, "w"), get(&b, "w"));

        let c = store(&[("w", &[3, 2]), ("extra", &[1])]);
        let e = c.load(&path).unwrap_err().to_string();
        for needle in
            ["mis-shaped: w is [2, 3] in the file, [3, 2] in the model", "missing: extra [1]", "unexpected: b [3]"]
        {
            assert!(e.contains(needle), "`{needle}` not in: {e}");
        }
        std::fs::write(&path, b"not a safetensors file").unwrap();
        let e = b.load(&path).unwrap_err().to_string();
        assert!(e.contains("cannot read checkpoint") && e.contains("ckpt.safetensors"), "{e}");
    }
}
