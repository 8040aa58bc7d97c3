//! The plugin-kind traits plugin authors implement, and the generic `extern "C"` shims that
//! adapt them to the function tables in [`crate::abi`].
//!
//! Every shim runs the plugin's code inside `catch_unwind`: a panic becomes a
//! [`PluginError`] naming the plugin and the function instead of aborting the host. State lives
//! in a `Box<RefCell<T>>` so that an accidental re-entrant call into the same instance is an
//! error ("already borrowed"), never undefined behaviour.

use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{RNone, ROption, RSlice, RSome, RStr, RString, RVec};
use serde::de::DeserializeOwned;

use crate::abi::*;
use crate::config::parse_config;
use crate::error::{panic_message, Error, Result};
use crate::tensor::{Host, Tensor};

/// A text tokenizer.
pub trait Tokenizer: Sized + 'static {
    type Config: DeserializeOwned;
    fn create(host: &Host, config: Self::Config) -> Result<Self>;
    fn vocab_size(&self) -> usize;
    /// Encode `texts` at `context_length` tokens (`None`: the tokenizer's default).
    fn encode(&self, texts: &[&str], context_length: Option<usize>) -> Result<TokenBatch>;
}

/// A tower that maps a batch of inputs to features with the host's ops.
pub trait Encoder: Sized + 'static {
    type Config: DeserializeOwned;
    /// Declare parameters (`host.param`, `host.declare_linear`) and keep their handles.
    fn create(host: &Host, config: Self::Config) -> Result<Self>;
    fn spec(&self) -> EncoderSpec;
    /// Inputs by name (`pixel_values` [B,3,H,W], `input_ids` [B,L], `attention_mask` [B,L])
    /// -> features [B, embed_dim].
    fn forward(&self, host: &Host, inputs: &[NamedTensor]) -> Result<Tensor>;
}

/// Parameter-efficient adapter on declared linear sites (LoRA and friends).
pub trait Adapter: Sized + 'static {
    type Config: DeserializeOwned;
    fn create(host: &Host, config: Self::Config, sites: &[SiteInfo]) -> Result<Self>;
    /// Ids of the sites this adapter attached to.
    fn targets(&self) -> Vec<u32>;
    /// The delta added to `linear(site, x)`; `None` for sites not adapted.
    fn delta(&self, host: &Host, site: u32, x: &Tensor) -> Result<Option<Tensor>>;
    /// Fold the adapter into the base weights with `coefficient`.
    fn merge(&mut self, host: &Host, coefficient: f64) -> Result<()>;
    /// Start afresh (new adapter for the next task).
    fn reset(&mut self, host: &Host) -> Result<()>;
}

/// When a strategy's gradient pass runs (see [`Strategy::gradient_pass`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradientPass {
    /// After the task: the trained model, on the task's training data.
    AfterTask,
    /// Before the task trains: the model it starts from, on the task's held-out split.
    BeforeTask,
}

impl GradientPass {
    /// The ABI code (`GRADIENT_PASS_*`).
    pub fn code(self) -> u32 {
        match self {
            GradientPass::AfterTask => GRADIENT_PASS_AFTER_TASK,
            GradientPass::BeforeTask => GRADIENT_PASS_BEFORE_TASK,
        }
    }
    /// The pass of an ABI code; `None` for a code this SDK does not know.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            GRADIENT_PASS_AFTER_TASK => Some(GradientPass::AfterTask),
            GRADIENT_PASS_BEFORE_TASK => Some(GradientPass::BeforeTask),
            _ => None,
        }
    }
}

