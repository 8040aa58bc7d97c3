//! The training step and what it needs: the precision policy, the reference and old-model
//! features, the gradient pass for strategies that read gradients.

use anyhow::{bail, Context};
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use recall_sdk::inputs;
use recall_sdk::{GradientPass, TaskInfo};

use super::session::Session;
use crate::data::{self, TaskData};
use crate::model::Model;
use crate::optim::{clip_factor, AdamW};
use crate::plugin::StrategyInstance;
use crate::runtime::ops;
use crate::runtime::Runtime;

/// `[train] precision` and `eval_precision` applied to a runtime: under mixed precision the
/// masters stay in full precision and the ops compute lower (see `runtime`).
#[derive(Clone, Copy)]
pub struct Precision {
    compute: candle_core::DType,
    full: candle_core::DType,
    eval_full: bool,
}

impl Precision {
    /// Set the runtime's compute dtype for training.
    pub fn start(train: &crate::config::TrainSection, rt: &Runtime) -> anyhow::Result<Self> {
        let full = rt.float_dtype();
        let compute = match train.precision.as_str() {
            "bf16" => candle_core::DType::BF16,
            "f16" => candle_core::DType::F16,
            _ => full,
        };
        let p = Precision { compute, full, eval_full: train.eval_precision == "f32" };
        if p.mixed() {
            rt.set_compute_dtype(compute).map_err(anyhow::Error::msg)?;
        }
        Ok(p)
    }

    fn mixed(&self) -> bool {
        self.compute != self.full
    }

