//! `retrieval`: image<->text retrieval Recall@K.
//!
//! Inputs: `image_embeds` [Ni, D], `text_embeds` [Nt, D] and `text_image_index` [Nt] (the
//! image each caption describes; several captions per image allowed). Similarities are
//! cosine. Image->text: an image scores a hit at K when any of its captions ranks in the top
//! K. Text->image: a caption scores when its image ranks in the top K. Ties are broken
//! against the correct item, so a degenerate model (all embeddings equal) scores zero rather
//! than a perfect score. Non-finite similarities (a model whose weights or embeddings hold NaN
//! or infinity) are an error, never a score: NaN compares false with everything, so it would
//! otherwise rank every right answer first. Values are percentages.

use recall_sdk::prelude::*;
use serde::Deserialize;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_ks")]
    pub ks: Vec<usize>,
}

fn default_ks() -> Vec<usize> {
    vec![1, 5, 10]
}

pub struct Retrieval {
    ks: Vec<usize>,
}

/// Rank (0-based) of the best correct item in `scores`: the number of incorrect items scoring
/// at least as high as the best correct one.
pub fn best_rank(scores: &[f32], is_correct: impl Fn(usize) -> bool) -> Option<usize> {
    let best = scores
        .iter()
        .enumerate()
        .filter(|(i, _)| is_correct(*i))
        .map(|(_, &s)| s)
        .fold(None, |m: Option<f32>, s| Some(m.map_or(s, |m| m.max(s))))?;
    Some(scores.iter().enumerate().filter(|(i, &s)| !is_correct(*i) && s >= best).count())
}

/// Recall@K for both directions from a row-major [Ni, Nt] similarity matrix.
/// Recall@K both ways. `group[i]` (optional) makes images interchangeable: a text is a right
/// answer for every image of its image's group (class captions shared by many images).
pub fn recall_at_k(
    sims: &[f32],
    n_images: usize,
    text_image: &[u32],
    group: Option<&[u32]>,
    ks: &[usize],
) -> Result<Vec<(String, f64)>> {
    let n_texts = text_image.len();
    if sims.len() != n_images * n_texts {
        bail!("similarity matrix has {} entries, expected {n_images} x {n_texts}", sims.len());
    }
    if let Some(bad) = text_image.iter().find(|&&i| i as usize >= n_images) {
        bail!("text_image_index names image {bad}, but there are only {n_images} images");
    }
    refuse_non_finite(sims, n_texts)?;
    let identity: Vec<u32> = (0..n_images as u32).collect();
    let group = group.unwrap_or(&identity);
    if group.len() != n_images {
        bail!("image_group has {} entries for {n_images} images", group.len());
    }
    let same = |a: usize, b: usize| group[a] == group[b];
    let mut i2t_ranks = Vec::with_capacity(n_images);
    for i in 0..n_images {
        let row = &sims[i * n_texts..(i + 1) * n_texts];
        if let Some(r) = best_rank(row, |t| same(text_image[t] as usize, i)) {
            i2t_ranks.push(r);
        }
    }
    let mut t2i_ranks = Vec::with_capacity(n_texts);
    let mut column = vec![0f32; n_images];
    for (t, &img) in text_image.iter().enumerate() {
        for (i, c) in column.iter_mut().enumerate() {
            *c = sims[i * n_texts + t];
        }
        t2i_ranks.push(best_rank(&column, |i| same(i, img as usize)).unwrap_or(usize::MAX));
    }
    let pct = |ranks: &[usize], k: usize| -> f64 {
        if ranks.is_empty() {
            return 0.0;
        }
        100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64
    };
    let mut out = Vec::new();
    for &k in ks {
        out.push((format!("i2t_r{k}"), pct(&i2t_ranks, k)));
    }
    for &k in ks {
        out.push((format!("t2i_r{k}"), pct(&t2i_ranks, k)));
    }
    let mean = out.iter().map(|(_, v)| v).sum::<f64>() / out.len().max(1) as f64;
    out.push(("mean_recall".to_string(), mean));
    // What a random ranking scores on this split (the random baseline of FWT): for a query
    // with c right answers among n candidates, P(one in the top k) = 1 - C(n-c, k) / C(n, k).
    let hit = |n: usize, c: usize, k: usize| -> f64 {
        1.0 - (0..k.min(n)).map(|j| (n.saturating_sub(c + j)) as f64 / (n - j) as f64).product::<f64>()
    };
    let group_size: Vec<usize> = (0..n_images).map(|i| (0..n_images).filter(|&j| same(i, j)).count()).collect();
    let right_texts: Vec<usize> =
        (0..n_images).map(|i| text_image.iter().filter(|&&t| same(t as usize, i)).count()).collect();
    for &k in ks {
        let queries: Vec<f64> = right_texts.iter().filter(|&&c| c > 0).map(|&c| hit(n_texts, c, k)).collect();
        out.push((format!("i2t_r{k}_chance"), 100.0 * queries.iter().sum::<f64>() / queries.len().max(1) as f64));
    }
    for &k in ks {
        let queries: Vec<f64> = text_image.iter().map(|&img| hit(n_images, group_size[img as usize], k)).collect();
        out.push((format!("t2i_r{k}_chance"), 100.0 * queries.iter().sum::<f64>() / queries.len().max(1) as f64));
    }
    Ok(out)
}

/// An error naming how many similarities are not finite and the first (row, column).
pub fn refuse_non_finite(sims: &[f32], n_cols: usize) -> Result<()> {
    let bad = sims.iter().filter(|s| !s.is_finite()).count();
    match sims.iter().position(|s| !s.is_finite()) {
        None => Ok(()),
        Some(first) => bail!(
            "{bad} of {} similarities are not finite (the first, {}, at image {} and text {}): the \
             embeddings hold NaN or infinity, so no retrieval score is reported",
            sims.len(),
            sims[first],
            first / n_cols.max(1),
            first % n_cols.max(1)
        ),
    }
}

