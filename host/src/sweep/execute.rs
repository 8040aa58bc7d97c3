//! Running a sweep's points: locally as child `recall run` processes, or as one Slurm array
//! job; with a tracker, one parent run for the sweep and every point a nested child; at the
//! end, the comparison of what finished beside the manifest.

use std::path::{Path, PathBuf};

use super::{Plan, Point, Status};
use crate::config::LoadedConfig;
use crate::fsutil::write_atomic;
use crate::tracking::{self, Event, Tracking};

/// Where a sweep's points run.
pub enum Executor {
    /// `jobs` child processes at once on this machine.
    Local { jobs: usize },
    /// One Slurm array job, a task per unfinished point.
    Slurm(crate::slurm::SlurmOptions),
}

/// Run every unfinished point of `plan` (the expansion of `cfg`, read from `experiment` with
/// the command line's `base_sets`) with the `recall` binary at `recall`, then write
/// compare.md / .csv / .html into the sweep directory. Points that fail are in the outcome,
/// not an error: the others still run and are compared.
pub fn execute(
    plan: &Plan,
    cfg: &LoadedConfig,
    experiment: &Path,
    base_sets: &[String],
    recall: &Path,
    executor: &Executor,
    quiet: bool,
) -> anyhow::Result<Outcome> {
    let (mut tracking, env) = open_parent_run(plan, cfg)?;
    let out = match executor {
        Executor::Local { jobs } => run_local(plan, experiment, base_sets, recall, *jobs, quiet, &env)?,
        Executor::Slurm(opts) => run_slurm(plan, experiment, base_sets, recall, opts, quiet, &env)?,
    };
    // The comparison of what finished, beside the manifest (and on the parent run).
    let report = crate::report::compare(std::slice::from_ref(&plan.dir), None).ok();
    if let Some(c) = &report {
        write_atomic(&plan.dir.join("compare.md"), c.markdown().as_bytes())?;
        write_atomic(&plan.dir.join("compare.csv"), c.csv().as_bytes())?;
        let html = crate::report_html::render(c, &format!("sweep {}", plan.name));
        write_atomic(&plan.dir.join("compare.html"), html.as_bytes())?;
    }
    if let Some(tr) = &mut tracking {
        if report.is_some() {
            for f in ["sweep.json", "compare.md", "compare.csv", "compare.html"] {
                tr.record(Event::Artifact { path: f.into() })?;
            }
        }
        let status = if out.failed.is_empty() { "FINISHED" } else { "FAILED" };
        tr.log(Event::End { status: status.into(), time_ms: tracking::now_ms() })?;
    }
    Ok(out)
}

/// Environment variables every point's process gets.
type ChildEnv = Vec<(String, String)>;

/// With `[tracking]`: the sweep's parent run (its events live in the sweep directory, like a
/// run's), and the environment that makes each point its nested child.
fn open_parent_run(plan: &Plan, cfg: &LoadedConfig) -> anyhow::Result<(Option<Tracking>, ChildEnv)> {
    let Some(t) = tracking::TrackingSection::effective(cfg.config.tracking.as_ref()) else {
        return Ok((None, Vec::new()));
    };
    let t = &t;
    std::fs::create_dir_all(&plan.dir)?;
    let mut tr = Tracking::open(&plan.dir, Some(t))?;
    if !tr.is_started() {
        let experiment = t.experiment.clone().unwrap_or_else(|| plan.name.clone());
        let tags = vec![
            ("sweep".to_string(), plan.name.clone()),
            ("points".into(), plan.points.len().to_string()),
            ("git_commit".into(), env!("RECALL_GIT_COMMIT").into()),
        ];
        tr.record(Event::Start {
            experiment,
            name: plan.name.clone(),
            tags,
            params: Vec::new(),
            time_ms: tracking::now_ms(),
        })?;
    }
    tr.flush();
    let env =
        tracking::run_id(&plan.dir).map(|id| ("RECALL_MLFLOW_PARENT_RUN_ID".to_string(), id)).into_iter().collect();
    Ok((Some(tr), env))
}

