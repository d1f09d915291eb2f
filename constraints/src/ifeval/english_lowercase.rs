//! `change_case:english_lowercase` (reference `LowercaseLettersEnglishChecker`):
//! Python `str.islower()` and detected as English by langdetect, or
//! undetectable (see [`crate::lang`]).

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{lang, pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "change_case:english_lowercase",
    kwargs: &[],
    build,
};

struct EnglishLowercase;

fn build(_: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(EnglishLowercase))
}

impl Constraint for EnglishLowercase {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        pytext::py_islower(response) && lang::english_or_undetectable(response)
    }
    fn description(&self) -> String {
        "Your entire response should be in English, and in all lowercase letters. \
         No capital letters are allowed."
            .to_string()
    }
}
