//! `recall check-plugin`: the conformance suite every plugin of a kind must pass, in-tree or
//! third-party. Each check runs in a fresh CPU runtime; a failing check does not stop the
//! others.

use std::fmt;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};
use recall_sdk::abi::modality;
use recall_sdk::inputs;
use recall_sdk::{ParamInit, TaskInfo};

use crate::loader::LoadedPlugin;
use crate::plugin::{AdapterInstance, EncoderInstance, EvaluatorInstance, StrategyInstance, TokenizerInstance};
use crate::runtime::{ops, Runtime};

/// Outcome of the suite.
pub struct Report {
    pub plugin: String,
    pub kind: &'static str,
    pub checks: Vec<(String, Result<(), String>)>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|(_, r)| r.is_ok())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "conformance of `{}` ({} plugin):", self.plugin, self.kind)?;
        for (name, r) in &self.checks {
            match r {
                Ok(()) => writeln!(f, "  ok    {name}")?,
                Err(e) => writeln!(f, "  FAIL  {name}: {e}")?,
            }
        }
        let failed = self.checks.iter().filter(|(_, r)| r.is_err()).count();
        writeln!(f, "{} passed, {} failed", self.checks.len() - failed, failed)
    }
}

type Check = Result<(), String>;

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Check {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

fn err(e: impl fmt::Display) -> String {
    e.to_string()
}

fn runtime() -> Rc<Runtime> {
    Runtime::new(Device::Cpu, DType::F32, 0)
}

const BOGUS: &str = "definitely_not_a_key = 1\n";

/// Run the suite of `plugin`'s kind with `options` as its config.
pub fn check(plugin: &LoadedPlugin, options: &str) -> Report {
    let mut checks: Vec<(String, Check)> = Vec::new();
    let mut add = |name: &str, r: Check| checks.push((name.to_string(), r));
    add(
        "info: name and version are set",
        ensure(!plugin.name.is_empty() && !plugin.version.is_empty(), || "empty name or version".into()),
    );
    match plugin.kind {
        "tokenizer" => tokenizer(plugin, options, &mut add),
        "encoder" => encoder(plugin, options, &mut add),
        "adapter" => adapter(plugin, options, &mut add),
        "strategy" => strategy(plugin, options, &mut add),
        "evaluator" => evaluator(plugin, options, &mut add),
        other => add("kind", Err(format!("unknown kind `{other}`"))),
    }
    Report { plugin: plugin.name.clone(), kind: plugin.kind, checks }
}

fn rejects_unknown_key<T>(create: impl Fn(&str) -> Result<T, crate::plugin::PluginFailure>, options: &str) -> Check {
    match create(&format!("{options}\n{BOGUS}")) {
        Ok(_) => Err("an unknown config key was accepted; use #[serde(deny_unknown_fields)]".into()),
        Err(e) if e.config_key.as_deref() == Some("definitely_not_a_key") => Ok(()),
        Err(e) => Err(format!("rejected, but without naming the key: {}", e.message)),
    }
}

fn tokenizer(p: &LoadedPlugin, options: &str, add: &mut dyn FnMut(&str, Check)) {
    let rt = runtime();
    add(
        "config: unknown keys are rejected by name",
        rejects_unknown_key(|o| TokenizerInstance::create(p, &rt, o), options),
    );
    let tok = match TokenizerInstance::create(p, &rt, options) {
        Ok(t) => t,
        Err(e) => return add("create with the given config", Err(err(e))),
    };
    let vocab = tok.vocab_size().unwrap_or(0);
    add("vocab_size is positive", ensure(vocab > 0, || "vocab_size is 0".into()));
    let texts = vec!["a photo of a cat".to_string(), String::new(), "x ".repeat(200)];
    add(
        "encode: shape, ids inside the vocabulary, masks are 0/1",
        tok.encode(&texts, Some(16)).map_err(err).and_then(|b| {
            ensure(b.n_rows == 3 && b.n_cols == 16, || format!("got {} x {}", b.n_rows, b.n_cols))?;
            ensure(b.ids.iter().all(|&i| (i as usize) < vocab), || "an id is outside the vocabulary".into())?;
            ensure(b.attention_mask.iter().all(|&m| m <= 1), || "mask values other than 0/1".into())
        }),
    );
    add(
        "encode: deterministic",
        (|| -> Check {
            let a = tok.encode(&texts, Some(16)).map_err(err)?;
            let b = tok.encode(&texts, Some(16)).map_err(err)?;
            ensure(a.ids == b.ids, || "two encodings of the same texts differ".into())
        })(),
    );
}

fn dummy_inputs(
    rt: &Runtime,
    spec: &recall_sdk::EncoderSpec,
    batch: usize,
) -> candle_core::Result<Vec<(&'static str, Tensor)>> {
    let n = spec.input_size as usize;
    if spec.modality == modality::IMAGE {
        let data: Vec<f32> = (0..batch * 3 * n * n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        Ok(vec![(
            inputs::PIXEL_VALUES,
            Tensor::from_vec(data, (batch, 3, n, n), rt.device())?.to_dtype(rt.float_dtype())?,
        )])
    } else {
        let len = n.min(8);
        let ids: Vec<u32> = (0..batch * len).map(|i| (i % 5 + 1) as u32).collect();
        let mask = vec![1u32; batch * len];
        Ok(vec![
            (inputs::INPUT_IDS, Tensor::from_vec(ids, (batch, len), rt.device())?),
            (inputs::ATTENTION_MASK, Tensor::from_vec(mask, (batch, len), rt.device())?),
        ])
    }
}

fn encoder(p: &LoadedPlugin, options: &str, add: &mut dyn FnMut(&str, Check)) {
    let rt = runtime();
    add(
        "config: unknown keys are rejected by name",
        rejects_unknown_key(|o| EncoderInstance::create(p, &runtime(), "enc.", o), options),
    );
    let enc = match EncoderInstance::create(p, &rt, "enc.", options) {
        Ok(e) => e,
        Err(e) => return add("create with the given config", Err(err(e))),
    };
    let spec = match enc.spec() {
        Ok(s) => s,
        Err(e) => return add("spec", Err(err(e))),
    };
    add(
        "spec: known modality, positive sizes",
        ensure(
            (spec.modality == modality::IMAGE || spec.modality == modality::TEXT)
                && spec.embed_dim > 0
                && spec.input_size > 0,
            || format!("{spec:?}"),
        ),
    );
    let inputs = match dummy_inputs(&rt, &spec, 2) {
        Ok(i) => i,
        Err(e) => return add("inputs", Err(err(e))),
    };
    let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (*n, t)).collect();
    let before = rt.live_handles();
    rt.set_training(true);
    let out = enc.forward(&refs);
    add(
        "forward: [B, embed_dim] (or per token, [B, N, embed_dim]), finite",
        out.as_ref().map_err(err).and_then(|y| {
            let d = y.dims();
            let fits =
                (d.len() == 2 || (d.len() == 3 && d[1] > 0)) && d[0] == 2 && d[d.len() - 1] == spec.embed_dim as usize;
            ensure(fits, || format!("shape {d:?}"))?;
            let v: Vec<f32> =
                y.flatten_all().and_then(|t| t.to_dtype(DType::F32)).and_then(|t| t.to_vec1()).map_err(err)?;
            ensure(v.iter().all(|x| x.is_finite()), || "non-finite output".into())
        }),
    );
    add(
        "forward: releases every intermediate handle",
        ensure(rt.live_handles() == before, || format!("{} handles leaked", rt.live_handles() - before)),
    );
    if let Ok(y) = &out {
        add(
            "backward: gradients reach the encoder's parameters",
            (|| -> Check {
                let mut grads = y.sqr().and_then(|s| s.sum_all()).and_then(|s| s.backward()).map_err(err)?;
                if spec.modality == modality::IMAGE
                    && rt.params().iter().all(|p| grads.get(p.var.as_tensor()).is_none())
                {
                    // An image tokenizer's codes are constants; it trains through the loss it
                    // returns given `target_pixels` (reconstruction runs).
                    let mut with_target = refs.clone();
                    with_target.push((inputs::TARGET_PIXELS, refs[0].1));
                    let loss = enc.forward(&with_target).map_err(|e| {
                        format!("its output carries no gradient, and given target_pixels it fails: {e}")
                    })?;
                    ensure(loss.elem_count() == 1, || {
                        format!(
                            "its output carries no gradient, and its target_pixels loss is {:?}, not a scalar",
                            loss.dims()
                        )
                    })?;
                    grads = loss.backward().map_err(err)?;
                }
                let params = rt.params();
                let reached = params.iter().filter(|p| grads.get(p.var.as_tensor()).is_some()).count();
                ensure(reached > 0, || "no parameter received a gradient".into())?;
                ensure(reached * 2 >= params.len(), || {
                    format!("only {reached} of {} parameters received gradients", params.len())
                })
            })(),
        );
    }
    rt.set_training(false);
    add(
        "forward: deterministic in evaluation mode",
        (|| -> Check {
            let a = enc.forward(&refs).map_err(err)?;
            let b = enc.forward(&refs).map_err(err)?;
            let d = (a - b)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_dtype(DType::F64))
                .and_then(|d| d.to_scalar::<f64>())
                .map_err(err)?;
            ensure(d == 0.0, || format!("outputs differ by {d}"))
        })(),
    );
}

