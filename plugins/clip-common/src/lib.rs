//! What the `clip-vision` and `clip-text` plugins share: finding a checkpoint and its config,
//! telling the two layouts apart, and mapping a transformer block's tensors.
//!
//! - Hugging Face transformers (`CLIPModel.save_pretrained`): `vision_model.*`, `text_model.*`,
//!   `visual_projection.weight` and `text_projection.weight` as [out, in], a `config.json`.
//! - OpenAI / open_clip: `visual.*`, `transformer.*`, `token_embedding`, `positional_embedding`,
//!   `ln_final`, q/k/v fused in `attn.in_proj_weight`, `visual.proj` and `text_projection` as
//!   [in, out] (so transposed here), optionally an `open_clip_config.json` with `model_cfg`.

use std::path::{Path, PathBuf};

use recall_sdk::checkpoint::CheckpointReader;
use recall_sdk::nn::Activation;
use recall_sdk::prelude::*;
use serde_json::Value;

/// A checkpoint's naming scheme.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    HuggingFace,
    OpenClip,
}

/// An opened checkpoint: the weights and whatever config came with them.
pub struct Source {
    pub reader: CheckpointReader,
    pub layout: Layout,
    /// `config.json` (HF) or the `model_cfg` of `open_clip_config.json`.
    pub config: Option<Value>,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::new(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::new(format!("{} is not valid JSON: {e}", path.display())))
}

/// Open `path`: a `.safetensors` file, or a directory holding `model.safetensors` (or
/// `open_clip_model.safetensors`) with its config beside it.
pub fn open(host: &Host, path: &str) -> Result<Source> {
    let p = PathBuf::from(path);
    let (file, dir) = if p.is_dir() {
        let file = ["model.safetensors", "open_clip_model.safetensors"]
            .iter()
            .map(|f| p.join(f))
            .find(|f| f.is_file())
            .ok_or_else(|| {
                Error::config("checkpoint", format!("{path} holds no model.safetensors or open_clip_model.safetensors"))
            })?;
        (file, p.clone())
    } else if p.is_file() {
        (p.clone(), p.parent().map(Path::to_path_buf).unwrap_or_default())
    } else {
        return Err(Error::config("checkpoint", format!("checkpoint `{path}` does not exist")));
    };
    let reader = CheckpointReader::open(host, &file.to_string_lossy())?;
    let layout = if reader.names().any(|n| n.starts_with("vision_model.") || n.starts_with("text_model.")) {
        Layout::HuggingFace
    } else if reader.names().any(|n| n.starts_with("visual.") || n == "token_embedding.weight") {
        Layout::OpenClip
    } else {
        let first: Vec<&str> = reader.names().take(5).collect();
        return Err(Error::new(format!(
            "{} is neither a transformers CLIPModel nor an OpenAI/open_clip checkpoint (first tensors: {})",
            file.display(),
            first.join(", ")
        )));
    };
    let config = match layout {
        Layout::HuggingFace => read_json(&dir.join("config.json"))?,
        Layout::OpenClip => {
            read_json(&dir.join("open_clip_config.json"))?.map(|v| v.get("model_cfg").cloned().unwrap_or(v))
        }
    };
    Ok(Source { reader, layout, config })
}

/// Look up a number in a JSON config by path (`["vision_config", "hidden_size"]`).
pub fn json_f64(v: Option<&Value>, path: &[&str]) -> Option<f64> {
    let mut cur = v?;
    for k in path {
        cur = cur.get(k)?;
    }
    cur.as_f64()
}

pub fn json_usize(v: Option<&Value>, path: &[&str]) -> Option<usize> {
    json_f64(v, path).map(|x| x as usize)
}

/// HF's `hidden_act` names.
/// A config error for the first size that is 0 (`layers = 0` would build no tower).
pub fn require_positive(sizes: &[(&str, usize)]) -> Result<()> {
    match sizes.iter().find(|(_, v)| *v == 0) {
        Some(&(key, _)) => Err(Error::config(key, format!("{key} must be at least 1"))),
        None => Ok(()),
    }
}

pub fn activation_from_name(name: &str) -> Result<Activation> {
    match name {
        "quick_gelu" => Ok(Activation::QuickGelu),
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
        "relu" => Ok(Activation::Relu),
        other => Err(Error::new(format!("unsupported activation `{other}` in the checkpoint config"))),
    }
}

/// What a tower's own config says about settings a checkpoint may not carry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Explicit {
    pub heads: Option<usize>,
    pub activation: Option<Activation>,
    pub layer_norm_eps: Option<f64>,
}

/// Heads, activation and layer-norm eps of one tower. The checkpoint's config wins where it
/// has them (`hf_section` is `vision_config` or `text_config`; `open_clip_heads` is what
/// open_clip_config.json implies); then the tower's own keys; then CLIP's defaults (64-wide
/// heads, QuickGELU as in OpenAI's weights, eps 1e-5).
pub fn tower_settings(
    src: &Source,
    hf_section: &str,
    open_clip_heads: Option<usize>,
    width: usize,
    explicit: Explicit,
) -> Result<(usize, Activation, f64)> {
    let cfg = src.config.as_ref();
    let default_heads = (width / 64).max(1);
    Ok(match src.layout {
        Layout::HuggingFace => (
            json_usize(cfg, &[hf_section, "num_attention_heads"]).or(explicit.heads).unwrap_or(default_heads),
            match cfg.and_then(|v| v[hf_section]["hidden_act"].as_str()) {
                Some(a) => activation_from_name(a)?,
                None => explicit.activation.unwrap_or(Activation::QuickGelu),
            },
            json_f64(cfg, &[hf_section, "layer_norm_eps"]).or(explicit.layer_norm_eps).unwrap_or(1e-5),
        ),
        Layout::OpenClip => (
            open_clip_heads.or(explicit.heads).unwrap_or(default_heads),
            match cfg.and_then(|v| v.get("quick_gelu")).and_then(Value::as_bool) {
                Some(true) => Activation::QuickGelu,
                Some(false) => Activation::Gelu,
                None => explicit.activation.unwrap_or(Activation::QuickGelu),
            },
            explicit.layer_norm_eps.unwrap_or(1e-5),
        ),
    })
}

