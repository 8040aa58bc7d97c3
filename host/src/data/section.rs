//! A data section of an experiment (`[[task]]`, `[[zeroshot]]`, `[reference]`): where a
//! set's examples come from and how they are split. It lives with the data, which is what it
//! configures; the experiment schema embeds it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One task of the sequence, or one held-out zero-shot set: a name and where its data comes
/// from. `source = "shapes"` is the embedded generator (no download); the others read
/// image-text data from disk (see `data::source`).
#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    pub name: String,
    /// `shapes`, `jsonl`, `csv`, `folders` or `karpathy`.
    #[serde(default = "d::source")]
    pub source: String,
    /// The data: a file or a directory; `dataset:NAME` names a dataset `recall data prepare`
    /// made, `asset:NAME/...` a fetched asset. Relative paths are relative to the experiment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Where image paths in a CSV/JSONL/Karpathy file are relative to (default: the file's
    /// directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<PathBuf>,
    /// Fraction of the examples held out for testing when the data has no split of its own.
    #[serde(default = "d::test_fraction")]
    pub test_fraction: f64,
    /// Seed of that split and of subsampling; independent of the experiment's seed so every
    /// seed of a sweep sees the same test set.
    #[serde(default)]
    pub split_seed: u64,
    /// Keep at most this many training / test examples (a seeded subsample).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_train: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_test: Option<usize>,
    /// Keep only examples of these classes / categories (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// Caption templates for class-labelled data (`{}` or `{class}` is the class name): the
    /// captions of class folders and the prompts of zero-shot classification. Default: the
    /// dataset's own (dataset.json), else "a photo of a {}.".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<String>,
    /// A missing or undecodable image: `fail` (default) stops with the file's name; `skip`
    /// counts it, records it in the run directory and goes on.
    #[serde(default = "d::on_error")]
    pub on_error: OnError,
    // ---- the shapes generator ----
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shapes: Vec<String>,
    #[serde(default = "d::colors")]
    pub colors: Vec<String>,
    /// `filled` or `outline`.
    #[serde(default = "d::style")]
    pub style: String,
    /// Training images per (color, shape, position) combination.
    #[serde(default = "d::train_per_combo")]
    pub train_per_combo: usize,
    /// A task made of several sources (e.g. a pretraining mix): each part is a data section
    /// of its own; their splits are concatenated. The task's own source is then unused.
    #[serde(default, rename = "part", skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<TaskSection>,
}

/// What to do with an image that cannot be read.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    Fail,
    Skip,
}

mod d {
    pub fn source() -> String {
        "shapes".into()
    }
    pub fn colors() -> Vec<String> {
        ["red", "green", "blue", "yellow", "magenta", "cyan"].map(String::from).to_vec()
    }
    pub fn style() -> String {
        "filled".into()
    }
    pub fn train_per_combo() -> usize {
        6
    }
    pub fn test_fraction() -> f64 {
        0.2
    }
    pub fn on_error() -> super::OnError {
        super::OnError::Fail
    }
}
