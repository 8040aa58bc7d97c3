//! `lora`: Low-Rank Adaptation on the linear sites an encoder declares.
//!
//! For each targeted site with weight W [out, in]: `delta(x) = scale * dropout(x) A^T B^T`,
//! A [r, in] initialised as PEFT does (Kaiming-uniform with a = sqrt 5, i.e. U(-1/sqrt(in),
//! 1/sqrt(in))), B [out, r] zero, so the adapted model starts equal to the base model.
//! `scale = alpha / r`, or `alpha / sqrt(r)` with `rslora`. Merging folds the adapter into
//! the base weight: `W <- W + coefficient * scale * B A` (C-CLIP merges with coefficient 0.5).

use globset::{Glob, GlobSet, GlobSetBuilder};
use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Rank r of the update.
    #[serde(default = "d::rank")]
    pub rank: usize,
    /// lora_alpha (PEFT's name): the update is scaled by alpha / r.
    #[serde(default = "d::alpha")]
    pub alpha: f64,
    /// Dropout on the adapter's input.
    #[serde(default)]
    pub dropout: f64,
    /// Glob patterns over site names (e.g. `vision.blocks.*.attn.*`); default every site.
    #[serde(default = "d::targets")]
    pub targets: Vec<String>,
    /// Rank-stabilised scaling alpha / sqrt(r).
    #[serde(default)]
    pub rslora: bool,
}

mod d {
    pub fn rank() -> usize {
        16
    }
    pub fn alpha() -> f64 {
        32.0
    }
    pub fn targets() -> Vec<String> {
        vec!["*".to_string()]
    }
}

struct Adapted {
    site: u32,
    a: Tensor,
    b: Tensor,
}

pub struct Lora {
    scale: f64,
    dropout: f64,
    adapted: Vec<Adapted>,
}

fn glob_set(patterns: &[String]) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let g = Glob::new(p).map_err(|e| Error::config("targets", format!("invalid glob `{p}`: {e}")))?;
        b.add(g);
    }
    b.build().map_err(|e| Error::config("targets", e.to_string()))
}

impl Adapter for Lora {
    type Config = Config;

    fn create(host: &Host, cfg: Config, sites: &[SiteInfo]) -> Result<Self> {
        if cfg.rank == 0 {
            return Err(Error::config("rank", "rank must be at least 1"));
        }
        if !(0.0..1.0).contains(&cfg.dropout) {
            return Err(Error::config("dropout", format!("dropout must be in [0, 1), got {}", cfg.dropout)));
        }
        // Every pattern must match something: a typo in a target would otherwise silently
        // train nothing.
        for p in &cfg.targets {
            let one = glob_set(std::slice::from_ref(p))?;
            if !sites.iter().any(|s| one.is_match(s.name.as_str())) {
                let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
                return Err(Error::config(
                    "targets",
                    format!("target `{p}` matches no adapter site; sites are: {}", names.join(", ")),
                ));
            }
        }
        let set = glob_set(&cfg.targets)?;
        let r = cfg.rank;
        // A delta B·A has rank at most min(in, out): a larger rank only adds parameters.
        if let Some(s) = sites
            .iter()
            .filter(|s| set.is_match(s.name.as_str()))
            .min_by_key(|s| s.in_features.min(s.out_features))
            .filter(|s| (s.in_features.min(s.out_features) as usize) < r)
        {
            return Err(Error::config(
                "rank",
                format!(
                    "rank {r} exceeds what site `{}` ({} -> {} features) can use: a LoRA delta's rank is at most \
                     min(in, out) = {}; choose a rank of at most {}",
                    s.name,
                    s.in_features,
                    s.out_features,
                    s.in_features.min(s.out_features),
                    s.in_features.min(s.out_features)
                ),
            ));
        }
        let mut adapted = Vec::new();
        for s in sites.iter().filter(|s| set.is_match(s.name.as_str())) {
            let (inp, out) = (s.in_features as usize, s.out_features as usize);
            let bound = 1.0 / (inp as f64).sqrt();
            let a = host.param(&format!("{}.lora_A", s.name), &[r, inp], ParamInit::uniform(-bound, bound), true)?;
            let b = host.param(&format!("{}.lora_B", s.name), &[out, r], ParamInit::zeros(), true)?;
            adapted.push(Adapted { site: s.id, a, b });
        }
        let scale = if cfg.rslora { cfg.alpha / (r as f64).sqrt() } else { cfg.alpha / r as f64 };
        Ok(Lora { scale, dropout: cfg.dropout, adapted })
    }

    fn targets(&self) -> Vec<u32> {
        self.adapted.iter().map(|a| a.site).collect()
    }

    fn delta(&self, _host: &Host, site: u32, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(ad) = self.adapted.iter().find(|a| a.site == site) else {
            return Ok(None);
        };
        let x = if self.dropout > 0.0 { x.dropout(self.dropout)? } else { x.clone() };
        // The scale goes on the rank-r intermediate: the same product, and r / out of the
        // element-wise work of scaling the [.., out] result.
        let y = x.matmul(&ad.a.t()?)?.scale(self.scale)?.matmul(&ad.b.t()?)?;
        Ok(Some(y))
    }

    fn merge(&mut self, host: &Host, coefficient: f64) -> Result<()> {
        for ad in &self.adapted {
            let w = host.site_weight(Site(ad.site))?;
            let update = ad.b.matmul(&ad.a)?.scale(coefficient * self.scale)?;
            host.param_assign(&w, &w.add(&update)?)?;
        }
        Ok(())
    }

    fn reset(&mut self, host: &Host) -> Result<()> {
        for ad in &self.adapted {
            host.param_reset(&ad.a)?;
            host.param_reset(&ad.b)?;
        }
        Ok(())
    }
}

recall_sdk::export_plugin! {
    name: "lora",
    description: "LoRA adapter on declared linear sites (rank, alpha, dropout, glob targets, rsLoRA, merge)",
    adapter: Lora,
}
