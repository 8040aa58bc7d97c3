//! `finetune`: the no-consolidation baseline. It adds no loss term and keeps no state; the
//! model trains on each task with the task loss alone (plus whatever adapter is configured).

use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

/// `finetune` takes no options.
#[derive(Deserialize, Serialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {}

pub struct Finetune;

impl Strategy for Finetune {
    type Config = Config;

    fn create(_host: &Host, _cfg: Config) -> Result<Self> {
        Ok(Finetune)
    }
}

recall_sdk::export_plugin! {
    name: "finetune",
    description: "plain sequential fine-tuning: no consolidation term",
    strategy: Finetune,
}
