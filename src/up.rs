//! `hindsight up`: a whole local cluster on loopback — one replay server, one learner and N
//! actors, each a separate `hindsight` process with its own log file and `/metrics` port —
//! with a progress bar per learner step and a JSON run summary at the end.
//!
//! Run directory layout: `logs/<process>.log`, `steps.jsonl` (the learner's per-step figures),
//! `batches.jsonl` (every sample served, from the replay server), `checkpoints/`,
//! `replay-data/` (the replay server's write-ahead log), `endpoints.json` (addresses, written at
//! start, rewritten when a restart changes a pid), `summary.json` (written at the end, with
//! the arm: hindsight, reward and budget settings) and `plot.png` (`hindsight plot` of the run).
//!
//! The processes are supervised (`supervise.rs`): one that crashes is restarted with the same
//! arguments and ports (the learner with `--resume`), they all die with `up` even on
//! `kill -9`, and the run fails only when one crashes more than `--max-restarts` times within
//! `--restart-window-secs`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum as _;
use serde_json::{json, Value};

use crate::supervise::{ordinal, Event, Exit, RestartPolicy, Spec, Supervisor};
use crate::telemetry::LogFormat;

#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Model: "tiny" (random, for tests), "smollm2" (SmolLM2-135M-Instruct) or a .gguf path.
    #[arg(long, env = "HINDSIGHT_MODEL", default_value = "tiny")]
    pub model: String,
    /// Number of actor processes.
    #[arg(long, env = "HINDSIGHT_ACTORS", default_value_t = 2)]
    pub actors: u32,
    /// Learner ranks: data-parallel learner processes (rank 0 talks to the replay server and
    /// publishes; the ranks all-reduce gradients over TCP on loopback).
    #[arg(long, env = "HINDSIGHT_LEARNER_RANKS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub learner_ranks: u32,
    /// Learner steps to run.
    #[arg(long, env = "HINDSIGHT_STEPS", default_value_t = 5)]
    pub steps: u64,
    /// Run directory (logs, checkpoints, step log, summary.json). Default: runs/<unix time>.
    #[arg(long, env = "HINDSIGHT_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// HiR on (actors generate m per prompt, replays fill the rest) or off (baseline).
    #[arg(long, env = "HINDSIGHT_HINDSIGHT", default_value = "on", value_parser = ["on", "off"])]
    pub hindsight: String,
    /// Reward of an original response: `binary` (every constraint holds: HiR and the binary
    /// baseline) or `cla` (the fraction that hold: the CLA baseline, with --hindsight off).
    #[arg(long, env = "HINDSIGHT_REWARD", value_enum, default_value_t = hindsight_replay_server::Reward::Binary)]
    pub reward: hindsight_replay_server::Reward,
    /// Learner optimizer steps per training batch (the HiR reference takes 2).
    #[arg(long, env = "HINDSIGHT_MINI_BATCHES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub mini_batches: u32,
    /// Groups (prompts) per training batch.
    #[arg(long, env = "HINDSIGHT_PROMPTS_PER_BATCH", default_value_t = 4)]
    pub prompts_per_batch: u32,
    /// Group size n (samples per prompt in a batch).
    #[arg(long, env = "HINDSIGHT_GROUP_SIZE", default_value_t = 8)]
    pub group_size: u32,
    /// Responses generated per prompt with hindsight on (m).
    #[arg(long, env = "HINDSIGHT_RESPONSES_PER_PROMPT", default_value_t = 6)]
    pub responses_per_prompt: u32,
    /// Longest response in tokens.
    #[arg(long, env = "HINDSIGHT_MAX_NEW_TOKENS", default_value_t = 128)]
    pub max_new_tokens: u32,
    /// Learning rate (learner default if unset).
    #[arg(long, env = "HINDSIGHT_LR")]
    pub lr: Option<f64>,
    /// Training prompts as JSONL (default: the built-in seeded generator).
    #[arg(long, env = "HINDSIGHT_PROMPTS")]
    pub prompts: Option<PathBuf>,
    /// Seed of the prompt generator and the actors' samplers.
    #[arg(long, env = "HINDSIGHT_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Model cache directory.
    #[arg(long, env = "HINDSIGHT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Compute threads per process.
    #[arg(long, env = "HINDSIGHT_THREADS_PER_PROCESS", default_value_t = 1)]
    pub threads_per_process: usize,
    /// Learner micro-batch (sequences per forward/backward).
    #[arg(long, env = "HINDSIGHT_MICRO_BATCH", default_value_t = 4)]
    pub micro_batch: usize,
    /// Keep every service running after the last step until Ctrl-C / SIGTERM (to look at
    /// metrics); the summary is written when stopped.
    #[arg(long, env = "HINDSIGHT_LINGER", default_value_t = false)]
    pub linger: bool,
    /// Continue an earlier run in the same --run-dir: the learner resumes from its latest
    /// checkpoint and the replay server from its write-ahead log; --steps counts all steps.
    #[arg(long, env = "HINDSIGHT_RESUME", default_value_t = false)]
    pub resume: bool,
    /// Give up if a step takes longer than this many seconds.
    #[arg(long, env = "HINDSIGHT_STEP_TIMEOUT_SECS", default_value_t = 1800)]
    pub step_timeout_secs: u64,
    /// A process that crashes is restarted (same arguments and ports; the learner resumes
    /// from its newest checkpoint); one more crash than this within --restart-window-secs
    /// fails the run. 0 = never restart.
    #[arg(long, env = "HINDSIGHT_MAX_RESTARTS", default_value_t = 5)]
    pub max_restarts: u32,
    /// The learner writes a checkpoint every this many steps (and at the last one, and when
    /// stopped); the replay server keeps trained batches until a checkpoint covers them.
    #[arg(long, env = "HINDSIGHT_CHECKPOINT_EVERY", default_value_t = 50)]
    pub checkpoint_every: u64,
    /// Groups generated more than this many policy versions behind the learner are dropped.
    #[arg(long, env = "HINDSIGHT_MAX_STALENESS", default_value_t = 4)]
    pub max_staleness: u64,
    /// A prompt lease not answered within this time goes back to the queue (a killed actor's
    /// prompts are generated by another one after it).
    #[arg(long, env = "HINDSIGHT_LEASE_TIMEOUT_SECS", default_value_t = 900)]
    pub lease_timeout_secs: u64,
    /// No TLS and no credentials on the cluster's gRPC ports (anyone who can reach them can
    /// read batches and weights or feed rollouts). By default `up` makes a CA, a server
    /// certificate and per-role tokens in RUN_DIR/secrets and turns both on.
    #[arg(long, env = "HINDSIGHT_INSECURE", default_value_t = false)]
    pub insecure: bool,
    /// The window of --max-restarts, in seconds.
    #[arg(long, env = "HINDSIGHT_RESTART_WINDOW_SECS", default_value_t = 600)]
    pub restart_window_secs: u64,
    /// Run an evaluator that scores the learner's versions (every K-th one at least) on the
    /// first --eval-limit IFEval prompts, greedy, at most --max-new-tokens tokens, into
    /// RUN_DIR/eval.jsonl; `up` waits for the last version's evaluation. 0 = no evaluator.
    #[arg(long, env = "HINDSIGHT_EVAL_EVERY", default_value_t = 0)]
    pub eval_every: u64,
    /// Prompts of the evaluator's held-out set (with --eval-every).
    #[arg(long, env = "HINDSIGHT_EVAL_LIMIT", default_value_t = 64)]
    pub eval_limit: usize,
    /// Send every weight version over gRPC. By default the learner also writes each version
    /// into RUN_DIR/weights and the actors and the evaluator, all on this host, map it from
    /// there (one copy in memory for all of them, nothing copied per process).
    #[arg(long, env = "HINDSIGHT_NO_SHARED_WEIGHTS", default_value_t = false)]
    pub no_shared_weights: bool,
}

