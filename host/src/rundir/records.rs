//! What a run directory holds, file by file. `RunDir` is the only writer of a run's results:
//! the engine and the reconstruction loop hand it values, it names the files and writes each
//! one atomically (a temporary renamed into place), so a killed run leaves every file either
//! as it was or complete.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::RunDir;
use crate::fsutil::write_atomic;

/// The progress file's name: the finished tasks and their scores, enough to resume.
pub const PROGRESS_FILE: &str = "progress.json";
/// Where each stage's scores are listed one per line.
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
const R_MATRIX_DIR: &str = "r_matrix";

impl RunDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The run's log file (written by `crate::runlog`, not through here: it is a stream).
    pub fn log_file(&self) -> PathBuf {
        self.path.join("log.txt")
    }

    /// run.json: which build ran (version, git commit), with which seed and command line,
    /// when; each resume is appended with the config changes it was allowed.
    pub fn record_provenance(
        &self,
        seed: u64,
        resume: bool,
        config_changes: &[crate::identity::Change],
    ) -> anyhow::Result<()> {
        let f = self.path.join("run.json");
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

    /// config.identity.json: what a resume must find unchanged.
    pub fn write_identity(&self, identity: &crate::identity::Identity) -> anyhow::Result<()> {
        write_atomic(&self.path.join(crate::identity::FILE), serde_json::to_string_pretty(identity)?.as_bytes())
    }

    /// config.resolved.toml: the experiment as it ran, every default filled in. No
    /// credentials on disk: a tracking URI's password is redacted.
    pub fn write_config(&self, config: &crate::config::ExperimentConfig) -> anyhow::Result<()> {
        let resolved = crate::tracking::redact(&toml::to_string(config)?);
        write_atomic(&self.path.join("config.resolved.toml"), resolved.as_bytes())
    }

    /// plugins.json: every plugin library the registry found, with its version and SDK.
    pub fn write_plugins(&self, registry: &crate::loader::Registry) -> anyhow::Result<()> {
        let plugins: Vec<serde_json::Value> = registry
            .plugins
            .iter()
            .map(|p| {
                serde_json::json!({"name": p.name, "kind": p.kind, "version": p.version, "sdk": p.sdk_version, "path": p.path})
            })
            .collect();
        write_atomic(&self.path.join("plugins.json"), serde_json::to_string_pretty(&plugins)?.as_bytes())
    }

    /// splits.json: which examples each task and zero-shot set trained and tested on.
    pub fn write_splits(
        &self,
        tasks: &[crate::data::TaskData],
        zeroshot: &[crate::data::TaskData],
    ) -> anyhow::Result<()> {
        let splits = serde_json::json!({
            "tasks": crate::data::source::split_record(tasks),
            "zeroshot": crate::data::source::split_record(zeroshot),
        });
        write_atomic(&self.path.join("splits.json"), serde_json::to_string(&splits)?.as_bytes())
    }

    /// `checkpoints/task-NN.WHAT`: the state after `task` tasks.
    pub fn checkpoint_path(&self, task: usize, what: &str) -> PathBuf {
        self.path.join("checkpoints").join(format!("task-{task:02}.{what}"))
    }

    /// The checkpoint after `task` tasks: every parameter, then each strategy's own state.
    pub fn save_checkpoint(
        &self,
        task: usize,
        params: &crate::runtime::params::ParamStore,
        strategy_states: &[Vec<u8>],
    ) -> anyhow::Result<()> {
        params.save(&self.checkpoint_path(task, "safetensors"))?;
        for (i, state) in strategy_states.iter().enumerate() {
            write_atomic(&self.checkpoint_path(task, &format!("strategy-{i}.bin")), state)?;
        }
        Ok(())
    }

    /// Load the parameters of the checkpoint after `task` tasks and return the saved states
    /// of its first `strategies` strategies.
    pub fn load_checkpoint(
        &self,
        task: usize,
        params: &crate::runtime::params::ParamStore,
        strategies: usize,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        params.load(&self.checkpoint_path(task, "safetensors"))?;
        (0..strategies)
            .map(|i| {
                let f = self.checkpoint_path(task, &format!("strategy-{i}.bin"));
                std::fs::read(&f).with_context(|| format!("cannot read strategy state {}", f.display()))
            })
            .collect()
    }

    /// The progress the directory records, if it has any.
    pub fn read_progress<P: DeserializeOwned>(&self) -> anyhow::Result<Option<P>> {
        let file = self.path.join(PROGRESS_FILE);
        if !file.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let p =
            serde_json::from_str(&text).with_context(|| format!("{} is not a Recall progress file", file.display()))?;
        Ok(Some(p))
    }

    pub fn write_progress(&self, progress: &impl Serialize) -> anyhow::Result<()> {
        write_atomic(&self.path.join(PROGRESS_FILE), serde_json::to_string(progress)?.as_bytes())
    }

    /// metrics.jsonl, rewritten whole after each stage.
    pub fn write_metrics(&self, lines: &str) -> anyhow::Result<()> {
        write_atomic(&self.path.join(METRICS_FILE), lines.as_bytes())
    }

    /// `r_matrix/NAME.csv`, one per metric.
    pub fn write_r_matrix(&self, name: &str, csv: &str) -> anyhow::Result<()> {
        write_atomic(&self.path.join(R_MATRIX_DIR).join(format!("{name}.csv")), csv.as_bytes())
    }

    /// The R-matrix files written so far, as paths relative to the run directory, sorted.
    pub fn r_matrix_files(&self) -> anyhow::Result<Vec<String>> {
        let dir = self.path.join(R_MATRIX_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
        let mut files: Vec<String> = entries
            .map(|e| Ok(format!("{R_MATRIX_DIR}/{}", e?.file_name().to_string_lossy())))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("cannot list {}", dir.display()))?;
        files.sort();
        Ok(files)
    }

    /// summary.json: the finished run. Written last; its presence marks the run finished.
    pub fn write_summary(&self, summary: &impl Serialize) -> anyhow::Result<()> {
        write_atomic(&self.path.join(SUMMARY_FILE), serde_json::to_string_pretty(summary)?.as_bytes())
    }
}
