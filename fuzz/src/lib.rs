//! Fuzz targets for everything Recall reads from a user's files, on a stable-Rust harness.
//!
//! A target turns bytes into a call of one reader (experiment files with `--set` overrides,
//! the JSONL / CSV / Karpathy manifests, safetensors and PyTorch checkpoints, the tracking
//! event log). The harness mutates a seed corpus of valid inputs with a seeded generator,
//! drives each mutation through `arbitrary::Unstructured`, and runs every input under
//! `catch_unwind`: a panic is a crash, an input slower than [`HANG`] twice in a row a hang. An `Err` is the
//! right answer to bad input and counts as neither. There is no coverage feedback (that needs
//! a nightly toolchain and `cargo fuzz`); the seeds are chosen so mutations start from every
//! branch of each format.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arbitrary::Unstructured;
use rand::{RngCore, SeedableRng};

/// An input that runs longer than this is reported as a hang.
pub const HANG: Duration = Duration::from_secs(2);

/// One fuzz target: seed inputs and the call the bytes drive.
pub struct Target {
    pub name: &'static str,
    seeds: fn() -> Vec<Vec<u8>>,
    run: fn(&Path, &[u8]),
}

/// What one fuzzing session of a target found.
#[derive(Debug, Default)]
pub struct Report {
    pub target: &'static str,
    pub execs: u64,
    /// (panic message, input) of each crash.
    pub crashes: Vec<(String, Vec<u8>)>,
    pub hangs: Vec<Vec<u8>>,
    pub slowest: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<12} {:>9} execs  {} crashes  {} hangs  slowest {:.1} ms",
            self.target,
            self.execs,
            self.crashes.len(),
            self.hangs.len(),
            self.slowest.as_secs_f64() * 1e3
        )
    }
}

/// Every target, in a fixed order.
pub fn targets() -> Vec<Target> {
    vec![
        Target { name: "experiment", seeds: seeds::experiment, run: run::experiment },
        Target { name: "jsonl", seeds: seeds::jsonl, run: run::jsonl },
        Target { name: "csv", seeds: seeds::csv, run: run::csv },
        Target { name: "karpathy", seeds: seeds::karpathy, run: run::karpathy },
        Target { name: "safetensors", seeds: seeds::safetensors, run: run::checkpoint },
        Target { name: "pickle", seeds: seeds::pickle, run: run::checkpoint },
        Target { name: "events", seeds: seeds::events, run: run::events },
    ]
}

/// Run `target` once on `input` (to reproduce a finding); returns how long it took, or the
/// panic's message.
pub fn replay(target: &Target, input: &[u8]) -> Result<Duration, String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let t = Instant::now();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (target.run)(work.path(), input)))
        .map(|()| t.elapsed())
        .map_err(|p| p.downcast_ref::<String>().cloned().unwrap_or_else(|| "a panic".into()))
}

thread_local! {
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Fuzz `target` for `budget` with generator seed `seed`.
pub fn fuzz(target: &Target, budget: Duration, seed: u64) -> Report {
    let work = tempfile::tempdir().expect("a temporary directory for fuzz inputs");
    let corpus = (target.seeds)();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut report = Report { target: target.name, ..Report::default() };
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| LAST_PANIC.with(|p| *p.borrow_mut() = info.to_string())));
    let started = Instant::now();
    let mut noise = vec![0u8; 4096];
    while started.elapsed() < budget {
        rng.fill_bytes(&mut noise);
        let mut u = Unstructured::new(&noise);
        let base = &corpus[u.choose_index(corpus.len()).unwrap_or(0)];
        // Seeds themselves run first: a crash there is a crash on valid input.
        let input = if report.execs < corpus.len() as u64 {
            corpus[report.execs as usize].clone()
        } else {
            mutate(&mut u, base, &corpus)
        };
        let t = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (target.run)(work.path(), &input)));
        let took = t.elapsed();
        report.execs += 1;
        report.slowest = report.slowest.max(took);
        if outcome.is_err() {
            let message = LAST_PANIC.with(|p| p.borrow().clone());
            report.crashes.push((message, input.clone()));
        }
        // A slow input is run again: a stall of a busy machine is not a hang of the reader.
        if took > HANG && replay(target, &input).is_ok_and(|again| again > HANG) {
            report.hangs.push(input);
        }
    }
    std::panic::set_hook(previous_hook);
    report
}

