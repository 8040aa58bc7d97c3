//! `toklip-encoder`: TokLIP's token encoder (REFERENCES.md) as a Recall image encoder.
//!
//! Discrete image tokens arrive as their code embeddings `code_embeddings [B, N, C]` (the
//! model's `image_tokenizer` makes them from pixels) -> MLP `Linear(C -> 4D) -> GELU ->
//! Linear(4D -> D)` -> + positional embeddings -> ln_pre -> pre-LN transformer blocks under a
//! **causal** mask -> ln_post -> projection. Under the causal mask token `i` sees tokens
//! `0..=i` only, so the last token summarises the image: `pooling = "last"` (the default)
//! returns its features `[B, E]`; `pooling = "all"` returns every token's `[B, N, E]` (for
//! token-level distillation and for checking the mask).
//!
//! `init_from` initialises the encoder from a trained `clip-vision` checkpoint (a Recall
//! `task-NN.safetensors`): every tensor whose name (under `init_prefix`, default `vision.`) and
//! shape match is copied — blocks, layer norms, projection, and positional embeddings when the
//! token count matches; the MLP is new. What was copied and skipped is logged.

use recall_sdk::nn::{Activation, LayerNorm, Transformer, TransformerConfig};
use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Tokens per image (e.g. 16 for a 4x4 code grid).
    pub tokens: usize,
    /// Width of a code embedding (LlamaGen VQ-16: 8).
    #[serde(default = "d::code_dim")]
    pub code_dim: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    /// Output (joint embedding) width.
    pub embed_dim: usize,
    /// Hidden width of the blocks' MLP; default 4x width.
    pub mlp_hidden: Option<usize>,
    #[serde(default = "d::activation")]
    pub activation: Activation,
    #[serde(default = "d::eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pooling: Pooling,
    /// A Recall checkpoint of a clip-vision tower to initialise from where shapes allow.
    pub init_from: Option<String>,
    #[serde(default = "d::prefix")]
    pub init_prefix: String,
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    #[default]
    Last,
    All,
}

mod d {
    use recall_sdk::nn::Activation;
    pub fn code_dim() -> usize {
        8
    }
    pub fn activation() -> Activation {
        Activation::QuickGelu
    }
    pub fn eps() -> f64 {
        1e-5
    }
    pub fn prefix() -> String {
        "vision.".into()
    }
}

pub struct TokenEncoder {
    cfg: Config,
    mlp_in: Site,
    mlp_out: Site,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    transformer: Transformer,
    ln_post: LayerNorm,
    proj: Site,
    /// Every parameter this encoder made: (name in its scope, shape).
    names: Vec<(String, Vec<usize>)>,
}

impl Encoder for TokenEncoder {
    type Config = Config;

