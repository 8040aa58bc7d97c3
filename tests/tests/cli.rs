//! The `recall` binary end to end: config errors, device errors, plugin listing and the
//! conformance suite on every in-tree plugin that runs without external files (the
//! wordpiece / bert pair needs the MiniLM asset and has its own tests; toklip-encoder reads
//! code embeddings, tested in toklip.rs).

use std::process::Command;

use recall_tests::{cdylib, recall_bin, workspace_root, SMALL_EXPERIMENT};

fn recall(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(recall_bin()).args(args).env_remove("RUST_BACKTRACE").output().expect("run recall");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_experiment(dir: &tempfile::TempDir, text: &str) -> String {
    let p = dir.path().join("exp.toml");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.trim_start().starts_with(needle)).unwrap() + 1
}

#[test]
fn version_and_plugins() {
    let (ok, out, _) = recall(&["--version"]);
    assert!(ok && out.starts_with("recall "), "{out}");
    let (ok, out, _) = recall(&["plugins"]);
    assert!(ok);
    for name in ["clip-bpe", "clip-vision", "clip-text", "lora", "finetune", "retrieval"] {
        assert!(out.lines().any(|l| l.starts_with(name)), "{name} missing from:\n{out}");
    }
}

#[test]
fn typo_in_a_plugin_section_is_located_and_corrected() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{SMALL_EXPERIMENT}\n[adapter]\nplugin = \"lora\"\nrnak = 4\n");
    let file = write_experiment(&dir, &text);
    let (ok, _, err) = recall(&["run", &file, "-q"]);
    assert!(!ok);
    let line = line_of(&text, "rnak");
    assert!(err.contains(&format!("{file}:{line}:1")), "{err}");
    assert!(err.contains("unknown key `rnak`") && err.contains("did you mean `rank`?"), "{err}");
}

#[test]
fn typo_in_a_host_section_is_located_and_corrected() {
    let dir = tempfile::tempdir().unwrap();
    let text = SMALL_EXPERIMENT.replace("batch_size = 16", "batch_size = 16\nbatch_szie = 3");
    let file = write_experiment(&dir, &text);
    let (ok, _, err) = recall(&["run", &file, "-q"]);
    assert!(!ok);
    assert!(err.contains(&format!("{file}:{}:1", line_of(&text, "batch_szie"))), "{err}");
    assert!(err.contains("did you mean `batch_size`?"), "{err}");
}

#[test]
fn unknown_plugin_lists_the_available_ones() {
    let dir = tempfile::tempdir().unwrap();
    let text = SMALL_EXPERIMENT.replace("plugin = \"retrieval\"", "plugin = \"retreival\"");
    let file = write_experiment(&dir, &text);
    let (ok, _, err) = recall(&["run", &file, "-q"]);
    assert!(!ok);
    assert!(err.contains("unknown evaluator plugin `retreival`; available evaluator plugins: retrieval"), "{err}");
    assert!(err.contains(&format!("{file}:{}", line_of(&text, "plugin = \"retreival\""))), "{err}");
}

#[test]
fn an_error_in_a_set_value_names_the_set_and_where_plugins_come_from() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_experiment(&dir, SMALL_EXPERIMENT);
    let set = "strategy=[{plugin=\"my-strat\"}]";
    let (ok, _, err) = recall(&["run", &file, "-q", "--set", set]);
    assert!(!ok);
    assert!(err.contains(&format!("--set {set}: unknown strategy plugin `my-strat`")), "{err}");
    assert!(!err.contains(&format!("{file}:")), "the file is not to blame: {err}");
    assert!(err.contains("librecall_plugin_my_strat.so") && err.contains("RECALL_PLUGIN_PATH"), "{err}");
    assert!(err.contains("--plugin-path") && err.contains("Searched: "), "{err}");
    // A key the schema does not know, given by --set, is the --set's too.
    let (ok, _, err) = recall(&["run", &file, "-q", "--set", "train.epochz=3"]);
    assert!(!ok);
    assert!(err.contains("--set train.epochz=3: unknown key `epochz`") && err.contains("`epochs`"), "{err}");
}

