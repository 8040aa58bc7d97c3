//! `der`: Dark Experience Replay++ (Buzzega et al., 2020) for CLIP.
//!
//! The host keeps an exemplar memory of `memory` training examples (reservoir sampling by
//! default, as DER does) together with the image and text features the model computed for
//! each when it entered: DER's "logits" are, for a dual encoder, its two feature vectors. At
//! every step `batch_size` exemplars go through a forward of their own and two terms join
//! the task loss:
//!
//! - `der_mse = alpha * (mse(img, stored_img) + mse(txt, stored_txt)) / 2`, PyTorch's
//!   mean-reduced MSE on the raw (unnormalised) features: keep the old responses;
//! - `der_clip = beta * clip_loss(img, txt)`: the contrastive loss on the replayed pairs (the
//!   "++", which DER++ computes on the exemplars' labels).
//!
//! `beta = 0` is plain DER. DER++ draws two separate buffer batches for its two terms; here
//! both terms read one batch (one replay forward per step instead of two).

use recall_sdk::losses::{clip_loss, mse};
use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Exemplars kept (the budget, in examples).
    pub memory: usize,
    #[serde(default = "d::policy")]
    pub policy: ReplayPolicy,
    /// Exemplars replayed per step.
    #[serde(default = "d::batch_size")]
    pub batch_size: usize,
    /// Weight of the feature-matching term.
    #[serde(default = "d::alpha")]
    pub alpha: f64,
    /// Weight of the contrastive term on the replayed pairs (0: DER).
    #[serde(default = "d::beta")]
    pub beta: f64,
}

mod d {
    use recall_sdk::ReplayPolicy;
    pub fn policy() -> ReplayPolicy {
        ReplayPolicy::Reservoir
    }
    pub fn batch_size() -> usize {
        32
    }
    pub fn alpha() -> f64 {
        0.1
    }
    pub fn beta() -> f64 {
        0.5
    }
}

pub struct Der {
    request: Replay,
    alpha: f64,
    beta: f64,
}

impl Strategy for Der {
    type Config = Config;

    fn create(_host: &Host, cfg: Config) -> Result<Self> {
        for (key, v) in [("alpha", cfg.alpha), ("beta", cfg.beta)] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::config(key, format!("{key} must be a finite number >= 0")));
            }
        }
        let request = Replay::from_config(cfg.memory, cfg.policy, cfg.batch_size, ReplayMode::Separate, true)?;
        Ok(Der { request, alpha: cfg.alpha, beta: cfg.beta })
    }

    fn replay(&self) -> Option<Replay> {
        Some(self.request)
    }

    fn loss_terms(&mut self, host: &Host, inputs: &[NamedTensor]) -> Result<Vec<(String, Tensor)>> {
        let Some(img) = host.find_input(inputs, inputs::REPLAY_IMAGE_FEATURES)? else { return Ok(Vec::new()) };
        let txt = host.input(inputs, inputs::REPLAY_TEXT_FEATURES)?;
        let stored_img = host.input(inputs, inputs::REPLAY_STORED_IMAGE_FEATURES)?;
        let stored_txt = host.input(inputs, inputs::REPLAY_STORED_TEXT_FEATURES)?;
        let matching = mse(&img, &stored_img)?.add(&mse(&txt, &stored_txt)?)?.scale(0.5 * self.alpha)?;
        let scale = host.input(inputs, inputs::LOGIT_SCALE)?;
        let contrastive = clip_loss(&img, &txt, &scale)?.scale(self.beta)?;
        Ok(vec![("der_mse".to_string(), matching), ("der_clip".to_string(), contrastive)])
    }
}

recall_sdk::export_plugin! {
    name: "der",
    description: "Dark Experience Replay++: replayed exemplars keep the features they had, plus their contrastive loss",
    strategy: Der,
}
