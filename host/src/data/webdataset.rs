//! WebDataset shards, as open_clip reads them: tar files whose members are grouped into
//! samples by key (the member's name up to the first dot of its file name), each sample an
//! image (`.jpg`, `.jpeg`, `.png` or `.webp`) with its caption (`.txt`) and/or metadata
//! (`.json`: `caption` or `captions`, optionally `class` and `split`).
//!
//! A shard is indexed once, when the data loads: each sample keeps its shard and the byte
//! range of its image, so a batch reads exactly the images it needs (one seek and one read
//! each) and memory holds the index, not the images. `path` names the shards as a file, a
//! directory (its `*.tar`, or `train/` and `test/` subdirectories for a split of its own), a
//! glob (`shards/*.tar`) or a brace list (`data-{000..099}.tar`, `{a,b}.tar`), as
//! WebDataset's own URLs do.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde::Deserialize;

use super::preprocess::ImageError;
use super::source::{DataError, Record, Split};

/// Image extensions, in the order a sample with several is read (open_clip's
/// `jpg;png;jpeg;webp`).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "png", "jpeg", "webp"];

/// An image inside a shard: which shard, the member's name, and where its bytes lie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMember {
    pub shard: Arc<Path>,
    /// The member's name in the tar (`KEY.jpg`).
    pub name: Arc<str>,
    /// The byte offset of the member's data in the shard, and its length.
    pub offset: u64,
    pub len: u64,
}

impl ShardMember {
    /// `SHARD:MEMBER`, the name errors and the split record use.
    pub fn label(&self) -> String {
        format!("{}:{}", self.shard.display(), self.name)
    }

    /// The member's bytes: one seek and one read.
    pub fn read(&self) -> Result<Vec<u8>, ImageError> {
        let fail = |e: std::io::Error| ImageError::Read { path: self.label(), reason: e.to_string() };
        let mut f = File::open(&self.shard).map_err(fail)?;
        f.seek(SeekFrom::Start(self.offset)).map_err(fail)?;
        let mut bytes = vec![0u8; self.len as usize];
        f.read_exact(&mut bytes).map_err(|e| ImageError::Read {
            path: self.label(),
            reason: format!("{e} (the shard is shorter than its index says: was it rewritten since the data loaded?)"),
        })?;
        Ok(bytes)
    }
}

/// The shards a `path` names, sorted within each pattern, in the order of its brace list.
/// An existing file or directory is taken as it is; anything else is a pattern.
pub fn expand(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    let text = path.to_string_lossy();
    let invalid = |reason: String| DataError::Invalid { path: text.to_string(), reason };
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if path.is_dir() {
        let shards = tars_in(path)?;
        if shards.is_empty() {
            return Err(invalid("this directory holds no `.tar` shards (nor `train/` and `test/` with shards)".into()));
        }
        return Ok(shards);
    }
    let mut out = Vec::new();
    for pattern in expand_braces(&text).map_err(invalid)? {
        let p = PathBuf::from(&pattern);
        if !has_glob(&pattern) {
            if !p.is_file() {
                return Err(invalid(format!("shard `{pattern}` does not exist")));
            }
            out.push(p);
            continue;
        }
        let mut matched = glob_files(&pattern).map_err(invalid)?;
        matched.sort();
        out.extend(matched);
    }
    if out.is_empty() {
        return Err(invalid(
            "the pattern matches no shard; check the path (globs: `*`, `?`, `[...]`; ranges: `{000..099}`)".into(),
        ));
    }
    Ok(out)
}

/// `DIR/*.tar`, sorted.
fn tars_in(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| DataError::Read { path: dir.display().to_string(), reason: e.to_string() })?;
    let mut v: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "tar"))
        .collect();
    v.sort();
    Ok(v)
}