    /// Before a training step: casts of the masters as the optimizer left them.
    pub fn before_step(&self, rt: &Runtime) -> anyhow::Result<()> {
        if self.mixed() {
            rt.refresh_views().map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    /// Run `f` (an evaluation) at the evaluation precision.
    pub fn evaluating<T>(&self, rt: &Runtime, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let switch = self.mixed() && self.eval_full;
        if switch {
            rt.set_compute_dtype(self.full).map_err(anyhow::Error::msg)?;
        }
        let out = f();
        if switch {
            rt.set_compute_dtype(self.compute).map_err(anyhow::Error::msg)?;
        }
        out
    }
}

/// The steps a task of `examples` training examples takes: one per batch, every epoch (the
/// schedule's length).
pub fn steps_in_task(examples: usize, train: &crate::config::TrainSection) -> usize {
    examples.div_ceil(train.batch_size) * train.epochs
}

/// The reference batch for strategies that distil from the initial model: encoded by the
/// model being trained (in the graph) and by the frozen initial model. Without `[reference]`
/// data the current batch is the reference. Returns [reference image, reference text,
/// initial image, initial text, initial logit scale].
pub(crate) fn reference_features(
    model: &Model,
    initial: &Model,
    reference: Option<&TaskData>,
    bs: usize,
    rng: &mut StdRng,
    current: (&Tensor, &Tensor, &Tensor, &Tensor, &Tensor),
) -> anyhow::Result<[Tensor; 5]> {
    let (pixels, ids, mask, img, txt) = current;
    let (student_img, student_txt, pixels, ids, mask) = match reference {
        None => (img.clone(), txt.clone(), pixels.clone(), ids.clone(), mask.clone()),
        Some(r) => {
            let rt = &model.runtime;
            let indices: Vec<usize> = (0..bs).map(|_| rand::Rng::random_range(rng, 0..r.train.len())).collect();
            let captions: Vec<String> = indices
                .iter()
                .map(|&i| r.train[i].captions[rand::Rng::random_range(rng, 0..r.train[i].captions.len())].clone())
                .collect();
            let plan = data::loader::BatchPlan { indices, captions, seed: 0 };
            let batch = r.eval_batch(&r.train, &plan, &model.preprocess)?;
            let px = batch.tensor(rt.device(), rt.float_dtype())?;
            let (ids, mask) = model.tokenize(&batch.captions)?;
            (model.encode_images(&px)?, model.encode_texts(&ids, &mask)?, px, ids, mask)
        }
    };
    Ok([
        student_img,
        student_txt,
        initial.encode_images(&pixels)?.detach(),
        initial.encode_texts(&ids, &mask)?.detach(),
        initial.logit_scale.detach(),
    ])
}

/// Gradients of the task loss on batches of `examples`, for the strategies whose gradient
/// pass is `when` (EWC's Fisher): after a task on its training data, or before it on its
/// held-out split. Parameters are not updated.
pub(crate) fn gradient_pass(
    model: &Model,
    strategies: &[StrategyInstance],
    when: GradientPass,
    (set, examples): (&TaskData, &[data::Example]),
    info: &TaskInfo,
    bs: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let mut wanted: Vec<(usize, &StrategyInstance)> = Vec::new();
    for s in strategies {
        let n = s.gradient_batches()?;
        if n > 0 && s.gradient_pass()? == when {
            wanted.push((n, s));
        }
    }
    let Some(most) = wanted.iter().map(|(n, _)| *n).max() else { return Ok(()) };
    let rt = &model.runtime;
    // Evaluation mode: no dropout, so the gradients are those of the trained function.
    rt.set_training(false);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6772_6164 ^ info.index);
    for (b, plan) in
        data::loader::plan_epoch(examples, &Default::default(), bs, &mut rng, 0).into_iter().take(most).enumerate()
    {
        let batch = set.eval_batch(examples, &plan, &model.preprocess)?;
        if batch.len() < 2 {
            continue;
        }
        let pixels = batch.tensor(rt.device(), rt.float_dtype())?;
        let (ids, mask) = model.tokenize(&batch.captions)?;
        let img = model.encode_images(&pixels)?;
        let txt = model.encode_texts(&ids, &mask)?;
        let loss = ops::clip_loss(&img, &txt, &model.logit_scale)?;
        rt.set_grads(Some(loss.backward()?));
        let hooks = wanted.iter().filter(|(n, _)| b < *n).try_for_each(|(_, s)| s.on_gradients(info, b as u64));
        rt.set_grads(None);
        hooks?;
    }
    Ok(())
}

/// Overwrite the frozen copy's parameters with the trained model's (same names: both were
/// built from one config); the one copy per task that strategies comparing against the old
/// model need.
pub(crate) fn copy_parameters(from: &Model, to: &Model) -> anyhow::Result<()> {
    let src = from.runtime.params();
    let dst = to.runtime.params();
    dst.note_write();
    for p in dst.iter() {
        let q = src.get(&p.name).with_context(|| format!("the old-model copy has `{}`, the model does not", p.name))?;
        p.var.set(&q.var.as_tensor().detach())?;
    }
    Ok(())
}

/// CLIP clamps `logit_scale` to [0, ln 100].
pub(crate) fn clamp_logit_scale(model: &Model) -> anyhow::Result<()> {
    let v = model.logit_scale.clamp(0.0, 100f64.ln())?;
    model.runtime.param_assign(&model.logit_scale, &v).map_err(anyhow::Error::msg)
}

/// The tensors a training step hands the strategies' `loss_terms`, each under its SDK name
/// (`recall_sdk::inputs`).
struct StrategyInputs<'t> {
    named: Vec<(&'static str, &'t Tensor)>,
}

