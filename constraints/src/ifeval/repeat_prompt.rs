//! `combination:repeat_prompt` (reference `RepeatPromptThenAnswer`): the stripped,
//! lowercased response starts with the stripped, lowercased `prompt_to_repeat`.
//!
//! Deliberate difference: a blank `prompt_to_repeat` (which the reference accepts unless
//! empty, making the check always pass) is rejected at build time.

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "combination:repeat_prompt",
    kwargs: &["prompt_to_repeat"],
    build,
};

struct RepeatPrompt {
    prompt_lower: String,
}

fn build(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(RepeatPrompt {
        prompt_lower: kw.nonblank_string("prompt_to_repeat")?.to_lowercase(),
    }))
}

impl Constraint for RepeatPrompt {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        let v = pytext::py_strip(response);
        if v.len() * 3 < self.prompt_lower.len() {
            // lowercasing at most triples the UTF-8 length
            return false;
        }
        v.to_lowercase().starts_with(&self.prompt_lower)
    }
    fn description(&self) -> String {
        "First repeat the request word for word without change, then give your answer (1. do \
         not say any words or characters before repeating the request; 2. the request you need \
         to repeat does not include this sentence)"
            .to_string()
    }
}
