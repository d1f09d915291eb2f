//! IFBench `sentence:*` ids: growing alliteration runs, a keyword in the N-th sentence,
//! and word counts growing by a fixed step (reference `IncrementingAlliterationChecker`,
//! `IncludeKeywordChecker`, `IncrementingWordCountChecker`); sentences come from the
//! regex splitter in `split.rs`.

use super::split::split_into_sentences;
use super::util::{self, py_lower, py_split, remove_punct, PyNum};
use super::{fixed_entry, num_entry};
use crate::kwargs::Kwargs;
use crate::pytext::py_strip;
use crate::registry::Entry;
use crate::{Constraint, ConstraintError};

// ---- sentence:alliteration_increment ----

fixed_entry!(
    ALLITERATION_INCREMENT,
    "sentence:alliteration_increment",
    "Each sentence must have a longer sequence of consecutive alliterative words than the previous one.",
    alliteration_increment
);

fn alliteration_increment(value: &str) -> bool {
    let mut prev_score: i64 = -1;
    for sentence in split_into_sentences(value) {
        let lower = py_lower(&sentence);
        let firsts: Vec<char> = py_split(&lower)
            .filter_map(|w| {
                w.trim_start_matches(|c: char| util::is_punct(c) || c == ' ')
                    .chars()
                    .next()
            })
            .collect();
        let mut score: i64 = 0;
        let mut prev_alliterative = false;
        for pair in firsts.windows(2) {
            if pair[0] == pair[1] {
                score += if prev_alliterative { 1 } else { 2 };
                prev_alliterative = true;
            } else {
                prev_alliterative = false;
            }
        }
        if score <= prev_score {
            return false;
        }
        prev_score = score;
    }
    true
}

// ---- sentence:keyword ----

pub(crate) const KEYWORD: Entry = Entry {
    id: "sentence:keyword",
    kwargs: &["word", "N"],
    build: build_keyword,
};

struct Keyword {
    word: String,
    n: PyNum,
}

fn build_keyword(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let word = kw.string("word")?;
    if word.is_empty() {
        return Err(kw.error("kwarg `word` must not be empty"));
    }
    Ok(Box::new(Keyword {
        word: word.to_string(),
        n: util::num(kw, "N", 0.0)?,
    }))
}

impl Constraint for Keyword {
    fn id(&self) -> &str {
        KEYWORD.id
    }
    fn follows(&self, response: &str) -> bool {
        let sentences = split_into_sentences(response);
        if (sentences.len() as f64) < self.n.as_f64() {
            return false;
        }
        // sentences[int(N - 1)], Python indexing (negative counts from the end)
        let idx = match self.n {
            PyNum::Int(n) => n.saturating_sub(1),
            PyNum::Float(f) => PyNum::Float(f - 1.0).trunc(),
        };
        let len = sentences.len() as i64;
        let idx = if idx < 0 { idx + len } else { idx };
        match usize::try_from(idx).ok().and_then(|i| sentences.get(i)) {
            Some(s) => py_lower(s).contains(&py_lower(&self.word)),
            None => false, // the reference raises IndexError
        }
    }
    fn description(&self) -> String {
        format!(
            "The response must include keyword \"{}\" in the {}-th sentence.",
            self.word,
            self.n.py_str()
        )
    }
}

// ---- sentence:increment ----

num_entry!(
    INCREMENT,
    "sentence:increment",
    "small_n",
    0.0,
    |n| format!(
        "Each sentence must contain exactly {} more words than the previous one.",
        n.py_str()
    ),
    increment
);

fn increment(value: &str, step: PyNum) -> bool {
    let sentences = split_into_sentences(value);
    let count = |s: &str| py_split(py_strip(&remove_punct(s))).count();
    let Some(first) = sentences.first() else {
        return false; // the reference raises IndexError
    };
    let mut prev = count(first);
    for s in &sentences[1..] {
        let n = count(s);
        if (n as f64) != (prev as f64) + step.as_f64() {
            return false;
        }
        prev = n;
    }
    true
}
