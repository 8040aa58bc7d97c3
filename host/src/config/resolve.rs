//! Resolving a parsed experiment against the machine: paths relative to the experiment
//! file made absolute, `dataset:NAME` and `asset:NAME/...` turned into cache paths. The one
//! step of loading a config that touches the file system; its errors are located like the
//! parser's.

use std::path::{Path, PathBuf};

use super::{ConfigError, LoadedConfig};
use crate::data::TaskSection;

/// Resolve the paths of a parsed experiment. Paths in the file are relative to the file;
/// they are stored absolute, so the resolved config saved with a run still names the same
/// files when `--resume` reads it.
pub fn resolve(mut loaded: LoadedConfig) -> Result<LoadedConfig, ConfigError> {
    let base: Option<PathBuf> = Path::new(&loaded.file)
        .parent()
        .map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d })
        .filter(|d| d.is_dir())
        .and_then(|d| std::path::absolute(d).ok());
    if let Some(dir) = &base {
        relative_to_file(&mut loaded.config, dir);
    }
    resolve_data_paths(&mut loaded, base.as_deref())?;
    check_shard_paths(&loaded)?;
    resolve_assets(&mut loaded)?;
    Ok(loaded)
}

/// A WebDataset `path` must name shards: an empty glob or a missing shard of a brace list is
/// an error at the key, before anything is read.
fn check_shard_paths(c: &LoadedConfig) -> Result<(), ConfigError> {
    let cfg = &c.config;
    for (key, sets) in
        [("task", &cfg.tasks[..]), ("zeroshot", &cfg.zeroshot[..]), ("reference", cfg.reference.as_slice())]
    {
        for (i, t) in sets.iter().enumerate() {
            let parts = t.parts.iter().enumerate().map(|(j, p)| (format!("{}.part[{j}]", section_key(key, i)), p));
            for (at, section) in std::iter::once((section_key(key, i), t)).chain(parts) {
                let Some(path) = section.path.as_deref().filter(|_| section.source == "webdataset") else { continue };
                if path.is_dir() && crate::data::webdataset::split_dirs(path).is_some() {
                    continue;
                }
                if let Err(e) = crate::data::webdataset::expand(path) {
                    return Err(c.error_at(&format!("{at}.path"), e.to_string()));
                }
            }
        }
    }
    Ok(())
}

/// Checkpoints, inits and the file options of towers, relative to the experiment file's
/// directory `dir`, like its data.
fn relative_to_file(config: &mut super::ExperimentConfig, dir: &Path) {
    if let Some(ck) =
        config.model.checkpoint.as_mut().filter(|p| p.is_relative() && !p.to_string_lossy().starts_with("asset:"))
    {
        *ck = dir.join(&*ck);
    }
    if let Some(init) = config.model.init.as_mut().filter(|p| p.is_relative()) {
        *init = dir.join(&*init);
    }
    if let Some(t) = config.teacher.as_mut() {
        for p in [t.init.as_mut(), t.checkpoint.as_mut()].into_iter().flatten() {
            if p.is_relative() && !p.to_string_lossy().starts_with("asset:") {
                *p = dir.join(&*p);
            }
        }
    }
    let teacher_vision = config.teacher.as_mut().map(|t| &mut t.vision);
    let image_tokenizer = config.model.image_tokenizer.as_mut();
    let towers = [Some(&mut config.model.vision), Some(&mut config.model.text), teacher_vision, image_tokenizer];
    for tower in towers.into_iter().flatten() {
        for key in ["model", "library", "checkpoint", "init_from"] {
            if let Some(toml::Value::String(f)) = tower.options.get_mut(key) {
                if !f.starts_with("asset:") && Path::new(f.as_str()).is_relative() {
                    *f = dir.join(&*f).display().to_string();
                }
            }
        }
    }
}

/// `asset:NAME/sub/path` in a plugin option (or `model.checkpoint`) names a file of a fetched
/// asset; it becomes the absolute path in the cache. An asset that is not cached is an error
/// that says how to fetch it.
pub fn resolve_asset(value: &str) -> Result<Option<PathBuf>, String> {
    let Some(rest) = value.strip_prefix("asset:") else { return Ok(None) };
    let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
    let registry = crate::fetch::Registry::load().map_err(|e| e.to_string())?;
    let asset = registry.get(name).map_err(|e| e.to_string())?;
    let home = crate::fetch::recall_home();
    if !crate::fetch::is_cached(&home, asset) {
        return Err(format!("asset `{name}` is not in the cache ({}); run `recall fetch {name}`", home.display()));
    }
    let dir = crate::fetch::asset_dir(&home, asset);
    Ok(Some(if sub.is_empty() { dir } else { dir.join(sub) }))
}

