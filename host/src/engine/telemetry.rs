//! Training telemetry: what the steps of a task did, gathered over a window of
//! `[train] log_every_steps` steps and recorded at the global step, so a loss curve exists
//! for every run (the event log, the tracker, the progress bar, `log.txt`).

use std::collections::BTreeMap;

use super::StepStats;

/// One step as telemetry sees it.
pub(crate) struct StepRecord<'a> {
    /// Steps taken in the run so far, this one included: the x axis of every curve.
    pub steps_done: usize,
    /// The epoch, fractional within it (2.5: half-way through the third).
    pub epoch: f64,
    /// The schedule's lr factor at this step.
    pub lr_factor: f64,
    pub stats: &'a StepStats,
    pub images: usize,
    pub seconds: f64,
}

/// Where the last step of a window stood: steps done, epoch, lr factor.
type Position = (usize, f64, f64);

/// Steps since the last record.
#[derive(Default)]
pub(crate) struct Window {
    steps: usize,
    loss: f64,
    terms: BTreeMap<String, f64>,
    grad_norms: Vec<f64>,
    images: usize,
    seconds: f64,
    last: Option<Position>,
}

impl Window {
    /// Add a step; when `steps_done` is a multiple of `every`, the metrics to record (and the
    /// window starts again). `base_lrs` are each group's lr before the schedule's factor.
    pub fn add(&mut self, r: StepRecord, every: usize, base_lrs: &[(String, f64)]) -> Option<Vec<(String, f64, u64)>> {
        self.steps += 1;
        self.loss += r.stats.loss;
        for (name, v) in &r.stats.terms {
            *self.terms.entry(name.clone()).or_default() += v;
        }
        self.grad_norms.extend(r.stats.grad_norm);
        self.images += r.images;
        self.seconds += r.seconds;
        self.last = Some((r.steps_done, r.epoch, r.lr_factor));
        r.steps_done.is_multiple_of(every.max(1)).then(|| self.take(base_lrs)).flatten()
    }

    /// The window's mean loss, if it holds a step.
    pub fn running_loss(&self) -> Option<f64> {
        (self.steps > 0).then(|| self.loss / self.steps as f64)
    }

    /// The metrics of the steps gathered so far (none when empty), and an empty window; each
    /// group's lr is its base lr at the last step's factor.
    pub fn take(&mut self, base_lrs: &[(String, f64)]) -> Option<Vec<(String, f64, u64)>> {
        let w = std::mem::take(self);
        let (steps_done, epoch, factor) = w.last?;
        let n = w.steps as f64;
        let at = steps_done as u64;
        let mut out = vec![("train/loss".to_string(), w.loss / n, at)];
        out.extend(w.terms.into_iter().map(|(k, v)| (format!("train/{k}"), v / n, at)));
        out.extend(base_lrs.iter().map(|(k, v)| (format!("train/{k}"), v * factor, at)));
        if !w.grad_norms.is_empty() {
            out.push(("train/grad_norm".into(), w.grad_norms.iter().sum::<f64>() / w.grad_norms.len() as f64, at));
        }
        if w.seconds > 0.0 {
            out.push(("train/images_per_second".into(), w.images as f64 / w.seconds, at));
        }
        out.push(("train/epoch".into(), epoch, at));
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(loss: f64, ckc: f64, norm: Option<f64>) -> StepStats {
        StepStats {
            loss,
            terms: vec![("clip".into(), loss - ckc), ("ckc".into(), ckc)],
            peak_memory: None,
            graph: None,
            grad_norm: norm,
        }
    }

    #[test]
    fn a_window_averages_its_steps_and_records_at_the_global_step() {
        let mut w = Window::default();
        let lrs = [("lr".to_string(), 2e-3), ("lr/group0".to_string(), 2e-2)];
        let s1 = stats(2.0, 0.5, Some(1.0));
        let s2 = stats(4.0, 1.5, None);
        let r = |s, n| StepRecord {
            steps_done: n,
            epoch: 0.25 * n as f64,
            lr_factor: 0.5,
            stats: s,
            images: 8,
            seconds: 0.5,
        };
        assert!(w.add(r(&s1, 9), 10, &lrs).is_none());
        assert_eq!(w.running_loss(), Some(2.0));
        let m = w.add(r(&s2, 10), 10, &lrs).unwrap();
        let get = |k: &str| m.iter().find(|(n, _, _)| n == k).map(|(_, v, s)| (*v, *s));
        assert_eq!(get("train/loss"), Some((3.0, 10)));
        assert_eq!(get("train/ckc"), Some((1.0, 10)));
        assert_eq!(get("train/clip"), Some((2.0, 10)));
        assert_eq!(get("train/lr/group0"), Some((1e-2, 10)));
        assert_eq!(get("train/grad_norm"), Some((1.0, 10)), "the mean of the steps that computed one");
        assert_eq!(get("train/images_per_second"), Some((16.0, 10)));
        assert_eq!(get("train/epoch"), Some((2.5, 10)));
        assert!(w.take(&lrs).is_none(), "the window starts again");
        assert!(w.running_loss().is_none());
    }
}
