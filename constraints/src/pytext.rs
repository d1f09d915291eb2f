//! Python text semantics the reference checkers rely on, re-implemented in Rust:
//! `str.strip()` / `str.isspace()`, `re` Unicode `\s` / `\w` / `\b`, nltk's word count, `str.isupper()` /
//! `str.islower()`, `repr()` of strings and lists (used in instruction texts), and the
//! reference's habit of using user-provided words as regular-expression patterns.
//!
//! Unicode tables are those of Rust's `std` and the `regex` crate; they may differ from
//! Python 3.11's Unicode database for characters assigned in recent Unicode versions.

use std::sync::{Arc, LazyLock};

use regex::Regex;

/// Regex character class equal to Python's `re` Unicode `\s` (= `str.isspace()`): the
/// Unicode `White_Space` property plus U+001C..U+001F, which Python also counts as space.
pub(crate) const PY_SPACE: &str = r"[\s\x1C-\x1F]";

/// Regex character class equal to Python's `re` Unicode `\w`: `str.isalnum()` (letters
/// `L*` and numeric characters `N*`) or `_`. (The `regex` crate's `\w` differs: it also
/// contains combining marks, all connector punctuation and joiners.)
pub(crate) const PY_WORD: &str = r"[\p{L}\p{N}_]";

/// Python `str.isspace()` for one character.
#[inline]
pub(crate) fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python `str.strip()` (no argument).
#[inline]
pub(crate) fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// `not s.strip()` in Python: empty or only whitespace.
#[inline]
pub(crate) fn is_blank(s: &str) -> bool {
    s.chars().all(is_py_space)
}

static WORD_CHAR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^{PY_WORD}$")).expect("static regex"));
/// `\w+` with the `regex` crate's Unicode `\w` (Alphabetic, marks, decimal digits,
/// connector punctuation, joiners). This is deliberately *not* [`PY_WORD`]: the
/// reference `count_words` uses nltk's `RegexpTokenizer`, which (nltk >= 3.9.3, via
/// `nltk.redos`) compiles with the third-party Python `regex` engine, whose `\w` has
/// exactly these UTS #18 semantics (e.g. `x²` is one word `x`, `½` none, `e\u{301}` one).
#[cfg(test)]
static WORDS: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\w+").expect("static regex"));

/// Whether `c` matches Python's `re` Unicode `\w`.
pub(crate) fn is_py_word_char(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    let mut buf = [0u8; 4];
    WORD_CHAR.is_match(c.encode_utf8(&mut buf))
}

/// Whether `c` is in the `regex` crate's Unicode `\w` (the class of [`WORDS`]).
#[inline]
fn is_regex_word_char(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphanumeric() || c == '_'
    } else {
        regex_syntax::is_word_character(c)
    }
}

/// The matches of [`WORDS`] (`\w+`: maximal runs of word characters), by a hand-written
/// scanner.
pub(crate) fn word_runs(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = s;
    std::iter::from_fn(move || {
        let start = rest.find(is_regex_word_char)?;
        let tail = &rest[start..];
        let len = tail
            .find(|c: char| !is_regex_word_char(c))
            .unwrap_or(tail.len());
        let (word, after) = tail.split_at(len);
        rest = after;
        Some(word)
    })
}

/// Number of `\w+` tokens (the reference `count_words`, nltk `RegexpTokenizer(r"\w+")`;
/// see [`WORDS`] for which `\w`).
pub(crate) fn count_words(s: &str) -> usize {
    // the number of word runs = the number of word characters not preceded by one,
    // scanned byte by byte on ASCII (what [`word_runs`] finds; a test compares them)
    const ASCII_WORD: [bool; 128] = {
        let mut t = [false; 128];
        let mut c = 0;
        while c < 128 {
            let b = c as u8;
            t[c] = b.is_ascii_alphanumeric() || b == b'_';
            c += 1;
        }
        t
    };
    let b = s.as_bytes();
    let mut n = 0;
    let mut in_word = false;
    let mut i = 0;
    while i < b.len() {
        let (word, len) = if b[i] < 0x80 {
            (ASCII_WORD[usize::from(b[i])], 1)
        } else {
            s[i..]
                .chars()
                .next()
                .map_or((false, 1), |c| (is_regex_word_char(c), c.len_utf8()))
        };
        n += usize::from(word && !in_word);
        in_word = word;
        i += len;
    }
    n
}

