//! Conformance with the reference IFEval checkers (lm_eval 0.4.13): for every golden
//! record of the GPT-4 set and of the probe set, each in-scope instruction's strict and
//! loose verdicts must equal the oracle's, except entries the oracle marks as random
//! (`random_used`) or erroring (`errors`). That includes the three language-detection ids
//! (`langdetect` in the reference, our port of it here): no disagreement is accepted.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};

use common::{cases_from, key_str, oracle_dir, read_jsonl, Case};
use hindsight_constraints::{build, supported_ids, ConstraintSpec, Value};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Disagreement {
    key: String,
    index: usize,
    id: String,
    mode: &'static str,
    expected: bool,
}

/// Compare every in-scope instruction; returns the checked count. Any disagreement fails
/// the test with details.
fn check_set(name: &str, cases: &[Case], expected: &[Value]) -> usize {
    let expected: HashMap<String, &Value> =
        expected.iter().map(|e| (key_str(&e["key"]), e)).collect();
    let in_scope: HashSet<&str> = supported_ids().iter().copied().collect();
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in cases {
        let exp = expected
            .get(&case.key)
            .unwrap_or_else(|| panic!("{name}: no expected verdicts for key {}", case.key));
        let skip: BTreeSet<usize> = ["random_used", "errors"]
            .iter()
            .filter_map(|k| exp.get(*k))
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(|v| {
                v.as_u64()
                    .or_else(|| v.get("index").and_then(Value::as_u64))
            })
            .map(|v| v as usize)
            .collect();
        for (index, id) in case.ids.iter().enumerate() {
            if !in_scope.contains(id.as_str()) || skip.contains(&index) {
                continue;
            }
            let spec = ConstraintSpec::new(id.clone(), case.kwargs[index].clone());
            let c = build(&spec).unwrap_or_else(|e| panic!("{name} key {}: {e}", case.key));
            for (mode, field, got) in [
                (
                    "strict",
                    "follow_instruction_list_strict",
                    c.check_strict(&case.response),
                ),
                (
                    "loose",
                    "follow_instruction_list_loose",
                    c.check_loose(&case.response),
                ),
            ] {
                let want = exp[field][index].as_bool().expect("boolean verdict");
                if got != want {
                    let d = Disagreement {
                        key: case.key.clone(),
                        index,
                        id: id.clone(),
                        mode,
                        expected: want,
                    };
                    failures.push(format!("{d:?} response={:?}", truncate(&case.response)));
                }
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
    checked
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}

#[test]
fn ifeval_gpt4_matches_reference() {
    let dir = oracle_dir();
    let inputs = read_jsonl(&dir.join("data/ifeval/input_data.jsonl"));
    let responses: HashMap<String, String> =
        read_jsonl(&dir.join("data/ifeval/input_response_data_gpt4_20231107_145030.jsonl"))
            .into_iter()
            .map(|r| {
                (
                    r["prompt"].as_str().unwrap().to_string(),
                    r["response"].as_str().unwrap().to_string(),
                )
            })
            .collect();
    let cases = cases_from(&inputs, |r| {
        responses
            .get(r["prompt"].as_str().unwrap())
            .cloned()
            .unwrap_or_default()
    });
    let expected = read_jsonl(&dir.join("golden/ifeval_gpt4.expected.jsonl"));
    assert_eq!(cases.len(), 541);
    let checked = check_set("ifeval_gpt4", &cases, &expected);
    println!("ifeval_gpt4: {checked} instructions checked");
    // all 834 instructions but the 2 random ones
    assert_eq!(checked, 832, "every instruction is checked");
}

#[test]
fn ifeval_probe_matches_reference() {
    let dir = oracle_dir();
    let inputs = read_jsonl(&dir.join("golden/probe/ifeval_in.jsonl"));
    let cases = cases_from(&inputs, |r| r["response"].as_str().unwrap().to_string());
    let expected = read_jsonl(&dir.join("golden/probe/ifeval_probe.expected.jsonl"));
    let checked = check_set("ifeval_probe", &cases, &expected);
    println!("ifeval_probe: {checked} instructions checked");
    // 25 ids x 12 probes, less the 12 `keywords:letter_frequency` probes whose letter is
    // not a letter (random in the reference)
    assert_eq!(checked, 24 * 12, "every id has 12 probes");
}
