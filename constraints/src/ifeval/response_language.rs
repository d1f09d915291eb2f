//! `language:response_language` (reference `ResponseLanguageChecker`): the detected
//! language of the response is `language` (an ISO 639-1 code of the reference's 30
//! `LANGUAGE_CODES`; others are rejected at build time, where the reference raises).
//!
//! The reference uses `langdetect` and counts an undetectable text (no features) as
//! passing; so do we, with our port of it (see [`crate::lang`]).

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{lang, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "language:response_language",
    kwargs: &["language"],
    build,
};

struct ResponseLanguage {
    code: &'static str,
    name: &'static str,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let code = kw.string("language")?;
    let (code, name) = lang::LANGUAGE_CODES
        .iter()
        .find(|(c, _)| *c == code)
        .copied()
        .ok_or_else(|| {
            kw.error(format!(
                "kwarg `language` must be one of the reference's language codes, got {code:?}"
            ))
        })?;
    Ok(Box::new(ResponseLanguage { code, name }))
}

impl Constraint for ResponseLanguage {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        lang::detect_code(response).is_none_or(|c| c == self.code)
    }
    fn description(&self) -> String {
        format!(
            "Your ENTIRE response should be in {} language, no other language is allowed.",
            self.name
        )
    }
}