/// A consolidation strategy. Every hook has a no-op default; override what you need.
pub trait Strategy: Sized + 'static {
    type Config: DeserializeOwned;
    fn create(host: &Host, config: Self::Config) -> Result<Self>;
    fn before_task(&mut self, _host: &Host, _task: &TaskInfo) -> Result<()> {
        Ok(())
    }
    fn before_step(&mut self, _host: &Host, _step: u64) -> Result<()> {
        Ok(())
    }
    /// Extra named loss terms, added by the host to the task loss before the one backward
    /// pass. Inputs: `image_features`, `text_features`, `logit_scale`, and the batch tensors.
    fn loss_terms(&mut self, _host: &Host, _inputs: &[NamedTensor]) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
    fn after_backward(&mut self, _host: &Host, _step: u64) -> Result<()> {
        Ok(())
    }
    fn after_step(&mut self, _host: &Host, _step: u64) -> Result<()> {
        Ok(())
    }
    fn after_task(&mut self, _host: &Host, _task: &TaskInfo) -> Result<()> {
        Ok(())
    }
    /// How many batches to compute gradients of (the task loss only, parameters unchanged);
    /// each is followed by `on_gradients`. When, and on which data, is [`Self::gradient_pass`].
    /// EWC uses it for the Fisher information.
    fn gradient_batches(&self) -> usize {
        0
    }
    /// When the gradient pass runs: by default after the task (the trained model, the task's
    /// training data, before `after_task`); [`GradientPass::BeforeTask`]: after
    /// `before_task`, on the model the task starts from and the task's held-out split.
    fn gradient_pass(&self) -> GradientPass {
        GradientPass::AfterTask
    }
    /// Called after each backward pass requested by `gradient_batches`; read gradients with
    /// `Host::grad`.
    fn on_gradients(&mut self, _host: &Host, _task: &TaskInfo, _batch: u64) -> Result<()> {
        Ok(())
    }
    /// Serialised strategy state for resuming a run after a finished task. Parameters the
    /// strategy declared with `Host::param` are saved by the host; tensors it keeps itself
    /// (a Fisher, a snapshot of weights) belong here: see [`crate::state`].
    fn save_state(&self, _host: &Host) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
    fn load_state(&mut self, _host: &Host, _bytes: &[u8]) -> Result<()> {
        Ok(())
    }
    /// Return true to receive `old_image_features` and `old_text_features` (the model as it
    /// was at the end of the previous task, on the current batch) in `loss_terms`.
    fn wants_old_model(&self) -> bool {
        false
    }
    /// Return true to receive, in `loss_terms`, a reference batch (the experiment's
    /// `[reference]` data, else the current batch) encoded by the model being trained
    /// (`reference_image_features`, `reference_text_features`) and by the frozen model as it
    /// was before the first task (`initial_image_features`, `initial_text_features`,
    /// `initial_logit_scale`), as ZSCL distils from it.
    fn wants_initial_model(&self) -> bool {
        false
    }
    /// Return a request to have the host keep an exemplar memory and draw a replay batch
    /// from it at every step (see [`crate::replay`]). Asked once, after `create`.
    fn replay(&self) -> Option<crate::replay::Replay> {
        None
    }
}

/// Computes named metrics from embeddings the host provides.
pub trait Evaluator: Sized + 'static {
    type Config: DeserializeOwned;
    fn create(host: &Host, config: Self::Config) -> Result<Self>;
    fn evaluate(&mut self, host: &Host, inputs: &[NamedTensor]) -> Result<Vec<(String, f64)>>;
}

static PLUGIN_NAME: OnceLock<&'static str> = OnceLock::new();

/// `PluginModule::resolve_config`, which `export_plugin!` writes for the plugin's config type.
pub type ResolveFn = extern "C" fn(RStr<'_>) -> PluginResult<ROption<RString>>;

/// The body of `resolve_config`: the resolver's result across the boundary, a panic caught.
#[doc(hidden)]
pub fn resolve_config_shim(f: impl FnOnce() -> Result<Option<String>>) -> PluginResult<ROption<RString>> {
    guard("resolve_config", || Ok(f()?.map(RString::from).into()))
}

#[doc(hidden)]
pub fn set_plugin_name(name: &'static str) {
    let _ = PLUGIN_NAME.set(name);
}

fn plugin_name() -> &'static str {
    PLUGIN_NAME.get().copied().unwrap_or("<unnamed>")
}

