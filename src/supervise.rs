//! Process supervision for `hindsight up`: starts each role as a child process, restarts one
//! that exits unexpectedly (same arguments, same ports, same log file) after a backoff, gives
//! up when one crashes too often, and stops them all in order.
//!
//! Rules, and why:
//! - A child dies with `up`. Each child asks the kernel for SIGKILL when its parent dies
//!   (`PR_SET_PDEATHSIG`), so `kill -9` of `up` does not leave a cluster holding its ports
//!   and cores with nobody to stop it. Each child also runs in its own process group, so a
//!   Ctrl-C at the terminal reaches only `up`, which then stops the children in order
//!   (actors, learner, replay server) instead of all of them at once.
//! - Exit status 0 means "done" (an actor with `--max-groups`): not restarted, not a failure.
//!   Any other exit, a signal included, is a crash and is restarted after a backoff of
//!   `backoff_initial` doubling per crash up to `backoff_max`, so that a process that fails at
//!   start does not spin. More than `max_restarts` crashes of one process within `window`
//!   fails the run: that is a bug, not a hiccup.
//! - Nothing is restarted while stopping: [`Supervisor::poll`] is the only place that
//!   restarts, and `up` stops polling before it calls [`Supervisor::stop`].
//! - A restart appends to the process's log after a marker line, so one file tells the whole
//!   story of the process.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How a process ended: its exit code, or the signal that killed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn from_status(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(sig)) => Exit::Signal(sig),
            // Unix reports one or the other; keep a value rather than panic.
            (None, None) => Exit::Code(-1),
        }
    }

    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }

    pub fn code(self) -> Option<i32> {
        match self {
            Exit::Code(c) => Some(c),
            Exit::Signal(_) => None,
        }
    }

    pub fn signal(self) -> Option<i32> {
        match self {
            Exit::Code(_) => None,
            Exit::Signal(s) => Some(s),
        }
    }

    /// The marker's wording: the status a shell would show (`$?`, 128 + signal) and the signal.
    pub fn describe_long(self) -> String {
        match self {
            Exit::Code(c) => format!("exit code {c}"),
            Exit::Signal(s) => format!("exit code {} / signal {s}", 128 + s),
        }
    }
}

/// `code 1` or `signal 9` (the form in `summary.json` and on the progress output).
impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// What to run for one process.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Appended on every start after the first (the learner's `--resume`: a restarted learner
    /// continues from its newest checkpoint instead of from the base model).
    pub restart_args: Vec<OsString>,
    /// stdout and stderr; truncated at the first start, appended to on a restart.
    pub log: PathBuf,
    /// A service runs until it is stopped: any exit the supervisor did not ask for, even with
    /// code 0 (a graceful shutdown after someone else's SIGTERM), is restarted. Otherwise
    /// exit code 0 means the process finished its work.
    pub service: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct RestartPolicy {
    /// Crashes of one process tolerated within `window`; one more fails the run.
    pub max_restarts: u32,
    pub window: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl RestartPolicy {
    /// `max_restarts` within `window`, with the backoff `up` uses (500 ms doubling to 10 s).
    pub fn new(max_restarts: u32, window: Duration) -> Self {
        RestartPolicy {
            max_restarts,
            window,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
        }
    }

    /// Delay before the restart that follows the `crashes`-th recent crash (1-based).
    fn backoff(&self, crashes: usize) -> Duration {
        let doublings = crashes.saturating_sub(1).min(30) as u32;
        self.backoff_initial
            .saturating_mul(1 << doublings)
            .min(self.backoff_max)
    }
}

enum State {
    Running(Child),
    /// Crashed; restart at this time (the exit is the one that caused it).
    Waiting {
        at: Instant,
        after: Exit,
    },
    /// Not running and not coming back: finished with 0, stopped, or given up.
    Done,
}

/// One supervised process and its history.
pub struct Proc {
    pub spec: Spec,
    state: State,
    /// Of the current (or last) instance.
    pub pid: u32,
    /// Peak resident set across every instance (the max of each one's VmHWM).
    pub peak_rss_kib: u64,
    /// Every exit seen, in order; while `up` stops, the last one is that stop's.
    pub exits: Vec<Exit>,
    pub restarts: u32,
    /// Times of the crashes within the policy's window (older ones are dropped).
    recent_crashes: VecDeque<Instant>,
}

impl Proc {
    pub fn last_exit(&self) -> Option<Exit> {
        self.exits.last().copied()
    }

    fn sample_memory(&mut self) {
        if !matches!(self.state, State::Running(_)) {
            return;
        }
        let Ok(s) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) else {
            return;
        };
        for line in s.lines() {
            if let Some(v) = line.strip_prefix("VmHWM:") {
                let kib = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                self.peak_rss_kib = self.peak_rss_kib.max(kib);
            }
        }
    }

    /// Reaps the child if it has exited.
    fn try_reap(&mut self) -> Option<Exit> {
        let State::Running(child) = &mut self.state else {
            return None;
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                let exit = Exit::from_status(status);
                self.exits.push(exit);
                self.state = State::Done;
                Some(exit)
            }
            // Err: the child is not ours to wait for any more (cannot happen for a Child we
            // hold); keep polling rather than invent an exit.
            Ok(None) | Err(_) => None,
        }
    }

    /// SIGTERM, then SIGKILL if it is still running after `grace`.
    fn terminate(&mut self, grace: Duration) {
        self.try_reap();
        let State::Running(child) = &mut self.state else {
            // Waiting for a restart or already done: nothing runs, and nothing will.
            self.state = State::Done;
            return;
        };
        // SAFETY: kill(2) on the pid of a child we have not reaped yet, so the pid is still
        // ours (a zombie at worst) and cannot name another process.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.try_reap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let State::Running(child) = &mut self.state {
            let _ = child.kill();
            let exit = child
                .wait()
                .map(Exit::from_status)
                .unwrap_or(Exit::Signal(libc::SIGKILL));
            self.exits.push(exit);
            self.state = State::Done;
        }
    }
}