fn adapter(p: &LoadedPlugin, options: &str, add: &mut dyn FnMut(&str, Check)) {
    let rt = runtime();
    // Sites wide enough for an adapter's default rank (LoRA refuses a rank above a site's
    // min(in, out), where it would only add parameters).
    let (n_in, n_mid, n_out) = (40, 36, 32);
    let site_a =
        rt.declare_linear("enc.layer.a", n_in, n_mid, true, ParamInit::normal(0.0, 0.5), ParamInit::normal(0.0, 0.1));
    let site_b = rt.declare_linear("enc.layer.b", n_mid, n_out, false, ParamInit::normal(0.0, 0.5), ParamInit::zeros());
    let (Ok(site_a), Ok(_)) = (site_a, site_b) else { return add("setup", Err("cannot declare test sites".into())) };
    add(
        "config: unknown keys are rejected by name",
        rejects_unknown_key(|o| AdapterInstance::create(p, &rt, o), options),
    );
    let ad = match AdapterInstance::create(p, &rt, options) {
        Ok(a) => a,
        Err(e) => return add("create with the given config", Err(err(e))),
    };
    add(
        "targets: attaches to at least one declared site",
        ad.targets().map_err(err).and_then(|t| ensure(!t.is_empty(), || "no sites".into())),
    );
    let values = (0..3 * n_in).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<f32>>();
    let x = Tensor::from_vec(values, (3, n_in), &Device::Cpu).unwrap();
    let xid = rt.insert(x.clone());
    let base = rt.site(site_a).map(|s| ops::linear(&x, &s.weight, s.bias.as_ref()));
    // Give the adapter non-trivial parameters so merging has something to fold in.
    {
        let params = rt.params();
        params.note_write();
        for (i, q) in params.iter().filter(|q| q.name.starts_with("adapter.")).enumerate() {
            let noise = Tensor::randn(0f32, 0.3, q.var.dims(), &Device::Cpu).and_then(|n| n.to_dtype(q.var.dtype()));
            if let Ok(n) = noise {
                let _ = q.var.set(&n);
            }
            let _ = i;
        }
    }
    let adapted = rt.linear(site_a, xid);
    add(
        "linear: adapted output has the base output's shape",
        match (&adapted, &base) {
            (Ok(a), Ok(Ok(b))) => ensure(a.dims() == b.dims(), || format!("{:?} vs {:?}", a.dims(), b.dims())),
            _ => Err("linear failed".into()),
        },
    );
    add(
        "merge(1) then reset: outputs equal the unmerged adapter (<= 1e-5)",
        (|| -> Check {
            let before = adapted.clone().map_err(err)?;
            ad.merge(1.0).map_err(err)?;
            ad.reset().map_err(err)?;
            let after = rt.linear(site_a, xid).map_err(err)?;
            let d = (before - after)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>())
                .map_err(err)?;
            ensure(d <= 1e-5, || format!("max difference {d}"))
        })(),
    );
    rt.release(xid);
}

