//! The quickstart experiment, shortened: the loss decreases, retrieval on the trained task is
//! far above chance, and the same seed reproduces every number on CPU.

use std::process::Command;

use recall_tests::{recall_bin, workspace_root};

fn run(dir: &std::path::Path) -> serde_json::Value {
    let out = Command::new(recall_bin())
        .current_dir(workspace_root())
        .args(["run", "experiments/quickstart.toml", "-q", "--set", "train.epochs=4", "--run-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn quickstart_learns_and_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let a = run(&tmp.path().join("a"));
    let losses = a["epoch_losses"].as_array().unwrap();
    for (t, l) in losses.iter().enumerate() {
        let l: Vec<f64> = l.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert!(l.last().unwrap() < l.first().unwrap(), "task {t}: loss did not decrease: {l:?}");
    }
    // 72 test images with unique captions: chance R@1 is 1.4 %.
    let rows = a["results"]["rows"].as_array().unwrap();
    let after_first = &rows[1][0];
    for m in ["retrieval/i2t_r1", "retrieval/t2i_r1"] {
        let v = after_first[m].as_f64().unwrap();
        assert!(v >= 10.0, "{m} on the first task after training it is {v:.2} %, not far above chance (1.4 %)");
    }
    assert!(a["trainable_parameters"].as_u64().unwrap() > 0);
    for f in
        ["config.resolved.toml", "metrics.jsonl", "summary.json", "plugins.json", "checkpoints/task-02.safetensors"]
    {
        assert!(tmp.path().join("a").join(f).exists(), "{f} missing from the run directory");
    }

    // Training telemetry: every 10 global steps (and at each task's end) the event log holds
    // the loss, its terms, the lr and the epoch; the loss falls over the run.
    let events = std::fs::read_to_string(tmp.path().join("a/tracking/events.jsonl")).unwrap();
    let mut train: Vec<(u64, f64)> = Vec::new();
    for line in events.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        let Some(metrics) = e["metrics"].as_array() else { continue };
        if metrics.first().is_some_and(|m| m[0] == "train/loss") {
            let names: Vec<&str> = metrics.iter().map(|m| m[0].as_str().unwrap()).collect();
            for want in ["train/clip", "train/lr", "train/epoch", "train/images_per_second"] {
                assert!(names.contains(&want), "{want} missing from {names:?}");
            }
            train.push((metrics[0][2].as_u64().unwrap(), metrics[0][1].as_f64().unwrap()));
        }
    }
    let steps = a["steps"].as_u64().unwrap();
    assert!(train.len() as u64 >= steps / 10, "{train:?}");
    assert!(train.iter().any(|(s, _)| *s == 10) && train.last().unwrap().0 == steps, "{train:?}");
    assert!(train.last().unwrap().1 < train[0].1, "{train:?}");

    let b = run(&tmp.path().join("b"));
    assert_eq!(a["results"], b["results"], "same seed, different results");
    assert_eq!(a["epoch_losses"], b["epoch_losses"]);
    let ma = std::fs::read_to_string(tmp.path().join("a/metrics.jsonl")).unwrap();
    let mb = std::fs::read_to_string(tmp.path().join("b/metrics.jsonl")).unwrap();
    assert_eq!(ma, mb);
}
