//! `punctuation:no_comma` (reference `CommaChecker`): no ASCII comma anywhere.

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "punctuation:no_comma",
    kwargs: &[],
    build,
};

struct NoComma;

fn build(_: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(NoComma))
}

impl Constraint for NoComma {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        !response.contains(',')
    }
    fn description(&self) -> String {
        "In your entire response, refrain from the use of any commas.".to_string()
    }
}