/// What [`Supervisor::poll`] saw happen.
#[derive(Debug)]
pub enum Event {
    /// `name` crashed with `exit` and was started again (its `restart`-th restart).
    Restarted {
        name: String,
        exit: Exit,
        restart: u32,
    },
    /// `name` exited 0 on its own: done, not restarted.
    Finished { name: String },
    /// `name` crashed more often than the policy allows: the run should fail.
    GaveUp {
        name: String,
        exit: Exit,
        crashes: usize,
        log: PathBuf,
    },
}

/// The processes of one `up` run, in start order.
pub struct Supervisor {
    policy: RestartPolicy,
    procs: Vec<Proc>,
}

impl Supervisor {
    pub fn new(policy: RestartPolicy) -> Self {
        Supervisor {
            policy,
            procs: Vec::new(),
        }
    }

    pub fn procs(&self) -> &[Proc] {
        &self.procs
    }

    /// Current pid of every process, by name.
    pub fn pids(&self) -> BTreeMap<String, u32> {
        self.procs
            .iter()
            .map(|p| (p.spec.name.clone(), p.pid))
            .collect()
    }

    /// Starts a process for the first time (its log file is truncated).
    pub fn start(&mut self, spec: Spec) -> Result<()> {
        let log = File::create(&spec.log)
            .with_context(|| format!("creating log file {}", spec.log.display()))?;
        let child = spawn(&spec, false, log).with_context(|| format!("starting {}", spec.name))?;
        self.procs.push(Proc {
            pid: child.id(),
            spec,
            state: State::Running(child),
            peak_rss_kib: 0,
            exits: Vec::new(),
            restarts: 0,
            recent_crashes: VecDeque::new(),
        });
        Ok(())
    }

    /// Records each running process's peak memory (call it often: a crashed instance's peak
    /// is only known up to the last sample).
    pub fn sample_memory(&mut self) {
        for p in &mut self.procs {
            p.sample_memory();
        }
    }

    /// Reaps exited processes, schedules restarts of crashed ones and performs the restarts
    /// that are due. Stops at the first give-up (the run is over then). An error is a restart
    /// that could not be spawned.
    pub fn poll(&mut self, now: Instant) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        for p in &mut self.procs {
            if let Some(exit) = p.try_reap() {
                if exit.success() && !p.spec.service {
                    events.push(Event::Finished {
                        name: p.spec.name.clone(),
                    });
                    continue;
                }
                while p
                    .recent_crashes
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > self.policy.window)
                {
                    p.recent_crashes.pop_front();
                }
                p.recent_crashes.push_back(now);
                let crashes = p.recent_crashes.len();
                if crashes > self.policy.max_restarts as usize {
                    events.push(Event::GaveUp {
                        name: p.spec.name.clone(),
                        exit,
                        crashes,
                        log: p.spec.log.clone(),
                    });
                    return Ok(events);
                }
                p.state = State::Waiting {
                    at: now + self.policy.backoff(crashes),
                    after: exit,
                };
            }
            if let State::Waiting { at, after } = p.state {
                if now >= at {
                    p.restarts += 1;
                    let child = restart(&p.spec, after, p.restarts)
                        .with_context(|| format!("restarting {}", p.spec.name))?;
                    p.pid = child.id();
                    p.state = State::Running(child);
                    events.push(Event::Restarted {
                        name: p.spec.name.clone(),
                        exit: after,
                        restart: p.restarts,
                    });
                }
            }
        }
        Ok(events)
    }

    /// Stops every process, last started first (actors, then the learner, then the replay
    /// server, which flushes its log last): SIGTERM, then SIGKILL after `grace`. Nothing is
    /// restarted afterwards.
    pub fn stop(&mut self, grace: Duration) {
        for p in self.procs.iter_mut().rev() {
            p.sample_memory();
            p.terminate(grace);
        }
    }
}