/// The `train/` and `test/` subdirectories of a directory of shards, when it has both.
pub fn split_dirs(dir: &Path) -> Option<[(PathBuf, Split); 2]> {
    let (train, test) = (dir.join("train"), dir.join("test"));
    (train.is_dir() && test.is_dir()).then_some([(train, Split::Train), (test, Split::Test)])
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Files matching a glob: the pattern's leading components without metacharacters are a
/// directory, walked as deep as the pattern has components.
fn glob_files(pattern: &str) -> Result<Vec<PathBuf>, String> {
    let components: Vec<&str> = pattern.split('/').collect();
    let fixed = components.iter().take_while(|c| !has_glob(c)).count();
    let root = match components[..fixed].join("/") {
        s if s.is_empty() && pattern.starts_with('/') => "/".to_string(),
        s if s.is_empty() => ".".to_string(),
        s => s,
    };
    let matcher = globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| format!("not a valid glob: {e}"))?
        .compile_matcher();
    let depth = components.len() - fixed;
    let mut out = Vec::new();
    let mut level = vec![PathBuf::from(&root)];
    for d in 1..=depth {
        let mut next = Vec::new();
        for dir in level {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                // A relative pattern is matched (and its shards named) without a `./`.
                let p = if root == "." && d == 1 { PathBuf::from(e.file_name()) } else { dir.join(e.file_name()) };
                if d < depth {
                    if p.is_dir() {
                        next.push(p);
                    }
                } else if p.is_file() && matcher.is_match(&p) {
                    out.push(p);
                }
            }
        }
        level = next;
    }
    Ok(out)
}

/// The braces of [`expand_braces`] (escaped, so the source's braces stay balanced).
const OPEN: char = '\u{7b}';
const CLOSE: char = '\u{7d}';

/// Brace expansion as WebDataset's URLs (and a shell) do it: `{000..099}` is a zero-padded
/// numeric range, `{a,b}` a list; several braces multiply.
pub fn expand_braces(s: &str) -> Result<Vec<String>, String> {
    let Some(open) = s.find(OPEN) else { return Ok(vec![s.to_string()]) };
    let close =
        s[open..].find(CLOSE).map(|c| open + c).ok_or_else(|| format!("the brace at byte {open} is never closed"))?;
    let (head, body, tail) = (&s[..open], &s[open + 1..close], &s[close + 1..]);
    let items: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let (lo, hi) = (a.parse::<u64>(), b.parse::<u64>());
        let (Ok(lo), Ok(hi)) = (lo, hi) else {
            return Err(format!("`{{{body}}}` is not a numeric range such as {{000..099}}"));
        };
        if lo > hi {
            return Err(format!("`{{{body}}}` runs backwards"));
        }
        let width = if a.starts_with('0') { a.len() } else { 0 };
        (lo..=hi).map(|i| format!("{i:0width$}")).collect()
    } else {
        body.split(',').map(String::from).collect()
    };
    // The first brace varies slowest, as a reader of `{a,b}/x{1..2}` expects.
    let tails = expand_braces(tail)?;
    Ok(items.iter().flat_map(|item| tails.iter().map(move |rest| format!("{head}{item}{rest}"))).collect())
}

/// A sample's `.json`: what open_clip-style shards and `recall data prepare --to-webdataset`
/// write. Other keys (`url`, `width`, ...) are allowed and unused.
#[derive(Deserialize, Default)]
struct SampleJson {
    #[serde(default)]
    caption: Option<String>,
    #[serde(default)]
    captions: Vec<String>,
    #[serde(default)]
    class: Option<String>,
    #[serde(default)]
    split: Option<String>,
}

/// One sample's members as they are read from the shard.
#[derive(Default)]
struct Pending {
    key: String,
    image: Option<ShardMember>,
    txt: Option<String>,
    json: Option<SampleJson>,
}

