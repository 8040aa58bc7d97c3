//! `lwf`: Learning without Forgetting for CLIP (REFERENCES.md).
//!
//! Teacher = the model after the previous task. On the current batch, student and teacher
//! logits are `exp(logit_scale) * img_n @ txt_n^T` (each with its own logit scale, features
//! L2-normalised); the loss distils the teacher's softened distribution into the student in
//! both directions: `KL(softmax(t / T) || softmax(s / T)) * T^2` (batch mean), image->text on
//! the rows and text->image on the columns.
//!
//! ZSCL's form (the default): T = 2, the two directions summed. The "ZSCL" row of C-CLIP's
//! table, as its code runs it: T = 1, `average_directions = true` (0.5 each), `weight = 2`,
//! `teacher_scale = "student"` (the teacher's similarities times the student's logit scale,
//! taken as a constant, as the teacher is a target), and the old model from the first task
//! on (`[train] old_model_on_first_task = true`).
//!
//! Inputs: `image_features`, `text_features`, `logit_scale`, and from the host's frozen
//! snapshot `old_image_features`, `old_text_features`, `old_logit_scale`.

use recall_sdk::losses::{clip_logits, distill_both_ways};
use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "d::temperature")]
    pub temperature: f64,
    #[serde(default = "d::weight")]
    pub weight: f64,
    /// 0.5 per direction instead of their sum.
    #[serde(default)]
    pub average_directions: bool,
    /// The logit scale of the teacher's logits: its own (`"own"`, the default) or the
    /// student's (`"student"`, C-CLIP's code).
    #[serde(default = "d::teacher_scale")]
    pub teacher_scale: TeacherScale,
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TeacherScale {
    Own,
    Student,
}

mod d {
    pub fn temperature() -> f64 {
        2.0
    }
    pub fn weight() -> f64 {
        1.0
    }
    pub fn teacher_scale() -> super::TeacherScale {
        super::TeacherScale::Own
    }
}

pub struct Lwf {
    cfg: Config,
    task: u64,
}

impl Strategy for Lwf {
    type Config = Config;

    fn create(_host: &Host, cfg: Config) -> Result<Self> {
        if cfg.temperature <= 0.0 || !cfg.temperature.is_finite() {
            return Err(Error::config("temperature", "temperature must be a positive number"));
        }
        Ok(Lwf { cfg, task: 0 })
    }

    fn wants_old_model(&self) -> bool {
        true
    }

    fn before_task(&mut self, _host: &Host, task: &TaskInfo) -> Result<()> {
        self.task = task.index;
        Ok(())
    }

    fn loss_terms(&mut self, host: &Host, inputs: &[NamedTensor]) -> Result<Vec<(String, Tensor)>> {
        let Some((old_img, old_txt)) = host.old_features(inputs, self.task)? else {
            return Ok(Vec::new());
        };
        let scale = host.input(inputs, inputs::LOGIT_SCALE)?;
        let old_scale = match (self.cfg.teacher_scale, host.find_input(inputs, inputs::OLD_LOGIT_SCALE)?) {
            (TeacherScale::Own, Some(s)) => s,
            _ => scale.detach()?,
        };
        let student = clip_logits(
            &host.input(inputs, inputs::IMAGE_FEATURES)?,
            &host.input(inputs, inputs::TEXT_FEATURES)?,
            &scale,
        )?;
        let teacher = clip_logits(&old_img, &old_txt, &old_scale.detach()?)?;
        let loss = distill_both_ways(&student, &teacher, self.cfg.temperature, self.cfg.average_directions)?;
        Ok(vec![("lwf".to_string(), loss.scale(self.cfg.weight)?)])
    }
}

recall_sdk::export_plugin! {
    name: "lwf",
    description: "Learning without Forgetting for CLIP: distil the previous model's logits, both directions",
    strategy: Lwf,
}
