//! The exemplar memory a strategy asks for (`Strategy::replay`): which training examples it
//! keeps (reservoir, task- or class-balanced, within a budget in examples), their features
//! when the strategy wants DER's targets, and the replay batch drawn from it at every step.
//!
//! The memory holds references (task, example index, caption), never images: a replay batch
//! is prepared from the tasks' data as a training batch is, through the training transform.
//! It is saved with every checkpoint (`replay.json`), so a resumed run replays what an
//! unbroken one does.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use base64::Engine as _;
use rand::rngs::StdRng;
use rand::Rng;
use recall_sdk::{Replay, ReplayPolicy};
use serde::{Deserialize, Serialize};

use crate::data::{self, loader::Batch, Example, TaskData};

/// An exemplar's image and text features, f32, as the model computed them.
pub type Features = (Vec<f32>, Vec<f32>);

/// One example in the memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exemplar {
    /// The task it came from, and its index in that task's training split.
    pub task: u32,
    pub index: u32,
    /// The caption it was paired with when it entered (a replay batch pairs it with the same).
    pub caption: String,
    /// Its class, under the class-balanced policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Its image and text features when it entered, with `store_features` (base64 of
    /// little-endian f32 in the saved form).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "features_b64")]
    pub features: Option<Features>,
}

/// The memory: its request, its exemplars, and how many examples reservoir sampling has been
/// offered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExemplarMemory {
    #[serde(skip, default = "unset_request")]
    pub request: Replay,
    pub exemplars: Vec<Exemplar>,
    pub seen: u64,
}

fn unset_request() -> Replay {
    Replay {
        budget: 0,
        policy: ReplayPolicy::Reservoir,
        batch_size: 0,
        mode: recall_sdk::ReplayMode::Join,
        store_features: false,
    }
}

/// Where the current batch's examples go under reservoir sampling: (row of the batch, slot
/// of the memory). A later row may take a slot an earlier one took.
pub type Offers = Vec<(usize, usize)>;

impl ExemplarMemory {
    pub fn new(request: Replay) -> Self {
        ExemplarMemory { request, exemplars: Vec::new(), seen: 0 }
    }

    pub fn len(&self) -> usize {
        self.exemplars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exemplars.is_empty()
    }

    /// Slots of this step's replay batch: `batch_size` of them (all, if fewer are kept),
    /// distinct, uniformly drawn.
    pub fn draw(&self, rng: &mut StdRng) -> Vec<usize> {
        let n = self.request.batch_size.min(self.len());
        rand::seq::index::sample(rng, self.len(), n).into_vec()
    }

    /// Reservoir sampling over the `rows` examples of the current batch, counted as seen:
    /// the k-th example seen takes slot k while the memory fills, then slot j for j uniform in
    /// [0, k] when j < budget (as experience replay and DER keep theirs). Empty under the
    /// balanced policies, which fill at the end of a task.
    pub fn offer(&mut self, rows: usize, rng: &mut StdRng) -> Offers {
        if self.request.policy != ReplayPolicy::Reservoir {
            return Vec::new();
        }
        let budget = self.request.budget as u64;
        let mut offers = Vec::new();
        for row in 0..rows {
            let slot = if self.seen < budget { self.seen } else { rng.random_range(0..=self.seen) };
            if slot < budget {
                offers.push((row, slot as usize));
            }
            self.seen += 1;
        }
        offers
    }

    /// Put `exemplar` in `slot` (the next free one, or one to replace).
    pub fn place(&mut self, slot: usize, exemplar: Exemplar) {
        match slot.cmp(&self.exemplars.len()) {
            std::cmp::Ordering::Less => self.exemplars[slot] = exemplar,
            std::cmp::Ordering::Equal => self.exemplars.push(exemplar),
            std::cmp::Ordering::Greater => unreachable!("reservoir slots fill in order"),
        }
    }