impl<'t> StrategyInputs<'t> {
    /// The current batch: image and text features, the logit scale, pixels and token ids.
    fn batch([img, txt, scale, pixels, ids]: [&'t Tensor; 5]) -> Self {
        let named = vec![
            (inputs::IMAGE_FEATURES, img),
            (inputs::TEXT_FEATURES, txt),
            (inputs::LOGIT_SCALE, scale),
            (inputs::PIXEL_VALUES, pixels),
            (inputs::INPUT_IDS, ids),
        ];
        StrategyInputs { named }
    }

    fn add(&mut self, name: &'static str, t: &'t Tensor) {
        self.named.push((name, t));
    }

    /// The old model's image and text features on the batch and its logit scale.
    fn old_model(&mut self, [img, txt, scale]: [&'t Tensor; 3]) {
        self.named.extend([
            (inputs::OLD_IMAGE_FEATURES, img),
            (inputs::OLD_TEXT_FEATURES, txt),
            (inputs::OLD_LOGIT_SCALE, scale),
        ]);
    }

    /// A reference batch: the trained model's features, the initial model's, its logit scale.
    fn reference(&mut self, [ri, rt, ii, it, is]: &'t [Tensor; 5]) {
        self.named.extend([
            (inputs::REFERENCE_IMAGE_FEATURES, ri),
            (inputs::REFERENCE_TEXT_FEATURES, rt),
            (inputs::INITIAL_IMAGE_FEATURES, ii),
            (inputs::INITIAL_TEXT_FEATURES, it),
            (inputs::INITIAL_LOGIT_SCALE, is),
        ]);
    }

    /// The replay batch's features from the model being trained, and the stored ones.
    fn replay(&mut self, f: &'t super::replay::ReplayFeatures) {
        self.named.extend([(inputs::REPLAY_IMAGE_FEATURES, &f.image), (inputs::REPLAY_TEXT_FEATURES, &f.text)]);
        if let Some((i, t)) = &f.stored {
            self.named.extend([(inputs::REPLAY_STORED_IMAGE_FEATURES, i), (inputs::REPLAY_STORED_TEXT_FEATURES, t)]);
        }
    }

    fn as_slice(&self) -> &[(&'static str, &'t Tensor)] {
        &self.named
    }
}

/// What one task's training steps share.
pub struct TaskSteps<'a> {
    pub session: &'a Session<'a>,
    pub precision: Precision,
    /// The frozen model as it was after the previous task, for strategies that ask for it.
    pub old: Option<&'a Model>,
    pub task_name: &'a str,
    /// Draws the `[reference]` batches (ZSCL); reseeded every step from `ref_seed`.
    pub ref_rng: StdRng,
    pub ref_seed: u64,
    /// The seed the runtime's generator (dropout) is reseeded from every step.
    pub step_seed: u64,
    /// The task's position in the sequence (what the replay memory records).
    pub task_index: usize,
    /// Draws the replay batch and the reservoir's slots; reseeded every step from `replay_seed`.
    pub replay_rng: StdRng,
    pub replay_seed: u64,
}

impl TaskSteps<'_> {
    /// Reseed the generators a step draws from (dropout masks, reference batches) from the
    /// step's index in the task: what a step draws depends on its position only, so a run
    /// resumed mid-task draws what an unbroken one does.
    pub fn reseed(&mut self, step_in_task: usize) {
        let mix = (step_in_task as u64 + 1).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.session.runtime().reseed(self.step_seed ^ mix);
        self.ref_rng = StdRng::seed_from_u64(self.ref_seed ^ mix);
        self.replay_rng = StdRng::seed_from_u64(self.replay_seed ^ mix);
    }

    /// This step's replay batch, when the memory holds exemplars.
    fn draw_replay(&mut self) -> anyhow::Result<Option<super::replay::ReplayBatch>> {
        let s = self.session;
        let Some(memory) = &s.replay else { return Ok(None) };
        let memory = memory.borrow();
        if memory.is_empty() {
            return Ok(None);
        }
        let slots = memory.draw(&mut self.replay_rng);
        let seed = rand::Rng::random(&mut self.replay_rng);
        let rb = super::replay::prepare(&memory, &slots, &s.tasks, &s.train_transform, &s.model.preprocess, seed)
            .context("preparing the replay batch")?;
        Ok((!rb.slots.is_empty()).then_some(rb))
    }

