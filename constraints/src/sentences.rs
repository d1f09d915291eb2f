//! NLTK's Punkt sentence splitter with the real English parameters (`punkt_tab/english`,
//! embedded at build time from the PyPI wheel `llama-index-core==0.14.25`, hash-checked;
//! see `build.rs`): a line-for-line port of `nltk.tokenize.punkt.PunktSentenceTokenizer`
//! (nltk 3.10.4) `tokenize(text)` with `realign_boundaries=True`, which is what
//! `nltk.sent_tokenize(text)` and the reference IFEval `count_sentences` run.
//!
//! NLTK compiles its Punkt regular expressions with the third-party `regex` engine, whose
//! `\s` is the Unicode `White_Space` property and `\w` / `\d` are UTS #18 (the same as
//! Rust's `char::is_whitespace` and the `regex` crate). The look-ahead patterns are
//! implemented by hand. Offsets are byte offsets of `text`; results are sub-slices of it.
//!
//! Shared by the IFEval (`length_constraints:number_sentences`,
//! `change_case:capital_word_frequency` via [`crate::wordtok`]) and IFBench checkers.

use std::borrow::Cow;
use std::sync::LazyLock;

// hashbrown's default (foldhash) hasher: these tables are probed for every token
use hashbrown::{HashMap, HashSet};

use regex::Regex;

use crate::pytext;

const ABBREV_TYPES: &str =
    include_str!(concat!(env!("OUT_DIR"), "/punkt_english/abbrev_types.txt"));
const COLLOCATIONS: &str =
    include_str!(concat!(env!("OUT_DIR"), "/punkt_english/collocations.tab"));
const SENT_STARTERS: &str =
    include_str!(concat!(env!("OUT_DIR"), "/punkt_english/sent_starters.txt"));
const ORTHO_CONTEXT: &str =
    include_str!(concat!(env!("OUT_DIR"), "/punkt_english/ortho_context.tab"));

const ORTHO_BEG_UC: u32 = 1 << 1;
const ORTHO_MID_UC: u32 = 1 << 2;
const ORTHO_UNK_UC: u32 = 1 << 3;
const ORTHO_BEG_LC: u32 = 1 << 4;
const ORTHO_MID_LC: u32 = 1 << 5;
const ORTHO_UNK_LC: u32 = 1 << 6;
const ORTHO_UC: u32 = ORTHO_BEG_UC | ORTHO_MID_UC | ORTHO_UNK_UC;
const ORTHO_LC: u32 = ORTHO_BEG_LC | ORTHO_MID_LC | ORTHO_UNK_LC;

/// The Punkt model parameters (`PunktParameters`).
struct Params {
    abbrev_types: HashSet<String>,
    /// `"first\tsecond"` (tokens never contain whitespace, so the tab is unambiguous).
    collocations: HashSet<String>,
    /// The first types of [`Params::collocations`] (most types have no collocation).
    collocation_firsts: HashSet<String>,
    sent_starters: HashSet<String>,
    ortho_context: HashMap<String, u32>,
}

/// `TabDecoder` line semantics: every line with its final `\n` removed.
fn lines(s: &str) -> impl Iterator<Item = &str> {
    s.split_inclusive('\n')
        .map(|l| l.strip_suffix('\n').unwrap_or(l))
}

static ENGLISH: LazyLock<Params> = LazyLock::new(|| Params {
    abbrev_types: lines(ABBREV_TYPES).map(str::to_string).collect(),
    collocations: lines(COLLOCATIONS).map(str::to_string).collect(),
    collocation_firsts: lines(COLLOCATIONS)
        .filter_map(|l| Some(l.split_once('\t')?.0.to_string()))
        .collect(),
    sent_starters: lines(SENT_STARTERS).map(str::to_string).collect(),
    ortho_context: lines(ORTHO_CONTEXT)
        .filter_map(|l| {
            let (k, v) = l.split_once('\t')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect(),
});

static RE_NUMERIC: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^-?[.,]?\d[\d,.\-]*\.?$").expect("static regex"));
static RE_SENT_END: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"[.?!]").expect("static regex"));
static RE_WORD_NON_DIGIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[\w&&\D]$").expect("static regex"));

