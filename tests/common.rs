//! Shared helpers of the end-to-end tests: run `hindsight up` as a real process tree, wait for
//! learner steps, scrape Prometheus endpoints over HTTP.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn hindsight() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hindsight"))
}

/// `hindsight up ... --linger` in the background, logging to `run_dir/up.log`.
pub fn start_up(run_dir: &Path, extra: &[&str]) -> Child {
    std::fs::create_dir_all(run_dir).unwrap();
    let log = std::fs::File::create(run_dir.join("up.log")).unwrap();
    hindsight()
        .arg("up")
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--linger")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawning hindsight up")
}

pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad JSON line in {}: {e}: {l}", path.display()))
        })
        .collect()
}

/// The last lines of `up.log` and of every process log, to print on a failure.
pub fn dump_logs(run_dir: &Path) -> String {
    let mut out = String::new();
    let mut files: Vec<PathBuf> = vec![run_dir.join("up.log")];
    if let Ok(rd) = std::fs::read_dir(run_dir.join("logs")) {
        files.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out += &format!(
            "\n===== {} (last 40 lines)\n{}",
            f.display(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
    out
}

/// Waits until the learner's step log has `steps` lines; panics with every log on failure.
pub fn wait_for_steps(
    up: &mut Child,
    run_dir: &Path,
    steps: usize,
    timeout: Duration,
) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let lines = read_jsonl(&run_dir.join("steps.jsonl"));
        if lines.len() >= steps {
            return lines;
        }
        if let Ok(Some(status)) = up.try_wait() {
            panic!("hindsight up exited early ({status}){}", dump_logs(run_dir));
        }
        if started.elapsed() > timeout {
            let _ = up.kill();
            panic!(
                "only {} of {steps} steps after {timeout:?}{}",
                lines.len(),
                dump_logs(run_dir)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Stops `up` with SIGTERM (as Ctrl-C would) and returns the summary it wrote.
pub fn stop_up(up: Child, run_dir: &Path) -> Value {
    let (status, summary) = stop_up_status(up, run_dir);
    assert!(
        status.success(),
        "hindsight up failed: {status}{}",
        dump_logs(run_dir)
    );
    summary.unwrap_or_else(|| panic!("no summary.json{}", dump_logs(run_dir)))
}

/// Stops `up` with SIGTERM and returns how it exited and the summary it wrote, if any,
/// whether or not the run succeeded.
pub fn stop_up_status(mut up: Child, run_dir: &Path) -> (ExitStatus, Option<Value>) {
    unsafe {
        libc::kill(up.id() as libc::pid_t, libc::SIGTERM);
    }
    let started = Instant::now();
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = up.kill();
            panic!(
                "hindsight up did not stop within 90 s{}",
                dump_logs(run_dir)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let summary = std::fs::read_to_string(run_dir.join("summary.json"))
        .ok()
        .map(|text| serde_json::from_str(&text).unwrap());
    (status, summary)
}

/// `endpoints.json` of a running `up`, once it exists.
pub fn read_endpoints(run_dir: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(run_dir.join("endpoints.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The pid of process `name` (`replay-server`, `learner`, `actor-0`, ...) in `endpoints.json`.
pub fn pid_of(run_dir: &Path, name: &str) -> Option<i32> {
    read_endpoints(run_dir)?["pids"][name]
        .as_i64()
        .map(|p| p as i32)
}

/// Whether `pid` names a live process: it exists and is not a zombie (a child of a dead
/// parent is reparented and stays a zombie until its new parent reaps it).
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S ...`: comm may contain anything, the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

pub fn scrape(url: &str) -> String {
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.starts_with("HTTP/1.") && body.contains(" 200 "),
        "bad response from {url}: {body:.200}"
    );
    body.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Values of every sample of series `name` in a Prometheus text page.
pub fn series(page: &str, name: &str) -> Vec<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                return None;
            }
            rest.rsplit(' ').next()?.parse().ok()
        })
        .collect()
}

/// A running `hindsight up ... --linger`, killed with SIGKILL if the test ends early (a failed
/// assertion): its children then die with it instead of outliving the test.
pub struct Up(Option<Child>);

impl Up {
    pub fn start(run_dir: &Path, args: &[&str]) -> Up {
        Up(Some(start_up(run_dir, args)))
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("up is running")
    }

    pub fn take(&mut self) -> Child {
        self.0.take().expect("up is running")
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `cond` every 50 ms until it returns a value; returns it and how long that took.
/// Panics with `what` and every log after `timeout`, or if `up` exits meanwhile.
pub fn wait_until<T>(
    up: &mut Child,
    run_dir: &Path,
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> Option<T>,
) -> (T, Duration) {
    let started = Instant::now();
    loop {
        if let Some(v) = cond() {
            return (v, started.elapsed());
        }
        if let Ok(Some(status)) = up.try_wait() {
            panic!(
                "hindsight up exited ({status}) while waiting for {what}{}",
                dump_logs(run_dir)
            );
        }
        if started.elapsed() > timeout {
            panic!("no {what} after {timeout:?}{}", dump_logs(run_dir));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `signal` to `pid` (a real kill: SIGKILL or SIGTERM).
pub fn send_signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory effects.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        rc,
        0,
        "kill -{signal} {pid}: {}",
        std::io::Error::last_os_error()
    );
}

pub fn kill9(pid: i32) {
    send_signal(pid, libc::SIGKILL);
}
