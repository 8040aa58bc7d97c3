//! `llamagen-vq`: LlamaGen's VQ image tokenizer (the `VQModel` of LlamaGen's
//! `tokenizer/tokenizer_image/vq_model.py`), so weights in LlamaGen's format (its released
//! VQ-16 / VQ-8 checkpoints, `torch.save` files or safetensors with the same names) serve as
//! TokLIP's frozen image tokenizer (REFERENCES.md).
//!
//! Architecture, with the state dict's names:
//! - `encoder`: `conv_in` (3x3), then per level `conv_blocks.{i}`: `num_res_blocks` residual
//!   blocks (`res.{j}`: group norm, swish, 3x3 conv, twice; a 1x1 `nin_shortcut` when the
//!   width changes), an attention block after each on the last level (`attn.{j}`: group norm,
//!   1x1 q/k/v, softmax over positions, 1x1 `proj_out`), and a downsampling 3x3 stride-2
//!   convolution after zero padding right and bottom by one (`downsample.conv`) on every level
//!   but the last; `mid` (residual, attention, residual), `norm_out`, swish, `conv_out` to
//!   `z_channels`.
//! - `quant_conv` (1x1, `z_channels -> codebook_embed_dim`) and `quantize.embedding`: the
//!   nearest code by Euclidean distance, after L2-normalising latents and codes when
//!   `codebook_l2_norm` (the released models' setting).
//! - `post_quant_conv` and `decoder` (mirror of the encoder, nearest-neighbour x2 upsampling
//!   then a 3x3 conv), built only with `decoder = true`, which training needs.
//!
//! Group norms use 32 groups and eps 1e-6, as LlamaGen. The released models expect pixels in
//! [-1, 1]: set the model's preprocessing to mean 0.5 and std 0.5 per channel.
//!
//! As a model's `image_tokenizer`, `forward(pixel_values)` returns the code embeddings
//! `[B, N, codebook_embed_dim]` (the normalised codebook entries LlamaGen's
//! `get_codebook_entry` gives), N = (image_size / 2^(levels - 1))^2 in row-major order
//! (`output = "ids"`: the code ids as floats `[B, N]`). Given also `target_pixels`, it returns
//! the training loss `MSE(decoded, target) + MSE(z_q, sg[z]) + beta * MSE(z, sg[z_q])` with the
//! straight-through estimator, LlamaGen's codebook and commitment terms without its
//! perceptual and adversarial ones (`[train] objective = "reconstruction"`).
//!
//! `checkpoint` loads the weights: safetensors or a PyTorch file (`vq_ds16_c2i.pt`; the
//! state dict is found under `ema`, `model` or `state_dict`, or named as `file.pt#key`), names
//! under `prefix` (default none). Every tensor of the parts built must be there with its
//! shape; all problems are reported at once.

use recall_sdk::checkpoint::CheckpointReader;
use recall_sdk::nn::{pixel_input, quantize, CodeOutput, Quantized};
use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub image_size: usize,
    /// Base width (LlamaGen: 128).
    #[serde(default = "d::ch")]
    pub ch: usize,
    /// Width multipliers per level (VQ-16: [1, 1, 2, 2, 4]; VQ-8: [1, 2, 2, 4]).
    #[serde(default = "d::ch_mult")]
    pub encoder_ch_mult: Vec<usize>,
    #[serde(default = "d::ch_mult")]
    pub decoder_ch_mult: Vec<usize>,
    #[serde(default = "d::num_res_blocks")]
    pub num_res_blocks: usize,
    #[serde(default = "d::z_channels")]
    pub z_channels: usize,
    #[serde(default = "d::codebook_size")]
    pub codebook_size: usize,
    #[serde(default = "d::codebook_embed_dim")]
    pub codebook_embed_dim: usize,
    #[serde(default = "d::yes")]
    pub codebook_l2_norm: bool,
    #[serde(default = "d::beta")]
    pub commit_loss_beta: f64,
    #[serde(default = "d::norm_groups")]
    pub norm_groups: usize,
    /// Build `post_quant_conv` and the decoder (needed for `target_pixels`).
    #[serde(default = "d::yes")]
    pub decoder: bool,
    #[serde(default)]
    pub output: CodeOutput,
    /// LlamaGen-format weights: safetensors or a PyTorch checkpoint (`file.pt#key`).
    pub checkpoint: Option<String>,
    /// Prefix of the tokenizer's names in the checkpoint.
    #[serde(default)]
    pub prefix: String,
}

