//! Conformance of our `langdetect` port with the reference detector (PyPI `langdetect`
//! 1.0.9, seeded with 0 as the reference oracle seeds it): the answer (language code,
//! `unknown`, or "no features" where langdetect raises) must be the reference's on
//! * `tests/data/langdetect_golden.jsonl`: model-style answers in 41 languages and their
//!   variants (prefixes of 1 to 20 words, single sentences, upper/lower/title case,
//!   decomposed accents, markdown, code, URLs and e-mails, mixtures of two languages, over
//!   10 000 characters) and edge cases (empty, numbers only, code only, emoji, acronyms);
//! * every benchmark response of the oracle (IFEval GPT-4 and IFBench samples), as given
//!   and upper- and lower-cased (`tests/data/langdetect_oracle_responses.jsonl`).
//!
//! The reference's answers were recorded by `tests/data/make_langdetect_golden.py`
//! (rerun it with the oracle's Python after changing the texts).

mod common;

use std::path::Path;

use common::{oracle_dir, read_jsonl};
use hindsight_constraints::langdetect::{detect, NoFeatures};
use serde_json::Value;

fn data(name: &str) -> Vec<Value> {
    read_jsonl(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name),
    )
}

/// Our answer in the golden files' spelling: the code, or null for "no features".
fn ours(text: &str) -> Value {
    match detect(text) {
        Ok(code) => Value::from(code),
        Err(NoFeatures) => Value::Null,
    }
}

fn short(s: &str) -> String {
    s.chars().take(120).collect()
}

#[test]
fn golden_texts_match_reference() {
    let golden = data("langdetect_golden.jsonl");
    assert!(golden.len() > 1000, "{} golden texts", golden.len());
    let mut mismatches = Vec::new();
    let mut langs = std::collections::BTreeSet::new();
    for g in &golden {
        let text = g["text"].as_str().expect("text");
        langs.insert(g["lang"].to_string());
        let got = ours(text);
        if got != g["lang"] {
            mismatches.push(format!("want {} got {got}: {:?}", g["lang"], short(text)));
        }
    }
    // the fixture covers at least 40 distinct reference answers, and "no features"
    assert!(langs.len() >= 40 && langs.contains("null"), "{langs:?}");
    assert!(
        mismatches.is_empty(),
        "{} of {} texts detected differently:\n{}",
        mismatches.len(),
        golden.len(),
        mismatches.join("\n")
    );
}

#[test]
fn benchmark_responses_match_reference() {
    let dir = oracle_dir();
    let sets = [
        (
            "ifeval_gpt4",
            "data/ifeval/input_response_data_gpt4_20231107_145030.jsonl",
        ),
        ("ifbench_sample", "data/ifbench/sample_output.jsonl"),
    ];
    let responses: Vec<(&str, Vec<String>)> = sets
        .iter()
        .map(|(name, path)| {
            let texts = read_jsonl(&dir.join(path))
                .iter()
                .map(|r| r["response"].as_str().expect("response").to_string())
                .collect();
            (*name, texts)
        })
        .collect();
    let golden = data("langdetect_oracle_responses.jsonl");
    assert_eq!(golden.len(), 541 + 294);
    let mut mismatches = Vec::new();
    for g in &golden {
        let set = g["set"].as_str().expect("set");
        let index = g["index"].as_u64().expect("index") as usize;
        let text = &responses
            .iter()
            .find(|(n, _)| *n == set)
            .expect("known set")
            .1[index];
        for (field, variant) in [
            ("lang", text.clone()),
            ("upper", text.to_uppercase()),
            ("lower", text.to_lowercase()),
        ] {
            let got = ours(&variant);
            if got != g[field] {
                mismatches.push(format!(
                    "{set}[{index}] {field}: want {} got {got}: {:?}",
                    g[field],
                    short(&variant)
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} detections differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}
