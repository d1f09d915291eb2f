//! Training-prompt records: the serialisable [`PromptRecord`], its compiled form
//! ([`CompiledRecord`]: instruction text, verification, HiR rewrite) and the JSONL loader
//! (the only I/O in this crate).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{build, hir, Constraint, ConstraintError, ConstraintSpec};

/// How a record's question and constraint descriptions are laid out (the reference HiR
/// templates; see [`hir::layout`]). Serialized as `"type1"` .. `"type6"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Template {
    #[default]
    Type1,
    Type2,
    Type3,
    Type4,
    Type5,
    Type6,
}

impl Template {
    /// All templates, in order.
    pub const ALL: [Template; 6] = [
        Template::Type1,
        Template::Type2,
        Template::Type3,
        Template::Type4,
        Template::Type5,
        Template::Type6,
    ];
}

/// One training prompt: a task question plus the constraints it must satisfy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    pub id: String,
    pub question: String,
    pub constraints: Vec<ConstraintSpec>,
    #[serde(default)]
    pub template: Template,
}

impl PromptRecord {
    /// Build every constraint once (validating its kwargs) and precompute descriptions.
    pub fn compile(&self) -> Result<CompiledRecord, ConstraintError> {
        let constraints = self
            .constraints
            .iter()
            .map(build)
            .collect::<Result<Vec<_>, ConstraintError>>()?;
        let descriptions = constraints.iter().map(|c| c.description()).collect();
        Ok(CompiledRecord {
            record: self.clone(),
            constraints,
            descriptions,
        })
    }
}

/// A record with its verifiers built: ready to produce instructions, verdicts, rewrites.
pub struct CompiledRecord {
    pub record: PromptRecord,
    /// One verifier per `record.constraints` entry, same order.
    pub constraints: Vec<Box<dyn Constraint>>,
    /// `constraints[i].description()`, precomputed.
    pub descriptions: Vec<String>,
}

impl std::fmt::Debug for CompiledRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRecord")
            .field("record", &self.record)
            .field("descriptions", &self.descriptions)
            .finish_non_exhaustive()
    }
}

/// The HiR relabelled instruction: only the satisfied constraints, in original order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub instruction: String,
    /// Original indices of the kept constraints, ascending.
    pub kept: Vec<usize>,
    /// Their instruction ids, same order as `kept`.
    pub kept_ids: Vec<String>,
}

impl CompiledRecord {
    fn layout_of(&self, indices: impl Iterator<Item = usize>) -> String {
        let descriptions: Vec<&str> = indices.map(|i| self.descriptions[i].as_str()).collect();
        hir::layout(self.record.template, &self.record.question, &descriptions)
    }

    /// The full instruction (question + all constraints), laid out by the record's template.
    pub fn instruction(&self) -> String {
        self.layout_of(0..self.descriptions.len())
    }

    /// Strict verdict per constraint (reference strict mode). An empty or whitespace-only
    /// response fails every constraint.
    pub fn verify(&self, response: &str) -> Vec<bool> {
        if crate::pytext::is_blank(response) {
            return vec![false; self.constraints.len()];
        }
        self.constraints
            .iter()
            .map(|c| c.check_strict(response))
            .collect()
    }

    /// Loose verdict per constraint (reference loose mode).
    pub fn verify_loose(&self, response: &str) -> Vec<bool> {
        self.constraints
            .iter()
            .map(|c| c.check_loose(response))
            .collect()
    }

    /// The hindsight instruction keeping exactly the constraints with `verdicts[i] ==
    /// true` (a missing verdict counts as false; extra verdicts are ignored), or `None`
    /// when none holds.
    pub fn rewrite(&self, verdicts: &[bool]) -> Option<Rewrite> {
        let kept: Vec<usize> = verdicts
            .iter()
            .take(self.constraints.len())
            .enumerate()
            .filter_map(|(i, &ok)| ok.then_some(i))
            .collect();
        if kept.is_empty() {
            return None;
        }
        let kept_ids = kept
            .iter()
            .map(|&i| self.constraints[i].id().to_string())
            .collect();
        Some(Rewrite {
            instruction: self.layout_of(kept.iter().copied()),
            kept,
            kept_ids,
        })
    }
}

/// Why [`load_jsonl`] failed. Line numbers are 1-based.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("line {line}: invalid prompt record JSON: {source}")]
    Json {
        line: usize,
        source: serde_json::Error,
    },
    #[error("line {line}: record `{id}`, constraint {index}: {source}")]
    Constraint {
        line: usize,
        id: String,
        index: usize,
        source: ConstraintError,
    },
    #[error("line {line}: record `{id}` has no constraints")]
    NoConstraints { line: usize, id: String },
    #[error("line {line}: duplicate record id `{id}` (first on line {first_line})")]
    DuplicateId {
        line: usize,
        id: String,
        first_line: usize,
    },
}

impl LoadError {
    /// The 1-based line the error is on (None for I/O errors).
    pub fn line(&self) -> Option<usize> {
        match self {
            LoadError::Io { .. } => None,
            LoadError::Json { line, .. }
            | LoadError::Constraint { line, .. }
            | LoadError::NoConstraints { line, .. }
            | LoadError::DuplicateId { line, .. } => Some(*line),
        }
    }
}

/// Parse and validate `text` as JSONL prompt records (blank lines are skipped).
pub(crate) fn parse_jsonl(text: &str) -> Result<Vec<PromptRecord>, LoadError> {
    let mut records = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let record: PromptRecord =
            serde_json::from_str(raw).map_err(|source| LoadError::Json { line, source })?;
        if record.constraints.is_empty() {
            return Err(LoadError::NoConstraints {
                line,
                id: record.id,
            });
        }
        for (index, spec) in record.constraints.iter().enumerate() {
            build(spec).map_err(|source| LoadError::Constraint {
                line,
                id: record.id.clone(),
                index,
                source,
            })?;
        }
        if let Some(&first_line) = seen.get(&record.id) {
            return Err(LoadError::DuplicateId {
                line,
                id: record.id,
                first_line,
            });
        }
        seen.insert(record.id.clone(), line);
        records.push(record);
    }
    Ok(records)
}

/// Load prompt records from a JSONL file, one [`PromptRecord`] per line, validating each
/// (every constraint must build, ids must be unique, at least one constraint each).
pub fn load_jsonl(path: &Path) -> Result<Vec<PromptRecord>, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_jsonl(&text)
}
