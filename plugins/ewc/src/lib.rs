//! `ewc`: Elastic Weight Consolidation with the empirical Fisher, as the reference code
//! computes it: after each task, the squared gradients of the task loss (true pairs) on
//! `fisher_batches` batches of that task's training data, averaged over batches. The penalty
//! on later tasks is `lambda * sum_i F_i (theta_i - theta*_i)^2` (`convention = "full"`,
//! Avalanche) or half of it (`"half"`, PyCIL and C-CLIP's code, the default).
//!
//! - `mode = "standard"`: one (F, theta*) pair per finished task; the penalties add up.
//! - `mode = "online"`: `F <- gamma * F + F_new`, and the penalty pulls towards the latest
//!   theta* only (Schwarz et al.'s online EWC).
//!
//! When the Fisher is estimated (`fisher`):
//! - `"after-task"` (the default, as the reference code): the trained model, on the finished
//!   task's training data; the penalty starts with the second task.
//! - `"before-task"` (C-CLIP's code): at the start of each task, the model the task starts
//!   from, on the task's held-out split (C-CLIP's code uses its validation split; Recall's
//!   tasks have a train/test split only, so this reads the test split's pairs). theta* is
//!   that start, so the penalty is active from the first task. With `mode = "online"` and
//!   `gamma = 0` only the latest (F, theta*) counts: "previous task only".
//!
//! The host computes the gradients (`gradient_batches` / `on_gradients`, SDK 1.3, and
//! `gradient_pass`, SDK 1.6); this plugin only reads parameters and gradients through the SDK.

use recall_sdk::config::glob_match;
use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Standard,
    Online,
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Convention {
    /// lambda/2 * sum F (theta - theta*)^2
    Half,
    /// lambda * sum F (theta - theta*)^2
    Full,
}

/// When the Fisher and theta* are taken.
#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FisherAt {
    AfterTask,
    BeforeTask,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Penalty weight (C-CLIP's EWC baseline: 0.4).
    #[serde(default = "d::lambda")]
    pub lambda: f64,
    #[serde(default = "d::mode")]
    pub mode: Mode,
    /// Decay of the old Fisher in online mode (1.0: plain accumulation).
    #[serde(default = "d::gamma")]
    pub gamma: f64,
    #[serde(default = "d::convention")]
    pub convention: Convention,
    /// Batches the Fisher is estimated on.
    #[serde(default = "d::fisher_batches")]
    pub fisher_batches: usize,
    #[serde(default = "d::fisher")]
    pub fisher: FisherAt,
    /// Parameters to protect (globs over full names, `*` any characters); trainable ones only.
    #[serde(default = "d::params")]
    pub params: Vec<String>,
}

mod d {
    pub fn lambda() -> f64 {
        0.4
    }
    pub fn mode() -> super::Mode {
        super::Mode::Standard
    }
    pub fn gamma() -> f64 {
        1.0
    }
    pub fn convention() -> super::Convention {
        super::Convention::Half
    }
    pub fn fisher_batches() -> usize {
        16
    }
    pub fn fisher() -> super::FisherAt {
        super::FisherAt::AfterTask
    }
    pub fn params() -> Vec<String> {
        vec!["*".into()]
    }
}

/// Fisher and anchor weights of one parameter.
struct Anchor {
    name: String,
    fisher: Tensor,
    star: Tensor,
}

pub struct Ewc {
    cfg: Config,
    /// One list per consolidated task (standard), or a single list (online).
    anchors: Vec<Vec<Anchor>>,
    /// Squared gradients summed over the batches of the current gradient pass.
    accumulating: Vec<(String, Tensor)>,
    batches_seen: usize,
    /// The task whose before-task gradient pass is under way (`fisher = "before-task"`).
    awaiting_pass: Option<String>,
}

impl Ewc {
    fn selected(&self, host: &Host) -> Result<Vec<String>> {
        Ok(host
            .model_params()?
            .into_iter()
            .filter(|(name, _, trainable)| *trainable && self.cfg.params.iter().any(|p| glob_match(p, name)))
            .map(|(name, _, _)| name)
            .collect())
    }

    /// The penalty over every anchor set, as one scalar in the graph.
    pub fn penalty(&self, host: &Host) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for set in &self.anchors {
            for a in set {
                let theta = host.model_param(&a.name)?;
                let term = theta.sub(&a.star)?.sqr()?.mul(&a.fisher)?.sum_all()?;
                total = Some(match total {
                    Some(t) => t.add(&term)?,
                    None => term,
                });
            }
        }
        let factor = match self.cfg.convention {
            Convention::Half => self.cfg.lambda / 2.0,
            Convention::Full => self.cfg.lambda,
        };
        total.map(|t| t.scale(factor)).transpose()
    }

    /// Fold a finished gradient pass into the anchors.
    fn consolidate(&mut self, host: &Host) -> Result<()> {
        let n = self.batches_seen.max(1) as f64;
        let mut set = Vec::new();
        for (name, sum) in std::mem::take(&mut self.accumulating) {
            let fisher = sum.scale(1.0 / n)?;
            let star = host.model_param(&name)?.copy()?;
            set.push(Anchor { name, fisher, star });
        }
        self.batches_seen = 0;
        match self.cfg.mode {
            Mode::Standard => self.anchors.push(set),
            Mode::Online => {
                let old = self.anchors.pop().unwrap_or_default();
                for a in &mut set {
                    if let Some(o) = old.iter().find(|o| o.name == a.name) {
                        a.fisher = o.fisher.scale(self.cfg.gamma)?.add(&a.fisher)?;
                    }
                }
                self.anchors.push(set);
            }
        }
        Ok(())
    }
}

