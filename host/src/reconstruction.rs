//! `[train] objective = "reconstruction"`: train the model's image tokenizer (a VQ-VAE) alone
//! on the tasks' images, as TokLIP's frozen tokenizer is trained before the token encoder.
//!
//! The tokenizer plugin owns its objective: given `pixel_values` and `target_pixels` its
//! forward returns the training loss (for `vq-tokenizer`: reconstruction + codebook +
//! commitment). The host owns the loop: AdamW over the tokenizer's parameters, the tasks'
//! training images pooled and shuffled per epoch, then the held-out images scored before and
//! after training: the mean loss, how many distinct codes the images use, and the codes'
//! perplexity (`exp` of the entropy of their frequencies; the number of equally used codes
//! that would give the same entropy). `[train] precision` applies as in contrastive runs (f32
//! masters, lower-precision compute), and scoring follows `eval_precision`. The run directory
//! has the usual layout: the trained
//! weights in `checkpoints/task-01.safetensors` (what `vq-tokenizer`'s `checkpoint` loads),
//! `summary.json`, `config.resolved.toml`, `run.json` and `log.txt`.

use recall_sdk::inputs;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::LoadedConfig;
use crate::data::{self, preprocess::Preprocess};
use crate::engine::{
    load_tasks, open_run_dir, progress, DataCounts, Performance, Precision, ResultMatrix, RunOptions, RunSummary,
};
use crate::loader::Registry;
use crate::model::Tower;
use crate::optim::{clip_factor, AdamW};
use crate::runtime::{ops, Runtime};

/// Scores of the tokenizer on a set of images.
fn score(
    tok: &Tower,
    rt: &Runtime,
    examples: &[data::Example],
    pre: &Preprocess,
    batch: usize,
) -> anyhow::Result<BTreeMap<String, f64>> {
    rt.set_training(false);
    let (mut loss, mut n) = (0.0, 0usize);
    let mut counts: HashMap<Vec<u32>, usize> = HashMap::new();
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&data::Example> = chunk.iter().collect();
        let px = data::pixel_batch(&refs, pre, rt.device(), rt.float_dtype())?;
        let l = tok.forward(rt, &[(inputs::PIXEL_VALUES, &px), (inputs::TARGET_PIXELS, &px)])?;
        loss += l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * chunk.len() as f64;
        n += chunk.len();
        let codes = tok.forward(rt, &[(inputs::PIXEL_VALUES, &px)])?.to_dtype(candle_core::DType::F32)?;
        let width = *codes.dims().last().unwrap_or(&1);
        let flat: Vec<f32> = codes.flatten_all()?.to_vec1()?;
        for row in flat.chunks(width.max(1)) {
            *counts.entry(row.iter().map(|x| x.to_bits()).collect()).or_default() += 1;
        }
    }
    let total: usize = counts.values().sum();
    let entropy: f64 = counts
        .values()
        .map(|&c| {
            let p = c as f64 / total.max(1) as f64;
            -p * p.ln()
        })
        .sum();
    Ok(BTreeMap::from([
        ("vq_loss".to_string(), loss / n.max(1) as f64),
        ("codes_used".to_string(), counts.len() as f64),
        ("perplexity".to_string(), entropy.exp()),
    ]))
}

