//! Image-text data: examples and their splits, where their images come from, the
//! transforms, the in-memory cache and the input pipeline that batches them.

pub mod cache;
pub mod convert;
pub mod export;
pub mod image;
pub mod loader;
pub mod pickle;
pub mod preprocess;
pub mod resample;
mod section;
pub mod shapes;
pub mod source;
pub mod transform;
pub mod webdataset;

pub use section::{CacheMode, DataSection, OnError, TaskSection, TrainTransform};

use candle_core::{Device, Tensor};

/// CLIP's normalisation constants.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_55, 0.261_302_6, 0.275_777_1];

/// One image with its captions. The image stays encoded (or, for generated and cached sets,
/// in bytes) until a batch needs it.
#[derive(Clone, Debug)]
pub struct Example {
    pub image: image::ImageSource,
    pub captions: Vec<String>,
    /// The class, for class-labelled data (zero-shot classification).
    pub class: Option<String>,
    /// Where the example came from (an image path, or a generated id), for the split record.
    pub id: String,
    /// The WebDataset shard it was read from (its index among the set's shards), which a
    /// shard-ordered epoch reads in turn.
    pub shard: Option<u32>,
}

impl Example {
    /// The image after the evaluation transform, CHW bytes at `size`.
    pub fn eval_pixels(&self, size: usize) -> Result<Vec<u8>, preprocess::ImageError> {
        self.image.prepare(&transform::Transform::Eval, size, &mut rand::SeedableRng::seed_from_u64(0))
    }
}

/// A task's data: a training split and a test split.
#[derive(Clone, Debug)]
pub struct TaskData {
    pub name: String,
    pub image_size: usize,
    pub train: Vec<Example>,
    pub test: Vec<Example>,
    /// The validation split (`val_fraction`), carved from the training data: what in-task
    /// evaluation (`[train] eval_every_epochs`) scores, so the test split is seen only at a
    /// stage's end.
    pub val: Vec<Example>,
    /// Class names (empty for caption-only data).
    pub classes: Vec<String>,
    /// Prompt templates for zero-shot classification (`{}` is the class).
    pub templates: Vec<String>,
    /// Images that could not be read and were skipped (`on_error = "skip"`).
    pub skipped: Vec<String>,
    /// What a batch does with an image it cannot decode.
    pub on_error: OnError,
    /// How the training split is ordered each epoch.
    pub order: loader::EpochOrder,
}

impl TaskData {
    /// Move `fraction` of the training examples (at least one) to the validation split,
    /// chosen by `split_seed` (never by the experiment's seed, so every seed validates on the
    /// same examples); both keep their order. At least two examples must be left to train.
    pub fn carve_validation(&mut self, fraction: f64, split_seed: u64) -> Result<(), String> {
        use rand::seq::SliceRandom;
        let n = self.train.len();
        let n_val = ((n as f64 * fraction).round() as usize).max(1);
        if n < n_val + 2 {
            return Err(format!(
                "val_fraction = {fraction} leaves {} of its {n} training examples to train; at least 2 must; lower \
                 val_fraction or give the task more data",
                n.saturating_sub(n_val)
            ));
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(split_seed ^ 0x0076_616c_6964));
        let mut is_val = vec![false; n];
        for &i in &order[..n_val] {
            is_val[i] = true;
        }
        let (val, train): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.train).into_iter().zip(is_val).partition(|(_, v)| *v);
        self.val = val.into_iter().map(|(e, _)| e).collect();
        self.train = train.into_iter().map(|(e, _)| e).collect();
        Ok(())
    }

    /// Training examples one epoch takes (`samples_per_epoch`, else the split's size).
    pub fn epoch_examples(&self) -> usize {
        self.order.epoch_len(self.train.len())
    }

    /// The planned examples of `split` after the evaluation transform, prepared on this
    /// thread and rayon's pool (the gradient pass, reference batches, the memory probe); an
    /// image that cannot be decoded follows the set's `on_error`.
    pub fn eval_batch(
        &self,
        split: &[Example],
        plan: &loader::BatchPlan,
        preprocess: &preprocess::Preprocess,
    ) -> Result<loader::Batch, loader::LoadError> {
        self.pipeline(split, &transform::Transform::Eval, preprocess).prepare(plan)
    }

    /// The pipeline of one of its splits.
    pub fn pipeline<'a>(
        &'a self,
        split: &'a [Example],
        transform: &'a transform::Transform,
        preprocess: &'a preprocess::Preprocess,
    ) -> loader::Pipeline<'a> {
        loader::Pipeline { split, task: &self.name, transform, preprocess, on_error: self.on_error }
    }
}

