//! Plugin defaults in a run's records. Each plugin section of an experiment holds only the
//! keys its author wrote; the plugin fills in the rest (LoRA's `rslora`, a tower's
//! `layer_norm_eps`). Plugins from SDK 1.7 report their section as they resolve it
//! (`PluginModule::resolve_config`), and the keys they fill in join the config that
//! config.resolved.toml, the tracked params and the resume check record. The plugins
//! themselves still receive the sections as written.

use std::collections::BTreeSet;

use anyhow::Context;

use crate::config::ExperimentConfig;
use crate::loader::{LoadedPlugin, Registry};

/// An experiment's config with every plugin default written in.
pub struct Resolved {
    pub config: ExperimentConfig,
    /// The dotted keys the plugins filled in (`adapter.rslora`, `strategy.0.alpha`).
    pub defaults: BTreeSet<String>,
    /// Plugins that could not say (built against an older SDK, or a config type without
    /// `Serialize`): their sections are recorded as written.
    pub unreported: Vec<String>,
}

/// `c` with the defaults of every plugin section filled in from the plugins of `registry`.
/// A plugin the registry does not have is left as written (creating it fails elsewhere).
pub fn with_plugin_defaults(c: &ExperimentConfig, registry: &Registry) -> anyhow::Result<Resolved> {
    let mut config = c.clone();
    let mut defaults = BTreeSet::new();
    let mut unreported = Vec::new();
    for (prefix, plugin, options) in plugin_sections(&mut config) {
        let Some(p) = registry.plugins.iter().find(|p| p.name == plugin) else { continue };
        let text = toml::to_string(&*options).unwrap_or_default();
        let Some(resolved) = resolve(p, &text).with_context(|| format!("`{prefix}` (plugin `{plugin}`)"))? else {
            unreported.push(plugin);
            continue;
        };
        for (key, value) in resolved {
            if !options.contains_key(&key) {
                defaults.insert(format!("{prefix}.{key}"));
                options.insert(key, value);
            }
        }
    }
    unreported.sort();
    unreported.dedup();
    Ok(Resolved { config, defaults, unreported })
}

/// The plugin's resolution of a section's options, as a table; `None` when it cannot say.
fn resolve(p: &LoadedPlugin, options: &str) -> anyhow::Result<Option<toml::Table>> {
    let Some(f) = p.module.resolve_config() else { return Ok(None) };
    let text = match f(options.into()).into_result() {
        Ok(t) => t.into_option(),
        Err(e) => anyhow::bail!("the plugin cannot resolve its config: {}", e.message),
    };
    text.map(|t| toml::from_str(&t).context("the plugin's resolved config is not a TOML table")).transpose()
}

/// Each plugin section of `c`: its dotted prefix, its plugin, its options.
fn plugin_sections(c: &mut ExperimentConfig) -> Vec<(String, String, &mut toml::Table)> {
    let mut out = Vec::new();
    let m = &mut c.model;
    for (name, s) in [("tokenizer", &mut m.tokenizer), ("vision", &mut m.vision), ("text", &mut m.text)] {
        out.push((format!("model.{name}"), s.plugin.clone(), &mut s.options));
    }
    if let Some(s) = &mut m.image_tokenizer {
        out.push(("model.image_tokenizer".into(), s.plugin.clone(), &mut s.options));
    }
    if let Some(a) = &mut c.adapter {
        out.push(("adapter".into(), a.plugin.clone(), &mut a.options));
    }
    for (i, s) in c.strategies.iter_mut().enumerate() {
        out.push((format!("strategy.{i}"), s.plugin.clone(), &mut s.options));
    }
    for (i, e) in c.evaluators.iter_mut().enumerate() {
        out.push((format!("evaluator.{i}"), e.plugin.clone(), &mut e.options));
    }
    if let Some(t) = &mut c.teacher {
        out.push(("teacher.vision".into(), t.vision.plugin.clone(), &mut t.vision.options));
    }
    out.retain(|(_, plugin, _)| !plugin.is_empty());
    out
}
