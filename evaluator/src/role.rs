//! `hindsight evaluator`: follows the learner's weight versions the way an actor does (the
//! model's description from `Weights.Model` with its fingerprint checked, the long-polled
//! `Latest`, chunked and checksummed fetches, weights prepared in the background: the shared
//! `hindsight-follower`; with `--model`, local files checked against the learner's model and
//! evaluated as version 0, as an actor does), evaluates a version when it is at least `--eval-every` versions
//! after the last one it evaluated (the first version it sees, normally the base model's
//! version 0, always), on a fixed held-out set (the first `--eval-limit` prompts of
//! `--bench`), greedy by default. Each evaluation is exported as metrics
//! ([`crate::metrics`]) and appended to `--eval-log` as one JSON line:
//! `{version, step, bench, limit, prompt_strict, prompt_loose, instruction_strict,
//! instruction_loose, seconds, time_unix}`.
//!
//! While an evaluation runs, newer versions replace each other in the follower; the next
//! evaluation takes the newest. The evaluator is ready (`/readyz`) once it holds weights; on
//! SIGTERM it turns not ready and stops (an evaluation in progress is abandoned: nothing is
//! written for it).

use std::future::Future;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use hindsight_follower::Started;
use hindsight_service::ConfigError;
use serde_json::json;
use tokio::sync::watch;
use tracing::info;

use crate::bench::Benchmark;
use crate::generate::{generate, score, Settings};
use crate::metrics;

/// Command-line / environment configuration of `hindsight evaluator`.
#[derive(clap::Args, Clone, Debug)]
pub struct EvaluatorArgs {
    /// Learner whose Weights service publishes the versions to evaluate (the model comes
    /// from it too).
    #[arg(
        long,
        env = "HINDSIGHT_LEARNER",
        default_value = "http://127.0.0.1:50052"
    )]
    pub learner: String,
    /// The model and how to generate (`--model`, `--cache-dir`, `--precision`, `--device`,
    /// `--max-batch`); without `--model` the evaluator takes the model from the learner.
    #[command(flatten)]
    pub follow: hindsight_follower::FollowerArgs,
    /// The held-out set: `ifeval`, `ifbench` (shipped with the binary) or a .jsonl file of
    /// {key, prompt, instruction_id_list, kwargs}.
    #[arg(long, env = "HINDSIGHT_BENCH", default_value = "ifeval")]
    pub bench: String,
    /// Evaluate the first N prompts of --bench (0 = all of them).
    #[arg(long, env = "HINDSIGHT_EVAL_LIMIT", default_value_t = 64)]
    pub eval_limit: usize,
    /// Evaluate a version when it is at least K versions after the last evaluated one.
    #[arg(long, env = "HINDSIGHT_EVAL_EVERY", default_value_t = 1)]
    pub eval_every: u64,
    /// Most tokens generated per response.
    #[arg(long, env = "HINDSIGHT_MAX_NEW_TOKENS", default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0 = greedy: the same weights give the same scores).
    #[arg(long, env = "HINDSIGHT_TEMPERATURE", default_value_t = 0.0)]
    pub temperature: f32,
    /// Seed of the sampler (only used with a positive temperature).
    #[arg(long, env = "HINDSIGHT_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Append one JSON line per evaluated version here (e.g. RUN_DIR/eval.jsonl).
    #[arg(long, env = "HINDSIGHT_EVAL_LOG")]
    pub eval_log: Option<PathBuf>,
    /// How the evaluator proves itself to the learner (`--tls-ca`, `--token-file`: an
    /// actor's or the status token will do, both may read weights).
    #[command(flatten)]
    pub security: hindsight_service::ClientSecurityArgs,
    /// The drain bound after SIGTERM.
    #[command(flatten)]
    pub shutdown: hindsight_service::ShutdownArgs,
}

impl Default for EvaluatorArgs {
    /// The same values as the command-line defaults (tested).
    fn default() -> Self {
        EvaluatorArgs {
            learner: "http://127.0.0.1:50052".into(),
            follow: Default::default(),
            bench: "ifeval".into(),
            eval_limit: 64,
            eval_every: 1,
            max_new_tokens: 512,
            temperature: 0.0,
            seed: 0,
            eval_log: None,
            security: Default::default(),
            shutdown: Default::default(),
        }
    }
}

