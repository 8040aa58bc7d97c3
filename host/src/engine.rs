//! The training engine: the task sequence, the training step, evaluation after every task,
//! and the run directory.
//!
//! One training step: forward both towers through the plugins, CLIP's contrastive loss on the
//! host, plus every strategy's loss terms, ONE backward pass over the one graph, gradient
//! clipping, an AdamW step under the warmup + cosine schedule.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use recall_sdk::TaskInfo;
use serde::{Deserialize, Serialize};

use crate::config::LoadedConfig;
use crate::data::{self, TaskData};
use crate::fsutil::write_atomic;
use crate::loader::Registry;
use crate::model::{locate_failure, Model};
use crate::optim::{clip_factor, lr_factor, AdamW};
use crate::plugin::{EvaluatorInstance, StrategyInstance};
use crate::runtime::ops;
use crate::runtime::Runtime;

/// How the engine reports progress.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// No progress bars and no tables on stdout.
    pub quiet: bool,
    /// Use this run directory instead of a fresh one under `output_dir`.
    pub run_dir: Option<PathBuf>,
    /// Continue the run in `run_dir` from its last finished task.
    pub resume: bool,
    /// Replace a run already in `run_dir` (otherwise refused).
    pub overwrite: bool,
    /// Config keys (or sections) a resume may find changed; each change is recorded.
    pub allow_config_change: Vec<String>,
}

/// Scores after each stage: `rows[t][i]` = metrics on task i after training t tasks (t = 0:
/// the initial model).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ResultMatrix {
    pub tasks: Vec<String>,
    pub rows: Vec<Vec<BTreeMap<String, f64>>>,
}

impl ResultMatrix {
    /// The matrix of one metric, [stages][tasks].
    pub fn metric(&self, name: &str) -> Vec<Vec<f64>> {
        self.rows.iter().map(|r| r.iter().map(|m| m.get(name).copied().unwrap_or(f64::NAN)).collect()).collect()
    }

    pub fn metric_names(&self) -> Vec<String> {
        self.rows.first().and_then(|r| r.first()).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub name: String,
    pub seed: u64,
    pub run_dir: PathBuf,
    pub trainable_parameters: usize,
    pub total_parameters: usize,
    pub batch_size: usize,
    /// Mean training loss of each epoch, per task.
    pub epoch_losses: Vec<Vec<f64>>,
    /// Mean of each strategy loss term per epoch, per task (the task loss is `clip`).
    pub epoch_terms: Vec<Vec<BTreeMap<String, f64>>>,
    pub results: ResultMatrix,
    /// Zero-shot scores on the held-out sets after each stage (columns: the sets).
    pub heldout: ResultMatrix,
    /// Continual-learning summaries (Last, Avg, BWT, forgetting, transfer) per metric.
    pub continual: BTreeMap<String, crate::metrics::ClSummary>,
    /// PD per zero-shot metric and held-out set: initial score minus final score.
    pub performance_drop: BTreeMap<String, BTreeMap<String, f64>>,
    /// Examples per task and split, and images skipped.
    pub data: BTreeMap<String, DataCounts>,
    pub steps: usize,
    pub train_seconds: f64,
    pub performance: Performance,
}

/// Speed and memory of a run's training.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct Performance {
    /// `f32` (full precision), `bf16` or `f16` compute.
    pub precision: String,
    pub device: String,
    pub steps_per_second: f64,
    pub images_per_second: f64,
    /// Peak device memory in use (CUDA, sampled after each step's forward and backward), or
    /// the process's peak resident memory on the CPU.
    pub peak_memory_bytes: Option<u64>,
    pub memory_kind: String,
}

/// `[train] precision` and `eval_precision` applied to a runtime: under mixed precision the
/// masters stay in full precision and the ops compute lower (see `runtime`).
pub(crate) struct Precision {
    compute: candle_core::DType,
    full: candle_core::DType,
    eval_full: bool,
}

impl Precision {
    /// Set the runtime's compute dtype for training.
    pub fn start(train: &crate::config::TrainSection, rt: &Runtime) -> anyhow::Result<Self> {
        let full = rt.float_dtype();
        let compute = match train.precision.as_str() {
            "bf16" => candle_core::DType::BF16,
            "f16" => candle_core::DType::F16,
            _ => full,
        };
        let p = Precision { compute, full, eval_full: train.eval_precision == "f32" };
        if p.mixed() {
            rt.set_compute_dtype(compute).map_err(anyhow::Error::msg)?;
        }
        Ok(p)
    }

    fn mixed(&self) -> bool {
        self.compute != self.full
    }

    /// Before a training step: casts of the masters as the optimizer left them.
    pub fn before_step(&self, rt: &Runtime) -> anyhow::Result<()> {
        if self.mixed() {
            rt.refresh_views().map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    /// Run `f` (an evaluation) at the evaluation precision.
    pub fn evaluating<T>(&self, rt: &Runtime, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let switch = self.mixed() && self.eval_full;
        if switch {
            rt.set_compute_dtype(self.full).map_err(anyhow::Error::msg)?;
        }
        let out = f();
        if switch {
            rt.set_compute_dtype(self.compute).map_err(anyhow::Error::msg)?;
        }
        out
    }
}

/// How much data a task had.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataCounts {
    pub train: usize,
    pub test: usize,
    pub skipped: usize,
}

#[derive(Serialize)]
struct MetricRecord<'a> {
    stage: usize,
    trained_tasks: usize,
    suite: &'a str,
    eval_task: &'a str,
    metric: &'a str,
    value: f64,
}

/// What a run directory holds about finished tasks: enough to continue after a kill.
#[derive(Serialize, Deserialize)]
struct Progress {
    finished_tasks: usize,
    global_step: usize,
    train_seconds: f64,
    /// Time in training steps proper and the images they saw (throughput).
    #[serde(default)]
    step_seconds: f64,
    #[serde(default)]
    images_seen: usize,
    epoch_losses: Vec<Vec<f64>>,
    epoch_terms: Vec<Vec<BTreeMap<String, f64>>>,
    results: ResultMatrix,
    heldout: ResultMatrix,
}

/// Load (or generate) every task's data at the model's preprocessing.
pub fn load_tasks(cfg: &LoadedConfig, pre: &crate::data::preprocess::Preprocess) -> anyhow::Result<Vec<TaskData>> {
    load_sets(cfg, &cfg.config.tasks, "task", pre)
}

