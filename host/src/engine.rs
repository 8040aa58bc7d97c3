//! The training engine: the task sequence, the training step, evaluation after every task,
//! and the run directory.
//!
//! One training step: forward both towers through the plugins, CLIP's contrastive loss on the
//! host, plus every strategy's loss terms, ONE backward pass over the one graph, gradient
//! clipping, an AdamW step under the warmup + cosine schedule.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use recall_sdk::TaskInfo;
use serde::Serialize;

use crate::config::LoadedConfig;
use crate::data::{self, shapes, TaskData};
use crate::fsutil::write_atomic;
use crate::loader::Registry;
use crate::model::{locate_failure, Model};
use crate::optim::{clip_factor, lr_factor, AdamW};
use crate::plugin::{EvaluatorInstance, StrategyInstance};
use crate::runtime::ops;

/// How the engine reports progress.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// No progress bars and no tables on stdout.
    pub quiet: bool,
    /// Use this run directory instead of a fresh one under `output_dir`.
    pub run_dir: Option<PathBuf>,
}

/// Scores after each stage: `rows[t][i]` = metrics on task i after training t tasks (t = 0:
/// the initial model).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ResultMatrix {
    pub tasks: Vec<String>,
    pub rows: Vec<Vec<BTreeMap<String, f64>>>,
}

impl ResultMatrix {
    /// The matrix of one metric, [stages][tasks].
    pub fn metric(&self, name: &str) -> Vec<Vec<f64>> {
        self.rows.iter().map(|r| r.iter().map(|m| m.get(name).copied().unwrap_or(f64::NAN)).collect()).collect()
    }

    pub fn metric_names(&self) -> Vec<String> {
        self.rows.first().and_then(|r| r.first()).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub name: String,
    pub seed: u64,
    pub run_dir: PathBuf,
    pub trainable_parameters: usize,
    pub total_parameters: usize,
    pub batch_size: usize,
    /// Mean training loss of each epoch, per task.
    pub epoch_losses: Vec<Vec<f64>>,
    /// Mean of each strategy loss term per epoch, per task (the task loss is `clip`).
    pub epoch_terms: Vec<Vec<BTreeMap<String, f64>>>,
    pub results: ResultMatrix,
    /// Continual-learning summaries (Last, Avg, BWT, forgetting, transfer) per metric.
    pub continual: BTreeMap<String, crate::metrics::ClSummary>,
    pub steps: usize,
    pub train_seconds: f64,
}

#[derive(Serialize)]
struct MetricRecord<'a> {
    stage: usize,
    trained_tasks: usize,
    eval_task: &'a str,
    metric: &'a str,
    value: f64,
}

/// Generate every task's data at the vision tower's image size.
pub fn load_tasks(cfg: &LoadedConfig, image_size: usize) -> Vec<TaskData> {
    cfg.config.tasks.iter().map(|t| shapes::generate(t, image_size, cfg.config.experiment.seed)).collect()
}

/// Image and caption embeddings of a test split, computed in evaluation mode.
fn embed_split(model: &Model, split: &[data::Example], batch: usize) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    let rt = &model.runtime;
    let mut img = Vec::new();
    for chunk in split.chunks(batch.max(1)) {
        let refs: Vec<&data::Example> = chunk.iter().collect();
        let px = data::pixel_batch(&refs, &model.preprocess, rt.device(), rt.float_dtype())?;
        img.push(model.encode_images(&px)?.detach());
    }
    let mut captions = Vec::new();
    let mut index = Vec::new();
    for (i, ex) in split.iter().enumerate() {
        for c in &ex.captions {
            captions.push(c.clone());
            index.push(i as u32);
        }
    }
    let mut txt = Vec::new();
    for chunk in captions.chunks(batch.max(1)) {
        let (ids, mask) = model.tokenize(chunk)?;
        txt.push(model.encode_texts(&ids, &mask)?.detach());
    }
    let index = Tensor::from_vec(index.clone(), index.len(), rt.device())?;
    Ok((Tensor::cat(&img, 0)?, Tensor::cat(&txt, 0)?, index))
}

/// Every evaluator on one task's test split; metric names are `{plugin}/{metric}`.
pub fn evaluate(
    model: &Model,
    evaluators: &[EvaluatorInstance],
    task: &TaskData,
    batch: usize,
) -> anyhow::Result<BTreeMap<String, f64>> {
    model.runtime.set_training(false);
    let (img, txt, index) = embed_split(model, &task.test, batch)?;
    let mut out = BTreeMap::new();
    for e in evaluators {
        for (name, value) in
            e.evaluate(&[("image_embeds", &img), ("text_embeds", &txt), ("text_image_index", &index)])?
        {
            out.insert(format!("{}/{}", e.plugin, name), value);
        }
    }
    Ok(out)
}