#[test]
fn cuda_in_a_cpu_build_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_experiment(&dir, SMALL_EXPERIMENT);
    let (ok, _, err) = recall(&["run", &file, "-q", "--set", "experiment.device=cuda:0"]);
    assert!(!ok);
    assert!(err.contains("no CUDA support") && err.contains("--features cuda"), "{err}");
}

#[test]
fn check_plugin_passes_on_every_in_tree_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let small_vision = dir.path().join("vision.toml");
    std::fs::write(
        &small_vision,
        "image_size = 16\npatch_size = 8\nwidth = 32\nlayers = 2\nheads = 2\nembed_dim = 16\n",
    )
    .unwrap();
    let small_text = dir.path().join("text.toml");
    std::fs::write(
        &small_text,
        "vocab_size = 64\ncontext_length = 12\nwidth = 32\nlayers = 2\nheads = 2\nembed_dim = 16\n",
    )
    .unwrap();
    let small_ckc = dir.path().join("ckc.toml");
    std::fs::write(&small_ckc, "dim = 8\n").unwrap();
    let small_vq = dir.path().join("vq.toml");
    std::fs::write(&small_vq, "image_size = 16\npatch = 4\nhidden = 16\ncodebook_size = 16\n").unwrap();
    let small_llamagen = dir.path().join("llamagen.toml");
    std::fs::write(
        &small_llamagen,
        "image_size = 16\nch = 8\nencoder_ch_mult = [1, 2]\ndecoder_ch_mult = [1, 2]\nnum_res_blocks = 1\n\
         z_channels = 8\ncodebook_size = 16\nnorm_groups = 4\n",
    )
    .unwrap();
    let replay = dir.path().join("replay.toml");
    std::fs::write(&replay, "memory = 4\n").unwrap();
    let distill_tokens = dir.path().join("distill.toml");
    std::fs::write(&distill_tokens, "token_weight = 10.0\n").unwrap();
    let cases = [
        ("recall-plugin-clip-bpe", None),
        ("recall-plugin-clip-vision", Some(&small_vision)),
        ("recall-plugin-clip-text", Some(&small_text)),
        ("recall-plugin-lora", None),
        ("recall-plugin-finetune", None),
        ("recall-plugin-ckc", Some(&small_ckc)),
        ("recall-plugin-lwf", None),
        ("recall-plugin-ewc", None),
        ("recall-plugin-wise-ft", None),
        ("recall-plugin-zscl", None),
        ("recall-plugin-retrieval", None),
        ("recall-plugin-zeroshot", None),
        ("recall-plugin-distill", Some(&distill_tokens)),
        ("recall-plugin-vq-tokenizer", Some(&small_vq)),
        ("recall-plugin-llamagen-vq", Some(&small_llamagen)),
        ("recall-plugin-replay", Some(&replay)),
        ("recall-plugin-der", Some(&replay)),
    ];
    for (krate, config) in cases {
        let lib = cdylib(krate).display().to_string();
        let mut args = vec!["check-plugin", lib.as_str()];
        let cfg;
        if let Some(c) = config {
            cfg = c.display().to_string();
            args.extend(["--config", cfg.as_str()]);
        }
        let (ok, out, err) = recall(&args);
        assert!(ok, "{krate} failed conformance:\n{out}\n{err}");
        assert!(out.contains(" 0 failed"), "{out}");
    }
}

