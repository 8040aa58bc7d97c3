//! `vq-tokenizer`: a small VQ-VAE image tokenizer, the frozen front of TokLIP (REFERENCES.md).
//!
//! Encoder: non-overlapping `patch x patch` convolution `3 -> hidden`, GELU, linear
//! `hidden -> code_dim`: one latent `z_e` per patch, `N = (image_size / patch)^2` per image.
//! Quantiser: the nearest of `codebook_size` codes. With `l2_norm = true` (the default, as in
//! LlamaGen's VQ) latents and codes are L2-normalised and "nearest" is the largest cosine,
//! which keeps more of the codebook in use. Decoder (training only): linear
//! `code_dim -> hidden`, GELU, linear `hidden -> 3 * patch^2`, patches back into an image.
//!
//! As a model's `image_tokenizer` its `forward(pixel_values)` returns the code embeddings
//! `[B, N, code_dim]` (`output = "ids"`: the code ids as floats `[B, N]`). Given also
//! `target_pixels`, it returns the VQ-VAE training loss instead: `MSE(x_hat, target) +
//! MSE(z_q, sg[z_e]) + beta * MSE(z_e, sg[z_q])` with the straight-through estimator
//! `z_e + sg[z_q - z_e]` into the decoder (van den Oord et al.; beta 0.25). `recall run` on an
//! experiment with `[train] objective = "reconstruction"` trains it that way.
//!
//! `checkpoint` loads trained weights (a Recall checkpoint, tensors under `prefix`, default
//! `image_tokenizer.`).

use recall_sdk::nn::{pixel_input, quantize, CodeOutput, Quantized};
use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub image_size: usize,
    pub patch: usize,
    #[serde(default = "d::hidden")]
    pub hidden: usize,
    #[serde(default = "d::code_dim")]
    pub code_dim: usize,
    #[serde(default = "d::codebook_size")]
    pub codebook_size: usize,
    #[serde(default = "d::yes")]
    pub l2_norm: bool,
    #[serde(default = "d::beta")]
    pub beta: f64,
    #[serde(default)]
    pub output: CodeOutput,
    /// Trained weights: a Recall checkpoint file (`task-NN.safetensors`).
    pub checkpoint: Option<String>,
    #[serde(default = "d::prefix")]
    pub prefix: String,
}

mod d {
    pub fn hidden() -> usize {
        64
    }
    pub fn code_dim() -> usize {
        8
    }
    pub fn codebook_size() -> usize {
        256
    }
    pub fn yes() -> bool {
        true
    }
    pub fn beta() -> f64 {
        0.25
    }
    pub fn prefix() -> String {
        "image_tokenizer.".into()
    }
}

pub struct VqTokenizer {
    cfg: Config,
    patch_weight: Tensor,
    patch_bias: Tensor,
    enc_out: Site,
    codebook: Tensor,
    dec_in: Site,
    dec_out: Site,
}

/// Every parameter: (name, shape).
fn parameters(c: &Config) -> Vec<(String, Vec<usize>)> {
    let (h, k, p) = (c.hidden, c.code_dim, c.patch);
    vec![
        ("patch_embed.weight".into(), vec![h, 3, p, p]),
        ("patch_embed.bias".into(), vec![h]),
        ("enc_out.weight".into(), vec![k, h]),
        ("enc_out.bias".into(), vec![k]),
        ("codebook".into(), vec![c.codebook_size, k]),
        ("dec_in.weight".into(), vec![h, k]),
        ("dec_in.bias".into(), vec![h]),
        ("dec_out.weight".into(), vec![3 * p * p, h]),
        ("dec_out.bias".into(), vec![3 * p * p]),
    ]
}

impl Encoder for VqTokenizer {
    type Config = Config;

