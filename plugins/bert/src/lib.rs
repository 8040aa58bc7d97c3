//! `bert`: a BERT-family text encoder loading sentence-transformers / transformers checkpoints
//! (e.g. all-MiniLM-L6-v2), with sentence-transformers semantics: post-LN transformer with a
//! padding mask, mean pooling over the attention mask (or the [CLS] token), L2 normalisation,
//! and an optional trainable projection to the joint embedding width so a pretrained text
//! tower can pair with a vision tower.

use std::path::PathBuf;

use recall_sdk::checkpoint::CheckpointReader;
use recall_sdk::nn::{Activation, LayerNorm, Mlp, SelfAttention};
use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A directory with `model.safetensors` and `config.json` (a BertModel).
    pub checkpoint: String,
    /// `mean` or `cls`; default: the directory's `1_Pooling/config.json`, else `mean`.
    pub pooling: Option<String>,
    /// L2-normalise the output (sentence-transformers' Normalize module).
    #[serde(default = "yes")]
    pub normalize: bool,
    /// Add a trainable linear projection to this width after pooling.
    pub projection_dim: Option<usize>,
    /// Tokens per row the host should feed; default 128 (at most max_position_embeddings).
    pub context_length: Option<usize>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pooling {
    Mean,
    Cls,
}

struct Layer {
    attn: SelfAttention,
    ln_1: LayerNorm,
    mlp: Mlp,
    ln_2: LayerNorm,
}

pub struct Bert {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_ln: LayerNorm,
    layers: Vec<Layer>,
    projection: Option<Site>,
    pooling: Pooling,
    normalize: bool,
    width: usize,
    out_dim: usize,
    context_length: usize,
}

fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::config("checkpoint", format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Error::new(format!("{} is not valid JSON: {e}", path.display())))
}

fn num(cfg: &serde_json::Value, key: &str) -> Result<usize> {
    cfg.get(key)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| Error::new(format!("config.json has no `{key}`")))
}

impl Encoder for Bert {
    type Config = Config;