/// The first port of the kernel's ephemeral range (Linux's default where it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
}

/// A free loopback port for a child to serve on, chosen below the kernel's ephemeral range.
/// A port from that range (what binding port 0 gives) can become the local end of any outgoing
/// connection on the host between our check and the child's bind, and again before a restarted
/// child binds it anew (ports are chosen once, see `spec`); ports below the range are only ever
/// taken by an explicit bind.
fn free_port() -> Result<SocketAddr> {
    let (low, high) = (10_000u16, ephemeral_low());
    if high > low {
        // xorshift from the clock and pid: concurrent `up`s start at different places.
        let mut x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32)
            | 1;
        for _ in 0..256 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = low + (x % u64::from(high - low)) as u16;
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                return Ok(l.local_addr()?);
            }
        }
    }
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// GETs `http://addr/metrics` and returns the text (plain HTTP/1.0, no client library).
pub fn scrape(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let (_, text) = body
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    Ok(text.to_string())
}

/// Sum of every sample of series `name` (all label sets) in a Prometheus text page.
pub fn series_sum(page: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in page.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

fn read_steps(path: &Path) -> Vec<Value> {
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

pub async fn run(args: UpArgs, log_format: LogFormat) -> Result<()> {
    // One thread for the whole run: it starts and restarts every child, and the children's
    // death signal is tied to the thread that started them (see `supervise::die_with_parent`).
    tokio::task::spawn_blocking(move || run_blocking(args, log_format)).await?
}

fn run_blocking(args: UpArgs, log_format: LogFormat) -> Result<()> {
    if args.actors == 0 {
        bail!("--actors must be at least 1");
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(format!("runs/{t}"))
    });
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let steps_path = run_dir.join("steps.jsonl");
    if !args.resume {
        let _ = std::fs::remove_file(&steps_path);
        let _ = std::fs::remove_file(run_dir.join("batches.jsonl"));
        let _ = std::fs::remove_file(run_dir.join("eval.jsonl"));
        let _ = std::fs::remove_dir_all(run_dir.join("replay-data"));
        let _ = std::fs::remove_dir_all(run_dir.join("checkpoints"));
    }
    let already = current_step(&read_steps(&steps_path));
    let exe = std::env::current_exe().context("locating the hindsight binary")?;
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(hindsight_policy::default_cache_dir);

    // Fetch the model once, before three processes race for it.
    if args.model == "smollm2" {
        eprintln!(
            "fetching SmolLM2-135M-Instruct into {} (once)...",
            cache.display()
        );
        hindsight_policy::fetch_smollm2(&cache)?;
    }

    let replay_addr = free_port()?;
    let learner_addr = free_port()?;
    let security = Security::prepare(&run_dir, args.insecure)?;
    let replay_url = format!("{}://{replay_addr}", security.scheme());
    let learner_url = format!("{}://{learner_addr}", security.scheme());
    let fmt = match log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let threads = args.threads_per_process.to_string();
    // What every process runs: the global flags, its role's arguments, the model cache.
    // Ports are chosen once here, so that a restarted process serves where its peers (and
    // endpoints.json) expect it.
    let spec =
        |name: &str, role_args: Vec<String>, restart_args: &[&str]| -> Result<(Spec, SocketAddr)> {
            let metrics = free_port()?;
            let mut all: Vec<OsString> = [
                "--log-format",
                fmt,
                "--metrics-addr",
                &metrics.to_string(),
                "--threads",
                &threads,
            ]
            .iter()
            .map(OsString::from)
            .collect();
            all.extend(role_args.into_iter().map(OsString::from));
            let spec = Spec {
                name: name.to_string(),
                program: exe.clone(),
                args: all,
                restart_args: restart_args.iter().map(OsString::from).collect(),
                log: logs.join(format!("{name}.log")),
                service: true,
            };
            Ok((spec, metrics))
        };

    // Every child's arguments are its role's typed `Args`, rendered (`ToArgv`): no flag is
    // spelled here, so a renamed flag cannot silently drift.
    use hindsight_service::ToArgv;
    let replay = hindsight_replay_server::ReplayArgs {
        listen: replay_addr,
        model: args.model.clone(),
        cache_dir: Some(cache.clone()),
        prompts: args.prompts.clone(),
        seed: args.seed,
        hindsight: if args.hindsight == "off" {
            hindsight_replay_server::Hindsight::Off
        } else {
            hindsight_replay_server::Hindsight::On
        },
        reward: args.reward,
        prompts_per_batch: args.prompts_per_batch,
        group_size: args.group_size,
        responses_per_prompt: args.responses_per_prompt,
        max_new_tokens: args.max_new_tokens,
        lease_timeout_ms: args.lease_timeout_secs.max(1) * 1000,
        max_staleness: args.max_staleness,
        data_dir: Some(run_dir.join("replay-data")),
        batch_log: Some(run_dir.join("batches.jsonl")),
        security: security.server_args(),
        ..hindsight_service::from_env()?
    };
    let mut replay_args = vec!["replay-server".to_string()];
    replay_args.extend(replay.to_argv());
    let shared_weights_dir = (!args.no_shared_weights).then(|| run_dir.join("weights"));
    let mut learner: hindsight_learner::LearnerArgs = hindsight_learner::LearnerArgs {
        replay: replay_url.clone(),
        shared_weights_dir: shared_weights_dir.clone(),
        listen: learner_addr,
        model: args.model.clone(),
        cache_dir: Some(cache.clone()),
        max_steps: args.steps,
        checkpoint_dir: Some(run_dir.join("checkpoints")),
        step_log: Some(steps_path.clone()),
        micro_batch: args.micro_batch,
        mini_batches: args.mini_batches,
        checkpoint_every: args.checkpoint_every,
        linger: true,
        resume: args.resume,
        server_security: security.server_args(),
        client_security: security.client_args("learner"),
        ..hindsight_service::from_env()?
    };
    if let Some(lr) = args.lr {
        learner.lr = lr;
    }
    // Ranks 1.. are the same learner but for rank, ports and id (the ranks refuse to train
    // together unless their training configuration agrees).
    let mut followers = Vec::new();
    if args.learner_ranks > 1 {
        learner.world_size = Some(args.learner_ranks);
        learner.rank = Some(0);
        learner.rendezvous = Some(free_port()?.to_string());
        for r in 1..args.learner_ranks {
            let rank = hindsight_learner::LearnerArgs {
                rank: Some(r),
                listen: free_port()?,
                learner_id: format!("learner-{r}"),
                step_log: None,
                ..learner.clone()
            };
            let mut argv = vec!["learner".to_string()];
            argv.extend(rank.to_argv());
            followers.push((format!("learner-rank-{r}"), argv));
        }
    }
    let mut learner_args = vec!["learner".to_string()];
    learner_args.extend(learner.to_argv());

    let mut specs = vec![spec("replay-server", replay_args, &[])?];
    // Learner ranks 1.. before rank 0, so that they stop after it (processes stop in reverse
    // order) and hear its Stop.
    for (name, argv) in followers {
        specs.push(spec(&name, argv, &[])?);
    }
    // A restarted learner continues from its newest checkpoint (or starts fresh if there
    // is none yet) rather than from the base model.
    specs.push(spec(
        "learner",
        learner_args,
        if args.resume { &[] } else { &["--resume"] },
    )?);
    for i in 0..args.actors {
        let base: hindsight_actor::ActorArgs = hindsight_service::from_env()?;
        let actor = hindsight_actor::ActorArgs {
            replay: replay_url.clone(),
            learner: learner_url.clone(),
            // No --model: actors take the model and its weights from the learner.
            follow: hindsight_follower::FollowerArgs {
                model: None,
                cache_dir: Some(cache.clone()),
                shared_weights_dir: shared_weights_dir.clone(),
                ..base.follow
            },
            actor_id: Some(format!("actor-{i}")),
            seed: args.seed + i as u64,
            security: security.client_args("actor"),
            ..base
        };
        let mut actor_args = vec!["actor".to_string()];
        actor_args.extend(actor.to_argv());
        specs.push(spec(&format!("actor-{i}"), actor_args, &[])?);
    }
    let eval_path = run_dir.join("eval.jsonl");
    if args.eval_every > 0 {
        // It reads weights as an actor may (the actor's token).
        let base: hindsight_evaluator::EvaluatorArgs = hindsight_service::from_env()?;
        let evaluator = hindsight_evaluator::EvaluatorArgs {
            learner: learner_url.clone(),
            // No --model: like the actors, it takes the model from the learner.
            follow: hindsight_follower::FollowerArgs {
                model: None,
                cache_dir: Some(cache.clone()),
                shared_weights_dir: shared_weights_dir.clone(),
                ..base.follow
            },
            eval_every: args.eval_every,
            eval_limit: args.eval_limit,
            eval_log: Some(eval_path.clone()),
            max_new_tokens: args.max_new_tokens as usize,
            security: security.client_args("actor"),
            ..base
        };
        let mut evaluator_args = vec!["evaluator".to_string()];
        evaluator_args.extend(evaluator.to_argv());
        specs.push(spec("evaluator", evaluator_args, &[])?);
    }
    let endpoints = Endpoints {
        path: run_dir.join("endpoints.json"),
        replay: replay_url,
        learner: learner_url,
        status_args: security.client_args("status").to_argv(),
        metrics: specs.iter().map(|(s, m)| (s.name.clone(), *m)).collect(),
    };
    let policy = RestartPolicy::new(
        args.max_restarts,
        Duration::from_secs(args.restart_window_secs),
    );
    let grace = Duration::from_secs(20);
    let mut sup = Supervisor::new(policy);
    for (s, _) in specs {
        if let Err(e) = sup.start(s) {
            sup.stop(grace);
            return Err(e);
        }
    }
    if let Err(e) = endpoints.write(&sup) {
        sup.stop(grace);
        return Err(e);
    }
    eprintln!(
        "hindsight up: {} actor(s), model {}, {} steps; logs in {}",
        args.actors,
        args.model,
        args.steps,
        logs.display()
    );

    // Ctrl-C / SIGTERM of `up` stops the cluster cleanly.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let _ = signal_flag(sig, stop.clone());
    }

    let pb = indicatif::ProgressBar::new(args.steps);
    pb.set_position(already);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] step {pos}/{len} {bar:30} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message("starting services...");
    pb.enable_steady_tick(Duration::from_millis(200));
    // One line of progress output, above the bar (or plain, when there is no terminal).
    let say = |line: String| {
        if pb.is_hidden() {
            eprintln!("{line}");
        } else {
            pb.println(line);
        }
    };
    let started = Instant::now();
    let mut last_step_at = Instant::now();
    let mut shown = read_steps(&steps_path).len();
    let mut failure: Option<String> = None;
    let mut done_at: Option<Instant> = None;
    let mut evals_shown = 0usize;
    loop {
        sup.sample_memory();
        let steps = read_steps(&steps_path);
        while shown < steps.len() {
            let s = &steps[shown];
            say(format!(
                "step {:>3}  reward {:.3}  success {:.3}  replays {:>3}  generated {:>5}  loss {:+.4}  grad {:.3}  version {}  {:.1}s",
                s["step"], s["reward_mean"].as_f64().unwrap_or(0.0), s["success_rate"].as_f64().unwrap_or(0.0),
                s["replay_samples"], s["generated_responses"], s["loss"].as_f64().unwrap_or(f64::NAN), s["grad_norm"].as_f64().unwrap_or(0.0),
                s["policy_version"], s["step_seconds"].as_f64().unwrap_or(0.0)
            ));
            shown += 1;
            pb.set_message("training");
            last_step_at = Instant::now();
        }
        let evals = read_steps(&eval_path);
        while evals_shown < evals.len() {
            say(eval_line(&evals[evals_shown]));
            evals_shown += 1;
        }
        let step = current_step(&steps);
        pb.set_position(step);
        if step >= args.steps && done_at.is_none() {
            done_at = Some(Instant::now());
            if args.linger {
                say(format!(
                    "all {} steps done; services keep running (Ctrl-C to stop). endpoints: {}",
                    args.steps,
                    endpoints.path.display()
                ));
            }
        }
        // With an evaluator, the run ends when the last version is evaluated (or is too
        // close to the last evaluated one to be due), bounded by --step-timeout-secs.
        let evaluated = args.eval_every == 0
            || evals_cover(&evals, final_version(&steps), args.eval_every)
            || done_at.is_some_and(|t| t.elapsed() > Duration::from_secs(args.step_timeout_secs));
        if done_at.is_some() && !args.linger && evaluated {
            break;
        }
        // Checked before `poll`, the one place that restarts: nothing restarts once stopping.
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            if done_at.is_none() {
                failure = Some("stopped by a signal before the last step".into());
            }
            break;
        }
        let events = match sup.poll(Instant::now()) {
            Ok(events) => events,
            Err(e) => {
                failure = Some(format!("{e:#}"));
                break;
            }
        };
        let mut restarted = false;
        for event in events {
            match event {
                Event::Restarted {
                    name,
                    exit,
                    restart,
                } => {
                    say(format!(
                        "{name} exited ({exit}); restarted ({} restart)",
                        ordinal(restart)
                    ));
                    restarted = true;
                }
                Event::Finished { name } => say(format!("{name} finished (code 0)")),
                Event::GaveUp {
                    name,
                    exit,
                    crashes,
                    log,
                } => {
                    failure = Some(format!(
                        "{name} exited ({exit}) unexpectedly: crash {crashes} within {}s, more than --max-restarts {}; last lines of {}:\n{}",
                        args.restart_window_secs,
                        args.max_restarts,
                        log.display(),
                        tail(&log, 30)
                    ));
                }
            }
        }
        if failure.is_some() {
            break;
        }
        if restarted {
            // A restart changed a pid; a stale file would name a process that is gone.
            if let Err(e) = endpoints.write(&sup) {
                say(format!(
                    "could not rewrite {}: {e:#}",
                    endpoints.path.display()
                ));
            }
        }
        if done_at.is_none() && last_step_at.elapsed() > Duration::from_secs(args.step_timeout_secs)
        {
            failure = Some(format!(
                "no learner step for {}s (--step-timeout-secs)",
                args.step_timeout_secs
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    pb.finish_and_clear();

    // Figures that only the live processes know (a restarted actor's count starts again at
    // its restart: its predecessor's tokens are not in it).
    let mut generated_tokens = 0.0;
    let mut generation_seconds = 0.0;
    for (_, addr) in endpoints
        .metrics
        .iter()
        .filter(|(n, _)| n.starts_with("actor"))
    {
        if let Ok(page) = scrape(*addr) {
            generated_tokens +=
                series_sum(&page, "hindsight_actor_generated_tokens_total").unwrap_or(0.0);
            generation_seconds +=
                series_sum(&page, "hindsight_actor_generation_seconds_sum").unwrap_or(0.0);
        }
    }
    // Actors first, then the learner, then the replay server (it flushes its log last).
    sup.stop(grace);
    let steps = read_steps(&steps_path);
    let mean = |key: &str| {
        let v: Vec<f64> = steps.iter().filter_map(|s| s[key].as_f64()).collect();
        if v.is_empty() {
            Value::Null
        } else {
            json!(v.iter().sum::<f64>() / v.len() as f64)
        }
    };
    let summary = json!({
        "model": args.model,
        "actors": args.actors,
        "arm": arm_label(&args.hindsight, args.reward),
        "hindsight": args.hindsight,
        "reward": args.reward.to_possible_value().map(|v| v.get_name().to_owned()),
        "group_size": args.group_size,
        "responses_per_prompt": args.responses_per_prompt,
        "prompts_per_batch": args.prompts_per_batch,
        "mini_batches": args.mini_batches,
        "lr": learner.lr,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "generated_responses": steps.last().and_then(|s| s["generated_responses"].as_u64()),
        "steps_requested": args.steps,
        "steps_completed": current_step(&steps),
        "ok": failure.is_none(),
        "failure": failure,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "mean_step_seconds": mean("step_seconds"),
        "mean_train_tokens_per_second": mean("train_tokens_per_second"),
        // Generated tokens over the time actors spent generating (per actor; aggregate = x actors).
        "generation_tokens": generated_tokens,
        "generation_tokens_per_second_per_actor": if generation_seconds > 0.0 { json!(generated_tokens / generation_seconds) } else { Value::Null },
        "generation_tokens_per_second_aggregate": if generation_seconds > 0.0 { json!(generated_tokens / generation_seconds * args.actors as f64) } else { Value::Null },
        "processes": sup.procs().iter().map(|p| {
            let last = p.last_exit();
            json!({
                "name": p.spec.name,
                "pid": p.pid,
                "peak_rss_mib": p.peak_rss_kib as f64 / 1024.0,
                // The last instance's exit: its code, or null and the signal that killed it.
                "exit_code": last.and_then(Exit::code),
                "exit_signal": last.and_then(Exit::signal),
                "restarts": p.restarts,
                // Every exit, crashes and the final stop: "code 1", "signal 9".
                "exits": p.exits.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                "log": p.spec.log.display().to_string(),
            })
        }).collect::<Vec<_>>(),
        "steps": steps,
        // The evaluator's scores (RUN_DIR/eval.jsonl): the last one with its version, and all.
        "eval_last": read_steps(&eval_path).last().cloned(),
        "evals": read_steps(&eval_path),
        "run_dir": run_dir.display().to_string(),
    });
    let summary_path = run_dir.join("summary.json");
    std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)?)?;
    eprintln!("summary written to {}", summary_path.display());
    // The learning curves of this run (a figure that cannot be drawn fails nothing).
    if !steps.is_empty() {
        let figure = run_dir.join("plot.png");
        match crate::plot::read_run(&run_dir).and_then(|r| crate::plot::write(&[r], &figure)) {
            Ok(()) => eprintln!("figure written to {}", figure.display()),
            Err(e) => eprintln!("no figure: {e:#}"),
        }
    }
    if let Some(f) = summary["failure"].as_str() {
        bail!("{f}");
    }
    Ok(())
}

