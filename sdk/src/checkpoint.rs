//! Reading external checkpoints into a plugin's parameters.
//!
//! [`CheckpointReader`] lists a safetensors file through the host, hands out tensors by name
//! with their shapes checked, and keeps every problem (missing, mis-shaped, unexpected names)
//! so that [`CheckpointReader::finish`] reports all of them at once rather than the first.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::tensor::{Host, Tensor};

/// A checkpoint file being mapped onto a plugin's parameters.
pub struct CheckpointReader {
    host: Host,
    path: String,
    entries: BTreeMap<String, Vec<usize>>,
    used: BTreeSet<String>,
    problems: Vec<String>,
}

impl CheckpointReader {
    pub fn open(host: &Host, path: &str) -> Result<Self> {
        let entries = host.checkpoint_index(path)?.into_iter().collect();
        Ok(CheckpointReader {
            host: *host,
            path: path.to_string(),
            entries,
            used: BTreeSet::new(),
            problems: Vec::new(),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the file has a tensor called `name`.
    pub fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(Vec::as_slice)
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Tensor `name`, which must have `shape` (a scalar may stand for a one-element shape).
    /// A missing or mis-shaped tensor is recorded and `None` returned.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(found) = self.entries.get(name) else {
            self.problems.push(format!("missing: {name} {shape:?}"));
            return Ok(None);
        };
        self.used.insert(name.to_string());
        let numel = |s: &[usize]| s.iter().product::<usize>();
        // A scalar and a one-element tensor stand for each other (e.g. `logit_scale`).
        let fits = found.as_slice() == shape || (numel(found) == 1 && numel(shape) == 1);
        if !fits {
            self.problems.push(format!("mis-shaped: {name} is {found:?} in the file, expected {shape:?}"));
            return Ok(None);
        }
        let t = self.host.checkpoint_tensor(&self.path, name)?;
        if found.as_slice() != shape {
            let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            return t.reshape(&dims).map(Some);
        }
        Ok(Some(t))
    }

    /// Mark names as consumed without loading them (buffers such as `position_ids`).
    pub fn skip(&mut self, name: &str) {
        if self.entries.contains_key(name) {
            self.used.insert(name.to_string());
        }
    }

    /// Record a problem found by the caller (e.g. an inconsistent config).
    pub fn problem(&mut self, message: impl Into<String>) {
        self.problems.push(message.into());
    }

    /// Fail with every problem, including names under `prefixes` that nothing consumed.
    pub fn finish(self, prefixes: &[&str]) -> Result<()> {
        let mut problems = self.problems;
        for (name, shape) in &self.entries {
            if !self.used.contains(name) && prefixes.iter().any(|p| name.starts_with(p)) {
                problems.push(format!("unexpected: {name} {shape:?}"));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        problems.sort();
        Err(Error::new(format!(
            "checkpoint {} does not fit the model ({} problems):\n  {}",
            self.path,
            problems.len(),
            problems.join("\n  ")
        )))
    }
}
