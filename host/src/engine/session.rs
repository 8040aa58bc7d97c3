//! Everything a run builds before its first step: the model, the strategies and evaluators,
//! the frozen copies strategies ask for, and the data.

use anyhow::{bail, Context};

use super::replay::ExemplarMemory;
use super::step::copy_parameters;
use crate::config::LoadedConfig;
use crate::data::{self, TaskData};
use crate::loader::Registry;
use crate::model::{locate_failure, Model, Teacher};
use crate::plugin::{EvaluatorInstance, StrategyInstance};
use crate::runtime::Runtime;

/// Load (or generate) every task's data at the model's preprocessing.
pub fn load_tasks(cfg: &LoadedConfig, pre: &crate::data::preprocess::Preprocess) -> anyhow::Result<Vec<TaskData>> {
    load_sets(cfg, &cfg.config.tasks, "task", pre)
}

fn load_sets(
    cfg: &LoadedConfig,
    sets: &[crate::data::TaskSection],
    key: &str,
    pre: &crate::data::preprocess::Preprocess,
) -> anyhow::Result<Vec<TaskData>> {
    let need_test = key != "reference";
    sets.iter()
        .enumerate()
        .map(|(i, t)| {
            let mut d = data::load(t, pre, cfg.config.experiment.seed)
                .with_context(|| format!("{}: loading the data of {key}[{i}] `{}`", cfg.file, t.name))?;
            if let Some(fraction) = t.val_fraction {
                d.carve_validation(fraction, t.split_seed)
                    .map_err(|m| cfg.error_at(&format!("{key}[{i}].val_fraction"), format!("task `{}`: {m}", t.name)))?;
            }
            if need_test && d.test.is_empty() {
                bail!("{}: {key}[{i}] `{}` has no test examples; check its path, filters and test_fraction", cfg.file, t.name);
            }
            tracing::info!(set = %t.name, train = d.train.len(), test = d.test.len(), skipped = d.skipped.len(), "data loaded");
            Ok(d)
        })
        .collect()
}

/// What the engine builds from a config before it owns a run directory, and what every
/// training step reads: built once per run (and by `recall bench`).
pub struct Session<'c> {
    pub cfg: &'c LoadedConfig,
    pub model: Model,
    pub strategies: Vec<StrategyInstance>,
    pub task_evaluators: Vec<EvaluatorInstance>,
    pub zeroshot_evaluators: Vec<EvaluatorInstance>,
    /// A frozen copy for strategies that compare against the old model (CKC, LwF): its
    /// parameters are overwritten with the trained ones before each task.
    pub old_model: Option<Model>,
    /// The model as it was before the first task, for strategies that distil from it (ZSCL).
    pub initial_model: Option<Model>,
    /// A frozen teacher (TokLIP's distillation).
    pub teacher: Option<Teacher>,
    /// `[reference]` data the initial model is compared on.
    pub reference: Option<TaskData>,
    pub tasks: Vec<TaskData>,
    pub heldout_sets: Vec<TaskData>,
    /// What training images go through (`[data] train_transform`).
    pub train_transform: data::transform::Transform,
    /// The decode workers that prepare batches ahead of the step.
    pub loader: data::loader::Loader,
    /// The exemplar memory a strategy asked for; the steps and the ends of tasks update it.
    pub replay: Option<std::cell::RefCell<ExemplarMemory>>,
    /// The config with every plugin's defaults written in: what the run's records hold.
    pub recorded: crate::resolved::Resolved,
}

/// The model with every plugin of the experiment created and checked against each other:
/// what a run builds before it reads data (and all that `recall run --dry-run` builds).
pub struct Parts {
    pub model: Model,
    pub strategies: Vec<StrategyInstance>,
    pub task_evaluators: Vec<EvaluatorInstance>,
    pub zeroshot_evaluators: Vec<EvaluatorInstance>,
    /// A strategy compares against the old model (CKC, LwF).
    pub wants_old: bool,
    /// A strategy distils from the initial model (ZSCL).
    pub wants_initial: bool,
    pub teacher: Option<Teacher>,
    /// The exemplar memory one strategy asks for.
    pub replay: Option<recall_sdk::Replay>,
}

