//! Atomic file writes: every result file is written to a temporary file in the same
//! directory, flushed and fsynced, then renamed over the target, so a kill never leaves a torn
//! file and readers see either the old or the new content.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        Ok(())
    })
}

/// Let `write` produce the file at a temporary path, then fsync it and rename it into place.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(".tmp-");
    // Results are ordinary files (0644 less the umask), not tempfile's private 0600.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let tmp =
        builder.tempfile_in(dir).with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    // Writers that replace the file at the path (safetensors writes its own temporary and
    // renames it) would otherwise leave their own 0600 mode: the result keeps this one.
    let mode = tmp.as_file().metadata()?.permissions();
    write(tmp.path()).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(tmp.path(), mode)?;
    std::fs::File::open(tmp.path())?.sync_all()?;
    tmp.persist(path).with_context(|| format!("cannot move the new {} into place", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(unix)]
    fn a_writer_that_replaces_the_file_keeps_the_results_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let t = candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let tensors = std::collections::HashMap::from([("t".to_string(), t)]);
        write_atomic_with(&p, |tmp| candle_core::safetensors::save(&tensors, tmp).map_err(Into::into)).unwrap();
        let plain = dir.path().join("x.json");
        write_atomic(&plain, b"{}").unwrap();
        let mode = |f: &Path| std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), mode(&plain), "checkpoints are ordinary results");
    }

    #[test]
    fn failed_write_leaves_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"old").unwrap();
        let r = write_atomic_with(&p, |_| anyhow::bail!("boom"));
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file was not cleaned up");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_ne!(mode & 0o044, 0, "results must be readable by others unless the umask says so: {mode:o}");
        }
    }
}
