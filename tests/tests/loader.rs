//! Loading real cdylibs: distinct plugins of one kind, refusals, and panics.

use candle_core::{DType, Device, Tensor};
use recall_host::loader::{load_plugin, search_path, LoadErrorKind, Registry};
use recall_host::plugin::{EncoderInstance, StrategyInstance};
use recall_host::runtime::Runtime;
use recall_tests::cdylib;

#[test]
fn two_plugins_of_one_kind_load_as_two_distinct_plugins() {
    // abi_stable's RootModule::load_from_file would hand back the first encoder for both.
    let vision = load_plugin(&cdylib("recall-plugin-clip-vision")).unwrap();
    let text = load_plugin(&cdylib("recall-plugin-clip-text")).unwrap();
    assert_eq!((vision.name.as_str(), vision.kind), ("clip-vision", "encoder"));
    assert_eq!((text.name.as_str(), text.kind), ("clip-text", "encoder"));
    let rt = Runtime::new(Device::Cpu, DType::F32, 0);
    let v = EncoderInstance::create(
        &vision,
        &rt,
        "vision.",
        "image_size = 16\npatch_size = 8\nwidth = 16\nlayers = 1\nheads = 2\nembed_dim = 8",
    )
    .unwrap();
    let t = EncoderInstance::create(
        &text,
        &rt,
        "text.",
        "context_length = 8\nvocab_size = 100\nwidth = 16\nlayers = 1\nheads = 2\nembed_dim = 8",
    )
    .unwrap();
    assert_eq!(v.spec().unwrap().modality, recall_sdk::abi::modality::IMAGE);
    assert_eq!(t.spec().unwrap().modality, recall_sdk::abi::modality::TEXT);
    assert!(rt.params().get("vision.class_embedding").is_some());
    assert!(rt.params().get("text.token_embedding").is_some());
    // Loading the same library twice gives the same module again, without error.
    let again = load_plugin(&cdylib("recall-plugin-clip-vision")).unwrap();
    assert_eq!(again.name, "clip-vision");
}

#[test]
fn registry_discovers_in_tree_plugins_and_lists_alternatives() {
    let reg = Registry::discover(&search_path(&[]));
    for name in ["clip-bpe", "clip-vision", "clip-text", "lora", "finetune", "retrieval"] {
        assert!(reg.plugins.iter().any(|p| p.name == name), "{name} not discovered");
    }
    let e = reg.get("lorra", "adapter").unwrap_err();
    assert!(e.contains("available adapter plugins: lora"), "{e}");
    assert!(e.contains("did you mean `lora`?"), "{e}");
    let e = reg.get("lora", "encoder").unwrap_err();
    assert!(e.contains("is a adapter plugin") || e.contains("adapter plugin"), "{e}");
}

#[test]
fn a_library_that_is_not_a_plugin_is_refused_clearly() {
    let path = cdylib("recall-fixture-not-a-plugin");
    let e = load_plugin(&path).expect_err("must be refused");
    assert!(matches!(e.kind, LoadErrorKind::NotAPlugin { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("is not a Recall plugin") && msg.contains(&path.display().to_string()), "{msg}");
    assert!(!msg.contains('\n'), "one line, not a dump: {msg}");

    let missing = load_plugin(std::path::Path::new("/nonexistent/librecall_plugin_x.so")).err().unwrap();
    assert!(matches!(missing.kind, LoadErrorKind::Open { .. }), "{missing}");
}

#[test]
fn a_panicking_plugin_yields_an_error_naming_plugin_and_function() {
    let p = load_plugin(&cdylib("recall-fixture-panicky")).unwrap();
    let rt = Runtime::new(Device::Cpu, DType::F32, 0);
    let e = StrategyInstance::create(&p, &rt, "s.", "panic_in = \"create\"").expect_err("create panics");
    assert_eq!(e.plugin, "panicky");
    assert!(
        e.message.contains("plugin `panicky` panicked in `create`") && e.message.contains("deliberate panic"),
        "{}",
        e.message
    );

    let s = StrategyInstance::create(&p, &rt, "s.", "panic_in = \"loss_terms\"").unwrap();
    let x = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let e = s.loss_terms(&[("image_features", &x)]).expect_err("loss_terms panics");
    assert!(
        e.message.contains("panicked in `loss_terms`") && e.message.contains("index out of bounds"),
        "{}",
        e.message
    );
    // The host is still alive and the plugin still usable for other calls.
    s.after_step(0).unwrap();
}

#[test]
fn a_host_error_inside_a_plugin_call_is_reported_not_fatal() {
    let vision = load_plugin(&cdylib("recall-plugin-clip-vision")).unwrap();
    let rt = Runtime::new(Device::Cpu, DType::F32, 0);
    let v = EncoderInstance::create(
        &vision,
        &rt,
        "vision.",
        "image_size = 16\npatch_size = 8\nwidth = 16\nlayers = 1\nheads = 2\nembed_dim = 8",
    )
    .unwrap();
    let wrong = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let e = v.forward(&[("pixel_values", &wrong)]).err().unwrap();
    assert!(e.message.contains("expects pixel_values [B, 3, 16, 16]"), "{e}");
    let e = v.forward(&[]).err().unwrap();
    assert!(e.message.contains("missing input `pixel_values`"), "{e}");
}
