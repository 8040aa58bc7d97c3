//! `recall data prepare ... --to-webdataset`: any source's examples written as WebDataset
//! shards that `source = "webdataset"` (and open_clip) read back.
//!
//! Each sample is `KEY.EXT` (the image's bytes as they are; formats WebDataset does not name
//! are re-encoded as PNG) and `KEY.json` (`captions`, `class`, `split`, and `id`, where the
//! image came from). Data whose every example has a split is written as `train/` and `test/`
//! shards; otherwise the shards are flat and each sample's `.json` carries its split, if any.
//! The output appears whole or not at all: it is written beside its final name and renamed.

use std::path::{Path, PathBuf};

use super::source::{self, DataError, Record, Split};
use super::webdataset::{ShardWriter, IMAGE_EXTENSIONS};
use super::TaskSection;

/// What an export wrote.
#[derive(Debug, Default, PartialEq)]
pub struct ExportSummary {
    pub shards: usize,
    pub train: usize,
    pub test: usize,
    pub unsplit: usize,
    /// Images that could not be read, left out under `on_error = "skip"`.
    pub skipped: Vec<String>,
}

/// Write the examples of `section`'s source (before splitting: the data's own split is kept)
/// as shards of at most `per_shard` samples under `out`, which must not exist or be empty.
pub fn to_webdataset(section: &TaskSection, out: &Path, per_shard: usize) -> Result<ExportSummary, DataError> {
    let invalid = |reason: String| DataError::Invalid { path: out.display().to_string(), reason };
    if per_shard == 0 {
        return Err(invalid("the shard size must be at least 1".into()));
    }
    if out.exists() && std::fs::read_dir(out).map_or(true, |mut d| d.next().is_some()) {
        return Err(invalid("already exists and is not empty; name a new directory".into()));
    }
    let (records, info) = source::read_all(section)?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
    let partial = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let written = write(&records, &partial, section, per_shard).and_then(|summary| {
        let info = info.unwrap_or_else(|| source::DatasetInfo { name: section.name.clone(), ..Default::default() });
        let json =
            serde_json::to_string_pretty(&source::DatasetInfo { train: summary.train, test: summary.test, ..info })
                .expect("dataset info serialises");
        std::fs::write(partial.join("dataset.json"), json).map_err(|e| io_error(&partial, e))?;
        Ok(summary)
    });
    let summary = match written {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| io_error(out, e))?;
    }
    std::fs::rename(&partial, out).map_err(|e| io_error(out, e))?;
    Ok(summary)
}

fn io_error(path: &Path, e: std::io::Error) -> DataError {
    DataError::Read { path: path.display().to_string(), reason: e.to_string() }
}

/// Every record into shards under `dir`.
fn write(records: &[Record], dir: &Path, section: &TaskSection, per_shard: usize) -> Result<ExportSummary, DataError> {
    let by_split = records.iter().all(|r| r.split.is_some());
    let prefix = section.name.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_', "_");
    let open = |sub: &str| ShardWriter::new(&dir.join(sub), &prefix, per_shard).map_err(|e| io_error(dir, e));
    let mut writers: Vec<ShardWriter> = if by_split { vec![open("train")?, open("test")?] } else { vec![open("")?] };
    let mut summary = ExportSummary::default();
    for (i, r) in records.iter().enumerate() {
        let (ext, bytes) = match image_bytes(r) {
            Ok(v) => v,
            Err(e) if section.on_error == super::OnError::Skip => {
                tracing::warn!("skipping: {e}");
                summary.skipped.push(r.image.display().to_string());
                continue;
            }
            Err(e) => {
                return Err(DataError::Image {
                    task: section.name.clone(),
                    cause: e,
                    hint: "; fix or remove the file, or pass --skip-bad to count and leave it out",
                })
            }
        };
        let split = r.split.map(|s| if s == Split::Train { "train" } else { "test" });
        let json = serde_json::json!({
            "captions": r.captions,
            "class": r.class,
            "split": split,
            "id": r.image.display().to_string(),
        });
        let w = match (by_split, r.split) {
            (true, Some(Split::Test)) => &mut writers[1],
            _ => &mut writers[0],
        };
        w.add(&format!("{i:09}"), ext, &bytes, &json).map_err(|e| io_error(dir, e))?;
        match r.split {
            Some(Split::Train) => summary.train += 1,
            Some(Split::Test) => summary.test += 1,
            None => summary.unsplit += 1,
        }
    }
    for w in writers {
        summary.shards += w.finish().map_err(|e| io_error(dir, e))?.0;
    }
    Ok(summary)
}

