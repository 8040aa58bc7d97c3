//! Sweeps: `[sweep]` in an experiment file declares axes over any config key (plus `seeds`),
//! expanded as a grid product with optional include / exclude rows. Each point is the base
//! experiment with `--set`-style overrides; its id is a hash of the config as written with them
//! (keys sorted, numbers as values), so the same point always lands in the same run directory
//! and a re-run skips what is finished, also under a newer Recall.
//!
//! ```toml
//! [sweep]
//! name = "lr-vs-method"          # default: the experiment's name
//! seeds = [0, 1, 2]
//! [sweep.axes]
//! "optimizer.lr" = [1e-3, 3e-4]
//! "strategy" = [[{ plugin = "finetune" }], [{ plugin = "ewc", lambda = 100.0 }]]
//! [[sweep.exclude]]
//! "optimizer.lr" = 1e-3
//! "strategy" = [{ plugin = "ewc", lambda = 100.0 }]
//! [[sweep.include]]              # an extra point (overrides of the base), for every seed
//! "optimizer.lr" = 1e-4
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

pub use crate::config::SweepSection;
use crate::config::{self, ConfigError, LoadedConfig};

mod execute;
pub use execute::{execute, run_local, Executor, Outcome};

/// One point of a sweep.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Hash of the resolved config (12 hex digits).
    pub id: String,
    /// The overrides, in axis order, as `key=value` (TOML values).
    pub overrides: Vec<(String, String)>,
    /// The overrides without the seed: what makes a method, for grouping seeds.
    pub label: String,
    pub seed: u64,
}

/// The expanded sweep.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub name: String,
    pub dir: PathBuf,
    pub points: Vec<Point>,
}

fn value_text(v: &toml::Value) -> String {
    // Inline TOML, the form `--set` takes.
    match v {
        toml::Value::String(s) => toml::Value::String(s.clone()).to_string(),
        other => other.to_string(),
    }
}

/// Keys the host's typed sections own; anything else under these prefixes is a plugin option
/// that must already exist in the base file to be swept (plugins check their keys only when
/// they are created, which is too late for a sweep).
fn plugin_section(key: &str) -> bool {
    ["model.tokenizer.", "model.vision.", "model.text.", "adapter.", "strategy[", "evaluator["]
        .iter()
        .any(|p| key.starts_with(p))
        && !config::AdapterSection::HOST_KEYS.iter().any(|k| *k != "plugin" && key.strip_prefix("adapter.") == Some(k))
}

/// Whether the dotted key (with `[i]` steps) names something in the document.
fn key_exists(doc: &toml_edit::DocumentMut, key: &str) -> bool {
    let steps = config::parse_path(key);
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut i = 0;
    while i < steps.len() {
        let config::PathStep::Key(name) = &steps[i] else { return false };
        let Some(item) = table.get(name) else { return false };
        let last = i + 1 == steps.len();
        match steps.get(i + 1) {
            Some(config::PathStep::Index(k)) => {
                let Some(t) = item.as_array_of_tables().and_then(|a| a.get(*k)) else { return false };
                if i + 2 == steps.len() {
                    return true;
                }
                table = t;
                i += 2;
            }
            _ if last => return true,
            _ => {
                let Some(t) = item.as_table_like() else { return false };
                table = t;
                i += 1;
            }
        }
    }
    true
}

fn matches(row: &toml::Table, assignment: &BTreeMap<String, toml::Value>) -> bool {
    row.iter().all(|(k, v)| assignment.get(k) == Some(v))
}

