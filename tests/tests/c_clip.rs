//! C-CLIP end to end on two small tasks: LoRA merged with coefficient 0.5 after each task, and
//! CKC against the frozen old model from the second task on.

use std::process::Command;

use recall_tests::{recall_bin, SMALL_EXPERIMENT};

#[test]
fn c_clip_runs_with_ckc_against_the_old_model() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "{SMALL_EXPERIMENT}
[[task]]
name = \"b\"
shapes = [\"cross\", \"ring\"]
colors = [\"red\", \"blue\"]
train_per_combo = 2

[adapter]
plugin = \"lora\"
rank = 4
alpha = 8
merge_after_task = true
merge_coefficient = 0.5

[[strategy]]
plugin = \"ckc\"
dim = 24
"
    );
    let file = tmp.path().join("c-clip.toml");
    std::fs::write(&file, text).unwrap();
    let run_dir = tmp.path().join("run");
    let out =
        Command::new(recall_bin()).args(["run", "-q"]).arg(&file).arg("--run-dir").arg(&run_dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    let terms = &summary["epoch_terms"];
    assert!(terms[0][0].get("ckc").is_none(), "no old model during the first task: {terms}");
    let ckc = terms[1][0]["ckc"].as_f64().expect("ckc term during the second task");
    assert!(ckc.is_finite() && ckc > 0.0, "{ckc}");
    assert!(terms[1][0]["clip"].as_f64().unwrap().is_finite());
    // The CKC projector trains: it is counted among the trainable parameters.
    let plugins: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("plugins.json")).unwrap()).unwrap();
    assert!(plugins.as_array().unwrap().iter().any(|p| p["name"] == "ckc"));
    assert!(summary["continual"]["retrieval/i2t_r1"]["bwt"].is_number());
    // FWT against the evaluator's chance level: R[i-1][i] minus what a random ranking scores.
    let i2t = &summary["continual"]["retrieval/i2t_r1"];
    let r = &summary["results"]["rows"];
    let chance = |i: usize| r[0][i]["retrieval/i2t_r1_chance"].as_f64().unwrap();
    let expected = ((r[0][0]["retrieval/i2t_r1"].as_f64().unwrap() - chance(0))
        + (r[1][1]["retrieval/i2t_r1"].as_f64().unwrap() - chance(1)))
        / 2.0;
    assert!((i2t["fwt"].as_f64().unwrap() - expected).abs() < 1e-9, "{i2t}");
    assert!(summary["continual"].get("retrieval/i2t_r1_chance").is_none(), "chance levels are baselines, not scores");
}
