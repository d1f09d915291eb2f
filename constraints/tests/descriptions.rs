//! Instruction texts: for every in-scope (instruction id, kwargs) of the IFEval prompts,
//! `describe` must produce exactly the reference `build_description` text
//! (`golden/ifeval_descriptions.jsonl`).

mod common;

use std::collections::BTreeMap;

use common::{oracle_dir, read_jsonl};
use hindsight_constraints::{describe, supported_ids, ConstraintSpec};

#[test]
fn descriptions_match_reference() {
    let rows = read_jsonl(&oracle_dir().join("golden/ifeval_descriptions.jsonl"));
    assert_eq!(rows.len(), 834);
    let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
    let mut mismatches = Vec::new();
    for row in &rows {
        let id = row["instruction_id"].as_str().expect("instruction_id");
        if !supported_ids().contains(&id) {
            continue;
        }
        let spec = ConstraintSpec::new(id, row["kwargs"].as_object().cloned().unwrap_or_default());
        let want = row["description"].as_str().expect("description");
        match describe(&spec) {
            Ok(got) if got == want => {}
            other => mismatches.push(format!("{spec:?}\n  want {want:?}\n  got  {other:?}")),
        }
        *per_id.entry(id).or_default() += 1;
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    // every in-scope id is covered by the golden file
    assert_eq!(per_id.len(), supported_ids().len(), "{per_id:?}");
    assert!(per_id.values().sum::<usize>() > 450);
}
