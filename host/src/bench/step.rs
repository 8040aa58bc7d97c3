//! `recall bench FILE.toml`: the training step of an experiment, timed and counted.
//!
//! The session is built as `recall run` builds it, the tasks before the benched one are
//! passed through (each strategy's `before_task`, gradient pass and `after_task`, without
//! training, so an old model and its state exist), then the step runs `warmup` times
//! untimed and `steps` times timed. Counts come from one more step, so walking the graph
//! does not touch the timings. Nothing is written.

use std::time::Instant;

use anyhow::bail;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::config::LoadedConfig;
use crate::engine::{self, GraphSize, PhaseClock, Precision, Session, StepProbe, PHASES};
use crate::loader::Registry;
use crate::runtime::counters;

/// What to measure.
#[derive(Clone, Debug)]
pub struct StepBenchOptions {
    pub steps: usize,
    pub warmup: usize,
    /// Time each phase (synchronising the device at every boundary).
    pub phases: bool,
    /// The task whose step is timed; default: the second (strategies that compare against
    /// the old model act from there on), or the only one.
    pub task: Option<String>,
    /// Feed the steps from the loader's workers, as a run does, and time each step from the
    /// end of the previous one (waiting for its batch included); otherwise every batch is
    /// prepared before its step's clock starts.
    pub streamed: bool,
}

/// Milliseconds per step after warm-up.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub median_ms: f64,
    pub p90_ms: f64,
    pub mean_ms: f64,
}

impl Timing {
    fn of(mut ms: Vec<f64>) -> Self {
        let mean_ms = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
        let (median_ms, p90_ms) = super::median_p90(&mut ms);
        Timing { median_ms, p90_ms, mean_ms }
    }
}

/// Per-step counts: stable across machines, unlike times.
#[derive(Clone, Debug, Serialize)]
pub struct StepCounts {
    pub tensors_created: u64,
    /// Copies of device values to the host (each a device sync on CUDA).
    pub host_reads: u64,
    pub graph_nodes: usize,
    pub bytes_held_for_backward: u64,
    /// Tensors created in each phase ([`PHASES`]).
    pub tensors_by_phase: Vec<(String, u64)>,
}

/// The report of `recall bench FILE.toml`.
#[derive(Clone, Debug, Serialize)]
pub struct StepBench {
    pub experiment: String,
    pub task: String,
    pub batch: usize,
    pub device: String,
    pub precision: String,
    pub threads: usize,
    pub trainable_parameters: usize,
    pub warmup: usize,
    pub steps: usize,
    /// Whether the steps were fed by the loader's workers (`--streamed`).
    pub streamed: bool,
    pub step: Timing,
    /// Per phase ([`PHASES`]), with `--phases`.
    pub phases: Option<Vec<(String, Timing)>>,
    pub counts: StepCounts,
    /// Peak resident memory of the process (CPU) or device memory in use (CUDA).
    pub peak_memory_bytes: Option<u64>,
    pub memory_kind: String,
}