/// Submit the unfinished points as one Slurm array job and follow it to its end.
fn run_slurm(
    plan: &Plan,
    experiment: &Path,
    base_sets: &[String],
    recall: &Path,
    opts: &crate::slurm::SlurmOptions,
    quiet: bool,
    env: &[(String, String)],
) -> anyhow::Result<Outcome> {
    use crate::slurm;
    std::fs::create_dir_all(&plan.dir)?;
    plan.write_manifest(experiment)?;
    let skipped = plan.points.iter().filter(|p| plan.status(p) == Status::Done).map(|p| p.id.clone()).collect();
    let mut out = Outcome { finished: Vec::new(), skipped, failed: Vec::new() };
    if let Some(job) = slurm::submit(plan, experiment, base_sets, recall, opts, env)? {
        if !quiet {
            println!("submitted Slurm array job {} ({} points)", job.job_id, job.points.len());
        }
        for (i, (id, state)) in slurm::follow(&job, quiet)?.into_iter().enumerate() {
            let done = plan.dir.join(&id).join("summary.json").is_file();
            if state == "COMPLETED" && done {
                out.finished.push(id);
            } else {
                eprintln!("point {id} ended {state}; log: {}", slurm::log_path(plan, i).display());
                out.failed.push((id, slurm::log_path(plan, i)));
            }
        }
    }
    Ok(out)
}

/// Outcome of a local sweep.
pub struct Outcome {
    pub finished: Vec<String>,
    pub skipped: Vec<String>,
    /// (point id, log file)
    pub failed: Vec<(String, PathBuf)>,
}

/// Run every unfinished point with at most `jobs` `recall run` processes at once (the same
/// binary; `base_sets` are the command line's own overrides, applied before each point's);
/// a partial run is resumed. Each point's output goes to `RUN_DIR/stdout.txt` and
/// `stderr.txt`.
pub fn run_local(
    plan: &Plan,
    experiment: &Path,
    base_sets: &[String],
    recall: &Path,
    jobs: usize,
    quiet: bool,
    env: &[(String, String)],
) -> anyhow::Result<Outcome> {
    use std::process::{Command, Stdio};
    std::fs::create_dir_all(&plan.dir)?;
    plan.write_manifest(experiment)?;
    let mut out = Outcome { finished: Vec::new(), skipped: Vec::new(), failed: Vec::new() };
    let mut queue: std::collections::VecDeque<&Point> = std::collections::VecDeque::new();
    for p in &plan.points {
        if plan.status(p) == Status::Done {
            out.skipped.push(p.id.clone());
        } else {
            queue.push_back(p);
        }
    }
    let mut running: Vec<(&Point, std::process::Child)> = Vec::new();
    loop {
        while running.len() < jobs.max(1) {
            let Some(p) = queue.pop_front() else { break };
            let dir = plan.run_dir(p);
            std::fs::create_dir_all(&dir)?;
            let mut cmd = Command::new(recall);
            cmd.arg("run").arg("-q");
            if plan.status(p) == Status::Partial {
                cmd.arg("--resume").arg(&dir);
            } else {
                cmd.arg(experiment).arg("--run-dir").arg(&dir);
                // A pending point finished no task: what an earlier attempt left is replaced.
                if crate::rundir::holds_run(&dir) {
                    cmd.arg("--overwrite");
                }
                for s in base_sets {
                    cmd.arg("--set").arg(s);
                }
                for (k, v) in &p.overrides {
                    cmd.arg("--set").arg(format!("{k}={v}"));
                }
            }
            cmd.stdout(std::fs::File::create(dir.join("stdout.txt"))?);
            cmd.stderr(std::fs::File::create(dir.join("stderr.txt"))?);
            cmd.stdin(Stdio::null());
            // Trackers name the sweep and the point (see `tracking`).
            cmd.env("RECALL_SWEEP_NAME", &plan.name).env(crate::config::SWEEP_LABEL_VAR, &p.label);
            for (k, v) in env {
                cmd.env(k, v);
            }
            if !quiet {
                println!("start  {}  seed {}  {}", p.id, p.seed, p.label);
            }
            running.push((p, cmd.spawn()?));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut i = 0;
        while i < running.len() {
            if let Some(status) = running[i].1.try_wait()? {
                let (p, _) = running.remove(i);
                if status.success() {
                    if !quiet {
                        println!("done   {}", p.id);
                    }
                    out.finished.push(p.id.clone());
                } else {
                    let log = plan.run_dir(p).join("stderr.txt");
                    if !quiet {
                        println!("FAILED {}  ({status}); log: {}", p.id, log.display());
                    }
                    out.failed.push((p.id.clone(), log));
                }
            } else {
                i += 1;
            }
        }
    }
    Ok(out)
}
