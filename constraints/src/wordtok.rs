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
    treebank_tokens_impl(text, true)
}

/// Any byte of `t` in `set`.
#[inline]
fn has_any(t: &str, set: &[u8]) -> bool {
    t.bytes().any(|b| set.contains(&b))
}

/// `\s+` -> `" "` (the `regex` crate's `\s` is Unicode `White_Space`, as
/// `char::is_whitespace`; a test checks this on every char).
fn collapse_spaces(t: String) -> String {
    let mut prev_ws = false;
    let needed = t.chars().any(|c| {
        let ws = c.is_whitespace();
        let bad = ws && (c != ' ' || prev_ws);
        prev_ws = ws;
        bad
    });
    if !needed {
        return t;
    }
    let mut out = String::with_capacity(t.len());
    let mut in_ws = false;
    for c in t.chars() {
        if c.is_whitespace() {
            if !in_ws {
                out.push(' ');
            }
            in_ws = true;
        } else {
            out.push(c);
            in_ws = false;
        }
    }
    out
}

/// The literal each CONTRACTIONS2 pattern matches, ASCII-lowercased (the `(?i)` patterns
/// only match ASCII letters: none of their letters has a non-ASCII case-folding partner).
const CONTRACTION2_LITERALS: [&str; 8] = [
    "cannot", "d'ye", "gimme", "gonna", "gotta", "lemme", "more'n", "wanna",
];

