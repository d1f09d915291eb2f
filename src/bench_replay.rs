//! `hindsight bench replay`: a load benchmark of the replay server with its own client.
//!
//! For each configuration (number of rollout streams x simulated learner on / off) it starts
//! the replay server as a real separate process (this binary, `replay-server`, a fresh data
//! directory: the write-ahead log is on, every group is fsynced before its ack), drives it
//! with S concurrent `StreamRollouts` streams (each its own connection, as S actors would
//! be) that share one pool of prefetched leases, and optionally a learner that acks every
//! batch at once. It reports groups acknowledged per second, ack latency (from sending a
//! group to receiving its ack), batches per second, the server's resident memory (sampled
//! every 100 ms from `/proc/<pid>/status`), how often leases were refused (back-pressure),
//! and where the server's CPU went (per thread, from `/proc/<pid>/task/*/stat`).
//!
//! The client shares the machine with the server, so its own CPU share is reported too: on
//! a small machine the figures are those of server and client together.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hindsight_proto::v1::replay_client::ReplayClient;
use hindsight_proto::v1::{
    AckBatchRequest, BatchStreamRequest, CommitBatchesRequest, LeaseRequest,
    RegisterLearnerRequest, Response as RolloutResponse, RolloutGroup,
};
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The figure the replay server is held to (printed with every run).
pub const GOAL: &str = "goal: >= 3000 groups/s at 32 streams, p99 < 25 ms, WAL on";
const GOAL_STREAMS: usize = 32;
const GOAL_GROUPS_PER_S: f64 = 3000.0;
const GOAL_P99_MS: f64 = 25.0;

/// Server settings every configuration shares: the tiny model's tokenizer, 6 responses of
/// 64 tokens per group, batches of 4 prompts of 8 samples (6 originals + 2 replays each).
const NUM_PROMPTS: usize = 4096;
const RESPONSES: usize = 6;
const GROUP_SIZE: usize = 8;
const PROMPTS_PER_BATCH: usize = 4;
const NEW_TOKENS: usize = 64;
/// High enough that a group is never too stale (the simulated learner moves fast).
const MAX_STALENESS: u64 = 1_000_000;
/// Long enough that no lease of the pool expires during a run.
const LEASE_TIMEOUT_MS: u64 = 600_000;
/// `--max-pending-batches` with a learner: room for its prefetch and a few streams' worth.
const LEARNER_PENDING_BATCHES: u64 = 64;
/// Bounds so high that the limiter never stops ingest without a learner.
const UNBOUNDED_PENDING_BATCHES: u64 = 100_000_000;
const UNBOUNDED_PENDING_BYTES: u64 = 100_000_000_000;
/// The server's default `--max-pending-batches` (the bounded no-learner case).
const DEFAULT_PENDING_BATCHES: u64 = 2;
/// The simulated learner's prefetch window and checkpoint period (in batches).
const LEARNER_PREFETCH: u32 = 4;
const COMMIT_EVERY: u64 = 10;
const LEARNER_ID: &str = "bench-learner";
/// Most prompts one LeasePrompts call may ask for (the server's own cap).
const MAX_PROMPTS_PER_LEASE: usize = 1024;
/// How often the server's memory is sampled.
const MEMORY_PERIOD: Duration = Duration::from_millis(100);
/// How long streams may take to get their last acks after the measured window.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a server may take to answer its health check after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Distinct responses prepared up front; groups are drawn from them so that the client
/// spends its CPU on the wire, not on random numbers.
const PREPARED_RESPONSES: usize = 512;

/// English text whose token ids make the responses (the verifiers see words, sentences,
/// punctuation and markdown, as they would with a real policy).
const CORPUS: &str = "The lighthouse keeper climbed the stairs every evening, counting \
    the steps as he went. There were one hundred and twelve of them, and he knew each by its \
    sound. * First, check the lamp. * Second, wind the clock. * Third, write the log. \
    Photosynthesis is how plants turn sunlight, water and air into sugar; the leaves are \
    small factories. Learning a new language takes patience: read a little every day, speak \
    without fear of mistakes, and listen to music in that language! Rain taps on the roof \
    like a quiet drum. WHY IS THE SKY BLUE? Because air scatters short waves of light more \
    than long ones. My ideal weekend starts with a slow breakfast, then a long walk by the \
    river, and ends with a good book. Is there anything else I can help with? \"A cat who \
    liked to code\" wrote loops all day, and her tests always passed. P.S. the heist began \
    at midnight; by dawn the vault was empty and the crew had vanished. In summary, three \
    sentences are enough. Section 1: the plan. Section 2: the twist. ";

/// Whether a simulated learner consumes the batches.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LearnerChoice {
    /// A learner that acks every batch at once and commits every 10.
    On,
    /// No learner: groups pile up in the write-ahead log.
    Off,
    /// Each stream count with and without a learner.
    Both,
}

/// Where the responses' token ids come from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenChoice {
    /// Windows of an English text's token ids: the verifiers judge real words (default).
    Text,
    /// Uniform ids in 3..vocabulary size. With the tiny tokenizer most such ids decode to
    /// nothing, so verification is cheaper than with a real policy.
    Random,
}

#[derive(clap::Args, Debug)]
pub struct BenchReplayArgs {
    /// Concurrent rollout streams, one configuration per value (each stream is its own
    /// connection and `StreamRollouts` call, like one actor).
    #[arg(
        long,
        env = "HINDSIGHT_BENCH_STREAMS",
        value_delimiter = ',',
        default_value = "1,8,32,128"
    )]
    pub streams: Vec<usize>,
    /// Groups each stream keeps in flight (sent and not yet acknowledged).
    #[arg(long, env = "HINDSIGHT_BENCH_WINDOW", default_value_t = 4)]
    pub window: usize,
    /// Measured seconds per configuration.
    #[arg(long, env = "HINDSIGHT_BENCH_SECONDS", default_value_t = 10.0)]
    pub seconds: f64,
    /// Seconds of load before the measured window (not counted).
    #[arg(long, env = "HINDSIGHT_BENCH_WARMUP_SECONDS", default_value_t = 2.0)]
    pub warmup_seconds: f64,
    /// Simulated learner: `on` (acks every batch at once, `--max-pending-batches 64`), `off`
    /// (no learner and no limit: memory must stay bounded with groups piling up), `both`.
    #[arg(long, env = "HINDSIGHT_BENCH_LEARNER", value_enum, default_value_t = LearnerChoice::Both)]
    pub learner: LearnerChoice,
    /// Also run the no-learner case at the largest stream count with the server's default
    /// bound (`--max-pending-batches 2`): leases pause. `--bounded false` leaves it out.
    #[arg(
        long,
        env = "HINDSIGHT_BENCH_BOUNDED",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub bounded: bool,
    /// Token ids of the responses: `text` (an English text's) or `random`.
    #[arg(long, env = "HINDSIGHT_BENCH_TOKENS", value_enum, default_value_t = TokenChoice::Text)]
    pub tokens: TokenChoice,
    /// Write every figure (and the memory series) as JSON to this file.
    #[arg(long, env = "HINDSIGHT_BENCH_JSON")]
    pub json: Option<PathBuf>,
    /// Model cache directory (the tiny tokenizer needs none; passed on to the server).
    #[arg(long, env = "HINDSIGHT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// One measured configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Configuration {
    streams: usize,
    learner: bool,
    /// Without a learner: the server's default bound instead of none.
    bounded: bool,
}

