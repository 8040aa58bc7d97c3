//! Resume: a 3-task run SIGKILLed during task 2 and resumed with `recall run --resume` ends
//! with exactly the numbers of an unbroken run of the same seed. The run stacks a LoRA merge
//! (re-initialised adapters: the generator must be reseeded the same way), EWC (strategy state
//! saved with each task checkpoint) and LwF (the old-model snapshot), with dropout on.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use recall_tests::{recall_bin, SMALL_EXPERIMENT};

fn experiment() -> String {
    format!(
        "{}
[[task]]
name = \"b\"
shapes = [\"cross\", \"ring\"]
colors = [\"red\", \"blue\"]
train_per_combo = 3

[[task]]
name = \"c\"
shapes = [\"triangle\", \"diamond\"]
colors = [\"green\", \"yellow\"]
style = \"outline\"
train_per_combo = 3

[[zeroshot]]
name = \"held-out\"
shapes = [\"circle\", \"square\", \"cross\"]
colors = [\"red\"]
train_per_combo = 1

[[evaluator]]
plugin = \"zeroshot\"
suite = \"zeroshot\"

[adapter]
plugin = \"lora\"
rank = 4
alpha = 8
dropout = 0.1
merge_after_task = true
merge_coefficient = 0.5

[[strategy]]
plugin = \"ewc\"
lambda = 50.0
fisher_batches = 2

[[strategy]]
plugin = \"lwf\"
",
        SMALL_EXPERIMENT.replace("epochs = 1", "epochs = 6").replace("train_per_combo = 2", "train_per_combo = 3")
    )
}

fn summary(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

fn finished_tasks(dir: &std::path::Path) -> u64 {
    std::fs::read_to_string(dir.join("progress.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["finished_tasks"].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_run_killed_during_task_2_resumes_to_identical_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("resume.toml");
    std::fs::write(&file, experiment()).unwrap();

    let unbroken = tmp.path().join("unbroken");
    let out =
        Command::new(recall_bin()).args(["run", "-q"]).arg(&file).arg("--run-dir").arg(&unbroken).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let killed = tmp.path().join("killed");
    let mut child = Command::new(recall_bin())
        .args(["run", "-q"])
        .arg(&file)
        .arg("--run-dir")
        .arg(&killed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while finished_tasks(&killed) < 1 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before task 1 was recorded");
        assert!(start.elapsed() < Duration::from_secs(300), "task 1 never finished");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Into task 2, then SIGKILL (Child::kill sends SIGKILL on Unix).
    std::thread::sleep(Duration::from_millis(150));
    assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed; make it longer");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(finished_tasks(&killed), 1, "the kill must land during task 2");
    assert!(!killed.join("summary.json").exists());

    let out = Command::new(recall_bin()).args(["run", "-q", "--resume"]).arg(&killed).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (a, b) = (summary(&unbroken), summary(&killed));
    for key in ["results", "heldout", "epoch_losses", "epoch_terms", "continual", "performance_drop", "steps"] {
        assert_eq!(a[key], b[key], "`{key}` differs between the unbroken and the resumed run");
    }
    // The EWC and LwF terms were active in the resumed tasks.
    assert!(b["epoch_terms"][2][0]["ewc"].as_f64().unwrap() >= 0.0);
    assert!(b["epoch_terms"][2][0]["lwf"].is_number(), "{}", b["epoch_terms"]);
    // run.json records the build and seed, and the resume.
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(killed.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["seed"], 3);
    assert!(run["started"]["git_commit"].is_string());
    assert_eq!(run["resumed"].as_array().map(Vec::len), Some(1), "{run}");
    // log.txt holds both processes' logs: 1 task before the kill, 2 after the resume.
    let log = std::fs::read_to_string(killed.join("log.txt")).unwrap();
    assert_eq!(log.matches("task finished and checkpointed").count(), 3, "{log}");
    // EWC keeps new tensors at task boundaries: that is state, not a leak.
    assert!(!log.contains("live tensor handles grow"), "{log}");
    let lines = std::fs::read_to_string(killed.join("metrics.jsonl")).unwrap();
    assert_eq!(lines, std::fs::read_to_string(unbroken.join("metrics.jsonl")).unwrap());
}

#[test]
fn resuming_a_directory_that_is_not_a_run_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(recall_bin()).args(["run", "--resume"]).arg(tmp.path()).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("not a Recall run directory"), "{e}");
}
