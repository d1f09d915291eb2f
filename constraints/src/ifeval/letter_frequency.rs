//! `keywords:letter_frequency` (reference `LetterFrequencyChecker`): the number of
//! occurrences of `letter` in the lowercased response (Python `str.lower()` then
//! `collections.Counter`) is `less than` / `at least` `let_frequency`.
//!
//! Deliberate difference: the reference replaces a `letter` that is not one ASCII letter
//! with a random one (its verdict is then random); we require exactly one character and
//! count a non-letter character (e.g. `#`) literally, which is deterministic.

use crate::kwargs::{Kwargs, Relation};
use crate::registry::Entry;
use crate::{Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "keywords:letter_frequency",
    kwargs: &["letter", "let_frequency", "let_relation"],
    build,
};

struct LetterFrequency {
    letter: char,
    frequency: i64,
    relation: Relation,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let given = kw.string("letter")?;
    let mut chars = given.chars();
    let (Some(c), None) = (chars.next(), chars.next()) else {
        return Err(kw.error(format!(
            "kwarg `letter` must be exactly one character, got {given:?}"
        )));
    };
    // Python `letter.lower()`; a character whose lowercase is not one character is kept.
    let mut lower = c.to_lowercase();
    let letter = match (lower.next(), lower.next()) {
        (Some(l), None) => l,
        _ => c,
    };
    Ok(Box::new(LetterFrequency {
        letter,
        frequency: kw.int("let_frequency", 0)?,
        relation: kw.relation("let_relation")?,
    }))
}

impl Constraint for LetterFrequency {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        let n = if self.letter.is_ascii() {
            let l = self.letter as u8;
            let ascii = response
                .bytes()
                .filter(|&b| b.to_ascii_lowercase() == l)
                .count();
            // non-ASCII characters whose lowercase contains the letter (e.g. KELVIN SIGN)
            let other: usize = if response.is_ascii() {
                0
            } else {
                response
                    .chars()
                    .filter(|c| !c.is_ascii())
                    .map(|c| c.to_lowercase().filter(|&x| x == self.letter).count())
                    .sum()
            };
            ascii + other
        } else {
            response
                .chars()
                .map(|c| c.to_lowercase().filter(|&x| x == self.letter).count())
                .sum()
        };
        self.relation.holds(n, self.frequency)
    }
    fn description(&self) -> String {
        format!(
            "In your response, the letter {} should appear {} {} times.",
            self.letter,
            self.relation.as_str(),
            self.frequency
        )
    }
}
