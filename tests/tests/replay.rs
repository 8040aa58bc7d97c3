//! Replay through the host's exemplar memory: `der` (separate forward, stored features,
//! reservoir) and `replay` (exemplars joined to the batch, task- and class-balanced) train,
//! keep their memory within budget in every checkpoint, and a run killed inside a task
//! resumes to the unbroken run's numbers and memory, bit for bit.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use recall_tests::{recall_bin, SMALL_EXPERIMENT};

/// Three tasks of two shapes (classes) each, batches of 4, a step checkpoint every 2 steps.
fn experiment(strategy: &str) -> String {
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
train_per_combo = 3

[[strategy]]
{strategy}
",
        SMALL_EXPERIMENT
            .replace("epochs = 1", "epochs = 3\ncheckpoint_every_steps = 2")
            .replace("batch_size = 16", "batch_size = 4")
            .replace("train_per_combo = 2", "train_per_combo = 3")
    )
}

fn run(file: &std::path::Path, dir: &std::path::Path) -> std::process::Output {
    Command::new(recall_bin()).args(["run", "-q"]).arg(file).arg("--run-dir").arg(dir).output().unwrap()
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The memory saved after `task` tasks: (task, index) of each exemplar, and whether it has features.
fn memory_after(dir: &std::path::Path, task: usize) -> Vec<(u64, u64, bool)> {
    let m = json(&dir.join(format!("checkpoints/task-{task:02}.replay.json")));
    m["exemplars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["task"].as_u64().unwrap(), e["index"].as_u64().unwrap(), e["features"].is_array()))
        .collect()
}

fn step_checkpoint_task(dir: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("checkpoints/step.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["task"].as_u64()
}

#[test]
fn der_replays_its_reservoir_and_resumes_from_a_mid_task_kill_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("der.toml");
    std::fs::write(&file, experiment("plugin = \"der\"\nmemory = 10\nbatch_size = 4")).unwrap();
    let unbroken = tmp.path().join("unbroken");
    let out = run(&file, &unbroken);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The reservoir fills in the first task's first epoch (12 examples seen, 10 kept), every
    // exemplar with its features; later tasks displace some of the earlier ones.
    let summary = json(&unbroken.join("summary.json"));
    let first_task = summary["data"]["a"]["train"].as_u64().unwrap();
    let first = memory_after(&unbroken, 1);
    assert_eq!(first.len(), 10);
    assert!(first.iter().all(|&(t, i, f)| t == 0 && i < first_task && f), "{first:?}");
    let last = memory_after(&unbroken, 3);
    assert_eq!(last.len(), 10);
    assert!(last.iter().any(|e| e.0 == 2), "the last task never entered the memory: {last:?}");
    for t in 0..3 {
        let terms = &summary["epoch_terms"][t][2];
        assert!(terms["der_mse"].as_f64().unwrap() > 0.0 && terms["der_clip"].as_f64().unwrap() > 0.0, "{terms}");
    }

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
    while step_checkpoint_task(&killed) != Some(1) {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(start.elapsed() < Duration::from_secs(300), "no step checkpoint in task 2");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(13));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!killed.join("summary.json").exists(), "the kill must land before the end");
    let out = Command::new(recall_bin()).args(["run", "-q", "--resume"]).arg(&killed).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed = json(&killed.join("summary.json"));
    for key in ["results", "epoch_losses", "epoch_terms", "continual", "steps"] {
        assert_eq!(summary[key], resumed[key], "`{key}` differs between the unbroken and the resumed run");
    }
    for t in 1..=3 {
        for what in ["safetensors", "replay.json"] {
            let f = format!("checkpoints/task-{t:02}.{what}");
            assert!(
                std::fs::read(unbroken.join(&f)).unwrap() == std::fs::read(killed.join(&f)).unwrap(),
                "{f} differs"
            );
        }
    }
}

#[test]
fn joined_replay_keeps_a_balanced_memory_and_warns_of_a_budget_beyond_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    // Task-balanced: 9 exemplars, 9 / 5 / 3 per task after tasks 1 / 2 / 3 (the earlier
    // tasks cut to their share).
    let file = tmp.path().join("er.toml");
    std::fs::write(&file, experiment("plugin = \"replay\"\nmemory = 9\npolicy = \"task-balanced\"\nbatch_size = 3"))
        .unwrap();
    let dir = tmp.path().join("er");
    let out = run(&file, &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let per_task = |task: usize| {
        let m = memory_after(&dir, task);
        assert!(m.iter().all(|e| !e.2), "joined replay keeps no features");
        (0..3).map(|t| m.iter().filter(|e| e.0 == t).count()).collect::<Vec<_>>()
    };
    assert_eq!(per_task(1), [9, 0, 0]);
    assert_eq!(per_task(2), [5, 4, 0]);
    assert_eq!(per_task(3), [3, 3, 3]);
    // Joined replay adds no term of its own: the task loss covers the exemplars.
    let summary = json(&dir.join("summary.json"));
    assert_eq!(summary["epoch_terms"][1][0].as_object().unwrap().keys().collect::<Vec<_>>(), ["clip"]);
    // A cut keeps a prefix of a task's exemplars: task 1's five after task 2 are the first
    // five of its nine.
    let (one, two) = (memory_after(&dir, 1), memory_after(&dir, 2));
    assert_eq!(one[..5], two[..5]);

    // Class-balanced: two classes per task, so 2 groups after task 1, 4 after task 2, 6
    // after task 3 (a budget of 12: 6, 3, 2 per class).
    let file = tmp.path().join("classes.toml");
    std::fs::write(&file, experiment("plugin = \"replay\"\nmemory = 12\npolicy = \"class-balanced\"")).unwrap();
    let dir = tmp.path().join("classes");
    let out = run(&file, &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = json(&dir.join("checkpoints/task-03.replay.json"));
    let mut per_class = std::collections::BTreeMap::<String, usize>::new();
    for e in m["exemplars"].as_array().unwrap() {
        *per_class.entry(e["class"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(per_class.len(), 6, "{per_class:?}");
    assert!(per_class.values().all(|&n| n == 2), "{per_class:?}");

    // A budget beyond every task's training data together is a warning, not an error.
    let file = tmp.path().join("big.toml");
    std::fs::write(&file, experiment("plugin = \"replay\"\nmemory = 1000")).unwrap();
    let dir = tmp.path().join("big");
    let out = run(&file, &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = std::fs::read_to_string(dir.join("log.txt")).unwrap();
    assert!(log.contains("the replay budget is larger than every task's training examples"), "{log}");
}

#[test]
fn replay_misconfigurations_are_located_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "plugin = \"replay\"\nmemory = 5\n\n[[strategy]]\nplugin = \"der\"\nmemory = 5",
            "both ask for an exemplar memory",
        ),
        ("plugin = \"replay\"\nmemory = 0", "memory"),
    ];
    for (i, (strategy, says)) in cases.into_iter().enumerate() {
        let file = tmp.path().join(format!("bad{i}.toml"));
        std::fs::write(&file, experiment(strategy)).unwrap();
        let out = run(&file, &tmp.path().join(format!("bad{i}")));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "`{strategy}` was accepted");
        assert!(err.contains(says) && err.contains("bad") && err.contains(".toml:"), "{err}");
        assert!(!tmp.path().join(format!("bad{i}")).exists(), "a rejected run left a directory");
    }
}
