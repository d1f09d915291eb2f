//! Robustness: every verifier, in strict and loose mode, returns a verdict (never panics)
//! on odd inputs, and building with odd kwargs returns an error instead of panicking.

use hindsight_constraints::{build, supported_ids, Constraint, ConstraintSpec, Map, Value};
use serde_json::json;

/// Valid kwargs for every supported id.
fn sample_kwargs(id: &str) -> Value {
    match id {
        "keywords:existence" => json!({"keywords": ["alpha", "b.ta"]}),
        "keywords:frequency" => json!({"keyword": "alpha", "frequency": 2, "relation": "at least"}),
        "keywords:forbidden_words" => json!({"forbidden_words": ["alpha", "g(a|e)mma"]}),
        "length_constraints:number_words" => json!({"num_words": 3, "relation": "less than"}),
        "startend:end_checker" => json!({"end_phrase": "Bye now."}),
        "detectable_content:postscript" => json!({"postscript_marker": "P.S."}),
        "detectable_format:number_bullet_lists" => json!({"num_bullets": 2}),
        "detectable_format:number_highlighted_sections" => json!({"num_highlights": 1}),
        "keywords:letter_frequency" => {
            json!({"letter": "a", "let_frequency": 2, "let_relation": "at least"})
        }
        "language:response_language" => json!({"language": "sw"}),
        "length_constraints:number_sentences" => {
            json!({"num_sentences": 2, "relation": "less than"})
        }
        "length_constraints:number_paragraphs" => json!({"num_paragraphs": 2}),
        "length_constraints:nth_paragraph_first_word" => {
            json!({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "bye"})
        }
        "detectable_content:number_placeholders" => json!({"num_placeholders": 1}),
        "detectable_format:multiple_sections" => {
            json!({"section_spliter": "Section", "num_sections": 2})
        }
        "combination:repeat_prompt" => json!({"prompt_to_repeat": "Repeat: İ Σ *"}),
        "change_case:capital_word_frequency" => {
            json!({"capital_frequency": 1, "capital_relation": "at least"})
        }
        // IFBench (counts are JSON floats in the benchmark data)
        "count:word_count_range" => json!({"min_words": 2, "max_words": 5.0}),
        "count:unique_word_count" | "count:person_names" | "count:numbers" | "count:pronouns" => {
            json!({"N": 3.0})
        }
        "count:words_japanese" => json!({"N": 2}),
        "ratio:stop_words" => json!({"percentage": 40}),
        "ratio:overlap" => json!({"percentage": 50.0, "reference_text": "a b c d e f"}),
        "count:conjunctions" | "words:repeats" | "sentence:increment" => json!({"small_n": 2.0}),
        "format:options" => json!({"options": "a), b), c), d)"}),
        "format:list" => json!({"sep": "..."}),
        "sentence:keyword" => json!({"word": "alpha", "N": 2.0}),
        "count:keywords_multiple" => {
            json!({"keyword1": "a", "keyword2": "b", "keyword3": "c", "keyword4": "d", "keyword5": "e"})
        }
        "words:keywords_specific_position" => json!({"keyword": "alpha", "n": 2, "m": 3}),
        "words:words_position" => json!({"keyword": "alpha"}),
        "repeat:repeat_change" => json!({"prompt_to_repeat": "Say hi to me."}),
        "repeat:repeat_span" => {
            json!({"prompt_to_repeat": "one two three four five", "n_start": 1, "n_end": 3})
        }
        _ => json!({}),
    }
}

fn all_constraints() -> Vec<Box<dyn Constraint>> {
    supported_ids()
        .iter()
        .map(|id| {
            let kwargs = sample_kwargs(id).as_object().cloned().unwrap_or_default();
            build(&ConstraintSpec::new(*id, kwargs)).unwrap_or_else(|e| panic!("{id}: {e}"))
        })
        .collect()
}

fn odd_inputs() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        "*",
        "**",
        "***",
        " ",
        "\n",
        "\n\n\n",
        "\r\n",
        "\u{0}",
        "\u{1c}\u{1f}",
        "\"",
        "\"\"",
        "<<>>",
        "<< >>",
        "<<\n>>",
        "```",
        "```json",
        "``````",
        "```json\n```",
        "[",
        "{",
        "]}",
        "\"\\x\"",
        "\"\\u12\"",
        "\"\\ud800\"",
        "{\"a\":}",
        "-",
        "-Infinity",
        "1e",
        "P.",
        "p.p.",
        "İ",
        "ǅ",
        "ß",
        "Σ",
        "\u{301}",
        "\u{feff}",
        "\u{200d}",
        "😀",
        "ﷺ",
        "\u{10FFFF}",
        "*\n*\n-",
        "- \n- \n* *",
        "* a\n  * b",
        "a\nb\nc",
        "\n*\n",
        "Bye now.\"\"",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("[".repeat(200_000));
    v.push(format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)));
    v.push("{\"a\":".repeat(50_000));
    v.push("a ".repeat(500_000));
    v.push("*x* ".repeat(100_000));
    v.push("\n".repeat(100_000));
    v.push("É".repeat(300_000));
    v.push(format!("1{}", "0".repeat(100_000)));
    v.push("\"".to_string() + &"\\".repeat(10_001));
    v.push("<<".repeat(100_000) + &">>".repeat(100_000));
    v.push("p.p.s ".repeat(50_000));
    v
}

#[test]
fn verifiers_never_panic() {
    let constraints = all_constraints();
    assert_eq!(constraints.len(), supported_ids().len());
    let start = std::time::Instant::now();
    for input in odd_inputs() {
        for c in &constraints {
            let strict = c.check_strict(&input);
            let loose = c.check_loose(&input);
            let _ = c.follows(&input);
            // loose is a relaxation of strict
            assert!(!strict || loose, "{}: strict but not loose", c.id());
            if input.trim().is_empty() {
                assert!(!strict && !loose, "{} passed a blank response", c.id());
            }
        }
    }
    assert!(
        start.elapsed().as_secs() < 60,
        "too slow: {:?}",
        start.elapsed()
    );
}

#[test]
fn odd_kwargs_give_errors_not_panics() {
    let odd_values = [
        json!(null),
        json!(true),
        json!(-1),
        json!(0),
        json!(1.5),
        json!(1e300),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(""),
        json!(" "),
        json!("x"),
        json!("less than"),
        json!("(?P<"),
        json!("["),
        json!("\\"),
        json!([]),
        json!([null]),
        json!([""]),
        json!(["a", 1]),
        json!({"a": 1}),
        json!("a".repeat(100_000)),
        json!(["(a*)*".repeat(5000)]),
    ];
    let keys = [
        "keywords",
        "keyword",
        "frequency",
        "relation",
        "forbidden_words",
        "num_words",
        "end_phrase",
        "postscript_marker",
        "num_bullets",
        "num_highlights",
        "other",
    ];
    for id in supported_ids() {
        for key in keys {
            for value in &odd_values {
                let mut kwargs = sample_kwargs(id).as_object().cloned().unwrap_or_default();
                kwargs.insert(key.to_string(), value.clone());
                if let Ok(c) = build(&ConstraintSpec::new(*id, kwargs)) {
                    let _ = c.description();
                    let _ = c.check_loose("*a* b\nc, P.S. alpha\n- x");
                }
            }
        }
        // no kwargs at all
        let _ = build(&ConstraintSpec::new(*id, Map::new())).map(|c| c.description());
    }
}
