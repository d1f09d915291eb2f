//! IFBench's regex sentence splitter (`instructions_util.split_into_sentences`, the
//! classic "<prd>/<stop>" heuristic; not Punkt), with Python `re` semantics: `\s` is
//! Unicode whitespace, letters and digits are ASCII classes, substitutions are applied
//! left to right without overlap, in the reference order.

use std::sync::LazyLock;

use regex::{Captures, Regex};

use crate::pytext::{py_strip, PY_SPACE};

const ALPHABETS: &str = "([A-Za-z])";
const SUFFIXES: &str = "(Inc|Ltd|Jr|Sr|Co)";
const DIGITS: &str = "([0-9])";

struct Rules {
    prefixes: Regex,
    websites: Regex,
    digits: Regex,
    multiple_dots: Regex,
    single_letter: Regex,
    acronym_starter: Regex,
    three_letters: Regex,
    two_letters: Regex,
    suffix_starter: Regex,
    suffix: Regex,
    letter: Regex,
}

static RULES: LazyLock<Rules> = LazyLock::new(|| {
    let starters = format!(
        r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He{s}|She{s}|It{s}|They{s}|Their{s}|Our{s}|We{s}|But{s}|However{s}|That{s}|This{s}|Wherever)",
        s = PY_SPACE
    );
    let acronyms = "([A-Z][.][A-Z][.](?:[A-Z][.])?)";
    let re = |p: &str| Regex::new(p).expect("static regex");
    Rules {
        prefixes: re("(Mr|St|Mrs|Ms|Dr)[.]"),
        websites: re("[.](com|net|org|io|gov|edu|me)"),
        digits: re(&format!("{DIGITS}[.]{DIGITS}")),
        multiple_dots: re(r"\.{2,}"),
        single_letter: re(&format!("{PY_SPACE}{ALPHABETS}[.] ")),
        acronym_starter: re(&format!("{acronyms} {starters}")),
        three_letters: re(&format!("{ALPHABETS}[.]{ALPHABETS}[.]{ALPHABETS}[.]")),
        two_letters: re(&format!("{ALPHABETS}[.]{ALPHABETS}[.]")),
        suffix_starter: re(&format!(" {SUFFIXES}[.] {starters}")),
        suffix: re(&format!(" {SUFFIXES}[.]")),
        letter: re(&format!(" {ALPHABETS}[.]")),
    }
});

/// `re.sub(pattern, rep, t)`, without copying `t` when nothing matches.
fn sub<R: regex::Replacer>(re: &Regex, t: String, rep: R) -> String {
    match re.replace_all(&t, rep) {
        std::borrow::Cow::Borrowed(_) => t,
        std::borrow::Cow::Owned(s) => s,
    }
}

/// `split_into_sentences(text)`: stripped sentences, the last one dropped if empty.
pub(crate) fn split_into_sentences(text: &str) -> Vec<String> {
    let r = &*RULES;
    let mut t = format!(" {text}  ").replace('\n', " ");
    t = sub(&r.prefixes, t, "${1}<prd>");
    t = sub(&r.websites, t, "<prd>${1}");
    t = sub(&r.digits, t, "${1}<prd>${2}");
    t = sub(&r.multiple_dots, t, |c: &Captures<'_>| {
        format!("{}<stop>", "<prd>".repeat(c[0].len()))
    });
    if t.contains("Ph.D") {
        t = t.replace("Ph.D.", "Ph<prd>D<prd>");
    }
    t = sub(&r.single_letter, t, " ${1}<prd> ");
    t = sub(&r.acronym_starter, t, "${1}<stop> ${2}");
    t = sub(&r.three_letters, t, "${1}<prd>${2}<prd>${3}<prd>");
    t = sub(&r.two_letters, t, "${1}<prd>${2}<prd>");
    t = sub(&r.suffix_starter, t, " ${1}<stop> ${2}");
    t = sub(&r.suffix, t, " ${1}<prd>");
    t = sub(&r.letter, t, " ${1}<prd>");
    if t.contains('”') {
        t = t.replace(".”", "”.");
    }
    if t.contains('"') {
        t = t.replace(".\"", "\".");
    }
    if t.contains('!') {
        t = t.replace("!\"", "\"!");
    }
    if t.contains('?') {
        t = t.replace("?\"", "\"?");
    }
    t = t.replace('.', ".<stop>");
    t = t.replace('?', "?<stop>");
    t = t.replace('!', "!<stop>");
    t = t.replace("<prd>", ".");
    let mut sentences: Vec<String> = t.split("<stop>").map(|s| py_strip(s).to_string()).collect();
    if sentences.last().is_some_and(|s| s.is_empty()) {
        sentences.pop();
    }
    sentences
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_reference() {
        assert_eq!(
            split_into_sentences("Mr. Smith went to Washington. He said hi! Did he?"),
            ["Mr. Smith went to Washington.", "He said hi!", "Did he?"]
        );
        assert_eq!(split_into_sentences("Wait... what"), ["Wait...", "what"]);
        assert_eq!(split_into_sentences("Pi is 3.14 ok"), ["Pi is 3.14 ok"]);
        assert_eq!(split_into_sentences("U.S.A. is big."), ["U.S.A. is big."]);
        assert!(split_into_sentences("").is_empty());
        assert!(split_into_sentences("   ").is_empty());
        assert_eq!(split_into_sentences("a\nb"), ["a b"]);
        assert_eq!(
            split_into_sentences("He said \"hi.\" Then"),
            ["He said \"hi\".", "Then"]
        );
    }
}