mod d {
    pub fn ch() -> usize {
        128
    }
    pub fn ch_mult() -> Vec<usize> {
        vec![1, 1, 2, 2, 4]
    }
    pub fn num_res_blocks() -> usize {
        2
    }
    pub fn z_channels() -> usize {
        256
    }
    pub fn codebook_size() -> usize {
        16384
    }
    pub fn codebook_embed_dim() -> usize {
        8
    }
    pub fn yes() -> bool {
        true
    }
    pub fn beta() -> f64 {
        0.25
    }
    pub fn norm_groups() -> usize {
        32
    }
}

/// Group norm epsilon of LlamaGen's `Normalize`.
const NORM_EPS: f64 = 1e-6;

/// Declares parameters and remembers each (name, shape, handle) for checkpoint loading.
struct Params<'h> {
    host: &'h Host,
    groups: usize,
    declared: Vec<(String, Vec<usize>, Tensor)>,
}

impl Params<'_> {
    fn param(&mut self, name: String, shape: &[usize], init: ParamInit) -> Result<Tensor> {
        let t = self.host.param(&name, shape, init, true)?;
        self.declared.push((name, shape.to_vec(), t.clone()));
        Ok(t)
    }

    /// A `k x k` convolution `{name}.weight` / `{name}.bias`, initialised as torch's `Conv2d`.
    fn conv(&mut self, name: &str, cin: usize, cout: usize, k: usize) -> Result<Conv> {
        let bound = ((cin * k * k) as f64).powf(-0.5);
        Ok(Conv {
            weight: self.param(format!("{name}.weight"), &[cout, cin, k, k], ParamInit::uniform(-bound, bound))?,
            bias: self.param(format!("{name}.bias"), &[cout], ParamInit::uniform(-bound, bound))?,
        })
    }

    fn norm(&mut self, name: &str, c: usize) -> Result<Norm> {
        if !c.is_multiple_of(self.groups) {
            return Err(Error::config(
                "norm_groups",
                format!(
                    "norm_groups = {} does not divide the {c} channels of {name}; choose a divisor of ch times every ch_mult",
                    self.groups
                ),
            ));
        }
        Ok(Norm {
            weight: self.param(format!("{name}.weight"), &[c], ParamInit::ones())?,
            bias: self.param(format!("{name}.bias"), &[c], ParamInit::zeros())?,
            groups: self.groups,
        })
    }

    fn res(&mut self, name: &str, cin: usize, cout: usize) -> Result<ResBlock> {
        Ok(ResBlock {
            norm1: self.norm(&format!("{name}.norm1"), cin)?,
            conv1: self.conv(&format!("{name}.conv1"), cin, cout, 3)?,
            norm2: self.norm(&format!("{name}.norm2"), cout)?,
            conv2: self.conv(&format!("{name}.conv2"), cout, cout, 3)?,
            shortcut: if cin != cout { Some(self.conv(&format!("{name}.nin_shortcut"), cin, cout, 1)?) } else { None },
        })
    }

    fn attn(&mut self, name: &str, c: usize) -> Result<AttnBlock> {
        Ok(AttnBlock {
            norm: self.norm(&format!("{name}.norm"), c)?,
            q: self.conv(&format!("{name}.q"), c, c, 1)?,
            k: self.conv(&format!("{name}.k"), c, c, 1)?,
            v: self.conv(&format!("{name}.v"), c, c, 1)?,
            proj_out: self.conv(&format!("{name}.proj_out"), c, c, 1)?,
        })
    }

    /// One level `{name}`: `blocks` residual blocks `cin -> cout` (`res.{j}`), an attention
    /// block after each with `attn` (`attn.{j}`), then the resampling convolution
    /// `{name}.{resample}.conv` when given (`downsample` / `upsample`).
    fn level(
        &mut self,
        name: &str,
        cin: usize,
        cout: usize,
        blocks: usize,
        attn: bool,
        resample: Option<&str>,
    ) -> Result<Level> {
        let (mut res, mut attns) = (Vec::new(), Vec::new());
        for j in 0..blocks {
            res.push(self.res(&format!("{name}.res.{j}"), if j == 0 { cin } else { cout }, cout)?);
            if attn {
                attns.push(self.attn(&format!("{name}.attn.{j}"), cout)?);
            }
        }
        let resample = resample.map(|r| self.conv(&format!("{name}.{r}.conv"), cout, cout, 3)).transpose()?;
        Ok(Level { res, attn: attns, resample })
    }

    fn mid(&mut self, name: &str, c: usize) -> Result<[Block; 3]> {
        Ok([
            Block::Res(self.res(&format!("{name}.0"), c, c)?),
            Block::Attn(self.attn(&format!("{name}.1"), c)?),
            Block::Res(self.res(&format!("{name}.2"), c, c)?),
        ])
    }
}