    fn create(host: &Host, cfg: Config) -> Result<Self> {
        if cfg.patch == 0 || !cfg.image_size.is_multiple_of(cfg.patch) {
            return Err(Error::config(
                "patch",
                format!("image_size {} is not divisible by patch {}", cfg.image_size, cfg.patch),
            ));
        }
        for (key, v) in [("hidden", cfg.hidden), ("code_dim", cfg.code_dim), ("codebook_size", cfg.codebook_size)] {
            if v == 0 {
                return Err(Error::config(key, format!("{key} must be at least 1")));
            }
        }
        let (h, k, p) = (cfg.hidden, cfg.code_dim, cfg.patch);
        let lin = |name: &str, i: usize, o: usize| {
            host.declare_linear(name, i, o, true, ParamInit::normal(0.0, (i as f64).powf(-0.5)), ParamInit::zeros())
        };
        let fan_in = (3 * p * p) as f64;
        let vq = VqTokenizer {
            patch_weight: host.param(
                "patch_embed.weight",
                &[h, 3, p, p],
                ParamInit::normal(0.0, fan_in.powf(-0.5)),
                true,
            )?,
            patch_bias: host.param("patch_embed.bias", &[h], ParamInit::zeros(), true)?,
            enc_out: lin("enc_out", h, k)?,
            codebook: host.param("codebook", &[cfg.codebook_size, k], ParamInit::normal(0.0, 1.0), true)?,
            dec_in: lin("dec_in", k, h)?,
            dec_out: lin("dec_out", h, 3 * p * p)?,
            cfg,
        };
        if let Some(path) = vq.cfg.checkpoint.clone() {
            vq.load(host, &path)?;
        }
        Ok(vq)
    }

    fn spec(&self) -> EncoderSpec {
        EncoderSpec {
            modality: modality::IMAGE,
            embed_dim: self.cfg.code_dim as u64,
            input_size: self.cfg.image_size as u64,
        }
    }

    fn forward(&self, host: &Host, inputs: &[NamedTensor]) -> Result<Tensor> {
        let (pixels, b) = pixel_input(host, inputs, self.cfg.image_size, "vq-tokenizer")?;
        let q = self.quantize(host, &pixels)?;
        match host.find_input(inputs, inputs::TARGET_PIXELS)? {
            Some(target) => self.loss(host, &q, &target, b),
            None => q.output(self.cfg.output, b),
        }
    }
}

impl VqTokenizer {
    /// One latent per patch, [B*N, code_dim], matched to its code.
    fn quantize(&self, host: &Host, pixels: &Tensor) -> Result<Quantized> {
        let h = pixels.patch_embed(&self.patch_weight, Some(&self.patch_bias), self.cfg.patch)?.gelu()?;
        let z = host.linear(self.enc_out, &h)?.reshape(&[-1, self.cfg.code_dim as i64])?;
        quantize(&z, &self.codebook, self.cfg.l2_norm)
    }

    fn loss(&self, host: &Host, q: &Quantized, target: &Tensor, b: usize) -> Result<Tensor> {
        let (s, p) = (self.cfg.image_size, self.cfg.patch);
        let g = s / p;
        let h = host.linear(self.dec_in, &q.straight_through()?)?.gelu()?;
        let patches = host.linear(self.dec_out, &h)?;
        let image = patches
            .reshape(&[b as i64, g as i64, g as i64, 3, p as i64, p as i64])?
            .permute(&[0, 3, 1, 4, 2, 5])?
            .reshape(&[b as i64, 3, s as i64, s as i64])?;
        image.sub(&target.detach()?)?.sqr()?.mean_all()?.add(&q.loss(self.cfg.beta)?)
    }

    /// Load every parameter from a Recall checkpoint (all must be there, with these shapes).
    fn load(&self, host: &Host, path: &str) -> Result<()> {
        let index = host.checkpoint_index(path).map_err(|e| Error::config("checkpoint", e.message()))?;
        for (name, shape) in parameters(&self.cfg) {
            let full = format!("{}{name}", self.cfg.prefix);
            match index.iter().find(|(n, _)| *n == full) {
                Some((_, s)) if *s == shape => {
                    let value = host.checkpoint_tensor(path, &full)?;
                    host.param_assign(&host.param(&name, &shape, ParamInit::zeros(), true)?, &value)?;
                }
                Some((_, s)) => {
                    return Err(Error::config(
                        "checkpoint",
                        format!("{path}: `{full}` is {s:?}, this tokenizer's is {shape:?}; match its settings to the trained one"),
                    ))
                }
                None => {
                    return Err(Error::config(
                        "checkpoint",
                        format!("{path} has no `{full}`; is it a vq-tokenizer checkpoint, and is `prefix` right?"),
                    ))
                }
            }
        }
        Ok(())
    }
}

recall_sdk::export_plugin! {
    name: "vq-tokenizer",
    description: "VQ-VAE image tokenizer: pixels -> discrete codes and their embeddings (TokLIP's frozen front)",
    encoder: VqTokenizer,
}
