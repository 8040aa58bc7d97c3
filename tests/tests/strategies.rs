//! Strategy losses against PyTorch references on fixed tensors: values and gradients within
//! 1e-5 (fixtures and their generators in tests/fixtures/strategies/).

use candle_core::{DType, Device, Tensor, Var};
use recall_host::loader::load_plugin;
use recall_host::plugin::StrategyInstance;
use recall_host::runtime::Runtime;
use recall_tests::{cdylib, workspace_root};

/// max |a - b| / max |b|; a reference below 1e-6 in magnitude is compared absolutely, since
/// gradients that vanish in theory (a bias before batch norm) are pure rounding noise.
fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let s = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-6);
    d / s
}

fn fixture(name: &str) -> std::collections::HashMap<String, Tensor> {
    let path = workspace_root().join("tests/fixtures/strategies").join(name);
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Each named fixture tensor as a variable, so gradients reach it.
fn variables<'a>(fx: &std::collections::HashMap<String, Tensor>, names: &[&'a str]) -> Vec<(&'a str, Var)> {
    names.iter().map(|n| (*n, Var::from_tensor(&fx[*n]).unwrap())).collect()
}

#[test]
fn ckc_value_and_gradients_match_pytorch() {
    let fx = fixture("ckc.safetensors");
    let plugin = load_plugin(&cdylib("recall-plugin-ckc")).unwrap();
    for (case, config) in [
        ("learned", "dim = 8\n"),
        ("fixed", "dim = 8\ntemperature = 0.1\n"),
        // As C-CLIP's code: per-modality BatchNorm, raw inputs.
        ("code", "dim = 8\nbatch_norm = \"per-modality\"\nnormalize_inputs = false\n"),
    ] {
        let rt = Runtime::new(Device::Cpu, DType::F64, 0);
        let s = StrategyInstance::create(&plugin, &rt, "strategy.", config).unwrap();
        // The projector's parameters take the fixture's values.
        for p in ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"] {
            let params = rt.params();
            let param =
                params.get(&format!("strategy.projector.{p}")).unwrap_or_else(|| panic!("no projector parameter {p}"));
            param.var.set(&fx[p]).unwrap();
        }
        let vars = variables(
            &fx,
            &["image_features", "text_features", "old_image_features", "old_text_features", "logit_scale"],
        );
        let inputs: Vec<(&str, &Tensor)> = vars.iter().map(|(n, v)| (*n, v.as_tensor())).collect();
        let terms = s.loss_terms(&inputs).unwrap();
        assert_eq!(terms.len(), 1);
        let grads = loss_matches_fixture(&fx, case, &terms[0].1, &vars);
        let params = rt.params();
        for p in ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"] {
            let param = params.get(&format!("strategy.projector.{p}")).unwrap();
            let ours = grads.get(param.var.as_tensor()).unwrap_or_else(|| panic!("{case}: no gradient for {p}"));
            let e = max_rel(ours, &fx[&format!("{case}.grad.{p}")]);
            assert!(e <= 1e-5, "{case}: gradient of projector {p} off by {e:e}");
        }
    }
}

#[test]
fn ckc_adds_nothing_without_an_old_model() {
    let rt = Runtime::new(Device::Cpu, DType::F32, 0);
    let s = StrategyInstance::create(&load_plugin(&cdylib("recall-plugin-ckc")).unwrap(), &rt, "strategy.", "dim = 4")
        .unwrap();
    let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(s.loss_terms(&[("image_features", &x), ("text_features", &x)]).unwrap().is_empty());
    // From the second task on, missing old features are an error, not a silent no-op.
    s.before_task(&recall_sdk::TaskInfo { index: 1, name: "b".into(), n_steps: 1 }).unwrap();
    let e = s.loss_terms(&[("image_features", &x), ("text_features", &x)]).unwrap_err();
    assert!(e.message.contains("are needed from task 2 on"), "{}", e.message);
    let e = StrategyInstance::create(
        &load_plugin(&cdylib("recall-plugin-ckc")).unwrap(),
        &rt,
        "s2.",
        "dim = 4\nprojector = \"conv\"",
    )
    .unwrap_err();
    assert_eq!(e.config_key.as_deref(), Some("projector"));
    // A dim other than the features' width is a config error naming the width to set.
    let s =
        StrategyInstance::create(&load_plugin(&cdylib("recall-plugin-ckc")).unwrap(), &rt, "s3.", "dim = 8").unwrap();
    s.before_task(&recall_sdk::TaskInfo { index: 1, name: "b".into(), n_steps: 1 }).unwrap();
    let inputs = [("image_features", &x), ("text_features", &x), ("old_image_features", &x), ("old_text_features", &x)];
    let e = s.loss_terms(&inputs).unwrap_err();
    assert_eq!(e.config_key.as_deref(), Some("dim"));
    assert!(e.message.contains("dim = 8 but the model's features are 4 wide; set dim = 4"), "{}", e.message);
}

