//! ONNX Runtime as the second backend (library fetched with `recall fetch onnxruntime`):
//! - the fixture CLIP exported by torch.onnx (tests/fixtures/onnx/export_clip.py) run as
//!   `backend = "onnx"` towers agrees with the same weights through the candle plugins and with
//!   PyTorch within 1e-4;
//! - the int8 MiniLM ONNX model agrees with the fp32 candle MiniLM (cosine reported);
//! - a missing or too-old library, and inputs the model does not take, are clear errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use recall_host::config::{ExperimentSection, ModelSection, NamedSource};
use recall_host::loader::{search_path, Registry};
use recall_host::model::{BuildError, Model};
use recall_tests::{cdylib, recall_bin, workspace_root};

fn fetch(asset: &str) {
    let out = Command::new(recall_bin()).args(["fetch", "-q", asset]).output().unwrap();
    assert!(out.status.success(), "recall fetch {asset} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn fixture(rel: &str) -> PathBuf {
    workspace_root().join("tests/fixtures").join(rel)
}

fn build(model: &str) -> Result<Model, BuildError> {
    fetch("onnxruntime");
    let exp: ExperimentSection = toml::from_str("name = \"onnx\"").unwrap();
    let section: ModelSection = toml::from_str(model).unwrap();
    Model::build_parts(&exp, &section, None, &NamedSource("onnx.toml".into()), &Registry::discover(&search_path(&[])))
}

fn onnx_clip() -> String {
    format!(
        "[tokenizer]\nplugin = \"clip-bpe\"\n\
         [vision]\nbackend = \"onnx\"\nmodel = {:?}\noutput = \"image_embeds\"\nthreads = 1\n\
         [text]\nbackend = \"onnx\"\nmodel = {:?}\noutput = \"text_embeds\"\nthreads = 1\n",
        fixture("onnx/clip_vision.onnx").display().to_string(),
        fixture("onnx/clip_text.onnx").display().to_string()
    )
}

/// max |a - b| / max |b|
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let m = |t: Tensor| t.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    m((a - b).unwrap()) / m(b.clone())
}