/// Train the image tokenizer of `cfg`.
pub fn run(cfg: &LoadedConfig, registry: &Registry, opts: &RunOptions) -> anyhow::Result<RunSummary> {
    let c = &cfg.config;
    if opts.resume {
        bail!("a reconstruction run has a single stage and cannot be resumed; run it again");
    }
    let section = c.model.image_tokenizer.as_ref().context("the experiment has no [model.image_tokenizer]")?;
    let device = ops::device_from_name(&c.experiment.device).map_err(|m| cfg.error_at("experiment.device", m))?;
    let rt = Runtime::new(device, crate::model::float_dtype(&c.experiment.dtype), c.experiment.seed);
    let tok = Tower::create("model.image_tokenizer", section, "image_tokenizer.", true, &rt, cfg, registry)?;
    let size = tok.spec(true)?.input_size as usize;
    let pre = Preprocess { size, mean: c.model.preprocess.mean, std: c.model.preprocess.std };
    let tasks = load_tasks(cfg, &pre)?;
    let train: Vec<data::Example> = tasks.iter().flat_map(|t| t.train.iter().cloned()).collect();
    if train.len() < 2 {
        bail!("{}: the tasks have {} training images; at least 2 are needed", cfg.file, train.len());
    }
    let dir = open_run_dir(opts, &c.experiment)?;
    dir.record_provenance(&c.experiment.method_key(), c.experiment.seed, false, &[])?;
    if let Err(e) = crate::runlog::open(&dir.log_file()) {
        tracing::warn!("cannot write {}: {e}", dir.log_file().display());
    }
    dir.write_config(c)?;

    let precision = Precision::start(&c.train, &rt)?;
    let eval = |stage: &str| -> anyhow::Result<Vec<BTreeMap<String, f64>>> {
        let row = precision.evaluating(&rt, || {
            tasks.iter().map(|t| score(&tok, &rt, &t.test, &pre, c.train.eval_batch_size)).collect()
        });
        tracing::info!(stage, "tokenizer scored");
        row
    };
    let mut peak_memory: Option<u64> = None;
    let before = eval("before training")?;
    let mut opt = AdamW::new(&rt.params(), &c.optimizer).map_err(|e| cfg.error_at(&e.key(), e.message))?;
    let bs = c.train.batch_size;
    let n_steps = crate::engine::steps_in_task(train.len(), &c.train);
    let pb = progress(opts.quiet, n_steps as u64, "image tokenizer".into(), "steps");
    let started = Instant::now();
    let (mut step, mut epoch_losses) = (0usize, Vec::new());
    // The tasks' training images pooled; a bad image is skipped only if every task says so.
    let on_error =
        if tasks.iter().all(|t| t.on_error == data::OnError::Skip) { data::OnError::Skip } else { data::OnError::Fail };
    let transform = c.data.train_transform();
    let pipeline =
        data::loader::Pipeline { split: &train, task: "tasks", transform: &transform, preprocess: &pre, on_error };
    let loader = data::loader::Loader::new(c.data.workers(), c.data.prefetch)?;
    for epoch in 0..c.train.epochs {
        let mut rng = StdRng::seed_from_u64(c.experiment.seed ^ epoch as u64);
        let (mut sum, mut n) = (0.0, 0usize);
        let plans = data::loader::plan_epoch(
            &train,
            &Default::default(),
            bs,
            &mut rng,
            c.experiment.seed ^ ((epoch as u64) << 32),
        );
        loader.stream(&pipeline, &plans, |batch| -> anyhow::Result<()> {
            rt.set_training(true);
            precision.before_step(&rt)?;
            let px = batch.tensor(rt.device(), rt.float_dtype())?;
            let loss = tok.forward(&rt, &[(inputs::PIXEL_VALUES, &px), (inputs::TARGET_PIXELS, &px)])?;
            if loss.elem_count() != 1 {
                bail!(
                    "`{}` returned a loss of shape {:?} for target_pixels; a tokenizer trained by reconstruction \
                     must return a scalar loss when given target_pixels",
                    tok.name(),
                    loss.dims()
                );
            }
            let value = loss.to_dtype(candle_core::DType::F64)?.reshape(())?.to_scalar::<f64>()?;
            if !value.is_finite() {
                bail!("the loss became {value} at step {step}; lower the learning rate or enable grad_clip");
            }
            peak_memory = peak_memory.max(crate::runtime::device_memory_in_use(rt.device()));
            let grads = loss.backward()?;
            peak_memory = peak_memory.max(crate::runtime::device_memory_in_use(rt.device()));
            let scale = clip_factor(opt.grad_norm(&grads)?, c.optimizer.grad_clip);
            opt.step(&grads, c.optimizer.lr_factor(step, epoch, n_steps, c.train.epochs), scale)?;
            sum += value;
            n += 1;
            step += 1;
            pb.inc(1);
            Ok(())
        })?;
        let mean = sum / n.max(1) as f64;
        tracing::info!(epoch, loss = mean, "epoch finished");
        epoch_losses.push(mean);
    }
    pb.finish_and_clear();
    let train_seconds = started.elapsed().as_secs_f64();
    dir.save_checkpoint(1, &rt.params(), &Default::default())?;
    let after = eval("after training")?;
    if !opts.quiet {
        for (i, t) in tasks.iter().enumerate() {
            let m = &after[i];
            println!(
                "{:<16} loss {:.4} -> {:.4}   codes used {:>4} -> {:>4}   perplexity {:.1} -> {:.1}",
                t.name,
                before[i]["vq_loss"],
                m["vq_loss"],
                before[i]["codes_used"],
                m["codes_used"],
                before[i]["perplexity"],
                m["perplexity"]
            );
        }
    }
    let params = rt.params();
    let summary = RunSummary {
        name: c.experiment.name.clone(),
        seed: c.experiment.seed,
        run_dir: dir.path().to_path_buf(),
        trainable_parameters: params.trainable_count(),
        total_parameters: params.iter().map(|p| p.var.elem_count()).sum(),
        batch_size: bs,
        epoch_terms: vec![epoch_losses.iter().map(|l| BTreeMap::from([("vq".to_string(), *l)])).collect()],
        epoch_losses: vec![epoch_losses],
        results: ResultMatrix { tasks: tasks.iter().map(|t| t.name.clone()).collect(), rows: vec![before, after] },
        heldout: ResultMatrix::default(),
        validation: Vec::new(),
        validation_results: Default::default(),
        validation_continual: Default::default(),
        continual: BTreeMap::new(),
        performance_drop: BTreeMap::new(),
        data: tasks
            .iter()
            .map(|t| {
                (t.name.clone(), DataCounts { train: t.train.len(), test: t.test.len(), skipped: t.skipped.len() })
            })
            .collect(),
        steps: step,
        train_seconds,
        performance: Performance {
            precision: c.train.precision.clone(),
            device: format!("{:?}", rt.device()),
            steps_per_second: step as f64 / train_seconds.max(1e-9),
            images_per_second: (train.len() * c.train.epochs) as f64 / train_seconds.max(1e-9),
            memory_kind: if peak_memory.is_some() { "device".into() } else { "host-rss".into() },
            peak_memory_bytes: peak_memory.or_else(crate::runtime::peak_rss),
        },
    };
    drop(params);
    dir.write_summary(&summary)?;
    crate::runlog::close();
    Ok(summary)
}