#[test]
fn a_fresh_ckc_projector_is_reinitialised_each_task_and_a_kept_one_is_not() {
    let plugin = load_plugin(&cdylib("recall-plugin-ckc")).unwrap();
    for fresh in [true, false] {
        let rt = Runtime::new(Device::Cpu, DType::F32, 0);
        let s =
            StrategyInstance::create(&plugin, &rt, "strategy.", &format!("dim = 4\nfresh_per_task = {fresh}")).unwrap();
        let names = ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"];
        // Training moved every projector parameter.
        for n in names {
            let params = rt.params();
            let p = params.get(&format!("strategy.projector.{n}")).unwrap();
            p.var.set(&(p.var.as_tensor() + 0.25).unwrap()).unwrap();
        }
        s.before_task(&recall_sdk::TaskInfo { index: 1, name: "b".into(), n_steps: 1 }).unwrap();
        let params = rt.params();
        let bias = params.get("strategy.projector.fc1.bias").unwrap().var.to_vec1::<f32>().unwrap();
        let gamma = params.get("strategy.projector.bn.weight").unwrap().var.to_vec1::<f32>().unwrap();
        if fresh {
            assert!(bias.iter().all(|&b| b == 0.0) && gamma.iter().all(|&g| g == 1.0), "{bias:?} {gamma:?}");
        } else {
            assert!(bias.iter().all(|&b| b == 0.25) && gamma.iter().all(|&g| g == 1.25), "{bias:?} {gamma:?}");
        }
    }
    let e = StrategyInstance::create(
        &plugin,
        &Runtime::new(Device::Cpu, DType::F32, 0),
        "s.",
        "dim = 4\nbatch_norm = \"each\"",
    )
    .unwrap_err();
    assert_eq!(e.config_key.as_deref(), Some("batch_norm"));
    assert!(e.message.contains("unknown batch_norm `each`; expected joint or per-modality"), "{}", e.message);
}

#[test]
fn lwf_value_and_gradients_match_pytorch() {
    let fx = fixture("lwf.safetensors");
    let plugin = load_plugin(&cdylib("recall-plugin-lwf")).unwrap();
    let cclip = "temperature = 1.0\naverage_directions = true\nweight = 2.0\n";
    let cclip_table = format!("{cclip}teacher_scale = \"student\"\n");
    for (case, config) in [("zscl", ""), ("cclip", cclip), ("cclip_table", cclip_table.as_str())] {
        let rt = Runtime::new(Device::Cpu, DType::F64, 0);
        let s = StrategyInstance::create(&plugin, &rt, "strategy.", config).unwrap();
        let vars = variables(
            &fx,
            &[
                "image_features",
                "text_features",
                "logit_scale",
                "old_image_features",
                "old_text_features",
                "old_logit_scale",
            ],
        );
        let inputs: Vec<(&str, &Tensor)> = vars.iter().map(|(n, v)| (*n, v.as_tensor())).collect();
        let terms = s.loss_terms(&inputs).unwrap();
        loss_matches_fixture(&fx, case, &terms[0].1, &vars);
    }
}

