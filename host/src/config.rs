//! Experiment files: the TOML schema, loading with `--set` overrides, and errors that name
//! file:line:column, the key, and the nearest valid key.
//!
//! Host sections are typed structs with `deny_unknown_fields`. A plugin's section is kept as
//! a TOML table (`plugin = "NAME"` plus the plugin's own keys) and handed to the plugin as
//! TOML text; the plugin rejects unknown keys itself and the host points at the line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A config error located in a file (`line` 0: the source has no lines, e.g. a command-line
/// model spec).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl ConfigError {
    fn render(&self) -> String {
        if self.line == 0 {
            format!("{}: {}", self.file, self.message)
        } else {
            format!("{}:{}:{}: {}", self.file, self.line, self.column, self.message)
        }
    }
}

/// Something that can turn a dotted key into a located error.
pub trait Locate {
    fn error_at(&self, dotted: &str, message: String) -> ConfigError;
}

impl Locate for LoadedConfig {
    fn error_at(&self, dotted: &str, message: String) -> ConfigError {
        LoadedConfig::error_at(self, dotted, message)
    }
}

/// A config that did not come from a file (e.g. `recall embed --model DIR`): errors name the
/// source and the key.
pub struct NamedSource(pub String);

impl Locate for NamedSource {
    fn error_at(&self, dotted: &str, message: String) -> ConfigError {
        ConfigError { file: self.0.clone(), line: 0, column: 0, message: format!("`{dotted}`: {message}") }
    }
}

/// One experiment.
#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub experiment: ExperimentSection,
    pub model: ModelSection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterSection>,
    #[serde(default, rename = "strategy")]
    pub strategies: Vec<PluginSection>,
    pub optimizer: OptimizerSection,
    pub train: TrainSection,
    #[serde(rename = "task")]
    pub tasks: Vec<TaskSection>,
    #[serde(default, rename = "evaluator")]
    pub evaluators: Vec<EvaluatorSection>,
    /// Reference data for strategies that distil from the initial model (ZSCL): batches are
    /// drawn from its training split; without it, the current batch is the reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<TaskSection>,
    /// Held-out sets for zero-shot classification after every task (retention, PD).
    #[serde(default, rename = "zeroshot", skip_serializing_if = "Vec::is_empty")]
    pub zeroshot: Vec<TaskSection>,
    /// A frozen teacher for feature distillation (TokLIP's `distill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<TeacherSection>,
    #[serde(default)]
    pub plugins: PluginsSection,
    /// Remote tracking (MLflow); the run directory is always written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<crate::tracking::TrackingSection>,
    /// Axes to sweep over (`recall sweep`); `recall run` runs the base experiment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<crate::sweep::SweepSection>,
}

#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSection {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    #[serde(default = "d::device")]
    pub device: String,
    /// Float dtype of parameters and activations: `f32` or `f64`.
    #[serde(default = "d::dtype")]
    pub dtype: String,
    /// Where run directories are created.
    #[serde(default = "d::output_dir")]
    pub output_dir: PathBuf,
}

/// A plugin and its own options (everything but `plugin`).
#[derive(Deserialize, Serialize, Clone, Debug, Default)]
pub struct PluginSection {
    /// The plugin's name; empty (absent) only for a tower with `backend = "onnx"`, or for a
    /// part a reconstruction run does not use.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plugin: String,
    #[serde(flatten)]
    pub options: toml::Table,
}

impl PluginSection {
    /// The options as TOML text for the plugin.
    pub fn options_text(&self) -> String {
        toml::to_string(&self.options).unwrap_or_default()
    }
}

#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    #[serde(default)]
    pub tokenizer: PluginSection,
    #[serde(default)]
    pub vision: PluginSection,
    #[serde(default)]
    pub text: PluginSection,
    /// Turns pixels into discrete image tokens before the vision tower (TokLIP): the tower
    /// then reads `code_embeddings` and the image size comes from this tokenizer. Frozen in
    /// contrastive runs; `[train] objective = "reconstruction"` trains it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tokenizer: Option<PluginSection>,
    /// Initial `logit_scale` (log of the inverse temperature); CLIP uses ln(1/0.07).
    #[serde(default = "d::logit_scale")]
    pub logit_scale_init: f64,
    #[serde(default = "d::yes")]
    pub learn_logit_scale: bool,
    /// Glob patterns of parameters to keep frozen (e.g. `text.token_embedding`).
    #[serde(default)]
    pub frozen: Vec<String>,
    /// Image normalisation (the size comes from the vision tower).
    #[serde(default)]
    pub preprocess: PreprocessSection,
    /// A pretrained CLIP checkpoint (transformers directory or OpenAI/open_clip safetensors)
    /// for both towers and `logit_scale`; passed to each tower as its `checkpoint` unless the
    /// tower names its own. Relative paths are relative to the experiment file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    /// Start from a Recall checkpoint: a run directory (its last finished task) or a
    /// `task-NN.safetensors`. Every tensor in it must fit the model; parameters it lacks
    /// (adapters, strategy parameters) keep their initialisation. Relative paths are relative
    /// to the experiment file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// Glob patterns: load only the matching tensors of `init` (e.g. `["text.*",
    /// "logit_scale"]` to take a text tower from a model whose vision tower differs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_select: Vec<String>,
}

/// A frozen vision tower whose image features on every training batch reach the strategies
/// as `teacher_image_features`. It sees the batch's images through its own preprocessing
/// (size from the tower, mean/std here), so a teacher at another resolution needs no resize
/// step; it is never trained and is built on the experiment's device.
#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct TeacherSection {
    /// A vision plugin with its options, or `backend = "onnx"` with a model file.
    pub vision: PluginSection,
    #[serde(default)]
    pub preprocess: PreprocessSection,
    /// Pretrained CLIP weights for a plugin tower (as `model.checkpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    /// A Recall run directory or checkpoint to load the tower's weights from: its `vision.*`
    /// tensors, which must all fit the tower and cover it (the rest of the file is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
}

/// Per-model image normalisation; CLIP's mean and std by default.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSection {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for PreprocessSection {
    fn default() -> Self {
        PreprocessSection { mean: crate::data::CLIP_MEAN, std: crate::data::CLIP_STD }
    }
}

/// Which base weights to freeze while an adapter trains.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FreezeBase {
    /// Freeze the weights (and biases) of the sites the adapter targets; train the rest
    /// (embeddings, norms, other layers), as C-CLIP's code does.
    Adapted,
    /// Freeze every parameter except the adapter's (PEFT's default).
    All,
    /// Freeze nothing.
    None,
}

