//! Python semantics shared by the IFBench checkers: `string.punctuation` handling
//! (`strip`, `translate` removal), `str.split()`, `str.lower()`, `str.isdigit()`,
//! `int()` of Unicode digits, `float` repr, and IFBench's numeric kwargs (the benchmark
//! stores counts as JSON floats such as `5.0`, which the reference formats as `5.0`).

use crate::kwargs::Kwargs;
use crate::pytext::is_py_space;
use crate::ConstraintError;

/// Whether `c` is in Python's `string.punctuation` (the ASCII punctuation characters).
#[inline]
pub(crate) fn is_punct(c: char) -> bool {
    c.is_ascii_punctuation()
}

/// `s.strip(string.punctuation + ' ')`.
pub(crate) fn strip_punct_space(s: &str) -> &str {
    s.trim_matches(|c: char| is_punct(c) || c == ' ')
}

/// `s.translate(str.maketrans('', '', string.punctuation))`.
pub(crate) fn remove_punct(s: &str) -> String {
    s.chars().filter(|&c| !is_punct(c)).collect()
}

/// `s.split()` (no argument): runs of Python whitespace separate, no empty items.
pub(crate) fn py_split(s: &str) -> impl DoubleEndedIterator<Item = &str> {
    s.split(is_py_space).filter(|w| !w.is_empty())
}

/// `s.lower()`.
#[inline]
pub(crate) fn py_lower(s: &str) -> String {
    s.to_lowercase()
}

/// `s.upper()` of one character, as a string (used for `c.lower()` comparisons).
pub(crate) fn char_lower(c: char) -> String {
    c.to_lowercase().collect()
}

/// Number of characters (Python `len`).
#[inline]
pub(crate) fn py_len(s: &str) -> usize {
    s.chars().count()
}

/// The first code point of each block of ten Unicode decimal digits (`Nd`, Unicode 14 as
/// in Python 3.11: `unicodedata.decimal(c) == 0`).
const DECIMAL_ZEROS: &[u32] = &[
    0x30, 0x660, 0x6f0, 0x7c0, 0x966, 0x9e6, 0xa66, 0xae6, 0xb66, 0xbe6, 0xc66, 0xce6, 0xd66,
    0xde6, 0xe50, 0xed0, 0xf20, 0x1040, 0x1090, 0x17e0, 0x1810, 0x1946, 0x19d0, 0x1a80, 0x1a90,
    0x1b50, 0x1bb0, 0x1c40, 0x1c50, 0xa620, 0xa8d0, 0xa900, 0xa9d0, 0xa9f0, 0xaa50, 0xabf0, 0xff10,
    0x104a0, 0x10d30, 0x11066, 0x110f0, 0x11136, 0x111d0, 0x112f0, 0x11450, 0x114d0, 0x11650,
    0x116c0, 0x11730, 0x118e0, 0x11950, 0x11c50, 0x11d50, 0x11da0, 0x16a60, 0x16ac0, 0x16b50,
    0x1d7ce, 0x1d7d8, 0x1d7e2, 0x1d7ec, 0x1d7f6, 0x1e140, 0x1e2f0, 0x1e950, 0x1fbf0,
];

/// `unicodedata.decimal(c)`: the value of a decimal digit (`str.isdecimal()`), else `None`.
pub(crate) fn decimal_value(c: char) -> Option<u32> {
    let n = c as u32;
    let i = DECIMAL_ZEROS.partition_point(|&z| z <= n);
    let zero = *DECIMAL_ZEROS.get(i.checked_sub(1)?)?;
    (n - zero < 10).then_some(n - zero)
}

/// Python `c.isdigit()`: decimal digits plus `Numeric_Type=Digit` characters
/// (superscripts, circled digits, ...; Python 3.11 / Unicode 14 list).
pub(crate) fn is_py_digit(c: char) -> bool {
    decimal_value(c).is_some()
        || matches!(c as u32,
            0xB2..=0xB3 | 0xB9 | 0x1369..=0x1371 | 0x19DA | 0x2070 | 0x2074..=0x2079
            | 0x2080..=0x2089 | 0x2460..=0x2468 | 0x2474..=0x247C | 0x2488..=0x2490 | 0x24EA
            | 0x24F5..=0x24FD | 0x24FF | 0x2776..=0x277E | 0x2780..=0x2788 | 0x278A..=0x2792
            | 0x10A40..=0x10A43 | 0x10E60..=0x10E68 | 0x11052..=0x1105A | 0x1F100..=0x1F10A)
}

