//! A bound on operations that block inside a library (NCCL's collectives and its
//! communicator set-up wait for every peer, with no timeout of their own).
//!
//! The caller [`Watchdog::arm`]s each operation; the guard disarms it when the operation
//! returns. When an armed deadline passes, the watchdog thread marks the operation as fired
//! (every later [`Watchdog::arm`] is refused) and calls `on_expiry` on a thread of its own,
//! which should release the blocked call (NCCL: `ncclCommAbort`). If the operation still has
//! not returned `grace` after the deadline (the abort itself may block), the watchdog ends the
//! process with exit code [`EXIT_CODE`] and a message naming the operation: a bounded, named
//! failure in every case, never a silent hang.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{CollectiveError, Result};

/// The exit code of a process the watchdog ends.
pub const EXIT_CODE: i32 = 3;

#[derive(Default)]
struct Watch {
    /// The armed operation, when it was armed and its bound.
    armed: Option<(&'static str, Instant, Duration)>,
    /// Counts arms, so that a deadline belongs to the operation that set it.
    generation: u64,
    /// The operation whose deadline passed, and its bound.
    fired: Option<(&'static str, Duration)>,
    stop: bool,
}

type Shared = Arc<(Mutex<Watch>, Condvar)>;

fn lock(m: &Mutex<Watch>) -> std::sync::MutexGuard<'_, Watch> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One watchdog thread, watching at most one armed operation at a time.
pub struct Watchdog {
    state: Shared,
    thread: Option<JoinHandle<()>>,
    timeout: Duration,
}

impl Watchdog {
    /// Starts the thread. `name` goes into its thread name and exit message; `on_expiry`
    /// runs on a thread of its own with the operation's name when its deadline passes.
    pub fn start(
        name: &str,
        timeout: Duration,
        grace: Duration,
        on_expiry: impl Fn(&'static str) + Send + Sync + 'static,
    ) -> Self {
        let state: Shared = Arc::default();
        let s = Arc::clone(&state);
        let label = name.to_string();
        let on_expiry: Arc<dyn Fn(&'static str) + Send + Sync> = Arc::new(on_expiry);
        let thread = std::thread::Builder::new()
            .name(format!("watchdog-{name}"))
            .spawn(move || watch(&s, grace, &label, on_expiry))
            .expect("spawning a watchdog thread");
        Self {
            state,
            thread: Some(thread),
            timeout,
        }
    }

    /// The bound of every operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Arms `op` with the watchdog's timeout until the guard drops; refused once an operation
    /// has fired.
    pub fn arm(&self, op: &'static str) -> Result<Armed<'_>> {
        self.arm_for(op, self.timeout)
    }

    /// As [`Watchdog::arm`] with a bound of its own (joining a group may take longer than
    /// one operation).
    pub fn arm_for(&self, op: &'static str, bound: Duration) -> Result<Armed<'_>> {
        let (m, cv) = &*self.state;
        let mut w = lock(m);
        if let Some((fired, _)) = w.fired {
            return Err(CollectiveError::OutOfStep(format!(
                "{fired} timed out earlier (the communicator was aborted); {op} cannot run"
            )));
        }
        w.generation += 1;
        w.armed = Some((op, Instant::now(), bound));
        cv.notify_all();
        Ok(Armed {
            dog: self,
            generation: w.generation,
        })
    }

    /// The operation whose deadline passed, if one did.
    pub fn fired(&self) -> Option<&'static str> {
        lock(&self.state.0).fired.map(|(op, _)| op)
    }

    /// The error of an operation that timed out.
    pub fn timed_out(&self, op: &'static str) -> CollectiveError {
        let timeout = match lock(&self.state.0).fired {
            Some((fired, bound)) if fired == op => bound,
            _ => self.timeout,
        };
        CollectiveError::DeviceTimeout { op, timeout }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (m, cv) = &*self.state;
        lock(m).stop = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Disarms its operation on drop (the operation returned, successfully or not).
pub struct Armed<'a> {
    dog: &'a Watchdog,
    generation: u64,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        let (m, cv) = &*self.dog.state;
        let mut w = lock(m);
        if w.generation == self.generation {
            w.armed = None;
        }
        cv.notify_all();
    }
}

fn watch(
    state: &(Mutex<Watch>, Condvar),
    grace: Duration,
    name: &str,
    on_expiry: Arc<dyn Fn(&'static str) + Send + Sync>,
) {
    let (m, cv) = state;
    let mut w = lock(m);
    loop {
        if w.stop {
            return;
        }
        let Some((op, since, bound)) = w.armed else {
            w = cv.wait(w).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let deadline = since + bound;
        let now = Instant::now();
        if now < deadline {
            w = cv
                .wait_timeout(w, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        let generation = w.generation;
        w.fired = Some((op, bound));
        drop(w);
        tracing::error!(
            watchdog = name,
            op,
            ?bound,
            "operation did not complete in time (a stalled or dead rank): aborting it"
        );
        // The abort may block too: it runs on a thread of its own, and the grace counts from
        // now whatever it does.
        let until = Instant::now() + grace;
        let abort = Arc::clone(&on_expiry);
        let _ = std::thread::Builder::new()
            .name(format!("abort-{name}"))
            .spawn(move || abort(op));
        w = lock(m);
        while w.armed.is_some() && w.generation == generation && !w.stop {
            let now = Instant::now();
            if now >= until {
                eprintln!(
                    "hindsight {name}: {op} did not complete within {bound:?} and did not \
                     return {grace:?} after it was aborted (a stalled or dead rank); exiting"
                );
                std::process::exit(EXIT_CODE);
            }
            w = cv
                .wait_timeout(w, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        w.armed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting(timeout_ms: u64) -> (Watchdog, Arc<AtomicUsize>) {
        let expired = Arc::new(AtomicUsize::new(0));
        let e = Arc::clone(&expired);
        let dog = Watchdog::start(
            "test",
            Duration::from_millis(timeout_ms),
            Duration::from_secs(30),
            move |_| {
                e.fetch_add(1, Ordering::SeqCst);
            },
        );
        (dog, expired)
    }

    #[test]
    fn operations_that_return_in_time_are_left_alone() {
        let (dog, expired) = counting(200);
        for _ in 0..20 {
            let _armed = dog.arm("fast").unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        // Disarmed: nothing fires after the deadline either.
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(expired.load(Ordering::SeqCst), 0);
        assert_eq!(dog.fired(), None);
        assert!(dog.arm("again").is_ok());
    }

    #[test]
    fn a_late_operation_is_aborted_once_and_later_ones_are_refused() {
        let (dog, expired) = counting(100);
        let started = Instant::now();
        {
            let _armed = dog.arm("slow all-reduce").unwrap();
            // The "blocked call": it returns once the abort has happened.
            while expired.load(Ordering::SeqCst) == 0 {
                assert!(started.elapsed() < Duration::from_secs(10), "never aborted");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(100),
            "aborted early: {took:?}"
        );
        assert_eq!(dog.fired(), Some("slow all-reduce"));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(expired.load(Ordering::SeqCst), 1, "aborted more than once");
        let e = dog.arm("next").err().expect("refused after a timeout");
        assert!(e.to_string().contains("slow all-reduce timed out"), "{e}");
        let e = dog.timed_out("slow all-reduce").to_string();
        assert!(e.contains("did not complete within 100ms"), "{e}");
    }

    #[test]
    fn dropping_the_watchdog_stops_its_thread_while_armed() {
        let (dog, expired) = counting(60_000);
        let armed = dog.arm("long").unwrap();
        std::mem::forget(armed);
        let t = Instant::now();
        drop(dog);
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(expired.load(Ordering::SeqCst), 0);
    }
}
