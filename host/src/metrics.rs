//! Continual-learning summaries of a result matrix, exactly as REFERENCES.md defines them.
//!
//! `r[t][i]` is the score on task i (0-based) after training t tasks; row 0 is the model
//! before any training, so a run over T tasks has T + 1 rows and T columns. Task i is trained
//! at stage i + 1.

use serde::Serialize;

/// The summaries of one metric.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ClSummary {
    /// mean_i r[T][i]
    pub last: f64,
    /// Mean over stages t = 1..T of mean_i r[t][i] (the model before training is excluded).
    pub avg: f64,
    /// MTIL's Avg: the mean of every entry of r[1..=T].
    pub avg_mtil: f64,
    /// mean over i < T-1 of (r[T][i] - r[i+1][i]): how much later tasks changed earlier ones.
    pub bwt: Option<f64>,
    /// mean over i < T-1 of (max_{t < T} r[t][i] - r[T][i]).
    pub forgetting: Option<f64>,
    /// mean over i of (r[i][i] - random[i]): the score on a task just before training it,
    /// above the random baseline (present only when a baseline is given).
    pub fwt: Option<f64>,
    /// MTIL "Transfer", read with the initial model: for each task, the mean of r[t][i] over
    /// the stages t <= i before it is trained (t = 0 included), averaged over all tasks. This
    /// is the one Recall prints.
    pub transfer: f64,
    /// MTIL "Transfer" as ZSCL's code computes it (its matrix has no row for the initial
    /// model): for each task i >= 1, the mean of r[t][i] over stages 1..=i, averaged over
    /// those tasks; the first task has none. `None` for a single task.
    #[serde(default)]
    pub transfer_zscl: Option<f64>,
}

fn mean(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = v.into_iter().fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Why a matrix cannot be summarised.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "result matrix has {rows} rows for {tasks} tasks; expected {tasks} + 1 (row 0 is the model before training)"
    )]
    Shape { rows: usize, tasks: usize },
    #[error("row {0} of the result matrix has a different number of tasks")]
    Ragged(usize),
    #[error("random baseline has {got} entries for {tasks} tasks")]
    Baseline { got: usize, tasks: usize },
}

/// Summarise `r` (T + 1 rows, T columns); `random` is the per-task random-chance score for FWT.
pub fn summarize(r: &[Vec<f64>], random: Option<&[f64]>) -> Result<ClSummary, MetricsError> {
    let tasks = r.first().map_or(0, Vec::len);
    if tasks == 0 || r.len() != tasks + 1 {
        return Err(MetricsError::Shape { rows: r.len(), tasks });
    }
    if let Some(bad) = r.iter().position(|row| row.len() != tasks) {
        return Err(MetricsError::Ragged(bad));
    }
    if let Some(b) = random {
        if b.len() != tasks {
            return Err(MetricsError::Baseline { got: b.len(), tasks });
        }
    }
    let t_last = tasks;
    let row_mean = |t: usize| mean(r[t].iter().copied()).unwrap_or(f64::NAN);
    Ok(ClSummary {
        last: row_mean(t_last),
        avg: mean((1..=t_last).map(row_mean)).unwrap_or(f64::NAN),
        avg_mtil: mean(r[1..].iter().flatten().copied()).unwrap_or(f64::NAN),
        bwt: mean((0..tasks - 1).map(|i| r[t_last][i] - r[i + 1][i])),
        forgetting: mean((0..tasks - 1).map(|i| {
            let best = (0..t_last).map(|t| r[t][i]).fold(f64::NEG_INFINITY, f64::max);
            best - r[t_last][i]
        })),
        fwt: random.and_then(|b| mean((0..tasks).map(|i| r[i][i] - b[i]))),
        transfer: mean((0..tasks).filter_map(|i| mean((0..=i).map(|t| r[t][i])))).unwrap_or(f64::NAN),
        transfer_zscl: mean((1..tasks).filter_map(|i| mean((1..=i).map(|t| r[t][i])))),
    })
}

