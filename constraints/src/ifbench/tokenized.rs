//! IFBench ids that tokenize with `nltk.word_tokenize` ([`crate::wordtok`]): the response
//! starts with a verb (NLTK POS tag of the first token, see `data.rs`), a keyword at a
//! given sentence and word position, the second and second-to-last words, and title case.

use super::split::split_into_sentences;
use super::{data, fixed_entry};
use crate::kwargs::Kwargs;
use crate::pytext::{py_islower, py_isupper, py_strip};
use crate::registry::Entry;
use crate::wordtok::{end_word_tokens, first_word_tokens, word_tokenize, word_tokens_lazy};
use crate::{Constraint, ConstraintError};

// ---- words:start_verb ----

fixed_entry!(
    START_VERB,
    "words:start_verb",
    "The response must start with a verb.",
    start_verb
);

fn start_verb(value: &str) -> bool {
    // the tag of the first token depends on the first three tokens only
    data::first_pos_tag(&first_word_tokens(value, 3)).is_some_and(|t| t.contains("VB"))
}

// ---- words:keywords_specific_position ----

pub(crate) const KEYWORDS_SPECIFIC_POSITION: Entry = Entry {
    id: "words:keywords_specific_position",
    kwargs: &["keyword", "n", "m"],
    build: build_specific_position,
};

struct SpecificPosition {
    keyword: String,
    n: i64,
    m: i64,
}

/// A required non-zero integer (the reference draws a random value for 0 / missing).
fn nonzero(kw: &Kwargs<'_>, key: &str) -> Result<i64, ConstraintError> {
    let v = kw.int(key, i64::MIN)?;
    if v == 0 {
        return Err(kw.error(format!("kwarg `{key}` must not be 0")));
    }
    Ok(v)
}

fn build_specific_position(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let keyword = kw.string("keyword")?;
    if keyword.is_empty() {
        return Err(kw.error("kwarg `keyword` must not be empty"));
    }
    Ok(Box::new(SpecificPosition {
        keyword: py_strip(keyword).to_string(),
        n: nonzero(kw, "n")?,
        m: nonzero(kw, "m")?,
    }))
}

/// `items[i]` with Python indexing (negative from the end).
fn py_index<T>(items: &[T], i: i64) -> Option<&T> {
    let len = i64::try_from(items.len()).ok()?;
    let j = if i < 0 { i + len } else { i };
    usize::try_from(j).ok().and_then(|j| items.get(j))
}

impl Constraint for SpecificPosition {
    fn id(&self) -> &str {
        KEYWORDS_SPECIFIC_POSITION.id
    }
    fn follows(&self, response: &str) -> bool {
        let sentences = split_into_sentences(response);
        if (sentences.len() as i64) < self.n {
            return false;
        }
        let Some(sentence) = py_index(&sentences, self.n.saturating_sub(1)) else {
            return false; // IndexError in the reference
        };
        let words = word_tokenize(sentence);
        if (words.len() as i64) < self.m {
            return false;
        }
        py_index(&words, self.m.saturating_sub(1)).is_some_and(|w| *w == self.keyword)
    }
    fn description(&self) -> String {
        format!(
            "Include keyword {} in the {}-th sentence, as the {}-th word of that sentence.",
            self.keyword, self.n, self.m
        )
    }
}

// ---- words:words_position ----

pub(crate) const WORDS_POSITION: Entry = Entry {
    id: "words:words_position",
    kwargs: &["keyword"],
    build: build_words_position,
};

struct WordsPosition {
    keyword: String,
}

fn build_words_position(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(WordsPosition {
        keyword: py_strip(kw.string("keyword")?).to_string(),
    }))
}

impl Constraint for WordsPosition {
    fn id(&self) -> &str {
        WORDS_POSITION.id
    }
    fn follows(&self, response: &str) -> bool {
        // words[1] and words[-2] only: tokenize the sentences at both ends
        let (first, last) = end_word_tokens(response, 2);
        first.len() >= 2
            && last.len() >= 2
            && first[1] == last[last.len() - 2]
            && last[last.len() - 2] == self.keyword
    }
    fn description(&self) -> String {
        format!(
            "The second word in your response and the second to last word in your response \
             should be the word {}.",
            self.keyword
        )
    }
}

// ---- format:title_case ----

fixed_entry!(
    TITLE_CASE,
    "format:title_case",
    "Write the entire response in title case (capitalize the first letter of every major word).",
    title_case
);

fn title_case(value: &str) -> bool {
    word_tokens_lazy(value).all(|word| {
        let mut chars = word.chars();
        let Some(first) = chars.next() else {
            return false; // word[0] raises IndexError
        };
        let mut buf = [0u8; 4];
        let head: &str = first.encode_utf8(&mut buf);
        let rest = chars.as_str();
        if py_isupper(head) && py_islower(rest) {
            true
        } else {
            !(py_islower(head) && (py_isupper(rest) || py_islower(rest)))
        }
    })
}
