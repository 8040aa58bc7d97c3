//! `recall new strategy`: the scaffolded out-of-tree crate builds against recall-sdk alone
//! and passes the strategy conformance suite as generated.

use std::process::Command;

use recall_tests::{recall_bin, workspace_root};

#[test]
fn scaffolded_strategy_builds_and_passes_check_plugin() {
    // A fresh crate every run; its build goes to a target directory under the workspace's,
    // so dependencies stay compiled between runs.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("my-reg");
    let target = workspace_root().join("target/scaffold-test");
    let out = Command::new(recall_bin()).args(["new", "strategy", "my-reg", "--dir"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    for forbidden in ["candle", "recall-host", "ort"] {
        assert!(!manifest.lines().any(|l| l.trim_start().starts_with(forbidden)), "scaffold depends on {forbidden}");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let build = Command::new(cargo)
        .args(["build", "--offline"])
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", String::from_utf8_lossy(&build.stderr));
    let lib = target.join("debug").join(format!("librecall_plugin_my_reg{}", std::env::consts::DLL_SUFFIX));
    let check = Command::new(recall_bin()).arg("check-plugin").arg(&lib).output().unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success() && text.contains(" 0 failed"), "{text}{}", String::from_utf8_lossy(&check.stderr));
    // A second scaffold into the same, now non-empty, directory is refused.
    let again = Command::new(recall_bin()).args(["new", "strategy", "my-reg", "--dir"]).arg(&dir).output().unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not empty"));
}
