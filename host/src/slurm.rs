//! The Slurm executor of `recall sweep --executor slurm`: one array job, one array task per
//! unfinished point, each running the same `recall` binary on the point's run directory. The
//! executor writes the sbatch script next to the sweep's manifest, submits it, follows every
//! array task to a final state with `scontrol` (no accounting needed) and reports the failed
//! points with their logs. The run directories, not Slurm, say which results exist.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::sweep::{Plan, Status};

/// Slurm options of a sweep.
#[derive(Clone, Debug, Default)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    pub time: Option<String>,
    pub gpus_per_point: Option<u32>,
    pub max_parallel: Option<usize>,
}

/// States after which an array task never runs again.
pub const FINAL_STATES: [&str; 9] =
    ["COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"];

/// A submitted array job: its id and the point run by each array index.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
pub struct Submitted {
    pub job_id: String,
    pub points: Vec<String>,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn slurm_dir(plan: &Plan) -> PathBuf {
    plan.dir.join("slurm")
}

/// The log of array task `index`.
pub fn log_path(plan: &Plan, index: usize) -> PathBuf {
    slurm_dir(plan).join(format!("point-{index}.out"))
}

/// The sbatch script for the unfinished points.
pub fn script(
    plan: &Plan,
    experiment: &Path,
    base_sets: &[String],
    recall: &Path,
    opts: &SlurmOptions,
    env: &[(String, String)],
) -> anyhow::Result<(String, Vec<String>)> {
    let pending: Vec<_> = plan.points.iter().filter(|p| plan.status(p) != Status::Done).collect();
    let cwd = std::env::current_dir()?;
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut s = String::from("#!/bin/bash\n");
    s.push_str(&format!("#SBATCH --job-name=recall-{}\n", plan.name));
    let throttle = opts.max_parallel.map(|k| format!("%{k}")).unwrap_or_default();
    s.push_str(&format!("#SBATCH --array=0-{}{throttle}\n", pending.len().saturating_sub(1)));
    s.push_str(&format!("#SBATCH --output={}\n", abs(&slurm_dir(plan)).join("point-%a.out").display()));
    s.push_str(&format!("#SBATCH --chdir={}\n", cwd.display()));
    if let Some(p) = &opts.partition {
        s.push_str(&format!("#SBATCH --partition={p}\n"));
    }
    if let Some(t) = &opts.time {
        s.push_str(&format!("#SBATCH --time={t}\n"));
    }
    if let Some(g) = opts.gpus_per_point {
        s.push_str(&format!("#SBATCH --gpus-per-task={g}\n"));
    }
    // A preempted point goes back in the queue; SIGTERM two minutes before the time limit
    // (to `recall` itself, which the batch shell `exec`s) makes it checkpoint and stop, and
    // the requeued task resumes from that checkpoint.
    s.push_str("#SBATCH --requeue\n#SBATCH --signal=B:TERM@120\n");
    s.push_str("set -euo pipefail\n");
    s.push_str(&format!("export RECALL_SWEEP_NAME={}\n", quote(&plan.name)));
    for (k, v) in env {
        s.push_str(&format!("export {k}={}\n", quote(v)));
    }
    s.push_str("case \"$SLURM_ARRAY_TASK_ID\" in\n");
    for (i, p) in pending.iter().enumerate() {
        let dir = quote(&abs(&plan.run_dir(p)).display().to_string());
        let recall = quote(&abs(recall).display().to_string());
        // Decided when the task starts, not when the job is submitted: a requeued task
        // resumes what its earlier attempt checkpointed. A point with no progress yet
        // starts afresh (what an earlier attempt left is replaced).
        let mut fresh = format!(
            "exec {recall} run -q {} --run-dir {dir} --overwrite",
            quote(&abs(experiment).display().to_string())
        );
        for set in base_sets {
            fresh.push_str(&format!(" --set {}", quote(set)));
        }
        for (k, v) in &p.overrides {
            fresh.push_str(&format!(" --set {}", quote(&format!("{k}={v}"))));
        }
        s.push_str(&format!(
            "  {i}) export RECALL_SWEEP_LABEL={}\n     if [ -f {dir}/progress.json ]; then exec {recall} run -q --resume {dir}; \
             else {fresh}; fi ;;\n",
            quote(&p.label)
        ));
    }
    s.push_str("  *) echo \"no point for array index $SLURM_ARRAY_TASK_ID\" >&2; exit 2 ;;\nesac\n");
    Ok((s, pending.iter().map(|p| p.id.clone()).collect()))
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {what}: is Slurm installed (sbatch, scontrol, scancel on PATH)?"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Write the script and submit it; the job id is saved for `--cancel`.
pub fn submit(
    plan: &Plan,
    experiment: &Path,
    base_sets: &[String],
    recall: &Path,
    opts: &SlurmOptions,
    env: &[(String, String)],
) -> anyhow::Result<Option<Submitted>> {
    let (text, points) = script(plan, experiment, base_sets, recall, opts, env)?;
    if points.is_empty() {
        return Ok(None);
    }
    let dir = slurm_dir(plan);
    std::fs::create_dir_all(&dir)?;
    for p in &points {
        std::fs::create_dir_all(plan.dir.join(p))?;
    }
    let file = dir.join("array.sbatch");
    crate::fsutil::write_atomic(&file, text.as_bytes())?;
    let out = run(Command::new("sbatch").arg("--parsable").arg(&file), "sbatch")?;
    let job_id = out.trim().split(';').next().unwrap_or_default().to_string();
    if job_id.is_empty() {
        bail!("sbatch printed no job id");
    }
    let submitted = Submitted { job_id, points };
    crate::fsutil::write_atomic(&dir.join("job.json"), serde_json::to_string_pretty(&submitted)?.as_bytes())?;
    Ok(Some(submitted))
}

/// The indices of an `ArrayTaskId` value: `3`, `0-3`, `2-3%2` (throttled), `1,4-5`.
fn task_indices(value: &str) -> Vec<usize> {
    let value = value.split('%').next().unwrap_or_default();
    let mut out = Vec::new();
    for part in value.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.parse::<usize>().ok()),
        }
    }
    out
}