/// Load a task or zero-shot set from its source at the model's preprocessing.
pub fn load(
    t: &crate::data::TaskSection,
    pre: &preprocess::Preprocess,
    seed: u64,
) -> Result<TaskData, source::DataError> {
    if !t.parts.is_empty() {
        let mut out = TaskData {
            name: t.name.clone(),
            image_size: pre.size,
            train: Vec::new(),
            val: Vec::new(),
            test: Vec::new(),
            classes: Vec::new(),
            templates: Vec::new(),
            skipped: Vec::new(),
            on_error: t.on_error,
            order: t.epoch_order(),
        };
        for part in &t.parts {
            let d = load(part, pre, seed)?;
            out.train.extend(d.train);
            out.test.extend(d.test);
            out.skipped.extend(d.skipped);
            for c in d.classes {
                if !out.classes.contains(&c) {
                    out.classes.push(c);
                }
            }
            if out.templates.is_empty() {
                out.templates = d.templates;
            }
        }
        return Ok(out);
    }
    if t.source == "shapes" {
        Ok(shapes::generate(t, pre.size, seed))
    } else {
        source::load(t, pre)
    }
}

/// A task's or zero-shot set's split sizes without decoding its images (`recall run
/// --dry-run`): shapes are generated at a tiny size to count them; parts are added up.
pub fn inventory(t: &crate::data::TaskSection, seed: u64) -> Result<source::Inventory, source::DataError> {
    if !t.parts.is_empty() {
        let mut total = source::Inventory::default();
        for part in &t.parts {
            let p = inventory(part, seed)?;
            total.train += p.train;
            total.test += p.test;
            total.classes += p.classes;
            total.test_captions += p.test_captions;
            total.missing.extend(p.missing);
        }
        return Ok(total);
    }
    if t.source == "shapes" {
        let d = shapes::generate(t, 4, seed);
        return Ok(source::Inventory {
            train: d.train.len(),
            test: d.test.len(),
            classes: d.classes.len(),
            test_captions: d.test.iter().map(|e| e.captions.len()).sum(),
            missing: Vec::new(),
        });
    }
    source::inventory(t)
}

/// Examples as a [B, 3, S, S] tensor after the evaluation transform, prepared on this thread
/// and rayon's pool (the gradient pass, reference batches, probes and tests); a bad image is
/// an error whatever `on_error` says.
pub fn pixel_batch(
    examples: &[&Example],
    pre: &preprocess::Preprocess,
    device: &Device,
    dtype: candle_core::DType,
) -> candle_core::Result<Tensor> {
    let split: Vec<Example> = examples.iter().map(|&e| e.clone()).collect();
    let plan =
        loader::BatchPlan { indices: (0..split.len()).collect(), captions: vec![String::new(); split.len()], seed: 0 };
    let pipeline = loader::Pipeline {
        split: &split,
        task: "batch",
        transform: &transform::Transform::Eval,
        preprocess: pre,
        on_error: OnError::Fail,
    };
    let batch = pipeline.prepare(&plan).map_err(|e| candle_core::Error::Msg(e.message))?;
    batch.tensor(device, dtype)
}
