//! Sweeps on a real single-node Slurm (slurmctld + slurmd + munge, started here as ASSETS.md
//! describes; `.ci/run` installs the Debian packages): a 4-point sweep in which one point
//! fails on purpose ends with 3 finished runs, 1 reported failure with its log, and a
//! compare table; `recall sweep --cancel` cancels a running array job.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use recall_tests::{recall_bin, SMALL_EXPERIMENT};

struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        for c in ["slurmctld", "slurmd", "sbatch", "scontrol", "munged"] {
            assert!(
                have(c),
                "`{c}` is missing: the Slurm tests need `apt-get install slurmctld slurmd slurm-client munge` (.ci/run does it)"
            );
        }
        let d = dir.display();
        let conf = dir.join("slurm.conf");
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::create_dir_all(dir.join("spool")).unwrap();
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        std::fs::write(
            &conf,
            format!(
                "ClusterName=recalltest\nSlurmctldHost=localhost\nSlurmctldPort={}\nSlurmdPort={}\nSlurmUser=root\n\
                 SlurmdUser=root\nAuthType=auth/munge\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
                 SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nAccountingStorageType=accounting_storage/none\n\
                 JobAcctGatherType=jobacct_gather/none\nMpiDefault=none\nReturnToService=2\nMinJobAge=600\n\
                 StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/slurmctld.pid\n\
                 SlurmdPidFile={d}/slurmd.pid\nSlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd.log\n\
                 NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN\n\
                 PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n",
                free_port(),
                free_port()
            ),
        )
        .unwrap();
        // munge authenticates the daemons; one instance serves every cluster on the machine.
        if !Command::new("pgrep").arg("-x").arg("munged").stdout(Stdio::null()).status().is_ok_and(|s| s.success()) {
            let _ = Command::new("install").args(["-d", "-o", "munge", "-g", "munge", "/run/munge"]).status();
            let ok = Command::new("su")
                .args(["-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"])
                .status()
                .unwrap()
                .success();
            assert!(ok, "cannot start munged");
        }
        let c = Cluster { dir: dir.to_path_buf(), conf };
        assert!(c.cmd("slurmctld").arg("-c").status().unwrap().success(), "slurmctld failed: see {d}/slurmctld.log");
        assert!(
            c.cmd("slurmd").args(["-N", "localhost"]).status().unwrap().success(),
            "slurmd failed: see {d}/slurmd.log"
        );
        let start = Instant::now();
        loop {
            let out = c.cmd("sinfo").args(["-h", "-o", "%T"]).output().unwrap();
            if String::from_utf8_lossy(&out.stdout).trim() == "idle" {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "the node never became idle: see {d}");
            std::thread::sleep(Duration::from_millis(250));
        }
        c
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pid in ["slurmd.pid", "slurmctld.pid"] {
            if let Ok(p) = std::fs::read_to_string(self.dir.join(pid)) {
                let _ = Command::new("kill").arg(p.trim()).stderr(Stdio::null()).status();
            }
        }
    }
}

fn sweep_file(dir: &Path, name: &str, axis: &str, extra: &str) -> PathBuf {
    let f = dir.join(format!("{name}.toml"));
    std::fs::write(&f, format!("{SMALL_EXPERIMENT}\n{extra}\n[sweep]\nname = \"{name}\"\n[sweep.axes]\n{axis}\n"))
        .unwrap();
    f
}

#[test]
fn slurm_sweep_with_a_failing_point_then_cancel() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&tmp.path().join("slurm"));
    // Width 31 does not split over 2 heads: that point fails inside the vision plugin.
    sweep_file(tmp.path(), "w", "\"model.vision.width\" = [32, 16, 24, 31]", "");
    let out = cluster
        .cmd(recall_bin().to_str().unwrap())
        .args(["sweep", "w.toml", "--executor", "slurm", "--max-parallel", "2", "--time", "00:10:00"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "a failed point fails the sweep: {stdout}{stderr}");
    assert!(stdout.contains("3 finished, 0 already done, 1 failed"), "{stdout}{stderr}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("runs/w/sweep.json")).unwrap()).unwrap();
    let failing =
        manifest["points"].as_array().unwrap().iter().find(|p| p["label"] == "model.vision.width=31").unwrap();
    let id = failing["id"].as_str().unwrap();
    assert!(stderr.contains(&format!("point {id} ended FAILED; log: ")), "{stderr}");
    let log_line = stderr.lines().find(|l| l.contains(&format!("point {id} ended"))).unwrap();
    let log = std::fs::read_to_string(tmp.path().join(log_line.rsplit("log: ").next().unwrap())).unwrap();
    assert!(log.contains("width"), "the point's log says why: {log}");
    let finished = std::fs::read_dir(tmp.path().join("runs/w"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("summary.json").is_file())
        .count();
    assert_eq!(finished, 3);
    let out = Command::new(recall_bin()).args(["compare", "runs/w"]).current_dir(tmp.path()).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.matches("| model.vision.width=").count() == 3, "{table}");
    assert!(table.contains("missing runs:") && table.contains("model.vision.width=31"), "{table}");

    // Cancel: long points, then `recall sweep --cancel` while they run.
    sweep_file(tmp.path(), "long", "\"optimizer.lr\" = [0.001, 0.0003]", "");
    let text = std::fs::read_to_string(tmp.path().join("long.toml")).unwrap().replace("epochs = 1", "epochs = 500");
    std::fs::write(tmp.path().join("long.toml"), text).unwrap();
    let sweep = cluster
        .cmd(recall_bin().to_str().unwrap())
        .args(["sweep", "long.toml", "--executor", "slurm"])
        .current_dir(tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !tmp.path().join("runs/long/slurm/job.json").is_file() {
        assert!(start.elapsed() < Duration::from_secs(60), "the long sweep was never submitted");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let out = cluster
        .cmd(recall_bin().to_str().unwrap())
        .args(["sweep", "long.toml", "--cancel"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = sweep.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.matches("ended CANCELLED").count(), 2, "{stderr}");
}