/// `regex`-module `\s` (Unicode `White_Space`).
#[inline]
fn is_ws(c: char) -> bool {
    c.is_whitespace()
}

/// `_re_non_word_chars`: characters that cannot appear within words.
#[inline]
fn is_non_word(c: char) -> bool {
    matches!(
        c,
        ')' | '"'
            | ';'
            | '}'
            | ']'
            | '*'
            | ':'
            | '@'
            | '\''
            | '('
            | '{'
            | '['
            | '\u{2018}'
            | '\u{2019}'
            | '\u{201c}'
            | '\u{201d}'
            | '\u{ab}'
            | '\u{bb}'
            | '?'
            | '!'
    )
}

/// Characters `_re_word_start` excludes from starting a word token.
#[inline]
fn is_not_word_start(c: char) -> bool {
    matches!(
        c,
        '(' | '"'
            | '`'
            | '{'
            | '['
            | ':'
            | ';'
            | '&'
            | '#'
            | '*'
            | '@'
            | ')'
            | '}'
            | ']'
            | '-'
            | ','
    )
}

#[inline]
fn char_at(s: &str, i: usize) -> Option<char> {
    s.get(i..).and_then(|t| t.chars().next())
}

/// Length in bytes of `_re_multi_char_punct` (`-{2,}|\.{2,}|(?:\.\s){2,}\.`) matched at
/// `i`, if any.
fn multi_char_at(s: &str, i: usize) -> Option<usize> {
    let b = s.as_bytes();
    let rest = b.get(i..)?;
    if !matches!(rest.first(), Some(b'-' | b'.')) {
        return None;
    }
    if rest.starts_with(b"--") {
        return Some(rest.iter().take_while(|&&c| c == b'-').count());
    }
    if rest.starts_with(b"..") {
        return Some(rest.iter().take_while(|&&c| c == b'.').count());
    }
    // (?:\.\s){2,}\. with backtracking: k = number of (".", space) pairs
    let mut pos = i;
    let mut ends = Vec::new(); // end offset of each pair
    while char_at(s, pos) == Some('.') {
        match char_at(s, pos + 1) {
            Some(c) if is_ws(c) => {
                pos += 1 + c.len_utf8();
                ends.push(pos);
            }
            _ => break,
        }
    }
    let k = ends.len();
    if k >= 2 && char_at(s, pos) == Some('.') {
        return Some(pos + 1 - i);
    }
    if k >= 3 {
        // k-1 pairs, then the '.' that starts the k-th pair
        return Some(ends[k - 2] + 1 - i);
    }
    None
}

/// The word-end look-ahead of `_word_tokenize_fmt` at `e`.
fn word_ends_at(s: &str, e: usize) -> bool {
    let Some(c) = char_at(s, e) else {
        return true;
    };
    if is_ws(c) || is_non_word(c) || multi_char_at(s, e).is_some() {
        return true;
    }
    if c == ',' {
        return match char_at(s, e + 1) {
            None => true,
            Some(d) => is_ws(d) || is_non_word(d) || multi_char_at(s, e + 1).is_some(),
        };
    }
    false
}

/// `PunktLanguageVars.word_tokenize` (findall of `_word_tokenize_fmt`) on one line.
fn punkt_word_tokens(line: &str) -> impl Iterator<Item = &str> {
    let mut i = 0;
    std::iter::from_fn(move || loop {
        let c = char_at(line, i)?;
        let start = i;
        if let Some(n) = multi_char_at(line, i) {
            i += n;
            return Some(&line[start..i]);
        }
        if is_ws(c) {
            i += c.len_utf8();
            continue;
        }
        i += c.len_utf8();
        if !is_not_word_start(c) {
            // the look-ahead fails only on a non-space character
            while !word_ends_at(line, i) {
                i += char_at(line, i).map_or(1, char::len_utf8);
            }
        }
        return Some(&line[start..i]);
    })
}

/// Python `s.lower()` (Rust's `to_lowercase`), borrowing `s` when nothing changes.
fn lower(s: &str) -> Cow<'_, str> {
    if !s.is_ascii() {
        Cow::Owned(s.to_lowercase())
    } else if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// `_re_numeric`: every match has a `\d` (only ASCII digits in an ASCII string).
