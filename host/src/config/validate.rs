//! The checks of a parsed experiment that serde cannot express: ranges, combinations of
//! sections, merge schedules against the task count, unique names. Pure, like the parser.

use super::resolve::section_key;
use super::*;

/// Checks serde cannot express, section by section.
pub(super) fn validate(c: &LoadedConfig) -> Result<(), ConfigError> {
    let cfg = &c.config;
    if cfg.tasks.is_empty() {
        return Err(c.error_at("task", "the experiment has no [[task]]; add at least one"));
    }
    let reconstruction = validate_objective(c)?;
    validate_plugin_sections(c, reconstruction)?;
    validate_train(c)?;
    validate_ranges(c)?;
    validate_names(c)?;
    if let Err((key, message)) = cfg.data.check() {
        return Err(c.error_at(&format!("data.{key}"), message));
    }
    validate_schedule(c)?;
    for (key, sets) in
        [("task", &cfg.tasks[..]), ("zeroshot", &cfg.zeroshot[..]), ("reference", cfg.reference.as_slice())]
    {
        for (i, t) in sets.iter().enumerate() {
            validate_data_section(c, key, i, t)?;
        }
    }
    validate_evaluators(c)?;
    validate_tracking(c)?;
    if cfg.evaluators.is_empty() && !reconstruction {
        return Err(c.error_at(
            "evaluator",
            "the experiment has no [[evaluator]]; add e.g. `[[evaluator]] plugin = \"retrieval\"`",
        ));
    }
    Ok(())
}

/// The training objective and precision; returns whether the run trains by reconstruction.
fn validate_objective(c: &LoadedConfig) -> Result<bool, ConfigError> {
    let cfg = &c.config;
    let reconstruction = match cfg.train.objective.as_str() {
        "clip" => false,
        "reconstruction" => true,
        other => {
            return Err(c.error_at(
                "train.objective",
                format!("unknown objective `{other}`; expected `clip` or `reconstruction`"),
            ))
        }
    };
    if !matches!(cfg.train.precision.as_str(), "f32" | "bf16" | "f16") {
        return Err(c.error_at(
            "train.precision",
            format!("unknown precision `{}`; expected `f32`, `bf16` or `f16`", cfg.train.precision),
        ));
    }
    if !matches!(cfg.train.eval_precision.as_str(), "f32" | "train") {
        return Err(c.error_at(
            "train.eval_precision",
            format!("unknown eval_precision `{}`; expected `f32` or `train`", cfg.train.eval_precision),
        ));
    }
    if cfg.train.precision != "f32" && cfg.experiment.dtype == "f64" {
        return Err(c.error_at(
            "train.precision",
            "mixed precision keeps f32 master weights; use experiment.dtype = \"f32\" with it",
        ));
    }
    if reconstruction && cfg.model.image_tokenizer.is_none() {
        return Err(c.error_at(
            "train.objective",
            "a reconstruction run trains the model's image tokenizer: add [model.image_tokenizer]",
        ));
    }
    Ok(reconstruction)
}

/// Every plugin section names a plugin (an ONNX tower names none), and only towers name a
/// backend.
fn validate_plugin_sections(c: &LoadedConfig, reconstruction: bool) -> Result<(), ConfigError> {
    let cfg = &c.config;
    let mut plugin_sections: Vec<(String, &PluginSection)> = Vec::new();
    if !reconstruction {
        plugin_sections.extend([
            ("model.tokenizer".to_string(), &cfg.model.tokenizer),
            ("model.vision".into(), &cfg.model.vision),
            ("model.text".into(), &cfg.model.text),
        ]);
    }
    if let Some(t) = &cfg.model.image_tokenizer {
        plugin_sections.push(("model.image_tokenizer".into(), t));
    }
    plugin_sections.extend(cfg.strategies.iter().enumerate().map(|(i, s)| (format!("strategy[{i}]"), s)));
    if let Some(t) = &cfg.teacher {
        plugin_sections.push(("teacher.vision".into(), &t.vision));
    }
    for (at, p) in plugin_sections {
        let tower = matches!(at.as_str(), "model.vision" | "model.text" | "teacher.vision");
        let onnx = tower && crate::onnx::is_onnx(&p.options);
        match (onnx, p.plugin.is_empty()) {
            (true, false) => {
                return Err(c.error_at(
                    &format!("{at}.plugin"),
                    "a tower with backend = \"onnx\" runs its model file, not a plugin; remove `plugin`",
                ))
            }
            (false, true) => {
                let hint = if at == "model.vision" || at == "model.text" {
                    " (or backend = \"onnx\" with a model file)"
                } else {
                    ""
                };
                return Err(c.error_at(&at, format!("`plugin` is missing: name the plugin to load{hint}")));
            }
            _ => {}
        }
        if let Some(b) = p.options.get("backend").and_then(|v| v.as_str()).filter(|b| *b != "onnx") {
            return Err(c.error_at(
                &format!("{at}.backend"),
                format!("unknown backend `{b}`; the one backend a tower can name is `onnx` (plugins run on candle)"),
            ));
        }
    }
    Ok(())
}