/// Every sample of one shard, in order. `split` is the split of the shard's directory, if
/// any. A member that is not UTF-8 text or JSON where it should be, and a sample without an
/// image or without a caption, are errors that name the shard and the key.
pub fn read_shard(shard: &Path, split: Option<Split>) -> Result<Vec<Record>, DataError> {
    let label = shard.display().to_string();
    let invalid = |reason: String| DataError::Invalid { path: label.clone(), reason };
    let file = File::open(shard).map_err(|e| DataError::Read { path: label.clone(), reason: e.to_string() })?;
    if file.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
        return Err(invalid("the shard is empty (0 bytes); a shard is a tar file".into()));
    }
    let shard_path: Arc<Path> = Arc::from(shard);
    let mut archive = tar::Archive::new(BufReader::new(file));
    let not_tar = |e: std::io::Error| invalid(format!("not a readable tar file: {e}"));
    let mut out = Vec::new();
    let mut pending = Pending::default();
    for entry in archive.entries_with_seek().map_err(not_tar)? {
        let mut entry = entry.map_err(not_tar)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(not_tar)?.to_string_lossy().into_owned();
        let Some((key, ext)) = split_key(&name) else { continue };
        if key != pending.key {
            finish(std::mem::take(&mut pending), split, &shard_path, &mut out)?;
            pending.key = key.to_string();
        }
        let ext = ext.to_ascii_lowercase();
        let at = |what: &str| format!("sample `{key}`: {what}");
        match ext.as_str() {
            "txt" => {
                let mut s = String::new();
                entry.read_to_string(&mut s).map_err(|e| invalid(at(&format!("{name} is not UTF-8 text ({e})"))))?;
                pending.txt = Some(s);
            }
            "json" => {
                let mut s = String::new();
                entry.read_to_string(&mut s).map_err(|e| invalid(at(&format!("{name} is not UTF-8 ({e})"))))?;
                let j =
                    serde_json::from_str(&s).map_err(|e| invalid(at(&format!("{name} is not a JSON object: {e}"))))?;
                pending.json = Some(j);
            }
            e if IMAGE_EXTENSIONS.contains(&e) => {
                let member = ShardMember {
                    shard: shard_path.clone(),
                    name: name.as_str().into(),
                    offset: entry.raw_file_position(),
                    len: entry.size(),
                };
                let rank = |m: &ShardMember| {
                    let e = split_key(&m.name).map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
                    IMAGE_EXTENSIONS.iter().position(|x| *x == e).unwrap_or(usize::MAX)
                };
                if pending.image.as_ref().is_none_or(|m| rank(&member) < rank(m)) {
                    pending.image = Some(member);
                }
            }
            _ => {}
        }
    }
    finish(pending, split, &shard_path, &mut out)?;
    Ok(out)
}

/// `dir/KEY.ext.more` -> (`dir/KEY`, `ext.more`): the key ends at the first dot of the file
/// name, as WebDataset splits it. Names without a dot are not sample members.
fn split_key(name: &str) -> Option<(&str, &str)> {
    let base = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[base..].find('.')? + base;
    Some((&name[..dot], &name[dot + 1..]))
}

/// A finished sample into a record (nothing for the empty start).
fn finish(p: Pending, dir_split: Option<Split>, shard: &Arc<Path>, out: &mut Vec<Record>) -> Result<(), DataError> {
    if p.key.is_empty() && p.image.is_none() && p.txt.is_none() && p.json.is_none() {
        return Ok(());
    }
    let invalid = |reason: String| DataError::Invalid { path: shard.display().to_string(), reason };
    let json = p.json.unwrap_or_default();
    let mut captions: Vec<String> = p.txt.map(|t| t.trim().to_string()).into_iter().collect();
    if captions.is_empty() {
        captions.extend(json.caption.map(|c| c.trim().to_string()));
        captions.extend(json.captions.iter().map(|c| c.trim().to_string()));
    }
    let key = &p.key;
    let Some(image) = p.image else {
        return Err(invalid(format!(
            "sample `{key}` has no image (expected {key}.jpg, .png, .jpeg or .webp beside its caption)"
        )));
    };
    if captions.is_empty() && json.class.is_none() {
        return Err(invalid(format!(
            "sample `{key}` has an image but no caption: add {key}.txt, or {key}.json with `caption`, `captions` or \
             `class`"
        )));
    }
    if let Some(k) = captions.iter().position(|c| c.is_empty()) {
        return Err(invalid(format!("sample `{key}`: caption {k} is empty; remove it or give it text")));
    }
    let split = match json.split.as_deref() {
        None => dir_split,
        Some("train" | "restval") => Some(Split::Train),
        Some("test") => Some(Split::Test),
        Some(s) if s.starts_with("val") => return Ok(()),
        Some(s) => {
            return Err(invalid(format!("sample `{key}`: unknown split `{s}`; expected train, test, val or restval")))
        }
    };
    out.push(Record {
        image: PathBuf::from(image.label()),
        captions,
        class: json.class,
        category: None,
        split,
        member: Some(image),
    });
    Ok(())
}

