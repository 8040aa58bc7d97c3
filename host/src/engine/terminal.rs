//! What a run shows on the terminal: progress bars and the tables after each stage.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use super::ResultMatrix;
use crate::data::TaskData;

pub(crate) fn progress(quiet: bool, len: u64, label: String, unit: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{per_sec}}  {{elapsed}} elapsed, eta {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(label);
    pb
}

/// "the initial model" or "task N (`name`)": the stage an evaluation belongs to.
pub(crate) fn stage_label(tasks: &[TaskData], stage: usize) -> String {
    match stage.checked_sub(1).and_then(|i| tasks.get(i)) {
        None => "the initial model".into(),
        Some(t) => format!("task {stage} (`{}`)", t.name),
    }
}

/// Format the retrieval table printed after each task.
pub fn format_table(results: &ResultMatrix, stage: usize, metrics: &[&str]) -> String {
    let mut s = String::new();
    let label = if stage == 0 {
        "before training".to_string()
    } else {
        format!("after task {stage} ({})", results.tasks[stage - 1])
    };
    s.push_str(&format!("\n{label}\n"));
    s.push_str(&format!("{:<20}", "eval task"));
    for m in metrics {
        s.push_str(&format!("{:>12}", m.rsplit('/').next().unwrap_or(m)));
    }
    s.push('\n');
    for (i, task) in results.tasks.iter().enumerate() {
        s.push_str(&format!("{:<20}", task));
        for m in metrics {
            let v = results.rows[stage][i].get(*m).copied().unwrap_or(f64::NAN);
            s.push_str(&format!("{v:>12.2}"));
        }
        s.push('\n');
    }
    s
}

/// Metric columns in reading order: each evaluator's together (in the order first seen),
/// image-to-text recalls by K, then text-to-image by K, then top-K accuracies by K, then the
/// rest (`mean_recall`), and what chance scores last.
pub(crate) fn ordered_columns(names: Vec<String>) -> Vec<String> {
    let mut plugins: Vec<String> = Vec::new();
    for n in &names {
        let p = n.rsplit_once('/').map_or("", |(p, _)| p).to_string();
        if !plugins.contains(&p) {
            plugins.push(p);
        }
    }
    let key = |n: &String| {
        let (plugin, metric) = n.rsplit_once('/').unwrap_or(("", n));
        let (metric, chance) = metric.strip_suffix("_chance").map_or((metric, false), |m| (m, true));
        let k: usize = metric.rsplit(|c: char| !c.is_ascii_digit()).next().and_then(|d| d.parse().ok()).unwrap_or(0);
        let class = if metric.starts_with("i2t_r") {
            0
        } else if metric.starts_with("t2i_r") {
            1
        } else if metric.starts_with("top") {
            2
        } else {
            3
        };
        (plugins.iter().position(|p| p == plugin), chance, class, k, metric.to_string())
    };
    let mut names = names;
    names.sort_by_key(key);
    names
}

/// A table of one stage's zero-shot scores.
pub(crate) fn format_heldout(heldout: &ResultMatrix, stage: usize) -> String {
    let names: Vec<String> = ordered_columns(heldout.metric_names());
    // Columns as wide as their names, so long metric names stay apart.
    let widths: Vec<usize> = names.iter().map(|m| m.len().max(8) + 2).collect();
    let mut s = format!("{:<20}", "zero-shot set");
    for (m, w) in names.iter().zip(&widths) {
        s.push_str(&format!("{m:>w$}"));
    }
    s.push('\n');
    for (i, set) in heldout.tasks.iter().enumerate() {
        s.push_str(&format!("{set:<20}"));
        for (m, w) in names.iter().zip(&widths) {
            let v = heldout.rows[stage][i].get(m).copied().unwrap_or(f64::NAN);
            s.push_str(&format!("{v:>w$.2}"));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_read_i2t_then_t2i_by_k_then_the_mean_and_chance_last() {
        let names = [
            "retrieval/i2t_r10",
            "retrieval/i2t_r1",
            "retrieval/mean_recall",
            "retrieval/t2i_r5",
            "retrieval/i2t_r5",
            "retrieval/t2i_r1",
            "retrieval/t2i_r10",
            "retrieval/i2t_r1_chance",
        ];
        let got = ordered_columns(names.iter().map(|s| s.to_string()).collect());
        let want = [
            "retrieval/i2t_r1",
            "retrieval/i2t_r5",
            "retrieval/i2t_r10",
            "retrieval/t2i_r1",
            "retrieval/t2i_r5",
            "retrieval/t2i_r10",
            "retrieval/mean_recall",
            "retrieval/i2t_r1_chance",
        ];
        assert_eq!(got, want);
        let zs = ["zeroshot/top5_chance", "zeroshot/top5", "zeroshot/top1_chance", "zeroshot/top1"];
        let got = ordered_columns(zs.iter().map(|s| s.to_string()).collect());
        assert_eq!(got, ["zeroshot/top1", "zeroshot/top5", "zeroshot/top1_chance", "zeroshot/top5_chance"]);
    }
}