/// The record's image as WebDataset stores it: its own bytes under its extension, or PNG.
fn image_bytes(r: &Record) -> Result<(&'static str, Vec<u8>), super::preprocess::ImageError> {
    let label = r.image.display().to_string();
    let (name, bytes) = match &r.member {
        Some(m) => (PathBuf::from(&*m.name), m.read()?),
        None => (
            r.image.clone(),
            std::fs::read(&r.image)
                .map_err(|e| super::preprocess::ImageError::Read { path: label.clone(), reason: e.to_string() })?,
        ),
    };
    let ext = name.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let known = IMAGE_EXTENSIONS.iter().find(|&&e| e == ext);
    let img = super::image::decode_bytes(&bytes, &label)?;
    match known {
        Some(&e) if image::guess_format(&bytes).is_ok_and(|f| matches_ext(f, e)) => Ok((e, bytes)),
        _ => {
            let mut png = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| super::preprocess::ImageError::Decode { path: label, reason: e.to_string() })?;
            Ok(("png", png))
        }
    }
}

/// Whether bytes of `format` may carry the extension `ext` (a PNG saved as `.jpg` is
/// re-encoded, so a reader that trusts extensions is not misled).
fn matches_ext(format: image::ImageFormat, ext: &str) -> bool {
    matches!(
        (format, ext),
        (image::ImageFormat::Jpeg, "jpg" | "jpeg")
            | (image::ImageFormat::Png, "png")
            | (image::ImageFormat::WebP, "webp")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::preprocess::Preprocess;

    fn png(path: &Path, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(7, 5, image::Rgb([v, 3, 255 - v])).save(path).unwrap();
    }

    fn section(toml_text: &str) -> TaskSection {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn a_jsonl_set_round_trips_through_shards_with_its_split_and_captions() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let mut train = String::new();
        for i in 0..5u8 {
            png(&src.join(format!("img/{i}.png")), i * 40);
            train.push_str(&format!("{{\"image\":\"img/{i}.png\",\"captions\":[\"cap {i}\",\"alt {i}\"]}}\n"));
        }
        std::fs::write(src.join("train.jsonl"), train).unwrap();
        png(&src.join("img/t.bmp.png"), 9);
        std::fs::write(src.join("test.jsonl"), "{\"image\":\"img/t.bmp.png\",\"class\":\"cat\"}\n").unwrap();
        std::fs::write(src.join("dataset.json"), r#"{"name":"s","classes":["cat"],"templates":["a {}"]}"#).unwrap();
        let mut jsonl = section("name = \"s\"\nsource = \"jsonl\"");
        jsonl.path = Some(src.clone());
        let out = d.path().join("wds");
        let summary = to_webdataset(&jsonl, &out, 2).unwrap();
        assert_eq!((summary.train, summary.test, summary.unsplit, summary.shards), (5, 1, 0, 4));
        let mut wds = section("name = \"s\"\nsource = \"webdataset\"");
        wds.path = Some(out.clone());
        let pre = Preprocess::clip(4);
        let (a, b) = (source::load(&jsonl, &pre).unwrap(), source::load(&wds, &pre).unwrap());
        assert_eq!(a.train.len(), b.train.len());
        assert_eq!(b.test[0].captions, ["a cat"], "the class and the copied dataset.json's template");
        for (x, y) in a.train.iter().zip(&b.train) {
            assert_eq!(x.captions, y.captions);
            assert_eq!(x.eval_pixels(4).unwrap(), y.eval_pixels(4).unwrap(), "the same pixels");
            assert!(y.shard.is_some());
        }
        let e = to_webdataset(&jsonl, &out, 2).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
    }

    #[test]
    fn a_missing_image_fails_by_name_and_leaves_nothing_behind() {
        let d = tempfile::tempdir().unwrap();
        png(&d.path().join("a.png"), 1);
        let f = d.path().join("m.jsonl");
        std::fs::write(&f, "{\"image\":\"a.png\",\"caption\":\"x\"}\n{\"image\":\"gone.png\",\"caption\":\"y\"}\n")
            .unwrap();
        let mut jsonl = section("name = \"m\"\nsource = \"jsonl\"");
        jsonl.path = Some(f);
        let out = d.path().join("out");
        let e = to_webdataset(&jsonl, &out, 10).unwrap_err().to_string();
        assert!(e.contains("gone.png"), "{e}");
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2, "no partial directory is left");
        jsonl.on_error = crate::data::OnError::Skip;
        let s = to_webdataset(&jsonl, &out, 10).unwrap();
        assert_eq!((s.unsplit, s.skipped.len()), (1, 1));
    }
}
