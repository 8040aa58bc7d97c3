//! A CLIP-style model assembled from plugins: tokenizer, vision and text encoders, an optional
//! adapter, and the host-owned `logit_scale`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use candle_core::{DType, Tensor};
use globset::{Glob, GlobSetBuilder};

use crate::config::{AdapterSection, ExperimentSection, FreezeBase, LoadedConfig, Locate, ModelSection};
use crate::data::preprocess::Preprocess;
use crate::loader::Registry;
use crate::plugin::{host_failure, AdapterInstance, EncoderInstance, PluginFailure, TokenizerInstance};
use crate::runtime::{ops, Runtime};
use recall_sdk::abi::modality;
use recall_sdk::inputs;
use recall_sdk::ParamInit;

/// Errors while assembling a model: a located config error or a plugin failure.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Plugin(#[from] PluginFailure),
    #[error("{0}")]
    Other(String),
}

/// The assembled model. Field order is drop order: plugin instances go before the runtime
/// they point into (each also holds an `Rc` to it).
pub struct Model {
    pub adapter: Option<AdapterInstance>,
    pub tokenizer: TokenizerInstance,
    /// Pixels -> image tokens before the vision tower (TokLIP), frozen.
    pub image_tokenizer: Option<Tower>,
    pub vision: Tower,
    pub text: Tower,
    pub logit_scale: Tensor,
    pub image_size: usize,
    pub context_length: usize,
    /// How images become `pixel_values` for this model.
    pub preprocess: Preprocess,
    pub runtime: Rc<Runtime>,
    /// The image tokenizer's codes by image content (`[train] cache_image_codes`): the
    /// tokenizer is frozen and preprocessing deterministic, so an image always gets the same
    /// codes.
    pub code_cache: Option<RefCell<HashMap<u64, Tensor>>>,
}

/// A tower: a plugin composing host ops (trainable), or a frozen ONNX model.
pub enum Tower {
    Plugin(EncoderInstance),
    Onnx(Box<crate::onnx::OnnxTower>),
}

impl Tower {
    /// Build the tower of `section` (`model.vision`, ...) under the parameter scope `scope`.
    pub fn create(
        section: &str,
        options: &crate::config::PluginSection,
        scope: &str,
        image: bool,
        runtime: &Rc<Runtime>,
        cfg: &dyn Locate,
        registry: &Registry,
    ) -> Result<Tower, BuildError> {
        if crate::onnx::is_onnx(&options.options) {
            return crate::onnx::OnnxTower::create(&options.options, image)
                .map(|t| Tower::Onnx(Box::new(t)))
                .map_err(|(key, m)| BuildError::Config(cfg.error_at(&format!("{section}.{key}"), m)));
        }
        let p = registry
            .get(&options.plugin, "encoder")
            .map_err(|m| BuildError::Config(cfg.error_at(&format!("{section}.plugin"), m)))?;
        EncoderInstance::create(p, runtime, scope, &options.options_text())
            .map(Tower::Plugin)
            .map_err(|e| locate_failure(cfg, section, e))
    }

    /// The plugin's name, or `onnx`.
    pub fn name(&self) -> &str {
        match self {
            Tower::Plugin(p) => &p.plugin,
            Tower::Onnx(_) => "onnx",
        }
    }

    pub fn spec(&self, image: bool) -> Result<recall_sdk::abi::EncoderSpec, PluginFailure> {
        match self {
            Tower::Plugin(p) => p.spec(),
            Tower::Onnx(o) => Ok(recall_sdk::abi::EncoderSpec {
                modality: if image { modality::IMAGE } else { modality::TEXT },
                embed_dim: o.embed_dim,
                input_size: o.input_size,
            }),
        }
    }

    pub fn forward(&self, runtime: &Runtime, inputs: &[(&str, &Tensor)]) -> Result<Tensor, PluginFailure> {
        match self {
            Tower::Plugin(p) => p.forward(inputs),
            Tower::Onnx(o) => o
                .forward(inputs, runtime.device(), runtime.float_dtype())
                .map_err(|e| host_failure("onnx", "forward", e.to_string())),
        }
    }

    /// Side output `name` of the latest forward (plugins publish them with `emit`; ONNX towers
    /// have none).
    pub fn emitted(&self, name: &str) -> Option<Tensor> {
        match self {
            Tower::Plugin(p) => p.emitted(name),
            Tower::Onnx(_) => None,
        }
    }
}

