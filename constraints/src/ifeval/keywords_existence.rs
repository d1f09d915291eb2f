//! `keywords:existence` (reference `KeywordChecker`): every keyword is found, case
//! insensitively. As in the reference, each keyword is a regular-expression pattern
//! (see [`crate::pytext::py_pattern_to_rust`]); plain words match literally.

use std::sync::Arc;

use regex::Regex;

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "keywords:existence",
    kwargs: &["keywords"],
    build,
};

struct KeywordsExistence {
    /// Sorted, as the reference sorts them (duplicates kept).
    keywords: Vec<String>,
    patterns: Vec<Arc<Regex>>,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let mut keywords = kw.string_list("keywords")?;
    keywords.sort();
    let patterns = keywords
        .iter()
        .map(|k| {
            pytext::compile(&format!("(?i){}", pytext::py_pattern_to_rust(k)))
                .map_err(|e| kw.error(format!("keyword {k:?}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    Ok(Box::new(KeywordsExistence { keywords, patterns }))
}

impl Constraint for KeywordsExistence {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        self.patterns.iter().all(|p| p.is_match(response))
    }
    fn description(&self) -> String {
        format!(
            "Include keywords {} in the response.",
            pytext::py_repr_str_list(&self.keywords)
        )
    }
}