fn strategy(p: &LoadedPlugin, options: &str, add: &mut dyn FnMut(&str, Check)) {
    let rt = runtime();
    add(
        "config: unknown keys are rejected by name",
        rejects_unknown_key(|o| StrategyInstance::create(p, &rt, "strategy.", o), options),
    );
    let s = match StrategyInstance::create(p, &rt, "strategy.", options) {
        Ok(s) => s,
        Err(e) => return add("create with the given config", Err(err(e))),
    };
    let task = TaskInfo { index: 0, name: "conformance".into(), n_steps: 1 };
    let feats = || Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu).unwrap();
    let (img, txt, old_img, old_txt, teacher_img) = (feats(), feats(), feats(), feats(), feats());
    let tokens = || Tensor::randn(0f32, 1.0, (4, 3, 8), &Device::Cpu).unwrap();
    let (img_tokens, teacher_tokens) = (tokens(), tokens());
    let scale = rt.param(inputs::LOGIT_SCALE, &[1], ParamInit::constant(2.0), true).unwrap();
    // A model parameter the features depend on, so strategies that read parameters and
    // gradients (EWC, WiSE-FT, ZSCL) have something to work on.
    let weight = rt.param("vision.proj.weight", &[8, 8], ParamInit::normal(0.0, 0.1), true).unwrap();
    let old_scale = scale.detach();
    // A replaying strategy gets a replay batch (and its stored features, when it keeps them).
    let replay = s.replay();
    add("replay: the exemplar memory asked for is valid", replay.as_ref().map(|_| ()).map_err(|e| err(e.clone())));
    let replay = replay.ok().flatten();
    let (replay_img, replay_txt) = (feats(), feats());
    // One step as the engine runs it; returns the live handles afterwards.
    let step = |n: u64| -> Result<usize, String> {
        s.before_step(n).map_err(err)?;
        let img = img.matmul(&weight).map_err(err)?;
        let replay_img = replay_img.matmul(&weight).map_err(err)?;
        let mut replayed: Vec<(&str, &Tensor)> = Vec::new();
        if let Some(r) = &replay {
            replayed
                .extend([(inputs::REPLAY_IMAGE_FEATURES, &replay_img), (inputs::REPLAY_TEXT_FEATURES, &replay_txt)]);
            if r.store_features {
                replayed.extend([
                    (inputs::REPLAY_STORED_IMAGE_FEATURES, &old_img),
                    (inputs::REPLAY_STORED_TEXT_FEATURES, &old_txt),
                ]);
            }
        }
        let terms = s
            .loss_terms(
                &[
                    &replayed[..],
                    &[
                        (inputs::IMAGE_FEATURES, &img),
                        (inputs::TEXT_FEATURES, &txt),
                        (inputs::LOGIT_SCALE, &scale),
                        (inputs::OLD_IMAGE_FEATURES, &old_img),
                        (inputs::OLD_TEXT_FEATURES, &old_txt),
                        (inputs::OLD_LOGIT_SCALE, &old_scale),
                        (inputs::REFERENCE_IMAGE_FEATURES, &img),
                        (inputs::REFERENCE_TEXT_FEATURES, &txt),
                        (inputs::INITIAL_IMAGE_FEATURES, &old_img),
                        (inputs::INITIAL_TEXT_FEATURES, &old_txt),
                        (inputs::INITIAL_LOGIT_SCALE, &old_scale),
                        (inputs::TEACHER_IMAGE_FEATURES, &teacher_img),
                        (inputs::IMAGE_TOKENS, &img_tokens),
                        (inputs::TEACHER_IMAGE_TOKENS, &teacher_tokens),
                    ],
                ]
                .concat(),
            )
            .map_err(err)?;
        let mut total = img.sqr().and_then(|x| x.mean_all()).map_err(err)?;
        for (name, t) in &terms {
            ensure(t.elem_count() == 1, || format!("term `{name}` has shape {:?}", t.dims()))?;
            let v =
                t.flatten_all().and_then(|t| t.to_dtype(DType::F64)).and_then(|t| t.to_vec1::<f64>()).map_err(err)?;
            ensure(v[0].is_finite(), || format!("term `{name}` is {}", v[0]))?;
            total = total.broadcast_add(&t.reshape(()).map_err(err)?).map_err(err)?;
        }
        rt.set_grads(Some(total.backward().map_err(err)?));
        let r = s.after_backward(n).map_err(err);
        rt.set_grads(None);
        r?;
        s.after_step(n).map_err(err)?;
        Ok(rt.live_handles())
    };
    add(
        "hooks in order over two tasks (with the gradient pass); loss terms are finite scalars",
        (|| -> Check {
            for index in 0..2 {
                let task = TaskInfo { index, ..task.clone() };
                s.before_task(&task).map_err(err)?;
                step(0)?;
                for b in 0..s.gradient_batches().map_err(err)?.min(2) {
                    let loss = img.matmul(&weight).and_then(|x| x.sqr()?.mean_all()).map_err(err)?;
                    rt.set_grads(Some(loss.backward().map_err(err)?));
                    let r = s.on_gradients(&task, b as u64).map_err(err);
                    rt.set_grads(None);
                    r?;
                }
                s.after_task(&task).map_err(err)?;
            }
            Ok(())
        })(),
    );
    add(
        "no tensor handles leak from step to step",
        (|| -> Check {
            let first = step(1)?;
            let second = step(2)?;
            ensure(second <= first, || format!("live handles grew from {first} to {second} in one step"))
        })(),
    );
    add(
        "state: save then load round-trips",
        (|| -> Check {
            let bytes = s.save_state().map_err(err)?;
            s.load_state(&bytes).map_err(err)?;
            let again = s.save_state().map_err(err)?;
            ensure(bytes == again, || "state differs after load".into())
        })(),
    );
}

