//! Experiment tracking. The run directory is always the record (the local run store); an
//! `[tracking]` section adds MLflow. Every tracking event is first appended to
//! `RUN_DIR/tracking/events.jsonl`, then sent; what was sent is remembered in
//! `tracking/mlflow.json`, so an unreachable server never stops a run, and `recall sync
//! RUN_DIR` later sends what is missing exactly once (each event is sent once, metrics carry
//! the timestamp of their event).
//!
//! MLflow is spoken to through its documented REST API with one blocking HTTP agent:
//! `experiments/get-by-name|create`, `runs/create`, `runs/log-batch` (up to 1,000 metrics per
//! request), `runs/update`, and artifact uploads through `mlflow-artifacts`. Credentials come
//! only from the environment (`MLFLOW_TRACKING_TOKEN`, or `MLFLOW_TRACKING_USERNAME` and
//! `MLFLOW_TRACKING_PASSWORD`) and are never written anywhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;

/// The `[tracking]` section.
#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct TrackingSection {
    /// `mlflow` (the local run store is always on).
    pub backend: String,
    /// Tracking server, e.g. `http://127.0.0.1:5000`; default `MLFLOW_TRACKING_URI`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// MLflow experiment (default: the experiment's name, or the sweep's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    /// Extra tags on every run (e.g. `baseline = "finetune"`).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub tags: toml::Table,
}

impl TrackingSection {
    pub fn uri(&self) -> anyhow::Result<String> {
        match self.uri.clone().or_else(|| std::env::var("MLFLOW_TRACKING_URI").ok()) {
            Some(u) => Ok(u.trim_end_matches('/').to_string()),
            None => bail!("[tracking] names no `uri` and MLFLOW_TRACKING_URI is not set"),
        }
    }
}

/// One tracking event, in the order it happened.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// Create the run: its MLflow experiment, name, tags and params.
    Start {
        experiment: String,
        name: String,
        tags: Vec<(String, String)>,
        params: Vec<(String, String)>,
        time_ms: u64,
    },
    Metrics {
        metrics: Vec<(String, f64, u64)>,
        time_ms: u64,
    },
    /// A file of the run directory to upload (path relative to it).
    Artifact {
        path: String,
    },
    End {
        status: String,
        time_ms: u64,
    },
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What has reached the server.
#[derive(Serialize, Deserialize, Default, Debug)]
struct SyncState {
    uri: String,
    experiment_id: Option<String>,
    run_id: Option<String>,
    /// Events `[0, sent)` are on the server.
    sent: usize,
}

fn events_file(run_dir: &Path) -> PathBuf {
    run_dir.join("tracking").join("events.jsonl")
}

fn state_file(run_dir: &Path) -> PathBuf {
    run_dir.join("tracking").join("mlflow.json")
}

/// Append an event to the run's event log (the whole file is rewritten atomically).
pub fn record(run_dir: &Path, event: &Event) -> anyhow::Result<()> {
    let f = events_file(run_dir);
    let mut text = std::fs::read_to_string(&f).unwrap_or_default();
    text.push_str(&serde_json::to_string(event)?);
    text.push('\n');
    write_atomic(&f, text.as_bytes())
}

