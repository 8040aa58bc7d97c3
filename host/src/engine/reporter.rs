//! Everything a run tells the outside world, in one place: the terminal (progress bars, the
//! table after each stage, the summary) and tracking (the event log, always, and the
//! `[tracking]` backend). The engine's phases say what happened; the reporter decides how it
//! is shown and recorded, so a new sink (a per-step metric, a dashboard) changes one file.

use std::path::Path;

use indicatif::ProgressBar;

use super::store::Progress;
use super::summary;
use super::telemetry::{StepRecord, Window};
use super::terminal::{format_heldout, format_table, progress};
use super::{RunSummary, Session};
use crate::tracking::{now_ms, Event, Tracking};

pub(crate) struct Reporter {
    quiet: bool,
    tracking: Tracking,
    /// Training telemetry since its last record, and the task it belongs to (the progress
    /// bar's label) with its number of epochs.
    window: Window,
    task: (String, usize),
    /// Each optimizer group's lr before the schedule (`train/lr`, `train/lr/groupN`).
    base_lrs: Vec<(String, f64)>,
    /// The metrics shown in the terminal tables (R@1, R@5, mean recall).
    shown: Vec<String>,
    /// Whether the run has held-out zero-shot sets (their table follows each stage's).
    heldout: bool,
}

impl Reporter {
    /// Open the event log (and the `[tracking]` backend) of `run_dir`; a fresh run logs its
    /// start with the config's parameters and the run's tags.
    pub fn open(session: &Session, run_dir: &Path, quiet: bool) -> anyhow::Result<Self> {
        let (cfg, c) = (session.cfg, &session.cfg.config);
        let section = crate::tracking::TrackingSection::effective(c.tracking.as_ref());
        let mut tracking =
            Tracking::open(run_dir, section.as_ref()).map_err(|e| cfg.error_at("tracking", format!("{e:#}")))?;
        let experiment = tracking_experiment(c);
        let where_to = match &section {
            Some(t) => t.describe(&experiment),
            None => {
                format!("the run directory's event log only ({} unset, no [tracking])", crate::tracking::MLFLOW_URI_VAR)
            }
        };
        tracing::info!("tracking: {where_to}");
        if !quiet {
            println!("tracking: {where_to}");
        }
        if !tracking.is_started() {
            tracking.log(start_event(session, run_dir)?)?;
        }
        Ok(Reporter {
            quiet,
            tracking,
            window: Window::default(),
            task: (String::new(), 0),
            base_lrs: c.optimizer.lrs_at(1.0),
            shown: Vec::new(),
            heldout: !session.heldout_sets.is_empty(),
        })
    }

    /// A progress bar of `len` units, hidden when quiet or not on a terminal.
    pub fn bar(&self, len: usize, label: String, unit: &str) -> ProgressBar {
        progress(self.quiet, len as u64, label, unit)
    }

    /// A task's training starts (or continues after a resume): `label` names it on the bar.
    pub fn begin_task(&mut self, label: String, epochs: usize) {
        self.window = Window::default();
        self.task = (label, epochs);
    }

    /// A step was taken: added to the telemetry window, which every `every` steps is recorded
    /// (event log, tracker, log.txt) and shown on the bar with the epoch and running loss.
    pub fn step_done(&mut self, r: StepRecord, every: usize, epoch: usize, bar: &ProgressBar) -> anyhow::Result<()> {
        let steps_done = r.steps_done;
        let record = self.window.add(r, every, &self.base_lrs);
        let loss = match &record {
            Some(m) => m.first().map(|(_, v, _)| *v),
            None => self.window.running_loss(),
        };
        if let Some(loss) = loss {
            let (label, epochs) = &self.task;
            bar.set_message(format!("{label} · epoch {}/{epochs} · loss {loss:.4}", epoch + 1));
        }
        if let Some(metrics) = record {
            self.record_train(steps_done, metrics)?;
        }
        Ok(())
    }

    /// The task's last steps, if the window holds any, are recorded.
    pub fn end_task_training(&mut self) -> anyhow::Result<()> {
        match self.window.take(&self.base_lrs) {
            Some(metrics) => {
                let steps_done = metrics.first().map_or(0, |(_, _, s)| *s as usize);
                self.record_train(steps_done, metrics)
            }
            None => Ok(()),
        }
    }

    fn record_train(&mut self, steps_done: usize, metrics: Vec<(String, f64, u64)>) -> anyhow::Result<()> {
        let text: Vec<String> = metrics.iter().map(|(k, v, _)| format!("{}={v:.5}", &k["train/".len()..])).collect();
        tracing::info!(step = steps_done, "train: {}", text.join(" "));
        self.tracking.record(Event::Metrics { metrics, time_ms: now_ms() })
    }

    /// A task's validation scores: recorded as `val/TASK/METRIC` at the global step, shown.
    pub fn validation(&mut self, task: &str, r: &super::midtask::ValidationRecord) -> anyhow::Result<()> {
        let metrics: Vec<(String, f64, u64)> =
            r.metrics.iter().map(|(k, v)| (format!("val/{task}/{k}"), *v, r.step as u64)).collect();
        let shown: Vec<String> = super::terminal::ordered_columns(r.metrics.keys().cloned().collect())
            .into_iter()
            .filter(|k| !k.ends_with("_chance"))
            .map(|k| format!("{}={:.2}", k.rsplit('/').next().unwrap_or(&k), r.metrics[&k]))
            .collect();
        tracing::info!(task, epoch = r.epoch, step = r.step, "validation: {}", shown.join(" "));
        if !self.quiet {
            println!("  validation of `{task}` after epoch {}: {}", r.epoch, shown.join(" "));
        }
        self.tracking.record(Event::Metrics { metrics, time_ms: now_ms() })
    }

