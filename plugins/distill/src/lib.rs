//! `distill`: feature distillation from a frozen teacher, TokLIP's second loss
//! (REFERENCES.md): `weight * MSE(student image features, teacher image features)`, the mean
//! over every element (PyTorch's `F.mse_loss`), weight 1000 by default.
//!
//! The teacher is the experiment's `[teacher]` model (a vision tower in candle, or an ONNX
//! model through ONNX Runtime); the host runs it on the same batch under no gradient and
//! passes `teacher_image_features`. With `normalize = true` (the default, as open_clip's
//! features are compared) both sides are L2-normalised first, so the loss measures direction,
//! not scale; the student's and teacher's widths must then still agree.
//!
//! TokLIP's optional token-level term, `token_weight * MSE(student tokens, teacher tokens)`
//! (10 in TokLIP's code; off by default), compares every token's features as the towers
//! publish them (`toklip-encoder`: every code token; `clip-vision`: every patch token; both
//! after the final layer norm, before projection), unnormalised, as TokLIP does. It needs as
//! many student tokens as teacher patches, of the same width.
//!
//! Inputs: `image_features`, `teacher_image_features`; with `token_weight > 0` also
//! `image_tokens`, `teacher_image_tokens`.

use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "d::weight")]
    pub weight: f64,
    #[serde(default = "d::yes")]
    pub normalize: bool,
    /// Weight of the token-level term (0: off).
    #[serde(default)]
    pub token_weight: f64,
}

mod d {
    pub fn weight() -> f64 {
        1000.0
    }
    pub fn yes() -> bool {
        true
    }
}

pub struct Distill {
    cfg: Config,
}

/// `mean((student - teacher)^2)` with the teacher held constant.
pub fn mse(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    student.sub(&teacher.detach()?)?.sqr()?.mean_all()
}

impl Strategy for Distill {
    type Config = Config;

    fn create(_host: &Host, cfg: Config) -> Result<Self> {
        for (key, w) in [("weight", cfg.weight), ("token_weight", cfg.token_weight)] {
            if w < 0.0 || !w.is_finite() {
                return Err(Error::config(key, format!("{key} must be a non-negative number")));
            }
        }
        Ok(Distill { cfg })
    }

    fn loss_terms(&mut self, host: &Host, inputs: &[NamedTensor]) -> Result<Vec<(String, Tensor)>> {
        let Some(teacher) = host.find_input(inputs, inputs::TEACHER_IMAGE_FEATURES)? else {
            return Err(Error::new(
                "no `teacher_image_features`: distill needs a [teacher] model in the experiment (a vision tower in \
                 candle or an ONNX model) to distil from",
            ));
        };
        let mut student = host.input(inputs, inputs::IMAGE_FEATURES)?;
        let mut teacher = teacher;
        let (s, t) = (student.shape()?, teacher.shape()?);
        if s != t {
            return Err(Error::new(format!(
                "student image features {s:?} and teacher image features {t:?} differ in shape; give the student \
                 the teacher's embed_dim"
            )));
        }
        if self.cfg.normalize {
            student = student.l2_normalize(1e-12)?;
            teacher = teacher.l2_normalize(1e-12)?;
        }
        let mut terms = vec![("distill".to_string(), mse(&student, &teacher)?.scale(self.cfg.weight)?)];
        if self.cfg.token_weight > 0.0 {
            terms.push(("distill_tokens".to_string(), self.token_term(host, inputs)?));
        }
        Ok(terms)
    }
}

impl Distill {
    /// `token_weight * MSE(image_tokens, teacher_image_tokens)`.
    fn token_term(&self, host: &Host, inputs: &[NamedTensor]) -> Result<Tensor> {
        let tokens = |name: &str, tower: &str| -> Result<Tensor> {
            host.find_input(inputs, name)?.ok_or_else(|| {
                Error::new(format!(
                    "token_weight > 0 needs `{name}`, but the {tower} publishes no per-token features; use a tower \
                     that does (toklip-encoder, clip-vision) or set token_weight = 0"
                ))
            })
        };
        let student = tokens(inputs::IMAGE_TOKENS, "student's vision tower")?;
        let teacher = tokens(inputs::TEACHER_IMAGE_TOKENS, "teacher's vision tower")?;
        let (s, t) = (student.shape()?, teacher.shape()?);
        if s != t {
            return Err(Error::new(format!(
                "student tokens {s:?} and teacher tokens {t:?} differ in shape; the student needs one token per \
                 teacher patch (tokens = (image_size / patch_size)^2) and the teacher's width"
            )));
        }
        mse(&student, &teacher)?.scale(self.cfg.token_weight)
    }
}

recall_sdk::export_plugin! {
    name: "distill",
    description: "Distil a frozen teacher's image features into the student (MSE, TokLIP)",
    strategy: Distill,
}