/// Bench the step of `cfg`'s experiment.
pub fn run(cfg: &LoadedConfig, registry: &Registry, opts: &StepBenchOptions) -> anyhow::Result<StepBench> {
    let session = Session::prepare(cfg, registry)?;
    let c = &cfg.config;
    let t_idx = match &opts.task {
        Some(name) => match session.tasks.iter().position(|t| &t.name == name) {
            Some(i) => i,
            None => bail!(
                "--task `{name}` is not a task of {}; its tasks: {}",
                cfg.file,
                session.tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        },
        None => 1.min(session.tasks.len() - 1),
    };
    let precision = Precision::start(&c.train, session.runtime())?;
    let bs = c.train.batch_size;
    let n_steps = |t: &crate::data::TaskData| engine::steps_in_task(t.epoch_examples(), &c.train);
    for k in 0..t_idx {
        let task = &session.tasks[k];
        drop(engine::begin_task(&session, precision, k, n_steps(task))?);
        engine::end_task_untrained(&session, k, n_steps(task))?;
    }
    let task = &session.tasks[t_idx];
    if task.train.len() < bs {
        bail!(
            "task `{}` has {} training examples, fewer than one batch of {bs}; bench a larger task or lower \
             train.batch_size",
            task.name,
            task.train.len()
        );
    }
    let (mut steps, mut opt) = engine::begin_task(&session, precision, t_idx, n_steps(task))?;
    let mut rng = StdRng::seed_from_u64(c.experiment.seed);
    let total = opts.warmup + opts.steps.max(1) + 1;
    let mut plans = Vec::new();
    while plans.len() < total {
        // Only full batches: every timed step sees the configured batch size.
        let epoch = crate::data::loader::plan_epoch(
            &task.train,
            &task.order,
            bs,
            &mut rng,
            c.experiment.seed ^ plans.len() as u64,
        );
        plans.extend(epoch.into_iter().filter(|p| p.indices.len() == bs));
    }
    // Batches are prepared outside the timed step, as the loader's workers prepare them
    // ahead of a run's steps.
    let pipeline = task.pipeline(&task.train, &session.train_transform, &session.model.preprocess);
    let prepare = |i: usize| pipeline.prepare(&plans[i]);
    let device = session.runtime().device().clone();
    let mut times = Vec::new();
    let mut phase_seconds: Vec<[f64; 4]> = Vec::new();
    let mut i = 0;
    let mut last_end = Instant::now();
    // Streamed, a step's clock runs from the end of the one before (its wait for the batch
    // counts); else from the step's start.
    let mut timed_step = |batch: crate::data::loader::Batch, streamed: bool| -> anyhow::Result<()> {
        let started = if streamed { last_end } else { Instant::now() };
        let mut probe = StepProbe { phases: opts.phases.then(|| PhaseClock::new(&device)), ..Default::default() };
        steps.step(&mut opt, &batch, i, 1.0, &mut probe)?;
        last_end = Instant::now();
        if i >= opts.warmup {
            times.push((last_end - started).as_secs_f64() * 1e3);
            if let Some(clock) = probe.phases {
                phase_seconds.push(clock.seconds);
            }
        }
        i += 1;
        Ok(())
    };
    if opts.streamed {
        session.loader.stream(&pipeline, &plans[..total - 1], |batch| timed_step(batch, true))?;
    } else {
        for k in 0..total - 1 {
            let batch = prepare(k)?;
            timed_step(batch, false)?;
        }
    }
    let batch = prepare(total - 1)?;
    let reads_before = counters::reads();
    let mut probe = StepProbe { count_graph: true, ..Default::default() };
    let stats = steps.step(&mut opt, &batch, total - 1, 1.0, &mut probe)?;
    // The phases cover the whole step.
    let tensors_created = probe.tensors_by_phase.iter().sum();
    let host_reads = counters::reads() - reads_before;
    let graph = stats.graph.unwrap_or(GraphSize::default());
    let device_memory = stats.peak_memory;
    let phases = (!phase_seconds.is_empty()).then(|| {
        PHASES
            .iter()
            .enumerate()
            .map(|(p, name)| (name.to_string(), Timing::of(phase_seconds.iter().map(|s| s[p] * 1e3).collect())))
            .collect()
    });
    Ok(StepBench {
        experiment: c.experiment.name.clone(),
        task: task.name.clone(),
        batch: bs,
        device: format!("{device:?}"),
        precision: c.train.precision.clone(),
        threads: candle_core::utils::get_num_threads(),
        trainable_parameters: session.model.trainable_parameters(),
        warmup: opts.warmup,
        steps: opts.steps.max(1),
        streamed: opts.streamed,
        step: Timing::of(times),
        phases,
        counts: StepCounts {
            tensors_created,
            host_reads,
            graph_nodes: graph.nodes,
            bytes_held_for_backward: graph.bytes,
            tensors_by_phase: PHASES.iter().map(|p| p.to_string()).zip(probe.tensors_by_phase).collect(),
        },
        memory_kind: if device_memory.is_some() { "device".into() } else { "host-rss".into() },
        peak_memory_bytes: device_memory.or_else(crate::runtime::peak_rss),
    })
}

impl std::fmt::Display for StepBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        writeln!(
            f,
            "{} / task `{}`: batch {}, {} {}, {} threads, {} trainable parameters",
            self.experiment,
            self.task,
            self.batch,
            self.device,
            self.precision,
            self.threads,
            self.trainable_parameters
        )?;
        let t = &self.step;
        writeln!(
            f,
            "  step       median {:9.2} ms   p90 {:9.2} ms   ({} steps after {} warm-up{})",
            t.median_ms,
            t.p90_ms,
            self.steps,
            self.warmup,
            if self.streamed { ", fed by the loader" } else { "" }
        )?;
        for (name, t) in self.phases.iter().flatten() {
            writeln!(f, "  {name:<10} median {:9.2} ms   p90 {:9.2} ms", t.median_ms, t.p90_ms)?;
        }
        let n = &self.counts;
        writeln!(
            f,
            "  per step   {} tensors created, {} graph nodes, {:.1} MiB held for backward, {} host reads",
            n.tensors_created,
            n.graph_nodes,
            mib(n.bytes_held_for_backward),
            n.host_reads
        )?;
        let by_phase: Vec<String> = n.tensors_by_phase.iter().map(|(p, k)| format!("{p} {k}")).collect();
        writeln!(f, "  tensors    {}", by_phase.join(", "))?;
        match self.peak_memory_bytes {
            Some(b) => write!(f, "  peak       {:.1} MiB ({})", mib(b), self.memory_kind),
            None => write!(f, "  peak       unknown"),
        }
    }
}
