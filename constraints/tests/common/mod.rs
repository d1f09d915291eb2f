//! Shared helpers for the integration tests: locating the reference oracle and reading
//! its JSONL files.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The oracle root (the directory holding `golden/` and `data/`): `$HINDSIGHT_ORACLE_DIR`
/// if set, else `../../shared/oracle` relative to this crate. Panics (fails the test) with
/// a clear message when it is missing: conformance must never be skipped silently.
pub fn oracle_dir() -> PathBuf {
    let dir = match std::env::var_os("HINDSIGHT_ORACLE_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/oracle"),
    };
    assert!(
        dir.join("golden").is_dir(),
        "reference oracle not found: {} has no golden/ directory. Set HINDSIGHT_ORACLE_DIR to \
         the oracle root (the directory containing golden/ and data/).",
        dir.display()
    );
    dir
}

/// Every line of a JSONL file, parsed.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}:{}: bad JSON: {e}", path.display(), i + 1))
        })
        .collect()
}

/// A record key (int or string in the files) as a string.
pub fn key_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One golden input record: key, instruction ids, kwargs, response.
pub struct Case {
    pub key: String,
    pub ids: Vec<String>,
    pub kwargs: Vec<serde_json::Map<String, Value>>,
    pub response: String,
}

/// The [`Case`]s of oracle input records; `response_of` finds each record's response.
pub fn cases_from(records: &[Value], response_of: impl Fn(&Value) -> String) -> Vec<Case> {
    records
        .iter()
        .map(|r| Case {
            key: key_str(&r["key"]),
            ids: r["instruction_id_list"]
                .as_array()
                .expect("instruction_id_list")
                .iter()
                .map(|v| v.as_str().expect("id").to_string())
                .collect(),
            kwargs: r["kwargs"]
                .as_array()
                .expect("kwargs")
                .iter()
                .map(|v| v.as_object().cloned().unwrap_or_default())
                .collect(),
            response: response_of(r),
        })
        .collect()
}
