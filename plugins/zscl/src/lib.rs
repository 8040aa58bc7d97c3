//! `zscl`: Zero-Shot Continual Learning (Zheng et al., ICCV 2023), as its reference code does
//! it (REFERENCES.md):
//!
//! - distillation from the initial (zero-shot) model on a reference batch: student and
//!   teacher logits `exp(logit_scale) * img_n @ txt_n^T`, `KL(softmax(t/T) || softmax(s/T)) *
//!   T^2` both ways, T = 2, summed; the host supplies the batch (`[reference]` data, else the
//!   current batch) and both models' features on it (`wants_initial_model`, SDK 1.3);
//! - optionally an L2 penalty to the weights at the start of the task (`l2`);
//! - weight ensembling (`we`): every `we_every` steps `theta_we <- (n theta_we + theta) /
//!   (n + 1)` (n counts the merges so far), and at the end of the task the model takes
//!   `theta_we` (ZSCL's `merge_we`). It covers the parameters that train during the task.
//!
//! Nothing needs saving for resume: everything is rebuilt at the start of each task.

use recall_sdk::losses::{clip_logits, distill_both_ways};
use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "d::temperature")]
    pub temperature: f64,
    /// Weight of the distillation term.
    #[serde(default = "d::one")]
    pub weight: f64,
    /// Weight of the L2 penalty to the task-start weights (0: off).
    #[serde(default)]
    pub l2: f64,
    /// Weight ensembling on (ZSCL's `--we`).
    #[serde(default = "d::yes")]
    pub we: bool,
    /// Steps between weight-ensembling merges (ZSCL's `avg_freq`).
    #[serde(default = "d::we_every")]
    pub we_every: u64,
}

mod d {
    pub fn temperature() -> f64 {
        2.0
    }
    pub fn one() -> f64 {
        1.0
    }
    pub fn yes() -> bool {
        true
    }
    pub fn we_every() -> u64 {
        100
    }
}

pub struct Zscl {
    cfg: Config,
    /// (name, weights at the task start): the L2 anchor.
    start: Vec<(String, Tensor)>,
    /// (name, running average): the weight ensemble.
    ensemble: Vec<(String, Tensor)>,
    merges: u64,
    steps: u64,
}

/// One weight-ensembling merge: `(n * avg + theta) / (n + 1)`.
pub fn merge_we(avg: &Tensor, theta: &Tensor, n: u64) -> Result<Tensor> {
    avg.scale(n as f64)?.add(theta)?.scale(1.0 / (n as f64 + 1.0))
}

fn trainable_copies(host: &Host) -> Result<Vec<(String, Tensor)>> {
    host.model_params()?
        .into_iter()
        .filter(|(name, _, trainable)| *trainable && !name.starts_with("strategy."))
        .map(|(name, _, _)| {
            let t = host.model_param(&name)?.copy()?;
            Ok((name, t))
        })
        .collect()
}

impl Strategy for Zscl {
    type Config = Config;

    fn create(_host: &Host, cfg: Config) -> Result<Self> {
        if cfg.temperature <= 0.0 || !cfg.temperature.is_finite() {
            return Err(Error::config("temperature", "temperature must be a positive number"));
        }
        if cfg.we_every == 0 {
            return Err(Error::config("we_every", "we_every must be at least 1"));
        }
        if cfg.l2 < 0.0 || cfg.weight < 0.0 {
            return Err(Error::config("weight", "weights must be >= 0"));
        }
        Ok(Zscl { cfg, start: Vec::new(), ensemble: Vec::new(), merges: 0, steps: 0 })
    }

    fn wants_initial_model(&self) -> bool {
        true
    }

    fn before_task(&mut self, host: &Host, _task: &TaskInfo) -> Result<()> {
        self.steps = 0;
        self.merges = 0;
        self.start = if self.cfg.l2 > 0.0 { trainable_copies(host)? } else { Vec::new() };
        self.ensemble = if self.cfg.we { trainable_copies(host)? } else { Vec::new() };
        Ok(())
    }

    fn loss_terms(&mut self, host: &Host, inputs: &[NamedTensor]) -> Result<Vec<(String, Tensor)>> {
        let scale = host.input(inputs, inputs::LOGIT_SCALE)?;
        let student = clip_logits(
            &host.input(inputs, inputs::REFERENCE_IMAGE_FEATURES)?,
            &host.input(inputs, inputs::REFERENCE_TEXT_FEATURES)?,
            &scale,
        )?;
        let teacher = clip_logits(
            &host.input(inputs, inputs::INITIAL_IMAGE_FEATURES)?.detach()?,
            &host.input(inputs, inputs::INITIAL_TEXT_FEATURES)?.detach()?,
            &host.input(inputs, inputs::INITIAL_LOGIT_SCALE)?.detach()?,
        )?;
        let loss = distill_both_ways(&student, &teacher, self.cfg.temperature, false)?;
        let mut terms = vec![("zscl".to_string(), loss.scale(self.cfg.weight)?)];
        if self.cfg.l2 > 0.0 {
            let mut sum: Option<Tensor> = None;
            for (name, anchor) in &self.start {
                let d = host.model_param(name)?.sub(anchor)?.sqr()?.sum_all()?;
                sum = Some(match sum {
                    Some(s) => s.add(&d)?,
                    None => d,
                });
            }
            if let Some(s) = sum {
                terms.push(("zscl_l2".to_string(), s.scale(self.cfg.l2)?));
            }
        }
        Ok(terms)
    }

    fn after_step(&mut self, host: &Host, _step: u64) -> Result<()> {
        self.steps += 1;
        if self.cfg.we && self.steps.is_multiple_of(self.cfg.we_every) {
            self.merges += 1;
            for (name, avg) in &mut self.ensemble {
                let theta = host.model_param(name)?.detach()?;
                *avg = merge_we(avg, &theta, self.merges)?;
            }
        }
        Ok(())
    }

    fn after_task(&mut self, host: &Host, _task: &TaskInfo) -> Result<()> {
        if self.cfg.we && self.merges > 0 {
            for (name, avg) in &self.ensemble {
                host.param_assign(&host.model_param(name)?, avg)?;
            }
        }
        self.ensemble.clear();
        self.start.clear();
        Ok(())
    }
}

recall_sdk::export_plugin! {
    name: "zscl",
    description: "ZSCL: distillation from the initial model on reference data, plus weight ensembling",
    strategy: Zscl,
}