    fn create(host: &Host, cfg: Config) -> Result<Self> {
        for (key, v) in
            [("tokens", cfg.tokens), ("code_dim", cfg.code_dim), ("width", cfg.width), ("layers", cfg.layers)]
        {
            if v == 0 {
                return Err(Error::config(key, format!("{key} must be at least 1")));
            }
        }
        if cfg.heads == 0 || !cfg.width.is_multiple_of(cfg.heads) {
            return Err(Error::config("heads", format!("width {} is not divisible by heads {}", cfg.width, cfg.heads)));
        }
        let (w, c) = (cfg.width, cfg.code_dim);
        let mlp_hidden = cfg.mlp_hidden.unwrap_or(4 * w);
        let scale = (w as f64).powf(-0.5);
        let tcfg = TransformerConfig {
            width: w,
            layers: cfg.layers,
            heads: cfg.heads,
            mlp_hidden,
            activation: cfg.activation,
            layer_norm_eps: cfg.layer_norm_eps,
        };
        let linear = |name: &str, i: usize, o: usize, bias: bool| {
            host.declare_linear(name, i, o, bias, ParamInit::normal(0.0, (i as f64).powf(-0.5)), ParamInit::zeros())
        };
        let mut names = vec![
            ("mlp_in.weight".to_string(), vec![4 * w, c]),
            ("mlp_in.bias".into(), vec![4 * w]),
            ("mlp_out.weight".into(), vec![w, 4 * w]),
            ("mlp_out.bias".into(), vec![w]),
            ("positional_embedding".into(), vec![cfg.tokens, w]),
            ("proj.weight".into(), vec![cfg.embed_dim, w]),
        ];
        for ln in ["ln_pre", "ln_post"] {
            names.push((format!("{ln}.weight"), vec![w]));
            names.push((format!("{ln}.bias"), vec![w]));
        }
        for i in 0..cfg.layers {
            let b = format!("blocks.{i}");
            for ln in ["ln_1", "ln_2"] {
                names.push((format!("{b}.{ln}.weight"), vec![w]));
                names.push((format!("{b}.{ln}.bias"), vec![w]));
            }
            for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                names.push((format!("{b}.attn.{p}.weight"), vec![w, w]));
                names.push((format!("{b}.attn.{p}.bias"), vec![w]));
            }
            names.push((format!("{b}.mlp.fc1.weight"), vec![mlp_hidden, w]));
            names.push((format!("{b}.mlp.fc1.bias"), vec![mlp_hidden]));
            names.push((format!("{b}.mlp.fc2.weight"), vec![w, mlp_hidden]));
            names.push((format!("{b}.mlp.fc2.bias"), vec![w]));
        }
        let enc = TokenEncoder {
            mlp_in: linear("mlp_in", c, 4 * w, true)?,
            mlp_out: linear("mlp_out", 4 * w, w, true)?,
            positional_embedding: host.param(
                "positional_embedding",
                &[cfg.tokens, w],
                ParamInit::normal(0.0, scale),
                true,
            )?,
            ln_pre: LayerNorm::new(host, "ln_pre", w, cfg.layer_norm_eps)?,
            transformer: Transformer::new(host, "blocks", &tcfg)?,
            ln_post: LayerNorm::new(host, "ln_post", w, cfg.layer_norm_eps)?,
            proj: host.declare_linear(
                "proj",
                w,
                cfg.embed_dim,
                false,
                ParamInit::normal(0.0, scale),
                ParamInit::zeros(),
            )?,
            names,
            cfg,
        };
        if let Some(path) = enc.cfg.init_from.clone() {
            enc.init_from(host, &path)?;
        }
        Ok(enc)
    }

    fn spec(&self) -> EncoderSpec {
        EncoderSpec {
            modality: modality::IMAGE,
            embed_dim: self.cfg.embed_dim as u64,
            input_size: self.cfg.tokens as u64,
        }
    }

    fn forward(&self, host: &Host, inputs: &[NamedTensor]) -> Result<Tensor> {
        let Some(codes) = host.find_input(inputs, inputs::CODE_EMBEDDINGS)? else {
            bail!(
                "toklip-encoder reads `code_embeddings` [B, {}, {}]: give the model an `image_tokenizer` (e.g. \
                 vq-tokenizer) that turns pixels into image tokens",
                self.cfg.tokens,
                self.cfg.code_dim
            );
        };
        let shape = codes.shape()?;
        if shape.len() != 3 || shape[1] != self.cfg.tokens || shape[2] != self.cfg.code_dim {
            bail!(
                "toklip-encoder expects code_embeddings [B, {}, {}], got {shape:?}; set `tokens` and `code_dim` to the \
                 image tokenizer's grid and code width",
                self.cfg.tokens,
                self.cfg.code_dim
            );
        }
        let (b, n, w) = (shape[0], self.cfg.tokens, self.cfg.width);
        let x = host.linear(self.mlp_out, &host.linear(self.mlp_in, &codes)?.gelu()?)?;
        let x = self.ln_pre.forward(&x.add(&self.positional_embedding)?)?;
        let x = self.transformer.forward(host, &x, true, None)?;
        // Layer norm is per token: normalising every token serves both pooling and the side
        // output of every token's features (TokLIP's token-level distillation, no projection).
        let tokens = self.ln_post.forward(&x)?;
        host.emit("tokens", &tokens)?;
        match self.cfg.pooling {
            Pooling::Last => host.linear(self.proj, &tokens.narrow(1, n - 1, 1)?.reshape(&[b as i64, w as i64])?),
            Pooling::All => host.linear(self.proj, &tokens),
        }
    }
}

impl TokenEncoder {
    /// Copy every tensor of `path` whose name (under the prefix) and shape match ours.
    fn init_from(&self, host: &Host, path: &str) -> Result<()> {
        let index = host.checkpoint_index(path).map_err(|e| Error::config("init_from", e.message()))?;
        let (mut copied, mut skipped) = (Vec::new(), Vec::new());
        for (name, shape) in &self.names {
            let full = format!("{}{name}", self.cfg.init_prefix);
            match index.iter().find(|(n, _)| *n == full) {
                Some((_, s)) if s == shape => {
                    let value = host.checkpoint_tensor(path, &full)?;
                    let param = host.param(name, shape, ParamInit::zeros(), true)?;
                    host.param_assign(&param, &value)?;
                    copied.push(name.clone());
                }
                Some((_, s)) => skipped.push(format!("{name} (checkpoint {s:?}, here {shape:?})")),
                None => skipped.push(format!("{name} (absent)")),
            }
        }
        if copied.is_empty() {
            return Err(Error::config(
                "init_from",
                format!(
                    "{path} has no tensor under `{}` with a name and shape this encoder takes; is it a clip-vision \
                     checkpoint, and is `init_prefix` right?",
                    self.cfg.init_prefix
                ),
            ));
        }
        host.log(
            recall_sdk::LogLevel::Info,
            &format!(
                "initialised {} tensors from {path}; kept {}: {}",
                copied.len(),
                skipped.len(),
                skipped.join(", ")
            ),
        );
        Ok(())
    }
}

recall_sdk::export_plugin! {
    name: "toklip-encoder",
    description: "TokLIP token encoder: code embeddings -> MLP -> causal ViT blocks -> last-token features",
    encoder: TokenEncoder,
}
