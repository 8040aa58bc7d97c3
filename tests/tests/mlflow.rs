//! MLflow tracking against a real `mlflow server` (PyPI mlflow 3.17.0, installed once into
//! `$RECALL_HOME/tools/` by the first test that needs it, sqlite backend, loopback only): a
//! sweep appears as one parent run with nested children carrying params, metric histories and
//! artifacts; a server outage mid-run loses nothing, and `recall sync` sends every metric
//! exactly once.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use recall_tests::{recall_bin, SMALL_EXPERIMENT};

const MLFLOW: &str = "3.17.0";

/// The mlflow executable, installing it into a venv under RECALL_HOME the first time (a
/// venv cannot move, so it is built in place; `installed` marks a complete one).
fn mlflow_bin() -> PathBuf {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let venv = recall_host::fetch::recall_home().join("tools").join(format!("mlflow-{MLFLOW}"));
    let bin = venv.join("bin").join("mlflow");
    if venv.join("installed").is_file() {
        return bin;
    }
    let _ = std::fs::remove_dir_all(&venv);
    std::fs::create_dir_all(venv.parent().unwrap()).unwrap();
    let ok = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "python3 -m venv failed: the MLflow tests need python3 with venv");
    let ok = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", &format!("mlflow=={MLFLOW}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "pip install mlflow=={MLFLOW} failed");
    std::fs::write(venv.join("installed"), MLFLOW).unwrap();
    bin
}