fn is_numeric_type(s: &str) -> bool {
    (!s.is_ascii() || s.bytes().any(|b| b.is_ascii_digit())) && RE_NUMERIC.is_match(s)
}

/// A `PunktToken` with its first- and second-pass annotations.
struct Token<'a> {
    tok: &'a str,
    typ: Cow<'a, str>,
    period_final: bool,
    sentbreak: bool,
    abbr: bool,
    ellipsis: bool,
}

impl<'a> Token<'a> {
    fn new(tok: &'a str) -> Self {
        let lower = lower(tok);
        let typ = if is_numeric_type(&lower) {
            Cow::Borrowed("##number##")
        } else {
            lower
        };
        let period_final = tok.ends_with('.');
        Self {
            tok,
            typ,
            period_final,
            sentbreak: false,
            abbr: false,
            ellipsis: false,
        }
    }

    fn type_no_period(&self) -> &str {
        if self.typ.chars().count() > 1 && self.typ.ends_with('.') {
            &self.typ[..self.typ.len() - 1]
        } else {
            &self.typ
        }
    }

    fn type_no_sentperiod(&self) -> &str {
        if self.sentbreak {
            self.type_no_period()
        } else {
            &self.typ
        }
    }

    fn first_char(&self) -> &str {
        let n = self.tok.chars().next().map_or(0, char::len_utf8);
        &self.tok[..n]
    }

    fn first_upper(&self) -> bool {
        pytext::py_isupper(self.first_char())
    }

    fn first_lower(&self) -> bool {
        pytext::py_islower(self.first_char())
    }

    fn is_ellipsis(&self) -> bool {
        self.tok.len() >= 2 && self.tok.bytes().all(|b| b == b'.')
    }

    fn is_initial(&self) -> bool {
        let mut cs = self.tok.chars();
        match (cs.next(), cs.next(), cs.next()) {
            (Some(c), Some('.'), None) => {
                let mut buf = [0u8; 4];
                RE_WORD_NON_DIGIT.is_match(c.encode_utf8(&mut buf))
            }
            _ => false,
        }
    }
}

#[derive(PartialEq, Eq)]
enum Ortho {
    True,
    False,
    Unknown,
}

impl Params {
    fn ortho(&self, typ: &str) -> u32 {
        self.ortho_context.get(typ).copied().unwrap_or(0)
    }

    fn first_pass(&self, t: &mut Token<'_>) {
        let tok = t.tok;
        if tok == "." || tok == "?" || tok == "!" {
            t.sentbreak = true;
        } else if t.is_ellipsis() {
            t.ellipsis = true;
        } else if t.period_final && !tok.ends_with("..") {
            let stem = lower(&tok[..tok.len() - 1]);
            let last = stem.rsplit('-').next().unwrap_or("");
            if self.abbrev_types.contains(stem.as_ref()) || self.abbrev_types.contains(last) {
                t.abbr = true;
            } else {
                t.sentbreak = true;
            }
        }
    }

    fn ortho_heuristic(&self, t: &Token<'_>) -> Ortho {
        if matches!(t.tok, ";" | ":" | "," | "." | "!" | "?") {
            return Ortho::False;
        }
        let ctx = self.ortho(t.type_no_sentperiod());
        if t.first_upper() && ctx & ORTHO_LC != 0 && ctx & ORTHO_MID_UC == 0 {
            return Ortho::True;
        }
        if t.first_lower() && (ctx & ORTHO_UC != 0 || ctx & ORTHO_BEG_LC == 0) {
            return Ortho::False;
        }
        Ortho::Unknown
    }

    fn second_pass(&self, t1: &mut Token<'_>, t2: &Token<'_>) {
        if !t1.period_final {
            return;
        }
        let typ = t1.type_no_period();
        let next_typ = t2.type_no_sentperiod();
        let initial = t1.is_initial();
        let number = typ == "##number##";
        if self.collocation_firsts.contains(typ)
            && self.collocations.contains(&format!("{typ}\t{next_typ}"))
        {
            t1.sentbreak = false;
            t1.abbr = true;
            return;
        }
        if (t1.abbr || t1.ellipsis) && !initial {
            if self.ortho_heuristic(t2) == Ortho::True {
                t1.sentbreak = true;
                return;
            }
            if t2.first_upper() && self.sent_starters.contains(next_typ) {
                t1.sentbreak = true;
                return;
            }
        }
        if initial || number {
            let h = self.ortho_heuristic(t2);
            if h == Ortho::False {
                t1.sentbreak = false;
                t1.abbr = true;
                return;
            }
            if h == Ortho::Unknown
                && initial
                && t2.first_upper()
                && self.ortho(next_typ) & ORTHO_LC == 0
            {
                t1.sentbreak = false;
                t1.abbr = true;
            }
        }
    }

