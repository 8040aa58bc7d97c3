//! Run directories: `RunDir` owns one (this file) and writes its records (`records.rs`).
//!
//! Ownership: one process at a time writes a run, an existing run is never
//! overwritten by accident, and what a killed process left half-written is cleared.
//!
//! The lock is an advisory `flock` on `RUN_DIR/.lock`, held for the process's lifetime; the
//! kernel drops it when the process dies, so a killed run never leaves a stale lock behind.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

mod records;
pub use records::{States, METRICS_FILE, PROGRESS_FILE, SUMMARY_FILE};

/// What a run directory may hold that Recall wrote. `--overwrite` removes exactly these, so
/// a user's own files beside them (and a sweep's `stdout.txt` / `stderr.txt`) survive.
const RUN_FILES: &[&str] = &[
    "config.resolved.toml",
    "config.identity.json",
    "progress.json",
    "summary.json",
    "metrics.jsonl",
    "run.json",
    "plugins.json",
    "splits.json",
    "log.txt",
    "checkpoints",
    "r_matrix",
    "tracking",
];

/// Directories Recall writes files into atomically (and so may leave temporaries in).
const WRITTEN_DIRS: &[&str] = &["", "checkpoints", "r_matrix", "tracking"];

/// How a run may treat a directory that already holds a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Refuse a directory that holds a run.
    Fresh,
    /// Continue the run in it.
    Resume,
    /// Replace the run in it.
    Overwrite,
}

/// A run directory this process owns until it is dropped.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: File,
}

/// Whether `dir` holds a Recall run (finished or not).
pub fn holds_run(dir: &Path) -> bool {
    dir.join("config.resolved.toml").is_file() || dir.join("progress.json").is_file()
}

/// Take `dir` (created if needed) for a run: lock it, refuse or clear an existing run as
/// `claim` says, and remove temporaries a killed writer left.
pub fn claim(dir: &Path, claim: Claim) -> anyhow::Result<RunDir> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create run directory {}", dir.display()))?;
    let lock = lock(dir)?;
    if holds_run(dir) {
        match claim {
            Claim::Resume => {}
            Claim::Fresh => bail!(
                "{} already holds a run ({}); continue it with `recall run --resume {0}`, or replace it with \
                 --overwrite",
                dir.display(),
                describe(dir)
            ),
            Claim::Overwrite => {
                for name in RUN_FILES {
                    let p = dir.join(name);
                    let removed = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                    match removed {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(e).with_context(|| format!("--overwrite: cannot remove {}", p.display()))
                        }
                        _ => {}
                    }
                }
                tracing::warn!(run_dir = %dir.display(), "--overwrite: the previous run was removed");
            }
        }
    }
    remove_stale_temporaries(dir)?;
    Ok(RunDir { path: dir.to_path_buf(), _lock: lock })
}

/// Lock `dir/.lock` exclusively, writing this process's id into it for whoever is refused.
fn lock(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(".lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let who = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
            bail!(
                "another recall process{who} is writing {}; wait for it to finish or stop it, or choose another \
                 directory",
                dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    f.set_len(0)?;
    write!(f, "{}", std::process::id())?;
    Ok(f)
}

/// "2 of 3 tasks finished" or "finished".
fn describe(dir: &Path) -> String {
    if dir.join("summary.json").is_file() {
        return "finished".into();
    }
    let finished = std::fs::read_to_string(dir.join("progress.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["finished_tasks"].as_u64());
    match finished {
        Some(n) => format!("{n} task(s) finished"),
        None => "started, no task finished".into(),
    }
}

/// `.tmp-*` files of atomic writes a killed process never renamed: the lock guarantees no
/// writer is alive, so every one is garbage.
fn remove_stale_temporaries(dir: &Path) -> anyhow::Result<()> {
    for sub in WRITTEN_DIRS {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else { continue };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") && e.path().is_file() {
                std::fs::remove_file(e.path())
                    .with_context(|| format!("cannot remove the stale temporary {}", e.path().display()))?;
                tracing::info!(file = %e.path().display(), "removed a temporary a killed run left");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_run(dir: &Path) {
        std::fs::write(dir.join("config.resolved.toml"), "x").unwrap();
        std::fs::write(dir.join("progress.json"), r#"{"finished_tasks": 2}"#).unwrap();
        std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
        std::fs::write(dir.join("checkpoints").join(".tmp-abc"), "half").unwrap();
        std::fs::write(dir.join("notes.md"), "mine").unwrap();
    }

    #[test]
    fn an_existing_run_is_refused_unless_resumed_or_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        fake_run(&dir);
        let e = claim(&dir, Claim::Fresh).unwrap_err().to_string();
        assert!(e.contains("already holds a run (2 task(s) finished)") && e.contains("--resume"), "{e}");
        assert!(dir.join("checkpoints").join(".tmp-abc").exists(), "a refused claim changes nothing");

        let owned = claim(&dir, Claim::Resume).unwrap();
        assert!(!dir.join("checkpoints").join(".tmp-abc").exists(), "stale temporaries are removed");
        assert!(dir.join("progress.json").exists());
        drop(owned);

        let _owned = claim(&dir, Claim::Overwrite).unwrap();
        assert!(!holds_run(&dir) && !dir.join("checkpoints").exists());
        assert_eq!(std::fs::read_to_string(dir.join("notes.md")).unwrap(), "mine", "files Recall did not write stay");
    }

    #[test]
    fn a_locked_directory_is_refused_and_freed_when_its_owner_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let first = claim(tmp.path(), Claim::Fresh).unwrap();
        let e = claim(tmp.path(), Claim::Resume).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        claim(tmp.path(), Claim::Resume).unwrap();
    }
}
