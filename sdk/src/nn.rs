//! Building blocks for encoder plugins, composed from host ops: layer norm, multi-head
//! attention and the pre-LN transformer block used by CLIP's towers (and TokLIP's token
//! encoder), and the vector quantiser of VQ image tokenizers. Every projection is a declared
//! linear site, so adapters apply inside them.

use crate::abi::ParamInit;
use crate::error::{Error, Result};
use crate::inputs;
use crate::tensor::{Host, Site, Tensor};

/// Activation of a transformer MLP.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// Exact GELU (HF CLIP, BERT).
    Gelu,
    /// Tanh-approximated GELU.
    GeluTanh,
    Relu,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => x.quick_gelu(),
            Activation::Gelu => x.gelu(),
            Activation::GeluTanh => x.gelu_tanh(),
            Activation::Relu => x.relu(),
        }
    }
}

/// Layer norm over the last dimension with learned affine parameters.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Parameters `{name}.weight` (ones) and `{name}.bias` (zeros).
    pub fn new(host: &Host, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: host.param(&format!("{name}.weight"), &[dim], ParamInit::ones(), true)?,
            bias: host.param(&format!("{name}.bias"), &[dim], ParamInit::zeros(), true)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(&self.weight, &self.bias, self.eps)
    }
}

/// Multi-head self-attention with separate q/k/v/out projections (adapter sites
/// `{name}.q_proj`, `k_proj`, `v_proj`, `out_proj`).
pub struct SelfAttention {
    q: Site,
    k: Site,
    v: Site,
    out: Site,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    pub fn new(host: &Host, name: &str, width: usize, heads: usize, init_std: f64, out_std: f64) -> Result<Self> {
        if heads == 0 || !width.is_multiple_of(heads) {
            return Err(Error::new(format!("width {width} is not divisible by {heads} heads")));
        }
        let site = |n: &str, std: f64| {
            host.declare_linear(
                &format!("{name}.{n}"),
                width,
                width,
                true,
                ParamInit::normal(0.0, std),
                ParamInit::zeros(),
            )
        };
        Ok(SelfAttention {
            q: site("q_proj", init_std)?,
            k: site("k_proj", init_std)?,
            v: site("v_proj", init_std)?,
            out: site("out_proj", out_std)?,
            heads,
            head_dim: width / heads,
        })
    }

    /// x: [B, L, W] -> [B, L, W].
    pub fn forward(&self, host: &Host, x: &Tensor, causal: bool, key_padding_mask: Option<&Tensor>) -> Result<Tensor> {
        let (q, k, v) = (host.linear(self.q, x)?, host.linear(self.k, x)?, host.linear(self.v, x)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let y = host.attention_heads(&q, &k, &v, self.heads, causal, key_padding_mask, scale)?;
        host.linear(self.out, &y)
    }
}

/// Two-layer MLP with sites `{name}.fc1` and `{name}.fc2`.
pub struct Mlp {
    fc1: Site,
    fc2: Site,
    activation: Activation,
}

impl Mlp {
    pub fn new(
        host: &Host,
        name: &str,
        width: usize,
        hidden: usize,
        activation: Activation,
        fc1_std: f64,
        fc2_std: f64,
    ) -> Result<Self> {
        Ok(Mlp {
            fc1: host.declare_linear(
                &format!("{name}.fc1"),
                width,
                hidden,
                true,
                ParamInit::normal(0.0, fc1_std),
                ParamInit::zeros(),
            )?,
            fc2: host.declare_linear(
                &format!("{name}.fc2"),
                hidden,
                width,
                true,
                ParamInit::normal(0.0, fc2_std),
                ParamInit::zeros(),
            )?,
            activation,
        })
    }

    pub fn forward(&self, host: &Host, x: &Tensor) -> Result<Tensor> {
        let h = self.activation.apply(&host.linear(self.fc1, x)?)?;
        host.linear(self.fc2, &h)
    }
}

/// Shape of a transformer stack.
#[derive(Clone, Debug)]
pub struct TransformerConfig {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_hidden: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
}

/// A pre-LN residual block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
pub struct Block {
    ln_1: LayerNorm,
    attn: SelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    /// Parameters under `{name}.` with open_clip's initialisation scheme.
    pub fn new(host: &Host, name: &str, cfg: &TransformerConfig) -> Result<Self> {
        let w = cfg.width as f64;
        let attn_std = w.powf(-0.5);
        let proj_std = w.powf(-0.5) * (2.0 * cfg.layers as f64).powf(-0.5);
        let fc_std = (2.0 * w).powf(-0.5);
        Ok(Block {
            ln_1: LayerNorm::new(host, &format!("{name}.ln_1"), cfg.width, cfg.layer_norm_eps)?,
            attn: SelfAttention::new(host, &format!("{name}.attn"), cfg.width, cfg.heads, attn_std, proj_std)?,
            ln_2: LayerNorm::new(host, &format!("{name}.ln_2"), cfg.width, cfg.layer_norm_eps)?,
            mlp: Mlp::new(host, &format!("{name}.mlp"), cfg.width, cfg.mlp_hidden, cfg.activation, fc_std, proj_std)?,
        })
    }

