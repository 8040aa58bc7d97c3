//! `recall bench --boundary`: the cost of the plugin boundary on a real training step.
//!
//! The same small CLIP training step (forward both towers, contrastive loss, backward, AdamW)
//! is timed (a) through the `clip-vision` / `clip-text` plugins and (b) through
//! [`crate::reference`], which runs the same candle ops on the same parameters directly in
//! the host. Runs alternate (a, b, a, b, ...) after a warmup so drift hits both equally; the
//! ratio of medians is the overhead. Target (DESIGN.md): <= 1.02.

use std::fmt;
use std::time::Instant;

use candle_core::Tensor;

use crate::config;
use crate::data::{self, shapes};
use crate::loader::Registry;
use crate::model::Model;
use crate::optim::AdamW;
use crate::reference::{Params, TowerShape};
use crate::runtime::ops;

/// The model the benchmark trains (the quickstart's towers, no adapter).
pub const BENCH_EXPERIMENT: &str = r#"
[experiment]
name = "bench"
[model.tokenizer]
plugin = "clip-bpe"
context_length = 16
[model.vision]
plugin = "clip-vision"
image_size = 32
patch_size = 8
width = 128
layers = 4
heads = 4
embed_dim = 128
[model.text]
plugin = "clip-text"
context_length = 16
width = 128
layers = 4
heads = 4
embed_dim = 128
[optimizer]
lr = 1e-4
[train]
epochs = 1
batch_size = 64
[[task]]
name = "shapes"
shapes = ["circle", "square", "triangle"]
[[evaluator]]
plugin = "retrieval"
"#;

/// Timings of both paths.
pub struct BenchResult {
    pub batch: usize,
    pub steps: usize,
    pub plugin_ms: f64,
    pub direct_ms: f64,
}

impl BenchResult {
    pub fn ratio(&self) -> f64 {
        self.plugin_ms / self.direct_ms
    }
}

impl fmt::Display for BenchResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "training step, batch {}, median of {} steps each (interleaved):", self.batch, self.steps)?;
        writeln!(f, "  through plugins : {:8.2} ms", self.plugin_ms)?;
        writeln!(f, "  direct (linked) : {:8.2} ms", self.direct_ms)?;
        write!(f, "  ratio           : {:8.4}  (target <= 1.02)", self.ratio())
    }
}

/// Run the benchmark with plugins from `registry`.
pub fn run(registry: &Registry, steps: usize, batch: usize) -> anyhow::Result<BenchResult> {
    let cfg = config::parse(BENCH_EXPERIMENT, "<bench>")?;
    let model = Model::build(&cfg, registry)?;
    let rt = model.runtime.clone();
    let task = shapes::generate(&cfg.config.tasks[0], model.image_size, 0);
    let examples: Vec<&data::Example> = task.train.iter().cycle().take(batch).collect();
    let pixels = data::pixel_batch(&examples, &model.preprocess, rt.device(), rt.float_dtype())?;
    let captions: Vec<String> = examples.iter().map(|e| e.captions[0].clone()).collect();
    let (ids, mask) = model.tokenize(&captions)?;
    let mut opt = AdamW::new(&rt.params(), &cfg.config.optimizer)?;
    let params = Params::from_runtime(&rt);
    let shape = TowerShape { heads: 4, quick_gelu: true, eps: 1e-5 };
    rt.set_training(true);

    let plugin_step = |opt: &mut AdamW| -> anyhow::Result<f64> {
        let t = Instant::now();
        let img = model.encode_images(&pixels)?;
        let txt = model.encode_texts(&ids, &mask)?;
        let loss = ops::clip_loss(&img, &txt, &model.logit_scale)?;
        let grads = loss.backward()?;
        opt.step(&grads, 1.0, 1.0)?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let direct_step = |opt: &mut AdamW| -> anyhow::Result<f64> {
        let t = Instant::now();
        let img = params.vision(&pixels, shape)?;
        let txt = params.text(&ids, shape)?;
        let loss = ops::clip_loss(&img, &txt, &model.logit_scale)?;
        let grads = loss.backward()?;
        opt.step(&grads, 1.0, 1.0)?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    for _ in 0..3 {
        plugin_step(&mut opt)?;
        direct_step(&mut opt)?;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..steps.max(1) {
        // Alternate which path goes first so neither always runs on a warmer cache.
        if i % 2 == 0 {
            a.push(plugin_step(&mut opt)?);
            b.push(direct_step(&mut opt)?);
        } else {
            b.push(direct_step(&mut opt)?);
            a.push(plugin_step(&mut opt)?);
        }
    }
    Ok(BenchResult {
        batch,
        steps: steps.max(1),
        plugin_ms: super::median_p90(&mut a).0,
        direct_ms: super::median_p90(&mut b).0,
    })
}

/// Features of one batch through both paths (for the equivalence test).
pub fn both_paths(
    model: &Model,
    pixels: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
    shape: TowerShape,
) -> anyhow::Result<[(Tensor, Tensor); 2]> {
    let params = Params::from_runtime(&model.runtime);
    let plugin = (model.encode_images(pixels)?, model.encode_texts(ids, mask)?);
    let direct = (params.vision(pixels, shape)?, params.text(ids, shape)?);
    Ok([plugin, direct])
}
