//! `detectable_format:title` (reference `TitleChecker`): some `<<...>>` on one line
//! whose content, without the brackets, is not blank.

use std::sync::LazyLock;

use regex::Regex;

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "detectable_format:title",
    kwargs: &[],
    build,
};

static TITLE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"<<[^\n]+>>").expect("static regex"));

struct Title;

fn build(_: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(Title))
}

impl Constraint for Title {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        if !response.contains("<<") {
            return false;
        }
        TITLE.find_iter(response).any(|m| {
            let inner = m.as_str().trim_start_matches('<').trim_end_matches('>');
            !pytext::is_blank(inner)
        })
    }
    fn description(&self) -> String {
        "Your answer must contain a title, wrapped in double angular brackets, such as \
         <<poem of joy>>."
            .to_string()
    }
}