    /// After task `task` under a balanced policy: the budget split evenly over the groups seen
    /// (tasks, or (task, class) pairs), earlier groups cut to their new share (their slots were
    /// drawn at random, so a prefix is a random subset), the new task's groups filled with a
    /// random subset of its training examples. Returns the slots added, whose features are
    /// still to compute. Under reservoir: nothing.
    pub fn fill_after_task(&mut self, task: usize, train: &[Example], rng: &mut StdRng) -> Vec<usize> {
        let by_class = match self.request.policy {
            ReplayPolicy::Reservoir => return Vec::new(),
            ReplayPolicy::TaskBalanced => false,
            ReplayPolicy::ClassBalanced => true,
        };
        let class_of = |e: &Example| if by_class { e.class.clone() } else { None };
        let mut new_groups: BTreeMap<Option<String>, Vec<usize>> = BTreeMap::new();
        for (i, e) in train.iter().enumerate() {
            new_groups.entry(class_of(e)).or_default().push(i);
        }
        let mut kept: BTreeMap<(u32, Option<String>), Vec<Exemplar>> = BTreeMap::new();
        for ex in std::mem::take(&mut self.exemplars) {
            kept.entry((ex.task, ex.class.clone())).or_default().push(ex);
        }
        let mut shares = split_evenly(self.request.budget, kept.len() + new_groups.len()).into_iter();
        for (_, mut exs) in kept {
            exs.truncate(shares.next().unwrap_or(0));
            self.exemplars.extend(exs);
        }
        let mut added = Vec::new();
        for (class, indices) in new_groups {
            let n = shares.next().unwrap_or(0).min(indices.len());
            for pick in rand::seq::index::sample(rng, indices.len(), n) {
                let i = indices[pick];
                let captions = &train[i].captions;
                let caption = captions[rng.random_range(0..captions.len())].clone();
                added.push(self.exemplars.len());
                let class = class.clone();
                self.exemplars.push(Exemplar { task: task as u32, index: i as u32, caption, class, features: None });
            }
        }
        added
    }

    /// The saved form (`replay.json`).
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        Ok(serde_json::to_vec(self)?)
    }

    /// A memory saved by [`Self::to_bytes`], under the request the strategy makes now.
    pub fn from_bytes(request: Replay, bytes: &[u8]) -> anyhow::Result<Self> {
        let mut m: ExemplarMemory = serde_json::from_slice(bytes).context("the saved replay memory is not valid")?;
        m.request = request;
        if m.len() > request.budget {
            bail!(
                "the saved replay memory holds {} exemplars, more than the budget of {}; the strategy's memory \
                 setting changed since it was saved",
                m.len(),
                request.budget
            );
        }
        Ok(m)
    }
}

/// `total` split into `parts` shares that differ by at most one, the larger ones first.
fn split_evenly(total: usize, parts: usize) -> Vec<usize> {
    if parts == 0 {
        return Vec::new();
    }
    (0..parts).map(|i| total / parts + usize::from(i < total % parts)).collect()
}

/// Base64 of little-endian f32 for the two feature vectors of an exemplar.
mod features_b64 {
    use super::*;
    use serde::{Deserializer, Serializer};