fn evaluator(p: &LoadedPlugin, options: &str, add: &mut dyn FnMut(&str, Check)) {
    let rt = runtime();
    add(
        "config: unknown keys are rejected by name",
        rejects_unknown_key(|o| EvaluatorInstance::create(p, &rt, o), options),
    );
    let e = match EvaluatorInstance::create(p, &rt, options) {
        Ok(e) => e,
        Err(e) => return add("create with the given config", Err(err(e))),
    };
    let img = Tensor::randn(0f32, 1.0, (8, 16), &Device::Cpu).unwrap();
    let index = Tensor::from_vec((0..8u32).collect::<Vec<_>>(), 8, &Device::Cpu).unwrap();
    let classes = Tensor::randn(0f32, 1.0, (3, 16), &Device::Cpu).unwrap();
    let labels = Tensor::from_vec((0..8u32).map(|i| i % 3).collect::<Vec<_>>(), 8, &Device::Cpu).unwrap();
    // Everything the host passes in either suite: retrieval (tasks) and classification
    // (zero-shot sets); an evaluator reads what it needs.
    add(
        "evaluate: named, finite metrics",
        e.evaluate(&[
            ("image_embeds", &img),
            ("text_embeds", &img),
            ("text_image_index", &index),
            ("image_group", &index),
            ("class_embeds", &classes),
            ("labels", &labels),
        ])
        .map_err(err)
        .and_then(|m| {
            ensure(!m.is_empty(), || "no metrics".into())?;
            ensure(m.iter().all(|(n, v)| !n.is_empty() && v.is_finite()), || format!("{m:?}"))
        }),
    );
}
