//! Host-side wrappers around plugin instances: they own the plugin's state pointer and its
//! context, pass tensors in as handles, take results out, and turn plugin errors into
//! [`PluginFailure`]s that name the plugin and the function.

use std::pin::Pin;
use std::rc::Rc;

use abi_stable::std_types::{RSlice, RStr, RString, RVec};
use candle_core::Tensor;
use recall_sdk::abi::{
    AdapterFnsRef, EncoderFnsRef, EncoderSpec, EvaluatorFnsRef, NamedTensor, PluginError, PluginResult, SiteInfo,
    StatePtr, StrategyFnsRef, TaskInfo, TokenBatch, TokenizerFnsRef,
};

use crate::loader::LoadedPlugin;
use crate::runtime::{AdapterHook, PluginCtx, Runtime};

/// A plugin call that failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("plugin `{plugin}` failed in `{function}`: {message}")]
pub struct PluginFailure {
    pub plugin: String,
    pub function: &'static str,
    pub message: String,
    /// The key of the plugin's config section the error is about, if any.
    pub config_key: Option<String>,
}

fn lift<T>(plugin: &str, function: &'static str, r: PluginResult<T>) -> Result<T, PluginFailure> {
    r.into_result().map_err(|e: PluginError| PluginFailure {
        plugin: plugin.to_string(),
        function,
        message: e.message.into_string(),
        config_key: e.config_key.into_option().map(RString::into_string),
    })
}

pub(crate) fn host_failure(plugin: &str, function: &'static str, message: String) -> PluginFailure {
    PluginFailure { plugin: plugin.to_string(), function, message, config_key: None }
}

fn missing_kind(p: &LoadedPlugin, kind: &str) -> PluginFailure {
    host_failure(&p.name, "create", format!("{} is a {} plugin, not a {kind}", p.path.display(), p.kind))
}

/// Tensors passed into a plugin call as handles, released when the call is over.
struct Inputs<'a> {
    runtime: &'a Runtime,
    named: Vec<NamedTensor>,
}

impl<'a> Inputs<'a> {
    fn new(runtime: &'a Runtime, tensors: &[(&str, &Tensor)]) -> Self {
        let named = tensors
            .iter()
            .map(|(n, t)| NamedTensor { name: RString::from(*n), id: runtime.insert((*t).clone()) })
            .collect();
        Inputs { runtime, named }
    }
}

impl Drop for Inputs<'_> {
    fn drop(&mut self) {
        for t in &self.named {
            self.runtime.release(t.id);
        }
    }
}

macro_rules! instance {
    ($name:ident, $fns:ty) => {
        /// A live plugin instance (state + context); destroyed on drop.
        pub struct $name {
            pub plugin: String,
            fns: $fns,
            state: StatePtr,
            ctx: Pin<Box<PluginCtx>>,
        }

        impl Drop for $name {
            fn drop(&mut self) {
                // Adapters are hooked into `linear`; unhook before the state goes away.
                self.ctx.runtime.detach_adapter(self.state.ptr as usize);
                if let Err(e) = lift(&self.plugin, "destroy", (self.fns.destroy())(self.state)) {
                    tracing::warn!("{e}");
                }
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name)).field("plugin", &self.plugin).finish_non_exhaustive()
            }
        }

        impl $name {
            /// The runtime this instance lives in.
            pub fn runtime(&self) -> &Rc<Runtime> {
                &self.ctx.runtime
            }
        }
    };
}

instance!(TokenizerInstance, TokenizerFnsRef);
instance!(EncoderInstance, EncoderFnsRef);
instance!(AdapterInstance, AdapterFnsRef);
instance!(StrategyInstance, StrategyFnsRef);
instance!(EvaluatorInstance, EvaluatorFnsRef);

