//! Supervision in `hindsight up`, with real processes on the tiny model: a process killed with
//! SIGKILL is restarted in place (new pid in `endpoints.json`, a marker in its log, counted in
//! `summary.json`), and every child dies with `up` when `up` itself is killed with SIGKILL.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The fast settings of `e2e_tiny.rs`.
const TINY: &[&str] = &[
    "--model",
    "tiny",
    "--actors",
    "2",
    "--max-new-tokens",
    "48",
    "--prompts-per-batch",
    "2",
    "--threads-per-process",
    "1",
];

fn start_tiny(run_dir: &Path, extra: &[&str]) -> Up {
    Up::start(run_dir, &[TINY, extra].concat())
}

fn log_of(run_dir: &Path, name: &str) -> String {
    std::fs::read_to_string(run_dir.join(format!("logs/{name}.log"))).unwrap_or_default()
}

fn marker(name: &str) -> String {
    format!("=== hindsight up: restarting {name} (exit code 137 / signal 9), restart 1 ===")
}

/// Every (name, pid) of `endpoints.json`.
fn all_pids(endpoints: &Value) -> Vec<(String, i32)> {
    endpoints["pids"]
        .as_object()
        .expect("pids in endpoints.json")
        .iter()
        .map(|(n, p)| (n.clone(), p.as_i64().unwrap() as i32))
        .collect()
}

/// The entry of process `name` in `summary.json`.
fn process<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {summary}"))
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches("/metrics")
        .parse()
        .unwrap()
}

