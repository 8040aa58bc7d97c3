//! TokLIP's token encoder (`toklip-encoder`): the causal mask holds (a later token never
//! changes an earlier token's output), last-token pooling is the last row of the per-token
//! output, and `init_from` copies a clip-vision checkpoint's tensors where shapes allow.

use candle_core::{DType, Device, IndexOp, Tensor};
use recall_host::loader::load_plugin;
use recall_host::plugin::EncoderInstance;
use recall_host::runtime::Runtime;
use recall_tests::cdylib;

const ARCH: &str = "tokens = 6\ncode_dim = 8\nwidth = 16\nlayers = 2\nheads = 2\nembed_dim = 12\n";

fn encoder(rt: &std::rc::Rc<Runtime>, extra: &str) -> EncoderInstance {
    let plugin = load_plugin(&cdylib("recall-plugin-toklip-encoder")).unwrap();
    EncoderInstance::create(&plugin, rt, "vision.", &format!("{ARCH}{extra}")).unwrap_or_else(|e| panic!("{e}"))
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn a_later_token_never_changes_an_earlier_tokens_output() {
    let rt = Runtime::new(Device::Cpu, DType::F32, 7);
    rt.set_training(false);
    let enc = encoder(&rt, "pooling = \"all\"\n");
    let codes = Tensor::randn(0f32, 1.0, (2, 6, 8), &Device::Cpu).unwrap();
    let base = enc.forward(&[("code_embeddings", &codes)]).unwrap();
    assert_eq!(base.dims(), &[2, 6, 12]);
    // Every token's features before projection, published for token-level distillation.
    let tokens = enc.emitted("tokens").expect("toklip-encoder publishes its tokens");
    assert_eq!(tokens.dims(), &[2, 6, 16]);
    for j in 0..6 {
        // Replace token j of the first image only.
        let mut rows: Vec<Tensor> = (0..6).map(|t| codes.i((.., t..t + 1, ..)).unwrap()).collect();
        let replaced = (rows[j].i(0..1).unwrap() + 3.0).unwrap();
        rows[j] = Tensor::cat(&[&replaced, &rows[j].i(1..2).unwrap()], 0).unwrap();
        let changed = Tensor::cat(&rows, 1).unwrap();
        let out = enc.forward(&[("code_embeddings", &changed)]).unwrap();
        for t in 0..6 {
            let d = max_abs(&out.i((0, t)).unwrap(), &base.i((0, t)).unwrap());
            if t < j {
                assert!(d <= 1e-6, "changing token {j} moved token {t}'s output by {d}");
            } else {
                assert!(d > 1e-4, "changing token {j} left token {t}'s output unchanged");
            }
        }
        assert!(max_abs(&out.i(1).unwrap(), &base.i(1).unwrap()) <= 1e-6, "the other image moved");
    }
    // Last-token pooling is the last row of the per-token output (same parameters: same seed).
    let rt2 = Runtime::new(Device::Cpu, DType::F32, 7);
    rt2.set_training(false);
    let last = encoder(&rt2, "").forward(&[("code_embeddings", &codes)]).unwrap();
    assert_eq!(last.dims(), &[2, 12]);
    assert!(max_abs(&last, &base.i((.., 5)).unwrap()) <= 1e-6);
}

#[test]
fn init_from_a_clip_vision_checkpoint_copies_what_fits() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("task-01.safetensors");
    let vision = Runtime::new(Device::Cpu, DType::F32, 1);
    let clip = load_plugin(&cdylib("recall-plugin-clip-vision")).unwrap();
    let _tower = EncoderInstance::create(
        &clip,
        &vision,
        "vision.",
        "image_size = 16\npatch_size = 8\nwidth = 16\nlayers = 2\nheads = 2\nembed_dim = 12\n",
    )
    .unwrap();
    vision.params().save(&ckpt).unwrap();

    let rt = Runtime::new(Device::Cpu, DType::F32, 2);
    let _enc = encoder(&rt, &format!("init_from = {:?}\n", ckpt.display().to_string()));
    let theirs = vision.params();
    let ours = rt.params();
    let get = |store: &std::cell::Ref<'_, recall_host::runtime::params::ParamStore>, n: &str| {
        store.get(n).unwrap_or_else(|| panic!("no {n}")).var.as_tensor().clone()
    };
    for name in [
        "vision.blocks.1.attn.q_proj.weight",
        "vision.blocks.0.mlp.fc2.bias",
        "vision.ln_post.weight",
        "vision.proj.weight",
    ] {
        assert_eq!(max_abs(&get(&ours, name), &get(&theirs, name)), 0.0, "{name} was not copied");
    }
    // 5 positions (4 patches + class) vs 6 tokens: kept; the MLP is new.
    assert!(
        max_abs(&get(&ours, "vision.positional_embedding"), &Tensor::zeros((6, 16), DType::F32, &Device::Cpu).unwrap())
            > 0.0
    );
    assert!(ours.get("vision.mlp_in.weight").is_some());

    // A checkpoint with nothing that fits is an error naming the option.
    let rt = Runtime::new(Device::Cpu, DType::F32, 2);
    let plugin = load_plugin(&cdylib("recall-plugin-toklip-encoder")).unwrap();
    let e = EncoderInstance::create(
        &plugin,
        &rt,
        "vision.",
        &format!("{ARCH}init_from = {:?}\ninit_prefix = \"text.\"\n", ckpt.display().to_string()),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("no tensor under `text.`") && e.contains("init_prefix"), "{e}");
}