impl Parts {
    /// Build the model and its plugins; every error names the key at fault.
    pub fn build(cfg: &LoadedConfig, registry: &Registry) -> anyhow::Result<Self> {
        let c = &cfg.config;
        let model = build_model(cfg, registry)?;
        let rt = model.runtime.clone();
        let strategies = c
            .strategies
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let p = registry
                    .get(&s.plugin, "strategy")
                    .map_err(|m| cfg.error_at(&format!("strategy[{i}].plugin"), m))?;
                StrategyInstance::create(p, &rt, &format!("strategy.{i}."), &s.options_text())
                    .map_err(|e| anyhow::Error::new(locate_failure(cfg, &format!("strategy[{i}]"), e)))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (task_evaluators, zeroshot_evaluators) = build_evaluators(cfg, registry, &rt)?;
        // Every optimizer group must match a trainable parameter (strategies' included):
        // checked now, before a run directory exists, not when the first task starts.
        crate::optim::group_settings(&rt.params(), &c.optimizer).map_err(|e| cfg.error_at(&e.key(), e.message))?;
        if !c.zeroshot.is_empty() && zeroshot_evaluators.is_empty() {
            bail!(
                "{}: the experiment declares [[zeroshot]] sets but no evaluator judges them; add \
                 `[[evaluator]] plugin = \"zeroshot\"` with `suite = \"zeroshot\"`",
                cfg.file
            );
        }
        let any = |ask: fn(&StrategyInstance) -> Result<bool, crate::plugin::PluginFailure>| -> anyhow::Result<bool> {
            Ok(strategies.iter().map(ask).collect::<Result<Vec<_>, _>>()?.into_iter().any(|w| w))
        };
        let wants_old = any(StrategyInstance::wants_old_model)?;
        if c.train.old_model_on_first_task && !wants_old {
            return Err(cfg
                .error_at(
                    "train.old_model_on_first_task",
                    "old_model_on_first_task is set, but no strategy of this experiment compares against an old \
                     model (CKC and LwF do); remove the key or add such a strategy",
                )
                .into());
        }
        let wants_initial = any(StrategyInstance::wants_initial_model)?;
        let teacher = match &c.teacher {
            Some(t) => Some(Teacher::build(t, &c.experiment, cfg, registry)?),
            None => None,
        };
        let replay = replay_request(cfg, &strategies, &model, teacher.is_some())?;
        Ok(Parts { model, strategies, task_evaluators, zeroshot_evaluators, wants_old, wants_initial, teacher, replay })
    }
}

/// The one exemplar memory the strategies ask for, checked against the rest of the run: two
/// strategies asking, or replay examples joining batches that a teacher or the code cache
/// also reads, are located errors.
fn replay_request(
    cfg: &LoadedConfig,
    strategies: &[StrategyInstance],
    model: &Model,
    teacher: bool,
) -> anyhow::Result<Option<recall_sdk::Replay>> {
    let mut found: Option<(usize, recall_sdk::Replay)> = None;
    for (i, st) in strategies.iter().enumerate() {
        let Some(r) = st.replay()? else { continue };
        if let Some((j, _)) = found {
            return Err(cfg
                .error_at(
                    &format!("strategy[{i}]"),
                    format!(
                        "strategies {j} (`{}`) and {i} (`{}`) both ask for an exemplar memory; a run keeps one, so \
                         keep one replaying strategy",
                        strategies[j].plugin, st.plugin
                    ),
                )
                .into());
        }
        if r.mode == recall_sdk::ReplayMode::Join && (teacher || model.code_cache.is_some()) {
            let what = if teacher { "a [teacher]" } else { "[train] cache_image_codes" };
            return Err(cfg
                .error_at(
                    &format!("strategy[{i}]"),
                    format!(
                        "`{}` joins replay examples to the step's batch, which {what} reads as the data loader \
                         prepared it; use the strategy's separate replay mode, or drop {what}",
                        st.plugin
                    ),
                )
                .into());
        }
        found = Some((i, r));
    }
    Ok(found.map(|(_, r)| r))
}

/// The memory for `request`, checked against the data: the class-balanced policy needs every
/// training example's class.
fn replay_memory(
    cfg: &LoadedConfig,
    request: recall_sdk::Replay,
    tasks: &[TaskData],
) -> anyhow::Result<std::cell::RefCell<ExemplarMemory>> {
    if request.policy == recall_sdk::ReplayPolicy::ClassBalanced {
        for (i, t) in tasks.iter().enumerate() {
            if let Some(e) = t.train.iter().find(|e| e.class.is_none()) {
                bail!(
                    "{}: the replay memory is class-balanced, but task[{i}] `{}` has a training example without a \
                     class (`{}`); give its data classes, or use the task-balanced or reservoir policy",
                    cfg.file,
                    t.name,
                    e.id
                );
            }
        }
    }
    Ok(std::cell::RefCell::new(ExemplarMemory::new(request)))
}