/// The loss equals the fixture's `{case}.loss` and each variable's gradient its
/// `{case}.grad.NAME` within 1e-5; a variable the fixture has no gradient for (a teacher's
/// input) must get none. Returns the gradients for further checks.
fn loss_matches_fixture(
    fx: &std::collections::HashMap<String, Tensor>,
    case: &str,
    loss: &Tensor,
    vars: &[(&str, Var)],
) -> candle_core::backprop::GradStore {
    let value = loss.to_scalar::<f64>().unwrap();
    let expected = fx[&format!("{case}.loss")].to_vec1::<f64>().unwrap()[0];
    assert!((value - expected).abs() / expected.abs() <= 1e-5, "{case}: loss {value} vs {expected}");
    let grads = loss.backward().unwrap();
    for (name, v) in vars {
        match fx.get(&format!("{case}.grad.{name}")) {
            Some(g) => {
                let ours = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
                let e = max_rel(&ours.reshape(g.dims()).unwrap(), g);
                assert!(e <= 1e-5, "{case}: gradient of {name} off by {e:e}");
            }
            // Teacher and old features are detached: no gradient (or only zeros) may reach them.
            None => assert!(
                grads.get(v.as_tensor()).is_none_or(|g| g
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    == 0.0),
                "{case}: {name} got a gradient"
            ),
        }
    }
    grads
}

const EWC_PARAMS: [(&str, &[usize]); 2] = [("vision.w", &[3, 4]), ("text.b", &[5])];

fn task(index: u64) -> recall_sdk::TaskInfo {
    recall_sdk::TaskInfo { index, name: format!("t{index}").as_str().into(), n_steps: 1 }
}

/// A runtime holding the two fixture parameters (trainable, f64).
fn ewc_runtime() -> std::rc::Rc<Runtime> {
    let rt = Runtime::new(Device::Cpu, DType::F64, 0);
    for (name, shape) in EWC_PARAMS {
        rt.param(name, shape, recall_sdk::ParamInit::zeros(), true).unwrap();
    }
    rt
}

/// Every fixture parameter's current value equals the fixture tensor `{prefix}{name}`.
fn assert_params(rt: &Runtime, fx: &std::collections::HashMap<String, Tensor>, prefix: &str, what: &str) {
    for (name, _) in EWC_PARAMS {
        let ours = rt.params().get(name).unwrap().var.as_tensor().clone();
        let e = max_rel(&ours, &fx[&format!("{prefix}{name}")]);
        assert!(e <= 1e-12, "{what}: {name} off by {e:e}");
    }
}

fn set_params(rt: &Runtime, fx: &std::collections::HashMap<String, Tensor>, prefix: &str) {
    for (name, _) in EWC_PARAMS {
        rt.params().get(name).unwrap().var.set(&fx[&format!("{prefix}{name}")]).unwrap();
    }
}

/// The host's gradient pass of task `k` as the engine runs it, with the fixture's batch
/// gradients (the loss sum(g * theta) has gradient g): `on_gradients` after each batch.
fn gradient_pass(
    rt: &Runtime,
    s: &StrategyInstance,
    fx: &std::collections::HashMap<String, Tensor>,
    k: u64,
    batches: usize,
) {
    for b in 0..batches {
        let mut loss: Option<Tensor> = None;
        for (name, _) in EWC_PARAMS {
            let p = rt.params().get(name).unwrap().var.as_tensor().clone();
            let term = (p * &fx[&format!("task{k}.grad{b}.{name}")]).unwrap().sum_all().unwrap();
            loss = Some(match loss {
                Some(l) => (l + term).unwrap(),
                None => term,
            });
        }
        rt.set_grads(Some(loss.unwrap().backward().unwrap()));
        s.on_gradients(&task(k - 1), b as u64).unwrap();
        rt.set_grads(None);
    }
}

/// Drive a strategy through two tasks the way the engine does: the weights after each task,
/// then the host's gradient pass, whose batch gradients are the fixture's (the loss
/// sum(g * theta) has gradient g).
fn consolidate_two_tasks(rt: &Runtime, s: &StrategyInstance, fx: &std::collections::HashMap<String, Tensor>) {
    for (k, batches) in [(1u64, 2), (2, 3)] {
        s.before_task(&task(k - 1)).unwrap();
        set_params(rt, fx, &format!("task{k}.star."));
        assert!(s.gradient_batches().unwrap() >= batches);
        gradient_pass(rt, s, fx, k, batches);
        s.after_task(&task(k - 1)).unwrap();
    }
}