impl TokenizerInstance {
    pub fn create(p: &LoadedPlugin, runtime: &Rc<Runtime>, config: &str) -> Result<Self, PluginFailure> {
        let fns = p.module.tokenizer().into_option().ok_or_else(|| missing_kind(p, "tokenizer"))?;
        let ctx = runtime.context(&p.name, "tokenizer.");
        let state = lift(&p.name, "create", (fns.create())(ctx.handle(), RStr::from_str(config)))?;
        Ok(TokenizerInstance { plugin: p.name.clone(), fns, state, ctx })
    }

    pub fn vocab_size(&self) -> Result<usize, PluginFailure> {
        lift(&self.plugin, "vocab_size", (self.fns.vocab_size())(self.state)).map(|v| v as usize)
    }

    /// Token ids [n, context] and attention mask, as u32 row-major vectors.
    pub fn encode(&self, texts: &[String], context_length: Option<usize>) -> Result<TokenBatch, PluginFailure> {
        let texts: Vec<RString> = texts.iter().map(|t| RString::from(t.as_str())).collect();
        let batch = lift(
            &self.plugin,
            "encode",
            (self.fns.encode())(self.state, RSlice::from_slice(&texts), context_length.unwrap_or(0) as u64),
        )?;
        let expected = batch.n_rows * batch.n_cols;
        if batch.n_rows as usize != texts.len()
            || batch.ids.len() as u64 != expected
            || batch.attention_mask.len() as u64 != expected
        {
            return Err(host_failure(
                &self.plugin,
                "encode",
                format!(
                    "returned {} ids / {} mask values for {} x {} tokens ({} texts)",
                    batch.ids.len(),
                    batch.attention_mask.len(),
                    batch.n_rows,
                    batch.n_cols,
                    texts.len()
                ),
            ));
        }
        Ok(batch)
    }
}

impl EncoderInstance {
    /// Create under the parameter scope `scope` (e.g. `vision.`).
    pub fn create(p: &LoadedPlugin, runtime: &Rc<Runtime>, scope: &str, config: &str) -> Result<Self, PluginFailure> {
        let fns = p.module.encoder().into_option().ok_or_else(|| missing_kind(p, "encoder"))?;
        let ctx = runtime.context(&p.name, scope);
        let state = lift(&p.name, "create", (fns.create())(ctx.handle(), RStr::from_str(config)))?;
        Ok(EncoderInstance { plugin: p.name.clone(), fns, state, ctx })
    }

    pub fn spec(&self) -> Result<EncoderSpec, PluginFailure> {
        lift(&self.plugin, "spec", (self.fns.spec())(self.state))
    }

    pub fn forward(&self, inputs: &[(&str, &Tensor)]) -> Result<Tensor, PluginFailure> {
        let runtime = &self.ctx.runtime;
        self.ctx.emitted.borrow_mut().clear();
        let args = Inputs::new(runtime, inputs);
        let id = lift(
            &self.plugin,
            "forward",
            (self.fns.forward())(self.state, self.ctx.handle(), RSlice::from_slice(&args.named)),
        )?;
        runtime.take(id).map_err(|e| host_failure(&self.plugin, "forward", format!("returned a bad handle: {e}")))
    }
}

impl EncoderInstance {
    /// Side output `name` of the latest `forward` (e.g. `tokens`), if the plugin published one.
    pub fn emitted(&self, name: &str) -> Option<Tensor> {
        self.ctx.emitted.borrow().iter().find(|(n, _)| n == name).map(|(_, t)| t.clone())
    }
}

impl AdapterInstance {
    /// Create over every declared site and attach to the runtime's `linear`.
    pub fn create(p: &LoadedPlugin, runtime: &Rc<Runtime>, config: &str) -> Result<Self, PluginFailure> {
        let fns = p.module.adapter().into_option().ok_or_else(|| missing_kind(p, "adapter"))?;
        let ctx = runtime.context(&p.name, "adapter.");
        let sites: Vec<SiteInfo> = runtime
            .sites()
            .iter()
            .enumerate()
            .map(|(i, s)| SiteInfo {
                id: i as u32,
                name: s.name.as_str().into(),
                in_features: s.in_features as u64,
                out_features: s.out_features as u64,
            })
            .collect();
        let state =
            lift(&p.name, "create", (fns.create())(ctx.handle(), RStr::from_str(config), RSlice::from_slice(&sites)))?;
        let inst = AdapterInstance { plugin: p.name.clone(), fns, state, ctx };
        runtime.attach_adapter(AdapterHook {
            plugin: p.name.clone(),
            fns,
            state,
            handle: inst.ctx.handle(),
            key: inst.key(),
        });
        Ok(inst)
    }

