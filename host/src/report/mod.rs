//! `recall compare RUN_OR_SWEEP_DIR... [--baseline NAME]`: the continual-learning table of
//! finished runs, seeds of one method grouped (mean ± std), with signed deltas against a
//! baseline and the best value per column marked; as Markdown and CSV.
//!
//! A method's name is its method key (`run.json`'s `method`: a sweep point's label,
//! `[experiment] method`, or the experiment's name); for runs recorded before the key
//! existed, the run directory's name without a trailing `-seedN` or `-seedN-NNN`. Runs
//! that have not finished are listed as missing, with how far they got. Runs compared on
//! different protocols (tasks, held-out sets, evaluators, epochs), and seeds of one method
//! whose configurations differ, are flagged under the table.

mod protocol;
mod render;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// What the comparison reads from a run's summary.json.
#[derive(serde::Deserialize)]
struct Summary {
    seed: u64,
    trainable_parameters: usize,
    batch_size: usize,
    train_seconds: f64,
    continual: BTreeMap<String, crate::metrics::ClSummary>,
    #[serde(default)]
    performance_drop: BTreeMap<String, BTreeMap<String, f64>>,
    #[serde(default)]
    results: Matrix,
    #[serde(default)]
    heldout: Matrix,
    /// The mean loss of every epoch, per task.
    #[serde(default)]
    epoch_losses: Vec<Vec<f64>>,
    /// Scores on the tasks' validation splits inside them.
    #[serde(default)]
    validation: Vec<Validation>,
    /// The summaries of the validation splits after each stage (`val_fraction` on every task).
    #[serde(default)]
    validation_continual: BTreeMap<String, crate::metrics::ClSummary>,
}

/// One validation record of summary.json.
#[derive(serde::Deserialize)]
struct Validation {
    task: usize,
    metrics: BTreeMap<String, f64>,
}

impl Summary {
    /// The mean over tasks of `metric` on each task's validation split at its last record
    /// (the end of the task's training, when `eval_every_epochs` divides its epochs).
    fn final_validation(&self, metric: &str) -> Option<f64> {
        let mut last: BTreeMap<usize, f64> = BTreeMap::new();
        for r in &self.validation {
            if let Some(v) = r.metrics.get(metric) {
                last.insert(r.task, *v);
            }
        }
        (!last.is_empty()).then(|| last.values().sum::<f64>() / last.len() as f64)
    }
}

/// Which split `recall compare` tables: the test splits after each stage, or the validation
/// splits inside each task (to choose hyperparameters without touching the test data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Test,
    Val,
}

/// The columns of `--on val`: the continual summaries of the validation splits after each
/// stage (when every task has one), then each task's last validation R@1 inside its own
/// training (`eval_every_epochs`) both ways, averaged over tasks.
fn validation_columns(with_stages: bool) -> Vec<Column> {
    let val = |metric: &'static str| -> Getter { Box::new(move |s: &Summary| s.final_validation(metric)) };
    let mut c = match with_stages {
        true => continual_columns(|s| &s.validation_continual, "Val "),
        false => Vec::new(),
    };
    c.extend([
        Column { title: "In-task val I2T R@1".into(), higher_is_better: true, value: val("retrieval/i2t_r1") },
        Column { title: "In-task val T2I R@1".into(), higher_is_better: true, value: val("retrieval/t2i_r1") },
        Column {
            title: "trainable params".into(),
            higher_is_better: false,
            value: Box::new(|s: &Summary| Some(s.trainable_parameters as f64)),
        },
        Column {
            title: "train s".into(),
            higher_is_better: false,
            value: Box::new(|s: &Summary| Some(s.train_seconds)),
        },
    ]);
    c
}

/// A result matrix as summary.json stores it: `rows[stage][set][metric]`.
#[derive(serde::Deserialize, Default, Clone)]
struct Matrix {
    tasks: Vec<String>,
    rows: Vec<Vec<BTreeMap<String, f64>>>,
}

impl Matrix {
    fn metric(&self, name: &str) -> Vec<Vec<f64>> {
        self.rows.iter().map(|r| r.iter().map(|m| m.get(name).copied().unwrap_or(f64::NAN)).collect()).collect()
    }
}

