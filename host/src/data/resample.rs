//! Bicubic resizing as Pillow computes it (`Image.resize(size, BICUBIC)`, what torchvision's
//! `Resize` and `RandomResizedCrop` run on PIL images, so open_clip's pipelines): separable,
//! antialiased when shrinking (the filter widens with the scale), weights normalised per
//! output pixel and applied in 22-bit fixed point, a horizontal pass then a vertical one.
//! Bit for bit Pillow's output (tests/fixtures/resample/), and several times faster than
//! the image crate's float resampler.

use image::RgbImage;

/// Pillow's fixed-point precision for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The bicubic kernel with a = -0.5, support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output position, the first input index and the fixed-point weights of the
/// inputs from there.
struct Coefficients {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for `input` -> `output` samples.
fn coefficients(input: usize, output: usize) -> Coefficients {
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let ss = 1.0 / filter_scale;
    let mut first = Vec::with_capacity(output);
    let mut weights = Vec::with_capacity(output);
    for xx in 0..output {
        let center = (xx as f64 + 0.5) * scale;
        let lo = ((center - support + 0.5) as isize).max(0) as usize;
        let hi = ((center + support + 0.5) as isize).min(input as isize) as usize;
        let raw: Vec<f64> = (lo..hi).map(|x| bicubic((x as f64 - center + 0.5) * ss)).collect();
        let total: f64 = raw.iter().sum();
        let one = (1u32 << PRECISION_BITS) as f64;
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                if w < 0.0 {
                    (-0.5 + w * one) as i32
                } else {
                    (0.5 + w * one) as i32
                }
            })
            .collect();
        first.push(lo);
        weights.push(fixed);
    }
    Coefficients { first, weights }
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The pass along x: `height` rows of `width` RGB pixels become rows of `c.first.len()`.
fn horizontal(src: &[u8], width: usize, height: usize, c: &Coefficients) -> Vec<u8> {
    let out_w = c.first.len();
    let mut out = vec![0u8; out_w * height * 3];
    for y in 0..height {
        let row = &src[y * width * 3..(y + 1) * width * 3];
        let dst = &mut out[y * out_w * 3..(y + 1) * out_w * 3];
        for (xx, (first, w)) in c.first.iter().zip(&c.weights).enumerate() {
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (k, &wk) in w.iter().enumerate() {
                let p = &row[(first + k) * 3..(first + k) * 3 + 3];
                for ch in 0..3 {
                    acc[ch] += p[ch] as i64 * wk as i64;
                }
            }
            for ch in 0..3 {
                dst[xx * 3 + ch] = clip8(acc[ch]);
            }
        }
    }
    out
}

/// The pass along y: rows of `width` RGB pixels become `c.first.len()` rows.
fn vertical(src: &[u8], width: usize, c: &Coefficients) -> Vec<u8> {
    let out_h = c.first.len();
    let stride = width * 3;
    let mut out = vec![0u8; stride * out_h];
    let mut acc = vec![0i64; stride];
    for (yy, (first, w)) in c.first.iter().zip(&c.weights).enumerate() {
        acc.fill(1i64 << (PRECISION_BITS - 1));
        for (k, &wk) in w.iter().enumerate() {
            let row = &src[(first + k) * stride..(first + k + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i64 * wk as i64;
            }
        }
        for (d, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    out
}

/// `img` resized to `width` x `height` with Pillow's bicubic filter.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (width as usize, height as usize);
    if (w, h) == (ow, oh) {
        return img.clone();
    }
    let mut pixels = img.as_raw().clone();
    let mut cur_w = w;
    if ow != w {
        pixels = horizontal(&pixels, w, h, &coefficients(w, ow));
        cur_w = ow;
    }
    if oh != h {
        pixels = vertical(&pixels, cur_w, &coefficients(h, oh));
    }
    RgbImage::from_raw(width, height, pixels).expect("the passes produce width x height x 3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resizing_matches_pillow_byte_for_byte() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/resample/resample.json");
        let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let bytes = |v: &serde_json::Value| -> Vec<u8> {
            v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u8).collect()
        };
        let dim = |v: &serde_json::Value| v.as_u64().unwrap() as u32;
        let src = RgbImage::from_raw(dim(&fx["width"]), dim(&fx["height"]), bytes(&fx["pixels"])).unwrap();
        for case in fx["resized"].as_array().unwrap() {
            let (w, h) = (dim(&case["width"]), dim(&case["height"]));
            let got = resize_bicubic(&src, w, h);
            let want = bytes(&case["pixels"]);
            let off = got.as_raw().iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(off, 0, "{w}x{h}: {off} of {} bytes differ from Pillow", want.len());
        }
        let crop = super::super::transform::resize_center_crop(&src, 16);
        assert_eq!(crop.as_raw(), &bytes(&fx["resize_center_crop_16"]), "torchvision's Resize + CenterCrop");
    }
}