fn load_sets(
    cfg: &LoadedConfig,
    sets: &[crate::config::TaskSection],
    key: &str,
    pre: &crate::data::preprocess::Preprocess,
) -> anyhow::Result<Vec<TaskData>> {
    let need_test = key != "reference";
    sets.iter()
        .enumerate()
        .map(|(i, t)| {
            let d = data::load(t, pre, cfg.config.experiment.seed)
                .with_context(|| format!("{}: loading the data of {key}[{i}] `{}`", cfg.file, t.name))?;
            if need_test && d.test.is_empty() {
                bail!("{}: {key}[{i}] `{}` has no test examples; check its path, filters and test_fraction", cfg.file, t.name);
            }
            tracing::info!(set = %t.name, train = d.train.len(), test = d.test.len(), skipped = d.skipped.len(), "data loaded");
            Ok(d)
        })
        .collect()
}

/// Retrieval inputs of a test split. Images whose caption sets are equal (class captions
/// such as "a handwritten digit seven") form a group: any image of the group is a right
/// answer, and the group's captions are listed once. Returns (texts, text -> image,
/// image -> group).
pub fn retrieval_texts(split: &[data::Example]) -> (Vec<String>, Vec<u32>, Vec<u32>) {
    let mut first: std::collections::HashMap<Vec<&str>, u32> = std::collections::HashMap::new();
    let mut group = Vec::with_capacity(split.len());
    let mut texts = Vec::new();
    let mut index = Vec::new();
    for (i, ex) in split.iter().enumerate() {
        let mut key: Vec<&str> = ex.captions.iter().map(String::as_str).collect();
        key.sort_unstable();
        let g = *first.entry(key).or_insert(i as u32);
        group.push(g);
        if g == i as u32 {
            for c in &ex.captions {
                texts.push(c.clone());
                index.push(i as u32);
            }
        }
    }
    (texts, index, group)
}

/// Image embeddings of examples, in evaluation mode.
fn embed_images(model: &Model, examples: &[data::Example], batch: usize) -> anyhow::Result<Tensor> {
    let rt = &model.runtime;
    let mut img = Vec::new();
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&data::Example> = chunk.iter().collect();
        let px = data::pixel_batch(&refs, &model.preprocess, rt.device(), rt.float_dtype())?;
        img.push(model.encode_images(&px)?.detach());
    }
    Ok(Tensor::cat(&img, 0)?)
}

/// Text embeddings, in evaluation mode.
fn embed_texts(model: &Model, texts: &[String], batch: usize) -> anyhow::Result<Tensor> {
    let mut txt = Vec::new();
    for chunk in texts.chunks(batch.max(1)) {
        let (ids, mask) = model.tokenize(chunk)?;
        txt.push(model.encode_texts(&ids, &mask)?.detach());
    }
    Ok(Tensor::cat(&txt, 0)?)
}

fn run_evaluators(
    evaluators: &[EvaluatorInstance],
    inputs: &[(&str, &Tensor)],
) -> anyhow::Result<BTreeMap<String, f64>> {
    crate::finite::check_inputs(inputs)?;
    let mut out = BTreeMap::new();
    for e in evaluators {
        for (name, value) in e.evaluate(inputs)? {
            out.insert(format!("{}/{}", e.plugin, name), value);
        }
    }
    Ok(out)
}

/// Every task-suite evaluator on one task's test split; metric names are `{plugin}/{metric}`.
pub fn evaluate(
    model: &Model,
    evaluators: &[EvaluatorInstance],
    task: &TaskData,
    batch: usize,
) -> anyhow::Result<BTreeMap<String, f64>> {
    model.runtime.set_training(false);
    let dev = model.runtime.device();
    let img = embed_images(model, &task.test, batch)?;
    let (texts, index, group) = retrieval_texts(&task.test);
    let txt = embed_texts(model, &texts, batch)?;
    let index = Tensor::from_vec(index.clone(), index.len(), dev)?;
    let group = Tensor::from_vec(group.clone(), group.len(), dev)?;
    run_evaluators(
        evaluators,
        &[("image_embeds", &img), ("text_embeds", &txt), ("text_image_index", &index), ("image_group", &group)],
    )
}

/// Class embeddings for zero-shot classification: per class, the normalised mean of the
/// normalised embeddings of every template filled with the class name (CLIP's recipe).
pub fn class_embeddings(
    model: &Model,
    classes: &[String],
    templates: &[String],
    batch: usize,
) -> anyhow::Result<Tensor> {
    let prompts: Vec<String> =
        classes.iter().flat_map(|c| templates.iter().map(move |t| data::source::fill(t, c))).collect();
    let e = embed_texts(model, &prompts, batch)?;
    let norm = |x: &Tensor| -> candle_core::Result<Tensor> { x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?) };
    let (n, d) = (classes.len(), e.dim(1)?);
    let mean = norm(&e)?.reshape((n, templates.len(), d))?.mean(1)?;
    Ok(norm(&mean)?)
}

/// Every zero-shot evaluator on one held-out set's test split.
pub fn evaluate_zeroshot(
    model: &Model,
    evaluators: &[EvaluatorInstance],
    set: &TaskData,
    batch: usize,
) -> anyhow::Result<BTreeMap<String, f64>> {
    model.runtime.set_training(false);
    if set.classes.is_empty() {
        bail!("zero-shot set `{}` has no classes; zero-shot classification needs class-labelled data", set.name);
    }
    let labels = set
        .test
        .iter()
        .map(|e| {
            e.class.as_ref().and_then(|c| set.classes.iter().position(|k| k == c)).map(|p| p as u32).with_context(
                || format!("zero-shot set `{}`: example {} has no class among {:?}", set.name, e.id, set.classes),
            )
        })
        .collect::<anyhow::Result<Vec<u32>>>()?;
    let img = embed_images(model, &set.test, batch)?;
    let classes = class_embeddings(model, &set.classes, &set.templates, batch)?;
    let labels = Tensor::from_vec(labels.clone(), labels.len(), model.runtime.device())?;
    run_evaluators(evaluators, &[("image_embeds", &img), ("class_embeds", &classes), ("labels", &labels)])
}

/// The run directory, owned (locked) by this process: the one `--run-dir` names (created if
/// needed; an existing run in it only with `--resume` or `--overwrite`), else a fresh one.
pub(crate) fn open_run_dir(
    opts: &RunOptions,
    e: &crate::config::ExperimentSection,
) -> anyhow::Result<crate::rundir::RunDir> {
    use crate::rundir::{claim, Claim};
    let how = match (opts.resume, opts.overwrite) {
        (true, _) => Claim::Resume,
        (false, true) => Claim::Overwrite,
        (false, false) => Claim::Fresh,
    };
    match &opts.run_dir {
        Some(d) => claim(d, how),
        None => claim(&new_run_dir(&e.output_dir, &e.name, e.seed)?, Claim::Fresh),
    }
}