    fn key(&self) -> usize {
        self.state.ptr as usize
    }

    pub fn targets(&self) -> Result<Vec<u32>, PluginFailure> {
        lift(&self.plugin, "targets", (self.fns.targets())(self.state)).map(RVec::into_vec)
    }

    pub fn merge(&self, coefficient: f64) -> Result<(), PluginFailure> {
        lift(&self.plugin, "merge", (self.fns.merge())(self.state, self.ctx.handle(), coefficient))
    }

    pub fn reset(&self) -> Result<(), PluginFailure> {
        lift(&self.plugin, "reset", (self.fns.reset())(self.state, self.ctx.handle()))
    }

    /// Stop applying this adapter in `linear` (it stays alive until dropped).
    pub fn detach(&self) {
        self.ctx.runtime.detach_adapter(self.key());
    }
}

impl StrategyInstance {
    pub fn create(p: &LoadedPlugin, runtime: &Rc<Runtime>, scope: &str, config: &str) -> Result<Self, PluginFailure> {
        let fns = p.module.strategy().into_option().ok_or_else(|| missing_kind(p, "strategy"))?;
        let ctx = runtime.context(&p.name, scope);
        let state = lift(&p.name, "create", (fns.create())(ctx.handle(), RStr::from_str(config)))?;
        Ok(StrategyInstance { plugin: p.name.clone(), fns, state, ctx })
    }

    pub fn before_task(&self, task: &TaskInfo) -> Result<(), PluginFailure> {
        lift(&self.plugin, "before_task", (self.fns.before_task())(self.state, self.ctx.handle(), task.clone()))
    }

    pub fn after_task(&self, task: &TaskInfo) -> Result<(), PluginFailure> {
        lift(&self.plugin, "after_task", (self.fns.after_task())(self.state, self.ctx.handle(), task.clone()))
    }

    pub fn before_step(&self, step: u64) -> Result<(), PluginFailure> {
        lift(&self.plugin, "before_step", (self.fns.before_step())(self.state, self.ctx.handle(), step))
    }

    pub fn after_backward(&self, step: u64) -> Result<(), PluginFailure> {
        lift(&self.plugin, "after_backward", (self.fns.after_backward())(self.state, self.ctx.handle(), step))
    }

    pub fn after_step(&self, step: u64) -> Result<(), PluginFailure> {
        lift(&self.plugin, "after_step", (self.fns.after_step())(self.state, self.ctx.handle(), step))
    }

    /// Named loss terms for the current batch.
    pub fn loss_terms(&self, inputs: &[(&str, &Tensor)]) -> Result<Vec<(String, Tensor)>, PluginFailure> {
        let runtime = &self.ctx.runtime;
        let args = Inputs::new(runtime, inputs);
        let terms = lift(
            &self.plugin,
            "loss_terms",
            (self.fns.loss_terms())(self.state, self.ctx.handle(), RSlice::from_slice(&args.named)),
        )?;
        terms
            .into_iter()
            .map(|t| {
                let name = t.name.into_string();
                runtime
                    .take(t.id)
                    .map(|x| (name, x))
                    .map_err(|e| host_failure(&self.plugin, "loss_terms", format!("returned a bad handle: {e}")))
            })
            .collect()
    }