/// PD (C-CLIP): per held-out set, the zero-shot score of the initial model minus that of the
/// final model. `zs[t][k]` is the score on held-out set k after t tasks.
pub fn performance_drop(zs: &[Vec<f64>]) -> Vec<f64> {
    match (zs.first(), zs.last()) {
        (Some(first), Some(last)) => first.iter().zip(last).map(|(a, b)| a - b).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    /// Three tasks; values chosen so every summary can be checked by hand.
    #[test]
    fn hand_computed_three_tasks() {
        let r = vec![
            vec![10.0, 20.0, 30.0], // before training
            vec![80.0, 25.0, 30.0], // after task 0
            vec![60.0, 90.0, 35.0], // after task 1
            vec![50.0, 70.0, 95.0], // after task 2
        ];
        let s = summarize(&r, Some(&[5.0, 5.0, 5.0])).unwrap();
        close(s.last, (50.0 + 70.0 + 95.0) / 3.0);
        // Row means: 45, 61.666.., 71.666..
        close(s.avg, (45.0 + 185.0 / 3.0 + 215.0 / 3.0) / 3.0);
        close(s.avg_mtil, (80.0 + 25.0 + 30.0 + 60.0 + 90.0 + 35.0 + 50.0 + 70.0 + 95.0) / 9.0);
        // BWT: task 0: 50 - 80 = -30; task 1: 70 - 90 = -20.
        close(s.bwt.unwrap(), -25.0);
        // Forgetting: task 0: max(10, 80, 60) - 50 = 30; task 1: max(20, 25, 90) - 70 = 20.
        close(s.forgetting.unwrap(), 25.0);
        // FWT: r[0][0] - 5, r[1][1] - 5, r[2][2] - 5 = 5, 20, 30.
        close(s.fwt.unwrap(), (5.0 + 20.0 + 30.0) / 3.0);
        // Transfer: task 0: r[0][0] = 10; task 1: (20 + 25) / 2; task 2: (30 + 30 + 35) / 3.
        close(s.transfer, (10.0 + 22.5 + 95.0 / 3.0) / 3.0);
        // ZSCL's reading, without row 0: task 1: r[1][1] = 25; task 2: (30 + 35) / 2.
        close(s.transfer_zscl.unwrap(), (25.0 + 32.5) / 2.0);
    }

    /// ZSCL's own statistics (mtil/results.ipynb, transcribed in
    /// tests/fixtures/metrics/make_mtil.py) on a matrix of its layout, against ours on the
    /// same matrix with the initial model's row in front.
    #[test]
    fn mtil_transfer_and_avg_match_zscls_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/metrics/mtil.json");
        let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let rows = |k: &str| -> Vec<Vec<f64>> { serde_json::from_value(fx[k].clone()).unwrap() };
        let mut r = rows("initial");
        r.extend(rows("zscl_matrix"));
        let s = summarize(&r, None).unwrap();
        close(s.transfer_zscl.unwrap(), fx["zscl_transfer"].as_f64().unwrap());
        close(s.avg_mtil, fx["zscl_avg"].as_f64().unwrap());
        close(s.last, fx["zscl_last"].as_f64().unwrap());
        close(s.transfer, fx["transfer_with_initial"].as_f64().unwrap());
    }

    #[test]
    fn ties_in_the_best_score_and_a_single_task() {
        // Ties: the best earlier score equals the final one, so forgetting is 0, not negative.
        let r = vec![vec![40.0, 10.0], vec![70.0, 10.0], vec![70.0, 60.0]];
        let s = summarize(&r, None).unwrap();
        close(s.forgetting.unwrap(), 0.0);
        close(s.bwt.unwrap(), 0.0);
        assert_eq!(s.fwt, None);
        // One task: no earlier tasks, so no BWT or forgetting; t = 0 still counts for transfer.
        let s = summarize(&[vec![12.0], vec![80.0]], None).unwrap();
        assert_eq!((s.bwt, s.forgetting, s.transfer_zscl), (None, None, None));
        close(s.transfer, 12.0);
        close(s.last, 80.0);
    }

    #[test]
    fn malformed_matrices_are_errors() {
        assert!(matches!(summarize(&[vec![1.0, 2.0]], None), Err(MetricsError::Shape { .. })));
        assert!(matches!(summarize(&[vec![1.0], vec![1.0, 2.0]], None), Err(MetricsError::Ragged(1))));
        assert!(matches!(summarize(&[vec![1.0], vec![2.0]], Some(&[1.0, 2.0])), Err(MetricsError::Baseline { .. })));
    }

    #[test]
    fn pd_is_initial_minus_final() {
        assert_eq!(performance_drop(&[vec![60.0, 50.0], vec![55.0, 45.0], vec![40.0, 48.0]]), vec![20.0, 2.0]);
    }
}