/// Array task index -> state, from `scontrol -o show job JOB`. A pending or cancelled range
/// of tasks is one record; it stands for each of its indices.
fn states(job_id: &str) -> anyhow::Result<Vec<(usize, String)>> {
    let out = run(Command::new("scontrol").args(["-o", "show", "job", job_id]), "scontrol show job")?;
    Ok(parse_states(&out))
}

fn parse_states(out: &str) -> Vec<(usize, String)> {
    let field = |line: &str, key: &str| line.split_whitespace().find_map(|w| w.strip_prefix(key).map(String::from));
    let mut states = Vec::new();
    for l in out.lines() {
        if let (Some(ids), Some(state)) = (field(l, "ArrayTaskId="), field(l, "JobState=")) {
            for i in task_indices(&ids) {
                states.push((i, state.clone()));
            }
        }
    }
    states
}

/// Poll until every array task is in a final state; returns (point id, state) per index.
pub fn follow(job: &Submitted, quiet: bool) -> anyhow::Result<Vec<(String, String)>> {
    let n = job.points.len();
    let mut last_report = String::new();
    loop {
        let s = match states(&job.job_id) {
            Ok(s) => s,
            // Without accounting, Slurm forgets finished jobs after MinJobAge: whatever was
            // not seen final by then is reported as such; the run directories still tell.
            Err(e) if e.to_string().contains("Invalid job id") => {
                return Ok(job.points.iter().map(|p| (p.clone(), "PURGED".to_string())).collect());
            }
            Err(e) => return Err(e),
        };
        let finished: Vec<&(usize, String)> = s.iter().filter(|(_, st)| FINAL_STATES.contains(&st.as_str())).collect();
        let report = format!("{} of {n} points final", finished.len());
        if !quiet && report != last_report {
            println!("slurm job {}: {report}", job.job_id);
            last_report = report;
        }
        if finished.len() == n {
            let mut out = vec![(String::new(), String::new()); n];
            for (i, st) in s {
                if i < n {
                    out[i] = (job.points[i].clone(), st);
                }
            }
            return Ok(out);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// `recall sweep --cancel`: cancel the sweep's submitted array job.
pub fn cancel(plan: &Plan) -> anyhow::Result<String> {
    let f = slurm_dir(plan).join("job.json");
    let text = std::fs::read_to_string(&f)
        .with_context(|| format!("no Slurm job was submitted for this sweep ({} is missing)", f.display()))?;
    let job: Submitted = serde_json::from_str(&text)?;
    run(Command::new("scancel").arg(&job.job_id), "scancel")?;
    Ok(job.job_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scontrol_records_expand_to_every_array_index() {
        let out = "JobId=7 ArrayJobId=5 ArrayTaskId=1 JobState=FAILED Reason=x\n\
                   JobId=5 ArrayJobId=5 ArrayTaskId=2-3%2 JobState=PENDING Reason=JobArrayTaskLimit\n\
                   JobId=6 ArrayJobId=5 ArrayTaskId=0,4 JobState=CANCELLED\n";
        let mut s = parse_states(out);
        s.sort();
        let expected: Vec<(usize, String)> =
            [(0, "CANCELLED"), (1, "FAILED"), (2, "PENDING"), (3, "PENDING"), (4, "CANCELLED")]
                .into_iter()
                .map(|(i, st)| (i, st.to_string()))
                .collect();
        assert_eq!(s, expected);
    }

    #[test]
    fn script_runs_one_point_per_array_index_with_quoted_overrides() {
        let src = format!(
            "{}\n[sweep]\nseeds = [0]\n[sweep.axes]\n\"optimizer.lr\" = [0.001, 0.0003]\n",
            crate::config::tests::MINIMAL
        );
        let cfg = crate::config::parse(&src, "s.toml").unwrap();
        let mut plan = crate::sweep::expand(&cfg).unwrap();
        plan.dir = std::env::temp_dir().join(format!("recall-slurm-script-{}", std::process::id()));
        let opts = SlurmOptions {
            partition: Some("debug".into()),
            time: Some("00:10:00".into()),
            gpus_per_point: Some(1),
            max_parallel: Some(3),
        };
        let (s, points) = script(
            &plan,
            Path::new("s.toml"),
            &["train.epochs=2".into()],
            Path::new("/bin/recall"),
            &opts,
            &[("A".into(), "it's".into())],
        )
        .unwrap();
        assert_eq!(points.len(), 2);
        assert!(s.contains("#SBATCH --array=0-1%3\n") && s.contains("#SBATCH --partition=debug\n"), "{s}");
        assert!(s.contains("#SBATCH --time=00:10:00\n") && s.contains("#SBATCH --gpus-per-task=1\n"), "{s}");
        assert!(s.contains("export A='it'\\''s'"), "{s}");
        assert!(s.contains("  0) export RECALL_SWEEP_LABEL='optimizer.lr=0.001'\n"), "{s}");
        assert!(s.contains("#SBATCH --requeue\n#SBATCH --signal=B:TERM@120\n"), "{s}");
        let dir = plan.run_dir(&plan.points[0]).display().to_string();
        assert!(
            s.contains(&format!("if [ -f '{dir}'/progress.json ]; then exec '/bin/recall' run -q --resume '{dir}';")),
            "{s}"
        );
        assert!(s.contains("--set 'train.epochs=2' --set 'optimizer.lr=0.001' --set 'experiment.seed=0'"), "{s}");
    }
}
