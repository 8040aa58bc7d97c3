//! The input pipeline: batches decoded, transformed and normalised by a pool of workers
//! ahead of the step that consumes them.
//!
//! A run plans its batches first ([`BatchPlan`]: which examples, which captions, the seed of
//! their augmentation), on the engine's thread, from (seed, task, epoch) alone. One producer
//! thread then prepares the planned batches in order, each batch's images in parallel on the
//! worker pool, and hands them over through a queue of `prefetch` ready batches while the
//! step runs. Each image's augmentation draws from a generator seeded by its batch's seed and
//! its position, so what a step sees depends on the plan only: the same for any number of
//! workers, and after a resume.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;

use super::preprocess::Preprocess;
use super::transform::Transform;
use super::{Example, OnError};

/// One planned batch of a split.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchPlan {
    /// Indices into the split.
    pub indices: Vec<usize>,
    /// The caption each example is paired with.
    pub captions: Vec<String>,
    /// The seed of this batch's augmentation.
    pub seed: u64,
}

/// A batch ready for the device.
#[derive(Debug)]
pub struct Batch {
    /// Indices into the split of the examples it holds (a skipped image leaves a gap).
    pub indices: Vec<usize>,
    pub captions: Vec<String>,
    /// [B, 3, S, S] bytes after the transform. Batches wait in the queue as bytes, a quarter
    /// of their floats; they are normalised when the step takes them.
    pub pixels: Vec<u8>,
    pub size: usize,
    /// The model's normalisation.
    pub preprocess: Preprocess,
    /// Images that could not be decoded and were left out (`on_error = "skip"`).
    pub skipped: Vec<String>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The pixels normalised with the model's mean and std, images in parallel.
    pub fn normalized(&self) -> Vec<f32> {
        let image = 3 * self.size * self.size;
        let mut out = vec![0f32; self.pixels.len()];
        out.par_chunks_mut(image.max(1)).zip(self.pixels.par_chunks(image.max(1))).for_each(|(dst, src)| {
            normalize_into(src, &self.preprocess, dst);
        });
        out
    }

    /// The normalised pixels as a [B, 3, S, S] tensor.
    pub fn tensor(&self, device: &Device, dtype: candle_core::DType) -> candle_core::Result<Tensor> {
        let s = self.size;
        Tensor::from_vec(self.normalized(), (self.len(), 3, s, s), device)?.to_dtype(dtype)
    }

    /// The pixels normalised with another model's constants (a teacher's).
    pub fn tensor_with(
        &self,
        pre: &Preprocess,
        device: &Device,
        dtype: candle_core::DType,
    ) -> candle_core::Result<Tensor> {
        let s = self.size;
        Tensor::from_vec(normalize(&self.pixels, pre), (self.len(), 3, s, s), device)?.to_dtype(dtype)
    }

    /// A hash of each image's pixels (the image-code cache's key).
    /// This batch followed by `other`'s examples (replay joining a step's batch).
    pub fn joined(&self, other: &Batch) -> Batch {
        Batch {
            indices: self.indices.iter().chain(&other.indices).copied().collect(),
            captions: self.captions.iter().chain(&other.captions).cloned().collect(),
            pixels: [self.pixels.as_slice(), other.pixels.as_slice()].concat(),
            size: self.size,
            preprocess: self.preprocess.clone(),
            skipped: self.skipped.iter().chain(&other.skipped).cloned().collect(),
        }
    }

    pub fn content_keys(&self) -> Vec<u64> {
        let n = 3 * self.size * self.size;
        self.pixels.chunks(n.max(1)).map(content_key).collect()
    }
}

