//! Image transforms, as open_clip builds them with torchvision on PIL images (bicubic
//! resizing as Pillow computes it, `resample.rs`): evaluation resizes the shorter side and
//! centre-crops; training takes a `RandomResizedCrop` (area scale (0.9, 1.0) and
//! aspect ratio (3/4, 4/3) by default), then optionally colour jitter and grayscale. Every
//! transform maps an RGB image to CHW `u8` at the model's size; randomness comes from the
//! generator the caller passes, so the pipeline decides what each image sees.

use super::resample::resize_bicubic;
use image::RgbImage;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// The training augmentation (`[data]` keys of the same names).
#[derive(Clone, Debug, PartialEq)]
pub struct Augment {
    /// `RandomResizedCrop`'s range of the crop's area, as a fraction of the image's.
    pub crop_scale: (f64, f64),
    /// Its range of aspect ratios (width / height), sampled log-uniformly.
    pub crop_ratio: (f64, f64),
    /// Colour jitter (brightness, contrast, saturation, hue), applied with `jitter_prob`.
    pub color_jitter: Option<[f64; 4]>,
    pub color_jitter_prob: f64,
    /// Grayscale with this probability (three equal channels).
    pub grayscale_prob: f64,
}

/// What is done to an image before it is normalised.
#[derive(Clone, Debug, PartialEq)]
pub enum Transform {
    /// Resize the shorter side to the size, centre-crop a square (deterministic).
    Eval,
    /// `RandomResizedCrop` and the rest of `Augment`.
    Train(Augment),
}

impl Transform {
    /// Whether the output depends on nothing but the image: such an output can be cached.
    pub fn is_deterministic(&self) -> bool {
        matches!(self, Transform::Eval)
    }

    /// `img` -> CHW bytes at `size` x `size`.
    pub fn apply(&self, img: &RgbImage, size: usize, rng: &mut StdRng) -> Vec<u8> {
        match self {
            Transform::Eval => chw(&resize_center_crop(img, size)),
            Transform::Train(a) => {
                let mut out = random_resized_crop(img, size, a.crop_scale, a.crop_ratio, rng);
                if let Some(j) = a.color_jitter {
                    if rng.random::<f64>() < a.color_jitter_prob {
                        color_jitter(&mut out, j, rng);
                    }
                }
                if a.grayscale_prob > 0.0 && rng.random::<f64>() < a.grayscale_prob {
                    grayscale(&mut out);
                }
                chw(&out)
            }
        }
    }
}

/// torchvision's `Resize(size)` (shorter side, the longer one truncated) with bicubic
/// filtering, antialiased when shrinking, then `CenterCrop(size)` with its offsets rounded
/// as Python rounds (halves to even).
pub fn resize_center_crop(img: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == size && h == size {
        return img.clone();
    }
    let s = size;
    let (nw, nh) = if w <= h { (s, (s * h / w).max(s)) } else { ((s * w / h).max(s), s) };
    let resized = resize_bicubic(img, nw as u32, nh as u32);
    // torchvision rounds the offsets with Python's round(): halves to even.
    let top = ((nh - s) as f64 / 2.0).round_ties_even() as u32;
    let left = ((nw - s) as f64 / 2.0).round_ties_even() as u32;
    image::imageops::crop_imm(&resized, left, top, s as u32, s as u32).to_image()
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at a crop of random area and
/// aspect ratio that fits, else the whole image clamped to the ratio range, centred. The
/// crop is resized to `size` x `size` (bicubic).
pub fn random_resized_crop(
    img: &RgbImage,
    size: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut StdRng,
) -> RgbImage {
    let (left, top, cw, ch) = crop_box(img.width(), img.height(), scale, ratio, rng);
    let region = image::imageops::crop_imm(img, left, top, cw.max(1), ch.max(1)).to_image();
    if region.width() as usize == size && region.height() as usize == size {
        return region;
    }
    resize_bicubic(&region, size as u32, size as u32)
}

/// The (left, top, width, height) of a random resized crop of a `w` x `h` image.
fn crop_box(w: u32, h: u32, scale: (f64, f64), ratio: (f64, f64), rng: &mut StdRng) -> (u32, u32, u32, u32) {
    let (w, h) = (w as f64, h as f64);
    let area = w * h;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(log_lo..=log_hi).exp();
        let cw = (target * aspect).sqrt().round();
        let ch = (target / aspect).sqrt().round();
        if cw > 0.0 && cw <= w && ch > 0.0 && ch <= h {
            let top = rng.random_range(0..=(h - ch) as u32);
            let left = rng.random_range(0..=(w - cw) as u32);
            return (left, top, cw as u32, ch as u32);
        }
    }
    let in_ratio = w / h;
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, (w / ratio.0).round())
    } else if in_ratio > ratio.1 {
        ((h * ratio.1).round(), h)
    } else {
        (w, h)
    };
    (((w - cw) / 2.0) as u32, ((h - ch) / 2.0) as u32, cw as u32, ch as u32)
}