/// The adapter plugin, plus the host's knobs for it.
#[derive(Deserialize, Serialize, Clone, Debug)]
pub struct AdapterSection {
    pub plugin: String,
    /// Fold the adapter into the base weights after every task.
    #[serde(default)]
    pub merge_after_task: bool,
    /// Coefficient of the merge (C-CLIP: 0.5).
    #[serde(default = "d::one")]
    pub merge_coefficient: f64,
    /// A coefficient per task instead of `merge_coefficient`: a list with one number per task,
    /// `running-average` (1/t after task t: the mean of the task models) or `c-clip-code` (1,
    /// 1/2, then 1/3 for every later task, as C-CLIP's released training code averages).
    #[serde(default)]
    pub merge_schedule: Option<MergeSchedule>,
    /// What a merge folds in: `adapter` (the adapter's delta, times the coefficient) or
    /// `trained` (the delta in full, then every model parameter averaged with its value at
    /// the start of the task: `start + c (end - start)`; C-CLIP's code).
    #[serde(default)]
    pub merge_scope: MergeScope,
    /// Re-initialise the adapter at the start of each task after the first.
    #[serde(default)]
    pub fresh_per_task: bool,
    #[serde(default = "d::freeze")]
    pub freeze_base: FreezeBase,
    #[serde(flatten)]
    pub options: toml::Table,
}

/// The coefficients of the merges after each task (see [`AdapterSection::merge_schedule`]).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum MergeSchedule {
    PerTask(Vec<f64>),
    Named(String),
}

impl MergeSchedule {
    pub const NAMES: [&'static str; 2] = ["running-average", "c-clip-code"];
}

/// What an adapter merge folds into the model (see [`AdapterSection::merge_scope`]).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MergeScope {
    #[default]
    Adapter,
    Trained,
}

impl AdapterSection {
    pub const HOST_KEYS: [&'static str; 7] = [
        "plugin",
        "merge_after_task",
        "merge_coefficient",
        "merge_schedule",
        "merge_scope",
        "fresh_per_task",
        "freeze_base",
    ];

    /// The merge coefficient after task `task` (0-based); the schedule was validated.
    pub fn merge_coefficient_for(&self, task: usize) -> f64 {
        match &self.merge_schedule {
            None => self.merge_coefficient,
            Some(MergeSchedule::PerTask(c)) => c.get(task).copied().unwrap_or(self.merge_coefficient),
            Some(MergeSchedule::Named(n)) if n == "c-clip-code" => 1.0 / (task + 1).min(3) as f64,
            Some(MergeSchedule::Named(_)) => 1.0 / (task + 1) as f64,
        }
    }

    pub fn options_text(&self) -> String {
        toml::to_string(&self.options).unwrap_or_default()
    }
}

/// A parameter group: parameters matching `params` (globs) get their own settings.
#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ParamGroup {
    pub params: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
}

/// What the lr schedule counts (see [`OptimizerSection::schedule_unit`]).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleUnit {
    #[default]
    Step,
    Epoch,
}

impl OptimizerSection {
    /// The lr factor at `step` (0-based, within the task) of `epoch`, for a task of
    /// `n_steps` steps over `epochs` epochs.
    pub fn lr_factor(&self, step: usize, epoch: usize, n_steps: usize, epochs: usize) -> f64 {
        let (at, warmup, total) = match self.schedule_unit {
            ScheduleUnit::Step => (step, self.warmup_steps, n_steps),
            ScheduleUnit::Epoch => (epoch, self.warmup_epochs, epochs),
        };
        crate::optim::lr_factor(at, warmup, total, self.min_lr_ratio, self.warmup_start_ratio)
    }
}

#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSection {
    pub lr: f64,
    #[serde(default = "d::weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "d::beta1")]
    pub beta1: f64,
    #[serde(default = "d::beta2")]
    pub beta2: f64,
    #[serde(default = "d::eps")]
    pub eps: f64,
    /// Linear warmup steps at the start of each task.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Learning rate at the end of the cosine schedule, as a fraction of each group's lr.
    #[serde(default)]
    pub min_lr_ratio: f64,
    /// What the schedule counts: `step` (the default: the lr changes every step) or `epoch`
    /// (it changes once per epoch, as C-CLIP's code steps its scheduler; warmup is then
    /// `warmup_epochs`).
    #[serde(default)]
    pub schedule_unit: ScheduleUnit,
    /// Linear warmup epochs at the start of each task (with `schedule_unit = "epoch"`).
    #[serde(default)]
    pub warmup_epochs: usize,
    /// The lr factor warmup starts from, rising linearly to 1 (C-CLIP: 0.01). Unset: the
    /// k-th warmup unit (0-based) has factor (k + 1) / warmup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_start_ratio: Option<f64>,
    /// Clip the global gradient norm to this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    /// Groups are matched in order; the first match wins.
    #[serde(default)]
    pub groups: Vec<ParamGroup>,
}

#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub epochs: usize,
    pub batch_size: usize,
    #[serde(default = "d::eval_batch_size")]
    pub eval_batch_size: usize,
    /// `clip` (contrastive image-text training, the default) or `reconstruction` (train the
    /// model's `image_tokenizer` alone on the tasks' images, e.g. a VQ-VAE).
    #[serde(default = "d::objective")]
    pub objective: String,
    /// Compute precision of training: `f32` (the parameters' own), or `bf16` / `f16` mixed
    /// precision (master weights and optimizer state stay in full precision; the loss is
    /// computed in full precision).
    #[serde(default = "d::precision")]
    pub precision: String,
    /// Evaluation precision: `f32` (full, the default) or `train` (as training computes).
    #[serde(default = "d::precision")]
    pub eval_precision: String,
    /// Keep the frozen image tokenizer's codes of every training image after its first epoch
    /// (by image content), so later epochs skip the tokenizer. Costs memory: tokens x code
    /// width floats per image.
    #[serde(default)]
    pub cache_image_codes: bool,
    /// For strategies that compare against an old model (CKC, LwF): on the first task, the
    /// old model is the initial (e.g. pretrained) model, as C-CLIP's code runs CKC from task
    /// 1 on. Off, they have no old model on the first task.
    #[serde(default)]
    pub old_model_on_first_task: bool,
}

/// One task of the sequence, or one held-out zero-shot set: a name and where its data comes
/// from. `source = "shapes"` is the embedded generator (no download); the others read
/// image-text data from disk (see `data::source`).
#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    pub name: String,
    /// `shapes`, `jsonl`, `csv`, `folders` or `karpathy`.
    #[serde(default = "d::source")]
    pub source: String,
    /// The data: a file or a directory; `dataset:NAME` names a dataset `recall data prepare`
    /// made, `asset:NAME/...` a fetched asset. Relative paths are relative to the experiment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Where image paths in a CSV/JSONL/Karpathy file are relative to (default: the file's
    /// directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<PathBuf>,
    /// Fraction of the examples held out for testing when the data has no split of its own.
    #[serde(default = "d::test_fraction")]
    pub test_fraction: f64,
    /// Seed of that split and of subsampling; independent of the experiment's seed so every
    /// seed of a sweep sees the same test set.
    #[serde(default)]
    pub split_seed: u64,
    /// Keep at most this many training / test examples (a seeded subsample).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_train: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_test: Option<usize>,
    /// Keep only examples of these classes / categories (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// Caption templates for class-labelled data (`{}` or `{class}` is the class name): the
    /// captions of class folders and the prompts of zero-shot classification. Default: the
    /// dataset's own (dataset.json), else "a photo of a {}.".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<String>,
    /// A missing or undecodable image: `fail` (default) stops with the file's name; `skip`
    /// counts it, records it in the run directory and goes on.
    #[serde(default = "d::on_error")]
    pub on_error: OnError,
    // ---- the shapes generator ----
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shapes: Vec<String>,
    #[serde(default = "d::colors")]
    pub colors: Vec<String>,
    /// `filled` or `outline`.
    #[serde(default = "d::style")]
    pub style: String,
    /// Training images per (color, shape, position) combination.
    #[serde(default = "d::train_per_combo")]
    pub train_per_combo: usize,
    /// A task made of several sources (e.g. a pretraining mix): each part is a data section
    /// of its own; their splits are concatenated. The task's own source is then unused.
    #[serde(default, rename = "part", skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<TaskSection>,
}

