//! `recall run --dry-run`: resolve and check everything a run would, print the plan, train
//! and write nothing. The model and every plugin are built (a checkpoint is read in full,
//! each plugin's options are checked by the plugin); the data is read from its manifests, and
//! every image file they name must exist, but no image is decoded.

use std::fmt::Write;

use anyhow::bail;

use super::session::Parts;
use super::steps_in_task;
use crate::config::LoadedConfig;
use crate::data::{self, source::Inventory};
use crate::data::{OnError, TaskSection};
use crate::loader::Registry;
use crate::optim::AdamW;

/// Build and check everything; the plan as text, or the first error a run would stop on.
pub fn dry_run(cfg: &LoadedConfig, registry: &Registry) -> anyhow::Result<String> {
    let c = &cfg.config;
    let parts = Parts::build(cfg, registry)?;
    let tasks = inventories(cfg, &c.tasks, "task", true)?;
    let heldout = inventories(cfg, &c.zeroshot, "zeroshot", true)?;
    let reference = match (&c.reference, parts.wants_initial) {
        (Some(r), true) => inventories(cfg, std::slice::from_ref(r), "reference", false)?,
        _ => Vec::new(),
    };
    let params = parts.model.runtime.params();
    let opt = AdamW::new(&params, &c.optimizer).map_err(|e| cfg.error_at(&e.key(), e.message))?;

    let mut out = String::new();
    let e = &c.experiment;
    let _ = writeln!(out, "plan of {} (nothing is trained or written)", cfg.file);
    let _ = writeln!(
        out,
        "  experiment `{}`, seed {}, device {}, results under {}",
        e.name,
        e.seed,
        e.device,
        e.output_dir.display()
    );
    let total: usize = params.iter().map(|p| p.var.elem_count()).sum();
    let trainable: usize = params.iter().filter(|p| p.trainable).map(|p| p.var.elem_count()).sum();
    let m = &c.model;
    let _ = writeln!(
        out,
        "  model: vision `{}`, text `{}`, tokenizer `{}`{}; {trainable} trainable of {total} parameters",
        m.vision.plugin,
        m.text.plugin,
        m.tokenizer.plugin,
        m.checkpoint.as_ref().or(m.init.as_ref()).map(|p| format!(", from {}", p.display())).unwrap_or_default()
    );
    if let Some(a) = &c.adapter {
        let merge = if a.merge_after_task {
            let coefficients: Vec<String> =
                (0..c.tasks.len()).map(|t| format!("{:.3}", a.merge_coefficient_for(t))).collect();
            let scope = format!("{:?}", a.merge_scope).to_lowercase();
            format!(", merged after each task ({scope} scope, coefficients {})", coefficients.join(" "))
        } else {
            String::new()
        };
        let _ = writeln!(out, "  adapter `{}`{merge}", a.plugin);
    }
    for (s, inst) in c.strategies.iter().zip(&parts.strategies) {
        let version = registry.get(&s.plugin, "strategy").map(|p| p.version.clone()).unwrap_or_default();
        let pass = inst.gradient_batches()?;
        let when = match inst.gradient_pass()? {
            recall_sdk::GradientPass::AfterTask => "after each task, on its training data",
            recall_sdk::GradientPass::BeforeTask => "before each task, on its test split",
        };
        let pass = if pass > 0 { format!(", gradient pass of {pass} batches {when}") } else { String::new() };
        let _ = writeln!(out, "  strategy `{}` {version}{pass}", s.plugin);
    }
    if let Some(r) = &parts.replay {
        let mode = match r.mode {
            recall_sdk::ReplayMode::Join => "joined to each batch",
            recall_sdk::ReplayMode::Separate => "a separate forward",
        };
        let features = if r.store_features { ", features kept" } else { "" };
        let _ = writeln!(
            out,
            "  replay memory: {} exemplars ({}{features}), {} per step, {mode}",
            r.budget,
            r.policy.name(),
            r.batch_size
        );
    }
    if parts.wants_old {
        let first = if c.train.old_model_on_first_task { "from the first task" } else { "from the second task" };
        let _ = writeln!(out, "  old model: a frozen copy, {first}");
    }
    for g in opt.summary() {
        let _ = writeln!(
            out,
            "  optimizer group {}: {} tensors, {} values, lr {:e}",
            g.group, g.n_tensors, g.n_values, g.lr
        );
    }
    let _ = writeln!(out, "  {}", describe_pipeline(&c.data));
    let _ = writeln!(out, "  tasks ({} epochs each, batch {}):", c.train.epochs, c.train.batch_size);
    for (t, inv) in c.tasks.iter().zip(&tasks) {
        let steps = steps_in_task(t.samples_per_epoch.unwrap_or(inv.train), &c.train);
        let _ = writeln!(out, "    {}", describe(t, inv, Some(steps)));
    }
    for (label, sets, invs) in
        [("zero-shot sets", &c.zeroshot, &heldout), ("reference", &c.reference.iter().cloned().collect(), &reference)]
    {
        if invs.is_empty() {
            continue;
        }
        let _ = writeln!(out, "  {label}:");
        for (t, inv) in sets.iter().zip(invs) {
            let _ = writeln!(out, "    {}", describe(t, inv, None));
        }
    }
    let evaluators: Vec<String> = c.evaluators.iter().map(|e| format!("`{}` ({})", e.plugin, e.suite)).collect();
    let _ = writeln!(out, "  evaluators: {}", evaluators.join(", "));
    Ok(out)
}

