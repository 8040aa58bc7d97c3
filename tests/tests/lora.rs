//! LoRA through the real `lora` cdylib: zero-initialised B leaves the model unchanged; merging
//! with coefficient 1 preserves outputs; the merge follows W <- W + c * (alpha / r) * B A.

use candle_core::{Device, Tensor};
use recall_host::config;
use recall_host::data;
use recall_host::loader::{search_path, Registry};
use recall_host::model::Model;
use recall_host::reference::{Params, TowerShape};
use recall_tests::SMALL_EXPERIMENT;

fn with_lora(extra: &str) -> Model {
    let src = format!("{SMALL_EXPERIMENT}\n[adapter]\nplugin = \"lora\"\nrank = 4\nalpha = 8\n{extra}\n");
    let cfg = config::parse(&src, "lora.toml").unwrap();
    Model::build(&cfg, &Registry::discover(&search_path(&[]))).unwrap()
}

fn batch(model: &Model) -> (Tensor, Tensor, Tensor) {
    let cfg = config::parse(SMALL_EXPERIMENT, "small.toml").unwrap();
    let task = recall_host::engine::load_tasks(&cfg, &model.preprocess).unwrap().remove(0);
    let ex: Vec<&data::Example> = task.test.iter().take(5).collect();
    let rt = &model.runtime;
    let px = data::pixel_batch(&ex, &model.preprocess, rt.device(), rt.float_dtype()).unwrap();
    let caps: Vec<String> = ex.iter().map(|e| e.captions[0].clone()).collect();
    let (ids, mask) = model.tokenize(&caps).unwrap();
    (px, ids, mask)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Give every LoRA matrix random values, as training would.
fn perturb_adapter(model: &Model) {
    for p in model.runtime.params().iter().filter(|p| p.name.starts_with("adapter.")) {
        p.var.set(&Tensor::randn(0f32, 0.2, p.var.dims(), &Device::Cpu).unwrap()).unwrap();
    }
}

#[test]
fn zero_b_leaves_the_base_model_exactly_unchanged() {
    let model = with_lora("");
    let (px, ids, mask) = batch(&model);
    let shape = TowerShape { heads: 2, quick_gelu: true, eps: 1e-5 };
    let base = Params::from_runtime(&model.runtime);
    assert_eq!(max_abs(&model.encode_images(&px).unwrap(), &base.vision(&px, shape).unwrap()), 0.0);
    assert_eq!(max_abs(&model.encode_texts(&ids, &mask).unwrap(), &base.text(&ids, shape).unwrap()), 0.0);
    // q/k/v/out of attention really are adapted (REFERENCES: PEFT on nn.MultiheadAttention was inert).
    let names: Vec<String> = model.runtime.params().iter().map(|p| p.name.clone()).collect();
    for site in [
        "vision.blocks.0.attn.q_proj",
        "vision.blocks.1.attn.out_proj",
        "text.blocks.0.attn.v_proj",
        "text.blocks.0.mlp.fc1",
    ] {
        assert!(names.contains(&format!("adapter.{site}.lora_A")), "{site} not adapted");
    }
}

#[test]
fn adapter_changes_outputs_and_merge_with_one_preserves_them() {
    let model = with_lora("");
    let (px, ids, mask) = batch(&model);
    let before_img = model.encode_images(&px).unwrap();
    perturb_adapter(&model);
    let adapted_img = model.encode_images(&px).unwrap();
    let adapted_txt = model.encode_texts(&ids, &mask).unwrap();
    assert!(max_abs(&before_img, &adapted_img) > 1e-3, "the adapter must change the output");
    let adapter = model.adapter.as_ref().unwrap();
    adapter.merge(1.0).unwrap();
    adapter.reset().unwrap();
    assert!(max_abs(&adapted_img, &model.encode_images(&px).unwrap()) <= 1e-5);
    assert!(max_abs(&adapted_txt, &model.encode_texts(&ids, &mask).unwrap()) <= 1e-5);
}

#[test]
fn merge_follows_the_c_clip_formula() {
    for (extra, scale) in [("", 8.0 / 4.0), ("rslora = true", 8.0 / 2.0)] {
        let model = with_lora(extra);
        perturb_adapter(&model);
        let rt = &model.runtime;
        let site = "vision.blocks.0.mlp.fc1";
        let (w0, a, b) = {
            let p = rt.params();
            let get = |n: &str| p.get(n).unwrap().var.as_tensor().copy().unwrap();
            (
                get(&format!("{site}.weight")),
                get(&format!("adapter.{site}.lora_A")),
                get(&format!("adapter.{site}.lora_B")),
            )
        };
        model.adapter.as_ref().unwrap().merge(0.5).unwrap();
        let expected = (w0 + (b.matmul(&a).unwrap() * (0.5 * scale)).unwrap()).unwrap();
        let got = rt.params().get(&format!("{site}.weight")).unwrap().var.as_tensor().copy().unwrap();
        assert!(max_abs(&expected, &got) <= 1e-6, "{extra}: merged weight is off by {}", max_abs(&expected, &got));
    }
}

#[test]
fn freeze_base_adapted_freezes_exactly_the_targeted_weights() {
    let model = with_lora("targets = [\"vision.blocks.*.mlp.*\"]\nfreeze_base = \"adapted\"");
    let p = model.runtime.params();
    assert!(!p.get("vision.blocks.0.mlp.fc1.weight").unwrap().trainable);
    assert!(!p.get("vision.blocks.0.mlp.fc1.bias").unwrap().trainable);
    assert!(p.get("vision.blocks.0.attn.q_proj.weight").unwrap().trainable);
    assert!(p.get("adapter.vision.blocks.0.mlp.fc1.lora_A").unwrap().trainable);
    assert!(p.get("adapter.vision.blocks.0.attn.q_proj.lora_A").is_none());
}

#[test]
fn frozen_parameters_are_constants_in_the_graph_and_merges_still_reach_them() {
    let model = with_lora("targets = [\"vision.blocks.*.mlp.*\"]\nfreeze_base = \"adapted\"");
    perturb_adapter(&model);
    let (px, _, _) = batch(&model);
    let out = model.encode_images(&px).unwrap();
    let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    {
        let p = model.runtime.params();
        let frozen = p.get("vision.blocks.0.mlp.fc1.weight").unwrap();
        assert!(grads.get(frozen.var.as_tensor()).is_none(), "a frozen weight got a gradient");
        let trained = p.get("vision.blocks.0.attn.q_proj.weight").unwrap();
        assert!(grads.get(trained.var.as_tensor()).is_some(), "a trainable weight got no gradient");
        assert!(grads.get(p.get("adapter.vision.blocks.0.mlp.fc1.lora_A").unwrap().var.as_tensor()).is_some());
    }
    // Merging writes into the frozen weights; the forward pass sees the new values.
    let before = model.runtime.params().get("vision.blocks.0.mlp.fc1.weight").unwrap().var.as_tensor().copy().unwrap();
    model.adapter.as_ref().unwrap().merge(1.0).unwrap();
    model.adapter.as_ref().unwrap().reset().unwrap();
    let after = model.runtime.params().get("vision.blocks.0.mlp.fc1.weight").unwrap().var.as_tensor().copy().unwrap();
    assert!(max_abs(&before, &after) > 1e-4, "the merge did not change the frozen weight");
    let merged = model.encode_images(&px).unwrap();
    assert!(max_abs(&out.detach(), &merged) < 1e-4, "merge + fresh adapter must preserve outputs");
}