/// `[train]`'s counts and `[optimizer] lr`.
fn validate_train(c: &LoadedConfig) -> Result<(), ConfigError> {
    let cfg = &c.config;
    if cfg.train.batch_size < 2 {
        return Err(
            c.error_at("train.batch_size", "batch_size must be at least 2 (the contrastive loss needs negatives)")
        );
    }
    if cfg.train.epochs == 0 {
        return Err(c.error_at("train.epochs", "epochs must be at least 1"));
    }
    if !matches!(cfg.experiment.dtype.as_str(), "f32" | "f64") {
        return Err(c.error_at(
            "experiment.dtype",
            format!("unsupported dtype `{}`; expected `f32` or `f64`", cfg.experiment.dtype),
        ));
    }
    if cfg.optimizer.lr <= 0.0 || !cfg.optimizer.lr.is_finite() {
        return Err(c.error_at("optimizer.lr", "lr must be a positive number"));
    }
    Ok(())
}

/// In-task evaluation, checkpoint intervals and the image-code cache.
fn validate_schedule(c: &LoadedConfig) -> Result<(), ConfigError> {
    let cfg = &c.config;
    if cfg.train.eval_every_epochs == Some(0) {
        return Err(c.error_at("train.eval_every_epochs", "eval_every_epochs must be at least 1"));
    }
    if cfg.train.eval_every_epochs.is_some() && !cfg.tasks.iter().any(|t| t.val_fraction.is_some()) {
        return Err(c.error_at(
            "train.eval_every_epochs",
            "eval_every_epochs scores the tasks' validation splits, but no [[task]] sets val_fraction",
        ));
    }
    if cfg.train.checkpoint_every_steps == Some(0) {
        return Err(c.error_at("train.checkpoint_every_steps", "checkpoint_every_steps must be at least 1"));
    }
    if cfg.train.checkpoint_every_minutes.is_some_and(|m| !(m > 0.0 && m.is_finite())) {
        return Err(c.error_at("train.checkpoint_every_minutes", "checkpoint_every_minutes must be a positive number"));
    }
    if cfg.train.cache_image_codes && !cfg.data.train_transform().is_deterministic() {
        return Err(c.error_at(
            "train.cache_image_codes",
            "cache_image_codes keeps the codes of each training image, but augmented images differ every epoch; set \
             `[data] train_transform = \"resize-center-crop\"` with it, or remove it",
        ));
    }
    Ok(())
}

/// One data section (`key` is `task`, `zeroshot` or `reference`, `i` its index): its source,
/// the keys only a training task may set, and its parts.
fn validate_data_section(c: &LoadedConfig, key: &str, i: usize, t: &TaskSection) -> Result<(), ConfigError> {
    if t.parts.is_empty() {
        if let Err((field, m)) = crate::data::source::validate(t) {
            return Err(c.error_at(
                &format!("{}{}", section_key(key, i), field.map(|f| format!(".{f}")).unwrap_or_default()),
                m,
            ));
        }
    }
    if let Some(n) = t.samples_per_epoch {
        let at = format!("{}.samples_per_epoch", section_key(key, i));
        if key != "task" {
            return Err(c.error_at(&at, "samples_per_epoch sets a training epoch; only a [[task]] trains"));
        }
        if n < 2 {
            return Err(c.error_at(&at, "samples_per_epoch must be at least 2 (a contrastive batch needs two)"));
        }
    }
    if let Some(f) = t.val_fraction {
        let at = format!("{}.val_fraction", section_key(key, i));
        if key != "task" {
            return Err(c.error_at(&at, "val_fraction holds out training data; only a [[task]] trains"));
        }
        if !(f > 0.0 && f < 1.0) {
            return Err(c.error_at(&at, format!("val_fraction must be in (0, 1), not {f}")));
        }
    }
    if !t.parts.is_empty() && t.shuffle_buffer.is_some() {
        return Err(c.error_at(
            &format!("{}.shuffle_buffer", section_key(key, i)),
            "shuffle_buffer orders one WebDataset source's shards; a task of several parts is shuffled whole",
        ));
    }
    for (j, part) in t.parts.iter().enumerate() {
        for (field, set) in [
            ("samples_per_epoch", part.samples_per_epoch.is_some()),
            ("shuffle_buffer", part.shuffle_buffer.is_some()),
            ("val_fraction", part.val_fraction.is_some()),
        ] {
            if set {
                return Err(c.error_at(
                    &format!("{}.part[{j}].{field}", section_key(key, i)),
                    format!("{field} applies to a whole task; set it on the task, not on one of its parts"),
                ));
            }
        }
        if let Err((field, m)) = crate::data::source::validate(part) {
            let at = format!("{}.part[{j}]{}", section_key(key, i), field.map(|f| format!(".{f}")).unwrap_or_default());
            return Err(c.error_at(&at, m));
        }
    }
    Ok(())
}