/// One line of a data set: source, split sizes, captions, classes, steps, skipped files.
/// "training images: RandomResizedCrop ..., 2 decode workers, ..."
fn describe_pipeline(d: &crate::data::DataSection) -> String {
    use crate::data::transform::Transform;
    let transform = match d.train_transform() {
        Transform::Eval => "resize and centre crop (no augmentation)".to_string(),
        Transform::Train(a) => {
            let mut t = format!(
                "RandomResizedCrop (area {}-{}, aspect {:.3}-{:.3})",
                a.crop_scale.0, a.crop_scale.1, a.crop_ratio.0, a.crop_ratio.1
            );
            if let Some([b, c, s, h]) = a.color_jitter {
                t.push_str(&format!(", colour jitter {b}/{c}/{s}/{h} with p {}", a.color_jitter_prob));
            }
            if a.grayscale_prob > 0.0 {
                t.push_str(&format!(", grayscale with p {}", a.grayscale_prob));
            }
            t
        }
    };
    let cache = format!("{:?}", d.cache).to_lowercase();
    format!(
        "training images: {transform}; {} decode workers, {} batches ahead, image cache {cache} ({} MB)",
        d.workers(),
        d.prefetch,
        d.cache_budget_mb
    )
}

fn describe(t: &TaskSection, inv: &Inventory, steps: Option<usize>) -> String {
    let mut line = format!("{} ({}): {} train, {} test", t.name, t.source, inv.train, inv.test);
    if inv.test_captions > inv.test {
        let _ = write!(line, " ({} test captions)", inv.test_captions);
    }
    if inv.classes > 0 {
        let _ = write!(line, ", {} classes", inv.classes);
    }
    if let Some(s) = steps {
        let _ = write!(line, ", {s} steps");
    }
    if !inv.missing.is_empty() {
        let _ = write!(line, ", {} missing images skipped", inv.missing.len());
    }
    line
}

/// The inventory of each set; a missing image (unless the set skips them) or an empty test
/// split is the error a run would stop on, located at the set.
fn inventories(cfg: &LoadedConfig, sets: &[TaskSection], key: &str, need_test: bool) -> anyhow::Result<Vec<Inventory>> {
    let mut out = Vec::new();
    for (i, t) in sets.iter().enumerate() {
        let inv = data::inventory(t, cfg.config.experiment.seed)
            .map_err(|e| anyhow::anyhow!("{}: reading the data of {key}[{i}] `{}`: {e}", cfg.file, t.name))?;
        if let (Some(first), OnError::Fail) = (inv.missing.first(), t.on_error) {
            bail!(
                "{}: {key}[{i}] `{}` names {} image files that do not exist, the first {first}; fix the paths \
                 (`images` sets the image root) or set `on_error = \"skip\"` on the set",
                cfg.file,
                t.name,
                inv.missing.len()
            );
        }
        if need_test && inv.test == 0 {
            bail!(
                "{}: {key}[{i}] `{}` has no test examples; check its path, filters and test_fraction",
                cfg.file,
                t.name
            );
        }
        out.push(inv);
    }
    Ok(out)
}
