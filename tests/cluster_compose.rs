//! The docker-compose cluster of deploy/compose, on real Docker with images built from the
//! binary under test (ARCHITECTURE.md, "Deployment"): tiny model, TLS and tokens on.
//!
//! Brought up with 2 actors; scaled to 4 and back to 1 while training; one actor's process
//! and then the replay server's process killed with SIGKILL (Docker restarts them; the WAL
//! volume survives). The learner must keep training with actors on new weight versions, every
//! group acknowledged to an actor must be trained exactly once or still be queued, Prometheus
//! must see every target (each scaled actor included) up, and every dashboard panel's query
//! must return data. `down -v` runs however the test ends.
//!
//! Needs a Docker engine and docker-compose (or `docker compose`); without them the test
//! fails with a message saying so: it is never skipped.

mod common;
#[path = "support/exactly_once.rs"]
mod exactly_once;
mod monitoring;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Learner steps the run must reach after both kills.
const STEPS_AFTER_FAULTS: u64 = 3;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"));
    out
}

fn ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The compose command of this machine: `docker-compose` (1.29 here) or `docker compose`.
fn compose_program() -> Vec<String> {
    let docker = Command::new("docker").arg("info").output();
    match docker {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "this test needs a running Docker engine; `docker info` failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("this test needs Docker (the `docker` command: {e})"),
    }
    if Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return vec!["docker-compose".into()];
    }
    if Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return vec!["docker".into(), "compose".into()];
    }
    panic!("this test needs docker-compose (1.29+) or the `docker compose` plugin")
}

/// A compose project of its own; `down -v` and the test images go when it is dropped.
struct Cluster {
    program: Vec<String>,
    project: String,
    env: Vec<(String, String)>,
    images: Vec<String>,
    replay_port: u16,
    prometheus_port: u16,
    scratch: tempfile::TempDir,
    /// Actor logs collected before containers are removed by a scale-down.
    actor_logs: String,
}

