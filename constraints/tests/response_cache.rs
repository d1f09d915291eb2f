//! Verdicts inside a `with_response_cache` scope (one per record, as `hindsight verify`
//! uses it) equal the uncached ones on every golden IFEval and IFBench record, strict and
//! loose, and `check_loose_given_strict` equals `check_loose`.

mod common;

use std::collections::HashMap;

use hindsight_constraints::{build, with_response_cache, ConstraintSpec};

fn check_set(inputs: &str, outputs: &str) -> usize {
    let dir = common::oracle_dir();
    let responses: HashMap<String, String> = common::read_jsonl(&dir.join(outputs))
        .into_iter()
        .map(|r| {
            (
                r["prompt"].as_str().unwrap_or("").to_string(),
                r["response"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let mut n = 0;
    for r in common::read_jsonl(&dir.join(inputs)) {
        let resp = responses
            .get(r["prompt"].as_str().unwrap_or(""))
            .cloned()
            .unwrap_or_default();
        let ids = r["instruction_id_list"].as_array().unwrap();
        let specs: Vec<ConstraintSpec> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                ConstraintSpec::new(
                    id.as_str().unwrap(),
                    r["kwargs"][i].as_object().cloned().unwrap_or_default(),
                )
            })
            .collect();
        let plain: Vec<Option<(bool, bool)>> = specs
            .iter()
            .map(|s| {
                build(s)
                    .ok()
                    .map(|c| (c.check_strict(&resp), c.check_loose(&resp)))
            })
            .collect();
        let cached: Vec<Option<(bool, bool)>> = with_response_cache(|| {
            specs
                .iter()
                .map(|s| {
                    build(s).ok().map(|c| {
                        let strict = c.check_strict(&resp);
                        (strict, c.check_loose_given_strict(&resp, strict))
                    })
                })
                .collect()
        });
        assert_eq!(plain, cached, "{}", r["key"]);
        n += specs.len();
    }
    n
}

#[test]
fn cached_verdicts_equal_uncached() {
    let n = check_set(
        "data/ifeval/input_data.jsonl",
        "data/ifeval/input_response_data_gpt4_20231107_145030.jsonl",
    ) + check_set(
        "data/ifbench/IFBench_test.jsonl",
        "data/ifbench/sample_output.jsonl",
    );
    assert!(n > 1000, "{n}");
}
