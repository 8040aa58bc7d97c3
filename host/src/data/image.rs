//! Where an example's image comes from, and turning it into model input. An example keeps
//! its encoded source (a file, or a member of a WebDataset shard) or, for generated and cached data, its pixels as bytes; it is
//! decoded when a batch needs it, so a dataset costs memory for its manifest, not its images.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;
use rand::rngs::StdRng;

use super::preprocess::ImageError;
use super::transform::{chw, resize_center_crop, Transform};

/// An example's image.
#[derive(Clone, Debug)]
pub enum ImageSource {
    /// An encoded image file (PNG, JPEG, WebP, ...), decoded when needed.
    File(PathBuf),
    /// Decoded pixels held in memory (generated data), transformed when needed.
    Memory(Arc<RgbImage>),
    /// An image inside a WebDataset shard, read (one seek, one read) and decoded when needed.
    Shard(super::webdataset::ShardMember),
    /// The evaluation transform's output, CHW bytes at the model's size: the in-memory
    /// cache of a small set (4 bytes per pixel fewer than f32 would take).
    Prepared(Arc<[u8]>),
}

impl ImageSource {
    /// The decoded image (not for `Prepared`, which is already model input).
    fn decode(&self) -> Result<std::borrow::Cow<'_, RgbImage>, ImageError> {
        match self {
            ImageSource::File(path) => decode_file(path).map(std::borrow::Cow::Owned),
            ImageSource::Shard(m) => decode_bytes(&m.read()?, &m.label()).map(std::borrow::Cow::Owned),
            ImageSource::Memory(img) => Ok(std::borrow::Cow::Borrowed(img)),
            ImageSource::Prepared(_) => unreachable!("a prepared image is not decoded again"),
        }
    }

    /// Model input: CHW bytes at `size` x `size` after `transform`. A prepared image is the
    /// evaluation transform's output; under a training transform it is augmented as it is.
    pub fn prepare(&self, transform: &Transform, size: usize, rng: &mut StdRng) -> Result<Vec<u8>, ImageError> {
        match self {
            ImageSource::Prepared(chw) if transform.is_deterministic() => Ok(chw.to_vec()),
            ImageSource::Prepared(chw) => Ok(transform.apply(&from_chw(chw, size), size, rng)),
            source => Ok(transform.apply(&*source.decode()?, size, rng)),
        }
    }

    /// The evaluation transform's output, for the cache.
    pub fn prepare_for_cache(&self, size: usize) -> Result<Arc<[u8]>, ImageError> {
        match self {
            ImageSource::Prepared(chw) => Ok(chw.clone()),
            source => Ok(chw(&resize_center_crop(&*source.decode()?, size)).into()),
        }
    }

    /// Bytes this source holds in memory.
    pub fn resident_bytes(&self) -> usize {
        match self {
            ImageSource::File(p) => p.as_os_str().len(),
            ImageSource::Shard(m) => m.name.len() + std::mem::size_of::<super::webdataset::ShardMember>(),
            ImageSource::Memory(img) => img.as_raw().len(),
            ImageSource::Prepared(chw) => chw.len(),
        }
    }
}

/// Read and decode an image file to RGB (grey and alpha converted as PIL's `convert("RGB")`).
pub fn decode_file(path: &Path) -> Result<RgbImage, ImageError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| ImageError::Read { path: p.clone(), reason: e.to_string() })?;
    decode_bytes(&bytes, &p)
}

/// Decode an encoded image held in memory to RGB; `name` names it in errors.
pub fn decode_bytes(bytes: &[u8], name: &str) -> Result<RgbImage, ImageError> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| ImageError::Decode { path: name.to_string(), reason: e.to_string() })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(ImageError::Empty { path: name.to_string(), width: img.width(), height: img.height() });
    }
    Ok(img.to_rgb8())
}

/// Check that a file is an image with pixels by reading its header only (what loading a
/// large set can afford); a file damaged past its header fails when a batch decodes it.
pub fn check_file(path: &Path) -> Result<(), ImageError> {
    let p = path.display().to_string();
    let reader =
        image::ImageReader::open(path).map_err(|e| ImageError::Read { path: p.clone(), reason: e.to_string() })?;
    let reader =
        reader.with_guessed_format().map_err(|e| ImageError::Read { path: p.clone(), reason: e.to_string() })?;
    let (width, height) =
        reader.into_dimensions().map_err(|e| ImageError::Decode { path: p.clone(), reason: e.to_string() })?;
    if width == 0 || height == 0 {
        return Err(ImageError::Empty { path: p, width, height });
    }
    Ok(())
}

/// CHW bytes -> an RGB image.
fn from_chw(chw: &[u8], size: usize) -> RgbImage {
    let plane = size * size;
    RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let i = y as usize * size + x as usize;
        image::Rgb([chw[i], chw[plane + i], chw[2 * plane + i]])
    })
}