impl Evaluator for Retrieval {
    type Config = Config;

    fn create(_host: &Host, cfg: Config) -> Result<Self> {
        if cfg.ks.is_empty() || cfg.ks.contains(&0) {
            return Err(Error::config("ks", "ks must be a non-empty list of positive integers"));
        }
        Ok(Retrieval { ks: cfg.ks })
    }

    fn evaluate(&mut self, host: &Host, inputs: &[NamedTensor]) -> Result<Vec<(String, f64)>> {
        let img = host.input(inputs, "image_embeds")?.l2_normalize(1e-12)?;
        let txt = host.input(inputs, "text_embeds")?.l2_normalize(1e-12)?;
        let index = host.input(inputs, "text_image_index")?.to_vec_u32()?;
        let group = host.find_input(inputs, "image_group")?.map(|g| g.to_vec_u32()).transpose()?;
        let n_images = img.dim(0)?;
        let sims = img.matmul(&txt.t()?)?.to_vec_f32()?;
        recall_at_k(&sims, n_images, &index, group.as_deref(), &self.ks)
    }
}

recall_sdk::export_plugin! {
    name: "retrieval",
    description: "image<->text retrieval Recall@K (several captions per image allowed)",
    evaluator: Retrieval,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(m: &[(String, f64)], k: &str) -> f64 {
        m.iter().find(|(n, _)| n == k).unwrap().1
    }

    #[test]
    fn hand_computed_recalls() {
        // 2 images, 3 captions: captions 0,1 -> image 0; caption 2 -> image 1.
        #[rustfmt::skip]
        let sims = [
            0.1, 0.9, 0.5,   // image 0: best correct caption 1 ranks first
            0.8, 0.2, 0.3,   // image 1: its caption 2 (0.3) ranks behind caption 0 (0.8)
        ];
        let m = recall_at_k(&sims, 2, &[0, 0, 1], None, &[1, 2]).unwrap();
        assert_eq!(get(&m, "i2t_r1"), 50.0);
        assert_eq!(get(&m, "i2t_r2"), 100.0);
        // caption 0: image 1 (0.8) beats image 0 (0.1) -> rank 1; caption 1 -> rank 0;
        // caption 2: image 0 (0.5) beats image 1 (0.3) -> rank 1.
        assert!((get(&m, "t2i_r1") - 100.0 / 3.0).abs() < 1e-9);
        assert_eq!(get(&m, "t2i_r2"), 100.0);
    }

    #[test]
    fn ties_count_against_the_correct_item() {
        let sims = [0.5f32; 4];
        let m = recall_at_k(&sims, 2, &[0, 1], None, &[1]).unwrap();
        assert_eq!(get(&m, "i2t_r1"), 0.0);
        assert_eq!(get(&m, "t2i_r1"), 0.0);
    }

    #[test]
    fn non_finite_similarities_are_refused_not_scored() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let sims = [0.9, 0.1, bad, 0.8];
            let e = recall_at_k(&sims, 2, &[0, 1], None, &[1]).unwrap_err().to_string();
            assert!(e.contains("1 of 4 similarities are not finite") && e.contains("image 1 and text 0"), "{e}");
        }
    }

    #[test]
    fn bad_index_is_an_error() {
        assert!(recall_at_k(&[0.0; 2], 1, &[0, 3], None, &[1]).is_err());
    }

    #[test]
    fn chance_levels_are_those_of_a_random_ranking() {
        // 4 images, one caption each: random R@1 = 1/4, R@2 = 1/2 both ways.
        let m = recall_at_k(&[0.0; 16], 4, &[0, 1, 2, 3], None, &[1, 2]).unwrap();
        assert!((get(&m, "i2t_r1_chance") - 25.0).abs() < 1e-9);
        assert!((get(&m, "i2t_r2_chance") - 50.0).abs() < 1e-9);
        assert!((get(&m, "t2i_r1_chance") - 25.0).abs() < 1e-9);
        // Two groups of two images (class captions, one text each): i2t R@1 chance = 1/2,
        // t2i R@1 chance = 2/4, t2i R@2 chance = 1 - (2/4)(1/3) = 5/6.
        let m = recall_at_k(&[0.0; 8], 4, &[0, 2], Some(&[0, 0, 2, 2]), &[1, 2]).unwrap();
        assert!((get(&m, "i2t_r1_chance") - 50.0).abs() < 1e-9);
        assert!((get(&m, "t2i_r1_chance") - 50.0).abs() < 1e-9);
        assert!((get(&m, "t2i_r2_chance") - 500.0 / 6.0).abs() < 1e-9);
    }

    #[test]
    fn grouped_images_share_their_captions() {
        // Images 0 and 1 are one group (same class caption, listed once as text 0); image 2
        // has text 1. Image 1 is closest to text 0, its group's caption: right.
        #[rustfmt::skip]
        let sims = [
            0.2, 0.9,   // image 0: prefers text 1 (wrong)
            0.8, 0.1,   // image 1: prefers text 0 (right, by group)
            0.1, 0.7,   // image 2: prefers text 1 (right)
        ];
        let m = recall_at_k(&sims, 3, &[0, 2], Some(&[0, 0, 2]), &[1]).unwrap();
        assert!((get(&m, "i2t_r1") - 200.0 / 3.0).abs() < 1e-9);
        // text 0's best image is image 1 (0.8), in its group: right; text 1's is image 0 (0.9): wrong.
        assert_eq!(get(&m, "t2i_r1"), 50.0);
        assert!(recall_at_k(&sims, 3, &[0, 2], Some(&[0, 0]), &[1]).is_err());
    }
}