/// Tokens that reach the interesting branches of the text formats.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"[",
    b"]",
    b"[[",
    b"]]",
    b"{",
    b"}",
    b"=",
    b",",
    b":",
    b"\n",
    b"\r\n",
    b"\0",
    b"\xEF\xBB\xBF",
    b"\xFF",
    b"-1",
    b"0",
    b"1e309",
    b"nan",
    b"inf",
    b"4294967296",
    b"18446744073709551616",
    b"-0.0",
    b"true",
    b"null",
    b"\"\"",
    b"[]",
    b"{}",
    b"\\u0000",
    b"\\",
    b"'",
    b"#",
    b"..",
    b"/",
    b"asset:",
    b"dataset:",
];

/// 1 to 8 edits of `input`: bit flips, byte sets, inserted noise or tokens, deleted and
/// duplicated ranges, and splices from another seed.
fn mutate(u: &mut Unstructured, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    let edits = u.int_in_range(1..=8u8).unwrap_or(1);
    for _ in 0..edits {
        let at = |u: &mut Unstructured, len: usize| u.int_in_range(0..=len).unwrap_or(0);
        match u.int_in_range(0..=6u8).unwrap_or(0) {
            0 if !out.is_empty() => {
                let i = at(u, out.len() - 1);
                out[i] ^= 1 << u.int_in_range(0..=7u8).unwrap_or(0);
            }
            1 if !out.is_empty() => {
                let i = at(u, out.len() - 1);
                out[i] = u.arbitrary().unwrap_or(0);
            }
            2 => {
                let i = at(u, out.len());
                let n = u.int_in_range(1..=16usize).unwrap_or(1);
                let bytes: Vec<u8> = (0..n).map(|_| u.arbitrary().unwrap_or(0)).collect();
                out.splice(i..i, bytes);
            }
            3 => {
                let i = at(u, out.len());
                let token = TOKENS[u.choose_index(TOKENS.len()).unwrap_or(0)];
                out.splice(i..i, token.iter().copied());
            }
            4 if !out.is_empty() => {
                let i = at(u, out.len() - 1);
                let n = u.int_in_range(1..=64usize).unwrap_or(1).min(out.len() - i);
                out.drain(i..i + n);
            }
            5 if !out.is_empty() => {
                let i = at(u, out.len() - 1);
                let n = u.int_in_range(1..=64usize).unwrap_or(1).min(out.len() - i);
                let piece: Vec<u8> = out[i..i + n].to_vec();
                let j = at(u, out.len());
                out.splice(j..j, piece);
            }
            _ => {
                let other = &corpus[u.choose_index(corpus.len()).unwrap_or(0)];
                if !other.is_empty() {
                    let i = at(u, other.len() - 1);
                    let n = u.int_in_range(1..=256usize).unwrap_or(1).min(other.len() - i);
                    let j = at(u, out.len());
                    out.splice(j..j, other[i..i + n].iter().copied());
                }
            }
        }
    }
    out
}

/// Write an input to a file of the work directory.
fn file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write a fuzz input");
    p
}

mod seeds {
    pub const EXPERIMENT: &str = include_str!("../../experiments/quickstart.toml");

    /// An experiment, then after a NUL byte one `--set` override per line.
    pub fn experiment() -> Vec<Vec<u8>> {
        let with = |sets: &str| format!("{EXPERIMENT}\0{sets}").into_bytes();
        vec![
            with(""),
            with("train.epochs=2\noptimizer.lr=0.01"),
            with("task[1].name=\"x\"\nadapter={plugin=\"lora\",rank=4}"),
            with("evaluator[0].ks=[1, 5]\nmodel.vision.layers=2\noptimizer.groups[0].lr=1e-4"),
            with("strategy=[{plugin=\"ckc\",dim=128}]\ntracking.uri=\"http://u:p@127.0.0.1:9\""),
        ]
    }

    pub fn jsonl() -> Vec<Vec<u8>> {
        vec![
            b"{\"image\": \"a.png\", \"caption\": \"a red circle\"}\n{\"image\": \"b.png\", \"captions\": [\"x\", \"y\"], \"split\": \"test\"}\n".to_vec(),
            b"{\"image\": \"c.png\", \"class\": \"cat\", \"category\": \"animal\", \"split\": \"train\"}\n\n".to_vec(),
        ]
    }

