//! The input pipeline end to end, through the `recall` binary on images read from disk:
//! training with RandomResizedCrop gives the same numbers for any number of decode workers
//! and any prefetch depth, the image cache changes nothing, and an image damaged past its
//! header follows `on_error` when a batch meets it.

use std::path::Path;
use std::process::Command;

use recall_tests::{recall_bin, SMALL_EXPERIMENT};

/// 48 noise images of a few sizes with two captions each, as a JSONL manifest.
fn dataset(dir: &Path) -> std::path::PathBuf {
    let mut manifest = String::new();
    for i in 0..48u32 {
        let (w, h) = (20 + i % 9, 16 + i % 6);
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let v = (x * 31 + y * 17 + i * 101).wrapping_mul(2_654_435_761) >> 24;
            let class = (i % 4) as u8 * 60;
            image::Rgb([(v as u8 / 2).wrapping_add(class), class, 255 - v as u8])
        });
        let name = format!("img{i}.png");
        img.save(dir.join(&name)).unwrap();
        let split = if i % 6 == 0 { "test" } else { "train" };
        manifest.push_str(&format!(
            "{{\"image\": \"{name}\", \"captions\": [\"a picture of kind {k}\", \"kind {k}\"], \"split\": \"{split}\"}}\n",
            k = i % 4
        ));
    }
    let f = dir.join("data.jsonl");
    std::fs::write(&f, manifest).unwrap();
    f
}

fn experiment(data: &Path, extra: &str) -> String {
    let base = SMALL_EXPERIMENT.replace("epochs = 1", "epochs = 2");
    // The small experiment's shapes task becomes the images on disk.
    let task = "[[task]]\nname = \"a\"\nshapes = [\"circle\", \"square\"]\ncolors = [\"red\", \"blue\"]\ntrain_per_combo = 2\n";
    assert!(base.contains(task));
    let files = format!("[[task]]\nname = \"a\"\nsource = \"jsonl\"\npath = \"{}\"\n", data.display());
    format!("{}\n[data]\n{extra}\n", base.replace(task, &files))
}

fn run(dir: &Path, name: &str, text: &str) -> (std::process::Output, std::path::PathBuf) {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, text).unwrap();
    let run_dir = dir.join(name);
    let out =
        Command::new(recall_bin()).args(["run", "-q"]).arg(&file).arg("--run-dir").arg(&run_dir).output().unwrap();
    (out, run_dir)
}

fn results(run_dir: &Path) -> (String, Vec<u8>) {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    let scores = format!("{} {}", summary["results"], summary["epoch_losses"]);
    (scores, std::fs::read(run_dir.join("checkpoints/task-01.safetensors")).unwrap())
}

#[test]
fn augmented_training_is_the_same_for_any_workers_prefetch_and_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let augment =
        "color_jitter = [0.4, 0.4, 0.4, 0.1]\ncolor_jitter_prob = 0.8\ngrayscale_prob = 0.2\ncrop_scale = [0.5, 1.0]";
    let mut seen = Vec::new();
    for (name, speed) in [
        ("one-worker", "workers = 1\nprefetch = 1\ncache = \"off\""),
        ("three-workers", "workers = 3\nprefetch = 4\ncache = \"off\""),
        ("cached", "workers = 2\ncache = \"on\""),
    ] {
        let (out, dir) = run(tmp.path(), name, &experiment(&data, &format!("{augment}\n{speed}")));
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        seen.push((name, results(&dir)));
    }
    for (name, r) in &seen[1..] {
        assert!(r == &seen[0].1, "{name} differs from one worker: {} vs {}", r.0, seen[0].1 .0);
    }
    // Without augmentation the training split is cached too, and the numbers are those of
    // the streamed run; with augmentation they differ from both.
    let plain = |speed: &str| experiment(&data, &format!("train_transform = \"resize-center-crop\"\n{speed}"));
    let (out, streamed) = run(tmp.path(), "plain-streamed", &plain("cache = \"off\""));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (out, cached) = run(tmp.path(), "plain-cached", &plain("cache = \"on\""));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(results(&streamed) == results(&cached), "the cache changed a result");
    assert!(results(&streamed) != seen[0].1, "augmentation changed nothing");
}

#[test]
fn a_training_image_damaged_past_its_header_fails_by_name_or_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let bad = tmp.path().join("img1.png");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let (out, dir) = run(tmp.path(), "fails", &experiment(&data, "cache = \"off\""));
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("img1.png") && e.contains("task `a`") && e.contains("on_error"), "{e}");
    assert!(!dir.join("checkpoints/task-01.safetensors").exists(), "nothing of the task is saved");

    let skip =
        experiment(&data, "cache = \"off\"").replace("source = \"jsonl\"", "source = \"jsonl\"\non_error = \"skip\"");
    let (out, dir) = run(tmp.path(), "skips", &skip);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = std::fs::read_to_string(dir.join("log.txt")).unwrap();
    assert!(log.contains("skipping") && log.contains("img1.png"), "{log}");
}

/// The same data as WebDataset shards (written by `recall data prepare --to-webdataset`):
/// training on them gives exactly the numbers of the JSONL manifest they came from.
#[test]
fn webdataset_shards_train_exactly_as_the_manifest_they_were_written_from() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let shards = tmp.path().join("shards");
    let out = Command::new(recall_bin())
        .args(["data", "prepare", "--source", "jsonl", "--path"])
        .arg(&data)
        .arg("--to-webdataset")
        .arg(&shards)
        .args(["--shard-size", "10"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("wrote 5 shards") && said.contains("40 train, 8 test"), "{said}");
    assert!(shards.join("train/data-000003.tar").is_file() && shards.join("test/data-000000.tar").is_file());

    let (out, from_manifest) = run(tmp.path(), "manifest", &experiment(&data, "cache = \"off\""));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let wds = |path: &str, extra: &str| {
        experiment(&data, "cache = \"off\"")
            .replace("source = \"jsonl\"", &format!("source = \"webdataset\"{extra}"))
            .replace(&format!("path = \"{}\"", data.display()), &format!("path = \"{path}\""))
    };
    let (out, from_shards) = run(tmp.path(), "shards", &wds(&shards.display().to_string(), ""));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(results(&from_manifest) == results(&from_shards), "the shards train differently");
    let splits = std::fs::read_to_string(from_shards.join("splits.json")).unwrap();
    assert!(splits.contains("data-000000.tar:000000001.png"), "examples are named by shard and key");

    // A shard-ordered epoch through a buffer, with a set epoch length: trains, and the
    // schedule counts the epoch's samples (30 per epoch at batch 16: 2 steps, 2 epochs).
    let (out, buffered) = run(
        tmp.path(),
        "buffered",
        &wds(&shards.display().to_string(), "\nshuffle_buffer = 6\nsamples_per_epoch = 30"),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(buffered.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 4, "{summary}");

    // An empty glob is an error at the key, before anything runs.
    let pattern = format!("{}/train/none-*.tar", shards.display());
    let (out, _) = run(tmp.path(), "empty-glob", &wds(&pattern, ""));
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("empty-glob.toml:") && e.contains("none-*.tar") && e.contains("matches no shard"), "{e}");
    // A shard that is not a tar names the shard.
    let bogus = tmp.path().join("bogus.tar");
    std::fs::write(&bogus, "not a tar archive, only text that happens to be long enough. ".repeat(20)).unwrap();
    let (out, _) = run(tmp.path(), "not-a-tar", &wds(&bogus.display().to_string(), ""));
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("bogus.tar") && e.contains("not a readable tar"), "{e}");
}
