//! Helpers shared by the workspace integration tests: where the build put the `recall`
//! binary and the plugin libraries.
//!
//! The tests run against real artifacts, so build the workspace first:
//! `cargo build --workspace && cargo test --workspace` (the README's test command).

use std::path::{Path, PathBuf};

/// `target/<profile>`, derived from the test executable's location (`target/<profile>/deps`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Path of a shared library built from crate `crate_name` (e.g. `recall-plugin-lora`).
pub fn cdylib(crate_name: &str) -> PathBuf {
    let file =
        format!("{}{}{}", std::env::consts::DLL_PREFIX, crate_name.replace('-', "_"), std::env::consts::DLL_SUFFIX);
    let p = target_dir().join(file);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace` before the tests", p.display());
    p
}

/// The `recall` binary of this build.
pub fn recall_bin() -> PathBuf {
    let p = target_dir().join(format!("recall{}", std::env::consts::EXE_SUFFIX));
    assert!(p.exists(), "{} is missing: run `cargo build --workspace` before the tests", p.display());
    p
}

/// A small experiment (quickstart architecture, fewer layers) for fast tests.
pub const SMALL_EXPERIMENT: &str = r#"
[experiment]
name = "small"
seed = 3

[model.tokenizer]
plugin = "clip-bpe"
context_length = 12

[model.vision]
plugin = "clip-vision"
image_size = 16
patch_size = 8
width = 32
layers = 2
heads = 2
embed_dim = 24

[model.text]
plugin = "clip-text"
context_length = 12
width = 32
layers = 2
heads = 2
embed_dim = 24

[optimizer]
lr = 1e-3

[train]
epochs = 1
batch_size = 16

[[task]]
name = "a"
shapes = ["circle", "square"]
colors = ["red", "blue"]
train_per_combo = 2

[[evaluator]]
plugin = "retrieval"
"#;
