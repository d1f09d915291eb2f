//! `nltk.word_tokenize` (nltk 3.10.4): Punkt sentences ([`crate::sentences`]), each split
//! by a port of `NLTKWordTokenizer.tokenize` (the improved Treebank tokenizer), applying
//! the same regular-expression substitutions in the same order.
//!
//! NLTK runs most of these patterns with the third-party `regex` engine (Unicode
//! `White_Space` `\s`, UTS #18 `\w`, as the `regex` crate); the two contraction lists use
//! the standard `re` module, whose `\b` is Python's (see [`pytext::is_py_word_boundary`]).
//! Patterns with look-around or a possessive quantifier are implemented by hand.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::LazyLock;

use regex::{Captures, Regex};

use crate::{pytext, sentences};

fn re(p: &str) -> Regex {
    Regex::new(p).expect("static regex")
}

struct Rules {
    sq_quotes: Regex,
    sq_backticks: Regex,
    sq_open: Regex,
    apostrophe_suffix: Regex,
    colon_comma: Regex,
    colon_comma_end: Regex,
    dots: Regex,
    symbols: Regex,
    dashes: Regex,
    qmark: Regex,
    quote_space: Regex,
    star: Regex,
    parens: Regex,
    double_dash: Regex,
    eq_closers: Regex,
    eq_two_single: Regex,
    eq_double: Regex,
    spaces: Regex,
    eq_clitic1: Regex,
    eq_clitic2: Regex,
    word_char: Regex,
    /// CONTRACTIONS2 (+ whether a `(?=\s)` follows instead of `\b`) and CONTRACTIONS3.
    contractions2: Vec<(Regex, bool)>,
    contractions3: Vec<Regex>,
}