    fn create(host: &Host, cfg: Config) -> Result<Self> {
        let dir = PathBuf::from(&cfg.checkpoint);
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(Error::config("checkpoint", format!("no model.safetensors in `{}`", cfg.checkpoint)));
        }
        let bc = read_json(&dir.join("config.json"))?;
        let (vocab, width, layers, heads, mlp, max_pos) = (
            num(&bc, "vocab_size")?,
            num(&bc, "hidden_size")?,
            num(&bc, "num_hidden_layers")?,
            num(&bc, "num_attention_heads")?,
            num(&bc, "intermediate_size")?,
            num(&bc, "max_position_embeddings")?,
        );
        let types = num(&bc, "type_vocab_size").unwrap_or(2);
        let eps = bc.get("layer_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-12);
        let activation = match bc.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("gelu") {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => return Err(Error::new(format!("unsupported hidden_act `{other}`"))),
        };
        let pooling = match cfg.pooling.as_deref() {
            Some("mean") => Pooling::Mean,
            Some("cls") => Pooling::Cls,
            Some(other) => {
                return Err(Error::config("pooling", format!("unknown pooling `{other}`; expected mean or cls")))
            }
            None => match read_json(&dir.join("1_Pooling/config.json")) {
                Ok(p) if p.get("pooling_mode_cls_token").and_then(|v| v.as_bool()) == Some(true) => Pooling::Cls,
                _ => Pooling::Mean,
            },
        };
        let context_length = cfg.context_length.unwrap_or(128.min(max_pos));
        if context_length == 0 || context_length > max_pos {
            return Err(Error::config("context_length", format!("context_length must be in 1..={max_pos}")));
        }
        let std = 0.02;
        let layer_list = (0..layers)
            .map(|i| {
                Ok(Layer {
                    attn: SelfAttention::new(host, &format!("layers.{i}.attn"), width, heads, std, std)?,
                    ln_1: LayerNorm::new(host, &format!("layers.{i}.ln_1"), width, eps)?,
                    mlp: Mlp::new(host, &format!("layers.{i}.mlp"), width, mlp, activation, std, std)?,
                    ln_2: LayerNorm::new(host, &format!("layers.{i}.ln_2"), width, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let projection = cfg
            .projection_dim
            .map(|d| {
                host.declare_linear(
                    "projection",
                    width,
                    d,
                    false,
                    ParamInit::normal(0.0, (width as f64).powf(-0.5)),
                    ParamInit::zeros(),
                )
            })
            .transpose()?;
        let bert = Bert {
            word_embeddings: host.param("word_embeddings", &[vocab, width], ParamInit::normal(0.0, std), true)?,
            position_embeddings: host.param(
                "position_embeddings",
                &[max_pos, width],
                ParamInit::normal(0.0, std),
                true,
            )?,
            token_type_embeddings: host.param(
                "token_type_embeddings",
                &[types, width],
                ParamInit::normal(0.0, std),
                true,
            )?,
            embeddings_ln: LayerNorm::new(host, "embeddings_ln", width, eps)?,
            layers: layer_list,
            projection,
            pooling,
            normalize: cfg.normalize,
            width,
            out_dim: cfg.projection_dim.unwrap_or(width),
            context_length,
        };
        bert.load(host, &weights.to_string_lossy(), vocab, max_pos, types, mlp, layers)?;
        Ok(bert)
    }

    fn spec(&self) -> EncoderSpec {
        EncoderSpec { modality: modality::TEXT, embed_dim: self.out_dim as u64, input_size: self.context_length as u64 }
    }

    fn forward(&self, host: &Host, inputs: &[NamedTensor]) -> Result<Tensor> {
        let ids = host.input(inputs, inputs::INPUT_IDS)?;
        let mask = host.input(inputs, inputs::ATTENTION_MASK)?;
        let shape = ids.shape()?;
        if shape.len() != 2 || shape[1] == 0 || shape[1] > self.position_embeddings.dim(0)? {
            bail!("bert expects input_ids [B, L] with L <= {}, got {shape:?}", self.position_embeddings.dim(0)?);
        }
        let (b, l) = (shape[0], shape[1]);
        let w = self.width;
        let x = self
            .word_embeddings
            .embedding(&ids)?
            .add(&self.position_embeddings.narrow(0, 0, l)?)?
            .add(&self.token_type_embeddings.narrow(0, 0, 1)?)?;
        let mut x = self.embeddings_ln.forward(&x)?;
        for layer in &self.layers {
            let a = layer.attn.forward(host, &x, false, Some(&mask))?;
            x = layer.ln_1.forward(&x.add(&a)?)?;
            let m = layer.mlp.forward(host, &x)?;
            x = layer.ln_2.forward(&x.add(&m)?)?;
        }
        let pooled = match self.pooling {
            Pooling::Cls => x.narrow(1, 0, 1)?.reshape(&[b as i64, w as i64])?,
            Pooling::Mean => {
                let m = mask.to_dtype(x.dtype()?)?.reshape(&[b as i64, l as i64, 1])?;
                let summed = x.mul(&m)?.sum(&[1], false)?;
                let count = m.sum(&[1], false)?.clamp(1e-9, f64::MAX)?;
                summed.div(&count)?
            }
        };
        let out = match self.projection {
            Some(site) => host.linear(site, &pooled)?,
            None => pooled,
        };
        if self.normalize {
            out.l2_normalize(1e-12)
        } else {
            Ok(out)
        }
    }
}

impl Bert {
    /// Map a transformers BertModel's tensors (with or without the `bert.` prefix).
    #[allow(clippy::too_many_arguments)]
    fn load(
        &self,
        host: &Host,
        path: &str,
        vocab: usize,
        max_pos: usize,
        types: usize,
        mlp: usize,
        layers: usize,
    ) -> Result<()> {
        let mut r = CheckpointReader::open(host, path)?;
        let prefix = if r.has("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
        let w = self.width;
        let put = |own: &str, ext: &str, shape: &[usize], r: &mut CheckpointReader| -> Result<()> {
            if let Some(t) = r.take(&format!("{prefix}{ext}"), shape)? {
                let p = host.param(own, shape, ParamInit::zeros(), true)?;
                host.param_assign(&p, &t)?;
            }
            Ok(())
        };
        put("word_embeddings", "embeddings.word_embeddings.weight", &[vocab, w], &mut r)?;
        put("position_embeddings", "embeddings.position_embeddings.weight", &[max_pos, w], &mut r)?;
        put("token_type_embeddings", "embeddings.token_type_embeddings.weight", &[types, w], &mut r)?;
        put("embeddings_ln.weight", "embeddings.LayerNorm.weight", &[w], &mut r)?;
        put("embeddings_ln.bias", "embeddings.LayerNorm.bias", &[w], &mut r)?;
        for i in 0..layers {
            let e = format!("encoder.layer.{i}");
            let o = format!("layers.{i}");
            for (own, ext) in [
                ("q_proj", "attention.self.query"),
                ("k_proj", "attention.self.key"),
                ("v_proj", "attention.self.value"),
                ("out_proj", "attention.output.dense"),
            ] {
                put(&format!("{o}.attn.{own}.weight"), &format!("{e}.{ext}.weight"), &[w, w], &mut r)?;
                put(&format!("{o}.attn.{own}.bias"), &format!("{e}.{ext}.bias"), &[w], &mut r)?;
            }
            for (own, ext) in [("ln_1", "attention.output.LayerNorm"), ("ln_2", "output.LayerNorm")] {
                put(&format!("{o}.{own}.weight"), &format!("{e}.{ext}.weight"), &[w], &mut r)?;
                put(&format!("{o}.{own}.bias"), &format!("{e}.{ext}.bias"), &[w], &mut r)?;
            }
            put(&format!("{o}.mlp.fc1.weight"), &format!("{e}.intermediate.dense.weight"), &[mlp, w], &mut r)?;
            put(&format!("{o}.mlp.fc1.bias"), &format!("{e}.intermediate.dense.bias"), &[mlp], &mut r)?;
            put(&format!("{o}.mlp.fc2.weight"), &format!("{e}.output.dense.weight"), &[w, mlp], &mut r)?;
            put(&format!("{o}.mlp.fc2.bias"), &format!("{e}.output.dense.bias"), &[w], &mut r)?;
        }
        // Buffers and the unused next-sentence pooler.
        for extra in ["embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"] {
            r.skip(&format!("{prefix}{extra}"));
        }
        r.finish(&[&format!("{prefix}embeddings."), &format!("{prefix}encoder."), &format!("{prefix}pooler.")])
    }
}

recall_sdk::export_plugin! {
    name: "bert",
    description: "BERT-family text encoder (sentence-transformers semantics: mean pooling, L2 norm), optional projection",
    encoder: Bert,
}