/// The paper's name of an arm: HiR (hindsight on, binary reward), binary (off, binary),
/// CLA (off, constraint-level accuracy); other combinations say what they are.
pub fn arm_label(hindsight: &str, reward: hindsight_replay_server::Reward) -> String {
    use hindsight_replay_server::Reward;
    match (hindsight, reward) {
        ("on", Reward::Binary) => "HiR".into(),
        ("off", Reward::Binary) => "binary".into(),
        ("off", Reward::Cla) => "CLA".into(),
        ("on", Reward::Cla) => "HiR+CLA".into(),
        (h, _) => format!("hindsight-{h}"),
    }
}

/// The weight version the learner published with its last step.
fn final_version(steps: &[Value]) -> u64 {
    steps
        .last()
        .and_then(|s| s["policy_version"].as_u64())
        .unwrap_or(0)
}

/// Whether the evaluations cover `version`: one of them is of it, or no later one is due
/// (the newest evaluated is less than `every` versions before it).
fn evals_cover(evals: &[Value], version: u64, every: u64) -> bool {
    evals
        .iter()
        .filter_map(|e| e["version"].as_u64())
        .max()
        .is_some_and(|v| v + every > version)
}

/// One progress line for an evaluation.
fn eval_line(e: &Value) -> String {
    let f = |k: &str| e[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "eval version {}  {} x{}  prompt strict {:.3} loose {:.3}  instruction strict {:.3} loose {:.3}  {:.1}s",
        e["version"], e["bench"].as_str().unwrap_or("?"), e["limit"], f("prompt_strict"),
        f("prompt_loose"), f("instruction_strict"), f("instruction_loose"), f("seconds")
    )
}

