//! CLIP BPE parity: the `clip-bpe` plugin gives open_clip's token ids on >= 1,000 varied
//! strings (tests/fixtures/bpe/cases.jsonl, made by make_fixture.py beside it).

use candle_core::{DType, Device};
use recall_host::loader::load_plugin;
use recall_host::plugin::TokenizerInstance;
use recall_host::runtime::Runtime;
use recall_tests::{cdylib, workspace_root};

#[test]
fn ids_match_open_clip_on_every_case() {
    let text = std::fs::read_to_string(workspace_root().join("tests/fixtures/bpe/cases.jsonl")).unwrap();
    let cases: Vec<(String, Vec<u32>)> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["text"].as_str().unwrap().to_string(),
                v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
            )
        })
        .collect();
    assert!(cases.len() >= 1000);
    let rt = Runtime::new(Device::Cpu, DType::F32, 0);
    let tok = TokenizerInstance::create(&load_plugin(&cdylib("recall-plugin-clip-bpe")).unwrap(), &rt, "").unwrap();
    let texts: Vec<String> = cases.iter().map(|(t, _)| t.clone()).collect();
    let batch = tok.encode(&texts, Some(77)).unwrap();
    let mut mismatches = Vec::new();
    for (i, ((text, expected), row)) in cases.iter().zip(batch.ids.chunks(77)).enumerate() {
        let mut got = row.to_vec();
        while got.last() == Some(&0) {
            got.pop();
        }
        if &got != expected {
            mismatches.push(format!("case {i} {text:?}:\n  open_clip {expected:?}\n  recall    {got:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ; first ones:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches[..mismatches.len().min(8)].join("\n")
    );
}