/// A method's matrices, averaged over its seeds, for the plots.
pub struct Curves {
    pub method: String,
    pub tasks: Vec<String>,
    /// `[stage][task]`, retrieval R@1 each way.
    pub i2t: Vec<Vec<f64>>,
    pub t2i: Vec<Vec<f64>>,
    pub heldout_sets: Vec<String>,
    /// `[stage][set]`, zero-shot top-1.
    pub zeroshot: Vec<Vec<f64>>,
    /// `[task][epoch]`, the training loss.
    pub losses: Vec<Vec<f64>>,
}

/// Element-wise mean of equally shaped matrices (runs of one method).
fn mean_matrix(ms: &[Vec<Vec<f64>>]) -> Vec<Vec<f64>> {
    let Some(first) = ms.first() else { return Vec::new() };
    first
        .iter()
        .enumerate()
        .map(|(t, row)| {
            (0..row.len())
                .map(|i| {
                    ms.iter().map(|m| m.get(t).and_then(|r| r.get(i)).copied().unwrap_or(f64::NAN)).sum::<f64>()
                        / ms.len() as f64
                })
                .collect()
        })
        .collect()
}

/// How a column reads its value from a run.
type Getter = Box<dyn Fn(&Summary) -> Option<f64>>;

/// One column: its title, whether higher is better, and the value a run gives.
struct Column {
    title: String,
    higher_is_better: bool,
    value: Getter,
}

/// A cell: mean and standard deviation over seeds (`None`: no run reports it).
pub type Cell = Option<(f64, f64)>;

/// A row: method, number of runs, cells.
pub type Row = (String, usize, Vec<Cell>);

/// Which continual summaries a column reads: the test splits' or the validation splits'.
type Summaries = fn(&Summary) -> &BTreeMap<String, crate::metrics::ClSummary>;

fn retrieval(of: Summaries, metric: &'static str, f: fn(&crate::metrics::ClSummary) -> f64) -> Getter {
    Box::new(move |s: &Summary| of(s).get(metric).map(f))
}

/// The mean of both directions of an optional summary (BWT, forgetting).
fn both_ways(of: Summaries, f: fn(&crate::metrics::ClSummary) -> Option<f64>) -> Getter {
    Box::new(move |s: &Summary| {
        let a = of(s).get("retrieval/i2t_r1").and_then(f)?;
        let b = of(s).get("retrieval/t2i_r1").and_then(f)?;
        Some((a + b) / 2.0)
    })
}

/// Avg and Last R@1 both ways, BWT and forgetting, from the summaries `of` reads; titles
/// prefixed by `prefix`.
fn continual_columns(of: Summaries, prefix: &str) -> Vec<Column> {
    let col = |title: &str, higher_is_better: bool, value: Getter| Column {
        title: format!("{prefix}{title}"),
        higher_is_better,
        value,
    };
    vec![
        col("Avg I2T R@1", true, retrieval(of, "retrieval/i2t_r1", |s| s.avg)),
        col("Avg T2I R@1", true, retrieval(of, "retrieval/t2i_r1", |s| s.avg)),
        col("Last I2T R@1", true, retrieval(of, "retrieval/i2t_r1", |s| s.last)),
        col("Last T2I R@1", true, retrieval(of, "retrieval/t2i_r1", |s| s.last)),
        col("BWT", true, both_ways(of, |s| s.bwt)),
        col("forgetting", false, both_ways(of, |s| s.forgetting)),
    ]
}

fn columns(heldout: &[String]) -> Vec<Column> {
    let mut c = continual_columns(|s| &s.continual, "");
    for h in heldout {
        let set = h.clone();
        c.push(Column {
            title: format!("PD {h}"),
            higher_is_better: false,
            value: Box::new(move |s: &Summary| {
                s.performance_drop.get("zeroshot/top1").and_then(|m| m.get(&set)).copied()
            }),
        });
    }
    c.push(Column {
        title: "trainable params".into(),
        higher_is_better: false,
        value: Box::new(|s: &Summary| Some(s.trainable_parameters as f64)),
    });
    c.push(Column {
        title: "train s".into(),
        higher_is_better: false,
        value: Box::new(|s: &Summary| Some(s.train_seconds)),
    });
    c
}

/// A run found on the command line (directly or through a sweep directory).
struct Found {
    method: String,
    dir: PathBuf,
}

