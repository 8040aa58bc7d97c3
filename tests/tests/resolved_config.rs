//! Plugin defaults reach the run's records: each plugin reports its section as it resolves
//! it, and config.resolved.toml, the tracked params and the identity a resume checks hold
//! every default, while the sections the plugins receive stay as written.

use std::process::Command;

use recall_tests::{recall_bin, SMALL_EXPERIMENT};

fn experiment() -> String {
    format!(
        "{SMALL_EXPERIMENT}
[adapter]
plugin = \"lora\"
rank = 4
targets = [\"vision.*\"]

[[strategy]]
plugin = \"der\"
memory = 6
"
    )
}

#[test]
fn config_resolved_toml_params_and_identity_hold_every_plugin_default() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("e.toml");
    std::fs::write(&file, experiment()).unwrap();
    let dir = tmp.path().join("run");
    let out = Command::new(recall_bin()).args(["run", "-q"]).arg(&file).arg("--run-dir").arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let resolved: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join("config.resolved.toml")).unwrap()).unwrap();
    let adapter = resolved["adapter"].as_table().unwrap();
    assert_eq!(adapter["rank"].as_integer(), Some(4), "a written key keeps its value");
    assert_eq!(adapter["rslora"].as_bool(), Some(false), "{adapter:?}");
    let vision = resolved["model"]["vision"].as_table().unwrap();
    assert!(vision["layer_norm_eps"].as_float().is_some(), "{vision:?}");
    let der = resolved["strategy"][0].as_table().unwrap();
    assert_eq!((der["alpha"].as_float(), der["beta"].as_float()), (Some(0.1), Some(0.5)), "{der:?}");
    assert_eq!(der["policy"].as_str(), Some("reservoir"));

    let identity: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.identity.json")).unwrap()).unwrap();
    assert_eq!(identity["keys"]["adapter.rslora"], "false");
    let defaults: Vec<&str> = identity["defaults"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(defaults.contains(&"adapter.rslora") && !defaults.contains(&"adapter.rank"), "{defaults:?}");
    let events = std::fs::read_to_string(dir.join("tracking/events.jsonl")).unwrap();
    let start: serde_json::Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    assert!(start["params"].as_array().unwrap().iter().any(|p| p[0] == "strategy.0.alpha"), "{start}");

    // The resolved file is itself a valid experiment: every default the plugins wrote back
    // is accepted by the same plugins.
    let out =
        Command::new(recall_bin()).args(["run", "--dry-run"]).arg(dir.join("config.resolved.toml")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A resume of the finished run sees no change.
    let out = Command::new(recall_bin()).args(["run", "-q", "--resume"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
