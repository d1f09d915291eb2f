//! Loose-mode response variants, exactly as the reference harness builds them
//! (`test_instruction_following_loose`): the response, with its first line, last line or
//! both removed (then stripped), and each of those four with every `*` removed. A
//! constraint holds loosely if its strict check passes on any variant.
//!
//! Variants are produced lazily and duplicates/empty ones are skipped (an empty variant
//! can never pass a strict check), so the common case costs one check.

use crate::pytext::py_strip;

/// `"\n".join(response.split("\n")[1:]).strip()` etc.: the three line-trimmed variants.
fn line_variants(response: &str) -> [&str; 3] {
    let first_nl = response.find('\n');
    let last_nl = response.rfind('\n');
    match (first_nl, last_nl) {
        (Some(f), Some(l)) => {
            let remove_first = py_strip(&response[f + 1..]);
            let remove_last = py_strip(&response[..l]);
            let remove_both = if f < l {
                py_strip(&response[f + 1..l])
            } else {
                ""
            };
            [remove_first, remove_last, remove_both]
        }
        _ => ["", "", ""],
    }
}

/// Whether `check` holds on any loose variant of `response`, in the reference order:
/// response, response without `*`, remove-first, remove-last, remove-both, and the
/// three line-trimmed variants without `*`.
pub(crate) fn any_variant(response: &str, mut check: impl FnMut(&str) -> bool) -> bool {
    check(response) || any_other_variant(response, check)
}

/// [`any_variant`] without the response itself (for callers that already know its
/// verdict).
pub(crate) fn any_other_variant(response: &str, mut check: impl FnMut(&str) -> bool) -> bool {
    let has_star = response.contains('*');
    if has_star && check(&response.replace('*', "")) {
        return true;
    }
    let lines = line_variants(response);
    for (i, v) in lines.iter().enumerate() {
        if v.is_empty() || lines[..i].contains(v) {
            continue;
        }
        if check(v) {
            return true;
        }
    }
    if has_star {
        let mut seen: Vec<String> = Vec::with_capacity(3);
        for v in lines {
            if v.is_empty() || !v.contains('*') {
                // without '*' this variant equals one already checked above
                continue;
            }
            let r = v.replace('*', "");
            if seen.contains(&r) {
                continue;
            }
            if check(&r) {
                return true;
            }
            seen.push(r);
        }
    }
    false
}

/// All eight variants, unfiltered (reference order); used by tests.
#[cfg(test)]
pub(crate) fn all_variants(response: &str) -> Vec<String> {
    let [f, l, b] = line_variants(response);
    vec![
        response.to_string(),
        response.replace('*', ""),
        f.to_string(),
        l.to_string(),
        b.to_string(),
        f.replace('*', ""),
        l.replace('*', ""),
        b.replace('*', ""),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_match_reference() {
        let v = all_variants("# Title\n*a* b\n c \nlast*");
        assert_eq!(
            v,
            vec![
                "# Title\n*a* b\n c \nlast*",
                "# Title\na b\n c \nlast",
                "*a* b\n c \nlast*",
                "# Title\n*a* b\n c",
                "*a* b\n c",
                "a b\n c \nlast",
                "# Title\na b\n c",
                "a b\n c",
            ]
        );
        assert_eq!(all_variants("one line")[2..5], ["", "", ""]);
        assert_eq!(all_variants("a\nb")[2..5], ["b", "a", ""]);
    }

    #[test]
    fn any_variant_visits_each_distinct_variant() {
        let input = "# Title\n*a* b\n c \nlast*";
        for target in all_variants(input) {
            if target.is_empty() {
                continue;
            }
            assert!(any_variant(input, |v| v == target), "{target:?}");
        }
        assert!(!any_variant("x\ny", |v| v.is_empty()));
        let mut calls = 0;
        any_variant("plain", |_| {
            calls += 1;
            false
        });
        assert_eq!(calls, 1);
    }
}