/// Number of blocks under `prefix` + `{i}.` that have `probe` (e.g. `.ln_1.weight`).
pub fn count_blocks(reader: &CheckpointReader, prefix: &str, probe: &str) -> usize {
    (0..).take_while(|i| reader.has(&format!("{prefix}{i}{probe}"))).count()
}

/// Copy `value` into the plugin's parameter `own` (which must already exist).
pub fn assign(host: &Host, own: &str, shape: &[usize], value: Option<Tensor>) -> Result<()> {
    if let Some(v) = value {
        let p = host.param(own, shape, ParamInit::zeros(), true)?;
        host.param_assign(&p, &v)?;
    }
    Ok(())
}

/// Load a parameter from `ext`, optionally transposing a 2-D tensor stored as [in, out].
pub fn load(
    host: &Host,
    r: &mut CheckpointReader,
    own: &str,
    ext: &str,
    shape: &[usize],
    transposed: bool,
) -> Result<()> {
    let value =
        if transposed { r.take(ext, &[shape[1], shape[0]])?.map(|t| t.t()).transpose()? } else { r.take(ext, shape)? };
    assign(host, own, shape, value)
}

/// Map one pre-LN transformer block (`own` = e.g. `blocks.3`, `ext` = the block's prefix in
/// the checkpoint, e.g. `vision_model.encoder.layers.3` or `visual.transformer.resblocks.3`).
pub fn load_block(
    host: &Host,
    r: &mut CheckpointReader,
    layout: Layout,
    own: &str,
    ext: &str,
    width: usize,
    mlp: usize,
) -> Result<()> {
    let w = width;
    match layout {
        Layout::HuggingFace => {
            for (o, e) in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")] {
                load(host, r, &format!("{own}.{o}.weight"), &format!("{ext}.{e}.weight"), &[w], false)?;
                load(host, r, &format!("{own}.{o}.bias"), &format!("{ext}.{e}.bias"), &[w], false)?;
            }
            for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                load(
                    host,
                    r,
                    &format!("{own}.attn.{p}.weight"),
                    &format!("{ext}.self_attn.{p}.weight"),
                    &[w, w],
                    false,
                )?;
                load(host, r, &format!("{own}.attn.{p}.bias"), &format!("{ext}.self_attn.{p}.bias"), &[w], false)?;
            }
            for (o, e, shape) in [("fc1", "fc1", [mlp, w]), ("fc2", "fc2", [w, mlp])] {
                load(host, r, &format!("{own}.mlp.{o}.weight"), &format!("{ext}.mlp.{e}.weight"), &shape, false)?;
                load(host, r, &format!("{own}.mlp.{o}.bias"), &format!("{ext}.mlp.{e}.bias"), &[shape[0]], false)?;
            }
        }
        Layout::OpenClip => {
            for o in ["ln_1", "ln_2"] {
                load(host, r, &format!("{own}.{o}.weight"), &format!("{ext}.{o}.weight"), &[w], false)?;
                load(host, r, &format!("{own}.{o}.bias"), &format!("{ext}.{o}.bias"), &[w], false)?;
            }
            // q, k, v are stacked in that order along the rows of in_proj.
            let weight = r.take(&format!("{ext}.attn.in_proj_weight"), &[3 * w, w])?;
            let bias = r.take(&format!("{ext}.attn.in_proj_bias"), &[3 * w])?;
            for (i, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                assign(
                    host,
                    &format!("{own}.attn.{p}.weight"),
                    &[w, w],
                    weight.as_ref().map(|t| t.narrow(0, i * w, w)).transpose()?,
                )?;
                assign(
                    host,
                    &format!("{own}.attn.{p}.bias"),
                    &[w],
                    bias.as_ref().map(|t| t.narrow(0, i * w, w)).transpose()?,
                )?;
            }
            load(
                host,
                r,
                &format!("{own}.attn.out_proj.weight"),
                &format!("{ext}.attn.out_proj.weight"),
                &[w, w],
                false,
            )?;
            load(host, r, &format!("{own}.attn.out_proj.bias"), &format!("{ext}.attn.out_proj.bias"), &[w], false)?;
            for (o, e, shape) in [("fc1", "c_fc", [mlp, w]), ("fc2", "c_proj", [w, mlp])] {
                load(host, r, &format!("{own}.mlp.{o}.weight"), &format!("{ext}.mlp.{e}.weight"), &shape, false)?;
                load(host, r, &format!("{own}.mlp.{o}.bias"), &format!("{ext}.mlp.{e}.bias"), &[shape[0]], false)?;
            }
        }
    }
    Ok(())
}

/// Check an explicitly configured value against the checkpoint's.
pub fn agree<T: PartialEq + std::fmt::Debug>(key: &str, explicit: Option<T>, from_checkpoint: T) -> Result<T> {
    match explicit {
        Some(v) if v != from_checkpoint => Err(Error::config(
            key,
            format!("`{key}` is {v:?} but the checkpoint says {from_checkpoint:?}; remove the key or use another checkpoint"),
        )),
        _ => Ok(from_checkpoint),
    }
}
