//! Experiment files: the TOML schema, loading with `--set` overrides, and errors that name
//! file:line:column, the key, and the nearest valid key.
//!
//! Host sections are typed structs with `deny_unknown_fields`. A plugin's section is kept as
//! a TOML table (`plugin = "NAME"` plus the plugin's own keys) and handed to the plugin as
//! TOML text; the plugin rejects unknown keys itself and the host points at the line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod locate;
mod resolve;
mod validate;

use crate::data::TaskSection;
use locate::located;
pub use locate::{apply_overrides, line_col, locate, parse_path, PathStep};
pub use resolve::{resolve, resolve_asset};

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
    /// The input pipeline and training augmentation.
    #[serde(default)]
    pub data: crate::data::DataSection,
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
    pub sweep: Option<SweepSection>,
}

#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSection {
    pub name: String,
    /// The method this run is one seed of: `recall compare` groups seeds by it, and it names
    /// the run directory and the MLflow `method` tag (default: `name`; a sweep's points are
    /// their labels). Set it when one experiment file runs several methods through `--set`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
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

impl ExperimentSection {
    /// The method key, one for every place that names the method (run directory, run.json,
    /// the tracker's `method` tag, `recall compare`): a sweep point's label when the sweep
    /// runs it (`RECALL_SWEEP_LABEL`), else `method`, else `name`.
    pub fn method_key(&self) -> String {
        std::env::var(SWEEP_LABEL_VAR).ok().or_else(|| self.method.clone()).unwrap_or_else(|| self.name.clone())
    }
}

/// The environment variable through which a sweep gives each point's run its label.
pub const SWEEP_LABEL_VAR: &str = "RECALL_SWEEP_LABEL";

/// The `[sweep]` section (expanded by `crate::sweep`).
#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct SweepSection {
    /// Directory name under `output_dir` (default: the experiment's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Seeds: every point runs once per seed (`experiment.seed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<u64>,
    /// Dotted config key (`task[1].max_train` reaches into arrays of tables) -> values.
    #[serde(default)]
    pub axes: toml::Table,
    /// Extra points: overrides of the base experiment (run for every seed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<toml::Table>,
    /// Partial assignments: grid points that match every key of a row are dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<toml::Table>,
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
    /// The lr of the default group and of each `[[optimizer.groups]]` entry that sets one,
    /// at `factor` of the schedule, named as telemetry records them (`lr`, `lr/group0`, ...).
    pub fn lrs_at(&self, factor: f64) -> Vec<(String, f64)> {
        let mut out = vec![("lr".to_string(), self.lr * factor)];
        for (i, g) in self.groups.iter().enumerate() {
            if let Some(lr) = g.lr {
                out.push((format!("lr/group{i}"), lr * factor));
            }
        }
        out
    }

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
    /// Write a mid-task checkpoint every N steps (`--resume` continues from the last one,
    /// with the numbers an unbroken run gives). A checkpoint is also written when the run is
    /// stopped by SIGTERM or SIGINT (Slurm preemption), whatever these say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every_steps: Option<usize>,
    /// ... and every M minutes of training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every_minutes: Option<f64>,
    /// Record training telemetry every N steps (default 10): the loss and each loss term
    /// averaged over those steps, each group's lr, the gradient norm when clipping computes
    /// it, images per second and the epoch, at the global step, in the event log, the
    /// tracker and the progress bar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_every_steps: Option<usize>,
    /// Inside each task, every N epochs (and after its last when N divides the epochs), run
    /// the task-suite evaluators on the task's validation split (`val_fraction`); the test
    /// split is never seen before the stage's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_every_epochs: Option<usize>,
}

impl TrainSection {
    /// See [`TrainSection::log_every_steps`].
    pub fn log_every(&self) -> usize {
        self.log_every_steps.unwrap_or(10)
    }
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
    pub fn suite() -> String {
        "tasks".into()
    }
}

/// A loaded experiment: the config and the text it came from (for locating later errors).
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub config: ExperimentConfig,
    pub source: String,
    pub file: String,
    /// The `--set KEY=VALUE` overrides applied to the file's text, as given.
    pub overrides: Vec<String>,
}

