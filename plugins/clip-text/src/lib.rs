//! `clip-text`: the CLIP text transformer as a Recall encoder plugin.
//!
//! token ids -> token embedding + positional embedding -> causal pre-LN transformer ->
//! ln_final -> the features at the end-of-text token (the highest id in CLIP's vocabulary, so
//! the position of the row's maximum id, as in OpenAI CLIP) -> text projection.

use recall_clip_common::{
    agree, count_blocks, json_usize, load, load_block, open, tower_settings, Explicit, Layout, Source,
};
use recall_sdk::nn::{Activation, LayerNorm, Transformer, TransformerConfig};
use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

/// The text tower's config. With `checkpoint`, the architecture comes from the checkpoint
/// (and its config); keys given as well must agree. Without, unset keys take OpenAI CLIP's
/// defaults (ViT-B text tower).
#[derive(Deserialize, Serialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields, into = "Recorded")]
pub struct Config {
    /// A transformers CLIPModel directory or an OpenAI/open_clip safetensors file.
    pub checkpoint: Option<String>,
    pub vocab_size: Option<usize>,
    pub context_length: Option<usize>,
    pub width: Option<usize>,
    pub layers: Option<usize>,
    pub heads: Option<usize>,
    pub mlp_hidden: Option<usize>,
    pub embed_dim: Option<usize>,
    pub activation: Option<Activation>,
    pub layer_norm_eps: Option<f64>,
    /// Pool at the first occurrence of this id instead of at the row's highest id.
    pub eot_token_id: Option<u32>,
}

/// How a config is recorded (config.resolved.toml): without a checkpoint, every unset key as
/// the defaults resolve it (what the run uses); with one, the keys as written (the
/// architecture is the checkpoint's).
#[derive(Serialize)]
struct Recorded {
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vocab_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context_length: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    width: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    layers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mlp_hidden: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    embed_dim: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    activation: Option<Activation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    layer_norm_eps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eot_token_id: Option<u32>,
}

impl From<Config> for Recorded {
    fn from(c: Config) -> Self {
        if c.checkpoint.is_some() {
            return Recorded {
                checkpoint: c.checkpoint,
                vocab_size: c.vocab_size,
                context_length: c.context_length,
                width: c.width,
                layers: c.layers,
                heads: c.heads,
                mlp_hidden: c.mlp_hidden,
                embed_dim: c.embed_dim,
                activation: c.activation,
                layer_norm_eps: c.layer_norm_eps,
                eot_token_id: c.eot_token_id,
            };
        }
        let a = Arch::from_config(&c);
        Recorded {
            checkpoint: c.checkpoint,
            vocab_size: Some(a.vocab_size),
            context_length: Some(a.context_length),
            width: Some(a.width),
            layers: Some(a.layers),
            heads: Some(a.heads),
            mlp_hidden: Some(a.mlp_hidden),
            embed_dim: Some(a.embed_dim),
            activation: Some(a.activation),
            layer_norm_eps: Some(a.layer_norm_eps),
            eot_token_id: c.eot_token_id,
        }
    }
}

/// The resolved architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    pub vocab_size: usize,
    pub context_length: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_hidden: usize,
    pub embed_dim: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
    pub eot_token_id: Option<u32>,
}

impl Arch {
    fn from_config(c: &Config) -> Arch {
        let width = c.width.unwrap_or(512);
        Arch {
            vocab_size: c.vocab_size.unwrap_or(49408),
            context_length: c.context_length.unwrap_or(77),
            width,
            layers: c.layers.unwrap_or(12),
            heads: c.heads.unwrap_or(8),
            mlp_hidden: c.mlp_hidden.unwrap_or(4 * width),
            embed_dim: c.embed_dim.unwrap_or(512),
            activation: c.activation.unwrap_or(Activation::QuickGelu),
            layer_norm_eps: c.layer_norm_eps.unwrap_or(1e-5),
            eot_token_id: c.eot_token_id,
        }
    }