impl Configuration {
    fn label(&self) -> &'static str {
        match (self.learner, self.bounded) {
            (true, _) => "on",
            (false, false) => "off",
            (false, true) => "off, bounded",
        }
    }

    /// `--max-pending-batches` and `--max-pending-bytes` (None: the server's default).
    fn pending_bounds(&self) -> (u64, Option<u64>) {
        match (self.learner, self.bounded) {
            (true, _) => (LEARNER_PENDING_BATCHES, None),
            (false, false) => (UNBOUNDED_PENDING_BATCHES, Some(UNBOUNDED_PENDING_BYTES)),
            (false, true) => (DEFAULT_PENDING_BATCHES, None),
        }
    }
}

/// The configurations `args` asks for, in the order they run.
fn configurations(args: &BenchReplayArgs) -> Vec<Configuration> {
    let modes: &[bool] = match args.learner {
        LearnerChoice::On => &[true],
        LearnerChoice::Off => &[false],
        LearnerChoice::Both => &[true, false],
    };
    let mut out: Vec<Configuration> = args
        .streams
        .iter()
        .flat_map(|&streams| {
            modes.iter().map(move |&learner| Configuration {
                streams,
                learner,
                bounded: false,
            })
        })
        .collect();
    if args.bounded && args.learner != LearnerChoice::On {
        if let Some(&streams) = args.streams.iter().max() {
            out.push(Configuration {
                streams,
                learner: false,
                bounded: true,
            });
        }
    }
    out
}