/// [`treebank_tokens`]; with `guarded`, a substitution is skipped when its pattern
/// cannot match (a character every match needs is absent), which changes nothing but
/// the time taken. Tests compare both ways.
fn treebank_tokens_impl(text: &str, guarded: bool) -> Vec<String> {
    let r = &*RULES;
    // the substitutions only insert ASCII, so a text without non-ASCII keeps none
    let non_ascii = !guarded || !text.is_ascii();
    let mut t = text.to_string();
    if non_ascii || t.contains('`') {
        t = sub(&r.sq_quotes, t, " $1 ");
    }
    if t.starts_with('"') {
        t.replace_range(..1, "``");
    }
    if !guarded || t.contains("``") {
        t = sub(&r.sq_backticks, t, " $1 ");
    }
    if !guarded || t.contains('"') || t.contains("''") {
        t = sub(&r.sq_open, t, "$1 `` ");
    }
    t = split_opening_apostrophes(r, t);

    t = final_period(t, closer_or_space, true);
    if !guarded || has_any(&t, b":,") {
        t = sub(&r.colon_comma, t, " $1 $2");
        t = sub(&r.colon_comma_end, t, " $1 $2");
    }
    if !guarded || t.contains("..") {
        t = sub(&r.dots, t, " $0 ");
    }
    if !guarded || has_any(&t, b";@#$%&") {
        t = sub(&r.symbols, t, " $0 ");
    }
    if non_ascii {
        t = sub(&r.dashes, t, " $0 ");
    }
    t = final_period(t, closer, false);
    if !guarded || has_any(&t, b"?!") {
        t = sub(&r.qmark, t, " $0 ");
    }
    if !guarded || t.contains("' ") {
        t = sub(&r.quote_space, t, "$1 ' ");
    }
    if !guarded || t.contains('*') {
        t = sub(&r.star, t, " $0 ");
    }
    if !guarded || has_any(&t, b"][(){}<>") {
        t = sub(&r.parens, t, " $0 ");
    }
    if !guarded || t.contains("--") {
        t = sub(&r.double_dash, t, " -- ");
    }

    t = format!(" {t} ");
    if non_ascii {
        t = sub(&r.eq_closers, t, " $1 ");
    }
    if !guarded || t.contains("''") {
        t = sub(&r.eq_two_single, t, " '' ");
    }
    if !guarded || t.contains('"') {
        t = sub(&r.eq_double, t, " '' ");
    }
    t = if guarded {
        collapse_spaces(t)
    } else {
        sub(&r.spaces, t, " ")
    };
    // every clitic and CONTRACTIONS3 pattern contains an apostrophe
    let apostrophe = !guarded || t.contains('\'');
    if apostrophe {
        t = r
            .eq_clitic1
            .replace_all(&t, |c: &Captures<'_>| format!("{} {} ", &c[1], &c[2]))
            .into_owned();
        t = r
            .eq_clitic2
            .replace_all(&t, |c: &Captures<'_>| format!("{} {} ", &c[1], &c[2]))
            .into_owned();
    }
    // inserting spaces never creates an occurrence of a space-free literal, so the
    // literals present now are the only ones the rules below can match
    let lower = guarded.then(|| t.to_ascii_lowercase());
    for ((re, ws), lit) in r.contractions2.iter().zip(CONTRACTION2_LITERALS) {
        if lower.as_ref().is_none_or(|l| l.contains(lit)) {
            t = contraction(t, re, true, *ws);
        }
    }
    if !guarded || t.contains('\'') {
        for re in &r.contractions3 {
            t = contraction(t, re, false, false);
        }
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

/// Whether some token of `treebank_tokens(sentence)` may be Python `str.isupper()`; when
/// this says no, none is (a cheap filter: most sentences need no tokenizing).
///
/// Tokens are runs of the sentence's characters between inserted spaces (the rules
/// only insert spaces, rewrite quote characters and collapse whitespace), and a token
/// with a lowercase character is not `isupper`. Between two adjacent characters that are
/// both Python `\w`, a space is only ever inserted by the `n't` / `N'T` clitic rule
/// (before the `n` or `N`) and inside the contractions `can|not`, `gim|me`, `gon|na`,
/// `got|ta`, `lem|me`, `wan|na`, `'t|is`, `'t|was` (ASCII case-insensitive: none of
/// their letters has a non-ASCII case-folding partner). So an uppercase character with
/// a lowercase `\w` neighbour they cannot separate it from shares a token with it.
fn may_have_upper_token(sentence: &str) -> bool {
    // no uppercase character at all (the common case for a chunk)
    if !sentence
        .bytes()
        .any(|b| b.is_ascii_uppercase() || !b.is_ascii())
    {
        return false;
    }
    let word = |c: char| c.is_lowercase() && pytext::is_py_word_char(c);
    let mut prev: Option<char> = None;
    let mut chars = sentence.char_indices().peekable();
    while let Some((i, u)) = chars.next() {
        let next = chars.peek().map(|&(_, c)| c);
        if u.is_uppercase() {
            let after_u = &sentence[i + u.len_utf8()..];
            let right_joined = next.is_some_and(|l| {
                word(l)
                    && pytext::is_py_word_char(u)
                    && !(l == 'n' && (u == 'N' || after_u[l.len_utf8()..].starts_with("'t")))
                    && !(u == 'M' && l == 'm')
                    && !(u == 'T' && matches!(l, 't' | 'i' | 'w'))
            });
            let left_joined = prev.is_some_and(|l| {
                word(l)
                    && pytext::is_py_word_char(u)
                    && !(u == 'N' && (l == 'n' || after_u.starts_with("'T")))
                    && !(u == 'M' && l == 'm')
                    && !(l == 't' && matches!(u, 'T' | 'I' | 'W'))
            });
            if !right_joined && !left_joined {
                return true;
            }
        }
        prev = Some(u);
    }
    false
}

/// Punctuation that may surround a [`simple_chunk_upper_count`] core: ASCII punctuation
/// but the apostrophe, and the curly quotes (which the tokenizer always pads with spaces).
fn is_chunk_punct(c: char) -> bool {
    (c.is_ascii_punctuation() && c != '\'') || matches!(c, '“' | '”' | '‘' | '’')
}

/// Clitics the tokenizer splits off a word when a space follows (`'s`, `'m`, `'d` and
/// `'ll`, `'re`, `'ve` in either case).
const CLITICS: [&str; 12] = [
    "'s", "'S", "'m", "'M", "'d", "'D", "'ll", "'LL", "'re", "'RE", "'ve", "'VE",
];

/// Contraction literals (ASCII-lowercased) without an apostrophe: the only places where
/// the tokenizer splits a run of letters and digits.
const CONTRACTION_WORDS: [&str; 6] = ["cannot", "gimme", "gonna", "gotta", "lemme", "wanna"];

/// The number of `isupper` tokens a chunk (a maximal run of non-space characters) adds
/// to the tokens of any sentence containing it, when that follows from the chunk alone.
///
/// That is the case for `P core [clitic] Q`: `core` is ASCII letters and digits, single
/// hyphens between them allowed, and contains no [`CONTRACTION_WORDS`]; `P` and `Q` are
/// [`is_chunk_punct`] characters; an optional [`CLITICS`] entry ends the chunk (`Q`
/// then empty). No rule inserts a space inside such a core (the rules act on
/// punctuation, apostrophes, `--` and the contractions), so exactly one token holds the
/// core's characters, with perhaps some of `P`/`Q` (uncased, so its `isupper` is the
/// core's); a final clitic is split off as a token of its own (the chunk is followed by
/// a space, or by the end of the sentence, which the tokenizer pads with one; callers
/// make sure no whitespace outside Unicode `White_Space` separates chunks); every
/// other token is punctuation, never `isupper`. A sentence boundary inside a chunk only
/// falls next to `.?!` or a closing quote/bracket, so not inside the core or before the
/// clitic: the sentence pieces of a chunk add up to the same count.
fn simple_chunk_upper_count(chunk: &str) -> Option<usize> {
    let rest = chunk.trim_start_matches(is_chunk_punct);
    let core_len = {
        let b = rest.as_bytes();
        let mut i = 0;
        while i < b.len() && b[i].is_ascii_alphanumeric() {
            i += 1;
            if i + 1 < b.len() && b[i] == b'-' && b[i + 1].is_ascii_alphanumeric() {
                i += 1;
            }
        }
        i
    };
    if core_len == 0 {
        return None;
    }
    let (core, tail) = rest.split_at(core_len);
    let clitic = CLITICS.iter().find(|&&c| c == tail);
    if clitic.is_none() && !tail.chars().all(is_chunk_punct) {
        return None;
    }
    let lower = core.to_ascii_lowercase();
    if CONTRACTION_WORDS.iter().any(|w| lower.contains(w)) {
        return None;
    }
    Some(
        usize::from(pytext::py_isupper(core))
            + clitic.map_or(0, |c| usize::from(pytext::py_isupper(c))),
    )
}

/// The number of `isupper` tokens of `text` (a sentence, or several) when every chunk
/// that may hold one is simple ([`simple_chunk_upper_count`]), else `None`.
fn local_upper_count(text: &str) -> Option<usize> {
    // Python's `split()` also splits at U+001C..U+001F, which the clitic rules do not
    // take for a space
    if text.bytes().any(|b| (0x1c..=0x1f).contains(&b)) {
        return None;
    }
    text.split(pytext::is_py_space)
        .filter(|c| may_have_upper_token(c))
        .map(simple_chunk_upper_count)
        .sum()
}

/// How many tokens of `nltk.word_tokenize(text)` are Python `str.isupper()`: read off the
/// chunks when they are simple ([`local_upper_count`]), else by tokenizing the sentences
/// that are not.
pub(crate) fn count_upper_tokens(text: &str) -> usize {
    if let Some(n) = local_upper_count(text) {
        return n;
    }
    sentences::sentences(text)
        .into_iter()
        .map(|s| {
            local_upper_count(s).unwrap_or_else(|| {
                sentence_tokens(s)
                    .iter()
                    .filter(|w| pytext::py_isupper(w))
                    .count()
            })
        })
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

    /// Texts for the differential tests: fragments that trigger every rule, mixed at
    /// random (seeded), plus every golden response and its sentences.
    fn test_texts() -> Vec<String> {
        use rand::{Rng, SeedableRng};
        #[rustfmt::skip]
        const PIECES: &[&str] = &[
            "a", "A", "The", "THE", "NASA", "In", "IN", "It", "iT", "word", "WORD", "x", " ",
            " ", " ", "  ", "\n", "\t", "\u{a0}", "\u{2003}", "\u{1c}", ".", ".", "..", "...",
            ",", ":", ";", "!", "?", "'", "''", "\"", "`", "``", "(", ")", "[", "]", "{", "}",
            "<", ">", "-", "--", "*", "@", "#", "$", "%", "&", "«", "»", "“", "”", "‘", "’",
            "„", "\u{2012}", "\u{2013}", "\u{2014}", "\u{2015}", "can", "CAN", "not", "NOT",
            "cannot", "CanNot", "CANnot", "gimme", "GIMme", "gonna", "GONna", "gotta", "GOTta",
            "lemme", "LEMme", "wanna", "WANna", "more'n", "d'ye", "D'Ye", "'tis", "'Tis",
            "'TIS", "'twas", "'TWas", "don't", "DON'T", "DOn't", "Xn't", "N'T", "n't", "'s",
            "'S", "'m", "'d", "'ll", "'LL", "'re", "'ve", "I'm", "3", "42", "3.5", "1,000", "Ⓐ",
            "Ǆ", "ǅ", "ß", "É", "é", "İ", "K", "ſ", "x²", "_", "e\u{301}", "Dr.", "dr.", "Mr.",
            "U.S.", "e.g.", "J.", "i.e.", "No.", "1.", "(a)", ". ", "? ", "! ", ".\n", ".\"",
            ".)", "Ok.", "OK", "So", "It", "i", "vs.", "etc.", "A.B.", "POCKET-SIZED", "A-b",
            "x-Y", "A--B", "TIME'S", "CITY's", "I'm", "I'M", "WE'LL", "YOU'Ve", "A'", "'A",
            "WANNA", "GONNA", "xCANNOTx", "“NASA”", "‘A’", "'TIS",
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // half of them with spaces between most pieces (many short chunks)
        let mut out: Vec<String> = (0..8000)
            .map(|i| {
                let n = rng.random_range(1..24);
                let mut t = String::new();
                for _ in 0..n {
                    t.push_str(PIECES[rng.random_range(0..PIECES.len())]);
                    if i % 2 == 0 && rng.random_bool(0.6) {
                        t.push(' ');
                    }
                }
                t
            })
            .collect();
        let oracle = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/oracle");
        for f in [
            "data/ifeval/input_response_data_gpt4_20231107_145030.jsonl",
            "data/ifbench/sample_output.jsonl",
        ] {
            let Ok(text) = std::fs::read_to_string(oracle.join(f)) else {
                continue;
            };
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line).expect("json");
                let r = v["response"].as_str().unwrap_or("");
                for variant in crate::loose::all_variants(r) {
                    out.extend(
                        sentences::sentences(&variant)
                            .into_iter()
                            .map(str::to_string),
                    );
                    out.push(variant);
                }
            }
        }
        out
    }

    #[test]
    fn guards_and_upper_shortcuts_change_nothing() {
        for t in test_texts() {
            let tokens = treebank_tokens_impl(&t, false);
            assert_eq!(treebank_tokens_impl(&t, true), tokens, "{t:?}");
            let upper = sentences::sentences(&t)
                .into_iter()
                .flat_map(|s| treebank_tokens_impl(s, false))
                .filter(|w| pytext::py_isupper(w))
                .count();
            assert_eq!(count_upper_tokens(&t), upper, "{t:?}");
            if !may_have_upper_token(&t) {
                assert!(
                    !tokens.iter().any(|w| pytext::py_isupper(w)),
                    "{t:?}: {tokens:?}"
                );
            }
        }
        assert!(may_have_upper_token("NASA"));
        assert!(may_have_upper_token("In't"));
        assert!(!may_have_upper_token("In the end, The cat."));
    }

    /// The Unicode facts the guards rely on, checked on every char with the `regex`
    /// crate in use: `\s` is `char::is_whitespace`, and the `(?i)` contraction letters
    /// (and the apostrophe) match nothing outside ASCII.
    #[test]
    fn unicode_facts_behind_the_guards() {
        let ws = Regex::new(r"^\s$").expect("regex");
        let letters = Regex::new(r"(?i)^[cantodyegimlrw']$").expect("regex");
        let mut buf = [0u8; 4];
        for c in (0..=0x10FFFF).filter_map(char::from_u32) {
            let s = c.encode_utf8(&mut buf);
            assert_eq!(ws.is_match(s), c.is_whitespace(), "{c:?}");
            assert!(c.is_ascii() || !letters.is_match(s), "{c:?}");
        }
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
