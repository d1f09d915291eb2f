//! `change_case:english_capital` (reference `CapitalLettersEnglishChecker`):
//! Python `str.isupper()` and detected as English by langdetect, or
//! undetectable (see [`crate::lang`]).

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{lang, pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "change_case:english_capital",
    kwargs: &[],
    build,
};

struct EnglishCapital;

fn build(_: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(EnglishCapital))
}

impl Constraint for EnglishCapital {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        pytext::py_isupper(response) && lang::english_or_undetectable(response)
    }
    fn description(&self) -> String {
        "Your entire response should be in English, and in all capital letters.".to_string()
    }
}
