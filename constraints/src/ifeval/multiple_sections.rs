//! `detectable_format:multiple_sections` (reference `SectionChecker`): splitting on
//! `\s?SPLITER\s?\d+\s?` gives at least `num_sections + 1` pieces. `section_spliter` is
//! stripped and, as in the reference, used as a regular-expression pattern (plain words
//! match literally; see [`pytext::py_pattern_to_rust`]); capture groups in it add pieces
//! exactly as Python's `re.split` does.
//!
//! Deliberate difference: a blank `section_spliter` is rejected at build time.

use std::sync::Arc;

use regex::Regex;

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "detectable_format:multiple_sections",
    kwargs: &["section_spliter", "num_sections"],
    build,
};

struct MultipleSections {
    spliter: String,
    pattern: Arc<Regex>,
    /// Pieces each match adds to `re.split`'s result: 1 + capture groups.
    per_match: usize,
    num_sections: i64,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let spliter = kw.nonblank_string("section_spliter")?.to_string();
    let s = pytext::PY_SPACE;
    let pattern = pytext::compile(&format!(
        r"{s}?(?:{}){s}?\d+{s}?",
        pytext::py_pattern_to_rust(&spliter)
    ))
    .map_err(|e| kw.error(format!("section_spliter {spliter:?}: {e}")))?;
    let per_match = pattern.captures_len();
    Ok(Box::new(MultipleSections {
        spliter,
        pattern,
        per_match,
        num_sections: kw.int("num_sections", 0)?,
    }))
}

impl Constraint for MultipleSections {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        let n = self.pattern.find_iter(response).count() * self.per_match;
        i64::try_from(n).is_ok_and(|n| n >= self.num_sections)
    }
    fn description(&self) -> String {
        let s = &self.spliter;
        format!(
            "Your response must have {} sections. Mark the beginning of each section with {s} X, \
             such as:\n{s} 1\n[content of section 1]\n{s} 2\n[content of section 2]",
            self.num_sections
        )
    }
}