    /// A resumed run: after its last finished task, or inside the next one at a step.
    pub fn resumed(&self, run_dir: &Path, finished: usize, tasks: usize, at_step: Option<usize>) {
        if self.quiet {
            return;
        }
        match at_step {
            Some(step) => println!("resuming {} at step {step} of task {} of {tasks}", run_dir.display(), finished + 1),
            None => println!("resuming {} after task {finished} of {tasks}", run_dir.display()),
        }
    }

    /// Once the initial model is scored: the stage events the log lacks (a run killed between
    /// its checkpoint and its event) are logged, the table's metrics chosen, and stage 0 shown
    /// unless the run resumed past it.
    pub fn initial_stage(&mut self, p: &Progress) -> anyhow::Result<()> {
        for stage in self.tracking.stages_logged()?..p.results.rows.len() {
            self.tracking.log(p.stage_event(stage))?;
        }
        // Every score in reading order (every configured K); chance levels stay in the files.
        self.shown = super::terminal::ordered_columns(
            p.results.metric_names().into_iter().filter(|m| !m.ends_with("_chance")).collect(),
        );
        if p.finished_tasks == 0 {
            self.print_stage(p, 0);
        }
        Ok(())
    }

    /// A task finished and its checkpoint is written: its scores are logged and shown.
    pub fn task_finished(&mut self, p: &Progress, t_idx: usize) -> anyhow::Result<()> {
        self.tracking.log(p.stage_event(t_idx + 1))?;
        self.print_stage(p, t_idx + 1);
        if !self.quiet {
            let line = |v: &mut dyn Iterator<Item = f64>| v.map(|l| format!("{l:.3}")).collect::<Vec<_>>().join(" ");
            println!("  loss per epoch: {}", line(&mut p.epoch_losses[t_idx].iter().copied()));
            // Each term of the loss (the task's `clip`, a strategy's), when there are several.
            let terms = p.epoch_terms.get(t_idx).map(Vec::as_slice).unwrap_or_default();
            let names: Vec<&String> = terms.first().map(|t| t.keys().collect()).unwrap_or_default();
            if names.len() > 1 {
                for name in names {
                    let values = &mut terms.iter().map(|t| t.get(name).copied().unwrap_or(f64::NAN));
                    println!("    {name:<12} {}", line(values));
                }
            }
        }
        Ok(())
    }

    fn print_stage(&self, p: &Progress, stage: usize) {
        if self.quiet {
            return;
        }
        print!("{}", format_table(&p.results, stage, &self.shown.iter().map(String::as_str).collect::<Vec<_>>()));
        if self.heldout {
            print!("{}", format_heldout(&p.heldout, stage));
        }
    }

    /// The run's summary: shown, and its final metrics, artifacts and end event tracked.
    pub fn finished(&mut self, s: &RunSummary, artifacts: Vec<String>) -> anyhow::Result<()> {
        if !self.quiet {
            summary::print(s, &self.shown);
        }
        self.tracking.record(Event::Metrics { metrics: summary::final_metrics(s), time_ms: now_ms() })?;
        for path in artifacts {
            self.tracking.record(Event::Artifact { path })?;
        }
        self.tracking.log(Event::End { status: "FINISHED".into(), time_ms: now_ms() })
    }
}

/// The first event of a run: its experiment, name, tags and parameters.
fn start_event(session: &Session, run_dir: &Path) -> anyhow::Result<Event> {
    let c = &session.cfg.config;
    let mut params = crate::tracking::config_params(&session.recorded.config)?;
    params.push(("trainable_parameters".into(), session.model.trainable_parameters().to_string()));
    let mut tags: Vec<(String, String)> = vec![
        ("method".into(), c.experiment.method_key()),
        ("seed".into(), c.experiment.seed.to_string()),
        ("git_commit".into(), env!("RECALL_GIT_COMMIT").into()),
        ("recall_version".into(), env!("CARGO_PKG_VERSION").into()),
        ("run_dir".into(), std::path::absolute(run_dir)?.display().to_string()),
        // MLflow's own system tags, as its clients set them.
        ("mlflow.source.git.commit".into(), env!("RECALL_GIT_COMMIT").into()),
        ("mlflow.source.name".into(), session.cfg.file.clone()),
        ("mlflow.source.type".into(), "LOCAL".into()),
        (
            "mlflow.user".into(),
            std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into()),
        ),
    ];
    if let Ok(parent) = std::env::var("RECALL_MLFLOW_PARENT_RUN_ID") {
        tags.push(("mlflow.parentRunId".into(), parent));
    }
    for (k, v) in c.tracking.iter().flat_map(|t| &t.tags) {
        tags.push((k.clone(), v.as_str().map(String::from).unwrap_or_else(|| v.to_string())));
    }
    let experiment = tracking_experiment(c);
    // A sweep's point is named by its label (its id is a hash); a run by its directory.
    let name = match std::env::var(crate::config::SWEEP_LABEL_VAR) {
        Ok(label) => format!("{label} seed{}", c.experiment.seed),
        Err(_) => run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    Ok(Event::Start { experiment, name, tags, params, time_ms: now_ms() })
}

/// The tracker's experiment: `[tracking] experiment`, the sweep's name, or the experiment's.
fn tracking_experiment(c: &crate::config::ExperimentConfig) -> String {
    c.tracking
        .as_ref()
        .and_then(|t| t.experiment.clone())
        .or_else(|| std::env::var("RECALL_SWEEP_NAME").ok())
        .unwrap_or_else(|| c.experiment.name.clone())
}