/// Every sample of the shards `path` names, the shards read in parallel; each record's split
/// is its directory's (`train/`, `test/`) or its `.json`'s, else none.
pub fn read_records(path: &Path) -> Result<Vec<Record>, DataError> {
    let shards: Vec<(PathBuf, Option<Split>)> = match split_dirs(path).filter(|_| path.is_dir()) {
        Some(dirs) => {
            let mut v = Vec::new();
            for (dir, split) in dirs {
                let tars = tars_in(&dir)?;
                if tars.is_empty() {
                    return Err(DataError::Invalid {
                        path: dir.display().to_string(),
                        reason: "this split directory holds no `.tar` shards".into(),
                    });
                }
                v.extend(tars.into_iter().map(|t| (t, Some(split))));
            }
            v
        }
        None => expand(path)?.into_iter().map(|t| (t, None)).collect(),
    };
    let per_shard: Vec<Result<Vec<Record>, DataError>> =
        shards.par_iter().map(|(shard, split)| read_shard(shard, *split)).collect();
    let mut out = Vec::new();
    for r in per_shard {
        out.extend(r?);
    }
    if out.is_empty() {
        return Err(DataError::Invalid {
            path: path.display().to_string(),
            reason: "the shards hold no samples".into(),
        });
    }
    Ok(out)
}

/// Check that a member is an image with pixels by reading its header.
pub fn check_member(m: &ShardMember) -> Result<(), ImageError> {
    let bytes = m.read()?;
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Read { path: m.label(), reason: e.to_string() })?;
    let (width, height) =
        reader.into_dimensions().map_err(|e| ImageError::Decode { path: m.label(), reason: e.to_string() })?;
    if width == 0 || height == 0 {
        return Err(ImageError::Empty { path: m.label(), width, height });
    }
    Ok(())
}

/// Writes samples into numbered shards of at most `per_shard` samples each
/// (`DIR/PREFIX-000000.tar`, ...). Each shard is written to a temporary name and renamed
/// when complete, so a reader never sees half a shard.
pub struct ShardWriter {
    dir: PathBuf,
    prefix: String,
    per_shard: usize,
    current: Option<(tar::Builder<std::io::BufWriter<File>>, PathBuf, PathBuf)>,
    in_current: usize,
    pub shards: usize,
    pub samples: usize,
}