fn read_events(run_dir: &Path) -> anyhow::Result<Vec<Event>> {
    let f = events_file(run_dir);
    let text = std::fs::read_to_string(&f).with_context(|| format!("{} has no tracking events", run_dir.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}", f.display(), i + 1)))
        .collect()
}

/// A blocking MLflow REST client.
pub struct MlflowClient {
    base: String,
    agent: ureq::Agent,
    auth: Option<String>,
}

impl MlflowClient {
    pub fn new(uri: &str) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build();
        let auth = match std::env::var("MLFLOW_TRACKING_TOKEN") {
            Ok(t) if !t.is_empty() => Some(format!("Bearer {t}")),
            _ => match (std::env::var("MLFLOW_TRACKING_USERNAME"), std::env::var("MLFLOW_TRACKING_PASSWORD")) {
                (Ok(u), Ok(p)) => {
                    use base64::Engine;
                    Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))))
                }
                _ => None,
            },
        };
        MlflowClient { base: uri.trim_end_matches('/').to_string(), agent: config.into(), auth }
    }

    fn check(&self, what: &str, mut r: ureq::http::Response<ureq::Body>) -> anyhow::Result<serde_json::Value> {
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        if !(200..300).contains(&status) {
            bail!("MLflow {what} at {}: HTTP {status}: {}", self.base, text.chars().take(300).collect::<String>());
        }
        Ok(if text.trim().is_empty() { serde_json::Value::Null } else { serde_json::from_str(&text)? })
    }

    pub fn post(&self, endpoint: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let mut req = self.agent.post(format!("{}/api/2.0/mlflow/{endpoint}", self.base));
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let r = req.send_json(body).with_context(|| format!("cannot reach the MLflow server at {}", self.base))?;
        self.check(endpoint, r)
    }

    pub fn get(&self, endpoint: &str, query: &[(&str, &str)]) -> anyhow::Result<serde_json::Value> {
        let mut req = self.agent.get(format!("{}/api/2.0/mlflow/{endpoint}", self.base));
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let r = req.call().with_context(|| format!("cannot reach the MLflow server at {}", self.base))?;
        self.check(endpoint, r)
    }

    /// The experiment's id, creating it if needed.
    pub fn experiment_id(&self, name: &str) -> anyhow::Result<String> {
        let mut req = self.agent.get(format!("{}/api/2.0/mlflow/experiments/get-by-name", self.base));
        req = req.query("experiment_name", name);
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let mut r = req.call().with_context(|| format!("cannot reach the MLflow server at {}", self.base))?;
        if r.status().as_u16() == 404 {
            let _ = r.body_mut().read_to_string();
            let v = self.post("experiments/create", &serde_json::json!({ "name": name }))?;
            return v["experiment_id"].as_str().map(String::from).context("experiments/create returned no id");
        }
        let v = self.check("experiments/get-by-name", r)?;
        v["experiment"]["experiment_id"].as_str().map(String::from).context("experiments/get-by-name returned no id")
    }

    pub fn create_run(
        &self,
        experiment_id: &str,
        name: &str,
        tags: &[(String, String)],
        time_ms: u64,
    ) -> anyhow::Result<String> {
        let tags: Vec<serde_json::Value> =
            tags.iter().map(|(k, v)| serde_json::json!({"key": k, "value": v})).collect();
        let v = self.post(
            "runs/create",
            &serde_json::json!({"experiment_id": experiment_id, "run_name": name, "start_time": time_ms, "tags": tags}),
        )?;
        v["run"]["info"]["run_id"].as_str().map(String::from).context("runs/create returned no run id")
    }

    /// Params (100 per request) and metrics (1,000 per request) through `runs/log-batch`.
    pub fn log_batch(
        &self,
        run_id: &str,
        params: &[(String, String)],
        metrics: &[(String, f64, u64)],
        time_ms: u64,
    ) -> anyhow::Result<()> {
        for chunk in params.chunks(100) {
            let params: Vec<serde_json::Value> = chunk
                .iter()
                .map(|(k, v)| serde_json::json!({"key": k, "value": v.chars().take(6000).collect::<String>()}))
                .collect();
            self.post("runs/log-batch", &serde_json::json!({"run_id": run_id, "params": params}))?;
        }
        for chunk in metrics.chunks(1000) {
            let metrics: Vec<serde_json::Value> = chunk
                .iter()
                .map(|(k, v, step)| serde_json::json!({"key": k, "value": v, "timestamp": time_ms, "step": step}))
                .collect();
            self.post("runs/log-batch", &serde_json::json!({"run_id": run_id, "metrics": metrics}))?;
        }
        Ok(())
    }

    pub fn upload(&self, experiment_id: &str, run_id: &str, rel: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let url = format!("{}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/artifacts/{rel}", self.base);
        let mut req = self.agent.put(url);
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let r = req.send(bytes).with_context(|| format!("cannot reach the MLflow server at {}", self.base))?;
        self.check("artifact upload", r).map(|_| ())
    }

    pub fn end_run(&self, run_id: &str, status: &str, time_ms: u64) -> anyhow::Result<()> {
        self.post("runs/update", &serde_json::json!({"run_id": run_id, "status": status, "end_time": time_ms}))
            .map(|_| ())
    }
}

