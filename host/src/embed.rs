//! `recall embed` and `recall tokenize`: the model's embeddings and token ids for files a user
//! names, written in forms other tools read (safetensors, JSON lines).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};

use crate::config::{self, ExperimentSection, ModelSection, NamedSource};
use crate::fsutil::write_atomic_with;
use crate::loader::Registry;
use crate::model::Model;
use crate::runtime::ops;

const IMAGE_EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "gif", "bmp", "webp", "tiff"];

/// A model from a spec: an experiment file (`.toml`), a run directory (its resolved config and
/// last checkpoint), or a checkpoint (transformers directory or OpenAI/open_clip file).
pub fn model_from_spec(spec: &Path, registry: &Registry) -> anyhow::Result<Model> {
    if spec.extension().is_some_and(|e| e == "toml") {
        let cfg = config::load(spec, &[])?;
        return Ok(Model::build(&cfg, registry)?);
    }
    if spec.join("config.resolved.toml").is_file() {
        let cfg = config::load(&spec.join("config.resolved.toml"), &[])?;
        let model = Model::build(&cfg, registry)?;
        // A run's checkpoint also holds its strategies' parameters (`strategy.N.*`, e.g. CKC's
        // projector); they are not part of the model.
        model.runtime.params().load_ignoring(&crate::model::last_checkpoint(spec)?, |n| n.starts_with("strategy."))?;
        return Ok(model);
    }
    if !spec.exists() {
        bail!(
            "model spec {} does not exist (expected a checkpoint, an experiment .toml or a run directory)",
            spec.display()
        );
    }
    let section: ModelSection = toml::from_str(&format!(
        "checkpoint = {:?}\n[tokenizer]\nplugin = \"clip-bpe\"\n[vision]\nplugin = \"clip-vision\"\n[text]\nplugin = \"clip-text\"\n",
        spec.display().to_string()
    ))?;
    let experiment: ExperimentSection = toml::from_str("name = \"embed\"")?;
    Ok(Model::build_parts(&experiment, &section, None, &NamedSource(spec.display().to_string()), registry)?)
}

/// Image files named directly or found (non-recursively, sorted) in directories.
pub fn image_files(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file())
                .filter(|f| {
                    f.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_lowercase().as_str()))
                })
                .collect();
            found.sort();
            if found.is_empty() {
                bail!(
                    "{} holds no image files (looked for {} directly inside it)",
                    p.display(),
                    IMAGE_EXTENSIONS.join(", ")
                );
            }
            files.extend(found);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            bail!("image input {} does not exist", p.display());
        }
    }
    Ok(files)
}

/// What `recall embed` wrote.
pub struct EmbedSummary {
    pub n_images: usize,
    pub n_texts: usize,
    pub out: PathBuf,
}

/// Embed images and texts with `model` and write `out` (safetensors): `image_embeds`,
/// `image_embeds_normalized`, `text_embeds`, `text_embeds_normalized`, `logits_per_image`
/// (exp(logit_scale) * normalised image @ normalised text^T) and `input_ids`.
pub fn embed(
    model: &Model,
    images: &[PathBuf],
    texts: &[String],
    out: &Path,
    batch: usize,
) -> anyhow::Result<EmbedSummary> {
    let rt = &model.runtime;
    rt.set_training(false);
    let pre = &model.preprocess;
    let mut tensors = std::collections::HashMap::new();
    let mut img_norm = None;
    if !images.is_empty() {
        let mut feats = Vec::new();
        for chunk in images.chunks(batch.max(1)) {
            let mut data = Vec::with_capacity(chunk.len() * 3 * model.image_size * model.image_size);
            for f in chunk {
                data.extend(pre.load(f)?);
            }
            let px = Tensor::from_vec(data, (chunk.len(), 3, model.image_size, model.image_size), rt.device())?
                .to_dtype(rt.float_dtype())?;
            feats.push(model.encode_images(&px)?.detach());
        }
        let img = Tensor::cat(&feats, 0)?.to_dtype(DType::F32)?;
        let n = ops::l2_normalize(&img)?;
        tensors.insert("image_embeds".to_string(), img);
        tensors.insert("image_embeds_normalized".to_string(), n.clone());
        img_norm = Some(n);
    }
    if !texts.is_empty() {
        let mut feats = Vec::new();
        let mut all_ids = Vec::new();
        for chunk in texts.chunks(batch.max(1)) {
            let (ids, mask) = model.tokenize(chunk)?;
            feats.push(model.encode_texts(&ids, &mask)?.detach());
            all_ids.push(ids);
        }
        let txt = Tensor::cat(&feats, 0)?.to_dtype(DType::F32)?;
        let n = ops::l2_normalize(&txt)?;
        if let Some(i) = &img_norm {
            let scale = model.logit_scale.exp()?.to_dtype(DType::F32)?;
            tensors.insert("logits_per_image".to_string(), i.matmul(&n.t()?)?.broadcast_mul(&scale)?);
        }
        tensors.insert("text_embeds".to_string(), txt);
        tensors.insert("text_embeds_normalized".to_string(), n);
        tensors.insert("input_ids".to_string(), Tensor::cat(&all_ids, 0)?);
    }
    if tensors.is_empty() {
        bail!("nothing to embed: give --images and/or --texts");
    }
    let mut named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    named.sort_by_key(|(k, _)| *k);
    crate::finite::check_inputs(&named).context("nothing was written: the model's embeddings are not finite")?;
    write_atomic_with(out, |tmp| candle_core::safetensors::save(&tensors, tmp).map_err(Into::into))?;
    Ok(EmbedSummary { n_images: images.len(), n_texts: texts.len(), out: out.to_path_buf() })
}

/// Non-empty lines of a text file (one caption per line).
pub fn read_lines(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read texts from {}", path.display()))?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect())
}