/// Evaluator suites, and no two evaluators whose metrics would share names.
fn validate_evaluators(c: &LoadedConfig) -> Result<(), ConfigError> {
    let cfg = &c.config;
    for (i, e) in cfg.evaluators.iter().enumerate() {
        if !matches!(e.suite.as_str(), "tasks" | "zeroshot") {
            return Err(c.error_at(
                &format!("evaluator[{i}].suite"),
                format!("unknown suite `{}`; expected `tasks` or `zeroshot`", e.suite),
            ));
        }
        if e.suite == "zeroshot" && cfg.zeroshot.is_empty() {
            return Err(c.error_at(
                &format!("evaluator[{i}].suite"),
                "this evaluator judges the [[zeroshot]] sets, but the experiment declares none",
            ));
        }
        // Metrics are named `PLUGIN/METRIC` per suite: a second evaluator of one plugin on
        // one suite would overwrite the first's numbers.
        if let Some(j) = cfg.evaluators[..i].iter().position(|f| f.plugin == e.plugin && f.suite == e.suite) {
            return Err(c.error_at(
                &format!("evaluator[{i}].plugin"),
                format!(
                    "evaluator[{j}] already runs `{}` on the `{}` suite, and their metrics (`{}/...`) would collide; \
                     give one evaluator every option (e.g. all the `ks`), or remove one",
                    e.plugin, e.suite, e.plugin
                ),
            ));
        }
    }
    Ok(())
}

fn validate_tracking(c: &LoadedConfig) -> Result<(), ConfigError> {
    if let Some(t) = &c.config.tracking {
        if !["local", "mlflow"].contains(&t.backend.as_str()) {
            return Err(c.error_at(
                "tracking.backend",
                format!(
                    "unknown tracking backend `{}`; available: local, mlflow (the run directory is always written)",
                    t.backend
                ),
            ));
        }
    }
    Ok(())
}

/// Numeric keys outside their meaningful range: each would train something other than what
/// the file says (a negative clip trains backwards, a clip of 0 trains nothing).
fn validate_ranges(c: &LoadedConfig) -> Result<(), ConfigError> {
    let o = &c.config.optimizer;
    let positive = |v: f64| v > 0.0 && v.is_finite();
    let non_negative = |v: f64| v >= 0.0 && v.is_finite();
    let mut checks: Vec<(String, bool, String)> = vec![
        (
            "optimizer.grad_clip".into(),
            o.grad_clip.is_none_or(positive),
            "grad_clip must be a positive number (the largest global gradient norm kept); remove the key to train \
             without clipping"
                .into(),
        ),
        ("optimizer.weight_decay".into(), non_negative(o.weight_decay), "weight_decay must be a number >= 0".into()),
        ("optimizer.beta1".into(), (0.0..1.0).contains(&o.beta1), "beta1 must be in [0, 1)".into()),
        ("optimizer.beta2".into(), (0.0..1.0).contains(&o.beta2), "beta2 must be in [0, 1)".into()),
        ("optimizer.eps".into(), positive(o.eps), "eps must be a positive number".into()),
        (
            "optimizer.min_lr_ratio".into(),
            (0.0..=1.0).contains(&o.min_lr_ratio),
            "min_lr_ratio must be in [0, 1]".into(),
        ),
        (
            "optimizer.warmup_start_ratio".into(),
            o.warmup_start_ratio.is_none_or(|r| (0.0..=1.0).contains(&r)),
            "warmup_start_ratio must be in [0, 1] (the lr factor warmup starts from)".into(),
        ),
        (
            "optimizer.warmup_epochs".into(),
            o.warmup_epochs == 0 || o.schedule_unit == ScheduleUnit::Epoch,
            "warmup_epochs counts epochs of a per-epoch schedule: set schedule_unit = \"epoch\", or use warmup_steps"
                .into(),
        ),
        (
            "optimizer.warmup_steps".into(),
            o.warmup_steps == 0 || o.schedule_unit == ScheduleUnit::Step,
            "with schedule_unit = \"epoch\" the warmup is counted in epochs: use warmup_epochs instead".into(),
        ),
        (
            "optimizer.warmup_start_ratio".into(),
            o.warmup_start_ratio.is_none() || o.warmup_steps > 0 || o.warmup_epochs > 0,
            "warmup_start_ratio applies to a warmup: set warmup_steps or warmup_epochs, or remove it".into(),
        ),
        (
            "model.logit_scale_init".into(),
            c.config.model.logit_scale_init.is_finite(),
            "logit_scale_init must be a finite number (CLIP: ln(1/0.07) = 2.659)".into(),
        ),
        (
            "train.eval_batch_size".into(),
            c.config.train.eval_batch_size > 0,
            "eval_batch_size must be at least 1".into(),
        ),
    ];
    for (i, g) in o.groups.iter().enumerate() {
        checks.push((
            format!("optimizer.groups[{i}].lr"),
            g.lr.is_none_or(positive),
            "a group's lr must be a positive number (freeze parameters with [model] frozen instead)".into(),
        ));
        checks.push((
            format!("optimizer.groups[{i}].weight_decay"),
            g.weight_decay.is_none_or(non_negative),
            "a group's weight_decay must be a number >= 0".into(),
        ));
        checks.push((
            format!("optimizer.groups[{i}].params"),
            !g.params.is_empty(),
            "a group needs at least one parameter pattern in `params`".into(),
        ));
    }
    if let Some(a) = &c.config.adapter {
        checks.push((
            "adapter.merge_coefficient".into(),
            a.merge_coefficient > 0.0 && a.merge_coefficient <= 1.0,
            format!(
                "merge_coefficient must be in (0, 1] (the fraction of the adapter's delta folded into the weights; \
                 C-CLIP: 0.5), got {}",
                a.merge_coefficient
            ),
        ));
        checks.extend(merge_checks(a, c.config.tasks.len()));
    }
    match checks.into_iter().find(|(_, ok, _)| !ok) {
        Some((key, _, message)) => Err(c.error_at(&key, message)),
        None => Ok(()),
    }
}

