//! Stable stand-in for the cargo-fuzz target (`constraints/fuzz`): seeded random texts
//! built from the characters and fragments the Punkt / Treebank / paragraph / section
//! checkers care about, checked strict and loose by every IFEval id added with the
//! sentence splitter; nothing may panic.

use hindsight_constraints::{build, ConstraintSpec, Map, Value};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

const FRAGMENTS: &[&str] = &[
    ".",
    "..",
    "...",
    ". . .",
    "?",
    "!",
    ",",
    ":",
    ";",
    "'",
    "\"",
    "``",
    "''",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "<",
    ">",
    "*",
    "***",
    "******",
    "-",
    "--",
    "\u{2014}",
    "\u{201c}",
    "\u{201d}",
    "\u{2019}",
    "\u{ab}",
    "\u{bb}",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "\u{a0}",
    "\u{1c}",
    "\u{3000}",
    "Mr.",
    "U.S.",
    "Dr",
    "e.g.",
    "3.14",
    "1.",
    "-5",
    "a",
    "I",
    "WORD",
    "word",
    "can",
    "not",
    "cannot",
    "gonna",
    "'tis",
    "n't",
    "don't",
    "SECTION",
    "Section 1",
    "\u{130}",
    "\u{3a3}",
    "\u{1c5}",
    "\u{301}",
    "\u{1F600}",
    "\u{5d0}",
    "\u{e01}",
    "x\u{b2}",
];

fn specs() -> Vec<ConstraintSpec> {
    let s = |id: &str, kw: Value| {
        ConstraintSpec::new(id, kw.as_object().cloned().unwrap_or_else(Map::new))
    };
    vec![
        s(
            "length_constraints:number_sentences",
            json!({"num_sentences": 3, "relation": "at least"}),
        ),
        s(
            "change_case:capital_word_frequency",
            json!({"capital_frequency": 2, "capital_relation": "less than"}),
        ),
        s(
            "keywords:letter_frequency",
            json!({"letter": "\u{130}", "let_frequency": 1, "let_relation": "at least"}),
        ),
        s("language:response_language", json!({"language": "fi"})),
        s(
            "length_constraints:number_paragraphs",
            json!({"num_paragraphs": 2}),
        ),
        s(
            "length_constraints:nth_paragraph_first_word",
            json!({"num_paragraphs": 3, "nth_paragraph": 3, "first_word": "\u{130}"}),
        ),
        s(
            "detectable_content:number_placeholders",
            json!({"num_placeholders": 2}),
        ),
        s(
            "detectable_format:multiple_sections",
            json!({"section_spliter": "Sec(tion)", "num_sections": 1}),
        ),
        s("detectable_format:constrained_response", json!({})),
        s(
            "combination:repeat_prompt",
            json!({"prompt_to_repeat": "\u{3a3}\u{130} x"}),
        ),
        s("combination:two_responses", json!({})),
    ]
}

#[test]
fn random_texts_never_panic() {
    let constraints: Vec<_> = specs().iter().map(|s| build(s).expect("builds")).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..3000 {
        let n = rng.random_range(0..40);
        let text: String = (0..n)
            .map(|_| FRAGMENTS[rng.random_range(0..FRAGMENTS.len())])
            .collect();
        for c in &constraints {
            let s = c.check_strict(&text);
            let l = c.check_loose(&text);
            assert!(!s || l, "{}: strict implies loose on {text:?}", c.id());
        }
    }
}
