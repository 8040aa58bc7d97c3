//! Whether compared runs were run alike: the keys of the benchmark's protocol (tasks, held-out
//! sets, reference data, evaluators, epochs) must agree between methods, and seeds of one
//! method must differ in nothing but their seed.

use std::collections::BTreeMap;
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
/// such runs are not judged).
fn flat(file: &PathBuf) -> BTreeMap<String, String> {
    let Some(v) = std::fs::read_to_string(file).ok().and_then(|t| toml::from_str::<toml::Value>(&t).ok()) else {
        return BTreeMap::new();
    };
    let mut out = Vec::new();
    crate::tracking::flatten("", &v, &mut out);
    out.into_iter().filter(|(k, _)| !k.starts_with("tracking.") && !k.starts_with("sweep.")).collect()
}

/// Notes on `runs` (method, config file): protocol keys that differ between methods, and
/// keys that differ between seeds of one method.
pub fn notes(runs: &[(String, PathBuf)]) -> Vec<String> {
    let configs: Vec<(&str, BTreeMap<String, String>)> =
        runs.iter().map(|(m, f)| (m.as_str(), flat(f))).filter(|(_, c)| !c.is_empty()).collect();
    let mut notes = Vec::new();
    let mut methods: Vec<&str> = configs.iter().map(|(m, _)| *m).collect();
    methods.dedup();
    let value = |c: &BTreeMap<String, String>, k: &str| c.get(k).cloned().unwrap_or_else(|| "(unset)".into());
    let keys = |pick: &dyn Fn(&str) -> bool| {
        let mut ks: Vec<&String> = configs.iter().flat_map(|(_, c)| c.keys()).filter(|k| pick(k)).collect();
        ks.sort();
        ks.dedup();
        ks
    };
    // Seeds of one method.
    for m in &methods {
        let seeds: Vec<&BTreeMap<String, String>> = configs.iter().filter(|(x, _)| x == m).map(|(_, c)| c).collect();
        let differ: Vec<String> = keys(&|k| !LABELS.contains(&k))
            .into_iter()
            .filter(|k| seeds.iter().any(|c| value(c, k) != value(seeds[0], k)))
            .map(|k| k.to_string())
            .collect();
        if !differ.is_empty() {
            notes.push(format!("the seeds of `{m}` differ in more than their seed: {}", summarize(&differ)));
        }
    }
    // The protocol between methods (each method's first run stands for it).
    let firsts: Vec<(&str, &BTreeMap<String, String>)> =
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
}