/// The server's command line (after the binary): the global flags, then the role's typed
/// [`ReplayArgs`](hindsight_replay_server::ReplayArgs) rendered by `ToArgv`, as `hindsight up`
/// does, so no replay-server flag is spelled here.
fn server_args(
    cfg: &Configuration,
    port: u16,
    data_dir: &Path,
    insecure: bool,
    cache_dir: Option<&Path>,
    metrics_port: Option<u16>,
) -> Vec<String> {
    use hindsight_service::ToArgv;
    // The server's metrics port, on a free port (the bench reads the batch assembly histogram
    // there), or off.
    let metrics = metrics_port.map_or_else(|| "off".to_string(), |p| format!("127.0.0.1:{p}"));
    let (max_pending_batches, max_pending_bytes) = cfg.pending_bounds();
    let defaults = hindsight_replay_server::ReplayArgs::default();
    let replay = hindsight_replay_server::ReplayArgs {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        model: "tiny".into(),
        cache_dir: cache_dir.map(Path::to_path_buf),
        data_dir: Some(data_dir.to_path_buf()),
        num_prompts: NUM_PROMPTS,
        responses_per_prompt: RESPONSES as u32,
        group_size: GROUP_SIZE as u32,
        prompts_per_batch: PROMPTS_PER_BATCH as u32,
        max_new_tokens: NEW_TOKENS as u32,
        max_staleness: MAX_STALENESS,
        lease_timeout_ms: LEASE_TIMEOUT_MS,
        max_pending_batches: max_pending_batches as u32,
        max_pending_bytes: max_pending_bytes.unwrap_or(defaults.max_pending_bytes),
        security: hindsight_service::ServerSecurityArgs {
            insecure,
            ..Default::default()
        },
        ..defaults
    };
    let mut a: Vec<String> = [
        "--log-level",
        "info",
        "--metrics-addr",
        &metrics,
        "replay-server",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(replay.to_argv());
    a
}

/// Nearest-rank percentile (`p` in 0..=100) of ascending `sorted` values; None when empty.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// CPU time of one server thread over the measured window.
#[derive(Debug, Clone, Serialize)]
struct ThreadCpu {
    tid: u32,
    name: String,
    cpu_percent: f64,
}

/// Everything measured for one configuration (one row of the table, one JSON object).
#[derive(Debug, Clone, Default, Serialize)]
struct Outcome {
    streams: usize,
    learner: String,
    max_pending_batches: u64,
    max_pending_bytes: Option<u64>,
    seconds: f64,
    groups_acked: u64,
    groups_per_s: f64,
    ack_p50_ms: Option<f64>,
    ack_p99_ms: Option<f64>,
    ack_max_ms: Option<f64>,
    batches: Option<u64>,
    batches_per_s: Option<f64>,
    rss_peak_mb: Option<f64>,
    rss_end_mb: Option<f64>,
    /// The server's VmRSS at the start of the load and every second after it.
    rss_mb_each_second: Vec<f64>,
    /// RESOURCE_EXHAUSTED answers to LeasePrompts in the measured window, and in the whole run.
    leases_refused: u64,
    leases_refused_total: u64,
    /// Server and client CPU over the measured window (100% = one core).
    server_cpu_percent: Option<f64>,
    client_cpu_percent: Option<f64>,
    server_threads: Vec<ThreadCpu>,
    /// Reading each served batch back from the log and assembling it (the server's
    /// `hindsight_replay_batch_assembly_seconds`, over the measured window): mean per batch,
    /// and the share of one core it took.
    assembly_ms_mean: Option<f64>,
    assembly_core_percent: Option<f64>,
    errors: u64,
    first_error: Option<String>,
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// The results as a markdown table.
fn format_table(rows: &[Outcome]) -> String {
    let mut s = String::from(
        "| streams | learner | groups/s | ack p50 ms | ack p99 ms | batches/s | server RSS peak MB | RSS end MB | leases refused |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let groups = if r.errors > 0 {
            format!("{:.0} (errors)", r.groups_per_s)
        } else {
            format!("{:.0}", r.groups_per_s)
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.streams,
            r.learner,
            groups,
            fmt_opt(r.ack_p50_ms, 1),
            fmt_opt(r.ack_p99_ms, 1),
            fmt_opt(r.batches_per_s, 1),
            fmt_opt(r.rss_peak_mb, 1),
            fmt_opt(r.rss_end_mb, 1),
            r.leases_refused
        );
    }
    s
}

/// The goal's verdict for each configuration at [`GOAL_STREAMS`] streams (except the bounded
/// one, which is meant to stop).
fn goal_verdicts(rows: &[Outcome]) -> Vec<String> {
    rows.iter()
        .filter(|r| r.streams == GOAL_STREAMS && r.learner != "off, bounded")
        .map(|r| {
            let p99 = r.ack_p99_ms.unwrap_or(f64::INFINITY);
            let met = r.errors == 0 && r.groups_per_s >= GOAL_GROUPS_PER_S && p99 < GOAL_P99_MS;
            format!(
                "{} streams, learner {}: {:.0} groups/s, p99 {} ms: {}",
                r.streams,
                r.learner,
                r.groups_per_s,
                fmt_opt(r.ack_p99_ms, 1),
                if met { "goal met" } else { "goal MISSED" }
            )
        })
        .collect()
}

/// A one-line summary of where the server's CPU went, by thread name.
fn format_threads(threads: &[ThreadCpu]) -> String {
    let mut by_name: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for t in threads {
        let e = by_name.entry(t.name.as_str()).or_default();
        e.0 += 1;
        e.1 += t.cpu_percent;
    }
    let mut v: Vec<_> = by_name.into_iter().collect();
    v.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    v.iter()
        .filter(|(_, (_, cpu))| *cpu >= 0.5)
        .map(|(name, (n, cpu))| format!("{name} x{n} {cpu:.0}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A small deterministic generator (SplitMix64): the bench needs no cryptographic quality.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo).max(1) as u64) as usize
    }

    /// Uniform in `[lo, hi]`.
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * unit as f32
    }
}

/// Responses prepared once and combined into groups.
struct Material {
    responses: Vec<RolloutResponse>,
}

impl Material {
    fn new(tokens: TokenChoice, cache_dir: &Path) -> Result<Self> {
        let tokenizer = hindsight_policy::load_tokenizer("tiny", cache_dir)
            .context("loading the tiny tokenizer")?;
        let vocab = tokenizer.vocab_size();
        let text_ids = tokenizer.encode(&CORPUS.repeat(2))?;
        anyhow::ensure!(
            vocab > 3 && text_ids.len() > NEW_TOKENS,
            "the tiny tokenizer is not what the benchmark expects"
        );
        let mut rng = SplitMix(0x5EED);
        let responses = (0..PREPARED_RESPONSES)
            .map(|_| {
                let token_ids: Vec<u32> = match tokens {
                    TokenChoice::Text => {
                        let at = rng.range(0, text_ids.len() - NEW_TOKENS);
                        text_ids[at..at + NEW_TOKENS].to_vec()
                    }
                    TokenChoice::Random => (0..NEW_TOKENS)
                        .map(|_| rng.range(3, vocab) as u32)
                        .collect(),
                };
                RolloutResponse {
                    logprobs: (0..NEW_TOKENS).map(|_| rng.uniform(-5.0, -0.01)).collect(),
                    entropies: (0..NEW_TOKENS).map(|_| rng.uniform(0.01, 2.0)).collect(),
                    token_ids,
                    finished: false,
                    text: String::new(),
                }
            })
            .collect();
        Ok(Self { responses })
    }

    /// The group answering `lease`; `cursor` walks through the prepared responses.
    fn group(&self, actor_id: &str, lease: Lease, cursor: &mut usize) -> RolloutGroup {
        let responses = (0..RESPONSES)
            .map(|_| {
                *cursor = (*cursor + 1) % self.responses.len();
                self.responses[*cursor].clone()
            })
            .collect();
        RolloutGroup {
            actor_id: actor_id.to_owned(),
            prompt_id: lease.prompt_id,
            lease_id: lease.lease_id,
            policy_version: 0,
            responses,
            generation_ms: 0,
            model_fingerprint: String::new(),
        }
    }
}

/// The run's timeline: load starts at `start`, only `window_start..window_end` counts.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    window_start: Instant,
    window_end: Instant,
}

impl Clock {
    fn new(warmup: f64, seconds: f64) -> Self {
        let start = Instant::now();
        let window_start = start + Duration::from_secs_f64(warmup);
        Self {
            start,
            window_start,
            window_end: window_start + Duration::from_secs_f64(seconds),
        }
    }

    fn in_window(&self, t: Instant) -> bool {
        t >= self.window_start && t < self.window_end
    }
}

/// Errors of one configuration: how many, and the first (the one worth reading).
#[derive(Default)]
struct Errors {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

impl Errors {
    fn record(&self, what: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(what);
    }
}

/// A prompt lease waiting to be answered.
#[derive(Debug)]
struct Lease {
    prompt_id: String,
    lease_id: String,
}

/// Leases shared by every stream, refilled by one leasing task as they are used (never far
/// ahead: a lease counts against the server's pending bound until it is answered).
struct LeasePool {
    ready: Mutex<VecDeque<Lease>>,
    /// Wakes streams waiting for a lease.
    filled: Notify,
    /// Wakes the leasing task when the pool runs low.
    low: Notify,
    low_water: usize,
}

impl LeasePool {
    fn new(low_water: usize) -> Self {
        Self {
            ready: Mutex::new(VecDeque::new()),
            filled: Notify::new(),
            low: Notify::new(),
            low_water,
        }
    }

