//! Experiment tracking behind one trait, [`Tracker`]. Every tracking event of a run is first
//! appended to its write-ahead log, `RUN_DIR/tracking/events.jsonl` (the [`LocalStore`], always
//! on); every other tracker delivers from that log and remembers how far it got. So an
//! unreachable server never stops a run, and `recall sync RUN_DIR` later delivers what is
//! missing exactly once (metrics carry the timestamp of their event, not of the upload).
//!
//! [`Mlflow`] speaks MLflow's documented REST API with one blocking HTTP agent:
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
    /// `local` (the run directory only) or `mlflow` (and the run directory: it is always on).
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

/// The environment variable that names an MLflow server, as MLflow's own clients read it.
pub const MLFLOW_URI_VAR: &str = "MLFLOW_TRACKING_URI";

impl TrackingSection {
    /// The tracking a run gets: its `[tracking]` section, or, without one, MLflow at
    /// `MLFLOW_TRACKING_URI` when that is set (as MLflow's own clients do); `None`: the
    /// run directory's event log only.
    pub fn effective(section: Option<&TrackingSection>) -> Option<TrackingSection> {
        match section {
            Some(t) => Some(t.clone()),
            None => std::env::var(MLFLOW_URI_VAR).ok().filter(|u| !u.trim().is_empty()).map(|uri| TrackingSection {
                backend: "mlflow".into(),
                uri: Some(uri),
                experiment: None,
                tags: toml::Table::new(),
            }),
        }
    }

    /// Where events go, for the run's first lines: `mlflow at URI (experiment E)`.
    pub fn describe(&self, experiment: &str) -> String {
        match self.backend.as_str() {
            "mlflow" => format!(
                "MLflow at {} (experiment `{}`), and the run directory's event log",
                self.uri().map(|u| redact(&u)).unwrap_or_else(|e| format!("? ({e})")),
                self.experiment.as_deref().unwrap_or(experiment)
            ),
            _ => "the run directory's event log only".into(),
        }
    }

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

/// A destination for a run's tracking events. Events are numbered by their place in the run's
/// log; a tracker is handed them in order, each exactly once across processes, so it must
/// persist what it has delivered before returning.
pub trait Tracker {
    /// Name for messages (`mlflow`, `local`).
    fn name(&self) -> &str;
    /// How many of the log's events this tracker holds already.
    fn delivered(&self) -> usize;
    /// Take event number `index` (always `self.delivered()`), then count it as delivered.
    fn deliver(&mut self, index: usize, event: &Event) -> anyhow::Result<()>;
}

fn events_file(run_dir: &Path) -> PathBuf {
    run_dir.join("tracking").join("events.jsonl")
}

/// The local run store: the append-only event log in the run directory. It is the write-ahead
/// record every other tracker delivers from.
pub struct LocalStore {
    file: PathBuf,
    count: usize,
}

impl LocalStore {
    pub fn open(run_dir: &Path) -> anyhow::Result<Self> {
        let file = events_file(run_dir);
        let count = if file.is_file() { read_log(&file)?.len() } else { 0 };
        Ok(LocalStore { file, count })
    }

    /// Every event of the log, in order.
    pub fn events(&self) -> anyhow::Result<Vec<Event>> {
        if self.file.is_file() {
            read_log(&self.file)
        } else {
            Ok(Vec::new())
        }
    }

    fn append(&mut self, event: &Event) -> anyhow::Result<()> {
        let index = self.count;
        self.deliver(index, event)
    }
}

impl Tracker for LocalStore {
    fn name(&self) -> &str {
        "local"
    }

    fn delivered(&self) -> usize {
        self.count
    }

    /// One `write` of one whole line in append mode, flushed to disk: a crash can leave at
    /// most a torn last line, which [`read_log`] drops (its event was never delivered anywhere).
    fn deliver(&mut self, index: usize, event: &Event) -> anyhow::Result<()> {
        use std::io::Write;
        debug_assert_eq!(index, self.count);
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut line = serde_json::to_string(event)?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file)
            .with_context(|| format!("cannot open {}", self.file.display()))?;
        f.write_all(line.as_bytes())
            .and_then(|_| f.sync_data())
            .with_context(|| format!("cannot append to {}", self.file.display()))?;
        self.count += 1;
        Ok(())
    }
}