/// Waits until every pid is gone (or a zombie); panics with the live ones after `timeout`.
fn wait_gone(pids: &[(String, i32)], run_dir: &Path, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let left: Vec<_> = pids.iter().filter(|(_, p)| alive(*p)).collect();
        if left.is_empty() {
            return started.elapsed();
        }
        if started.elapsed() > timeout {
            panic!(
                "still running {timeout:?} later: {left:?}{}",
                dump_logs(run_dir)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_actor_is_restarted_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let t0 = Instant::now();
    let mut up = start_tiny(&run_dir, &["--steps", "3"]);
    wait_for_steps(up.child(), &run_dir, 1, Duration::from_secs(300));
    let first_step = t0.elapsed();

    let before = read_endpoints(&run_dir).unwrap();
    let old = pid_of(&run_dir, "actor-1").unwrap();
    kill9(old);
    let (new, restarted_after) = wait_until(
        up.child(),
        &run_dir,
        Duration::from_secs(30),
        "restart of actor-1 (new pid in endpoints.json, marker in its log)",
        || {
            let new = pid_of(&run_dir, "actor-1")?;
            (new != old && log_of(&run_dir, "actor-1").contains(&marker("actor-1"))).then_some(new)
        },
    );
    assert!(alive(new), "restarted actor-1 (pid {new}) is not running");
    assert!(!alive(old), "killed actor-1 (pid {old}) still running");
    // Nothing else was restarted.
    for (name, pid) in all_pids(&before)
        .into_iter()
        .filter(|(n, _)| n != "actor-1")
    {
        assert_eq!(pid_of(&run_dir, &name), Some(pid), "{name} changed pid");
    }
    // The new actor works: it gets as far as loading the model, after the marker.
    wait_until(
        up.child(),
        &run_dir,
        Duration::from_secs(60),
        "'actor ready' in actor-1's log after the restart",
        || {
            let log = log_of(&run_dir, "actor-1");
            let (_, after) = log.split_once(&marker("actor-1"))?;
            after.contains("actor ready").then_some(())
        },
    );

    let steps = wait_for_steps(up.child(), &run_dir, 3, Duration::from_secs(300));
    let all_steps = t0.elapsed();
    let summary = stop_up(up.take(), &run_dir);
    let measured = format!(
        "first step after {first_step:?}, actor-1 restarted {restarted_after:?} after kill -9, \
         3 steps after {all_steps:?}, total {:?}",
        t0.elapsed()
    );
    eprintln!("{measured}");

    assert_eq!(steps.len(), 3, "{steps:?}");
    assert_eq!(summary["ok"], true, "{measured}\n{summary}");
    assert_eq!(summary["steps_completed"], 3, "{summary}");
    let actor = process(&summary, "actor-1");
    assert_eq!(actor["restarts"], 1, "{measured}\n{actor}");
    assert_eq!(actor["exits"][0], "signal 9", "{actor}");
    assert_eq!(actor["pid"], new, "{actor}");
    assert!(actor["peak_rss_mib"].as_f64().unwrap() > 1.0, "{actor}");
    for p in summary["processes"].as_array().unwrap() {
        if p["name"] != "actor-1" {
            assert_eq!(p["restarts"], 0, "{p}");
        }
        // Stopped by up's SIGTERM, each exits by itself: the last exit is a code, not a signal.
        assert_eq!(p["exit_code"], 0, "{p}");
        assert_eq!(p["exit_signal"], Value::Null, "{p}");
    }
    let up_log = std::fs::read_to_string(run_dir.join("up.log")).unwrap();
    assert!(
        up_log.contains("actor-1 exited (signal 9); restarted (1st restart)"),
        "{up_log}"
    );
    // Up stopped every process, the restarted one included.
    let pids = all_pids(&read_endpoints(&run_dir).unwrap());
    wait_gone(&pids, &run_dir, Duration::from_secs(5));
}

#[test]
fn children_die_when_up_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut up = start_tiny(&run_dir, &["--steps", "1000"]);
    // Running children: each one serves its /metrics endpoint (opened by the role process
    // itself, so it has started, not just forked).
    let (pids, started_after) = wait_until(
        up.child(),
        &run_dir,
        Duration::from_secs(60),
        "every child serving /metrics",
        || {
            let e = read_endpoints(&run_dir)?;
            let metrics = e["metrics"].as_object()?;
            for url in metrics.values() {
                TcpStream::connect_timeout(&addr_of(url.as_str()?), Duration::from_secs(1)).ok()?;
            }
            let pids = all_pids(&e);
            pids.iter().all(|(_, p)| alive(*p)).then_some(pids)
        },
    );
    assert_eq!(pids.len(), 4, "{pids:?}");

    let mut child = up.take();
    kill9(child.id() as i32);
    child.wait().unwrap();
    let gone_after = wait_gone(&pids, &run_dir, Duration::from_secs(10));
    eprintln!(
        "children running {started_after:?} after start; all {} gone {gone_after:?} after kill -9 of up",
        pids.len()
    );
}

#[test]
fn a_killed_replay_server_is_restarted_and_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let t0 = Instant::now();
    let mut up = start_tiny(&run_dir, &["--steps", "3"]);
    wait_for_steps(up.child(), &run_dir, 1, Duration::from_secs(300));
    let first_step = t0.elapsed();

    let endpoints = read_endpoints(&run_dir).unwrap();
    let addr = addr_of(endpoints["replay"].as_str().unwrap());
    let old = pid_of(&run_dir, "replay-server").unwrap();
    kill9(old);
    // Same port, new process: the pid changed, the marker is in the log, the port answers.
    let (new, serving_after) = wait_until(
        up.child(),
        &run_dir,
        Duration::from_secs(30),
        "restarted replay server accepting connections on its port",
        || {
            let new = pid_of(&run_dir, "replay-server")?;
            if new == old || !log_of(&run_dir, "replay-server").contains(&marker("replay-server")) {
                return None;
            }
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
            Some(new)
        },
    );
    assert!(
        alive(new),
        "restarted replay server (pid {new}) is not running"
    );

    // Whether training continues across a replay restart is the replay server's and the
    // learner's business, not asserted here: `up` may report the run incomplete.
    let pids = all_pids(&read_endpoints(&run_dir).unwrap());
    let (status, summary) = stop_up_status(up.take(), &run_dir);
    let measured = format!(
        "first step after {first_step:?}, replay server serving again {serving_after:?} after \
         kill -9; up exited {status}"
    );
    eprintln!("{measured}");
    let summary = summary.unwrap_or_else(|| panic!("no summary.json; {measured}"));
    let replay = process(&summary, "replay-server");
    assert!(
        replay["restarts"].as_u64().unwrap() >= 1,
        "{measured}\n{replay}"
    );
    assert_eq!(replay["exits"][0], "signal 9", "{replay}");
    wait_gone(&pids, &run_dir, Duration::from_secs(5));
}
