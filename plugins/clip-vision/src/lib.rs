//! `clip-vision`: the CLIP vision transformer (ViT) as a Recall encoder plugin.
//!
//! pixels -> patch embedding (stride-P convolution, no bias) -> [class token; patches] +
//! positional embeddings -> ln_pre -> pre-LN transformer blocks -> ln_post on the class token
//! -> projection. Every linear layer (q/k/v/out, MLP, projection) is an adapter site.

use recall_clip_common::{
    agree, count_blocks, json_usize, load, load_block, open, tower_settings, Explicit, Layout, Source,
};
use recall_sdk::nn::{Activation, LayerNorm, Transformer, TransformerConfig};
use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

/// The vision tower's config. With `checkpoint`, the architecture comes from the checkpoint
/// (and its config.json / open_clip_config.json); keys given as well must agree with it.
/// Without, unset keys take ViT-B/32 (224 px) defaults.
#[derive(Deserialize, Serialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields, into = "Recorded")]
pub struct Config {
    /// A transformers CLIPModel directory or an OpenAI/open_clip safetensors file.
    pub checkpoint: Option<String>,
    pub image_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub width: Option<usize>,
    pub layers: Option<usize>,
    pub heads: Option<usize>,
    /// Hidden width of the MLP; default 4x width.
    pub mlp_hidden: Option<usize>,
    /// Output (joint embedding) width.
    pub embed_dim: Option<usize>,
    pub activation: Option<Activation>,
    pub layer_norm_eps: Option<f64>,
}

/// How a config is recorded (config.resolved.toml): without a checkpoint, every unset key as
/// the defaults resolve it (what the run uses); with one, the keys as written (the
/// architecture is the checkpoint's).
#[derive(Serialize)]
struct Recorded {
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_size: Option<usize>,
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
}

impl From<Config> for Recorded {
    fn from(c: Config) -> Self {
        if c.checkpoint.is_some() {
            return Recorded {
                checkpoint: c.checkpoint,
                image_size: c.image_size,
                patch_size: c.patch_size,
                width: c.width,
                layers: c.layers,
                heads: c.heads,
                mlp_hidden: c.mlp_hidden,
                embed_dim: c.embed_dim,
                activation: c.activation,
                layer_norm_eps: c.layer_norm_eps,
            };
        }
        let a = Arch::from_config(&c);
        Recorded {
            checkpoint: c.checkpoint,
            image_size: Some(a.image_size),
            patch_size: Some(a.patch_size),
            width: Some(a.width),
            layers: Some(a.layers),
            heads: Some(a.heads),
            mlp_hidden: Some(a.mlp_hidden),
            embed_dim: Some(a.embed_dim),
            activation: Some(a.activation),
            layer_norm_eps: Some(a.layer_norm_eps),
        }
    }
}

/// The resolved architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_hidden: usize,
    pub embed_dim: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
}

impl Arch {
    fn from_config(c: &Config) -> Arch {
        let width = c.width.unwrap_or(768);
        Arch {
            image_size: c.image_size.unwrap_or(224),
            patch_size: c.patch_size.unwrap_or(32),
            width,
            layers: c.layers.unwrap_or(12),
            heads: c.heads.unwrap_or(12),
            mlp_hidden: c.mlp_hidden.unwrap_or(4 * width),
            embed_dim: c.embed_dim.unwrap_or(512),
            activation: c.activation.unwrap_or(Activation::QuickGelu),
            layer_norm_eps: c.layer_norm_eps.unwrap_or(1e-5),
        }
    }