/// The learner's step now: the `step` of the last line of its step log. Not the number of
/// lines: a learner restarted from an older checkpoint logs some steps again.
fn current_step(steps: &[Value]) -> u64 {
    steps
        .last()
        .and_then(|s| s["step"].as_u64())
        .unwrap_or(steps.len() as u64)
}

/// `endpoints.json`: where each service listens, its `/metrics` and its current pid.
struct Endpoints {
    path: PathBuf,
    replay: String,
    learner: String,
    /// What `hindsight status` needs to talk to the cluster (CA and the read-only token).
    status_args: Vec<String>,
    /// Each process's `/metrics` address, by name (fixed: a restart keeps its port).
    metrics: BTreeMap<String, SocketAddr>,
}

impl Endpoints {
    fn write(&self, sup: &Supervisor) -> Result<()> {
        let value = json!({
            "replay": self.replay,
            "learner": self.learner,
            "status_args": self.status_args,
            "metrics": self.metrics.iter().map(|(n, a)| (n.clone(), format!("http://{a}/metrics"))).collect::<BTreeMap<_, _>>(),
            "pids": sup.pids(),
        });
        // Others read this file while `up` runs: write aside and rename, so that a reader
        // sees the old file or the new one, never half of one.
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }
}

/// Sets `flag` when signal `sig` arrives (async-signal-safe: one atomic store).
fn signal_flag(
    sig: libc::c_int,
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    use std::sync::atomic::{AtomicPtr, Ordering};
    static FLAG: AtomicPtr<std::sync::atomic::AtomicBool> = AtomicPtr::new(std::ptr::null_mut());
    extern "C" fn handler(_: libc::c_int) {
        let p = FLAG.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: the pointer comes from a leaked Arc and is never freed.
            unsafe { (*p).store(true, Ordering::SeqCst) };
        }
    }
    if FLAG.load(Ordering::SeqCst).is_null() {
        FLAG.store(std::sync::Arc::into_raw(flag) as *mut _, Ordering::SeqCst);
    }
    // SAFETY: installing a handler that only performs an atomic store.
    unsafe {
        libc::signal(sig, handler as *const () as libc::sighandler_t);
    }
    Ok(())
}