    fn from_checkpoint(c: &Config, src: &Source) -> Result<Arch> {
        let r = &src.reader;
        let cfg = src.config.as_ref();
        let (tok, pos, proj, blocks, probe, fc1) = match src.layout {
            Layout::HuggingFace => (
                "text_model.embeddings.token_embedding.weight",
                "text_model.embeddings.position_embedding.weight",
                "text_projection.weight",
                "text_model.encoder.layers.",
                ".layer_norm1.weight",
                "text_model.encoder.layers.0.mlp.fc1.weight",
            ),
            Layout::OpenClip => (
                "token_embedding.weight",
                "positional_embedding",
                "text_projection",
                "transformer.resblocks.",
                ".ln_1.weight",
                "transformer.resblocks.0.mlp.c_fc.weight",
            ),
        };
        let shape = |n: &str| {
            r.shape(n).map(<[usize]>::to_vec).ok_or_else(|| Error::new(format!("{}: no tensor `{n}`", r.path())))
        };
        let t = shape(tok)?;
        let (vocab, width) = (t[0], t[1]);
        let context = shape(pos)?[0];
        let embed_dim = match src.layout {
            Layout::HuggingFace => shape(proj)?[0],
            Layout::OpenClip => shape(proj)?[1],
        };
        let layers = count_blocks(r, blocks, probe);
        let mlp = shape(fc1)?[0];
        let explicit = Explicit { heads: c.heads, activation: c.activation, layer_norm_eps: c.layer_norm_eps };
        let open_clip_heads = json_usize(cfg, &["text_cfg", "heads"]);
        let (heads, activation, eps) = tower_settings(src, "text_config", open_clip_heads, width, explicit)?;
        // transformers pools at the first end-of-text token unless eos_token_id is 2 (old
        // configs), where it takes the row's highest id; open_clip always takes the highest id.
        let eot = match src.layout {
            Layout::HuggingFace => json_usize(cfg, &["text_config", "eos_token_id"])
                .map(|e| e as u32)
                .filter(|&e| e != 2)
                .or(c.eot_token_id),
            Layout::OpenClip => c.eot_token_id,
        };
        Ok(Arch {
            vocab_size: agree("vocab_size", c.vocab_size, vocab)?,
            context_length: agree("context_length", c.context_length, context)?,
            width: agree("width", c.width, width)?,
            layers: agree("layers", c.layers, layers)?,
            heads: agree("heads", c.heads, heads)?,
            mlp_hidden: agree("mlp_hidden", c.mlp_hidden, mlp)?,
            embed_dim: agree("embed_dim", c.embed_dim, embed_dim)?,
            activation: agree("activation", c.activation, activation)?,
            layer_norm_eps: eps,
            eot_token_id: eot,
        })
    }
}

pub struct ClipText {
    cfg: Arch,
    token_embedding: Tensor,
    positional_embedding: Tensor,
    transformer: Transformer,
    ln_final: LayerNorm,
    projection: Site,
}

impl Encoder for ClipText {
    type Config = Config;

    fn create(host: &Host, config: Config) -> Result<Self> {
        let source = config.checkpoint.as_deref().map(|p| open(host, p)).transpose()?;
        let cfg = match &source {
            Some(src) => Arch::from_checkpoint(&config, src)?,
            None => Arch::from_config(&config),
        };
        recall_clip_common::require_positive(&[
            ("vocab_size", cfg.vocab_size),
            ("width", cfg.width),
            ("layers", cfg.layers),
            ("heads", cfg.heads),
            ("mlp_hidden", cfg.mlp_hidden),
            ("embed_dim", cfg.embed_dim),
        ])?;
        if cfg.heads == 0 || !cfg.width.is_multiple_of(cfg.heads) {
            return Err(Error::config("heads", format!("width {} is not divisible by heads {}", cfg.width, cfg.heads)));
        }
        if cfg.context_length == 0 {
            return Err(Error::config("context_length", "context_length must be at least 1"));
        }
        let w = cfg.width;
        let tcfg = TransformerConfig {
            width: w,
            layers: cfg.layers,
            heads: cfg.heads,
            mlp_hidden: cfg.mlp_hidden,
            activation: cfg.activation,
            layer_norm_eps: cfg.layer_norm_eps,
        };
        let tower = ClipText {
            token_embedding: host.param("token_embedding", &[cfg.vocab_size, w], ParamInit::normal(0.0, 0.02), true)?,
            positional_embedding: host.param(
                "positional_embedding",
                &[cfg.context_length, w],
                ParamInit::normal(0.0, 0.01),
                true,
            )?,
            transformer: Transformer::new(host, "blocks", &tcfg)?,
            ln_final: LayerNorm::new(host, "ln_final", w, cfg.layer_norm_eps)?,
            projection: host.declare_linear(
                "text_projection",
                w,
                cfg.embed_dim,
                false,
                ParamInit::normal(0.0, (w as f64).powf(-0.5)),
                ParamInit::zeros(),
            )?,
            cfg,
        };
        if let Some(src) = source {
            tower.load(host, src)?;
        }
        Ok(tower)
    }