    fn encode(v: &[f32]) -> String {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn decode<E: serde::de::Error>(s: &str) -> Result<Vec<f32>, E> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).map_err(E::custom)?;
        if bytes.len() % 4 != 0 {
            return Err(E::custom("a feature vector's byte count is not a multiple of 4"));
        }
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    pub fn serialize<S: Serializer>(f: &Option<Features>, s: S) -> Result<S::Ok, S::Error> {
        match f {
            Some((i, t)) => (encode(i), encode(t)).serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Features>, D::Error> {
        let pair: Option<(String, String)> = Option::deserialize(d)?;
        pair.map(|(i, t)| Ok((decode(&i)?, decode(&t)?))).transpose()
    }
}

/// A replay batch prepared for the device, and the memory slot of each of its rows.
pub struct ReplayBatch {
    pub batch: Batch,
    pub slots: Vec<usize>,
}

/// Prepare the exemplars in `slots` through the training transform, grouped by task (the
/// augmentation drawn from `seed`), as one batch. An image that fails follows its task's
/// `on_error`: under "skip" its row is left out.
pub fn prepare(
    memory: &ExemplarMemory,
    slots: &[usize],
    tasks: &[TaskData],
    transform: &data::transform::Transform,
    preprocess: &data::preprocess::Preprocess,
    seed: u64,
) -> anyhow::Result<ReplayBatch> {
    let mut by_task: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for &slot in slots {
        by_task.entry(memory.exemplars[slot].task).or_default().push(slot);
    }
    let mut out = ReplayBatch {
        batch: Batch {
            indices: Vec::new(),
            captions: Vec::new(),
            pixels: Vec::new(),
            size: preprocess.size,
            preprocess: preprocess.clone(),
            skipped: Vec::new(),
        },
        slots: Vec::new(),
    };
    for (task, task_slots) in by_task {
        let data = tasks.get(task as usize).with_context(|| format!("the replay memory names task {task}"))?;
        let plan = data::loader::BatchPlan {
            indices: task_slots.iter().map(|&s| memory.exemplars[s].index as usize).collect(),
            captions: task_slots.iter().map(|&s| memory.exemplars[s].caption.clone()).collect(),
            seed: seed ^ (u64::from(task) + 1).wrapping_mul(0x2545_f491_4f6c_dd1d),
        };
        if let Some(&bad) = plan.indices.iter().find(|&&i| i >= data.train.len()) {
            bail!(
                "the replay memory names example {bad} of task `{}`, which has {} training examples; the task's \
                 data changed since the memory was saved",
                data.name,
                data.train.len()
            );
        }
        let b = data.pipeline(&data.train, transform, preprocess).prepare(&plan)?;
        // The rows kept are a subsequence of the plan (skipped images leave gaps).
        let mut kept = b.indices.iter().peekable();
        for (&slot, &i) in task_slots.iter().zip(&plan.indices) {
            if kept.peek() == Some(&&i) {
                kept.next();
                out.slots.push(slot);
            }
        }
        out.batch = out.batch.joined(&b);
    }
    Ok(out)
}

/// A replay batch encoded by the model being trained, and its stored features (DER's targets)
/// when the memory keeps them.
pub struct ReplayFeatures {
    pub image: candle_core::Tensor,
    pub text: candle_core::Tensor,
    pub stored: Option<(candle_core::Tensor, candle_core::Tensor)>,
}

/// The separate forward of a replay batch.
pub fn encode(
    model: &crate::model::Model,
    rb: &ReplayBatch,
    memory: Option<&std::cell::RefCell<ExemplarMemory>>,
) -> anyhow::Result<ReplayFeatures> {
    let rt = &model.runtime;
    let pixels = rb.batch.tensor(rt.device(), rt.compute_dtype())?;
    let (ids, mask) = model.tokenize(&rb.batch.captions)?;
    let image = model.encode_images(&pixels)?;
    let text = model.encode_texts(&ids, &mask)?;
    let stored = match memory.map(|m| m.borrow()) {
        Some(m) if m.request.store_features => Some(stored_features(&m, &rb.slots, &image, &text)?),
        _ => None,
    };
    Ok(ReplayFeatures { image, text, stored })
}

/// The features stored with the exemplars in `slots`, as tensors shaped and typed like the
/// model's current ones.
fn stored_features(
    m: &ExemplarMemory,
    slots: &[usize],
    image: &candle_core::Tensor,
    text: &candle_core::Tensor,
) -> anyhow::Result<(candle_core::Tensor, candle_core::Tensor)> {
    let rows: Vec<&Features> = slots
        .iter()
        .map(|&s| {
            m.exemplars[s].features.as_ref().with_context(|| format!("replay exemplar {s} has no stored features"))
        })
        .collect::<anyhow::Result<_>>()?;
    let stack = |pick: fn(&Features) -> &Vec<f32>, like: &candle_core::Tensor| -> anyhow::Result<candle_core::Tensor> {
        let width = like.dim(1)?;
        if let Some(bad) = rows.iter().map(|r| pick(r).len()).find(|&w| w != width) {
            bail!(
                "the replay memory's stored features are {bad} wide and the model's {width}; the memory was saved by \
                 another model"
            );
        }
        let flat: Vec<f32> = rows.iter().flat_map(|r| pick(r).iter().copied()).collect();
        Ok(candle_core::Tensor::from_vec(flat, (rows.len(), width), like.device())?.to_dtype(like.dtype())?)
    };
    Ok((stack(|r| &r.0, image)?, stack(|r| &r.1, text)?))
}

/// Rows `rows` of the image and text features, read back as f32 (one read for both).
pub fn read_rows(
    img: &candle_core::Tensor,
    txt: &candle_core::Tensor,
    rows: &[usize],
) -> anyhow::Result<Vec<Features>> {
    let index =
        candle_core::Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), img.device())?;
    let pick = |t: &candle_core::Tensor| -> candle_core::Result<candle_core::Tensor> {
        t.detach().index_select(&index, 0)?.to_dtype(candle_core::DType::F32)
    };
    let (i, t) = (pick(img)?, pick(txt)?);
    let wi = i.dim(1)?;
    let both = candle_core::Tensor::cat(&[i, t], 1)?;
    let rows = crate::runtime::counters::read_back(|| both.to_vec2::<f32>())?;
    Ok(rows.into_iter().map(|r| (r[..wi].to_vec(), r[wi..].to_vec())).collect())
}