/// FNV-1a over an image's bytes.
pub fn content_key(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// CHW bytes -> normalised floats; `v / 255` first, as the loaders before the pipeline held
/// their pixels, so values are bit for bit the same.
fn normalize(pixels: &[u8], pre: &Preprocess) -> Vec<f32> {
    let image = 3 * pre.size * pre.size;
    let mut out = vec![0f32; pixels.len()];
    for (dst, src) in out.chunks_mut(image).zip(pixels.chunks(image)) {
        normalize_into(src, pre, dst);
    }
    out
}

/// One CHW image's bytes normalised into `out`.
fn normalize_into(pixels: &[u8], pre: &Preprocess, out: &mut [f32]) {
    let plane = pre.size * pre.size;
    for (c, (dst, src)) in out.chunks_mut(plane).zip(pixels.chunks(plane)).enumerate() {
        let (mean, std) = (pre.mean[c], pre.std[c]);
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = (v as f32 / 255.0 - mean) / std;
        }
    }
}

/// An image that could not be prepared, named; `task` says which set it belongs to.
#[derive(Debug, thiserror::Error)]
#[error("task `{task}`: {message}")]
pub struct LoadError {
    pub task: String,
    pub message: String,
}

/// How a split's batches are made.
pub struct Pipeline<'a> {
    pub split: &'a [Example],
    /// The set's name, for errors.
    pub task: &'a str,
    pub transform: &'a Transform,
    pub preprocess: &'a Preprocess,
    pub on_error: OnError,
}

impl Pipeline<'_> {
    /// Prepare one planned batch, its images in parallel on the current rayon pool. A
    /// worker's panic becomes an error that names the image.
    pub fn prepare(&self, plan: &BatchPlan) -> Result<Batch, LoadError> {
        let size = self.preprocess.size;
        let prepared: Vec<Result<Vec<u8>, String>> = plan
            .indices
            .par_iter()
            .enumerate()
            .map(|(pos, &i)| {
                let ex = &self.split[i];
                let mut rng = StdRng::seed_from_u64(image_seed(plan.seed, pos));
                match std::panic::catch_unwind(AssertUnwindSafe(|| ex.image.prepare(self.transform, size, &mut rng))) {
                    Ok(Ok(px)) => Ok(px),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(panic) => Err(format!("preparing image {} panicked: {}", ex.id, panic_text(&panic))),
                }
            })
            .collect();
        let mut batch = Batch {
            indices: Vec::with_capacity(plan.indices.len()),
            captions: Vec::with_capacity(plan.indices.len()),
            pixels: Vec::with_capacity(plan.indices.len() * 3 * size * size),
            size,
            preprocess: self.preprocess.clone(),
            skipped: Vec::new(),
        };
        for ((&i, caption), px) in plan.indices.iter().zip(&plan.captions).zip(prepared) {
            match px {
                Ok(px) => {
                    batch.indices.push(i);
                    batch.captions.push(caption.clone());
                    batch.pixels.extend(px);
                }
                Err(message) if self.on_error == OnError::Skip => {
                    tracing::warn!(task = self.task, "skipping: {message}");
                    batch.skipped.push(self.split[i].id.clone());
                }
                Err(message) => {
                    return Err(LoadError {
                        task: self.task.to_string(),
                        message: format!(
                            "{message}; fix or remove the file, or set `on_error = \"skip\"` on the task to count \
                             and skip it"
                        ),
                    })
                }
            }
        }
        Ok(batch)
    }

    /// Prepare `plans` in order on `pool`, at most `prefetch` ready batches ahead, and hand
    /// each to `consume` on this thread. Stops at the first error of either side; the
    /// producer always ends before this returns.
    pub fn stream<E: From<LoadError>>(
        &self,
        plans: &[BatchPlan],
        pool: &rayon::ThreadPool,
        prefetch: usize,
        mut consume: impl FnMut(Batch) -> Result<(), E>,
    ) -> Result<(), E> {
        std::thread::scope(|scope| {
            let (tx, rx) = mpsc::sync_channel::<Result<Batch, LoadError>>(prefetch.max(1));
            scope.spawn(move || {
                for plan in plans {
                    let batch = pool.install(|| self.prepare(plan));
                    let failed = batch.is_err();
                    // The consumer hung up (it failed): stop preparing.
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                }
            });
            for batch in rx {
                consume(batch?)?;
            }
            Ok(())
        })
    }
}

