//! Whether compared runs were run alike: the keys of the benchmark's protocol (tasks, held-out
//! sets, reference data, evaluators, epochs) must agree between methods, and seeds of one
//! method must differ in nothing but their seed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Keys (or key prefixes, before a `.`) that define the benchmark rather than a method.
const PROTOCOL: [&str; 6] = ["task", "zeroshot", "reference", "evaluator", "train.epochs", "train.eval_batch_size"];

/// Keys that name or place a run, never change what it computes, or differ by design
/// between seeds.
const LABELS: [&str; 4] = ["experiment.seed", "experiment.name", "experiment.method", "experiment.output_dir"];

fn is_protocol(key: &str) -> bool {
    PROTOCOL.iter().any(|p| key == *p || key.strip_prefix(p).is_some_and(|rest| rest.starts_with('.')))
}

/// A run's resolved configuration, flattened to `key = value` (empty when it cannot be read:
/// such runs are not judged), without the keys that change only speed
/// ([`crate::identity::SPEED_ONLY`]).
fn flat(file: &PathBuf) -> BTreeMap<String, String> {
    let Some(v) = std::fs::read_to_string(file).ok().and_then(|t| toml::from_str::<toml::Value>(&t).ok()) else {
        return BTreeMap::new();
    };
    let mut out = Vec::new();
    crate::tracking::flatten("", &v, &mut out);
    out.into_iter()
        .filter(|(k, _)| !k.starts_with("tracking.") && !k.starts_with("sweep."))
        .filter(|(k, _)| !crate::identity::SPEED_ONLY.contains(&k.as_str()))
        .collect()
}

/// The keys of a run's config that its plugins filled in as defaults (config.identity.json
/// beside it; none for runs from before plugins reported them).
fn plugin_defaults(file: &std::path::Path) -> BTreeSet<String> {
    let identity = file.with_file_name(crate::identity::FILE);
    std::fs::read_to_string(identity)
        .ok()
        .and_then(|t| serde_json::from_str::<crate::identity::Identity>(&t).ok())
        .and_then(|i| i.defaults)
        .unwrap_or_default()
}

/// A run's flattened config, with the keys its plugins filled in as defaults.
struct Config {
    keys: BTreeMap<String, String>,
    defaults: BTreeSet<String>,
}

impl Config {
    /// Whether `k` differs between two runs. A key one run leaves unset and the other's
    /// plugin filled in as its default is the same setting, recorded by a newer Recall.
    fn differs(&self, other: &Config, k: &str) -> bool {
        match (self.keys.get(k), other.keys.get(k)) {
            (a, b) if a == b => false,
            (None, Some(_)) => !other.defaults.contains(k),
            (Some(_), None) => !self.defaults.contains(k),
            _ => true,
        }
    }
}

/// Notes on `runs` (method, config file): protocol keys that differ between methods, and
/// keys that differ between seeds of one method.
pub fn notes(runs: &[(String, PathBuf)]) -> Vec<String> {
    let configs: Vec<(&str, Config)> = runs
        .iter()
        .map(|(m, f)| (m.as_str(), Config { keys: flat(f), defaults: plugin_defaults(f) }))
        .filter(|(_, c)| !c.keys.is_empty())
        .collect();
    let mut notes = Vec::new();
    let mut methods: Vec<&str> = configs.iter().map(|(m, _)| *m).collect();
    methods.dedup();
    let value = |c: &Config, k: &str| c.keys.get(k).cloned().unwrap_or_else(|| "(unset)".into());
    let keys = |pick: &dyn Fn(&str) -> bool| {
        let mut ks: Vec<&String> = configs.iter().flat_map(|(_, c)| c.keys.keys()).filter(|k| pick(k)).collect();
        ks.sort();
        ks.dedup();
        ks
    };
    // Seeds of one method.
    for m in &methods {
        let seeds: Vec<&Config> = configs.iter().filter(|(x, _)| x == m).map(|(_, c)| c).collect();
        let differ: Vec<String> = keys(&|k| !LABELS.contains(&k))
            .into_iter()
            .filter(|k| seeds.iter().any(|c| c.differs(seeds[0], k)))
            .map(|k| k.to_string())
            .collect();
        if !differ.is_empty() {
            notes.push(format!("the seeds of `{m}` differ in more than their seed: {}", summarize(&differ)));
        }
    }
    // The protocol between methods (each method's first run stands for it).
    let firsts: Vec<(&str, &Config)> =
        methods.iter().filter_map(|m| configs.iter().find(|(x, _)| x == m).map(|(x, c)| (*x, c))).collect();
    for k in keys(&|k| is_protocol(k)) {
        let values: Vec<(String, &str)> = firsts.iter().map(|(m, c)| (value(c, k), *m)).collect();
        if values.iter().any(|(v, _)| *v != values[0].0) {
            let shown: Vec<String> = values.iter().map(|(v, m)| format!("{m} {v}")).collect();
            notes.push(format!("`{k}` differs between methods: {}", shown.join(", ")));
        }
    }
    notes
}

