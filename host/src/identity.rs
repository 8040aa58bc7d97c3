//! A run's identity: every resolved config key and every plugin the experiment uses (name,
//! version, SDK, SHA-256 of the library), saved as `config.identity.json` when the run
//! starts. `--resume` compares it with the run as it would continue, so an edited
//! `config.resolved.toml` or a rebuilt plugin cannot mix two configurations into one result.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::config::ExperimentConfig;
use crate::loader::Registry;

pub const FILE: &str = "config.identity.json";

/// Flattened config keys (`optimizer.lr`, `task.0.name`) and `plugin.NAME` entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// SHA-256 over `keys` in order: one value to compare or quote.
    pub sha256: String,
    pub keys: BTreeMap<String, String>,
    /// The keys of `keys` that plugins filled in as defaults; `None` in identities written
    /// before plugins reported their defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<std::collections::BTreeSet<String>>,
}

/// One key that differs between the identity a run started with and the one it resumes with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub key: String,
    /// `None`: the key was absent.
    pub before: Option<String>,
    pub after: Option<String>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(absent)".into());
        write!(f, "`{}`: {} when the run started, {} now", self.key, show(&self.before), show(&self.after))
    }
}

/// The plugin names an experiment loads.
pub fn plugins_used(c: &ExperimentConfig) -> Vec<&str> {
    let m = &c.model;
    let mut names: Vec<&str> = [&m.tokenizer, &m.vision, &m.text].iter().map(|p| p.plugin.as_str()).collect();
    names.extend(m.image_tokenizer.iter().map(|p| p.plugin.as_str()));
    names.extend(c.adapter.iter().map(|a| a.plugin.as_str()));
    names.extend(c.strategies.iter().map(|s| s.plugin.as_str()));
    names.extend(c.evaluators.iter().map(|e| e.plugin.as_str()));
    names.extend(c.teacher.iter().map(|t| t.vision.plugin.as_str()));
    names.retain(|n| !n.is_empty());
    names.sort_unstable();
    names.dedup();
    names
}

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", h.finalize()))
}

/// Keys that change how fast batches come or how often a run is checkpointed, never a number
/// it reports: a resume may change them.
pub const SPEED_ONLY: [&str; 7] = [
    "data.workers",
    "data.prefetch",
    "data.cache",
    "data.cache_budget_mb",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes",
    "train.log_every_steps",
];