/// Send every event of `run_dir` that has not reached the server; returns how many were sent.
pub fn sync(run_dir: &Path, uri: &str) -> anyhow::Result<usize> {
    let events = read_events(run_dir)?;
    let sf = state_file(run_dir);
    let mut state: SyncState = std::fs::read_to_string(&sf)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| SyncState { uri: uri.to_string(), ..Default::default() });
    if state.run_id.is_some() && state.uri != uri {
        bail!("{} was tracked on {}, not {uri}; sync it there", run_dir.display(), state.uri);
    }
    state.uri = uri.to_string();
    let client = MlflowClient::new(uri);
    let mut sent = 0;
    for (i, e) in events.iter().enumerate().skip(state.sent) {
        match e {
            Event::Start { experiment, name, tags, params, time_ms } => {
                // A retried start must not create a second run: create once, remember it
                // before anything else can fail, then log the (immutable) params.
                if state.run_id.is_none() {
                    let exp = client.experiment_id(experiment)?;
                    let run = client.create_run(&exp, name, tags, *time_ms)?;
                    state.experiment_id = Some(exp);
                    state.run_id = Some(run);
                    write_atomic(&sf, serde_json::to_string_pretty(&state)?.as_bytes())?;
                }
                let run = state.run_id.clone().expect("set above");
                client.log_batch(&run, params, &[], *time_ms)?;
            }
            Event::Metrics { metrics, time_ms } => {
                let run = state.run_id.as_deref().context("metrics before the run was created")?;
                client.log_batch(run, &[], metrics, *time_ms)?;
            }
            Event::Artifact { path } => {
                let (exp, run) = (
                    state.experiment_id.as_deref().context("artifact before the run was created")?,
                    state.run_id.as_deref().context("artifact before the run was created")?,
                );
                let bytes = std::fs::read(run_dir.join(path)).with_context(|| format!("artifact {path}"))?;
                client.upload(exp, run, path, &bytes)?;
            }
            Event::End { status, time_ms } => {
                let run = state.run_id.as_deref().context("end before the run was created")?;
                client.end_run(run, status, *time_ms)?;
            }
        }
        state.sent = i + 1;
        sent += 1;
        write_atomic(&sf, serde_json::to_string_pretty(&state)?.as_bytes())?;
    }
    Ok(sent)
}

/// The MLflow run id of a tracked run directory, once created.
pub fn run_id(run_dir: &Path) -> Option<String> {
    std::fs::read_to_string(state_file(run_dir))
        .ok()
        .and_then(|t| serde_json::from_str::<SyncState>(&t).ok())
        .and_then(|s| s.run_id)
}

/// Flatten a TOML value into `a.b.0.c = value` params (MLflow keys allow no brackets).
pub fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        toml::Value::Array(a) if a.iter().all(|x| x.is_table()) && !a.is_empty() => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}.{i}"), v, out);
            }
        }
        toml::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// Send what is pending, warning instead of failing: the run goes on without the tracker.
pub fn sync_or_warn(run_dir: &Path, uri: &str) {
    if let Err(e) = sync(run_dir, uri) {
        tracing::warn!(
            "tracking: {e:#}; the events stay in {} and `recall sync {}` sends them later",
            events_file(run_dir).display(),
            run_dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_names_nested_keys() {
        let v: toml::Value = toml::from_str("a = 1\n[b]\nc = \"x\"\n[[t]]\nn = 2\n[[t]]\nn = 3\n").unwrap();
        let mut out = Vec::new();
        flatten("", &v, &mut out);
        assert_eq!(
            out,
            vec![
                ("a".into(), "1".into()),
                ("b.c".into(), "x".into()),
                ("t.0.n".into(), "2".into()),
                ("t.1.n".into(), "3".into())
            ]
        );
    }
}