/// Expand the sweep of a loaded experiment (its source text is the base).
pub fn expand(cfg: &LoadedConfig) -> Result<Plan, ConfigError> {
    let sweep = cfg
        .config
        .sweep
        .clone()
        .ok_or_else(|| cfg.error_at("sweep", "this experiment has no [sweep] section; add axes to sweep over"))?;
    let doc: toml_edit::DocumentMut =
        cfg.source.parse().map_err(|e: toml_edit::TomlError| cfg.error_at("sweep", e.message().to_string()))?;
    let mut axes: Vec<(String, Vec<toml::Value>)> = Vec::new();
    for (key, values) in &sweep.axes {
        let at = format!("sweep.axes.\"{key}\"");
        let values = match values {
            toml::Value::Array(v) if !v.is_empty() => v.clone(),
            toml::Value::Array(_) => {
                return Err(cfg.error_at(&at, format!("axis `{key}` is empty; give it at least one value")))
            }
            _ => return Err(cfg.error_at(&at, format!("axis `{key}` must be a list of values"))),
        };
        if key == "experiment.seed" {
            return Err(cfg.error_at(&at, "sweep seeds with `seeds = [...]`, not an axis over experiment.seed"));
        }
        if plugin_section(key) && !key_exists(&doc, key) {
            return Err(cfg.error_at(
                &at,
                format!("axis `{key}` names a plugin option the base experiment does not set; set it in the base file first"),
            ));
        }
        axes.push((key.clone(), values));
    }
    for (kind, rows) in [("include", &sweep.include), ("exclude", &sweep.exclude)] {
        for (r, row) in rows.iter().enumerate() {
            if row.is_empty() {
                return Err(cfg.error_at(&format!("sweep.{kind}[{r}]"), format!("{kind} row {r} is empty")));
            }
            if kind == "exclude" {
                if let Some(k) = row.keys().find(|k| !sweep.axes.contains_key(*k)) {
                    return Err(cfg.error_at(
                        &format!("sweep.exclude[{r}]"),
                        format!("exclude row {r} names `{k}`, which is not an axis"),
                    ));
                }
            }
        }
    }
    for (i, inc) in sweep.include.iter().enumerate() {
        let assignment: BTreeMap<String, toml::Value> = inc.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(e) = sweep.exclude.iter().position(|ex| matches(ex, &assignment)) {
            return Err(cfg.error_at(
                &format!("sweep.include[{i}]"),
                format!("include row {i} is removed again by exclude row {e}; drop one of them"),
            ));
        }
    }
    // The grid, in axis order (the last axis varies fastest).
    let mut grid: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
    for (key, values) in &axes {
        grid = grid
            .into_iter()
            .flat_map(|partial| {
                values.iter().map(move |v| {
                    let mut p = partial.clone();
                    p.push((key.clone(), v.clone()));
                    p
                })
            })
            .collect();
    }
    grid.retain(|p| {
        let a: BTreeMap<String, toml::Value> = p.iter().cloned().collect();
        !sweep.exclude.iter().any(|ex| matches(ex, &a))
    });
    grid.extend(sweep.include.iter().map(|row| row.iter().map(|(k, v)| (k.clone(), v.clone())).collect()));
    let seeds = if sweep.seeds.is_empty() { vec![cfg.config.experiment.seed] } else { sweep.seeds.clone() };
    let name = sweep.name.clone().unwrap_or_else(|| cfg.config.experiment.name.clone());
    let mut points = Vec::new();
    for assignment in &grid {
        let label = if assignment.is_empty() {
            "base".to_string()
        } else {
            assignment.iter().map(|(k, v)| format!("{k}={}", value_text(v))).collect::<Vec<_>>().join(" ")
        };
        for &seed in &seeds {
            let mut overrides: Vec<(String, String)> =
                assignment.iter().map(|(k, v)| (k.clone(), value_text(v))).collect();
            overrides.push(("experiment.seed".into(), seed.to_string()));
            let sets: Vec<String> = overrides.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let src = config::apply_overrides(&cfg.source, &cfg.file, &sets)?;
            // Each point is checked as a run would load it: parsed, then its paths resolved.
            config::parse(&src, &cfg.file).and_then(config::resolve).map_err(|e| ConfigError {
                message: format!("sweep point `{label}` (seed {seed}): {}", e.message),
                ..e
            })?;
            // The id hashes the experiment as written plus the point's overrides, keys sorted:
            // `1e-3` and `0.001` are one point, and a Recall version that adds config defaults
            // keeps the ids (and so the finished points) of an existing sweep.
            let mut explicit: serde_json::Value =
                toml::from_str(&src).map_err(|e| cfg.error_at("sweep", e.to_string()))?;
            if let Some(t) = explicit.as_object_mut() {
                t.remove("sweep");
            }
            let canonical = serde_json::to_string(&explicit).map_err(|e| cfg.error_at("sweep", e.to_string()))?;
            let id = hex(&Sha256::digest(canonical.as_bytes()))[..12].to_string();
            points.push(Point { id, overrides, label: label.clone(), seed });
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = points.iter().find(|p| !seen.insert(p.id.clone())) {
        return Err(cfg.error_at(
            "sweep",
            format!(
                "two points resolve to the same config (`{}`, seed {}); remove the duplicate row",
                dup.label, dup.seed
            ),
        ));
    }
    let dir = cfg.config.experiment.output_dir.join(&name);
    Ok(Plan { name, dir, points })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a point's run lives, and how far it got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Done,
    Partial,
    Pending,
}

impl Plan {
    pub fn run_dir(&self, p: &Point) -> PathBuf {
        self.dir.join(&p.id)
    }

    pub fn status(&self, p: &Point) -> Status {
        let d = self.run_dir(p);
        if d.join("summary.json").is_file() {
            Status::Done
        } else if d.join("progress.json").is_file() {
            Status::Partial
        } else {
            Status::Pending
        }
    }

    /// The `--dry-run` table.
    pub fn table(&self) -> String {
        let mut s = format!("sweep `{}`: {} points in {}\n", self.name, self.points.len(), self.dir.display());
        s.push_str(&format!("{:<14} {:<9} {:>6}  {}\n", "ID", "STATUS", "SEED", "POINT"));
        for p in &self.points {
            let st = match self.status(p) {
                Status::Done => "done",
                Status::Partial => "partial",
                Status::Pending => "pending",
            };
            s.push_str(&format!("{:<14} {:<9} {:>6}  {}\n", p.id, st, p.seed, p.label));
        }
        s
    }

    /// sweep.json: the manifest of points (the run directories are the truth for results).
    pub fn write_manifest(&self, experiment: &Path) -> anyhow::Result<()> {
        let m = serde_json::json!({
            "name": self.name,
            "experiment": std::path::absolute(experiment)?,
            "points": self.points.iter().map(|p| serde_json::json!({
                "id": p.id, "label": p.label, "seed": p.seed, "overrides": p.overrides,
                "run_dir": self.run_dir(p),
            })).collect::<Vec<_>>(),
        });
        crate::fsutil::write_atomic(&self.dir.join("sweep.json"), serde_json::to_string_pretty(&m)?.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(sweep: &str) -> String {
        format!("{}\n{sweep}", crate::config::tests::MINIMAL)
    }

    fn plan(src: &str) -> Result<Plan, ConfigError> {
        expand(&config::parse(src, "s.toml").unwrap())
    }

    #[test]
    fn grid_seeds_exclude_include_and_stable_ids() {
        let src = base(
            r#"[sweep]
seeds = [0, 1]
[sweep.axes]
"optimizer.lr" = [0.001, 0.0003]
"train.epochs" = [1, 2]
[[sweep.exclude]]
"optimizer.lr" = 0.001
"train.epochs" = 2
[[sweep.include]]
"optimizer.lr" = 0.1
"#,
        );
        let p = plan(&src).unwrap();
        // 2 x 2 grid minus 1 excluded plus 1 included, times 2 seeds.
        assert_eq!(p.points.len(), 8);
        assert_eq!(p.points[0].label, "optimizer.lr=0.001 train.epochs=1");
        assert!(p.points.iter().all(|x| x.id.len() == 12));
        let again = plan(&src).unwrap();
        assert_eq!(
            p.points.iter().map(|x| &x.id).collect::<Vec<_>>(),
            again.points.iter().map(|x| &x.id).collect::<Vec<_>>()
        );
        assert!(!p.points.iter().any(|x| x.label == "optimizer.lr=0.001 train.epochs=2"));
        assert_eq!(p.points.last().unwrap().label, "optimizer.lr=0.1");
        assert_eq!(p.dir, PathBuf::from("runs/t"));
    }

    #[test]
    fn ids_ignore_key_order_and_number_spelling() {
        let axes = "[sweep.axes]\n\"train.epochs\" = [1]\n";
        let a = plan(&base(axes)).unwrap();
        let respelled = base(axes).replace("lr = 0.001", "lr = 1e-3");
        assert_ne!(respelled, base(axes), "the fixture must spell lr as 0.001");
        let b = plan(&respelled).unwrap();
        assert_eq!(a.points[0].id, b.points[0].id);
        let reordered = format!("{}[optimizer]\nlr = 0.001\n", base(axes).replacen("[optimizer]\nlr = 0.001\n", "", 1));
        assert_ne!(reordered, base(axes));
        assert_eq!(a.points[0].id, plan(&reordered).unwrap().points[0].id);
        let c = plan(&base("[sweep.axes]\n\"train.epochs\" = [2]\n")).unwrap();
        assert_ne!(a.points[0].id, c.points[0].id);
    }

    #[test]
    fn bad_sweeps_are_located_errors() {
        let e = plan(&base("[sweep.axes]\n\"optimizer.lr\" = []\n")).err().unwrap();
        assert!(e.message.contains("empty"), "{e}");
        assert!(e.line > 1);
        let e = plan(&base("[sweep.axes]\n\"optimizer.lrr\" = [0.1]\n")).err().unwrap();
        assert!(e.message.contains("lrr") && e.message.contains("did you mean `lr`"), "{e}");
        let e = plan(&base("[sweep.axes]\n\"model.vision.widht\" = [8]\n")).err().unwrap();
        assert!(e.message.contains("does not set"), "{e}");
        let e = plan(&base(
            "[sweep.axes]\n\"optimizer.lr\" = [0.1, 0.2]\n[[sweep.include]]\n\"optimizer.lr\" = 0.3\n[[sweep.exclude]]\n\"optimizer.lr\" = 0.3\n",
        ))
        .err()
        .unwrap();
        assert!(e.message.contains("include row 0 is removed again by exclude row 0"), "{e}");
        let e = plan(&base("[sweep.axes]\n\"optimizer.lr\" = [0.1]\n[[sweep.exclude]]\n\"train.epochs\" = 1\n"))
            .err()
            .unwrap();
        assert!(e.message.contains("not an axis"), "{e}");
    }
}