/// What to do with an image that cannot be read.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    Fail,
    Skip,
}

/// An evaluator plugin and which data it judges.
#[derive(Deserialize, Serialize, Clone, Debug)]
pub struct EvaluatorSection {
    pub plugin: String,
    /// `tasks` (default): every task's test split with its captions (retrieval);
    /// `zeroshot`: every `[[zeroshot]]` set with its class prompts (classification).
    #[serde(default = "d::suite")]
    pub suite: String,
    #[serde(flatten)]
    pub options: toml::Table,
}

impl EvaluatorSection {
    pub fn options_text(&self) -> String {
        toml::to_string(&self.options).unwrap_or_default()
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct PluginsSection {
    /// Extra directories searched for plugins, before `RECALL_PLUGIN_PATH`.
    #[serde(default)]
    pub search_path: Vec<PathBuf>,
}

mod d {
    use std::path::PathBuf;
    pub fn device() -> String {
        "cpu".into()
    }
    pub fn dtype() -> String {
        "f32".into()
    }
    pub fn output_dir() -> PathBuf {
        "runs".into()
    }
    pub fn logit_scale() -> f64 {
        (1.0f64 / 0.07).ln()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn one() -> f64 {
        1.0
    }
    pub fn freeze() -> super::FreezeBase {
        super::FreezeBase::Adapted
    }
    pub fn weight_decay() -> f64 {
        0.1
    }
    pub fn beta1() -> f64 {
        0.9
    }
    pub fn beta2() -> f64 {
        0.98
    }
    pub fn eps() -> f64 {
        1e-6
    }
    pub fn precision() -> String {
        "f32".into()
    }
    pub fn objective() -> String {
        "clip".into()
    }
    pub fn eval_batch_size() -> usize {
        256
    }
    pub fn source() -> String {
        "shapes".into()
    }
    pub fn colors() -> Vec<String> {
        ["red", "green", "blue", "yellow", "magenta", "cyan"].map(String::from).to_vec()
    }
    pub fn style() -> String {
        "filled".into()
    }
    pub fn train_per_combo() -> usize {
        6
    }
    pub fn test_fraction() -> f64 {
        0.2
    }
    pub fn on_error() -> super::OnError {
        super::OnError::Fail
    }
    pub fn suite() -> String {
        "tasks".into()
    }
}

/// 1-based line and column of byte `offset` in `src`.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |i| offset - i - 1) + 1;
    (line, column)
}

/// A step in a path into the document: a key or an index into an array of tables.
#[derive(Debug, Clone)]
pub enum PathStep {
    Key(String),
    Index(usize),
}

/// Byte span of the key at `path` in `src`; when the full path is absent, the span of the
/// deepest part that exists (the section), so an error still points near its cause.
pub fn locate(src: &str, path: &[PathStep]) -> Option<std::ops::Range<usize>> {
    enum Node<'a> {
        Item(&'a toml_edit::Item),
        Table(&'a toml_edit::Table),
    }
    let doc = toml_edit::Document::parse(src.to_string()).ok()?;
    let mut node = Node::Item(doc.as_item());
    let mut span = None;
    for step in path {
        match step {
            PathStep::Key(k) => {
                let table = match &node {
                    Node::Item(i) => i.as_table_like(),
                    Node::Table(t) => Some(*t as &dyn toml_edit::TableLike),
                };
                let Some((key, value)) = table.and_then(|t| t.get_key_value(k)) else { return span };
                span = key.span().or(span);
                node = Node::Item(value);
            }
            PathStep::Index(n) => {
                let Node::Item(item) = node else { return span };
                let Some(t) = item.as_array_of_tables().and_then(|a| a.get(*n)) else { return span };
                span = t.span().or(span);
                node = Node::Table(t);
            }
        }
    }
    span
}

/// Parse a dotted path like `strategy[0].rank` or `model.vision.width`.
pub fn parse_path(dotted: &str) -> Vec<PathStep> {
    // Segments are separated by dots; a segment may be quoted (`sweep.axes."optimizer.lr"`)
    // and may end in `[INDEX]`.
    let mut steps = Vec::new();
    let mut chars = dotted.chars().peekable();
    while chars.peek().is_some() {
        let mut key = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            for c in chars.by_ref() {
                if c == '"' {
                    break;
                }
                key.push(c);
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' || c == '[' {
                    break;
                }
                key.push(c);
                chars.next();
            }
        }
        steps.push(PathStep::Key(key));
        while chars.peek() == Some(&'[') {
            chars.next();
            let index: String = chars.by_ref().take_while(|&c| c != ']').collect();
            if let Ok(i) = index.parse() {
                steps.push(PathStep::Index(i));
            }
        }
        if chars.peek() == Some(&'.') {
            chars.next();
        }
    }
    steps
}

/// Apply `key=value` overrides (TOML values; bare words are strings) to the document text.
pub fn apply_overrides(src: &str, file: &str, overrides: &[String]) -> Result<String, ConfigError> {
    if overrides.is_empty() {
        return Ok(src.to_string());
    }
    let err = |message: String| ConfigError { file: "--set".into(), line: 1, column: 1, message };
    let mut doc: toml_edit::DocumentMut = src.parse().map_err(|e: toml_edit::TomlError| {
        let (line, column) = e.span().map_or((1, 1), |s| line_col(src, s.start));
        ConfigError { file: file.into(), line, column, message: e.message().to_string() }
    })?;
    for o in overrides {
        let (key, value) = o.split_once('=').ok_or_else(|| err(format!("`{o}` is not of the form key=value")))?;
        let value: toml_edit::Value = value.trim().parse().unwrap_or_else(|_| toml_edit::Value::from(value.trim()));
        let parts: Vec<&str> = key.trim().split('.').collect();
        let mut table = doc.as_table_mut() as &mut dyn toml_edit::TableLike;
        for p in &parts[..parts.len() - 1] {
            // `task[1]` steps into the second [[task]].
            let (name, index) = match p.split_once('[') {
                Some((n, rest)) => {
                    let i = rest
                        .strip_suffix(']')
                        .and_then(|i| i.parse::<usize>().ok())
                        .ok_or_else(|| err(format!("`{key}`: `{p}` is not NAME[INDEX]")))?;
                    (n, Some(i))
                }
                None => (*p, None),
            };
            table = match index {
                None => table
                    .entry(name)
                    .or_insert(toml_edit::Item::Table(toml_edit::Table::new()))
                    .as_table_like_mut()
                    .ok_or_else(|| err(format!("`{key}`: `{name}` is not a table")))?,
                Some(i) => {
                    let item = table.get_mut(name).ok_or_else(|| err(format!("`{key}`: there is no `{name}`")))?;
                    let len = item.as_array_of_tables().map(|a| a.len()).unwrap_or(0);
                    match item {
                        toml_edit::Item::ArrayOfTables(a) => {
                            a.get_mut(i).map(|t| t as &mut dyn toml_edit::TableLike).ok_or_else(|| {
                                err(format!("`{key}`: `{name}` has {len} entries, index {i} is past the end"))
                            })?
                        }
                        _ => return Err(err(format!("`{key}`: `{name}` is not an array of tables ([[{name}]])"))),
                    }
                }
            };
        }
        table.insert(parts[parts.len() - 1], toml_edit::Item::Value(value));
    }
    Ok(doc.to_string())
}

/// Turn a toml/serde error into a located error with a "did you mean" hint.
fn located(file: &str, src: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = e.span().map_or((1, 1), |s| line_col(src, s.start));
    let mut message = e.message().trim().to_string();
    let text_at = src.lines().nth(line.saturating_sub(1)).unwrap_or("").trim();
    if let Some(better) = explain_shape_error(&message, text_at) {
        message = better;
    }
    if let Some((key, expected)) = recall_sdk::config::unknown_field(&message) {
        message = format!("unknown key `{key}`; valid keys here: {}", expected.join(", "));
        if let Some(best) = recall_sdk::config::nearest(&key, &expected) {
            message.push_str(&format!("; did you mean `{best}`?"));
        }
    }
    ConfigError { file: file.into(), line, column, message }
}

/// Name the key in toml's shape errors, from the line they point at: "duplicate key" says
/// which, and a `[table]` where a list of tables is expected says to write `[[table]]`.
fn explain_shape_error(message: &str, line: &str) -> Option<String> {
    let header = line.strip_prefix('[').and_then(|l| l.split(']').next()).map(str::trim);
    if message.starts_with("duplicate key") {
        return Some(match header {
            Some(h) => format!("table `[{}]` is defined twice; merge the two into one", h.trim_matches('[')),
            None => {
                let key = line.split('=').next().unwrap_or(line).trim();
                format!("duplicate key `{key}`: it is already set in this table; keep one")
            }
        });
    }
    if message.contains("expected a sequence") {
        if let Some(h) = header.filter(|_| !line.starts_with("[[")) {
            return Some(format!(
                "`[{h}]` declares one table, but `{h}` is a list of tables: write `[[{h}]]` (one per entry)"
            ));
        }
    }
    None
}

/// A loaded experiment: the config and the text it came from (for locating later errors).
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub config: ExperimentConfig,
    pub source: String,
    pub file: String,
}

impl LoadedConfig {
    /// A located error for the key at `dotted` (e.g. `adapter.rnak`).
    pub fn error_at(&self, dotted: &str, message: impl Into<String>) -> ConfigError {
        let (line, column) =
            locate(&self.source, &parse_path(dotted)).map_or((1, 1), |s| line_col(&self.source, s.start));
        ConfigError { file: self.file.clone(), line, column, message: message.into() }
    }
}

/// Parse experiment text.
pub fn parse(src: &str, file: &str) -> Result<LoadedConfig, ConfigError> {
    let mut config: ExperimentConfig = toml::from_str(src).map_err(|e| located(file, src, &e))?;
    // Paths in the file are relative to the file; they are stored absolute, so the resolved
    // config saved with a run still names the same files when `--resume` reads it.
    let base: Option<PathBuf> = Path::new(file)
        .parent()
        .map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d })
        .filter(|d| d.is_dir())
        .and_then(|d| std::path::absolute(d).ok());
    if let Some(dir) = &base {
        if let Some(ck) =
            config.model.checkpoint.as_mut().filter(|p| p.is_relative() && !p.to_string_lossy().starts_with("asset:"))
        {
            *ck = dir.join(&*ck);
        }
        if let Some(init) = config.model.init.as_mut().filter(|p| p.is_relative()) {
            *init = dir.join(&*init);
        }
        if let Some(t) = config.teacher.as_mut() {
            for p in [t.init.as_mut(), t.checkpoint.as_mut()].into_iter().flatten() {
                if p.is_relative() && !p.to_string_lossy().starts_with("asset:") {
                    *p = dir.join(&*p);
                }
            }
        }
        // File options of towers are relative to the experiment file, like its data.
        let teacher_vision = config.teacher.as_mut().map(|t| &mut t.vision);
        let image_tokenizer = config.model.image_tokenizer.as_mut();
        let towers = [Some(&mut config.model.vision), Some(&mut config.model.text), teacher_vision, image_tokenizer];
        for tower in towers.into_iter().flatten() {
            for key in ["model", "library", "checkpoint", "init_from"] {
                if let Some(toml::Value::String(f)) = tower.options.get_mut(key) {
                    if !f.starts_with("asset:") && Path::new(f.as_str()).is_relative() {
                        *f = dir.join(&*f).display().to_string();
                    }
                }
            }
        }
    }
    let mut loaded = LoadedConfig { config, source: src.to_string(), file: file.to_string() };
    validate(&loaded)?;
    resolve_data_paths(&mut loaded, base.as_deref())?;
    resolve_assets(&mut loaded)?;
    Ok(loaded)
}