    /// `text_contains_sentbreak`: some token other than the last is a sentence break.
    fn contains_sentbreak(&self, text: &str) -> bool {
        let raw = text
            .split('\n')
            .filter(|line| !pytext::is_blank(line))
            .flat_map(punkt_word_tokens);
        // tokens are annotated one at a time: the second pass of a token only needs the
        // first pass of the next one, and the first break before the last token decides
        let mut prev: Option<Token<'_>> = None;
        for tok in raw {
            let mut t = Token::new(tok);
            self.first_pass(&mut t);
            if let Some(mut p) = prev.take() {
                self.second_pass(&mut p, &t);
                if p.sentbreak {
                    return true;
                }
            }
            prev = Some(t);
        }
        false
    }
}

/// One match of `period_context_re`: the sentence-end character at `start`, the
/// look-ahead `after_tok` ending at `after_end`, and `next_tok`'s start if present.
struct PeriodMatch {
    start: usize,
    after_end: usize,
    next_tok: Option<usize>,
}

impl PeriodMatch {
    fn end(&self) -> usize {
        self.start + 1
    }
}

fn period_contexts(text: &str) -> Vec<PeriodMatch> {
    let mut out = Vec::new();
    // the sentence-end characters, found by the `regex` crate's vectorised byte search
    for p in RE_SENT_END.find_iter(text).map(|m| m.start()) {
        let q = p + 1;
        let Some(d) = char_at(text, q) else { continue };
        if is_non_word(d) {
            out.push(PeriodMatch {
                start: p,
                after_end: q + d.len_utf8(),
                next_tok: None,
            });
        } else if is_ws(d) {
            let r = text[q..]
                .char_indices()
                .find(|&(_, c)| !is_ws(c))
                .map(|(i, _)| q + i);
            if let Some(r) = r {
                let s = text[r..]
                    .char_indices()
                    .find(|&(_, c)| is_ws(c))
                    .map_or(text.len(), |(i, _)| r + i);
                out.push(PeriodMatch {
                    start: p,
                    after_end: s,
                    next_tok: Some(r),
                });
            }
        }
    }
    out
}

