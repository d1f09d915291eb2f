//! A port of the `langdetect` 1.0.9 language detector (Python port of Shuyo Nakatani's
//! language-detection for Java), the detector the reference IFEval checkers call for
//! `language:response_language` and `change_case:english_*`, seeded as the reference
//! oracle seeds it (`DetectorFactory.seed = 0`), so that our verdicts are the reference's.
//!
//! The method, as the reference runs it on one text:
//! 1. URLs and e-mail addresses become spaces, Vietnamese letter + combining mark pairs
//!    are precomposed, the text is cut to 10 000 characters and runs of spaces collapse.
//! 2. If the text has more than twice as many characters from U+0300 up as ASCII letters
//!    (`A`..=`z`), the ASCII letters are dropped (Latin noise in a non-Latin text).
//! 3. Every character is normalised ([`ngram::normalize`]) and the 1- to 3-grams ending
//!    at it that occur in some profile are collected, in text order.
//! 4. No n-gram: langdetect raises ([`NoFeatures`]); the reference checkers then count
//!    the instruction as followed.
//! 5. Seven trials, each starting from a uniform distribution over the 55 languages with a
//!    smoothing `alpha = 0.5 + 0.05 * gauss()`, repeatedly multiply the distribution by
//!    `alpha / 10000 + P(gram | language)` for an n-gram drawn uniformly at random from the
//!    collected ones, renormalising every fifth draw and stopping when one language holds
//!    more than 0.99999 or after 1000 draws. The answer is the language with the highest
//!    mean over the trials if that mean is above 0.1, else `unknown`.
//!
//! The random draws come from CPython's Mersenne Twister reseeded with 0 for each text
//! ([`pyrandom`]), so short or ambiguous texts, whose answer depends on the draws, get
//! the reference's answer too. The arithmetic is the reference's, operation for operation
//! (IEEE doubles, same order), and `gauss` uses the C library's `log`/`cos`/`sin` as
//! CPython does.

mod ngram;
mod profiles;
mod pyrandom;

use std::sync::OnceLock;

use regex::Regex;

use profiles::{gram_key, tables, LANGS, N_LANGS};
use pyrandom::PyRandom;

/// The seed the reference oracle gives langdetect (`DetectorFactory.seed`).
pub const REFERENCE_SEED: u64 = 0;

/// What langdetect answers when no language reaches probability 0.1.
pub const UNKNOWN: &str = "unknown";

const N_TRIAL: usize = 7;
const ALPHA_DEFAULT: f64 = 0.5;
const ALPHA_WIDTH: f64 = 0.05;
const ITERATION_LIMIT: usize = 1000;
const PROB_THRESHOLD: f64 = 0.1;
const CONV_THRESHOLD: f64 = 0.99999;
const BASE_FREQ: f64 = 10000.0;
const MAX_TEXT_LENGTH: usize = 10000;

/// The text has no n-gram of any profile (no letters, or only all-caps words with
/// unknown initials): langdetect raises `LangDetectException("No features in text.")`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no features in text")]
pub struct NoFeatures;

/// The 55 language codes langdetect knows, as it spells them (`zh-cn`, `zh-tw`, ISO 639-1
/// otherwise).
pub fn languages() -> &'static [&'static str] {
    &LANGS
}

/// `langdetect.detect(text)` with the reference's seed: the code of the most probable
/// language, [`UNKNOWN`] when none reaches 0.1, or [`NoFeatures`].
pub fn detect(text: &str) -> Result<&'static str, NoFeatures> {
    detect_seeded(text, REFERENCE_SEED)
}

/// [`detect`] with another seed (`DetectorFactory.seed = seed`).
pub fn detect_seeded(text: &str, seed: u64) -> Result<&'static str, NoFeatures> {
    let probs = probabilities(text, seed)?;
    let mut best: Option<usize> = None;
    for (i, &p) in probs.iter().enumerate() {
        // the reference sorts the languages above the threshold by probability, stably
        // and descending: on a tie the first in profile order wins
        if p > PROB_THRESHOLD && best.is_none_or(|b| p > probs[b]) {
            best = Some(i);
        }
    }
    Ok(best.map_or(UNKNOWN, |i| LANGS[i]))
}

/// The mean probability of every language over the trials (in [`languages`] order).
pub fn probabilities(text: &str, seed: u64) -> Result<[f64; N_LANGS], NoFeatures> {
    let t = tables();
    let text = prepare(text);
    let grams = extract(&text);
    if grams.is_empty() {
        return Err(NoFeatures);
    }
    let mut rng = PyRandom::new(seed);
    let mut langprob = [0.0f64; N_LANGS];
    for _ in 0..N_TRIAL {
        let mut prob = [1.0 / N_LANGS as f64; N_LANGS];
        let alpha = ALPHA_DEFAULT + rng.gauss(0.0, 1.0) * ALPHA_WIDTH;
        let weight = alpha / BASE_FREQ;
        let mut i = 0;
        loop {
            let row = *rng.choice(&grams) as usize;
            let word = &t.probs[row * N_LANGS..(row + 1) * N_LANGS];
            for (p, w) in prob.iter_mut().zip(word) {
                *p *= weight + w;
            }
            if i % 5 == 0 && (normalize(&mut prob) > CONV_THRESHOLD || i >= ITERATION_LIMIT) {
                break;
            }
            i += 1;
        }
        for (lp, p) in langprob.iter_mut().zip(prob) {
            *lp += p / N_TRIAL as f64;
        }
    }
    Ok(langprob)
}