/// Python `s.isdigit()` (false for the empty string).
pub(crate) fn py_isdigit(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_py_digit)
}

/// Python `repr(float)`: shortest round-trip digits, scientific notation outside
/// `1e-4 <= |x| < 1e16`.
pub(crate) fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let sci = format!("{:e}", x.abs()); // e.g. "1.5e1", "5e0", "1e-5"
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let s = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
        } else {
            let (a, b) = digits.split_at((exp + 1) as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let es = if exp < 0 { "-" } else { "+" };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

/// A numeric kwarg as the reference sees it: a Python `int` or `float`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum PyNum {
    Int(i64),
    Float(f64),
}

impl PyNum {
    pub(crate) fn as_f64(self) -> f64 {
        match self {
            PyNum::Int(i) => i as f64,
            PyNum::Float(f) => f,
        }
    }

    /// `str(x)` / `format(x)` in Python.
    pub(crate) fn py_str(self) -> String {
        match self {
            PyNum::Int(i) => i.to_string(),
            PyNum::Float(f) => py_float_repr(f),
        }
    }

    /// `count <op> self` comparisons, exact for counts below 2^53.
    pub(crate) fn le_count(self, count: usize) -> bool {
        self.as_f64() <= count as f64
    }
    pub(crate) fn ge_count(self, count: usize) -> bool {
        self.as_f64() >= count as f64
    }
    pub(crate) fn eq_count(self, count: usize) -> bool {
        self.as_f64() == count as f64
    }

    /// `int(self)` (truncation), saturating.
    pub(crate) fn trunc(self) -> i64 {
        match self {
            PyNum::Int(i) => i,
            PyNum::Float(f) => f.trunc().clamp(i64::MIN as f64, i64::MAX as f64) as i64,
        }
    }
}

/// A required numeric kwarg (JSON integer or float, not bool) with `value >= min`
/// (the reference draws a random value below `min`, which we refuse).
pub(crate) fn num(kw: &Kwargs<'_>, key: &str, min: f64) -> Result<PyNum, ConstraintError> {
    let v = kw.get(key)?;
    let n = if let Some(i) = v.as_i64() {
        PyNum::Int(i)
    } else if let Some(f) = v.as_f64() {
        PyNum::Float(f)
    } else {
        return Err(kw.error(format!("kwarg `{key}` must be a number, got {v}")));
    };
    if n.as_f64().is_nan() || n.as_f64() < min {
        return Err(kw.error(format!(
            "kwarg `{key}` must be at least {}, got {}",
            py_float_repr(min),
            n.py_str()
        )));
    }
    Ok(n)
}

/// Python slice `[start:stop]` bounds (step 1) for a sequence of length `len`.
pub(crate) fn py_slice_bounds(len: usize, start: i64, stop: i64) -> (usize, usize) {
    let len_i = len as i64;
    let norm = |i: i64| -> usize {
        let j = if i < 0 {
            (i + len_i).max(0)
        } else {
            i.min(len_i)
        };
        j as usize
    };
    let (a, b) = (norm(start), norm(stop));
    (a, b.max(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr() {
        assert_eq!(py_float_repr(5.0), "5.0");
        assert_eq!(py_float_repr(21.5), "21.5");
        assert_eq!(py_float_repr(0.0001), "0.0001");
        assert_eq!(py_float_repr(0.00001), "1e-05");
        assert_eq!(py_float_repr(1e16), "1e+16");
        assert_eq!(py_float_repr(1.5e300), "1.5e+300");
        assert_eq!(py_float_repr(123456789012345.6), "123456789012345.6");
        assert_eq!(py_float_repr(-2.0), "-2.0");
        assert_eq!(py_float_repr(0.1), "0.1");
    }

    #[test]
    fn digits_and_strip() {
        assert_eq!(decimal_value('7'), Some(7));
        assert_eq!(decimal_value('\u{669}'), Some(9));
        assert_eq!(decimal_value('a'), None);
        assert_eq!(decimal_value('/'), None);
        assert!(py_isdigit("²3"));
        assert!(!py_isdigit("½"));
        assert!(!py_isdigit(""));
        assert_eq!(strip_punct_space(" ..a-b!\t"), "a-b!\t");
        assert_eq!(remove_punct("it's, 3.5"), "its 35");
        assert_eq!(
            py_split(" a\u{a0}b\n\u{1c}c ").collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(py_slice_bounds(5, 1, 3), (1, 3));
        assert_eq!(py_slice_bounds(5, -2, 10), (3, 5));
        assert_eq!(py_slice_bounds(5, 4, 2), (4, 4));
    }
}
