//! What the engine keeps in its run directory: which directory a run owns, the progress
//! record a resume continues from, and the lines of metrics.jsonl. `crate::rundir::RunDir`
//! writes them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ResultMatrix, RunOptions};
use crate::data::TaskData;

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
        None => claim(&new_run_dir(&e.output_dir, &file_name_of(&e.method_key()), e.seed)?, Claim::Fresh),
    }
}

/// A method key as a file name: characters other than letters, digits, `.`, `_`, `-` and
/// `=` become `_`.
pub fn file_name_of(key: &str) -> String {
    key.chars().map(|c| if c.is_ascii_alphanumeric() || "._-=".contains(c) { c } else { '_' }).collect()
}

/// A fresh run directory `output_dir/METHOD-seedS-N` (N counts up).
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

/// What a run directory holds about finished tasks: enough to continue after a kill.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct Progress {
    pub finished_tasks: usize,
    pub global_step: usize,
    pub train_seconds: f64,
    /// Time in training steps proper and the images they saw (throughput).
    #[serde(default)]
    pub step_seconds: f64,
    #[serde(default)]
    pub images_seen: usize,
    pub epoch_losses: Vec<Vec<f64>>,
    pub epoch_terms: Vec<Vec<BTreeMap<String, f64>>>,
    pub results: ResultMatrix,
    pub heldout: ResultMatrix,
    /// Validation scores inside the finished tasks, in order.
    #[serde(default)]
    pub validation: Vec<super::midtask::ValidationRecord>,
    /// Every task's validation split after each stage, as `results` holds the test splits
    /// (an empty cell for a task without one); no rows when no task has one.
    #[serde(default)]
    pub validation_results: ResultMatrix,
}

impl Progress {
    /// A run that has finished nothing yet.
    pub fn new(tasks: &[TaskData], heldout: &[TaskData]) -> Self {
        let empty =
            |sets: &[TaskData]| ResultMatrix { tasks: sets.iter().map(|t| t.name.clone()).collect(), rows: Vec::new() };
        let validation_results = match tasks.iter().any(|t| !t.val.is_empty()) {
            true => empty(tasks),
            false => ResultMatrix::default(),
        };
        Progress { results: empty(tasks), heldout: empty(heldout), validation_results, ..Default::default() }
    }

    /// The tracking event of one stage's scores.
    pub fn stage_event(&self, stage: usize) -> crate::tracking::Event {
        let mut metrics = Vec::new();
        for (suite, m) in [("", &self.results), ("zeroshot/", &self.heldout), ("val/", &self.validation_results)] {
            if let Some(row) = m.rows.get(stage) {
                for (i, cell) in row.iter().enumerate() {
                    for (k, v) in cell {
                        // What a random ranking scores sits apart from the scores.
                        let name = match k.strip_suffix("_chance") {
                            Some(base) => format!("chance/{suite}{}/{base}", m.tasks[i]),
                            None => format!("{suite}{}/{k}", m.tasks[i]),
                        };
                        metrics.push((name, *v, stage as u64));
                    }
                }
            }
        }
        crate::tracking::Event::Metrics { metrics, time_ms: crate::tracking::now_ms() }
    }
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

/// metrics.jsonl: one line per (stage, suite, set, metric); the suites are `tasks` (the test
/// splits), `zeroshot` and `val` (the tasks' validation splits).
pub(crate) fn metrics_lines(p: &Progress) -> anyhow::Result<String> {
    let mut out = String::new();
    for (suite, m) in [("tasks", &p.results), ("zeroshot", &p.heldout), ("val", &p.validation_results)] {
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
            validation: Vec::new(),
            validation_results: ResultMatrix::default(),
        };
        let back: Progress = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.epoch_losses[0]), bits(&values));
        assert_eq!(back.step_seconds.to_bits(), values[2].to_bits());
    }
}
