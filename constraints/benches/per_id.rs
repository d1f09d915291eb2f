//! Per-instruction-id verification cost on the IFEval GPT-4 set (build + strict + loose),
//! to find hot spots: `cargo bench -p hindsight-constraints --bench per_id`
//! (`PER_ID_SET=ifbench` for the IFBench sample set; `PER_ID_ONLY=<id>` to time, or
//! profile, one instruction id; `PER_ID_REPS=<n>` repetitions, default 20).
//! Needs the oracle directory (`$HINDSIGHT_ORACLE_DIR`, default `../shared/oracle`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hindsight_constraints::{build, with_response_cache, ConstraintSpec, Value};

fn read_jsonl(p: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

fn main() {
    let dir = std::env::var_os("HINDSIGHT_ORACLE_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/oracle"),
        PathBuf::from,
    );
    // PER_ID_SET=ifbench measures the IFBench sample set instead
    let (inp, out) = if std::env::var("PER_ID_SET").is_ok_and(|s| s == "ifbench") {
        (
            "data/ifbench/IFBench_test.jsonl",
            "data/ifbench/sample_output.jsonl",
        )
    } else {
        (
            "data/ifeval/input_data.jsonl",
            "data/ifeval/input_response_data_gpt4_20231107_145030.jsonl",
        )
    };
    let inputs = read_jsonl(&dir.join(inp));
    let responses: HashMap<String, String> = read_jsonl(&dir.join(out))
        .into_iter()
        .map(|r| {
            (
                r["prompt"].as_str().unwrap_or("").to_string(),
                r["response"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    // PER_ID_CACHE=0: no per-response cache (each rep is one cache scope otherwise, as
    // `hindsight verify` uses one per record)
    let cached = std::env::var("PER_ID_CACHE").map_or(true, |v| v != "0");
    let mut per_id: BTreeMap<String, (Duration, usize)> = BTreeMap::new();
    let only = std::env::var("PER_ID_ONLY").ok();
    let reps: u32 = std::env::var("PER_ID_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    for r in &inputs {
        let resp = responses
            .get(r["prompt"].as_str().unwrap_or(""))
            .cloned()
            .unwrap_or_default();
        let ids = r["instruction_id_list"].as_array().expect("ids");
        for (i, id) in ids.iter().enumerate() {
            let id = id.as_str().expect("id");
            if only.as_deref().is_some_and(|o| o != id) {
                continue;
            }
            let kw = r["kwargs"][i].as_object().cloned().unwrap_or_default();
            let spec = ConstraintSpec::new(id, kw);
            let t = Instant::now();
            for _ in 0..reps {
                let check = || {
                    if let Ok(c) = build(&spec) {
                        // as `hindsight verify` does: the loose check reuses the strict verdict
                        let strict = c.check_strict(&resp);
                        std::hint::black_box(c.check_loose_given_strict(&resp, strict));
                    }
                };
                if cached {
                    with_response_cache(check);
                } else {
                    check();
                }
            }
            let e = per_id.entry(id.to_string()).or_default();
            e.0 += t.elapsed() / reps;
            e.1 += 1;
        }
    }
    let total: Duration = per_id.values().map(|v| v.0).sum();
    let mut rows: Vec<_> = per_id.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1 .0));
    println!(
        "total per pass over the set: {total:?} ({:.0} records/s)",
        inputs.len() as f64 / total.as_secs_f64()
    );
    for (id, (d, n)) in rows {
        println!("{id:<50} n={n:<4} total={d:>12?} per={:>10?}", d / n as u32);
    }
}