/// ITU-R 601-2 luma, as PIL's `convert("L")` and torchvision's grayscale weigh the channels.
fn luma(p: [f32; 3]) -> f32 {
    0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]
}

/// torchvision's `ColorJitter`: brightness, contrast and saturation factors drawn from
/// [max(0, 1 - x), 1 + x], a hue shift from [-h, h], applied in a random order.
fn color_jitter(img: &mut RgbImage, [brightness, contrast, saturation, hue]: [f64; 4], rng: &mut StdRng) {
    let factor = |x: f64, rng: &mut StdRng| if x > 0.0 { rng.random_range((1.0 - x).max(0.0)..=1.0 + x) } else { 1.0 };
    let mut order = [0usize, 1, 2, 3];
    order.shuffle(rng);
    let mut px: Vec<[f32; 3]> =
        img.pixels().map(|p| [p[0] as f32 / 255.0, p[1] as f32 / 255.0, p[2] as f32 / 255.0]).collect();
    let blend = |a: f32, b: f32, f: f32| (f * a + (1.0 - f) * b).clamp(0.0, 1.0);
    for op in order {
        match op {
            0 => {
                let f = factor(brightness, rng) as f32;
                px.iter_mut().flatten().for_each(|v| *v = (*v * f).clamp(0.0, 1.0));
            }
            1 => {
                let f = factor(contrast, rng) as f32;
                let mean = px.iter().map(|&p| luma(p)).sum::<f32>() / px.len().max(1) as f32;
                px.iter_mut().flatten().for_each(|v| *v = blend(*v, mean, f));
            }
            2 => {
                let f = factor(saturation, rng) as f32;
                for p in &mut px {
                    let g = luma(*p);
                    p.iter_mut().for_each(|v| *v = blend(*v, g, f));
                }
            }
            _ => {
                if hue > 0.0 {
                    let shift = rng.random_range(-hue..=hue) as f32;
                    px.iter_mut().for_each(|p| *p = shift_hue(*p, shift));
                }
            }
        }
    }
    for (dst, p) in img.pixels_mut().zip(px) {
        *dst = image::Rgb(p.map(|v| (v * 255.0).round() as u8));
    }
}

