//! ABI evolution across real builds (DESIGN.md section 2).
//!
//! Two SDKs that differ by one appended host function: the workspace's recall-sdk 1.0 and the
//! same crate with its `abi-next` feature (which appends `live_handles` after the last 1.0
//! field). A plugin built against the newer SDK must load on the older host and see the new
//! function as absent; a plugin built against the older SDK must load and run on the newer
//! host. A plugin built with another major version of the SDK must be refused with one
//! readable paragraph.
//!
//! These tests run cargo to build the other side into `target/abi-*` (cached across runs).

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use recall_host::loader::{load_plugin, LoadErrorKind};
use recall_host::plugin::EvaluatorInstance;
use recall_host::runtime::Runtime;
use recall_tests::{cdylib, workspace_root};

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root()).env_remove("RUSTFLAGS").env_remove("CARGO_TARGET_DIR");
    c
}

fn run(mut c: Command) {
    let out = c.output().expect("run cargo");
    assert!(out.status.success(), "{c:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn lib_name(krate: &str) -> String {
    format!("{}{}{}", std::env::consts::DLL_PREFIX, krate.replace('-', "_"), std::env::consts::DLL_SUFFIX)
}

/// The target directory shared by the `abi-next` builds (plugin and host).
fn next_target() -> PathBuf {
    workspace_root().join("target/abi-next")
}

fn build_next_probe() -> PathBuf {
    let mut c = cargo();
    c.args(["build", "--offline", "-p", "recall-fixture-abi-probe", "--features", "abi-next", "--target-dir"])
        .arg(next_target());
    run(c);
    next_target().join("debug").join(lib_name("recall-fixture-abi-probe"))
}

fn build_next_host() -> PathBuf {
    let mut c = cargo();
    c.args(["build", "--offline", "-p", "recall-host", "--bin", "recall", "--features", "abi-next", "--target-dir"])
        .arg(next_target());
    run(c);
    next_target().join("debug").join(format!("recall{}", std::env::consts::EXE_SUFFIX))
}

fn evaluate(lib: &Path, config: &str) -> Result<Vec<(String, f64)>, String> {
    let p = load_plugin(lib).map_err(|e| e.to_string())?;
    let rt = Runtime::new(Device::Cpu, DType::F32, 0);
    let e = EvaluatorInstance::create(&p, &rt, config).map_err(|e| e.to_string())?;
    let x = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
    e.evaluate(&[("image_embeds", &x)]).map_err(|e| e.to_string())
}

fn metric(m: &[(String, f64)], name: &str) -> Option<f64> {
    m.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

#[test]
fn abi_evolution_in_both_directions() {
    // Newer plugin on this (older) host: loads, runs, sees the appended function as absent.
    let next_probe = build_next_probe();
    let m = evaluate(&next_probe, "").expect("a newer plugin must load on an older host");
    assert_eq!(metric(&m, "built_with_abi_next"), Some(1.0));
    assert_eq!(metric(&m, "host_has_live_handles"), Some(0.0));
    assert_eq!(metric(&m, "sum_sq"), Some(6.0));
    let e = evaluate(&next_probe, "call_new = true").unwrap_err();
    assert!(e.contains("this host lacks `live_handles`"), "{e}");

    // Older plugins on the newer host: the in-tree plugins and the 1.0 probe load and pass
    // their conformance suites; the newer probe finds the function there and calls it.
    let next_host = build_next_host();
    let check = |lib: &Path, config: Option<&str>| {
        let mut c = Command::new(&next_host);
        c.arg("check-plugin").arg(lib);
        let dir = tempfile::tempdir().unwrap();
        if let Some(cfg) = config {
            let f = dir.path().join("c.toml");
            std::fs::write(&f, cfg).unwrap();
            c.arg("--config").arg(f);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    for krate in [
        "recall-fixture-abi-probe",
        "recall-plugin-lora",
        "recall-plugin-retrieval",
        "recall-plugin-finetune",
        "recall-plugin-clip-bpe",
    ] {
        let (ok, out) = check(&cdylib(krate), None);
        assert!(ok, "{krate} (SDK 1.0) on the newer host:\n{out}");
    }
    let (ok, out) = check(&next_probe, Some("call_new = true"));
    assert!(ok, "the newer probe on the newer host:\n{out}");

    // Both generations in one process, the older first, as a run may load them: abi_stable
    // records the first layout it checks process-wide, which must not make the newer plugin
    // (whose evaluator table is longer under `abi-next`) fail to load after the older ones.
    let out = Command::new(&next_host)
        .arg("check-plugin")
        .arg(cdylib("recall-plugin-retrieval"))
        .arg(cdylib("recall-plugin-lwf"))
        .arg(&next_probe)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "older plugins, then a newer one, in one process:\n{text}");
    assert!(text.contains(&next_probe.display().to_string()), "{text}");
}

#[test]
fn a_plugin_for_another_major_version_is_refused_readably() {
    // A copy of the workspace with recall-sdk at 2.0.0, holding only the SDK and the probe.
    let root = workspace_root();
    let ws = root.join("target/abi-v2-src");
    std::fs::create_dir_all(ws.join("sdk/src")).unwrap();
    std::fs::create_dir_all(ws.join("probe/src")).unwrap();
    for f in std::fs::read_dir(root.join("sdk/src")).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "rs") {
            std::fs::copy(&f, ws.join("sdk/src").join(f.file_name().unwrap())).unwrap();
        }
    }
    let current = recall_sdk::abi::ABI_VERSION;
    let sdk_toml = std::fs::read_to_string(root.join("sdk/Cargo.toml")).unwrap().replacen(
        &format!("version = \"{current}\""),
        "version = \"2.0.0\"",
        1,
    );
    std::fs::write(ws.join("sdk/Cargo.toml"), sdk_toml).unwrap();
    std::fs::copy(root.join("tests/fixtures/abi-probe/src/lib.rs"), ws.join("probe/src/lib.rs")).unwrap();
    std::fs::copy(root.join("tests/fixtures/abi-probe/Cargo.toml"), ws.join("probe/Cargo.toml")).unwrap();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let deps = &manifest[manifest.find("[workspace.package]").unwrap()..];
    let deps = deps
        .replace(
            &format!("recall-sdk = {{ path = \"sdk\", version = \"{current}\" }}"),
            "recall-sdk = { path = \"sdk\", version = \"2.0.0\" }",
        )
        .replace("recall-clip-common = { path = \"plugins/clip-common\" }\n", "");
    std::fs::write(
        ws.join("Cargo.toml"),
        format!("[workspace]\nresolver = \"2\"\nmembers = [\"sdk\", \"probe\"]\n\n{deps}"),
    )
    .unwrap();
    std::fs::copy(root.join("Cargo.lock"), ws.join("Cargo.lock")).unwrap();
    let mut c = cargo();
    c.current_dir(&ws).args(["build", "--offline", "-p", "recall-fixture-abi-probe"]);
    run(c);
    let lib = ws.join("target/debug").join(lib_name("recall-fixture-abi-probe"));

    let e = load_plugin(&lib).expect_err("a 2.0 plugin must be refused by a 1.0 host");
    assert!(matches!(e.kind, LoadErrorKind::Incompatible { .. }), "{e}");
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "one paragraph: {msg}");
    for needle in [lib.display().to_string().as_str(), "recall-sdk 2.0.0", current, "rebuild the plugin"] {
        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
    }
    assert!(e.detail.as_deref().is_some_and(|d| d.contains("2.0.0")), "the raw report is kept for --verbose");
}
