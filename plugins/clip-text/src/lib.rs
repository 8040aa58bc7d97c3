//! `clip-text`: the CLIP text transformer as a Recall encoder plugin.
//!
//! token ids -> token embedding + positional embedding -> causal pre-LN transformer ->
//! ln_final -> the features at the end-of-text token (the highest id in CLIP's vocabulary, so
//! the position of the row's maximum id, as in OpenAI CLIP) -> text projection.

use recall_sdk::nn::{Activation, LayerNorm, Transformer, TransformerConfig};
use recall_sdk::prelude::*;
use serde::Deserialize;

/// Architecture of the text tower. Defaults are OpenAI CLIP's.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "d::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "d::context_length")]
    pub context_length: usize,
    #[serde(default = "d::width")]
    pub width: usize,
    #[serde(default = "d::layers")]
    pub layers: usize,
    #[serde(default = "d::heads")]
    pub heads: usize,
    #[serde(default)]
    pub mlp_hidden: Option<usize>,
    #[serde(default = "d::embed_dim")]
    pub embed_dim: usize,
    #[serde(default = "d::activation")]
    pub activation: Activation,
    #[serde(default = "d::eps")]
    pub layer_norm_eps: f64,
    /// Pool at the first occurrence of this id instead of at the row's highest id.
    #[serde(default)]
    pub eot_token_id: Option<u32>,
}

mod d {
    use super::Activation;
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn context_length() -> usize {
        77
    }
    pub fn width() -> usize {
        512
    }
    pub fn layers() -> usize {
        12
    }
    pub fn heads() -> usize {
        8
    }
    pub fn embed_dim() -> usize {
        512
    }
    pub fn activation() -> Activation {
        Activation::QuickGelu
    }
    pub fn eps() -> f64 {
        1e-5
    }
}

pub struct ClipText {
    cfg: Config,
    token_embedding: Tensor,
    positional_embedding: Tensor,
    transformer: Transformer,
    ln_final: LayerNorm,
    projection: Site,
}

impl Encoder for ClipText {
    type Config = Config;

    fn create(host: &Host, cfg: Config) -> Result<Self> {
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
            mlp_hidden: cfg.mlp_hidden.unwrap_or(4 * w),
            activation: cfg.activation,
            layer_norm_eps: cfg.layer_norm_eps,
        };
        Ok(ClipText {
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
        })
    }

    fn spec(&self) -> EncoderSpec {
        EncoderSpec {
            modality: modality::TEXT,
            embed_dim: self.cfg.embed_dim as u64,
            input_size: self.cfg.context_length as u64,
        }
    }

    fn forward(&self, host: &Host, inputs: &[NamedTensor]) -> Result<Tensor> {
        let ids = host.input(inputs, "input_ids")?;
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
