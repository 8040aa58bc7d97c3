//! `lwf`: Learning without Forgetting for CLIP (REFERENCES.md).
//!
//! Teacher = the model after the previous task. On the current batch, student and teacher
//! logits are `exp(logit_scale) * img_n @ txt_n^T` (each with its own logit scale, features
//! L2-normalised); the loss distils the teacher's softened distribution into the student in
//! both directions: `KL(softmax(t / T) || softmax(s / T)) * T^2` (batch mean), image->text on
//! the rows and text->image on the columns.
//!
//! ZSCL's form (the default): T = 2, the two directions summed. C-CLIP's variant: T = 1,
//! `average_directions = true` (0.5 each), `weight = 2`.
//!
//! Inputs: `image_features`, `text_features`, `logit_scale`, and from the host's frozen
//! snapshot `old_image_features`, `old_text_features`, `old_logit_scale`.

use recall_sdk::prelude::*;
use serde::Deserialize;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "d::temperature")]
    pub temperature: f64,
    #[serde(default = "d::weight")]
    pub weight: f64,
    /// 0.5 per direction instead of their sum.
    #[serde(default)]
    pub average_directions: bool,
}

mod d {
    pub fn temperature() -> f64 {
        2.0
    }
    pub fn weight() -> f64 {
        1.0
    }
}

pub struct Lwf {
    cfg: Config,
    task: u64,
}

/// Batch-mean KL(softmax(teacher / T) || softmax(student / T)) over rows, times T^2.
fn distill(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    let n = student.dim(0)? as f64;
    let log_s = student.scale(1.0 / t)?.log_softmax(1)?;
    let log_t = teacher.scale(1.0 / t)?.log_softmax(1)?;
    let p_t = log_t.exp()?;
    p_t.mul(&log_t.sub(&log_s)?)?.sum_all()?.scale(t * t / n)
}

fn logits(img: &Tensor, txt: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    img.l2_normalize(1e-12)?.matmul(&txt.l2_normalize(1e-12)?.t()?)?.mul(&logit_scale.exp()?)
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
        let scale = host.input(inputs, "logit_scale")?;
        let old_scale = match host.find_input(inputs, "old_logit_scale")? {
            Some(s) => s,
            None => scale.detach()?,
        };
        let student = logits(&host.input(inputs, "image_features")?, &host.input(inputs, "text_features")?, &scale)?;
        let teacher = logits(&old_img, &old_txt, &old_scale.detach()?)?;
        let t = self.cfg.temperature;
        let both = distill(&student, &teacher, t)?.add(&distill(&student.t()?, &teacher.t()?, t)?)?;
        let coef = if self.cfg.average_directions { 0.5 } else { 1.0 };
        Ok(vec![("lwf".to_string(), both.scale(coef * self.cfg.weight)?)])
    }
}

recall_sdk::export_plugin! {
    name: "lwf",
    description: "Learning without Forgetting for CLIP: distil the previous model's logits, both directions",
    strategy: Lwf,
}
