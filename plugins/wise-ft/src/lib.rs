//! `wise-ft`: weight-space ensembling (Wortsman et al.). After each task the weights become
//! `alpha * theta_ft + (1 - alpha) * theta_anchor`, where the anchor is the model before the
//! first task (`anchor = "initial"`, the zero-shot model, as the reference code) or the model
//! before the task just trained (`anchor = "previous"`).
//!
//! The anchor is one copy of the selected parameters, taken once (initial) or refreshed after
//! each interpolation (previous); it is saved with the strategy state for resume.

use recall_sdk::config::glob_match;
use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Anchor {
    Initial,
    Previous,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Weight of the fine-tuned model (0.8 is typical; 1.0: no ensembling).
    #[serde(default = "d::alpha")]
    pub alpha: f64,
    #[serde(default = "d::anchor")]
    pub anchor: Anchor,
    /// Parameters to interpolate (globs over full names; `*` any characters).
    #[serde(default = "d::params")]
    pub params: Vec<String>,
}

mod d {
    pub fn alpha() -> f64 {
        0.8
    }
    pub fn anchor() -> super::Anchor {
        super::Anchor::Initial
    }
    pub fn params() -> Vec<String> {
        vec!["*".into()]
    }
}

pub struct WiseFt {
    cfg: Config,
    /// (name, anchor weights); empty until the first task starts.
    anchor: Vec<(String, Tensor)>,
}

/// `alpha * theta + (1 - alpha) * anchor`.
pub fn interpolate(theta: &Tensor, anchor: &Tensor, alpha: f64) -> Result<Tensor> {
    theta.scale(alpha)?.add(&anchor.scale(1.0 - alpha)?)
}

impl WiseFt {
    fn snapshot(&mut self, host: &Host) -> Result<()> {
        self.anchor.clear();
        for (name, _, _) in host.model_params()? {
            if !name.starts_with("strategy.") && self.cfg.params.iter().any(|p| glob_match(p, &name)) {
                let t = host.model_param(&name)?.copy()?;
                self.anchor.push((name, t));
            }
        }
        if self.anchor.is_empty() {
            bail!("no model parameter matches params = {:?}", self.cfg.params);
        }
        Ok(())
    }
}

impl Strategy for WiseFt {
    type Config = Config;

    fn create(_host: &Host, cfg: Config) -> Result<Self> {
        if !(0.0..=1.0).contains(&cfg.alpha) {
            return Err(Error::config("alpha", "alpha must be in [0, 1]"));
        }
        if cfg.params.is_empty() {
            return Err(Error::config("params", "params must list at least one pattern (\"*\": every parameter)"));
        }
        Ok(WiseFt { cfg, anchor: Vec::new() })
    }

    fn before_task(&mut self, host: &Host, task: &TaskInfo) -> Result<()> {
        if self.anchor.is_empty() || (task.index == 0 && self.cfg.anchor == Anchor::Initial) {
            self.snapshot(host)?;
        }
        Ok(())
    }

    fn after_task(&mut self, host: &Host, _task: &TaskInfo) -> Result<()> {
        for (name, anchor) in &self.anchor {
            let p = host.model_param(name)?;
            let mixed = interpolate(&p.detach()?, anchor, self.cfg.alpha)?;
            host.param_assign(&p, &mixed)?;
        }
        if self.cfg.anchor == Anchor::Previous {
            self.snapshot(host)?;
        }
        Ok(())
    }

    fn save_state(&self, _host: &Host) -> Result<Vec<u8>> {
        let refs: Vec<(&str, &Tensor)> = self.anchor.iter().map(|(n, t)| (n.as_str(), t)).collect();
        recall_sdk::state::encode(&refs)
    }

    fn load_state(&mut self, host: &Host, bytes: &[u8]) -> Result<()> {
        // Saved as f32; back to each parameter's dtype.
        self.anchor = recall_sdk::state::decode(host, bytes)?
            .into_iter()
            .map(|(n, t)| {
                let dtype = host.model_param(&n)?.dtype()?;
                Ok((n, t.to_dtype(dtype)?))
            })
            .collect::<Result<_>>()?;
        Ok(())
    }
}

recall_sdk::export_plugin! {
    name: "wise-ft",
    description: "WiSE-FT weight interpolation with the initial (or previous) model after each task",
    strategy: WiseFt,
}
