//! Sweeps and comparisons: a [sweep] over a learning rate and two seeds runs with the local
//! executor, a re-run skips finished points and resumes a half-finished one, and `recall
//! compare` groups the seeds; `compare` on fixture runs matches golden files.

use std::process::Command;

use recall_tests::{recall_bin, workspace_root, SMALL_EXPERIMENT};

fn recall(args: &[&str], cwd: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(recall_bin()).args(args).current_dir(cwd).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn compare_matches_the_golden_files() {
    let root = workspace_root();
    let out = tempfile::tempdir().unwrap();
    let out_s = out.path().display().to_string();
    let runs = ["finetune-seed0", "finetune-seed1", "ewc-seed0", "unfinished-seed0"]
        .map(|r| format!("tests/fixtures/compare/{r}"));
    let mut args = vec!["compare"];
    args.extend(runs.iter().map(String::as_str));
    args.extend(["--baseline", "finetune", "--out", &out_s]);
    let (ok, stdout, stderr) = recall(&args, &root);
    assert!(ok, "{stderr}");
    let golden = std::fs::read_to_string(root.join("tests/fixtures/compare/expected.md")).unwrap();
    assert_eq!(stdout, golden);
    assert_eq!(std::fs::read_to_string(out.path().join("compare.md")).unwrap(), golden);
    assert_eq!(
        std::fs::read_to_string(out.path().join("compare.csv")).unwrap(),
        std::fs::read_to_string(root.join("tests/fixtures/compare/expected.csv")).unwrap()
    );
    // The LaTeX table: the same rounded digits (checked by hand against expected.md).
    let tex = std::fs::read_to_string(root.join("tests/fixtures/compare/expected.tex")).unwrap();
    assert_eq!(std::fs::read_to_string(out.path().join("compare.tex")).unwrap(), tex);
    let mut latex = args.clone();
    latex.truncate(latex.len() - 2);
    latex.extend(["--format", "latex"]);
    let (ok, stdout, stderr) = recall(&latex, &root);
    assert!(ok && stdout == tex, "{stderr}");
    // The HTML report: self-contained, with the table and inline SVG charts.
    let html = std::fs::read_to_string(out.path().join("compare.html")).unwrap();
    assert!(html.contains("<td>finetune (baseline)</td>") && html.contains("<b>4.00 (-5.00)</b>"), "{html}");
    assert!(html.matches("<svg").count() >= 8, "bars per metric and curves expected");
    assert!(!html.contains("chart failed") && !html.contains("src=\"http"), "{html}");
    let (ok, _, stderr) = recall(&["compare", &runs[0], "--baseline", "ewcc"], &root);
    assert!(!ok && stderr.contains("no method named `ewcc`") && stderr.contains("finetune"), "{stderr}");
}

#[test]
fn sweep_runs_skips_finished_points_resumes_partial_ones_and_compares() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[sweep]\nname = \"lr\"\nseeds = [0, 1]\n[sweep.axes]\n\"optimizer.lr\" = [0.001, 0.0003]\n",
        SMALL_EXPERIMENT.replace("epochs = 1", "epochs = 2")
    )
    .replace("[[task]]\nname = \"a\"", "[[task]]\nname = \"a\"\n")
        + "\n[[task]]\nname = \"b\"\nshapes = [\"cross\", \"ring\"]\ncolors = [\"red\", \"blue\"]\ntrain_per_combo = 2\n";
    std::fs::write(tmp.path().join("s.toml"), &text).unwrap();
    let (ok, out, err) = recall(&["sweep", "s.toml", "--dry-run"], tmp.path());
    assert!(ok, "{err}");
    assert_eq!(out.matches("pending").count(), 4, "{out}");
    assert!(out.contains("optimizer.lr=0.001") && out.contains("optimizer.lr=0.0003"), "{out}");

    let (ok, out, err) = recall(&["sweep", "-q", "s.toml", "--jobs", "2"], tmp.path());
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("4 finished, 0 already done, 0 failed"), "{out}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("runs/lr/sweep.json")).unwrap()).unwrap();
    let points = manifest["points"].as_array().unwrap();
    assert_eq!(points.len(), 4);
    // Half-finish one point: drop its summary and its last task, as if killed during task 2.
    let dir = tmp.path().join("runs/lr").join(points[0]["id"].as_str().unwrap());
    let before = std::fs::read_to_string(dir.join("summary.json")).unwrap();
    std::fs::remove_file(dir.join("summary.json")).unwrap();
    let mut progress: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("progress.json")).unwrap()).unwrap();
    progress["finished_tasks"] = 1.into();
    for key in ["epoch_losses", "epoch_terms"] {
        progress[key].as_array_mut().unwrap().truncate(1);
    }
    for key in ["results", "heldout"] {
        progress[key]["rows"].as_array_mut().unwrap().truncate(2);
    }
    std::fs::write(dir.join("progress.json"), progress.to_string()).unwrap();
    let (_, out, _) = recall(&["sweep", "s.toml", "--dry-run"], tmp.path());
    assert_eq!((out.matches("done").count(), out.matches("partial").count()), (3, 1), "{out}");
    let (ok, out, err) = recall(&["sweep", "-q", "s.toml"], tmp.path());
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("1 finished, 3 already done"), "{out}");
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let before: serde_json::Value = serde_json::from_str(&before).unwrap();
    assert_eq!(after["results"], before["results"], "the resumed point ends where the unbroken one did");

    let (ok, out, err) = recall(&["compare", "runs/lr", "--baseline", "optimizer.lr=0.001"], tmp.path());
    assert!(ok, "{err}");
    assert!(
        out.contains("| optimizer.lr=0.001 (baseline) | 2 |") && out.contains("| optimizer.lr=0.0003 | 2 |"),
        "{out}"
    );
    assert!(out.contains(" ± "), "{out}");
}

#[test]
fn bad_sweeps_fail_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    for (sweep, expected) in [
        ("[sweep.axes]\n\"optimizer.lrr\" = [0.1]\n", "did you mean `lr`"),
        ("[sweep.axes]\n\"optimizer.lr\" = []\n", "is empty"),
        (
            "[sweep.axes]\n\"optimizer.lr\" = [0.1, 0.2]\n[[sweep.include]]\n\"optimizer.lr\" = 0.3\n[[sweep.exclude]]\n\"optimizer.lr\" = 0.3\n",
            "removed again by exclude row 0",
        ),
    ] {
        std::fs::write(tmp.path().join("bad.toml"), format!("{SMALL_EXPERIMENT}\n{sweep}")).unwrap();
        let (ok, _, err) = recall(&["sweep", "bad.toml"], tmp.path());
        assert!(!ok && err.contains(expected) && err.contains("bad.toml:"), "{err}");
        assert!(!tmp.path().join("runs").exists(), "nothing may run");
    }
}
