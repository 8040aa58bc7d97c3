//! The mini-vlcl benchmark at smoke size, on the real data: the registry datasets are fetched
//! and converted (`recall data prepare`), the base model is pretrained, and C-CLIP (LoRA merged
//! with 0.5, plus CKC) runs the four tasks from it with retrieval after every task and
//! zero-shot classification on the two held-out sets. The experiment files are the shipped
//! ones, shrunk with `--set`.

use std::path::Path;
use std::process::Command;

use recall_tests::{recall_bin, workspace_root};

fn recall(args: &[&str]) {
    let out = Command::new(recall_bin()).args(args).current_dir(workspace_root()).output().unwrap();
    assert!(
        out.status.success(),
        "recall {} failed:\n{}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn mini_vlcl_smoke_pretrains_then_runs_c_clip_on_real_data() {
    recall(&["fetch", "-q", "minilm-l6"]);
    recall(&["data", "prepare", "mnist", "textiles", "emoji-twitter", "animal-mnist", "emoji-google"]);
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let base_s = base.display().to_string();
    recall(&[
        "run",
        "-q",
        "experiments/mini-vlcl/pretrain.toml",
        "--run-dir",
        &base_s,
        "--set",
        "train.epochs=1",
        "--set",
        "task[0].part[0].max_train=192",
        "--set",
        "task[0].part[1].max_train=192",
        "--set",
        "task[0].part[2].train_per_combo=1",
        "--set",
        "zeroshot[0].max_test=100",
    ]);
    let run = tmp.path().join("c-clip");
    let run_s = run.display().to_string();
    let mut args = vec![
        "run".to_string(),
        "-q".into(),
        "experiments/mini-vlcl/mini-vlcl.toml".into(),
        "--run-dir".into(),
        run_s,
        "--set".into(),
        format!("model.init={base_s:?}"),
        "--set".into(),
        "train.epochs=1".into(),
        "--set".into(),
        "zeroshot[0].max_test=100".into(),
        "--set".into(),
        "adapter={plugin=\"lora\",rank=4,alpha=8,targets=[\"vision.*\",\"text.*\"],merge_after_task=true,merge_coefficient=0.5}"
            .into(),
        "--set".into(),
        "strategy=[{plugin=\"ckc\",dim=128}]".into(),
    ];
    for i in 0..3 {
        args.extend([
            "--set".into(),
            format!("task[{i}].max_train=96"),
            "--set".into(),
            format!("task[{i}].max_test=48"),
        ]);
    }
    args.extend(["--set".into(), "task[3].train_per_combo=1".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    recall(&refs);

    let (b, s) = (summary(&base), summary(&run));
    let tasks: Vec<&str> = s["results"]["tasks"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tasks, ["digits", "textiles", "emoji", "symbols"]);
    assert_eq!(s["results"]["rows"].as_array().unwrap().len(), 5, "stage 0 plus one row per task");
    for row in s["results"]["rows"].as_array().unwrap() {
        for cell in row.as_array().unwrap() {
            for m in ["retrieval/i2t_r1", "retrieval/t2i_r1", "retrieval/i2t_r10"] {
                let v = cell[m].as_f64().unwrap_or_else(|| panic!("{m} missing in {cell}"));
                assert!((0.0..=100.0).contains(&v), "{m} = {v}");
            }
        }
    }
    // The held-out sets: zero-shot top-1/top-5 after every stage and PD per set.
    let heldout = &s["heldout"];
    assert_eq!(heldout["tasks"], serde_json::json!(["animals", "shapes"]));
    assert_eq!(heldout["rows"].as_array().unwrap().len(), 5);
    for set in ["animals", "shapes"] {
        assert!(s["performance_drop"]["zeroshot/top1"][set].is_number(), "{}", s["performance_drop"]);
    }
    // The run started from the pretrained model: its stage-0 zero-shot scores are those the
    // pretraining run measured at its end, on the same held-out examples.
    let pretrained = b["heldout"]["rows"].as_array().unwrap().last().unwrap();
    assert_eq!(&s["heldout"]["rows"][0], pretrained);
    // The pretrained model beats chance on the animals (10 classes) at its end.
    assert!(pretrained[0]["zeroshot/top1"].as_f64().unwrap() > 10.0, "{pretrained}");
    // C-CLIP's consolidation term is active from the second task on.
    assert!(s["epoch_terms"][1][0]["ckc"].as_f64().unwrap() > 0.0);
    assert!(s["trainable_parameters"].as_u64().unwrap() > 0);
    // The splits are recorded with the run.
    let splits: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("splits.json")).unwrap()).unwrap();
    assert_eq!(splits["tasks"]["digits"]["train"].as_array().unwrap().len(), 96);
    assert_eq!(splits["tasks"]["digits"]["test"].as_array().unwrap().len(), 48);

    // The C-CLIP presets (the paper's description and the authors' code) resolve on the same
    // data and base model.
    for preset in ["paper", "authors-code"] {
        let file = format!("experiments/c-clip/{preset}.toml");
        recall(&["run", "--dry-run", &file, "--set", &format!("model.init={base_s:?}")]);
    }
}
