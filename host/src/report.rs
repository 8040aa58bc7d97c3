//! `recall table RUN_DIR...`: the continual-learning table of finished runs, as Markdown —
//! Avg and Last R@1 both ways, BWT and forgetting (mean of both directions), PD per held-out
//! set, trainable parameters, batch size and wall time, one row per run.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// What the table reads from a run's summary.json.
#[derive(serde::Deserialize)]
struct Summary {
    trainable_parameters: usize,
    batch_size: usize,
    train_seconds: f64,
    continual: std::collections::BTreeMap<String, crate::metrics::ClSummary>,
    #[serde(default)]
    performance_drop: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>,
}

fn load(dir: &Path) -> anyhow::Result<Summary> {
    let f = dir.join("summary.json");
    let text = std::fs::read_to_string(&f)
        .with_context(|| format!("{} has no summary.json (unfinished run? resume it with --resume)", dir.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a Recall run summary", f.display()))
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

/// The Markdown table of `runs` (labelled by directory name).
pub fn table(runs: &[PathBuf]) -> anyhow::Result<String> {
    let summaries: Vec<(String, Summary)> = runs
        .iter()
        .map(|d| {
            let label =
                d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| d.display().to_string());
            load(d).map(|s| (label, s))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut heldout: Vec<String> = Vec::new();
    for (_, s) in &summaries {
        if let Some(sets) = s.performance_drop.get("zeroshot/top1") {
            for k in sets.keys() {
                if !heldout.contains(k) {
                    heldout.push(k.clone());
                }
            }
        }
    }
    let mut out = String::from("| run | Avg I2T R@1 | Avg T2I R@1 | Last I2T R@1 | Last T2I R@1 | BWT | forgetting |");
    for h in &heldout {
        out.push_str(&format!(" PD {h} |"));
    }
    out.push_str(" trainable params | batch | train s |\n|---|");
    out.push_str(&"---:|".repeat(6 + heldout.len() + 3));
    out.push('\n');
    for (label, s) in &summaries {
        let i2t = s.continual.get("retrieval/i2t_r1");
        let t2i = s.continual.get("retrieval/t2i_r1");
        let both = |f: fn(&crate::metrics::ClSummary) -> Option<f64>| match (i2t.and_then(f), t2i.and_then(f)) {
            (Some(a), Some(b)) => Some((a + b) / 2.0),
            _ => None,
        };
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} | {} |",
            fmt(i2t.map(|s| s.avg)),
            fmt(t2i.map(|s| s.avg)),
            fmt(i2t.map(|s| s.last)),
            fmt(t2i.map(|s| s.last)),
            fmt(both(|s| s.bwt)),
            fmt(both(|s| s.forgetting)),
        ));
        for h in &heldout {
            out.push_str(&format!(
                " {} |",
                fmt(s.performance_drop.get("zeroshot/top1").and_then(|m| m.get(h)).copied())
            ));
        }
        out.push_str(&format!(" {} | {} | {:.0} |\n", s.trainable_parameters, s.batch_size, s.train_seconds));
    }
    Ok(out)
}
