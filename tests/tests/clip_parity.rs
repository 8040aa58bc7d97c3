//! Parity with the reference implementations: a transformers CLIPModel (small random config,
//! save_pretrained) and the same weights in the OpenAI/open_clip layout, both loaded through
//! the `clip-vision` / `clip-text` plugins, give the reference's embeddings and logits within
//! 1e-4 relative. Fixtures and their generator: tests/fixtures/clip/.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use recall_host::config::{ExperimentSection, ModelSection, NamedSource};
use recall_host::loader::{search_path, Registry};
use recall_host::model::{BuildError, Model};
use recall_host::runtime::ops;
use recall_tests::workspace_root;

fn fixture(rel: &str) -> std::path::PathBuf {
    workspace_root().join("tests/fixtures/clip").join(rel)
}

fn model_section(checkpoint: &Path, extra_vision: &str) -> ModelSection {
    toml::from_str(&format!(
        "checkpoint = {:?}\n[tokenizer]\nplugin = \"clip-bpe\"\n[vision]\nplugin = \"clip-vision\"\n{extra_vision}\n[text]\nplugin = \"clip-text\"\n",
        checkpoint.display().to_string()
    ))
    .unwrap()
}

fn build(checkpoint: &Path, extra_vision: &str) -> Result<Model, BuildError> {
    let exp: ExperimentSection = toml::from_str("name = \"parity\"").unwrap();
    let reg = Registry::discover(&search_path(&[]));
    Model::build_parts(&exp, &model_section(checkpoint, extra_vision), None, &NamedSource("parity".into()), &reg)
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("reference.safetensors"), &Device::Cpu).unwrap()
}

/// max |a - b| / max |b|
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d =
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let s = b.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    d / s
}

fn check(checkpoint: &Path, raw_image_key: &str, raw_text_key: &str) {
    let model = build(checkpoint, "").unwrap_or_else(|e| panic!("{e}"));
    let r = reference();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = ids.ne(0u32).unwrap().to_dtype(DType::U32).unwrap();
    let img = model.encode_images(&r["pixel_values"]).unwrap();
    let txt = model.encode_texts(&ids, &mask).unwrap();
    let (ei, et) = (rel(&img, &r[raw_image_key]), rel(&txt, &r[raw_text_key]));
    assert!(ei <= 1e-4, "{}: image embeddings off by {ei:e} (relative)", checkpoint.display());
    assert!(et <= 1e-4, "{}: text embeddings off by {et:e} (relative)", checkpoint.display());
    let (ni, nt) = (ops::l2_normalize(&img).unwrap(), ops::l2_normalize(&txt).unwrap());
    assert!(rel(&ni, &r["image_embeds"]) <= 1e-4);
    assert!(rel(&nt, &r["text_embeds"]) <= 1e-4);
    let logits = ni.matmul(&nt.t().unwrap()).unwrap().broadcast_mul(&model.logit_scale.exp().unwrap()).unwrap();
    let el = rel(&logits, &r["logits_per_image"]);
    assert!(el <= 1e-4, "{}: logits off by {el:e}", checkpoint.display());
    println!("{}: image {ei:.2e}, text {et:.2e}, logits {el:.2e}", checkpoint.display());
}

#[test]
fn transformers_layout_matches_transformers() {
    check(&fixture("hf"), "image_embeds_raw", "text_embeds_raw");
}

#[test]
fn open_clip_layout_matches_open_clip_and_transformers() {
    check(&fixture("open_clip"), "open_clip_image", "open_clip_text");
    check(&fixture("open_clip/model.safetensors"), "image_embeds_raw", "text_embeds_raw");
}

#[test]
fn bpe_ids_of_the_fixture_texts_match_open_clip() {
    let texts: Vec<String> = serde_json::from_str(&std::fs::read_to_string(fixture("texts.json")).unwrap()).unwrap();
    let model = build(&fixture("hf"), "").unwrap();
    let (ids, _) = model.tokenize(&texts).unwrap();
    let expected = reference()["input_ids"].to_dtype(DType::U32).unwrap();
    assert_eq!(ids.to_vec2::<u32>().unwrap(), expected.to_vec2::<u32>().unwrap());
}

#[test]
fn explicit_keys_must_agree_with_the_checkpoint() {
    let e = build(&fixture("hf"), "width = 48").err().expect("disagreeing width must be refused").to_string();
    assert!(e.contains("`width` is 48 but the checkpoint says 32"), "{e}");
}

/// Write a copy of the HF checkpoint with some tensors dropped, renamed or reshaped.
fn damaged_copy(dir: &Path) -> std::path::PathBuf {
    let mut t = candle_core::safetensors::load(fixture("hf/model.safetensors"), &Device::Cpu).unwrap();
    t.remove("vision_model.encoder.layers.1.mlp.fc2.bias").unwrap();
    t.remove("text_model.final_layer_norm.weight").unwrap();
    let bad = Tensor::zeros((7, 32), DType::F32, &Device::Cpu).unwrap();
    t.insert("vision_model.encoder.layers.0.self_attn.q_proj.weight".into(), bad);
    t.insert("vision_model.encoder.layers.0.extra.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    let out = dir.join("damaged");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(fixture("hf/config.json"), out.join("config.json")).unwrap();
    candle_core::safetensors::save(&t, out.join("model.safetensors")).unwrap();
    out
}

#[test]
fn a_damaged_checkpoint_is_refused_with_every_problem_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = damaged_copy(tmp.path());
    let e = build(&dir, "").err().expect("must be refused").to_string();
    for needle in [
        "missing: vision_model.encoder.layers.1.mlp.fc2.bias [32]",
        "mis-shaped: vision_model.encoder.layers.0.self_attn.q_proj.weight is [7, 32] in the file, expected [32, 32]",
        "unexpected: vision_model.encoder.layers.0.extra.weight [3]",
    ] {
        assert!(e.contains(needle), "`{needle}` not in:\n{e}");
    }
    // The text tower reports its own problem too (towers are loaded one after the other; the
    // vision tower fails first, so check the text tower on its own).
    let text_only = tmp.path().join("text-only");
    std::fs::create_dir_all(&text_only).unwrap();
    let mut t = candle_core::safetensors::load(fixture("hf/model.safetensors"), &Device::Cpu).unwrap();
    t.remove("text_model.final_layer_norm.weight").unwrap();
    std::fs::copy(fixture("hf/config.json"), text_only.join("config.json")).unwrap();
    candle_core::safetensors::save(&t, text_only.join("model.safetensors")).unwrap();
    let e = build(&text_only, "").err().unwrap().to_string();
    assert!(e.contains("missing: text_model.final_layer_norm.weight [32]"), "{e}");
}

#[test]
fn a_truncated_checkpoint_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("hf/model.safetensors")).unwrap();
    std::fs::write(tmp.path().join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::copy(fixture("hf/config.json"), tmp.path().join("config.json")).unwrap();
    let e = build(tmp.path(), "").err().unwrap().to_string();
    assert!(e.contains("model.safetensors") && e.contains("not a readable safetensors file"), "{e}");
}