/// The cluster's TLS material and credentials: made once per run directory (kept across
/// `--resume`), or none with `--insecure`.
enum Security {
    Insecure,
    Secure { dir: PathBuf },
}

impl Security {
    fn prepare(run_dir: &Path, insecure: bool) -> Result<Self> {
        if insecure {
            tracing::warn!(
                "INSECURE: --insecure turns off TLS and authentication on every gRPC port of this cluster"
            );
            eprintln!(
                "warning: --insecure: no TLS and no authentication on the cluster's gRPC ports"
            );
            return Ok(Security::Insecure);
        }
        let dir = run_dir.join("secrets");
        if !dir.join(hindsight_service::TOKENS_FILE).is_file() {
            hindsight_service::make_certs(&dir, &[], true).with_context(|| {
                format!("making TLS certificates and tokens in {}", dir.display())
            })?;
        }
        Ok(Security::Secure { dir })
    }

    fn scheme(&self) -> &'static str {
        match self {
            Security::Insecure => "http",
            Security::Secure { .. } => "https",
        }
    }

    /// Security settings of a gRPC server.
    fn server_args(&self) -> hindsight_service::ServerSecurityArgs {
        match self {
            Security::Insecure => hindsight_service::ServerSecurityArgs {
                insecure: true,
                ..Default::default()
            },
            Security::Secure { dir } => hindsight_service::ServerSecurityArgs {
                tls_cert: Some(dir.join(hindsight_service::SERVER_CERT_FILE)),
                tls_key: Some(dir.join(hindsight_service::SERVER_KEY_FILE)),
                auth_tokens: Some(dir.join(hindsight_service::TOKENS_FILE)),
                insecure: false,
            },
        }
    }

    /// Security settings of a client with `role`'s credentials.
    fn client_args(&self, role: &str) -> hindsight_service::ClientSecurityArgs {
        match self {
            Security::Insecure => Default::default(),
            Security::Secure { dir } => hindsight_service::ClientSecurityArgs {
                tls_ca: Some(dir.join(hindsight_service::CA_CERT_FILE)),
                token_file: Some(dir.join(format!("{role}.token"))),
                ..Default::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_bindable_and_below_the_ephemeral_range() {
        let low = ephemeral_low();
        let ports: Vec<SocketAddr> = (0..8).map(|_| free_port().unwrap()).collect();
        for addr in &ports {
            assert!(addr.ip().is_loopback());
            if low > 10_000 {
                assert!((10_000..low).contains(&addr.port()), "{addr}");
            }
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
        }
    }
}