#[test]
fn check_plugin_refuses_a_non_plugin_and_reports_failures() {
    let lib = cdylib("recall-fixture-not-a-plugin").display().to_string();
    let (ok, _, err) = recall(&["check-plugin", &lib]);
    assert!(!ok);
    assert!(err.contains("is not a Recall plugin"), "{err}");
    // A plugin that panics in create fails the suite with the panic named, and recall exits 1
    // instead of aborting.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, "panic_in = \"create\"\n").unwrap();
    let lib = cdylib("recall-fixture-panicky").display().to_string();
    let out = Command::new(recall_bin()).args(["check-plugin", &lib, "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("panicked in `create`"));
}

#[test]
fn quickstart_file_parses() {
    let q = workspace_root().join("experiments/quickstart.toml");
    recall_host::config::load(&q, &[]).unwrap();
}

#[test]
fn plugin_search_order_and_never_the_current_directory() {
    let env_dir = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let lib = std::env::consts::DLL_SUFFIX;
    // RECALL_PLUGIN_PATH comes before the build's own output: its copy of `lora` wins.
    std::fs::copy(cdylib("recall-plugin-lora"), env_dir.path().join(format!("librecall_plugin_lora{lib}"))).unwrap();
    // A plugin in the current directory is never picked up implicitly.
    std::fs::copy(cdylib("recall-fixture-panicky"), cwd.path().join(format!("librecall_plugin_panicky{lib}"))).unwrap();
    let out = Command::new(recall_bin())
        .arg("plugins")
        .current_dir(cwd.path())
        .env("RECALL_PLUGIN_PATH", env_dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lora = stdout.lines().find(|l| l.starts_with("lora ")).unwrap();
    assert!(lora.contains(&env_dir.path().display().to_string()), "{stdout}");
    assert!(!stdout.lines().any(|l| l.starts_with("panicky")), "{stdout}");
}

/// A Karpathy-format set (COCO/Flickr `dataset_*.json`) of `n` images with five captions each,
/// split `train` / `test` alternately, and its image files.
fn karpathy_set(dir: &std::path::Path, n: usize) {
    karpathy_set_named(dir, "dataset_flickr30k.json", n)
}

fn karpathy_set_named(dir: &std::path::Path, file: &str, n: usize) {
    let images: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let sentences: Vec<serde_json::Value> =
                (0..5).map(|k| serde_json::json!({ "raw": format!("picture {i}, caption {k}") })).collect();
            let split = if i % 2 == 0 { "train" } else { "test" };
            serde_json::json!({ "filename": format!("{i}.png"), "split": split, "sentences": sentences })
        })
        .collect();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    for i in 0..n {
        image::RgbImage::from_pixel(8, 8, image::Rgb([i as u8 * 20, 0, 0]))
            .save(dir.join(format!("images/{i}.png")))
            .unwrap();
    }
    std::fs::write(dir.join(file), serde_json::json!({ "images": images }).to_string()).unwrap();
}

#[test]
fn dry_run_checks_everything_prints_the_plan_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    karpathy_set(&dir.path().join("flickr"), 6);
    let extra = "\n[[task]]\nname = \"flickr\"\nsource = \"karpathy\"\npath = \"flickr/dataset_flickr30k.json\"\nimages = \"flickr/images\"\n";
    let out_dir = dir.path().join("out");
    let text = SMALL_EXPERIMENT.replacen("[experiment]\n", &format!("[experiment]\noutput_dir = {:?}\n", out_dir), 1);
    let exp = write_experiment(&dir, &format!("{text}{extra}"));
    let (ok, out, err) = recall(&["run", "--dry-run", &exp]);
    assert!(ok, "{err}");
    for needle in
        ["plan of", "a (shapes):", "flickr (karpathy): 3 train, 3 test (15 test captions)", "steps", "evaluators"]
    {
        assert!(out.contains(needle), "`{needle}` missing from:\n{out}");
    }
    // Nothing is written: no output directory, no run directory.
    assert!(!out_dir.exists(), "a dry run wrote {}", out_dir.display());

    // A missing image is the error the run would stop on, naming the set and the file.
    std::fs::remove_file(dir.path().join("flickr/images/3.png")).unwrap();
    let (ok, _, err) = recall(&["run", "--dry-run", &exp]);
    assert!(
        !ok && err.contains("task[1] `flickr` names 1 image files that do not exist") && err.contains("3.png"),
        "{err}"
    );
    // A bad plugin option is refused by the plugin, located (at the --set that gave it), as
    // a run would refuse it.
    let (ok, _, err) = recall(&["run", "--dry-run", &exp, "--set", "evaluator[0].ks=[0]"]);
    assert!(!ok && err.contains("--set evaluator[0].ks=[0]: plugin `retrieval`: ks must be"), "{err}");
}