/// A fresh run directory `output_dir/NAME-seedS-N` (N counts up).
fn new_run_dir(output_dir: &Path, name: &str, seed: u64) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("cannot create output directory {}", output_dir.display()))?;
    for n in 0.. {
        let dir = output_dir.join(format!("{name}-seed{seed}-{n:03}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create run directory {}", dir.display())),
        }
    }
    unreachable!()
}

fn progress(quiet: bool, len: u64, label: String, unit: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{msg:>24}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{per_sec}}  eta {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(label);
    pb
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

/// Run an experiment end to end.
pub fn run(cfg: &LoadedConfig, registry: &Registry, opts: &RunOptions) -> anyhow::Result<RunSummary> {
    let c = &cfg.config;
    let model = Model::build(cfg, registry)?;
    let rt = model.runtime.clone();
    let strategies = c
        .strategies
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p =
                registry.get(&s.plugin, "strategy").map_err(|m| cfg.error_at(&format!("strategy[{i}].plugin"), m))?;
            StrategyInstance::create(p, &rt, &format!("strategy.{i}."), &s.options_text())
                .map_err(|e| anyhow::Error::new(locate_failure(cfg, &format!("strategy[{i}]"), e)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let evaluators = c
        .evaluators
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p =
                registry.get(&s.plugin, "evaluator").map_err(|m| cfg.error_at(&format!("evaluator[{i}].plugin"), m))?;
            EvaluatorInstance::create(p, &rt, &s.options_text())
                .map_err(|e| anyhow::Error::new(locate_failure(cfg, &format!("evaluator[{i}]"), e)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    // A frozen copy of the model for strategies that compare against the old model (CKC,
    // LwF): built once, its parameters overwritten with the trained ones before each task.
    let wants_old =
        strategies.iter().map(StrategyInstance::wants_old_model).collect::<Result<Vec<_>, _>>()?.into_iter().any(|w| w);
    let old_model = if wants_old { Some(Model::build(cfg, registry)?) } else { None };
    let tasks = load_tasks(cfg, model.image_size);
    let run_dir = match &opts.run_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => new_run_dir(&c.experiment.output_dir, &c.experiment.name, c.experiment.seed)?,
    };
    write_atomic(&run_dir.join("config.resolved.toml"), toml::to_string(c)?.as_bytes())?;
    let plugins: Vec<serde_json::Value> = registry
        .plugins
        .iter()
        .map(|p| serde_json::json!({"name": p.name, "kind": p.kind, "version": p.version, "sdk": p.sdk_version, "path": p.path}))
        .collect();
    write_atomic(&run_dir.join("plugins.json"), serde_json::to_string_pretty(&plugins)?.as_bytes())?;
    let trainable = model.trainable_parameters();
    let total = rt.params().iter().map(|p| p.var.elem_count()).sum::<usize>();
    tracing::info!(run_dir = %run_dir.display(), trainable, total, "run started");

    let mut results = ResultMatrix { tasks: tasks.iter().map(|t| t.name.clone()).collect(), rows: Vec::new() };
    let mut metrics_log = String::new();
    let eval_stage = |results: &mut ResultMatrix, metrics_log: &mut String, stage: usize| -> anyhow::Result<()> {
        let mut row = Vec::new();
        let pb = progress(opts.quiet, tasks.len() as u64, "evaluating".into(), "tasks");
        for t in &tasks {
            let m = evaluate(&model, &evaluators, t, c.train.eval_batch_size)?;
            pb.inc(1);
            for (name, value) in &m {
                let rec = MetricRecord { stage, trained_tasks: stage, eval_task: &t.name, metric: name, value: *value };
                metrics_log.push_str(&serde_json::to_string(&rec)?);
                metrics_log.push('\n');
            }
            row.push(m);
        }
        pb.finish_and_clear();
        results.rows.push(row);
        write_atomic(&run_dir.join("metrics.jsonl"), metrics_log.as_bytes())?;
        Ok(())
    };
    eval_stage(&mut results, &mut metrics_log, 0)?;
    let shown: Vec<String> = results
        .metric_names()
        .into_iter()
        .filter(|m| m.ends_with("_r1") || m.ends_with("_r5") || m.ends_with("mean_recall"))
        .collect();
    let shown_refs: Vec<&str> = shown.iter().map(String::as_str).collect();
    if !opts.quiet {
        print!("{}", format_table(&results, 0, &shown_refs));
    }

    let mut epoch_losses = Vec::new();
    let mut epoch_terms = Vec::new();
    let mut global_step = 0usize;
    // Live handles after a step must not grow: a plugin that keeps handles it no longer needs
    // leaks memory every step.
    let mut handles_after_first_step: Option<usize> = None;
    let mut leak_reported = false;
    let started = Instant::now();
    let bs = c.train.batch_size;
    for (t_idx, task) in tasks.iter().enumerate() {
        if task.train.len() < 2 {
            bail!("task `{}` has {} training examples; at least 2 are needed", task.name, task.train.len());
        }
        let steps_per_epoch = task.train.len().div_ceil(bs);
        let n_steps = steps_per_epoch * c.train.epochs;
        let info = TaskInfo { index: t_idx as u64, name: task.name.as_str().into(), n_steps: n_steps as u64 };
        if t_idx > 0 {
            if let (Some(a), Some(inst)) = (&c.adapter, &model.adapter) {
                if a.fresh_per_task {
                    inst.reset()?;
                }
            }
        }
        let old = match &old_model {
            Some(m) if t_idx > 0 => {
                copy_parameters(&model, m)?;
                Some(m)
            }
            _ => None,
        };
        for s in &strategies {
            s.before_task(&info)?;
        }
        let mut opt = AdamW::new(&rt.params(), &c.optimizer).map_err(|m| cfg.error_at("optimizer", m))?;
        if t_idx == 0 {
            for g in opt.summary() {
                tracing::info!(group = %g.group, tensors = g.n_tensors, values = g.n_values, lr = g.lr, "optimizer group");
            }
        }
        // Captions: each training image is paired with one of its captions per epoch.
        let pb = progress(opts.quiet, n_steps as u64, format!("task {} {}", t_idx + 1, task.name), "steps");
        let mut losses = Vec::new();
        let mut terms: Vec<BTreeMap<String, f64>> = Vec::new();
        let mut step_in_task = 0usize;
        for epoch in 0..c.train.epochs {
            let mut rng = StdRng::seed_from_u64(c.experiment.seed ^ ((t_idx as u64) << 32) ^ epoch as u64);
            let mut order: Vec<usize> = (0..task.train.len()).collect();
            order.shuffle(&mut rng);
            let mut epoch_loss = 0.0;
            let mut term_sums: BTreeMap<String, f64> = BTreeMap::new();
            let mut n_batches = 0;
            for chunk in order.chunks(bs) {
                if chunk.len() < 2 {
                    continue;
                }
                let examples: Vec<&data::Example> = chunk.iter().map(|&i| &task.train[i]).collect();
                let captions: Vec<String> = examples
                    .iter()
                    .map(|e| e.captions[rand::Rng::random_range(&mut rng, 0..e.captions.len())].clone())
                    .collect();
                rt.set_training(true);
                for s in &strategies {
                    s.before_step(global_step as u64)?;
                }
                let pixels = data::pixel_batch(&examples, &model.preprocess, rt.device(), rt.float_dtype())?;
                let (ids, mask) = model.tokenize(&captions)?;
                let img = model.encode_images(&pixels)?;
                let txt = model.encode_texts(&ids, &mask)?;
                let loss = ops::clip_loss(&img, &txt, &model.logit_scale)?;
                *term_sums.entry("clip".into()).or_default() +=
                    loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                let mut total = loss.clone();
                let old_features = match old {
                    Some(m) => Some((
                        m.encode_images(&pixels)?.detach(),
                        m.encode_texts(&ids, &mask)?.detach(),
                        m.logit_scale.detach(),
                    )),
                    None => None,
                };
                let mut inputs: Vec<(&str, &Tensor)> = vec![
                    ("image_features", &img),
                    ("text_features", &txt),
                    ("logit_scale", &model.logit_scale),
                    ("pixel_values", &pixels),
                    ("input_ids", &ids),
                ];
                if let Some((oi, ot, os)) = &old_features {
                    inputs.push(("old_image_features", oi));
                    inputs.push(("old_text_features", ot));
                    inputs.push(("old_logit_scale", os));
                }
                for s in &strategies {
                    let terms = s.loss_terms(&inputs)?;
                    for (name, term) in terms {
                        if term.elem_count() != 1 {
                            bail!(
                                "strategy `{}` returned loss term `{name}` with shape {:?}; loss terms must be scalars",
                                s.plugin,
                                term.dims()
                            );
                        }
                        let term = term.reshape(())?.to_dtype(total.dtype())?;
                        *term_sums.entry(name).or_default() +=
                            term.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                        total = total.broadcast_add(&term)?;
                    }
                }
                let value = total.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                if !value.is_finite() {
                    bail!("the loss became {value} at step {global_step} of task `{}`; lower the learning rate or enable grad_clip", task.name);
                }
                let grads = total.backward()?;
                for s in &strategies {
                    s.after_backward(global_step as u64)?;
                }
                let scale = clip_factor(opt.grad_norm(&grads)?, c.optimizer.grad_clip);
                let factor = lr_factor(step_in_task, c.optimizer.warmup_steps, n_steps, c.optimizer.min_lr_ratio);
                opt.step(&grads, factor, scale)?;
                clamp_logit_scale(&model)?;
                for s in &strategies {
                    s.after_step(global_step as u64)?;
                }
                drop(grads);
                let live = rt.live_handles();
                match handles_after_first_step {
                    None => handles_after_first_step = Some(live),
                    Some(first) if live > first && !leak_reported => {
                        tracing::warn!(
                            step = global_step,
                            live,
                            first,
                            "live tensor handles grow from step to step: a plugin keeps handles it does not release"
                        );
                        leak_reported = true;
                    }
                    _ => {}
                }
                epoch_loss += value;
                n_batches += 1;
                step_in_task += 1;
                global_step += 1;
                pb.inc(1);
            }
            let mean = epoch_loss / n_batches.max(1) as f64;
            tracing::debug!(task = %task.name, epoch, loss = mean, live_handles = rt.live_handles(), "epoch done");
            losses.push(mean);
            terms.push(term_sums.into_iter().map(|(k, v)| (k, v / n_batches.max(1) as f64)).collect());
        }
        pb.finish_and_clear();
        rt.set_training(false);
        if let (Some(a), Some(inst)) = (&c.adapter, &model.adapter) {
            if a.merge_after_task {
                inst.merge(a.merge_coefficient)?;
                // The merged delta now lives in the base weights: start the adapter afresh so
                // it is not counted twice.
                inst.reset()?;
            }
        }
        for s in &strategies {
            s.after_task(&info)?;
        }
        epoch_losses.push(losses);
        epoch_terms.push(terms);
        rt.params().save(&run_dir.join("checkpoints").join(format!("task-{:02}.safetensors", t_idx + 1)))?;
        eval_stage(&mut results, &mut metrics_log, t_idx + 1)?;
        if !opts.quiet {
            print!("{}", format_table(&results, t_idx + 1, &shown_refs));
            println!(
                "  loss per epoch: {}",
                epoch_losses[t_idx].iter().map(|l| format!("{l:.3}")).collect::<Vec<_>>().join(" ")
            );
        }
    }
    let continual: BTreeMap<String, crate::metrics::ClSummary> = results
        .metric_names()
        .into_iter()
        .filter_map(|m| crate::metrics::summarize(&results.metric(&m), None).ok().map(|s| (m, s)))
        .collect();
    if !opts.quiet {
        println!(
            "\n{:<26}{:>9}{:>9}{:>9}{:>12}{:>10}",
            "continual summary", "last", "avg", "bwt", "forgetting", "transfer"
        );
        for m in &shown {
            if let Some(s) = continual.get(m) {
                let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
                println!(
                    "{:<26}{:>9.2}{:>9.2}{:>9}{:>12}{:>10.2}",
                    m,
                    s.last,
                    s.avg,
                    opt(s.bwt),
                    opt(s.forgetting),
                    s.transfer
                );
            }
        }
    }
    let summary = RunSummary {
        name: c.experiment.name.clone(),
        seed: c.experiment.seed,
        run_dir: run_dir.clone(),
        trainable_parameters: trainable,
        total_parameters: total,
        batch_size: bs,
        epoch_losses,
        epoch_terms,
        results,
        continual,
        steps: global_step,
        train_seconds: started.elapsed().as_secs_f64(),
    };
    for name in summary.results.metric_names() {
        let m = summary.results.metric(&name);
        let mut csv = format!("stage,{}\n", summary.results.tasks.join(","));
        for (t, row) in m.iter().enumerate() {
            csv.push_str(&format!("{t},{}\n", row.iter().map(|v| format!("{v}")).collect::<Vec<_>>().join(",")));
        }
        write_atomic(&run_dir.join("r_matrix").join(format!("{}.csv", name.replace('/', "__"))), csv.as_bytes())?;
    }
    write_atomic(&run_dir.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    Ok(summary)
}

/// Overwrite the frozen copy's parameters with the trained model's (same names: both were
/// built from one config); the one copy per task that strategies comparing against the old
/// model need.
fn copy_parameters(from: &Model, to: &Model) -> anyhow::Result<()> {
    let src = from.runtime.params();
    let dst = to.runtime.params();
    for p in dst.iter() {
        let q = src.get(&p.name).with_context(|| format!("the old-model copy has `{}`, the model does not", p.name))?;
        p.var.set(&q.var.as_tensor().detach())?;
    }
    Ok(())
}

/// CLIP clamps `logit_scale` to [0, ln 100].
fn clamp_logit_scale(model: &Model) -> anyhow::Result<()> {
    let v = model.logit_scale.clamp(0.0, 100f64.ln())?;
    model.runtime.param_assign(&model.logit_scale, &v).map_err(anyhow::Error::msg)
}
