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
    /// `shapes`, `jsonl`, `csv`, `folders`, `karpathy` or `webdataset`.
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
    /// Hold out this fraction of the training examples (0 < f < 1) as a validation split,
    /// chosen by `split_seed`: what `[train] eval_every_epochs` scores inside a task, and
    /// `recall compare --on val` compares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_fraction: Option<f64>,
    /// Training examples per epoch (default: the training split once). Fewer than the split
    /// end the epoch early; more make further passes, each ordered afresh. The schedule
    /// counts steps from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_epoch: Option<usize>,
    /// `webdataset` only: read the training shards in a shuffled order, each in file order,
    /// through a shuffle buffer of this many samples, as WebDataset and open_clip do (reads
    /// stay sequential within a shard: what network storage wants). Default: a uniform
    /// shuffle of every sample, as for the other sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shuffle_buffer: Option<usize>,
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

impl TaskSection {
    /// A section reading `source` data from `path` with every other key at its default (the
    /// command line's data commands); an unknown source is an error listing the known ones.
    pub fn for_source(
        name: &str,
        source: &str,
        path: Option<PathBuf>,
        images: Option<PathBuf>,
    ) -> Result<Self, String> {
        let mut t: TaskSection =
            toml::from_str(&format!("name = {}", toml::Value::from(name))).expect("a data section needs only its name");
        t.source = source.to_string();
        t.path = path;
        t.images = images;
        super::source::validate(&t).map_err(|(_, m)| m)?;
        if source == "shapes" {
            return Err("`shapes` is generated, not read from disk; name a source on disk".into());
        }
        Ok(t)
    }

    /// How its training split is ordered each epoch.
    pub fn epoch_order(&self) -> super::loader::EpochOrder {
        super::loader::EpochOrder { shuffle_buffer: self.shuffle_buffer, samples_per_epoch: self.samples_per_epoch }
    }
}

/// What to do with an image that cannot be read.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    Fail,
    Skip,
}

mod d {
    pub fn prefetch() -> usize {
        2
    }
    pub fn cache_budget_mb() -> u64 {
        256
    }
    pub fn crop_scale() -> [f64; 2] {
        [0.9, 1.0]
    }
    pub fn crop_ratio() -> [f64; 2] {
        [3.0 / 4.0, 4.0 / 3.0]
    }
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

/// `[data]`: how batches are made (the input pipeline) and how training images are
/// augmented.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Decode workers (default: the available cores). Results do not depend on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Ready batches queued ahead of the step.
    #[serde(default = "d::prefetch")]
    pub prefetch: usize,
    /// Keep small sets in memory as decoded bytes at the model's size: `auto` (sets that fit
    /// in `cache_budget_mb` together), `on` (every set) or `off`. Only images whose
    /// transform is deterministic are cached (evaluation, and training without
    /// augmentation), so caching never changes a result.
    #[serde(default)]
    pub cache: CacheMode,
    #[serde(default = "d::cache_budget_mb")]
    pub cache_budget_mb: u64,
    /// `random-resized-crop` (open_clip's training transform) or `resize-center-crop` (the
    /// evaluation transform, no augmentation).
    #[serde(default)]
    pub train_transform: TrainTransform,
    /// RandomResizedCrop's range of crop areas (fractions of the image) and aspect ratios.
    #[serde(default = "d::crop_scale")]
    pub crop_scale: [f64; 2],
    #[serde(default = "d::crop_ratio")]
    pub crop_ratio: [f64; 2],
    /// Colour jitter (brightness, contrast, saturation, hue) applied with
    /// `color_jitter_prob`, as open_clip's `color_jitter` augmentation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color_jitter: Option<[f64; 4]>,
    #[serde(default)]
    pub color_jitter_prob: f64,
    /// Grayscale with this probability.
    #[serde(default)]
    pub grayscale_prob: f64,
}

impl Default for DataSection {
    fn default() -> Self {
        toml::from_str("").expect("every [data] key has a default")
    }
}

/// See [`DataSection::cache`].
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    #[default]
    Auto,
    On,
    Off,
}

/// See [`DataSection::train_transform`].
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TrainTransform {
    #[default]
    RandomResizedCrop,
    ResizeCenterCrop,
}

impl DataSection {
    /// The transform of training images.
    pub fn train_transform(&self) -> super::transform::Transform {
        use super::transform::{Augment, Transform};
        match self.train_transform {
            TrainTransform::ResizeCenterCrop => Transform::Eval,
            TrainTransform::RandomResizedCrop => Transform::Train(Augment {
                crop_scale: (self.crop_scale[0], self.crop_scale[1]),
                crop_ratio: (self.crop_ratio[0], self.crop_ratio[1]),
                color_jitter: self.color_jitter,
                color_jitter_prob: self.color_jitter_prob,
                grayscale_prob: self.grayscale_prob,
            }),
        }
    }

    /// The number of decode workers.
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }

    /// Range checks, as (key, message) of the first key at fault.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        let [s0, s1] = self.crop_scale;
        let [r0, r1] = self.crop_ratio;
        if self.workers == Some(0) {
            return Err(("workers", "workers must be at least 1 (remove the key for one per core)".into()));
        }
        if self.prefetch == 0 {
            return Err(("prefetch", "prefetch must be at least 1 (ready batches queued ahead of the step)".into()));
        }
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 1.0) {
            return Err((
                "crop_scale",
                format!("crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, not [{s0}, {s1}]"),
            ));
        }
        if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
            return Err(("crop_ratio", format!("crop_ratio must be [lo, hi] with 0 < lo <= hi, not [{r0}, {r1}]")));
        }
        if let Some(j) = self.color_jitter {
            if j.iter().any(|v| !(v.is_finite() && *v >= 0.0)) || j[3] > 0.5 {
                return Err((
                    "color_jitter",
                    "color_jitter is [brightness, contrast, saturation, hue], each >= 0 and hue <= 0.5".into(),
                ));
            }
        }
        if !unit(self.color_jitter_prob) {
            return Err(("color_jitter_prob", "color_jitter_prob must be in [0, 1]".into()));
        }
        if self.color_jitter_prob > 0.0 && self.color_jitter.is_none() {
            return Err(("color_jitter_prob", "color_jitter_prob needs color_jitter = [b, c, s, h]".into()));
        }
        if !unit(self.grayscale_prob) {
            return Err(("grayscale_prob", "grayscale_prob must be in [0, 1]".into()));
        }
        Ok(())
    }
}
