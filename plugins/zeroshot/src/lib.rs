//! Zero-shot classification: each image is assigned the class whose prompt embedding (the
//! host averages a class's prompt templates, CLIP's recipe) is most similar. Reports top-k
//! accuracy in percent; a tie counts against the right class, as in the retrieval evaluator.
//!
//! Inputs: `image_embeds` [N, D], `class_embeds` [C, D], `labels` [N] (class indices).

use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which top-k accuracies to report.
    #[serde(default = "default_ks")]
    pub ks: Vec<usize>,
}

fn default_ks() -> Vec<usize> {
    vec![1, 5]
}

pub struct ZeroShot {
    ks: Vec<usize>,
}

/// Class scores are computed this many at a time at most (32 MB of f32), in whole rows.
pub const BLOCK_ELEMENTS: usize = 8 << 20;

/// Top-k accuracies (percent) of `scores` ([N, C] row-major) against `labels`.
pub fn top_k(scores: &[f32], n_classes: usize, labels: &[u32], ks: &[usize]) -> Result<Vec<(String, f64)>> {
    let ranks = ranks_of(scores, n_classes, labels, 0)?;
    Ok(accuracies(&ranks, n_classes, ks))
}

/// The rank of each image's right class among `scores` ([N, C] row-major): how many other
/// classes score at least as high. `first` is the first row's index in the whole set (for
/// errors). Non-finite scores are an error: NaN compares false with everything and would rank
/// the right class first.
pub fn ranks_of(scores: &[f32], n_classes: usize, labels: &[u32], first: usize) -> Result<Vec<usize>> {
    if n_classes == 0 || scores.len() != labels.len() * n_classes {
        bail!("scores have {} entries, expected {} images x {n_classes} classes", scores.len(), labels.len());
    }
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= n_classes) {
        bail!("label {bad} is out of range for {n_classes} classes");
    }
    if let Some(at) = scores.iter().position(|s| !s.is_finite()) {
        bail!(
            "{} of the {} class scores of images {first}..{} are not finite (the first, {}, at image {} and class \
             {}): the embeddings hold NaN or infinity, so no accuracy is reported",
            scores.iter().filter(|s| !s.is_finite()).count(),
            scores.len(),
            first + labels.len(),
            scores[at],
            first + at / n_classes,
            at % n_classes
        );
    }
    Ok(labels
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            let row = &scores[i * n_classes..(i + 1) * n_classes];
            let right = row[l as usize];
            row.iter().enumerate().filter(|&(c, &s)| c != l as usize && s >= right).count()
        })
        .collect())
}

/// Top-k accuracies from the ranks, and a random classifier's top-k (k of C classes: the
/// random baseline of FWT).
fn accuracies(ranks: &[usize], n_classes: usize, ks: &[usize]) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = ks
        .iter()
        .map(|&k| {
            let hits = ranks.iter().filter(|&&r| r < k).count();
            (format!("top{k}"), 100.0 * hits as f64 / ranks.len().max(1) as f64)
        })
        .collect();
    for &k in ks {
        out.push((format!("top{k}_chance"), 100.0 * k.min(n_classes) as f64 / n_classes as f64));
    }
    out
}

impl Evaluator for ZeroShot {
    type Config = Config;

    fn create(_host: &Host, cfg: Config) -> Result<Self> {
        if cfg.ks.is_empty() || cfg.ks.contains(&0) {
            return Err(Error::config("ks", "ks must be a non-empty list of positive integers"));
        }
        Ok(ZeroShot { ks: cfg.ks })
    }

    fn evaluate(&mut self, host: &Host, inputs: &[NamedTensor]) -> Result<Vec<(String, f64)>> {
        let img = host.input(inputs, "image_embeds")?.l2_normalize(1e-12)?;
        let classes = host.input(inputs, "class_embeds")?.l2_normalize(1e-12)?;
        let labels = host.input(inputs, "labels")?.to_vec_u32()?;
        let (n_images, n_classes) = (img.dim(0)?, classes.dim(0)?);
        if labels.len() != n_images {
            bail!("labels has {} entries for {n_images} images", labels.len());
        }
        // Scores in blocks of whole rows (ImageNet's 50,000 x 1,000 would be 200 MB at once);
        // each block's ranks are exact, so the accuracies are those of the whole matrix.
        let per_block = (BLOCK_ELEMENTS / n_classes.max(1)).max(1);
        let class_t = classes.t()?;
        let mut ranks = Vec::with_capacity(n_images);
        let mut start = 0;
        while start < n_images {
            let len = per_block.min(n_images - start);
            let scores = img.narrow(0, start, len)?.matmul(&class_t)?.to_vec_f32()?;
            ranks.extend(ranks_of(&scores, n_classes, &labels[start..start + len], start)?);
            start += len;
        }
        Ok(accuracies(&ranks, n_classes, &self.ks))
    }
}

recall_sdk::export_plugin! {
    name: "zeroshot",
    description: "zero-shot classification top-k accuracy from class prompt embeddings",
    evaluator: ZeroShot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_top_k_with_ties() {
        #[rustfmt::skip]
        let scores = [
            0.9, 0.1, 0.0,  // label 0: rank 0
            0.5, 0.4, 0.6,  // label 1: rank 2
            0.3, 0.3, 0.1,  // label 0: tie with class 1 counts against it: rank 1
        ];
        let m = top_k(&scores, 3, &[0, 1, 0], &[1, 2, 3]).unwrap();
        let get = |k: &str| m.iter().find(|(n, _)| n == k).unwrap().1;
        assert!((get("top1") - 100.0 / 3.0).abs() < 1e-9);
        assert!((get("top2") - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(get("top3"), 100.0);
        assert!((get("top1_chance") - 100.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(top_k(&[0.0; 4], 2, &[0, 2], &[1]).is_err());
        assert!(top_k(&[0.0; 3], 2, &[0, 1], &[1]).is_err());
    }

    #[test]
    fn nan_scores_are_refused_not_counted_as_hits() {
        let e = top_k(&[0.2, f32::NAN, 0.1, 0.3], 2, &[0, 1], &[1]).unwrap_err().to_string();
        assert!(
            e.contains("1 of the 4 class scores of images 0..2 are not finite") && e.contains("image 0 and class 1"),
            "{e}"
        );
    }
}
