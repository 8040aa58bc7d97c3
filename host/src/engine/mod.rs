//! The training engine: the task sequence, the training step, evaluation after every task,
//! and the run directory.
//!
//! One training step: forward both towers through the plugins, CLIP's contrastive loss on the
//! host, plus every strategy's loss terms, ONE backward pass over the one graph, gradient
//! clipping, an AdamW step under the warmup + cosine schedule.

mod evaluate;
pub mod memory;
mod midtask;
mod plan;
mod replay;
mod reporter;
mod session;
mod step;
mod store;
mod summary;
mod telemetry;
mod terminal;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::SeedableRng;
use recall_sdk::TaskInfo;
use serde::{Deserialize, Serialize};

pub use evaluate::{class_embeddings, evaluate, evaluate_zeroshot, retrieval_texts};
use midtask::{CheckpointSchedule, EpochTotals, TaskPosition};
pub use plan::dry_run;
use recall_sdk::GradientPass;
use reporter::Reporter;
pub use session::{load_tasks, Parts, Session};
pub use step::steps_in_task;
pub use step::Precision;
use step::{copy_parameters, gradient_pass};
pub use step::{GraphSize, PhaseClock, StepProbe, StepStats, TaskSteps, PHASES};
pub(crate) use store::open_run_dir;
use store::{metrics_lines, Progress};
pub use terminal::format_table;
pub(crate) use terminal::progress;
use terminal::stage_label;

use crate::config::{LoadedConfig, MergeScope};
use crate::data::{self, TaskData};
use crate::loader::Registry;
use crate::optim::AdamW;

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

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
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
    /// Scores on each task's validation split inside it (`[train] eval_every_epochs`).
    pub validation: Vec<midtask::ValidationRecord>,
    /// Every task's validation split after each stage (`val_fraction`), and its
    /// continual-learning summaries: what hyperparameters are chosen on.
    #[serde(skip_serializing_if = "ResultMatrix::is_empty")]
    pub validation_results: ResultMatrix,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub validation_continual: BTreeMap<String, crate::metrics::ClSummary>,
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

/// How much data a task had.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataCounts {
    pub train: usize,
    pub test: usize,
    pub skipped: usize,
}

