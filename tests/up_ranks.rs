//! `hindsight up --learner-ranks 2` on the tiny model: a replay server, two learner ranks and
//! an actor as real processes; rank 0 trains with rank 1 over the TCP collective.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn up_with_two_learner_ranks_trains() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut up = start_up(
        &run_dir,
        &[
            "--model",
            "tiny",
            "--actors",
            "1",
            "--learner-ranks",
            "2",
            "--steps",
            "2",
            "--max-new-tokens",
            "32",
            "--prompts-per-batch",
            "2",
            "--threads-per-process",
            "1",
            "--checkpoint-every",
            "1",
        ],
    );
    let steps = wait_for_steps(&mut up, &run_dir, 2, Duration::from_secs(600));
    for (i, s) in steps.iter().enumerate() {
        assert!(
            s["loss"].as_f64().expect("loss").is_finite(),
            "step {i}: {s}"
        );
        assert_eq!(s["policy_version"].as_u64(), Some(i as u64 + 1), "{s}");
    }
    // Rank 1 took both steps with rank 0 and holds the same weights (start-up digest check).
    let endpoints = read_endpoints(&run_dir).expect("endpoints.json");
    let page = scrape(endpoints["metrics"]["learner-rank-1"].as_str().unwrap());
    assert_eq!(
        series(&page, "hindsight_learner_step"),
        vec![2.0],
        "rank 1's step gauge{}",
        dump_logs(&run_dir)
    );
    let log1 = std::fs::read_to_string(run_dir.join("logs/learner-rank-1.log")).unwrap();
    assert!(
        log1.contains("every rank holds the same weights"),
        "{}",
        dump_logs(&run_dir)
    );
    assert_eq!(
        log1.matches("step done (follower)").count(),
        2,
        "{}",
        dump_logs(&run_dir)
    );
    let log0 = std::fs::read_to_string(run_dir.join("logs/learner.log")).unwrap();
    assert!(
        log0.contains("learner ranks joined"),
        "{}",
        dump_logs(&run_dir)
    );
    let summary = stop_up(up, &run_dir);
    assert_eq!(summary["ok"], true, "{summary}");
    // Rank 0 told rank 1 that training is over.
    let log1 = std::fs::read_to_string(run_dir.join("logs/learner-rank-1.log")).unwrap();
    assert!(
        log1.contains("rank 0 says training is over"),
        "{}",
        dump_logs(&run_dir)
    );
}

/// `hindsight bench ranks` on the tiny model: one rank and two ranks (TCP) train the same
/// seeded batch; the two ranks pass the weight-digest check at the end (the bench fails
/// otherwise), move the whole gradient through the collective, and land within rounding of
/// one rank (different digests are allowed; a failed run is not).
#[test]
fn bench_ranks_runs_one_and_two_ranks_and_reports_the_collective() {
    let dir = tempfile::tempdir().unwrap();
    let out = hindsight()
        .args(["--metrics-addr", "off", "bench", "ranks", "--model", "tiny"])
        .args(["--configs", "1x1,2x1", "--steps", "2", "--warmup", "0"])
        .args(["--sequences", "6", "--tokens", "8", "--micro-batch", "2"])
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("ranks.json")).unwrap())
            .unwrap();
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["collective"], "tcp");
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{report}");
    let (one, two) = (&results[0], &results[1]);
    assert_eq!(
        (one["config"].as_str(), two["config"].as_str()),
        (Some("1x1"), Some("2x1"))
    );
    assert_eq!(one["collective"], "none");
    assert_eq!(one["collective_bytes_per_step"], 0);
    assert_eq!(two["collective"], "tcp");
    // Rank 0 sends and receives at least every f32 gradient once per step.
    let params = two["parameters"].as_u64().unwrap();
    let bytes = two["collective_bytes_per_step"].as_u64().unwrap();
    assert!(
        bytes >= 2 * 4 * params,
        "{bytes} bytes for {params} parameters"
    );
    for r in results {
        let digest = r["weights_sha256"].as_str().unwrap();
        assert!(
            digest.starts_with("sha256:") && digest.len() == 7 + 64,
            "{r}"
        );
        assert!(r["step_seconds"].as_f64().unwrap() > 0.0, "{r}");
    }
}
