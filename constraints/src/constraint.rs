//! Core types: the serialisable constraint spec, the build error, and the
//! [`Constraint`] trait every verifier implements (strict and loose checking).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::{loose, pytext};

/// One constraint of a prompt: an instruction id (e.g. `"punctuation:no_comma"`) and its
/// keyword arguments, with the same names and meaning as the reference checker's
/// `build_description` parameters. A `null` value means "absent" (as in the IFEval data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConstraintSpec {
    pub instruction_id: String,
    #[serde(default, deserialize_with = "null_as_empty_map")]
    pub kwargs: Map<String, Value>,
}

impl ConstraintSpec {
    /// A spec with the given id and kwargs (convenience constructor).
    pub fn new(instruction_id: impl Into<String>, kwargs: Map<String, Value>) -> Self {
        Self {
            instruction_id: instruction_id.into(),
            kwargs,
        }
    }
}

fn null_as_empty_map<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    Ok(Option::<Map<String, Value>>::deserialize(d)?.unwrap_or_default())
}

/// Why a constraint could not be built.
///
/// Where the reference checker would silently draw a random value (a missing kwarg, a
/// negative count, ...), we refuse instead, so that building is deterministic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// The instruction id is not (yet) supported by this crate.
    #[error("unknown instruction id `{0}`")]
    UnknownId(String),
    /// A kwarg is missing, of the wrong type, out of range, or not accepted by the id.
    #[error("invalid kwargs for `{id}`: {reason}")]
    BadKwargs { id: String, reason: String },
}

/// A built, validated verifier for one constraint.
///
/// Implementations only provide [`Constraint::follows`] (the reference
/// `check_following`); strict and loose mode are derived from it exactly as the reference
/// evaluation harness does. None of the methods may panic, whatever the input.
pub trait Constraint: Send + Sync {
    /// The instruction id, e.g. `"keywords:existence"`.
    fn id(&self) -> &str;

    /// The reference checker's `check_following` on one (already chosen) text. Unlike
    /// [`Constraint::check_strict`] it does not reject empty responses.
    fn follows(&self, response: &str) -> bool;

    /// Strict verdict, as the reference harness computes it: the response must contain
    /// something other than whitespace and the checker must accept it.
    fn check_strict(&self, response: &str) -> bool {
        !pytext::is_blank(response) && self.follows(response)
    }

    /// Loose verdict: strict verdict on any of the reference's response variants
    /// (first line, last line or both removed, and each of those with `*` removed).
    fn check_loose(&self, response: &str) -> bool {
        loose::any_variant(response, |v| self.check_strict(v))
    }

    /// The loose verdict given the strict one (`strict` must be
    /// `self.check_strict(response)`): the response itself, the first loose variant, is
    /// not checked again.
    fn check_loose_given_strict(&self, response: &str, strict: bool) -> bool {
        strict || loose::any_other_variant(response, |v| self.check_strict(v))
    }

    /// The instruction text (the reference `build_description` output).
    fn description(&self) -> String;
}
