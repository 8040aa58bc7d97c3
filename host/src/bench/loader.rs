//! `recall bench FILE.toml --loader`: the input pipeline alone, on the first task's training
//! split as a run reads it (its transform, workers and prefetch): images decoded, transformed
//! and normalised per second, with no model step consuming them.

use std::time::Instant;

use anyhow::bail;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::config::LoadedConfig;
use crate::engine::Session;
use crate::loader::Registry;

/// The report of `recall bench --loader`.
#[derive(Clone, Debug, Serialize)]
pub struct LoaderBench {
    pub experiment: String,
    pub task: String,
    pub transform: String,
    pub workers: usize,
    pub batch: usize,
    pub batches: usize,
    pub images: usize,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// Stream `batches` batches (after one untimed) of the first task's training split.
pub fn run(cfg: &LoadedConfig, registry: &Registry, batches: usize) -> anyhow::Result<LoaderBench> {
    let session = Session::prepare(cfg, registry)?;
    let c = &cfg.config;
    let task = &session.tasks[0];
    let bs = c.train.batch_size;
    let mut rng = StdRng::seed_from_u64(c.experiment.seed);
    let mut plans = Vec::new();
    while plans.len() < batches + 1 {
        let epoch = crate::data::loader::plan_epoch(&task.train, &task.order, bs, &mut rng, plans.len() as u64);
        if epoch.is_empty() {
            bail!("task `{}` has too few training examples for a batch of {bs}", task.name);
        }
        plans.extend(epoch);
    }
    plans.truncate(batches + 1);
    let pipeline = task.pipeline(&task.train, &session.train_transform, &session.model.preprocess);
    let (mut images, mut started) = (0usize, None);
    session.loader.stream(&pipeline, &plans, |b| -> anyhow::Result<()> {
        // The first batch fills the pipeline; the clock starts when it arrives.
        match started {
            None => started = Some(Instant::now()),
            Some(_) => images += b.len(),
        }
        Ok(())
    })?;
    let seconds = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    Ok(LoaderBench {
        experiment: c.experiment.name.clone(),
        task: task.name.clone(),
        transform: format!("{:?}", c.data.train_transform),
        workers: session.loader.workers(),
        batch: bs,
        batches,
        images,
        seconds,
        images_per_second: images as f64 / seconds.max(1e-9),
    })
}

impl std::fmt::Display for LoaderBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} / task `{}`: {} with {} workers, {} batches of {}: {} images in {:.2} s, {:.1} images/s",
            self.experiment,
            self.task,
            self.transform,
            self.workers,
            self.batches,
            self.batch,
            self.images,
            self.seconds,
            self.images_per_second
        )
    }
}