struct Conv {
    weight: Tensor,
    bias: Tensor,
}

impl Conv {
    fn forward(&self, x: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
        x.conv2d(&self.weight, Some(&self.bias), stride, padding)
    }
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.group_norm(self.groups, &self.weight, &self.bias, NORM_EPS)
    }
}

struct ResBlock {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?, 1, 1)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?, 1, 1)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x, 1, 0)?,
            None => x.clone(),
        };
        skip.add(&h)
    }
}

struct AttnBlock {
    norm: Norm,
    q: Conv,
    k: Conv,
    v: Conv,
    proj_out: Conv,
}

impl AttnBlock {
    /// Single-head attention over the `H x W` positions, scale `C^-1/2`.
    fn forward(&self, host: &Host, x: &Tensor) -> Result<Tensor> {
        let s = x.shape()?;
        let (b, c, h, w) = (s[0] as i64, s[1] as i64, s[2] as i64, s[3] as i64);
        let n = self.norm.forward(x)?;
        // [B, C, H, W] -> [B, 1, HW, C]: one head, positions as the sequence.
        let seq = |conv: &Conv| conv.forward(&n, 1, 0)?.reshape(&[b, 1, c, h * w])?.transpose(2, 3);
        let y = host.attention(&seq(&self.q)?, &seq(&self.k)?, &seq(&self.v)?, false, None, (c as f64).powf(-0.5))?;
        let y = y.transpose(2, 3)?.reshape(&[b, c, h, w])?;
        x.add(&self.proj_out.forward(&y, 1, 0)?)
    }
}

enum Block {
    Res(ResBlock),
    Attn(AttnBlock),
}

impl Block {
    fn forward(&self, host: &Host, x: &Tensor) -> Result<Tensor> {
        match self {
            Block::Res(r) => r.forward(x),
            Block::Attn(a) => a.forward(host, x),
        }
    }
}

/// One resolution level: residual blocks (each followed by its attention block where the level
/// has them), then the resampling convolution.
struct Level {
    res: Vec<ResBlock>,
    attn: Vec<AttnBlock>,
    resample: Option<Conv>,
}

impl Level {
    fn blocks(&self, host: &Host, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, r) in self.res.iter().enumerate() {
            h = r.forward(&h)?;
            if let Some(a) = self.attn.get(i) {
                h = a.forward(host, &h)?;
            }
        }
        Ok(h)
    }
}

struct Tower {
    conv_in: Conv,
    levels: Vec<Level>,
    mid: [Block; 3],
    norm_out: Norm,
    conv_out: Conv,
}

impl Tower {
    fn encoder(p: &mut Params, cfg: &Config) -> Result<Self> {
        let (ch, mult) = (cfg.ch, &cfg.encoder_ch_mult);
        let conv_in = p.conv("encoder.conv_in", 3, ch, 3)?;
        let mut levels = Vec::new();
        let mut block_in = ch;
        for (i, &m) in mult.iter().enumerate() {
            // Attention on the coarsest level; every level but it downsamples.
            let last = i + 1 == mult.len();
            let name = format!("encoder.conv_blocks.{i}");
            let resample = (!last).then_some("downsample");
            levels.push(p.level(&name, block_in, ch * m, cfg.num_res_blocks, last, resample)?);
            block_in = ch * m;
        }
        Ok(Tower {
            conv_in,
            levels,
            mid: p.mid("encoder.mid", block_in)?,
            norm_out: p.norm("encoder.norm_out", block_in)?,
            conv_out: p.conv("encoder.conv_out", block_in, cfg.z_channels, 3)?,
        })
    }