/// The events of a log; a torn last line (a crash mid-append) is dropped with a warning.
fn read_log(file: &Path) -> anyhow::Result<Vec<Event>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let complete = text.ends_with('\n') || text.is_empty();
    let lines: Vec<&str> = text.lines().collect();
    let mut events = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(l) {
            Ok(e) => events.push(e),
            Err(_) if i + 1 == lines.len() && !complete => {
                tracing::warn!("{}:{}: dropping a torn last event", file.display(), i + 1);
            }
            Err(e) => bail!("{}:{}: not a tracking event: {e}", file.display(), i + 1),
        }
    }
    Ok(events)
}

/// A run's trackers: the local store, then the configured remote ones.
pub struct Tracking {
    run_dir: PathBuf,
    local: LocalStore,
    remote: Vec<Box<dyn Tracker>>,
}

impl Tracking {
    /// The trackers `section` asks for (none: the local store alone).
    pub fn open(run_dir: &Path, section: Option<&TrackingSection>) -> anyhow::Result<Self> {
        let mut remote: Vec<Box<dyn Tracker>> = Vec::new();
        if let Some(t) = section {
            match t.backend.as_str() {
                "local" => {}
                "mlflow" => remote.push(Box::new(Mlflow::open(run_dir, &t.uri()?)?)),
                other => bail!("unknown tracking backend `{other}`; available: local, mlflow"),
            }
        }
        Ok(Tracking { run_dir: run_dir.to_path_buf(), local: LocalStore::open(run_dir)?, remote })
    }

    /// Whether any tracker beyond the local store is configured.
    pub fn has_remote(&self) -> bool {
        !self.remote.is_empty()
    }

    /// Append `event` to the log, then deliver what is pending to every remote tracker,
    /// warning instead of failing: the run goes on without them.
    pub fn log(&mut self, event: Event) -> anyhow::Result<()> {
        self.local.append(&event)?;
        self.flush();
        Ok(())
    }

    /// Append without delivering (the next [`Tracking::log`] or [`Tracking::flush`] sends it).
    pub fn record(&mut self, event: Event) -> anyhow::Result<()> {
        self.local.append(&event)
    }

    /// Deliver what is pending to every remote tracker, warning on failure.
    pub fn flush(&mut self) {
        if self.remote.is_empty() {
            return;
        }
        let events = match self.local.events() {
            Ok(e) => e,
            Err(e) => return tracing::warn!("tracking: {e:#}"),
        };
        for r in &mut self.remote {
            if let Err(e) = deliver_pending(&events, r.as_mut()) {
                tracing::warn!(
                    "tracking ({}): {e:#}; the events stay in {} and `recall sync {}` sends them later",
                    r.name(),
                    events_file(&self.run_dir).display(),
                    self.run_dir.display()
                );
            }
        }
    }

    /// How many stage events the log holds (metric events before any end, the records made
    /// inside tasks aside: a run logs one per stage).
    pub fn stages_logged(&self) -> anyhow::Result<usize> {
        Ok(self
            .local
            .events()?
            .iter()
            .take_while(|e| !matches!(e, Event::End { .. }))
            .filter(|e| matches!(e, Event::Metrics { metrics, .. } if !is_in_task(metrics)))
            .count())
    }

    /// Whether the log already holds events (a resumed run or sweep).
    pub fn is_started(&self) -> bool {
        self.local.delivered() > 0
    }
}

/// Whether a metrics event was recorded inside a task (training telemetry, `train/...`, or
/// validation scores, `val/...`) rather than being a stage's scores.
fn is_in_task(metrics: &[(String, f64, u64)]) -> bool {
    metrics.first().is_some_and(|(k, _, _)| k.starts_with("train/") || k.starts_with("val/"))
}

