//! C-CLIP end to end on two small tasks: LoRA merged with coefficient 0.5 after each task, and
//! CKC against the frozen old model from the second task on; and the knobs that run it as the
//! authors' code does (CKC from the first task, whole-model averaging on a schedule).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};

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
    let run_dir = run(tmp.path(), "c-clip", &text);
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
    let ckc = plugins["plugins"].as_array().unwrap().iter().find(|p| p["name"] == "ckc").expect("ckc recorded");
    assert_eq!(ckc["sha256"].as_str().unwrap().len(), 64, "{ckc}");
    assert!(std::path::Path::new(ckc["path"].as_str().unwrap()).is_absolute(), "{ckc}");
    assert_eq!(plugins["recall"]["sha256"].as_str().unwrap().len(), 64, "and the binary's own: {plugins}");
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).unwrap()).unwrap();
    assert!(run["host"]["logical_cores"].as_u64().unwrap() >= 1 && run["host"]["os"] == "linux", "{run}");
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

/// Two tasks with LoRA and CKC, plus `extra` lines (for [train] or [adapter]).
fn two_task_experiment(train_extra: &str, adapter_extra: &str) -> String {
    let base = SMALL_EXPERIMENT.replacen("[train]\n", &format!("[train]\n{train_extra}\n"), 1);
    assert!(base.contains(train_extra), "the small experiment has a [train] table");
    format!(
        "{base}
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
{adapter_extra}

[[strategy]]
plugin = \"ckc\"
dim = 24
"
    )
}

/// Run `text` in a fresh directory under `tmp`; the run directory.
fn run(tmp: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let file = tmp.join(format!("{name}.toml"));
    std::fs::write(&file, text).unwrap();
    let run_dir = tmp.join(name);
    let out =
        Command::new(recall_bin()).args(["run", "-q"]).arg(&file).arg("--run-dir").arg(&run_dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    run_dir
}

fn checkpoint(run_dir: &Path, task: usize) -> HashMap<String, Tensor> {
    let path = run_dir.join("checkpoints").join(format!("task-{task:02}.safetensors"));
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn the_old_model_can_be_the_initial_model_on_the_first_task() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = run(tmp.path(), "first", &two_task_experiment("old_model_on_first_task = true", ""));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    let ckc = summary["epoch_terms"][0][0]["ckc"].as_f64().expect("a ckc term during the first task");
    assert!(ckc.is_finite() && ckc > 0.0, "{ckc}");

    // Without a strategy that uses an old model, the key would do nothing: refused, located.
    let text = SMALL_EXPERIMENT.replacen("[train]\n", "[train]\nold_model_on_first_task = true\n", 1);
    let file = tmp.path().join("no-old.toml");
    std::fs::write(&file, &text).unwrap();
    let out = Command::new(recall_bin())
        .args(["run", "-q"])
        .arg(&file)
        .arg("--run-dir")
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no strategy of this experiment compares against an old model"),
        "{err}"
    );
    let line = text.lines().position(|l| l.starts_with("old_model_on_first_task")).unwrap() + 1;
    assert!(err.contains(&format!("no-old.toml:{line}:")), "{err}");
}

#[test]
fn a_trained_scope_merge_averages_every_model_parameter_with_the_tasks_start() {
    let tmp = tempfile::tempdir().unwrap();
    let scope = "merge_scope = \"trained\"\nmerge_schedule =";
    // The same two tasks, the second kept whole ([1, 1]) or averaged 1:1 with its start.
    let whole = run(tmp.path(), "whole", &two_task_experiment("", &format!("{scope} [1.0, 1.0]")));
    let half = run(tmp.path(), "half", &two_task_experiment("", &format!("{scope} [1.0, 0.5]")));
    let (start, trained, averaged) = (checkpoint(&whole, 1), checkpoint(&whole, 2), checkpoint(&half, 2));
    assert_eq!(checkpoint(&half, 1).len(), start.len());
    let mut checked = 0;
    for (name, end) in &trained {
        if name.starts_with("adapter.") || name.starts_with("strategy.") {
            continue;
        }
        let want = ((&start[name] + end).unwrap() * 0.5).unwrap();
        let diff = (&averaged[name] - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-6, "{name}: the average is off by {diff}");
        checked += 1;
    }
    // The adapted base weights (LoRA's delta merged in full, then averaged) and the fully
    // trained ones (embeddings, projections, logit_scale) changed in the second task.
    let moved =
        |n: &str| (&trained[n] - &start[n]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(moved("logit_scale") > 0.0 && trained.keys().any(|n| n.ends_with("q_proj.weight") && moved(n) > 0.0));
    assert!(checked > 10, "{checked} parameters compared");
}

#[test]
fn the_papers_baselines_as_its_code_runs_them_are_active_from_the_first_task() {
    let tmp = tempfile::tempdir().unwrap();
    let second_task = "
[[task]]
name = \"b\"
shapes = [\"cross\", \"ring\"]
colors = [\"red\", \"blue\"]
train_per_combo = 2
";
    // EWC: the Fisher of the model each task starts from, on the task's held-out split.
    let ewc = format!(
        "{SMALL_EXPERIMENT}{second_task}
[[strategy]]
plugin = \"ewc\"
lambda = 0.4
mode = \"online\"
gamma = 0.0
fisher = \"before-task\"
fisher_batches = 2
"
    );
    // "ZSCL" of C-CLIP's table: LwF at T = 1 against the old model, from the first task on.
    let zscl = format!(
        "{}{second_task}
[[strategy]]
plugin = \"lwf\"
temperature = 1.0
average_directions = true
weight = 2.0
teacher_scale = \"student\"
",
        SMALL_EXPERIMENT.replacen("[train]\n", "[train]\nold_model_on_first_task = true\n", 1)
    );
    for (name, text, term) in [("ewc", ewc, "ewc"), ("zscl", zscl, "lwf")] {
        let run_dir = run(tmp.path(), name, &text);
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
        for task in 0..2 {
            let v = summary["epoch_terms"][task][0][term].as_f64();
            assert!(v.is_some_and(|v| v.is_finite() && v >= 0.0), "{name}: task {task} has no {term} term: {summary}");
        }
    }
}