/// Read, override and parse an experiment file.
pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedConfig, ConfigError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: 1,
        column: 1,
        message: format!("cannot read the experiment file: {e}"),
    })?;
    let src = apply_overrides(&src, &file, overrides)?;
    parse(&src, &file)
}

/// `asset:NAME/sub/path` in a plugin option (or `model.checkpoint`) names a file of a fetched
/// asset; it becomes the absolute path in the cache. An asset that is not cached is an error
/// that says how to fetch it.
pub fn resolve_asset(value: &str) -> Result<Option<PathBuf>, String> {
    let Some(rest) = value.strip_prefix("asset:") else { return Ok(None) };
    let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
    let registry = crate::fetch::Registry::load().map_err(|e| e.to_string())?;
    let asset = registry.get(name).map_err(|e| e.to_string())?;
    let home = crate::fetch::recall_home();
    if !crate::fetch::is_cached(&home, asset) {
        return Err(format!("asset `{name}` is not in the cache ({}); run `recall fetch {name}`", home.display()));
    }
    let dir = crate::fetch::asset_dir(&home, asset);
    Ok(Some(if sub.is_empty() { dir } else { dir.join(sub) }))
}

fn resolve_assets(c: &mut LoadedConfig) -> Result<(), ConfigError> {
    let mut sections: Vec<(String, &mut toml::Table)> = vec![
        ("model.tokenizer".into(), &mut c.config.model.tokenizer.options),
        ("model.vision".into(), &mut c.config.model.vision.options),
        ("model.text".into(), &mut c.config.model.text.options),
    ];
    if let Some(a) = c.config.adapter.as_mut() {
        sections.push(("adapter".into(), &mut a.options));
    }
    if let Some(t) = c.config.teacher.as_mut() {
        sections.push(("teacher.vision".into(), &mut t.vision.options));
    }
    if let Some(t) = c.config.model.image_tokenizer.as_mut() {
        sections.push(("model.image_tokenizer".into(), &mut t.options));
    }
    for (i, s) in c.config.strategies.iter_mut().enumerate() {
        sections.push((format!("strategy[{i}]"), &mut s.options));
    }
    for (i, s) in c.config.evaluators.iter_mut().enumerate() {
        sections.push((format!("evaluator[{i}]"), &mut s.options));
    }
    let mut failure = None;
    for (section, table) in sections {
        for (key, value) in table.iter_mut() {
            if let toml::Value::String(s) = value {
                match resolve_asset(s) {
                    Ok(Some(p)) => *s = p.display().to_string(),
                    Ok(None) => {}
                    Err(m) => failure = failure.or(Some((format!("{section}.{key}"), m))),
                }
            }
        }
    }
    let teacher_ck = c.config.teacher.as_mut().and_then(|t| t.checkpoint.as_mut()).map(|p| ("teacher.checkpoint", p));
    for (key, ck) in
        [c.config.model.checkpoint.as_mut().map(|p| ("model.checkpoint", p)), teacher_ck].into_iter().flatten()
    {
        match resolve_asset(&ck.to_string_lossy()) {
            Ok(Some(p)) => *ck = p,
            Ok(None) => {}
            Err(m) => failure = failure.or(Some((key.to_string(), m))),
        }
    }
    match failure {
        Some((key, m)) => Err(c.error_at(&key, m)),
        None => Ok(()),
    }
}

