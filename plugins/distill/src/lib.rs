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
//! Inputs: `image_features`, `teacher_image_features`.

use recall_sdk::prelude::*;
use serde::Deserialize;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "d::weight")]
    pub weight: f64,
    #[serde(default = "d::yes")]
    pub normalize: bool,
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
        if cfg.weight < 0.0 || !cfg.weight.is_finite() {
            return Err(Error::config("weight", "weight must be a non-negative number"));
        }
        Ok(Distill { cfg })
    }

    fn loss_terms(&mut self, host: &Host, inputs: &[NamedTensor]) -> Result<Vec<(String, Tensor)>> {
        let Some(teacher) = host.find_input(inputs, "teacher_image_features")? else {
            return Err(Error::new(
                "no `teacher_image_features`: distill needs a [teacher] model in the experiment (a vision tower in \
                 candle or an ONNX model) to distil from",
            ));
        };
        let mut student = host.input(inputs, "image_features")?;
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
        Ok(vec![("distill".to_string(), mse(&student, &teacher)?.scale(self.cfg.weight)?)])
    }
}

recall_sdk::export_plugin! {
    name: "distill",
    description: "Distil a frozen teacher's image features into the student (MSE, TokLIP)",
    strategy: Distill,
}
