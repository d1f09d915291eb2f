//! `hindsight eval` and the evaluator as real processes on the tiny model: the responses
//! file and the scores agree with `hindsight verify` on the same file, a rerun resumes
//! (after a larger `--limit`, and after a SIGKILL mid-run that left a torn line) and gives
//! the file a fresh run writes, bad input is one clear line with exit code 2, and
//! `hindsight up --eval-every 1` writes `eval.jsonl` with the versions it evaluated.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn ifeval_prompts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("constraints/benchmarks/ifeval/input_data.jsonl")
}

/// `hindsight eval` on the tiny model (unless `extra` names another), 24 new tokens.
fn eval(output: &Path, extra: &[&str]) -> Output {
    let model: &[&str] = if extra.contains(&"--model") {
        &[]
    } else {
        &["--model", "tiny"]
    };
    hindsight()
        .args(["--threads", "1", "eval", "--no-progress"])
        .args(model)
        .args(["--max-new-tokens", "24"])
        .arg("--output")
        .arg(output)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("running hindsight eval")
}

fn ok(o: &Output) -> String {
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "hindsight failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn eval_scores_like_verify_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("responses.jsonl");
    let summary = dir.path().join("summary.json");
    let verdicts = dir.path().join("verdicts.jsonl");
    let ids = dir.path().join("ids.jsonl");
    let stdout = ok(&eval(
        &out,
        &[
            "--bench",
            "ifeval",
            "--limit",
            "6",
            "--max-batch",
            "4",
            "--summary",
            summary.to_str().unwrap(),
            "--verdicts",
            verdicts.to_str().unwrap(),
            "--token-ids",
            ids.to_str().unwrap(),
        ],
    ));
    assert!(
        stdout.contains("prompt_level_strict_acc") && stdout.contains("inst_level_loose_acc"),
        "{stdout}"
    );
    let lines = read_jsonl(&out);
    assert_eq!(lines.len(), 6);
    for l in &lines {
        assert_eq!(l.as_object().unwrap().len(), 2, "{l}");
        assert!(l["prompt"].is_string() && l["response"].is_string(), "{l}");
    }
    // --token-ids: a line per response, by benchmark index, next to the official file.
    let by_index = |path: &Path| {
        let mut v = read_jsonl(path);
        v.sort_by_key(|l| l["index"].as_u64().unwrap());
        v
    };
    let id_lines = by_index(&ids);
    assert_eq!(id_lines.len(), 6);
    for (i, (l, r)) in id_lines.iter().zip(&lines).enumerate() {
        assert_eq!(l["index"], i, "{l}");
        assert_eq!(l["prompt"], r["prompt"], "{l}");
        assert!(!l["prompt_ids"].as_array().unwrap().is_empty(), "{l}");
        let n = l["token_ids"].as_array().unwrap().len();
        assert!((1..=24).contains(&n), "{l}");
        // Fewer than 24 tokens only when the response ended on a stop token.
        assert!(n == 24 || l["finished"] == true, "{l}");
    }
    let ours = json(&summary);
    assert_eq!(ours["records"], 6);
    assert_eq!(ours["generation"]["responses_generated"], 6);
    assert!(ours["generation"]["tokens_per_s"].as_f64().unwrap() > 0.0);

    // `hindsight verify` on the same responses: the same verdicts and scores.
    let v_out = dir.path().join("verify.jsonl");
    let v_summary = dir.path().join("verify-summary.json");
    ok(&hindsight()
        .args([
            "verify",
            "--bench",
            "ifeval",
            "--missing",
            "skip",
            "--prompts",
        ])
        .arg(ifeval_prompts())
        .arg("--responses")
        .arg(&out)
        .arg("--output")
        .arg(&v_out)
        .arg("--summary")
        .arg(&v_summary)
        .output()
        .unwrap());
    assert_eq!(
        std::fs::read_to_string(&verdicts).unwrap(),
        std::fs::read_to_string(&v_out).unwrap()
    );
    let theirs = json(&v_summary);
    for key in [
        "records",
        "instructions",
        "prompt_level_strict",
        "prompt_level_loose",
        "instruction_level_strict",
        "instruction_level_loose",
        "per_instruction_id",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }

    // A larger --limit keeps the 6 and generates 4; the file equals a fresh run's
    // (greedy decoding is deterministic and independent of the batch).
    let o = eval(&out, &["--limit", "10", "--max-batch", "4"]);
    ok(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("4 prompts of 10 (6 already in"), "{stderr}");
    let fresh = dir.path().join("fresh.jsonl");
    let fresh_ids = dir.path().join("fresh-ids.jsonl");
    ok(&eval(
        &fresh,
        &[
            "--limit",
            "10",
            "--max-batch",
            "1",
            "--token-ids",
            fresh_ids.to_str().unwrap(),
        ],
    ));
    assert_eq!(
        by_index(&fresh_ids)[..6],
        id_lines[..],
        "token ids at batch 1 vs batch 4"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&fresh).unwrap(),
        "resumed run (batch 4) vs fresh run (batch 1)"
    );
    // Nothing left to do: no model is loaded, the scores are printed again.
    let o = eval(&out, &["--limit", "10", "--model", "no-such-model"]);
    assert!(ok(&o).contains("all 10 responses were already in"));
}