    fn decoder(p: &mut Params, cfg: &Config) -> Result<Self> {
        let (ch, mult) = (cfg.ch, &cfg.decoder_ch_mult);
        let mut block_in = ch * mult[mult.len() - 1];
        let conv_in = p.conv("decoder.conv_in", cfg.z_channels, block_in, 3)?;
        let mid = p.mid("decoder.mid", block_in)?;
        let mut levels = Vec::new();
        // Stored from the coarsest level (index 0) to the finest.
        for (i, &m) in mult.iter().rev().enumerate() {
            // One more residual block per level than the encoder; attention on the coarsest
            // level (the first here); every level but the finest upsamples.
            let name = format!("decoder.conv_blocks.{i}");
            let resample = (i + 1 < mult.len()).then_some("upsample");
            levels.push(p.level(&name, block_in, ch * m, cfg.num_res_blocks + 1, i == 0, resample)?);
            block_in = ch * m;
        }
        Ok(Tower {
            conv_in,
            levels,
            mid,
            norm_out: p.norm("decoder.norm_out", block_in)?,
            conv_out: p.conv("decoder.conv_out", block_in, 3, 3)?,
        })
    }

    fn mid(&self, host: &Host, x: &Tensor) -> Result<Tensor> {
        self.mid.iter().try_fold(x.clone(), |h, b| b.forward(host, &h))
    }

    fn head(&self, x: &Tensor) -> Result<Tensor> {
        self.conv_out.forward(&self.norm_out.forward(x)?.silu()?, 1, 1)
    }

    /// Pixels [B, 3, S, S] -> latents [B, z_channels, S / 2^(L-1), ...].
    fn encode(&self, host: &Host, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x, 1, 1)?;
        for level in &self.levels {
            h = level.blocks(host, &h)?;
            if let Some(down) = &level.resample {
                // Asymmetric padding (right and bottom), then a stride-2 convolution.
                h = down.forward(&h.pad_zeros(2, 0, 1)?.pad_zeros(3, 0, 1)?, 2, 0)?;
            }
        }
        self.head(&self.mid(host, &h)?)
    }

    /// Latents [B, z_channels, g, g] -> pixels [B, 3, g * 2^(L-1), ...].
    fn decode(&self, host: &Host, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid(host, &self.conv_in.forward(z, 1, 1)?)?;
        for level in &self.levels {
            h = level.blocks(host, &h)?;
            if let Some(up) = &level.resample {
                h = up.forward(&h.upsample_nearest2d(2)?, 1, 1)?;
            }
        }
        self.head(&h)
    }
}

pub struct LlamaGenVq {
    cfg: Config,
    encoder: Tower,
    quant_conv: Conv,
    codebook: Tensor,
    /// `post_quant_conv` and the decoder, with `decoder = true`.
    decoder: Option<(Conv, Tower)>,
}

impl LlamaGenVq {
    fn validate(cfg: &Config) -> Result<()> {
        for (key, mult) in [("encoder_ch_mult", &cfg.encoder_ch_mult), ("decoder_ch_mult", &cfg.decoder_ch_mult)] {
            if mult.is_empty() || mult.contains(&0) {
                return Err(Error::config(key, format!("{key} must be a non-empty list of positive multipliers")));
            }
        }
        for (key, v) in [
            ("ch", cfg.ch),
            ("num_res_blocks", cfg.num_res_blocks),
            ("z_channels", cfg.z_channels),
            ("codebook_size", cfg.codebook_size),
            ("codebook_embed_dim", cfg.codebook_embed_dim),
            ("norm_groups", cfg.norm_groups),
        ] {
            if v == 0 {
                return Err(Error::config(key, format!("{key} must be at least 1")));
            }
        }
        let factor = 1usize << (cfg.encoder_ch_mult.len() - 1);
        if cfg.image_size == 0 || !cfg.image_size.is_multiple_of(factor) {
            return Err(Error::config(
                "image_size",
                format!(
                    "image_size {} is not divisible by {factor}, the downsampling factor of {} levels",
                    cfg.image_size,
                    cfg.encoder_ch_mult.len()
                ),
            ));
        }
        if cfg.decoder && cfg.decoder_ch_mult.len() != cfg.encoder_ch_mult.len() {
            return Err(Error::config(
                "decoder_ch_mult",
                "decoder_ch_mult must have as many levels as encoder_ch_mult (the decoder undoes the encoder's downsampling)",
            ));
        }
        Ok(())
    }

    /// Codes per side.
    fn grid(&self) -> usize {
        self.cfg.image_size >> (self.cfg.encoder_ch_mult.len() - 1)
    }