    pub fn forward(&self, host: &Host, x: &Tensor, causal: bool, key_padding_mask: Option<&Tensor>) -> Result<Tensor> {
        let x = x.add(&self.attn.forward(host, &self.ln_1.forward(x)?, causal, key_padding_mask)?)?;
        x.add(&self.mlp.forward(host, &self.ln_2.forward(&x)?)?)
    }
}

/// A stack of [`Block`]s named `{name}.{i}`.
pub struct Transformer {
    blocks: Vec<Block>,
}

impl Transformer {
    pub fn new(host: &Host, name: &str, cfg: &TransformerConfig) -> Result<Self> {
        let blocks = (0..cfg.layers).map(|i| Block::new(host, &format!("{name}.{i}"), cfg)).collect::<Result<_>>()?;
        Ok(Transformer { blocks })
    }

    pub fn forward(&self, host: &Host, x: &Tensor, causal: bool, key_padding_mask: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for b in &self.blocks {
            x = b.forward(host, &x, causal, key_padding_mask)?;
        }
        Ok(x)
    }
}

/// What an image tokenizer's `forward` returns: the code embeddings [B, N, e] (what a token
/// encoder reads as `code_embeddings`) or the code ids as floats [B, N].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeOutput {
    #[default]
    Embeddings,
    Ids,
}

/// An image tokenizer's `pixel_values` input, checked to be [B, 3, size, size]; returns it
/// with B.
pub fn pixel_input(
    host: &Host,
    inputs: &[crate::abi::NamedTensor],
    size: usize,
    plugin: &str,
) -> Result<(Tensor, usize)> {
    let pixels = host.input(inputs, inputs::PIXEL_VALUES)?;
    let shape = pixels.shape()?;
    if shape.len() != 4 || shape[1..] != [3, size, size] {
        return Err(Error::new(format!("{plugin} expects pixel_values [B, 3, {size}, {size}], got {shape:?}")));
    }
    Ok((pixels, shape[0]))
}

/// Latents matched to their nearest codes ([`quantize`]).
pub struct Quantized {
    /// The latents as compared (L2-normalised with `l2_norm`) [rows, e].
    pub z: Tensor,
    /// Nearest code ids [rows] (u32).
    pub ids: Tensor,
    /// The codes' embeddings [rows, e] (normalised with `l2_norm`); gradients reach the codebook.
    pub z_q: Tensor,
}

/// Vector quantisation (van den Oord et al.; LlamaGen's `VectorQuantizer`): each row of `z`
/// [rows, e] to the nearest row of `codebook` [n, e] by Euclidean distance, after
/// L2-normalising both when `l2_norm` (which keeps more of the codebook in use).
pub fn quantize(z: &Tensor, codebook: &Tensor, l2_norm: bool) -> Result<Quantized> {
    let (z, codes) =
        if l2_norm { (z.l2_normalize(1e-12)?, codebook.l2_normalize(1e-12)?) } else { (z.clone(), codebook.clone()) };
    // argmin ||z - e||^2 = argmax (2 z.e - ||e||^2); no gradient through the choice.
    let e2 = codes.detach()?.sqr()?.sum(&[1], false)?.reshape(&[1, -1])?;
    let score = z.detach()?.matmul(&codes.detach()?.t()?)?.scale(2.0)?.sub(&e2)?;
    let ids = score.argmax(1)?;
    let z_q = codes.embedding(&ids)?;
    Ok(Quantized { z, ids, z_q })
}

impl Quantized {
    /// The codebook loss plus `beta` times the commitment loss:
    /// `MSE(z_q, sg[z]) + beta * MSE(z, sg[z_q])`.
    pub fn loss(&self, beta: f64) -> Result<Tensor> {
        let mse = |a: &Tensor, b: &Tensor| a.sub(b)?.sqr()?.mean_all();
        mse(&self.z_q, &self.z.detach()?)?.add(&mse(&self.z, &self.z_q.detach()?)?.scale(beta)?)
    }

    /// The codes of `batch` images as a tokenizer returns them: embeddings [B, N, e] (constants:
    /// the tokenizer is frozen in front of a token encoder) or ids [B, N] as floats.
    pub fn output(&self, what: CodeOutput, batch: usize) -> Result<Tensor> {
        let d = self.z_q.shape()?;
        let (n, e) = ((d[0] / batch.max(1)) as i64, d[1] as i64);
        match what {
            CodeOutput::Embeddings => self.z_q.detach()?.reshape(&[batch as i64, n, e]),
            CodeOutput::Ids => self.ids.to_dtype(crate::abi::DType::F32)?.reshape(&[batch as i64, n]),
        }
    }

    /// The straight-through estimator `z + sg[z_q - z]`: the codes' values forward, the
    /// latents' gradients backward (into the decoder's input).
    pub fn straight_through(&self) -> Result<Tensor> {
        self.z.add(&self.z_q.sub(&self.z)?.detach()?)
    }
}