fn to_plugin_error(e: Error) -> PluginError {
    PluginError {
        message: e.message().into(),
        config_key: match e.config_key() {
            Some(k) => RSome(RString::from(k)),
            None => RNone,
        },
    }
}

/// Run plugin code, turning both errors and panics into a `PluginError`.
fn guard<R>(function: &str, f: impl FnOnce() -> Result<R>) -> PluginResult<R> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => ROk(v),
        Ok(Err(e)) => RErr(to_plugin_error(e)),
        Err(payload) => RErr(PluginError {
            message: format!("plugin `{}` panicked in `{function}`: {}", plugin_name(), panic_message(&*payload))
                .into(),
            config_key: RNone,
        }),
    }
}

use abi_stable::std_types::RResult::{RErr, ROk};

fn new_state<T>(value: T) -> StatePtr {
    StatePtr { ptr: Box::into_raw(Box::new(RefCell::new(value))).cast() }
}

/// # Safety
/// `state` must come from `new_state::<T>` and not have been destroyed.
unsafe fn state<'a, T>(state: StatePtr) -> &'a RefCell<T> {
    // SAFETY: guaranteed by the caller; the host passes back only pointers it got from create.
    unsafe { &*(state.ptr as *const RefCell<T>) }
}

fn borrow_input(host: &Host, id: TensorId) -> ManuallyDrop<Tensor> {
    // The host keeps ownership of input handles: never release them from here.
    ManuallyDrop::new(host.adopt(id))
}

fn config<C: DeserializeOwned>(text: RStr<'_>) -> Result<C> {
    parse_config(text.as_str())
}

extern "C" fn destroy<T>(ptr: StatePtr) -> PluginResult<()> {
    guard("destroy", || {
        // SAFETY: the host calls destroy exactly once, with a pointer from create.
        drop(unsafe { Box::from_raw(ptr.ptr as *mut RefCell<T>) });
        Ok(())
    })
}

// ---- tokenizer ----

extern "C" fn tokenizer_create<T: Tokenizer>(h: HostHandle, cfg: RStr<'_>) -> PluginResult<StatePtr> {
    guard("create", || T::create(&Host::from_handle(h), config(cfg)?).map(new_state))
}
extern "C" fn tokenizer_vocab_size<T: Tokenizer>(s: StatePtr) -> PluginResult<u64> {
    // SAFETY: `s` came from tokenizer_create::<T>.
    guard("vocab_size", || Ok(unsafe { state::<T>(s) }.borrow().vocab_size() as u64))
}
extern "C" fn tokenizer_encode<T: Tokenizer>(
    s: StatePtr,
    texts: RSlice<RString>,
    ctx_len: u64,
) -> PluginResult<TokenBatch> {
    guard("encode", || {
        let texts: Vec<&str> = texts.iter().map(|t| t.as_str()).collect();
        let ctx_len = (ctx_len > 0).then_some(ctx_len as usize);
        // SAFETY: `s` came from tokenizer_create::<T>.
        unsafe { state::<T>(s) }.borrow().encode(&texts, ctx_len)
    })
}

#[doc(hidden)]
pub fn tokenizer_module<T: Tokenizer>(
    info: extern "C" fn() -> PluginInfo,
    resolve_config: ResolveFn,
) -> PluginModuleRef {
    let fns = TokenizerFns {
        create: tokenizer_create::<T>,
        destroy: destroy::<T>,
        vocab_size: tokenizer_vocab_size::<T>,
        encode: tokenizer_encode::<T>,
    }
    .leak_into_prefix();
    PluginModule {
        info,
        tokenizer: RSome(fns),
        encoder: RNone,
        adapter: RNone,
        strategy: RNone,
        evaluator: RNone,
        resolve_config,
    }
    .leak_into_prefix()
}

// ---- encoder ----