impl LoadedConfig {
    /// A located error for the key at `dotted` (e.g. `adapter.rnak`): the file's line, or
    /// the `--set` that gave the key (or a table above it) its value.
    pub fn error_at(&self, dotted: &str, message: impl Into<String>) -> ConfigError {
        if let Some(o) = self.overrides.iter().rev().find(|o| override_covers(o, dotted)) {
            return ConfigError { file: format!("--set {o}"), line: 0, column: 0, message: message.into() };
        }
        let (line, column) =
            locate(&self.source, &parse_path(dotted)).map_or((1, 1), |s| line_col(&self.source, s.start));
        ConfigError { file: self.file.clone(), line, column, message: message.into() }
    }
}

/// Whether the override `KEY=VALUE` set the key `dotted` or a table that holds it.
fn override_covers(o: &str, dotted: &str) -> bool {
    let key = o.split_once('=').map_or(o, |(k, _)| k).trim();
    dotted == key || dotted.strip_prefix(key).is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

/// Parse and check experiment text. Pure: no file is read and nothing is resolved, so a
/// config can be checked anywhere (a sweep's points, the fuzzer); `resolve` is the step
/// that makes its paths and assets real.
pub fn parse(src: &str, file: &str) -> Result<LoadedConfig, ConfigError> {
    parse_with(src, file, &[])
}

/// [`parse`] of a file's text after `overrides`: errors in keys they set name the `--set`.
fn parse_with(src: &str, file: &str, overrides: &[String]) -> Result<LoadedConfig, ConfigError> {
    let config: ExperimentConfig = toml::from_str(src).map_err(|e| located(file, src, &e))?;
    let loaded =
        LoadedConfig { config, source: src.to_string(), file: file.to_string(), overrides: overrides.to_vec() };
    validate::validate(&loaded)?;
    Ok(loaded)
}

/// When the file's own text reads as an experiment but it no longer does after the
/// overrides, the first override that breaks it, as the error's place.
fn blame_override(original: &str, file: &str, overrides: &[String]) -> Option<ConfigError> {
    let reads = |text: &str| toml::from_str::<ExperimentConfig>(text);
    reads(original).ok()?;
    for i in 0..overrides.len() {
        let text = apply_overrides(original, file, &overrides[..=i]).ok()?;
        if let Err(e) = reads(&text) {
            let message = located(file, &text, &e).message;
            return Some(ConfigError { file: format!("--set {}", overrides[i]), line: 0, column: 0, message });
        }
    }
    None
}

/// Read, override, parse and resolve an experiment file.
pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedConfig, ConfigError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: 1,
        column: 1,
        message: format!("cannot read the experiment file: {e}"),
    })?;
    let edited = apply_overrides(&src, &file, overrides)?;
    match parse_with(&edited, &file, overrides) {
        Ok(loaded) => resolve(loaded),
        Err(e) if e.file == file && !overrides.is_empty() => Err(blame_override(&src, &file, overrides).unwrap_or(e)),
        Err(e) => Err(e),
    }
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
    fn parsing_reads_nothing_and_resolving_locates_what_it_cannot_find() {
        let src = MINIMAL
            .replace("shapes = [\"circle\", \"square\"]", "source = \"jsonl\"\npath = \"dataset:no-such-dataset\"");
        let parsed = parse(&src, "/nonexistent/dir/x.toml").unwrap();
        assert_eq!(parsed.config.tasks[0].path.as_deref(), Some(Path::new("dataset:no-such-dataset")), "untouched");
        let e = resolve(parsed).unwrap_err();
        let line = src.lines().position(|l| l.starts_with("path = ")).unwrap() + 1;
        assert_eq!((e.file.as_str(), e.line), ("/nonexistent/dir/x.toml", line), "{e}");
        assert!(e.message.contains("no-such-dataset"), "{e}");
    }

    #[test]
    fn data_keys_are_checked_and_located() {
        let c = parse(MINIMAL, "x.toml").unwrap();
        assert_eq!(c.config.data, crate::data::DataSection::default());
        assert!(matches!(c.config.data.train_transform(), crate::data::transform::Transform::Train(_)));
        for (bad, key, says) in [
            ("crop_scale = [0.9, 1.2]", "crop_scale", "0 < lo <= hi <= 1"),
            ("crop_ratio = [2.0, 1.0]", "crop_ratio", "0 < lo <= hi"),
            ("workers = 0", "workers", "at least 1"),
            ("color_jitter_prob = 0.5", "color_jitter_prob", "needs color_jitter"),
            ("color_jitter = [0.4, 0.4, 0.4, 0.7]\ncolor_jitter_prob = 0.5", "color_jitter", "hue <= 0.5"),
            ("grayscale_prob = 1.5", "grayscale_prob", "[0, 1]"),
        ] {
            let src = format!("{MINIMAL}\n[data]\n{bad}\n");
            let e = parse(&src, "x.toml").unwrap_err();
            let line = src.lines().position(|l| l.starts_with(key)).unwrap() + 1;
            assert_eq!(e.line, line, "{bad}: {e}");
            assert!(e.message.contains(says), "{bad}: {e}");
        }
        let src = MINIMAL.replace("batch_size = 8", "batch_size = 8\ncache_image_codes = true");
        let e = parse(&src, "x.toml").unwrap_err();
        assert!(e.message.contains("resize-center-crop"), "{e}");
        parse(&format!("{src}\n[data]\ntrain_transform = \"resize-center-crop\"\n"), "x.toml").unwrap();
    }

    #[test]
    fn epoch_order_keys_are_checked_and_located() {
        let task = "[[task]]\nname = \"a\"\nshapes = [\"circle\", \"square\"]\n";
        assert!(MINIMAL.contains(task));
        let part = "[[task.part]]\nname = \"p\"\nshapes = [\"circle\"]\n";
        let zeroshot = "[[zeroshot]]\nname = \"z\"\nshapes = [\"circle\"]\n";
        for (extra, after, key, says) in [
            ("shuffle_buffer = 64\n", "", "shuffle_buffer", "orders WebDataset shards"),
            ("samples_per_epoch = 1\n", "", "samples_per_epoch", "at least 2"),
            ("shuffle_buffer = 8\n", part, "shuffle_buffer", "a task of several parts"),
            ("", &format!("{part}samples_per_epoch = 100\n"), "samples_per_epoch", "not on one of its parts"),
            ("", &format!("{zeroshot}samples_per_epoch = 100\n"), "samples_per_epoch", "only a [[task]] trains"),
        ] {
            let src = MINIMAL.replace(task, &format!("{task}{extra}{after}"));
            let e = parse(&src, "x.toml").unwrap_err();
            let line = src.lines().enumerate().filter(|(_, l)| l.starts_with(key)).last().unwrap().0 + 1;
            assert_eq!(e.line, line, "{extra}{after}: {e}");
            assert!(e.message.contains(says), "{extra}{after}: {e}");
        }
        let ok = MINIMAL.replace(task, &format!("{task}samples_per_epoch = 100\n"));
        assert_eq!(parse(&ok, "x.toml").unwrap().config.tasks[0].samples_per_epoch, Some(100));
    }

    #[test]
    fn evaluators_whose_metrics_would_collide_are_a_located_error() {
        let src = format!("{MINIMAL}\n[[evaluator]]\nplugin = \"retrieval\"\nks = [1, 10]\n");
        let e = parse(&src, "x.toml").unwrap_err();
        assert!(e.message.contains("evaluator[0] already runs `retrieval`") && e.message.contains("collide"), "{e}");
        let line =
            src.lines().enumerate().filter(|(_, l)| l.starts_with("plugin = \"retrieval\"")).last().unwrap().0 + 1;
        assert_eq!(e.line, line, "{e}");
    }

    #[test]
    fn semantic_errors_are_located() {
        let src = MINIMAL.replace("batch_size = 8", "batch_size = 1");
        let e = parse(&src, "x.toml").unwrap_err();
        assert!(e.message.contains("at least 2"), "{e}");
        assert_eq!(e.line, src.lines().position(|l| l.starts_with("batch_size")).unwrap() + 1);
    }
}
