//! Image-text data: examples, splits and batching into tensors.

pub mod convert;
pub mod pickle;
pub mod preprocess;
mod section;
pub mod shapes;
pub mod source;

pub use section::{OnError, TaskSection};

use candle_core::{Device, Tensor};

/// CLIP's normalisation constants.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_55, 0.261_302_6, 0.275_777_1];

/// One image with its captions. Pixels are CHW in [0, 1].
#[derive(Clone, Debug)]
pub struct Example {
    pub pixels: Vec<f32>,
    pub captions: Vec<String>,
    /// The class, for class-labelled data (zero-shot classification).
    pub class: Option<String>,
    /// Where the example came from (an image path, or a generated id), for the split record.
    pub id: String,
}

/// A task's data: a training split and a test split.
#[derive(Clone, Debug)]
pub struct TaskData {
    pub name: String,
    pub image_size: usize,
    pub train: Vec<Example>,
    pub test: Vec<Example>,
    /// Class names (empty for caption-only data).
    pub classes: Vec<String>,
    /// Prompt templates for zero-shot classification (`{}` is the class).
    pub templates: Vec<String>,
    /// Images that could not be read and were skipped (`on_error = "skip"`).
    pub skipped: Vec<String>,
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
            test: Vec::new(),
            classes: Vec::new(),
            templates: Vec::new(),
            skipped: Vec::new(),
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

/// Stack examples into a [B, 3, S, S] tensor normalised as `pre` says.
pub fn pixel_batch(
    examples: &[&Example],
    pre: &preprocess::Preprocess,
    device: &Device,
    dtype: candle_core::DType,
) -> candle_core::Result<Tensor> {
    let s = pre.size;
    let mut data = Vec::with_capacity(examples.len() * 3 * s * s);
    for ex in examples {
        if ex.pixels.len() != 3 * s * s {
            candle_core::bail!("an example has {} pixel values, expected 3 x {s} x {s}", ex.pixels.len());
        }
        data.extend(pre.normalize(&ex.pixels));
    }
    Tensor::from_vec(data, (examples.len(), 3, s, s), device)?.to_dtype(dtype)
}