#[test]
fn exported_clip_through_onnx_runtime_matches_candle_and_pytorch() {
    let onnx = build(&onnx_clip()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((onnx.image_size, onnx.context_length), (32, 77), "sizes come from the models' inputs");
    let candle = build(&format!(
        "checkpoint = {:?}\n[tokenizer]\nplugin = \"clip-bpe\"\n[vision]\nplugin = \"clip-vision\"\n[text]\nplugin = \"clip-text\"\n",
        fixture("clip/hf").display().to_string()
    ))
    .unwrap();
    let r = candle_core::safetensors::load(fixture("clip/reference.safetensors"), &Device::Cpu).unwrap();
    let torch = candle_core::safetensors::load(fixture("onnx/reference.safetensors"), &Device::Cpu).unwrap();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = ids.ne(0u32).unwrap().to_dtype(DType::U32).unwrap();
    let (oi, ot) = (onnx.encode_images(&r["pixel_values"]).unwrap(), onnx.encode_texts(&ids, &mask).unwrap());
    let (ci, ct) = (candle.encode_images(&r["pixel_values"]).unwrap(), candle.encode_texts(&ids, &mask).unwrap());
    let figures = [
        ("image onnx vs candle", rel(&oi, &ci)),
        ("text onnx vs candle", rel(&ot, &ct)),
        ("image onnx vs pytorch", rel(&oi, &torch["image_embeds"])),
        ("text onnx vs pytorch", rel(&ot, &torch["text_embeds"])),
    ];
    for (what, e) in figures {
        println!("{what}: max relative difference {e:.2e}");
        assert!(e <= 1e-4, "{what}: {e:e}");
    }
    // The outputs are constants: backward through them reaches no parameter.
    let grads = oi.sum_all().unwrap().backward().unwrap();
    assert!(onnx.runtime.params().iter().all(|p| grads.get(p.var.as_tensor()).is_none()));
    // A batch of another size goes through the dynamic batch dimension.
    let one = onnx.encode_images(&r["pixel_values"].narrow(0, 0, 1).unwrap()).unwrap();
    assert!(rel(&one, &ci.narrow(0, 0, 1).unwrap()) <= 1e-4);
}

#[test]
fn int8_minilm_through_onnx_runtime_agrees_with_fp32_candle() {
    fetch("minilm-l6");
    fetch("minilm-l6-int8");
    let home = recall_host::fetch::recall_home();
    let fp32 = home.join("assets/minilm-l6-0.1.0").display().to_string();
    let int8 = home.join("assets/minilm-l6-int8-1.0.0/model.onnx").display().to_string();
    let vision = "[vision]\nplugin = \"clip-vision\"\nimage_size = 16\npatch_size = 8\nwidth = 32\nlayers = 1\nheads = 2\nembed_dim = 384\n";
    let tok = format!("[tokenizer]\nplugin = \"wordpiece\"\npath = {fp32:?}\n");
    let onnx = build(&format!(
        "{tok}{vision}[text]\nbackend = \"onnx\"\nmodel = {int8:?}\noutput = \"last_hidden_state\"\npooling = \"mean\"\n\
         zeros = [\"token_type_ids\"]\ninput_size = 128\nthreads = 1\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let candle =
        build(&format!("{tok}{vision}[text]\nplugin = \"bert\"\ncheckpoint = {fp32:?}\ncontext_length = 128\n"))
            .unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("minilm/reference.json")).unwrap()).unwrap();
    let texts: Vec<String> =
        reference["cases"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect();
    let (ids, mask) = candle.tokenize(&texts).unwrap();
    let a = recall_host::runtime::ops::l2_normalize(&onnx.encode_texts(&ids, &mask).unwrap()).unwrap();
    let b = recall_host::runtime::ops::l2_normalize(&candle.encode_texts(&ids, &mask).unwrap()).unwrap();
    let cos: Vec<f32> = (a * b).unwrap().sum(1).unwrap().to_vec1().unwrap();
    let min = cos.iter().copied().fold(f32::INFINITY, f32::min);
    let mean = cos.iter().sum::<f32>() / cos.len() as f32;
    println!("int8 ONNX vs fp32 candle MiniLM on {} sentences: cosine min {min:.4}, mean {mean:.4}", cos.len());
    assert!(min >= 0.99 && mean >= 0.998, "int8 drifted from fp32: min {min}, mean {mean}");
}

fn onnx_info(env: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = Command::new(recall_bin());
    cmd.arg("onnx-info").arg(fixture("onnx/clip_vision.onnx"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_missing_or_too_old_library_names_the_versions_and_the_fix() {
    fetch("onnxruntime");
    let (ok, text) = onnx_info(&[]);
    assert!(ok && text.contains("input  pixel_values: float32[?, 3, 32, 32]"), "{text}");
    let needed = recall_host::onnx::needed_version();

    let (ok, text) = onnx_info(&[("RECALL_ONNXRUNTIME", Path::new("/nonexistent/libonnxruntime.so"))]);
    assert!(!ok && text.contains("not found") && text.contains("recall fetch onnxruntime"), "{text}");
    assert!(text.contains(&format!("version {needed} or newer")), "{text}");

    let old = cdylib("recall-fixture-old-onnxruntime");
    let (ok, text) = onnx_info(&[("RECALL_ONNXRUNTIME", &old)]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("is version 1.16.3, too old") && text.contains(&format!("needs {needed} or newer")),
        "{text}"
    );
}

#[test]
fn inputs_the_model_does_not_take_are_named() {
    let vision = fixture("onnx/clip_vision.onnx").display().to_string();
    let base = onnx_clip();
    // A model output that does not exist.
    let e = build(&base.replacen("output = \"image_embeds\"", "output = \"pooled\"", 1)).err().unwrap().to_string();
    assert!(e.contains("model.vision.output") && e.contains("no output `pooled`") && e.contains("image_embeds"), "{e}");
    // An input the host does not provide.
    let e =
        build(&base.replacen("backend = \"onnx\"", "backend = \"onnx\"\ninputs = { pixel_values = \"images\" }", 1))
            .err()
            .unwrap()
            .to_string();
    assert!(e.contains("model.vision.inputs") && e.contains("pixel_values: float32[?, 3, 32, 32]"), "{e}");
    // A size the model does not take.
    let e = build(&base.replacen("threads = 1", "threads = 1\ninput_size = 64", 1)).err().unwrap().to_string();
    assert!(e.contains("input_size = 64, but the model takes 32"), "{e}");
    // A tensor of the wrong shape or dtype at run time.
    let model = build(&base).unwrap();
    let wrong = Tensor::zeros((2, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let e = model.encode_images(&wrong).unwrap_err().to_string();
    assert!(
        e.contains(&vision) && e.contains("pixel_values: float32[?, 3, 32, 32]") && e.contains("[2, 3, 16, 16]"),
        "{e}"
    );
    let ids = Tensor::zeros((2, 77), DType::F32, &Device::Cpu).unwrap();
    let e = model.encode_texts(&ids, &ids).unwrap_err().to_string();
    assert!(e.contains("input_ids: int64[?, 77]") && e.contains("F32"), "{e}");
}

/// The CUDA execution provider needs an onnxruntime-gpu library (and a GPU): asked of the CPU
/// library it is a located error that names the asset to fetch.
#[test]
fn the_cuda_execution_provider_without_a_gpu_library_says_what_to_fetch() {
    let base = onnx_clip();
    let e = build(&base.replacen("threads = 1", "threads = 1\nexecution_provider = \"cuda\"", 1))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.vision.execution_provider") && e.contains("recall fetch onnxruntime-gpu"), "{e}");
    let e =
        build(&base.replacen("threads = 1", "threads = 1\nexecution_provider = \"gpu\"", 1)).err().unwrap().to_string();
    assert!(e.contains("model.vision.execution_provider") && e.contains("expected `cpu`, `cuda` or `cuda:N`"), "{e}");
    // `cpu`, spelled out, is the default.
    build(&base.replacen("threads = 1", "threads = 1\nexecution_provider = \"cpu\"", 1)).unwrap();
    let out = Command::new(recall_bin())
        .args(["onnx-info", "--execution-provider", "cuda:1"])
        .arg(fixture("onnx/clip_vision.onnx"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("onnxruntime-gpu"), "{text}");
}

#[test]
fn a_teacher_runs_in_candle_or_through_onnx_runtime_with_the_same_features() {
    fetch("onnxruntime");
    let exp: ExperimentSection = toml::from_str("name = \"teacher\"").unwrap();
    let reg = Registry::discover(&search_path(&[]));
    let build = |text: String| {
        let t: recall_host::config::TeacherSection = toml::from_str(&text).unwrap();
        recall_host::model::Teacher::build(&t, &exp, &NamedSource("t.toml".into()), &reg)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let onnx = build(format!(
        "[vision]\nbackend = \"onnx\"\nmodel = {:?}\noutput = \"image_embeds\"\nthreads = 1\n",
        fixture("onnx/clip_vision.onnx").display().to_string()
    ));
    let candle = build(format!(
        "checkpoint = {:?}\n[vision]\nplugin = \"clip-vision\"\n",
        fixture("clip/hf").display().to_string()
    ));
    assert_eq!(onnx.preprocess.size, 32);
    let r = candle_core::safetensors::load(fixture("clip/reference.safetensors"), &Device::Cpu).unwrap();
    let (a, b) = (onnx.encode_images(&r["pixel_values"]).unwrap(), candle.encode_images(&r["pixel_values"]).unwrap());
    assert!(rel(&a, &b) <= 1e-4, "{}", rel(&a, &b));
    // Frozen: nothing of either teacher trains.
    assert!(candle.runtime.params().iter().all(|p| !p.trainable));
}