extern "C" fn encoder_create<T: Encoder>(h: HostHandle, cfg: RStr<'_>) -> PluginResult<StatePtr> {
    guard("create", || T::create(&Host::from_handle(h), config(cfg)?).map(new_state))
}
extern "C" fn encoder_spec<T: Encoder>(s: StatePtr) -> PluginResult<EncoderSpec> {
    // SAFETY: `s` came from encoder_create::<T>.
    guard("spec", || Ok(unsafe { state::<T>(s) }.borrow().spec()))
}
extern "C" fn encoder_forward<T: Encoder>(
    s: StatePtr,
    h: HostHandle,
    inputs: RSlice<NamedTensor>,
) -> PluginResult<TensorId> {
    guard("forward", || {
        // SAFETY: `s` came from encoder_create::<T>.
        let st = unsafe { state::<T>(s) }.borrow();
        st.forward(&Host::from_handle(h), inputs.as_slice()).map(Tensor::into_id)
    })
}

#[doc(hidden)]
pub fn encoder_module<T: Encoder>(info: extern "C" fn() -> PluginInfo, resolve_config: ResolveFn) -> PluginModuleRef {
    let fns = EncoderFns {
        create: encoder_create::<T>,
        destroy: destroy::<T>,
        spec: encoder_spec::<T>,
        forward: encoder_forward::<T>,
    }
    .leak_into_prefix();
    PluginModule {
        info,
        tokenizer: RNone,
        encoder: RSome(fns),
        adapter: RNone,
        strategy: RNone,
        evaluator: RNone,
        resolve_config,
    }
    .leak_into_prefix()
}

// ---- adapter ----

extern "C" fn adapter_create<T: Adapter>(
    h: HostHandle,
    cfg: RStr<'_>,
    sites: RSlice<SiteInfo>,
) -> PluginResult<StatePtr> {
    guard("create", || T::create(&Host::from_handle(h), config(cfg)?, sites.as_slice()).map(new_state))
}
extern "C" fn adapter_targets<T: Adapter>(s: StatePtr) -> PluginResult<RVec<u32>> {
    // SAFETY: `s` came from adapter_create::<T>.
    guard("targets", || Ok(unsafe { state::<T>(s) }.borrow().targets().into()))
}
extern "C" fn adapter_delta<T: Adapter>(
    s: StatePtr,
    h: HostHandle,
    site: u32,
    x: TensorId,
) -> PluginResult<ROption<TensorId>> {
    guard("delta", || {
        let host = Host::from_handle(h);
        let x = borrow_input(&host, x);
        // SAFETY: `s` came from adapter_create::<T>.
        let st = unsafe { state::<T>(s) }.borrow();
        Ok(st.delta(&host, site, &x)?.map(Tensor::into_id).into())
    })
}
extern "C" fn adapter_merge<T: Adapter>(s: StatePtr, h: HostHandle, coefficient: f64) -> PluginResult<()> {
    // SAFETY: `s` came from adapter_create::<T>.
    guard("merge", || unsafe { state::<T>(s) }.borrow_mut().merge(&Host::from_handle(h), coefficient))
}
extern "C" fn adapter_reset<T: Adapter>(s: StatePtr, h: HostHandle) -> PluginResult<()> {
    // SAFETY: `s` came from adapter_create::<T>.
    guard("reset", || unsafe { state::<T>(s) }.borrow_mut().reset(&Host::from_handle(h)))
}

#[doc(hidden)]
pub fn adapter_module<T: Adapter>(info: extern "C" fn() -> PluginInfo, resolve_config: ResolveFn) -> PluginModuleRef {
    let fns = AdapterFns {
        create: adapter_create::<T>,
        destroy: destroy::<T>,
        targets: adapter_targets::<T>,
        delta: adapter_delta::<T>,
        merge: adapter_merge::<T>,
        reset: adapter_reset::<T>,
    }
    .leak_into_prefix();
    PluginModule {
        info,
        tokenizer: RNone,
        encoder: RNone,
        adapter: RSome(fns),
        strategy: RNone,
        evaluator: RNone,
        resolve_config,
    }
    .leak_into_prefix()
}