/// The dotted key of data section `i` of `key` (`task[2]`; `reference` is a single table).
fn section_key(key: &str, i: usize) -> String {
    if key == "reference" {
        key.to_string()
    } else {
        format!("{key}[{i}]")
    }
}

/// Task and zero-shot data paths: `dataset:NAME` (prepared), `asset:NAME/...` (fetched), or
/// relative to the experiment file.
fn resolve_data_paths(c: &mut LoadedConfig, base: Option<&Path>) -> Result<(), ConfigError> {
    let mut failure = None;
    let mut slots: Vec<(String, &mut Option<PathBuf>)> = Vec::new();
    let cfg = &mut c.config;
    let groups: [(&str, &mut [TaskSection]); 3] = [
        ("task", &mut cfg.tasks[..]),
        ("zeroshot", &mut cfg.zeroshot[..]),
        ("reference", cfg.reference.as_mut_slice()),
    ];
    for (key, sets) in groups {
        for (i, t) in sets.iter_mut().enumerate() {
            let at = section_key(key, i);
            slots.push((format!("{at}.path"), &mut t.path));
            slots.push((format!("{at}.images"), &mut t.images));
            for (j, part) in t.parts.iter_mut().enumerate() {
                slots.push((format!("{at}.part[{j}].path"), &mut part.path));
                slots.push((format!("{at}.part[{j}].images"), &mut part.images));
            }
        }
    }
    for (at, slot) in slots {
        let Some(p) = slot.as_mut() else { continue };
        let text = p.to_string_lossy().into_owned();
        let resolved = match crate::data::convert::resolve(&text) {
            Ok(None) => resolve_asset(&text),
            other => other,
        };
        match resolved {
            Ok(Some(r)) => *p = r,
            Ok(None) => {
                if let Some(b) = base.filter(|_| p.is_relative()) {
                    *p = b.join(&*p);
                }
            }
            Err(m) => failure = failure.or(Some((at, m))),
        }
    }
    match failure {
        Some((key, m)) => Err(c.error_at(&key, m)),
        None => Ok(()),
    }
}

/// Checks serde cannot express.
fn validate(c: &LoadedConfig) -> Result<(), ConfigError> {
    let cfg = &c.config;
    if cfg.tasks.is_empty() {
        return Err(c.error_at("task", "the experiment has no [[task]]; add at least one"));
    }
    let reconstruction = match cfg.train.objective.as_str() {
        "clip" => false,
        "reconstruction" => true,
        other => {
            return Err(c.error_at(
                "train.objective",
                format!("unknown objective `{other}`; expected `clip` or `reconstruction`"),
            ))
        }
    };
    if !matches!(cfg.train.precision.as_str(), "f32" | "bf16" | "f16") {
        return Err(c.error_at(
            "train.precision",
            format!("unknown precision `{}`; expected `f32`, `bf16` or `f16`", cfg.train.precision),
        ));
    }
    if !matches!(cfg.train.eval_precision.as_str(), "f32" | "train") {
        return Err(c.error_at(
            "train.eval_precision",
            format!("unknown eval_precision `{}`; expected `f32` or `train`", cfg.train.eval_precision),
        ));
    }
    if cfg.train.precision != "f32" && cfg.experiment.dtype == "f64" {
        return Err(c.error_at(
            "train.precision",
            "mixed precision keeps f32 master weights; use experiment.dtype = \"f32\" with it",
        ));
    }
    if reconstruction && cfg.model.image_tokenizer.is_none() {
        return Err(c.error_at(
            "train.objective",
            "a reconstruction run trains the model's image tokenizer: add [model.image_tokenizer]",
        ));
    }
    let mut plugin_sections: Vec<(String, &PluginSection)> = Vec::new();
    if !reconstruction {
        plugin_sections.extend([
            ("model.tokenizer".to_string(), &cfg.model.tokenizer),
            ("model.vision".into(), &cfg.model.vision),
            ("model.text".into(), &cfg.model.text),
        ]);
    }
    if let Some(t) = &cfg.model.image_tokenizer {
        plugin_sections.push(("model.image_tokenizer".into(), t));
    }
    plugin_sections.extend(cfg.strategies.iter().enumerate().map(|(i, s)| (format!("strategy[{i}]"), s)));
    if let Some(t) = &cfg.teacher {
        plugin_sections.push(("teacher.vision".into(), &t.vision));
    }
    for (at, p) in plugin_sections {
        let tower = matches!(at.as_str(), "model.vision" | "model.text" | "teacher.vision");
        let onnx = tower && crate::onnx::is_onnx(&p.options);
        match (onnx, p.plugin.is_empty()) {
            (true, false) => {
                return Err(c.error_at(
                    &format!("{at}.plugin"),
                    "a tower with backend = \"onnx\" runs its model file, not a plugin; remove `plugin`",
                ))
            }
            (false, true) => {
                let hint = if at == "model.vision" || at == "model.text" {
                    " (or backend = \"onnx\" with a model file)"
                } else {
                    ""
                };
                return Err(c.error_at(&at, format!("`plugin` is missing: name the plugin to load{hint}")));
            }
            _ => {}
        }
        if let Some(b) = p.options.get("backend").and_then(|v| v.as_str()).filter(|b| *b != "onnx") {
            return Err(c.error_at(
                &format!("{at}.backend"),
                format!("unknown backend `{b}`; the one backend a tower can name is `onnx` (plugins run on candle)"),
            ));
        }
    }
    if cfg.train.batch_size < 2 {
        return Err(
            c.error_at("train.batch_size", "batch_size must be at least 2 (the contrastive loss needs negatives)")
        );
    }
    if cfg.train.epochs == 0 {
        return Err(c.error_at("train.epochs", "epochs must be at least 1"));
    }
    if !matches!(cfg.experiment.dtype.as_str(), "f32" | "f64") {
        return Err(c.error_at(
            "experiment.dtype",
            format!("unsupported dtype `{}`; expected `f32` or `f64`", cfg.experiment.dtype),
        ));
    }
    if cfg.optimizer.lr <= 0.0 || !cfg.optimizer.lr.is_finite() {
        return Err(c.error_at("optimizer.lr", "lr must be a positive number"));
    }
    validate_ranges(c)?;
    validate_names(c)?;
    for (key, sets) in
        [("task", &cfg.tasks[..]), ("zeroshot", &cfg.zeroshot[..]), ("reference", cfg.reference.as_slice())]
    {
        for (i, t) in sets.iter().enumerate() {
            if t.parts.is_empty() {
                if let Err((field, m)) = crate::data::source::validate(t) {
                    return Err(c.error_at(
                        &format!("{}{}", section_key(key, i), field.map(|f| format!(".{f}")).unwrap_or_default()),
                        m,
                    ));
                }
            }
            for (j, part) in t.parts.iter().enumerate() {
                if let Err((field, m)) = crate::data::source::validate(part) {
                    let at = format!(
                        "{}.part[{j}]{}",
                        section_key(key, i),
                        field.map(|f| format!(".{f}")).unwrap_or_default()
                    );
                    return Err(c.error_at(&at, m));
                }
            }
        }
    }
    for (i, e) in cfg.evaluators.iter().enumerate() {
        if !matches!(e.suite.as_str(), "tasks" | "zeroshot") {
            return Err(c.error_at(
                &format!("evaluator[{i}].suite"),
                format!("unknown suite `{}`; expected `tasks` or `zeroshot`", e.suite),
            ));
        }
        if e.suite == "zeroshot" && cfg.zeroshot.is_empty() {
            return Err(c.error_at(
                &format!("evaluator[{i}].suite"),
                "this evaluator judges the [[zeroshot]] sets, but the experiment declares none",
            ));
        }
    }
    if let Some(t) = &cfg.tracking {
        if !["local", "mlflow"].contains(&t.backend.as_str()) {
            return Err(c.error_at(
                "tracking.backend",
                format!(
                    "unknown tracking backend `{}`; available: local, mlflow (the run directory is always written)",
                    t.backend
                ),
            ));
        }
    }
    if cfg.evaluators.is_empty() && !reconstruction {
        return Err(c.error_at(
            "evaluator",
            "the experiment has no [[evaluator]]; add e.g. `[[evaluator]] plugin = \"retrieval\"`",
        ));
    }
    Ok(())
}

