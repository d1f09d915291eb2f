//! `hindsight`: the one binary of Hindsight. Every role is a subcommand (`replay-server`,
//! `learner`, `actor`, `evaluator`), `up` runs a whole local cluster, and `fetch-model` /
//! `status` / `health` / `eval` / `verify` are tools.
//!
//! The service shell every role shares: every flag `--foo-bar` is also the environment
//! variable `HINDSIGHT_FOO_BAR` (the same name for the same meaning in every role; shown in
//! `--help`), each role serves `/metrics`, `/healthz` and `/readyz` on its metrics port
//! (`telemetry.rs`), SIGTERM drains within `--shutdown-timeout-secs` (a hard bound enforced
//! here), and a configuration error is one line and exit code 2 (1 for anything else).

mod bench;
mod bench_generate;
mod bench_ranks;
mod bench_replay;
mod bench_train;
mod bench_weights;
mod certs;
mod convert;
mod env;
mod eval;
mod health;
mod jsonl;
mod launch;
mod plot;
mod status;
mod supervise;
mod telemetry;
mod up;
mod verify;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use telemetry::LogFormat;
use tracing::Instrument;

#[derive(Parser, Debug)]
#[command(
    name = "hindsight",
    version,
    about = "Hindsight instruction Replay (HiR): distributed RL for instruction following"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "HINDSIGHT_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Log level (RUST_LOG overrides).
    #[arg(
        long,
        global = true,
        env = "HINDSIGHT_LOG_LEVEL",
        default_value = "info"
    )]
    log_level: String,
    /// Address of this process's HTTP port serving `/metrics`, `/healthz` and `/readyz`, or
    /// `off`. Default for the roles: replay-server 0.0.0.0:9101, learner 0.0.0.0:9102, actor
    /// 0.0.0.0:9103, evaluator 0.0.0.0:9104; other subcommands serve none unless given.
    #[arg(long, global = true, env = "HINDSIGHT_METRICS_ADDR", value_parser = parse_metrics_addr, value_name = "ADDR|off")]
    metrics_addr: Option<MetricsAddr>,
    /// Compute threads of this process (candle / rayon); 0 = all cores. Set it when several
    /// processes share a machine.
    #[arg(long, global = true, env = "HINDSIGHT_THREADS", default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the replay server: prompt leases, verification, HiR replays, training batches.
    ReplayServer(hindsight_replay_server::ReplayArgs),
    /// Run the learner: policy-gradient steps, weight publishing, checkpoints.
    Learner(Box<hindsight_learner::LearnerArgs>),
    /// Run one actor: generate rollouts with the current policy.
    Actor(hindsight_actor::ActorArgs),
    /// Run a local cluster (replay server, learner, N actors) as separate processes.
    Up(up::UpArgs),
    /// Download a model into the cache: `smollm2` (SmolLM2-135M-Instruct, GGUF, the
    /// default) is fetched once; built-in (`tiny...`) and local models need nothing.
    FetchModel {
        /// The model a cluster will run (the roles' --model).
        #[arg(long, env = "HINDSIGHT_MODEL", default_value = "smollm2")]
        model: String,
        /// Cache directory (default: $HINDSIGHT_CACHE or ~/.cache/hindsight).
        #[arg(long, env = "HINDSIGHT_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Ask a running cluster how it is doing (health of each service, replay counters).
    Status(status::StatusArgs),
    /// Run the evaluator: follow the learner's weight versions and score every K-th one on
    /// a held-out benchmark slice (metrics and RUN_DIR/eval.jsonl).
    Evaluator(hindsight_evaluator::EvaluatorArgs),
    /// Evaluate a model on IFEval / IFBench (or a file in their format): generate, score,
    /// print the lm-eval-style table; resumable.
    Eval(eval::EvalArgs),
    /// Score responses against IFEval / IFBench instructions (the reference oracle's format).
    Verify(verify::VerifyArgs),
    /// Write a model (GGUF, smollm2, tiny, checkpoint dir) as a Hugging Face checkpoint directory.
    Convert(convert::ConvertArgs),
    /// Benchmarks next to a peer in the same run: `verify` (verifiers vs the reference oracle),
    /// `generate` (sampling vs llama.cpp and PyTorch), `train` (learner step vs PyTorch);
    /// `replay` (replay server load: groups/s, ack latency, memory).
    Bench(bench::BenchArgs),
    /// Make a private CA, a server certificate and per-role tokens for a secured cluster.
    Certs(certs::CertsArgs),
    /// Draw learning curves of run directories (success rate, reward, replays, eval scores
    /// against learner steps and generated responses) into a PNG or SVG figure.
    Plot(plot::PlotArgs),
    /// Probe one process (gRPC health or HTTP /readyz): exit code 0 when serving / ready,
    /// 1 otherwise. The container HEALTHCHECK.
    Health(health::HealthArgs),
}