// ---- strategy ----

extern "C" fn strategy_create<T: Strategy>(h: HostHandle, cfg: RStr<'_>) -> PluginResult<StatePtr> {
    guard("create", || T::create(&Host::from_handle(h), config(cfg)?).map(new_state))
}

macro_rules! strategy_hook {
    ($fn_name:ident, $method:ident, $arg:ty) => {
        extern "C" fn $fn_name<T: Strategy>(s: StatePtr, h: HostHandle, arg: $arg) -> PluginResult<()> {
            // SAFETY: `s` came from strategy_create::<T>.
            guard(stringify!($method), || unsafe { state::<T>(s) }.borrow_mut().$method(&Host::from_handle(h), &arg))
        }
    };
}
strategy_hook!(strategy_before_task, before_task, TaskInfo);
strategy_hook!(strategy_after_task, after_task, TaskInfo);

macro_rules! strategy_step_hook {
    ($fn_name:ident, $method:ident) => {
        extern "C" fn $fn_name<T: Strategy>(s: StatePtr, h: HostHandle, step: u64) -> PluginResult<()> {
            // SAFETY: `s` came from strategy_create::<T>.
            guard(stringify!($method), || unsafe { state::<T>(s) }.borrow_mut().$method(&Host::from_handle(h), step))
        }
    };
}
strategy_step_hook!(strategy_before_step, before_step);
strategy_step_hook!(strategy_after_backward, after_backward);
strategy_step_hook!(strategy_after_step, after_step);

extern "C" fn strategy_loss_terms<T: Strategy>(
    s: StatePtr,
    h: HostHandle,
    inputs: RSlice<NamedTensor>,
) -> PluginResult<RVec<NamedTensor>> {
    guard("loss_terms", || {
        // SAFETY: `s` came from strategy_create::<T>.
        let terms = unsafe { state::<T>(s) }.borrow_mut().loss_terms(&Host::from_handle(h), inputs.as_slice())?;
        Ok(terms.into_iter().map(|(name, t)| NamedTensor { name: name.into(), id: t.into_id() }).collect())
    })
}
extern "C" fn strategy_save_state<T: Strategy>(s: StatePtr, h: HostHandle) -> PluginResult<RVec<u8>> {
    // SAFETY: `s` came from strategy_create::<T>.
    guard("save_state", || unsafe { state::<T>(s) }.borrow().save_state(&Host::from_handle(h)).map(RVec::from))
}
extern "C" fn strategy_load_state<T: Strategy>(s: StatePtr, h: HostHandle, bytes: RSlice<u8>) -> PluginResult<()> {
    // SAFETY: `s` came from strategy_create::<T>.
    guard("load_state", || unsafe { state::<T>(s) }.borrow_mut().load_state(&Host::from_handle(h), bytes.as_slice()))
}

extern "C" fn strategy_gradient_batches<T: Strategy>(s: StatePtr) -> PluginResult<u64> {
    // SAFETY: `s` came from strategy_create::<T>.
    guard("gradient_batches", || Ok(unsafe { state::<T>(s) }.borrow().gradient_batches() as u64))
}

extern "C" fn strategy_gradient_pass<T: Strategy>(s: StatePtr) -> PluginResult<u32> {
    // SAFETY: `s` came from strategy_create::<T>.
    guard("gradient_pass", || Ok(unsafe { state::<T>(s) }.borrow().gradient_pass().code()))
}

extern "C" fn strategy_on_gradients<T: Strategy>(
    s: StatePtr,
    h: HostHandle,
    task: TaskInfo,
    batch: u64,
) -> PluginResult<()> {
    // SAFETY: `s` came from strategy_create::<T>.
    guard("on_gradients", || unsafe { state::<T>(s) }.borrow_mut().on_gradients(&Host::from_handle(h), &task, batch))
}