/// Numeric keys outside their meaningful range: each would train something other than what
/// the file says (a negative clip trains backwards, a clip of 0 trains nothing).
fn validate_ranges(c: &LoadedConfig) -> Result<(), ConfigError> {
    let o = &c.config.optimizer;
    let positive = |v: f64| v > 0.0 && v.is_finite();
    let non_negative = |v: f64| v >= 0.0 && v.is_finite();
    let mut checks: Vec<(String, bool, String)> = vec![
        (
            "optimizer.grad_clip".into(),
            o.grad_clip.is_none_or(positive),
            "grad_clip must be a positive number (the largest global gradient norm kept); remove the key to train \
             without clipping"
                .into(),
        ),
        ("optimizer.weight_decay".into(), non_negative(o.weight_decay), "weight_decay must be a number >= 0".into()),
        ("optimizer.beta1".into(), (0.0..1.0).contains(&o.beta1), "beta1 must be in [0, 1)".into()),
        ("optimizer.beta2".into(), (0.0..1.0).contains(&o.beta2), "beta2 must be in [0, 1)".into()),
        ("optimizer.eps".into(), positive(o.eps), "eps must be a positive number".into()),
        (
            "optimizer.min_lr_ratio".into(),
            (0.0..=1.0).contains(&o.min_lr_ratio),
            "min_lr_ratio must be in [0, 1]".into(),
        ),
        (
            "optimizer.warmup_start_ratio".into(),
            o.warmup_start_ratio.is_none_or(|r| (0.0..=1.0).contains(&r)),
            "warmup_start_ratio must be in [0, 1] (the lr factor warmup starts from)".into(),
        ),
        (
            "optimizer.warmup_epochs".into(),
            o.warmup_epochs == 0 || o.schedule_unit == ScheduleUnit::Epoch,
            "warmup_epochs counts epochs of a per-epoch schedule: set schedule_unit = \"epoch\", or use warmup_steps"
                .into(),
        ),
        (
            "optimizer.warmup_steps".into(),
            o.warmup_steps == 0 || o.schedule_unit == ScheduleUnit::Step,
            "with schedule_unit = \"epoch\" the warmup is counted in epochs: use warmup_epochs instead".into(),
        ),
        (
            "optimizer.warmup_start_ratio".into(),
            o.warmup_start_ratio.is_none() || o.warmup_steps > 0 || o.warmup_epochs > 0,
            "warmup_start_ratio applies to a warmup: set warmup_steps or warmup_epochs, or remove it".into(),
        ),
        (
            "model.logit_scale_init".into(),
            c.config.model.logit_scale_init.is_finite(),
            "logit_scale_init must be a finite number (CLIP: ln(1/0.07) = 2.659)".into(),
        ),
        (
            "train.eval_batch_size".into(),
            c.config.train.eval_batch_size > 0,
            "eval_batch_size must be at least 1".into(),
        ),
    ];
    for (i, g) in o.groups.iter().enumerate() {
        checks.push((
            format!("optimizer.groups[{i}].lr"),
            g.lr.is_none_or(positive),
            "a group's lr must be a positive number (freeze parameters with [model] frozen instead)".into(),
        ));
        checks.push((
            format!("optimizer.groups[{i}].weight_decay"),
            g.weight_decay.is_none_or(non_negative),
            "a group's weight_decay must be a number >= 0".into(),
        ));
        checks.push((
            format!("optimizer.groups[{i}].params"),
            !g.params.is_empty(),
            "a group needs at least one parameter pattern in `params`".into(),
        ));
    }
    if let Some(a) = &c.config.adapter {
        checks.push((
            "adapter.merge_coefficient".into(),
            a.merge_coefficient > 0.0 && a.merge_coefficient <= 1.0,
            format!(
                "merge_coefficient must be in (0, 1] (the fraction of the adapter's delta folded into the weights; \
                 C-CLIP: 0.5), got {}",
                a.merge_coefficient
            ),
        ));
        checks.extend(merge_checks(a, c.config.tasks.len()));
    }
    match checks.into_iter().find(|(_, ok, _)| !ok) {
        Some((key, _, message)) => Err(c.error_at(&key, message)),
        None => Ok(()),
    }
}

