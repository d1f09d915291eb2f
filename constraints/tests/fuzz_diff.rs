//! Manual differential test against the reference on randomly generated edge-case
//! responses (see `tests/fuzz/gen_fuzz.py` for how to produce the files). Ignored by
//! default because it needs files generated with the Python oracle; run with
//! `HINDSIGHT_FUZZ_DIR=DIR cargo test -p hindsight-constraints --test fuzz_diff -- --ignored`.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::{key_str, read_jsonl};
use hindsight_constraints::{build, supported_ids, ConstraintSpec};

#[test]
#[ignore = "needs HINDSIGHT_FUZZ_DIR with files made by tests/fuzz/gen_fuzz.py + the oracle"]
fn fuzz_matches_reference() {
    let dir =
        PathBuf::from(std::env::var_os("HINDSIGHT_FUZZ_DIR").expect("set HINDSIGHT_FUZZ_DIR"));
    let inputs = read_jsonl(&dir.join("fuzz_in.jsonl"));
    let expected: HashMap<String, serde_json::Value> = read_jsonl(&dir.join("fuzz.expected.jsonl"))
        .into_iter()
        .map(|e| (key_str(&e["key"]), e))
        .collect();
    let mut failures = Vec::new();
    let mut lang = 0;
    let mut checked = 0;
    for r in &inputs {
        let exp = &expected[&key_str(&r["key"])];
        let response = r["response"].as_str().unwrap();
        for (i, id) in r["instruction_id_list"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let id = id.as_str().unwrap();
            if !supported_ids().contains(&id) {
                continue;
            }
            let kwargs = r["kwargs"][i].as_object().cloned().unwrap_or_default();
            let c = build(&ConstraintSpec::new(id, kwargs.clone())).unwrap();
            checked += 1;
            for (field, got) in [
                ("follow_instruction_list_strict", c.check_strict(response)),
                ("follow_instruction_list_loose", c.check_loose(response)),
            ] {
                if exp[field][i].as_bool() != Some(got) {
                    if id.starts_with("change_case:english") {
                        lang += 1;
                    } else {
                        failures.push(format!(
                            "{id} {kwargs:?} {field} want {} on {response:?}",
                            !got
                        ));
                    }
                }
            }
        }
    }
    println!("{checked} checked, {lang} language-detection disagreements");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
