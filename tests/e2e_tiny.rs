//! End to end on the tiny model: a replay server, a learner and two actors as real processes
//! (`hindsight up`), real gRPC on loopback, at least 3 learner steps.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use hindsight_constraints::{generate_prompts, PromptRecord};
use serde_json::json;

/// What every cluster in this file shares: the tiny model, `prompts` as the prompt file, two
/// prompts a batch, one thread a process.
fn tiny_args(prompts: &Path) -> Vec<String> {
    ["--model", "tiny", "--prompts", prompts.to_str().unwrap()]
        .into_iter()
        .chain(["--prompts-per-batch", "2", "--threads-per-process", "1"])
        .map(String::from)
        .collect()
}

/// Writes `records` to `dir/prompts.jsonl`, one JSON line each.
fn write_prompts(dir: &Path, records: &[PromptRecord]) -> PathBuf {
    let path = dir.join("prompts.jsonl");
    let text: String = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// `hindsight up` in `run_dir` with [`tiny_args`] and `extra` (actors, steps, the arm), killed
/// with its children if the test fails before stopping it.
fn start_tiny(run_dir: &Path, prompts: &Path, extra: &[&str]) -> Up {
    let mut args = tiny_args(prompts);
    args.extend(extra.iter().map(|a| a.to_string()));
    Up::start(
        run_dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

#[test]
fn tiny_cluster_trains_with_hindsight_replay() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    // Our own prompt file: exercises the JSONL loader and lets the test re-derive rewrites.
    let records: Vec<PromptRecord> = generate_prompts(7, 64);
    let prompts = write_prompts(dir.path(), &records);
    let mut up = start_tiny(
        &run_dir,
        &prompts,
        &["--actors", "2", "--steps", "3", "--max-new-tokens", "48"],
    );
    let steps = wait_for_steps(up.child(), &run_dir, 3, Duration::from_secs(600));

    // Losses are finite and versions advance one per step.
    for (i, s) in steps.iter().enumerate() {
        assert!(
            s["loss"].as_f64().expect("loss").is_finite(),
            "step {i}: {s}"
        );
        assert!(s["grad_norm"].as_f64().expect("grad_norm").is_finite());
        assert_eq!(s["policy_version"].as_u64(), Some(i as u64 + 1));
        assert_eq!(
            s["original_samples"].as_u64(),
            Some(12),
            "2 prompts x m=6 originals: {s}"
        );
        // The generation budget: 12 responses a step, counted cumulatively.
        assert_eq!(s["step_generated_responses"].as_u64(), Some(12), "{s}");
        assert_eq!(
            s["generated_responses"].as_u64(),
            Some(12 * (i as u64 + 1)),
            "{s}"
        );
        assert!(s["clip_fraction_original"].as_f64().is_some(), "{s}");
        assert_eq!(s["mini_batches"].as_u64(), Some(1), "{s}");
    }

    // The learner scores the actors' on-policy tokens as the actors did (same weights, same
    // model maths on both sides): the first batch is all version-0 rollouts.
    let mismatch = steps[0]["logprob_mismatch_max"]
        .as_f64()
        .expect("step 1 has on-policy samples");
    assert!(
        mismatch < 1e-3,
        "actor vs learner log-prob mismatch {mismatch}"
    );

    // Every service answers /metrics with its named series.
    let endpoints: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("endpoints.json")).unwrap())
            .unwrap();
    let m = &endpoints["metrics"];
    let replay = scrape(m["replay-server"].as_str().unwrap());
    // Counters exist from start-up at zero: these must have moved.
    for name in [
        "hindsight_replay_groups_total",
        "hindsight_replay_verifications_total",
        "hindsight_replay_batches_total",
        "hindsight_replay_prompts_leased_total",
        "hindsight_replay_learner_step",
        "hindsight_replay_batch_wait_seconds_count",
    ] {
        assert!(
            series(&replay, name).iter().sum::<f64>() > 0.0,
            "replay server's {name} is missing or zero:\n{replay}"
        );
    }
    for name in [
        "hindsight_replay_pass_rate",
        "hindsight_replay_replays_emitted_total",
        "hindsight_replay_prompts_queued",
        "hindsight_replay_max_staleness",
    ] {
        assert!(
            !series(&replay, name).is_empty(),
            "replay server lacks {name}:\n{replay}"
        );
    }
    // Histograms have explicit buckets (summable across processes), not quantiles.
    assert!(
        replay.contains("hindsight_replay_ingest_seconds_bucket{") && !replay.contains("quantile="),
        "{replay}"
    );
    let learner = scrape(m["learner"].as_str().unwrap());
    assert_eq!(
        series(&learner, "hindsight_learner_step"),
        vec![3.0],
        "{learner}"
    );
    assert_eq!(
        series(&learner, "hindsight_learner_policy_version"),
        vec![3.0]
    );
    assert_eq!(series(&learner, "hindsight_learner_steps_total"), vec![3.0]);
    assert_eq!(
        series(&learner, "hindsight_learner_generated_responses_total"),
        vec![36.0],
        "{learner}"
    );
    assert!(
        learner.contains("hindsight_learner_kind_clip_fraction{")
            && learner.contains("kind=\"original\""),
        "{learner}"
    );
    assert!(!series(&learner, "hindsight_learner_loss").is_empty());
    assert_eq!(
        series(&learner, "hindsight_learner_step_seconds_count"),
        vec![3.0],
        "{learner}"
    );
    assert_eq!(
        series(&learner, "hindsight_learner_idle_seconds_count"),
        vec![3.0],
        "{learner}"
    );
    // Busy time is recorded after the ack, which may still be under way for step 3.
    assert!(
        learner.contains("hindsight_learner_busy_seconds_bucket{"),
        "{learner}"
    );
    assert_eq!(series(&learner, "hindsight_build_info"), vec![1.0]);
    assert!(!series(&learner, "process_resident_memory_bytes").is_empty());
    // Actors pick up newer weights between generation batches.
    let started = Instant::now();
    loop {
        let versions: Vec<f64> = ["actor-0", "actor-1"]
            .iter()
            .map(|a| {
                let page = scrape(m[*a].as_str().unwrap());
                assert!(
                    series(&page, "hindsight_actor_generated_tokens_total")
                        .first()
                        .is_some_and(|t| *t > 0.0),
                    "{page}"
                );
                series(&page, "hindsight_actor_policy_version")
                    .first()
                    .copied()
                    .unwrap_or(0.0)
            })
            .collect();
        if versions.iter().all(|v| *v >= 1.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "actors still on versions {versions:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // `hindsight status` reports every service and actor.
    let status_args: Vec<String> = endpoints["status_args"]
        .as_array()
        .expect("status_args in endpoints.json")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(
        endpoints["replay"]
            .as_str()
            .unwrap()
            .starts_with("https://"),
        "up turns TLS on by default: {endpoints}"
    );
    let out = hindsight()
        .args([
            "status",
            "--replay",
            endpoints["replay"].as_str().unwrap(),
            "--learner",
            endpoints["learner"].as_str().unwrap(),
        ])
        .args(&status_args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("replay-server Serving") && text.contains("learner Serving"),
        "{text}"
    );
    assert!(
        text.contains("actor actor-0") && text.contains("actor actor-1"),
        "{text}"
    );

    let summary = stop_up(up.take(), &run_dir);
    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(summary["steps_completed"], 3);
    for p in summary["processes"].as_array().unwrap() {
        assert!(p["peak_rss_mib"].as_f64().unwrap() > 1.0, "{p}");
    }
    assert_eq!(
        (&summary["arm"], &summary["reward"], &summary["hindsight"]),
        (&json!("HiR"), &json!("binary"), &json!("on")),
        "{summary}"
    );
    assert_eq!(summary["generated_responses"], 36, "{summary}");
    // `up` draws the run's learning curves.
    let png = std::fs::read(run_dir.join("plot.png")).expect("up writes plot.png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);

    // Replays: reward 1, an instruction holding exactly the satisfied constraints.
    let samples = read_jsonl(&run_dir.join("batches.jsonl"));
    assert!(!samples.is_empty());
    let replays: Vec<_> = samples.iter().filter(|s| s["is_replay"] == true).collect();
    assert!(
        !replays.is_empty(),
        "no replay in {} samples",
        samples.len()
    );
    for r in &replays {
        assert_eq!(r["reward"].as_f64(), Some(1.0), "{r}");
        let record = records
            .iter()
            .find(|p| p.id == r["prompt_id"].as_str().unwrap())
            .expect("known prompt");
        let compiled = record.compile().unwrap();
        let verdicts: Vec<bool> = r["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_bool().unwrap())
            .collect();
        // The verdicts are those of the source response, and it did fail.
        assert_eq!(
            compiled.verify(r["response"].as_str().unwrap()),
            verdicts,
            "{r}"
        );
        assert!(
            verdicts.iter().any(|v| *v) && !verdicts.iter().all(|v| *v),
            "{r}"
        );
        let rewrite = compiled.rewrite(&verdicts).expect("a rewrite");
        assert_eq!(
            r["instruction"].as_str().unwrap(),
            rewrite.instruction,
            "{r}"
        );
        let kept: Vec<String> = r["kept_instruction_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let satisfied: Vec<String> = record
            .constraints
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| **v)
            .map(|(c, _)| c.instruction_id.clone())
            .collect();
        assert_eq!(kept, satisfied);
    }
    // Originals: rewards agree with the verdicts.
    for s in samples.iter().filter(|s| s["is_replay"] == false) {
        let all = s["verdicts"].as_array().unwrap().iter().all(|v| v == true);
        assert_eq!(
            s["reward"].as_f64(),
            Some(if all { 1.0 } else { 0.0 }),
            "{s}"
        );
    }
    // Actors used newer weights: some trained sample was generated after step 1.
    assert!(
        samples
            .iter()
            .any(|s| s["policy_version"].as_u64().unwrap_or(0) >= 1),
        "every sample came from the base weights"
    );
    // The actors' logs show the swaps.
    let log = std::fs::read_to_string(run_dir.join("logs/actor-0.log")).unwrap()
        + &std::fs::read_to_string(run_dir.join("logs/actor-1.log")).unwrap();
    assert!(
        log.contains("weights updated"),
        "no weight update in the actor logs"
    );

    // Checkpoints are ordinary HF checkpoints: they load as a model directory.
    let ckpt = run_dir.join("checkpoints/step-00000003");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(f).exists(), "checkpoint lacks {f}");
    }
    let reloaded = hindsight_policy::load(
        ckpt.to_str().unwrap(),
        dir.path(),
        &hindsight_policy::Device::Cpu,
    )
    .expect("the learner's checkpoint loads as an HF checkpoint");
    let base = hindsight_policy::tiny(0).unwrap();
    assert_eq!(reloaded.config.hidden_size, base.config.hidden_size);
    assert_eq!(
        reloaded.tokenizer.encode_chat("hi").unwrap(),
        base.tokenizer.encode_chat("hi").unwrap()
    );

    // Resume: the learner continues from its step-3 checkpoint, the replay server from its log.
    let status = hindsight()
        .args(["up", "--resume", "--run-dir", run_dir.to_str().unwrap()])
        .args(tiny_args(&prompts))
        .args(["--actors", "1", "--steps", "4", "--max-new-tokens", "48"])
        .status()
        .unwrap();
    assert!(status.success());
    let steps = read_jsonl(&run_dir.join("steps.jsonl"));
    assert_eq!(steps.len(), 4, "{steps:?}");
    assert_eq!(steps[3]["step"], 4);
    assert_eq!(steps[3]["policy_version"], 4);
    // The budget count continues across the restart (it is in the checkpoint).
    assert_eq!(steps[3]["generated_responses"], 48, "{}", steps[3]);
    let learner_log = std::fs::read_to_string(run_dir.join("logs/learner.log")).unwrap();
    assert!(
        learner_log.contains("resumed from checkpoint"),
        "{learner_log}"
    );
}

/// The CLA baseline arm: hindsight off, every response generated (n per prompt), no replay,
/// each original's reward the fraction of its constraints that hold; success stays "every
/// constraint holds".
#[test]
fn tiny_cla_baseline_arm() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("cla");
    let prompts = write_prompts(dir.path(), &generate_prompts(3, 16));
    let mut up = start_tiny(
        &run_dir,
        &prompts,
        &[
            "--actors",
            "1",
            "--steps",
            "1",
            "--max-new-tokens",
            "24",
            "--group-size",
            "4",
            "--hindsight",
            "off",
            "--reward",
            "cla",
            "--mini-batches",
            "2",
        ],
    );
    let steps = wait_for_steps(up.child(), &run_dir, 1, Duration::from_secs(600));
    let summary = stop_up(up.take(), &run_dir);
    assert_eq!(
        (&summary["arm"], &summary["reward"]),
        (&json!("CLA"), &json!("cla")),
        "{summary}"
    );
    let s = &steps[0];
    assert_eq!(s["original_samples"], 8, "{s}");
    assert_eq!(s["replay_samples"], 0, "{s}");
    assert_eq!(s["generated_responses"], 8, "{s}");
    assert_eq!(s["mini_batches"], 2, "{s}");
    assert!(s["clip_fraction_replay"].is_null(), "{s}");
    // The batch trained at step 1 (the server may have logged the next one already).
    let samples: Vec<_> = read_jsonl(&run_dir.join("batches.jsonl"))
        .into_iter()
        .filter(|x| x["batch_id"] == s["batch_id"])
        .collect();
    assert_eq!(samples.len(), 8, "{samples:?}");
    let mut successes = 0;
    for x in &samples {
        let v: Vec<bool> = x["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_bool().unwrap())
            .collect();
        let cla = v.iter().filter(|b| **b).count() as f64 / v.len() as f64;
        let reward = x["reward"].as_f64().unwrap();
        assert!((reward - cla).abs() < 1e-6, "{x}");
        successes += usize::from(v.iter().all(|b| *b));
    }
    let mean_reward = samples
        .iter()
        .map(|x| x["reward"].as_f64().unwrap())
        .sum::<f64>()
        / 8.0;
    assert!(
        (s["reward_mean"].as_f64().unwrap() - mean_reward).abs() < 1e-5,
        "{s}"
    );
    assert!((s["success_rate"].as_f64().unwrap() - successes as f64 / 8.0).abs() < 1e-6);
}

/// `--device` on the actor and the learner: a name that is no device, and (in a build
/// without the CUDA backend) a GPU, are refused at start with a message saying what is
/// wrong, before anything connects.
#[test]
fn actor_and_learner_refuse_a_device_they_cannot_use() {
    let mut cases = vec![("tpu", "unknown device")];
    if !cfg!(feature = "cuda") {
        cases.push(("cuda:0", "--features cuda"));
    }
    for role in ["actor", "learner"] {
        for (device, says) in &cases {
            let out = common::hindsight()
                .args([role, "--model", "tiny", "--device", device])
                .args(["--replay", "http://127.0.0.1:9"])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{role} --device {device} started");
            assert!(err.contains(says), "{role} --device {device}: {err}");
        }
    }
}
