//! `hindsight bench replay` end to end: a real replay server process, two rollout streams
//! and the simulated learner for one measured second; the JSON must show work done.

use std::process::Command;
use std::time::Instant;

use serde_json::Value;

#[test]
fn bench_replay_runs_a_server_and_reports_groups_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("replay.json");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .args(["bench", "replay", "--streams", "2", "--seconds", "1"])
        .args(["--learner", "on", "--json"])
        .arg(&json)
        .output()
        .expect("running hindsight bench replay");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench replay failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let doc: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = doc["configurations"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{doc:#}");
    let row = &rows[0];
    assert_eq!(row["streams"], 2);
    assert_eq!(row["learner"], "on");
    assert_eq!(row["errors"], 0, "{row:#}");
    assert!(row["groups_per_s"].as_f64().unwrap() > 0.0, "{row:#}");
    assert!(row["batches_per_s"].as_f64().unwrap() > 0.0, "{row:#}");
    assert!(row["ack_p99_ms"].as_f64().unwrap() > 0.0, "{row:#}");
    assert!(row["rss_peak_mb"].as_f64().unwrap() > 0.0, "{row:#}");
    assert!(
        stdout.contains("| streams | learner | groups/s |"),
        "no table in:\n{stdout}"
    );
    println!(
        "bench replay took {:.1} s:\n{stdout}",
        started.elapsed().as_secs_f64()
    );
}
