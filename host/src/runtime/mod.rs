//! The candle runtime behind the host-function table.
//!
//! [`Runtime`] owns the device, every live tensor handed to plugins ([`store`]), every
//! parameter ([`params`]), the adaptable linear sites and the adapters attached to them.
//! Plugins reach it through a per-instance [`PluginCtx`]; [`table`] holds the `extern "C"`
//! functions. Single-threaded by design: the graph of one training step is built on one thread.

pub mod adamw;
pub mod checkpoint_file;
pub mod counters;
pub mod fused;
pub mod host_copies;
pub mod ops;
pub mod params;
pub mod store;
pub mod table;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use recall_sdk::abi::{AdapterFnsRef, HostCtx, HostHandle, StatePtr, TensorId};
use recall_sdk::ParamInit;

use checkpoint_file::CheckpointFile;
use params::{init_tensor, Param, ParamStore};
use store::TensorStore;

/// An adaptable linear layer declared by an encoder.
#[derive(Clone)]
pub struct LinearSite {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub in_features: usize,
    pub out_features: usize,
}

/// An adapter attached to the runtime: `linear` asks it for a delta on every site call.
#[derive(Clone)]
pub struct AdapterHook {
    pub plugin: String,
    pub fns: AdapterFnsRef,
    pub state: StatePtr,
    pub handle: HostHandle,
    pub key: usize,
}

/// Everything the host owns for one model.
pub struct Runtime {
    device: Device,
    float: DType,
    /// The dtype matmul-like ops compute in: `float` (full precision) or lower (bf16/f16
    /// mixed precision, with `float` master weights).
    compute: Cell<DType>,
    /// Under mixed precision, what each parameter's handles stand for now: a cast of the
    /// master weight taken at the start of the step (see `refresh_views`).
    views: RefCell<HashMap<String, Tensor>>,
    /// What the frozen parameters' views were last made for: the store's write count, the
    /// compute dtype and the number of frozen parameters. While it holds, their casts stand.
    frozen_views_of: Cell<Option<(u64, DType, usize)>>,
    store: RefCell<TensorStore>,
    params: RefCell<ParamStore>,
    sites: RefCell<Vec<LinearSite>>,
    adapters: RefCell<Vec<AdapterHook>>,
    rng: RefCell<StdRng>,
    training: Cell<bool>,
    /// Checkpoint files opened for plugins, by the reference they were asked for.
    checkpoints: RefCell<HashMap<String, Rc<CheckpointFile>>>,
    /// Gradients of the latest backward pass, while strategy hooks that read them run.
    grads: RefCell<Option<candle_core::backprop::GradStore>>,
}

/// The state behind one plugin instance's `HostCtx`: which runtime, which parameter scope,
/// and the plugin's name for error messages.
pub struct PluginCtx {
    pub runtime: Rc<Runtime>,
    pub scope: String,
    pub plugin: String,
    /// Side outputs the plugin published (`emit`) during its latest call.
    pub emitted: RefCell<Vec<(String, Tensor)>>,
}

impl PluginCtx {
    /// The handle to pass to this instance's functions. The box must outlive every call made
    /// with the handle; plugin wrappers keep it next to the instance state.
    pub fn handle(self: &std::pin::Pin<Box<Self>>) -> HostHandle {
        HostHandle { api: table::host_api(), ctx: HostCtx { ptr: &**self as *const PluginCtx as *const c_void } }
    }

    pub fn scoped(&self, name: &str) -> String {
        format!("{}{}", self.scope, name)
    }
}

/// Device memory in use now (CUDA: total minus free, as the driver reports it); `None` on
/// the CPU.
pub fn device_memory_in_use(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Ok(d) = device.as_cuda_device() {
        return d.cuda_stream().context().mem_get_info().ok().map(|(free, total)| (total - free) as u64);
    }
    let _ = device;
    None
}

