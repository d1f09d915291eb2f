//! Typed, validating access to a constraint's kwargs (`null` = absent), shared by all
//! verifier builders, plus the `less than` / `at least` relation used by counting checks.

use serde_json::{Map, Value};

use crate::ConstraintError;

/// The kwargs of one spec, checked against the names the instruction id accepts.
pub(crate) struct Kwargs<'a> {
    id: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Kwargs<'a> {
    /// Wraps `map`, rejecting any non-null key not in `accepted`.
    pub(crate) fn new(
        id: &'a str,
        map: &'a Map<String, Value>,
        accepted: &[&str],
    ) -> Result<Self, ConstraintError> {
        let kw = Self { id, map };
        for (k, v) in map {
            if !v.is_null() && !accepted.contains(&k.as_str()) {
                let reason = if accepted.is_empty() {
                    format!("unexpected kwarg `{k}` (this instruction takes none)")
                } else {
                    format!("unexpected kwarg `{k}` (accepted: {})", accepted.join(", "))
                };
                return Err(kw.error(reason));
            }
        }
        Ok(kw)
    }

    pub(crate) fn error(&self, reason: impl Into<String>) -> ConstraintError {
        ConstraintError::BadKwargs {
            id: self.id.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Result<&'a Value, ConstraintError> {
        match self.map.get(key) {
            Some(v) if !v.is_null() => Ok(v),
            _ => Err(self.error(format!("missing required kwarg `{key}`"))),
        }
    }

    /// A required string kwarg.
    pub(crate) fn string(&self, key: &str) -> Result<&'a str, ConstraintError> {
        self.get(key)?
            .as_str()
            .ok_or_else(|| self.error(format!("kwarg `{key}` must be a string")))
    }

    /// A required string kwarg that is not empty after Python `strip()`; returned stripped.
    pub(crate) fn nonblank_string(&self, key: &str) -> Result<&'a str, ConstraintError> {
        let s = crate::pytext::py_strip(self.string(key)?);
        if s.is_empty() {
            return Err(self.error(format!("kwarg `{key}` must not be empty")));
        }
        Ok(s)
    }

    /// A required integer kwarg with `value >= min`.
    pub(crate) fn int(&self, key: &str, min: i64) -> Result<i64, ConstraintError> {
        let v = self.get(key)?;
        let n = v
            .as_i64()
            .ok_or_else(|| self.error(format!("kwarg `{key}` must be an integer, got {v}")))?;
        if n < min {
            return Err(self.error(format!("kwarg `{key}` must be at least {min}, got {n}")));
        }
        Ok(n)
    }

    /// A required non-empty list of non-empty strings.
    pub(crate) fn string_list(&self, key: &str) -> Result<Vec<String>, ConstraintError> {
        let v = self.get(key)?;
        let items = v
            .as_array()
            .ok_or_else(|| self.error(format!("kwarg `{key}` must be a list of strings")))?;
        if items.is_empty() {
            return Err(self.error(format!("kwarg `{key}` must not be an empty list")));
        }
        items
            .iter()
            .map(|item| match item.as_str() {
                Some("") => Err(self.error(format!("kwarg `{key}` contains an empty string"))),
                Some(s) => Ok(s.to_string()),
                None => Err(self.error(format!("kwarg `{key}` must contain only strings"))),
            })
            .collect()
    }

    /// A required comparison relation (`"less than"` or `"at least"`).
    pub(crate) fn relation(&self, key: &str) -> Result<Relation, ConstraintError> {
        match self.string(key)? {
            "less than" => Ok(Relation::LessThan),
            "at least" => Ok(Relation::AtLeast),
            other => Err(self.error(format!(
                "kwarg `{key}` must be \"less than\" or \"at least\", got {other:?}"
            ))),
        }
    }
}

/// The reference `_COMPARISON_RELATION`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Relation {
    LessThan,
    AtLeast,
}

impl Relation {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Relation::LessThan => "less than",
            Relation::AtLeast => "at least",
        }
    }

    /// `actual < threshold` or `actual >= threshold`.
    pub(crate) fn holds(self, actual: usize, threshold: i64) -> bool {
        let actual = i64::try_from(actual).unwrap_or(i64::MAX);
        match self {
            Relation::LessThan => actual < threshold,
            Relation::AtLeast => actual >= threshold,
        }
    }
}