    /// The architecture a checkpoint describes, checked against explicit keys.
    fn from_checkpoint(c: &Config, src: &Source) -> Result<Arch> {
        let r = &src.reader;
        let cfg = src.config.as_ref();
        let (patch_w, pos, proj, blocks, probe, fc1) = match src.layout {
            Layout::HuggingFace => (
                "vision_model.embeddings.patch_embedding.weight",
                "vision_model.embeddings.position_embedding.weight",
                "visual_projection.weight",
                "vision_model.encoder.layers.",
                ".layer_norm1.weight",
                "vision_model.encoder.layers.0.mlp.fc1.weight",
            ),
            Layout::OpenClip => (
                "visual.conv1.weight",
                "visual.positional_embedding",
                "visual.proj",
                "visual.transformer.resblocks.",
                ".ln_1.weight",
                "visual.transformer.resblocks.0.mlp.c_fc.weight",
            ),
        };
        let shape = |n: &str| {
            r.shape(n).map(<[usize]>::to_vec).ok_or_else(|| Error::new(format!("{}: no tensor `{n}`", r.path())))
        };
        let pw = shape(patch_w)?;
        let (width, patch) = (pw[0], pw[2]);
        let n_pos = shape(pos)?[0];
        let grid = ((n_pos.saturating_sub(1)) as f64).sqrt().round() as usize;
        let embed_dim = match src.layout {
            Layout::HuggingFace => shape(proj)?[0],
            Layout::OpenClip => shape(proj)?[1],
        };
        let layers = count_blocks(r, blocks, probe);
        let mlp = shape(fc1)?[0];
        let open_clip_heads = json_usize(cfg, &["vision_cfg", "head_width"]).map(|hw| (width / hw.max(1)).max(1));
        let explicit = Explicit { heads: c.heads, activation: c.activation, layer_norm_eps: c.layer_norm_eps };
        let (heads, activation, eps) = tower_settings(src, "vision_config", open_clip_heads, width, explicit)?;
        Ok(Arch {
            image_size: agree("image_size", c.image_size, grid * patch)?,
            patch_size: agree("patch_size", c.patch_size, patch)?,
            width: agree("width", c.width, width)?,
            layers: agree("layers", c.layers, layers)?,
            heads: agree("heads", c.heads, heads)?,
            mlp_hidden: agree("mlp_hidden", c.mlp_hidden, mlp)?,
            embed_dim: agree("embed_dim", c.embed_dim, embed_dim)?,
            activation: agree("activation", c.activation, activation)?,
            layer_norm_eps: eps,
        })
    }
}

pub struct ClipVision {
    cfg: Arch,
    patch_weight: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    transformer: Transformer,
    ln_post: LayerNorm,
    proj: Site,
}

impl Encoder for ClipVision {
    type Config = Config;

    fn create(host: &Host, config: Config) -> Result<Self> {
        let source = config.checkpoint.as_deref().map(|p| open(host, p)).transpose()?;
        let cfg = match &source {
            Some(src) => Arch::from_checkpoint(&config, src)?,
            None => Arch::from_config(&config),
        };
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(Error::config(
                "patch_size",
                format!("image_size {} is not divisible by patch_size {}", cfg.image_size, cfg.patch_size),
            ));
        }
        recall_clip_common::require_positive(&[
            ("image_size", cfg.image_size),
            ("width", cfg.width),
            ("layers", cfg.layers),
            ("heads", cfg.heads),
            ("mlp_hidden", cfg.mlp_hidden),
            ("embed_dim", cfg.embed_dim),
        ])?;
        if cfg.heads == 0 || !cfg.width.is_multiple_of(cfg.heads) {
            return Err(Error::config("heads", format!("width {} is not divisible by heads {}", cfg.width, cfg.heads)));
        }
        let w = cfg.width;
        let n_patches = (cfg.image_size / cfg.patch_size).pow(2);
        let scale = (w as f64).powf(-0.5);
        let tcfg = TransformerConfig {
            width: w,
            layers: cfg.layers,
            heads: cfg.heads,
            mlp_hidden: cfg.mlp_hidden,
            activation: cfg.activation,
            layer_norm_eps: cfg.layer_norm_eps,
        };
        let p = cfg.patch_size;
        let fan_in = (3 * p * p) as f64;
        let tower = ClipVision {
            patch_weight: host.param(
                "patch_embed.weight",
                &[w, 3, p, p],
                ParamInit::normal(0.0, fan_in.powf(-0.5)),
                true,
            )?,
            class_embedding: host.param("class_embedding", &[w], ParamInit::normal(0.0, scale), true)?,
            positional_embedding: host.param(
                "positional_embedding",
                &[n_patches + 1, w],
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
            cfg,
        };
        if let Some(src) = source {
            tower.load(host, src)?;
        }
        Ok(tower)
    }

    fn spec(&self) -> EncoderSpec {
        EncoderSpec {
            modality: modality::IMAGE,
            embed_dim: self.cfg.embed_dim as u64,
            input_size: self.cfg.image_size as u64,
        }
    }