/// Hand `tracker` every event of `events` it does not hold yet; returns how many it took.
pub fn deliver_pending(events: &[Event], tracker: &mut dyn Tracker) -> anyhow::Result<usize> {
    let from = tracker.delivered();
    if from > events.len() {
        bail!("{} holds {from} events but the log has only {}; was the log replaced?", tracker.name(), events.len());
    }
    for (i, e) in events.iter().enumerate().skip(from) {
        tracker.deliver(i, e)?;
    }
    Ok(events.len() - from)
}

/// A blocking MLflow REST client.
/// The userinfo of a URL (`scheme://user:password@host`), where one is: its byte range in
/// `url` and the text.
fn userinfo(url: &str) -> Option<(std::ops::Range<usize>, &str)> {
    let start = url.find("://")? + 3;
    let authority_end = url[start..].find(['/', '?', '#', ' ', '"', '\'']).map_or(url.len(), |e| start + e);
    let at = url[start..authority_end].rfind('@')? + start;
    Some((start..at + 1, &url[start..at]))
}

/// `uri` without credentials, and the credentials (`user`, `password`) it carried.
pub fn split_credentials(uri: &str) -> (String, Option<(String, String)>) {
    match userinfo(uri) {
        None => (uri.to_string(), None),
        Some((range, info)) => {
            let (user, password) = info.split_once(':').unwrap_or((info, ""));
            let mut bare = uri.to_string();
            bare.replace_range(range, "");
            // `***` is what `redact` left in a saved config: the credentials are not known.
            let credentials = (info != "***").then(|| (user.to_string(), password.to_string()));
            (bare, credentials)
        }
    }
}

/// `text` with the credentials of every URL in it replaced by `***`: what is logged, saved
/// or shown of a tracking URI, a command line or a config.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i);
        out.push_str(head);
        match userinfo(tail) {
            Some((range, _)) => {
                out.push_str(&tail[..range.start]);
                out.push_str("***@");
                rest = &tail[range.end..];
            }
            None => {
                out.push_str("://");
                rest = &tail[3..];
            }
        }
    }
    out.push_str(rest);
    out
}

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
        // Credentials in the URI authenticate like MLFLOW_TRACKING_USERNAME / _PASSWORD and
        // never appear in a message: `base` has none.
        let (base, in_uri) = split_credentials(uri);
        let basic = |u: &str, p: &str| {
            use base64::Engine;
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")))
        };
        let auth = match std::env::var("MLFLOW_TRACKING_TOKEN") {
            Ok(t) if !t.is_empty() => Some(format!("Bearer {t}")),
            _ => match (std::env::var("MLFLOW_TRACKING_USERNAME"), std::env::var("MLFLOW_TRACKING_PASSWORD")) {
                (Ok(u), Ok(p)) => Some(basic(&u, &p)),
                _ => in_uri.map(|(u, p)| basic(&u, &p)),
            },
        };
        MlflowClient { base: base.trim_end_matches('/').to_string(), agent: config.into(), auth }
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

/// What has reached an MLflow server, kept in `tracking/mlflow.json`.
#[derive(Serialize, Deserialize, Default, Debug)]
struct MlflowState {
    uri: String,
    experiment_id: Option<String>,
    run_id: Option<String>,
    /// Events `[0, sent)` are on the server.
    sent: usize,
}

fn mlflow_state_file(run_dir: &Path) -> PathBuf {
    run_dir.join("tracking").join("mlflow.json")
}

/// MLflow as a [`Tracker`]: one MLflow run per run directory.
pub struct Mlflow {
    run_dir: PathBuf,
    client: MlflowClient,
    state: MlflowState,
}

impl Mlflow {
    /// Resume delivery to `uri`; a run directory already tracked elsewhere is refused, so
    /// one run never ends up half on one server and half on another.
    pub fn open(run_dir: &Path, uri_with_credentials: &str) -> anyhow::Result<Self> {
        let uri = uri_with_credentials.trim_end_matches('/');
        let bare = split_credentials(uri).0;
        let sf = mlflow_state_file(run_dir);
        let mut state: MlflowState = match std::fs::read_to_string(&sf) {
            Ok(t) => serde_json::from_str(&t)
                .with_context(|| format!("{} is corrupt; delete it to upload the run again", sf.display()))?,
            Err(_) => MlflowState::default(),
        };
        if state.run_id.is_some() && state.uri != bare {
            bail!("{} was tracked on {}, not {bare}; sync it there", run_dir.display(), state.uri);
        }
        state.uri = bare;
        Ok(Mlflow { run_dir: run_dir.to_path_buf(), client: MlflowClient::new(uri), state })
    }