/// `--metrics-addr`: an address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MetricsAddr {
    Off,
    At(SocketAddr),
}

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("none") {
        return Ok(MetricsAddr::Off);
    }
    s.parse()
        .map(MetricsAddr::At)
        .map_err(|e| format!("{e}: expected HOST:PORT with an IP address (0.0.0.0:9101) or `off`"))
}

/// Default metrics / probe ports of the roles (documented in README and ARCHITECTURE).
pub const REPLAY_METRICS_PORT: u16 = 9101;
pub const LEARNER_METRICS_PORT: u16 = 9102;
pub const ACTOR_METRICS_PORT: u16 = 9103;
pub const EVALUATOR_METRICS_PORT: u16 = 9104;

impl Command {
    /// The metrics port a role serves when `--metrics-addr` is not given.
    fn default_metrics_addr(&self) -> Option<SocketAddr> {
        let port = match self {
            Command::ReplayServer(_) => REPLAY_METRICS_PORT,
            Command::Learner(_) => LEARNER_METRICS_PORT,
            Command::Actor(_) => ACTOR_METRICS_PORT,
            Command::Evaluator(_) => EVALUATOR_METRICS_PORT,
            _ => return None,
        };
        Some(SocketAddr::from(([0, 0, 0, 0], port)))
    }

    /// The drain bound of a role (none for tools).
    fn shutdown_bound(&self) -> Option<Duration> {
        match self {
            Command::ReplayServer(a) => Some(a.shutdown.bound()),
            Command::Learner(a) => Some(a.shutdown.bound()),
            Command::Actor(a) => Some(a.shutdown.bound()),
            Command::Evaluator(a) => Some(a.shutdown.bound()),
            _ => None,
        }
    }
}

