//! `llamagen-vq` against LlamaGen's `VQModel` in PyTorch (`tests/fixtures/llamagen/`,
//! made by `make_llamagen_vq.py`): weights read from the `torch.save` checkpoint itself,
//! then code ids, code embeddings, the decoder and the codebook and commitment losses
//! compared; then the tokenizer in runs (fine-tuned by reconstruction, frozen in front of a
//! TokLIP student).

use std::path::PathBuf;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use recall_host::loader::load_plugin;
use recall_host::plugin::EncoderInstance;
use recall_host::runtime::Runtime;
use recall_tests::{cdylib, workspace_root};

/// The fixture model's shape (see make_llamagen_vq.py).
const ARCH: &str = "image_size = 16\nch = 8\nencoder_ch_mult = [1, 1, 2]\ndecoder_ch_mult = [1, 1, 2]\n\
                    num_res_blocks = 2\nz_channels = 8\ncodebook_size = 32\ncodebook_embed_dim = 8\nnorm_groups = 4\n";

fn fixture(name: &str) -> PathBuf {
    workspace_root().join("tests/fixtures/llamagen").join(name)
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("reference.safetensors"), &Device::Cpu).unwrap()
}

fn tokenizer(rt: &std::rc::Rc<Runtime>, extra: &str) -> Result<EncoderInstance, String> {
    let plugin = load_plugin(&cdylib("recall-plugin-llamagen-vq")).unwrap();
    EncoderInstance::create(&plugin, rt, "image_tokenizer.", &format!("{ARCH}{extra}")).map_err(|e| e.to_string())
}

/// `ARCH` with one setting changed, for configs that must not fit the checkpoint.
fn arch_with(key: &str, value: &str) -> String {
    ARCH.lines()
        .map(|l| if l.starts_with(&format!("{key} =")) { format!("{key} = {value}\n") } else { format!("{l}\n") })
        .collect()
}

fn with_checkpoint(reference: &str) -> String {
    format!("checkpoint = {reference:?}\n")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn scalar(t: &Tensor) -> f32 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
}

