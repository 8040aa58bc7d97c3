//! Evaluation after each stage: embeddings of a test split in evaluation mode, then every
//! evaluator plugin on them.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use candle_core::Tensor;

use crate::data::loader::Loader;
use crate::data::{self, TaskData};
use crate::model::Model;
use crate::plugin::EvaluatorInstance;

/// Retrieval inputs of a test split. Images whose caption sets are equal (class captions
/// such as "a handwritten digit seven") form a group: any image of the group is a right
/// answer, and the group's captions are listed once. Returns (texts, text -> image,
/// image -> group).
pub fn retrieval_texts(split: &[data::Example]) -> (Vec<String>, Vec<u32>, Vec<u32>) {
    let mut first: std::collections::HashMap<Vec<&str>, u32> = std::collections::HashMap::new();
    let mut group = Vec::with_capacity(split.len());
    let mut texts = Vec::new();
    let mut index = Vec::new();
    for (i, ex) in split.iter().enumerate() {
        let mut key: Vec<&str> = ex.captions.iter().map(String::as_str).collect();
        key.sort_unstable();
        let g = *first.entry(key).or_insert(i as u32);
        group.push(g);
        if g == i as u32 {
            for c in &ex.captions {
                texts.push(c.clone());
                index.push(i as u32);
            }
        }
    }
    (texts, index, group)
}

/// Image embeddings of a set's test split in evaluation mode, its batches prepared by the
/// loader's workers while the previous one is encoded. A test image that cannot be decoded
/// is an error whatever `on_error` says: a skipped one would shift every index after it.
fn embed_images(
    model: &Model,
    set: &TaskData,
    split: &[data::Example],
    batch: usize,
    loader: &Loader,
) -> anyhow::Result<Tensor> {
    let rt = &model.runtime;
    let eval = data::transform::Transform::Eval;
    let mut pipeline = set.pipeline(split, &eval, &model.preprocess);
    pipeline.on_error = data::OnError::Fail;
    let mut img = Vec::new();
    loader.stream(&pipeline, &data::loader::in_order(split.len(), batch), |b| -> anyhow::Result<()> {
        img.push(model.encode_images(&b.tensor(rt.device(), rt.float_dtype())?)?.detach());
        Ok(())
    })?;
    Ok(Tensor::cat(&img, 0)?)
}

/// Text embeddings, in evaluation mode.
fn embed_texts(model: &Model, texts: &[String], batch: usize) -> anyhow::Result<Tensor> {
    let mut txt = Vec::new();
    for chunk in texts.chunks(batch.max(1)) {
        let (ids, mask) = model.tokenize(chunk)?;
        txt.push(model.encode_texts(&ids, &mask)?.detach());
    }
    Ok(Tensor::cat(&txt, 0)?)
}

fn run_evaluators(
    evaluators: &[EvaluatorInstance],
    inputs: &[(&str, &Tensor)],
) -> anyhow::Result<BTreeMap<String, f64>> {
    crate::finite::check_inputs(inputs)?;
    let mut out = BTreeMap::new();
    for e in evaluators {
        for (name, value) in e.evaluate(inputs)? {
            out.insert(format!("{}/{}", e.plugin, name), value);
        }
    }
    Ok(out)
}

/// Every task-suite evaluator on one task's test split; metric names are `{plugin}/{metric}`.
pub fn evaluate(
    model: &Model,
    evaluators: &[EvaluatorInstance],
    task: &TaskData,
    batch: usize,
    loader: &Loader,
) -> anyhow::Result<BTreeMap<String, f64>> {
    evaluate_split(model, evaluators, task, &task.test, batch, loader)
}

/// Every task-suite evaluator on one split of a task (its test split, or its validation
/// split inside the task).
pub fn evaluate_split(
    model: &Model,
    evaluators: &[EvaluatorInstance],
    task: &TaskData,
    split: &[data::Example],
    batch: usize,
    loader: &Loader,
) -> anyhow::Result<BTreeMap<String, f64>> {
    model.runtime.set_training(false);
    let dev = model.runtime.device();
    let img = embed_images(model, task, split, batch, loader)?;
    let (texts, index, group) = retrieval_texts(split);
    let txt = embed_texts(model, &texts, batch)?;
    let index = Tensor::from_vec(index.clone(), index.len(), dev)?;
    let group = Tensor::from_vec(group.clone(), group.len(), dev)?;
    run_evaluators(
        evaluators,
        &[("image_embeds", &img), ("text_embeds", &txt), ("text_image_index", &index), ("image_group", &group)],
    )
}

/// Class embeddings for zero-shot classification: per class, the normalised mean of the
/// normalised embeddings of every template filled with the class name (CLIP's recipe).
pub fn class_embeddings(
    model: &Model,
    classes: &[String],
    templates: &[String],
    batch: usize,
) -> anyhow::Result<Tensor> {
    let prompts: Vec<String> =
        classes.iter().flat_map(|c| templates.iter().map(move |t| data::source::fill(t, c))).collect();
    let e = embed_texts(model, &prompts, batch)?;
    let norm = |x: &Tensor| -> candle_core::Result<Tensor> { x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?) };
    let (n, d) = (classes.len(), e.dim(1)?);
    let mean = norm(&e)?.reshape((n, templates.len(), d))?.mean(1)?;
    Ok(norm(&mean)?)
}

/// Every zero-shot evaluator on one held-out set's test split.
pub fn evaluate_zeroshot(
    model: &Model,
    evaluators: &[EvaluatorInstance],
    set: &TaskData,
    batch: usize,
    loader: &Loader,
) -> anyhow::Result<BTreeMap<String, f64>> {
    model.runtime.set_training(false);
    if set.classes.is_empty() {
        bail!("zero-shot set `{}` has no classes; zero-shot classification needs class-labelled data", set.name);
    }
    let labels = set
        .test
        .iter()
        .map(|e| {
            e.class.as_ref().and_then(|c| set.classes.iter().position(|k| k == c)).map(|p| p as u32).with_context(
                || format!("zero-shot set `{}`: example {} has no class among {:?}", set.name, e.id, set.classes),
            )
        })
        .collect::<anyhow::Result<Vec<u32>>>()?;
    let img = embed_images(model, set, &set.test, batch, loader)?;
    let classes = class_embeddings(model, &set.classes, &set.templates, batch)?;
    let labels = Tensor::from_vec(labels.clone(), labels.len(), model.runtime.device())?;
    run_evaluators(evaluators, &[("image_embeds", &img), ("class_embeds", &classes), ("labels", &labels)])
}
