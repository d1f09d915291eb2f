//! `detectable_format:constrained_response` (reference `ConstrainedResponseChecker`): the
//! stripped response contains one of "My answer is yes.", "My answer is no.",
//! "My answer is maybe.".

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "detectable_format:constrained_response",
    kwargs: &[],
    build,
};

const OPTIONS: [&str; 3] = [
    "My answer is yes.",
    "My answer is no.",
    "My answer is maybe.",
];

struct ConstrainedResponse;

fn build(_: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(ConstrainedResponse))
}

impl Constraint for ConstrainedResponse {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        let v = pytext::py_strip(response);
        OPTIONS.iter().any(|o| v.contains(o))
    }
    fn description(&self) -> String {
        // Python formats the options tuple with repr()
        format!(
            "Answer with one of the following options: ({})",
            OPTIONS
                .iter()
                .map(|o| pytext::py_repr_str(o))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}
