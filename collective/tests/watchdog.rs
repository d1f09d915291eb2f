//! The watchdog's last resort, in a real process: an operation that its abort does not
//! release (here the abort itself blocks forever, as `ncclCommAbort` might) ends the process
//! with exit code 3 and a message naming it, within the timeout plus the grace (this is what
//! keeps an NCCL rank from hanging forever).

use std::process::Command;
use std::time::{Duration, Instant};

use hindsight_collective::watchdog::{Watchdog, EXIT_CODE};

const CHILD_ENV: &str = "HINDSIGHT_WATCHDOG_TEST_CHILD";

/// The child: arms an operation that never returns, with an abort that never returns.
#[test]
fn child_blocks_forever() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let dog = Watchdog::start(
        "test rank 1 NCCL",
        Duration::from_millis(300),
        Duration::from_millis(500),
        |op| {
            eprintln!("abort of {op} called");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        },
    );
    let _armed = dog.arm("all-reduce on the GPU").unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[test]
fn an_operation_the_abort_does_not_release_ends_the_process() {
    let started = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_blocks_forever", "--nocapture"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_CODE), "{stderr}");
    assert!(
        stderr.contains("test rank 1 NCCL: all-reduce on the GPU did not complete within 300ms"),
        "{stderr}"
    );
    assert!(took >= Duration::from_millis(800), "exited after {took:?}");
    assert!(took < Duration::from_secs(20), "exited after {took:?}");
    // The abort ran (and blocked) on its own thread; the bound held anyway.
    assert!(
        stderr.contains("abort of all-reduce on the GPU called"),
        "{stderr}"
    );
}