    /// The encoder's latents [B*N, e] matched to their codes.
    fn quantize(&self, host: &Host, pixels: &Tensor) -> Result<Quantized> {
        let e = self.cfg.codebook_embed_dim as i64;
        let h = self.quant_conv.forward(&self.encoder.encode(host, pixels)?, 1, 0)?;
        let z = h.permute(&[0, 2, 3, 1])?.reshape(&[-1, e])?;
        quantize(&z, &self.codebook, self.cfg.codebook_l2_norm)
    }

    fn loss(&self, host: &Host, q: &Quantized, target: &Tensor, b: usize) -> Result<Tensor> {
        let Some((post_quant_conv, decoder)) = &self.decoder else {
            bail!("llamagen-vq was built without its decoder (decoder = false), so it cannot score target_pixels; set decoder = true");
        };
        let (g, e) = (self.grid() as i64, self.cfg.codebook_embed_dim as i64);
        let quant = q.straight_through()?.reshape(&[b as i64, g, g, e])?.permute(&[0, 3, 1, 2])?;
        let image = decoder.decode(host, &post_quant_conv.forward(&quant, 1, 0)?)?;
        image.sub(&target.detach()?)?.sqr()?.mean_all()?.add(&q.loss(self.cfg.commit_loss_beta)?)
    }

    fn load(&self, host: &Host, declared: &[(String, Vec<usize>, Tensor)], path: &str) -> Result<()> {
        let mut reader = CheckpointReader::open(host, path).map_err(|e| Error::config("checkpoint", e.message()))?;
        let prefix = &self.cfg.prefix;
        for (name, shape, param) in declared {
            if let Some(value) = reader.take(&format!("{prefix}{name}"), shape)? {
                host.param_assign(param, &value)?;
            }
        }
        // LlamaGen's usage counter, a buffer.
        reader.skip(&format!("{prefix}quantize.codebook_used"));
        let mut parts = vec![format!("{prefix}encoder."), format!("{prefix}quant_conv."), format!("{prefix}quantize.")];
        if self.decoder.is_some() {
            parts.extend([format!("{prefix}decoder."), format!("{prefix}post_quant_conv.")]);
        }
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        reader.finish(&parts).map_err(|e| {
            Error::config(
                "checkpoint",
                format!("{}\n(match ch, the ch_mult lists, num_res_blocks, z_channels and the codebook settings to the checkpoint's model)", e.message()),
            )
        })
    }
}

impl Encoder for LlamaGenVq {
    type Config = Config;

    fn create(host: &Host, cfg: Config) -> Result<Self> {
        Self::validate(&cfg)?;
        let mut p = Params { host, groups: cfg.norm_groups, declared: Vec::new() };
        let encoder = Tower::encoder(&mut p, &cfg)?;
        let quant_conv = p.conv("quant_conv", cfg.z_channels, cfg.codebook_embed_dim, 1)?;
        let n = cfg.codebook_size as f64;
        let codebook = p.param(
            "quantize.embedding.weight".into(),
            &[cfg.codebook_size, cfg.codebook_embed_dim],
            ParamInit::uniform(-1.0 / n, 1.0 / n),
        )?;
        let decoder = if cfg.decoder {
            let post = p.conv("post_quant_conv", cfg.codebook_embed_dim, cfg.z_channels, 1)?;
            Some((post, Tower::decoder(&mut p, &cfg)?))
        } else {
            None
        };
        let declared = std::mem::take(&mut p.declared);
        let vq = LlamaGenVq { cfg, encoder, quant_conv, codebook, decoder };
        if let Some(path) = vq.cfg.checkpoint.clone() {
            vq.load(host, &declared, &path)?;
        }
        Ok(vq)
    }

    fn spec(&self) -> EncoderSpec {
        EncoderSpec {
            modality: modality::IMAGE,
            embed_dim: self.cfg.codebook_embed_dim as u64,
            input_size: self.cfg.image_size as u64,
        }
    }

    fn forward(&self, host: &Host, inputs: &[NamedTensor]) -> Result<Tensor> {
        let (pixels, b) = pixel_input(host, inputs, self.cfg.image_size, "llamagen-vq")?;
        let q = self.quantize(host, &pixels)?;
        match host.find_input(inputs, inputs::TARGET_PIXELS)? {
            Some(target) => self.loss(host, &q, &target, b),
            None => q.output(self.cfg.output, b),
        }
    }
}

recall_sdk::export_plugin! {
    name: "llamagen-vq",
    description: "LlamaGen's VQ image tokenizer (VQ-16/VQ-8 layout, LlamaGen-format weights): pixels -> codes",
    encoder: LlamaGenVq,
}
