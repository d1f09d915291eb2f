//! IFBench `words:*` ids that need no tokenizer: alphabet loop, three vowels, consonant
//! clusters, palindromes, prime word lengths, limited repeats, alternating syllable
//! parity (syllapy), last word = next first word, paragraph first = last word, and no
//! consecutive first letters.

use hashbrown::{HashMap, HashSet};

use super::split::split_into_sentences;
use super::util::{self, py_len, py_lower, py_split, remove_punct, strip_punct_space, PyNum};
use super::{data, fixed_entry, num_entry};
use crate::pytext::py_strip;

// ---- words:alphabet ----

fixed_entry!(
    ALPHABET,
    "words:alphabet",
    "Each word must start with the next letter of the alphabet, looping back to 'A' after 'Z'.",
    alphabet
);

fn alphabet(value: &str) -> bool {
    let value = remove_punct(value);
    let mut words = py_split(strip_punct_space(&value));
    let Some(first) = words.next() else {
        return false;
    };
    let first_lower = first
        .chars()
        .next()
        .map(util::char_lower)
        .unwrap_or_default();
    let mut letter = match first_lower.as_bytes() {
        [b @ b'a'..=b'z'] => *b,
        _ => return false, // numbers (and anything else) fail
    };
    for word in words {
        let word = py_lower(strip_punct_space(word));
        let Some(c) = word.chars().next() else {
            continue;
        };
        letter = if letter == b'z' { b'a' } else { letter + 1 };
        if c != letter as char {
            return false;
        }
    }
    true
}

// ---- words:vowel ----

fixed_entry!(
    VOWEL,
    "words:vowel",
    "Write a paragraph using words that contain only three types of vowels.",
    vowel
);

fn vowel(value: &str) -> bool {
    let stripped = py_strip(value);
    if stripped.contains('\n') {
        return false;
    }
    let lower = py_lower(stripped);
    let used: HashSet<char> = lower.chars().filter(|c| "aeiou".contains(*c)).collect();
    used.len() <= 3
}

// ---- words:consonants ----

fixed_entry!(
    CONSONANTS,
    "words:consonants",
    "Ensure each word in your response has at least one consonant cluster (two or more consonants together).",
    consonants
);

fn is_consonant(c: char) -> bool {
    "bcdfghjklmnpqrstvwxyz".contains(c)
}

fn consonants(value: &str) -> bool {
    let lower = py_lower(value);
    let ok = py_split(py_strip(&lower)).all(|word| {
        let chars: Vec<char> = word.chars().collect();
        chars
            .windows(2)
            .any(|w| is_consonant(w[0]) && is_consonant(w[1]))
    });
    ok
}

// ---- words:palindrome ----

fixed_entry!(
    PALINDROME,
    "words:palindrome",
    "Include at least 10 single-word palindromes, each at least 5 characters long.",
    palindrome
);

fn palindrome(value: &str) -> bool {
    let text = py_lower(&remove_punct(value));
    let count = py_split(&text)
        .filter(|w| py_len(w) >= 5 && w.chars().eq(w.chars().rev()))
        .count();
    count >= 10
}

// ---- words:prime_lengths ----

fixed_entry!(
    PRIME_LENGTHS,
    "words:prime_lengths",
    "Use only words with lengths that are prime numbers.",
    prime_lengths
);

fn prime_lengths(value: &str) -> bool {
    const PRIMES: [usize; 25] = [
        2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89,
        97,
    ];
    let text = remove_punct(value);
    let ok = py_split(&text).all(|w| PRIMES.contains(&py_len(w)));
    ok
}

// ---- words:repeats ----

num_entry!(
    REPEATS,
    "words:repeats",
    "small_n",
    0.0,
    |n| format!(
        "The response should not repeat any word more than {} times.",
        n.py_str()
    ),
    repeats
);

fn repeats(value: &str, n: PyNum) -> bool {
    let text = remove_punct(&py_lower(value));
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in py_split(&text) {
        *counts.entry(w).or_default() += 1;
    }
    counts.values().all(|&c| (c as f64) <= n.as_f64())
}

// ---- words:odd_even_syllables ----

fixed_entry!(
    ODD_EVEN_SYLLABLES,
    "words:odd_even_syllables",
    "Alternate between words with odd and even numbers of syllables.",
    odd_even_syllables
);

