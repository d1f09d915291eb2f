//! `length_constraints:nth_paragraph_first_word` (reference `ParagraphFirstWordCheck`):
//! splitting on `"\n\n"` gives `num_paragraphs` non-blank paragraphs, and the
//! `nth_paragraph`-th piece (indexing the raw split, blank pieces included, as the
//! reference does) starts with `first_word`: its first whitespace-separated word, with
//! leading `'` then `"` removed, lowercased, up to the first of `.,?!'"`.

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "length_constraints:nth_paragraph_first_word",
    kwargs: &["num_paragraphs", "nth_paragraph", "first_word"],
    build,
};

struct NthParagraphFirstWord {
    num_paragraphs: i64,
    nth_paragraph: i64,
    first_word: String,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let num_paragraphs = kw.int("num_paragraphs", 0)?;
    let nth_paragraph = kw.int("nth_paragraph", 1)?;
    if nth_paragraph > num_paragraphs {
        return Err(kw.error(format!(
            "kwarg `nth_paragraph` ({nth_paragraph}) must not exceed `num_paragraphs` \
             ({num_paragraphs})"
        )));
    }
    Ok(Box::new(NthParagraphFirstWord {
        num_paragraphs,
        nth_paragraph,
        first_word: kw.string("first_word")?.to_lowercase(),
    }))
}

impl Constraint for NthParagraphFirstWord {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        let pieces: Vec<&str> = response.split("\n\n").collect();
        let n = pieces.iter().filter(|p| !pytext::is_blank(p)).count();
        let Ok(nth) = usize::try_from(self.nth_paragraph) else {
            return false;
        };
        if nth > n || nth == 0 {
            return false;
        }
        let paragraph = pytext::py_strip(pieces[nth - 1]);
        let Some(word) = paragraph.split(pytext::is_py_space).find(|w| !w.is_empty()) else {
            return false;
        };
        let word = word.trim_start_matches('\'').trim_start_matches('"');
        let mut first = String::new();
        for c in word.chars() {
            if matches!(c, '.' | ',' | '?' | '!' | '\'' | '"') {
                break;
            }
            first.extend(c.to_lowercase());
        }
        i64::try_from(n).is_ok_and(|n| n == self.num_paragraphs) && first == self.first_word
    }
    fn description(&self) -> String {
        format!(
            "There should be {} paragraphs. Paragraphs and only paragraphs are separated with \
             each other by two new lines as if it was '\\n\\n' in python. Paragraph {} must \
             start with word {}.",
            self.num_paragraphs, self.nth_paragraph, self.first_word
        )
    }
}
