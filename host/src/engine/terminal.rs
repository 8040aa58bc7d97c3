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

/// A table of one stage's zero-shot scores.
pub(crate) fn format_heldout(heldout: &ResultMatrix, stage: usize) -> String {
    let names: Vec<String> = heldout.metric_names();
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
