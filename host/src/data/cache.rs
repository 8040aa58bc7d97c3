//! The in-memory image cache: small sets are decoded once, at the model's size, into bytes
//! (a quarter of what f32 pixels take). Only images whose transform is deterministic are
//! cached, the evaluation splits and, when training has no augmentation, the training
//! splits, so a cached set gives exactly the batches a streamed one gives.

use rayon::prelude::*;

use super::image::ImageSource;
use super::source::DataError;
use super::{CacheMode, Example, OnError, TaskData};

/// What to cache.
pub struct CachePolicy {
    pub mode: CacheMode,
    /// Bytes all cached sets may take together (`auto`).
    pub budget_bytes: u64,
    /// The model's input size.
    pub size: usize,
}

/// Which splits of a set are read through the evaluation transform, and so cacheable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Splits {
    Test,
    Train,
    Both,
}

/// Cache the splits of `sets` that the policy allows, in order, while they fit. Returns the
/// bytes cached. An image that cannot be decoded follows its set's `on_error`.
pub fn fill(sets: &mut [(&mut TaskData, Splits)], policy: &CachePolicy) -> Result<u64, DataError> {
    if policy.mode == CacheMode::Off {
        return Ok(0);
    }
    let per_image = 3 * (policy.size * policy.size) as u64;
    let mut used = 0u64;
    for (set, splits) in sets.iter_mut() {
        let set: &mut TaskData = set;
        for train in [false, true] {
            let wanted = match splits {
                Splits::Test => !train,
                Splits::Train => train,
                Splits::Both => true,
            };
            if !wanted {
                continue;
            }
            let split = if train { &set.train } else { &set.test };
            let files = split.iter().filter(|e| matches!(e.image, ImageSource::File(_))).count() as u64;
            let bytes = files * per_image;
            if files == 0 || (policy.mode == CacheMode::Auto && used + bytes > policy.budget_bytes) {
                continue;
            }
            let split = if train { &mut set.train } else { &mut set.test };
            let skipped = cache_split(split, &set.name, set.on_error, policy.size)?;
            used += bytes;
            tracing::info!(set = %set.name, split = if train { "train" } else { "test" }, mb = bytes >> 20, "cached");
            set.skipped.extend(skipped);
        }
    }
    Ok(used)
}

/// Decode a split's image files in parallel into prepared bytes; returns the images skipped.
fn cache_split(split: &mut Vec<Example>, task: &str, on_error: OnError, size: usize) -> Result<Vec<String>, DataError> {
    let prepared: Vec<_> = split.par_iter().map(|e| e.image.prepare_for_cache(size)).collect();
    let mut kept = Vec::with_capacity(split.len());
    let mut skipped = Vec::new();
    for (mut ex, px) in std::mem::take(split).into_iter().zip(prepared) {
        match px {
            Ok(px) => {
                ex.image = ImageSource::Prepared(px);
                kept.push(ex);
            }
            Err(e) if on_error == OnError::Skip => {
                tracing::warn!(task, "skipping: {e}");
                skipped.push(ex.id);
            }
            Err(e) => {
                return Err(DataError::Image {
                    task: task.to_string(),
                    cause: e,
                    hint: "; fix or remove the file, or set `on_error = \"skip\"` on the task to count and skip it",
                })
            }
        }
    }
    *split = kept;
    Ok(skipped)
}
