//! Hand-computed verdicts for each verifier on small inputs, including the reference's
//! less obvious behaviours (patterns crossing lines, regex keywords, fence removal, ...).

use hindsight_constraints::{build, Constraint, ConstraintSpec};
use serde_json::{json, Value};

fn c(id: &str, kwargs: Value) -> Box<dyn Constraint> {
    build(&ConstraintSpec::new(
        id,
        kwargs.as_object().cloned().unwrap_or_default(),
    ))
    .unwrap_or_else(|e| panic!("{id}: {e}"))
}

#[test]
fn no_comma() {
    let k = c("punctuation:no_comma", json!({}));
    assert!(k.check_strict("no commas here. none"));
    assert!(!k.check_strict("one, two"));
    assert!(k.check_strict("full-width ， is not a comma"));
}

#[test]
fn case_checkers() {
    let lower = c("change_case:english_lowercase", json!({}));
    let upper = c("change_case:english_capital", json!({}));
    let en = "the quick brown fox jumps over the lazy dog and then runs into the forest to hide.";
    assert!(lower.check_strict(en));
    assert!(!upper.check_strict(en));
    assert!(upper.check_strict(&en.to_uppercase()));
    assert!(!lower.check_strict("The quick brown fox jumps over the lazy dog."));
    let de = "der schnelle braune fuchs springt über den faulen hund und läuft dann in den wald.";
    assert!(!lower.check_strict(de), "lowercase but not English");
    assert!(!upper.check_strict("12345 67"), "no cased character");
    // loose: first line removed
    assert!(lower.check_loose(&format!("Title Line\n{en}")));
}

#[test]
fn keywords() {
    let k = c("keywords:existence", json!({"keywords": ["river", "Land"]}));
    assert_eq!(
        k.description(),
        "Include keywords ['Land', 'river'] in the response."
    );
    assert!(k.check_strict("The RIVERS flow across the landscape"));
    assert!(!k.check_strict("The river"));
    // the reference uses keywords as patterns
    let k = c("keywords:existence", json!({"keywords": ["colou?r"]}));
    assert!(k.check_strict("What a Color"));

    let f = c(
        "keywords:frequency",
        json!({"keyword": " the ", "frequency": 3, "relation": "at least"}),
    );
    assert_eq!(
        f.description(),
        "In your response, the word the should appear at least 3 times."
    );
    assert!(f.check_strict("The theme: there."));
    assert!(!f.check_strict("The theme."));
    let f = c(
        "keywords:frequency",
        json!({"keyword": "aa", "frequency": 2, "relation": "less than"}),
    );
    assert!(f.check_strict("aaa"), "non-overlapping count is 1");
    assert!(!f.check_strict("aaaa"));
}

#[test]
fn number_words() {
    let k = c(
        "length_constraints:number_words",
        json!({"num_words": 5, "relation": "less than"}),
    );
    assert!(k.check_strict("one two, three-four"));
    assert!(
        !k.check_strict("it's a well-known fact"),
        "it/s/a/well/known/fact = 6"
    );
    let k = c(
        "length_constraints:number_words",
        json!({"num_words": 3, "relation": "at least"}),
    );
    assert!(k.check_strict("日本 café x²"));
    assert!(!k.check_strict("... !!! ---"));
}

#[test]
fn end_and_quotation() {
    let e = c(
        "startend:end_checker",
        json!({"end_phrase": "  Any other questions? "}),
    );
    assert_eq!(
        e.description(),
        "Finish your response with this exact phrase Any other questions?. No other words should follow this phrase."
    );
    assert!(e.check_strict("Blah.\nany other QUESTIONS?  \n"));
    assert!(e.check_strict("\"Blah. Any other questions?\""));
    assert!(!e.check_strict("Any other questions? Bye"));
    assert!(e.check_loose("Any other questions?\nBye"));

    let q = c("startend:quotation", json!({}));
    assert!(q.check_strict("  \"hello\"\n"));
    assert!(q.check_strict("\"\""));
    assert!(!q.check_strict("\""));
    assert!(!q.check_strict("\"hello\" world"));
}

#[test]
fn title() {
    let t = c("detectable_format:title", json!({}));
    assert!(t.check_strict("<<My Title>>\nbody"));
    assert!(!t.check_strict("<< >>\n<<<>>>"));
    assert!(
        t.check_strict("<< >> and <<<>>>"),
        "greedy: one match, inner '>> and <<' is non-blank"
    );
    assert!(!t.check_strict("<<split\ntitle>>"));
    assert!(
        t.check_strict("<<>> then <<x>>"),
        "greedy match '<<>> then <<x>>' is non-blank"
    );
}

#[test]
fn postscript() {
    let ps = c(
        "detectable_content:postscript",
        json!({"postscript_marker": "P.S."}),
    );
    assert!(ps.check_strict("Hello.\n\np.s. see you"));
    assert!(ps.check_strict("Hello. P. S. again"));
    assert!(!ps.check_strict("Hello. PS again"));
    let pps = c(
        "detectable_content:postscript",
        json!({"postscript_marker": "P.P.S"}),
    );
    assert!(pps.check_strict("x\nP. P. S we"));
    assert!(!pps.check_strict("x\nP.S. we"));
    let custom = c(
        "detectable_content:postscript",
        json!({"postscript_marker": "Note:"}),
    );
    assert!(custom.check_strict("body\nNOTE: more"));
    assert_eq!(
        custom.description(),
        "At the end of your response, please explicitly add a postscript starting with Note:"
    );
}

#[test]
fn bullets() {
    let b = c(
        "detectable_format:number_bullet_lists",
        json!({"num_bullets": 2}),
    );
    assert!(b.check_strict("Intro\n* one\n- two\n"));
    assert!(!b.check_strict("* one\n* two\n* three"));
    assert!(
        !b.check_strict("**bold** line\n* one"),
        "'**' is not a bullet"
    );
    // like Python: `\s*` and `[^*]` may cross line breaks
    assert!(
        b.check_strict("*\nx\n  - y"),
        "'*\\nx' counts as one bullet"
    );
    let b0 = c(
        "detectable_format:number_bullet_lists",
        json!({"num_bullets": 0}),
    );
    assert!(b0.check_strict("no bullets at all"));
}

#[test]
fn highlights() {
    let h = c(
        "detectable_format:number_highlighted_sections",
        json!({"num_highlights": 2}),
    );
    assert!(h.check_strict("*one* and *two*"));
    assert!(!h.check_strict("*one* and * *"));
    assert!(
        !h.check_strict("**bold**"),
        "one double highlight; the single pattern only sees '**'"
    );
    assert!(h.check_strict("**bold** and *it*"));
    assert!(!h.check_strict("*a\nb*"));
}

#[test]
fn json_format() {
    let j = c("detectable_format:json_format", json!({}));
    assert!(j.check_strict("```json\n{\"a\": [1, 2.5, null]}\n```"));
    assert!(j.check_strict(" [NaN, -Infinity] "));
    assert!(!j.check_strict("Here it is: {\"a\": 1}"));
    assert!(!j.check_strict("{'a': 1}"));
    assert!(j.check_loose("Here it is:\n{\"a\": 1}"));
}

#[test]
fn forbidden_words() {
    let f = c(
        "keywords:forbidden_words",
        json!({"forbidden_words": ["key", "BC"]}),
    );
    assert!(f.check_strict("The keys are here, and 300bc too."));
    assert!(!f.check_strict("Around 300 bc."));
    assert!(!f.check_strict("KEY"));
}