/// The seed of the runtime's generator for a task: reseeding per task makes a resumed run
/// draw the same dropout masks and re-initialisations as an unbroken one.
fn task_seed(seed: u64, task: usize) -> u64 {
    seed ^ (task as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Run an experiment end to end (or continue it: `opts.resume`).
pub fn run(cfg: &LoadedConfig, registry: &Registry, opts: &RunOptions) -> anyhow::Result<RunSummary> {
    let session = Session::prepare(cfg, registry)?;
    // Before the run directory exists: a step that cannot fit leaves nothing behind.
    memory::check_step_fits(&session)?;
    let mut run = Run::open(&session, registry, opts)?;
    run.evaluate_initial_model()?;
    for t_idx in run.progress.finished_tasks..session.tasks.len() {
        run.train_task(t_idx)?;
        run.finish_task(t_idx)?;
    }
    run.summarize()
}

/// A run in progress: the session it trains, the run directory it owns, its reporter and
/// what it has finished.
struct Run<'a> {
    session: &'a Session<'a>,
    dir: crate::rundir::RunDir,
    report: Reporter,
    progress: Progress,
    precision: Precision,
    /// Peak device memory sampled in the steps (CUDA).
    peak_memory: Option<u64>,
    /// Live handles after a step must not grow within a task: a plugin that keeps handles
    /// it no longer needs leaks memory every step.
    leaks: LeakWatch,
    /// Under `merge_scope = "trained"`, the model's parameters as the current task started.
    task_start: Vec<(String, candle_core::Tensor)>,
    /// Where a resumed run continues inside its next task (a mid-task checkpoint).
    resume_at: Option<TaskPosition>,
}

/// Live tensor handles after each step of a task. Strategies may keep new tensors between
/// tasks (EWC's Fisher, snapshots); a leak is growth from step to step within a task,
/// reported once per run.
#[derive(Default)]
struct LeakWatch {
    after_first_step: Option<usize>,
    reported: bool,
}

impl LeakWatch {
    fn new_task(&mut self) {
        self.after_first_step = None;
    }

    fn after_step(&mut self, live: usize, step: usize) {
        match self.after_first_step {
            None => self.after_first_step = Some(live),
            Some(first) if live > first && !self.reported => {
                tracing::warn!(
                    step,
                    live,
                    first,
                    "live tensor handles grow from step to step: a plugin keeps handles it does not release"
                );
                self.reported = true;
            }
            _ => {}
        }
    }
}

impl<'a> Run<'a> {
    /// Take the run directory, record what runs in it (or check that a resume runs the same
    /// thing), start tracking, and load the last finished task of a resumed run.
    fn open(session: &'a Session<'a>, registry: &Registry, opts: &'a RunOptions) -> anyhow::Result<Self> {
        let c = &session.cfg.config;
        let dir = open_run_dir(opts, &c.experiment)?;
        let run_dir = dir.path().to_path_buf();
        let identity = crate::identity::of(&session.recorded, registry)?;
        let config_changes = if opts.resume {
            crate::identity::check_resume(&run_dir, &identity, &opts.allow_config_change)?
        } else {
            Vec::new()
        };
        let previous: Option<Progress> = if opts.resume { dir.read_progress()? } else { None };
        dir.record_provenance(&c.experiment.method_key(), c.experiment.seed, opts.resume, &config_changes)?;
        if !opts.resume || !config_changes.is_empty() {
            dir.write_identity(&identity)?;
        }
        for change in &config_changes {
            tracing::warn!("resumed with a changed configuration (--allow-config-change): {change}");
        }
        if let Err(e) = crate::runlog::open(&dir.log_file()) {
            tracing::warn!("cannot write {}: {e}", dir.log_file().display());
        }
        replay::warn_if_budget_exceeds_data(session);
        if !session.recorded.unreported.is_empty() {
            tracing::info!(
                plugins = ?session.recorded.unreported,
                "these plugins do not report their defaults (built against recall-sdk < 1.7, or a config type \
                 without Serialize): config.resolved.toml holds their sections as written"
            );
        }
        if !opts.resume {
            // The records a fresh run writes once: the resolved config, the plugins, the splits.
            dir.write_config(&session.recorded.config)?;
            dir.write_plugins(registry)?;
            dir.write_splits(&session.tasks, &session.heldout_sets)?;
        }
        let rt = session.runtime();
        let trainable = session.model.trainable_parameters();
        let total = rt.params().iter().map(|p| p.var.elem_count()).sum::<usize>();
        tracing::info!(run_dir = %run_dir.display(), trainable, total, "run started");
        let report = Reporter::open(session, &run_dir, opts.quiet)?;
        let progress = match previous {
            Some(p) => p,
            None => Progress::new(&session.tasks, &session.heldout_sets),
        };
        let same_tasks = progress.results.tasks.iter().eq(session.tasks.iter().map(|t| &t.name));
        if !same_tasks || progress.finished_tasks > session.tasks.len() {
            bail!(
                "{} does not belong to this experiment's tasks; start a fresh run instead",
                run_dir.join(crate::rundir::PROGRESS_FILE).display()
            );
        }
        if progress.finished_tasks > 0 {
            // Continue from the last finished task: its parameters and each strategy's state.
            let k = progress.finished_tasks;
            let states = dir.load_checkpoint(k, &rt.params(), state_shape(session))?;
            restore_states(session, states)?;
        }
        // A mid-task checkpoint of the task after the last finished one (an older one is of
        // a task that finished since).
        let resume_at = match opts.resume {
            true => dir.read_step_checkpoint::<TaskPosition>()?.filter(|p| p.task == progress.finished_tasks),
            false => None,
        };
        if opts.resume && progress.finished_tasks < session.tasks.len() {
            report.resumed(
                &run_dir,
                progress.finished_tasks,
                session.tasks.len(),
                resume_at.as_ref().map(|p| p.step_in_task),
            );
        }
        // From here a SIGTERM or SIGINT stops the run at the next step, checkpointed.
        crate::stop::install();
        let precision = Precision::start(&c.train, rt)?;
        Ok(Run {
            session,
            dir,
            report,
            progress,
            precision,
            peak_memory: None,
            leaks: LeakWatch::default(),
            task_start: Vec::new(),
            resume_at,
        })
    }

    /// Stage 0, once per run: the model before any training.
    fn evaluate_initial_model(&mut self) -> anyhow::Result<()> {
        if self.progress.results.rows.is_empty() {
            self.evaluate_stage()?;
            self.dir.write_progress(&self.progress)?;
        }
        self.report.initial_stage(&self.progress)
    }

    /// Every task's test split and every zero-shot set, at the evaluation precision; the
    /// scores become the next row of the result matrices and metrics.jsonl is rewritten.
    fn evaluate_stage(&mut self) -> anyhow::Result<()> {
        let s = self.session;
        let batch = s.cfg.config.train.eval_batch_size;
        let p = &mut self.progress;
        let pb = self.report.bar(s.tasks.len() + s.heldout_sets.len(), "evaluating".into(), "sets");
        self.precision.evaluating(s.runtime(), || {
            let stage = p.results.rows.len();
            let mut row = Vec::new();
            for t in &s.tasks {
                let scores = evaluate(&s.model, &s.task_evaluators, t, batch, &s.loader)
                    .with_context(|| format!("evaluating task `{}` after {}", t.name, stage_label(&s.tasks, stage)))?;
                row.push(scores);
                pb.inc(1);
            }
            p.results.rows.push(row);
            let mut row = Vec::new();
            for set in &s.heldout_sets {
                let scores =
                    evaluate_zeroshot(&s.model, &s.zeroshot_evaluators, set, batch, &s.loader).with_context(|| {
                        format!("evaluating zero-shot set `{}` after {}", set.name, stage_label(&s.tasks, stage))
                    })?;
                row.push(scores);
                pb.inc(1);
            }
            p.heldout.rows.push(row);
            if !p.validation_results.tasks.is_empty() {
                let mut row = Vec::new();
                for t in &s.tasks {
                    let scores = match t.val.is_empty() {
                        true => BTreeMap::new(),
                        false => evaluate::evaluate_split(&s.model, &s.task_evaluators, t, &t.val, batch, &s.loader)
                            .with_context(|| {
                                format!("validating task `{}` after {}", t.name, stage_label(&s.tasks, stage))
                            })?,
                    };
                    row.push(scores);
                }
                p.validation_results.rows.push(row);
            }
            Ok(())
        })?;
        pb.finish_and_clear();
        self.dir.write_metrics(&metrics_lines(p)?)?;
        Ok(())
    }

    /// Every epoch of task `t_idx`; its losses are recorded in the progress.
    fn train_task(&mut self, t_idx: usize) -> anyhow::Result<()> {
        let s = self.session;
        let c = &s.cfg.config;
        let task = &s.tasks[t_idx];
        let mut started = Instant::now();
        if task.train.len() < 2 {
            bail!("task `{}` has {} training examples; at least 2 are needed", task.name, task.train.len());
        }
        let n_steps = steps_in_task(task.epoch_examples(), &c.train);
        let (mut steps, mut opt) = begin_task(s, self.precision, t_idx, n_steps)?;
        self.task_start = match &c.adapter {
            // A coefficient of 1 keeps the task's result: nothing to average with.
            Some(a)
                if a.merge_after_task
                    && a.merge_scope == MergeScope::Trained
                    && a.merge_coefficient_for(t_idx) < 1.0 =>
            {
                model_snapshot(s.runtime())?
            }
            _ => Vec::new(),
        };
        let pb = self.report.bar(n_steps, format!("task {} {}", t_idx + 1, task.name), "steps");
        self.leaks.new_task();
        let mut at = match self.resume_at.take() {
            Some(p) => self.restore_position(p, &mut opt)?,
            None => TaskPosition {
                task: t_idx,
                epoch: 0,
                step_in_epoch: 0,
                step_in_task: 0,
                global_step: self.progress.global_step,
                optimizer_step: 0,
                losses: Vec::new(),
                terms: Vec::new(),
                totals: EpochTotals::default(),
                step_seconds: 0.0,
                images_seen: 0,
                task_seconds: 0.0,
                validation: Vec::new(),
            },
        };
        pb.inc(at.step_in_task as u64);
        self.report.begin_task(format!("task {} {}", t_idx + 1, task.name), c.train.epochs);
        let mut schedule = CheckpointSchedule::new(&c.train);
        let pipeline = task.pipeline(&task.train, &s.train_transform, &s.model.preprocess);
        while at.epoch < c.train.epochs {
            let plans = epoch_plan(s, t_idx, at.epoch);
            s.loader.stream(&pipeline, &plans[at.step_in_epoch.min(plans.len())..], |batch| -> anyhow::Result<()> {
                let lr_factor = c.optimizer.lr_factor(at.step_in_task, at.epoch, n_steps, c.train.epochs);
                steps.reseed(at.step_in_task);
                let step_started = Instant::now();
                if let Some(stats) = self.train_step(&mut steps, &mut opt, &batch, lr_factor)? {
                    let record = telemetry::StepRecord {
                        steps_done: self.progress.global_step,
                        epoch: at.epoch as f64 + (at.step_in_epoch + 1) as f64 / plans.len().max(1) as f64,
                        lr_factor,
                        stats: &stats,
                        images: batch.len(),
                        seconds: step_started.elapsed().as_secs_f64(),
                    };
                    self.report.step_done(record, c.train.log_every(), at.epoch, &pb)?;
                    at.totals.add(stats);
                }
                at.step_in_task += 1;
                at.step_in_epoch += 1;
                pb.inc(1);
                let stop = crate::stop::requested();
                if schedule.due(at.step_in_task) || stop.is_some() {
                    at.task_seconds += started.elapsed().as_secs_f64();
                    started = Instant::now();
                    self.save_position(&mut at, &opt)?;
                }
                if let Some(signal) = stop {
                    bail!(
                        "stopped by {signal} after step {} of task `{}`, checkpointed; continue with `recall run \
                         --resume {}`",
                        at.step_in_task,
                        task.name,
                        self.dir.path().display()
                    );
                }
                Ok(())
            })?;
            let (mean, epoch_terms) = std::mem::take(&mut at.totals).means();
            tracing::info!(task = %task.name, epoch = at.epoch, loss = mean, live_handles = s.runtime().live_handles(), "epoch done");
            at.losses.push(mean);
            at.terms.push(epoch_terms);
            at.epoch += 1;
            at.step_in_epoch = 0;
            self.validate(t_idx, &mut at)?;
        }
        self.report.end_task_training()?;
        pb.finish_and_clear();
        self.progress.validation.append(&mut at.validation);
        self.progress.epoch_losses.push(at.losses);
        self.progress.epoch_terms.push(at.terms);
        self.progress.train_seconds += at.task_seconds + started.elapsed().as_secs_f64();
        Ok(())
    }

    /// `[train] eval_every_epochs`: after every N epochs of a task with a validation split,
    /// the task-suite evaluators score it (the test split waits for the stage's end); the
    /// scores are recorded at the global step and kept with the task's position.
    fn validate(&mut self, t_idx: usize, at: &mut TaskPosition) -> anyhow::Result<()> {
        let s = self.session;
        let (c, task) = (&s.cfg.config, &s.tasks[t_idx]);
        let due = c.train.eval_every_epochs.is_some_and(|n| at.epoch.is_multiple_of(n.max(1)));
        if !due || task.val.is_empty() {
            return Ok(());
        }
        let metrics = self.precision.evaluating(s.runtime(), || {
            evaluate::evaluate_split(&s.model, &s.task_evaluators, task, &task.val, c.train.eval_batch_size, &s.loader)
        })?;
        let record =
            midtask::ValidationRecord { task: t_idx, epoch: at.epoch, step: self.progress.global_step, metrics };
        self.report.validation(&task.name, &record)?;
        at.validation.push(record);
        Ok(())
    }

    /// Write a mid-task checkpoint at `at` (the step just taken).
    fn save_position(&self, at: &mut TaskPosition, opt: &AdamW) -> anyhow::Result<()> {
        let s = self.session;
        let (moments, optimizer_step) = opt.state()?;
        at.global_step = self.progress.global_step;
        at.optimizer_step = optimizer_step;
        at.step_seconds = self.progress.step_seconds;
        at.images_seen = self.progress.images_seen;
        let states = saved_states(s)?;
        self.dir.save_step_checkpoint(at.global_step, &s.runtime().params(), &moments, &states, &*at)?;
        tracing::info!(task = at.task, step = at.step_in_task, global_step = at.global_step, "mid-task checkpoint");
        Ok(())
    }

    /// Continue a task from a mid-task checkpoint: after `begin_task` has set the task up as
    /// at its start (old model, fresh adapter, strategies told, the gradient pass), the
    /// checkpoint's parameters, optimizer moments and strategy states replace what it made.
    fn restore_position(&mut self, at: TaskPosition, opt: &mut AdamW) -> anyhow::Result<TaskPosition> {
        let s = self.session;
        let (moments, states) = self.dir.load_step_checkpoint(at.global_step, &s.runtime().params(), state_shape(s))?;
        opt.restore(&moments, at.optimizer_step)?;
        restore_states(s, states)?;
        let p = &mut self.progress;
        p.global_step = at.global_step;
        p.step_seconds = at.step_seconds;
        p.images_seen = at.images_seen;
        tracing::info!(
            task = at.task,
            step = at.step_in_task,
            global_step = at.global_step,
            "continuing from a mid-task checkpoint"
        );
        Ok(at)
    }

    /// One optimizer step on one prepared batch; the global step, the step time and the
    /// images seen advance. A batch left with fewer than two images by skipped ones
    /// (`on_error = "skip"`) takes no step: the contrastive loss needs two.
    fn train_step(
        &mut self,
        steps: &mut TaskSteps,
        opt: &mut AdamW,
        batch: &data::loader::Batch,
        lr_factor: f64,
    ) -> anyhow::Result<Option<StepStats>> {
        let started = Instant::now();
        let p = &mut self.progress;
        if batch.len() < 2 {
            tracing::warn!(
                step = p.global_step,
                images = batch.len(),
                "a batch lost its images to on_error = \"skip\"; no step"
            );
            p.global_step += 1;
            return Ok(None);
        }
        let stats = steps.step(opt, batch, p.global_step, lr_factor, &mut StepProbe::default())?;
        self.peak_memory = self.peak_memory.max(stats.peak_memory);
        self.leaks.after_step(self.session.runtime().live_handles(), p.global_step);
        p.global_step += 1;
        p.step_seconds += started.elapsed().as_secs_f64();
        p.images_seen += batch.len();
        Ok(Some(stats))
    }

    /// After a task's last step: the strategies' gradient pass, the adapter merge, the
    /// finiteness check, then checkpoint, evaluation and progress, in that order.
    fn finish_task(&mut self, t_idx: usize) -> anyhow::Result<()> {
        let s = self.session;
        let c = &s.cfg.config;
        let (rt, task) = (s.runtime(), &s.tasks[t_idx]);
        let n_steps = steps_in_task(task.epoch_examples(), &c.train);
        let info = task_info(t_idx, task, n_steps);
        let after = GradientPass::AfterTask;
        gradient_pass(
            &s.model,
            &s.strategies,
            after,
            (task, &task.train),
            &info,
            c.train.batch_size,
            c.experiment.seed,
        )?;
        rt.set_training(false);
        self.merge_adapter(t_idx)?;
        for st in &s.strategies {
            st.after_task(&info)?;
        }
        replay::fill_after_task(s, t_idx)?;
        // Never checkpoint (or mark finished) a task whose weights diverged: the previous
        // checkpoint stays the one `--resume` continues from.
        if let Some((first, count)) = crate::finite::non_finite_params(&rt.params())? {
            bail!(
                "task `{}` (task {} of {}) ended with non-finite weights at step {}: {count} of {} parameter \
                 tensors hold NaN or infinity, the first `{first}`; nothing of this task was saved. Lower \
                 the learning rate or set optimizer.grad_clip",
                task.name,
                t_idx + 1,
                s.tasks.len(),
                self.progress.global_step.saturating_sub(1),
                rt.params().len()
            );
        }
        // Checkpoint first, progress last: progress.json names only finished checkpoints.
        self.dir.save_checkpoint(t_idx + 1, &rt.params(), &saved_states(s)?)?;
        self.evaluate_stage()?;
        self.progress.finished_tasks = t_idx + 1;
        self.dir.write_progress(&self.progress)?;
        // The task's mid-task checkpoints are superseded (progress first: a record left by a
        // kill between the two names a finished task and is ignored).
        self.dir.remove_step_checkpoints(None)?;
        tracing::info!(task = %task.name, stage = t_idx + 1, steps = self.progress.global_step, "task finished and checkpointed");
        self.report.task_finished(&self.progress, t_idx)
    }

    /// `[adapter] merge_after_task`: the delta merged into the base weights with this task's
    /// coefficient (or, with `merge_scope = "trained"`, merged whole and the trained
    /// parameters averaged with their values at the task's start), then the adapter reset.
    fn merge_adapter(&mut self, t_idx: usize) -> anyhow::Result<()> {
        let s = self.session;
        let (Some(a), Some(inst)) = (&s.cfg.config.adapter, &s.model.adapter) else { return Ok(()) };
        if !a.merge_after_task {
            return Ok(());
        }
        let coefficient = a.merge_coefficient_for(t_idx);
        match a.merge_scope {
            MergeScope::Adapter => inst.merge(coefficient)?,
            MergeScope::Trained => {
                inst.merge(1.0)?;
                average_with_start(s.runtime(), &std::mem::take(&mut self.task_start), coefficient)?;
            }
        }
        tracing::info!(task = %s.tasks[t_idx].name, coefficient, scope = ?a.merge_scope, "merged");
        // The merged delta now lives in the base weights: start the adapter afresh so it is
        // not counted twice.
        inst.reset()?;
        Ok(())
    }

    /// The continual-learning summaries, summary.json, the R-matrix CSVs, the last events.
    fn summarize(mut self) -> anyhow::Result<RunSummary> {
        let summary =
            summary::build(self.session, std::mem::take(&mut self.progress), self.dir.path(), self.peak_memory)?;
        let artifacts = summary::write(&summary, &self.dir)?;
        self.report.finished(&summary, artifacts)?;
        tracing::info!(steps = summary.steps, train_seconds = summary.train_seconds, "run finished");
        crate::runlog::close();
        drop(self.dir);
        Ok(summary)
    }
}

/// The batches of task `t_idx`'s epoch `epoch`: the order and captions drawn from a
/// generator seeded by (seed, task, epoch), as before the pipeline existed, and each batch's
/// augmentation seed derived from the same three and its step.
pub fn epoch_plan(s: &Session, t_idx: usize, epoch: usize) -> Vec<data::loader::BatchPlan> {
    let c = &s.cfg.config;
    let mut rng = StdRng::seed_from_u64(c.experiment.seed ^ ((t_idx as u64) << 32) ^ epoch as u64);
    let augment_seed = task_seed(c.experiment.seed, t_idx) ^ (epoch as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let task = &s.tasks[t_idx];
    data::loader::plan_epoch(&task.train, &task.order, c.train.batch_size, &mut rng, augment_seed)
}

/// Copies of the model's own parameters (not the adapter's or the strategies'), by name.
fn model_snapshot(rt: &crate::runtime::Runtime) -> anyhow::Result<Vec<(String, candle_core::Tensor)>> {
    let params = rt.params();
    let own = params.iter().filter(|p| !p.name.starts_with("adapter.") && !p.name.starts_with("strategy."));
    Ok(own.map(|p| Ok((p.name.clone(), p.var.as_tensor().detach().copy()?))).collect::<candle_core::Result<_>>()?)
}

/// `start + c (now - start)` for every parameter of `start` (empty when c = 1).
fn average_with_start(
    rt: &crate::runtime::Runtime,
    start: &[(String, candle_core::Tensor)],
    c: f64,
) -> anyhow::Result<()> {
    for (name, before) in start {
        let param = rt.params().get(name).map(|p| p.var.as_tensor().clone());
        let param = param.with_context(|| format!("`{name}` was a parameter when the task started"))?;
        let averaged = before.add(&((&param.detach() - before)? * c)?)?;
        rt.param_assign(&param, &averaged).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// What a task starts with: the runtime reseeded, a fresh adapter if asked, the old
/// model set to the weights so far, the strategies told, and a fresh optimizer.
pub fn begin_task<'a>(
    s: &'a Session<'a>,
    precision: Precision,
    t_idx: usize,
    n_steps: usize,
) -> anyhow::Result<(TaskSteps<'a>, AdamW)> {
    let c = &s.cfg.config;
    let task = &s.tasks[t_idx];
    s.runtime().reseed(task_seed(c.experiment.seed, t_idx));
    let info = task_info(t_idx, task, n_steps);
    if t_idx > 0 {
        if let (Some(a), Some(inst)) = (&c.adapter, &s.model.adapter) {
            if a.fresh_per_task {
                inst.reset()?;
            }
        }
    }
    let old = match &s.old_model {
        Some(m) if t_idx > 0 || c.train.old_model_on_first_task => {
            copy_parameters(&s.model, m)?;
            Some(m)
        }
        _ => None,
    };
    for st in &s.strategies {
        st.before_task(&info)?;
    }
    let before = GradientPass::BeforeTask;
    gradient_pass(&s.model, &s.strategies, before, (task, &task.test), &info, c.train.batch_size, c.experiment.seed)?;
    let opt = AdamW::new(&s.runtime().params(), &c.optimizer).map_err(|e| s.cfg.error_at(&e.key(), e.message))?;
    if t_idx == 0 {
        for g in opt.summary() {
            tracing::info!(group = %g.group, tensors = g.n_tensors, values = g.n_values, lr = g.lr, "optimizer group");
        }
    }
    let ref_seed = c.experiment.seed ^ 0x7265_6600 ^ ((t_idx as u64) << 40);
    let ref_rng = StdRng::seed_from_u64(ref_seed);
    let step_seed = task_seed(c.experiment.seed, t_idx) ^ 0x7374_6570;
    let replay_seed = c.experiment.seed ^ 0x7265_706c ^ ((t_idx as u64) << 40);
    let steps = TaskSteps {
        session: s,
        precision,
        old,
        task_name: &task.name,
        ref_rng,
        ref_seed,
        step_seed,
        task_index: t_idx,
        replay_rng: StdRng::seed_from_u64(replay_seed),
        replay_seed,
    };
    Ok((steps, opt))
}

/// The end of a task that did not train (`recall bench` passing through the tasks before
/// the one it times): the strategies' gradient pass and `after_task`, so their state is as a
/// run's would be; no merge, no checkpoint.
pub fn end_task_untrained(s: &Session, t_idx: usize, n_steps: usize) -> anyhow::Result<()> {
    let c = &s.cfg.config;
    let (task, info) = (&s.tasks[t_idx], task_info(t_idx, &s.tasks[t_idx], n_steps));
    let after = GradientPass::AfterTask;
    gradient_pass(&s.model, &s.strategies, after, (task, &task.train), &info, c.train.batch_size, c.experiment.seed)?;
    s.runtime().set_training(false);
    for st in &s.strategies {
        st.after_task(&info)?;
    }
    replay::fill_after_task(s, t_idx)
}

/// What a checkpoint of the session holds beside the parameters: how many strategy states,
/// and whether a replay memory.
fn state_shape(s: &Session) -> (usize, bool) {
    (s.strategies.len(), s.replay.is_some())
}

/// Each strategy's state and the replay memory, as a checkpoint saves them.
fn saved_states(s: &Session) -> anyhow::Result<crate::rundir::States> {
    Ok(crate::rundir::States {
        strategies: s.strategies.iter().map(|st| st.save_state()).collect::<Result<Vec<_>, _>>()?,
        replay: s.replay.as_ref().map(|m| m.borrow().to_bytes()).transpose()?,
    })
}

/// Hand each strategy its saved state and put the replay memory back.
fn restore_states(s: &Session, states: crate::rundir::States) -> anyhow::Result<()> {
    for (st, bytes) in s.strategies.iter().zip(states.strategies) {
        st.load_state(&bytes)?;
    }
    if let (Some(memory), Some(bytes)) = (&s.replay, states.replay) {
        let request = memory.borrow().request;
        *memory.borrow_mut() = replay::ExemplarMemory::from_bytes(request, &bytes)?;
    }
    Ok(())
}

fn task_info(t_idx: usize, task: &TaskData, n_steps: usize) -> TaskInfo {
    TaskInfo { index: t_idx as u64, name: task.name.as_str().into(), n_steps: n_steps as u64 }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::config::AdapterSection;
    use crate::runtime::Runtime;

    /// C-CLIP's averaging after each task, against its code's formulas applied in torch
    /// (tests/fixtures/merge/make_merge.py): the `c-clip-code` schedule and the trained-scope
    /// average over four tasks, the LoRA delta merged in full first.
    #[test]
    fn the_trained_scope_average_on_the_c_clip_code_schedule_matches_the_authors_formulas() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/merge/merge.safetensors");
        let fx = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        let adapter: AdapterSection = toml::from_str(
            "plugin = \"lora\"\nmerge_after_task = true\nmerge_scope = \"trained\"\nmerge_schedule = \"c-clip-code\"",
        )
        .unwrap();
        let rt = Runtime::new(Device::Cpu, DType::F64, 0);
        for name in ["w", "b"] {
            rt.param(name, fx[&format!("start.{name}")].dims(), recall_sdk::ParamInit::zeros(), true).unwrap();
        }
        let set = |name: &str, v: &Tensor| rt.params().get(name).unwrap().var.set(v).unwrap();
        let value = |name: &str| rt.params().get(name).unwrap().var.as_tensor().clone();
        for name in ["w", "b"] {
            set(name, &fx[&format!("start.{name}")]);
        }
        for t in 1..=4usize {
            let start = super::model_snapshot(&rt).unwrap();
            // The task trains the bias; then LoRA's delta (alpha / r) B A is merged in full.
            set("b", &fx[&format!("trained{t}.b")]);
            let delta = fx[&format!("trained{t}.B")].matmul(&fx[&format!("trained{t}.A")]).unwrap();
            set("w", &(value("w") + (delta * 2.0).unwrap()).unwrap());
            super::average_with_start(&rt, &start, adapter.merge_coefficient_for(t - 1)).unwrap();
            for name in ["w", "b"] {
                let want = &fx[&format!("after{t}.{name}")];
                let diff = (value(name) - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
                assert!(diff < 1e-12, "task {t}, {name}: off by {diff:e}");
            }
        }
    }
}
