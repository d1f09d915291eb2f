//! `length_constraints:number_words` (reference `NumberOfWords`): the number of `\w+`
//! tokens (nltk `RegexpTokenizer`, see `pytext::count_words`) is `less than` / `at least`
//! `num_words`.

use crate::kwargs::{Kwargs, Relation};
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "length_constraints:number_words",
    kwargs: &["num_words", "relation"],
    build,
};

struct NumberWords {
    num_words: i64,
    relation: Relation,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(NumberWords {
        num_words: kw.int("num_words", 0)?,
        relation: kw.relation("relation")?,
    }))
}

impl Constraint for NumberWords {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        self.relation
            .holds(pytext::count_words(response), self.num_words)
    }
    fn description(&self) -> String {
        format!(
            "Answer with {} {} words.",
            self.relation.as_str(),
            self.num_words
        )
    }
}