/// Opens the log for appending, writes the restart marker and starts the process again.
fn restart(spec: &Spec, after: Exit, restart: u32) -> Result<Child> {
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("opening log file {}", spec.log.display()))?;
    // A newline first: the dead process may have stopped in the middle of a line.
    writeln!(
        log,
        "\n=== hindsight up: restarting {} ({}), restart {restart} ===",
        spec.name,
        after.describe_long()
    )?;
    Ok(spawn(spec, true, log)?)
}

fn spawn(spec: &Spec, restart: bool, log: File) -> std::io::Result<Child> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args);
    if restart {
        cmd.args(&spec.restart_args);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a terminal's Ctrl-C goes to `up` alone, which stops the
        // children in order (see the module doc).
        .process_group(0);
    die_with_parent(&mut cmd);
    cmd.spawn()
}

/// Makes the child get SIGKILL when `up` (or the local-ranks launcher) dies, however it dies.
///
/// The kernel sends the death signal when the *thread* that forked the child exits, not the
/// process. `up` starts and restarts every child from the one thread that runs its
/// supervision loop, and that thread lives until every child has been stopped, so this is
/// the same as "when `up` exits".
#[cfg(target_os = "linux")]
pub fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed (other threads' locks, the allocator's included, may be held
    // forever). It makes only raw system calls (prctl, getppid, _exit), allocates nothing
    // (`last_os_error` is an integer, and `parent` was captured before the fork) and touches
    // no shared state.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // If `up` died between fork and prctl, no signal will ever come: the child has
            // already been reparented, so its parent is no longer `up`. Exit instead of
            // running unsupervised.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub fn die_with_parent(_: &mut Command) {}

/// `1st`, `2nd`, `3rd`, `4th`, ..., `11th`, `12th`, `13th`, `21st`.
pub fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(name: &str, dir: &std::path::Path, script: &str) -> Spec {
        Spec {
            name: name.into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            restart_args: vec!["restarted".into()],
            log: dir.join(format!("{name}.log")),
            service: false,
        }
    }

    fn fast(max_restarts: u32) -> RestartPolicy {
        RestartPolicy {
            max_restarts,
            window: Duration::from_secs(600),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
        }
    }

    /// Polls until `f` holds for the events so far (5 s at most).
    fn poll_until(sup: &mut Supervisor, f: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let started = Instant::now();
        let mut all = Vec::new();
        while !f(&all) {
            assert!(started.elapsed() < Duration::from_secs(5), "{all:?}");
            all.extend(sup.poll(Instant::now()).unwrap());
            std::thread::sleep(Duration::from_millis(5));
        }
        all
    }

    #[test]
    fn exit_wording() {
        assert_eq!(Exit::Signal(9).to_string(), "signal 9");
        assert_eq!(Exit::Code(1).to_string(), "code 1");
        assert_eq!(Exit::Signal(9).describe_long(), "exit code 137 / signal 9");
        assert_eq!(Exit::Code(1).describe_long(), "exit code 1");
        let names: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111]
            .into_iter()
            .map(ordinal)
            .collect();
        assert_eq!(
            names,
            [
                "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st",
                "111th"
            ]
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let p = RestartPolicy::new(5, Duration::from_secs(600));
        let b: Vec<u128> = (1..=8).map(|k| p.backoff(k).as_millis()).collect();
        assert_eq!(b, [500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]);
        assert_eq!(p.backoff(1000), Duration::from_secs(10));
    }

    #[test]
    fn a_signal_is_recorded_as_the_signal() {
        let dir = tempfile::tempdir().unwrap();
        let mut sup = Supervisor::new(fast(0));
        sup.start(sh("p", dir.path(), "kill -9 $$")).unwrap();
        let events = poll_until(&mut sup, |e| !e.is_empty());
        assert!(
            matches!(
                &events[0],
                Event::GaveUp {
                    exit: Exit::Signal(9),
                    crashes: 1,
                    ..
                }
            ),
            "{events:?}"
        );
        assert_eq!(sup.procs()[0].exits, [Exit::Signal(9)]);
    }

    #[test]
    fn a_crash_is_restarted_with_the_restart_args_and_a_marker() {
        let dir = tempfile::tempdir().unwrap();
        let mut sup = Supervisor::new(fast(5));
        // First start: no "$0" argument beyond sh's own; crashes. Restart: gets "restarted"
        // as $0, says so and exits 0 (done).
        let script = r#"if [ "$0" = restarted ]; then echo second; exit 0; fi; echo first; exit 3"#;
        sup.start(sh("p", dir.path(), script)).unwrap();
        let first_pid = sup.procs()[0].pid;
        let events = poll_until(&mut sup, |e| {
            e.iter().any(|e| matches!(e, Event::Finished { .. }))
        });
        assert!(
            matches!(
                &events[0],
                Event::Restarted {
                    exit: Exit::Code(3),
                    restart: 1,
                    ..
                }
            ),
            "{events:?}"
        );
        let p = &sup.procs()[0];
        assert_ne!(p.pid, first_pid);
        assert_eq!(p.restarts, 1);
        assert_eq!(p.exits, [Exit::Code(3), Exit::Code(0)]);
        let log = std::fs::read_to_string(&p.spec.log).unwrap();
        assert_eq!(
            log,
            "first\n\n=== hindsight up: restarting p (exit code 3), restart 1 ===\nsecond\n"
        );
        // Done with 0: nothing more happens.
        std::thread::sleep(Duration::from_millis(100));
        assert!(sup.poll(Instant::now()).unwrap().is_empty());
    }

    #[test]
    fn gives_up_after_max_restarts_within_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let mut sup = Supervisor::new(fast(2));
        sup.start(sh("p", dir.path(), "exit 1")).unwrap();
        let events = poll_until(&mut sup, |e| {
            e.iter().any(|e| matches!(e, Event::GaveUp { .. }))
        });
        let restarts = events
            .iter()
            .filter(|e| matches!(e, Event::Restarted { .. }))
            .count();
        assert_eq!(restarts, 2, "{events:?}");
        assert!(matches!(
            events.last(),
            Some(Event::GaveUp { crashes: 3, .. })
        ));
        assert_eq!(sup.procs()[0].exits, [Exit::Code(1); 3]);
    }

    #[test]
    fn crashes_outside_the_window_are_forgiven() {
        let dir = tempfile::tempdir().unwrap();
        let mut policy = fast(1);
        policy.window = Duration::from_millis(1);
        policy.backoff_initial = Duration::from_millis(20);
        let mut sup = Supervisor::new(policy);
        sup.start(sh("p", dir.path(), "exit 1")).unwrap();
        // Each crash is more than the window after the one before (the backoff is longer).
        let events = poll_until(&mut sup, |e| e.len() >= 4);
        assert!(
            events.iter().all(|e| matches!(e, Event::Restarted { .. })),
            "{events:?}"
        );
    }

    #[test]
    fn stop_terminates_in_reverse_order_and_restarts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let order = dir.path().join("order");
        let mut sup = Supervisor::new(fast(5));
        for name in ["a", "b", "c"] {
            // Each records when its SIGTERM arrives, then exits 0.
            let script = format!(
                "trap 'echo {name} >> {}; exit 0' TERM; while :; do sleep 0.01; done",
                order.display()
            );
            sup.start(sh(name, dir.path(), &script)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        sup.stop(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&order).unwrap(), "c\nb\na\n");
        for p in sup.procs() {
            assert_eq!(p.exits, [Exit::Code(0)], "{}", p.spec.name);
        }
        assert!(sup.poll(Instant::now()).unwrap().is_empty());
    }

    #[test]
    fn stop_kills_what_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let mut sup = Supervisor::new(fast(5));
        sup.start(sh(
            "p",
            dir.path(),
            "trap '' TERM; while :; do sleep 0.01; done",
        ))
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        sup.stop(Duration::from_millis(200));
        assert_eq!(sup.procs()[0].exits, [Exit::Signal(9)]);
    }
}
