//! `detectable_content:postscript` (reference `PostscriptChecker`): the lowercased
//! response contains the postscript marker: `P.S.` and `P.P.S` have the reference's
//! dedicated patterns (optional whitespace between the letters); any other marker is
//! lowercased and used as a regular-expression pattern, as the reference does.

use std::sync::Arc;

use regex::Regex;

use crate::kwargs::Kwargs;
use crate::pytext::{self, PY_SPACE};
use crate::registry::Entry;
use crate::{Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "detectable_content:postscript",
    kwargs: &["postscript_marker"],
    build,
};

struct Postscript {
    marker: String,
    pattern: Arc<Regex>,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let marker = kw.nonblank_string("postscript_marker")?.to_string();
    let body = match marker.as_str() {
        "P.P.S" => format!(r"p\.{PY_SPACE}?p\.{PY_SPACE}?s"),
        "P.S." => format!(r"p\.{PY_SPACE}?s\."),
        other => pytext::py_pattern_to_rust(&other.to_lowercase()),
    };
    // Same shape as the reference: `\s*` + marker + `.*$`, multi-line.
    let pattern = pytext::compile(&format!(r"(?m){PY_SPACE}*(?:{body}).*$"))
        .map_err(|e| kw.error(format!("postscript_marker {marker:?}: {e}")))?;
    Ok(Box::new(Postscript { marker, pattern }))
}

impl Constraint for Postscript {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        self.pattern.is_match(&response.to_lowercase())
    }
    fn description(&self) -> String {
        format!(
            "At the end of your response, please explicitly add a postscript starting with {}",
            self.marker
        )
    }
}