/// Python's `\b` at byte offset `pos` of `s` (which must be a char boundary).
pub(crate) fn is_py_word_boundary(s: &str, pos: usize) -> bool {
    if s.is_empty() {
        return false;
    }
    let before = s[..pos].chars().next_back().is_some_and(is_py_word_char);
    let after = s[pos..].chars().next().is_some_and(is_py_word_char);
    before != after
}

/// Titlecase letters (general category `Lt`); Python's `isupper`/`islower` reject them.
fn is_titlecase(c: char) -> bool {
    matches!(c as u32,
        0x01C5 | 0x01C8 | 0x01CB | 0x01F2 | 0x1F88..=0x1F8F | 0x1F98..=0x1F9F
        | 0x1FA8..=0x1FAF | 0x1FBC | 0x1FCC | 0x1FFC)
}

/// Python `str.isupper()`: at least one cased character and no lowercase or titlecase one.
pub(crate) fn py_isupper(s: &str) -> bool {
    let mut cased = false;
    for c in s.chars() {
        if c.is_lowercase() || is_titlecase(c) {
            return false;
        }
        cased |= c.is_uppercase();
    }
    cased
}

/// Python `str.islower()`: at least one cased character and no uppercase or titlecase one.
pub(crate) fn py_islower(s: &str) -> bool {
    let mut cased = false;
    for c in s.chars() {
        if c.is_uppercase() || is_titlecase(c) {
            return false;
        }
        cased |= c.is_lowercase();
    }
    cased
}

/// Approximation of Python's `str.isprintable()` for one character: false for control,
/// format, separator (other than ASCII space), private-use and non-characters. Unassigned
/// code points (also non-printable in Python) are not detected.
fn is_py_printable(c: char) -> bool {
    !matches!(c as u32,
        0x00..=0x1F | 0x7F..=0xA0 | 0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F
        | 0x890..=0x891 | 0x8E2 | 0x1680 | 0x180E | 0x2000..=0x200F | 0x2028..=0x202F
        | 0x205F..=0x2064 | 0x2066..=0x206F | 0x3000 | 0xD800..=0xF8FF | 0xFDD0..=0xFDEF
        | 0xFEFF | 0xFFF9..=0xFFFB | 0xFFFE..=0xFFFF | 0x110BD | 0x110CD
        | 0x13430..=0x1343F | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0001
        | 0xE0020..=0xE007F | 0xF0000..=0x10FFFF)
}

/// Python `repr(s)` of a string.
pub(crate) fn py_repr_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if is_py_printable(c) => out.push(c),
            c => {
                let n = c as u32;
                if n < 0x100 {
                    out.push_str(&format!("\\x{n:02x}"));
                } else if n < 0x10000 {
                    out.push_str(&format!("\\u{n:04x}"));
                } else {
                    out.push_str(&format!("\\U{n:08x}"));
                }
            }
        }
    }
    out.push(quote);
    out
}

/// Python `repr(list_of_str)` / `str(list_of_str)`, e.g. `['a', 'b']`.
pub(crate) fn py_repr_str_list<S: AsRef<str>>(items: &[S]) -> String {
    let parts: Vec<String> = items.iter().map(|s| py_repr_str(s.as_ref())).collect();
    format!("[{}]", parts.join(", "))
}

/// Characters that make a Python pattern more than a literal string.
const PY_METACHARS: &[char] = &[
    '.', '^', '$', '*', '+', '?', '{', '}', '[', ']', '\\', '|', '(', ')',
];

/// Whether the reference, which passes `p` to `re` as a pattern, matches it literally.
pub(crate) fn is_literal_pattern(p: &str) -> bool {
    !p.contains(PY_METACHARS)
}

/// Translate a pattern the reference hands to Python's `re` into `regex` crate syntax:
/// a literal pattern is escaped (so e.g. `-`, `#`, `&`, `~` stay literal); anything else
/// is used as is, i.e. with `regex` crate syntax and semantics, which agree with Python
/// for the common constructs (`.`, classes, alternation, repetition). Python-only syntax
/// (look-around, back-references) fails to compile and is reported at build time.
pub(crate) fn py_pattern_to_rust(p: &str) -> String {
    if is_literal_pattern(p) {
        regex::escape(p)
    } else {
        p.to_string()
    }
}

