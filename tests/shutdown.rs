//! The service shell on real processes: each role started on its own (tiny model, loopback,
//! no TLS), probed the way an orchestrator probes it (`hindsight health` on the gRPC health
//! service and on `/readyz`), then stopped with SIGTERM one by one: each exits 0 within
//! `--shutdown-timeout-secs`, the actor leaves no lease behind and loses no group, the learner
//! checkpoints its last step, the replay server stops serving.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The bound every role runs with here.
const BOUND_SECS: u64 = 10;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A role process, killed if the test fails before it is stopped.
struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Proc {
    fn start(dir: &Path, name: &'static str, metrics: SocketAddr, args: &[&str]) -> Proc {
        Self::start_with_bound(dir, name, metrics, args, BOUND_SECS)
    }

    fn start_with_bound(
        dir: &Path,
        name: &'static str,
        metrics: SocketAddr,
        args: &[&str],
        bound: u64,
    ) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = hindsight()
            .args(["--threads", "1", "--metrics-addr", &metrics.to_string()])
            .args(args)
            .args([
                "--shutdown-timeout-secs",
                &bound.to_string(),
                "--cache-dir",
                dir.join("cache").to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Proc {
            name,
            child: Some(child),
            log,
        }
    }

    /// The log, without the colour codes of the text format.
    fn log(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // ESC [ ... m
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGTERM; returns the exit code and how long the exit took.
    fn terminate(&mut self) -> (Option<i32>, Duration) {
        let mut child = self.child.take().unwrap();
        send_signal(child.id() as i32, libc::SIGTERM);
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status.code(), started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(BOUND_SECS + 20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} still running {} s after SIGTERM; log:\n{}",
                    self.name,
                    started.elapsed().as_secs(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn health(args: &[&str]) -> Output {
    hindsight()
        .args(["--metrics-addr", "off", "health"])
        .args(args)
        .output()
        .unwrap()
}

fn all_logs(procs: &[&Proc]) -> String {
    procs
        .iter()
        .map(|p| format!("\n===== {}\n{}", p.name, p.log()))
        .collect()
}

/// Polls until `cond` holds, or panics with every log.
fn wait(procs: &[&Proc], what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < timeout,
            "no {what} after {timeout:?}{}",
            all_logs(procs)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `hindsight status` figures: (leases active, leases expired, groups accepted of `actor`).
fn status(replay: &str, learner: &str, actor: &str) -> Option<(u64, u64, u64)> {
    let out = hindsight()
        .args(["--metrics-addr", "off", "status", "--replay", replay])
        .args(["--learner", learner])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let number_after = |key: &str| -> Option<u64> {
        let rest = &text[text.find(key)? + key.len()..];
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let active = number_after("leases active")?;
    let expired = number_after("(expired")?;
    // `  actor ID: policy version V, groups G`
    let groups = text
        .lines()
        .find(|l| l.contains(&format!("actor {actor}:")))
        .and_then(|l| l.rsplit("groups ").next()?.trim().parse().ok())
        .unwrap_or(0);
    Some((active, expired, groups))
}

/// The last `accepted_groups=N` the actor logged when it stopped.
fn actor_accepted(log: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains("actor stopping"))?;
    let rest = &line[line.find("accepted_groups=")? + "accepted_groups=".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn every_role_is_probed_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (replay_addr, learner_addr) = (free_addr(), free_addr());
    let (replay_m, learner_m, actor_m) = (free_addr(), free_addr(), free_addr());
    let replay_url = format!("http://{replay_addr}");
    let learner_url = format!("http://{learner_addr}");
    let ckpt = d.join("checkpoints");
    let steps = d.join("steps.jsonl");

    let mut replay = Proc::start(
        d,
        "replay-server",
        replay_m,
        &[
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
    let mut learner = Proc::start(
        d,
        "learner",
        learner_m,
        &[
            "learner",
            "--insecure",
            "--model",
            "tiny",
            "--replay",
            &replay_url,
            "--listen",
            &learner_addr.to_string(),
            "--checkpoint-dir",
            ckpt.to_str().unwrap(),
            "--checkpoint-every",
            "1000",
            "--step-log",
            steps.to_str().unwrap(),
        ],
    );
    let mut actor = Proc::start(
        d,
        "actor",
        actor_m,
        &[
            "actor",
            "--model",
            "tiny",
            "--replay",
            &replay_url,
            "--learner",
            &learner_url,
            "--actor-id",
            "actor-0",
        ],
    );
    macro_rules! procs {
        () => {
            [&replay, &learner, &actor]
        };
    }

    // Ready, as an orchestrator sees it: gRPC health of both servers (whole server and per
    // service), /readyz of all three, /healthz.
    let ready = |args: &[&str]| health(args).status.code() == Some(0);
    let timeout = Duration::from_secs(300);
    wait(&procs!(), "replay server SERVING", timeout, || {
        ready(&[&replay_url])
    });
    wait(&procs!(), "learner SERVING", timeout, || {
        ready(&[&learner_url])
    });
    for (url, service) in [
        (&replay_url, "hindsight.v1.Replay"),
        (&learner_url, "hindsight.v1.Weights"),
    ] {
        let out = health(&[url, "--service", service]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{url} {service}: {stdout}");
        assert!(stdout.contains("SERVING"), "{stdout}");
    }
    for m in [replay_m, learner_m, actor_m] {
        let readyz = format!("http://{m}/readyz");
        wait(&procs!(), &format!("{readyz} ready"), timeout, || {
            ready(&[&readyz])
        });
        assert_eq!(
            health(&["--http", &format!("http://{m}/healthz")])
                .status
                .code(),
            Some(0)
        );
    }
    assert!(scrape(&format!("http://{replay_m}/metrics")).contains("role=\"replay-server\""));
    // The container HEALTHCHECK form: the process's own port from HINDSIGHT_METRICS_ADDR.
    let local = hindsight()
        .args(["--metrics-addr", "off", "health", "--local"])
        .env(
            "HINDSIGHT_METRICS_ADDR",
            format!("0.0.0.0:{}", learner_m.port()),
        )
        .output()
        .unwrap();
    assert_eq!(local.status.code(), Some(0), "{local:?}");

    // Work flows: a learner step and groups from the actor.
    wait(&procs!(), "a learner step", timeout, || {
        !read_jsonl(&steps).is_empty()
    });

    // The actor: SIGTERM mid-run; exits 0 within the bound, holds no lease, loses no group.
    let (code, took) = actor.terminate();
    assert_eq!(code, Some(0), "actor exit{}", all_logs(&procs!()));
    assert!(
        took < Duration::from_secs(BOUND_SECS),
        "actor took {took:?}"
    );
    let accepted = actor_accepted(&actor.log())
        .unwrap_or_else(|| panic!("no final count in the actor's log{}", all_logs(&procs!())));
    let (active, expired, groups) = status(&replay_url, &learner_url, "actor-0")
        .unwrap_or_else(|| panic!("no status{}", all_logs(&procs!())));
    assert_eq!(
        (active, expired),
        (0, 0),
        "leases left behind by the stopped actor{}",
        all_logs(&procs!())
    );
    assert_eq!(
        groups,
        accepted,
        "groups the actor saw accepted vs the server's count{}",
        all_logs(&procs!())
    );
    assert!(accepted > 0, "the actor delivered nothing");
    assert!(!ready(&[&format!("http://{actor_m}/readyz")]));

    // The learner: SIGTERM; exits 0 within the bound with a checkpoint of its last step.
    let last_step_before = read_jsonl(&steps).len();
    let (code, took) = learner.terminate();
    assert_eq!(code, Some(0), "learner exit{}", all_logs(&procs!()));
    assert!(
        took < Duration::from_secs(BOUND_SECS),
        "learner took {took:?}"
    );
    let steps_now = read_jsonl(&steps);
    let last = steps_now.last().unwrap()["step"].as_u64().unwrap();
    assert!(steps_now.len() >= last_step_before);
    let latest = std::fs::read_to_string(ckpt.join("latest"))
        .unwrap_or_else(|e| panic!("no checkpoint pointer ({e}){}", all_logs(&procs!())));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join(latest.trim()).join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state["step"].as_u64(),
        Some(last),
        "the checkpoint written at SIGTERM holds the last step: {state}"
    );
    assert!(
        learner.log().contains("checkpoint committed"),
        "{}",
        learner.log()
    );
    let out = health(&[&learner_url, "--timeout-ms", "1000"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a stopped learner is not serving"
    );

    // The replay server: SIGTERM; exits 0 within the bound; its health then says so.
    let pid = replay.pid();
    let (code, took) = replay.terminate();
    assert_eq!(code, Some(0), "replay server exit{}", all_logs(&procs!()));
    assert!(
        took < Duration::from_secs(BOUND_SECS),
        "replay server took {took:?}"
    );
    assert!(!alive(pid));
    let started = Instant::now();
    let out = health(&[&replay_url, "--timeout-ms", "1000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&replay_url) && err.contains("unreachable"),
        "{err}"
    );
}

/// An actor stopped in the middle of a generation that cannot finish within its bound gives
/// its leases back (the prompts are re-queued at once, nothing is left to expire) and exits 0
/// within the bound.
#[test]
fn an_actor_that_cannot_finish_gives_its_leases_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (replay_addr, learner_addr) = (free_addr(), free_addr());
    let replay_url = format!("http://{replay_addr}");
    let learner_url = format!("http://{learner_addr}");
    let replay = Proc::start(
        d,
        "replay-server",
        free_addr(),
        &[
            "replay-server",
            "--insecure",
            "--model",
            "tiny",
            "--listen",
            &replay_addr.to_string(),
            // Long responses: a generation takes far longer than the actor's bound.
            "--max-new-tokens",
            "4000",
            "--responses-per-prompt",
            "8",
        ],
    );
    let learner = Proc::start(
        d,
        "learner",
        free_addr(),
        &[
            "learner",
            "--insecure",
            "--model",
            "tiny",
            "--replay",
            &replay_url,
            "--listen",
            &learner_addr.to_string(),
        ],
    );
    let actor_bound = 3;
    let mut actor = Proc::start_with_bound(
        d,
        "actor",
        free_addr(),
        &[
            "actor",
            "--model",
            "tiny",
            "--replay",
            &replay_url,
            "--learner",
            &learner_url,
            "--actor-id",
            "actor-long",
            // Enough work that the generation outlasts the bound even on an idle machine
            // (the tiny model stops early at random: 4 prompts at batch 32 once took only
            // 1.3 s, under the 1.5 s generation bound).
            "--prompts-per-lease",
            "16",
            "--max-batch",
            "2",
        ],
        actor_bound,
    );
    macro_rules! procs {
        () => {
            [&replay, &learner, &actor]
        };
    }
    let leased =
        || status(&replay_url, &learner_url, "actor-long").is_some_and(|(active, _, _)| active > 0);
    wait(
        &procs!(),
        "a lease held by the actor",
        Duration::from_secs(300),
        leased,
    );
    let (code, took) = actor.terminate();
    assert_eq!(code, Some(0), "actor exit{}", all_logs(&procs!()));
    assert!(
        took < Duration::from_secs(actor_bound),
        "actor took {took:?} (bound {actor_bound} s)"
    );
    let log = actor.log();
    assert!(
        log.contains("did not finish within the drain bound") && log.contains("gave leases back"),
        "{}",
        all_logs(&procs!())
    );
    let (active, expired, _) = status(&replay_url, &learner_url, "actor-long").unwrap();
    assert_eq!((active, expired), (0, 0), "{}", all_logs(&procs!()));
    eprintln!("actor stopped mid-generation in {took:?} and gave its leases back");
}

/// Configuration errors: one line on stderr starting `error:`, exit code 2, no panic, quick.
#[test]
fn configuration_errors_are_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let cache = dir.path().join("cache");
    let cache = cache.to_str().unwrap();
    // A state directory that cannot be created: its parent is a regular file (what a volume
    // mounted as a file, or a path typo, gives; root may write anywhere, so not a permission).
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let wal = file.join("wal");
    let wal = wal.to_str().unwrap();
    let checkpoints = file.join("checkpoints");
    let checkpoints = checkpoints.to_str().unwrap();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "write-ahead log directory not writable",
            vec![
                "replay-server",
                "--insecure",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                wal,
            ],
            "--data-dir",
        ),
        (
            // Checked before the learner dials the (here absent) replay server.
            "checkpoint directory not writable",
            vec![
                "learner",
                "--insecure",
                "--model",
                "tiny",
                "--listen",
                "127.0.0.1:0",
                "--replay",
                "http://127.0.0.1:1",
                "--checkpoint-dir",
                checkpoints,
            ],
            "--checkpoint-dir",
        ),
        (
            "listen address in use",
            vec!["replay-server", "--insecure", "--listen", &busy_addr],
            "--listen",
        ),
        (
            "metrics address in use",
            vec![
                "--metrics-addr",
                &busy_addr,
                "replay-server",
                "--insecure",
                "--listen",
                "127.0.0.1:0",
            ],
            "--metrics-addr",
        ),
        (
            "unreadable model",
            vec![
                "learner",
                "--insecure",
                "--model",
                "/nonexistent/model.gguf",
                "--listen",
                "127.0.0.1:0",
            ],
            "--model /nonexistent/model.gguf",
        ),
        (
            "no TLS material and no --insecure",
            vec!["replay-server", "--listen", "127.0.0.1:0"],
            "missing --tls-cert",
        ),
        (
            "https without a CA",
            vec![
                "actor",
                "--model",
                "tiny",
                "--replay",
                "https://127.0.0.1:1",
                "--learner",
                "https://127.0.0.1:2",
            ],
            "--tls-ca",
        ),
        (
            "settings that do not fit together",
            vec![
                "replay-server",
                "--insecure",
                "--listen",
                "127.0.0.1:0",
                "--group-size",
                "4",
                "--responses-per-prompt",
                "6",
            ],
            "--responses-per-prompt",
        ),
        (
            "not an address",
            vec!["replay-server", "--insecure", "--listen", "nowhere"],
            "nowhere",
        ),
    ];
    for (what, args, needle) in cases {
        let started = Instant::now();
        let mut cmd = hindsight();
        if !args.contains(&"--metrics-addr") {
            cmd.args(["--metrics-addr", "off"]);
        }
        let out = cmd
            .args(&args)
            .args(["--cache-dir", cache])
            .env("HINDSIGHT_LOG_LEVEL", "error")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(err.contains(needle), "{what}: no {needle:?} in {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        // clap's own usage errors end with a hint line; ours are exactly one line.
        if !err.starts_with("error: invalid value") {
            assert_eq!(lines.len(), 1, "{what}: {err}");
            assert!(lines[0].starts_with("error: "), "{what}: {err}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: took {:?}",
            started.elapsed()
        );
    }
    drop(busy);
}

/// Old per-role variable names keep working (with a warning), new ones win.
#[test]
fn old_environment_names_still_work() {
    let out = hindsight()
        .args(["--metrics-addr", "off", "replay-server", "--insecure"])
        .env("HINDSIGHT_REPLAY_LISTEN", "nowhere")
        .env("HINDSIGHT_LOG_LEVEL", "error")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nowhere"), "the old name was read: {err}");
}
