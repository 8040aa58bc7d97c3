//! A validation split inside each task: carved from the training data by `split_seed`,
//! scored every `eval_every_epochs` epochs while the test split waits for the stage's end,
//! recorded at the global step, and compared with `recall compare --on val`.

use std::process::Command;

use recall_tests::{recall_bin, SMALL_EXPERIMENT};

fn experiment(extra_task: &str, train: &str) -> String {
    SMALL_EXPERIMENT
        .replace("epochs = 1\nbatch_size = 16", &format!("epochs = 2\nbatch_size = 16\n{train}"))
        .replace("train_per_combo = 2", &format!("train_per_combo = 2\n{extra_task}"))
}

fn run(dir: &std::path::Path, name: &str, text: &str) -> std::process::Output {
    std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
    Command::new(recall_bin())
        .args(["run", "-q", &format!("{name}.toml"), "--run-dir", name])
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn validation_scores_each_epoch_inside_the_task_and_compare_tables_them() {
    let tmp = tempfile::tempdir().unwrap();
    let text = experiment("val_fraction = 0.25", "eval_every_epochs = 1");
    let out = run(tmp.path(), "val", &text);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("val/summary.json")).unwrap()).unwrap();
    let records = summary["validation"].as_array().unwrap();
    assert_eq!(records.len(), 2, "one record per epoch: {records:?}");
    assert_eq!((records[0]["epoch"].as_u64(), records[1]["epoch"].as_u64()), (Some(1), Some(2)));
    assert!(records[0]["step"].as_u64().unwrap() < records[1]["step"].as_u64().unwrap());
    assert!(records[1]["metrics"]["retrieval/i2t_r1"].is_number(), "{records:?}");
    // The held-out examples left training: the shapes task has 32 training images, a
    // quarter (8) of them validate.
    assert_eq!(summary["data"]["a"]["train"], 24, "{}", summary["data"]);
    // After each stage every task's validation split is scored too: a matrix like the test
    // splits', its continual summaries, metrics.jsonl's `val` suite.
    assert_eq!(summary["validation_results"]["rows"].as_array().unwrap().len(), 2, "{}", summary["validation_results"]);
    assert!(summary["validation_continual"]["retrieval/i2t_r1"]["avg"].is_number(), "{summary}");
    let lines = std::fs::read_to_string(tmp.path().join("val/metrics.jsonl")).unwrap();
    assert!(lines.lines().any(|l| l.contains("\"suite\":\"val\"") && l.contains("\"stage\":1")), "{lines}");
    let events = std::fs::read_to_string(tmp.path().join("val/tracking/events.jsonl")).unwrap();
    assert!(events.contains("\"val/a/retrieval/i2t_r1\""), "validation reaches the tracker");
    // The same split for another experiment seed (split_seed decides it).
    let splits_a = std::fs::read_to_string(tmp.path().join("val/splits.json")).unwrap();
    let out = run(tmp.path(), "val-seed4", &text.replace("seed = 3", "seed = 4"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let splits_b = std::fs::read_to_string(tmp.path().join("val-seed4/splits.json")).unwrap();
    assert_eq!(splits_a, splits_b, "the experiment's seed does not move the split");

    let table = Command::new(recall_bin())
        .args(["compare", "--on", "val", "val", "val-seed4"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let md = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success() && md.contains("| small | 2 |"), "{md}");
    for column in ["Val Avg I2T R@1", "Val BWT", "In-task val I2T R@1"] {
        assert!(md.contains(column), "{column} missing: {md}");
    }
    assert!(!md.contains("| Avg I2T R@1"), "no test-split column in a validation table: {md}");
    // A run without validation cannot be tabled on it.
    let out = run(tmp.path(), "plain", &SMALL_EXPERIMENT.replace("name = \"small\"", "name = \"plain\""));
    assert!(out.status.success());
    let table =
        Command::new(recall_bin()).args(["compare", "--on", "val", "plain"]).current_dir(tmp.path()).output().unwrap();
    let err = String::from_utf8_lossy(&table.stderr);
    assert!(!table.status.success() && err.contains("val_fraction"), "{err}");
}

#[test]
fn a_validation_split_that_leaves_too_little_to_train_is_a_located_error() {
    let tmp = tempfile::tempdir().unwrap();
    let text = experiment("val_fraction = 0.99", "eval_every_epochs = 1");
    let out = run(tmp.path(), "greedy", &text);
    let err = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().position(|l| l.starts_with("val_fraction")).unwrap() + 1;
    assert!(!out.status.success() && err.contains(&format!("greedy.toml:{line}:")), "{err}");
    assert!(err.contains("leaves 0 of its 32 training examples") && err.contains("at least 2"), "{err}");
    let out = run(tmp.path(), "no-val", &experiment("", "eval_every_epochs = 1"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no [[task]] sets val_fraction"), "{err}");
}
