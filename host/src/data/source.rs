//! Image-text data from disk: JSONL or CSV manifests, class folders with caption templates,
//! and COCO/Flickr Karpathy-style JSON. Every source becomes a list of [`Record`]s (an image
//! path, its captions, optionally a class and a category, optionally a split); records are
//! then filtered, split, subsampled by seed and decoded in parallel into [`Example`]s.
//!
//! The on-disk format `recall data prepare` writes is the JSONL one: a directory with
//! `train.jsonl`, `test.jsonl` and a `dataset.json` holding the class names, the caption
//! templates and the attribution.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::preprocess::Preprocess;
use super::{Example, TaskData};
use super::{OnError, TaskSection};

/// Sources that read from disk.
pub const SOURCES: [&str; 6] = ["shapes", "jsonl", "csv", "folders", "karpathy", "webdataset"];
/// The caption template used when neither the experiment nor the dataset gives one.
pub const DEFAULT_TEMPLATE: &str = "a photo of a {}.";

/// A data problem a user can fix; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}:{line}: {reason}")]
    Parse { path: String, line: usize, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    // The cause is in the message, so it is not also a `source` (which `{:#}` would print
    // a second time).
    #[error("task `{task}`: {cause}{hint}")]
    Image { task: String, cause: super::preprocess::ImageError, hint: &'static str },
}

/// A manifest's text: a UTF-8 byte-order mark is dropped; invalid UTF-8 is an error at its
/// line.
fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes =
        std::fs::read(path).map_err(|e| DataError::Read { path: path.display().to_string(), reason: e.to_string() })?;
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    match std::str::from_utf8(body) {
        Ok(text) => Ok(text.to_string()),
        Err(e) => {
            let valid = &body[..e.valid_up_to()];
            let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = valid.len() - valid.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
            Err(DataError::Parse {
                path: path.display().to_string(),
                line,
                reason: format!("invalid UTF-8 at column {column}; save the file as UTF-8"),
            })
        }
    }
}

/// An error for an empty caption at `line` (0: the file as a whole).
fn check_captions(path: &str, line: usize, captions: &[String]) -> Result<(), DataError> {
    match captions.iter().position(|c| c.trim().is_empty()) {
        None => Ok(()),
        Some(k) => Err(DataError::Parse {
            path: path.into(),
            line,
            reason: format!("caption {k} is empty; remove it or give it text"),
        }),
    }
}

/// One image and what is said about it, before decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub image: PathBuf,
    pub captions: Vec<String>,
    pub class: Option<String>,
    pub category: Option<String>,
    /// `train` or `test` when the data says so.
    pub split: Option<Split>,
    /// The image inside a WebDataset shard (then `image` is its `SHARD:MEMBER` label).
    pub member: Option<super::webdataset::ShardMember>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

/// `dataset.json`: what a prepared dataset says about itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetInfo {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Class names in label order.
    #[serde(default)]
    pub classes: Vec<String>,
    /// Caption/prompt templates (`{}` is the class name).
    #[serde(default)]
    pub templates: Vec<String>,
    /// Where the data came from and under which licence.
    #[serde(default)]
    pub attribution: String,
    #[serde(default)]
    pub train: usize,
    #[serde(default)]
    pub test: usize,
}

/// One line of a JSONL manifest.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonlLine {
    image: PathBuf,
    #[serde(default)]
    captions: Vec<String>,
    #[serde(default)]
    caption: Option<String>,
    #[serde(default)]
    class: Option<String>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    split: Option<String>,
}

fn parse_split(s: &str) -> Option<Option<Split>> {
    match s {
        "train" | "restval" => Some(Some(Split::Train)),
        "test" => Some(Some(Split::Test)),
        "val" | "validation" => Some(None),
        _ => None,
    }
}

/// Fill in `{}` / `{class}` of a template.
pub fn fill(template: &str, class: &str) -> String {
    template.replace("{class}", class).replace("{}", class)
}

