//! `recall-fuzz [--seconds N] [--seed S] [--out DIR] [TARGET...]`: fuzz each target (all by
//! default) for N seconds; crash and hang inputs are written to DIR. Exits 1 if any was found.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
#[command(name = "recall-fuzz", about = "Fuzz Recall's parsers and readers")]
struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seed of the mutation generator (a run is reproducible from it).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where crash and hang inputs are written.
    #[arg(long, default_value = "target/fuzz-findings")]
    out: PathBuf,
    /// Run the (single) target once on this input file instead of fuzzing.
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Targets to fuzz (default: all).
    targets: Vec<String>,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let all = recall_fuzz::targets();
    let names: Vec<&str> = all.iter().map(|t| t.name).collect();
    if let Some(bad) = args.targets.iter().find(|t| !names.contains(&t.as_str())) {
        anyhow::bail!("unknown target `{bad}`; targets: {}", names.join(", "));
    }
    if let Some(input) = &args.replay {
        let [name] = &args.targets[..] else { anyhow::bail!("--replay needs exactly one target") };
        let target = all.iter().find(|t| t.name == name).expect("checked above");
        match recall_fuzz::replay(target, &std::fs::read(input)?) {
            Ok(took) => println!("{name}: no crash, {:.1} ms", took.as_secs_f64() * 1e3),
            Err(m) => println!("{name}: crash: {m}"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut found = 0;
    for t in all.iter().filter(|t| args.targets.is_empty() || args.targets.iter().any(|n| n == t.name)) {
        let report = recall_fuzz::fuzz(t, Duration::from_secs(args.seconds), args.seed);
        println!("{report}");
        let findings = report
            .crashes
            .iter()
            .map(|(m, i)| ("crash", Some(m), i))
            .chain(report.hangs.iter().map(|i| ("hang", None, i)));
        for (n, (kind, message, input)) in findings.enumerate() {
            std::fs::create_dir_all(&args.out)?;
            let file = args.out.join(format!("{}-{kind}-{n}.bin", t.name));
            std::fs::write(&file, input)?;
            println!("  {kind}: {} {}", file.display(), message.map(String::as_str).unwrap_or(""));
            found += 1;
        }
    }
    Ok(if found == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
