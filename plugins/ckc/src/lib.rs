//! `ckc`: C-CLIP's Contrastive Knowledge Consolidation (REFERENCES.md).
//!
//! For a batch of N pairs, the current image and text features are stacked into 2N rows and
//! passed through a learnable projector h (default Linear(D, 4D) -> BatchNorm1d -> ReLU ->
//! Linear(4D, D), one projector shared by both modalities), then L2-normalised (p). With
//! `batch_norm = "per-modality"` the projector is applied to each modality on its own, so its
//! BatchNorm statistics are per modality, as C-CLIP's code applies it; with
//! `fresh_per_task = true` it is re-initialised at the start of every task, as the code
//! creates it anew (its learning rate is an `[[optimizer.groups]]` entry like any other). The old
//! model's features on the same batch are stacked likewise and normalised (z). With
//! logits = p z^T / tau, row i's positive is column i only, and
//! loss = 1/2 [CE(p z^T / tau, diag) + CE(z p^T / tau, diag)], times `weight`.
//! tau = 1 / exp(logit_scale) (learned, as the paper's code) unless `temperature` is set.
//!
//! Inputs: `image_features`, `text_features`, `old_image_features`, `old_text_features`
//! (the host provides the old ones from its frozen snapshot), `logit_scale`.
//! BatchNorm uses batch statistics (the projector is only used in training).

use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Width of the features (the joint embedding width).
    pub dim: usize,
    /// `mlp` (Linear-BN-ReLU-Linear) or `linear`.
    #[serde(default = "d::projector")]
    pub projector: String,
    /// Hidden width of the MLP projector as a multiple of `dim`.
    #[serde(default = "d::hidden_mult")]
    pub hidden_mult: usize,
    /// A fixed temperature instead of 1 / exp(logit_scale).
    pub temperature: Option<f64>,
    /// Weight of the term in the total loss.
    #[serde(default = "d::weight")]
    pub weight: f64,
    /// L2-normalise the current features before the projector (C-CLIP's code: raw, false).
    #[serde(default = "d::yes")]
    pub normalize_inputs: bool,
    /// `joint` (one BatchNorm over the stacked image and text rows) or `per-modality` (the
    /// projector applied to each modality separately).
    #[serde(default = "d::joint")]
    pub batch_norm: String,
    /// Re-initialise the projector at the start of every task after the first.
    #[serde(default)]
    pub fresh_per_task: bool,
}

mod d {
    pub fn projector() -> String {
        "mlp".into()
    }
    pub fn hidden_mult() -> usize {
        4
    }
    pub fn weight() -> f64 {
        1.0
    }
    pub fn yes() -> bool {
        true
    }
    pub fn joint() -> String {
        "joint".into()
    }
}

enum Projector {
    Linear(Site),
    Mlp { fc1: Site, bn_weight: Tensor, bn_bias: Tensor, fc2: Site },
}

pub struct Ckc {
    /// Index of the task being trained (set by `before_task`).
    task: u64,
    /// The feature width the projector was built for.
    dim: usize,
    projector: Projector,
    temperature: Option<f64>,
    weight: f64,
    normalize_inputs: bool,
    per_modality: bool,
    fresh_per_task: bool,
    /// Every parameter of the projector, for `fresh_per_task`.
    projector_params: Vec<Tensor>,
}

/// BatchNorm1d in training mode: normalise each column by the batch mean and biased variance.
fn batch_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean(&[0], true)?;
    let centered = x.sub(&mean)?;
    let var = centered.sqr()?.mean(&[0], true)?;
    centered.div(&var.add_scalar(eps)?.sqrt()?)?.mul(weight)?.add(bias)
}

/// Symmetric InfoNCE with the diagonal as positives.
fn symmetric_ce(logits: &Tensor, host: &Host) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let labels: Vec<u32> = (0..n as u32).collect();
    let idx = host.tensor_u32(&labels, &[n])?;
    logits.cross_entropy(&idx)?.add(&logits.t()?.cross_entropy(&idx)?)?.scale(0.5)
}

impl Projector {
    /// The weights and biases of the projector's layers and its BatchNorm affine.
    fn params(&self, host: &Host) -> Result<Vec<Tensor>> {
        // `param` returns an existing parameter of the same name: the sites' biases.
        let bias = |name: &str, width: usize| host.param(&format!("{name}.bias"), &[width], ParamInit::zeros(), true);
        Ok(match self {
            Projector::Linear(site) => {
                let w = host.site_weight(*site)?;
                let out = w.dim(0)?;
                vec![w, bias("projector.fc", out)?]
            }
            Projector::Mlp { fc1, bn_weight, bn_bias, fc2 } => {
                let (w1, w2) = (host.site_weight(*fc1)?, host.site_weight(*fc2)?);
                let (h, d) = (w1.dim(0)?, w2.dim(0)?);
                vec![w1, bias("projector.fc1", h)?, bn_weight.clone(), bn_bias.clone(), w2, bias("projector.fc2", d)?]
            }
        })
    }
}

