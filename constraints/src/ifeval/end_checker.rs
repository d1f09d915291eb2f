//! `startend:end_checker` (reference `EndChecker`): the response, stripped of whitespace
//! and then of `"` at both ends, lowercased, ends with the lowercased `end_phrase`.

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "startend:end_checker",
    kwargs: &["end_phrase"],
    build,
};

struct EndChecker {
    /// As given, stripped (shown in the description).
    phrase: String,
    /// Lowercased (what the check compares against).
    phrase_lower: String,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let phrase = kw.nonblank_string("end_phrase")?.to_string();
    let phrase_lower = phrase.to_lowercase();
    Ok(Box::new(EndChecker {
        phrase,
        phrase_lower,
    }))
}

impl Constraint for EndChecker {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        let v = pytext::py_strip(response).trim_matches('"');
        v.to_lowercase().ends_with(&self.phrase_lower)
    }
    fn description(&self) -> String {
        format!(
            "Finish your response with this exact phrase {}. No other words should follow this phrase.",
            self.phrase
        )
    }
}
