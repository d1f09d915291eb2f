//! `hindsight up`: a whole local cluster on loopback — one replay server, one learner and N
//! actors, each a separate `hindsight` process with its own log file and `/metrics` port —
//! with a progress bar per learner step and a JSON run summary at the end.
//!
//! Run directory layout: `logs/<process>.log`, `steps.jsonl` (the learner's per-step figures),
//! `batches.jsonl` (every sample served, from the replay server), `checkpoints/`,
//! `replay-data/` (the replay server's write-ahead log), `endpoints.json` (addresses, written at
//! start) and `summary.json` (written at the end).

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::telemetry::LogFormat;

#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Model: "tiny" (random, for tests), "smollm2" (SmolLM2-135M-Instruct) or a .gguf path.
    #[arg(long, env = "HINDSIGHT_MODEL", default_value = "tiny")]
    pub model: String,
    /// Number of actor processes.
    #[arg(long, env = "HINDSIGHT_ACTORS", default_value_t = 2)]
    pub actors: u32,
    /// Learner steps to run.
    #[arg(long, env = "HINDSIGHT_STEPS", default_value_t = 5)]
    pub steps: u64,
    /// Run directory (logs, checkpoints, step log, summary.json). Default: runs/<unix time>.
    #[arg(long, env = "HINDSIGHT_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// HiR on (actors generate m per prompt, replays fill the rest) or off (baseline).
    #[arg(long, env = "HINDSIGHT_HINDSIGHT", default_value = "on", value_parser = ["on", "off"])]
    pub hindsight: String,
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
}

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    metrics: SocketAddr,
    peak_rss_kib: u64,
    exit: Option<i32>,
}

impl Proc {
    fn sample_memory(&mut self) {
        let path = format!("/proc/{}/status", self.child.id());
        if let Ok(s) = std::fs::read_to_string(path) {
            for line in s.lines() {
                if let Some(v) = line.strip_prefix("VmHWM:") {
                    let kib = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                    self.peak_rss_kib = self.peak_rss_kib.max(kib);
                }
            }
        }
    }

