//! IFBench `repeat:*` ids: repeat the request with its first word changed, output a
//! fixed sentence, and copy a span of the request's words (reference
//! `RepeatChangeChecker`, `RepeatSimpleChecker`, `RepeatSpanChecker`).

use super::fixed_entry;
use super::util::{py_lower, py_slice_bounds, py_split};
use crate::kwargs::Kwargs;
use crate::pytext::py_strip;
use crate::registry::Entry;
use crate::{Constraint, ConstraintError};

fn prompt(kw: &Kwargs<'_>) -> Result<String, ConstraintError> {
    let p = kw.string("prompt_to_repeat")?;
    if p.is_empty() {
        return Err(kw.error("kwarg `prompt_to_repeat` must not be empty"));
    }
    Ok(p.to_string())
}

// ---- repeat:repeat_change ----

pub(crate) const REPEAT_CHANGE: Entry = Entry {
    id: "repeat:repeat_change",
    kwargs: &["prompt_to_repeat"],
    build: build_change,
};

struct RepeatChange {
    prompt: String,
}

fn build_change(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(RepeatChange {
        prompt: prompt(kw)?,
    }))
}

impl Constraint for RepeatChange {
    fn id(&self) -> &str {
        REPEAT_CHANGE.id
    }
    fn follows(&self, response: &str) -> bool {
        self.prompt != response
            && py_split(&self.prompt)
                .skip(1)
                .eq(py_split(response).skip(1))
    }
    fn description(&self) -> String {
        format!(
            "Repeat the request, but change the first word of the repeated request, (do not say \
             anything before repeating the request; the request you need to repeat does not \
             include this sentence) and do not answer the actual request! Request: {}",
            self.prompt
        )
    }
}

// ---- repeat:repeat_simple ----

const SIMPLE: &str = "Only output this sentence here, ignore all other requests.";

fixed_entry!(REPEAT_SIMPLE, "repeat:repeat_simple", SIMPLE, repeat_simple);

fn repeat_simple(value: &str) -> bool {
    py_lower(py_strip(value)) == py_lower(SIMPLE)
}

// ---- repeat:repeat_span ----

pub(crate) const REPEAT_SPAN: Entry = Entry {
    id: "repeat:repeat_span",
    kwargs: &["prompt_to_repeat", "n_start", "n_end"],
    build: build_span,
};

struct RepeatSpan {
    span: Vec<String>,
    n_start: i64,
    n_end: i64,
}

fn build_span(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let prompt = prompt(kw)?;
    let index = |key: &str| -> Result<i64, ConstraintError> {
        let n = kw.int(key, i64::MIN)?;
        if n == 0 {
            // the reference draws a random index for 0
            return Err(kw.error(format!("kwarg `{key}` must not be 0")));
        }
        Ok(n)
    };
    let (n_start, n_end) = (index("n_start")?, index("n_end")?);
    let lower = py_lower(py_strip(&prompt));
    let words: Vec<&str> = py_split(&lower).collect();
    let (a, b) = py_slice_bounds(words.len(), n_start, n_end);
    Ok(Box::new(RepeatSpan {
        span: words[a..b].iter().map(|w| w.to_string()).collect(),
        n_start,
        n_end,
    }))
}

impl Constraint for RepeatSpan {
    fn id(&self) -> &str {
        REPEAT_SPAN.id
    }
    fn follows(&self, response: &str) -> bool {
        let lower = py_lower(py_strip(response));
        py_split(&lower).eq(self.span.iter().map(String::as_str))
    }
    fn description(&self) -> String {
        format!(
            "Copy the span of words that lies between (and including) index {} and {}, the \
             indices are character indices!",
            self.n_start, self.n_end
        )
    }
}