/// A frozen teacher vision tower (`[teacher]`) with a runtime of its own, so its parameters
/// never reach the optimizer, and its own preprocessing (size and normalisation).
pub struct Teacher {
    pub vision: Tower,
    pub preprocess: Preprocess,
    pub runtime: Rc<Runtime>,
}

impl Teacher {
    pub fn build(
        t: &crate::config::TeacherSection,
        experiment: &ExperimentSection,
        cfg: &dyn Locate,
        registry: &Registry,
    ) -> Result<Teacher, BuildError> {
        let device = ops::device_from_name(&experiment.device).map_err(|m| cfg.error_at("experiment.device", m))?;
        let runtime = Runtime::new(device, float_dtype(&experiment.dtype), experiment.seed);
        let mut section = t.vision.clone();
        if let Some(ck) = t.checkpoint.as_ref().filter(|_| !crate::onnx::is_onnx(&section.options)) {
            section.options.entry("checkpoint").or_insert_with(|| toml::Value::String(ck.display().to_string()));
        }
        let vision = Tower::create("teacher.vision", &section, "vision.", true, &runtime, cfg, registry)?;
        let spec = vision.spec(true)?;
        if spec.modality != modality::IMAGE {
            return Err(BuildError::Config(
                cfg.error_at("teacher.vision", format!("plugin `{}` is not an image encoder", vision.name())),
            ));
        }
        if let Some(init) = &t.init {
            let file = last_checkpoint(init)
                .map_err(|e| BuildError::Config(cfg.error_at("teacher.init", format!("{e:#}"))))?;
            let absent = runtime
                .params()
                .load_selected(&file, |name| name.starts_with("vision."))
                .map_err(|e| BuildError::Config(cfg.error_at("teacher.init", format!("{e:#}"))))?;
            if !absent.is_empty() {
                return Err(BuildError::Config(cfg.error_at(
                    "teacher.init",
                    format!(
                        "{} lacks the teacher's {} (and {} more); is it a checkpoint of this tower?",
                        file.display(),
                        absent[0],
                        absent.len() - 1
                    ),
                )));
            }
        }
        for p in runtime.params_mut().iter_mut() {
            p.trainable = false;
        }
        runtime.detach_frozen();
        runtime.set_training(false);
        let preprocess = Preprocess { size: spec.input_size as usize, mean: t.preprocess.mean, std: t.preprocess.std };
        Ok(Teacher { vision, preprocess, runtime })
    }

    /// The teacher's image features for pixels prepared with [`Teacher::preprocess`]; a
    /// constant (no graph behind it).
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor, PluginFailure> {
        Ok(self.vision.forward(&self.runtime, &[(inputs::PIXEL_VALUES, pixels)])?.detach())
    }

    /// The teacher's per-token features of the latest [`Teacher::encode_images`] [B, N, W], if
    /// its tower publishes them; a constant.
    pub fn image_tokens(&self) -> Option<Tensor> {
        self.vision.emitted(TOKENS).map(|t| t.detach())
    }
}

/// The side output under which image towers publish per-token features [B, N, W] (after the
/// final layer norm, before pooling and projection; patch tokens only).
pub const TOKENS: &str = "tokens";

/// Turn a plugin's create failure into an error located at its config key, when it has one.
pub fn locate_failure(cfg: &dyn Locate, section: &str, e: PluginFailure) -> BuildError {
    match &e.config_key {
        Some(key) => BuildError::Config(
            cfg.error_at(&format!("{section}.{key}"), format!("plugin `{}`: {}", e.plugin, e.message)),
        ),
        None => BuildError::Plugin(e),
    }
}

/// The weights file of a checkpoint path (a directory holds `model.safetensors`).
pub fn checkpoint_file(path: &std::path::Path) -> std::path::PathBuf {
    if path.is_dir() {
        for f in ["model.safetensors", "open_clip_model.safetensors"] {
            if path.join(f).is_file() {
                return path.join(f);
            }
        }
    }
    path.to_path_buf()
}