fn odd_even_syllables(value: &str) -> bool {
    let text = py_lower(&remove_punct(value));
    // `all` over adjacent pairs: stop at the first pair of equal parities
    let mut prev: Option<usize> = None;
    for w in py_split(&text) {
        let p = syllable_count(w) % 2;
        if prev == Some(p) {
            return false;
        }
        prev = Some(p);
    }
    true
}

/// `syllapy.count(word)` (syllapy 0.8.0): dictionary look-up, hyphenated compounds,
/// then a vowel-group heuristic; 0 for words with digits or nothing left after stripping.
pub(crate) fn syllable_count(word: &str) -> usize {
    let lowered = py_lower(py_strip(word));
    let word = lowered.trim_matches(util::is_punct);
    if word.is_empty() || word.chars().any(|c| util::decimal_value(c).is_some()) {
        return 0;
    }
    if let Some(n) = data::syllables(word) {
        return n;
    }
    // re.match("([^-]+)-(.+)", word): prefix up to the first '-', non-empty both sides
    if let Some(dash) = word.find('-') {
        let (head, tail) = (&word[..dash], &word[dash + 1..]);
        if dash > 0 && !tail.is_empty() {
            let (a, b) = (syllable_count(head), syllable_count(tail));
            return if a == 0 || b == 0 { 0 } else { a + b };
        }
    }
    heuristic_syllables(word)
}

fn heuristic_syllables(word: &str) -> usize {
    let is_vowel = |c: char| "aeiouy".contains(c);
    let chars: Vec<char> = word.chars().collect();
    let mut count: i64 = 0;
    if chars.first().is_some_and(|&c| is_vowel(c)) {
        count += 1;
    }
    for i in 1..chars.len() {
        if is_vowel(chars[i]) && !is_vowel(chars[i - 1]) {
            count += 1;
        }
    }
    if word.ends_with('e') {
        count -= 1;
    }
    if word.ends_with("le") && chars.len() > 2 && !is_vowel(chars[chars.len() - 3]) {
        count += 1;
    }
    if count == 0 {
        count += 1;
    }
    count.max(0) as usize
}

// ---- words:last_first ----

fixed_entry!(
    LAST_FIRST,
    "words:last_first",
    "The last word of each sentence must become the first word of the next sentence.",
    last_first
);

fn last_first(value: &str) -> bool {
    let sentences = split_into_sentences(value);
    sentences.windows(2).all(|pair| {
        let last =
            py_split(pair[0].trim_end_matches(|c: char| util::is_punct(c) || c == ' ')).next_back();
        let first =
            py_split(pair[1].trim_start_matches(|c: char| util::is_punct(c) || c == ' ')).next();
        match (last, first) {
            (Some(l), Some(f)) => py_lower(l) == py_lower(f),
            _ => false, // the reference raises IndexError
        }
    })
}

// ---- words:paragraph_last_first ----

fixed_entry!(
    PARAGRAPH_LAST_FIRST,
    "words:paragraph_last_first",
    "Each paragraph must end with the same word it started with, separate paragraphs with a newline.",
    paragraph_last_first
);

fn paragraph_last_first(value: &str) -> bool {
    value.split('\n').all(|p| {
        let p = py_lower(py_strip(p));
        if p.is_empty() {
            return true;
        }
        let mut words = py_split(strip_punct_space(&p));
        match (words.next(), words.next_back()) {
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => true,
            _ => false,
        }
    })
}

// ---- words:no_consecutive ----

fixed_entry!(
    NO_CONSECUTIVE,
    "words:no_consecutive",
    "No two consecutive words can share the same first letter.",
    no_consecutive
);

fn no_consecutive(value: &str) -> bool {
    let text = remove_punct(&py_lower(value));
    let firsts: Vec<char> = py_split(&text).filter_map(|w| w.chars().next()).collect();
    firsts.windows(2).all(|p| p[0] != p[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        assert!(alphabet("Apple, banana cherry... dog"));
        assert!(!alphabet("Apple cherry"));
        assert!(alphabet("Zoo apple"));
        assert!(!alphabet("1 b"));
        assert!(last_first("I like cats. Cats like me."));
        assert!(!last_first("I like cats. Dogs like me."));
        assert!(paragraph_last_first("Hello world hello.\n\nx"));
        assert!(!paragraph_last_first("a\n***"));
    }
}
