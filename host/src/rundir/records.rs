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
/// Named tensors (an optimizer's moments).
pub type Tensors = std::collections::HashMap<String, candle_core::Tensor>;
/// The record of the last mid-task checkpoint, under `checkpoints/`.
const STEP_FILE: &str = "step.json";

/// What a checkpoint holds beside the parameters: each strategy's own state (in order) and
/// the replay memory, as bytes.
#[derive(Default)]
pub struct States {
    pub strategies: Vec<Vec<u8>>,
    pub replay: Option<Vec<u8>>,
}

impl States {
    /// `strategy-I.bin` for each strategy, `replay.json` for the memory, each named by `path`.
    fn write(&self, path: impl Fn(&str) -> PathBuf) -> anyhow::Result<()> {
        for (i, state) in self.strategies.iter().enumerate() {
            write_atomic(&path(&format!("strategy-{i}.bin")), state)?;
        }
        if let Some(memory) = &self.replay {
            write_atomic(&path("replay.json"), memory)?;
        }
        Ok(())
    }

    fn read((strategies, replay): (usize, bool), path: impl Fn(&str) -> PathBuf) -> anyhow::Result<Self> {
        let read = |what: &str, kind: &str| {
            let f = path(what);
            std::fs::read(&f).with_context(|| format!("cannot read the {kind} {}", f.display()))
        };
        Ok(States {
            strategies: (0..strategies)
                .map(|i| read(&format!("strategy-{i}.bin"), "strategy state"))
                .collect::<anyhow::Result<_>>()?,
            replay: if replay { Some(read("replay.json", "replay memory")?) } else { None },
        })
    }
}

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
        method: &str,
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
            record.insert("method".into(), method.into());
            record.insert("seed".into(), seed.into());
            record.insert("host".into(), crate::runtime::host_info());
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

    /// plugins.json: every plugin library the registry found (name, kind, version, SDK, the
    /// library's absolute path and SHA-256) and the `recall` binary that ran them (its path
    /// and SHA-256), so a result names the exact code behind it.
    pub fn write_plugins(&self, registry: &crate::loader::Registry) -> anyhow::Result<()> {
        let file = |path: &Path| -> anyhow::Result<(String, String)> {
            let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            Ok((absolute.display().to_string(), crate::identity::file_sha256(path)?))
        };
        let mut plugins = Vec::new();
        for p in &registry.plugins {
            let (path, sha256) = file(&p.path)?;
            plugins.push(serde_json::json!({
                "name": p.name, "kind": p.kind, "version": p.version, "sdk": p.sdk_version,
                "path": path, "sha256": sha256,
            }));
        }
        let exe = std::env::current_exe().context("cannot find the running recall binary")?;
        let (path, sha256) = file(&exe)?;
        let record = serde_json::json!({
            "recall": {"path": path, "sha256": sha256, "version": env!("CARGO_PKG_VERSION"), "git_commit": env!("RECALL_GIT_COMMIT")},
            "plugins": plugins,
        });
        write_atomic(&self.path.join("plugins.json"), serde_json::to_string_pretty(&record)?.as_bytes())
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

    /// The checkpoint after `task` tasks: every parameter, then each strategy's own state and
    /// the replay memory.
    pub fn save_checkpoint(
        &self,
        task: usize,
        params: &crate::runtime::params::ParamStore,
        states: &States,
    ) -> anyhow::Result<()> {
        params.save(&self.checkpoint_path(task, "safetensors"))?;
        states.write(|what| self.checkpoint_path(task, what))
    }

    /// Load the parameters of the checkpoint after `task` tasks and return its saved states:
    /// those of the first `shape.0` strategies, and the replay memory when `shape.1`.
    pub fn load_checkpoint(
        &self,
        task: usize,
        params: &crate::runtime::params::ParamStore,
        shape: (usize, bool),
    ) -> anyhow::Result<States> {
        params.load(&self.checkpoint_path(task, "safetensors"))?;
        States::read(shape, |what| self.checkpoint_path(task, what))
    }

    /// A mid-task checkpoint at global step `step`: the parameters, the optimizer's state, the
    /// strategies' states and the replay memory, then `record` (the position in the task) in
    /// `checkpoints/step.json`, written last: it names only complete checkpoints. Older step
    /// checkpoints go after it.
    pub fn save_step_checkpoint(
        &self,
        step: usize,
        params: &crate::runtime::params::ParamStore,
        optimizer: &Tensors,
        states: &States,
        record: &impl Serialize,
    ) -> anyhow::Result<()> {
        let name = |what: &str| self.path.join("checkpoints").join(format!("step-{step:08}.{what}"));
        params.save(&name("safetensors"))?;
        crate::fsutil::write_atomic_with(&name("optimizer.safetensors"), |tmp| {
            candle_core::safetensors::save(optimizer, tmp).map_err(Into::into)
        })?;
        states.write(name)?;
        write_atomic(&self.path.join("checkpoints").join(STEP_FILE), serde_json::to_string(record)?.as_bytes())?;
        self.remove_step_checkpoints(Some(step))
    }

    /// The record of the last mid-task checkpoint, if there is one.
    pub fn read_step_checkpoint<P: DeserializeOwned>(&self) -> anyhow::Result<Option<P>> {
        let file = self.path.join("checkpoints").join(STEP_FILE);
        match std::fs::read_to_string(&file) {
            Ok(text) => Ok(Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a step checkpoint record", file.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", file.display())),
        }
    }

    /// Load the parameters of the step checkpoint at `step`; returns its optimizer state and
    /// its saved states (of the first `shape.0` strategies, the replay memory when `shape.1`).
    pub fn load_step_checkpoint(
        &self,
        step: usize,
        params: &crate::runtime::params::ParamStore,
        shape: (usize, bool),
    ) -> anyhow::Result<(Tensors, States)> {
        let name = |what: &str| self.path.join("checkpoints").join(format!("step-{step:08}.{what}"));
        params.load(&name("safetensors"))?;
        let opt = name("optimizer.safetensors");
        let optimizer = candle_core::safetensors::load(&opt, &candle_core::Device::Cpu)
            .with_context(|| format!("cannot read the optimizer state {}", opt.display()))?;
        Ok((optimizer, States::read(shape, name)?))
    }

    /// Remove the step checkpoints (all, or all but the one at `keep`; with `None` the
    /// record first, so no record names a removed file).
    pub fn remove_step_checkpoints(&self, keep: Option<usize>) -> anyhow::Result<()> {
        let dir = self.path.join("checkpoints");
        if keep.is_none() {
            match std::fs::remove_file(dir.join(STEP_FILE)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot remove {}", dir.join(STEP_FILE).display()))
                }
                _ => {}
            }
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(()) };
        let kept = keep.map(|s| format!("step-{s:08}."));
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("step-") && kept.as_ref().is_none_or(|k| !name.starts_with(k.as_str())) {
                std::fs::remove_file(e.path()).with_context(|| format!("cannot remove {}", e.path().display()))?;
            }
        }
        Ok(())
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