/// The seed of the image at `position` of a batch seeded `batch_seed`.
fn image_seed(batch_seed: u64, position: usize) -> u64 {
    batch_seed ^ (position as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03)
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// The decode workers and how far ahead of the step they may run.
pub struct Loader {
    pool: rayon::ThreadPool,
    prefetch: usize,
}

impl Loader {
    /// A pool of `workers` decode threads, `prefetch` ready batches queued at most.
    pub fn new(workers: usize, prefetch: usize) -> anyhow::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers.max(1))
            .thread_name(|i| format!("recall-data-{i}"))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot start {workers} data workers: {e}"))?;
        Ok(Loader { pool, prefetch: prefetch.max(1) })
    }

    pub fn workers(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Stream `plans` of `pipeline` to `consume` (see [`Pipeline::stream`]).
    pub fn stream<E: From<LoadError>>(
        &self,
        pipeline: &Pipeline,
        plans: &[BatchPlan],
        consume: impl FnMut(Batch) -> Result<(), E>,
    ) -> Result<(), E> {
        pipeline.stream(plans, &self.pool, self.prefetch, consume)
    }
}

/// Batches of `n` examples in order, `batch` at a time (evaluation: no shuffling, no
/// captions, no augmentation seed).
pub fn in_order(n: usize, batch: usize) -> Vec<BatchPlan> {
    (0..n)
        .collect::<Vec<_>>()
        .chunks(batch.max(1))
        .map(|c| BatchPlan { indices: c.to_vec(), captions: vec![String::new(); c.len()], seed: 0 })
        .collect()
}

/// How a training split is ordered each epoch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochOrder {
    /// Read the shards in a shuffled order, in file order within each, through a shuffle
    /// buffer of this many examples (WebDataset's and open_clip's order: reads stay
    /// sequential within a shard). `None`: a uniform permutation of the whole split.
    pub shuffle_buffer: Option<usize>,
    /// Examples per epoch. Fewer than the split: the epoch stops there; more: further
    /// passes, each ordered afresh, until it is reached. `None`: the split once.
    pub samples_per_epoch: Option<usize>,
}

impl EpochOrder {
    /// Examples one epoch of a split of `n` takes.
    pub fn epoch_len(&self, n: usize) -> usize {
        self.samples_per_epoch.unwrap_or(n)
    }

    /// One pass over a split in this order.
    fn pass(&self, split: &[Example], rng: &mut StdRng) -> Vec<usize> {
        use rand::seq::SliceRandom;
        let Some(buffer) = self.shuffle_buffer else {
            let mut order: Vec<usize> = (0..split.len()).collect();
            order.shuffle(rng);
            return order;
        };
        // Examples grouped by shard, in split order (the shards' file order) within each.
        let mut shards: Vec<Option<u32>> = Vec::new();
        let mut members: Vec<Vec<usize>> = Vec::new();
        for (i, e) in split.iter().enumerate() {
            match shards.iter().position(|s| *s == e.shard) {
                Some(k) => members[k].push(i),
                None => {
                    shards.push(e.shard);
                    members.push(vec![i]);
                }
            }
        }
        members.shuffle(rng);
        let mut held: Vec<usize> = Vec::with_capacity(buffer.max(1));
        let mut order = Vec::with_capacity(split.len());
        for i in members.into_iter().flatten() {
            if held.len() < buffer.max(1) {
                held.push(i);
            } else {
                let j = rand::Rng::random_range(rng, 0..held.len());
                order.push(std::mem::replace(&mut held[j], i));
            }
        }
        while !held.is_empty() {
            let j = rand::Rng::random_range(rng, 0..held.len());
            order.push(held.swap_remove(j));
        }
        order
    }
}