impl ShardWriter {
    pub fn new(dir: &Path, prefix: &str, per_shard: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            per_shard: per_shard.max(1),
            current: None,
            in_current: 0,
            shards: 0,
            samples: 0,
        })
    }

    /// Append one sample: `KEY.EXT` (the image's bytes as they are) and `KEY.json`.
    pub fn add(&mut self, key: &str, ext: &str, image: &[u8], json: &serde_json::Value) -> std::io::Result<()> {
        if self.current.is_none() || self.in_current == self.per_shard {
            self.close_current()?;
            let name = format!("{}-{:06}.tar", self.prefix, self.shards);
            let (fin, tmp) = (self.dir.join(&name), self.dir.join(format!(".{name}.partial")));
            let f = std::io::BufWriter::new(File::create(&tmp)?);
            self.current = Some((tar::Builder::new(f), tmp, fin));
            self.in_current = 0;
            self.shards += 1;
        }
        let (builder, _, _) = self.current.as_mut().expect("opened above");
        let body = serde_json::to_vec(json)?;
        for (name, bytes) in [(format!("{key}.{ext}"), image), (format!("{key}.json"), &body[..])] {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut h, &name, bytes)?;
        }
        self.in_current += 1;
        self.samples += 1;
        Ok(())
    }

    fn close_current(&mut self) -> std::io::Result<()> {
        if let Some((builder, tmp, fin)) = self.current.take() {
            let mut w = builder.into_inner()?;
            w.flush()?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(tmp, fin)?;
        }
        Ok(())
    }

    /// Finish the last shard.
    pub fn finish(mut self) -> std::io::Result<(usize, usize)> {
        self.close_current()?;
        Ok((self.shards, self.samples))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn png_bytes(v: u8) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::from_pixel(5, 3, image::Rgb([v, 9, 255 - v]))
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    /// A tar of (name, bytes) members in order.
    pub(crate) fn tar_of(path: &Path, members: &[(&str, Vec<u8>)]) {
        let mut b = tar::Builder::new(File::create(path).unwrap());
        for (name, bytes) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, &bytes[..]).unwrap();
        }
        b.finish().unwrap();
    }

    #[test]
    fn braces_expand_ranges_and_lists_in_order() {
        assert_eq!(expand_braces("d-{000..002}.tar").unwrap(), ["d-000.tar", "d-001.tar", "d-002.tar"]);
        assert_eq!(expand_braces("{a,b}/x{8..10}").unwrap(), ["a/x8", "a/x9", "a/x10", "b/x8", "b/x9", "b/x10"]);
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        assert!(expand_braces("d-{3..1}.tar").unwrap_err().contains("backwards"));
        assert!(expand_braces("d-{1..x}.tar").unwrap_err().contains("numeric range"));
        assert!(expand_braces("d-\u{7b}1..2.tar").unwrap_err().contains("never closed"));
    }

    #[test]
    fn samples_group_by_key_and_keep_their_image_byte_range() {
        let d = tempfile::tempdir().unwrap();
        let shard = d.path().join("s-0.tar");
        let (a, b) = (png_bytes(10), png_bytes(200));
        tar_of(
            &shard,
            &[
                ("x/000.png", a.clone()),
                ("x/000.txt", b" a red square\n".to_vec()),
                ("x/001.jpg", b.clone()),
                ("x/001.json", br#"{"captions": ["one", "two"], "class": "cat", "url": "u"}"#.to_vec()),
                ("x/001.cls", b"3".to_vec()),
            ],
        );
        let r = read_shard(&shard, Some(Split::Train)).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].captions, ["a red square"]);
        assert_eq!((r[1].captions.clone(), r[1].class.as_deref()), (vec!["one".into(), "two".into()], Some("cat")));
        assert_eq!(r[1].split, Some(Split::Train));
        let m = r[1].member.as_ref().unwrap();
        assert_eq!(&*m.name, "x/001.jpg");
        assert_eq!(m.read().unwrap(), b, "the recorded byte range is the member's data");
        assert!(r[0].image.to_string_lossy().ends_with("s-0.tar:x/000.png"));
        check_member(m).unwrap();
    }

    #[test]
    fn structural_faults_are_errors_that_name_shard_and_key() {
        let d = tempfile::tempdir().unwrap();
        let shard = d.path().join("bad.tar");
        tar_of(&shard, &[("k1.png", png_bytes(1)), ("k1.txt", b"fine".to_vec()), ("k2.png", png_bytes(2))]);
        let e = read_shard(&shard, None).unwrap_err().to_string();
        assert!(e.contains("bad.tar") && e.contains("`k2`") && e.contains("no caption"), "{e}");
        tar_of(&shard, &[("k3.txt", b"orphan".to_vec())]);
        let e = read_shard(&shard, None).unwrap_err().to_string();
        assert!(e.contains("`k3`") && e.contains("no image"), "{e}");
        tar_of(&shard, &[("k4.png", png_bytes(1)), ("k4.json", b"[not json".to_vec())]);
        let e = read_shard(&shard, None).unwrap_err().to_string();
        assert!(e.contains("`k4`") && e.contains("k4.json is not a JSON object"), "{e}");
        std::fs::write(
            &shard,
            b"this is a text file, not a tar archive at all; it is long enough to hold a header \
             block of five hundred and twelve bytes only if repeated"
                .repeat(6),
        )
        .unwrap();
        let e = read_shard(&shard, None).unwrap_err().to_string();
        assert!(e.contains("bad.tar") && e.contains("not a readable tar"), "{e}");
        std::fs::write(&shard, b"").unwrap();
        let e = read_shard(&shard, None).unwrap_err().to_string();
        assert!(e.contains("0 bytes"), "{e}");
    }

    #[test]
    fn paths_name_shards_as_files_directories_globs_and_ranges() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..3 {
            tar_of(&d.path().join(format!("data-{i:03}.tar")), &[("k.png", png_bytes(i)), ("k.txt", b"c".to_vec())]);
        }
        std::fs::write(d.path().join("notes.md"), "x").unwrap();
        let names = |v: Vec<PathBuf>| {
            v.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect::<Vec<_>>()
        };
        assert_eq!(names(expand(d.path()).unwrap()), ["data-000.tar", "data-001.tar", "data-002.tar"]);
        assert_eq!(names(expand(&d.path().join("data-{001..002}.tar")).unwrap()), ["data-001.tar", "data-002.tar"]);
        assert_eq!(
            names(expand(&d.path().join("data-*.tar")).unwrap()),
            ["data-000.tar", "data-001.tar", "data-002.tar"]
        );
        assert_eq!(names(expand(&d.path().join("data-00[02].tar")).unwrap()), ["data-000.tar", "data-002.tar"]);
        let e = expand(&d.path().join("nothing-*.tar")).unwrap_err().to_string();
        assert!(e.contains("nothing-*.tar") && e.contains("matches no shard"), "{e}");
        let e = expand(&d.path().join("data-{004..005}.tar")).unwrap_err().to_string();
        assert!(e.contains("data-004.tar") && e.contains("does not exist"), "{e}");
        assert_eq!(read_records(&d.path().join("data-*.tar")).unwrap().len(), 3);
    }

    #[test]
    fn a_directory_with_train_and_test_gives_the_split() {
        let d = tempfile::tempdir().unwrap();
        for (split, n) in [("train", 3u8), ("test", 2u8)] {
            std::fs::create_dir_all(d.path().join(split)).unwrap();
            let mut members = Vec::new();
            for k in 0..n {
                members.push((format!("{split}{k}.png"), png_bytes(k)));
                members.push((format!("{split}{k}.txt"), format!("caption {k}").into_bytes()));
            }
            let members: Vec<(&str, Vec<u8>)> = members.iter().map(|(a, b)| (a.as_str(), b.clone())).collect();
            tar_of(&d.path().join(split).join("s-000000.tar"), &members);
        }
        let r = read_records(d.path()).unwrap();
        assert_eq!(r.iter().filter(|r| r.split == Some(Split::Train)).count(), 3);
        assert_eq!(r.iter().filter(|r| r.split == Some(Split::Test)).count(), 2);
    }

    #[test]
    fn the_writer_makes_shards_the_reader_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(d.path(), "part", 2).unwrap();
        for i in 0..5u8 {
            let json = serde_json::json!({"captions": [format!("c{i}"), "other"], "class": "k"});
            w.add(&format!("{i:06}"), "png", &png_bytes(i), &json).unwrap();
        }
        assert_eq!(w.finish().unwrap(), (3, 5));
        let r = read_records(d.path()).unwrap();
        assert_eq!(r.len(), 5);
        assert_eq!(r[4].captions, ["c4", "other"]);
        assert_eq!(r[4].member.as_ref().unwrap().read().unwrap(), png_bytes(4));
        assert!(std::fs::read_dir(d.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".partial")));
    }
}
