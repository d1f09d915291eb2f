//! `length_constraints:number_paragraphs` (reference `ParagraphChecker`): splitting on
//! `\s?\*\*\*\s?` gives exactly `num_paragraphs` paragraphs, where a blank first or last
//! piece is not counted and a blank inner piece fails the check.

use std::sync::LazyLock;

use regex::Regex;

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "length_constraints:number_paragraphs",
    kwargs: &["num_paragraphs"],
    build,
};

static DIVIDER: LazyLock<Regex> = LazyLock::new(|| {
    let s = pytext::PY_SPACE;
    Regex::new(&format!(r"{s}?\*\*\*{s}?")).expect("static regex")
});

struct NumberParagraphs {
    num_paragraphs: i64,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(NumberParagraphs {
        num_paragraphs: kw.int("num_paragraphs", 0)?,
    }))
}

impl Constraint for NumberParagraphs {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        let pieces: Vec<&str> = DIVIDER.split(response).collect();
        let last = pieces.len() - 1;
        let mut n = pieces.len();
        for (i, p) in pieces.iter().enumerate() {
            if pytext::is_blank(p) {
                if i == 0 || i == last {
                    n -= 1;
                } else {
                    return false;
                }
            }
        }
        i64::try_from(n).is_ok_and(|n| n == self.num_paragraphs)
    }
    fn description(&self) -> String {
        format!(
            "There should be {} paragraphs. Paragraphs are separated with the markdown divider: ***",
            self.num_paragraphs
        )
    }
}
