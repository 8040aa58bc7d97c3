//! Mixed precision (`[train] precision = "bf16"`): master weights, optimizer state and the
//! loss stay f32; ops compute in bf16 (matmul-like) or f32 (softmax, norms, sums) as
//! torch.autocast does. Checked on the CPU, which computes bf16 too: handles point at bf16
//! casts while training and back at the masters after, gradients reach the f32 masters, and a
//! bf16 run learns like the f32 run.

use std::process::Command;

use candle_core::DType;
use recall_host::config;
use recall_host::loader::{search_path, Registry};
use recall_host::model::Model;
use recall_tests::{recall_bin, SMALL_EXPERIMENT};

#[test]
fn low_precision_compute_keeps_f32_masters_and_returns_to_them() {
    let cfg = config::parse(SMALL_EXPERIMENT, "small.toml").unwrap();
    let model = Model::build(&cfg, &Registry::discover(&search_path(&[]))).unwrap_or_else(|e| panic!("{e}"));
    let rt = model.runtime.clone();
    let pixels = candle_core::Tensor::randn(0f32, 1.0, (4, 3, 16, 16), rt.device()).unwrap();
    let full = model.encode_images(&pixels).unwrap();

    for low in [DType::BF16, DType::F16] {
        rt.set_compute_dtype(low).unwrap();
        let mixed = model.encode_images(&pixels).unwrap();
        assert_eq!(mixed.dtype(), DType::F32, "features leave the towers in the masters' dtype");
        let diff = (&mixed - &full).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = full.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff > 0.0 && diff / scale < 5e-2, "{low:?} must differ from f32 by rounding only: {diff} / {scale}");
        let grads = mixed.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let params = rt.params();
        let trained: Vec<_> = params.iter().filter(|p| p.trainable && p.name.starts_with("vision.")).collect();
        assert!(!trained.is_empty());
        for p in &trained {
            assert_eq!(p.var.dtype(), DType::F32, "{}: masters stay f32", p.name);
            let g =
                grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("{}: no gradient reached the master", p.name));
            assert_eq!(g.dtype(), DType::F32);
        }
        drop(params);
    }
    rt.set_compute_dtype(DType::F32).unwrap();
    let back = model.encode_images(&pixels).unwrap();
    let d = (&back - &full).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(d, 0.0, "full precision again is exactly the f32 computation");
}

fn run(tmp: &std::path::Path, precision: &str) -> serde_json::Value {
    let dir = tmp.join(precision);
    let out = Command::new(recall_bin())
        .args(["run", "-q", "small.toml", "--set", &format!("train.precision={precision}"), "--set", "train.epochs=4"])
        .arg("--run-dir")
        .arg(&dir)
        .current_dir(tmp)
        .output()
        .unwrap();
    assert!(out.status.success(), "{precision}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn a_bf16_run_learns_like_the_f32_run() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("small.toml"), SMALL_EXPERIMENT).unwrap();
    let (f32_run, bf16_run) = (run(tmp.path(), "f32"), run(tmp.path(), "bf16"));
    let losses = |s: &serde_json::Value| -> Vec<f64> {
        s["epoch_losses"][0].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
    };
    let (a, b) = (losses(&f32_run), losses(&bf16_run));
    assert!(b.last() < b.first(), "bf16 did not learn: {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() / x < 0.05, "bf16 losses {b:?} drift from f32 {a:?}");
    }
    assert_eq!(bf16_run["performance"]["precision"], "bf16");
    assert!(bf16_run["performance"]["images_per_second"].as_f64().unwrap() > 0.0);
    // Masters and checkpoints stay f32.
    let ckpt = candle_core::safetensors::load(
        tmp.path().join("bf16/checkpoints/task-01.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(ckpt.values().all(|t| t.dtype() == DType::F32));
}

#[test]
fn precision_settings_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("small.toml"), SMALL_EXPERIMENT).unwrap();
    for (set, expect) in
        [("train.precision=fp8", "unknown precision `fp8`"), ("train.eval_precision=bf16", "unknown eval_precision")]
    {
        let out = Command::new(recall_bin())
            .args(["run", "small.toml", "--set", set])
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // The value came from --set, so the error names the --set, not a line of the file.
        assert!(
            !out.status.success() && err.contains(expect) && err.contains(&format!("--set {set}:")),
            "{set}: {err}"
        );
    }
}
