//! `detectable_format:json_format` (reference `JsonFormat`): after stripping and removing
//! one leading code fence (```` ```json ````, ```` ```Json ````, ```` ```JSON ````, then
//! ```` ``` ````, applied in sequence as the reference does) and one trailing ```` ``` ````,
//! the text must be accepted by Python's `json.loads` (see [`crate::jsonval`]).

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{jsonval, pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "detectable_format:json_format",
    kwargs: &[],
    build,
};

struct JsonFormat;

fn build(_: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(JsonFormat))
}

/// The reference's `strip().removeprefix(...)...removesuffix("```").strip()` chain.
fn unfence(response: &str) -> &str {
    let mut v = pytext::py_strip(response);
    for prefix in ["```json", "```Json", "```JSON", "```"] {
        v = v.strip_prefix(prefix).unwrap_or(v);
    }
    v = v.strip_suffix("```").unwrap_or(v);
    pytext::py_strip(v)
}

impl Constraint for JsonFormat {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        jsonval::python_json_loads_ok(unfence(response))
    }
    fn description(&self) -> String {
        "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```."
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::unfence;

    #[test]
    fn unfence_like_reference() {
        assert_eq!(unfence(" ```json\n{}\n``` "), "{}");
        assert_eq!(unfence("```json```{}```"), "{}");
        assert_eq!(unfence("```JSON\n[1]\n```"), "[1]");
        assert_eq!(unfence("```"), "");
        assert_eq!(unfence("{\"a\": 1}"), "{\"a\": 1}");
    }
}