    fn forward(&self, host: &Host, inputs: &[NamedTensor]) -> Result<Tensor> {
        let pixels = host.input(inputs, inputs::PIXEL_VALUES)?;
        let shape = pixels.shape()?;
        let expected = [3, self.cfg.image_size, self.cfg.image_size];
        if shape.len() != 4 || shape[1..] != expected {
            bail!(
                "clip-vision expects pixel_values [B, {}, {}, {}], got {shape:?}",
                expected[0],
                expected[1],
                expected[2]
            );
        }
        let b = shape[0];
        let w = self.cfg.width;
        let patches = pixels.patch_embed(&self.patch_weight, None, self.cfg.patch_size)?;
        let cls = self.class_embedding.reshape(&[1, 1, w as i64])?.broadcast_as(&[b, 1, w])?;
        let x = host.cat(&[&cls, &patches], 1)?.add(&self.positional_embedding)?;
        let x = self.ln_pre.forward(&x)?;
        let x = self.transformer.forward(host, &x, false, None)?;
        let pooled = self.ln_post.forward(&x.narrow(1, 0, 1)?.reshape(&[b as i64, w as i64])?)?;
        // Per-patch features (TokLIP's token-level distillation): after ln_post, no projection.
        let n = (self.cfg.image_size / self.cfg.patch_size).pow(2);
        host.emit("tokens", &self.ln_post.forward(&x.narrow(1, 1, n)?)?)?;
        host.linear(self.proj, &pooled)
    }
}

impl ClipVision {
    /// Copy the checkpoint's vision tensors into this tower's parameters.
    fn load(&self, host: &Host, src: Source) -> Result<()> {
        let a = &self.cfg;
        let (w, p, n_pos) = (a.width, a.patch_size, (a.image_size / a.patch_size).pow(2) + 1);
        let mut reader = src.reader;
        let r = &mut reader;
        match src.layout {
            Layout::HuggingFace => {
                load(
                    host,
                    r,
                    "patch_embed.weight",
                    "vision_model.embeddings.patch_embedding.weight",
                    &[w, 3, p, p],
                    false,
                )?;
                load(host, r, "class_embedding", "vision_model.embeddings.class_embedding", &[w], false)?;
                load(
                    host,
                    r,
                    "positional_embedding",
                    "vision_model.embeddings.position_embedding.weight",
                    &[n_pos, w],
                    false,
                )?;
                for (own, ext) in [("ln_pre", "vision_model.pre_layrnorm"), ("ln_post", "vision_model.post_layernorm")]
                {
                    load(host, r, &format!("{own}.weight"), &format!("{ext}.weight"), &[w], false)?;
                    load(host, r, &format!("{own}.bias"), &format!("{ext}.bias"), &[w], false)?;
                }
                for i in 0..a.layers {
                    let ext = format!("vision_model.encoder.layers.{i}");
                    load_block(host, r, src.layout, &format!("blocks.{i}"), &ext, w, a.mlp_hidden)?;
                }
                load(host, r, "proj.weight", "visual_projection.weight", &[a.embed_dim, w], false)?;
                r.skip("vision_model.embeddings.position_ids");
            }
            Layout::OpenClip => {
                load(host, r, "patch_embed.weight", "visual.conv1.weight", &[w, 3, p, p], false)?;
                load(host, r, "class_embedding", "visual.class_embedding", &[w], false)?;
                load(host, r, "positional_embedding", "visual.positional_embedding", &[n_pos, w], false)?;
                for own in ["ln_pre", "ln_post"] {
                    load(host, r, &format!("{own}.weight"), &format!("visual.{own}.weight"), &[w], false)?;
                    load(host, r, &format!("{own}.bias"), &format!("visual.{own}.bias"), &[w], false)?;
                }
                for i in 0..a.layers {
                    let ext = format!("visual.transformer.resblocks.{i}");
                    load_block(host, r, src.layout, &format!("blocks.{i}"), &ext, w, a.mlp_hidden)?;
                }
                load(host, r, "proj.weight", "visual.proj", &[a.embed_dim, w], true)?;
            }
        }
        let prefixes: &[&str] = match src.layout {
            Layout::HuggingFace => &["vision_model.", "visual_projection."],
            Layout::OpenClip => &["visual."],
        };
        reader.finish(prefixes)
    }
}

recall_sdk::export_plugin! {
    name: "clip-vision",
    description: "CLIP vision transformer (ViT): patch embedding, class token, pre-LN blocks, projection",
    encoder: ClipVision,
}
