//! The instruction-id registry: maps each supported id to its builder and accepted
//! kwargs, and exposes [`build`], [`describe`] and [`supported_ids`].
//!
//! Adding an id = one new file (a module exporting an [`Entry`]) plus one line in its
//! benchmark's `ENTRIES` table (e.g. `ifeval::ENTRIES`, later `ifbench::ENTRIES`).

use std::sync::LazyLock;

use serde_json::{Map, Value};

use crate::kwargs::Kwargs;
use crate::{Constraint, ConstraintError, ConstraintSpec};

/// Builder signature: validated kwargs in, verifier out.
pub(crate) type BuildFn = fn(&Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError>;

/// One registered instruction id.
pub(crate) struct Entry {
    /// The instruction id, e.g. `"punctuation:no_comma"`.
    pub id: &'static str,
    /// The kwargs names the reference `build_description` takes (others are rejected).
    pub kwargs: &'static [&'static str],
    pub build: BuildFn,
}

/// All benchmark tables, in order.
fn tables() -> impl Iterator<Item = &'static Entry> {
    crate::ifeval::ENTRIES
        .iter()
        .chain(crate::ifbench::ENTRIES.iter())
}

static IDS: LazyLock<Vec<&'static str>> = LazyLock::new(|| tables().map(|e| e.id).collect());

/// The instruction ids [`build`] accepts.
pub fn supported_ids() -> &'static [&'static str] {
    &IDS
}

/// Build (and validate) the verifier for `spec`.
///
/// Errors: [`ConstraintError::UnknownId`] for an unsupported id;
/// [`ConstraintError::BadKwargs`] for a missing, ill-typed, out-of-range or unexpected
/// kwarg (a `null` value counts as absent).
pub fn build(spec: &ConstraintSpec) -> Result<Box<dyn Constraint>, ConstraintError> {
    build_from(&spec.instruction_id, &spec.kwargs)
}

/// [`build`] from an instruction id and its kwargs, for callers that hold them
/// separately (no [`ConstraintSpec`] to assemble, nothing cloned).
pub fn build_from(
    instruction_id: &str,
    kwargs: &Map<String, Value>,
) -> Result<Box<dyn Constraint>, ConstraintError> {
    let entry = tables()
        .find(|e| e.id == instruction_id)
        .ok_or_else(|| ConstraintError::UnknownId(instruction_id.to_string()))?;
    let kw = Kwargs::new(entry.id, kwargs, entry.kwargs)?;
    (entry.build)(&kw)
}

/// The instruction text for `spec` (the reference `build_description`).
pub fn describe(spec: &ConstraintSpec) -> Result<String, ConstraintError> {
    Ok(build(spec)?.description())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(id: &str, kwargs: serde_json::Value) -> ConstraintSpec {
        serde_json::from_value(json!({"instruction_id": id, "kwargs": kwargs})).unwrap()
    }

    #[test]
    fn ids_unique_and_buildable_ids_match() {
        let ids = supported_ids();
        assert!(ids.len() >= 25);
        let mut sorted = ids.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
        let c = build(&spec("punctuation:no_comma", json!({}))).unwrap();
        assert_eq!(c.id(), "punctuation:no_comma");
    }

    #[test]
    fn errors() {
        assert_eq!(
            build(&spec("nope:nothing", json!({}))).err(),
            Some(ConstraintError::UnknownId("nope:nothing".into()))
        );
        let bad = [
            ("punctuation:no_comma", json!({"x": 1})),
            (
                "length_constraints:number_words",
                json!({"relation": "at least"}),
            ),
            (
                "length_constraints:number_words",
                json!({"relation": "about", "num_words": 5}),
            ),
            (
                "length_constraints:number_words",
                json!({"relation": "at least", "num_words": -1}),
            ),
            (
                "length_constraints:number_words",
                json!({"relation": "at least", "num_words": 1.5}),
            ),
            (
                "length_constraints:number_words",
                json!({"relation": "at least", "num_words": "7"}),
            ),
            ("keywords:existence", json!({"keywords": []})),
            ("keywords:existence", json!({"keywords": "abc"})),
            ("keywords:existence", json!({"keywords": ["a", 3]})),
            ("keywords:existence", json!({"keywords": ["(unclosed"]})),
            ("keywords:existence", json!(null)),
            (
                "keywords:frequency",
                json!({"keyword": " ", "frequency": 2, "relation": "at least"}),
            ),
            ("startend:end_checker", json!({"end_phrase": null})),
            ("detectable_content:postscript", json!({})),
            (
                "detectable_format:number_bullet_lists",
                json!({"num_bullets": true}),
            ),
        ];
        for (id, kw) in bad {
            match build(&spec(id, kw.clone())) {
                Err(ConstraintError::BadKwargs { id: got, reason }) => {
                    assert_eq!(got, id);
                    assert!(!reason.is_empty());
                }
                other => panic!(
                    "{id} {kw}: expected BadKwargs, got {:?}",
                    other.map(|c| c.description())
                ),
            }
        }
        // null kwargs values and a null kwargs object count as absent
        assert!(build(&spec("punctuation:no_comma", json!({"num_words": null}))).is_ok());
        assert!(build(&spec("detectable_format:title", json!(null))).is_ok());
    }
}