/// The batches of one epoch over `split`: ordered by `order` from `rng`, cut into batches of
/// `batch_size` (a last batch of one example is dropped: the contrastive loss needs two),
/// each example paired with one of its captions drawn from `rng`. Batch `k` is seeded from
/// `seed` and `k`.
pub fn plan_epoch(
    split: &[Example],
    order: &EpochOrder,
    batch_size: usize,
    rng: &mut StdRng,
    seed: u64,
) -> Vec<BatchPlan> {
    let mut indices = order.pass(split, rng);
    if let Some(want) = order.samples_per_epoch {
        while indices.len() < want && !split.is_empty() {
            indices.extend(order.pass(split, rng));
        }
        indices.truncate(want);
    }
    let mut out = Vec::new();
    for chunk in indices.chunks(batch_size.max(1)) {
        if chunk.len() < 2 {
            continue;
        }
        let captions = chunk
            .iter()
            .map(|&i| {
                let c = &split[i].captions;
                c[rand::Rng::random_range(rng, 0..c.len())].clone()
            })
            .collect();
        let batch_seed = seed ^ (out.len() as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        out.push(BatchPlan { indices: chunk.to_vec(), captions, seed: batch_seed });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::data::image::ImageSource;
    use crate::data::transform::Augment;

    /// A joined batch is the first batch's rows, then the second's: pixels, captions and
    /// indices stay aligned, so row k of the forward is the same example in every tensor.
    #[test]
    fn a_joined_batch_keeps_both_batches_rows_in_order() {
        let batch = |indices: Vec<usize>, fill: u8| Batch {
            captions: indices.iter().map(|i| format!("caption {i}")).collect(),
            pixels: vec![fill; indices.len() * 3 * 2 * 2],
            indices,
            size: 2,
            preprocess: Preprocess::clip(2),
            skipped: Vec::new(),
        };
        let (a, b) = (batch(vec![4, 7], 1), batch(vec![0], 9));
        let j = a.joined(&b);
        assert_eq!((j.len(), j.indices.clone()), (3, vec![4, 7, 0]));
        assert_eq!(j.captions, ["caption 4", "caption 7", "caption 0"]);
        assert_eq!(&j.pixels[..24], &[1u8; 24][..]);
        assert_eq!(&j.pixels[24..], &[9u8; 12][..]);
        let t = j.tensor(&Device::Cpu, candle_core::DType::F32).unwrap();
        assert_eq!(t.dims(), [3, 3, 2, 2]);
    }

    fn noise_png(path: &Path, seed: u32, w: u32, h: u32) {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let v = (x * 31 + y * 17 + seed * 101).wrapping_mul(2_654_435_761) >> 24;
            image::Rgb([v as u8, (v as u8).wrapping_mul(3), 255 - v as u8])
        });
        img.save(path).unwrap();
    }

    fn example(image: ImageSource, id: &str) -> Example {
        Example {
            image,
            captions: vec![format!("caption of {id}"), format!("another of {id}")],
            class: None,
            id: id.into(),
            shard: None,
        }
    }

    fn files(dir: &Path, n: u32) -> Vec<Example> {
        (0..n)
            .map(|i| {
                let p = dir.join(format!("{i}.png"));
                noise_png(&p, i, 20 + i % 7, 16 + i % 5);
                example(ImageSource::File(p), &i.to_string())
            })
            .collect()
    }

    fn augment() -> Transform {
        Transform::Train(Augment {
            crop_scale: (0.5, 1.0),
            crop_ratio: (0.75, 4.0 / 3.0),
            color_jitter: Some([0.4, 0.4, 0.4, 0.1]),
            color_jitter_prob: 0.8,
            grayscale_prob: 0.2,
        })
    }

    fn collect(pipeline: &Pipeline, plans: &[BatchPlan], loader: &Loader) -> Vec<(Vec<usize>, Vec<u8>, Vec<f32>)> {
        let mut out = Vec::new();
        loader
            .stream(pipeline, plans, |b| -> Result<(), LoadError> {
                let normalized = b.normalized();
                out.push((b.indices, b.pixels, normalized));
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn batches_are_the_same_for_any_number_of_workers_and_any_prefetch() {
        let dir = tempfile::tempdir().unwrap();
        let split = files(dir.path(), 23);
        let pre = Preprocess::clip(8);
        let t = augment();
        let pipeline = Pipeline { split: &split, task: "t", transform: &t, preprocess: &pre, on_error: OnError::Fail };
        let plans = plan_epoch(&split, &EpochOrder::default(), 5, &mut StdRng::seed_from_u64(3), 99);
        assert_eq!(plans.len(), 5, "23 examples in batches of 5: four full, one of 3");
        let one = collect(&pipeline, &plans, &Loader::new(1, 1).unwrap());
        let many = collect(&pipeline, &plans, &Loader::new(4, 3).unwrap());
        assert_eq!(one, many);
        // A later epoch's plan (another seed) augments differently.
        let other = plan_epoch(&split, &EpochOrder::default(), 5, &mut StdRng::seed_from_u64(3), 100);
        assert_eq!(other[0].indices, plans[0].indices, "same order generator");
        assert_ne!(collect(&pipeline, &other, &Loader::new(2, 2).unwrap())[0].1, one[0].1);
    }

    #[test]
    fn a_cached_set_gives_exactly_the_batches_of_a_streamed_one() {
        let dir = tempfile::tempdir().unwrap();
        let split = files(dir.path(), 9);
        let pre = Preprocess::clip(8);
        let mut cached = split.clone();
        for e in &mut cached {
            e.image = ImageSource::Prepared(e.image.prepare_for_cache(8).unwrap());
        }
        let eval = Transform::Eval;
        let streamed =
            Pipeline { split: &split, task: "t", transform: &eval, preprocess: &pre, on_error: OnError::Fail };
        let from_cache = Pipeline { split: &cached, ..streamed };
        let plans = in_order(9, 4);
        let loader = Loader::new(2, 2).unwrap();
        assert_eq!(collect(&streamed, &plans, &loader), collect(&from_cache, &plans, &loader));
    }

    #[test]
    fn an_image_damaged_past_its_header_fails_by_name_or_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut split = files(dir.path(), 4);
        // The header (and so the load-time check) survives; the pixel data does not.
        let bad = dir.path().join("1.png");
        let bytes = std::fs::read(&bad).unwrap();
        std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
        crate::data::image::check_file(&bad).unwrap();
        split[1].image = ImageSource::File(bad);
        let pre = Preprocess::clip(8);
        let eval = Transform::Eval;
        let mut pipeline =
            Pipeline { split: &split, task: "digits", transform: &eval, preprocess: &pre, on_error: OnError::Fail };
        let plans = in_order(4, 4);
        let loader = Loader::new(2, 1).unwrap();
        let e = loader.stream(&pipeline, &plans, |_| Ok::<(), LoadError>(())).unwrap_err().to_string();
        assert!(e.contains("task `digits`") && e.contains("1.png") && e.contains("on_error"), "{e}");
        pipeline.on_error = OnError::Skip;
        let mut got = Vec::new();
        loader
            .stream(&pipeline, &plans, |b| -> Result<(), LoadError> {
                got.push((b.indices.clone(), b.skipped.clone(), b.pixels.len()));
                Ok(())
            })
            .unwrap();
        assert_eq!(got[0].0, [0, 2, 3]);
        assert_eq!(got[0].1, ["1"]);
        assert_eq!(got[0].2, 3 * 3 * 64);
    }

    #[test]
    fn a_consumer_that_fails_stops_the_producer_and_nothing_hangs() {
        let img = Arc::new(image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3])));
        let split: Vec<Example> = (0..64).map(|i| example(ImageSource::Memory(img.clone()), &i.to_string())).collect();
        let pre = Preprocess::clip(8);
        let eval = Transform::Eval;
        let pipeline =
            Pipeline { split: &split, task: "t", transform: &eval, preprocess: &pre, on_error: OnError::Fail };
        let plans = in_order(64, 2);
        let mut seen = 0;
        let r = Loader::new(2, 1).unwrap().stream(&pipeline, &plans, |_| {
            seen += 1;
            if seen == 3 {
                Err(LoadError { task: "t".into(), message: "the step failed".into() })
            } else {
                Ok(())
            }
        });
        assert_eq!(r.unwrap_err().message, "the step failed");
        assert_eq!(seen, 3);
    }

    #[test]
    fn a_panicking_decoder_becomes_an_error_that_names_the_image() {
        let split = vec![example(ImageSource::Memory(Arc::new(image::RgbImage::new(0, 0))), "empty-image")];
        let pre = Preprocess::clip(8);
        // A zero-sized image makes the resize divide by zero: a panic inside a worker.
        let eval = Transform::Eval;
        let pipeline =
            Pipeline { split: &split, task: "t", transform: &eval, preprocess: &pre, on_error: OnError::Skip };
        let e = Loader::new(2, 1).unwrap().stream(&pipeline, &in_order(1, 1), |_| Ok::<(), LoadError>(()));
        // Skipped like any other image that cannot be prepared, and named.
        assert!(e.is_ok());
        let batch = pipeline.prepare(&in_order(1, 1)[0]).unwrap();
        assert_eq!(batch.skipped, ["empty-image"]);
        let failing = Pipeline { on_error: OnError::Fail, ..pipeline };
        let e = failing.prepare(&in_order(1, 1)[0]).unwrap_err().to_string();
        assert!(e.contains("empty-image") && e.contains("panicked"), "{e}");
    }

    fn sharded(shards: &[usize]) -> Vec<Example> {
        let img = Arc::new(image::RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3])));
        let mut out = Vec::new();
        for (s, &n) in shards.iter().enumerate() {
            for k in 0..n {
                let mut e = example(ImageSource::Memory(img.clone()), &format!("{s}/{k}"));
                e.shard = Some(s as u32);
                out.push(e);
            }
        }
        out
    }

    fn flat(plans: &[BatchPlan]) -> Vec<usize> {
        plans.iter().flat_map(|p| p.indices.clone()).collect()
    }

    #[test]
    fn the_default_order_is_the_uniform_shuffle_runs_have_always_used() {
        use rand::seq::SliceRandom;
        let split = sharded(&[9, 8]);
        let plans = plan_epoch(&split, &EpochOrder::default(), 4, &mut StdRng::seed_from_u64(7), 1);
        let mut rng = StdRng::seed_from_u64(7);
        let mut want: Vec<usize> = (0..17).collect();
        want.shuffle(&mut rng);
        assert_eq!(flat(&plans), want[..16], "the last batch of one is dropped");
        let first_caption = rand::Rng::random_range(&mut rng, 0..2);
        assert_eq!(plans[0].captions[0], split[want[0]].captions[first_caption]);
    }

    #[test]
    fn a_shuffle_buffer_reads_shards_in_turn_and_still_visits_each_example_once() {
        let split = sharded(&[6, 5, 7, 4]);
        let order = |buffer| EpochOrder { shuffle_buffer: Some(buffer), samples_per_epoch: None };
        let plans = plan_epoch(&split, &order(1), 2, &mut StdRng::seed_from_u64(3), 0);
        let seen = flat(&plans);
        assert_eq!(seen.len(), 22);
        // A buffer of one is no mixing: each shard's examples come together, in file order.
        let shard_of = |i: usize| split[i].shard.unwrap();
        let runs = seen.windows(2).filter(|w| shard_of(w[0]) != shard_of(w[1])).count();
        assert_eq!(runs, 3, "four shards, read one after another: {seen:?}");
        assert!(seen.windows(2).all(|w| shard_of(w[0]) != shard_of(w[1]) || w[1] == w[0] + 1));
        assert_ne!(seen[..6], [0, 1, 2, 3, 4, 5], "the shards' order is shuffled (for this seed)");
        // A larger buffer mixes across shards; every example still comes once per epoch.
        let mixed = flat(&plan_epoch(&split, &order(8), 2, &mut StdRng::seed_from_u64(3), 0));
        let mut sorted = mixed.clone();
        sorted.sort();
        assert_eq!(sorted, (0..22).collect::<Vec<_>>());
        assert!(mixed.windows(2).filter(|w| shard_of(w[0]) != shard_of(w[1])).count() > 3);
        let again = flat(&plan_epoch(&split, &order(8), 2, &mut StdRng::seed_from_u64(3), 0));
        assert_eq!(mixed, again, "the order depends on the seed only");
    }

    #[test]
    fn samples_per_epoch_cuts_or_extends_the_epoch_with_fresh_passes() {
        let split = sharded(&[5]);
        let order = |n| EpochOrder { shuffle_buffer: None, samples_per_epoch: Some(n) };
        let short = flat(&plan_epoch(&split, &order(3), 2, &mut StdRng::seed_from_u64(1), 0));
        assert_eq!(short.len(), 2, "3 samples at batch 2: one batch, the single rest dropped");
        let long = flat(&plan_epoch(&split, &order(12), 4, &mut StdRng::seed_from_u64(1), 0));
        assert_eq!(long.len(), 12);
        let mut first = long[..5].to_vec();
        first.sort();
        assert_eq!(first, [0, 1, 2, 3, 4], "each pass is a whole permutation");
        assert_eq!(order(12).epoch_len(5), 12);
    }

    #[test]
    fn a_corrupt_image_in_a_shard_fails_by_shard_and_key_or_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut good = Vec::new();
        image::RgbImage::from_pixel(9, 9, image::Rgb([5, 6, 7]))
            .write_to(&mut std::io::Cursor::new(&mut good), image::ImageFormat::Png)
            .unwrap();
        let bad = good[..good.len() / 2].to_vec();
        let shard = dir.path().join("s.tar");
        crate::data::webdataset::tests::tar_of(
            &shard,
            &[("a.png", good), ("a.txt", b"x".to_vec()), ("b.png", bad), ("b.txt", b"y".to_vec())],
        );
        let records = crate::data::webdataset::read_shard(&shard, None).unwrap();
        let split: Vec<Example> = records
            .iter()
            .map(|r| {
                let m = r.member.clone().unwrap();
                crate::data::webdataset::check_member(&m).unwrap();
                let mut e = example(ImageSource::Shard(m), &r.image.display().to_string());
                e.shard = Some(0);
                e
            })
            .collect();
        let pre = Preprocess::clip(8);
        let eval = Transform::Eval;
        let mut pipeline =
            Pipeline { split: &split, task: "wds", transform: &eval, preprocess: &pre, on_error: OnError::Fail };
        let e = pipeline.prepare(&in_order(2, 2)[0]).unwrap_err().to_string();
        assert!(e.contains("task `wds`") && e.contains("s.tar:b.png") && e.contains("on_error"), "{e}");
        pipeline.on_error = OnError::Skip;
        let batch = pipeline.prepare(&in_order(2, 2)[0]).unwrap();
        assert_eq!((batch.indices.clone(), batch.skipped.len()), (vec![0], 1));
        assert!(batch.skipped[0].ends_with("s.tar:b.png"));
    }

    #[test]
    fn normalisation_is_bit_for_bit_the_float_pipeline_it_replaces() {
        let pre = Preprocess::clip(2);
        let bytes: Vec<u8> = (0..12).map(|i| (i * 21) as u8).collect();
        let floats: Vec<f32> = bytes.iter().map(|&b| b as f32 / 255.0).collect();
        let want = pre.normalize(&floats);
        assert_eq!(
            normalize(&bytes, &pre).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}