/// At most five keys, then how many more.
fn summarize(keys: &[String]) -> String {
    let shown: Vec<&str> = keys.iter().take(5).map(String::as_str).collect();
    match keys.len() {
        n if n > 5 => format!("{} and {} more", shown.join(", "), n - 5),
        _ => shown.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_and_seed_differences_are_noted() {
        let d = tempfile::tempdir().unwrap();
        let write = |name: &str, seed: u64, epochs: u32, lr: f64| {
            let f = d.path().join(format!("{name}-{seed}.toml"));
            let text = format!(
                "[experiment]\nname = \"x\"\nseed = {seed}\n[optimizer]\nlr = {lr}\n[train]\nepochs = {epochs}\n\
                 [[task]]\nname = \"a\"\n"
            );
            std::fs::write(&f, text).unwrap();
            f
        };
        let runs = vec![
            ("finetune".to_string(), write("finetune", 0, 3, 0.1)),
            ("finetune".to_string(), write("finetune", 1, 3, 0.1)),
            ("lora".to_string(), write("lora", 0, 3, 0.5)),
        ];
        assert!(notes(&runs).is_empty(), "a method's own keys (lr) may differ: {:?}", notes(&runs));
        let mut odd = runs.clone();
        odd.push(("lora".to_string(), write("lora", 1, 10, 0.5)));
        odd.push(("e10".to_string(), write("e10", 0, 10, 0.1)));
        let n = notes(&odd);
        assert!(n.iter().any(|m| m.contains("seeds of `lora` differ") && m.contains("train.epochs")), "{n:?}");
        assert!(
            n.iter().any(|m| m.contains("`train.epochs` differs between methods: finetune 3, lora 3, e10 10")),
            "{n:?}"
        );
        assert!(!n.iter().any(|m| m.contains("seeds of `finetune`")), "{n:?}");
    }

    /// Speed settings never make seeds incomparable, nor does a plugin default that a newer
    /// Recall records and an older run left unwritten; a written difference still does.
    #[test]
    fn speed_keys_and_newly_recorded_defaults_are_not_differences() {
        let d = tempfile::tempdir().unwrap();
        let write = |name: &str, budget: u32, adapter: &str, defaults: Option<&[&str]>| {
            let dir = d.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let f = dir.join("config.resolved.toml");
            let text = format!(
                "[experiment]\nname = \"x\"\n[data]\ncache_budget_mb = {budget}\n[adapter]\nplugin = \"lora\"\n{adapter}"
            );
            std::fs::write(&f, text).unwrap();
            if let Some(keys) = defaults {
                let identity = crate::identity::Identity {
                    sha256: String::new(),
                    keys: Default::default(),
                    defaults: Some(keys.iter().map(|k| k.to_string()).collect()),
                };
                std::fs::write(dir.join(crate::identity::FILE), serde_json::to_string(&identity).unwrap()).unwrap();
            }
            f
        };
        let old = write("old", 1024, "", None);
        let new = write("new", 256, "rslora = false\n", Some(&["adapter.rslora"]));
        let runs = vec![("lora".to_string(), old.clone()), ("lora".to_string(), new)];
        assert!(notes(&runs).is_empty(), "{:?}", notes(&runs));
        let written = write("written", 1024, "rslora = true\n", Some(&[]));
        let n = notes(&[("lora".to_string(), old), ("lora".to_string(), written)]);
        assert!(n.iter().any(|m| m.contains("adapter.rslora")), "{n:?}");
    }
}