/// The end of task `t_idx` for a balanced memory: its share of the task's training examples
/// enters, and with `store_features` their features are computed by the model as the task
/// left it (evaluation mode, the evaluation transform).
pub fn fill_after_task(s: &super::Session, t_idx: usize) -> anyhow::Result<()> {
    let Some(memory) = &s.replay else { return Ok(()) };
    let mut memory = memory.borrow_mut();
    let seed = s.cfg.config.experiment.seed ^ 0x6d65_6d6f ^ ((t_idx as u64) << 40);
    let added = memory.fill_after_task(t_idx, &s.tasks[t_idx].train, &mut rand::SeedableRng::seed_from_u64(seed));
    if added.is_empty() || !memory.request.store_features {
        return Ok(());
    }
    let model = &s.model;
    let rt = &model.runtime;
    rt.set_training(false);
    let task = &s.tasks[t_idx];
    for chunk in added.chunks(s.cfg.config.train.eval_batch_size.max(1)) {
        let plan = data::loader::BatchPlan {
            indices: chunk.iter().map(|&slot| memory.exemplars[slot].index as usize).collect(),
            captions: chunk.iter().map(|&slot| memory.exemplars[slot].caption.clone()).collect(),
            seed: 0,
        };
        let b = task.eval_batch(&task.train, &plan, &model.preprocess)?;
        if b.len() != chunk.len() {
            bail!("an image of task `{}` chosen for the replay memory could not be read", task.name);
        }
        let pixels = b.tensor(rt.device(), rt.compute_dtype())?;
        let (ids, mask) = model.tokenize(&b.captions)?;
        let (img, txt) = (model.encode_images(&pixels)?, model.encode_texts(&ids, &mask)?);
        let features = read_rows(&img, &txt, &(0..chunk.len()).collect::<Vec<_>>())?;
        for (&slot, f) in chunk.iter().zip(features) {
            memory.exemplars[slot].features = Some(f);
        }
    }
    Ok(())
}

