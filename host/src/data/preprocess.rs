//! CLIP image preprocessing, as torchvision/open_clip do it: the model's input size and
//! normalisation, and the evaluation transform (`transform::resize_center_crop`) applied to
//! a file or decoded pixels, scaled to [0, 1] and normalised with CLIP's mean and std. Grey,
//! grey+alpha and RGBA images are converted to RGB (alpha dropped, as PIL's `convert("RGB")`).

use std::path::Path;

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
        Ok(self.apply(&super::image::decode_file(path)?))
    }

    /// Preprocess decoded RGB pixels -> normalised CHW values.
    pub fn apply(&self, rgb: &image::RgbImage) -> Vec<f32> {
        self.normalize(&self.resize_crop(rgb))
    }

    /// Resize the shorter side, centre-crop -> CHW values in [0, 1].
    pub fn resize_crop(&self, rgb: &image::RgbImage) -> Vec<f32> {
        let img = super::transform::resize_center_crop(rgb, self.size);
        super::transform::chw(&img).into_iter().map(|v| v as f32 / 255.0).collect()
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