/// The merge knobs: a valid schedule, not both a schedule and a coefficient, and none of
/// them without `merge_after_task` (where they would be silently ignored).
fn merge_checks(a: &AdapterSection, tasks: usize) -> Vec<(String, bool, String)> {
    let in_range = |c: f64| c > 0.0 && c <= 1.0;
    let mut checks = Vec::new();
    match &a.merge_schedule {
        Some(MergeSchedule::Named(n)) => checks.push((
            "adapter.merge_schedule".into(),
            MergeSchedule::NAMES.contains(&n.as_str()),
            format!(
                "unknown merge_schedule `{n}`; expected one of {} or a list with one coefficient per task",
                MergeSchedule::NAMES.join(", ")
            ),
        )),
        Some(MergeSchedule::PerTask(cs)) => {
            checks.push((
                "adapter.merge_schedule".into(),
                cs.len() == tasks,
                format!("merge_schedule lists {} coefficients for {tasks} tasks; give one per task", cs.len()),
            ));
            checks.push((
                "adapter.merge_schedule".into(),
                cs.iter().all(|&c| in_range(c)),
                format!("every merge_schedule coefficient must be in (0, 1], got {cs:?}"),
            ));
        }
        None => {}
    }
    checks.push((
        "adapter.merge_schedule".into(),
        a.merge_schedule.is_none() || a.merge_coefficient == 1.0,
        "set merge_coefficient or merge_schedule, not both".into(),
    ));
    let merging_knob = a.merge_schedule.is_some() || a.merge_scope != MergeScope::Adapter;
    checks.push((
        if a.merge_schedule.is_some() { "adapter.merge_schedule" } else { "adapter.merge_scope" }.into(),
        a.merge_after_task || !merging_knob,
        "merge_schedule and merge_scope apply to merges: set merge_after_task = true, or remove them".into(),
    ));
    checks
}

