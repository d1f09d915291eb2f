//! The prompt set of an evaluation: a shipped benchmark (`ifeval`, `ifbench`, embedded in the
//! binary, see `hindsight_constraints::benchmarks`) or a JSONL file in the same format
//! (`{key, prompt, instruction_id_list, kwargs}` per line), optionally cut to its first
//! `limit` prompts (a fixed slice, so that every evaluation of a run sees the same set).

use std::path::Path;

use hindsight_constraints::score::{record_from, unsupported, ScoreRecord};
use hindsight_constraints::{benchmarks, supported_ids, Value};

/// Why a prompt set cannot be used (a configuration error: exit code 2 in the CLI).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(
        "unknown benchmark `{0}`: give ifeval, ifbench or a .jsonl file of \
         {{key, prompt, instruction_id_list, kwargs}} records"
    )]
    Unknown(String),
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name}:{line}: {why}")]
    Line {
        name: String,
        line: usize,
        why: String,
    },
    #[error("{0}: no prompts")]
    Empty(String),
    #[error("{name}: instruction id(s) this build does not verify: {ids}")]
    Unsupported { name: String, ids: String },
}

/// One prompt of the set: the benchmark's record (scored with the response) and its text.
#[derive(Clone, Debug)]
pub struct EvalPrompt {
    pub prompt: String,
    pub record: ScoreRecord,
}

/// A prompt set.
#[derive(Clone, Debug)]
pub struct Benchmark {
    /// `ifeval`, `ifbench`, or the file's stem.
    pub name: String,
    pub prompts: Vec<EvalPrompt>,
}

impl Benchmark {
    /// `spec` is `ifeval`, `ifbench` or a path to a JSONL file; `limit` keeps the first N
    /// prompts (0 = all).
    pub fn load(spec: &str, limit: usize) -> Result<Self, BenchError> {
        let (name, text) = match benchmarks::jsonl(spec) {
            Some(text) => (spec.to_string(), text.to_string()),
            None => {
                let path = Path::new(spec);
                if !path.exists() && !spec.ends_with(".jsonl") && !spec.contains('/') {
                    return Err(BenchError::Unknown(spec.to_string()));
                }
                let text = std::fs::read_to_string(path).map_err(|source| BenchError::Read {
                    path: spec.to_string(),
                    source,
                })?;
                (spec.to_string(), text)
            }
        };
        let mut b = Self::parse(&name, &text, limit)?;
        if let Some(stem) = benchmarks::jsonl(spec)
            .is_none()
            .then(|| Path::new(spec).file_stem())
            .flatten()
        {
            b.name = stem.to_string_lossy().into_owned();
        }
        Ok(b)
    }

    /// Parses benchmark JSONL (`name` is used in messages).
    pub fn parse(name: &str, text: &str, limit: usize) -> Result<Self, BenchError> {
        let mut prompts = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if limit > 0 && prompts.len() == limit {
                break;
            }
            let err = |why: String| BenchError::Line {
                name: name.to_string(),
                line: i + 1,
                why,
            };
            let v: Value = serde_json::from_str(line).map_err(|e| err(format!("bad JSON: {e}")))?;
            let prompt = v
                .get("prompt")
                .and_then(Value::as_str)
                .ok_or_else(|| err("no \"prompt\" string".into()))?
                .to_string();
            let record = record_from(&v, String::new()).map_err(err)?;
            prompts.push(EvalPrompt { prompt, record });
        }
        if prompts.is_empty() {
            return Err(BenchError::Empty(name.to_string()));
        }
        let records: Vec<ScoreRecord> = prompts.iter().map(|p| p.record.clone()).collect();
        let unknown = unsupported(&records);
        if !unknown.is_empty() {
            return Err(BenchError::Unsupported {
                name: name.to_string(),
                ids: format!(
                    "{} (this build supports {} ids)",
                    unknown.keys().cloned().collect::<Vec<_>>().join(", "),
                    supported_ids().len()
                ),
            });
        }
        Ok(Self {
            name: name.to_string(),
            prompts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_sets_load_with_limits() {
        assert_eq!(Benchmark::load("ifeval", 0).unwrap().prompts.len(), 541);
        assert_eq!(Benchmark::load("ifbench", 0).unwrap().prompts.len(), 294);
        let b = Benchmark::load("ifeval", 5).unwrap();
        assert_eq!((b.name.as_str(), b.prompts.len()), ("ifeval", 5));
        assert!(b.prompts[0].prompt.starts_with("Write a 300+ word summary"));
    }

    #[test]
    fn bad_input_is_named() {
        let e = Benchmark::load("mmlu", 0).unwrap_err().to_string();
        assert!(e.contains("unknown benchmark `mmlu`"), "{e}");
        let e = Benchmark::load("/nonexistent/x.jsonl", 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("reading /nonexistent/x.jsonl"), "{e}");
        let good = r#"{"key": 1, "prompt": "Hi", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}"#;
        let e = Benchmark::parse("f", &format!("{good}\n{{oops\n"), 0)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f:2: bad JSON"), "{e}");
        let e = Benchmark::parse(
            "f",
            r#"{"prompt": "x", "instruction_id_list": ["no:such"]}"#,
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no:such"), "{e}");
    }
}
