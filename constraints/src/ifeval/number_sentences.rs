//! `length_constraints:number_sentences` (reference `NumberOfSentences`): the number of
//! NLTK Punkt sentences (see [`crate::sentences`]) is `less than` / `at least`
//! `num_sentences`.

use crate::kwargs::{Kwargs, Relation};
use crate::registry::Entry;
use crate::{sentences, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "length_constraints:number_sentences",
    kwargs: &["num_sentences", "relation"],
    build,
};

struct NumberSentences {
    num_sentences: i64,
    relation: Relation,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(NumberSentences {
        num_sentences: kw.int("num_sentences", 0)?,
        relation: kw.relation("relation")?,
    }))
}

impl Constraint for NumberSentences {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        self.relation
            .holds(sentences::count_sentences(response), self.num_sentences)
    }
    fn description(&self) -> String {
        format!(
            "Your response should contain {} {} sentences.",
            self.relation.as_str(),
            self.num_sentences
        )
    }
}