    fn len(&self) -> usize {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn put(&self, leases: impl IntoIterator<Item = Lease>) {
        self.ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(leases);
        self.filled.notify_waiters();
    }

    fn pop(&self) -> Option<Lease> {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        let lease = ready.pop_front();
        if ready.len() < self.low_water {
            self.low.notify_one();
        }
        lease
    }

    /// The next lease, waiting for one if needed. Cancel-safe: a lease is only taken in the
    /// same poll that returns it.
    async fn take(&self) -> Lease {
        loop {
            let filled = self.filled.notified();
            tokio::pin!(filled);
            // Registered before looking, so a `put` in between is not missed.
            filled.as_mut().enable();
            if let Some(lease) = self.pop() {
                return lease;
            }
            filled.await;
        }
    }
}

/// Resolves once `stop` turns true (the watch guard, not `Send`, never lives across an await).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|&s| s).await;
}

async fn connect(url: &str) -> Result<Channel> {
    Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// The `retry-after-ms` the server asked for (500 ms when it named none).
fn retry_after(status: &tonic::Status) -> Duration {
    let ms = status
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(500)
        .clamp(1, 10_000);
    Duration::from_millis(ms)
}

/// Lease refusals (back-pressure), in the window and overall.
#[derive(Default)]
struct Refusals {
    in_window: AtomicU64,
    total: AtomicU64,
}

/// What the client's tasks of one configuration share.
#[derive(Clone)]
struct Load {
    url: String,
    clock: Clock,
    pool: Arc<LeasePool>,
    material: Arc<Material>,
    /// Groups in flight per stream.
    window: usize,
    refusals: Arc<Refusals>,
    errors: Arc<Errors>,
    /// Turns true at the end of the measured window.
    stop: watch::Receiver<bool>,
}

/// Keeps the pool between `low_water` and twice that until `stop`.
async fn lease_prompts(load: Load) {
    let Load {
        url,
        clock,
        pool,
        refusals,
        errors,
        mut stop,
        ..
    } = load;
    let mut client = match connect(&url).await {
        Ok(c) => ReplayClient::new(c),
        Err(e) => return errors.record(format!("leasing: {e:#}")),
    };
    let target = pool.low_water * 2;
    loop {
        let have = pool.len();
        let wait = if have >= pool.low_water {
            None
        } else {
            let want = (target - have).min(MAX_PROMPTS_PER_LEASE) as u32;
            let answer = client
                .lease_prompts(LeaseRequest {
                    actor_id: "bench-leaser".into(),
                    max_prompts: want,
                    policy_version: 0,
                    model_fingerprint: String::new(),
                })
                .await;
            match answer {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    let empty = resp.prompts.is_empty();
                    pool.put(resp.prompts.into_iter().map(|p| Lease {
                        prompt_id: p.prompt_id,
                        lease_id: p.lease_id,
                    }));
                    empty.then(|| Duration::from_millis(resp.retry_after_ms.clamp(1, 10_000)))
                }
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    refusals.total.fetch_add(1, Ordering::Relaxed);
                    if clock.in_window(Instant::now()) {
                        refusals.in_window.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(retry_after(&status))
                }
                Err(status) => {
                    errors.record(format!(
                        "LeasePrompts: {:?}: {}",
                        status.code(),
                        status.message()
                    ));
                    Some(Duration::from_millis(200))
                }
            }
        };
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = async {
                match wait {
                    Some(d) => tokio::time::sleep(d).await,
                    None if pool.len() >= pool.low_water => pool.low.notified().await,
                    None => {}
                }
            } => {}
        }
    }
}

/// What one rollout stream measured.
#[derive(Default)]
struct StreamTally {
    acked: u64,
    latencies_ms: Vec<f64>,
}

/// One actor-like stream: keeps `window` groups in flight until `stop`, then collects the
/// last acks.
async fn rollout_stream(index: usize, load: Load) -> StreamTally {
    let Load {
        url,
        clock,
        pool,
        material,
        window,
        errors,
        mut stop,
        ..
    } = load;
    let mut tally = StreamTally::default();
    let mut client = match connect(&url).await {
        Ok(c) => ReplayClient::new(c),
        Err(e) => {
            errors.record(format!("stream {index}: {e:#}"));
            return tally;
        }
    };
    let (tx, rx) = mpsc::channel::<RolloutGroup>(window);
    let mut acks = match client.stream_rollouts(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            errors.record(format!(
                "stream {index}: StreamRollouts: {:?}: {}",
                s.code(),
                s.message()
            ));
            return tally;
        }
    };
    let actor_id = format!("bench-{index}");
    let mut cursor = index * 7;
    let mut in_flight: HashMap<String, Instant> = HashMap::with_capacity(window);
    let mut stopping = false;
    let drain = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(drain);
    loop {
        if stopping && in_flight.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            msg = acks.message() => match msg {
                Ok(Some(ack)) => {
                    let now = Instant::now();
                    let Some(sent) = in_flight.remove(&ack.lease_id) else {
                        errors.record(format!("stream {index}: an ack for lease {} that is not in flight", ack.lease_id));
                        break;
                    };
                    if !ack.accepted {
                        errors.record(format!("stream {index}: group not accepted: {}", ack.reason));
                    } else if clock.in_window(now) {
                        tally.acked += 1;
                        tally.latencies_ms.push((now - sent).as_secs_f64() * 1e3);
                    }
                }
                Ok(None) => {
                    errors.record(format!("stream {index}: the server ended the stream"));
                    break;
                }
                Err(s) => {
                    errors.record(format!("stream {index}: {:?}: {}", s.code(), s.message()));
                    break;
                }
            },
            lease = pool.take(), if !stopping && in_flight.len() < window => {
                let group = material.group(&actor_id, lease, &mut cursor);
                in_flight.insert(group.lease_id.clone(), Instant::now());
                if tx.send(group).await.is_err() {
                    errors.record(format!("stream {index}: the request stream closed"));
                    break;
                }
            },
            _ = stopped(&mut stop), if !stopping => {
                stopping = true;
                drain.as_mut().reset(tokio::time::Instant::now() + DRAIN_TIMEOUT);
            },
            _ = &mut drain, if stopping => {
                errors.record(format!(
                    "stream {index}: {} groups not acknowledged {} s after the window",
                    in_flight.len(),
                    DRAIN_TIMEOUT.as_secs()
                ));
                break;
            },
        }
    }
    tally
}