impl Cluster {
    fn compose(&self) -> Command {
        let mut c = Command::new(&self.program[0]);
        c.args(&self.program[1..])
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(root().join("deploy/compose/docker-compose.yml"))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    fn up(&self, actors: usize) {
        ok(self
            .compose()
            .args(["up", "-d", "--no-recreate", "--scale"])
            .arg(format!("actor={actors}")));
    }

    fn containers(&self, service: &str) -> Vec<String> {
        ok(self.compose().args(["ps", "-q", service]))
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    fn inspect(&self, container: &str, format: &str) -> String {
        ok(Command::new("docker").args(["inspect", "-f", format, container]))
            .trim()
            .to_string()
    }

    /// Copies `path` out of `service`'s first container (the images have no shell or cat).
    fn copy_out(&self, service: &str, path: &str) -> Option<PathBuf> {
        let container = self.containers(service).into_iter().next()?;
        let name = Path::new(path)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let dest = self.scratch.path().join(format!("{service}-{name}"));
        let out = run(Command::new("docker")
            .arg("cp")
            .arg(format!("{container}:{path}"))
            .arg(&dest));
        out.status.success().then_some(dest)
    }

    fn logs(&self, service: &str) -> String {
        let out = run(self.compose().args(["logs", "--no-color", service]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn steps(&self) -> Vec<Value> {
        self.copy_out("learner", "/data/checkpoints/steps.jsonl")
            .map(|p| common::read_jsonl(&p))
            .unwrap_or_default()
    }

    fn last_step(&self) -> u64 {
        self.steps()
            .last()
            .and_then(|s| s["step"].as_u64())
            .unwrap_or(0)
    }

    /// Polls `cond` every second until it holds, else fails with the cluster's logs.
    fn wait<T>(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            if let Some(v) = cond() {
                eprintln!("compose: {what} after {:.1?}", started.elapsed());
                return v;
            }
            if started.elapsed() > timeout {
                panic!("compose: no {what} after {timeout:?}{}", self.dump());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn dump(&self) -> String {
        let mut out = ok(self.compose().args(["ps"]));
        for service in [
            "certs",
            "model",
            "replay-server",
            "learner",
            "actor",
            "prometheus",
        ] {
            let logs = self.logs(service);
            let lines: Vec<&str> = logs.lines().collect();
            out += &format!(
                "\n===== {service} (last 40 lines)\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
        out
    }

    fn prometheus(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.prometheus_port))
    }

    /// A Prometheus instant query through the published port.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        monitoring::query(self.prometheus(), expr)
    }

    /// The replay server's Status over the published port, with TLS and the status token
    /// copied out of the `secrets` volume.
    fn replay_status(&self) -> Option<hindsight_proto::v1::ReplayStatusResponse> {
        let ca = self.copy_out("replay-server", "/data/secrets/ca.pem")?;
        let token = self.copy_out("replay-server", "/data/secrets/status.token")?;
        let security =
            hindsight_service::ClientSecurity::from_args(&hindsight_service::ClientSecurityArgs {
                tls_ca: Some(ca),
                token_file: Some(token),
                ..Default::default()
            })
            .ok()?;
        let url = format!("https://127.0.0.1:{}", self.replay_port);
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let channel = security.connect_authed(&url, 5).await.ok()?;
            hindsight_proto::v1::replay_client::ReplayClient::new(channel)
                .status(hindsight_proto::v1::ReplayStatusRequest {})
                .await
                .ok()
                .map(|r| r.into_inner())
        })
    }

    fn kill9(&self, container: &str) -> (i32, u64) {
        let pid: i32 = self.inspect(container, "{{.State.Pid}}").parse().unwrap();
        let restarts: u64 = self
            .inspect(container, "{{.RestartCount}}")
            .parse()
            .unwrap();
        assert!(pid > 0, "container {container} is not running");
        common::kill9(pid);
        (pid, restarts)
    }

    fn wait_restarted(&self, container: &str, restarts_before: u64) {
        self.wait(
            &format!("a restart of {}", &container[..12]),
            Duration::from_secs(120),
            || {
                let restarts: u64 = self.inspect(container, "{{.RestartCount}}").parse().ok()?;
                let running = self.inspect(container, "{{.State.Running}}") == "true";
                (restarts > restarts_before && running).then_some(())
            },
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let out = run(self
            .compose()
            .args(["down", "-v", "--remove-orphans", "-t", "10"]));
        if !out.status.success() {
            eprintln!(
                "compose down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for image in &self.images {
            let _ = run(Command::new("docker").args(["image", "rm", "-f", image]));
        }
    }
}

fn build_images(tag: &str) -> (String, String) {
    let hindsight = format!("hindsight:{tag}");
    let prometheus = format!("hindsight-prometheus:{tag}");
    let started = Instant::now();
    ok(Command::new(root().join("deploy/docker/build-image.sh"))
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_hindsight"))
        .arg("--tag")
        .arg(&hindsight));
    ok(
        Command::new(root().join("deploy/docker/build-prometheus-image.sh"))
            .arg("--tag")
            .arg(&prometheus),
    );
    eprintln!("compose: images built in {:.1?}", started.elapsed());
    (hindsight, prometheus)
}

#[test]
fn compose_cluster_scales_survives_kills_and_is_observable() {
    let started = Instant::now();
    let program = compose_program();
    let project = format!("hindsight-test-{}", std::process::id());
    let (image, prometheus_image) = build_images(&project);
    let (replay_port, learner_port, prometheus_port) = (
        monitoring::free_port(),
        monitoring::free_port(),
        monitoring::free_port(),
    );
    let env: Vec<(String, String)> = [
        ("HINDSIGHT_IMAGE", image.clone()),
        ("HINDSIGHT_PROMETHEUS_IMAGE", prometheus_image.clone()),
        ("MODEL", "tiny".into()),
        ("HINDSIGHT_REPLAY_PORT", replay_port.to_string()),
        ("HINDSIGHT_LEARNER_PORT", learner_port.to_string()),
        ("HINDSIGHT_PROMETHEUS_PORT", prometheus_port.to_string()),
        ("HINDSIGHT_BIND", "127.0.0.1".into()),
        // Actors log each acknowledged group (the exactly-once check reads them).
        ("RUST_LOG", "info,hindsight_actor=debug".into()),
        ("CHECKPOINT_EVERY", "2".into()),
        ("MAX_NEW_TOKENS", "24".into()),
        // Scaling and kills make actors lag: keep every group (the check wants none stale).
        ("MAX_STALENESS", "100000".into()),
        // The optional evaluator too (its dashboard panels need it), on a small slice.
        ("COMPOSE_PROFILES", "evaluator".into()),
        ("EVAL_EVERY", "1".into()),
        ("EVAL_LIMIT", "2".into()),
        ("EVAL_MAX_NEW_TOKENS", "16".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut cluster = Cluster {
        program,
        project,
        env,
        images: vec![image, prometheus_image],
        replay_port,
        prometheus_port,
        scratch: tempfile::tempdir().unwrap(),
        actor_logs: String::new(),
    };

    cluster.up(2);
    cluster.wait("the first learner step", Duration::from_secs(240), || {
        (cluster.last_step() >= 1).then_some(())
    });
    eprintln!(
        "compose: first learner step {:.1?} after the start",
        started.elapsed()
    );

    // Scale up while training: 4 actors, each found by Prometheus through DNS.
    cluster.up(4);
    cluster.wait(
        "4 actor targets up in Prometheus",
        Duration::from_secs(90),
        || {
            let up = cluster.query("up{job=\"actor\"} == 1").ok()?;
            (up.len() == 4).then_some(())
        },
    );
    let joined = Instant::now();
    let before = cluster.last_step();
    cluster.wait(
        "a learner step with 4 actors",
        Duration::from_secs(120),
        || (cluster.last_step() > before).then_some(()),
    );
    eprintln!(
        "compose: step with 4 actors {:.1?} after scaling",
        joined.elapsed()
    );

    // Scale down to 1 (keeping the removed actors' logs for the exactly-once check).
    cluster.actor_logs += &cluster.logs("actor");
    cluster.up(1);
    let actors = cluster.containers("actor");
    assert_eq!(actors.len(), 1, "scaled to 1 actor: {actors:?}");

    // kill -9 the last actor's process: Docker restarts it.
    let (pid, restarts) = cluster.kill9(&actors[0]);
    eprintln!("compose: killed actor pid {pid}");
    cluster.wait_restarted(&actors[0], restarts);

    // kill -9 the replay server's process: restarted from its WAL volume.
    let replay = cluster.containers("replay-server").remove(0);
    let at_kill = cluster.last_step();
    let (pid, restarts) = cluster.kill9(&replay);
    eprintln!("compose: killed replay-server pid {pid} at learner step {at_kill}");
    cluster.wait_restarted(&replay, restarts);

    let target = at_kill + STEPS_AFTER_FAULTS;
    cluster.wait(
        &format!("learner step {target}"),
        Duration::from_secs(300),
        || (cluster.last_step() >= target).then_some(()),
    );

    // Actors generate with new weights (published after the kills).
    let learner_version = cluster
        .steps()
        .last()
        .and_then(|s| s["policy_version"].as_u64())
        .unwrap();
    cluster.wait(
        "the actor on a weight version published after the kills",
        Duration::from_secs(120),
        || {
            let v = cluster.query("max(hindsight_actor_policy_version)").ok()?;
            let v: f64 = v.first()?["value"][1].as_str()?.parse().ok()?;
            (v as u64 > at_kill).then_some(())
        },
    );
    // On one host the actors map the learner's weight files from the shared volume rather
    // than fetching them over gRPC.
    cluster.wait(
        "actors taking weight versions from the shared volume",
        Duration::from_secs(60),
        || {
            let v = cluster
                .query("sum(hindsight_actor_weight_updates_total{via=\"shared\"})")
                .ok()?;
            let v: f64 = v.first()?["value"][1].as_str()?.parse().ok()?;
            (v > 0.0).then_some(())
        },
    );

    // Prometheus sees every target up, and every dashboard panel returns data.
    cluster.wait(
        "every Prometheus target up",
        Duration::from_secs(60),
        || {
            let all = cluster.query("up").ok()?;
            let down: Vec<&Value> = all.iter().filter(|s| s["value"][1] != "1").collect();
            (all.len() >= 3 && down.is_empty()).then_some(())
        },
    );
    let dashboard = monitoring::dashboard();
    let started_panels = Instant::now();
    loop {
        // The prometheus.yml of the compose cluster scrapes every 5 s.
        let missing = monitoring::panels_without_data(cluster.prometheus(), &dashboard, 5);
        if missing.is_empty() {
            break;
        }
        if started_panels.elapsed() > Duration::from_secs(60) {
            panic!(
                "dashboard panels without data:\n{}{}",
                missing.join("\n"),
                cluster.dump()
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }

    // Exactly once: from the actors' acknowledgements, the batch log and the step log.
    cluster.actor_logs += &cluster.logs("actor");
    let acked: BTreeSet<u64> = exactly_once::acknowledged_in(&cluster.actor_logs);
    let status = cluster
        .replay_status()
        .unwrap_or_else(|| panic!("no Status from the replay server{}", cluster.dump()));
    // In this order: a batch is logged before it is served, so the batch log read after the
    // step log holds every trained batch.
    let steps = cluster.steps();
    let batch_log = cluster
        .copy_out("replay-server", "/data/wal/batches.jsonl")
        .map(|p| common::read_jsonl(&p))
        .unwrap_or_default();
    let ledger = exactly_once::Ledger {
        steps,
        batch_log,
        acked,
        groups_waiting: status.groups_waiting,
        groups_stale: status.groups_stale,
    };
    match ledger.check(None) {
        Ok(summary) => eprintln!("compose: {summary}; learner version {learner_version}"),
        Err(why) => panic!("compose: exactly-once broken: {why}{}", cluster.dump()),
    }
    eprintln!("compose: the whole test took {:.1?}", started.elapsed());
}
