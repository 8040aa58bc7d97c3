//! `replay`: experience replay (ER) for image-text pairs.
//!
//! The host keeps an exemplar memory of `memory` training examples (reservoir sampling over
//! every example the steps see, or task- or class-balanced after each task) and draws
//! `batch_size` of them at every step, through the training transform, each with the caption
//! it entered with.
//!
//! - `mode = "join"` (the default, ER as Mammoth and Avalanche run it): the exemplars join the
//!   step's batch; the task loss (CLIP's contrastive loss) covers both, so current and old
//!   pairs are each other's negatives. The plugin adds no term of its own.
//! - `mode = "separate"`: the exemplars have a forward of their own and a term
//!   `replay = weight * clip_loss(replay features)`; current and old pairs never meet.
//!
//! The memory is saved with every checkpoint, so a resumed run replays what an unbroken one
//! does.

use recall_sdk::losses::clip_loss;
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
    #[serde(default = "d::mode")]
    pub mode: ReplayMode,
    /// The weight of the separate replay term (separate mode only).
    pub weight: Option<f64>,
}

mod d {
    use recall_sdk::{ReplayMode, ReplayPolicy};
    pub fn policy() -> ReplayPolicy {
        ReplayPolicy::Reservoir
    }
    pub fn batch_size() -> usize {
        32
    }
    pub fn mode() -> ReplayMode {
        ReplayMode::Join
    }
}

pub struct ExperienceReplay {
    request: Replay,
    weight: f64,
}

impl Strategy for ExperienceReplay {
    type Config = Config;

    fn create(_host: &Host, cfg: Config) -> Result<Self> {
        let weight =
            match (cfg.mode, cfg.weight) {
                (ReplayMode::Join, Some(_)) => return Err(Error::config(
                    "weight",
                    "weight applies to mode = \"separate\" only: joined exemplars share the task loss; drop weight or \
                     set mode = \"separate\"",
                )),
                (_, Some(w)) if !w.is_finite() || w < 0.0 => {
                    return Err(Error::config("weight", "weight must be a finite number >= 0"))
                }
                (_, w) => w.unwrap_or(1.0),
            };
        let request = Replay::from_config(cfg.memory, cfg.policy, cfg.batch_size, cfg.mode, false)?;
        Ok(ExperienceReplay { request, weight })
    }

    fn replay(&self) -> Option<Replay> {
        Some(self.request)
    }

    fn loss_terms(&mut self, host: &Host, inputs: &[NamedTensor]) -> Result<Vec<(String, Tensor)>> {
        let Some(img) = host.find_input(inputs, inputs::REPLAY_IMAGE_FEATURES)? else { return Ok(Vec::new()) };
        let txt = host.input(inputs, inputs::REPLAY_TEXT_FEATURES)?;
        let scale = host.input(inputs, inputs::LOGIT_SCALE)?;
        Ok(vec![("replay".to_string(), clip_loss(&img, &txt, &scale)?.scale(self.weight)?)])
    }
}

recall_sdk::export_plugin! {
    name: "replay",
    description: "Experience replay for image-text pairs: a host-kept exemplar memory joined to each batch",
    strategy: ExperienceReplay,
}
