//! Reading JSON Lines files (`verify`'s inputs, `eval`'s resumable responses, a run's
//! `steps.jsonl` and `eval.jsonl` for `plot`) one way: one JSON value per line, blank lines
//! skipped, and every error naming the file and the 1-based line (`FILE:LINE: ...`) so that
//! a user can open the file at the line that is wrong.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

/// The non-blank lines of `text`, each parsed, with its 1-based line number. For a caller
/// that words its own error for a line (see [`parse`] for the common one).
pub fn lines(text: &str) -> impl Iterator<Item = (usize, serde_json::Result<Value>)> + '_ {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, serde_json::from_str(l)))
}

/// Every value in `text`, the contents of `path` (named in errors), with its line number;
/// the first line that is not JSON is an error `PATH:LINE: bad JSON: ...`.
pub fn parse(path: &Path, text: &str) -> Result<Vec<(usize, Value)>> {
    lines(text)
        .map(|(line, v)| {
            v.map(|v| (line, v))
                .with_context(|| format!("{}:{line}: bad JSON", path.display()))
        })
        .collect()
}

/// [`parse`] of the file at `path`.
pub fn read(path: &Path) -> Result<Vec<(usize, Value)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_their_line_numbers_and_errors_name_the_line() {
        let path = Path::new("runs/a.jsonl");
        let got = parse(path, "{\"a\": 1}\n\n   \n[2]\n").unwrap();
        assert_eq!(
            got,
            vec![
                (1, serde_json::json!({"a": 1})),
                (4, serde_json::json!([2]))
            ]
        );
        let e = format!("{:#}", parse(path, "{}\n\n{oops\n").unwrap_err());
        assert!(e.starts_with("runs/a.jsonl:3: bad JSON: "), "{e}");
        let e = format!("{:#}", read(Path::new("/nonexistent/x.jsonl")).unwrap_err());
        assert!(e.starts_with("reading /nonexistent/x.jsonl: "), "{e}");
    }
}
