//! `change_case:capital_word_frequency` (reference `CapitalWordFrequencyChecker`): the
//! number of `nltk.word_tokenize` tokens (see [`crate::wordtok`]) that are Python
//! `str.isupper()` is `less than` / `at least` `capital_frequency` (any integer, as in
//! the reference, which only draws a random value when it is missing).

use crate::kwargs::{Kwargs, Relation};
use crate::registry::Entry;
use crate::{wordtok, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "change_case:capital_word_frequency",
    kwargs: &["capital_frequency", "capital_relation"],
    build,
};

struct CapitalWordFrequency {
    frequency: i64,
    relation: Relation,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(CapitalWordFrequency {
        frequency: kw.int("capital_frequency", i64::MIN)?,
        relation: kw.relation("capital_relation")?,
    }))
}

impl Constraint for CapitalWordFrequency {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        let n = if response.chars().any(char::is_uppercase) {
            wordtok::count_upper_tokens(response)
        } else {
            0
        };
        self.relation.holds(n, self.frequency)
    }
    fn description(&self) -> String {
        format!(
            "In your response, words with all capital letters should appear {} {} times.",
            self.relation.as_str(),
            self.frequency
        )
    }
}
