//! CLIP image preprocessing, as torchvision/open_clip do it: resize the shorter side to the
//! model's size with bicubic interpolation (antialiased when shrinking, as PIL), centre-crop a
//! square, scale to [0, 1], normalise with CLIP's mean and std. Grey, grey+alpha and RGBA
//! images are converted to RGB (alpha dropped, as PIL's `convert("RGB")`).

use std::path::Path;

use image::imageops::FilterType;

/// How images are turned into model input.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    pub size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// An image that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("cannot decode image {path}: {reason}")]
    Decode { path: String, reason: String },
    #[error("image {path} is empty ({width}x{height})")]
    Empty { path: String, width: u32, height: u32 },
}

impl Preprocess {
    /// CLIP's constants at `size` pixels.
    pub fn clip(size: usize) -> Self {
        Preprocess { size, mean: super::CLIP_MEAN, std: super::CLIP_STD }
    }

    /// Normalise CHW values in [0, 1].
    pub fn normalize(&self, chw: &[f32]) -> Vec<f32> {
        let plane = self.size * self.size;
        chw.iter().enumerate().map(|(i, &v)| (v - self.mean[i / plane]) / self.std[i / plane]).collect()
    }

    /// Decode and preprocess an image file -> normalised CHW values.
    pub fn load(&self, path: &Path) -> Result<Vec<f32>, ImageError> {
        Ok(self.normalize(&self.load_pixels(path)?))
    }

    /// Decode, resize and crop an image file -> CHW values in [0, 1] (not yet normalised).
    pub fn load_pixels(&self, path: &Path) -> Result<Vec<f32>, ImageError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ImageError::Read { path: p.clone(), reason: e.to_string() })?;
        let img = image::load_from_memory(&bytes)
            .map_err(|e| ImageError::Decode { path: p.clone(), reason: e.to_string() })?;
        if img.width() == 0 || img.height() == 0 {
            return Err(ImageError::Empty { path: p, width: img.width(), height: img.height() });
        }
        Ok(self.resize_crop(&img.to_rgb8()))
    }

    /// Preprocess decoded RGB pixels -> normalised CHW values.
    pub fn apply(&self, rgb: &image::RgbImage) -> Vec<f32> {
        self.normalize(&self.resize_crop(rgb))
    }

    /// Resize the shorter side, centre-crop -> CHW values in [0, 1].
    pub fn resize_crop(&self, rgb: &image::RgbImage) -> Vec<f32> {
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let s = self.size;
        // torchvision Resize(size): the shorter side becomes `size`, the longer one is truncated.
        let (nw, nh) = if w <= h { (s, (s * h / w).max(s)) } else { ((s * w / h).max(s), s) };
        let resized = image::imageops::resize(rgb, nw as u32, nh as u32, FilterType::CatmullRom);
        // torchvision CenterCrop rounds the offsets.
        let top = ((nh - s) as f64 / 2.0).round() as usize;
        let left = ((nw - s) as f64 / 2.0).round() as usize;
        let mut out = vec![0f32; 3 * s * s];
        for y in 0..s {
            for x in 0..s {
                let px = resized.get_pixel((left + x) as u32, (top + y) as u32);
                for c in 0..3 {
                    out[c * s * s + y * s + x] = px[c] as f32 / 255.0;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_and_rgba_become_rgb() {
        let grey = image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(10, 20, image::Luma([128])));
        let rgba =
            image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(20, 10, image::Rgba([128, 128, 128, 7])));
        let p = Preprocess::clip(8);
        let a = p.apply(&grey.to_rgb8());
        let b = p.apply(&rgba.to_rgb8());
        assert_eq!(a.len(), 3 * 64);
        assert_eq!(a, b);
        assert!((a[0] - (128.0 / 255.0 - super::super::CLIP_MEAN[0]) / super::super::CLIP_STD[0]).abs() < 1e-6);
    }

    #[test]
    fn undecodable_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("broken.png");
        std::fs::write(&f, b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let e = Preprocess::clip(8).load(&f).unwrap_err().to_string();
        assert!(e.contains("cannot decode image") && e.contains("broken.png"), "{e}");
    }
}