/// A run's method key: `run.json`'s `method`, else (runs from before it was recorded) the
/// directory's name without `-seedN` or `-seedN-NNN`.
fn method_of_run(dir: &Path) -> String {
    let recorded = std::fs::read_to_string(dir.join("run.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["method"].as_str().map(String::from));
    recorded.unwrap_or_else(|| method_of_dir(dir))
}

fn method_of_dir(dir: &Path) -> String {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string());
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    match name.rsplit_once("-seed") {
        Some((m, s)) if !m.is_empty() && digits(s) => m.to_string(),
        Some((m, s)) if !m.is_empty() && s.split_once('-').is_some_and(|(a, b)| digits(a) && digits(b)) => {
            m.to_string()
        }
        _ => name,
    }
}

fn discover(paths: &[PathBuf]) -> anyhow::Result<Vec<Found>> {
    let mut out = Vec::new();
    for p in paths {
        let manifest = p.join("sweep.json");
        if manifest.is_file() {
            let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest)?)
                .with_context(|| format!("{} is not a sweep manifest", manifest.display()))?;
            for point in m["points"].as_array().into_iter().flatten() {
                let id = point["id"].as_str().unwrap_or_default();
                out.push(Found { method: point["label"].as_str().unwrap_or(id).to_string(), dir: p.join(id) });
            }
        } else if p.join("config.resolved.toml").is_file() || p.join("summary.json").is_file() {
            out.push(Found { method: method_of_run(p), dir: p.clone() });
        } else {
            bail!("{} is neither a run directory nor a sweep directory (no sweep.json)", p.display());
        }
    }
    Ok(out)
}

/// The comparison, ready to render.
pub struct Comparison {
    pub headers: Vec<String>,
    /// (method, seeds, cells as (mean, std))
    pub rows: Vec<Row>,
    /// Index of the best row per column.
    pub best: Vec<Option<usize>>,
    pub baseline: Option<usize>,
    /// Runs without a summary, with how far they got.
    pub missing: Vec<String>,
    pub batch_sizes: Vec<usize>,
    pub curves: Vec<Curves>,
    /// What makes rows hard to compare: protocols that differ between methods, seeds of one
    /// method whose configurations differ.
    pub notes: Vec<String>,
}