#[test]
fn eval_resumes_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("responses.jsonl");
    let mut child = hindsight()
        .args(["--threads", "1", "eval", "--model", "tiny", "--no-progress"])
        .args([
            "--max-new-tokens",
            "48",
            "--max-batch",
            "2",
            "--limit",
            "16",
        ])
        .arg("--output")
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while read_jsonl(&out).len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no responses written"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("eval ended before it could be killed: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill9(child.id() as i32);
    let _ = child.wait();
    let kept = read_jsonl(&out).len();
    assert!(
        kept < 16,
        "the kill came too late to test anything ({kept})"
    );
    // A write cut short by the kill.
    let mut text = std::fs::read_to_string(&out).unwrap();
    text.push_str("{\"prompt\": \"Write a 300+ word");
    std::fs::write(&out, text).unwrap();

    let o = hindsight()
        .args(["--threads", "1", "eval", "--model", "tiny", "--no-progress"])
        .args(["--max-new-tokens", "48", "--limit", "16"])
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    ok(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!("{} prompts of 16 ({kept} already in", 16 - kept)),
        "{stderr}"
    );
    let fresh = dir.path().join("fresh.jsonl");
    ok(&hindsight()
        .args(["--threads", "1", "eval", "--model", "tiny", "--no-progress"])
        .args(["--max-new-tokens", "48", "--limit", "16"])
        .arg("--output")
        .arg(&fresh)
        .output()
        .unwrap());
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&fresh).unwrap()
    );
}

fn refused(o: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(what), "wanted {what:?} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn eval_refuses_bad_input_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.jsonl");
    refused(
        &eval(&out, &["--bench", "mmlu"]),
        "unknown benchmark `mmlu`",
    );
    refused(
        &eval(&out, &["--bench", "/nonexistent/prompts.jsonl"]),
        "reading /nonexistent/prompts.jsonl",
    );
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"key\": 1, \"prompt\": \"Hi\", \"instruction_id_list\": [\"punctuation:no_comma\"], \"kwargs\": [{}]}\n{not json\n",
    )
    .unwrap();
    refused(
        &eval(&out, &["--bench", bad.to_str().unwrap()]),
        "bad.jsonl:2: bad JSON",
    );
    std::fs::write(&out, "{\"prompt\": \"x\"}\n").unwrap();
    refused(
        &eval(&out, &["--bench", "ifeval", "--limit", "1"]),
        "r.jsonl:1: not a {\"prompt\", \"response\"} line",
    );
    std::fs::remove_file(&out).unwrap();
    refused(
        &eval(
            &out,
            &["--limit", "1", "--model", "/nonexistent/model.gguf"],
        ),
        "loading --model /nonexistent/model.gguf",
    );
}

#[test]
fn up_with_an_evaluator_writes_eval_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let log = std::fs::File::create(run_dir.join("up.log")).unwrap();
    let mut up = hindsight()
        .arg("up")
        .arg("--run-dir")
        .arg(&run_dir)
        .args(["--model", "tiny", "--actors", "1", "--steps", "2"])
        .args(["--max-new-tokens", "24", "--prompts-per-batch", "2"])
        .args(["--threads-per-process", "1"])
        .args(["--eval-every", "1", "--eval-limit", "4"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(600) {
            let _ = up.kill();
            panic!("up did not finish{}", dump_logs(&run_dir));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "{status}{}", dump_logs(&run_dir));
    let evals = read_jsonl(&run_dir.join("eval.jsonl"));
    let versions: Vec<u64> = evals
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    // The first version it sees (the base model, unless a step came first) and the last
    // one are always evaluated; versions only go up.
    assert!(versions.first() <= Some(&1), "{evals:?}");
    assert_eq!(
        versions.last(),
        Some(&2),
        "{evals:?}{}",
        dump_logs(&run_dir)
    );
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    for e in &evals {
        assert_eq!(e["bench"], "ifeval");
        assert_eq!(e["limit"], 4);
        assert_eq!(
            e["step"], e["version"],
            "the tiny run's version = its step: {e}"
        );
        for k in [
            "prompt_strict",
            "prompt_loose",
            "instruction_strict",
            "instruction_loose",
        ] {
            let x = e[k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&x), "{k} {x}");
        }
        assert!(e["seconds"].as_f64().unwrap() > 0.0 && e["time_unix"].as_f64().unwrap() > 1e9);
    }
    let summary = json(&run_dir.join("summary.json"));
    assert_eq!(summary["eval_last"], *evals.last().unwrap());
    assert!(summary["processes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "evaluator"));
}