/// Divide by the sum (summed left to right, as Python 3.11's `sum`); the largest value.
fn normalize(prob: &mut [f64; N_LANGS]) -> f64 {
    let sum: f64 = prob.iter().fold(0.0, |s, p| s + p);
    let mut max = 0.0;
    for p in prob.iter_mut() {
        *p /= sum;
        if max < *p {
            max = *p;
        }
    }
    max
}

fn url_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"https?://[-_.?&~;+=/#0-9A-Za-z]{1,2076}").expect("URL regex"))
}

fn mail_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"[-_.0-9A-Za-z]{1,64}@[-_0-9A-Za-z]{1,255}[-_.0-9A-Za-z]{1,255}")
            .expect("mail regex")
    })
}

/// `Detector.append` followed by `cleaning_text`: the characters the n-grams are taken from.
fn prepare(text: &str) -> Vec<char> {
    let t = tables();
    let text = url_re().replace_all(text, " ");
    let text = mail_re().replace_all(&text, " ");
    let text = ngram::normalize_vi(t, &text);
    let mut chars: Vec<char> = Vec::with_capacity(text.len().min(MAX_TEXT_LENGTH));
    let mut pre: Option<char> = None;
    for ch in text.chars().take(MAX_TEXT_LENGTH) {
        if ch != ' ' || pre != Some(' ') {
            chars.push(ch);
        }
        pre = Some(ch);
    }
    // The reference also means to spare Latin Extended Additional (Vietnamese) from the
    // non-Latin count, but compares the block number with a block name, so every
    // character from U+0300 up counts.
    let latin = chars.iter().filter(|c| ('A'..='z').contains(*c)).count();
    let non_latin = chars.iter().filter(|&&c| c >= '\u{0300}').count();
    if latin * 2 < non_latin {
        chars.retain(|c| !('A'..='z').contains(c));
    }
    chars
}

/// `Detector._extract_ngrams`: the profile row of every known n-gram, in text order.
fn extract(text: &[char]) -> Vec<u32> {
    let t = tables();
    let mut window = ngram::Window::new();
    let mut grams = Vec::new();
    for &ch in text {
        window.push(ngram::normalize(t, ch));
        if window.capital_word {
            continue;
        }
        for n in 1..=3 {
            let Some(gram) = window.last(n) else { break };
            if gram == [' '] {
                continue;
            }
            if let Some(&row) = t.rows.get(&gram_key(gram)) {
                grams.push(row);
            }
        }
    }
    grams
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_common_languages() {
        for (text, want) in [
            (
                "This is a perfectly ordinary English sentence about the weather.",
                "en",
            ),
            (
                "Dies ist ein ganz gewöhnlicher deutscher Satz über das Wetter.",
                "de",
            ),
            (
                "Ceci est une phrase française tout à fait ordinaire sur la météo.",
                "fr",
            ),
            ("Это совершенно обычное русское предложение о погоде.", "ru"),
            ("これは天気についてのごく普通の日本語の文です。", "ja"),
        ] {
            assert_eq!(detect(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn no_letters_means_no_features() {
        for text in [
            "",
            "   ",
            "12345 !!! 678",
            "https://example.com/a?b=c",
            "a@b.cd",
        ] {
            assert_eq!(detect(text), Err(NoFeatures), "{text:?}");
        }
    }

    #[test]
    fn all_caps_words_only_count_their_first_letter() {
        let t = tables();
        let text = prepare("ABC dog");
        let grams = extract(&text);
        // " A", "A" from ABC (B, C are inside a capital word), then " d", "d", "do", "o",
        // " do", "og", "g", "dog" as far as the profiles know them
        let key = |s: &str| {
            t.rows
                .get(&gram_key(&s.chars().collect::<Vec<_>>()))
                .copied()
        };
        assert_eq!(grams[0], key("A").unwrap());
        assert_eq!(grams[1], key(" A").unwrap());
        assert!(!grams.contains(&key("B").unwrap()));
    }

    #[test]
    fn vietnamese_marks_are_precomposed() {
        let t = tables();
        assert_eq!(ngram::normalize_vi(t, "a\u{0301}"), "á");
        assert_eq!(ngram::normalize_vi(t, "x\u{0301}"), "x\u{0301}");
    }
}