/// A learner that trains in no time: acks each batch as it arrives (one step and one version
/// per batch) and commits every [`COMMIT_EVERY`] batches. Returns the batches acked in the
/// window.
async fn simulated_learner(load: Load) -> u64 {
    let Load {
        url,
        clock,
        errors,
        mut stop,
        ..
    } = load;
    let mut client = match connect(&url).await {
        Ok(c) => ReplayClient::new(c),
        Err(e) => {
            errors.record(format!("learner: {e:#}"));
            return 0;
        }
    };
    let registered = client
        .register_learner(RegisterLearnerRequest {
            learner_id: LEARNER_ID.into(),
            learner_step: 0,
            policy_version: 0,
            committed_through_batch_id: 0,
            trained_through_batch_id: 0,
            model_fingerprint: String::new(),
        })
        .await;
    let incarnation = match registered {
        Ok(r) => r.into_inner().incarnation,
        Err(s) => {
            errors.record(format!(
                "learner: RegisterLearner: {:?}: {}",
                s.code(),
                s.message()
            ));
            return 0;
        }
    };
    let mut batches = match client
        .stream_batches(BatchStreamRequest {
            learner_id: LEARNER_ID.into(),
            rank: 0,
            world_size: 1,
            incarnation: incarnation.clone(),
            trained_through_batch_id: 0,
            prefetch: LEARNER_PREFETCH,
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => {
            errors.record(format!(
                "learner: StreamBatches: {:?}: {}",
                s.code(),
                s.message()
            ));
            return 0;
        }
    };
    let (mut step, mut version, mut counted) = (0u64, 0u64, 0u64);
    loop {
        let batch = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            msg = batches.message() => match msg {
                Ok(Some(b)) => b,
                Ok(None) => {
                    errors.record("learner: the server ended the batch stream".into());
                    break;
                }
                Err(s) => {
                    errors.record(format!("learner: StreamBatches: {:?}: {}", s.code(), s.message()));
                    break;
                }
            },
        };
        step += 1;
        version += 1;
        let acked = client
            .ack_batch(AckBatchRequest {
                learner_id: LEARNER_ID.into(),
                batch_id: batch.batch_id,
                learner_step: step,
                policy_version: version,
                incarnation: incarnation.clone(),
            })
            .await;
        if let Err(s) = acked {
            errors.record(format!(
                "learner: AckBatch {}: {:?}: {}",
                batch.batch_id,
                s.code(),
                s.message()
            ));
            break;
        }
        if clock.in_window(Instant::now()) {
            counted += 1;
        }
        if step % COMMIT_EVERY == 0 {
            let committed = client
                .commit_batches(CommitBatchesRequest {
                    learner_id: LEARNER_ID.into(),
                    incarnation: incarnation.clone(),
                    through_batch_id: batch.batch_id,
                    learner_step: step,
                    policy_version: version,
                })
                .await;
            if let Err(s) = committed {
                errors.record(format!(
                    "learner: CommitBatches {}: {:?}: {}",
                    batch.batch_id,
                    s.code(),
                    s.message()
                ));
                break;
            }
        }
    }
    counted
}