#[test]
fn inputs_of_the_wrong_shape_say_what_is_expected() {
    let rt = Runtime::new(Device::Cpu, DType::F32, 7);
    let enc = encoder(&rt, "");
    let pixels = Tensor::zeros((2, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let e = enc.forward(&[("pixel_values", &pixels)]).unwrap_err().to_string();
    assert!(e.contains("code_embeddings") && e.contains("image_tokenizer"), "{e}");
    let codes = Tensor::zeros((2, 5, 8), DType::F32, &Device::Cpu).unwrap();
    let e = enc.forward(&[("code_embeddings", &codes)]).unwrap_err().to_string();
    assert!(e.contains("[B, 6, 8]") && e.contains("[2, 5, 8]"), "{e}");
}

/// TokLIP end to end at smoke size on the embedded shapes: a VQ-VAE trained by a
/// reconstruction run, then the token encoder over its frozen codes, distilled from a teacher.
#[test]
fn vq_vae_then_a_distilled_token_encoder_run_end_to_end() {
    use std::process::Command;
    let tmp = tempfile::tempdir().unwrap();
    let data = "[[task]]\nname = \"shapes\"\nshapes = [\"circle\", \"square\", \"triangle\", \"cross\"]\ncolors = [\"red\", \"blue\"]\ntrain_per_combo = 4\n";
    let tokenizer = "[model.image_tokenizer]\nplugin = \"vq-tokenizer\"\nimage_size = 16\npatch = 4\nhidden = 32\ncode_dim = 8\ncodebook_size = 32\n";
    let vq = format!(
        "[experiment]\nname = \"vq\"\n{tokenizer}[optimizer]\nlr = 3e-3\nweight_decay = 0.0\n\
         [train]\nobjective = \"reconstruction\"\nepochs = 4\nbatch_size = 16\n{data}"
    );
    std::fs::write(tmp.path().join("vq.toml"), vq).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(recall_tests::recall_bin()).args(args).current_dir(tmp.path()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["run", "-q", "vq.toml", "--run-dir", "vq"]);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("vq/summary.json")).unwrap()).unwrap();
    let loss = |stage: usize| s["results"]["rows"][stage][0]["vq_loss"].as_f64().unwrap();
    assert!(loss(1) < 0.7 * loss(0), "the VQ-VAE did not learn: {} -> {}", loss(0), loss(1));
    assert!(s["results"]["rows"][1][0]["codes_used"].as_f64().unwrap() >= 2.0);

    let student = format!(
        "[experiment]\nname = \"student\"\n\
         [model.tokenizer]\nplugin = \"clip-bpe\"\ncontext_length = 12\n\
         {tokenizer}checkpoint = \"vq/checkpoints/task-01.safetensors\"\n\
         [model.vision]\nplugin = \"toklip-encoder\"\ntokens = 16\ncode_dim = 8\nwidth = 32\nlayers = 1\nheads = 2\nembed_dim = 24\n\
         [model.text]\nplugin = \"clip-text\"\ncontext_length = 12\nwidth = 32\nlayers = 1\nheads = 2\nembed_dim = 24\n\
         [teacher.vision]\nplugin = \"clip-vision\"\nimage_size = 16\npatch_size = 4\nwidth = 32\nlayers = 1\nheads = 2\nembed_dim = 24\n\
         [[strategy]]\nplugin = \"distill\"\ntoken_weight = 10.0\n\
         [optimizer]\nlr = 1e-3\n[train]\nepochs = 2\nbatch_size = 16\n{data}\
         [[evaluator]]\nplugin = \"retrieval\"\n"
    );
    std::fs::write(tmp.path().join("student.toml"), student).unwrap();
    run(&["run", "-q", "student.toml", "--run-dir", "student"]);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("student/summary.json")).unwrap()).unwrap();
    let terms = &s["epoch_terms"][0];
    let distill: Vec<f64> = terms.as_array().unwrap().iter().map(|t| t["distill"].as_f64().unwrap()).collect();
    assert!(distill.iter().all(|d| d.is_finite() && *d > 0.0), "{terms}");
    assert!(distill[1] < distill[0], "distillation did not pull the student toward the teacher: {distill:?}");
    // TokLIP's token-level term: the 16 code tokens against the teacher's 16 patches.
    let tokens: Vec<f64> = terms.as_array().unwrap().iter().map(|t| t["distill_tokens"].as_f64().unwrap()).collect();
    assert!(tokens.iter().all(|d| d.is_finite() && *d > 0.0), "{terms}");
    assert!(tokens[1] < tokens[0], "the token term did not fall: {tokens:?}");
    // The tokenizer and the teacher are frozen: only the token encoder, the text tower and
    // logit_scale train.
    let ckpt = candle_core::safetensors::load(tmp.path().join("student/checkpoints/task-01.safetensors"), &Device::Cpu)
        .unwrap();
    let vq =
        candle_core::safetensors::load(tmp.path().join("vq/checkpoints/task-01.safetensors"), &Device::Cpu).unwrap();
    for (name, t) in &vq {
        assert_eq!(max_abs(&ckpt[name], t), 0.0, "{name} moved in the student run");
    }
    assert!(!ckpt.keys().any(|k| k.starts_with("teacher")), "the teacher is not part of the student's checkpoint");
}
