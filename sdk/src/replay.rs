//! The exemplar memory a strategy can ask the host for ([`crate::Strategy::replay`]): the
//! host keeps it, saves it with the run's checkpoints, draws a replay batch from it at every
//! step, and hands the strategy that batch's features (or joins it to the step's batch).

use serde::Deserialize;

use crate::abi::{
    ReplaySpec, REPLAY_MODE_JOIN, REPLAY_MODE_SEPARATE, REPLAY_POLICY_CLASS_BALANCED, REPLAY_POLICY_RESERVOIR,
    REPLAY_POLICY_TASK_BALANCED,
};

/// How the memory is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplayPolicy {
    /// Reservoir sampling over the stream of training examples the steps see (every epoch's),
    /// as experience replay and DER do: each example seen so far is in the memory with equal
    /// probability; the current task's included.
    Reservoir,
    /// After each task the budget is split evenly over the tasks seen; each task keeps a
    /// random subset of its training examples.
    TaskBalanced,
    /// After each task the budget is split evenly over the classes seen (a task's `class`
    /// labels; every task must have them).
    ClassBalanced,
}

impl ReplayPolicy {
    /// The name configs use.
    pub fn name(self) -> &'static str {
        match self {
            ReplayPolicy::Reservoir => "reservoir",
            ReplayPolicy::TaskBalanced => "task-balanced",
            ReplayPolicy::ClassBalanced => "class-balanced",
        }
    }
}

/// Where a replay batch goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplayMode {
    /// The exemplars join the step's batch: one forward, the task loss over both.
    Join,
    /// The exemplars have a forward of their own; the strategy receives their features
    /// (`inputs::REPLAY_IMAGE_FEATURES`, ...) and builds its own terms.
    Separate,
}

/// A strategy's request for an exemplar memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replay {
    /// Exemplars kept (examples, not bytes); at least 1.
    pub budget: usize,
    pub policy: ReplayPolicy,
    /// Exemplars drawn (uniformly, without replacement) for each step; at least 1.
    pub batch_size: usize,
    pub mode: ReplayMode,
    /// Keep each exemplar's features from when it entered the memory (DER's targets).
    pub store_features: bool,
}

impl Replay {
    /// A request from a plugin's config keys `memory` (the budget) and `batch_size`, each
    /// checked: 0 is a config error naming the key.
    pub fn from_config(
        memory: usize,
        policy: ReplayPolicy,
        batch_size: usize,
        mode: ReplayMode,
        store_features: bool,
    ) -> crate::Result<Self> {
        if memory == 0 {
            return Err(crate::Error::config("memory", "memory (the exemplars kept) must be at least 1"));
        }
        if batch_size == 0 {
            return Err(crate::Error::config(
                "batch_size",
                "batch_size (exemplars replayed per step) must be at least 1",
            ));
        }
        Ok(Replay { budget: memory, policy, batch_size, mode, store_features })
    }

    /// The ABI form.
    pub fn to_spec(self) -> ReplaySpec {
        ReplaySpec {
            budget: self.budget as u64,
            policy: match self.policy {
                ReplayPolicy::Reservoir => REPLAY_POLICY_RESERVOIR,
                ReplayPolicy::TaskBalanced => REPLAY_POLICY_TASK_BALANCED,
                ReplayPolicy::ClassBalanced => REPLAY_POLICY_CLASS_BALANCED,
            },
            batch_size: self.batch_size as u64,
            mode: match self.mode {
                ReplayMode::Join => REPLAY_MODE_JOIN,
                ReplayMode::Separate => REPLAY_MODE_SEPARATE,
            },
            store_features: self.store_features,
        }
    }

    /// The request an ABI spec carries: `Ok(None)` for no memory (budget 0), `Err` naming
    /// a code this SDK does not know.
    pub fn from_spec(spec: ReplaySpec) -> Result<Option<Self>, String> {
        if spec.budget == 0 {
            return Ok(None);
        }
        let policy = match spec.policy {
            REPLAY_POLICY_RESERVOIR => ReplayPolicy::Reservoir,
            REPLAY_POLICY_TASK_BALANCED => ReplayPolicy::TaskBalanced,
            REPLAY_POLICY_CLASS_BALANCED => ReplayPolicy::ClassBalanced,
            other => return Err(format!("unknown replay policy code {other}")),
        };
        let mode = match spec.mode {
            REPLAY_MODE_JOIN => ReplayMode::Join,
            REPLAY_MODE_SEPARATE => ReplayMode::Separate,
            other => return Err(format!("unknown replay mode code {other}")),
        };
        if spec.batch_size == 0 {
            return Err("a replay batch size of 0".into());
        }
        Ok(Some(Replay {
            budget: spec.budget as usize,
            policy,
            batch_size: spec.batch_size as usize,
            mode,
            store_features: spec.store_features,
        }))
    }
}

/// "No memory", the spec of strategies that do not replay.
pub fn no_replay() -> ReplaySpec {
    ReplaySpec {
        budget: 0,
        policy: REPLAY_POLICY_RESERVOIR,
        batch_size: 0,
        mode: REPLAY_MODE_JOIN,
        store_features: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_survives_its_abi_form() {
        for policy in [ReplayPolicy::Reservoir, ReplayPolicy::TaskBalanced, ReplayPolicy::ClassBalanced] {
            for mode in [ReplayMode::Join, ReplayMode::Separate] {
                let r = Replay { budget: 200, policy, batch_size: 32, mode, store_features: true };
                assert_eq!(Replay::from_spec(r.to_spec()), Ok(Some(r)));
            }
        }
        assert_eq!(Replay::from_spec(no_replay()), Ok(None));
    }

    #[test]
    fn unknown_codes_are_errors() {
        let mut spec = Replay {
            budget: 10,
            policy: ReplayPolicy::Reservoir,
            batch_size: 4,
            mode: ReplayMode::Join,
            store_features: false,
        }
        .to_spec();
        spec.policy = 9;
        assert!(Replay::from_spec(spec).unwrap_err().contains("policy code 9"));
        spec.policy = REPLAY_POLICY_RESERVOIR;
        spec.batch_size = 0;
        assert!(Replay::from_spec(spec).is_err());
    }
}