impl hindsight_service::ToArgv for EvaluatorArgs {
    /// The flags that parse back to these settings (every one, defaults included).
    fn to_argv(&self) -> Vec<String> {
        let mut a = hindsight_service::Argv::new();
        a.opt("--learner", &self.learner)
            .extend(&self.follow)
            .opt("--bench", &self.bench)
            .opt("--eval-limit", self.eval_limit)
            .opt("--eval-every", self.eval_every)
            .opt("--max-new-tokens", self.max_new_tokens)
            .opt("--temperature", self.temperature)
            .opt("--seed", self.seed)
            .path_some("--eval-log", &self.eval_log)
            .extend(&self.security)
            .extend(&self.shutdown);
        a.into_vec()
    }
}

/// One evaluated version: the line appended to `eval.jsonl`.
pub fn eval_line(
    version: u64,
    step: u64,
    bench: &str,
    limit: usize,
    s: &hindsight_constraints::score::Scores,
    seconds: f64,
) -> serde_json::Value {
    let time_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    json!({
        "version": version,
        "step": step,
        "bench": bench,
        "limit": limit,
        "prompt_strict": s.prompt_strict.unwrap_or(0.0),
        "prompt_loose": s.prompt_loose.unwrap_or(0.0),
        "instruction_strict": s.instruction_strict.unwrap_or(0.0),
        "instruction_loose": s.instruction_loose.unwrap_or(0.0),
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "time_unix": (time_unix * 1000.0).round() / 1000.0,
    })
}

