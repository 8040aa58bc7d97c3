//! CLIP's towers written directly against candle, reading the same parameters (by name) as
//! the `clip-vision` and `clip-text` plugins create.
//!
//! This is the "linked in directly" side of two measurements: the cross-boundary autograd
//! test (gradients through the plugins must equal gradients through this code) and the
//! `recall bench` overhead ratio. It mirrors the plugins' architecture exactly and is not
//! used to train.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use crate::runtime::{ops, Runtime};

/// Architecture facts the parameters do not carry.
#[derive(Clone, Copy, Debug)]
pub struct TowerShape {
    pub heads: usize,
    pub quick_gelu: bool,
    pub eps: f64,
}

/// Parameters by name (each the parameter's own tensor, so gradients reach it).
pub struct Params(HashMap<String, Tensor>);

impl Params {
    pub fn from_runtime(rt: &Runtime) -> Self {
        Params(rt.params().iter().map(|p| (p.name.clone(), p.var.as_tensor().clone())).collect())
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.0.get(name).ok_or_else(|| candle_core::Error::msg(format!("reference model: no parameter `{name}`")))
    }

    fn linear(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let bias = self.0.get(&format!("{name}.bias"));
        ops::linear(x, self.get(&format!("{name}.weight"))?, bias)
    }

    fn ln(&self, name: &str, x: &Tensor, eps: f64) -> Result<Tensor> {
        ops::layer_norm(x, self.get(&format!("{name}.weight"))?, self.get(&format!("{name}.bias"))?, eps)
    }

    fn n_blocks(&self, prefix: &str) -> usize {
        (0..).take_while(|i| self.0.contains_key(&format!("{prefix}.blocks.{i}.ln_1.weight"))).count()
    }

    fn block(&self, name: &str, x: &Tensor, s: TowerShape, causal: bool) -> Result<Tensor> {
        let h = self.ln(&format!("{name}.ln_1"), x, s.eps)?;
        let dh = h.dim(2)? / s.heads;
        let site = |site: &str| self.linear(&format!("{name}.attn.{site}"), &h);
        let a = ops::attention_heads(
            &site("q_proj")?,
            &site("k_proj")?,
            &site("v_proj")?,
            s.heads,
            causal,
            None,
            1.0 / (dh as f64).sqrt(),
        )?;
        let x = (x + self.linear(&format!("{name}.attn.out_proj"), &a)?)?;
        let h = self.ln(&format!("{name}.ln_2"), &x, s.eps)?;
        let h = self.linear(&format!("{name}.mlp.fc1"), &h)?;
        let h = if s.quick_gelu { ops::quick_gelu(&h)? } else { ops::gelu_erf(&h)? };
        x + self.linear(&format!("{name}.mlp.fc2"), &h)?
    }

    /// The vision tower: pixels [B, 3, S, S] -> [B, E].
    pub fn vision(&self, pixels: &Tensor, s: TowerShape) -> Result<Tensor> {
        let w = self.get("vision.patch_embed.weight")?;
        let patch = w.dim(2)?;
        let x = ops::patch_embed(pixels, w, None, patch)?;
        let (b, _, width) = x.dims3()?;
        let cls = self.get("vision.class_embedding")?.reshape((1, 1, width))?.broadcast_as((b, 1, width))?;
        let x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(self.get("vision.positional_embedding")?)?;
        let mut x = self.ln("vision.ln_pre", &x, s.eps)?;
        for i in 0..self.n_blocks("vision") {
            x = self.block(&format!("vision.blocks.{i}"), &x, s, false)?;
        }
        let pooled = self.ln("vision.ln_post", &x.narrow(1, 0, 1)?.reshape((b, width))?, s.eps)?;
        self.linear("vision.proj", &pooled)
    }

    /// The text tower: ids [B, L] -> [B, E], pooled at each row's highest id.
    pub fn text(&self, ids: &Tensor, s: TowerShape) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let x = ops::embedding(self.get("text.token_embedding")?, ids)?
            .broadcast_add(&self.get("text.positional_embedding")?.narrow(0, 0, l)?)?;
        let mut x = x;
        for i in 0..self.n_blocks("text") {
            x = self.block(&format!("text.blocks.{i}"), &x, s, true)?;
        }
        let x = self.ln("text.ln_final", &x, s.eps)?;
        let width = x.dim(2)?;
        let rows: Vec<u32> = ids
            .to_vec2::<u32>()?
            .iter()
            .enumerate()
            .map(|(r, row)| {
                let max = row.iter().copied().max().unwrap_or(0);
                (r * l + row.iter().position(|&i| i == max).unwrap_or(0)) as u32
            })
            .collect();
        let index = Tensor::from_vec(rows, b, ids.device())?;
        let pooled = x.reshape((b * l, width))?.index_select(&index, 0)?;
        self.linear("text.text_projection", &pooled)
    }
}