impl Strategy for Ewc {
    type Config = Config;

    fn create(_host: &Host, cfg: Config) -> Result<Self> {
        if !(cfg.lambda >= 0.0 && cfg.lambda.is_finite()) {
            return Err(Error::config("lambda", "lambda must be a finite number >= 0"));
        }
        if !(0.0..=1.0).contains(&cfg.gamma) {
            return Err(Error::config("gamma", "gamma must be in [0, 1]"));
        }
        if cfg.fisher_batches == 0 {
            return Err(Error::config("fisher_batches", "fisher_batches must be at least 1"));
        }
        if cfg.params.is_empty() {
            return Err(Error::config("params", "params must list at least one pattern (\"*\": every parameter)"));
        }
        Ok(Ewc { cfg, anchors: Vec::new(), accumulating: Vec::new(), batches_seen: 0, awaiting_pass: None })
    }

    fn loss_terms(&mut self, host: &Host, _inputs: &[NamedTensor]) -> Result<Vec<(String, Tensor)>> {
        // A before-task pass has ended when the task's first step asks for the loss.
        if let Some(task) = self.awaiting_pass.take() {
            if self.batches_seen == 0 {
                host.log(
                    recall_sdk::LogLevel::Warn,
                    &format!("ewc: task `{task}` has no held-out batches for the Fisher; nothing consolidated"),
                );
            } else {
                self.consolidate(host)?;
            }
        }
        Ok(self.penalty(host)?.map(|p| vec![("ewc".to_string(), p)]).unwrap_or_default())
    }

    fn before_task(&mut self, _host: &Host, task: &TaskInfo) -> Result<()> {
        if self.cfg.fisher == FisherAt::BeforeTask {
            self.batches_seen = 0;
            self.awaiting_pass = Some(task.name.to_string());
        }
        Ok(())
    }

    fn gradient_batches(&self) -> usize {
        self.cfg.fisher_batches
    }

    fn gradient_pass(&self) -> GradientPass {
        match self.cfg.fisher {
            FisherAt::AfterTask => GradientPass::AfterTask,
            FisherAt::BeforeTask => GradientPass::BeforeTask,
        }
    }

    fn on_gradients(&mut self, host: &Host, _task: &TaskInfo, batch: u64) -> Result<()> {
        if batch == 0 {
            self.accumulating.clear();
            self.batches_seen = 0;
            let names = self.selected(host)?;
            if names.is_empty() {
                bail!("no trainable parameter matches params = {:?}", self.cfg.params);
            }
            for name in names {
                let p = host.model_param(&name)?;
                let zeros = host.full(0.0, &p.shape()?, p.dtype()?)?;
                self.accumulating.push((name, zeros));
            }
        }
        for (name, sum) in &mut self.accumulating {
            let p = host.model_param(name)?;
            if let Some(g) = host.grad(&p)? {
                *sum = sum.add(&g.detach()?.sqr()?)?;
            }
        }
        self.batches_seen += 1;
        Ok(())
    }

    fn after_task(&mut self, host: &Host, task: &TaskInfo) -> Result<()> {
        if self.cfg.fisher == FisherAt::BeforeTask {
            return Ok(());
        }
        if self.batches_seen == 0 {
            host.log(
                recall_sdk::LogLevel::Warn,
                &format!("ewc: task `{}` gave no gradient batches; nothing consolidated", task.name),
            );
            return Ok(());
        }
        self.consolidate(host)
    }

    fn save_state(&self, _host: &Host) -> Result<Vec<u8>> {
        let mut named: Vec<(String, &Tensor)> = Vec::new();
        for (k, set) in self.anchors.iter().enumerate() {
            for a in set {
                named.push((format!("{k}/fisher/{}", a.name), &a.fisher));
                named.push((format!("{k}/star/{}", a.name), &a.star));
            }
        }
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        recall_sdk::state::encode(&refs)
    }

    fn load_state(&mut self, host: &Host, bytes: &[u8]) -> Result<()> {
        let mut sets: Vec<Vec<Anchor>> = Vec::new();
        let mut pending: Vec<(usize, String, Tensor)> = Vec::new();
        for (key, t) in recall_sdk::state::decode(host, bytes)? {
            // Saved as f32; back to the parameter's dtype.
            let t = match key.rsplit_once('/') {
                Some((_, name)) if !name.is_empty() => t.to_dtype(host.model_param(name)?.dtype()?)?,
                _ => t,
            };
            let mut parts = key.splitn(3, '/');
            let (Some(k), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
                bail!("ewc state: bad entry `{key}`");
            };
            let k: usize = k.parse().map_err(|_| Error::new(format!("ewc state: bad entry `{key}`")))?;
            match kind {
                "fisher" => pending.push((k, name.to_string(), t)),
                "star" => {
                    let i = pending
                        .iter()
                        .position(|(pk, pn, _)| *pk == k && pn == name)
                        .ok_or_else(|| Error::new(format!("ewc state: `{key}` has no Fisher before it")))?;
                    let (_, name, fisher) = pending.remove(i);
                    while sets.len() <= k {
                        sets.push(Vec::new());
                    }
                    sets[k].push(Anchor { name, fisher, star: t });
                }
                _ => bail!("ewc state: bad entry `{key}`"),
            }
        }
        self.anchors = sets;
        Ok(())
    }
}

recall_sdk::export_plugin! {
    name: "ewc",
    description: "Elastic Weight Consolidation (empirical Fisher; standard or online)",
    strategy: Ewc,
}