extern "C" fn strategy_wants_initial_model<T: Strategy>(s: StatePtr) -> PluginResult<bool> {
    // SAFETY: `s` came from strategy_create::<T>.
    guard("wants_initial_model", || Ok(unsafe { state::<T>(s) }.borrow().wants_initial_model()))
}

extern "C" fn strategy_wants_old_model<T: Strategy>(s: StatePtr) -> PluginResult<bool> {
    // SAFETY: `s` came from strategy_create::<T>.
    guard("wants_old_model", || Ok(unsafe { state::<T>(s) }.borrow().wants_old_model()))
}

extern "C" fn strategy_replay<T: Strategy>(s: StatePtr) -> PluginResult<ReplaySpec> {
    // SAFETY: `s` came from strategy_create::<T>.
    guard("replay", || {
        Ok(unsafe { state::<T>(s) }.borrow().replay().map_or_else(crate::replay::no_replay, |r| r.to_spec()))
    })
}

#[doc(hidden)]
pub fn strategy_module<T: Strategy>(info: extern "C" fn() -> PluginInfo, resolve_config: ResolveFn) -> PluginModuleRef {
    let fns = StrategyFns {
        create: strategy_create::<T>,
        destroy: destroy::<T>,
        before_task: strategy_before_task::<T>,
        before_step: strategy_before_step::<T>,
        loss_terms: strategy_loss_terms::<T>,
        after_backward: strategy_after_backward::<T>,
        after_step: strategy_after_step::<T>,
        after_task: strategy_after_task::<T>,
        save_state: strategy_save_state::<T>,
        load_state: strategy_load_state::<T>,
        wants_old_model: strategy_wants_old_model::<T>,
        gradient_batches: strategy_gradient_batches::<T>,
        on_gradients: strategy_on_gradients::<T>,
        wants_initial_model: strategy_wants_initial_model::<T>,
        gradient_pass: strategy_gradient_pass::<T>,
        replay: strategy_replay::<T>,
    }
    .leak_into_prefix();
    PluginModule {
        info,
        tokenizer: RNone,
        encoder: RNone,
        adapter: RNone,
        strategy: RSome(fns),
        evaluator: RNone,
        resolve_config,
    }
    .leak_into_prefix()
}

// ---- evaluator ----

extern "C" fn evaluator_create<T: Evaluator>(h: HostHandle, cfg: RStr<'_>) -> PluginResult<StatePtr> {
    guard("create", || T::create(&Host::from_handle(h), config(cfg)?).map(new_state))
}
extern "C" fn evaluator_evaluate<T: Evaluator>(
    s: StatePtr,
    h: HostHandle,
    inputs: RSlice<NamedTensor>,
) -> PluginResult<RVec<Metric>> {
    guard("evaluate", || {
        // SAFETY: `s` came from evaluator_create::<T>.
        let metrics = unsafe { state::<T>(s) }.borrow_mut().evaluate(&Host::from_handle(h), inputs.as_slice())?;
        Ok(metrics.into_iter().map(|(name, value)| Metric { name: name.into(), value }).collect())
    })
}

#[cfg(feature = "abi-next")]
extern "C" fn next_probe() -> u64 {
    1
}

#[doc(hidden)]
pub fn evaluator_module<T: Evaluator>(
    info: extern "C" fn() -> PluginInfo,
    resolve_config: ResolveFn,
) -> PluginModuleRef {
    let fns = EvaluatorFns {
        create: evaluator_create::<T>,
        destroy: destroy::<T>,
        evaluate: evaluator_evaluate::<T>,
        #[cfg(feature = "abi-next")]
        next_probe,
    }
    .leak_into_prefix();
    PluginModule {
        info,
        tokenizer: RNone,
        encoder: RNone,
        adapter: RNone,
        strategy: RNone,
        evaluator: RSome(fns),
        resolve_config,
    }
    .leak_into_prefix()
}
