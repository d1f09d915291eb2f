//! Python's `csv.reader(io.StringIO(text), delimiter=...)` with the default `excel`
//! dialect (quote `"`, doubled quotes, no escape character, `strict=False`), as the
//! CPython 3.11 `_csv` state machine parses it: lines split after `\n`, `[]` for a blank
//! line, quoted fields may span lines, `\r` ends a record, and an error (`None` here)
//! for a character after `\r` inside a line or a field over 131072 characters.

const FIELD_LIMIT: usize = 131_072;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    StartRecord,
    StartField,
    InField,
    InQuotedField,
    QuoteInQuotedField,
    EatCrnl,
}

/// One input character or the end-of-line marker the reader feeds after each line.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Input {
    Char(char),
    Eol,
}

struct Parser {
    delimiter: char,
    state: State,
    field: String,
    field_len: usize,
    fields: Vec<String>,
}

impl Parser {
    fn save_field(&mut self) {
        self.fields.push(std::mem::take(&mut self.field));
        self.field_len = 0;
    }

    fn add_char(&mut self, c: char) -> Option<()> {
        if self.field_len >= FIELD_LIMIT {
            return None;
        }
        self.field.push(c);
        self.field_len += 1;
        Some(())
    }

    fn process(&mut self, input: Input) -> Option<()> {
        let is_nl = |i: Input| matches!(i, Input::Char('\n') | Input::Char('\r'));
        let mut state = self.state;
        if state == State::StartRecord {
            if input == Input::Eol {
                return Some(()); // empty line: the record is []
            }
            if is_nl(input) {
                self.state = State::EatCrnl;
                return Some(());
            }
            state = State::StartField;
        }
        match state {
            State::StartField => {
                if is_nl(input) || input == Input::Eol {
                    self.save_field();
                    self.state = if input == Input::Eol {
                        State::StartRecord
                    } else {
                        State::EatCrnl
                    };
                } else if input == Input::Char('"') {
                    self.state = State::InQuotedField;
                } else if input == Input::Char(self.delimiter) {
                    self.save_field();
                    self.state = State::StartField;
                } else if let Input::Char(c) = input {
                    self.add_char(c)?;
                    self.state = State::InField;
                }
            }
            State::InField => {
                if is_nl(input) || input == Input::Eol {
                    self.save_field();
                    self.state = if input == Input::Eol {
                        State::StartRecord
                    } else {
                        State::EatCrnl
                    };
                } else if input == Input::Char(self.delimiter) {
                    self.save_field();
                    self.state = State::StartField;
                } else if let Input::Char(c) = input {
                    self.add_char(c)?;
                    self.state = State::InField;
                }
            }
            State::InQuotedField => match input {
                Input::Eol => self.state = State::InQuotedField,
                Input::Char('"') => self.state = State::QuoteInQuotedField,
                Input::Char(c) => {
                    self.add_char(c)?;
                    self.state = State::InQuotedField;
                }
            },
            State::QuoteInQuotedField => {
                if input == Input::Char('"') {
                    self.add_char('"')?;
                    self.state = State::InQuotedField;
                } else if input == Input::Char(self.delimiter) {
                    self.save_field();
                    self.state = State::StartField;
                } else if is_nl(input) || input == Input::Eol {
                    self.save_field();
                    self.state = if input == Input::Eol {
                        State::StartRecord
                    } else {
                        State::EatCrnl
                    };
                } else if let Input::Char(c) = input {
                    self.add_char(c)?;
                    self.state = State::InField;
                }
            }
            State::EatCrnl => {
                if is_nl(input) {
                } else if input == Input::Eol {
                    self.state = State::StartRecord;
                } else {
                    return None; // "new-line character seen in unquoted field"
                }
            }
            State::StartRecord => unreachable!("handled above"),
        }
        Some(())
    }
}

/// `list(csv.reader(io.StringIO(text), delimiter=delimiter))`, or `None` where Python
/// raises `csv.Error`.
pub(crate) fn read_rows(text: &str, delimiter: char) -> Option<Vec<Vec<String>>> {
    let mut p = Parser {
        delimiter,
        state: State::StartRecord,
        field: String::new(),
        field_len: 0,
        fields: Vec::new(),
    };
    let mut rows = Vec::new();
    for line in text.split_inclusive('\n') {
        for c in line.chars() {
            p.process(Input::Char(c))?;
        }
        p.process(Input::Eol)?;
        if p.state == State::StartRecord {
            rows.push(std::mem::take(&mut p.fields));
        }
    }
    // end of input inside a record: an unfinished (quoted) field ends it
    if p.field_len != 0 || p.state == State::InQuotedField {
        p.save_field();
        rows.push(std::mem::take(&mut p.fields));
    }
    Some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(t: &str) -> Option<Vec<Vec<&'static str>>> {
        read_rows(t, ',').map(|r| {
            r.into_iter()
                .map(|row| {
                    row.into_iter()
                        .map(|s| &*Box::leak(s.into_boxed_str()))
                        .collect()
                })
                .collect()
        })
    }

    #[test]
    fn parses_like_python() {
        assert_eq!(
            rows("a,b\n\nc"),
            Some(vec![vec!["a", "b"], vec![], vec!["c"]])
        );
        assert_eq!(rows("\"a,\"\"b\",c\n"), Some(vec![vec!["a,\"b", "c"]]));
        assert_eq!(rows("\"a\nb\",c"), Some(vec![vec!["a\nb", "c"]]));
        assert_eq!(rows("\"ab"), Some(vec![vec!["ab"]]));
        assert_eq!(rows("a\"b\"c,d"), Some(vec![vec!["a\"b\"c", "d"]]));
        assert_eq!(rows("\"a\"b,c"), Some(vec![vec!["ab", "c"]]));
        assert_eq!(rows("a\r\nb"), Some(vec![vec!["a"], vec!["b"]]));
        assert_eq!(rows("a\rb"), None);
        assert_eq!(rows(""), Some(vec![]));
        assert_eq!(rows("a,"), Some(vec![vec!["a", ""]]));
    }
}
