//! Image-text data: examples, splits and batching into tensors.

pub mod preprocess;
pub mod shapes;

use candle_core::{Device, Tensor};

/// CLIP's normalisation constants.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_55, 0.261_302_6, 0.275_777_1];

/// One image with its captions. Pixels are CHW in [0, 1].
#[derive(Clone, Debug)]
pub struct Example {
    pub pixels: Vec<f32>,
    pub captions: Vec<String>,
}

/// A task's data: a training split and a test split.
#[derive(Clone, Debug)]
pub struct TaskData {
    pub name: String,
    pub image_size: usize,
    pub train: Vec<Example>,
    pub test: Vec<Example>,
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