/// Read a JSONL manifest; image paths are relative to `root`.
pub fn read_jsonl(path: &Path, root: &Path) -> Result<Vec<Record>, DataError> {
    let text = read_text(path)?;
    let p = path.display().to_string();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: JsonlLine = serde_json::from_str(line).map_err(|e| DataError::Parse {
            path: p.clone(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        let mut captions = l.captions;
        captions.extend(l.caption);
        check_captions(&p, i + 1, &captions)?;
        let split = match l.split.as_deref() {
            None => None,
            Some(s) => parse_split(s).ok_or_else(|| DataError::Parse {
                path: p.clone(),
                line: i + 1,
                reason: format!("unknown split `{s}`; expected train, test, val or restval"),
            })?,
        };
        if l.split.as_deref().is_some_and(|s| s.starts_with("val")) {
            continue;
        }
        out.push(Record {
            image: root.join(l.image),
            captions,
            class: l.class,
            category: l.category,
            split,
            member: None,
        });
    }
    Ok(out)
}

/// Read a CSV manifest with a header: `image` and `caption` columns (several rows per image
/// give several captions, in order), optional `class`, `category` and `split`.
pub fn read_csv(path: &Path, root: &Path) -> Result<Vec<Record>, DataError> {
    let p = path.display().to_string();
    let text = read_text(path)?;
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader.headers().map_err(|e| DataError::Parse { path: p.clone(), line: 1, reason: e.to_string() })?;
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    let image_col = col("image").ok_or_else(|| DataError::Parse {
        path: p.clone(),
        line: 1,
        reason: format!("no `image` column (columns: {})", headers.iter().collect::<Vec<_>>().join(", ")),
    })?;
    let (caption_col, class_col, category_col, split_col) =
        (col("caption"), col("class"), col("category"), col("split"));
    if caption_col.is_none() && class_col.is_none() {
        return Err(DataError::Parse { path: p, line: 1, reason: "need a `caption` or a `class` column".into() });
    }
    let mut out: Vec<Record> = Vec::new();
    let mut by_image: HashMap<PathBuf, usize> = HashMap::new();
    for (i, row) in reader.records().enumerate() {
        let line = i + 2;
        let row = row.map_err(|e| DataError::Parse { path: p.clone(), line, reason: e.to_string() })?;
        let get = |c: Option<usize>| c.and_then(|c| row.get(c)).map(str::trim).filter(|v| !v.is_empty());
        let image = root.join(get(Some(image_col)).ok_or_else(|| DataError::Parse {
            path: p.clone(),
            line,
            reason: "empty `image`".into(),
        })?);
        let split = match get(split_col) {
            None => None,
            Some(s) => parse_split(s).ok_or_else(|| DataError::Parse {
                path: p.clone(),
                line,
                reason: format!("unknown split `{s}`; expected train, test, val or restval"),
            })?,
        };
        if get(split_col).is_some_and(|s| s.starts_with("val")) {
            continue;
        }
        let caption = get(caption_col).map(String::from);
        if caption_col.is_some() && caption.is_none() && get(class_col).is_none() {
            return Err(DataError::Parse {
                path: p.clone(),
                line,
                reason: "empty `caption` and no `class`; give the row a caption".into(),
            });
        }
        match by_image.get(&image) {
            Some(&k) => out[k].captions.extend(caption),
            None => {
                by_image.insert(image.clone(), out.len());
                out.push(Record {
                    image,
                    captions: caption.into_iter().collect(),
                    class: get(class_col).map(String::from),
                    category: get(category_col).map(String::from),
                    split,
                    member: None,
                });
            }
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct KarpathyFile {
    images: Vec<KarpathyImage>,
}

#[derive(Deserialize)]
struct KarpathyImage {
    filename: String,
    #[serde(default)]
    filepath: Option<String>,
    split: String,
    sentences: Vec<KarpathySentence>,
}

#[derive(Deserialize)]
struct KarpathySentence {
    raw: String,
}

/// Read a Karpathy-style split file (`dataset_coco.json`, `dataset_flickr30k.json`): `train`
/// and `restval` train, `test` tests, `val` is left out.
pub fn read_karpathy(path: &Path, root: &Path) -> Result<Vec<Record>, DataError> {
    let text = read_text(path)?;
    let f: KarpathyFile = serde_json::from_str(&text).map_err(|e| DataError::Parse {
        path: path.display().to_string(),
        line: e.line(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::new();
    for im in f.images {
        let split = parse_split(&im.split).ok_or_else(|| DataError::Invalid {
            path: path.display().to_string(),
            reason: format!("image `{}` has unknown split `{}`", im.filename, im.split),
        })?;
        let Some(split) = split else { continue };
        let rel = match &im.filepath {
            Some(dir) => Path::new(dir).join(&im.filename),
            None => PathBuf::from(&im.filename),
        };
        out.push(Record {
            image: root.join(rel),
            captions: {
                let captions: Vec<String> = im.sentences.into_iter().map(|s| s.raw.trim().to_string()).collect();
                if captions.iter().any(String::is_empty) {
                    return Err(DataError::Invalid {
                        path: path.display().to_string(),
                        reason: format!("image `{}` has an empty sentence; remove it or give it text", im.filename),
                    });
                }
                captions
            },
            class: None,
            category: None,
            split: Some(split),
            member: None,
        });
    }
    Ok(out)
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg" | "gif" | "bmp" | "webp"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::Read { path: dir.display().to_string(), reason: e.to_string() })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// Read class folders: `DIR/CLASS/*.png`, or `DIR/train/CLASS/*` and `DIR/test/CLASS/*`.
/// Folder names become class names (`_` and `-` read as spaces).
pub fn read_folders(dir: &Path) -> Result<Vec<Record>, DataError> {
    let split_dirs = [("train", Split::Train), ("test", Split::Test)];
    let has_splits = split_dirs.iter().all(|(d, _)| dir.join(d).is_dir());
    let roots: Vec<(PathBuf, Option<Split>)> = if has_splits {
        split_dirs.iter().map(|(d, s)| (dir.join(d), Some(*s))).collect()
    } else {
        vec![(dir.to_path_buf(), None)]
    };
    let mut out = Vec::new();
    for (root, split) in roots {
        for class_dir in sorted_entries(&root)?.into_iter().filter(|p| p.is_dir()) {
            let class = class_dir.file_name().unwrap_or_default().to_string_lossy().replace(['_', '-'], " ");
            for f in sorted_entries(&class_dir)?.into_iter().filter(|p| p.is_file() && is_image(p)) {
                out.push(Record {
                    image: f,
                    captions: Vec::new(),
                    class: Some(class.clone()),
                    category: None,
                    split,
                    member: None,
                });
            }
        }
    }
    if out.is_empty() {
        return Err(DataError::Invalid {
            path: dir.display().to_string(),
            reason: "no images found; expected DIR/CLASS/*.png or DIR/{train,test}/CLASS/*.png".into(),
        });
    }
    Ok(out)
}

/// Check a task's data section (before anything is read). Returns the offending field.
pub fn validate(t: &TaskSection) -> Result<(), (Option<&'static str>, String)> {
    if !SOURCES.contains(&t.source.as_str()) {
        return Err((Some("source"), format!("unknown data source `{}`; available: {}", t.source, SOURCES.join(", "))));
    }
    if t.shuffle_buffer.is_some() && t.source != "webdataset" {
        return Err((
            Some("shuffle_buffer"),
            format!(
                "shuffle_buffer orders WebDataset shards; `{}` data is shuffled whole. Remove it, or use \
                 `source = \"webdataset\"`",
                t.source
            ),
        ));
    }
    if t.shuffle_buffer == Some(0) {
        return Err((
            Some("shuffle_buffer"),
            "shuffle_buffer must be at least 1 (remove it for a full shuffle)".into(),
        ));
    }
    if t.source == "shapes" {
        return super::shapes::validate(t).map_err(|m| (None, m));
    }
    if t.path.is_none() {
        return Err((None, format!("task `{}` reads `{}` data but gives no `path`", t.name, t.source)));
    }
    if !(0.0..1.0).contains(&t.test_fraction) {
        return Err((Some("test_fraction"), "test_fraction must be in [0, 1)".into()));
    }
    if t.max_train == Some(0) || t.max_test == Some(0) {
        return Err((None, "max_train / max_test must be at least 1".into()));
    }
    Ok(())
}

/// The dataset's own metadata when `path` is (or sits in) a prepared dataset directory.
fn dataset_info(path: &Path) -> Result<Option<DatasetInfo>, DataError> {
    let dir = if path.is_dir() { path } else { path.parent().unwrap_or(Path::new(".")) };
    let f = dir.join("dataset.json");
    if !f.is_file() {
        return Ok(None);
    }
    let info = serde_json::from_str(&read_text(&f)?).map_err(|e| DataError::Parse {
        path: f.display().to_string(),
        line: e.line(),
        reason: e.to_string(),
    })?;
    Ok(Some(info))
}

/// Every record of a task's source (before filtering and splitting), plus the dataset's metadata.
pub fn read_all(t: &TaskSection) -> Result<(Vec<Record>, Option<DatasetInfo>), DataError> {
    let path = t.path.as_deref().unwrap_or(Path::new("."));
    let info = dataset_info(path)?;
    let root_of = |file: &Path| t.images.clone().unwrap_or_else(|| file.parent().unwrap_or(Path::new(".")).into());
    let records = match t.source.as_str() {
        "jsonl" if path.is_dir() => {
            let (train, test) = (path.join("train.jsonl"), path.join("test.jsonl"));
            let mut r = Vec::new();
            for (f, split) in [(train, Split::Train), (test, Split::Test)] {
                r.extend(read_jsonl(&f, &root_of(&f))?.into_iter().map(|mut x| {
                    x.split = x.split.or(Some(split));
                    x
                }));
            }
            r
        }
        "jsonl" => read_jsonl(path, &root_of(path))?,
        "csv" => read_csv(path, &root_of(path))?,
        "karpathy" => read_karpathy(path, &root_of(path))?,
        "folders" => read_folders(path)?,
        "webdataset" => super::webdataset::read_records(path)?,
        other => {
            return Err(DataError::Invalid { path: path.display().to_string(), reason: format!("source `{other}`") })
        }
    };
    Ok((records, info))
}

fn shuffled<T>(mut v: Vec<T>, seed: u64) -> Vec<T> {
    v.shuffle(&mut StdRng::seed_from_u64(seed));
    v
}

/// Filter, split and subsample records (deterministic in `split_seed`). Returns (train, test).
pub fn select(t: &TaskSection, records: Vec<Record>) -> (Vec<Record>, Vec<Record>) {
    let keep = |r: &Record| {
        (t.classes.is_empty() || r.class.as_ref().is_some_and(|c| t.classes.contains(c)))
            && (t.categories.is_empty() || r.category.as_ref().is_some_and(|c| t.categories.contains(c)))
    };
    let records: Vec<Record> = records.into_iter().filter(keep).collect();
    let (mut train, mut test): (Vec<Record>, Vec<Record>) =
        records.iter().cloned().partition(|r| r.split == Some(Split::Train));
    test.retain(|r| r.split == Some(Split::Test));
    let unsplit: Vec<Record> = records.into_iter().filter(|r| r.split.is_none()).collect();
    if !unsplit.is_empty() {
        let unsplit = shuffled(unsplit, t.split_seed);
        let n_test = ((unsplit.len() as f64) * t.test_fraction).round() as usize;
        for (i, r) in unsplit.into_iter().enumerate() {
            if i < n_test {
                test.push(r)
            } else {
                train.push(r)
            }
        }
    }
    let cap = |v: Vec<Record>, max: Option<usize>, salt: u64| match max {
        Some(m) if v.len() > m => {
            let mut v = shuffled(v, t.split_seed ^ salt);
            v.truncate(m);
            v
        }
        _ => v,
    };
    (cap(train, t.max_train, 1), cap(test, t.max_test, 2))
}

/// Records into examples, each image's header checked in parallel (its pixels are decoded
/// when a batch or the cache needs them); returns the examples and the images skipped.
fn examples(
    t: &TaskSection,
    records: &[Record],
    templates: &[String],
    shards: &ShardIds,
) -> Result<(Vec<Example>, Vec<String>), DataError> {
    let checked: Vec<Result<(), super::preprocess::ImageError>> = records
        .par_iter()
        .map(|r| match &r.member {
            Some(m) => super::webdataset::check_member(m),
            None => super::image::check_file(&r.image),
        })
        .collect();
    let mut out = Vec::with_capacity(records.len());
    let mut skipped = Vec::new();
    for (r, check) in records.iter().zip(checked) {
        match check {
            Ok(()) => {}
            Err(e) if t.on_error == OnError::Skip => {
                tracing::warn!(task = %t.name, "skipping: {e}");
                skipped.push(r.image.display().to_string());
                continue;
            }
            Err(e) => {
                return Err(DataError::Image {
                    task: t.name.clone(),
                    cause: e,
                    hint: "; fix or remove the file, or set `on_error = \"skip\"` on the task to count and skip it",
                })
            }
        }
        let mut captions = r.captions.clone();
        if captions.is_empty() {
            if let Some(c) = &r.class {
                captions.push(fill(&templates[0], c));
            }
        }
        if captions.is_empty() {
            return Err(DataError::Invalid {
                path: r.image.display().to_string(),
                reason: "this image has neither captions nor a class".into(),
            });
        }
        let image = match &r.member {
            Some(m) => super::image::ImageSource::Shard(m.clone()),
            None => super::image::ImageSource::File(r.image.clone()),
        };
        out.push(Example {
            image,
            captions,
            class: r.class.clone(),
            id: r.image.display().to_string(),
            shard: shards.of(r),
        });
    }
    Ok((out, skipped))
}

/// Each WebDataset shard's index in the order the shards were read.
#[derive(Default)]
struct ShardIds(HashMap<std::sync::Arc<Path>, u32>);

impl ShardIds {
    fn new(records: &[Record]) -> Self {
        let mut ids = HashMap::new();
        for m in records.iter().filter_map(|r| r.member.as_ref()) {
            let next = ids.len() as u32;
            ids.entry(m.shard.clone()).or_insert(next);
        }
        ShardIds(ids)
    }

    fn of(&self, r: &Record) -> Option<u32> {
        r.member.as_ref().map(|m| self.0[&m.shard])
    }

    /// Records back in shard order (splitting and subsampling shuffle them), so a split is
    /// read shard by shard, each sequentially.
    fn sort(&self, records: &mut [Record]) {
        if !self.0.is_empty() {
            records.sort_by_key(|r| (self.of(r), r.member.as_ref().map(|m| m.offset)));
        }
    }
}

/// A task's data as its manifests describe it, read without decoding an image.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inventory {
    pub train: usize,
    pub test: usize,
    pub classes: usize,
    /// Captions of the test split (more than `test` when images have several, as Flickr30K
    /// and COCO have five).
    pub test_captions: usize,
    /// Image files the manifests name that do not exist.
    pub missing: Vec<String>,
}

/// The split sizes and missing files of a task on disk, after its filters and caps.
pub fn inventory(t: &TaskSection) -> Result<Inventory, DataError> {
    let (records, _) = read_all(t)?;
    let (train, test) = select(t, records);
    let mut classes: Vec<&String> = train.iter().chain(&test).filter_map(|r| r.class.as_ref()).collect();
    classes.sort();
    classes.dedup();
    let missing = train
        .iter()
        .chain(&test)
        .filter(|r| r.member.is_none() && !r.image.is_file())
        .map(|r| r.image.display().to_string());
    Ok(Inventory {
        train: train.len(),
        test: test.len(),
        classes: classes.len(),
        test_captions: test.iter().map(|r| r.captions.len().max(1)).sum(),
        missing: missing.collect(),
    })
}

/// Load a task from disk at the model's preprocessing.
pub fn load(t: &TaskSection, pre: &Preprocess) -> Result<TaskData, DataError> {
    let (records, info) = read_all(t)?;
    let templates = if !t.templates.is_empty() {
        t.templates.clone()
    } else {
        info.as_ref()
            .map(|i| i.templates.clone())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| vec![DEFAULT_TEMPLATE.into()])
    };
    let shards = ShardIds::new(&records);
    let (mut train_r, mut test_r) = select(t, records);
    shards.sort(&mut train_r);
    shards.sort(&mut test_r);
    let (train, mut skipped) = examples(t, &train_r, &templates, &shards)?;
    let (test, skipped_test) = examples(t, &test_r, &templates, &shards)?;
    skipped.extend(skipped_test);
    // Classes: the dataset's order where it has one (labels stay stable under filtering),
    // else sorted.
    let mut seen: Vec<String> = train.iter().chain(&test).filter_map(|e| e.class.clone()).collect();
    seen.sort();
    seen.dedup();
    let classes = match info.as_ref().map(|i| &i.classes).filter(|c| !c.is_empty()) {
        Some(order) => order.iter().filter(|c| seen.contains(c)).cloned().collect(),
        None => seen,
    };
    Ok(TaskData {
        name: t.name.clone(),
        image_size: pre.size,
        train,
        val: Vec::new(),
        test,
        classes,
        templates,
        skipped,
        on_error: t.on_error,
        order: t.epoch_order(),
    })
}

/// What was used of each task, for the run directory: example ids per split and the images
/// skipped.
pub fn split_record(tasks: &[TaskData]) -> serde_json::Value {
    let m: BTreeMap<&str, serde_json::Value> = tasks
        .iter()
        .map(|t| {
            let ids = |v: &[Example]| v.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
            (
                t.name.as_str(),
                serde_json::json!({
                    "train": ids(&t.train),
                    "test": ids(&t.test),
                    "classes": t.classes,
                    "templates": t.templates,
                    "skipped": t.skipped,
                }),
            )
        })
        .collect();
    serde_json::json!(m)
}

#[cfg(test)]
mod manifest_text_tests {
    use super::*;

    #[test]
    fn a_bom_is_dropped_and_invalid_utf8_and_empty_captions_are_located() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.jsonl");
        std::fs::write(&f, b"\xEF\xBB\xBF{\"image\": \"a.png\", \"caption\": \"one\"}\n").unwrap();
        assert_eq!(read_jsonl(&f, dir.path()).unwrap()[0].captions, ["one"]);
        std::fs::write(&f, b"{\"image\": \"a.png\", \"caption\": \"one\"}\n{\"image\": \"b\xFF.png\"}\n").unwrap();
        let e = read_jsonl(&f, dir.path()).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:2") && e.contains("invalid UTF-8 at column 13"), "{e}");
        std::fs::write(&f, "{\"image\": \"a.png\", \"captions\": [\"one\", \" \"]}\n").unwrap();
        let e = read_jsonl(&f, dir.path()).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:1") && e.contains("caption 1 is empty"), "{e}");
        let c = dir.path().join("d.csv");
        std::fs::write(&c, b"\xEF\xBB\xBFimage,caption\na.png,one\nb.png,\n").unwrap();
        let e = read_csv(&c, dir.path()).unwrap_err().to_string();
        assert!(e.contains("d.csv:3") && e.contains("empty `caption`"), "a BOM before the header is dropped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(source: &str, path: &Path) -> TaskSection {
        let mut t: TaskSection = toml::from_str(&format!("name = \"t\"\nsource = \"{source}\"")).unwrap();
        t.path = Some(path.to_path_buf());
        t
    }

    fn png(path: &Path, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(6, 4, image::Rgb([v, 0, 255 - v])).save(path).unwrap();
    }

    #[test]
    fn jsonl_directory_with_dataset_info() {
        let d = tempfile::tempdir().unwrap();
        png(&d.path().join("img/a.png"), 10);
        png(&d.path().join("img/b.png"), 200);
        std::fs::write(
            d.path().join("train.jsonl"),
            "{\"image\":\"img/a.png\",\"captions\":[\"one\",\"uno\"],\"class\":\"x\"}\n",
        )
        .unwrap();
        std::fs::write(d.path().join("test.jsonl"), "{\"image\":\"img/b.png\",\"class\":\"y\"}\n").unwrap();
        std::fs::write(d.path().join("dataset.json"), r#"{"name":"d","classes":["y","x"],"templates":["a {} thing"]}"#)
            .unwrap();
        let data = load(&task("jsonl", d.path()), &Preprocess::clip(4)).unwrap();
        assert_eq!(data.train.len(), 1);
        assert_eq!(data.train[0].captions, ["one", "uno"]);
        assert_eq!(data.test[0].captions, ["a y thing"]);
        assert_eq!(data.classes, ["y", "x"]);
        assert_eq!(data.train[0].eval_pixels(4).unwrap().len(), 3 * 16);
    }

    #[test]
    fn bad_jsonl_line_is_located() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("m.jsonl");
        std::fs::write(&f, "{\"image\":\"a.png\",\"caption\":\"c\"}\n{\"image\":\"b.png\",\"captoin\":\"c\"}\n")
            .unwrap();
        let e = load(&task("jsonl", &f), &Preprocess::clip(4)).unwrap_err().to_string();
        assert!(e.contains("m.jsonl:2:") && e.contains("captoin"), "{e}");
    }

    #[test]
    fn csv_groups_rows_and_splits_by_seed() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..10 {
            png(&d.path().join(format!("{i}.png")), i * 20);
        }
        let mut text = String::from("image,caption\n");
        for i in 0..10 {
            text.push_str(&format!("{i}.png,first {i}\n{i}.png,\"second, {i}\"\n"));
        }
        let f = d.path().join("data.csv");
        std::fs::write(&f, text).unwrap();
        let mut t = task("csv", &f);
        t.test_fraction = 0.3;
        let a = load(&t, &Preprocess::clip(4)).unwrap();
        assert_eq!((a.train.len(), a.test.len()), (7, 3));
        assert!(a.train.iter().all(|e| e.captions.len() == 2 && e.captions[1].starts_with("second, ")));
        let b = load(&t, &Preprocess::clip(4)).unwrap();
        let ids = |d: &TaskData| d.test.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        t.split_seed = 5;
        let c = load(&t, &Preprocess::clip(4)).unwrap();
        assert_ne!(ids(&a), ids(&c), "another split seed gives another split");
    }

    #[test]
    fn folders_with_templates_and_subsampling() {
        let d = tempfile::tempdir().unwrap();
        for split in ["train", "test"] {
            for class in ["red_fox", "cat"] {
                for i in 0..4 {
                    png(&d.path().join(format!("{split}/{class}/{i}.png")), 3 * i as u8);
                }
            }
        }
        let mut t = task("folders", d.path());
        t.templates = vec!["a picture of a {class}".into()];
        t.max_train = Some(5);
        t.classes = vec!["red fox".into(), "cat".into()];
        let data = load(&t, &Preprocess::clip(4)).unwrap();
        assert_eq!((data.train.len(), data.test.len()), (5, 8));
        assert_eq!(data.classes, ["cat", "red fox"]);
        assert!(data.test.iter().any(|e| e.captions == ["a picture of a red fox"]));
    }

    #[test]
    fn karpathy_splits() {
        let d = tempfile::tempdir().unwrap();
        png(&d.path().join("imgs/val2014/1.jpg"), 1);
        png(&d.path().join("imgs/2.png"), 2);
        let json = r#"{"images":[
            {"filename":"1.jpg","filepath":"val2014","split":"restval","sentences":[{"raw":"a dog "},{"raw":"a hound"}]},
            {"filename":"2.png","split":"test","sentences":[{"raw":"a cat"}]},
            {"filename":"3.png","split":"val","sentences":[{"raw":"unused"}]}]}"#;
        let f = d.path().join("dataset_coco.json");
        std::fs::write(&f, json).unwrap();
        let mut t = task("karpathy", &f);
        t.images = Some(d.path().join("imgs"));
        // The PNG saved as .jpg is still decodable: formats are sniffed from the bytes.
        let data = load(&t, &Preprocess::clip(4)).unwrap();
        assert_eq!(data.train[0].captions, ["a dog", "a hound"]);
        assert_eq!(data.test.len(), 1);
    }

    #[test]
    fn missing_and_corrupt_images_fail_or_are_counted() {
        let d = tempfile::tempdir().unwrap();
        png(&d.path().join("ok.png"), 1);
        std::fs::write(d.path().join("bad.png"), b"\x89PNG\r\n\x1a\ntruncated").unwrap();
        let f = d.path().join("m.jsonl");
        std::fs::write(
            &f,
            "{\"image\":\"ok.png\",\"caption\":\"a\",\"split\":\"train\"}\n\
             {\"image\":\"bad.png\",\"caption\":\"b\",\"split\":\"train\"}\n\
             {\"image\":\"gone.png\",\"caption\":\"c\",\"split\":\"test\"}\n",
        )
        .unwrap();
        let mut t = task("jsonl", &f);
        let e = load(&t, &Preprocess::clip(4)).unwrap_err().to_string();
        assert!(e.contains("bad.png") && e.contains("on_error"), "{e}");
        t.on_error = OnError::Skip;
        let data = load(&t, &Preprocess::clip(4)).unwrap();
        assert_eq!(data.train.len(), 1);
        assert_eq!(data.skipped.len(), 2);
        assert!(data.skipped.iter().any(|s| s.ends_with("gone.png")));
    }
}