/// Memory a new allocation can still get: Linux's `MemAvailable` on the CPU, the driver's
/// free memory on CUDA; `None` where unknown (no limit is then enforced).
pub fn memory_available(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Ok(d) = device.as_cuda_device() {
        return d.cuda_stream().context().mem_get_info().ok().map(|(free, _)| free as u64);
    }
    if !matches!(device, Device::Cpu) {
        return None;
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `1.5 GiB`, `320.0 MiB`.
pub fn human_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let b = b as f64;
    if b >= GIB {
        format!("{:.1} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

/// The machine a run ran on, for run.json: the OS and architecture, the CPU's model and
/// its logical cores, the cores this process may use, the memory, and, where the NVIDIA
/// driver is loaded, its version and each GPU's model (read from `/proc`, so no CUDA build is
/// needed to record them). Unknown fields are left out.
pub fn host_info() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let field = |text: &str, key: &str| {
        text.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string())
    };
    let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
    let mut host = serde_json::json!({
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "logical_cores": cpuinfo.lines().filter(|l| l.starts_with("processor")).count(),
        "usable_cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    if let Some(model) = field(&cpuinfo, "model name") {
        host["cpu"] = model.into();
    }
    if let Some(mem) = read("/proc/meminfo").and_then(|m| field(&m, "MemTotal")) {
        host["memory"] = mem.into();
    }
    if let Some(driver) = read("/proc/driver/nvidia/version") {
        host["nvidia_driver"] = driver.lines().next().unwrap_or_default().trim().into();
        let gpus: Vec<String> = std::fs::read_dir("/proc/driver/nvidia/gpus")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|d| read(&d.path().join("information").display().to_string()))
            .filter_map(|info| field(&info, "Model"))
            .collect();
        host["gpus"] = gpus.into();
    }
    host
}

/// The process's peak resident memory (Linux `VmHWM`), if known.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Runtime {
    pub fn new(device: Device, float: DType, seed: u64) -> Rc<Self> {
        Rc::new(Runtime {
            device,
            float,
            compute: Cell::new(float),
            views: RefCell::default(),
            frozen_views_of: Cell::new(None),
            store: RefCell::default(),
            params: RefCell::default(),
            sites: RefCell::default(),
            adapters: RefCell::default(),
            rng: RefCell::new(StdRng::seed_from_u64(seed)),
            training: Cell::new(false),
            checkpoints: RefCell::default(),
            grads: RefCell::default(),
        })
    }

    /// A context for a plugin instance whose parameters live under `scope` (e.g. `vision.`).
    pub fn context(self: &Rc<Self>, plugin: &str, scope: &str) -> std::pin::Pin<Box<PluginCtx>> {
        Box::pin(PluginCtx {
            runtime: self.clone(),
            scope: scope.to_string(),
            plugin: plugin.to_string(),
            emitted: RefCell::default(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The floating-point dtype of parameters (the master weights) and optimizer state.
    pub fn float_dtype(&self) -> DType {
        self.float
    }

    /// The dtype matmul-like ops and inputs use: `float_dtype` unless mixed precision is on.
    pub fn compute_dtype(&self) -> DType {
        self.compute.get()
    }

    /// Whether ops compute below the parameters' precision.
    pub fn is_mixed(&self) -> bool {
        self.compute.get() != self.float
    }

    /// Compute in `dtype` from now on (the parameters' own dtype turns mixed precision off).
    /// Parameter handles are re-pointed at once; see [`Runtime::refresh_views`].
    pub fn set_compute_dtype(&self, dtype: DType) -> Result<(), String> {
        if !dtype.is_float() {
            return Err(format!("compute dtype must be a float type, not {dtype:?}"));
        }
        self.compute.set(dtype);
        self.refresh_views()
    }

    /// Point every parameter's handles (and linear sites) at a fresh cast of its master
    /// weight in the compute dtype: differentiable for trainable parameters (gradients reach
    /// the master in full precision), constant for frozen ones. Call once per step under
    /// mixed precision, after the optimizer moved the masters; with full precision it restores
    /// the masters themselves (detached views for frozen parameters).
    ///
    /// Frozen parameters are cast again only when a master was written outside the optimizer
    /// since their last cast ([`ParamStore::note_write`]), the compute dtype changed or a
    /// parameter was frozen: with LoRA and a frozen old model they are nearly all the weights,
    /// and a cast of each every step costs as much memory traffic as the optimizer.
    pub fn refresh_views(&self) -> Result<(), String> {
        let compute = self.compute.get();
        let mut params = self.params.borrow_mut();
        let mut views = self.views.borrow_mut();
        let mut swap: HashMap<candle_core::TensorId, Tensor> = HashMap::new();
        let mut aliases = Vec::new();
        let frozen_now = (params.writes(), compute, params.iter().filter(|p| !p.trainable).count());
        let frozen_current = self.frozen_views_of.replace(Some(frozen_now)) == Some(frozen_now);
        for p in params.iter().filter(|p| p.trainable || !frozen_current) {
            let master = if p.trainable { p.var.as_tensor().clone() } else { p.var.as_tensor().detach() };
            let new =
                if compute == self.float { master } else { master.to_dtype(compute).map_err(|e| e.to_string())? };
            let old = views.get(&p.name).cloned();
            // Handles may hold the master, its frozen view or the previous cast.
            for t in [Some(p.var.as_tensor().clone()), old.clone()].into_iter().flatten() {
                swap.insert(t.id(), new.clone());
            }
            aliases.push((p.name.clone(), old, new.clone()));
            views.insert(p.name.clone(), new);
        }
        for (name, old, new) in &aliases {
            // One alias per parameter: the superseded cast goes, or the lookup table would
            // grow by every parameter every step.
            if let Some(old) = old {
                params.unalias(old);
            }
            params.alias(name, new);
        }
        drop(params);
        let lookup = |t: &Tensor| swap.get(&t.id()).cloned();
        self.store.borrow_mut().substitute(lookup);
        for site in self.sites.borrow_mut().iter_mut() {
            if let Some(w) = lookup(&site.weight) {
                site.weight = w;
            }
            if let Some(b) = site.bias.as_ref().and_then(lookup) {
                site.bias = Some(b);
            }
        }
        Ok(())
    }

    /// The full-precision master of `t` when `t` is a parameter's cast under mixed precision
    /// (differentiable for a trainable parameter, constant for a frozen one); `None` for
    /// anything else, the master itself included. Precision-sensitive ops (normalisation,
    /// softmax, reductions) read the masters, as torch.autocast's ops read the f32 weights,
    /// instead of a round trip through the low-precision cast.
    pub fn master_of(&self, t: &Tensor) -> Option<Tensor> {
        let params = self.params.borrow();
        let p = params.by_tensor(t)?;
        let master = p.var.as_tensor();
        if master.id() == t.id() || t.dtype() == master.dtype() {
            return None;
        }
        Some(if p.trainable { master.clone() } else { master.detach() })
    }

    pub fn set_training(&self, training: bool) {
        self.training.set(training)
    }

    pub fn is_training(&self) -> bool {
        self.training.get()
    }

    /// Re-seed the runtime's generator (dropout masks, re-initialisation).
    pub fn reseed(&self, seed: u64) {
        *self.rng.borrow_mut() = StdRng::seed_from_u64(seed);
    }

    // ---- handles ----

    pub fn insert(&self, t: Tensor) -> TensorId {
        self.store.borrow_mut().insert(t)
    }

    pub fn get(&self, id: TensorId) -> Result<Tensor, String> {
        self.store.borrow().get(id)
    }

    pub fn release(&self, id: TensorId) -> Option<Tensor> {
        self.store.borrow_mut().release(id)
    }

    /// Take the tensor behind a handle a plugin returned, releasing the handle.
    pub fn take(&self, id: TensorId) -> Result<Tensor, String> {
        let t = self.get(id)?;
        self.release(id);
        Ok(t)
    }

    pub fn live_handles(&self) -> usize {
        self.store.borrow().live()
    }

    // ---- parameters ----

    /// Get or create a parameter by full name.
    pub fn param(&self, name: &str, shape: &[usize], init: ParamInit, trainable: bool) -> Result<Tensor, String> {
        if let Some(p) = self.params.borrow().get(name) {
            if p.var.dims() != shape {
                return Err(format!(
                    "parameter `{name}` already exists with shape {:?}, requested {shape:?}",
                    p.var.dims()
                ));
            }
            return Ok(p.var.as_tensor().clone());
        }
        self.check_parameter_memory(name, shape, trainable)?;
        let value = init_tensor(init, shape, self.float, &self.device, &mut self.rng.borrow_mut())?;
        let var = Var::from_tensor(&value).map_err(|e| e.to_string())?;
        let t = var.as_tensor().clone();
        self.params.borrow_mut().insert(Param { name: name.to_string(), var, trainable, init });
        Ok(t)
    }

    /// Refuse a parameter when the model's parameters alone could not train in the memory
    /// the device has: a trainable value costs itself, its gradient and AdamW's two moments
    /// (4x), a frozen one itself. Far cheaper than meeting the kernel's OOM killer halfway
    /// through building the model; activations come on top and are not estimated here.
    fn check_parameter_memory(&self, name: &str, shape: &[usize], trainable: bool) -> Result<(), String> {
        let Some(available) = memory_available(&self.device) else { return Ok(()) };
        let size = self.float.size_in_bytes() as u64;
        let bytes = |p: &Param| p.var.elem_count() as u64 * size;
        let store = self.params.borrow();
        let allocated: u64 = store.iter().map(bytes).sum();
        let needed_by = |p: &Param| if p.trainable { 4 * bytes(p) } else { bytes(p) };
        let new = shape.iter().map(|&d| d as u64).product::<u64>() * size;
        let needed = store.iter().map(needed_by).sum::<u64>() + if trainable { 4 * new } else { new };
        // What is allocated already counts as available to the model.
        if needed > available + allocated {
            return Err(format!(
                "the model does not fit: with parameter `{name}` {shape:?} its parameters need {} to train \
                 (values, and for trainable ones gradients and AdamW's two moments), but the {} has {} \
                 available; shrink the model (width, layers, adapter rank) or use a larger device",
                human_bytes(needed),
                if matches!(self.device, Device::Cpu) { "machine" } else { "device" },
                human_bytes(available + allocated)
            ));
        }
        Ok(())
    }

    pub fn params(&self) -> std::cell::Ref<'_, ParamStore> {
        self.params.borrow()
    }

    pub fn params_mut(&self) -> std::cell::RefMut<'_, ParamStore> {
        self.params.borrow_mut()
    }

    /// Re-run a parameter's initialiser.
    pub fn param_reset(&self, t: &Tensor) -> Result<(), String> {
        let params = self.params.borrow();
        let p = params.by_tensor(t).ok_or("param_reset: the tensor is not a parameter")?;
        let value = init_tensor(p.init, p.var.dims(), self.float, &self.device, &mut self.rng.borrow_mut())?;
        params.note_write();
        p.var.set(&value).map_err(|e| e.to_string())
    }

    /// Overwrite a parameter's value in place.
    pub fn param_assign(&self, target: &Tensor, value: &Tensor) -> Result<(), String> {
        let params = self.params.borrow();
        let p = params.by_tensor(target).ok_or("param_assign: the target is not a parameter")?;
        if value.dims() != p.var.dims() {
            return Err(format!("param_assign: `{}` is {:?}, value is {:?}", p.name, p.var.dims(), value.dims()));
        }
        let value = value.detach().to_dtype(p.var.dtype()).map_err(|e| e.to_string())?;
        params.note_write();
        p.var.set(&value).map_err(|e| e.to_string())
    }

    /// Make frozen parameters constants in the graph: every handle, linear site and alias of a
    /// non-trainable parameter now refers to a detached view of its storage (updates through
    /// `Var::set` — merges, checkpoint loads — stay visible), so backward passes no longer
    /// walk frozen towers. Returns how many parameters were detached.
    pub fn detach_frozen(&self) -> usize {
        let mut params = self.params.borrow_mut();
        params.note_write();
        let mut views: HashMap<candle_core::TensorId, Tensor> = HashMap::new();
        let mut names = Vec::new();
        for p in params.iter().filter(|p| !p.trainable) {
            let view = p.var.as_tensor().detach();
            views.insert(p.var.as_tensor().id(), view.clone());
            names.push((p.name.clone(), view));
        }
        for (name, view) in &names {
            params.alias(name, view);
            self.views.borrow_mut().insert(name.clone(), view.clone());
        }
        let swap = |t: &Tensor| views.get(&t.id()).cloned();
        self.store.borrow_mut().substitute(swap);
        for site in self.sites.borrow_mut().iter_mut() {
            if let Some(w) = swap(&site.weight) {
                site.weight = w;
            }
            if let Some(b) = site.bias.as_ref().and_then(swap) {
                site.bias = Some(b);
            }
        }
        views.len()
    }

    /// Expose (or, with `None`, withdraw) the gradients strategies may read.
    pub fn set_grads(
        &self,
        grads: Option<candle_core::backprop::GradStore>,
    ) -> Option<candle_core::backprop::GradStore> {
        std::mem::replace(&mut *self.grads.borrow_mut(), grads)
    }

    /// The gradient of parameter `t` from the exposed gradients.
    pub fn grad_of(&self, t: &Tensor) -> Result<Option<Tensor>, String> {
        let params = self.params.borrow();
        let p = params.by_tensor(t).ok_or("grad: the tensor is not a model parameter")?;
        let grads = self.grads.borrow();
        let g = grads.as_ref().ok_or("grad: no gradients now; they exist in after_backward and on_gradients")?;
        Ok(g.get(p.var.as_tensor()).cloned())
    }

    /// Every parameter's value by name, copied.
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>, String> {
        self.params.borrow().snapshot().map_err(|e| e.to_string())
    }

    // ---- checkpoints ----

    /// A checkpoint file (`path` or `path#key`, see [`checkpoint_file`]), opened once and
    /// kept for later lookups.
    pub fn checkpoint(&self, reference: &str) -> Result<Rc<CheckpointFile>, String> {
        if let Some(c) = self.checkpoints.borrow().get(reference) {
            return Ok(c.clone());
        }
        let file = Rc::new(CheckpointFile::open(reference)?);
        self.checkpoints.borrow_mut().insert(reference.to_string(), file.clone());
        Ok(file)
    }

    /// Names, shapes and dtypes of a checkpoint's tensors, sorted by name.
    pub fn checkpoint_index(&self, reference: &str) -> Result<Vec<(String, Vec<usize>, DType)>, String> {
        self.checkpoint(reference)?
            .index()
            .into_iter()
            .map(|(name, shape, dtype)| {
                let dtype = dtype.map_err(|e| format!("checkpoint {reference}: tensor {name}: {e}"))?;
                Ok((name, shape, dtype))
            })
            .collect()
    }

    /// One checkpoint tensor on the runtime's device; floats in the runtime's float dtype.
    pub fn checkpoint_tensor(&self, reference: &str, name: &str) -> Result<Tensor, String> {
        let t = self
            .checkpoint(reference)?
            .load(name, &self.device)
            .map_err(|e| format!("checkpoint {reference}: tensor `{name}`: {e}"))?;
        if t.dtype().is_float() {
            t.to_dtype(self.float).map_err(|e| e.to_string())
        } else {
            Ok(t)
        }
    }

    // ---- linear sites and adapters ----

    pub fn declare_linear(
        &self,
        name: &str,
        in_f: usize,
        out_f: usize,
        bias: bool,
        w_init: ParamInit,
        b_init: ParamInit,
    ) -> Result<u32, String> {
        if self.sites.borrow().iter().any(|s| s.name == name) {
            return Err(format!("linear site `{name}` is declared twice"));
        }
        let weight = self.param(&format!("{name}.weight"), &[out_f, in_f], w_init, true)?;
        let bias = if bias { Some(self.param(&format!("{name}.bias"), &[out_f], b_init, true)?) } else { None };
        let mut sites = self.sites.borrow_mut();
        sites.push(LinearSite { name: name.to_string(), weight, bias, in_features: in_f, out_features: out_f });
        Ok((sites.len() - 1) as u32)
    }

    pub fn sites(&self) -> Vec<LinearSite> {
        self.sites.borrow().clone()
    }

    pub fn site(&self, id: u32) -> Result<LinearSite, String> {
        self.sites.borrow().get(id as usize).cloned().ok_or_else(|| format!("unknown linear site id {id}"))
    }

    pub fn attach_adapter(&self, hook: AdapterHook) {
        self.adapters.borrow_mut().push(hook);
    }

    pub fn detach_adapter(&self, key: usize) {
        self.adapters.borrow_mut().retain(|h| h.key != key);
    }

    /// `x W^T + b` plus every attached adapter's delta. No borrow is held while adapters run
    /// (they call back into the runtime).
    pub fn linear(&self, site_id: u32, x_id: TensorId) -> Result<Tensor, String> {
        let site = self.site(site_id)?;
        let mut x = self.get(x_id)?;
        if x.dtype() != site.weight.dtype() && x.dtype().is_float() {
            x = x.to_dtype(site.weight.dtype()).map_err(|e| e.to_string())?;
        }
        let hooks: Vec<AdapterHook> = self.adapters.borrow().clone();
        let mut deltas = Vec::new();
        for hook in hooks {
            let delta = (hook.fns.delta())(hook.state, hook.handle, site_id, x_id)
                .into_result()
                .map_err(|e| e.message.into_string())?;
            if let Some(id) = delta.into_option() {
                deltas.push(self.take(id)?);
            }
        }
        ops::linear_plus(&x, &site.weight, site.bias.as_ref(), &deltas)
            .map_err(|e| format!("linear `{}` with its adapter deltas: {e}", site.name))
    }

    /// A Bernoulli keep-mask for dropout.
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor, String> {
        if !(0.0..1.0).contains(&p) {
            return Err(format!("dropout probability must be in [0, 1), got {p}"));
        }
        if !self.is_training() || p == 0.0 {
            return Ok(x.clone());
        }
        let mut rng = self.rng.borrow_mut();
        let keep: Vec<f32> = (0..x.elem_count()).map(|_| if rng.random::<f64>() >= p { 1.0 } else { 0.0 }).collect();
        ops::dropout_with_mask(x, keep, p).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_precision_views_replace_each_other_and_return_to_the_masters() {
        let rt = Runtime::new(Device::Cpu, DType::F32, 0);
        let w = rt.param("w", &[2, 3], ParamInit::normal(0.0, 1.0), true).unwrap();
        let f = rt.param("f", &[3], ParamInit::normal(0.0, 1.0), false).unwrap();
        rt.detach_frozen();
        let (hw, hf) = (rt.insert(w.clone()), rt.insert(f));
        rt.set_compute_dtype(DType::BF16).unwrap();
        let first = rt.get(hw).unwrap();
        assert_eq!(first.dtype(), DType::BF16);
        for _ in 0..5 {
            rt.refresh_views().unwrap();
        }
        let now = rt.get(hw).unwrap();
        assert_eq!(rt.params().by_tensor(&now).map(|p| p.name.as_str()), Some("w"), "the current cast stands for w");
        assert!(rt.params().by_tensor(&first).is_none(), "a superseded cast is forgotten");
        assert_eq!(rt.get(hf).unwrap().dtype(), DType::BF16);
        rt.set_compute_dtype(DType::F32).unwrap();
        assert_eq!(rt.get(hw).unwrap().id(), w.id(), "full precision hands out the master itself");
        assert!(rt.params().by_tensor(&w).is_some());
    }

    #[test]
    fn precision_sensitive_ops_read_a_parameters_master_not_its_cast() {
        let rt = Runtime::new(Device::Cpu, DType::F32, 0);
        // 1 + 2^-10 is not a bf16 number: a round trip through the cast would make it 1.
        let w = rt.param("ln.weight", &[4], ParamInit::zeros(), true).unwrap();
        rt.params()
            .get("ln.weight")
            .unwrap()
            .var
            .set(&Tensor::full(1.0f32 + 1.0 / 1024.0, 4, &Device::Cpu).unwrap())
            .unwrap();
        let h = rt.insert(w.clone());
        rt.set_compute_dtype(DType::BF16).unwrap();
        let cast = rt.get(h).unwrap();
        assert_eq!(cast.dtype(), DType::BF16);
        let master = rt.master_of(&cast).expect("the cast stands for a parameter");
        assert_eq!(master.id(), w.id(), "the trainable master itself, so its gradient is the master's");
        assert_eq!(master.to_vec1::<f32>().unwrap(), [1.0 + 1.0 / 1024.0; 4]);
        assert!(rt.master_of(&w).is_none() && rt.master_of(&cast.to_dtype(DType::F32).unwrap()).is_none());
    }

    #[test]
    fn frozen_casts_are_kept_until_a_master_is_written() {
        let rt = Runtime::new(Device::Cpu, DType::F32, 0);
        let f = rt.param("f", &[3], ParamInit::normal(0.0, 1.0), false).unwrap();
        rt.detach_frozen();
        let hf = rt.insert(f.clone());
        rt.set_compute_dtype(DType::BF16).unwrap();
        let cast = rt.get(hf).unwrap();
        rt.refresh_views().unwrap();
        rt.refresh_views().unwrap();
        assert_eq!(rt.get(hf).unwrap().id(), cast.id(), "an unchanged frozen master is not cast again");
        let value = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        rt.param_assign(&rt.get(hf).unwrap(), &value).unwrap();
        rt.refresh_views().unwrap();
        let now = rt.get(hf).unwrap();
        assert_ne!(now.id(), cast.id(), "a written master is cast again");
        assert_eq!(now.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), [1.0, 2.0, 3.0]);
        // A load through the store counts as a write too.
        rt.params().note_write();
        rt.refresh_views().unwrap();
        assert_ne!(rt.get(hf).unwrap().id(), now.id());
    }
}
