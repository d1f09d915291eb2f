//! `keywords:frequency` (reference `KeywordFrequencyChecker`): the number of
//! non-overlapping, case-insensitive matches of `keyword` (stripped; a regular-expression
//! pattern as in the reference, plain words match literally) is `less than` / `at least`
//! `frequency`.

use std::sync::Arc;

use regex::Regex;

use crate::kwargs::{Kwargs, Relation};
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "keywords:frequency",
    kwargs: &["keyword", "frequency", "relation"],
    build,
};

struct KeywordFrequency {
    keyword: String,
    pattern: Arc<Regex>,
    frequency: i64,
    relation: Relation,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let keyword = kw.nonblank_string("keyword")?.to_string();
    let pattern = pytext::compile(&format!("(?i){}", pytext::py_pattern_to_rust(&keyword)))
        .map_err(|e| kw.error(format!("keyword {keyword:?}: {e}")))?;
    Ok(Box::new(KeywordFrequency {
        keyword,
        pattern,
        frequency: kw.int("frequency", 0)?,
        relation: kw.relation("relation")?,
    }))
}

impl Constraint for KeywordFrequency {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        self.relation
            .holds(self.pattern.find_iter(response).count(), self.frequency)
    }
    fn description(&self) -> String {
        format!(
            "In your response, the word {} should appear {} {} times.",
            self.keyword,
            self.relation.as_str(),
            self.frequency
        )
    }
}
