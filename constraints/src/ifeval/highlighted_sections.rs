//! `detectable_format:number_highlighted_sections` (reference `HighlightSectionChecker`):
//! at least `num_highlights` non-blank `*...*` spans plus non-blank `**...**` spans
//! (each on one line, counted separately as the reference does).

use std::sync::LazyLock;

use regex::Regex;

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "detectable_format:number_highlighted_sections",
    kwargs: &["num_highlights"],
    build,
};

static SINGLE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\*[^\n*]*\*").expect("static regex"));
static DOUBLE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\*\*[^\n*]*\*\*").expect("static regex"));

struct HighlightedSections {
    num_highlights: i64,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(HighlightedSections {
        num_highlights: kw.int("num_highlights", 0)?,
    }))
}

impl Constraint for HighlightedSections {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        let single = SINGLE
            .find_iter(response)
            .filter(|m| !pytext::is_blank(m.as_str().trim_matches('*')))
            .count();
        let double = DOUBLE
            .find_iter(response)
            .filter(|m| !pytext::is_blank(&m.as_str()[2..m.as_str().len() - 2]))
            .count();
        i64::try_from(single + double).is_ok_and(|n| n >= self.num_highlights)
    }
    fn description(&self) -> String {
        format!(
            "Highlight at least {} sections in your answer with markdown, i.e. *highlighted section*.",
            self.num_highlights
        )
    }
}