fn resolve_assets(c: &mut LoadedConfig) -> Result<(), ConfigError> {
    let mut sections: Vec<(String, &mut toml::Table)> = vec![
        ("model.tokenizer".into(), &mut c.config.model.tokenizer.options),
        ("model.vision".into(), &mut c.config.model.vision.options),
        ("model.text".into(), &mut c.config.model.text.options),
    ];
    if let Some(a) = c.config.adapter.as_mut() {
        sections.push(("adapter".into(), &mut a.options));
    }
    if let Some(t) = c.config.teacher.as_mut() {
        sections.push(("teacher.vision".into(), &mut t.vision.options));
    }
    if let Some(t) = c.config.model.image_tokenizer.as_mut() {
        sections.push(("model.image_tokenizer".into(), &mut t.options));
    }
    for (i, s) in c.config.strategies.iter_mut().enumerate() {
        sections.push((format!("strategy[{i}]"), &mut s.options));
    }
    for (i, s) in c.config.evaluators.iter_mut().enumerate() {
        sections.push((format!("evaluator[{i}]"), &mut s.options));
    }
    let mut failure = None;
    for (section, table) in sections {
        for (key, value) in table.iter_mut() {
            if let toml::Value::String(s) = value {
                match resolve_asset(s) {
                    Ok(Some(p)) => *s = p.display().to_string(),
                    Ok(None) => {}
                    Err(m) => failure = failure.or(Some((format!("{section}.{key}"), m))),
                }
            }
        }
    }
    let teacher_ck = c.config.teacher.as_mut().and_then(|t| t.checkpoint.as_mut()).map(|p| ("teacher.checkpoint", p));
    for (key, ck) in
        [c.config.model.checkpoint.as_mut().map(|p| ("model.checkpoint", p)), teacher_ck].into_iter().flatten()
    {
        match resolve_asset(&ck.to_string_lossy()) {
            Ok(Some(p)) => *ck = p,
            Ok(None) => {}
            Err(m) => failure = failure.or(Some((key.to_string(), m))),
        }
    }
    match failure {
        Some((key, m)) => Err(c.error_at(&key, m)),
        None => Ok(()),
    }
}

/// The dotted key of data section `i` of `key` (`task[2]`; `reference` is a single table).
pub(super) fn section_key(key: &str, i: usize) -> String {
    if key == "reference" {
        key.to_string()
    } else {
        format!("{key}[{i}]")
    }
}

/// Task and zero-shot data paths: `dataset:NAME` (prepared), `asset:NAME/...` (fetched), or
/// relative to the experiment file.
fn resolve_data_paths(c: &mut LoadedConfig, base: Option<&Path>) -> Result<(), ConfigError> {
    let mut failure = None;
    let mut slots: Vec<(String, &mut Option<PathBuf>)> = Vec::new();
    let cfg = &mut c.config;
    let groups: [(&str, &mut [TaskSection]); 3] = [
        ("task", &mut cfg.tasks[..]),
        ("zeroshot", &mut cfg.zeroshot[..]),
        ("reference", cfg.reference.as_mut_slice()),
    ];
    for (key, sets) in groups {
        for (i, t) in sets.iter_mut().enumerate() {
            let at = section_key(key, i);
            slots.push((format!("{at}.path"), &mut t.path));
            slots.push((format!("{at}.images"), &mut t.images));
            for (j, part) in t.parts.iter_mut().enumerate() {
                slots.push((format!("{at}.part[{j}].path"), &mut part.path));
                slots.push((format!("{at}.part[{j}].images"), &mut part.images));
            }
        }
    }
    for (at, slot) in slots {
        let Some(p) = slot.as_mut() else { continue };
        let text = p.to_string_lossy().into_owned();
        let resolved = match crate::data::convert::resolve(&text) {
            Ok(None) => resolve_asset(&text),
            other => other,
        };
        match resolved {
            Ok(Some(r)) => *p = r,
            Ok(None) => {
                if let Some(b) = base.filter(|_| p.is_relative()) {
                    *p = b.join(&*p);
                }
            }
            Err(m) => failure = failure.or(Some((at, m))),
        }
    }
    match failure {
        Some((key, m)) => Err(c.error_at(&key, m)),
        None => Ok(()),
    }
}