/// Resolves at SIGTERM or Ctrl-C. With a `bound`, it also starts the hard stop: whatever the
/// role is still doing `bound` after the signal, the process exits then (code 0: each role's
/// own drain ends before the bound, so this only cuts what it already gave up on).
async fn shutdown_signal(bound: Option<Duration>) {
    wait_for_signal().await;
    if let Some(bound) = bound {
        tracing::info!(
            bound_secs = bound.as_secs_f64(),
            "shutdown requested; draining"
        );
        std::thread::spawn(move || {
            std::thread::sleep(bound);
            tracing::warn!(
                bound_secs = bound.as_secs_f64(),
                "still not stopped at --shutdown-timeout-secs; exiting now"
            );
            std::process::exit(0);
        });
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
}

/// Keeps freed large buffers in the heap for reuse (glibc otherwise maps and unmaps every
/// buffer over its mmap threshold: a page fault and a zeroed page per 4 KB each time). A
/// learner step allocates and frees many such activation and gradient buffers, so the
/// learner (and `bench train`, which measures it) run with this. Other roles keep glibc's
/// defaults: an actor's occasional model-sized buffers (a weight version arriving, its
/// parsed tensors) then go back to the system when freed instead of staying in its heap.
fn tune_allocator(command: &Command) {
    let training = matches!(command, Command::Learner(_))
        || matches!(command, Command::Bench(b) if matches!(b.what, bench::BenchWhat::Train(_)));
    if !training {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any thread exists
    // (argument parsing starts none).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> ExitCode {
    // Old per-role variable names (HINDSIGHT_REPLAY_MODEL, ...) still work, with a warning.
    let renamed = env::apply_old_names();
    let cli = Cli::parse();
    tune_allocator(&cli.command);
    if cli.threads > 0 {
        // candle's CPU kernels and rayon read this once, before any pool exists.
        std::env::set_var("RAYON_NUM_THREADS", cli.threads.to_string());
    }
    telemetry::init_logging(cli.log_format, &cli.log_level);
    for (old, new) in renamed {
        tracing::warn!("{old} is deprecated; set {new} instead (read it this time)");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let role = match &cli.command {
            Command::ReplayServer(_) => "replay-server",
            Command::Learner(_) => "learner",
            Command::Actor(_) => "actor",
            Command::Up(_) => "up",
            Command::FetchModel { .. } => "fetch-model",
            Command::Status(_) => "status",
            Command::Evaluator(_) => "evaluator",
            Command::Eval(_) => "eval",
            Command::Verify(_) => "verify",
            Command::Bench(_) => "bench",
            Command::Convert(_) => "convert",
            Command::Certs(_) => "certs",
            Command::Health(_) => "health",
            Command::Plot(_) => "plot",
        };
        let metrics_addr = match cli.metrics_addr {
            Some(MetricsAddr::Off) => None,
            Some(MetricsAddr::At(addr)) => Some(addr),
            None => cli.command.default_metrics_addr(),
        };
        // Tools run beside a role (`health` in its container, `status` exec'd into it) and
        // share its environment: only a long-running process serves the metrics port.
        let tool = matches!(
            cli.command,
            Command::Health(_)
                | Command::Status(_)
                | Command::Certs(_)
                | Command::FetchModel { .. }
                | Command::Verify(_)
                | Command::Plot(_)
                | Command::Eval(_)
                | Command::Convert(_)
        );
        // A launcher of local learner ranks serves nothing itself: each rank serves its own.
        let launcher = matches!(&cli.command, Command::Learner(a) if a.local_ranks > 1);
        let globals = launch::Globals {
            metrics_addr,
            threads: cli.threads,
            log_args: vec![
                "--log-format".into(),
                clap::ValueEnum::to_possible_value(&cli.log_format)
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_else(|| "text".into()),
                "--log-level".into(),
                cli.log_level.clone(),
            ],
        };
        if let (Some(addr), false) = (metrics_addr, tool || launcher) {
            telemetry::init_metrics(addr, role).await?;
        }
        let bound = cli.command.shutdown_bound();
        let span = tracing::info_span!("hindsight", role);
        async move {
            let done: Result<()> = match cli.command {
                Command::ReplayServer(args) => {
                    hindsight_replay_server::run(args, shutdown_signal(bound)).await
                }
                Command::Learner(args) if args.local_ranks > 1 => {
                    launch::run(*args, globals, shutdown_signal(bound)).await
                }
                Command::Learner(args) => {
                    hindsight_learner::run(*args, shutdown_signal(bound)).await
                }
                Command::Actor(args) => hindsight_actor::run(args, shutdown_signal(bound)).await,
                Command::Evaluator(args) => {
                    hindsight_evaluator::run(args, shutdown_signal(bound)).await
                }
                Command::Eval(args) => tokio::task::spawn_blocking(move || eval::run(args)).await?,
                Command::Health(args) => {
                    return health::run(args).await.map(|serving| {
                        if serving {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::FAILURE
                        }
                    })
                }
                Command::Up(args) => up::run(args, cli.log_format).await,
                Command::FetchModel { model, .. } if model != "smollm2" => {
                    println!("{model}: nothing to fetch (built in or local)");
                    Ok(())
                }
                Command::FetchModel { cache_dir, .. } => {
                    let dir = cache_dir.unwrap_or_else(hindsight_policy::default_cache_dir);
                    let path =
                        tokio::task::spawn_blocking(move || hindsight_policy::fetch_smollm2(&dir))
                            .await??;
                    println!("{}", path.display());
                    Ok(())
                }
                Command::Status(args) => status::run(args).await,
                Command::Verify(args) => verify::run(args),
                Command::Bench(args) => bench::run(args),
                Command::Convert(args) => {
                    tokio::task::spawn_blocking(move || convert::run(args)).await?
                }
                Command::Certs(args) => certs::run(args),
                Command::Plot(args) => plot::run(args),
            };
            done.map(|()| ExitCode::SUCCESS)
        }
        .instrument(span)
        .await
    });
    match result {
        Ok(code) => code,
        // One line, whatever the error; a configuration error is 2 (like a usage error).
        Err(e) if hindsight_service::ConfigError::is_in(&e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "exiting with an error");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        // Catches duplicate flags, bad defaults and conflicting globals in every subcommand.
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_parse_and_bad_values_are_refused_with_a_message() {
        let cli = Cli::try_parse_from([
            "hindsight",
            "--threads",
            "1",
            "up",
            "--model",
            "tiny",
            "--actors",
            "3",
        ])
        .unwrap();
        assert_eq!(cli.threads, 1);
        match cli.command {
            Command::Up(a) => assert_eq!(a.actors, 3),
            other => panic!("parsed {other:?}"),
        }
        let err = Cli::try_parse_from(["hindsight", "up", "--hindsight", "maybe"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("maybe") && err.contains("on"), "{err}");
        let err = Cli::try_parse_from(["hindsight", "learner", "--advantage", "ppo"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("reinforce++") && err.contains("grpo"), "{err}");
    }
}
