//! Will a training step fit? Parameters are checked as they are created
//! (`Runtime::check_parameter_memory`); this checks the step before the first one runs: the
//! activations kept for backward, measured on a forward of two examples and scaled to the
//! batch, plus the gradients and AdamW's two moments of every trainable value.

use crate::data;
use crate::engine::{GraphSize, Session};
use crate::runtime::ops;
use anyhow::Context;

/// Examples in the probe forward.
const PROBE: usize = 2;

/// The estimate of one step's memory beyond what is allocated now.
#[derive(Clone, Copy, Debug)]
pub struct StepMemory {
    /// Activations the backward keeps at the configured batch size.
    pub activations: u64,
    /// Gradients and AdamW's first and second moments.
    pub optimizer: u64,
}

impl StepMemory {
    pub fn total(&self) -> u64 {
        self.activations + self.optimizer
    }
}

/// Measure the model's forward on the first task's first examples, in evaluation mode (no
/// dropout, so the generator is untouched), and scale it to `train.batch_size`. Strategies'
/// and reference batches' forwards come on top: this is a lower bound.
pub fn estimate(s: &Session) -> anyhow::Result<Option<StepMemory>> {
    let Some(task) = s.tasks.first() else { return Ok(None) };
    if task.train.len() < PROBE {
        return Ok(None);
    }
    let (model, rt) = (&s.model, s.runtime());
    let mut plan = data::loader::in_order(PROBE, PROBE).remove(0);
    plan.captions = task.train[..PROBE].iter().map(|e| e.captions[0].clone()).collect();
    let batch = task
        .eval_batch(&task.train, &plan, &s.model.preprocess)
        .with_context(|| format!("estimating a training step's memory on task `{}`", task.name))?;
    if batch.len() < PROBE {
        return Ok(None);
    }
    let training = rt.is_training();
    rt.set_training(false);
    let graph = (|| -> anyhow::Result<GraphSize> {
        let pixels = batch.tensor(rt.device(), rt.compute_dtype())?;
        let (ids, mask) = model.tokenize(&batch.captions)?;
        let img = model.encode_images(&pixels)?;
        let txt = model.encode_texts(&ids, &mask)?;
        Ok(GraphSize::of(&ops::clip_loss(&img, &txt, &model.logit_scale)?))
    })();
    rt.set_training(training);
    let graph = graph?;
    // A batch never holds more than the largest task.
    let largest = s.tasks.iter().map(|t| t.train.len()).max().unwrap_or(0);
    let batch = s.cfg.config.train.batch_size.min(largest) as u64;
    let trainable_bytes: u64 = rt
        .params()
        .iter()
        .filter(|p| p.trainable)
        .map(|p| (p.var.elem_count() * p.var.dtype().size_in_bytes()) as u64)
        .sum();
    Ok(Some(StepMemory { activations: graph.bytes / PROBE as u64 * batch, optimizer: 3 * trainable_bytes }))
}

/// Refuse a step that cannot fit in what the machine (or device) has available, with the
/// figures, pointing at `train.batch_size`.
pub fn check_step_fits(s: &Session) -> anyhow::Result<()> {
    let Some(available) = crate::runtime::memory_available(s.runtime().device()) else { return Ok(()) };
    let Some(need) = estimate(s)? else { return Ok(()) };
    if need.total() > available {
        use crate::runtime::human_bytes as h;
        let c = &s.cfg.config.train;
        return Err(s
            .cfg
            .error_at(
                "train.batch_size",
                format!(
                    "a training step does not fit: at batch_size = {} it needs at least {} ({} of activations, \
                     measured on {PROBE} examples and scaled, plus {} for gradients and AdamW's moments), but \
                     the {} has {} available; lower train.batch_size or shrink the model",
                    c.batch_size,
                    h(need.total()),
                    h(need.activations),
                    h(need.optimizer),
                    if s.runtime().device().is_cpu() { "machine" } else { "device" },
                    h(available)
                ),
            )
            .into());
    }
    Ok(())
}