    pub fn csv() -> Vec<Vec<u8>> {
        vec![
            b"image,caption,class,split\na.png,a red circle,circle,train\na.png,round,circle,train\nb.png,,square,test\n"
                .to_vec(),
            b"\xEF\xBB\xBFimage,caption\n\"q,uoted.png\",\"a \"\"quoted\"\" caption\"\n".to_vec(),
        ]
    }

    pub fn karpathy() -> Vec<Vec<u8>> {
        vec![br#"{"images": [{"filename": "a.jpg", "filepath": "val2014", "split": "train", "sentences": [{"raw": "A dog."}]}, {"filename": "b.jpg", "split": "restval", "sentences": [{"raw": "x"}, {"raw": "y"}]}]}"#.to_vec()]
    }

    pub fn safetensors() -> Vec<Vec<u8>> {
        use candle_core::{DType, Device, Tensor};
        let dir = tempfile::tempdir().expect("temporary directory");
        let p = dir.path().join("s.safetensors");
        let tensors = std::collections::HashMap::from([
            ("w".to_string(), Tensor::ones((2, 3), DType::F32, &Device::Cpu).expect("tensor")),
            ("b".to_string(), Tensor::zeros(3, DType::F16, &Device::Cpu).expect("tensor")),
        ]);
        candle_core::safetensors::save(&tensors, &p).expect("save");
        vec![std::fs::read(p).expect("read")]
    }

    pub fn pickle() -> Vec<Vec<u8>> {
        vec![include_bytes!("../../tests/fixtures/llamagen/vq.pt").to_vec()]
    }

    pub fn events() -> Vec<Vec<u8>> {
        vec![concat!(
            r#"{"kind":"start","experiment":"e","name":"n","tags":[["seed","0"]],"params":[["optimizer.lr","0.001"]],"time_ms":1}"#,
            "\n",
            r#"{"kind":"metrics","metrics":[["a/retrieval/i2t_r1",50.0,1]],"time_ms":2}"#,
            "\n",
            r#"{"kind":"artifact","path":"summary.json"}"#,
            "\n",
            r#"{"kind":"end","status":"FINISHED","time_ms":3}"#,
            "\n"
        )
        .as_bytes()
        .to_vec()]
    }
}

mod run {
    use std::path::Path;

    use recall_host::data::source;

    pub fn experiment(dir: &Path, bytes: &[u8]) {
        let (text, sets) = match bytes.iter().position(|&b| b == 0) {
            Some(i) => (&bytes[..i], &bytes[i + 1..]),
            None => (bytes, &[][..]),
        };
        let (Ok(text), Ok(sets)) = (std::str::from_utf8(text), std::str::from_utf8(sets)) else { return };
        let overrides: Vec<String> = sets.lines().map(str::to_string).collect();
        let file = dir.join("x.toml").display().to_string();
        if let Ok(src) = recall_host::config::apply_overrides(text, &file, &overrides) {
            let _ = recall_host::config::parse(&src, &file);
        }
    }

    pub fn jsonl(dir: &Path, bytes: &[u8]) {
        let _ = source::read_jsonl(&super::file(dir, "d.jsonl", bytes), dir);
    }

    pub fn csv(dir: &Path, bytes: &[u8]) {
        let _ = source::read_csv(&super::file(dir, "d.csv", bytes), dir);
    }

    pub fn karpathy(dir: &Path, bytes: &[u8]) {
        let _ = source::read_karpathy(&super::file(dir, "d.json", bytes), dir);
    }

    /// Open a checkpoint (its format from its bytes, as plugins' reads do), list it and load
    /// every tensor of a sane size.
    pub fn checkpoint(dir: &Path, bytes: &[u8]) {
        let name = if bytes.starts_with(b"PK") { "c.pt" } else { "c.safetensors" };
        let path = super::file(dir, name, bytes);
        let Ok(ck) = recall_host::runtime::checkpoint_file::CheckpointFile::open(&path.display().to_string()) else {
            return;
        };
        for (tensor, shape, _) in ck.index() {
            if shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_some_and(|n| n <= 1 << 20) {
                let _ = ck.load(&tensor, &candle_core::Device::Cpu);
            }
        }
    }

    pub fn events(dir: &Path, bytes: &[u8]) {
        let tracking = dir.join("tracking");
        std::fs::create_dir_all(&tracking).expect("tracking directory");
        super::file(&tracking, "events.jsonl", bytes);
        if let Ok(store) = recall_host::tracking::LocalStore::open(dir) {
            let _ = store.events();
        }
    }
}
