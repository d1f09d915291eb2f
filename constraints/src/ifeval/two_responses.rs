//! `combination:two_responses` (reference `TwoResponsesChecker`): splitting on `******`
//! gives exactly two non-blank pieces that differ after stripping, with no blank piece
//! other than the first or last.

use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

pub(crate) const ENTRY: Entry = Entry {
    id: "combination:two_responses",
    kwargs: &[],
    build,
};

struct TwoResponses;

fn build(_: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(TwoResponses))
}

impl Constraint for TwoResponses {
    fn id(&self) -> &str {
        ENTRY.id
    }
    fn follows(&self, response: &str) -> bool {
        let pieces: Vec<&str> = response.split("******").collect();
        let last = pieces.len() - 1;
        let mut valid = Vec::with_capacity(2);
        for (i, p) in pieces.iter().enumerate() {
            if pytext::is_blank(p) {
                if i != 0 && i != last {
                    return false;
                }
            } else {
                valid.push(*p);
            }
        }
        valid.len() == 2 && pytext::py_strip(valid[0]) != pytext::py_strip(valid[1])
    }
    fn description(&self) -> String {
        "Give two different responses. Responses and only responses should be separated by 6 \
         asterisk symbols: ******."
            .to_string()
    }
}