/// Drive an EWC whose Fisher is taken before each task, as the engine does: the weights the
/// task starts from, the gradient pass on them (the fixture's gradients), then the task's
/// first loss. The penalty is active from the first task.
fn consolidate_before_each_task(rt: &Runtime, s: &StrategyInstance, fx: &std::collections::HashMap<String, Tensor>) {
    assert_eq!(s.gradient_pass().unwrap(), recall_sdk::GradientPass::BeforeTask);
    for (k, batches) in [(1u64, 2), (2, 3)] {
        set_params(rt, fx, &format!("task{k}.star."));
        s.before_task(&task(k - 1)).unwrap();
        gradient_pass(rt, s, fx, k, batches);
        // At the task's start the weights are theta*: the penalty is there, and zero.
        let terms = s.loss_terms(&[]).unwrap();
        assert_eq!(terms.len(), 1, "task {k}: the penalty is active from the first task");
        assert_eq!(terms[0].1.to_scalar::<f64>().unwrap(), 0.0);
        s.after_task(&task(k - 1)).unwrap();
    }
}

fn check_ewc_penalty(rt: &Runtime, s: &StrategyInstance, fx: &std::collections::HashMap<String, Tensor>, case: &str) {
    set_params(rt, fx, "theta.");
    let terms = s.loss_terms(&[]).unwrap();
    assert_eq!(terms.len(), 1, "{case}: one penalty term");
    assert_eq!(terms[0].0, "ewc");
    let value = terms[0].1.to_scalar::<f64>().unwrap();
    let expected = fx[&format!("{case}.loss")].to_vec1::<f64>().unwrap()[0];
    assert!((value - expected).abs() / expected.abs() <= 1e-5, "{case}: penalty {value} vs {expected}");
    let grads = terms[0].1.backward().unwrap();
    for (name, _) in EWC_PARAMS {
        let params = rt.params();
        let ours = grads.get(params.get(name).unwrap().var.as_tensor()).unwrap();
        let e = max_rel(ours, &fx[&format!("{case}.grad.{name}")]);
        assert!(e <= 1e-5, "{case}: gradient of {name} off by {e:e}");
    }
}

#[test]
fn ewc_penalty_and_gradients_match_pytorch_in_both_modes() {
    let fx = fixture("ewc.safetensors");
    let plugin = load_plugin(&cdylib("recall-plugin-ewc")).unwrap();
    for (case, config) in [
        ("standard_half", "lambda = 0.4\nfisher_batches = 3\n"),
        ("online_full", "lambda = 3.0\nmode = \"online\"\ngamma = 0.7\nconvention = \"full\"\nfisher_batches = 3\n"),
    ] {
        let rt = ewc_runtime();
        let s = StrategyInstance::create(&plugin, &rt, "strategy.0.", config).unwrap();
        set_params(&rt, &fx, "task1.star.");
        assert!(s.loss_terms(&[]).unwrap().is_empty(), "{case}: no penalty before any task is consolidated");
        consolidate_two_tasks(&rt, &s, &fx);
        check_ewc_penalty(&rt, &s, &fx, case);
        // The state round-trips: a fresh instance loaded from it gives the same penalty.
        let state = s.save_state().unwrap();
        let fresh = StrategyInstance::create(&plugin, &rt, "strategy.1.", config).unwrap();
        fresh.load_state(&state).unwrap();
        check_ewc_penalty(&rt, &fresh, &fx, case);
    }
}

#[test]
fn ewc_as_c_clip_runs_it_takes_the_fisher_before_each_task_and_keeps_the_previous_task_only() {
    let fx = fixture("ewc.safetensors");
    let plugin = load_plugin(&cdylib("recall-plugin-ewc")).unwrap();
    let config = "lambda = 0.4\nmode = \"online\"\ngamma = 0.0\nfisher = \"before-task\"\nfisher_batches = 3\n";
    let rt = ewc_runtime();
    let s = StrategyInstance::create(&plugin, &rt, "strategy.0.", config).unwrap();
    consolidate_before_each_task(&rt, &s, &fx);
    check_ewc_penalty(&rt, &s, &fx, "latest_half");
    let fresh = StrategyInstance::create(&plugin, &rt, "strategy.1.", config).unwrap();
    fresh.load_state(&s.save_state().unwrap()).unwrap();
    check_ewc_penalty(&rt, &fresh, &fx, "latest_half");
    // The default takes it after the task, as before.
    let after = StrategyInstance::create(&plugin, &rt, "strategy.2.", "").unwrap();
    assert_eq!(after.gradient_pass().unwrap(), recall_sdk::GradientPass::AfterTask);
}