impl<'c> Session<'c> {
    /// Build the model, its plugins, the frozen copies and the data; every error names the
    /// key at fault.
    pub fn prepare(cfg: &'c LoadedConfig, registry: &Registry) -> anyhow::Result<Self> {
        let c = &cfg.config;
        let Parts {
            model,
            strategies,
            task_evaluators,
            zeroshot_evaluators,
            wants_old,
            wants_initial,
            teacher,
            replay,
        } = Parts::build(cfg, registry)?;
        let frozen_copy = || -> anyhow::Result<Model> {
            let m = Model::build(cfg, registry)?;
            m.freeze_all();
            Ok(m)
        };
        let old_model = if wants_old { Some(frozen_copy()?) } else { None };
        // Copied now, before a resumed run loads its checkpoint.
        let initial_model = if wants_initial {
            let m = frozen_copy()?;
            copy_parameters(&model, &m)?;
            Some(m)
        } else {
            None
        };
        let mut reference = match (&c.reference, wants_initial) {
            (Some(r), true) => {
                let d = load_sets(cfg, std::slice::from_ref(r), "reference", &model.preprocess)?.remove(0);
                if d.train.is_empty() {
                    bail!("{}: the [reference] data has no training examples to draw batches from", cfg.file);
                }
                Some(d)
            }
            _ => None,
        };
        let mut tasks = load_tasks(cfg, &model.preprocess)?;
        let mut heldout_sets = load_sets(cfg, &c.zeroshot, "zeroshot", &model.preprocess)?;
        let train_transform = c.data.train_transform();
        cache_images(cfg, &model, &train_transform, &mut tasks, &mut heldout_sets, reference.as_mut())?;
        let loader = data::loader::Loader::new(c.data.workers(), c.data.prefetch)?;
        let replay = replay.map(|r| replay_memory(cfg, r, &tasks)).transpose()?;
        let recorded =
            crate::resolved::with_plugin_defaults(c, registry).map_err(|e| anyhow::anyhow!("{}: {e:#}", cfg.file))?;
        Ok(Session {
            cfg,
            model,
            strategies,
            task_evaluators,
            zeroshot_evaluators,
            old_model,
            initial_model,
            teacher,
            reference,
            tasks,
            heldout_sets,
            train_transform,
            loader,
            replay,
            recorded,
        })
    }

    pub fn runtime(&self) -> &Runtime {
        &self.model.runtime
    }
}

/// `[data] cache`: the splits a run reads through the evaluation transform (every test split,
/// the reference's training split, and the tasks' training splits when training does not
/// augment) kept in memory as bytes, while they fit in the budget.
fn cache_images(
    cfg: &LoadedConfig,
    model: &Model,
    train_transform: &data::transform::Transform,
    tasks: &mut [TaskData],
    heldout: &mut [TaskData],
    reference: Option<&mut TaskData>,
) -> anyhow::Result<()> {
    use data::cache::{fill, CachePolicy, Splits};
    let c = &cfg.config;
    let policy =
        CachePolicy { mode: c.data.cache, budget_bytes: c.data.cache_budget_mb << 20, size: model.preprocess.size };
    let train = if train_transform.is_deterministic() { Splits::Both } else { Splits::Test };
    let mut sets: Vec<(&mut TaskData, Splits)> = tasks.iter_mut().map(|t| (t, train)).collect();
    sets.extend(heldout.iter_mut().map(|t| (t, Splits::Test)));
    sets.extend(reference.map(|t| (t, Splits::Train)));
    let bytes = fill(&mut sets, &policy).with_context(|| format!("{}: caching the data's images", cfg.file))?;
    tracing::info!(mb = bytes >> 20, mode = ?c.data.cache, budget_mb = c.data.cache_budget_mb, "image cache");
    Ok(())
}

/// The model with its code cache when `[train] cache_image_codes` asks for one.
fn build_model(cfg: &LoadedConfig, registry: &Registry) -> anyhow::Result<Model> {
    let mut model = Model::build(cfg, registry)?;
    if cfg.config.train.cache_image_codes {
        if model.image_tokenizer.is_none() {
            return Err(cfg
                .error_at("train.cache_image_codes", "[train] cache_image_codes = true, but there is no [model.image_tokenizer] whose codes could be cached; drop the setting")
                .into());
        }
        model.code_cache = Some(Default::default());
    }
    Ok(model)
}

/// The evaluators of the task suite and of the zero-shot suite.
fn build_evaluators(
    cfg: &LoadedConfig,
    registry: &Registry,
    rt: &std::rc::Rc<Runtime>,
) -> anyhow::Result<(Vec<EvaluatorInstance>, Vec<EvaluatorInstance>)> {
    let mut tasks = Vec::new();
    let mut zeroshot = Vec::new();
    for (i, s) in cfg.config.evaluators.iter().enumerate() {
        let p = registry.get(&s.plugin, "evaluator").map_err(|m| cfg.error_at(&format!("evaluator[{i}].plugin"), m))?;
        let e = EvaluatorInstance::create(p, rt, &s.options_text())
            .map_err(|e| anyhow::Error::new(locate_failure(cfg, &format!("evaluator[{i}]"), e)))?;
        if s.suite == "zeroshot" {
            zeroshot.push(e)
        } else {
            tasks.push(e)
        }
    }
    Ok((tasks, zeroshot))
}
