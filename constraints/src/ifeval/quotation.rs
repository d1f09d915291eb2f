//! `startend:quotation` (reference `QuotationChecker`): after `strip()`, at least two
//! characters, starting and ending with `"`.

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "startend:quotation",
    kwargs: &[],
    build,
};

struct Quotation;

fn build(_: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(Quotation))
}

impl Constraint for Quotation {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        let v = pytext::py_strip(response);
        // '"' is one byte, so two bytes that are both quotes are two characters.
        v.len() > 1 && v.starts_with('"') && v.ends_with('"')
    }
    fn description(&self) -> String {
        "Wrap your entire response with double quotation marks.".to_string()
    }
}