    fn save(&self) -> anyhow::Result<()> {
        write_atomic(&mlflow_state_file(&self.run_dir), serde_json::to_string_pretty(&self.state)?.as_bytes())
    }

    fn run(&self, what: &str) -> anyhow::Result<&str> {
        self.state.run_id.as_deref().with_context(|| format!("{what} before the run was created"))
    }
}

impl Tracker for Mlflow {
    fn name(&self) -> &str {
        "mlflow"
    }

    fn delivered(&self) -> usize {
        self.state.sent
    }

    fn deliver(&mut self, index: usize, event: &Event) -> anyhow::Result<()> {
        match event {
            Event::Start { experiment, name, tags, params, time_ms } => {
                // A retried start must not create a second run: create once, remember it
                // before anything else can fail, then log the (immutable) params.
                if self.state.run_id.is_none() {
                    let exp = self.client.experiment_id(experiment)?;
                    let run = self.client.create_run(&exp, name, tags, *time_ms)?;
                    self.state.experiment_id = Some(exp);
                    self.state.run_id = Some(run);
                    self.save()?;
                }
                self.client.log_batch(self.run("params")?, params, &[], *time_ms)?;
            }
            Event::Metrics { metrics, time_ms } => {
                self.client.log_batch(self.run("metrics")?, &[], metrics, *time_ms)?
            }
            Event::Artifact { path } => {
                let exp = self.state.experiment_id.as_deref().context("artifact before the run was created")?;
                let bytes = std::fs::read(self.run_dir.join(path))
                    .with_context(|| format!("artifact {}", self.run_dir.join(path).display()))?;
                self.client.upload(exp, self.run("artifact")?, path, &bytes)?;
            }
            Event::End { status, time_ms } => self.client.end_run(self.run("end")?, status, *time_ms)?,
        }
        self.state.sent = index + 1;
        self.save()
    }
}

/// Deliver every event of `run_dir` that has not reached the MLflow server at `uri`; returns
/// how many were sent (`recall sync`).
pub fn sync(run_dir: &Path, uri: &str) -> anyhow::Result<usize> {
    let log = LocalStore::open(run_dir)?;
    if log.delivered() == 0 {
        bail!("{} has no tracking events ({} is missing)", run_dir.display(), events_file(run_dir).display());
    }
    let mut mlflow = Mlflow::open(run_dir, uri)?;
    deliver_pending(&log.events()?, &mut mlflow)
}

/// The MLflow run id of a tracked run directory, once created.
pub fn run_id(run_dir: &Path) -> Option<String> {
    std::fs::read_to_string(mlflow_state_file(run_dir))
        .ok()
        .and_then(|t| serde_json::from_str::<MlflowState>(&t).ok())
        .and_then(|s| s.run_id)
}