static RULES: LazyLock<Rules> = LazyLock::new(|| Rules {
    sq_quotes: re("([«“‘„]|`+)"),
    sq_backticks: re("(``)"),
    sq_open: re(r#"([ (\[{<])("|'')"#),
    apostrophe_suffix: re(r"(?i)^(?:re|ve|ll|m|t|s|d|n)\b"),
    colon_comma: re(r"([:,])([^\d])"),
    colon_comma_end: re(r"([:,])(\n?)\z"),
    dots: re(r"\.{2,}"),
    symbols: re(r"[;@#$%&]"),
    dashes: re("[\u{2012}-\u{2015}]"),
    qmark: re(r"[?!]"),
    quote_space: re(r"([^'])' "),
    star: re(r"[*]"),
    parens: re(r"[\]\[(){}<>]"),
    double_dash: re("--"),
    eq_closers: re("([»”’])"),
    eq_two_single: re("''"),
    eq_double: re("\""),
    spaces: re(r"\s+"),
    eq_clitic1: re(r"([^' ])('[sS]|'[mM]|'[dD]|') "),
    eq_clitic2: re(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "),
    word_char: re(r"^\w$"),
    contractions2: [
        ("(can)(not)", false),
        ("(d)('ye)", false),
        ("(gim)(me)", false),
        ("(gon)(na)", false),
        ("(got)(ta)", false),
        ("(lem)(me)", false),
        ("(more)('n)", false),
        ("(wan)(na)", true),
    ]
    .into_iter()
    .map(|(p, ws)| (re(&format!("(?i){p}")), ws))
    .collect(),
    contractions3: [" ('t)(is)", " ('t)(was)"]
        .into_iter()
        .map(|p| re(&format!("(?i){p}")))
        .collect(),
});

impl Rules {
    /// `regex`-module `\w` for one character.
    fn is_word(&self, c: char) -> bool {
        if c.is_ascii() {
            return c.is_ascii_alphanumeric() || c == '_';
        }
        let mut buf = [0u8; 4];
        self.word_char.is_match(c.encode_utf8(&mut buf))
    }
}

fn sub(re: &Regex, text: String, rep: &str) -> String {
    match re.replace_all(&text, rep) {
        std::borrow::Cow::Borrowed(_) => text,
        std::borrow::Cow::Owned(s) => s,
    }
}

/// `(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)` -> `\1 `.
fn split_opening_apostrophes(r: &Rules, text: String) -> String {
    if !text.contains('\'') {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut prev: Option<char> = None;
    for (i, c) in text.char_indices() {
        out.push(c);
        if c == '\'' {
            let rest = &text[i + 1..];
            let next_is_word = rest.chars().next().is_some_and(|n| r.is_word(n));
            if !prev.is_some_and(|p| r.is_word(p))
                && next_is_word
                && !r.apostrophe_suffix.is_match(rest)
            {
                out.push(' ');
            }
        }
        prev = Some(c);
    }
    out
}

/// The two "final period" rules: `([^\.])(\.)([CLASS]*)\s*$`, replaced by
/// `\1 \2 \3 ` (`spaced`) or `\1 \2\3 `. Only the last `.` can match.
fn final_period(text: String, class: fn(char) -> bool, spaced: bool) -> String {
    let Some(d) = text.rfind('.') else {
        return text;
    };
    let Some(before) = text[..d].chars().next_back() else {
        return text;
    };
    if before == '.' {
        return text;
    }
    let after = &text[d + 1..];
    let run: usize = after
        .chars()
        .take_while(|&c| class(c))
        .map(char::len_utf8)
        .sum();
    if !after[run..].chars().all(char::is_whitespace) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 4);
    out.push_str(&text[..d]);
    out.push_str(if spaced { " . " } else { " ." });
    out.push_str(&after[..run]);
    out.push(' ');
    out
}

fn closer_or_space(c: char) -> bool {
    matches!(
        c,
        ']' | ')' | '}' | '>' | '"' | '\'' | '\u{bb}' | '\u{201d}' | '\u{2019}' | ' '
    )
}

fn closer(c: char) -> bool {
    matches!(c, ']' | ')' | '}' | '>' | '"' | '\'')
}

/// A Python-`re` contraction rule `(?i)\b?(A)(B)(\b|(?=\s))` -> ` \1 \2 `.
fn contraction(text: String, re: &Regex, start_boundary: bool, lookahead_space: bool) -> String {
    let mut out = String::new();
    let mut last = 0;
    for caps in re.captures_iter(&text) {
        let m = caps.get(0).expect("group 0");
        let ok_start = !start_boundary || pytext::is_py_word_boundary(&text, m.start());
        let ok_end = if lookahead_space {
            text[m.end()..]
                .chars()
                .next()
                .is_some_and(pytext::is_py_space)
        } else {
            pytext::is_py_word_boundary(&text, m.end())
        };
        if ok_start && ok_end {
            out.push_str(&text[last..m.start()]);
            out.push(' ');
            out.push_str(&caps[1]);
            out.push(' ');
            out.push_str(&caps[2]);
            out.push(' ');
            last = m.end();
        }
    }
    if last == 0 {
        return text;
    }
    out.push_str(&text[last..]);
    out
}

/// `NLTKWordTokenizer().tokenize(text)`.
pub(crate) fn treebank_tokens(text: &str) -> Vec<String> {
    let r = &*RULES;
    let mut t = sub(&r.sq_quotes, text.to_string(), " $1 ");
    if t.starts_with('"') {
        t.replace_range(..1, "``");
    }
    t = sub(&r.sq_backticks, t, " $1 ");
    t = sub(&r.sq_open, t, "$1 `` ");
    t = split_opening_apostrophes(r, t);

    t = final_period(t, closer_or_space, true);
    t = sub(&r.colon_comma, t, " $1 $2");
    t = sub(&r.colon_comma_end, t, " $1 $2");
    t = sub(&r.dots, t, " $0 ");
    t = sub(&r.symbols, t, " $0 ");
    t = sub(&r.dashes, t, " $0 ");
    t = final_period(t, closer, false);
    t = sub(&r.qmark, t, " $0 ");
    t = sub(&r.quote_space, t, "$1 ' ");
    t = sub(&r.star, t, " $0 ");
    t = sub(&r.parens, t, " $0 ");
    t = sub(&r.double_dash, t, " -- ");

    t = format!(" {t} ");
    t = sub(&r.eq_closers, t, " $1 ");
    t = sub(&r.eq_two_single, t, " '' ");
    t = sub(&r.eq_double, t, " '' ");
    t = sub(&r.spaces, t, " ");
    t = r
        .eq_clitic1
        .replace_all(&t, |c: &Captures<'_>| format!("{} {} ", &c[1], &c[2]))
        .into_owned();
    t = r
        .eq_clitic2
        .replace_all(&t, |c: &Captures<'_>| format!("{} {} ", &c[1], &c[2]))
        .into_owned();
    for (re, ws) in &r.contractions2 {
        t = contraction(t, re, true, *ws);
    }
    for re in &r.contractions3 {
        t = contraction(t, re, false, false);
    }
    t.split(pytext::is_py_space)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Sentence -> its Treebank tokens.
type Memo = HashMap<Box<str>, Rc<[String]>>;

thread_local! {
    /// The sentence memo while a [`with_response_cache`] scope is open on this thread
    /// (`None` otherwise).
    static MEMO: RefCell<Option<Memo>> = const { RefCell::new(None) };
}

/// Runs `f` with a per-thread memo of sentence tokenizations: the checks made inside
/// (typically every constraint of one record, strict and loose, whose loose variants
/// share most sentences with the response) tokenize each distinct sentence once. The
/// memo is dropped when the outermost scope ends (also on panic); verdicts are the same
/// as without it.
pub fn with_response_cache<R>(f: impl FnOnce() -> R) -> R {
    struct Guard(bool);
    impl Drop for Guard {
        fn drop(&mut self) {
            if self.0 {
                MEMO.with(|m| *m.borrow_mut() = None);
            }
        }
    }
    let outermost = MEMO.with(|m| {
        let mut m = m.borrow_mut();
        if m.is_some() {
            false
        } else {
            *m = Some(HashMap::new());
            true
        }
    });
    let _guard = Guard(outermost);
    f()
}

/// `treebank_tokens(sentence)`, from the memo when a scope is open.
fn sentence_tokens(sentence: &str) -> Rc<[String]> {
    let hit = MEMO.with(|m| m.borrow().as_ref().map(|m| m.get(sentence).cloned()));
    match hit {
        None => treebank_tokens(sentence).into(),
        Some(Some(t)) => t,
        Some(None) => {
            let t: Rc<[String]> = treebank_tokens(sentence).into();
            MEMO.with(|m| {
                if let Some(m) = m.borrow_mut().as_mut() {
                    m.insert(sentence.into(), t.clone());
                }
            });
            t
        }
    }
}

/// `nltk.word_tokenize(text)`: Treebank tokens of each Punkt sentence.
pub(crate) fn word_tokenize(text: &str) -> Vec<String> {
    word_tokens_lazy(text).collect()
}

/// The tokens of `nltk.word_tokenize(text)`, tokenizing one sentence at a time as the
/// iterator is consumed (for checkers that stop early).
pub(crate) fn word_tokens_lazy(text: &str) -> impl Iterator<Item = String> + '_ {
    sentences::sentences(text).into_iter().flat_map(|s| {
        let t = sentence_tokens(s);
        (0..t.len()).map(move |i| t[i].clone())
    })
}

/// How many tokens of `nltk.word_tokenize(text)` satisfy `pred`.
pub(crate) fn count_word_tokens(text: &str, pred: impl Fn(&str) -> bool) -> usize {
    sentences::sentences(text)
        .into_iter()
        .map(|s| sentence_tokens(s).iter().filter(|w| pred(w)).count())
        .sum()
}

/// At least the first `n` tokens of `nltk.word_tokenize(text)` (all of them when there
/// are fewer): whole sentences are tokenized until `n` tokens are reached.
pub(crate) fn first_word_tokens(text: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for s in sentences::sentences(text) {
        if out.len() >= n {
            break;
        }
        out.extend(sentence_tokens(s).iter().cloned());
    }
    out
}

/// `(first, last)`: at least the first `n` and the last `n` tokens of
/// `nltk.word_tokenize(text)`, tokenizing only the sentences needed; when the two ends
/// meet (or there are fewer tokens), `first == last ==` all tokens.
pub(crate) fn end_word_tokens(text: &str, n: usize) -> (Vec<String>, Vec<String>) {
    let sents = sentences::sentences(text);
    let mut first = Vec::new();
    let mut i = 0;
    while i < sents.len() && first.len() < n {
        first.extend(sentence_tokens(sents[i]).iter().cloned());
        i += 1;
    }
    if i == sents.len() {
        return (first.clone(), first);
    }
    // sentences i.. are untouched: collect the last ones from the back
    let mut tail: Vec<Rc<[String]>> = Vec::new();
    let mut got = 0;
    let mut j = sents.len();
    while j > i && got < n {
        j -= 1;
        let t = sentence_tokens(sents[j]);
        got += t.len();
        tail.push(t);
    }
    let last: Vec<String> = tail.iter().rev().flat_map(|t| t.iter().cloned()).collect();
    if j == i && got < n {
        // everything was tokenized and the ends meet
        let mut all = first;
        all.extend(last);
        return (all.clone(), all);
    }
    (first, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn treebank_examples() {
        assert_eq!(
            treebank_tokens("Good muffins cost $3.88 in New York.  Please buy me two of them."),
            [
                "Good", "muffins", "cost", "$", "3.88", "in", "New", "York.", "Please", "buy",
                "me", "two", "of", "them", "."
            ]
        );
        assert_eq!(
            treebank_tokens("They'll save and invest more. I cannot! \"Don't\" 'tis."),
            [
                "They", "'ll", "save", "and", "invest", "more.", "I", "can", "not", "!", "``",
                "Do", "n't", "''", "'", "tis", "."
            ]
        );
        assert_eq!(
            word_tokenize("Hello, WORLD. It's NASA's (big) day..."),
            ["Hello", ",", "WORLD", ".", "It", "'s", "NASA", "'s", "(", "big", ")", "day", "..."]
        );
    }

    #[test]
    fn partial_tokenizations_agree_with_the_full_one() {
        let texts = [
            "",
            "   ",
            "One.",
            "One two.",
            "Hi. A. B. C.",
            "A. Hello there, you. It's NASA's (big) day... Go! Really? Yes. x.",
            "First sentence is long enough here. Mid. End here now.",
            "I. Am. Short. Words. Ok.",
            "\"Quoted start.\" Then more: stuff, things. Last one",
        ];
        for t in texts {
            let all = word_tokenize(t);
            assert_eq!(word_tokens_lazy(t).collect::<Vec<_>>(), all, "{t:?}");
            for n in 0..6 {
                let first = first_word_tokens(t, n);
                assert!(
                    all.starts_with(&first) && (first.len() >= n || first == all),
                    "{t:?}"
                );
                let (f, l) = end_word_tokens(t, n);
                assert!(
                    all.starts_with(&f) && (f.len() >= n || f == all),
                    "{t:?} {n}"
                );
                assert!(all.ends_with(&l) && (l.len() >= n || l == all), "{t:?} {n}");
            }
        }
    }
}
