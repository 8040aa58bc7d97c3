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
    let n_steps = |t: &crate::data::TaskData| engine::steps_in_task(t.train.len(), &c.train);
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
    let mut batches = Vec::new();
    while batches.len() < total {
        // Only full batches: every timed step sees the configured batch size.
        batches.extend(engine::batches(&task.train, bs, &mut rng).into_iter().filter(|(e, _)| e.len() == bs));
    }
    let device = session.runtime().device().clone();
    let mut times = Vec::new();
    let mut phase_seconds: Vec<[f64; 4]> = Vec::new();
    for (i, (examples, captions)) in batches.iter().take(total - 1).enumerate() {
        let mut probe = StepProbe { phases: opts.phases.then(|| PhaseClock::new(&device)), ..Default::default() };
        let started = Instant::now();
        steps.step(&mut opt, (examples, captions), i, 1.0, &mut probe)?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if i >= opts.warmup {
            times.push(ms);
            if let Some(clock) = probe.phases {
                phase_seconds.push(clock.seconds);
            }
        }
    }
    let (examples, captions) = &batches[total - 1];
    let reads_before = counters::reads();
    let mut probe = StepProbe { count_graph: true, ..Default::default() };
    let stats = steps.step(&mut opt, (examples, captions), total - 1, 1.0, &mut probe)?;
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
            "  step       median {:9.2} ms   p90 {:9.2} ms   ({} steps after {} warm-up)",
            t.median_ms, t.p90_ms, self.steps, self.warmup
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