/// A fresh run directory `output_dir/NAME-seedS-N` (N counts up).
fn new_run_dir(output_dir: &Path, name: &str, seed: u64) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("cannot create output directory {}", output_dir.display()))?;
    for n in 0.. {
        let dir = output_dir.join(format!("{name}-seed{seed}-{n:03}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create run directory {}", dir.display())),
        }
    }
    unreachable!()
}

pub(crate) fn progress(quiet: bool, len: u64, label: String, unit: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{msg:>24}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{per_sec}}  eta {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(label);
    pb
}

/// "the initial model" or "task N (`name`)": the stage an evaluation belongs to.
fn stage_label(tasks: &[TaskData], stage: usize) -> String {
    match stage.checked_sub(1).and_then(|i| tasks.get(i)) {
        None => "the initial model".into(),
        Some(t) => format!("task {stage} (`{}`)", t.name),
    }
}

/// Format the retrieval table printed after each task.
pub fn format_table(results: &ResultMatrix, stage: usize, metrics: &[&str]) -> String {
    let mut s = String::new();
    let label = if stage == 0 {
        "before training".to_string()
    } else {
        format!("after task {stage} ({})", results.tasks[stage - 1])
    };
    s.push_str(&format!("\n{label}\n"));
    s.push_str(&format!("{:<20}", "eval task"));
    for m in metrics {
        s.push_str(&format!("{:>12}", m.rsplit('/').next().unwrap_or(m)));
    }
    s.push('\n');
    for (i, task) in results.tasks.iter().enumerate() {
        s.push_str(&format!("{:<20}", task));
        for m in metrics {
            let v = results.rows[stage][i].get(*m).copied().unwrap_or(f64::NAN);
            s.push_str(&format!("{v:>12.2}"));
        }
        s.push('\n');
    }
    s
}

/// A table of one stage's zero-shot scores.
fn format_heldout(heldout: &ResultMatrix, stage: usize) -> String {
    let names: Vec<String> = heldout.metric_names();
    // Columns as wide as their names, so long metric names stay apart.
    let widths: Vec<usize> = names.iter().map(|m| m.len().max(8) + 2).collect();
    let mut s = format!("{:<20}", "zero-shot set");
    for (m, w) in names.iter().zip(&widths) {
        s.push_str(&format!("{m:>w$}"));
    }
    s.push('\n');
    for (i, set) in heldout.tasks.iter().enumerate() {
        s.push_str(&format!("{set:<20}"));
        for (m, w) in names.iter().zip(&widths) {
            let v = heldout.rows[stage][i].get(m).copied().unwrap_or(f64::NAN);
            s.push_str(&format!("{v:>w$.2}"));
        }
        s.push('\n');
    }
    s
}

/// metrics.jsonl: one line per (stage, suite, set, metric).
fn metrics_lines(results: &ResultMatrix, heldout: &ResultMatrix) -> anyhow::Result<String> {
    let mut out = String::new();
    for (suite, m) in [("tasks", results), ("zeroshot", heldout)] {
        for (stage, row) in m.rows.iter().enumerate() {
            for (i, metrics) in row.iter().enumerate() {
                for (metric, value) in metrics {
                    let rec = MetricRecord {
                        stage,
                        trained_tasks: stage,
                        suite,
                        eval_task: &m.tasks[i],
                        metric,
                        value: *value,
                    };
                    out.push_str(&serde_json::to_string(&rec)?);
                    out.push('\n');
                }
            }
        }
    }
    Ok(out)
}

/// run.json: which build ran (version, git commit), with which seed and command line, when;
/// each resume is appended.
pub(crate) fn record_provenance(
    run_dir: &Path,
    seed: u64,
    resume: bool,
    config_changes: &[crate::identity::Change],
) -> anyhow::Result<()> {
    let f = run_dir.join("run.json");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut event = serde_json::json!({
        "unix_time": now,
        "command": std::env::args().map(|a| crate::tracking::redact(&a)).collect::<Vec<_>>(),
        "recall_version": env!("CARGO_PKG_VERSION"),
        "git_commit": env!("RECALL_GIT_COMMIT"),
    });
    if !config_changes.is_empty() {
        event["config_changes"] = serde_json::to_value(config_changes)?;
    }
    let mut record = match std::fs::read_to_string(&f).ok().and_then(|t| serde_json::from_str(&t).ok()) {
        Some(serde_json::Value::Object(m)) if resume => m,
        _ => serde_json::Map::new(),
    };
    if resume {
        match record.get_mut("resumed") {
            Some(serde_json::Value::Array(a)) => a.push(event),
            _ => {
                record.insert("resumed".into(), serde_json::json!([event]));
            }
        }
    } else {
        record.insert("seed".into(), seed.into());
        record.insert("started".into(), event);
    }
    write_atomic(&f, serde_json::to_string_pretty(&serde_json::Value::Object(record))?.as_bytes())
}

pub(crate) fn checkpoint_path(run_dir: &Path, task: usize, what: &str) -> PathBuf {
    run_dir.join("checkpoints").join(format!("task-{task:02}.{what}"))
}

