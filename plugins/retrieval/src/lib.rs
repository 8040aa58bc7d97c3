//! `retrieval`: image<->text retrieval Recall@K.
//!
//! Inputs: `image_embeds` [Ni, D], `text_embeds` [Nt, D] and `text_image_index` [Nt] (the
//! image each caption describes; several captions per image allowed). Similarities are
//! cosine. Image->text: an image scores a hit at K when any of its captions ranks in the top
//! K. Text->image: a caption scores when its image ranks in the top K. Ties are broken
//! against the correct item, so a degenerate model (all embeddings equal) scores zero rather
//! than a perfect score. Non-finite similarities (a model whose weights or embeddings hold NaN
//! or infinity) are an error, never a score: NaN compares false with everything, so it would
//! otherwise rank every right answer first. Values are percentages. Similarities are computed
//! in blocks of rows, so memory beyond the embeddings is bounded whatever the split's size.

use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone)]
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

/// Similarities are computed this many at a time at most (32 MB of f32), a block of whole
/// rows, so evaluating COCO-5k (5,000 images x 25,000 captions: 500 MB as one matrix) stays
/// within a bounded amount of memory beyond its embeddings.
pub const BLOCK_ELEMENTS: usize = 8 << 20;

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

/// The queries of a retrieval split both ways: which texts answer which images, images
/// grouped by identical caption sets. Fed rows of similarities (an image's over all texts,
/// a text's over all images) in any blocking; the ranks and the scores follow.
pub struct Queries<'a> {
    n_images: usize,
    text_image: &'a [u32],
    group: Vec<u32>,
    i2t_ranks: Vec<usize>,
    t2i_ranks: Vec<usize>,
    non_finite: usize,
    first_non_finite: Option<(f32, usize, usize)>,
}

impl<'a> Queries<'a> {
    /// Checks the index and the groups against the number of images.
    pub fn new(n_images: usize, text_image: &'a [u32], group: Option<&[u32]>) -> Result<Self> {
        if let Some(bad) = text_image.iter().find(|&&i| i as usize >= n_images) {
            bail!("text_image_index names image {bad}, but there are only {n_images} images");
        }
        let group = match group {
            Some(g) if g.len() != n_images => bail!("image_group has {} entries for {n_images} images", g.len()),
            Some(g) => g.to_vec(),
            None => (0..n_images as u32).collect(),
        };
        Ok(Queries {
            n_images,
            text_image,
            group,
            i2t_ranks: Vec::with_capacity(n_images),
            t2i_ranks: Vec::with_capacity(text_image.len()),
            non_finite: 0,
            first_non_finite: None,
        })
    }

    /// Image `image`'s similarities to every text, in text order. Images are fed in order.
    pub fn image_row(&mut self, image: usize, row: &[f32]) {
        if let Some(k) = row.iter().position(|s| !s.is_finite()) {
            self.non_finite += row.iter().filter(|s| !s.is_finite()).count();
            self.first_non_finite.get_or_insert((row[k], image, k));
        }
        let (group, text_image) = (&self.group, self.text_image);
        if let Some(r) = best_rank(row, |t| group[text_image[t] as usize] == group[image]) {
            self.i2t_ranks.push(r);
        }
    }

    /// Text `text`'s similarities to every image, in image order.
    pub fn text_row(&mut self, text: usize, row: &[f32]) {
        let right = self.group[self.text_image[text] as usize];
        let group = &self.group;
        self.t2i_ranks.push(best_rank(row, |i| group[i] == right).unwrap_or(usize::MAX));
    }

    /// An error naming how many similarities were not finite and the first, once every
    /// image row has been fed: NaN compares false with everything, so it would otherwise
    /// rank every right answer first.
    pub fn refuse_non_finite(&self) -> Result<()> {
        match self.first_non_finite {
            None => Ok(()),
            Some((value, image, text)) => bail!(
                "{} of {} similarities are not finite (the first, {value}, at image {image} and text {text}): the \
                 embeddings hold NaN or infinity, so no retrieval score is reported",
                self.non_finite,
                self.n_images * self.text_image.len(),
            ),
        }
    }

    /// Recall@K both ways, their mean, and what a random ranking scores (the random
    /// baseline of FWT).
    pub fn scores(&self, ks: &[usize]) -> Result<Vec<(String, f64)>> {
        self.refuse_non_finite()?;
        if self.t2i_ranks.len() != self.text_image.len() {
            bail!("{} text rows were ranked for {} texts", self.t2i_ranks.len(), self.text_image.len());
        }
        let pct = |ranks: &[usize], k: usize| -> f64 {
            if ranks.is_empty() {
                return 0.0;
            }
            100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64
        };
        let mut out = Vec::new();
        for &k in ks {
            out.push((format!("i2t_r{k}"), pct(&self.i2t_ranks, k)));
        }
        for &k in ks {
            out.push((format!("t2i_r{k}"), pct(&self.t2i_ranks, k)));
        }
        let mean = out.iter().map(|(_, v)| v).sum::<f64>() / out.len().max(1) as f64;
        out.push(("mean_recall".to_string(), mean));
        out.extend(self.chance(ks));
        Ok(out)
    }

