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

/// The (task, global step) of the last mid-task checkpoint, if one is recorded.
fn step_checkpoint(dir: &std::path::Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(dir.join("checkpoints/step.json")).ok()?;
    let v = serde_json::from_str::<serde_json::Value>(&text).ok()?;
    Some((v["task"].as_u64()?, v["global_step"].as_u64()?))
}

fn assert_same_run(a: &std::path::Path, b: &std::path::Path) {
    let (x, y) = (summary(a), summary(b));
    for key in ["results", "heldout", "epoch_losses", "epoch_terms", "continual", "performance_drop", "steps"] {
        assert_eq!(x[key], y[key], "`{key}` differs between the unbroken and the resumed run");
    }
    for t in 1..=3 {
        let f = format!("checkpoints/task-{t:02}.safetensors");
        assert!(std::fs::read(a.join(&f)).unwrap() == std::fs::read(b.join(&f)).unwrap(), "{f} differs");
    }
}

/// Killed (SIGKILL) twice inside tasks, each time after a mid-task checkpoint and at no
/// particular step, then resumed: the numbers and the weights are those of the unbroken run,
/// bit for bit. Dropout, a LoRA merge, EWC's state and LwF's old model all cross the kills.
#[test]
fn a_run_killed_inside_tasks_resumes_from_its_step_checkpoints_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("resume.toml");
    let text = experiment().replace("epochs = 6", "epochs = 6\ncheckpoint_every_steps = 2");
    std::fs::write(&file, &text).unwrap();
    let unbroken = tmp.path().join("unbroken");
    let out =
        Command::new(recall_bin()).args(["run", "-q"]).arg(&file).arg("--run-dir").arg(&unbroken).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!unbroken.join("checkpoints/step.json").exists(), "a finished task removes its step checkpoints");

    let killed = tmp.path().join("killed");
    let mut resume = false;
    // Kill after the first step checkpoint, then after the first one past task 1.
    for (task, delay_ms) in [(0u64, 37u64), (1, 11)] {
        let mut cmd = Command::new(recall_bin());
        if resume {
            cmd.args(["run", "-q", "--resume"]).arg(&killed);
        } else {
            cmd.args(["run", "-q"]).arg(&file).arg("--run-dir").arg(&killed);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let start = Instant::now();
        // A new step checkpoint of `task` (not one the previous process left).
        let before = step_checkpoint(&killed);
        while step_checkpoint(&killed).is_none_or(|c| c.0 != task || Some(c) == before) {
            assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
            assert!(start.elapsed() < Duration::from_secs(300), "no step checkpoint was written");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!killed.join("summary.json").exists(), "the kill must land before the end");
        resume = true;
    }
    let out = Command::new(recall_bin()).args(["run", "-q", "--resume"]).arg(&killed).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_run(&unbroken, &killed);
    let log = std::fs::read_to_string(killed.join("log.txt")).unwrap();
    assert_eq!(log.matches("continuing from a mid-task checkpoint").count(), 2, "{log}");
}

/// SIGTERM (Slurm's preemption) stops the run at the next step with a checkpoint and a
/// message that says how to continue; the resumed run ends as an unbroken one.
#[test]
fn sigterm_checkpoints_and_stops_and_the_run_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("resume.toml");
    std::fs::write(&file, experiment()).unwrap();
    let unbroken = tmp.path().join("unbroken");
    let out =
        Command::new(recall_bin()).args(["run", "-q"]).arg(&file).arg("--run-dir").arg(&unbroken).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let stopped = tmp.path().join("stopped");
    let child = Command::new(recall_bin())
        .args(["run", "-q"])
        .arg(&file)
        .arg("--run-dir")
        .arg(&stopped)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while finished_tasks(&stopped) < 1 {
        assert!(start.elapsed() < Duration::from_secs(300), "task 1 never finished");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(60));
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a stopped run is not a finished one");
    assert!(err.contains("stopped by SIGTERM") && err.contains("--resume"), "{err}");
    assert!(step_checkpoint(&stopped).is_some(), "no checkpoint on SIGTERM");
    let out = Command::new(recall_bin()).args(["run", "-q", "--resume"]).arg(&stopped).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_run(&unbroken, &stopped);
    let log = std::fs::read_to_string(stopped.join("log.txt")).unwrap();
    assert_eq!(log.matches("continuing from a mid-task checkpoint").count(), 1, "{log}");
}

#[test]
fn resuming_a_directory_that_is_not_a_run_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(recall_bin()).args(["run", "--resume"]).arg(tmp.path()).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("not a Recall run directory"), "{e}");
}
