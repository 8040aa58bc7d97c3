//! The bad-input and fault catalogue (docs/reliability.md) against the real binary: nothing
//! wrong is reported as a result, no finished result is lost, and a broken file on the plugin
//! path cannot crash the host.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use recall_tests::{cdylib, recall_bin, SMALL_EXPERIMENT};

struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir { tmp: tempfile::tempdir().unwrap() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Write an experiment file and return its path.
    fn experiment(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `recall ARGS` in this directory.
    fn recall(&self, args: &[&str]) -> Output {
        Command::new(recall_bin())
            .args(args)
            .current_dir(self.tmp.path())
            .env_remove("RUST_BACKTRACE")
            .env_remove("MLFLOW_TRACKING_URI")
            .output()
            .expect("run recall")
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn two_tasks() -> String {
    format!("{SMALL_EXPERIMENT}\n[[task]]\nname = \"b\"\nshapes = [\"cross\", \"ring\"]\n")
}

#[test]
fn weights_that_diverge_on_the_last_step_are_an_error_not_a_perfect_score() {
    let d = Dir::new();
    // One step per task (the batch holds the whole task), and a learning rate beyond f32:
    // the loss of that step is finite, the weights after it are not.
    let text = two_tasks().replace("lr = 1e-3", "lr = 1e39").replace("batch_size = 16", "batch_size = 4096");
    let file = d.experiment("nan.toml", &text);
    let out = d.recall(&["run", "-q", file.to_str().unwrap(), "--run-dir", "run"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "a diverged model must not finish: {err}");
    assert!(err.contains("task `a` (task 1 of 2) ended with non-finite weights at step 0"), "{err}");
    assert!(err.contains("parameter tensors hold NaN or infinity, the first `"), "{err}");
    let run = d.path("run");
    assert_eq!(json(&run.join("progress.json"))["finished_tasks"], 0, "the task is not marked finished");
    assert!(!run.join("checkpoints").exists() && !run.join("summary.json").exists());
    // Resume meets the same divergence again, at the same task, and reports it the same way.
    let again = d.recall(&["run", "-q", "--resume", run.to_str().unwrap()]);
    assert!(!again.status.success() && stderr(&again).contains("task `a` (task 1 of 2)"), "{}", stderr(&again));
}

#[test]
fn a_gradient_norm_that_overflows_is_an_error_naming_the_gradient() {
    let d = Dir::new();
    // EWC's penalty is zero at the start of task `b` and grows with the drift from task `a`'s
    // weights; with lambda 1e36 its gradients stay finite, but their squares overflow f32.
    let text = two_tasks()
        .replace("lr = 1e-3", "lr = 1e-2\ngrad_clip = 1.0")
        .replace("[\"cross\", \"ring\"]", "[\"cross\", \"ring\"]\ntrain_per_combo = 4")
        + "\n[[strategy]]\nplugin = \"ewc\"\nlambda = 1e36\n";
    let file = d.experiment("overflow.toml", &text);
    let out = d.recall(&["run", "-q", file.to_str().unwrap(), "--run-dir", "run"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "an overflowing gradient norm must stop the run: {err}");
    assert!(err.contains("the gradient norm became inf at step"), "{err}");
    assert!(err.contains("of task `b`"), "{err}");
    assert!(
        err.contains("every gradient is finite, but the sum of their squares overflows; the largest is `"),
        "{err}"
    );
    assert_eq!(json(&d.path("run").join("progress.json"))["finished_tasks"], 1, "task `a` stays finished");
}

#[test]
fn a_batch_whose_activations_cannot_fit_is_refused_with_the_figure_before_a_run_exists() {
    let d = Dir::new();
    // About 100 M parameters (1.7 GiB to train) fit; 256 examples of 257 tokens at width 1024
    // keep about 86 GiB of activations for backward (more than a development machine or
    // CI has; the estimate is printed in the assertion message if this ever runs on more).
    let text = SMALL_EXPERIMENT
        .replace("image_size = 16\npatch_size = 8", "image_size = 64\npatch_size = 4")
        .replace("width = 32\nlayers = 2\nheads = 2", "width = 1024\nlayers = 4\nheads = 8")
        .replace("batch_size = 16", "batch_size = 256")
        .replace("train_per_combo = 2", "train_per_combo = 64");
    let file = d.experiment("big.toml", &text);
    let out = d.recall(&["run", "-q", file.to_str().unwrap(), "--run-dir", "run"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("a training step does not fit: at batch_size = 256 it needs at least"), "{err}");
    assert!(err.contains("of activations, measured on 2 examples and scaled"), "{err}");
    assert!(err.contains("big.toml:"), "the error points at the file: {err}");
    assert!(!d.path("run").join("progress.json").exists(), "nothing of a run is written");
}

#[test]
fn out_of_range_keys_and_duplicate_task_names_are_located_errors() {
    let d = Dir::new();
    let file = d.experiment("x.toml", SMALL_EXPERIMENT);
    let f = file.to_str().unwrap();
    for (set, expected) in [
        ("optimizer.grad_clip=-1", "grad_clip must be a positive number"),
        ("optimizer.grad_clip=0", "grad_clip must be a positive number"),
        ("optimizer.weight_decay=-5", "weight_decay must be a number >= 0"),
        ("model.vision.layers=0", "layers must be at least 1"),
        ("model.text.width=0", "width must be at least 1"),
        ("model.text.vocab_size=1000000000", "the model does not fit"),
        ("model.tokenizer.context_length=32", "the text tower reads 12 tokens"),
    ] {
        let out = d.recall(&["run", "-q", f, "--set", set, "--run-dir", "never"]);
        let err = stderr(&out);
        assert!(!out.status.success() && err.contains(expected), "{set}: {err}");
        // Keys are located at the --set that gave them; the memory estimate names the plugin
        // and the parameter.
        let located =
            err.contains(&format!("--set {set}:")) || err.contains("plugin `clip-text` failed in `create`: param:");
        assert!(located, "{set}: the error names the --set, or the plugin: {err}");
        assert!(!d.path("never").exists(), "{set}: nothing is written");
    }
    let lora = format!("{SMALL_EXPERIMENT}\n[adapter]\nplugin = \"lora\"\nrank = 256\n");
    let out = d.recall(&["run", "-q", d.experiment("lora.toml", &lora).to_str().unwrap()]);
    assert!(stderr(&out).contains("rank 256 exceeds what site"), "{}", stderr(&out));
    let dup = format!("{SMALL_EXPERIMENT}\n[[task]]\nname = \"a\"\nshapes = [\"cross\"]\n");
    let out = d.recall(&["run", "-q", d.experiment("dup.toml", &dup).to_str().unwrap()]);
    assert!(stderr(&out).contains("task[1] and task[0] are both named `a`"), "{}", stderr(&out));
    let group = SMALL_EXPERIMENT.replace("lr = 1e-3", "lr = 1e-3\n[[optimizer.groups]]\nparams = [\"nothing.*\"]");
    let out = d.recall(&["run", "-q", d.experiment("g.toml", &group).to_str().unwrap(), "--run-dir", "never"]);
    assert!(stderr(&out).contains("matches no trainable parameter"), "{}", stderr(&out));
    assert!(!d.path("never").exists(), "a bad group is caught before the run directory exists");
}

#[test]
fn a_run_directory_has_one_owner_and_is_never_overwritten_by_accident() {
    let d = Dir::new();
    let file = d.experiment("x.toml", SMALL_EXPERIMENT);
    let f = file.to_str().unwrap();
    assert!(d.recall(&["run", "-q", f, "--run-dir", "run"]).status.success());
    let summary = std::fs::read(d.path("run/summary.json")).unwrap();
    let events = std::fs::read(d.path("run/tracking/events.jsonl")).unwrap();

    let out = d.recall(&["run", "-q", f, "--run-dir", "run"]);
    assert!(!out.status.success() && stderr(&out).contains("already holds a run (finished)"), "{}", stderr(&out));
    // A finished run resumed says so and changes nothing.
    let out = d.recall(&["run", "-q", "--resume", "run"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("is finished"));
    assert_eq!(std::fs::read(d.path("run/summary.json")).unwrap(), summary);
    assert_eq!(std::fs::read(d.path("run/tracking/events.jsonl")).unwrap(), events);

    // A live owner (this test holds the lock the way a running recall does) keeps others out.
    let lock = std::fs::OpenOptions::new().write(true).open(d.path("run/.lock")).unwrap();
    lock.lock().unwrap();
    for args in [&["run", "-q", f, "--run-dir", "run", "--overwrite"][..], &["run", "-q", "--resume", "run"][..]] {
        let _ = std::fs::remove_file(d.path("run/summary.json"));
        let out = d.recall(args);
        assert!(stderr(&out).contains("another recall process"), "{args:?}: {}", stderr(&out));
    }
    drop(lock);
    std::fs::write(d.path("run/summary.json"), &summary).unwrap();
    let out = d.recall(&["run", "-q", f, "--run-dir", "run", "--overwrite"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn resume_refuses_an_edited_config_unless_the_change_is_allowed_and_recorded() {
    let d = Dir::new();
    let file = d.experiment("x.toml", &two_tasks());
    assert!(d.recall(&["run", "-q", file.to_str().unwrap(), "--run-dir", "run"]).status.success());
    // Make it a run killed after its last task, with a half-written checkpoint left behind.
    std::fs::remove_file(d.path("run/summary.json")).unwrap();
    std::fs::write(d.path("run/checkpoints/.tmp-killed"), vec![0u8; 1024]).unwrap();
    let saved = d.path("run/config.resolved.toml");
    let text = std::fs::read_to_string(&saved).unwrap();
    std::fs::write(&saved, text.replace("lr = 0.001", "lr = 0.01")).unwrap();

    let out = d.recall(&["run", "-q", "--resume", "run"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("`optimizer.lr`: 0.001 when the run started, 0.01 now"), "{err}");
    assert!(!d.path("run/summary.json").exists());

    let out = d.recall(&["run", "-q", "--resume", "run", "--allow-config-change", "optimizer.lr"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = json(&d.path("run/run.json"));
    let change = &run["resumed"][0]["config_changes"][0];
    assert_eq!(change["key"], "optimizer.lr");
    assert_eq!((change["before"].as_str(), change["after"].as_str()), (Some("0.001"), Some("0.01")));
    assert!(!d.path("run/checkpoints/.tmp-killed").exists(), "stale temporaries are removed on resume");
}

#[test]
fn a_truncated_library_on_the_plugin_path_is_reported_never_a_crash() {
    let d = Dir::new();
    let plugins = d.path("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let whole = std::fs::read(cdylib("recall-plugin-lora")).unwrap();
    for (name, len) in [("librecall_plugin_cut.so", 4096), ("librecall_plugin_half.so", whole.len() / 2)] {
        std::fs::write(plugins.join(name), &whole[..len]).unwrap();
    }
    let pp = plugins.to_str().unwrap();
    let out = d.recall(&["--plugin-path", pp, "plugins"]);
    let (listing, err) = (String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(out.status.success(), "{err}");
    assert!(listing.contains("clip-vision") && listing.contains("retrieval"), "the listing goes on: {listing}");
    assert!(err.contains("librecall_plugin_cut.so") && err.contains("truncated or damaged"), "{err}");
    assert!(err.contains("librecall_plugin_half.so"), "{err}");

    let out = d.recall(&["check-plugin", plugins.join("librecall_plugin_half.so").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("truncated or damaged"));

    let file = d.experiment("x.toml", SMALL_EXPERIMENT);
    let out = d.recall(&["--plugin-path", pp, "run", "-q", file.to_str().unwrap()]);
    assert!(out.status.success(), "an experiment that does not name the broken file runs: {}", stderr(&out));
}

#[test]
fn a_c_clip_run_is_embedded_without_its_strategy_parameters() {
    let d = Dir::new();
    let text = format!("{}\n[[strategy]]\nplugin = \"ckc\"\ndim = 24\n", two_tasks());
    let file = d.experiment("ckc.toml", &text);
    assert!(d.recall(&["run", "-q", file.to_str().unwrap(), "--run-dir", "run"]).status.success());
    std::fs::write(d.path("texts.txt"), "a red circle\na blue square\n").unwrap();
    let out = d.recall(&["embed", "--model", "run", "--texts", "texts.txt", "--out", "e.safetensors"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::create_dir(d.path("empty")).unwrap();
    let out = d.recall(&["embed", "--model", "run", "--images", "empty", "--out", "e.safetensors"]);
    assert!(stderr(&out).contains("holds no image files"), "{}", stderr(&out));
}

#[test]
fn a_password_in_the_tracking_uri_is_never_written_or_printed() {
    let d = Dir::new();
    // Nothing listens on port 9 of the loopback: delivery fails at once and the run goes on.
    let text =
        format!("{SMALL_EXPERIMENT}\n[tracking]\nbackend = \"mlflow\"\nuri = \"http://ann:s3cret@127.0.0.1:9\"\n");
    let file = d.experiment("t.toml", &text);
    let out = d.recall(&["run", "-v", "-q", file.to_str().unwrap(), "--run-dir", "run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("s3cret"), "{}", stderr(&out));
    for f in ["log.txt", "config.resolved.toml", "run.json", "tracking/events.jsonl", "tracking/mlflow.json"] {
        let p = d.path("run").join(f);
        if let Ok(text) = std::fs::read_to_string(&p) {
            assert!(!text.contains("s3cret"), "{f} holds the password:\n{text}");
        }
    }
}