/// Rotate the hue of an RGB colour by `shift` turns (through HSV).
fn shift_hue([r, g, b]: [f32; 3], shift: f32) -> [f32; 3] {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let delta = max - min;
    if delta <= 0.0 {
        return [r, g, b];
    }
    let h = if max == r {
        ((g - b) / delta).rem_euclid(6.0)
    } else if max == g {
        (b - r) / delta + 2.0
    } else {
        (r - g) / delta + 4.0
    } / 6.0;
    let h = (h + shift).rem_euclid(1.0) * 6.0;
    let (s, v) = (delta / max, max);
    let i = h.floor();
    let f = h - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match i as u32 % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

fn grayscale(img: &mut RgbImage) {
    for p in img.pixels_mut() {
        let l = (luma([p[0] as f32, p[1] as f32, p[2] as f32])).round().clamp(0.0, 255.0) as u8;
        *p = image::Rgb([l, l, l]);
    }
}

/// HWC -> CHW.
pub fn chw(img: &RgbImage) -> Vec<u8> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0u8; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = p[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128]))
    }

    #[test]
    fn evaluation_resizes_the_shorter_side_and_crops_the_centre() {
        // torchvision's Resize(8) + CenterCrop(8) of a 16 x 12 image: 10 x 8, offsets (1, 0).
        let img = RgbImage::from_fn(16, 12, |x, _| image::Rgb([if x < 8 { 0 } else { 255 }, 0, 0]));
        let out = Transform::Eval.apply(&img, 8, &mut StdRng::seed_from_u64(0));
        assert_eq!(out.len(), 3 * 64);
        // Left half dark, right half bright, the boundary in the middle of the crop.
        let row: Vec<u8> = out[..8].to_vec();
        assert!(row[..3].iter().all(|&v| v < 40) && row[5..].iter().all(|&v| v > 215), "{row:?}");
        // A square image at the model's size passes through untouched.
        let square = gradient(8, 8);
        assert_eq!(resize_center_crop(&square, 8), square);
    }

    #[test]
    fn random_resized_crops_stay_in_range_and_follow_the_generator() {
        let img = gradient(64, 48);
        let aug = Augment {
            crop_scale: (0.9, 1.0),
            crop_ratio: (0.75, 4.0 / 3.0),
            color_jitter: None,
            color_jitter_prob: 0.0,
            grayscale_prob: 0.0,
        };
        let t = Transform::Train(aug.clone());
        let a = t.apply(&img, 16, &mut StdRng::seed_from_u64(7));
        assert_eq!(a.len(), 3 * 16 * 16);
        assert_eq!(a, t.apply(&img, 16, &mut StdRng::seed_from_u64(7)), "same generator, same crop");
        let differs = (0..20).any(|s| t.apply(&img, 16, &mut StdRng::seed_from_u64(s)) != a);
        assert!(differs, "crops vary with the generator");
        // Every crop lies in the image, covers 90-100% of its area (up to rounding) and keeps
        // its aspect ratio in range.
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..200 {
            let (l, t, w, h) = crop_box(64, 48, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert!(l + w <= 64 && t + h <= 48, "({l}, {t}, {w}, {h})");
            let area = (w * h) as f64 / (64.0 * 48.0);
            assert!((0.88..=1.0).contains(&area), "area {area}");
            let r = w as f64 / h as f64;
            assert!((0.73..=1.36).contains(&r), "ratio {r}");
        }
        // An aspect range the image cannot satisfy falls back to a centred, clamped crop.
        let narrow = Augment { crop_scale: (1.0, 1.0), crop_ratio: (3.0, 3.0), ..aug };
        let c = crop_box(64, 48, narrow.crop_scale, narrow.crop_ratio, &mut StdRng::seed_from_u64(1));
        assert_eq!(c, (0, 13, 64, 21), "the whole width, centred, at the closest ratio");
        let c = random_resized_crop(&img, 16, narrow.crop_scale, narrow.crop_ratio, &mut StdRng::seed_from_u64(1));
        assert_eq!((c.width(), c.height()), (16, 16));
    }

    #[test]
    fn jitter_and_grayscale_change_colours_only_as_asked() {
        let img = gradient(16, 16);
        let gray = Transform::Train(Augment {
            crop_scale: (1.0, 1.0),
            crop_ratio: (1.0, 1.0),
            color_jitter: None,
            color_jitter_prob: 0.0,
            grayscale_prob: 1.0,
        });
        let out = gray.apply(&img, 16, &mut StdRng::seed_from_u64(0));
        assert_eq!(out[..256], out[256..512], "grayscale: equal channels");
        assert_eq!(out[..256], out[512..]);
        let jitter = Transform::Train(Augment {
            crop_scale: (1.0, 1.0),
            crop_ratio: (1.0, 1.0),
            color_jitter: Some([0.4, 0.4, 0.4, 0.1]),
            color_jitter_prob: 1.0,
            grayscale_prob: 0.0,
        });
        let plain = Transform::Eval.apply(&img, 16, &mut StdRng::seed_from_u64(0));
        assert_ne!(jitter.apply(&img, 16, &mut StdRng::seed_from_u64(3)), plain);
        // A hue rotation by a whole turn is the identity; by half a turn, complementary.
        assert_eq!(shift_hue([0.2, 0.4, 0.8], 1.0).map(|v| (v * 1e4).round()), [2000.0, 4000.0, 8000.0]);
        let c = shift_hue([1.0, 0.0, 0.0], 0.5);
        assert!((c[0]).abs() < 1e-6 && (c[1] - 1.0).abs() < 1e-6 && (c[2] - 1.0).abs() < 1e-6, "{c:?}");
    }
}
