//! `hindsight verify` end to end: runs the binary on the oracle's golden inputs and
//! compares its output file with the golden verdicts.
//!
//! IFEval (GPT-4 responses, `--prompts/--responses`): every line must be byte-identical
//! to `golden/ifeval_gpt4.expected.jsonl`, except the two records whose reference verdict
//! is random (`random_used`, compared without that instruction and field); language
//! detection is the port of langdetect, so `language:response_language` and the
//! `change_case:english_*` verdicts match too. IFBench (sample responses): one well-formed line
//! per record, in order, with the same keys and instruction lists.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn oracle_dir() -> PathBuf {
    let dir = match std::env::var_os("HINDSIGHT_ORACLE_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/oracle"),
    };
    assert!(
        dir.join("golden").is_dir(),
        "reference oracle not found at {}; set HINDSIGHT_ORACLE_DIR",
        dir.display()
    );
    dir
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn run_verify(bench: &str, prompts: &Path, responses: &Path, out: &Path, summary: &Path) {
    let o = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .args(["verify", "--bench", bench, "--prompts"])
        .arg(prompts)
        .arg("--responses")
        .arg(responses)
        .arg("--output")
        .arg(out)
        .arg("--summary")
        .arg(summary)
        .output()
        .expect("run hindsight verify");
    assert!(
        o.status.success(),
        "hindsight verify failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn verify_ifeval_matches_golden_output() {
    let d = oracle_dir();
    let tmp = tempfile::tempdir().unwrap();
    let (out, summary) = (tmp.path().join("out.jsonl"), tmp.path().join("s.json"));
    run_verify(
        "ifeval",
        &d.join("data/ifeval/input_data.jsonl"),
        &d.join("data/ifeval/input_response_data_gpt4_20231107_145030.jsonl"),
        &out,
        &summary,
    );
    let ours = lines(&out);
    let golden = lines(&d.join("golden/ifeval_gpt4.expected.jsonl"));
    assert_eq!(ours.len(), golden.len());
    let mut identical = 0;
    for (o, g) in ours.iter().zip(&golden) {
        if o == g {
            identical += 1;
            continue;
        }
        let ov: Value = serde_json::from_str(o).unwrap();
        let gv: Value = serde_json::from_str(g).unwrap();
        let key = match &gv["key"] {
            Value::String(s) => s.clone(),
            k => k.to_string(),
        };
        assert_eq!(ov["key"], gv["key"]);
        assert_eq!(ov["instruction_id_list"], gv["instruction_id_list"]);
        let random: Vec<usize> = gv
            .get("random_used")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as usize)
                    .collect()
            })
            .unwrap_or_default();
        let n = gv["instruction_id_list"].as_array().unwrap().len();
        for i in 0..n {
            if random.contains(&i) {
                continue;
            }
            for f in [
                "follow_instruction_list_strict",
                "follow_instruction_list_loose",
            ] {
                assert_eq!(
                    ov[f][i], gv[f][i],
                    "key {key} index {i} {f}\nours   {o}\ngolden {g}"
                );
            }
        }
    }
    assert_eq!(identical, 541 - 2, "byte-identical lines");
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["records"], 541);
    assert_eq!(s["instructions"], 834);
    let per_id = s["per_instruction_id"].as_object().unwrap();
    assert_eq!(per_id.len(), 25);
    let golden_s: Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("golden/ifeval_gpt4.summary.json")).unwrap(),
    )
    .unwrap();
    for (id, v) in per_id {
        assert_eq!(v["n"], golden_s["per_instruction_id"][id]["n"], "{id}");
    }
    for k in ["prompt_level_strict", "instruction_level_loose"] {
        let (a, b) = (s[k].as_f64().unwrap(), golden_s[k].as_f64().unwrap());
        assert!((a - b).abs() < 0.01, "{k}: {a} vs {b}");
    }
}

#[test]
fn verify_ifbench_runs_on_sample_set() {
    let d = oracle_dir();
    let tmp = tempfile::tempdir().unwrap();
    let (out, summary) = (tmp.path().join("out.jsonl"), tmp.path().join("s.json"));
    let o = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .args([
            "verify",
            "--bench",
            "ifbench",
            "--allow-unsupported",
            "--prompts",
        ])
        .arg(d.join("data/ifbench/IFBench_test.jsonl"))
        .arg("--responses")
        .arg(d.join("data/ifbench/sample_output.jsonl"))
        .arg("--output")
        .arg(&out)
        .arg("--summary")
        .arg(&summary)
        .output()
        .expect("run hindsight verify");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = lines(&out);
    let golden: HashMap<String, Value> = lines(&d.join("golden/ifbench_sample.expected.jsonl"))
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["key"].to_string(), v)
        })
        .collect();
    assert_eq!(ours.len(), 294);
    for l in &ours {
        let v: Value = serde_json::from_str(l).unwrap();
        let g = &golden[&v["key"].to_string()];
        assert_eq!(v["instruction_id_list"], g["instruction_id_list"]);
        let strict = v["follow_instruction_list_strict"].as_array().unwrap();
        let errors = v
            .get("errors")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        assert_eq!(strict.iter().filter(|b| b.is_null()).count(), errors, "{l}");
    }
}

#[test]
fn verify_refuses_unsupported_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"key\": 1, \"prompt\": \"p\", \"instruction_id_list\": [\"no:such_id\", \
         \"punctuation:no_comma\"], \"kwargs\": [{}, {}], \"response\": \"a b\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("out.jsonl");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hindsight"))
            .args(["verify", "--bench", "ifeval", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no:such_id (1)"));
    let o = run(&["--allow-unsupported"]);
    assert!(o.status.success());
    let line = std::fs::read_to_string(&out).unwrap();
    assert!(line.starts_with(
        "{\"key\": 1, \"instruction_id_list\": [\"no:such_id\", \"punctuation:no_comma\"], \
         \"follow_instruction_list_strict\": [null, true], \"follow_instruction_list_loose\": \
         [null, true], \"follow_all_instructions_strict\": false, \
         \"follow_all_instructions_loose\": false, \"errors\": [{\"index\": 0, "
    ));
}