    fn spec(&self) -> EncoderSpec {
        EncoderSpec {
            modality: modality::TEXT,
            embed_dim: self.cfg.embed_dim as u64,
            input_size: self.cfg.context_length as u64,
        }
    }

    fn forward(&self, host: &Host, inputs: &[NamedTensor]) -> Result<Tensor> {
        let ids = host.input(inputs, inputs::INPUT_IDS)?;
        let shape = ids.shape()?;
        if shape.len() != 2 || shape[1] == 0 || shape[1] > self.cfg.context_length {
            bail!("clip-text expects input_ids [B, L] with 1 <= L <= {}, got {shape:?}", self.cfg.context_length);
        }
        let (b, l) = (shape[0], shape[1]);
        let w = self.cfg.width;
        let id_values = ids.to_vec_u32()?;
        if let Some(bad) = id_values.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            bail!("token id {bad} is outside the vocabulary of {} ids", self.cfg.vocab_size);
        }
        let x = self.token_embedding.embedding(&ids)?.add(&self.positional_embedding.narrow(0, 0, l)?)?;
        let x = self.transformer.forward(host, &x, true, None)?;
        let x = self.ln_final.forward(&x)?;
        // Row-major index of each row's pooling position in the flattened [B*L, W] features.
        let rows: Vec<u32> = id_values
            .chunks(l)
            .enumerate()
            .map(|(row, ids)| (row * l) as u32 + pool_position(ids, self.cfg.eot_token_id) as u32)
            .collect();
        let index = host.tensor_u32(&rows, &[b])?;
        let pooled = x.reshape(&[(b * l) as i64, w as i64])?.index_select(&index, 0)?;
        host.linear(self.projection, &pooled)
    }
}

impl ClipText {
    /// Copy the checkpoint's text tensors into this tower's parameters.
    fn load(&self, host: &Host, src: Source) -> Result<()> {
        let a = &self.cfg;
        let w = a.width;
        let mut reader = src.reader;
        let r = &mut reader;
        let (tok, pos, blocks, ln, proj, proj_t) = match src.layout {
            Layout::HuggingFace => (
                "text_model.embeddings.token_embedding.weight",
                "text_model.embeddings.position_embedding.weight",
                "text_model.encoder.layers.",
                "text_model.final_layer_norm",
                "text_projection.weight",
                false,
            ),
            Layout::OpenClip => (
                "token_embedding.weight",
                "positional_embedding",
                "transformer.resblocks.",
                "ln_final",
                "text_projection",
                true,
            ),
        };
        load(host, r, "token_embedding", tok, &[a.vocab_size, w], false)?;
        load(host, r, "positional_embedding", pos, &[a.context_length, w], false)?;
        for i in 0..a.layers {
            load_block(host, r, src.layout, &format!("blocks.{i}"), &format!("{blocks}{i}"), w, a.mlp_hidden)?;
        }
        load(host, r, "ln_final.weight", &format!("{ln}.weight"), &[w], false)?;
        load(host, r, "ln_final.bias", &format!("{ln}.bias"), &[w], false)?;
        load(host, r, "text_projection.weight", proj, &[a.embed_dim, w], proj_t)?;
        r.skip("text_model.embeddings.position_ids");
        let prefixes: &[&str] = match src.layout {
            Layout::HuggingFace => &["text_model.", "text_projection"],
            Layout::OpenClip => {
                &["token_embedding", "positional_embedding", "transformer.", "ln_final", "text_projection"]
            }
        };
        reader.finish(prefixes)
    }
}

/// The pooling position of one row: the first `eot` if given and present, else the first
/// position of the row's maximum id (OpenAI CLIP's `argmax`).
fn pool_position(ids: &[u32], eot: Option<u32>) -> usize {
    if let Some(pos) = eot.and_then(|e| ids.iter().position(|&i| i == e)) {
        return pos;
    }
    let max = ids.iter().copied().max().unwrap_or(0);
    ids.iter().position(|&i| i == max).unwrap_or(0)
}

recall_sdk::export_plugin! {
    name: "clip-text",
    description: "CLIP text transformer: token and positional embeddings, causal pre-LN blocks, pooling at end-of-text, projection",
    encoder: ClipText,
}

#[cfg(test)]
mod tests {
    use super::pool_position;

    #[test]
    fn pools_at_first_maximum_or_eot() {
        assert_eq!(pool_position(&[49406, 320, 49407, 0, 0], None), 2);
        assert_eq!(pool_position(&[101, 7, 102, 0], Some(102)), 2);
        assert_eq!(pool_position(&[5, 9, 9], None), 1);
    }
}