struct Server {
    child: Child,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Server {
    fn start(dir: &Path, port: u16) -> Server {
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new(mlflow_bin())
            .args(["server", "--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.join("db.sqlite").display()))
            .arg("--artifacts-destination")
            .arg(dir.join("artifacts"))
            .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("server-{port}.log"))).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        let s = Server { child, port };
        let start = Instant::now();
        while get(&s.url("/health")).is_none() {
            assert!(start.elapsed() < Duration::from_secs(90), "mlflow server did not start: see {}", dir.display());
            std::thread::sleep(Duration::from_millis(250));
        }
        s
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn stop(&mut self) {
        // The server runs worker processes: stop the whole group.
        let _ = Command::new("kill")
            .args(["-s", "TERM", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
        let start = Instant::now();
        while get(&self.url("/health")).is_some() && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

fn get(url: &str) -> Option<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
    agent.get(url).call().ok().and_then(|mut r| r.body_mut().read_to_string().ok())
}

fn api(s: &Server, endpoint: &str, body: serde_json::Value) -> serde_json::Value {
    recall_host::tracking::MlflowClient::new(&s.url("")).post(endpoint, &body).unwrap()
}

fn api_get(s: &Server, endpoint: &str, query: &[(&str, &str)]) -> serde_json::Value {
    recall_host::tracking::MlflowClient::new(&s.url("")).get(endpoint, query).unwrap()
}

fn tags(run: &serde_json::Value) -> std::collections::HashMap<String, String> {
    run["data"]["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| (t["key"].as_str().unwrap().to_string(), t["value"].as_str().unwrap().to_string()))
        .collect()
}

fn history(s: &Server, run_id: &str, key: &str) -> Vec<u64> {
    let h = api_get(s, "metrics/get-history", &[("run_id", run_id), ("metric_key", key)]);
    let mut steps: Vec<u64> =
        h["metrics"].as_array().into_iter().flatten().map(|m| m["step"].as_u64().unwrap()).collect();
    steps.sort();
    steps
}

fn experiment(port: u16, extra: &str) -> String {
    format!(
        "{SMALL_EXPERIMENT}\n[[task]]\nname = \"b\"\nshapes = [\"cross\", \"ring\"]\ncolors = [\"red\", \"blue\"]\n\n\
         [tracking]\nbackend = \"mlflow\"\nuri = \"http://127.0.0.1:{port}\"\n{extra}"
    )
}

#[test]
fn a_sweep_is_one_parent_run_with_nested_children() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("mlflow"), free_port());
    let text = experiment(
        server.port,
        "[tracking.tags]\nbaseline = \"lr=0.001\"\n\n[sweep]\nname = \"lr\"\n[sweep.axes]\n\"optimizer.lr\" = [0.001, 0.0003]\n",
    );
    std::fs::write(tmp.path().join("s.toml"), text).unwrap();
    let out = Command::new(recall_bin())
        .args(["sweep", "-q", "s.toml", "--jobs", "2"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let exp = api_get(&server, "experiments/get-by-name", &[("experiment_name", "lr")]);
    let exp_id = exp["experiment"]["experiment_id"].as_str().unwrap().to_string();
    let runs = api(&server, "runs/search", serde_json::json!({"experiment_ids": [exp_id]}));
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "one parent and two children: {runs:#?}");
    let parent = runs.iter().find(|r| r["info"]["run_name"] == "lr").expect("the parent run");
    let parent_id = parent["info"]["run_id"].as_str().unwrap();
    let children: Vec<&serde_json::Value> = runs.iter().filter(|r| r["info"]["run_name"] != "lr").collect();
    for child in &children {
        let t = tags(child);
        assert_eq!(t.get("mlflow.parentRunId").map(String::as_str), Some(parent_id));
        assert_eq!(t.get("baseline").map(String::as_str), Some("lr=0.001"));
        assert!(t.get("method").unwrap().starts_with("optimizer.lr="), "{t:?}");
        // A child is named by its label and seed (its directory is a hash); MLflow's system
        // tags are set.
        let name = child["info"]["run_name"].as_str().unwrap();
        let seed = name.rsplit_once(" seed").map(|(_, s)| s.to_string()).unwrap_or_default();
        assert!(
            name.starts_with("optimizer.lr=") && Some(seed.as_str()) == t.get("seed").map(String::as_str),
            "{name}"
        );
        for system in ["mlflow.source.git.commit", "mlflow.source.name", "mlflow.user"] {
            assert!(t.get(system).is_some_and(|v| !v.is_empty()), "{system} missing: {t:?}");
        }
        assert!(t.contains_key("git_commit") && t.contains_key("seed"));
        assert_eq!(child["info"]["status"], "FINISHED");
        let params: std::collections::HashMap<&str, &str> = child["data"]["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["key"].as_str().unwrap(), p["value"].as_str().unwrap()))
            .collect();
        assert!(["0.001", "0.0003"].contains(&params["optimizer.lr"]), "{params:?}");
        assert_eq!(params["model.vision.width"], "32");
        let id = child["info"]["run_id"].as_str().unwrap();
        // Metrics per stage: before training, after task a, after task b.
        assert_eq!(history(&server, id, "a/retrieval/i2t_r1"), vec![0, 1, 2]);
        assert_eq!(history(&server, id, "continual/retrieval/i2t_r1/bwt"), vec![2]);
        assert_eq!(history(&server, id, "continual/retrieval/i2t_r1/transfer"), vec![2]);
        // Chance levels apart from the scores; training telemetry at global steps.
        assert_eq!(history(&server, id, "chance/a/retrieval/i2t_r1"), vec![0, 1, 2]);
        assert!(history(&server, id, "a/retrieval/i2t_r1_chance").is_empty());
        let train = history(&server, id, "train/loss");
        assert!(!train.is_empty() && train.windows(2).all(|w| w[0] < w[1]), "{train:?}");
        assert_eq!(history(&server, id, "train/lr"), train);
        let files = api_get(&server, "artifacts/list", &[("run_id", id)]);
        let names: Vec<&str> = files["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
        for f in ["summary.json", "config.resolved.toml", "log.txt", "run.json", "plugins.json"] {
            assert!(names.contains(&f), "{f} not uploaded: {names:?}");
        }
    }
    assert_eq!(parent["info"]["status"], "FINISHED");
    // The parent carries the sweep's manifest and comparison report.
    let files = api_get(&server, "artifacts/list", &[("run_id", parent_id)]);
    let names: Vec<&str> = files["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    for f in ["sweep.json", "compare.md", "compare.html"] {
        assert!(names.contains(&f), "{names:?}");
    }
}

#[test]
fn an_outage_mid_run_loses_nothing_and_sync_sends_each_metric_once() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = Server::start(&tmp.path().join("mlflow"), port);
    // Long enough that the server goes away mid-run however fast the step is.
    let text = experiment(port, "").replace("epochs = 1", "epochs = 12")
        + "\n[[task]]\nname = \"c\"\nshapes = [\"triangle\", \"diamond\"]\ncolors = [\"green\", \"yellow\"]\n";
    std::fs::write(tmp.path().join("o.toml"), text).unwrap();
    let run = tmp.path().join("run");
    let child = Command::new(recall_bin())
        .args(["run", "-q", "o.toml", "--run-dir"])
        .arg(&run)
        .current_dir(tmp.path())
        .env("MLFLOW_TRACKING_TOKEN", "secret-token-value")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let the run create its MLflow run, then take the server away.
    let start = Instant::now();
    while recall_host::tracking::run_id(&run).is_none() {
        assert!(start.elapsed() < Duration::from_secs(60), "the run never reached the server");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.stop();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the run must go on without its tracker: {stderr}");
    assert!(stderr.contains("recall sync"), "the outage is reported with what to do: {stderr}");
    // Credentials are read from the environment and never written.
    for f in ["tracking/events.jsonl", "tracking/mlflow.json", "config.resolved.toml", "log.txt", "run.json"] {
        let text = std::fs::read_to_string(run.join(f)).unwrap_or_default();
        assert!(!text.contains("secret-token-value"), "{f} holds the token");
    }

    let server = Server::start(&tmp.path().join("mlflow"), port);
    let sync = |expect_zero: bool| {
        let out = Command::new(recall_bin()).arg("sync").arg(&run).current_dir(tmp.path()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(text.contains(": 0 events sent"), expect_zero, "{text}");
    };
    sync(false);
    sync(true);
    let id = recall_host::tracking::run_id(&run).unwrap();
    for key in ["a/retrieval/i2t_r1", "c/retrieval/t2i_r1"] {
        assert_eq!(history(&server, &id, key), vec![0, 1, 2, 3], "{key}: every stage exactly once");
    }
    let r = api_get(&server, "runs/get", &[("run_id", &id)]);
    assert_eq!(r["run"]["info"]["status"], "FINISHED");
}

#[test]
fn mlflow_tracking_uri_alone_tracks_and_the_run_says_where() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("mlflow"), free_port());
    std::fs::write(tmp.path().join("e.toml"), SMALL_EXPERIMENT).unwrap();
    let uri = format!("http://127.0.0.1:{}", server.port);
    let out = Command::new(recall_bin())
        .args(["run", "e.toml", "--run-dir", "run"])
        .current_dir(tmp.path())
        .env("MLFLOW_TRACKING_URI", &uri)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first = stdout.lines().find(|l| l.starts_with("tracking:")).unwrap_or_default();
    assert!(first.contains(&format!("MLflow at {uri}")), "{stdout}");
    let id = recall_host::tracking::run_id(&tmp.path().join("run")).expect("an MLflow run was created");
    let r = api_get(&server, "runs/get", &[("run_id", &id)]);
    assert_eq!(r["run"]["info"]["status"], "FINISHED");
    assert!(!history(&server, &id, "train/loss").is_empty());
    // Without the variable, the run says it keeps its events locally.
    let out = Command::new(recall_bin())
        .args(["run", "e.toml", "--run-dir", "local"])
        .current_dir(tmp.path())
        .env_remove("MLFLOW_TRACKING_URI")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("tracking: the run directory's event log only"), "{stdout}");
}
