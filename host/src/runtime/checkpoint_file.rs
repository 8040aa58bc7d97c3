//! The checkpoint files plugins read weights from (`checkpoint_index`, `checkpoint_tensor`):
//! safetensors, memory-mapped, and PyTorch's zip format (`torch.save`: `.pt`, `.pth`, `.bin`),
//! so weights released only as PyTorch checkpoints (LlamaGen's VQ tokenizers) load without a
//! conversion step.
//!
//! A PyTorch file often nests its state dict under a key. `file.pt#key` names it; without a
//! key the first of `ema`, `model`, `state_dict` that holds tensors is taken (the order
//! LlamaGen's own loaders use), then the top level.

use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

/// Keys searched, in order, for a PyTorch checkpoint's state dict when none is named.
pub const STATE_DICT_KEYS: [&str; 3] = ["ema", "model", "state_dict"];

/// One opened checkpoint file.
pub enum CheckpointFile {
    Safetensors(MmapedSafetensors),
    Torch { tensors: PthTensors, key: Option<String> },
}

/// A checkpoint reference split into its file and the optional `#key` of a PyTorch file.
/// A path that exists as written is taken whole, so a `#` in a file name still works.
pub fn split_key(reference: &str) -> (PathBuf, Option<String>) {
    if !Path::new(reference).exists() {
        if let Some((file, key)) = reference.rsplit_once('#') {
            if !key.is_empty() && !key.contains('/') {
                return (PathBuf::from(file), Some(key.to_string()));
            }
        }
    }
    (PathBuf::from(reference), None)
}

/// Whether a file starts like a zip archive (PyTorch's format since 1.6).
fn is_zip(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)?;
    let n = f.read(&mut magic)?;
    Ok(n == 4 && magic == *b"PK\x03\x04")
}

impl CheckpointFile {
    /// Open `reference` (`path` or `path#key`).
    pub fn open(reference: &str) -> Result<Self, String> {
        let (path, key) = split_key(reference);
        if !path.is_file() {
            return Err(format!("checkpoint {} does not exist or is not a file", path.display()));
        }
        let zip = is_zip(&path).map_err(|e| format!("checkpoint {}: {e}", path.display()))?;
        if !zip {
            if key.is_some() {
                return Err(format!(
                    "checkpoint {reference}: `#key` selects a state dict inside a PyTorch file, and {} is not one",
                    path.display()
                ));
            }
            // SAFETY: the file is mapped read-only; Recall does not support modifying a
            // checkpoint while a run reads it (the mapping would then change underneath).
            let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| {
                let what = if path.extension().is_some_and(|x| x == "safetensors") {
                    "a readable safetensors file"
                } else {
                    "a readable safetensors file, nor a PyTorch zip checkpoint"
                };
                format!("checkpoint {} is not {what} (truncated or corrupt?): {e}", path.display())
            })?;
            return Ok(CheckpointFile::Safetensors(st));
        }
        // candle's pickle reader can panic on a damaged file (an integer overflow found by
        // fuzzing): that is a damaged checkpoint, not a crash.
        let read = |key: Option<&str>| {
            std::panic::catch_unwind(|| PthTensors::new(&path, key))
                .map_err(|_| "the pickle reader failed on its data (the file is damaged)".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map_err(|e| format!("checkpoint {}: not a readable PyTorch checkpoint: {e}", path.display()))
        };
        match key {
            Some(k) => {
                let tensors = read(Some(&k))
                    .map_err(|e| format!("{e}; `#{k}` must name a dictionary of tensors inside the file"))?;
                if tensors.tensor_infos().is_empty() {
                    return Err(format!("checkpoint {}: `{k}` holds no tensors", path.display()));
                }
                Ok(CheckpointFile::Torch { tensors, key: Some(k) })
            }
            None => {
                for k in STATE_DICT_KEYS {
                    if let Ok(tensors) = read(Some(k)) {
                        if !tensors.tensor_infos().is_empty() {
                            return Ok(CheckpointFile::Torch { tensors, key: Some(k.to_string()) });
                        }
                    }
                }
                let tensors = read(None)?;
                if tensors.tensor_infos().is_empty() {
                    return Err(format!(
                        "checkpoint {}: no tensors at the top level or under {}; name the state dict as `{}#KEY`",
                        path.display(),
                        STATE_DICT_KEYS.map(|k| format!("`{k}`")).join(", "),
                        path.display()
                    ));
                }
                Ok(CheckpointFile::Torch { tensors, key: None })
            }
        }
    }

    /// Every tensor: name, shape, dtype, sorted by name.
    pub fn index(&self) -> Vec<(String, Vec<usize>, Result<DType, String>)> {
        let mut v: Vec<(String, Vec<usize>, Result<DType, String>)> = match self {
            CheckpointFile::Safetensors(st) => st
                .tensors()
                .into_iter()
                .map(|(name, view)| {
                    let dtype = DType::try_from(view.dtype()).map_err(|e| e.to_string());
                    (name, view.shape().to_vec(), dtype)
                })
                .collect(),
            CheckpointFile::Torch { tensors, .. } => tensors
                .tensor_infos()
                .values()
                .map(|info| (info.name.clone(), info.layout.dims().to_vec(), Ok(info.dtype)))
                .collect(),
        };
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// One tensor on `device`, in its stored dtype.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor, String> {
        match self {
            CheckpointFile::Safetensors(st) => st.load(name, device).map_err(|e| e.to_string()),
            CheckpointFile::Torch { tensors, key } => match tensors.get(name) {
                Ok(Some(t)) => t.to_device(device).map_err(|e| e.to_string()),
                Ok(None) => Err(match key {
                    Some(k) => format!("no tensor `{name}` in state dict `{k}`"),
                    None => format!("no tensor `{name}`"),
                }),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_split_off_only_when_the_whole_path_does_not_exist() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("weights#1.pt");
        std::fs::write(&odd, b"x").unwrap();
        assert_eq!(split_key(odd.to_str().unwrap()), (odd.clone(), None));
        let plain = dir.path().join("vq.pt");
        let with_key = format!("{}#model", plain.display());
        assert_eq!(split_key(&with_key), (plain, Some("model".to_string())));
        assert_eq!(split_key("a/b#/c").1, None);
    }

    #[test]
    fn a_pickle_that_makes_candles_reader_panic_is_a_damaged_checkpoint() {
        // Found by `scripts/fuzz.sh` (target pickle): one byte of the LlamaGen fixture changed
        // makes candle's pickle reader overflow a shift.
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/llamagen/vq.pt");
        let mut bytes = std::fs::read(fixture).unwrap();
        assert_eq!(bytes[2017], 113, "the fixture changed; find the byte again with recall-fuzz");
        bytes[2017] = 138;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("damaged.pt");
        std::fs::write(&p, bytes).unwrap();
        let e = CheckpointFile::open(&p.display().to_string()).err().expect("a damaged file is an error");
        assert!(e.contains("not a readable PyTorch checkpoint"), "{e}");
    }

    #[test]
    fn a_file_that_is_neither_format_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.pt");
        std::fs::write(&bad, b"not a checkpoint at all").unwrap();
        let e = CheckpointFile::open(bad.to_str().unwrap()).err().unwrap();
        assert!(e.contains("bad.pt") && e.contains("nor a PyTorch zip checkpoint"), "{e}");
        let e = CheckpointFile::open(&format!("{}#model", bad.display())).err().unwrap();
        assert!(e.contains("not one"), "{e}");
        let e = CheckpointFile::open(dir.path().join("missing.pt").to_str().unwrap()).err().unwrap();
        assert!(e.contains("does not exist"), "{e}");
    }
}
