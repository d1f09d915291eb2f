//! IFBench `ratio:*` ids: stop-word percentage, declarative/interrogative ratio, balanced
//! sentence types, character-trigram overlap with a reference text, and three sentences
//! of equal length (reference `StopWordPercentageChecker`, `SentTypeRatioChecker`,
//! `SentBalanceChecker`, `NGramOverlapChecker`, `CharacterCountUniqueWordsChecker`).

use super::split::split_into_sentences;
use super::util::{self, py_len, py_lower, PyNum};
use super::{data, fixed_entry, num_entry};
use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

// ---- ratio:stop_words ----

num_entry!(
    STOP_WORDS,
    "ratio:stop_words",
    "percentage",
    0.0,
    |p| format!(
        "Ensure that stop words constitute no more than {}% of the total words in your response.",
        p.py_str()
    ),
    stop_words
);

fn stop_words(value: &str, percentage: PyNum) -> bool {
    let num_words = pytext::count_words(value);
    if num_words == 0 {
        return false; // the reference divides by zero
    }
    let num_stop = pytext::word_runs(value)
        .filter(|t| {
            if t.bytes().all(|b| b.is_ascii_lowercase()) {
                data::is_stopword(t) // already lower case: skip the copy
            } else {
                data::is_stopword(&py_lower(t))
            }
        })
        .count();
    (num_stop as f64 / num_words as f64) * 100.0 <= percentage.as_f64()
}

// ---- ratio:sentence_type / ratio:sentence_balance ----

fixed_entry!(
    SENTENCE_TYPE,
    "ratio:sentence_type",
    "Maintain a 2:1 ratio of declarative to interrogative sentences.",
    sentence_type
);

fn count_ending(sentences: &[String], end: char) -> usize {
    sentences.iter().filter(|s| s.ends_with(end)).count()
}

fn sentence_type(value: &str) -> bool {
    let s = split_into_sentences(value);
    count_ending(&s, '.') == 2 * count_ending(&s, '?')
}

fixed_entry!(
    SENTENCE_BALANCE,
    "ratio:sentence_balance",
    "Ensure that the ratio of sentence types (declarative, interrogative, exclamatory) is balanced.",
    sentence_balance
);

fn sentence_balance(value: &str) -> bool {
    let s = split_into_sentences(value);
    let d = count_ending(&s, '.');
    d == count_ending(&s, '?') && d == count_ending(&s, '!')
}

// ---- ratio:overlap ----

pub(crate) const OVERLAP: Entry = Entry {
    id: "ratio:overlap",
    kwargs: &["reference_text", "percentage"],
    build: build_overlap,
};

struct Overlap {
    reference: hashbrown::HashSet<u64>,
    percentage: PyNum,
}

/// The set of character trigrams of `s`, each packed into one integer.
fn trigrams(s: &str) -> hashbrown::HashSet<u64> {
    let mut out = hashbrown::HashSet::with_capacity(s.len());
    let mut it = s.chars().map(|c| c as u64);
    let (Some(mut a), Some(mut b)) = (it.next(), it.next()) else {
        return out;
    };
    for c in it {
        out.insert((a << 42) | (b << 21) | c);
        (a, b) = (b, c);
    }
    out
}

fn build_overlap(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(Overlap {
        reference: trigrams(kw.string("reference_text")?),
        percentage: util::num(kw, "percentage", 0.0)?,
    }))
}

impl Constraint for Overlap {
    fn id(&self) -> &str {
        OVERLAP.id
    }
    fn follows(&self, response: &str) -> bool {
        let grams = trigrams(response);
        if grams.is_empty() {
            return false; // the reference divides by zero
        }
        let overlap = grams.intersection(&self.reference).count() as f64 / grams.len() as f64;
        let pct = overlap * 100.0;
        let (lo, hi) = match self.percentage {
            PyNum::Int(p) => ((p as f64) - 2.0, (p as f64) + 2.0),
            PyNum::Float(p) => (p - 2.0, p + 2.0),
        };
        lo <= pct && pct <= hi
    }
    fn description(&self) -> String {
        format!(
            "Maintain a trigram overlap of {}% (±2%) with the provided reference text.",
            self.percentage.py_str()
        )
    }
}

// ---- ratio:sentence_words ----

fixed_entry!(
    SENTENCE_WORDS,
    "ratio:sentence_words",
    "Respond with three sentences, all containing the same number of characters but using all different words.",
    sentence_words
);

fn sentence_words(value: &str) -> bool {
    let s = split_into_sentences(value);
    if s.len() != 3 {
        return false;
    }
    let n = py_len(pytext::py_strip(&s[0]));
    s.iter().all(|x| py_len(pytext::py_strip(x)) == n)
}