#[test]
fn codes_embeddings_and_decoder_match_llamagen_from_its_torch_checkpoint() {
    let r = reference();
    let pt = fixture("vq.pt").display().to_string();
    let rt = Runtime::new(Device::Cpu, DType::F32, 0);
    rt.set_training(false);
    let vq = tokenizer(&rt, &with_checkpoint(&pt)).unwrap_or_else(|e| panic!("{e}"));
    let px = &r["pixels"];

    let z_q = vq.forward(&[("pixel_values", px)]).unwrap();
    assert_eq!(z_q.dims(), &[2, 16, 8]);
    let d = max_abs(&z_q, &r["z_q"]);
    eprintln!("code embeddings: max |ours - LlamaGen| = {d:e}");
    assert!(d <= 1e-5, "code embeddings differ from LlamaGen's by {d}");

    let ids_rt = Runtime::new(Device::Cpu, DType::F32, 0);
    ids_rt.set_training(false);
    let ids = tokenizer(&ids_rt, &format!("{}output = \"ids\"\n", with_checkpoint(&pt))).unwrap();
    let ours: Vec<f32> = ids.forward(&[("pixel_values", px)]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let theirs: Vec<f32> = r["ids"].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(ours, theirs, "code ids differ");

    // With LlamaGen's decoded image as the target, the reconstruction term is the distance
    // between the two decoders' outputs: what remains is the codebook + commitment loss.
    let vq_terms = scalar(&r["vq_loss"]) + scalar(&r["commit_loss"]);
    let against_theirs = vq.forward(&[("pixel_values", px), ("target_pixels", &r["decoded"])]).unwrap();
    let d = (against_theirs.to_scalar::<f32>().unwrap() - vq_terms).abs();
    eprintln!("loss against LlamaGen's decoded image minus its codebook + commitment terms = {d:e}");
    assert!(d <= 1e-5, "decoder or loss terms differ: {} vs {vq_terms}", against_theirs.to_scalar::<f32>().unwrap());
    let against_pixels =
        vq.forward(&[("pixel_values", px), ("target_pixels", px)]).unwrap().to_scalar::<f32>().unwrap();
    let want = scalar(&r["recon_loss"]) + vq_terms;
    assert!((against_pixels - want).abs() <= 1e-5 * want.max(1.0), "loss {against_pixels} vs LlamaGen's {want}");
}

#[test]
fn state_dict_keys_and_mismatches_are_reported() {
    let pt = fixture("vq.pt").display().to_string();
    let r = reference();
    let encode_with = |arch: &str, extra: &str| -> Result<Tensor, String> {
        let rt = Runtime::new(Device::Cpu, DType::F32, 0);
        rt.set_training(false);
        let plugin = load_plugin(&cdylib("recall-plugin-llamagen-vq")).unwrap();
        let vq = EncoderInstance::create(&plugin, &rt, "image_tokenizer.", &format!("{arch}{extra}"))
            .map_err(|e| e.to_string())?;
        vq.forward(&[("pixel_values", &r["pixels"])]).map_err(|e| e.to_string())
    };
    let encode = |extra: &str| encode_with(ARCH, extra);
    // The state dict named explicitly; an encoder-only tokenizer ignores the decoder's tensors.
    let named = encode(&with_checkpoint(&format!("{pt}#model"))).unwrap();
    assert!(max_abs(&named, &r["z_q"]) <= 1e-5);
    let encoder_only = encode(&format!("{}decoder = false\n", with_checkpoint(&pt))).unwrap();
    assert!(max_abs(&encoder_only, &r["z_q"]) <= 1e-5);
    let rt = Runtime::new(Device::Cpu, DType::F32, 0);
    let e = tokenizer(&rt, &format!("{}decoder = false\n", with_checkpoint(&pt)))
        .unwrap()
        .forward(&[("pixel_values", &r["pixels"]), ("target_pixels", &r["pixels"])])
        .unwrap_err()
        .to_string();
    assert!(e.contains("decoder = true"), "{e}");

    let e = encode(&with_checkpoint(&format!("{pt}#optimizer"))).unwrap_err();
    assert!(e.contains("checkpoint") && e.contains("optimizer"), "{e}");
    // A model of another shape: every problem named, and what to change.
    let e = encode_with(&arch_with("num_res_blocks", "1"), &with_checkpoint(&pt)).unwrap_err();
    eprintln!("{e}");
    assert!(e.contains("unexpected: encoder.conv_blocks.0.res.1.conv1.weight"), "{e}");
    assert!(e.contains("num_res_blocks"), "{e}");
    let e = encode_with(&arch_with("codebook_size", "64"), &with_checkpoint(&pt)).unwrap_err();
    assert!(e.contains("quantize.embedding.weight is [32, 8] in the file, expected [64, 8]"), "{e}");
    // Bad settings are located errors.
    let e = encode_with(&arch_with("image_size", "18"), "").unwrap_err();
    assert!(e.contains("image_size") && e.contains("divisible by 4"), "{e}");
    let e = encode_with(&arch_with("norm_groups", "3"), "").unwrap_err();
    assert!(e.contains("norm_groups"), "{e}");
}

/// The tokenizer in runs: fine-tuned by reconstruction from the LlamaGen checkpoint (its
/// saved weights are then Recall's safetensors), then frozen in front of a TokLIP student.
#[test]
fn a_llamagen_tokenizer_fine_tunes_and_feeds_a_token_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let pt = fixture("vq.pt").display().to_string();
    let data = "[[task]]\nname = \"shapes\"\nshapes = [\"circle\", \"square\", \"triangle\", \"cross\"]\ncolors = [\"red\", \"blue\"]\ntrain_per_combo = 2\n";
    let arch = ARCH.replace("image_size = 16\n", "");
    // LlamaGen's pixel range, [-1, 1].
    let pre = "[model.preprocess]\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n";
    let finetune = format!(
        "[experiment]\nname = \"vq\"\n[model.image_tokenizer]\nplugin = \"llamagen-vq\"\nimage_size = 16\n{arch}checkpoint = {pt:?}\n\
         {pre}[optimizer]\nlr = 1e-3\nweight_decay = 0.0\n[train]\nobjective = \"reconstruction\"\nepochs = 3\nbatch_size = 8\n{data}"
    );
    std::fs::write(tmp.path().join("vq.toml"), finetune).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(recall_tests::recall_bin()).args(args).current_dir(tmp.path()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["run", "-q", "vq.toml", "--run-dir", "vq"]);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("vq/summary.json")).unwrap()).unwrap();
    let loss = |stage: usize| s["results"]["rows"][stage][0]["vq_loss"].as_f64().unwrap();
    assert!(loss(1) < loss(0), "fine-tuning did not lower the loss: {} -> {}", loss(0), loss(1));

    let student = format!(
        "[experiment]\nname = \"student\"\n\
         [model.tokenizer]\nplugin = \"clip-bpe\"\ncontext_length = 12\n\
         [model.image_tokenizer]\nplugin = \"llamagen-vq\"\nimage_size = 16\n{arch}decoder = false\n\
         checkpoint = \"vq/checkpoints/task-01.safetensors\"\nprefix = \"image_tokenizer.\"\n{pre}\
         [model.vision]\nplugin = \"toklip-encoder\"\ntokens = 16\ncode_dim = 8\nwidth = 32\nlayers = 1\nheads = 2\nembed_dim = 24\n\
         [model.text]\nplugin = \"clip-text\"\ncontext_length = 12\nwidth = 32\nlayers = 1\nheads = 2\nembed_dim = 24\n\
         [optimizer]\nlr = 1e-3\n[train]\nepochs = 1\nbatch_size = 8\n{data}\
         [[evaluator]]\nplugin = \"retrieval\"\n"
    );
    std::fs::write(tmp.path().join("student.toml"), student).unwrap();
    run(&["run", "-q", "student.toml", "--run-dir", "student"]);
    let ckpt = candle_core::safetensors::load(tmp.path().join("student/checkpoints/task-01.safetensors"), &Device::Cpu)
        .unwrap();
    let tuned =
        candle_core::safetensors::load(tmp.path().join("vq/checkpoints/task-01.safetensors"), &Device::Cpu).unwrap();
    let encoder_weight = "image_tokenizer.encoder.conv_in.weight";
    assert_eq!(max_abs(&ckpt[encoder_weight], &tuned[encoder_weight]), 0.0, "the frozen tokenizer moved");
    assert!(!ckpt.keys().any(|k| k.starts_with("image_tokenizer.decoder")), "decoder = false built a decoder");
}

