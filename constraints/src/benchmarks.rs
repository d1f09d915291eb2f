//! The benchmark prompts shipped with Hindsight, embedded in the binary so that an
//! evaluation needs no download: IFEval's 541 prompts (google-research
//! `instruction_following_eval/data/input_data.jsonl`) and IFBench's 294 test prompts
//! (allenai/IFBench `data/IFBench_test.jsonl`), both Apache-2.0, unmodified; their licence
//! and notice files are next to them in `constraints/benchmarks/`.
//! Each line is `{key, prompt, instruction_id_list, kwargs}`.

/// IFEval's prompts (JSONL, 541 lines).
pub const IFEVAL: &str = include_str!("../benchmarks/ifeval/input_data.jsonl");
/// IFBench's test prompts (JSONL, 294 lines).
pub const IFBENCH: &str = include_str!("../benchmarks/ifbench/IFBench_test.jsonl");

/// The embedded JSONL of a benchmark by name (`ifeval`, `ifbench`).
pub fn jsonl(name: &str) -> Option<&'static str> {
    match name {
        "ifeval" => Some(IFEVAL),
        "ifbench" => Some(IFBENCH),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shipped_benchmarks_parse_and_have_their_sizes() {
        for (name, n) in [("ifeval", 541), ("ifbench", 294)] {
            let text = super::jsonl(name).unwrap();
            let mut count = 0;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert!(v["prompt"].is_string() && v["instruction_id_list"].is_array());
                count += 1;
            }
            assert_eq!(count, n, "{name}");
        }
    }
}
