//! Mid-task checkpoints: where a task stood after a step, so `--resume` continues from it
//! with the numbers an unbroken run gives. The parameters, the optimizer's moments and each
//! strategy's state are files of the run directory (`RunDir::save_step_checkpoint`); this
//! is the position that goes with them, and the schedule that decides when to write one.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Sums over one epoch's steps.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct EpochTotals {
    pub loss: f64,
    pub steps: usize,
    pub terms: BTreeMap<String, f64>,
}

impl EpochTotals {
    pub fn add(&mut self, stats: super::StepStats) {
        self.loss += stats.loss;
        self.steps += 1;
        for (name, v) in stats.terms {
            *self.terms.entry(name).or_default() += v;
        }
    }

    /// The epoch's mean loss and mean loss terms.
    pub fn means(self) -> (f64, BTreeMap<String, f64>) {
        let n = self.steps.max(1) as f64;
        (self.loss / n, self.terms.into_iter().map(|(k, v)| (k, v / n)).collect())
    }
}

/// A task's position after a step: enough, with the checkpoint's files, to continue it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct TaskPosition {
    /// The task in progress (0-based).
    pub task: usize,
    pub epoch: usize,
    /// Steps done in the epoch (its next planned batch is this one).
    pub step_in_epoch: usize,
    pub step_in_task: usize,
    pub global_step: usize,
    /// AdamW's step count (its bias correction).
    pub optimizer_step: usize,
    /// Mean loss and loss terms of the task's finished epochs, and the sums of this one.
    pub losses: Vec<f64>,
    pub terms: Vec<BTreeMap<String, f64>>,
    pub totals: EpochTotals,
    /// Throughput counters of the run, and the task's training time so far.
    pub step_seconds: f64,
    pub images_seen: usize,
    pub task_seconds: f64,
    /// The task's validation scores so far (`[train] eval_every_epochs`).
    #[serde(default)]
    pub validation: Vec<ValidationRecord>,
}

/// The evaluators' scores on a task's validation split after one of its epochs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ValidationRecord {
    /// The task (0-based) and the epochs it had trained (1-based: after its first is 1).
    pub task: usize,
    pub epoch: usize,
    /// Steps the run had taken.
    pub step: usize,
    pub metrics: BTreeMap<String, f64>,
}

/// `[train] checkpoint_every_steps` / `checkpoint_every_minutes`.
pub(crate) struct CheckpointSchedule {
    every_steps: Option<usize>,
    every: Option<Duration>,
    last: Instant,
}

impl CheckpointSchedule {
    pub fn new(train: &crate::config::TrainSection) -> Self {
        CheckpointSchedule {
            every_steps: train.checkpoint_every_steps,
            every: train.checkpoint_every_minutes.map(|m| Duration::from_secs_f64(m * 60.0)),
            last: Instant::now(),
        }
    }

    /// Whether a checkpoint is due after `step_in_task` steps (counting from 1).
    pub fn due(&mut self, step_in_task: usize) -> bool {
        let by_steps = self.every_steps.is_some_and(|n| step_in_task.is_multiple_of(n));
        let by_time = self.every.is_some_and(|d| self.last.elapsed() >= d);
        if by_steps || by_time {
            self.last = Instant::now();
        }
        by_steps || by_time
    }
}
