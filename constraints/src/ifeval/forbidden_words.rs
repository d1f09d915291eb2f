//! `keywords:forbidden_words` (reference `ForbiddenWords`): no forbidden word occurs as a
//! whole word (`\b` + word + `\b`, case-insensitive). Plain words use Python's exact `\b`
//! (Unicode `\w` = letters, numbers, `_`); a word containing regex metacharacters is used
//! as a pattern, as in the reference, with the `regex` crate's `\b`.

use std::sync::Arc;

use regex::Regex;

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "keywords:forbidden_words",
    kwargs: &["forbidden_words"],
    build,
};

enum Matcher {
    /// Case-insensitive literal; word boundaries checked with Python's `\w`.
    Literal(Arc<Regex>),
    /// Pattern with `\b` on both sides, as compiled by the `regex` crate.
    Pattern(Arc<Regex>),
}

impl Matcher {
    fn found_in(&self, text: &str) -> bool {
        match self {
            Matcher::Pattern(re) => re.is_match(text),
            Matcher::Literal(re) => {
                let mut pos = 0;
                while let Some(m) = re.find_at(text, pos) {
                    if pytext::is_py_word_boundary(text, m.start())
                        && pytext::is_py_word_boundary(text, m.end())
                    {
                        return true;
                    }
                    // Retry from the next character: matches may overlap.
                    let step = text[m.start()..].chars().next().map_or(1, char::len_utf8);
                    pos = m.start() + step;
                    if pos > text.len() {
                        break;
                    }
                }
                false
            }
        }
    }
}

struct ForbiddenWords {
    /// Deduplicated and sorted, as the reference does (`sorted(set(...))`).
    words: Vec<String>,
    matchers: Vec<Matcher>,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let mut words = kw.string_list("forbidden_words")?;
    words.sort();
    words.dedup();
    let matchers = words
        .iter()
        .map(|w| {
            let (pattern, literal) = if pytext::is_literal_pattern(w) {
                (format!("(?i){}", regex::escape(w)), true)
            } else {
                (format!(r"(?i)\b{w}\b"), false)
            };
            let re = pytext::compile(&pattern)
                .map_err(|e| kw.error(format!("forbidden word {w:?}: {e}")))?;
            Ok(if literal {
                Matcher::Literal(re)
            } else {
                Matcher::Pattern(re)
            })
        })
        .collect::<Result<_, ConstraintError>>()?;
    Ok(Box::new(ForbiddenWords { words, matchers }))
}

impl Constraint for ForbiddenWords {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        !self.matchers.iter().any(|m| m.found_in(response))
    }
    fn description(&self) -> String {
        format!(
            "Do not include keywords {} in the response.",
            pytext::py_repr_str_list(&self.words)
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::{build, ConstraintSpec};
    use serde_json::json;

    fn forbid(words: serde_json::Value) -> Box<dyn crate::Constraint> {
        build(
            &serde_json::from_value::<ConstraintSpec>(json!({
                "instruction_id": "keywords:forbidden_words",
                "kwargs": {"forbidden_words": words}
            }))
            .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn whole_words_case_insensitive() {
        let c = forbid(json!(["run", "run", "bark"]));
        assert_eq!(
            c.description(),
            "Do not include keywords ['bark', 'run'] in the response."
        );
        assert!(!c.follows("I RUN daily"));
        assert!(c.follows("running is fun, barking too"));
        assert!(!c.follows("a run."));
        assert!(c.follows("run_away"));
        assert!(c.follows("rune\u{301}")); // é decomposed: 'e' continues the word
        assert!(!c.follows("run\u{301}")); // combining mark is not \w in Python
        assert!(!c.follows("rerun run"));
        let c = forbid(json!(["t-shirt"]));
        assert!(!c.follows("my T-Shirt!"));
        assert!(c.follows("my t-shirts"));
        let c = forbid(json!(["colou?r"]));
        assert!(!c.follows("What color?"));
        assert!(c.follows("colors"));
    }
}
