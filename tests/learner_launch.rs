//! `hindsight learner --local-ranks 2` on the tiny model, as real processes: the launcher
//! starts two learner ranks (TCP collective on CPU), they train with a replay server and an
//! actor until `--max-steps`, and the launcher exits 0 after them. Then the gang rule: a rank
//! killed with SIGKILL makes the launcher stop the other rank and fail, naming the dead one.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A free port whose local rank 1 port (+100) is free too.
fn free_pair() -> SocketAddr {
    loop {
        let a = free_addr();
        let b = SocketAddr::new(a.ip(), a.port() + 100);
        if a.port() < 65000 && std::net::TcpListener::bind(b).is_ok() {
            return a;
        }
    }
}

struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(dir: &Path, name: &str, args: &[&str]) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Proc(Some(
        hindsight()
            .args(["--threads", "1", "--log-format", "json"])
            .args(args)
            .args(["--cache-dir", dir.join("cache").to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    ))
}

fn log_lines(dir: &Path, name: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join(format!("{name}.log")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn logs(dir: &Path) -> String {
    ["replay-server", "actor", "learner"]
        .iter()
        .map(|n| {
            format!(
                "\n===== {n}\n{}",
                std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default()
            )
        })
        .collect()
}

/// The pids the launcher reported, by rank.
fn rank_pids(dir: &Path) -> Vec<(u64, i32)> {
    log_lines(dir, "learner")
        .iter()
        .filter(|v| v["fields"]["message"] == "started learner rank")
        .map(|v| {
            (
                v["fields"]["rank"].as_u64().unwrap(),
                v["fields"]["pid"].as_i64().unwrap() as i32,
            )
        })
        .collect()
}

fn wait_for<T>(dir: &Path, what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "no {what} after {timeout:?}{}",
            logs(dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn launcher_args<'a>(
    learner: &'a str,
    metrics: &'a str,
    rendezvous: &'a str,
    replay: &'a str,
    steps: &'a str,
) -> Vec<&'a str> {
    vec![
        "--metrics-addr",
        metrics,
        "learner",
        "--insecure",
        "--model",
        "tiny",
        "--replay",
        replay,
        "--listen",
        learner,
        "--local-ranks",
        "2",
        "--world-size",
        "2",
        "--rendezvous",
        rendezvous,
        "--step-log",
        steps,
        "--shutdown-timeout-secs",
        "10",
        "--collective-timeout-secs",
        "20",
    ]
}

#[test]
fn two_local_ranks_train_and_the_launcher_exits_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (replay_addr, learner_addr, metrics) = (free_addr(), free_pair(), free_pair());
    let rendezvous = free_addr().to_string();
    let replay_url = format!("http://{replay_addr}");
    let steps = d.join("steps.jsonl");
    let _replay = spawn(
        d,
        "replay-server",
        &[
            "--metrics-addr",
            "off",
            "replay-server",
            "--insecure",
            "--model",
            "tiny",
            "--listen",
            &replay_addr.to_string(),
            "--data-dir",
            d.join("wal").to_str().unwrap(),
            "--prompts-per-batch",
            "2",
            "--max-new-tokens",
            "24",
        ],
    );
    let (learner_s, metrics_s) = (learner_addr.to_string(), metrics.to_string());
    let mut args = launcher_args(
        &learner_s,
        &metrics_s,
        &rendezvous,
        &replay_url,
        steps.to_str().unwrap(),
    );
    args.extend(["--max-steps", "2"]);
    let mut launcher = spawn(d, "learner", &args);
    let _actor = spawn(
        d,
        "actor",
        &[
            "--metrics-addr",
            "off",
            "actor",
            "--replay",
            &replay_url,
            "--learner",
            &format!("http://{learner_addr}"),
        ],
    );
    let pids = wait_for(d, "two ranks started", Duration::from_secs(60), || {
        let p = rank_pids(d);
        (p.len() == 2).then_some(p)
    });
    assert_eq!(
        pids.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![0, 1],
        "{}",
        logs(d)
    );
    // Rank 1's metrics are on the base port + 100, and it trains the same steps.
    let rank1_metrics = format!("http://127.0.0.1:{}/metrics", metrics.port() + 100);
    let status = wait_for(d, "the launcher's exit", Duration::from_secs(600), || {
        launcher.0.as_mut().unwrap().try_wait().unwrap()
    });
    assert!(status.success(), "launcher: {status}{}", logs(d));
    let steps = read_jsonl(&steps);
    assert_eq!(steps.len(), 2, "{steps:?}{}", logs(d));
    let lines = log_lines(d, "learner");
    let follower_steps = lines
        .iter()
        .filter(|v| v["fields"]["message"] == "step done (follower)")
        .count();
    assert_eq!(follower_steps, 2, "{}", logs(d));
    assert!(
        lines
            .iter()
            .any(|v| v["fields"]["message"] == "every rank holds the same weights"),
        "{}",
        logs(d)
    );
    for (rank, pid) in pids {
        assert!(!alive(pid), "rank {rank} (pid {pid}) outlived the launcher");
    }
    // Nothing serves there any more.
    assert!(
        std::net::TcpStream::connect(
            rank1_metrics
                .trim_start_matches("http://")
                .trim_end_matches("/metrics")
        )
        .is_err(),
        "rank 1's metrics port still open"
    );
}

#[test]
fn a_killed_rank_stops_the_other_and_fails_the_launcher() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (learner_addr, metrics) = (free_pair(), free_pair());
    let rendezvous = free_addr().to_string();
    // No replay server: the ranks join, rank 0 waits to reach it.
    let replay_url = format!("http://{}", free_addr());
    let steps = d.join("steps.jsonl");
    let (learner_s, metrics_s) = (learner_addr.to_string(), metrics.to_string());
    let args = launcher_args(
        &learner_s,
        &metrics_s,
        &rendezvous,
        &replay_url,
        steps.to_str().unwrap(),
    );
    let mut launcher = spawn(d, "learner", &args);
    wait_for(d, "both ranks joined", Duration::from_secs(120), || {
        let joined = log_lines(d, "learner")
            .iter()
            .filter(|v| v["fields"]["message"] == "learner ranks joined")
            .count();
        (joined == 2).then_some(())
    });
    let pids = rank_pids(d);
    let (_, pid1) = *pids.iter().find(|p| p.0 == 1).expect("rank 1's pid");
    let (_, pid0) = *pids.iter().find(|p| p.0 == 0).expect("rank 0's pid");
    kill9(pid1);
    let killed = Instant::now();
    let status = wait_for(d, "the launcher's exit", Duration::from_secs(60), || {
        launcher.0.as_mut().unwrap().try_wait().unwrap()
    });
    assert!(!status.success(), "launcher exited 0 after a rank died");
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "the launcher took {:?} to stop",
        killed.elapsed()
    );
    let log = std::fs::read_to_string(d.join("learner.log")).unwrap();
    assert!(
        log.contains("learner rank 1 exited (exit code 137 / signal 9)"),
        "{log}"
    );
    assert!(!alive(pid0), "rank 0 (pid {pid0}) outlived the launcher");
}