impl Ckc {
    fn project(&self, host: &Host, x: &Tensor) -> Result<Tensor> {
        match &self.projector {
            Projector::Linear(site) => host.linear(*site, x),
            Projector::Mlp { fc1, bn_weight, bn_bias, fc2 } => {
                let h = batch_norm(&host.linear(*fc1, x)?, bn_weight, bn_bias, 1e-5)?.relu()?;
                host.linear(*fc2, &h)
            }
        }
    }
}

impl Strategy for Ckc {
    type Config = Config;

    fn create(host: &Host, cfg: Config) -> Result<Self> {
        if cfg.dim == 0 {
            return Err(Error::config("dim", "dim must be positive"));
        }
        if let Some(t) = cfg.temperature {
            if t <= 0.0 || !t.is_finite() {
                return Err(Error::config("temperature", "temperature must be a positive number"));
            }
        }
        let per_modality = match cfg.batch_norm.as_str() {
            "joint" => false,
            "per-modality" => true,
            other => {
                return Err(Error::config(
                    "batch_norm",
                    format!("unknown batch_norm `{other}`; expected joint or per-modality"),
                ))
            }
        };
        let d = cfg.dim;
        let std = (d as f64).powf(-0.5);
        let projector = match cfg.projector.as_str() {
            "linear" => Projector::Linear(host.declare_linear(
                "projector.fc",
                d,
                d,
                true,
                ParamInit::normal(0.0, std),
                ParamInit::zeros(),
            )?),
            "mlp" => {
                let h = d * cfg.hidden_mult.max(1);
                Projector::Mlp {
                    fc1: host.declare_linear(
                        "projector.fc1",
                        d,
                        h,
                        true,
                        ParamInit::uniform(-std, std),
                        ParamInit::zeros(),
                    )?,
                    bn_weight: host.param("projector.bn.weight", &[h], ParamInit::ones(), true)?,
                    bn_bias: host.param("projector.bn.bias", &[h], ParamInit::zeros(), true)?,
                    fc2: host.declare_linear(
                        "projector.fc2",
                        h,
                        d,
                        true,
                        ParamInit::uniform(-(h as f64).powf(-0.5), (h as f64).powf(-0.5)),
                        ParamInit::zeros(),
                    )?,
                }
            }
            other => {
                return Err(Error::config("projector", format!("unknown projector `{other}`; expected mlp or linear")))
            }
        };
        let projector_params = projector.params(host)?;
        Ok(Ckc {
            task: 0,
            dim: cfg.dim,
            projector,
            temperature: cfg.temperature,
            weight: cfg.weight,
            normalize_inputs: cfg.normalize_inputs,
            per_modality,
            fresh_per_task: cfg.fresh_per_task,
            projector_params,
        })
    }

    fn wants_old_model(&self) -> bool {
        true
    }

    fn before_task(&mut self, host: &Host, task: &TaskInfo) -> Result<()> {
        self.task = task.index;
        if self.fresh_per_task && task.index > 0 {
            for p in &self.projector_params {
                host.param_reset(p)?;
            }
        }
        Ok(())
    }

    fn loss_terms(&mut self, host: &Host, inputs: &[NamedTensor]) -> Result<Vec<(String, Tensor)>> {
        let Some((old_img, old_txt)) = host.old_features(inputs, self.task)? else {
            // The first task has no old model: nothing to consolidate.
            return Ok(Vec::new());
        };
        let img = host.input(inputs, inputs::IMAGE_FEATURES)?;
        let txt = host.input(inputs, inputs::TEXT_FEATURES)?;
        let width = img.shape()?.last().copied().unwrap_or(0);
        if width != self.dim {
            return Err(Error::config(
                "dim",
                format!("dim = {} but the model's features are {width} wide; set dim = {width}", self.dim),
            ));
        }
        let prepare = |x: Tensor| if self.normalize_inputs { x.l2_normalize(1e-12) } else { Ok(x) };
        let projected = if self.per_modality {
            let (img, txt) = (self.project(host, &prepare(img)?)?, self.project(host, &prepare(txt)?)?);
            host.cat(&[&img, &txt], 0)?
        } else {
            self.project(host, &prepare(host.cat(&[&img, &txt], 0)?)?)?
        };
        let p = projected.l2_normalize(1e-12)?;
        let z = host.cat(&[&old_img, &old_txt], 0)?.l2_normalize(1e-12)?;
        let sims = p.matmul(&z.t()?)?;
        let logits = match self.temperature {
            Some(t) => sims.scale(1.0 / t)?,
            None => sims.mul(&host.input(inputs, inputs::LOGIT_SCALE)?.exp()?)?,
        };
        Ok(vec![("ckc".to_string(), symmetric_ce(&logits, host)?.scale(self.weight)?)])
    }
}

recall_sdk::export_plugin! {
    name: "ckc",
    description: "C-CLIP contrastive knowledge consolidation (projector + InfoNCE between current and old features)",
    strategy: Ckc,
}