/// Runs the evaluator until `shutdown` resolves.
pub async fn run(
    args: EvaluatorArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    metrics::describe();
    if args.eval_every == 0 {
        return Err(ConfigError::wrap(anyhow::anyhow!(
            "--eval-every must be at least 1"
        )));
    }
    let generation = args.follow.generation()?;
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(ConfigError::wrap(anyhow::anyhow!(
            "--temperature must be a finite number >= 0"
        )));
    }
    let bench = Arc::new(Benchmark::load(&args.bench, args.eval_limit).map_err(ConfigError::wrap)?);
    if let Some(log) = &args.eval_log {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening --eval-log {}", log.display()))
            .map_err(ConfigError::wrap)?;
    }
    let security = hindsight_service::ClientSecurity::from_args(&args.security)?;
    metrics::init();
    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        hindsight_service::set_not_ready("draining");
        let _ = stop_tx.send(true);
    });
    let mut client = hindsight_follower::connect(&security, &args.learner).await?;
    let local = args.follow.local_model();
    let started = hindsight_follower::start_model(
        &mut client,
        local.as_ref(),
        &generation,
        stop.clone(),
        metrics::OBSERVER,
    );
    let Started {
        mut sampler,
        follower,
        tokenizer,
        version,
        learner_step,
        ..
    } = tokio::select! {
        m = started => m?,
        _ = stop.wait_for(|s| *s) => return Ok(()),
    };
    info!(bench = %bench.name, prompts = bench.prompts.len(), every = args.eval_every,
        "evaluator following the learner");
    let tokenizer = Arc::new(tokenizer);
    let settings = Settings {
        temperature: args.temperature,
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
    };
    // The version the sampler holds; the first one is always evaluated.
    let (mut version, mut step) = (version.unwrap_or(0), learner_step);
    hindsight_service::set_ready();
    loop {
        let mut s = sampler;
        info!(policy_version = version, learner_step = step, "evaluating");
        let (b, t, st) = (bench.clone(), tokenizer.clone(), settings.clone());
        // Set at shutdown: the generation stops at the next finished sequence.
        let cancel = Arc::new(AtomicBool::new(false));
        let cancelled = cancel.clone();
        let job = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut responses = vec![String::new(); b.prompts.len()];
            let mut tokens = 0usize;
            let todo: Vec<usize> = (0..b.prompts.len()).collect();
            let r = generate(&mut s, &t, &b, &todo, &st, &mut |r| {
                anyhow::ensure!(!cancelled.load(Ordering::Relaxed), "evaluation cancelled");
                tokens += r.token_ids.len();
                responses[r.index] = r.text;
                Ok(())
            });
            let gen_secs = started.elapsed().as_secs_f64();
            let scored = r.map(|()| score(&b, &responses, 1));
            (s, scored, tokens, gen_secs, started.elapsed().as_secs_f64())
        });
        let (s, scored, tokens, gen_secs, seconds) = tokio::select! {
            j = job => j.context("evaluation task")?,
            // Nothing is written for an evaluation cut short.
            _ = stop.wait_for(|s| *s) => {
                cancel.store(true, Ordering::Relaxed);
                return Ok(());
            }
        };
        sampler = s;
        let scored = scored?;
        let sc = &scored.scores;
        metrics::record_scores(&bench.name, sc, version, step);
        ::metrics::counter!(metrics::RESPONSES).increment(bench.prompts.len() as u64);
        ::metrics::counter!(metrics::GENERATED_TOKENS).increment(tokens as u64);
        ::metrics::gauge!(metrics::TOKENS_PER_SECOND).set(tokens as f64 / gen_secs.max(1e-9));
        ::metrics::histogram!(metrics::EVALUATION_SECONDS).record(seconds);
        let line = eval_line(version, step, &bench.name, bench.prompts.len(), sc, seconds);
        if let Some(path) = &args.eval_log {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
        }
        info!(
            policy_version = version,
            learner_step = step,
            prompt_strict = format!("{:.4}", sc.prompt_strict.unwrap_or(0.0)),
            prompt_loose = format!("{:.4}", sc.prompt_loose.unwrap_or(0.0)),
            instruction_strict = format!("{:.4}", sc.instruction_strict.unwrap_or(0.0)),
            instruction_loose = format!("{:.4}", sc.instruction_loose.unwrap_or(0.0)),
            seconds = format!("{seconds:.1}"),
            tokens_per_s = format!("{:.1}", tokens as f64 / gen_secs.max(1e-9)),
            "evaluated"
        );
        // The next version due: at least --eval-every after this one.
        let update = loop {
            let update = tokio::select! {
                u = follower.next() => u.context("following the learner's weights")?,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            if update.version >= version + args.eval_every {
                break update;
            }
        };
        sampler
            .install(update.weights)
            .with_context(|| format!("installing weights version {}", update.version))?;
        (version, step) = (update.version, update.learner_step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: EvaluatorArgs,
    }

    #[test]
    fn clap_defaults_match_default_impl() {
        let parsed = Cli::parse_from(["x"]).args;
        assert_eq!(
            format!("{parsed:?}"),
            format!("{:?}", EvaluatorArgs::default())
        );
    }

    #[test]
    fn renders_to_flags_that_parse_back() {
        let args = EvaluatorArgs {
            eval_limit: 4,
            eval_every: 3,
            eval_log: Some("/tmp/run/eval.jsonl".into()),
            bench: "ifbench".into(),
            follow: hindsight_follower::FollowerArgs {
                model: Some("tiny".into()),
                cache_dir: Some("/tmp/cache".into()),
                shared_weights_dir: Some("/w".into()),
                ..Default::default()
            },
            security: hindsight_service::ClientSecurityArgs {
                tls_ca: Some("/s/ca.pem".into()),
                token_file: Some("/s/actor.token".into()),
                token: Some("t".into()),
                tls_domain: Some("learner".into()),
            },
            ..Default::default()
        };
        hindsight_service::assert_round_trip(&args);
    }

    #[test]
    fn eval_line_has_the_plot_format() {
        let s = hindsight_constraints::score::Scores {
            records: 2,
            instructions: 3,
            prompt_strict: Some(0.5),
            prompt_loose: Some(0.5),
            instruction_strict: Some(2.0 / 3.0),
            instruction_loose: Some(1.0),
            per_id: Default::default(),
        };
        let v = eval_line(3, 3, "ifeval", 2, &s, 1.25);
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = vec![
            "version",
            "step",
            "bench",
            "limit",
            "prompt_strict",
            "prompt_loose",
            "instruction_strict",
            "instruction_loose",
            "seconds",
            "time_unix",
        ];
        want.sort_unstable();
        let mut got = keys.clone();
        got.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(v["version"], 3);
        assert_eq!(v["instruction_loose"], 1.0);
    }
}