/// Flatten a TOML value into `a.b.0.c = value` params (MLflow keys allow no brackets).
/// The experiment's resolved keys, flattened (`optimizer.lr`, `task.0.name`), without
/// `[tracking]` and `[sweep]`: the run's MLflow params and its identity (`identity.rs`).
pub fn config_params(c: &crate::config::ExperimentConfig) -> anyhow::Result<Vec<(String, String)>> {
    let mut resolved = toml::Value::try_from(c)?;
    if let Some(table) = resolved.as_table_mut() {
        table.remove("sweep");
        table.remove("tracking");
    }
    let mut params = Vec::new();
    flatten("", &resolved, &mut params);
    Ok(params)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_split_off_and_redacted() {
        let (bare, cred) = split_credentials("http://ann:s3cret@127.0.0.1:5000/prefix");
        assert_eq!(bare, "http://127.0.0.1:5000/prefix");
        assert_eq!(cred, Some(("ann".into(), "s3cret".into())));
        assert_eq!(split_credentials("http://127.0.0.1:5000").1, None);
        assert_eq!(split_credentials("http://***@127.0.0.1:5000"), ("http://127.0.0.1:5000".into(), None));
        let line = "recall run x.toml --set tracking.uri=\"https://ann:s3cret@mlflow.example/x\" and http://h/a@b";
        let r = redact(line);
        assert!(!r.contains("s3cret") && !r.contains("ann"), "{r}");
        assert!(r.contains("https://***@mlflow.example/x") && r.ends_with("http://h/a@b"), "{r}");
    }

    fn metrics(v: f64) -> Event {
        Event::Metrics { metrics: vec![("m".into(), v, 0)], time_ms: 1 }
    }

    /// Records what it is handed; fails on the event numbers in `fail_at` (once each).
    struct Flaky {
        got: Vec<f64>,
        fail_at: Vec<usize>,
    }

    impl Tracker for Flaky {
        fn name(&self) -> &str {
            "flaky"
        }
        fn delivered(&self) -> usize {
            self.got.len()
        }
        fn deliver(&mut self, index: usize, event: &Event) -> anyhow::Result<()> {
            if let Some(pos) = self.fail_at.iter().position(|&i| i == index) {
                self.fail_at.remove(pos);
                bail!("unreachable");
            }
            let Event::Metrics { metrics, .. } = event else { panic!("only metrics here") };
            self.got.push(metrics[0].1);
            Ok(())
        }
    }

    #[test]
    fn an_outage_delays_events_but_delivers_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LocalStore::open(dir.path()).unwrap();
        let mut flaky = Flaky { got: Vec::new(), fail_at: vec![1, 2] };
        for v in 0..4 {
            log.append(&metrics(v as f64)).unwrap();
            let _ = deliver_pending(&log.events().unwrap(), &mut flaky);
        }
        assert_eq!(flaky.got, vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(deliver_pending(&log.events().unwrap(), &mut flaky).unwrap(), 0);
        // A reopened log counts what is there.
        assert_eq!(LocalStore::open(dir.path()).unwrap().delivered(), 4);
    }

    #[test]
    fn records_made_inside_tasks_are_not_counted_as_stages() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tracking::open(dir.path(), None).unwrap();
        let at = |name: &str| Event::Metrics { metrics: vec![(name.to_string(), 1.0, 0)], time_ms: 0 };
        for name in ["a/retrieval/i2t_r1", "train/loss", "val/a/retrieval/i2t_r1", "a/retrieval/i2t_r1"] {
            t.record(at(name)).unwrap();
        }
        assert_eq!(t.stages_logged().unwrap(), 2, "two stages; telemetry and validation in between");
    }

    #[test]
    fn a_torn_last_line_is_dropped_but_a_corrupt_middle_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LocalStore::open(dir.path()).unwrap();
        log.append(&metrics(1.0)).unwrap();
        log.append(&metrics(2.0)).unwrap();
        let f = events_file(dir.path());
        let mut text = std::fs::read_to_string(&f).unwrap();
        text.push_str("{\"kind\":\"metr");
        std::fs::write(&f, &text).unwrap();
        assert_eq!(LocalStore::open(dir.path()).unwrap().events().unwrap().len(), 2);
        std::fs::write(&f, format!("garbage\n{text}\n")).unwrap();
        let err = LocalStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("events.jsonl:1"), "{err}");
    }

    #[test]
    fn a_log_shorter_than_a_trackers_cursor_is_refused() {
        let mut flaky = Flaky { got: vec![0.0, 1.0], fail_at: Vec::new() };
        let err = deliver_pending(&[metrics(0.0)], &mut flaky).unwrap_err().to_string();
        assert!(err.contains("log has only 1"), "{err}");
    }

    #[test]
    fn unknown_backend_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let t = TrackingSection { backend: "wandb".into(), uri: None, experiment: None, tags: Default::default() };
        let err = Tracking::open(dir.path(), Some(&t)).err().unwrap().to_string();
        assert!(err.contains("`wandb`") && err.contains("local, mlflow"), "{err}");
    }

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
