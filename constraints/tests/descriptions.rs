//! Instruction texts: for every (instruction id, kwargs) of the IFEval prompts, `describe`
//! must produce exactly the reference `build_description` text
//! (`golden/ifeval_descriptions.jsonl`), except where the reference drew a random value
//! (the entries `golden/ifeval_gpt4.expected.jsonl` lists in `random_used`: a
//! `keywords:letter_frequency` letter that is not a letter).

mod common;

use std::collections::{BTreeMap, HashSet};

use common::{key_str, oracle_dir, read_jsonl};
use hindsight_constraints::{describe, supported_ids, ConstraintSpec};

#[test]
fn descriptions_match_reference() {
    let rows = read_jsonl(&oracle_dir().join("golden/ifeval_descriptions.jsonl"));
    assert_eq!(rows.len(), 834);
    let random: HashSet<(String, u64)> =
        read_jsonl(&oracle_dir().join("golden/ifeval_gpt4.expected.jsonl"))
            .iter()
            .flat_map(|r| {
                let key = key_str(&r["key"]);
                r.get("random_used")
                    .and_then(|v| v.as_array())
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.as_u64())
                    .map(move |i| (key.clone(), i))
            })
            .collect();
    assert_eq!(random.len(), 2);
    let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
    let mut mismatches = Vec::new();
    for row in &rows {
        let id = row["instruction_id"].as_str().expect("instruction_id");
        if !supported_ids().contains(&id)
            || random.contains(&(key_str(&row["key"]), row["index"].as_u64().expect("index")))
        {
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
    // all 25 IFEval ids are supported: every row but the random ones is compared
    assert_eq!(per_id.len(), 25, "{per_id:?}");
    assert_eq!(per_id.values().sum::<usize>(), 834 - 2);
}