    /// Reservoir sampling offers the current batch's examples (its first `batch.len()` rows of
    /// `img` / `txt`) to the memory, after the replay batch was drawn; their features are
    /// read back only when the memory keeps them and an example entered.
    fn offer_to_memory(&mut self, batch: &data::loader::Batch, img: &Tensor, txt: &Tensor) -> anyhow::Result<()> {
        let Some(memory) = &self.session.replay else { return Ok(()) };
        let mut memory = memory.borrow_mut();
        let offers = memory.offer(batch.len(), &mut self.replay_rng);
        if offers.is_empty() {
            return Ok(());
        }
        let features = match memory.request.store_features {
            true => Some(super::replay::read_rows(img, txt, &offers.iter().map(|&(row, _)| row).collect::<Vec<_>>())?),
            false => None,
        };
        for (k, &(row, slot)) in offers.iter().enumerate() {
            let exemplar = super::replay::Exemplar {
                task: self.task_index as u32,
                index: batch.indices[row] as u32,
                caption: batch.captions[row].clone(),
                class: None,
                features: features.as_ref().map(|f| f[k].clone()),
            };
            memory.place(slot, exemplar);
        }
        Ok(())
    }
}

/// What one step reports.
pub struct StepStats {
    /// The total loss, and each term (`clip` is the task loss).
    pub loss: f64,
    pub terms: Vec<(String, f64)>,
    /// Device memory in use after forward and after backward (CUDA), at its larger.
    pub peak_memory: Option<u64>,
    /// The autograd graph the step's backward walked, when [`StepProbe::count_graph`] is set.
    pub graph: Option<GraphSize>,
    /// The gradient norm before clipping, when clipping computed it.
    pub grad_norm: Option<f64>,
}

/// Extra measurements of a step for `recall bench`; the training loop asks for none.
#[derive(Default)]
pub struct StepProbe {
    /// Wall time per phase; each boundary synchronises the device.
    pub phases: Option<PhaseClock>,
    /// Walk the graph before backward to count its nodes and the bytes they hold, and count
    /// the tensors each phase creates.
    pub count_graph: bool,
    /// Tensors created per phase, when `count_graph` is set.
    pub tensors_by_phase: [u64; 4],
    /// `counters::tensors_created()` at the last phase boundary (the step sets it).
    pub tensors_at_mark: u64,
}

/// The phases a step's time is split into.
pub const PHASES: [&str; 4] = ["batch", "forward", "backward", "optimizer"];

/// Times the phases of a step, synchronising the device at each boundary so each phase's
/// queued work is charged to it.
pub struct PhaseClock {
    device: candle_core::Device,
    last: std::time::Instant,
    pub seconds: [f64; 4],
}

impl PhaseClock {
    pub fn new(device: &candle_core::Device) -> Self {
        PhaseClock { device: device.clone(), last: std::time::Instant::now(), seconds: [0.0; 4] }
    }

    fn start(&mut self) -> candle_core::Result<()> {
        self.device.synchronize()?;
        self.last = std::time::Instant::now();
        Ok(())
    }

    fn end(&mut self, phase: usize) -> candle_core::Result<()> {
        self.device.synchronize()?;
        let now = std::time::Instant::now();
        self.seconds[phase] += (now - self.last).as_secs_f64();
        self.last = now;
        Ok(())
    }
}

fn mark(probe: &mut StepProbe, phase: usize) -> candle_core::Result<()> {
    if probe.count_graph {
        let now = crate::runtime::counters::tensors_created();
        // The counter's own probe tensor is not the phase's.
        probe.tensors_by_phase[phase] = now.saturating_sub(probe.tensors_at_mark + 1);
        probe.tensors_at_mark = now;
    }
    match &mut probe.phases {
        Some(clock) => clock.end(phase),
        None => Ok(()),
    }
}

/// Nodes of an autograd graph and the bytes their outputs hold until backward frees them.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct GraphSize {
    pub nodes: usize,
    pub bytes: u64,
}