/// A JSONL directory (`train.jsonl`, `test.jsonl`, `dataset.json`) of `n` images per split:
/// captioned, or (`classes`) labelled with classes and prompt templates, as a zero-shot set.
fn jsonl_set(dir: &std::path::Path, n: usize, classes: Option<&[&str]>) {
    std::fs::create_dir_all(dir).unwrap();
    for split in ["train", "test"] {
        let mut lines = String::new();
        for i in 0..n {
            let file = format!("{split}-{i}.png");
            image::RgbImage::from_pixel(8, 8, image::Rgb([0, i as u8 * 30, 0])).save(dir.join(&file)).unwrap();
            let line = match classes {
                Some(c) => serde_json::json!({ "image": file, "class": c[i % c.len()] }),
                None => serde_json::json!({ "image": file, "captions": [format!("a picture numbered {i}")] }),
            };
            lines.push_str(&format!("{line}\n"));
        }
        std::fs::write(dir.join(format!("{split}.jsonl")), lines).unwrap();
    }
    let info = match classes {
        Some(c) => {
            serde_json::json!({ "name": "z", "classes": c, "templates": ["a photo of a {}.", "a bad photo of the {}."] })
        }
        None => serde_json::json!({ "name": "t" }),
    };
    std::fs::write(dir.join("dataset.json"), info.to_string()).unwrap();
}

#[test]
fn the_vlcl_preset_resolves_on_data_laid_out_as_its_guide_says() {
    // The preset and the layout of docs/vlcl.md, in miniature: a small open_clip checkpoint
    // stands in for ViT-B/16, a few images for each dataset.
    let root = tempfile::tempdir().unwrap();
    let exp = root.path().join("experiments/c-clip/vlcl.toml");
    std::fs::create_dir_all(exp.parent().unwrap()).unwrap();
    std::fs::copy(workspace_root().join("experiments/c-clip/vlcl.toml"), &exp).unwrap();
    let data = root.path().join("data/vlcl");
    std::fs::create_dir_all(&data).unwrap();
    let clip = workspace_root().join("tests/fixtures/clip/open_clip");
    std::fs::copy(clip.join("model.safetensors"), data.join("ViT-B-16.safetensors")).unwrap();
    std::fs::copy(clip.join("open_clip_config.json"), data.join("open_clip_config.json")).unwrap();
    karpathy_set_named(&data.join("flickr30k"), "dataset_flickr30k.json", 4);
    karpathy_set_named(&data.join("coco"), "dataset_coco.json", 4);
    for t in ["pets", "lexica", "simpsons", "wikiart", "kream", "sketch"] {
        jsonl_set(&data.join(t), 3, None);
    }
    for z in ["imagenet", "cifar100", "cars", "flowers", "dtd", "food101"] {
        jsonl_set(&data.join("zeroshot").join(z), 4, Some(&["cat", "dog"]));
    }
    let exp = exp.display().to_string();
    let sets = ["experiment.device=\"cpu\"", "strategy[0].dim=24", "train.precision=\"f32\""];
    let mut args = vec!["run", "--dry-run", exp.as_str()];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let (ok, out, err) = recall(&args);
    assert!(ok, "{err}");
    for needle in [
        "flickr30k (karpathy): 2 train, 2 test (10 test captions)",
        "coco (karpathy)",
        "sketch (jsonl): 3 train, 3 test",
        "food101 (jsonl): 4 train, 4 test, 2 classes",
        "trained scope, coefficients 1.000 0.500 0.333 0.333 0.333 0.333 0.333 0.333",
        "old model: a frozen copy, from the first task",
        "40 epochs each, batch 128",
    ] {
        assert!(out.contains(needle), "`{needle}` missing from:\n{out}");
    }
    assert!(!root.path().join("experiments/c-clip/runs").exists(), "a dry run wrote results");
}
