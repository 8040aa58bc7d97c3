//! `recall bench`: what a training step costs.
//!
//! - [`step`] times the real step of any experiment (its model, adapter, strategies, old
//!   model and optimizer) and counts what it creates, reads back and keeps for backward;
//!   `scripts/bench-step.sh` runs it beside `scripts/torch_step.py` and prints the ratios.
//! - [`boundary`] is the plugin boundary's cost: the same step through the plugins and
//!   through the same ops linked into the host (target <= 1.02).

pub mod boundary;
pub mod loader;
pub mod step;

pub use boundary::{both_paths, BenchResult, BENCH_EXPERIMENT};

/// The median and 90th percentile of `v` (sorted in place).
pub fn median_p90(v: &mut [f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}