/// `_get_last_whitespace_index`: last index of an ASCII whitespace char, else 0.
fn last_ws_index(s: &str) -> usize {
    s.bytes()
        .rposition(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c'))
        .unwrap_or(0)
}

/// `_slices_from_text`.
fn slices(p: &Params, text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut last_break = 0;
    let mut decide = |m: &PeriodMatch, prev: (usize, usize), last_break: &mut usize| {
        // the previous word and the match context, adjacent (`prev` is the word that
        // ends where `m` starts)
        let context = text.get(prev.0..m.after_end).unwrap_or("");
        if p.contains_sentbreak(context) {
            out.push((*last_break, m.end()));
            *last_break = m.next_tok.unwrap_or(m.end());
        }
    };
    let mut prev_slice = (0usize, 0usize);
    let mut prev_match: Option<PeriodMatch> = None;
    for m in period_contexts(text) {
        let before = text.get(prev_slice.1..m.start).unwrap_or("");
        let mut idx = last_ws_index(before);
        if idx != 0 {
            idx += prev_slice.1 + 1;
        } else {
            idx = prev_slice.0;
        }
        let word = (idx, m.start);
        if let Some(pm) = &prev_match {
            if prev_slice.1 <= word.0 {
                decide(pm, prev_slice, &mut last_break);
            }
        }
        prev_match = Some(m);
        prev_slice = word;
    }
    if let Some(pm) = &prev_match {
        decide(pm, prev_slice, &mut last_break);
    }
    out.push((last_break, text.trim_end_matches(pytext::is_py_space).len()));
    out
}

/// Closing punctuation of `re_boundary_realignment`.
fn is_closer(c: char) -> bool {
    matches!(
        c,
        '"' | '\''
            | ')'
            | ']'
            | '}'
            | '\u{2018}'
            | '\u{2019}'
            | '\u{201c}'
            | '\u{201d}'
            | '\u{ab}'
            | '\u{bb}'
    )
}

/// `re_boundary_realignment.match(s)`: (length of the closing run, match end).
fn realignment(s: &str) -> Option<(usize, usize)> {
    let run: usize = s
        .chars()
        .take_while(|&c| is_closer(c))
        .map(char::len_utf8)
        .sum();
    if run == 0 {
        return None;
    }
    let rest = &s[run..];
    match rest.chars().next() {
        None => Some((run, run)),
        Some(c) if is_ws(c) => {
            let ws: usize = rest
                .chars()
                .take_while(|&c| is_ws(c))
                .map(char::len_utf8)
                .sum();
            Some((run, run + ws))
        }
        Some(_) if rest.starts_with("--") => Some((run, run)),
        _ => None,
    }
}

/// `_realign_boundaries`.
fn realign(text: &str, slices: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut shift = 0;
    for (i, &(s1, e1)) in slices.iter().enumerate() {
        let s1 = s1 + shift;
        let nonempty = s1 < e1;
        let Some(&(s2, e2)) = slices.get(i + 1) else {
            if nonempty {
                out.push((s1, e1));
            }
            continue;
        };
        let second = text.get(s2..e2.max(s2)).unwrap_or("");
        if let Some((run, end)) = realignment(second) {
            out.push((s1, s2 + run));
            shift = end;
        } else {
            shift = 0;
            if nonempty {
                out.push((s1, e1));
            }
        }
    }
    out
}

/// Byte spans of the sentences of `text` (`PunktSentenceTokenizer.span_tokenize`).
pub(crate) fn sentence_spans(text: &str) -> Vec<(usize, usize)> {
    let p = &*ENGLISH;
    realign(text, &slices(p, text))
}

/// The sentences of `text` (`nltk.sent_tokenize(text)`).
pub(crate) fn sentences(text: &str) -> Vec<&str> {
    sentence_spans(text)
        .into_iter()
        .map(|(s, e)| text.get(s..e).unwrap_or(""))
        .collect()
}

/// The number of sentences (reference `instructions_util.count_sentences`).
pub(crate) fn count_sentences(text: &str) -> usize {
    sentence_spans(text).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_loaded() {
        let p = &*ENGLISH;
        assert!(p.abbrev_types.contains("dr"));
        assert!(p.abbrev_types.len() > 100);
        assert!(!p.sent_starters.is_empty());
        assert!(p.ortho_context.len() > 10_000);
        assert!(!p.collocations.is_empty());
    }

    #[test]
    fn nltk_doctest() {
        let text = "Punkt knows that the periods in Mr. Smith and Johann S. Bach\n\
                    do not mark sentence boundaries.  And sometimes sentences\n\
                    can start with non-capitalized words.  i is a good variable\n\
                    name.";
        assert_eq!(
            sentences(text),
            [
                "Punkt knows that the periods in Mr. Smith and Johann S. Bach\n\
                 do not mark sentence boundaries.",
                "And sometimes sentences\ncan start with non-capitalized words.",
                "i is a good variable\nname."
            ]
        );
        let text = "(How does it deal with this parenthesis?)  \"It should be part of the\n\
                    previous sentence.\" \"(And the same with this one.)\" ('And this one!')\n\
                    \"('(And (this)) '?)\" [(and this. )]";
        assert_eq!(
            sentences(text),
            [
                "(How does it deal with this parenthesis?)",
                "\"It should be part of the\nprevious sentence.\"",
                "\"(And the same with this one.)\"",
                "('And this one!')",
                "\"('(And (this)) '?)\"",
                "[(and this. )]"
            ]
        );
    }

    #[test]
    fn edge_cases() {
        assert_eq!(count_sentences(""), 0);
        assert_eq!(count_sentences("   "), 0);
        assert_eq!(count_sentences("."), 1);
        assert_eq!(count_sentences("Hello world"), 1);
        assert_eq!(count_sentences("One. Two. Three."), 3);
    }
}