/// The merge knobs: a valid schedule, not both a schedule and a coefficient, and none of
/// them without `merge_after_task` (where they would be silently ignored).
fn merge_checks(a: &AdapterSection, tasks: usize) -> Vec<(String, bool, String)> {
    let in_range = |c: f64| c > 0.0 && c <= 1.0;
    let mut checks = Vec::new();
    match &a.merge_schedule {
        Some(MergeSchedule::Named(n)) => checks.push((
            "adapter.merge_schedule".into(),
            MergeSchedule::NAMES.contains(&n.as_str()),
            format!(
                "unknown merge_schedule `{n}`; expected one of {} or a list with one coefficient per task",
                MergeSchedule::NAMES.join(", ")
            ),
        )),
        Some(MergeSchedule::PerTask(cs)) => {
            checks.push((
                "adapter.merge_schedule".into(),
                cs.len() == tasks,
                format!("merge_schedule lists {} coefficients for {tasks} tasks; give one per task", cs.len()),
            ));
            checks.push((
                "adapter.merge_schedule".into(),
                cs.iter().all(|&c| in_range(c)),
                format!("every merge_schedule coefficient must be in (0, 1], got {cs:?}"),
            ));
        }
        None => {}
    }
    checks.push((
        "adapter.merge_schedule".into(),
        a.merge_schedule.is_none() || a.merge_coefficient == 1.0,
        "set merge_coefficient or merge_schedule, not both".into(),
    ));
    let merging_knob = a.merge_schedule.is_some() || a.merge_scope != MergeScope::Adapter;
    checks.push((
        if a.merge_schedule.is_some() { "adapter.merge_schedule" } else { "adapter.merge_scope" }.into(),
        a.merge_after_task || !merging_knob,
        "merge_schedule and merge_scope apply to merges: set merge_after_task = true, or remove them".into(),
    ));
    checks
}

/// Task and zero-shot set names are the columns of every result: each must be unique and
/// non-empty within its list.
fn validate_names(c: &LoadedConfig) -> Result<(), ConfigError> {
    for (key, sets) in [("task", &c.config.tasks[..]), ("zeroshot", &c.config.zeroshot[..])] {
        for (i, t) in sets.iter().enumerate() {
            if t.name.trim().is_empty() {
                return Err(c.error_at(&format!("{key}[{i}].name"), "the name must not be empty"));
            }
            if let Some(j) = sets[..i].iter().position(|u| u.name == t.name) {
                return Err(c.error_at(
                    &format!("{key}[{i}].name"),
                    format!(
                        "{key}[{i}] and {key}[{j}] are both named `{}`; names label the results' rows and columns, so \
                         each must be unique",
                        t.name
                    ),
                ));
            }
        }
    }
    Ok(())
}