impl GraphSize {
    /// Every node that tracks a gradient, from `root` back to the variables; a storage shared
    /// by several views counts once, as far as its views reach.
    pub fn of(root: &Tensor) -> Self {
        let nodes = root.sorted_nodes();
        let mut storages: std::collections::HashMap<usize, u64> = std::collections::HashMap::new();
        for t in &nodes {
            if t.is_variable() {
                continue;
            }
            let (storage, layout) = t.storage_and_layout();
            let key = &*storage as *const candle_core::Storage as usize;
            let bytes = (extent(layout) * t.dtype().size_in_bytes()) as u64;
            let held = storages.entry(key).or_default();
            *held = (*held).max(bytes);
        }
        GraphSize { nodes: nodes.len(), bytes: storages.values().sum() }
    }
}

/// Elements of its storage a view reaches: a broadcast (stride 0) dimension reaches one.
fn extent(layout: &candle_core::Layout) -> usize {
    if layout.dims().contains(&0) {
        return 0;
    }
    let last: usize = layout.dims().iter().zip(layout.stride()).map(|(d, s)| (d - 1) * s).sum();
    layout.start_offset() + last + 1
}

impl TaskSteps<'_> {
    /// One training step on a batch: forward (the model, the old model, the teacher and the
    /// reference batch as the strategies ask), the task loss plus every strategy's terms, one
    /// backward pass, clipping, the AdamW update. The losses are read back once.
    pub fn step(
        &mut self,
        opt: &mut AdamW,
        batch: &data::loader::Batch,
        global_step: usize,
        lr_factor: f64,
        probe: &mut StepProbe,
    ) -> anyhow::Result<StepStats> {
        let s = self.session;
        let (model, rt) = (&s.model, s.runtime());
        if let Some(clock) = &mut probe.phases {
            clock.start()?;
        }
        if probe.count_graph {
            probe.tensors_at_mark = crate::runtime::counters::tensors_created();
        }
        rt.set_training(true);
        self.precision.before_step(rt)?;
        for st in &s.strategies {
            st.before_step(global_step as u64)?;
        }
        let replay = self.draw_replay()?;
        let separate = s.replay.as_ref().is_some_and(|m| m.borrow().request.mode == recall_sdk::ReplayMode::Separate);
        let joined = match (&replay, separate) {
            (Some(rb), false) => Some(batch.joined(&rb.batch)),
            _ => None,
        };
        let forward_batch = joined.as_ref().unwrap_or(batch);
        let pixels = forward_batch.tensor(rt.device(), rt.compute_dtype())?;
        let (ids, mask) = model.tokenize(&forward_batch.captions)?;
        mark(probe, 0)?;
        let img = match &model.code_cache {
            Some(_) => model.encode_cached(&batch.content_keys(), &pixels)?,
            None => model.encode_images(&pixels)?,
        };
        // Read now: later forwards of the model (reference batches) replace them.
        let image_tokens = model.image_tokens()?;
        let txt = model.encode_texts(&ids, &mask)?;
        let loss = ops::clip_loss(&img, &txt, &model.logit_scale)?;
        self.offer_to_memory(batch, &img, &txt)?;
        let replay_features = match (&replay, separate) {
            (Some(rb), true) => Some(super::replay::encode(model, rb, s.replay.as_ref())?),
            _ => None,
        };
        let old_features = match self.old {
            Some(m) => Some((
                m.encode_images(&pixels)?.detach(),
                m.encode_texts(&ids, &mask)?.detach(),
                m.logit_scale.detach(),
            )),
            None => None,
        };
        let mut inputs = StrategyInputs::batch([&img, &txt, &model.logit_scale, &pixels, &ids]);
        if let Some(tokens) = &image_tokens {
            inputs.add(inputs::IMAGE_TOKENS, tokens);
        }
        let teacher_features = match &s.teacher {
            Some(t) => {
                if t.preprocess.size != batch.size {
                    bail!(
                        "the teacher takes {0}x{0} images and the model {1}x{1}; the batch is prepared once for both, \
                         so their input sizes must match",
                        t.preprocess.size,
                        batch.size
                    );
                }
                let tp = batch.tensor_with(&t.preprocess, rt.device(), rt.float_dtype())?;
                let features = t.encode_images(&tp)?;
                Some((features, t.image_tokens()))
            }
            None => None,
        };
        if let Some((features, tokens)) = &teacher_features {
            inputs.add(inputs::TEACHER_IMAGE_FEATURES, features);
            if let Some(tokens) = tokens {
                inputs.add(inputs::TEACHER_IMAGE_TOKENS, tokens);
            }
        }
        if let Some((oi, ot, os)) = &old_features {
            inputs.old_model([oi, ot, os]);
        }
        if let Some(f) = &replay_features {
            inputs.replay(f);
        }
        let reference_features = match &s.initial_model {
            Some(im) => Some(reference_features(
                model,
                im,
                s.reference.as_ref(),
                s.cfg.config.train.batch_size,
                &mut self.ref_rng,
                (&pixels, &ids, &mask, &img, &txt),
            )?),
            None => None,
        };
        if let Some(features) = &reference_features {
            inputs.reference(features);
        }
        let mut names = vec!["clip".to_string()];
        let mut values = vec![loss.to_dtype(candle_core::DType::F32)?];
        let mut total = loss.clone();
        for st in &s.strategies {
            for (name, term) in st.loss_terms(inputs.as_slice())? {
                if term.elem_count() != 1 {
                    bail!(
                        "strategy `{}` returned loss term `{name}` with shape {:?}; loss terms must be scalars",
                        st.plugin,
                        term.dims()
                    );
                }
                let term = term.reshape(())?.to_dtype(total.dtype())?;
                values.push(term.to_dtype(candle_core::DType::F32)?);
                names.push(name);
                total = total.broadcast_add(&term)?;
            }
        }
        values.push(total.to_dtype(candle_core::DType::F32)?);
        // The one read back of the forward: every term and the total.
        let read = crate::runtime::counters::read_back(|| Tensor::stack(&values, 0)?.to_vec1::<f32>())?;
        let value = f64::from(read[read.len() - 1]);
        if !value.is_finite() {
            bail!(
                "the loss became {value} at step {global_step} of task `{}`; lower the learning rate or enable grad_clip",
                self.task_name
            );
        }
        let terms = names.into_iter().zip(read.iter().map(|&v| f64::from(v))).collect();
        let graph = probe.count_graph.then(|| GraphSize::of(&total));
        mark(probe, 1)?;
        let mut peak_memory = crate::runtime::device_memory_in_use(rt.device());
        let grads = total.backward()?;
        // The graph goes now: nothing of the forward outlives backward.
        drop(inputs);
        drop((old_features, teacher_features, reference_features, replay_features, total, loss, img, txt, pixels));
        peak_memory = peak_memory.max(crate::runtime::device_memory_in_use(rt.device()));
        mark(probe, 2)?;
        rt.set_grads(Some(grads));
        let hooks = s.strategies.iter().try_for_each(|st| st.after_backward(global_step as u64));
        let grads = rt.set_grads(None).expect("gradients were set above");
        hooks?;
        let mut grad_norm = None;
        let scale = match s.cfg.config.optimizer.grad_clip {
            Some(max) => {
                let norm = crate::runtime::counters::read_back(|| opt.grad_norm(&grads))?;
                if !norm.is_finite() {
                    let why = opt.diagnose_non_finite_norm(&grads)?;
                    bail!(
                        "the gradient norm became {norm} at step {global_step} of task `{}` ({why}); lower the \
                         learning rate or the loss weights",
                        self.task_name
                    );
                }
                grad_norm = Some(norm);
                clip_factor(norm, Some(max))
            }
            None => 1.0,
        };
        opt.step(&grads, lr_factor, scale)?;
        drop(grads);
        clamp_logit_scale(model)?;
        for st in &s.strategies {
            st.after_step(global_step as u64)?;
        }
        mark(probe, 3)?;
        Ok(StepStats { loss: value, terms, peak_memory, graph, grad_norm })
    }
}