/// The seed of the runtime's generator for a task: reseeding per task makes a resumed run
/// draw the same dropout masks and re-initialisations as an unbroken one.
fn task_seed(seed: u64, task: usize) -> u64 {
    seed ^ (task as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Run an experiment end to end (or continue it: `opts.resume`).
pub fn run(cfg: &LoadedConfig, registry: &Registry, opts: &RunOptions) -> anyhow::Result<RunSummary> {
    let c = &cfg.config;
    let mut model = Model::build(cfg, registry)?;
    if c.train.cache_image_codes {
        if model.image_tokenizer.is_none() {
            return Err(cfg
                .error_at("train.cache_image_codes", "[train] cache_image_codes = true, but there is no [model.image_tokenizer] whose codes could be cached; drop the setting")
                .into());
        }
        model.code_cache = Some(Default::default());
    }
    let model = model;
    let rt = model.runtime.clone();
    let strategies = c
        .strategies
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p =
                registry.get(&s.plugin, "strategy").map_err(|m| cfg.error_at(&format!("strategy[{i}].plugin"), m))?;
            StrategyInstance::create(p, &rt, &format!("strategy.{i}."), &s.options_text())
                .map_err(|e| anyhow::Error::new(locate_failure(cfg, &format!("strategy[{i}]"), e)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut task_evaluators = Vec::new();
    let mut zeroshot_evaluators = Vec::new();
    for (i, s) in c.evaluators.iter().enumerate() {
        let p = registry.get(&s.plugin, "evaluator").map_err(|m| cfg.error_at(&format!("evaluator[{i}].plugin"), m))?;
        let e = EvaluatorInstance::create(p, &rt, &s.options_text())
            .map_err(|e| anyhow::Error::new(locate_failure(cfg, &format!("evaluator[{i}]"), e)))?;
        if s.suite == "zeroshot" {
            zeroshot_evaluators.push(e)
        } else {
            task_evaluators.push(e)
        }
    }
    // Every optimizer group must match a trainable parameter (strategies' included): checked
    // now, before a run directory exists, not when the first task starts.
    crate::optim::group_settings(&rt.params(), &c.optimizer).map_err(|e| cfg.error_at(&e.key(), e.message))?;
    if !c.zeroshot.is_empty() && zeroshot_evaluators.is_empty() {
        bail!(
            "{}: the experiment declares [[zeroshot]] sets but no evaluator judges them; add \
             `[[evaluator]] plugin = \"zeroshot\"` with `suite = \"zeroshot\"`",
            cfg.file
        );
    }

    // A frozen copy of the model for strategies that compare against the old model (CKC,
    // LwF): built once, its parameters overwritten with the trained ones before each task.
    let wants_old =
        strategies.iter().map(StrategyInstance::wants_old_model).collect::<Result<Vec<_>, _>>()?.into_iter().any(|w| w);
    let old_model = if wants_old { Some(Model::build(cfg, registry)?) } else { None };
    // The model as it is before the first task, for strategies that distil from it (ZSCL):
    // copied once, now, before a resumed run loads its checkpoint.
    let wants_initial = strategies
        .iter()
        .map(StrategyInstance::wants_initial_model)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .any(|w| w);
    let initial_model = if wants_initial {
        let m = Model::build(cfg, registry)?;
        copy_parameters(&model, &m)?;
        Some(m)
    } else {
        None
    };
    // A frozen teacher (TokLIP's distillation): its features on every batch.
    let teacher = match &c.teacher {
        Some(t) => Some(crate::model::Teacher::build(t, &c.experiment, cfg, registry)?),
        None => None,
    };
    let reference = match (&c.reference, wants_initial) {
        (Some(r), true) => {
            let d = load_sets(cfg, std::slice::from_ref(r), "reference", &model.preprocess)?.remove(0);
            if d.train.is_empty() {
                bail!("{}: the [reference] data has no training examples to draw batches from", cfg.file);
            }
            Some(d)
        }
        _ => None,
    };
    let tasks = load_tasks(cfg, &model.preprocess)?;
    let heldout_sets = load_sets(cfg, &c.zeroshot, "zeroshot", &model.preprocess)?;
    let owned_dir = open_run_dir(opts, &c.experiment)?;
    let run_dir = owned_dir.path.clone();
    let identity = crate::identity::of(c, registry)?;
    let config_changes = if opts.resume {
        crate::identity::check_resume(&run_dir, &identity, &opts.allow_config_change)?
    } else {
        Vec::new()
    };
    let progress_file = run_dir.join("progress.json");
    let previous: Option<Progress> = if opts.resume && progress_file.is_file() {
        let text = std::fs::read_to_string(&progress_file)
            .with_context(|| format!("cannot read {}", progress_file.display()))?;
        Some(
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a Recall progress file", progress_file.display()))?,
        )
    } else {
        None
    };
    record_provenance(&run_dir, c.experiment.seed, opts.resume, &config_changes)?;
    if !opts.resume || !config_changes.is_empty() {
        write_atomic(&run_dir.join(crate::identity::FILE), serde_json::to_string_pretty(&identity)?.as_bytes())?;
    }
    for change in &config_changes {
        tracing::warn!("resumed with a changed configuration (--allow-config-change): {change}");
    }
    if let Err(e) = crate::runlog::open(&run_dir.join("log.txt")) {
        tracing::warn!("cannot write {}: {e}", run_dir.join("log.txt").display());
    }
    if !opts.resume {
        // No credentials on disk: a tracking URI's password is redacted.
        write_atomic(&run_dir.join("config.resolved.toml"), crate::tracking::redact(&toml::to_string(c)?).as_bytes())?;
        let plugins: Vec<serde_json::Value> = registry
            .plugins
            .iter()
            .map(|p| serde_json::json!({"name": p.name, "kind": p.kind, "version": p.version, "sdk": p.sdk_version, "path": p.path}))
            .collect();
        write_atomic(&run_dir.join("plugins.json"), serde_json::to_string_pretty(&plugins)?.as_bytes())?;
        let splits = serde_json::json!({
            "tasks": data::source::split_record(&tasks),
            "zeroshot": data::source::split_record(&heldout_sets),
        });
        write_atomic(&run_dir.join("splits.json"), serde_json::to_string(&splits)?.as_bytes())?;
    }
    let trainable = model.trainable_parameters();
    let total = rt.params().iter().map(|p| p.var.elem_count()).sum::<usize>();
    tracing::info!(run_dir = %run_dir.display(), trainable, total, "run started");
    // The local event log is always written; a `[tracking]` backend delivers from it.
    let mut tracking = crate::tracking::Tracking::open(&run_dir, c.tracking.as_ref())
        .map_err(|e| cfg.error_at("tracking", format!("{e:#}")))?;
    if !tracking.is_started() {
        let mut params = crate::tracking::config_params(c)?;
        params.push(("trainable_parameters".into(), trainable.to_string()));
        let mut tags: Vec<(String, String)> = vec![
            ("method".into(), std::env::var("RECALL_SWEEP_LABEL").unwrap_or_else(|_| c.experiment.name.clone())),
            ("seed".into(), c.experiment.seed.to_string()),
            ("git_commit".into(), env!("RECALL_GIT_COMMIT").into()),
            ("recall_version".into(), env!("CARGO_PKG_VERSION").into()),
            ("run_dir".into(), std::path::absolute(&run_dir)?.display().to_string()),
        ];
        if let Ok(parent) = std::env::var("RECALL_MLFLOW_PARENT_RUN_ID") {
            tags.push(("mlflow.parentRunId".into(), parent));
        }
        for (k, v) in c.tracking.iter().flat_map(|t| &t.tags) {
            tags.push((k.clone(), v.as_str().map(String::from).unwrap_or_else(|| v.to_string())));
        }
        let experiment = c
            .tracking
            .as_ref()
            .and_then(|t| t.experiment.clone())
            .or_else(|| std::env::var("RECALL_SWEEP_NAME").ok())
            .unwrap_or_else(|| c.experiment.name.clone());
        let name = run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        tracking.log(crate::tracking::Event::Start {
            experiment,
            name,
            tags,
            params,
            time_ms: crate::tracking::now_ms(),
        })?;
    }
    let stage_metrics = |p: &Progress, stage: usize| -> crate::tracking::Event {
        let mut metrics = Vec::new();
        for (suite, m) in [("", &p.results), ("zeroshot/", &p.heldout)] {
            if let Some(row) = m.rows.get(stage) {
                for (i, cell) in row.iter().enumerate() {
                    for (k, v) in cell {
                        metrics.push((format!("{suite}{}/{k}", m.tasks[i]), *v, stage as u64));
                    }
                }
            }
        }
        crate::tracking::Event::Metrics { metrics, time_ms: crate::tracking::now_ms() }
    };

    let empty =
        |sets: &[TaskData]| ResultMatrix { tasks: sets.iter().map(|t| t.name.clone()).collect(), rows: Vec::new() };
    let mut p = match previous {
        Some(p) => p,
        None => Progress {
            finished_tasks: 0,
            global_step: 0,
            train_seconds: 0.0,
            step_seconds: 0.0,
            images_seen: 0,
            epoch_losses: Vec::new(),
            epoch_terms: Vec::new(),
            results: empty(&tasks),
            heldout: empty(&heldout_sets),
        },
    };
    if p.results.tasks != empty(&tasks).tasks || p.finished_tasks > tasks.len() {
        bail!("{} does not belong to this experiment's tasks; start a fresh run instead", progress_file.display());
    }
    if p.finished_tasks > 0 {
        // Continue from the last finished task: its parameters and each strategy's state.
        let k = p.finished_tasks;
        rt.params().load(&checkpoint_path(&run_dir, k, "safetensors"))?;
        for (i, s) in strategies.iter().enumerate() {
            let f = checkpoint_path(&run_dir, k, &format!("strategy-{i}.bin"));
            let bytes = std::fs::read(&f).with_context(|| format!("cannot read strategy state {}", f.display()))?;
            s.load_state(&bytes)?;
        }
        if !opts.quiet {
            println!("resuming {} after task {k} of {}", run_dir.display(), tasks.len());
        }
    }
    let precision = Precision::start(&c.train, &rt)?;
    let mut peak_memory: Option<u64> = None;
    let evaluate_stage = |p: &mut Progress| -> anyhow::Result<()> {
        let pb = progress(opts.quiet, (tasks.len() + heldout_sets.len()) as u64, "evaluating".into(), "sets");
        let mut row = Vec::new();
        let stage = p.results.rows.len();
        for t in &tasks {
            let scores = evaluate(&model, &task_evaluators, t, c.train.eval_batch_size)
                .with_context(|| format!("evaluating task `{}` after {}", t.name, stage_label(&tasks, stage)))?;
            row.push(scores);
            pb.inc(1);
        }
        p.results.rows.push(row);
        let mut row = Vec::new();
        for set in &heldout_sets {
            let scores =
                evaluate_zeroshot(&model, &zeroshot_evaluators, set, c.train.eval_batch_size).with_context(|| {
                    format!("evaluating zero-shot set `{}` after {}", set.name, stage_label(&tasks, stage))
                })?;
            row.push(scores);
            pb.inc(1);
        }
        p.heldout.rows.push(row);
        pb.finish_and_clear();
        Ok(())
    };
    let eval_stage = |p: &mut Progress| -> anyhow::Result<()> {
        precision.evaluating(&rt, || evaluate_stage(p))?;
        write_atomic(&run_dir.join("metrics.jsonl"), metrics_lines(&p.results, &p.heldout)?.as_bytes())?;
        Ok(())
    };
    if p.results.rows.is_empty() {
        eval_stage(&mut p)?;
        write_atomic(&progress_file, serde_json::to_string(&p)?.as_bytes())?;
    }
    // Stage metrics not yet in the log (a run killed between its checkpoint and its event).
    for stage in tracking.stages_logged()?..p.results.rows.len() {
        tracking.log(stage_metrics(&p, stage))?;
    }
    let shown: Vec<String> = p
        .results
        .metric_names()
        .into_iter()
        .filter(|m| m.ends_with("_r1") || m.ends_with("_r5") || m.ends_with("mean_recall"))
        .collect();
    let shown_refs: Vec<&str> = shown.iter().map(String::as_str).collect();
    if !opts.quiet && p.finished_tasks == 0 {
        print!("{}", format_table(&p.results, 0, &shown_refs));
        if !heldout_sets.is_empty() {
            print!("{}", format_heldout(&p.heldout, 0));
        }
    }

    // Live handles after a step must not grow within a task: a plugin that keeps handles it
    // no longer needs leaks memory every step.
    let mut handles_after_first_step: Option<usize>;
    let mut leak_reported = false;
    let bs = c.train.batch_size;
    for (t_idx, task) in tasks.iter().enumerate().skip(p.finished_tasks) {
        let started = Instant::now();
        if task.train.len() < 2 {
            bail!("task `{}` has {} training examples; at least 2 are needed", task.name, task.train.len());
        }
        rt.reseed(task_seed(c.experiment.seed, t_idx));
        // Strategies may keep new tensors between tasks (EWC's Fisher, snapshots); a leak is
        // growth from step to step within a task.
        handles_after_first_step = None;
        let steps_per_epoch = task.train.len().div_ceil(bs);
        let n_steps = steps_per_epoch * c.train.epochs;
        let info = TaskInfo { index: t_idx as u64, name: task.name.as_str().into(), n_steps: n_steps as u64 };
        if t_idx > 0 {
            if let (Some(a), Some(inst)) = (&c.adapter, &model.adapter) {
                if a.fresh_per_task {
                    inst.reset()?;
                }
            }
        }
        let old = match &old_model {
            Some(m) if t_idx > 0 => {
                copy_parameters(&model, m)?;
                Some(m)
            }
            _ => None,
        };
        for s in &strategies {
            s.before_task(&info)?;
        }
        let mut opt = AdamW::new(&rt.params(), &c.optimizer).map_err(|e| cfg.error_at(&e.key(), e.message))?;
        if t_idx == 0 {
            for g in opt.summary() {
                tracing::info!(group = %g.group, tensors = g.n_tensors, values = g.n_values, lr = g.lr, "optimizer group");
            }
        }
        // Captions: each training image is paired with one of its captions per epoch.
        let pb = progress(opts.quiet, n_steps as u64, format!("task {} {}", t_idx + 1, task.name), "steps");
        let mut losses = Vec::new();
        let mut terms: Vec<BTreeMap<String, f64>> = Vec::new();
        let mut step_in_task = 0usize;
        let mut ref_rng = StdRng::seed_from_u64(c.experiment.seed ^ 0x7265_6600 ^ ((t_idx as u64) << 40));
        for epoch in 0..c.train.epochs {
            let mut rng = StdRng::seed_from_u64(c.experiment.seed ^ ((t_idx as u64) << 32) ^ epoch as u64);
            let mut epoch_loss = 0.0;
            let mut term_sums: BTreeMap<String, f64> = BTreeMap::new();
            let mut n_batches = 0;
            for (examples, captions) in batches(&task.train, bs, &mut rng) {
                let step_started = Instant::now();
                rt.set_training(true);
                precision.before_step(&rt)?;
                for s in &strategies {
                    s.before_step(p.global_step as u64)?;
                }
                let pixels = data::pixel_batch(&examples, &model.preprocess, rt.device(), rt.compute_dtype())?;
                let (ids, mask) = model.tokenize(&captions)?;
                let img = model.encode_examples(&examples, &pixels)?;
                // Read now: later forwards of the model (reference batches) replace them.
                let image_tokens = model.image_tokens()?;
                let txt = model.encode_texts(&ids, &mask)?;
                let loss = ops::clip_loss(&img, &txt, &model.logit_scale)?;
                *term_sums.entry("clip".into()).or_default() +=
                    loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                let mut total = loss.clone();
                let old_features = match old {
                    Some(m) => Some((
                        m.encode_images(&pixels)?.detach(),
                        m.encode_texts(&ids, &mask)?.detach(),
                        m.logit_scale.detach(),
                    )),
                    None => None,
                };
                let mut inputs: Vec<(&str, &Tensor)> = vec![
                    ("image_features", &img),
                    ("text_features", &txt),
                    ("logit_scale", &model.logit_scale),
                    ("pixel_values", &pixels),
                    ("input_ids", &ids),
                ];
                if let Some(tokens) = &image_tokens {
                    inputs.push(("image_tokens", tokens));
                }
                let teacher_features = match &teacher {
                    Some(t) => {
                        let tp = data::pixel_batch(&examples, &t.preprocess, rt.device(), rt.float_dtype())?;
                        let features = t.encode_images(&tp)?;
                        Some((features, t.image_tokens()))
                    }
                    None => None,
                };
                if let Some((features, tokens)) = &teacher_features {
                    inputs.push(("teacher_image_features", features));
                    if let Some(tokens) = tokens {
                        inputs.push(("teacher_image_tokens", tokens));
                    }
                }
                if let Some((oi, ot, os)) = &old_features {
                    inputs.push(("old_image_features", oi));
                    inputs.push(("old_text_features", ot));
                    inputs.push(("old_logit_scale", os));
                }
                let reference_features = match &initial_model {
                    Some(im) => Some(reference_features(
                        &model,
                        im,
                        reference.as_ref(),
                        bs,
                        &mut ref_rng,
                        (&pixels, &ids, &mask, &img, &txt),
                    )?),
                    None => None,
                };
                if let Some([ri, rt_, ii, it, is]) = &reference_features {
                    inputs.push(("reference_image_features", ri));
                    inputs.push(("reference_text_features", rt_));
                    inputs.push(("initial_image_features", ii));
                    inputs.push(("initial_text_features", it));
                    inputs.push(("initial_logit_scale", is));
                }
                for s in &strategies {
                    let terms = s.loss_terms(&inputs)?;
                    for (name, term) in terms {
                        if term.elem_count() != 1 {
                            bail!(
                                "strategy `{}` returned loss term `{name}` with shape {:?}; loss terms must be scalars",
                                s.plugin,
                                term.dims()
                            );
                        }
                        let term = term.reshape(())?.to_dtype(total.dtype())?;
                        *term_sums.entry(name).or_default() +=
                            term.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                        total = total.broadcast_add(&term)?;
                    }
                }
                let value = total.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                if !value.is_finite() {
                    bail!(
                        "the loss became {value} at step {} of task `{}`; lower the learning rate or enable grad_clip",
                        p.global_step,
                        task.name
                    );
                }
                peak_memory = peak_memory.max(crate::runtime::device_memory_in_use(rt.device()));
                let grads = total.backward()?;
                peak_memory = peak_memory.max(crate::runtime::device_memory_in_use(rt.device()));
                rt.set_grads(Some(grads));
                let hooks = strategies.iter().try_for_each(|s| s.after_backward(p.global_step as u64));
                let grads = rt.set_grads(None).expect("gradients were set above");
                hooks?;
                // The norm costs a read per tensor: computed only when clipping needs it.
                let scale = match c.optimizer.grad_clip {
                    Some(max) => {
                        let norm = opt.grad_norm(&grads)?;
                        if !norm.is_finite() {
                            let why = opt.diagnose_non_finite_norm(&grads)?;
                            bail!(
                                "the gradient norm became {norm} at step {} of task `{}` ({why}); lower the \
                                 learning rate or the loss weights",
                                p.global_step,
                                task.name
                            );
                        }
                        clip_factor(norm, Some(max))
                    }
                    None => 1.0,
                };
                let factor = lr_factor(step_in_task, c.optimizer.warmup_steps, n_steps, c.optimizer.min_lr_ratio);
                opt.step(&grads, factor, scale)?;
                clamp_logit_scale(&model)?;
                for s in &strategies {
                    s.after_step(p.global_step as u64)?;
                }
                drop(grads);
                let live = rt.live_handles();
                match handles_after_first_step {
                    None => handles_after_first_step = Some(live),
                    Some(first) if live > first && !leak_reported => {
                        tracing::warn!(
                            step = p.global_step,
                            live,
                            first,
                            "live tensor handles grow from step to step: a plugin keeps handles it does not release"
                        );
                        leak_reported = true;
                    }
                    _ => {}
                }
                epoch_loss += value;
                n_batches += 1;
                step_in_task += 1;
                p.global_step += 1;
                p.step_seconds += step_started.elapsed().as_secs_f64();
                p.images_seen += examples.len();
                pb.inc(1);
            }
            let mean = epoch_loss / n_batches.max(1) as f64;
            tracing::info!(task = %task.name, epoch, loss = mean, live_handles = rt.live_handles(), "epoch done");
            losses.push(mean);
            terms.push(term_sums.into_iter().map(|(k, v)| (k, v / n_batches.max(1) as f64)).collect());
        }
        pb.finish_and_clear();
        gradient_pass(&model, &strategies, task, &info, bs, c.experiment.seed)?;
        rt.set_training(false);
        if let (Some(a), Some(inst)) = (&c.adapter, &model.adapter) {
            if a.merge_after_task {
                inst.merge(a.merge_coefficient)?;
                // The merged delta now lives in the base weights: start the adapter afresh so
                // it is not counted twice.
                inst.reset()?;
            }
        }
        for s in &strategies {
            s.after_task(&info)?;
        }
        // Never checkpoint (or mark finished) a task whose weights diverged: the previous
        // checkpoint stays the one `--resume` continues from.
        if let Some((first, count)) = crate::finite::non_finite_params(&rt.params())? {
            bail!(
                "task `{}` (task {} of {}) ended with non-finite weights at step {}: {count} of {} parameter \
                 tensors hold NaN or infinity, the first `{first}`; nothing of this task was saved. Lower \
                 the learning rate or set optimizer.grad_clip",
                task.name,
                t_idx + 1,
                tasks.len(),
                p.global_step.saturating_sub(1),
                rt.params().len()
            );
        }
        p.epoch_losses.push(losses);
        p.epoch_terms.push(terms);
        p.train_seconds += started.elapsed().as_secs_f64();
        // Checkpoint first, progress last: progress.json names only finished checkpoints.
        rt.params().save(&checkpoint_path(&run_dir, t_idx + 1, "safetensors"))?;
        for (i, s) in strategies.iter().enumerate() {
            write_atomic(&checkpoint_path(&run_dir, t_idx + 1, &format!("strategy-{i}.bin")), &s.save_state()?)?;
        }
        eval_stage(&mut p)?;
        p.finished_tasks = t_idx + 1;
        write_atomic(&progress_file, serde_json::to_string(&p)?.as_bytes())?;
        tracing::info!(task = %task.name, stage = t_idx + 1, steps = p.global_step, "task finished and checkpointed");
        tracking.log(stage_metrics(&p, t_idx + 1))?;
        if !opts.quiet {
            print!("{}", format_table(&p.results, t_idx + 1, &shown_refs));
            if !heldout_sets.is_empty() {
                print!("{}", format_heldout(&p.heldout, t_idx + 1));
            }
            println!(
                "  loss per epoch: {}",
                p.epoch_losses[t_idx].iter().map(|l| format!("{l:.3}")).collect::<Vec<_>>().join(" ")
            );
        }
    }
    // Evaluators may report a metric's chance level as `{metric}_chance` (what a random model
    // scores on the split): it is FWT's random baseline, not a score of its own.
    let continual: BTreeMap<String, crate::metrics::ClSummary> = p
        .results
        .metric_names()
        .into_iter()
        .filter(|m| !m.ends_with("_chance"))
        .filter_map(|m| {
            let chance: Option<Vec<f64>> =
                p.results.rows.first()?.iter().map(|cell| cell.get(&format!("{m}_chance")).copied()).collect();
            crate::metrics::summarize(&p.results.metric(&m), chance.as_deref()).ok().map(|s| (m, s))
        })
        .collect();
    let performance_drop: BTreeMap<String, BTreeMap<String, f64>> = p
        .heldout
        .metric_names()
        .into_iter()
        .filter(|m| !m.ends_with("_chance"))
        .map(|m| {
            let pd = crate::metrics::performance_drop(&p.heldout.metric(&m));
            (m, p.heldout.tasks.iter().cloned().zip(pd).collect())
        })
        .collect();
    if !opts.quiet {
        println!(
            "\n{:<26}{:>9}{:>9}{:>9}{:>12}{:>10}{:>9}",
            "continual summary", "last", "avg", "bwt", "forgetting", "transfer", "fwt"
        );
        for m in &shown {
            if let Some(s) = continual.get(m) {
                let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
                println!(
                    "{:<26}{:>9.2}{:>9.2}{:>9}{:>12}{:>10.2}{:>9}",
                    m,
                    s.last,
                    s.avg,
                    opt(s.bwt),
                    opt(s.forgetting),
                    s.transfer,
                    opt(s.fwt)
                );
            }
        }
        for (m, sets) in &performance_drop {
            for (set, pd) in sets {
                println!("PD {m:<23} {set:<20} {pd:>8.2}");
            }
        }
    }
    let data = tasks
        .iter()
        .chain(&heldout_sets)
        .map(|t| (t.name.clone(), DataCounts { train: t.train.len(), test: t.test.len(), skipped: t.skipped.len() }))
        .collect();
    let summary = RunSummary {
        name: c.experiment.name.clone(),
        seed: c.experiment.seed,
        run_dir: run_dir.clone(),
        trainable_parameters: trainable,
        total_parameters: total,
        batch_size: bs,
        epoch_losses: p.epoch_losses,
        epoch_terms: p.epoch_terms,
        results: p.results,
        heldout: p.heldout,
        continual,
        performance_drop,
        data,
        steps: p.global_step,
        train_seconds: p.train_seconds,
        performance: Performance {
            precision: c.train.precision.clone(),
            device: format!("{:?}", rt.device()),
            steps_per_second: p.global_step as f64 / p.step_seconds.max(1e-9),
            images_per_second: p.images_seen as f64 / p.step_seconds.max(1e-9),
            memory_kind: if peak_memory.is_some() { "device".into() } else { "host-rss".into() },
            peak_memory_bytes: peak_memory.or_else(crate::runtime::peak_rss),
        },
    };
    for (suite, m) in [("", &summary.results), ("zeroshot__", &summary.heldout)] {
        for name in m.metric_names() {
            let values = m.metric(&name);
            let mut csv = format!("stage,{}\n", m.tasks.join(","));
            for (t, row) in values.iter().enumerate() {
                csv.push_str(&format!("{t},{}\n", row.iter().map(|v| format!("{v}")).collect::<Vec<_>>().join(",")));
            }
            let file = format!("{suite}{}.csv", name.replace('/', "__"));
            write_atomic(&run_dir.join("r_matrix").join(file), csv.as_bytes())?;
        }
    }
    write_atomic(&run_dir.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    {
        let t = tasks.len() as u64;
        let mut metrics = Vec::new();
        for (m, s) in &summary.continual {
            for (k, v) in [("last", Some(s.last)), ("avg", Some(s.avg)), ("bwt", s.bwt), ("forgetting", s.forgetting)] {
                if let Some(v) = v {
                    metrics.push((format!("continual/{m}/{k}"), v, t));
                }
            }
        }
        for (m, sets) in &summary.performance_drop {
            for (set, v) in sets {
                metrics.push((format!("pd/{m}/{set}"), *v, t));
            }
        }
        metrics.push(("train_seconds".into(), summary.train_seconds, t));
        tracking.record(crate::tracking::Event::Metrics { metrics, time_ms: crate::tracking::now_ms() })?;
        let mut files = vec!["config.resolved.toml".to_string(), "summary.json".into(), "splits.json".into()];
        let mut csvs: Vec<String> = std::fs::read_dir(run_dir.join("r_matrix"))?
            .filter_map(|e| e.ok().map(|e| format!("r_matrix/{}", e.file_name().to_string_lossy())))
            .collect();
        csvs.sort();
        files.extend(csvs);
        for f in files {
            tracking.record(crate::tracking::Event::Artifact { path: f })?;
        }
        tracking.log(crate::tracking::Event::End { status: "FINISHED".into(), time_ms: crate::tracking::now_ms() })?;
    }
    tracing::info!(steps = summary.steps, train_seconds = summary.train_seconds, "run finished");
    crate::runlog::close();
    drop(owned_dir);
    Ok(summary)
}

/// Shuffle a task's examples and cut them into batches of at least 2, each image with one of
/// its captions drawn from `rng`.
pub(crate) fn batches<'a>(
    train: &'a [data::Example],
    bs: usize,
    rng: &mut StdRng,
) -> Vec<(Vec<&'a data::Example>, Vec<String>)> {
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(rng);
    let mut out = Vec::new();
    for chunk in order.chunks(bs) {
        if chunk.len() < 2 {
            continue;
        }
        let examples: Vec<&data::Example> = chunk.iter().map(|&i| &train[i]).collect();
        let captions =
            examples.iter().map(|e| e.captions[rand::Rng::random_range(rng, 0..e.captions.len())].clone()).collect();
        out.push((examples, captions));
    }
    out
}

/// The reference batch for strategies that distil from the initial model: encoded by the
/// model being trained (in the graph) and by the frozen initial model. Without `[reference]`
/// data the current batch is the reference. Returns [reference image, reference text,
/// initial image, initial text, initial logit scale].
fn reference_features(
    model: &Model,
    initial: &Model,
    reference: Option<&TaskData>,
    bs: usize,
    rng: &mut StdRng,
    current: (&Tensor, &Tensor, &Tensor, &Tensor, &Tensor),
) -> anyhow::Result<[Tensor; 5]> {
    let (pixels, ids, mask, img, txt) = current;
    let (student_img, student_txt, pixels, ids, mask) = match reference {
        None => (img.clone(), txt.clone(), pixels.clone(), ids.clone(), mask.clone()),
        Some(r) => {
            let rt = &model.runtime;
            let examples: Vec<&data::Example> =
                (0..bs).map(|_| &r.train[rand::Rng::random_range(rng, 0..r.train.len())]).collect();
            let captions: Vec<String> = examples
                .iter()
                .map(|e| e.captions[rand::Rng::random_range(rng, 0..e.captions.len())].clone())
                .collect();
            let px = data::pixel_batch(&examples, &model.preprocess, rt.device(), rt.float_dtype())?;
            let (ids, mask) = model.tokenize(&captions)?;
            (model.encode_images(&px)?, model.encode_texts(&ids, &mask)?, px, ids, mask)
        }
    };
    Ok([
        student_img,
        student_txt,
        initial.encode_images(&pixels)?.detach(),
        initial.encode_texts(&ids, &mask)?.detach(),
        initial.logit_scale.detach(),
    ])
}

/// Gradients of the task loss on batches of the finished task, for strategies that ask
/// (EWC's Fisher). Parameters are not updated.
fn gradient_pass(
    model: &Model,
    strategies: &[StrategyInstance],
    task: &TaskData,
    info: &TaskInfo,
    bs: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let wanted: Vec<(usize, &StrategyInstance)> = strategies
        .iter()
        .map(|s| s.gradient_batches().map(|n| (n, s)))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .collect();
    let Some(most) = wanted.iter().map(|(n, _)| *n).max() else { return Ok(()) };
    let rt = &model.runtime;
    // Evaluation mode: no dropout, so the gradients are those of the trained function.
    rt.set_training(false);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6772_6164 ^ info.index);
    for (b, (examples, captions)) in batches(&task.train, bs, &mut rng).into_iter().take(most).enumerate() {
        let pixels = data::pixel_batch(&examples, &model.preprocess, rt.device(), rt.float_dtype())?;
        let (ids, mask) = model.tokenize(&captions)?;
        let img = model.encode_images(&pixels)?;
        let txt = model.encode_texts(&ids, &mask)?;
        let loss = ops::clip_loss(&img, &txt, &model.logit_scale)?;
        rt.set_grads(Some(loss.backward()?));
        let hooks = wanted.iter().filter(|(n, _)| b < *n).try_for_each(|(_, s)| s.on_gradients(info, b as u64));
        rt.set_grads(None);
        hooks?;
    }
    Ok(())
}

/// Overwrite the frozen copy's parameters with the trained model's (same names: both were
/// built from one config); the one copy per task that strategies comparing against the old
/// model need.
fn copy_parameters(from: &Model, to: &Model) -> anyhow::Result<()> {
    let src = from.runtime.params();
    let dst = to.runtime.params();
    for p in dst.iter() {
        let q = src.get(&p.name).with_context(|| format!("the old-model copy has `{}`, the model does not", p.name))?;
        p.var.set(&q.var.as_tensor().detach())?;
    }
    Ok(())
}

/// CLIP clamps `logit_scale` to [0, ln 100].
fn clamp_logit_scale(model: &Model) -> anyhow::Result<()> {
    let v = model.logit_scale.clamp(0.0, 100f64.ln())?;
    model.runtime.param_assign(&model.logit_scale, &v).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_read_back_holds_every_bit_of_its_floats() {
        // A resumed run continues from progress.json: what it reads must be bit for bit what
        // an unbroken run holds in memory (serde_json's default parser loses the last digit
        // of values such as these).
        let values = [0.1 + 0.2, 1.0 / 3.0, 2.0f64.sqrt() * 1e-7, 9007199254740993.0, 5e-324];
        let p = Progress {
            finished_tasks: 1,
            global_step: 3,
            train_seconds: values[1],
            step_seconds: values[2],
            images_seen: 9,
            epoch_losses: vec![values.to_vec()],
            epoch_terms: vec![vec![values.iter().enumerate().map(|(i, v)| (i.to_string(), *v)).collect()]],
            results: ResultMatrix::default(),
            heldout: ResultMatrix::default(),
        };
        let back: Progress = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.epoch_losses[0]), bits(&values));
        assert_eq!(back.step_seconds.to_bits(), values[2].to_bits());
    }
}