/// The identity of `c` as run with the plugins of `registry`. Tracking settings are left out:
/// where events are delivered does not change a result; so are the pipeline's speed settings.
pub fn of(resolved: &crate::resolved::Resolved, registry: &Registry) -> anyhow::Result<Identity> {
    let c = &resolved.config;
    let mut keys: BTreeMap<String, String> =
        crate::tracking::config_params(c)?.into_iter().filter(|(k, _)| !SPEED_ONLY.contains(&k.as_str())).collect();
    for name in plugins_used(c) {
        if let Some(p) = registry.plugins.iter().find(|p| p.name == name) {
            let hash = file_sha256(&p.path)?;
            keys.insert(format!("plugin.{name}"), format!("{} (sdk {}, sha256 {hash})", p.version, p.sdk_version));
        }
    }
    let mut h = sha2::Sha256::new();
    for (k, v) in &keys {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    Ok(Identity { sha256: format!("{:x}", h.finalize()), keys, defaults: Some(resolved.defaults.clone()) })
}

/// Every key whose value differs, in key order.
pub fn changes(before: &Identity, after: &Identity) -> Vec<Change> {
    let all: std::collections::BTreeSet<&String> = before.keys.keys().chain(after.keys.keys()).collect();
    all.into_iter()
        .filter(|k| before.keys.get(*k) != after.keys.get(*k))
        .map(|k| Change { key: k.clone(), before: before.keys.get(k).cloned(), after: after.keys.get(k).cloned() })
        .collect()
}

/// Whether `--allow-config-change KEY` covers `key`: the key itself, or a section above it
/// (`optimizer` allows `optimizer.lr`).
fn allowed(key: &str, allow: &[String]) -> bool {
    allow.iter().any(|a| key == a || key.strip_prefix(a.as_str()).is_some_and(|rest| rest.starts_with('.')))
}

/// Check a resumed run against the identity it started with. Returns the allowed changes
/// (to record); any other change is an error that lists every differing key.
pub fn check_resume(run_dir: &Path, current: &Identity, allow: &[String]) -> anyhow::Result<Vec<Change>> {
    let file = run_dir.join(FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                "{} has no {FILE} (a run started by an older Recall): its config cannot be checked",
                run_dir.display()
            );
            return Ok(Vec::new());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    let saved: Identity =
        serde_json::from_str(&text).with_context(|| format!("{} is not a Recall identity file", file.display()))?;
    let mut all = changes(&saved, current);
    if saved.defaults.is_none() {
        // Started before plugins reported their defaults: a default now recorded was in
        // effect then too, unwritten.
        let now = current.defaults.clone().unwrap_or_default();
        all.retain(|c| !(c.before.is_none() && now.contains(&c.key)));
    }
    let (ok, refused): (Vec<Change>, Vec<Change>) = all.into_iter().partition(|c| allowed(&c.key, allow));
    if !refused.is_empty() {
        let list: Vec<String> = refused.iter().map(|c| format!("  {c}")).collect();
        anyhow::bail!(
            "{} cannot be resumed as it is: its configuration changed since it started, so the result would mix \
             two configurations:\n{}\nrestore config.resolved.toml (or the plugin), start a fresh run, or accept \
             the change with `--allow-config-change KEY` (recorded in run.json)",
            run_dir.display(),
            list.join("\n")
        );
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(pairs: &[(&str, &str)]) -> Identity {
        Identity {
            sha256: String::new(),
            keys: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            defaults: Some(Default::default()),
        }
    }

    /// A run started before plugins reported their defaults resumes: the defaults now
    /// recorded are not changes; a default that differs from a written value still is.
    #[test]
    fn defaults_recorded_since_an_older_start_are_not_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut before = identity(&[("adapter.rank", "8")]);
        before.defaults = None;
        std::fs::write(tmp.path().join(FILE), serde_json::to_string(&before).unwrap()).unwrap();
        let mut after = identity(&[("adapter.rank", "8"), ("adapter.rslora", "false")]);
        after.defaults = Some(["adapter.rslora".to_string()].into());
        assert!(check_resume(tmp.path(), &after, &[]).unwrap().is_empty());
        after.keys.insert("adapter.alpha".into(), "16".into());
        let e = check_resume(tmp.path(), &after, &[]).unwrap_err().to_string();
        assert!(e.contains("adapter.alpha") && !e.contains("adapter.rslora"), "{e}");
    }

    #[test]
    fn changes_name_every_key_and_allowances_are_by_key_or_section() {
        let tmp = tempfile::tempdir().unwrap();
        let before = identity(&[("optimizer.lr", "0.001"), ("train.epochs", "2"), ("plugin.ckc", "0.1.0")]);
        std::fs::write(tmp.path().join(FILE), serde_json::to_string(&before).unwrap()).unwrap();
        let after = identity(&[("optimizer.lr", "0.01"), ("train.epochs", "2"), ("optimizer.grad_clip", "1")]);
        let e = check_resume(tmp.path(), &after, &[]).unwrap_err().to_string();
        assert!(e.contains("`optimizer.lr`: 0.001 when the run started, 0.01 now"), "{e}");
        assert!(e.contains("`optimizer.grad_clip`: (absent) when the run started, 1 now"), "{e}");
        assert!(e.contains("`plugin.ckc`: 0.1.0 when the run started, (absent) now"), "{e}");
        assert!(!e.contains("train.epochs"), "{e}");
        let partly = check_resume(tmp.path(), &after, &["optimizer".into()]).unwrap_err().to_string();
        assert!(!partly.contains("optimizer.lr") && partly.contains("plugin.ckc"), "{partly}");
        let ok = check_resume(tmp.path(), &after, &["optimizer".into(), "plugin.ckc".into()]).unwrap();
        assert_eq!(ok.len(), 3);
        assert!(
            check_resume(tmp.path(), &after, &["optim".into(), "plugin.ckc".into()]).is_err(),
            "prefixes are whole keys"
        );
        assert!(check_resume(tmp.path(), &before, &[]).unwrap().is_empty());
    }
}