    /// Whether the strategy wants the old model's features (plugins older than SDK 1.2 do not).
    pub fn wants_old_model(&self) -> Result<bool, PluginFailure> {
        match self.fns.wants_old_model() {
            Some(f) => lift(&self.plugin, "wants_old_model", f(self.state)),
            None => Ok(false),
        }
    }

    /// Whether the strategy wants the initial model on a reference batch (SDK >= 1.3).
    pub fn wants_initial_model(&self) -> Result<bool, PluginFailure> {
        match self.fns.wants_initial_model() {
            Some(f) => lift(&self.plugin, "wants_initial_model", f(self.state)),
            None => Ok(false),
        }
    }

    /// Batches of gradients wanted after each task (plugins older than SDK 1.3: none).
    pub fn gradient_batches(&self) -> Result<usize, PluginFailure> {
        match self.fns.gradient_batches() {
            Some(f) => lift(&self.plugin, "gradient_batches", f(self.state)).map(|n| n as usize),
            None => Ok(0),
        }
    }

    /// When the strategy's gradient pass runs (plugins older than SDK 1.6: after the task).
    pub fn gradient_pass(&self) -> Result<recall_sdk::GradientPass, PluginFailure> {
        let Some(f) = self.fns.gradient_pass() else { return Ok(recall_sdk::GradientPass::AfterTask) };
        let code = lift(&self.plugin, "gradient_pass", f(self.state))?;
        recall_sdk::GradientPass::from_code(code).ok_or_else(|| {
            host_failure(
                &self.plugin,
                "gradient_pass",
                format!("returned {code}, which is no GRADIENT_PASS_* code of SDK 1.6"),
            )
        })
    }

    /// The exemplar memory the strategy asks for (plugins older than SDK 1.7: none).
    pub fn replay(&self) -> Result<Option<recall_sdk::Replay>, PluginFailure> {
        let Some(f) = self.fns.replay() else { return Ok(None) };
        let spec = lift(&self.plugin, "replay", f(self.state))?;
        recall_sdk::Replay::from_spec(spec)
            .map_err(|m| host_failure(&self.plugin, "replay", format!("returned {m}, which SDK 1.7 does not know")))
    }

    pub fn on_gradients(&self, task: &TaskInfo, batch: u64) -> Result<(), PluginFailure> {
        match self.fns.on_gradients() {
            Some(f) => lift(&self.plugin, "on_gradients", f(self.state, self.ctx.handle(), task.clone(), batch)),
            None => Ok(()),
        }
    }

    pub fn save_state(&self) -> Result<Vec<u8>, PluginFailure> {
        lift(&self.plugin, "save_state", (self.fns.save_state())(self.state, self.ctx.handle())).map(RVec::into_vec)
    }

    pub fn load_state(&self, bytes: &[u8]) -> Result<(), PluginFailure> {
        lift(
            &self.plugin,
            "load_state",
            (self.fns.load_state())(self.state, self.ctx.handle(), RSlice::from_slice(bytes)),
        )
    }
}

impl EvaluatorInstance {
    pub fn create(p: &LoadedPlugin, runtime: &Rc<Runtime>, config: &str) -> Result<Self, PluginFailure> {
        let fns = p.module.evaluator().into_option().ok_or_else(|| missing_kind(p, "evaluator"))?;
        let ctx = runtime.context(&p.name, "evaluator.");
        let state = lift(&p.name, "create", (fns.create())(ctx.handle(), RStr::from_str(config)))?;
        Ok(EvaluatorInstance { plugin: p.name.clone(), fns, state, ctx })
    }

    pub fn evaluate(&self, inputs: &[(&str, &Tensor)]) -> Result<Vec<(String, f64)>, PluginFailure> {
        let args = Inputs::new(&self.ctx.runtime, inputs);
        let metrics = lift(
            &self.plugin,
            "evaluate",
            (self.fns.evaluate())(self.state, self.ctx.handle(), RSlice::from_slice(&args.named)),
        )?;
        Ok(metrics.into_iter().map(|m| (m.name.into_string(), m.value)).collect())
    }
}