/// A budget larger than every task's training data together decides nothing (the memory
/// keeps everything): a warning, in the run's log.
pub fn warn_if_budget_exceeds_data(s: &super::Session) {
    let Some(memory) = &s.replay else { return };
    let budget = memory.borrow().request.budget;
    let examples: usize = s.tasks.iter().map(|t| t.train.len()).sum();
    if budget > examples {
        tracing::warn!(
            budget,
            examples,
            "the replay budget is larger than every task's training examples together: the memory will keep all of \
             them, and the budget decides nothing"
        );
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use recall_sdk::ReplayMode;

    use super::*;

    fn memory(budget: usize, policy: ReplayPolicy, store_features: bool) -> ExemplarMemory {
        ExemplarMemory::new(Replay { budget, policy, batch_size: 4, mode: ReplayMode::Separate, store_features })
    }

    fn stream(m: &mut ExemplarMemory, examples: usize, batch: usize, rng: &mut StdRng) {
        for start in (0..examples).step_by(batch) {
            let rows = batch.min(examples - start);
            for (row, slot) in m.offer(rows, rng) {
                let e = Exemplar {
                    task: 0,
                    index: (start + row) as u32,
                    caption: String::new(),
                    class: None,
                    features: None,
                };
                m.place(slot, e);
            }
        }
    }

    /// Each of N examples streamed through a reservoir of k ends in it with probability k / N:
    /// over 4,000 streams of 50 examples into 10 slots, every example's frequency is within
    /// 0.2 +- 0.03 (about 5 standard deviations).
    #[test]
    fn the_reservoir_keeps_every_example_seen_with_equal_probability() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut kept = [0usize; 50];
        for _ in 0..4000 {
            let mut m = memory(10, ReplayPolicy::Reservoir, false);
            stream(&mut m, 50, 7, &mut rng);
            assert_eq!((m.len(), m.seen), (10, 50));
            for e in &m.exemplars {
                kept[e.index as usize] += 1;
            }
        }
        for (i, &n) in kept.iter().enumerate() {
            let p = n as f64 / 4000.0;
            assert!((p - 0.2).abs() < 0.03, "example {i} kept with frequency {p}");
        }
    }

    #[test]
    fn a_draw_is_distinct_slots_and_never_more_than_the_memory_holds() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut m = memory(10, ReplayPolicy::Reservoir, false);
        stream(&mut m, 3, 3, &mut rng);
        let mut d = m.draw(&mut rng);
        d.sort();
        assert_eq!(d, [0, 1, 2]);
        stream(&mut m, 20, 5, &mut rng);
        let mut d = m.draw(&mut rng);
        assert_eq!(d.len(), 4);
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 4);
    }

    #[test]
    fn balanced_memories_fill_after_tasks_and_reservoirs_do_not() {
        let example = |class: &str| Example {
            image: crate::data::image::ImageSource::File("unused.png".into()),
            captions: vec![format!("a {class}")],
            class: Some(class.to_string()),
            id: String::new(),
            shard: None,
        };
        let train: Vec<Example> = ["a", "a", "a", "b", "b", "c"].into_iter().map(example).collect();
        let mut rng = StdRng::seed_from_u64(3);
        assert!(memory(5, ReplayPolicy::Reservoir, false).fill_after_task(0, &train, &mut rng).is_empty());
        let mut m = memory(6, ReplayPolicy::ClassBalanced, true);
        let added = m.fill_after_task(0, &train, &mut rng);
        // 6 slots over 3 classes; class c has one example, so its second slot stays empty.
        assert_eq!(added.len(), 5);
        let count = |m: &ExemplarMemory, c: &str| m.exemplars.iter().filter(|e| e.class.as_deref() == Some(c)).count();
        assert_eq!([count(&m, "a"), count(&m, "b"), count(&m, "c")], [2, 2, 1]);
        m.fill_after_task(1, &train, &mut rng);
        assert_eq!(m.len(), 6, "six groups of one");
        assert!(m.exemplars.iter().all(|e| e.features.is_none()), "features are the engine's to compute");
    }

    #[test]
    fn the_saved_form_round_trips_features_bit_for_bit_and_checks_the_budget() {
        let mut m = memory(3, ReplayPolicy::Reservoir, true);
        m.seen = 17;
        let features = (vec![1.5f32, -0.0, f32::MIN_POSITIVE], vec![3.25f32]);
        m.place(
            0,
            Exemplar {
                task: 1,
                index: 9,
                caption: "a \"quoted\" caption".into(),
                class: None,
                features: Some(features),
            },
        );
        m.place(1, Exemplar { task: 0, index: 2, caption: "b".into(), class: Some("x".into()), features: None });
        let back = ExemplarMemory::from_bytes(m.request, &m.to_bytes().unwrap()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.exemplars[0].features.as_ref().unwrap().0[1].to_bits(), (-0.0f32).to_bits());
        let smaller = Replay { budget: 1, ..m.request };
        let e = ExemplarMemory::from_bytes(smaller, &m.to_bytes().unwrap()).unwrap_err();
        assert!(e.to_string().contains("more than the budget of 1"), "{e}");
    }

    #[test]
    fn shares_differ_by_at_most_one_and_sum_to_the_budget() {
        assert_eq!(split_evenly(9, 2), [5, 4]);
        assert_eq!(split_evenly(2, 3), [1, 1, 0]);
        assert!(split_evenly(5, 0).is_empty());
    }
}
