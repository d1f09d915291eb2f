//! `detectable_content:number_placeholders` (reference `PlaceholderChecker`): at least
//! `num_placeholders` non-overlapping `\[.*?\]` matches (each on one line).

use std::sync::LazyLock;

use regex::Regex;

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "detectable_content:number_placeholders",
    kwargs: &["num_placeholders"],
    build,
};

static PLACEHOLDER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\[.*?\]").expect("static regex"));

struct NumberPlaceholders {
    num_placeholders: i64,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(NumberPlaceholders {
        num_placeholders: kw.int("num_placeholders", 0)?,
    }))
}

impl Constraint for NumberPlaceholders {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        let n = if response.contains('[') {
            PLACEHOLDER.find_iter(response).count()
        } else {
            0
        };
        i64::try_from(n).is_ok_and(|n| n >= self.num_placeholders)
    }
    fn description(&self) -> String {
        format!(
            "The response must contain at least {} placeholders represented by square brackets, \
             such as [address].",
            self.num_placeholders
        )
    }
}