/// Reconstruction runs follow `[train] precision` too: the convolutional tokenizer fine-tuned
/// in bf16 (convolutions in bf16, group norms and losses in f32) learns like the f32 run, and
/// its checkpoint stays f32.
#[test]
fn a_reconstruction_run_in_bf16_learns_like_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let pt = fixture("vq.pt").display().to_string();
    let experiment = format!(
        "[experiment]\nname = \"vq\"\n[model.image_tokenizer]\nplugin = \"llamagen-vq\"\n{ARCH}checkpoint = {pt:?}\n\
         [model.preprocess]\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n\
         [optimizer]\nlr = 1e-3\nweight_decay = 0.0\n[train]\nobjective = \"reconstruction\"\nepochs = 3\nbatch_size = 8\n\
         [[task]]\nname = \"shapes\"\nshapes = [\"circle\", \"square\"]\ncolors = [\"red\", \"blue\"]\ntrain_per_combo = 4\n"
    );
    std::fs::write(tmp.path().join("vq.toml"), experiment).unwrap();
    let run = |precision: &str| -> serde_json::Value {
        let out = Command::new(recall_tests::recall_bin())
            .args(["run", "-q", "vq.toml", "--run-dir", precision, "--set", &format!("train.precision={precision}")])
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{precision}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join(precision).join("summary.json")).unwrap())
            .unwrap()
    };
    let (full, half) = (run("f32"), run("bf16"));
    let losses = |s: &serde_json::Value| -> Vec<f64> {
        s["epoch_losses"][0].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
    };
    let (a, b) = (losses(&full), losses(&half));
    eprintln!("epoch losses f32 {a:?}, bf16 {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() / x < 0.05, "bf16 losses {b:?} drift from f32 {a:?}");
    }
    assert_eq!(half["performance"]["precision"], "bf16");
    let ckpt =
        candle_core::safetensors::load(tmp.path().join("bf16/checkpoints/task-01.safetensors"), &Device::Cpu).unwrap();
    assert!(ckpt.values().all(|t| t.dtype() == DType::F32));
}

/// `[train] cache_image_codes`: later epochs take the frozen tokenizer's codes from the cache,
/// and the run is the same as without it.
#[test]
fn cached_image_codes_give_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let pt = fixture("vq.pt").display().to_string();
    let experiment = format!(
        "[experiment]\nname = \"student\"\n\
         [model.tokenizer]\nplugin = \"clip-bpe\"\ncontext_length = 12\n\
         [model.image_tokenizer]\nplugin = \"llamagen-vq\"\n{ARCH}decoder = false\ncheckpoint = {pt:?}\n\
         [model.vision]\nplugin = \"toklip-encoder\"\ntokens = 16\ncode_dim = 8\nwidth = 32\nlayers = 1\nheads = 2\nembed_dim = 24\n\
         [model.text]\nplugin = \"clip-text\"\ncontext_length = 12\nwidth = 32\nlayers = 1\nheads = 2\nembed_dim = 24\n\
         [optimizer]\nlr = 1e-3\n[train]\nepochs = 3\nbatch_size = 8\n\
         [data]\ntrain_transform = \"resize-center-crop\"\n\
         [[task]]\nname = \"shapes\"\nshapes = [\"circle\", \"square\", \"triangle\"]\ncolors = [\"red\", \"blue\"]\ntrain_per_combo = 3\n\
         [[evaluator]]\nplugin = \"retrieval\"\n"
    );
    std::fs::write(tmp.path().join("student.toml"), experiment).unwrap();
    let run = |dir: &str, cache: bool| -> serde_json::Value {
        let out = Command::new(recall_tests::recall_bin())
            .args(["run", "-q", "student.toml", "--run-dir", dir, "--set", &format!("train.cache_image_codes={cache}")])
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{dir}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join(dir).join("summary.json")).unwrap()).unwrap()
    };
    let (plain, cached) = (run("plain", false), run("cached", true));
    let losses = |s: &serde_json::Value| -> Vec<f64> {
        s["epoch_losses"][0].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
    };
    let (a, b) = (losses(&plain), losses(&cached));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "cached codes changed the run: {a:?} vs {b:?}");
    }
    assert_eq!(plain["results"], cached["results"]);
    // Without an image tokenizer there is nothing to cache: a located error.
    std::fs::write(tmp.path().join("small.toml"), recall_tests::SMALL_EXPERIMENT).unwrap();
    let out = Command::new(recall_tests::recall_bin())
        .args([
            "run",
            "-q",
            "small.toml",
            "--set",
            "train.cache_image_codes=true",
            "--set",
            "data.train_transform=\"resize-center-crop\"",
        ])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("[train] cache_image_codes") && err.contains("image_tokenizer"),
        "{err}"
    );
}