    fn poll_exit(&mut self) -> Option<i32> {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status.code().unwrap_or(-1));
            }
        }
        self.exit
    }

    fn terminate(&mut self, grace: Duration) {
        if self.poll_exit().is_some() {
            return;
        }
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.poll_exit().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.exit = Some(-9);
    }
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
        let _ = std::fs::remove_dir_all(run_dir.join("replay-data"));
        let _ = std::fs::remove_dir_all(run_dir.join("checkpoints"));
    }
    let already = read_steps(&steps_path).len();
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
    let replay_url = format!("http://{replay_addr}");
    let learner_url = format!("http://{learner_addr}");
    let fmt = match log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let threads = args.threads_per_process.to_string();
    let spawn = |name: &str, role_args: Vec<String>| -> Result<Proc> {
        let metrics = free_port()?;
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(&exe)
            .arg("--log-format")
            .arg(fmt)
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .arg("--threads")
            .arg(&threads)
            .args(&role_args)
            .arg("--cache-dir")
            .arg(&cache)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
            metrics,
            peak_rss_kib: 0,
            exit: None,
        })
    };

    let mut replay_args: Vec<String> = vec![
        "replay-server".into(),
        "--listen".into(),
        replay_addr.to_string(),
        "--model".into(),
        args.model.clone(),
        "--seed".into(),
        args.seed.to_string(),
        "--hindsight".into(),
        args.hindsight.clone(),
        "--prompts-per-batch".into(),
        args.prompts_per_batch.to_string(),
        "--group-size".into(),
        args.group_size.to_string(),
        "--responses-per-prompt".into(),
        args.responses_per_prompt.to_string(),
        "--max-new-tokens".into(),
        args.max_new_tokens.to_string(),
        "--lease-timeout-ms".into(),
        "900000".into(),
        "--data-dir".into(),
        run_dir.join("replay-data").display().to_string(),
        "--batch-log".into(),
        run_dir.join("batches.jsonl").display().to_string(),
    ];
    if let Some(p) = &args.prompts {
        replay_args.push("--prompts".into());
        replay_args.push(p.display().to_string());
    }
    let mut learner_args: Vec<String> = vec![
        "learner".into(),
        "--replay".into(),
        replay_url.clone(),
        "--listen".into(),
        learner_addr.to_string(),
        "--model".into(),
        args.model.clone(),
        "--max-steps".into(),
        args.steps.to_string(),
        "--checkpoint-dir".into(),
        run_dir.join("checkpoints").display().to_string(),
        "--step-log".into(),
        steps_path.display().to_string(),
        "--micro-batch".into(),
        args.micro_batch.to_string(),
        "--linger".into(),
    ];
    if args.resume {
        learner_args.push("--resume".into());
    }
    if let Some(lr) = args.lr {
        learner_args.push("--lr".into());
        learner_args.push(lr.to_string());
    }

    let mut procs = vec![
        spawn("replay-server", replay_args)?,
        spawn("learner", learner_args)?,
    ];
    for i in 0..args.actors {
        procs.push(spawn(
            &format!("actor-{i}"),
            vec![
                "actor".into(),
                "--replay".into(),
                replay_url.clone(),
                "--learner".into(),
                learner_url.clone(),
                "--model".into(),
                args.model.clone(),
                "--actor-id".into(),
                format!("actor-{i}"),
                "--seed".into(),
                (args.seed + i as u64).to_string(),
            ],
        )?);
    }
    let endpoints = json!({
        "replay": replay_url,
        "learner": learner_url,
        "metrics": procs.iter().map(|p| (p.name.clone(), format!("http://{}/metrics", p.metrics))).collect::<BTreeMap<_, _>>(),
        "pids": procs.iter().map(|p| (p.name.clone(), p.child.id())).collect::<BTreeMap<_, _>>(),
    });
    std::fs::write(
        run_dir.join("endpoints.json"),
        serde_json::to_string_pretty(&endpoints)?,
    )?;
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
    pb.set_position(already as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] step {pos}/{len} {bar:30} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message("starting services...");
    pb.enable_steady_tick(Duration::from_millis(200));
    let started = Instant::now();
    let mut last_step_at = Instant::now();
    let mut shown = already;
    let mut failure: Option<String> = None;
    let mut done_at: Option<Instant> = None;
    loop {
        for p in procs.iter_mut() {
            p.sample_memory();
        }
        let steps = read_steps(&steps_path);
        while shown < steps.len() {
            let s = &steps[shown];
            let line = format!(
                "step {:>3}  reward {:.3}  success {:.3}  replays {:>3}  loss {:+.4}  grad {:.3}  version {}  {:.1}s",
                s["step"], s["reward_mean"].as_f64().unwrap_or(0.0), s["success_rate"].as_f64().unwrap_or(0.0),
                s["replay_samples"], s["loss"].as_f64().unwrap_or(f64::NAN), s["grad_norm"].as_f64().unwrap_or(0.0),
                s["policy_version"], s["step_seconds"].as_f64().unwrap_or(0.0)
            );
            if pb.is_hidden() {
                eprintln!("{line}");
            } else {
                pb.println(line);
            }
            shown += 1;
            pb.set_position(shown as u64);
            pb.set_message("training");
            last_step_at = Instant::now();
        }
        if shown as u64 >= args.steps && done_at.is_none() {
            done_at = Some(Instant::now());
            if args.linger {
                pb.println(format!(
                    "all {} steps done; services keep running (Ctrl-C to stop). endpoints: {}",
                    args.steps,
                    run_dir.join("endpoints.json").display()
                ));
            }
        }
        if done_at.is_some() && !args.linger {
            break;
        }
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            if done_at.is_none() {
                failure = Some("stopped by a signal before the last step".into());
            }
            break;
        }
        for p in procs.iter_mut() {
            p.poll_exit();
        }
        if let Some(p) = procs.iter().find(|p| p.exit.is_some()) {
            failure = Some(format!(
                "{} exited ({:?}) unexpectedly; last lines of {}:\n{}",
                p.name,
                p.exit,
                p.log.display(),
                tail(&p.log, 30)
            ));
            break;
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

    // Figures that only the live processes know.
    let mut generated_tokens = 0.0;
    let mut generation_seconds = 0.0;
    for p in procs.iter().filter(|p| p.name.starts_with("actor")) {
        if let Ok(page) = scrape(p.metrics) {
            generated_tokens +=
                series_sum(&page, "hindsight_actor_generated_tokens_total").unwrap_or(0.0);
            generation_seconds +=
                series_sum(&page, "hindsight_actor_generation_seconds_sum").unwrap_or(0.0);
        }
    }
    // Stop actors first, then the learner, then the replay server (it flushes its log last).
    for p in procs.iter_mut().rev() {
        p.sample_memory();
        p.terminate(Duration::from_secs(20));
    }
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
        "hindsight": args.hindsight,
        "steps_requested": args.steps,
        "steps_completed": steps.len(),
        "ok": failure.is_none(),
        "failure": failure,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "mean_step_seconds": mean("step_seconds"),
        "mean_train_tokens_per_second": mean("train_tokens_per_second"),
        // Generated tokens over the time actors spent generating (per actor; aggregate = x actors).
        "generation_tokens": generated_tokens,
        "generation_tokens_per_second_per_actor": if generation_seconds > 0.0 { json!(generated_tokens / generation_seconds) } else { Value::Null },
        "generation_tokens_per_second_aggregate": if generation_seconds > 0.0 { json!(generated_tokens / generation_seconds * args.actors as f64) } else { Value::Null },
        "processes": procs.iter().map(|p| json!({
            "name": p.name, "pid": p.child.id(), "peak_rss_mib": p.peak_rss_kib as f64 / 1024.0, "exit_code": p.exit,
            "log": p.log.display().to_string(),
        })).collect::<Vec<_>>(),
        "steps": steps,
        "run_dir": run_dir.display().to_string(),
    });
    let summary_path = run_dir.join("summary.json");
    std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)?)?;
    eprintln!("summary written to {}", summary_path.display());
    if let Some(f) = summary["failure"].as_str() {
        bail!("{f}");
    }
    Ok(())
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
