//! `recall embed` and `recall tokenize` through the binary.

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use recall_tests::{recall_bin, workspace_root};

fn recall(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut c = Command::new(recall_bin());
    c.args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    if let Some(s) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tokenize_prints_open_clip_ids() {
    let (ok, out, err) = recall(&["tokenize", "--tokenizer", "clip-bpe"], Some("a photo of a cat\nA Dog, running!\n"));
    assert!(ok, "{err}");
    // open_clip.tokenize of the same lines (tests/fixtures/clip/reference.safetensors holds them too).
    assert_eq!(out, "[49406,320,1125,539,320,2368,49407]\n[49406,320,1929,267,2761,256,49407]\n");
    let (ok, out, _) =
        recall(&["tokenize", "--tokenizer", "clip-bpe", "--context", "4", "--pad"], Some("a photo of a cat\n"));
    assert!(ok);
    assert_eq!(out, "[49406,320,1125,49407]\n", "truncation keeps the end token");
}

#[test]
fn embed_writes_consistent_embeddings_and_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(workspace_root().join("tests/fixtures/preprocess/franz-kafka.jpg"), images.join("a.jpg")).unwrap();
    image::GrayAlphaImage::from_fn(40, 30, |x, y| image::LumaA([((x * 7 + y * 3) % 256) as u8, 200]))
        .save(images.join("b.png"))
        .unwrap();
    let texts = tmp.path().join("texts.txt");
    std::fs::write(&texts, "a photo of a cat\n\na man with a hat\n").unwrap();
    let out = tmp.path().join("emb.safetensors");
    let model = workspace_root().join("tests/fixtures/clip/hf");
    let (ok, _, err) = recall(
        &[
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--images",
            images.to_str().unwrap(),
            "--texts",
            texts.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{err}");
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(t["image_embeds"].dims(), &[2, 24]);
    assert_eq!(t["text_embeds"].dims(), &[2, 24], "blank lines are skipped");
    assert_eq!(t["input_ids"].dims(), &[2, 77]);
    let norm = |x: &Tensor| x.broadcast_div(&x.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap()).unwrap();
    let logits = norm(&t["image_embeds"]).matmul(&norm(&t["text_embeds"]).t().unwrap()).unwrap() * (1.0f64 / 0.07);
    let d = (logits.unwrap() - &t["logits_per_image"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "logits inconsistent with the embeddings: {d}");
    assert_eq!(t["image_embeds_normalized"].dtype(), DType::F32);
}

#[test]
fn embed_names_the_file_it_cannot_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 not a jpeg").unwrap();
    let out = tmp.path().join("emb.safetensors");
    let model = workspace_root().join("tests/fixtures/clip/hf");
    let (ok, _, err) = recall(
        &[
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--images",
            bad.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(!ok);
    assert!(err.contains("cannot decode image") && err.contains("broken.jpg"), "{err}");
    assert!(!out.exists(), "nothing half-written");
    let (ok, _, err) = recall(
        &["embed", "--model", "/nonexistent/model", "--texts", bad.to_str().unwrap(), "--out", out.to_str().unwrap()],
        None,
    );
    assert!(!ok && err.contains("does not exist"), "{err}");
}