#[test]
fn ewc_rejects_bad_options() {
    let plugin = load_plugin(&cdylib("recall-plugin-ewc")).unwrap();
    let rt = ewc_runtime();
    for (config, key) in [
        ("lambda = -1.0", "lambda"),
        ("gamma = 1.5", "gamma"),
        ("mode = \"onlin\"", "mode"),
        ("fisher = \"after\"", "fisher"),
    ] {
        let e = match StrategyInstance::create(&plugin, &rt, "strategy.0.", config) {
            Ok(_) => panic!("`{config}` was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(key), "{config}: {e}");
    }
}

#[test]
fn wise_ft_interpolation_matches_the_reference() {
    let fx = fixture("ewc.safetensors");
    let plugin = load_plugin(&cdylib("recall-plugin-wise-ft")).unwrap();
    for anchor in ["initial", "previous"] {
        let rt = ewc_runtime();
        let s = StrategyInstance::create(&plugin, &rt, "strategy.0.", &format!("alpha = 0.8\nanchor = \"{anchor}\"\n"))
            .unwrap();
        set_params(&rt, &fx, "wise.theta0.");
        for k in [1u64, 2] {
            s.before_task(&task(k - 1)).unwrap();
            // Training moves the weights to the fine-tuned ones.
            set_params(&rt, &fx, &format!("wise.ft{k}."));
            s.after_task(&task(k - 1)).unwrap();
            assert_params(&rt, &fx, &format!("wise.{anchor}.after{k}."), &format!("{anchor}, task {k}"));
        }
    }
}

#[test]
fn zscl_distillation_matches_pytorch_on_the_reference_batch() {
    // ZSCL's term is LwF's formula (T = 2, both ways summed) between the model being trained
    // and the initial model, on the reference batch: the "zscl" case of lwf.safetensors.
    let fx = fixture("lwf.safetensors");
    let plugin = load_plugin(&cdylib("recall-plugin-zscl")).unwrap();
    let rt = Runtime::new(Device::Cpu, DType::F64, 0);
    let s = StrategyInstance::create(&plugin, &rt, "strategy.", "we = false\n").unwrap();
    assert!(s.wants_initial_model().unwrap());
    let vars = variables(
        &fx,
        &[
            "image_features",
            "text_features",
            "logit_scale",
            "old_image_features",
            "old_text_features",
            "old_logit_scale",
        ],
    );
    fn renamed(n: &str) -> &str {
        match n {
            "image_features" => "reference_image_features",
            "text_features" => "reference_text_features",
            "old_image_features" => "initial_image_features",
            "old_text_features" => "initial_text_features",
            "old_logit_scale" => "initial_logit_scale",
            other => other,
        }
    }
    let inputs: Vec<(&str, &Tensor)> = vars.iter().map(|(n, v)| (renamed(n), v.as_tensor())).collect();
    s.before_task(&task(0)).unwrap();
    let terms = s.loss_terms(&inputs).unwrap();
    assert_eq!(terms.len(), 1);
    loss_matches_fixture(&fx, "zscl", &terms[0].1, &vars);
}

#[test]
fn zscl_weight_ensembling_matches_the_reference_loop() {
    let fx = fixture("zscl_we.safetensors");
    let plugin = load_plugin(&cdylib("recall-plugin-zscl")).unwrap();
    let rt = ewc_runtime();
    let s = StrategyInstance::create(&plugin, &rt, "strategy.", "we_every = 2\n").unwrap();
    set_params(&rt, &fx, "start.");
    s.before_task(&task(0)).unwrap();
    for step in 1..=7u64 {
        set_params(&rt, &fx, &format!("step{step}."));
        s.after_step(step - 1).unwrap();
    }
    s.after_task(&task(0)).unwrap();
    assert_params(&rt, &fx, "final.", "weight ensemble after 7 steps");
}

#[test]
fn clip_loss_value_and_gradients_match_open_clip() {
    let fx = fixture("clip_loss.safetensors");
    let vars = variables(&fx, &["image_features", "text_features", "logit_scale"]);
    let loss =
        recall_host::runtime::ops::clip_loss(vars[0].1.as_tensor(), vars[1].1.as_tensor(), vars[2].1.as_tensor())
            .unwrap();
    let value = loss.to_scalar::<f64>().unwrap();
    let expected = fx["loss"].to_vec1::<f64>().unwrap()[0];
    assert!((value - expected).abs() / expected.abs() <= 1e-5, "loss {value} vs {expected}");
    let grads = loss.backward().unwrap();
    for (name, v) in &vars {
        let g = &fx[&format!("grad.{name}")];
        let ours = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let e = max_rel(&ours.reshape(g.dims()).unwrap(), g);
        assert!(e <= 1e-5, "gradient of {name} off by {e:e}");
    }
}

#[test]
fn distill_value_and_gradients_match_pytorch() {
    let fx = fixture("distill.safetensors");
    let plugin = load_plugin(&cdylib("recall-plugin-distill")).unwrap();
    for (case, config) in [("normalized", ""), ("raw", "normalize = false\nweight = 1.0\n")] {
        let rt = Runtime::new(Device::Cpu, DType::F64, 0);
        let s = StrategyInstance::create(&plugin, &rt, "strategy.", config).unwrap();
        let vars = variables(&fx, &["image_features", "teacher_image_features"]);
        let inputs: Vec<(&str, &Tensor)> = vars.iter().map(|(n, v)| (*n, v.as_tensor())).collect();
        let terms = s.loss_terms(&inputs).unwrap();
        assert_eq!(terms[0].0, "distill");
        loss_matches_fixture(&fx, case, &terms[0].1, &vars);
    }
    // TokLIP's token-level term on top (weight 10): the sum of both terms and its gradients.
    let rt = Runtime::new(Device::Cpu, DType::F64, 0);
    let s = StrategyInstance::create(&plugin, &rt, "strategy.", "token_weight = 10.0\n").unwrap();
    let names = ["image_features", "teacher_image_features", "image_tokens", "teacher_image_tokens"];
    let vars = variables(&fx, &names);
    let inputs: Vec<(&str, &Tensor)> = vars.iter().map(|(n, v)| (*n, v.as_tensor())).collect();
    let terms = s.loss_terms(&inputs).unwrap();
    assert_eq!(terms.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["distill", "distill_tokens"]);
    loss_matches_fixture(&fx, "tokens", &(&terms[0].1 + &terms[1].1).unwrap(), &vars);
    // Token features missing, or of another shape: the error names the fix.
    let e = s.loss_terms(&inputs[..3]).unwrap_err().to_string();
    assert!(e.contains("teacher_image_tokens") && e.contains("token_weight = 0"), "{e}");
    let fewer = fx["teacher_image_tokens"].narrow(1, 0, 2).unwrap();
    let e = s.loss_terms(&[inputs[0], inputs[1], inputs[2], ("teacher_image_tokens", &fewer)]).unwrap_err().to_string();
    assert!(e.contains("[5, 4, 3]") && e.contains("[5, 2, 3]") && e.contains("one token per"), "{e}");
    // Without a teacher the error says what to declare.
    let rt = Runtime::new(Device::Cpu, DType::F64, 0);
    let s = StrategyInstance::create(&plugin, &rt, "strategy.", "").unwrap();
    let e = s.loss_terms(&[("image_features", &fx["image_features"])]).unwrap_err().to_string();
    assert!(e.contains("[teacher]"), "{e}");
    let e = StrategyInstance::create(&plugin, &rt, "strategy.", "weight = -1.0").err().unwrap().to_string();
    assert!(e.contains("weight"), "{e}");
}

/// The replay batch's inputs of the fixture: the replayed features as variables (gradients
/// reach them), the stored ones as plain tensors (targets, as the host passes them).
fn replay_inputs(fx: &std::collections::HashMap<String, Tensor>) -> Vec<(&'static str, Var)> {
    variables(fx, &["replay_image_features", "replay_text_features", "logit_scale"])
}

#[test]
fn experience_replay_s_separate_term_matches_pytorch() {
    let fx = fixture("replay.safetensors");
    let plugin = load_plugin(&cdylib("recall-plugin-replay")).unwrap();
    let rt = Runtime::new(Device::Cpu, DType::F64, 0);
    let s =
        StrategyInstance::create(&plugin, &rt, "strategy.", "memory = 10\nmode = \"separate\"\nweight = 0.7").unwrap();
    let spec = s.replay().unwrap().unwrap();
    assert_eq!((spec.budget, spec.mode, spec.store_features), (10, recall_sdk::ReplayMode::Separate, false));
    let vars = replay_inputs(&fx);
    let inputs: Vec<(&str, &Tensor)> = vars.iter().map(|(n, v)| (*n, v.as_tensor())).collect();
    let terms = s.loss_terms(&inputs).unwrap();
    assert_eq!(terms.iter().map(|t| t.0.as_str()).collect::<Vec<_>>(), ["replay"]);
    loss_matches_fixture(&fx, "er", &terms[0].1, &vars);
    // Without a replay batch (an empty memory) there is no term.
    let (img, txt) = (&fx["replay_image_features"], &fx["replay_text_features"]);
    let current = [("image_features", img), ("text_features", txt), ("logit_scale", &fx["logit_scale"])];
    assert!(s.loss_terms(&current).unwrap().is_empty());
}

#[test]
fn der_plus_plus_terms_match_pytorch() {
    let fx = fixture("replay.safetensors");
    let plugin = load_plugin(&cdylib("recall-plugin-der")).unwrap();
    let rt = Runtime::new(Device::Cpu, DType::F64, 0);
    let s = StrategyInstance::create(&plugin, &rt, "strategy.", "memory = 10\nalpha = 0.3\nbeta = 0.6").unwrap();
    let spec = s.replay().unwrap().unwrap();
    assert_eq!((spec.mode, spec.store_features), (recall_sdk::ReplayMode::Separate, true));
    let vars = replay_inputs(&fx);
    let mut inputs: Vec<(&str, &Tensor)> = vars.iter().map(|(n, v)| (*n, v.as_tensor())).collect();
    inputs.push(("replay_stored_image_features", &fx["replay_stored_image_features"]));
    inputs.push(("replay_stored_text_features", &fx["replay_stored_text_features"]));
    let terms = s.loss_terms(&inputs).unwrap();
    assert_eq!(terms.iter().map(|t| t.0.as_str()).collect::<Vec<_>>(), ["der_mse", "der_clip"]);
    for (name, term) in &terms {
        let (value, want) =
            (term.to_scalar::<f64>().unwrap(), fx[&format!("{name}.loss")].to_vec1::<f64>().unwrap()[0]);
        assert!((value - want).abs() / want.abs() <= 1e-5, "{name}: {value} vs {want}");
    }
    let total = (&terms[0].1 + &terms[1].1).unwrap();
    loss_matches_fixture(&fx, "der", &total, &vars);
}

#[test]
fn replay_strategies_reject_bad_options() {
    let cases = [
        ("recall-plugin-replay", "memory = 0", "memory", "at least 1"),
        ("recall-plugin-replay", "memory = 5\nbatch_size = 0", "batch_size", "at least 1"),
        ("recall-plugin-replay", "memory = 5\nweight = 2.0", "weight", "separate"),
        ("recall-plugin-replay", "memory = 5\npolicy = \"fifo\"", "policy", "reservoir"),
        ("recall-plugin-der", "memory = 5\nalpha = -1.0", "alpha", ">= 0"),
    ];
    for (lib, config, key, says) in cases {
        let rt = Runtime::new(Device::Cpu, DType::F64, 0);
        let e = match StrategyInstance::create(&load_plugin(&cdylib(lib)).unwrap(), &rt, "strategy.0.", config) {
            Ok(_) => panic!("{lib}: `{config}` was accepted"),
            Err(e) => e,
        };
        assert!(e.config_key.as_deref() == Some(key) || e.message.contains(key), "{lib} `{config}`: {e:?}");
        assert!(e.message.contains(says), "{lib} `{config}`: {}", e.message);
    }
}
