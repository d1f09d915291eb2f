//! Fault tests of the exactly-once protocol (ARCHITECTURE.md, "Exactly-once training"), on real
//! processes: a `hindsight up` cluster on the tiny model, one role (or two) killed with
//! SIGKILL or stopped with SIGTERM at a random point of a step, restarted by `up`, and the run
//! carried on to its last step. Then, from the step log, the batch log, the actors' logs and
//! the replay server's Status:
//!
//! - the step log holds steps 1..=N once each, with strictly increasing weight versions and
//!   batch ids (no step number and no version repeats);
//! - no group is in two batches, and no batch is trained twice or skipped;
//! - every group the replay server acknowledged to an actor is trained exactly once, or is
//!   still waiting for the learner (in a later batch or not batched yet).
//!
//! The kill points come from a seed printed by every test (`HINDSIGHT_FAULT_SEED=N` replays
//! it).

mod common;
#[path = "support/exactly_once.rs"]
mod exactly_once;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;

const STEPS: u64 = 8;

/// SplitMix64: a tiny seeded generator for the kill points.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn seed(name: &str) -> u64 {
    let seed = std::env::var("HINDSIGHT_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{name}: fault seed {seed} (replay with HINDSIGHT_FAULT_SEED={seed})");
    seed
}

/// The newest step in the step log.
fn last_step(run_dir: &Path) -> u64 {
    read_jsonl(&run_dir.join("steps.jsonl"))
        .last()
        .and_then(|s| s["step"].as_u64())
        .unwrap_or(0)
}

/// Group sequence numbers the actors were told are accepted (their debug log lines).
fn acknowledged(run_dir: &Path) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(run_dir.join("logs")).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("actor-")
        {
            out.extend(exactly_once::acknowledged_in(
                &std::fs::read_to_string(&path).unwrap_or_default(),
            ));
        }
    }
    out
}

/// The replay server's Status, asked with the read-only credentials of `endpoints.json`.
fn replay_status(run_dir: &Path) -> hindsight_proto::v1::ReplayStatusResponse {
    let endpoints = read_endpoints(run_dir).expect("endpoints.json");
    let url = endpoints["replay"].as_str().unwrap().to_string();
    let args: Vec<String> = endpoints["status_args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| std::path::PathBuf::from(&args[i + 1]))
    };
    let security =
        hindsight_service::ClientSecurity::from_args(&hindsight_service::ClientSecurityArgs {
            tls_ca: flag("--tls-ca"),
            token_file: flag("--token-file"),
            ..Default::default()
        })
        .unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let channel = security.connect_authed(&url, 50).await.unwrap();
        hindsight_proto::v1::replay_client::ReplayClient::new(channel)
            .status(hindsight_proto::v1::ReplayStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    })
}

/// Runs the tiny cluster, hits `victims` with `signal` once mid-run, lets it finish, and
/// checks exactly-once training from the logs.
fn scenario(name: &str, victims: &[&str], signal: i32) {
    let mut rng = Rng(seed(name));
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let steps = STEPS.to_string();
    let mut up = Up::start(
        &run_dir,
        &[
            "--model",
            "tiny",
            "--actors",
            "2",
            "--steps",
            &steps,
            "--checkpoint-every",
            "3",
            "--max-staleness",
            "100000",
            "--lease-timeout-secs",
            "3",
            "--max-new-tokens",
            "48",
            "--prompts-per-batch",
            "2",
            "--threads-per-process",
            "1",
        ],
    );
    // The kill point: after step 1..=3, plus up to 400 ms into the next one.
    let after = 1 + rng.below(3);
    let delay = Duration::from_millis(rng.below(400));
    wait_until(
        up.child(),
        &run_dir,
        Duration::from_secs(240),
        &format!("step {after}"),
        || (last_step(&run_dir) >= after).then_some(()),
    );
    std::thread::sleep(delay);
    let mut killed = Vec::new();
    for victim in victims {
        let pid = pid_of(&run_dir, victim).expect("victim pid");
        send_signal(pid, signal);
        killed.push((victim.to_string(), pid));
    }
    eprintln!("{name}: signal {signal} to {killed:?} after step {after} + {delay:?}");
    wait_until(
        up.child(),
        &run_dir,
        Duration::from_secs(300),
        &format!("step {STEPS} after the fault"),
        || (last_step(&run_dir) >= STEPS).then_some(()),
    );
    for victim in victims {
        let log = std::fs::read_to_string(run_dir.join(format!("logs/{victim}.log"))).unwrap();
        assert!(
            log.contains("=== hindsight up: restarting"),
            "{victim} was not restarted{}",
            dump_logs(&run_dir)
        );
    }
    let acked = acknowledged(&run_dir);
    let status = replay_status(&run_dir);
    let summary = stop_up(up.take(), &run_dir);
    assert_eq!(summary["ok"], true, "{summary}");
    check_exactly_once(name, &run_dir, &acked, &status);
}

fn check_exactly_once(
    name: &str,
    run_dir: &Path,
    acked: &BTreeSet<u64>,
    status: &hindsight_proto::v1::ReplayStatusResponse,
) {
    let ledger = exactly_once::Ledger {
        steps: read_jsonl(&run_dir.join("steps.jsonl")),
        batch_log: read_jsonl(&run_dir.join("batches.jsonl")),
        acked: acked.clone(),
        groups_waiting: status.groups_waiting,
        groups_stale: status.groups_stale,
    };
    match ledger.check(Some(STEPS)) {
        Ok(summary) => eprintln!("{name}: {summary}"),
        Err(why) => panic!("{name}: {why}{}", dump_logs(run_dir)),
    }
}

/// Actors log each acknowledged group at debug level; the checks read them.
fn debug_acks() {
    // Set once for the whole test binary, before any child starts (children inherit it).
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("RUST_LOG", "info,hindsight_actor=debug"));
}

#[test]
fn replay_server_killed() {
    debug_acks();
    scenario("replay-server kill -9", &["replay-server"], libc::SIGKILL);
}

#[test]
fn replay_server_terminated() {
    debug_acks();
    scenario("replay-server SIGTERM", &["replay-server"], libc::SIGTERM);
}

#[test]
fn learner_killed() {
    debug_acks();
    scenario("learner kill -9", &["learner"], libc::SIGKILL);
}

#[test]
fn learner_terminated() {
    debug_acks();
    scenario("learner SIGTERM", &["learner"], libc::SIGTERM);
}

#[test]
fn actor_killed() {
    debug_acks();
    scenario("actor kill -9", &["actor-1"], libc::SIGKILL);
}

#[test]
fn actor_terminated() {
    debug_acks();
    scenario("actor SIGTERM", &["actor-1"], libc::SIGTERM);
}

#[test]
fn replay_server_and_learner_killed() {
    debug_acks();
    scenario(
        "replay-server + learner kill -9",
        &["replay-server", "learner"],
        libc::SIGKILL,
    );
}
