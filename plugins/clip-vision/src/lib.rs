//! `clip-vision`: the CLIP vision transformer (ViT) as a Recall encoder plugin.
//!
//! pixels -> patch embedding (stride-P convolution, no bias) -> [class token; patches] +
//! positional embeddings -> ln_pre -> pre-LN transformer blocks -> ln_post on the class token
//! -> projection. Every linear layer (q/k/v/out, MLP, projection) is an adapter site.

use recall_sdk::nn::{Activation, LayerNorm, Transformer, TransformerConfig};
use recall_sdk::prelude::*;
use serde::Deserialize;

/// Architecture of the vision tower. Defaults are ViT-B/32 at 224 px.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "d::image_size")]
    pub image_size: usize,
    #[serde(default = "d::patch_size")]
    pub patch_size: usize,
    #[serde(default = "d::width")]
    pub width: usize,
    #[serde(default = "d::layers")]
    pub layers: usize,
    #[serde(default = "d::heads")]
    pub heads: usize,
    /// Hidden width of the MLP; default 4x width.
    #[serde(default)]
    pub mlp_hidden: Option<usize>,
    /// Output (joint embedding) width.
    #[serde(default = "d::embed_dim")]
    pub embed_dim: usize,
    #[serde(default = "d::activation")]
    pub activation: Activation,
    #[serde(default = "d::eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d::channels")]
    pub channels: usize,
}

mod d {
    use super::Activation;
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        32
    }
    pub fn width() -> usize {
        768
    }
    pub fn layers() -> usize {
        12
    }
    pub fn heads() -> usize {
        12
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
    pub fn channels() -> usize {
        3
    }
}

pub struct ClipVision {
    cfg: Config,
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

    fn create(host: &Host, cfg: Config) -> Result<Self> {
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(Error::config(
                "patch_size",
                format!("image_size {} is not divisible by patch_size {}", cfg.image_size, cfg.patch_size),
            ));
        }
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
            mlp_hidden: cfg.mlp_hidden.unwrap_or(4 * w),
            activation: cfg.activation,
            layer_norm_eps: cfg.layer_norm_eps,
        };
        let p = cfg.patch_size;
        let fan_in = (cfg.channels * p * p) as f64;
        Ok(ClipVision {
            patch_weight: host.param(
                "patch_embed.weight",
                &[w, cfg.channels, p, p],
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
        })
    }

    fn spec(&self) -> EncoderSpec {
        EncoderSpec {
            modality: modality::IMAGE,
            embed_dim: self.cfg.embed_dim as u64,
            input_size: self.cfg.image_size as u64,
        }
    }

    fn forward(&self, host: &Host, inputs: &[NamedTensor]) -> Result<Tensor> {
        let pixels = host.input(inputs, "pixel_values")?;
        let shape = pixels.shape()?;
        let expected = [self.cfg.channels, self.cfg.image_size, self.cfg.image_size];
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
        host.linear(self.proj, &pooled)
    }
}

recall_sdk::export_plugin! {
    name: "clip-vision",
    description: "CLIP vision transformer (ViT): patch embedding, class token, pre-LN blocks, projection",
    encoder: ClipVision,
}