/// `(VmRSS, VmHWM)` in kB from the text of `/proc/<pid>/status`.
fn parse_memory_kb(status: &str) -> Option<(u64, u64)> {
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn memory_kb(pid: u32) -> Option<(u64, u64)> {
    parse_memory_kb(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// `(name, utime + stime in clock ticks)` from the text of a `/proc/.../stat` file.
fn parse_stat_cpu(stat: &str) -> Option<(String, u64)> {
    // The name is in parentheses and may itself contain spaces or parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from 1 with the name as field 2.
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

fn process_ticks(pid: &str) -> Option<u64> {
    parse_stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?).map(|(_, t)| t)
}

/// `tid -> (name, ticks)` of every thread of `pid`.
fn thread_ticks(pid: u32) -> HashMap<u32, (String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            parse_stat_cpu(&stat).map(|s| (tid, s))
        })
        .collect()
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU counters at one instant.
struct CpuSnapshot {
    at: Instant,
    server: Option<u64>,
    client: Option<u64>,
    threads: HashMap<u32, (String, u64)>,
}

impl CpuSnapshot {
    fn take(pid: u32) -> Self {
        Self {
            at: Instant::now(),
            server: process_ticks(&pid.to_string()),
            client: process_ticks("self"),
            threads: thread_ticks(pid),
        }
    }
}

/// Server CPU %, client CPU % and the server's threads between two snapshots.
fn cpu_between(a: &CpuSnapshot, b: &CpuSnapshot) -> (Option<f64>, Option<f64>, Vec<ThreadCpu>) {
    let secs = (b.at - a.at).as_secs_f64().max(1e-9);
    let hz = clock_ticks_per_second();
    let pct =
        |x: Option<u64>, y: Option<u64>| Some(y?.saturating_sub(x?) as f64 / hz / secs * 100.0);
    let mut threads: Vec<ThreadCpu> = b
        .threads
        .iter()
        .map(|(&tid, (name, after))| {
            // A thread born in the window counts from zero.
            let before = a.threads.get(&tid).map_or(0, |(_, t)| *t);
            ThreadCpu {
                tid,
                name: name.clone(),
                cpu_percent: after.saturating_sub(before) as f64 / hz / secs * 100.0,
            }
        })
        .filter(|t| t.cpu_percent > 0.0)
        .collect();
    threads.sort_by(|x, y| y.cpu_percent.total_cmp(&x.cpu_percent));
    (pct(a.server, b.server), pct(a.client, b.client), threads)
}

/// The replay server process of one configuration; killed and its data removed on drop.
struct Server {
    child: Child,
    /// Holds the data directory and the server's log; removed on drop.
    dir: PathBuf,
    log_path: PathBuf,
    url: String,
    metrics_port: u16,
}

/// The replay server's batch assembly histogram (`_sum` seconds, `_count` batches): the
/// time it spends reading composed batches back from the log and assembling them.
async fn assembly_seconds(metrics_port: u16) -> Option<(f64, f64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await
        .ok()?;
    let mut page = String::new();
    s.read_to_string(&mut page).await.ok()?;
    let value = |name: &str| {
        page.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .next()
    };
    Some((
        value("hindsight_replay_batch_assembly_seconds_sum")?,
        value("hindsight_replay_batch_assembly_seconds_count")?,
    ))
}

impl Server {
    fn spawn(
        exe: &Path,
        cfg: &Configuration,
        index: usize,
        insecure: bool,
        cache_dir: Option<&Path>,
    ) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")?
            .port();
        let base = std::env::temp_dir().join(format!(
            "hindsight-bench-replay-{}-{index}",
            std::process::id()
        ));
        let data_dir = base.join("data");
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let log_path = base.join("server.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(exe);
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")?
            .port();
        cmd.args(server_args(
            cfg,
            port,
            &data_dir,
            insecure,
            cache_dir,
            Some(metrics_port),
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        // The server runs exactly the settings above, whatever this shell exports.
        for (key, _) in std::env::vars_os() {
            if key
                .to_str()
                .is_some_and(|k| k.starts_with("HINDSIGHT_") && k != "HINDSIGHT_CACHE")
            {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} replay-server", exe.display()))?;
        Ok(Self {
            child,
            dir: base,
            log_path,
            url: format!("http://127.0.0.1:{port}"),
            metrics_port,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the server answers its health check as serving.
    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "the replay server exited at start ({status}); its log ends with:\n{}",
                    self.log_tail(20)
                );
            }
            if let Ok(channel) = connect(&self.url).await {
                let answer = HealthClient::new(channel)
                    .check(HealthCheckRequest::default())
                    .await;
                if answer.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
                    return Ok(());
                }
            }
            if started.elapsed() > START_TIMEOUT {
                anyhow::bail!(
                    "the replay server did not answer its health check within {} s; its log ends with:\n{}",
                    START_TIMEOUT.as_secs(),
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, up to 10 s for the graceful drain, then SIGKILL. Err when it had already
    /// exited (crashed during the run).
    async fn stop(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "the replay server exited during the run ({status}); its log ends with:\n{}",
                self.log_tail(20)
            );
        }
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe {
            libc::kill(self.pid() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What every configuration shares.
struct Bench {
    exe: PathBuf,
    insecure: bool,
    material: Arc<Material>,
    window: usize,
    seconds: f64,
    warmup: f64,
    cache_dir: Option<PathBuf>,
}

/// The memory series: the sample at or just before each whole second after `start`.
fn each_second(samples: &[(f64, u64)]) -> Vec<f64> {
    let Some(&(last, _)) = samples.last() else {
        return Vec::new();
    };
    (0..=last.floor() as usize)
        .filter_map(|s| {
            samples
                .iter()
                .rev()
                .find(|(t, _)| *t <= s as f64 + 1e-3)
                .or(samples.first())
                .map(|&(_, kb)| kb as f64 / 1024.0)
        })
        .collect()
}

impl Bench {
    async fn run(&self, cfg: &Configuration, index: usize) -> Outcome {
        let (batches, bytes) = cfg.pending_bounds();
        let mut out = Outcome {
            streams: cfg.streams,
            learner: cfg.label().into(),
            max_pending_batches: batches,
            max_pending_bytes: bytes,
            seconds: self.seconds,
            ..Outcome::default()
        };
        if let Err(e) = self.measure(cfg, index, &mut out).await {
            out.errors += 1;
            out.first_error = Some(format!("{e:#}"));
        }
        out
    }

    async fn measure(&self, cfg: &Configuration, index: usize, out: &mut Outcome) -> Result<()> {
        let mut server = Server::spawn(
            &self.exe,
            cfg,
            index,
            self.insecure,
            self.cache_dir.as_deref(),
        )?;
        server.wait_ready().await?;
        let pid = server.pid();
        let clock = Clock::new(self.warmup, self.seconds);
        let (stop_tx, stop) = watch::channel(false);
        let errors = Arc::new(Errors::default());
        let refusals = Arc::new(Refusals::default());

        let sampler = {
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let mut samples: Vec<(f64, u64)> = Vec::new();
                let mut peak_kb = 0;
                let mut tick = tokio::time::interval(MEMORY_PERIOD);
                loop {
                    tokio::select! {
                        _ = stopped(&mut stop) => break,
                        _ = tick.tick() => {}
                    }
                    if let Some((rss, hwm)) = memory_kb(pid) {
                        samples.push((clock.start.elapsed().as_secs_f64(), rss));
                        peak_kb = peak_kb.max(hwm).max(rss);
                    }
                }
                (samples, peak_kb)
            })
        };
        let load = Load {
            url: server.url.clone(),
            clock,
            // Enough for every stream's window, at least a few lease calls' worth.
            pool: Arc::new(LeasePool::new((cfg.streams * self.window).max(16))),
            material: self.material.clone(),
            window: self.window,
            refusals: refusals.clone(),
            errors: errors.clone(),
            stop: stop.clone(),
        };
        let leaser = tokio::spawn(lease_prompts(load.clone()));
        let learner = cfg
            .learner
            .then(|| tokio::spawn(simulated_learner(load.clone())));
        let streams: Vec<_> = (0..cfg.streams)
            .map(|i| tokio::spawn(rollout_stream(i, load.clone())))
            .collect();
        drop(load);

        tokio::time::sleep_until(clock.window_start.into()).await;
        let cpu_start = CpuSnapshot::take(pid);
        let assembly_start = assembly_seconds(server.metrics_port).await;
        tokio::time::sleep_until(clock.window_end.into()).await;
        let cpu_end = CpuSnapshot::take(pid);
        if let (Some((s0, n0)), Some((s1, n1))) =
            (assembly_start, assembly_seconds(server.metrics_port).await)
        {
            if n1 > n0 {
                out.assembly_ms_mean = Some((s1 - s0) / (n1 - n0) * 1000.0);
                out.assembly_core_percent = Some((s1 - s0) / self.seconds * 100.0);
            }
        }
        let end_memory = memory_kb(pid);
        stop_tx.send_replace(true);

        let mut latencies = Vec::new();
        for s in streams {
            let tally = s.await.context("a stream task failed")?;
            out.groups_acked += tally.acked;
            latencies.extend(tally.latencies_ms);
        }
        if let Some(l) = learner {
            let n = l.await.context("the learner task failed")?;
            out.batches = Some(n);
            out.batches_per_s = Some(n as f64 / self.seconds);
        }
        leaser.await.context("the leasing task failed")?;
        let (samples, peak_kb) = sampler.await.context("the memory sampler failed")?;
        let stopped = server.stop().await;

        latencies.sort_by(f64::total_cmp);
        out.groups_per_s = out.groups_acked as f64 / self.seconds;
        out.ack_p50_ms = percentile(&latencies, 50.0);
        out.ack_p99_ms = percentile(&latencies, 99.0);
        out.ack_max_ms = latencies.last().copied();
        out.rss_peak_mb = (peak_kb > 0).then(|| peak_kb as f64 / 1024.0);
        out.rss_end_mb = end_memory.map(|(rss, _)| rss as f64 / 1024.0);
        out.rss_mb_each_second = each_second(&samples);
        out.leases_refused = refusals.in_window.load(Ordering::Relaxed);
        out.leases_refused_total = refusals.total.load(Ordering::Relaxed);
        (
            out.server_cpu_percent,
            out.client_cpu_percent,
            out.server_threads,
        ) = cpu_between(&cpu_start, &cpu_end);
        out.errors += errors.count.load(Ordering::Relaxed);
        out.first_error = errors
            .first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        stopped
    }
}

/// Whether this binary's `replay-server` has an `--insecure` flag (servers that require TLS
/// and tokens unless told otherwise); the benchmark runs the server without either.
fn server_takes_insecure(exe: &Path) -> bool {
    Command::new(exe)
        .args(["replay-server", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--insecure"))
}

async fn run_all(args: &BenchReplayArgs) -> Result<Vec<Outcome>> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(hindsight_policy::default_cache_dir);
    let bench = Bench {
        insecure: server_takes_insecure(&exe),
        exe,
        material: Arc::new(Material::new(args.tokens, &cache)?),
        window: args.window,
        seconds: args.seconds,
        warmup: args.warmup_seconds,
        cache_dir: args.cache_dir.clone(),
    };
    let mut outcomes = Vec::new();
    for (i, cfg) in configurations(args).iter().enumerate() {
        let o = bench.run(cfg, i).await;
        println!(
            "streams {:>3}, learner {:<12}: {:>7.0} groups/s, ack p50 {} ms p99 {} ms, batches/s {}, \
             RSS peak {} MB end {} MB, leases refused {}",
            o.streams,
            o.learner,
            o.groups_per_s,
            fmt_opt(o.ack_p50_ms, 1),
            fmt_opt(o.ack_p99_ms, 1),
            fmt_opt(o.batches_per_s, 1),
            fmt_opt(o.rss_peak_mb, 1),
            fmt_opt(o.rss_end_mb, 1),
            o.leases_refused
        );
        println!(
            "    CPU: server {}%, client {}%; server threads: {}",
            fmt_opt(o.server_cpu_percent, 0),
            fmt_opt(o.client_cpu_percent, 0),
            format_threads(&o.server_threads)
        );
        if o.assembly_ms_mean.is_some() {
            println!(
                "    batches read back from the log and assembled: {} ms each, {}% of one core",
                fmt_opt(o.assembly_ms_mean, 2),
                fmt_opt(o.assembly_core_percent, 1)
            );
        }
        if !cfg.learner {
            let series: Vec<String> = o
                .rss_mb_each_second
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect();
            println!("    server RSS MB each second: {}", series.join(" "));
        }
        if let Some(e) = &o.first_error {
            println!("    {} error(s); the first: {e}", o.errors);
        }
        outcomes.push(o);
    }
    Ok(outcomes)
}

/// Runs the benchmark.
pub fn run(args: BenchReplayArgs) -> Result<()> {
    anyhow::ensure!(
        !args.streams.is_empty() && args.streams.iter().all(|&s| s > 0),
        "--streams must be positive"
    );
    anyhow::ensure!(args.window > 0, "--window must be positive");
    anyhow::ensure!(
        args.seconds > 0.0 && args.warmup_seconds >= 0.0,
        "--seconds must be positive and --warmup-seconds not negative"
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = crate::bench::load_average();
    println!("machine: nproc {cores}, load average (1 min) {load_before}");
    println!("{GOAL}");
    println!(
        "server: replay-server --model tiny, {NUM_PROMPTS} prompts, {RESPONSES} responses x \
         {NEW_TOKENS} tokens per group, {PROMPTS_PER_BATCH} groups per batch, WAL in a fresh \
         directory; client: {} groups in flight per stream, {} s warm-up + {} s measured",
        args.window, args.warmup_seconds, args.seconds
    );
    // Called from inside the CLI's runtime, which cannot host a second one: the client gets
    // its own runtime on its own thread, one worker per core.
    let outcomes = std::thread::scope(|s| {
        s.spawn(|| -> Result<Vec<Outcome>> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cores)
                .enable_all()
                .build()?;
            rt.block_on(run_all(&args))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))?
    })?;
    println!();
    print!("{}", format_table(&outcomes));
    println!("{GOAL}");
    for line in goal_verdicts(&outcomes) {
        println!("  {line}");
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "machine": {"nproc": cores, "load_average_before": load_before,
                "load_average_after": crate::bench::load_average()},
            "goal": GOAL,
            "settings": {"num_prompts": NUM_PROMPTS, "responses": RESPONSES,
                "new_tokens": NEW_TOKENS, "group_size": GROUP_SIZE,
                "prompts_per_batch": PROMPTS_PER_BATCH, "window": args.window,
                "seconds": args.seconds, "warmup_seconds": args.warmup_seconds,
                "tokens": format!("{:?}", args.tokens).to_lowercase()},
            "configurations": outcomes,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| o.errors > 0)
        .map(|o| format!("{} streams / learner {}", o.streams, o.learner))
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "{} configuration(s) had errors: {}",
        failed.len(),
        failed.join("; ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 0.0), Some(7.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        // 10 values: p99 is the largest, p50 the 5th.
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), Some(10.0));
        assert_eq!(percentile(&v, 50.0), Some(5.0));
        assert_eq!(percentile(&v, 51.0), Some(6.0));
    }

    #[test]
    fn table_has_one_row_per_configuration_and_dashes_for_missing_figures() {
        let rows = vec![
            Outcome {
                streams: 32,
                learner: "on".into(),
                groups_per_s: 3120.4,
                ack_p50_ms: Some(4.06),
                ack_p99_ms: Some(12.34),
                batches_per_s: Some(780.0),
                rss_peak_mb: Some(45.25),
                rss_end_mb: Some(40.0),
                leases_refused: 3,
                ..Outcome::default()
            },
            Outcome {
                streams: 128,
                learner: "off, bounded".into(),
                errors: 2,
                ..Outcome::default()
            },
        ];
        let table = format_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert_eq!(
            lines[0],
            "| streams | learner | groups/s | ack p50 ms | ack p99 ms | batches/s | server RSS peak MB | RSS end MB | leases refused |"
        );
        assert_eq!(lines[1].matches("---").count(), 9);
        assert_eq!(
            lines[2],
            "| 32 | on | 3120 | 4.1 | 12.3 | 780.0 | 45.2 | 40.0 | 3 |"
        );
        assert_eq!(
            lines[3],
            "| 128 | off, bounded | 0 (errors) | - | - | - | - | - | 0 |"
        );
    }

    #[test]
    fn goal_is_judged_at_32_streams_only() {
        let row = |streams, learner: &str, gps, p99| Outcome {
            streams,
            learner: learner.into(),
            groups_per_s: gps,
            ack_p99_ms: Some(p99),
            ..Outcome::default()
        };
        let v = goal_verdicts(&[
            row(8, "on", 10.0, 1.0),
            row(32, "on", 3100.0, 20.0),
            row(32, "off", 3100.0, 30.0),
            row(32, "off, bounded", 0.0, 1.0),
        ]);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].ends_with("goal met"), "{v:?}");
        assert!(v[1].ends_with("goal MISSED"), "{v:?}");
    }

    #[test]
    fn configurations_follow_the_flags() {
        let mut args = BenchReplayArgs {
            streams: vec![1, 8],
            window: 4,
            seconds: 1.0,
            warmup_seconds: 0.0,
            learner: LearnerChoice::Both,
            bounded: true,
            tokens: TokenChoice::Text,
            json: None,
            cache_dir: None,
        };
        let labels = |a: &BenchReplayArgs| {
            configurations(a)
                .iter()
                .map(|c| format!("{}/{}", c.streams, c.label()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            labels(&args),
            ["1/on", "1/off", "8/on", "8/off", "8/off, bounded"]
        );
        args.learner = LearnerChoice::On;
        assert_eq!(labels(&args), ["1/on", "8/on"]);
        args.learner = LearnerChoice::Off;
        args.bounded = false;
        assert_eq!(labels(&args), ["1/off", "8/off"]);
    }

    /// `server_args` parsed back by the real `hindsight` command line.
    fn parsed_server(cfg: Configuration, insecure: bool) -> hindsight_replay_server::ReplayArgs {
        let argv = server_args(&cfg, 5, Path::new("/tmp/x"), insecure, None, Some(7));
        assert_eq!(
            argv[..5],
            [
                "--log-level",
                "info",
                "--metrics-addr",
                "127.0.0.1:7",
                "replay-server"
            ]
        );
        #[derive(clap::Parser)]
        struct Server {
            #[command(flatten)]
            replay: hindsight_replay_server::ReplayArgs,
        }
        use clap::Parser;
        let parsed = Server::try_parse_from(
            std::iter::once("replay-server").chain(argv[5..].iter().map(String::as_str)),
        )
        .expect("the bench's server flags parse");
        parsed.replay
    }

    #[test]
    fn server_flags_carry_the_bounds_of_each_mode() {
        let on = parsed_server(
            Configuration {
                streams: 1,
                learner: true,
                bounded: false,
            },
            true,
        );
        assert_eq!(on.listen.to_string(), "127.0.0.1:5");
        assert_eq!(on.data_dir.as_deref(), Some(Path::new("/tmp/x")));
        assert_eq!(
            (on.model.as_str(), on.num_prompts, on.max_new_tokens),
            ("tiny", NUM_PROMPTS, NEW_TOKENS as u32)
        );
        assert_eq!(on.max_pending_batches, LEARNER_PENDING_BATCHES as u32);
        assert!(on.security.insecure);
        let off = parsed_server(
            Configuration {
                streams: 1,
                learner: false,
                bounded: false,
            },
            false,
        );
        assert_eq!(
            (off.max_pending_batches as u64, off.max_pending_bytes),
            (UNBOUNDED_PENDING_BATCHES, UNBOUNDED_PENDING_BYTES)
        );
        assert!(!off.security.insecure);
        let bounded = parsed_server(
            Configuration {
                streams: 1,
                learner: false,
                bounded: true,
            },
            false,
        );
        assert_eq!(bounded.max_pending_batches as u64, DEFAULT_PENDING_BATCHES);
        assert_eq!(
            bounded.max_pending_bytes,
            hindsight_replay_server::ReplayArgs::default().max_pending_bytes
        );
    }

    #[test]
    fn proc_files_parse() {
        let status = "Name:\thindsight\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(parse_memory_kb(status), Some((40960, 51200)));
        assert_eq!(parse_memory_kb("Name: x\n"), None);
        let stat = "1234 (tokio-runtime-w) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(
            parse_stat_cpu(stat),
            Some(("tokio-runtime-w".to_string(), 300))
        );
        let odd = "9 (a) b (c) S 1 2 3 4 5 6 7 8 9 10 1 2 0 0";
        assert_eq!(parse_stat_cpu(odd), Some(("a) b (c".to_string(), 3)));
    }

    #[test]
    fn memory_series_takes_the_last_sample_of_each_second() {
        let kb = 1024;
        let samples = [(0.05, kb), (0.9, 2 * kb), (1.05, 3 * kb), (2.0, 4 * kb)];
        assert_eq!(each_second(&samples), [1.0, 2.0, 4.0]);
        assert!(each_second(&[]).is_empty());
    }

    #[test]
    fn groups_are_valid_for_the_server() {
        let material = Material::new(TokenChoice::Text, Path::new("/nonexistent")).unwrap();
        let mut cursor = 0;
        let g = material.group(
            "bench-0",
            Lease {
                prompt_id: "p".into(),
                lease_id: "l".into(),
            },
            &mut cursor,
        );
        assert_eq!(g.responses.len(), RESPONSES);
        for r in &g.responses {
            assert_eq!(r.token_ids.len(), NEW_TOKENS);
            assert_eq!(r.logprobs.len(), NEW_TOKENS);
            assert_eq!(r.entropies.len(), NEW_TOKENS);
            assert!(r.token_ids.iter().all(|&t| (t as usize) < 2048));
            assert!(r.logprobs.iter().all(|&l| (-5.0..=-0.01).contains(&l)));
            assert!(r.entropies.iter().all(|&h| (0.01..=2.0).contains(&h)));
        }
    }
}