/// Mean and sample standard deviation, each rounded once to the two decimals every format
/// shows (a value that rounds to zero is +0, never -0).
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = if v.len() > 1 { (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (render::round2(mean), render::round2(std))
}

/// Compare the runs under `paths` on their test splits, grouped by method, optionally
/// against `baseline`.
pub fn compare(paths: &[PathBuf], baseline: Option<&str>) -> anyhow::Result<Comparison> {
    compare_on(paths, baseline, Split::Test)
}

/// [`compare`] on the test or the validation splits.
pub fn compare_on(paths: &[PathBuf], baseline: Option<&str>, on: Split) -> anyhow::Result<Comparison> {
    let found = discover(paths)?;
    let mut groups: Vec<(String, Vec<Summary>)> = Vec::new();
    let mut configs: Vec<(String, PathBuf)> = Vec::new();
    let mut missing = Vec::new();
    for f in found {
        let file = f.dir.join("summary.json");
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let s: Summary = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a Recall run summary", file.display()))?;
                configs.push((f.method.clone(), f.dir.join("config.resolved.toml")));
                match groups.iter_mut().find(|(m, _)| *m == f.method) {
                    Some((_, v)) => v.push(s),
                    None => groups.push((f.method, vec![s])),
                }
            }
            Err(_) => {
                let done = std::fs::read_to_string(f.dir.join("progress.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v["finished_tasks"].as_u64());
                missing.push(match done {
                    Some(k) => format!("{} ({}): {k} tasks finished", f.method, f.dir.display()),
                    None => format!("{} ({}): not started", f.method, f.dir.display()),
                });
            }
        }
    }
    if groups.is_empty() {
        bail!(
            "no finished runs to compare{}",
            if missing.is_empty() { String::new() } else { format!("; missing: {}", missing.join("; ")) }
        );
    }
    let mut heldout: Vec<String> = Vec::new();
    for s in groups.iter().flat_map(|(_, v)| v) {
        for k in s.performance_drop.get("zeroshot/top1").into_iter().flat_map(|m| m.keys()) {
            if !heldout.contains(k) {
                heldout.push(k.clone());
            }
        }
    }
    let cols = match on {
        Split::Test => columns(&heldout),
        Split::Val => {
            let runs = || groups.iter().flat_map(|(_, v)| v);
            let with_stages = runs().any(|s| !s.validation_continual.is_empty());
            if !with_stages && !runs().any(|s| !s.validation.is_empty()) {
                bail!(
                    "none of these runs scored a validation split; set `val_fraction` on the tasks (and `[train] \
                     eval_every_epochs` for scores inside a task), or compare on the test splits (the default)"
                );
            }
            validation_columns(with_stages)
        }
    };
    let rows: Vec<Row> = groups
        .iter()
        .map(|(m, runs)| {
            let mut seeds: Vec<u64> = runs.iter().map(|r| r.seed).collect();
            seeds.sort();
            seeds.dedup();
            let cells = cols
                .iter()
                .map(|c| {
                    let v: Vec<f64> = runs.iter().filter_map(|r| (c.value)(r)).collect();
                    (!v.is_empty()).then(|| mean_std(&v))
                })
                .collect();
            (m.clone(), runs.len(), cells)
        })
        .collect();
    let best = cols
        .iter()
        .enumerate()
        .map(|(j, c)| {
            let mut best: Option<(usize, f64)> = None;
            for (i, (_, _, cells)) in rows.iter().enumerate() {
                if let Some((m, _)) = cells[j] {
                    let better = match best {
                        None => true,
                        Some((_, b)) => {
                            if c.higher_is_better {
                                m > b
                            } else {
                                m < b
                            }
                        }
                    };
                    if better {
                        best = Some((i, m));
                    }
                }
            }
            best.map(|(i, _)| i)
        })
        .collect();
    let baseline = match baseline {
        None => None,
        Some(b) => Some(rows.iter().position(|(m, _, _)| m == b).with_context(|| {
            let names: Vec<&str> = rows.iter().map(|(m, _, _)| m.as_str()).collect();
            format!("no method named `{b}` to compare against; methods: {}", names.join(", "))
        })?),
    };
    let mut batch_sizes: Vec<usize> = groups.iter().flat_map(|(_, v)| v.iter().map(|s| s.batch_size)).collect();
    batch_sizes.sort();
    batch_sizes.dedup();
    let curves = groups
        .iter()
        .map(|(m, runs)| {
            let matrices = |f: &dyn Fn(&Summary) -> Vec<Vec<f64>>| mean_matrix(&runs.iter().map(f).collect::<Vec<_>>());
            Curves {
                method: m.clone(),
                tasks: runs[0].results.tasks.clone(),
                i2t: matrices(&|s| s.results.metric("retrieval/i2t_r1")),
                t2i: matrices(&|s| s.results.metric("retrieval/t2i_r1")),
                heldout_sets: runs[0].heldout.tasks.clone(),
                zeroshot: matrices(&|s| s.heldout.metric("zeroshot/top1")),
                losses: matrices(&|s| s.epoch_losses.clone()),
            }
        })
        .collect();
    Ok(Comparison {
        headers: cols.into_iter().map(|c| c.title).collect(),
        rows,
        best,
        baseline,
        missing,
        batch_sizes,
        curves,
        notes: protocol::notes(&configs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_is_its_recorded_key_or_its_directory_without_the_seed() {
        for (dir, method) in [
            ("quickstart-seed0-000", "quickstart"),
            ("quickstart-seed12-003", "quickstart"),
            ("finetune-e10-seed1", "finetune-e10"),
            ("seed-bank", "seed-bank"),
            ("a-seed1-x", "a-seed1-x"),
        ] {
            assert_eq!(method_of_dir(Path::new(dir)), method, "{dir}");
        }
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("whatever-seed0-000");
        std::fs::create_dir(&run).unwrap();
        std::fs::write(run.join("run.json"), r#"{"method": "lora-merge", "seed": 0}"#).unwrap();
        assert_eq!(method_of_run(&run), "lora-merge");
        std::fs::write(run.join("run.json"), r#"{"seed": 0}"#).unwrap();
        assert_eq!(method_of_run(&run), "whatever", "runs from before the key fall back to the directory");
    }
}