/// Compiled patterns, like Python's `re` module cache: constraints are rebuilt for every
/// response (the same prompt's kwargs recur), and compiling a case-insensitive Unicode
/// pattern costs far more than matching it. Bounded; cleared when full.
static COMPILED: LazyLock<std::sync::Mutex<std::collections::HashMap<String, Arc<Regex>>>> =
    LazyLock::new(Default::default);
const COMPILED_MAX: usize = 4096;

/// Compile a pattern built by [`py_pattern_to_rust`], with a readable error (cached).
pub(crate) fn compile(pattern: &str) -> Result<Arc<Regex>, String> {
    if let Some(re) = COMPILED.lock().ok().and_then(|c| c.get(pattern).cloned()) {
        return Ok(re);
    }
    let re = regex::RegexBuilder::new(pattern)
        .size_limit(1 << 22)
        .build()
        .map_err(|e| format!("not a usable regular expression: {e}"))?;
    // shared, not cloned: a `Regex` clone starts with an empty search-cache pool, which
    // every constraint built from it would have to refill
    let re = Arc::new(re);
    if let Ok(mut c) = COMPILED.lock() {
        if c.len() >= COMPILED_MAX {
            c.clear();
        }
        c.insert(pattern.to_string(), re.clone());
    }
    Ok(re)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_and_space() {
        assert_eq!(py_strip("\u{1c} a b\u{a0}\u{3000}\n"), "a b");
        assert!(is_blank(" \t\n\u{1f}"));
        assert!(!is_blank(" x "));
        assert!(is_blank(""));
    }

    #[test]
    fn words() {
        assert_eq!(count_words("Hello, world! it's 3.14 a_b"), 7);
        // nltk tokenizes with the `regex` engine: marks and joiners are word characters,
        // superscripts and fractions are not
        assert_eq!(count_words("ne\u{301}e"), 1);
        assert_eq!(count_words("x² ½ a\u{200d}b"), 2);
        assert_eq!(count_words(""), 0);
        // the scanner finds exactly the regex's matches
        let alphabet: Vec<char> = "aZ_09 .,'\u{301}\u{200d}\u{200c}²½éß中\u{2003}‿-😀ǅ\n"
            .chars()
            .collect();
        let mut x: u64 = 1;
        for len in 0..400 {
            let t: String = (0..len)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    alphabet[(x >> 33) as usize % alphabet.len()]
                })
                .collect();
            let re: Vec<&str> = WORDS.find_iter(&t).map(|m| m.as_str()).collect();
            assert_eq!(word_runs(&t).collect::<Vec<_>>(), re, "{t:?}");
            assert_eq!(count_words(&t), re.len(), "{t:?}");
        }
        assert!(is_py_word_boundary("ab cd", 2));
        assert!(!is_py_word_boundary("abcd", 2));
        assert!(is_py_word_boundary("ab", 0));
        assert!(is_py_word_boundary("ab", 2));
        assert!(!is_py_word_boundary("", 0));
    }

    #[test]
    fn case() {
        assert!(py_isupper("HELLO, WORLD 1"));
        assert!(!py_isupper("HELLo"));
        assert!(!py_isupper("123"));
        assert!(py_islower("hello 1."));
        assert!(!py_islower("hello ǅ"));
        assert!(!py_islower("*"));
        assert!(py_islower("ß"));
    }

    #[test]
    fn repr() {
        assert_eq!(py_repr_str_list(&["a", "b"]), "['a', 'b']");
        assert_eq!(py_repr_str("it's"), "\"it's\"");
        assert_eq!(py_repr_str("a'\"b"), "'a\\'\"b'");
        assert_eq!(py_repr_str("a\nb\\"), "'a\\nb\\\\'");
        assert_eq!(py_repr_str("\u{7}\u{a0}\u{200b}é"), "'\\x07\\xa0\\u200bé'");
        assert_eq!(py_repr_str_list::<&str>(&[]), "[]");
    }

    #[test]
    fn patterns() {
        assert!(is_literal_pattern("t-shirt #1"));
        assert!(!is_literal_pattern("a.b"));
        assert_eq!(py_pattern_to_rust("t-shirt"), r"t\-shirt");
        assert_eq!(py_pattern_to_rust("colou?r"), "colou?r");
        assert!(compile("(?=x)").is_err());
    }
}
