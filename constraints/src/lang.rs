//! Language detection for the `change_case:english_*` checkers.
//!
//! The reference calls `langdetect.detect(text) == "en"` (a seeded, probabilistic
//! character n-gram classifier) and counts the check as passed when langdetect raises
//! (no usable features). We use the `whatlang` crate instead (trigram classifier,
//! deterministic, pure Rust). Exact agreement with langdetect is not guaranteed on short
//! or mixed-language texts; the conformance tests list every disagreement on the golden
//! data. `whatlang` returning no answer (no letters of a known script) maps to "not
//! English"; the verdict only matters when the text has cased letters, where langdetect
//! practically always finds features and answers.

use whatlang::Lang;

/// Whether the text is detected as English.
pub(crate) fn is_english(text: &str) -> bool {
    whatlang::detect(text).is_some_and(|info| info.lang() == Lang::Eng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_english() {
        assert!(is_english(
            "This is a perfectly ordinary English sentence about the weather."
        ));
        assert!(is_english(
            "THIS IS A PERFECTLY ORDINARY ENGLISH SENTENCE ABOUT THE WEATHER."
        ));
        assert!(!is_english(
            "Dies ist ein ganz gewöhnlicher deutscher Satz über das Wetter."
        ));
        assert!(!is_english("12345 !!!"));
        assert!(!is_english(""));
    }
}