/// The last finished task's checkpoint of a run directory (or `path` itself if it is a file).
pub fn last_checkpoint(path: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let dir = path.join("checkpoints");
    let mut checkpoints: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| {
            format!("{} is neither a checkpoint file nor a run directory with checkpoints/", path.display())
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    checkpoints.sort();
    checkpoints.pop().with_context(|| format!("run {} has no finished task checkpoint", path.display()))
}

/// The model section with `[model] checkpoint` handed down to towers that name none.
fn with_checkpoint(model: &ModelSection) -> ModelSection {
    let mut m = model.clone();
    if let Some(ck) = &model.checkpoint {
        for tower in [&mut m.vision, &mut m.text].into_iter().filter(|t| !crate::onnx::is_onnx(&t.options)) {
            tower.options.entry("checkpoint").or_insert_with(|| toml::Value::String(ck.display().to_string()));
        }
    }
    m
}

/// The glob patterns of config key `key`; a bad pattern is an error located there.
fn glob_set(patterns: &[String], key: &str, cfg: &dyn Locate) -> Result<globset::GlobSet, BuildError> {
    let mut b = GlobSetBuilder::new();
    for (i, p) in patterns.iter().enumerate() {
        b.add(Glob::new(p).map_err(|e| BuildError::Config(cfg.error_at(key, format!("pattern {i} `{p}`: {e}"))))?);
    }
    b.build().map_err(|e| BuildError::Other(e.to_string()))
}

pub(crate) fn float_dtype(name: &str) -> DType {
    match name {
        "f64" => DType::F64,
        _ => DType::F32,
    }
}

impl Model {
    /// Create every plugin of the model section (and the adapter), in a fixed order so that
    /// initialisation from one seed is reproducible.
    pub fn build(cfg: &LoadedConfig, registry: &Registry) -> Result<Model, BuildError> {
        let c = &cfg.config;
        Self::build_parts(&c.experiment, &c.model, c.adapter.as_ref(), cfg, registry)
    }

    /// Build from the sections that describe a model; `cfg` locates errors.
    pub fn build_parts(
        experiment: &ExperimentSection,
        model: &ModelSection,
        adapter: Option<&AdapterSection>,
        cfg: &dyn Locate,
        registry: &Registry,
    ) -> Result<Model, BuildError> {
        let device = ops::device_from_name(&experiment.device).map_err(|m| cfg.error_at("experiment.device", m))?;
        let runtime = Runtime::new(device, float_dtype(&experiment.dtype), experiment.seed);
        let get = |section: &str, name: &str, kind: &str| {
            registry.get(name, kind).map_err(|m| BuildError::Config(cfg.error_at(&format!("{section}.plugin"), m)))
        };
        let m = &with_checkpoint(model);
        let tokenizer = TokenizerInstance::create(
            get("model.tokenizer", &m.tokenizer.plugin, "tokenizer")?,
            &runtime,
            &m.tokenizer.options_text(),
        )
        .map_err(|e| locate_failure(cfg, "model.tokenizer", e))?;
        let image_tokenizer = match &m.image_tokenizer {
            Some(t) => {
                Some(Tower::create("model.image_tokenizer", t, "image_tokenizer.", true, &runtime, cfg, registry)?)
            }
            None => None,
        };
        let vision = Tower::create("model.vision", &m.vision, "vision.", true, &runtime, cfg, registry)?;
        let text = Tower::create("model.text", &m.text, "text.", false, &runtime, cfg, registry)?;
        let vspec = vision.spec(true)?;
        let tspec = text.spec(false)?;
        if vspec.modality != modality::IMAGE {
            return Err(BuildError::Config(
                cfg.error_at("model.vision.plugin", format!("plugin `{}` is not an image encoder", vision.name())),
            ));
        }
        if tspec.modality != modality::TEXT {
            return Err(BuildError::Config(
                cfg.error_at("model.text.plugin", format!("plugin `{}` is not a text encoder", text.name())),
            ));
        }
        if vspec.embed_dim != tspec.embed_dim {
            return Err(BuildError::Config(cfg.error_at(
                "model.text",
                format!("the towers disagree on the joint embedding width: vision {} vs text {}; set embed_dim equal in both", vspec.embed_dim, tspec.embed_dim),
            )));
        }
        let vocab = tokenizer.vocab_size()?;
        let logit_scale = runtime
            .param("logit_scale", &[1], ParamInit::constant(m.logit_scale_init), m.learn_logit_scale)
            .map_err(BuildError::Other)?;
        if let Some(path) = &m.checkpoint {
            let file = checkpoint_file(path);
            let value = runtime
                .checkpoint_tensor(&file.to_string_lossy(), "logit_scale")
                .map_err(|e| BuildError::Config(cfg.error_at("model.checkpoint", e)))?;
            let value = value.reshape(1).map_err(|e| BuildError::Other(e.to_string()))?;
            runtime.param_assign(&logit_scale, &value).map_err(BuildError::Other)?;
        }
        let adapter_section = adapter;
        let adapter = match adapter_section {
            Some(a) => Some(
                AdapterInstance::create(get("adapter", &a.plugin, "adapter")?, &runtime, &a.options_text())
                    .map_err(|e| locate_failure(cfg, "adapter", e))?,
            ),
            None => None,
        };
        // Texts are tokenized at the text tower's length: a tokenizer length that differs would
        // be silently overridden.
        if let Some(toml::Value::Integer(n)) = m.tokenizer.options.get("context_length") {
            if *n as u64 != tspec.input_size {
                return Err(BuildError::Config(cfg.error_at(
                    "model.tokenizer.context_length",
                    format!(
                        "the tokenizer's context_length is {n}, but the text tower reads {} tokens and texts are \
                         tokenized at that length; make the two equal, or drop the tokenizer's",
                        tspec.input_size
                    ),
                )));
            }
        }
        // With an image tokenizer, images come in at its size and the vision tower reads tokens.
        let image_size = match &image_tokenizer {
            Some(t) => t.spec(true)?.input_size as usize,
            None => vspec.input_size as usize,
        };
        let model = Model {
            adapter,
            tokenizer,
            image_tokenizer,
            vision,
            text,
            logit_scale,
            image_size,
            context_length: tspec.input_size as usize,
            preprocess: Preprocess { size: image_size, mean: m.preprocess.mean, std: m.preprocess.std },
            runtime,
            code_cache: None,
        };
        model.apply_freezing(m, adapter_section, cfg)?;
        if let Some(init) = &m.init {
            let file = last_checkpoint(init).map_err(|e| {
                BuildError::Config(
                    cfg.error_at("model.init", format!("{e:#}; produce it first (see the experiment's comments)")),
                )
            })?;
            let select =
                if m.init_select.is_empty() { None } else { Some(glob_set(&m.init_select, "model.init_select", cfg)?) };
            let absent = model
                .runtime
                .params()
                .load_selected(&file, |name| select.as_ref().is_none_or(|g| g.is_match(name)))
                .map_err(|e| BuildError::Config(cfg.error_at("model.init", format!("{e:#}"))))?;
            tracing::info!(file = %file.display(), kept_initialisation = absent.len(), "model initialised from a checkpoint");
        }
        tracing::debug!(vocab, "model assembled");
        Ok(model)
    }

    /// Freeze what the config asks: `model.frozen` globs, and the adapter's `freeze_base`.
    fn apply_freezing(
        &self,
        model: &ModelSection,
        adapter: Option<&AdapterSection>,
        cfg: &dyn Locate,
    ) -> Result<(), BuildError> {
        let frozen = glob_set(&model.frozen, "model.frozen", cfg)?;
        let mut adapted_params: Vec<String> = Vec::new();
        let mut adapter_prefix = None;
        if let (Some(a), Some(inst)) = (adapter, &self.adapter) {
            let sites = self.runtime.sites();
            match a.freeze_base {
                FreezeBase::Adapted => {
                    for id in inst.targets()? {
                        if let Some(s) = sites.get(id as usize) {
                            adapted_params.push(format!("{}.weight", s.name));
                            adapted_params.push(format!("{}.bias", s.name));
                        }
                    }
                }
                FreezeBase::All => adapter_prefix = Some("adapter."),
                FreezeBase::None => {}
            }
        }
        {
            let mut params = self.runtime.params_mut();
            for p in params.iter_mut() {
                // The image tokenizer is trained only by a reconstruction run, which does not
                // build a Model.
                let tokenizer = p.name.starts_with("image_tokenizer.");
                if frozen.is_match(&p.name) || adapted_params.contains(&p.name) || tokenizer {
                    p.trainable = false;
                }
                if let Some(prefix) = adapter_prefix {
                    if !p.name.starts_with(prefix) {
                        p.trainable = false;
                    }
                }
            }
        }
        let n = self.runtime.detach_frozen();
        tracing::debug!(frozen = n, "frozen parameters are constants in the graph");
        Ok(())
    }

    /// Make every parameter a constant in the graph: a frozen copy of the model (the old or
    /// the initial model) then records no autograd graph in its forwards. Its values still
    /// follow `Var::set` (`engine::copy_parameters`).
    pub fn freeze_all(&self) {
        for p in self.runtime.params_mut().iter_mut() {
            p.trainable = false;
        }
        self.runtime.detach_frozen();
    }

    /// Image features [B, D] for normalised pixels [B, 3, S, S].
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor, PluginFailure> {
        let codes = match &self.image_tokenizer {
            Some(t) => Some(t.forward(&self.runtime, &[(inputs::PIXEL_VALUES, pixels)])?.detach()),
            None => None,
        };
        self.encode_codes(codes.as_ref(), pixels)
    }

    /// [`Model::encode_images`] of `pixels`, with the image tokenizer's codes taken from the
    /// cache where it holds them: `keys` are the images' content keys
    /// (`data::loader::Batch::content_keys`).
    pub fn encode_cached(&self, keys: &[u64], pixels: &Tensor) -> Result<Tensor, PluginFailure> {
        let (Some(tokenizer), Some(cache)) = (&self.image_tokenizer, &self.code_cache) else {
            return self.encode_images(pixels);
        };
        let fail = |e: candle_core::Error| host_failure("image_tokenizer", "forward", e.to_string());
        let mut missing: Vec<u32> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if !cache.borrow().contains_key(k) && !missing.iter().any(|&j| keys[j as usize] == *k) {
                missing.push(i as u32);
            }
        }
        if !missing.is_empty() {
            let rows = Tensor::new(missing.as_slice(), pixels.device()).map_err(fail)?;
            let subset = pixels.index_select(&rows, 0).map_err(fail)?;
            let codes = tokenizer.forward(&self.runtime, &[(inputs::PIXEL_VALUES, &subset)])?.detach();
            let mut cache = cache.borrow_mut();
            for (j, &i) in missing.iter().enumerate() {
                cache.insert(keys[i as usize], codes.get(j).map_err(fail)?);
            }
        }
        let cache = cache.borrow();
        let rows: Vec<&Tensor> = keys.iter().map(|k| &cache[k]).collect();
        let codes = Tensor::stack(&rows, 0).map_err(fail)?;
        drop(cache);
        self.encode_codes(Some(&codes), pixels)
    }

    /// The vision tower on image codes (with an image tokenizer) or on pixels.
    fn encode_codes(&self, codes: Option<&Tensor>, pixels: &Tensor) -> Result<Tensor, PluginFailure> {
        let features = match codes {
            Some(codes) => self
                .vision
                .forward(&self.runtime, &[(inputs::CODE_EMBEDDINGS, codes), (inputs::PIXEL_VALUES, pixels)])?,
            None => self.vision.forward(&self.runtime, &[(inputs::PIXEL_VALUES, pixels)])?,
        };
        self.full_precision(features, "vision")
    }

    /// The vision tower's per-token features of the latest [`Model::encode_images`] [B, N, W],
    /// if it publishes them (`toklip-encoder`, `clip-vision`).
    pub fn image_tokens(&self) -> Result<Option<Tensor>, PluginFailure> {
        self.vision.emitted(TOKENS).map(|t| self.full_precision(t, "vision")).transpose()
    }

    /// Features leave the towers in the parameters' dtype: losses and strategies compute in
    /// full precision under mixed precision too.
    fn full_precision(&self, t: Tensor, tower: &str) -> Result<Tensor, PluginFailure> {
        t.to_dtype(self.runtime.float_dtype()).map_err(|e| host_failure(tower, "forward", e.to_string()))
    }

    /// Text features [B, D] for token ids [B, L] (u32) and their attention mask.
    pub fn encode_texts(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, PluginFailure> {
        let features = self.text.forward(&self.runtime, &[(inputs::INPUT_IDS, ids), (inputs::ATTENTION_MASK, mask)])?;
        self.full_precision(features, "text")
    }

    /// Tokenize texts into id and mask tensors at the text tower's context length.
    pub fn tokenize(&self, texts: &[String]) -> Result<(Tensor, Tensor), BuildError> {
        let batch = self.tokenizer.encode(texts, Some(self.context_length))?;
        let shape = (batch.n_rows as usize, batch.n_cols as usize);
        let dev = self.runtime.device();
        let ids = Tensor::from_slice(batch.ids.as_slice(), shape, dev).map_err(|e| BuildError::Other(e.to_string()))?;
        // The text tower reads the ids back: from this copy, not the device.
        crate::runtime::host_copies::remember_u32(&ids, batch.ids.as_slice());
        let mask = Tensor::from_slice(batch.attention_mask.as_slice(), shape, dev)
            .map_err(|e| BuildError::Other(e.to_string()))?;
        Ok((ids, mask))
    }

    /// Number of trainable scalar parameters.
    pub fn trainable_parameters(&self) -> usize {
        self.runtime.params().trainable_count()
    }
}
