//! A validator that accepts exactly the texts Python's `json.loads` accepts (CPython 3.11
//! C scanner, `strict=True`), without building a value.
//!
//! Differences from RFC 8259 / `serde_json` that matter for fidelity: `NaN`, `Infinity`
//! and `-Infinity` are accepted; lone UTF-16 surrogate escapes (`"\ud800"`) are accepted;
//! integers with more than 4300 digits are rejected (Python's int-string limit raises
//! `ValueError`). Nesting depth is unlimited (an explicit stack, no recursion): where
//! Python raises `RecursionError` (about 1000 levels, which the reference does not catch)
//! we still return the grammatical verdict.

/// Python's `sys.get_int_max_str_digits()` default.
const INT_MAX_STR_DIGITS: usize = 4300;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Frame {
    Array,
    Object,
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &[u8]) -> bool {
        if self.b[self.i..].starts_with(lit) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    /// A string starting at the opening quote.
    fn string(&mut self) -> bool {
        debug_assert_eq!(self.peek(), Some(b'"'));
        self.i += 1;
        loop {
            match self.peek() {
                None => return false,
                Some(b'"') => {
                    self.i += 1;
                    return true;
                }
                Some(0x00..=0x1f) => return false,
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            self.i += 1;
                            for _ in 0..4 {
                                match self.peek() {
                                    Some(c) if c.is_ascii_hexdigit() => self.i += 1,
                                    _ => return false,
                                }
                            }
                        }
                        _ => return false,
                    }
                }
                Some(_) => self.i += 1,
            }
        }
    }

    /// A number, or `-Infinity`.
    fn number(&mut self) -> bool {
        if self.peek() == Some(b'-') {
            self.i += 1;
            if self.eat(b"Infinity") {
                return true;
            }
        }
        let int_digits = match self.peek() {
            Some(b'0') => {
                self.i += 1;
                1
            }
            Some(b'1'..=b'9') => self.digits(),
            _ => return false,
        };
        let mut is_float = false;
        if self.peek() == Some(b'.') && matches!(self.b.get(self.i + 1), Some(b'0'..=b'9')) {
            self.i += 1;
            self.digits();
            is_float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            let e_start = self.i;
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() > 0 {
                is_float = true;
            } else {
                self.i = e_start;
            }
        }
        is_float || int_digits <= INT_MAX_STR_DIGITS
    }

    /// A scalar value at the current position (not `[` / `{`).
    fn scalar(&mut self) -> bool {
        match self.peek() {
            Some(b'"') => self.string(),
            Some(b'n') => self.eat(b"null"),
            Some(b't') => self.eat(b"true"),
            Some(b'f') => self.eat(b"false"),
            Some(b'N') => self.eat(b"NaN"),
            Some(b'I') => self.eat(b"Infinity"),
            _ => self.number(),
        }
    }

    /// `"key" ws : ws` — positioned at the expected opening quote of the key.
    fn key(&mut self) -> bool {
        if self.peek() != Some(b'"') || !self.string() {
            return false;
        }
        self.skip_ws();
        if self.peek() != Some(b':') {
            return false;
        }
        self.i += 1;
        self.skip_ws();
        true
    }

    fn document(&mut self) -> bool {
        let mut stack: Vec<Frame> = Vec::new();
        self.skip_ws();
        'value: loop {
            // Expecting a value at self.i.
            match self.peek() {
                Some(b'[') => {
                    self.i += 1;
                    self.skip_ws();
                    if self.peek() == Some(b']') {
                        self.i += 1;
                    } else {
                        stack.push(Frame::Array);
                        continue 'value;
                    }
                }
                Some(b'{') => {
                    self.i += 1;
                    self.skip_ws();
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                    } else {
                        if !self.key() {
                            return false;
                        }
                        stack.push(Frame::Object);
                        continue 'value;
                    }
                }
                _ => {
                    if !self.scalar() {
                        return false;
                    }
                }
            }
            // After a complete value: close containers or move to the next element.
            loop {
                self.skip_ws();
                match stack.last() {
                    None => return self.i == self.b.len(),
                    Some(frame) => {
                        let close = if *frame == Frame::Array { b']' } else { b'}' };
                        match self.peek() {
                            Some(c) if c == close => {
                                self.i += 1;
                                stack.pop();
                            }
                            Some(b',') => {
                                self.i += 1;
                                self.skip_ws();
                                if *frame == Frame::Object && !self.key() {
                                    return false;
                                }
                                continue 'value;
                            }
                            _ => return false,
                        }
                    }
                }
            }
        }
    }
}

/// Whether Python's `json.loads(text)` succeeds (see the module docs for the one case,
/// deep nesting, where Python raises something other than `ValueError`).
pub(crate) fn python_json_loads_ok(text: &str) -> bool {
    Parser {
        b: text.as_bytes(),
        i: 0,
    }
    .document()
}

#[cfg(test)]
mod tests {
    use super::python_json_loads_ok as ok;

    #[test]
    fn accepts_python_json() {
        for s in [
            "1",
            "-0",
            "0.5",
            "1e5",
            "1E+5",
            "-1.5e-3",
            "\"\"",
            "\"a\\u00e9\\ud800\\n\"",
            "null",
            "true",
            "false",
            "NaN",
            "Infinity",
            "-Infinity",
            "[]",
            "{}",
            " [1, 2 ,3] ",
            "{\"a\": {\"b\": [null, {}]}, \"a\": 1}",
            "\n{\"x\":[[],[[]]]}\r\n",
            "\"é😀\"",
        ] {
            assert!(ok(s), "{s:?}");
        }
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        assert!(ok(&deep));
        assert!(ok(&format!("1{}", "0".repeat(4299))));
        assert!(ok(&format!("1{}.0", "0".repeat(5000))));
    }

    #[test]
    fn rejects_what_python_rejects() {
        for s in [
            "",
            " ",
            "01",
            "1.",
            ".5",
            "+1",
            "1e",
            "- 1",
            "[1,]",
            "{\"a\":1,}",
            "{a:1}",
            "[1 2]",
            "\"abc",
            "\"a\tb\"",
            "\"\\x41\"",
            "\"\\u12\"",
            "nan",
            "infinity",
            "-NaN",
            "[",
            "{\"a\"}",
            "{\"a\" 1}",
            "{,}",
            "[,1]",
            "1 2",
            "\u{feff}1",
            "'a'",
            "[1]]",
            "{}}",
            "tru",
            "nul",
            "*",
            "```json\n{}\n```",
        ] {
            assert!(!ok(s), "{s:?}");
        }
        assert!(!ok(&"[".repeat(100_000)));
        assert!(!ok(&format!("1{}", "0".repeat(4300))));
        assert!(!ok(&format!("-1{}", "0".repeat(4300))));
    }
}
