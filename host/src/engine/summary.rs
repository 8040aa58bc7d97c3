//! The end of a run: the continual-learning summaries of its result matrices, the table on
//! the terminal, summary.json, the R-matrix CSVs and the metrics tracked once.

use std::collections::BTreeMap;
use std::path::Path;

use super::session::Session;
use super::store::Progress;
use super::{DataCounts, Performance, RunSummary};
use crate::rundir::RunDir;

/// The summary of a finished run.
pub(crate) fn build(
    session: &Session,
    p: Progress,
    run_dir: &Path,
    peak_memory: Option<u64>,
) -> anyhow::Result<RunSummary> {
    let c = &session.cfg.config;
    let rt = session.runtime();
    let continual = continual_summaries(&p.results);
    // Summarised when every task has a validation split (a run resumed from before the
    // validation matrix existed has rows for later stages only: none then).
    let every_task = p.validation_results.rows.iter().all(|r| r.iter().all(|cell| !cell.is_empty()));
    let validation_continual = match every_task && p.validation_results.rows.len() == p.results.rows.len() {
        true => continual_summaries(&p.validation_results),
        false => BTreeMap::new(),
    };
    let performance_drop: BTreeMap<String, BTreeMap<String, f64>> = p
        .heldout
        .metric_names()
        .into_iter()
        .filter(|m| !m.ends_with("_chance"))
        .map(|m| {
            let pd = crate::metrics::performance_drop(&p.heldout.metric(&m));
            (m, p.heldout.tasks.iter().cloned().zip(pd).collect())
        })
        .collect();
    let data = session
        .tasks
        .iter()
        .chain(&session.heldout_sets)
        .map(|t| (t.name.clone(), DataCounts { train: t.train.len(), test: t.test.len(), skipped: t.skipped.len() }))
        .collect();
    Ok(RunSummary {
        name: c.experiment.name.clone(),
        seed: c.experiment.seed,
        run_dir: run_dir.to_path_buf(),
        trainable_parameters: session.model.trainable_parameters(),
        total_parameters: rt.params().iter().map(|p| p.var.elem_count()).sum::<usize>(),
        batch_size: c.train.batch_size,
        epoch_losses: p.epoch_losses,
        epoch_terms: p.epoch_terms,
        results: p.results,
        heldout: p.heldout,
        validation: p.validation,
        validation_results: p.validation_results,
        validation_continual,
        continual,
        performance_drop,
        data,
        steps: p.global_step,
        train_seconds: p.train_seconds,
        performance: Performance {
            precision: c.train.precision.clone(),
            device: format!("{:?}", rt.device()),
            steps_per_second: p.global_step as f64 / p.step_seconds.max(1e-9),
            images_per_second: p.images_seen as f64 / p.step_seconds.max(1e-9),
            memory_kind: if peak_memory.is_some() { "device".into() } else { "host-rss".into() },
            peak_memory_bytes: peak_memory.or_else(crate::runtime::peak_rss),
        },
    })
}

/// The continual-learning summary of every metric of a result matrix. Evaluators may report
/// a metric's chance level as `{metric}_chance` (what a random model scores on the split): it
/// is FWT's random baseline, not a score of its own.
fn continual_summaries(m: &crate::engine::ResultMatrix) -> BTreeMap<String, crate::metrics::ClSummary> {
    m.metric_names()
        .into_iter()
        .filter(|name| !name.ends_with("_chance"))
        .filter_map(|name| {
            let chance: Option<Vec<f64>> =
                m.rows.first()?.iter().map(|cell| cell.get(&format!("{name}_chance")).copied()).collect();
            crate::metrics::summarize(&m.metric(&name), chance.as_deref()).ok().map(|s| (name, s))
        })
        .collect()
}

/// The continual summary table and the performance drops.
pub(crate) fn print(summary: &RunSummary, shown: &[String]) {
    println!(
        "\n{:<26}{:>9}{:>9}{:>9}{:>12}{:>10}{:>9}",
        "continual summary", "last", "avg", "bwt", "forgetting", "transfer", "fwt"
    );
    for m in shown {
        if let Some(s) = summary.continual.get(m) {
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
            println!(
                "{:<26}{:>9.2}{:>9.2}{:>9}{:>12}{:>10.2}{:>9}",
                m,
                s.last,
                s.avg,
                opt(s.bwt),
                opt(s.forgetting),
                s.transfer,
                opt(s.fwt)
            );
        }
    }
    for (m, sets) in &summary.performance_drop {
        for (set, pd) in sets {
            println!("PD {m:<23} {set:<20} {pd:>8.2}");
        }
    }
}

/// The R-matrix CSVs and summary.json; returns the files a tracker uploads.
pub(crate) fn write(summary: &RunSummary, dir: &RunDir) -> anyhow::Result<Vec<String>> {
    for (suite, m) in [("", &summary.results), ("zeroshot__", &summary.heldout)] {
        for name in m.metric_names() {
            let values = m.metric(&name);
            let mut csv = format!("stage,{}\n", m.tasks.join(","));
            for (t, row) in values.iter().enumerate() {
                csv.push_str(&format!("{t},{}\n", row.iter().map(|v| format!("{v}")).collect::<Vec<_>>().join(",")));
            }
            dir.write_r_matrix(&format!("{suite}{}", name.replace('/', "__")), &csv)?;
        }
    }
    dir.write_summary(summary)?;
    let mut files = vec!["config.resolved.toml".to_string(), "summary.json".into(), "splits.json".into()];
    files.extend(dir.r_matrix_files()?);
    // The records of how it ran: the log (complete but for its last lines), the build and
    // command line, the plugins' libraries.
    files.extend(
        ["run.json", "plugins.json", "log.txt"].into_iter().map(String::from).filter(|f| dir.path().join(f).is_file()),
    );
    Ok(files)
}

/// The metrics a finished run reports once (at step = the number of tasks): Last, Avg,
/// BWT and forgetting per metric, PD per zero-shot set, the training time.
pub(crate) fn final_metrics(summary: &RunSummary) -> Vec<(String, f64, u64)> {
    let t = summary.results.tasks.len() as u64;
    let mut metrics = Vec::new();
    for (m, s) in &summary.continual {
        let every = [
            ("last", Some(s.last)),
            ("avg", Some(s.avg)),
            ("avg_mtil", Some(s.avg_mtil)),
            ("bwt", s.bwt),
            ("forgetting", s.forgetting),
            ("fwt", s.fwt),
            ("transfer", Some(s.transfer)),
            ("transfer_zscl", s.transfer_zscl),
        ];
        for (k, v) in every {
            if let Some(v) = v {
                metrics.push((format!("continual/{m}/{k}"), v, t));
            }
        }
    }
    for (m, sets) in &summary.performance_drop {
        for (set, v) in sets {
            metrics.push((format!("pd/{m}/{set}"), *v, t));
        }
    }
    metrics.push(("train_seconds".into(), summary.train_seconds, t));
    metrics
}
