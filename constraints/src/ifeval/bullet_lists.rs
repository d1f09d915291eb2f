//! `detectable_format:number_bullet_lists` (reference `BulletListChecker`): exactly
//! `num_bullets` matches of the reference's multi-line patterns `^\s*\*[^\*].*$` and
//! `^\s*-.*$` (note `\s*` and `[^\*]` may cross line breaks, exactly as in Python).

use std::sync::LazyLock;

use regex::Regex;

use crate::kwargs::Kwargs;
use crate::pytext::PY_SPACE;
use crate::registry::Entry;
use crate::{Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "detectable_format:number_bullet_lists",
    kwargs: &["num_bullets"],
    build,
};

static STAR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!(r"(?m)^{PY_SPACE}*\*[^*].*$")).expect("static regex"));
static DASH: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!(r"(?m)^{PY_SPACE}*-.*$")).expect("static regex"));

struct BulletLists {
    num_bullets: i64,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(BulletLists {
        num_bullets: kw.int("num_bullets", 0)?,
    }))
}

impl Constraint for BulletLists {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        let n = STAR.find_iter(response).count() + DASH.find_iter(response).count();
        i64::try_from(n).is_ok_and(|n| n == self.num_bullets)
    }
    fn description(&self) -> String {
        format!(
            "Your answer must contain exactly {} bullet points. Use the markdown bullet points such as:\n* This is point 1. \n* This is point 2",
            self.num_bullets
        )
    }
}