/// Task and zero-shot set names are the columns of every result: each must be unique and
/// non-empty within its list.
fn validate_names(c: &LoadedConfig) -> Result<(), ConfigError> {
    for (key, sets) in [("task", &c.config.tasks[..]), ("zeroshot", &c.config.zeroshot[..])] {
        for (i, t) in sets.iter().enumerate() {
            if t.name.trim().is_empty() {
                return Err(c.error_at(&format!("{key}[{i}].name"), "the name must not be empty"));
            }
            if let Some(j) = sets[..i].iter().position(|u| u.name == t.name) {
                return Err(c.error_at(
                    &format!("{key}[{i}].name"),
                    format!(
                        "{key}[{i}] and {key}[{j}] are both named `{}`; names label the results' rows and columns, so \
                         each must be unique",
                        t.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const MINIMAL: &str = r#"
[experiment]
name = "t"

[model.tokenizer]
plugin = "clip-bpe"

[model.vision]
plugin = "clip-vision"

[model.text]
plugin = "clip-text"

[optimizer]
lr = 0.001

[train]
epochs = 1
batch_size = 8

[[task]]
name = "a"
shapes = ["circle", "square"]

[[evaluator]]
plugin = "retrieval"
"#;

    #[test]
    fn minimal_parses() {
        let c = parse(MINIMAL, "x.toml").unwrap();
        assert_eq!(c.config.tasks.len(), 1);
        assert_eq!(c.config.experiment.device, "cpu");
    }

    #[test]
    fn typo_is_located_with_suggestion() {
        let src = MINIMAL.replace("batch_size = 8", "batch_size = 8\nepohcs = 2");
        let e = parse(&src, "x.toml").unwrap_err();
        assert_eq!(e.file, "x.toml");
        let expected_line = src.lines().position(|l| l.starts_with("epohcs")).unwrap() + 1;
        assert_eq!((e.line, e.column), (expected_line, 1), "{e}");
        assert!(e.message.contains("did you mean `epochs`?"), "{e}");
    }

    #[test]
    fn plugin_keys_are_located() {
        let src = MINIMAL.replace("plugin = \"clip-vision\"", "plugin = \"clip-vision\"\nwidht = 3");
        let c = parse(&src, "x.toml").unwrap();
        let e = c.error_at("model.vision.widht", "m");
        let expected_line = src.lines().position(|l| l.starts_with("widht")).unwrap() + 1;
        assert_eq!((e.line, e.column), (expected_line, 1));
        let src = MINIMAL.replace("plugin = \"retrieval\"", "plugin = \"retrieval\"\nkz = 3");
        let c = parse(&src, "x.toml").unwrap();
        let e = c.error_at("evaluator[0].kz", "m");
        let expected_line = src.lines().position(|l| l.starts_with("kz")).unwrap() + 1;
        assert_eq!(e.line, expected_line);
    }

    #[test]
    fn overrides_apply() {
        let src =
            apply_overrides(MINIMAL, "x.toml", &["train.epochs=3".into(), "experiment.device=cuda:1".into()]).unwrap();
        let c = parse(&src, "x.toml").unwrap();
        assert_eq!(c.config.train.epochs, 3);
        assert_eq!(c.config.experiment.device, "cuda:1");
    }

    #[test]
    fn overrides_index_arrays_of_tables() {
        let two = format!("{MINIMAL}\n[[task]]\nname = \"b\"\nshapes = [\"ring\"]\n");
        let src = apply_overrides(&two, "x.toml", &["task[1].train_per_combo=9".into()]).unwrap();
        let c = parse(&src, "x.toml").unwrap();
        assert_eq!((c.config.tasks[0].train_per_combo, c.config.tasks[1].train_per_combo), (6, 9));
        let e = apply_overrides(&two, "x.toml", &["task[2].name=c".into()]).unwrap_err();
        assert!(e.message.contains("index 2 is past the end"), "{e}");
        let e = apply_overrides(&two, "x.toml", &["train[0].epochs=1".into()]).unwrap_err();
        assert!(e.message.contains("not an array of tables"), "{e}");
    }

    #[test]
    fn out_of_range_numbers_are_located_errors() {
        let cases = [
            ("optimizer.grad_clip=-1", "grad_clip", "grad_clip must be a positive"),
            ("optimizer.grad_clip=0", "grad_clip", "grad_clip must be a positive"),
            ("optimizer.weight_decay=-5", "weight_decay", "weight_decay must be a number >= 0"),
            ("optimizer.beta2=1.0", "beta2", "beta2 must be in [0, 1)"),
            ("optimizer.min_lr_ratio=2", "min_lr_ratio", "min_lr_ratio must be in [0, 1]"),
            ("train.eval_batch_size=0", "eval_batch_size", "eval_batch_size must be at least 1"),
        ];
        for (set, key, message) in cases {
            let src = apply_overrides(MINIMAL, "x.toml", &[set.to_string()]).unwrap();
            let e = parse(&src, "x.toml").unwrap_err();
            assert!(e.message.contains(message), "{set}: {e}");
            assert_eq!(e.line, src.lines().position(|l| l.starts_with(key)).unwrap() + 1, "{set}: {e}");
        }
        let src = MINIMAL.replace(
            "[optimizer]\nlr = 0.001",
            "[optimizer]\nlr = 0.001\n\n[[optimizer.groups]]\nparams = [\"text.*\"]\nlr = -0.001",
        );
        let e = parse(&src, "x.toml").unwrap_err();
        assert!(e.message.contains("a group's lr must be a positive number"), "{e}");
        assert_eq!(e.line, src.lines().position(|l| l == "lr = -0.001").unwrap() + 1, "{e}");
        let src = format!("{MINIMAL}\n[adapter]\nplugin = \"lora\"\nmerge_coefficient = 2.5\n");
        let e = parse(&src, "x.toml").unwrap_err();
        assert!(e.message.contains("merge_coefficient must be in (0, 1]"), "{e}");
    }

    #[test]
    fn a_per_epoch_schedule_warms_up_from_its_start_ratio_and_holds_within_an_epoch() {
        // C-CLIP's code: 5 warmup epochs from 0.01 lr, then cosine to 0.01 lr, over 40 epochs.
        let sets = [
            "optimizer.schedule_unit=\"epoch\"",
            "optimizer.warmup_epochs=5",
            "optimizer.warmup_start_ratio=0.01",
            "optimizer.min_lr_ratio=0.01",
        ]
        .map(String::from);
        let src = apply_overrides(MINIMAL, "x.toml", &sets).unwrap();
        let o = parse(&src, "x.toml").unwrap().config.optimizer;
        let (steps_per_epoch, epochs) = (7, 40);
        let at = |epoch: usize, step_in_epoch: usize| {
            o.lr_factor(epoch * steps_per_epoch + step_in_epoch, epoch, steps_per_epoch * epochs, epochs)
        };
        assert!((at(0, 0) - 0.01).abs() < 1e-12);
        assert_eq!(at(0, 0), at(0, 6), "constant within an epoch");
        assert!((at(4, 3) - (0.01 + 0.99 * 4.0 / 5.0)).abs() < 1e-12);
        assert!((at(5, 0) - 1.0).abs() < 1e-12);
        let mid = 0.01 + 0.99 * 0.5 * (1.0 + (std::f64::consts::PI * 17.5 / 35.0).cos());
        assert!((at(22, 1) - 0.01 - 0.99 * 0.5 * (1.0 + (std::f64::consts::PI * 17.0 / 35.0).cos())).abs() < 1e-12);
        assert!(mid > 0.4 && mid < 0.6);
        // The default counts steps, as before.
        let d = parse(MINIMAL, "x.toml").unwrap().config.optimizer;
        assert_eq!(d.lr_factor(3, 0, 100, 1), crate::optim::lr_factor(3, 0, 100, 0.0, None));

        for (set, key, message) in [
            ("optimizer.warmup_epochs=2", "warmup_epochs", "set schedule_unit = \"epoch\""),
            ("optimizer.warmup_start_ratio=1.5", "warmup_start_ratio", "must be in [0, 1]"),
            ("optimizer.warmup_start_ratio=0.1", "warmup_start_ratio", "applies to a warmup"),
            ("optimizer.schedule_unit=\"epochs\"", "schedule_unit", "unknown variant `epochs`"),
        ] {
            let src = apply_overrides(MINIMAL, "x.toml", &[set.to_string()]).unwrap();
            let e = parse(&src, "x.toml").unwrap_err();
            assert!(e.message.contains(message), "{set}: {e}");
            assert_eq!(e.line, src.lines().position(|l| l.starts_with(key)).unwrap() + 1, "{set}: {e}");
        }
        let sets = ["optimizer.schedule_unit=\"epoch\"", "optimizer.warmup_steps=10"].map(String::from);
        let src = apply_overrides(MINIMAL, "x.toml", &sets).unwrap();
        let e = parse(&src, "x.toml").unwrap_err();
        assert!(e.message.contains("use warmup_epochs instead"), "{e}");
    }

    #[test]
    fn merge_schedules_give_a_coefficient_per_task_and_bad_ones_are_located() {
        let adapter =
            |extra: &str| format!("{MINIMAL}\n[adapter]\nplugin = \"lora\"\nmerge_after_task = true\n{extra}\n");
        let coefficients = |extra: &str, n: usize| {
            let c = parse(&adapter(extra), "x.toml").unwrap().config;
            (0..n).map(|t| c.adapter.as_ref().unwrap().merge_coefficient_for(t)).collect::<Vec<_>>()
        };
        assert_eq!(coefficients("merge_coefficient = 0.5", 3), [0.5, 0.5, 0.5]);
        assert_eq!(coefficients("merge_schedule = \"running-average\"", 4), [1.0, 0.5, 1.0 / 3.0, 0.25]);
        assert_eq!(coefficients("merge_schedule = \"c-clip-code\"", 4), [1.0, 0.5, 1.0 / 3.0, 1.0 / 3.0]);
        assert_eq!(coefficients("merge_schedule = [0.7]", 1), [0.7]);
        let error = |extra: &str| parse(&adapter(extra), "x.toml").unwrap_err();
        let e = error("merge_schedule = \"geometric\"");
        assert!(
            e.message.contains("unknown merge_schedule `geometric`; expected one of running-average, c-clip-code"),
            "{e}"
        );
        assert_eq!(
            e.line,
            adapter("merge_schedule = \"geometric\"").lines().position(|l| l.starts_with("merge_schedule")).unwrap()
                + 1
        );
        let e = error("merge_schedule = [1.0, 0.5]");
        assert!(e.message.contains("merge_schedule lists 2 coefficients for 1 tasks"), "{e}");
        let e = error("merge_schedule = [1.5]");
        assert!(e.message.contains("every merge_schedule coefficient must be in (0, 1]"), "{e}");
        let e = error("merge_schedule = \"running-average\"\nmerge_coefficient = 0.5");
        assert!(e.message.contains("set merge_coefficient or merge_schedule, not both"), "{e}");
        let e = error("merge_scope = \"everything\"");
        assert!(e.message.contains("unknown variant `everything`, expected `adapter` or `trained`"), "{e}");
        // A schedule or scope without merging would be silently ignored: refused.
        let src = format!("{MINIMAL}\n[adapter]\nplugin = \"lora\"\nmerge_scope = \"trained\"\n");
        let e = parse(&src, "x.toml").unwrap_err();
        assert!(e.message.contains("set merge_after_task = true, or remove them"), "{e}");
    }

    #[test]
    fn duplicate_task_names_are_refused_at_the_second() {
        let src = format!("{MINIMAL}\n[[task]]\nname = \"a\"\nshapes = [\"cross\"]\n");
        let e = parse(&src, "x.toml").unwrap_err();
        assert!(e.message.contains("task[1] and task[0] are both named `a`"), "{e}");
        assert_eq!(
            e.line,
            src.lines().collect::<Vec<_>>().iter().rposition(|l| *l == "name = \"a\"").unwrap() + 1,
            "{e}"
        );
    }

    #[test]
    fn shape_errors_name_the_key_and_the_fix() {
        let single = MINIMAL.replace("[[evaluator]]", "[evaluator]");
        let e = parse(&single, "x.toml").unwrap_err();
        assert!(e.message.contains("write `[[evaluator]]`"), "{e}");
        assert_eq!(e.line, single.lines().position(|l| l == "[evaluator]").unwrap() + 1);
        let twice = MINIMAL.replace("epochs = 1", "epochs = 1\nepochs = 2");
        let e = parse(&twice, "x.toml").unwrap_err();
        assert!(e.message.contains("duplicate key `epochs`"), "{e}");
        assert_eq!(e.line, twice.lines().position(|l| l == "epochs = 2").unwrap() + 1);
        let e = parse(&MINIMAL.replace("[train]", "[train]\n[train]"), "x.toml").unwrap_err();
        assert!(e.message.contains("table `[train]` is defined twice"), "{e}");
    }

    #[test]
    fn semantic_errors_are_located() {
        let src = MINIMAL.replace("batch_size = 8", "batch_size = 1");
        let e = parse(&src, "x.toml").unwrap_err();
        assert!(e.message.contains("at least 2"), "{e}");
        assert_eq!(e.line, src.lines().position(|l| l.starts_with("batch_size")).unwrap() + 1);
    }
}