    /// For a query with c right answers among n candidates, P(one in the top k) =
    /// 1 - C(n-c, k) / C(n, k).
    fn chance(&self, ks: &[usize]) -> Vec<(String, f64)> {
        let hit = |n: usize, c: usize, k: usize| -> f64 {
            1.0 - (0..k.min(n)).map(|j| (n.saturating_sub(c + j)) as f64 / (n - j) as f64).product::<f64>()
        };
        let mut images_in = std::collections::HashMap::<u32, usize>::new();
        for &g in &self.group {
            *images_in.entry(g).or_default() += 1;
        }
        let mut texts_of = std::collections::HashMap::<u32, usize>::new();
        for &t in self.text_image {
            *texts_of.entry(self.group[t as usize]).or_default() += 1;
        }
        let n_texts = self.text_image.len();
        let mut out = Vec::new();
        for &k in ks {
            let queries: Vec<f64> = (self.group.iter().map(|g| texts_of.get(g).copied().unwrap_or(0)))
                .filter(|&c| c > 0)
                .map(|c| hit(n_texts, c, k))
                .collect();
            out.push((format!("i2t_r{k}_chance"), 100.0 * queries.iter().sum::<f64>() / queries.len().max(1) as f64));
        }
        for &k in ks {
            let queries =
                self.text_image.iter().map(|&img| hit(self.n_images, images_in[&self.group[img as usize]], k));
            out.push((format!("t2i_r{k}_chance"), 100.0 * queries.sum::<f64>() / n_texts.max(1) as f64));
        }
        out
    }
}

/// Recall@K both ways from a row-major [Ni, Nt] similarity matrix held whole (small sets,
/// tests). `group[i]` (optional) makes images interchangeable: a text is a right answer for
/// every image of its image's group (class captions shared by many images).
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
    let mut q = Queries::new(n_images, text_image, group)?;
    for i in 0..n_images {
        q.image_row(i, &sims[i * n_texts..(i + 1) * n_texts]);
    }
    q.refuse_non_finite()?;
    let mut column = vec![0f32; n_images];
    for t in 0..n_texts {
        for (i, c) in column.iter_mut().enumerate() {
            *c = sims[i * n_texts + t];
        }
        q.text_row(t, &column);
    }
    q.scores(ks)
}

/// Rows of `a` against every row of `b` (both L2-normalised), `BLOCK_ELEMENTS` similarities
/// at a time, each row handed to `row` with its index.
fn similarity_rows(a: &Tensor, b: &Tensor, mut row: impl FnMut(usize, &[f32])) -> Result<()> {
    let (n, m) = (a.dim(0)?, b.dim(0)?);
    let per_block = (BLOCK_ELEMENTS / m.max(1)).max(1);
    let bt = b.t()?;
    let mut start = 0;
    while start < n {
        let len = per_block.min(n - start);
        let block = a.narrow(0, start, len)?.matmul(&bt)?.to_vec_f32()?;
        for (r, values) in block.chunks(m.max(1)).enumerate().take(len) {
            row(start + r, values);
        }
        start += len;
    }
    Ok(())
}

impl Evaluator for Retrieval {
    type Config = Config;

    fn create(_host: &Host, cfg: Config) -> Result<Self> {
        if cfg.ks.is_empty() || cfg.ks.contains(&0) {
            return Err(Error::config("ks", "ks must be a non-empty list of positive integers"));
        }
        Ok(Retrieval { ks: cfg.ks })
    }

    /// Similarities in blocks of rows, images against texts then texts against images (the
    /// products twice, so no [Ni, Nt] matrix is ever held).
    fn evaluate(&mut self, host: &Host, inputs: &[NamedTensor]) -> Result<Vec<(String, f64)>> {
        let img = host.input(inputs, "image_embeds")?.l2_normalize(1e-12)?;
        let txt = host.input(inputs, "text_embeds")?.l2_normalize(1e-12)?;
        let index = host.input(inputs, "text_image_index")?.to_vec_u32()?;
        let group = host.find_input(inputs, "image_group")?.map(|g| g.to_vec_u32()).transpose()?;
        if txt.dim(0)? != index.len() {
            bail!("text_image_index has {} entries for {} texts", index.len(), txt.dim(0)?);
        }
        let mut q = Queries::new(img.dim(0)?, &index, group.as_deref())?;
        similarity_rows(&img, &txt, |i, row| q.image_row(i, row))?;
        q.refuse_non_finite()?;
        similarity_rows(&txt, &img, |t, row| q.text_row(t, row))?;
        q.scores(&self.ks)
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
