//! The run directory's files as the engine writes them: which directory a run owns, its
//! provenance record, checkpoint names and metrics.jsonl.

use std::path::{Path, PathBuf};

use anyhow::Context;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ResultMatrix, RunOptions};
use crate::data::TaskData;
use crate::fsutil::write_atomic;

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
}

/// The progress file's name in a run directory.
pub(crate) const PROGRESS_FILE: &str = "progress.json";

impl Progress {
    /// A run that has finished nothing yet.
    pub fn new(tasks: &[TaskData], heldout: &[TaskData]) -> Self {
        let empty =
            |sets: &[TaskData]| ResultMatrix { tasks: sets.iter().map(|t| t.name.clone()).collect(), rows: Vec::new() };
        Progress { results: empty(tasks), heldout: empty(heldout), ..Default::default() }
    }

    /// The progress a run directory records, if it has any.
    pub fn read(run_dir: &Path) -> anyhow::Result<Option<Self>> {
        let file = run_dir.join(PROGRESS_FILE);
        if !file.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let p =
            serde_json::from_str(&text).with_context(|| format!("{} is not a Recall progress file", file.display()))?;
        Ok(Some(p))
    }

    pub fn write(&self, run_dir: &Path) -> anyhow::Result<()> {
        write_atomic(&run_dir.join(PROGRESS_FILE), serde_json::to_string(self)?.as_bytes())
    }

    /// The tracking event of one stage's scores.
    pub fn stage_event(&self, stage: usize) -> crate::tracking::Event {
        let mut metrics = Vec::new();
        for (suite, m) in [("", &self.results), ("zeroshot/", &self.heldout)] {
            if let Some(row) = m.rows.get(stage) {
                for (i, cell) in row.iter().enumerate() {
                    for (k, v) in cell {
                        metrics.push((format!("{suite}{}/{k}", m.tasks[i]), *v, stage as u64));
                    }
                }
            }
        }
        crate::tracking::Event::Metrics { metrics, time_ms: crate::tracking::now_ms() }
    }
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

#[derive(Serialize)]
struct MetricRecord<'a> {
    stage: usize,
    trained_tasks: usize,
    suite: &'a str,
    eval_task: &'a str,
    metric: &'a str,
    value: f64,
}

/// metrics.jsonl: one line per (stage, suite, set, metric).
pub(crate) fn metrics_lines(results: &ResultMatrix, heldout: &ResultMatrix) -> anyhow::Result<String> {
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
