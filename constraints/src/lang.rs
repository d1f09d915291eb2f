//! Language detection for the `change_case:english_*` and `language:response_language`
//! checkers, with the reference's semantics: `langdetect.detect(text)` (our port in
//! [`crate::langdetect`], seeded as the oracle seeds it), and an undetectable text (no
//! features: langdetect raises) counts as following the instruction, as the reference's
//! `except LangDetectException: return True` does.

use crate::langdetect;

/// The reference `instructions_util.LANGUAGE_CODES` (ISO 639-1 code, English name).
pub(crate) const LANGUAGE_CODES: [(&str, &str); 30] = [
    ("en", "English"),
    ("es", "Spanish"),
    ("pt", "Portuguese"),
    ("ar", "Arabic"),
    ("hi", "Hindi"),
    ("fr", "French"),
    ("ru", "Russian"),
    ("de", "German"),
    ("ja", "Japanese"),
    ("it", "Italian"),
    ("bn", "Bengali"),
    ("uk", "Ukrainian"),
    ("th", "Thai"),
    ("ur", "Urdu"),
    ("ta", "Tamil"),
    ("te", "Telugu"),
    ("bg", "Bulgarian"),
    ("ko", "Korean"),
    ("pl", "Polish"),
    ("he", "Hebrew"),
    ("fa", "Persian"),
    ("vi", "Vietnamese"),
    ("ne", "Nepali"),
    ("sw", "Swahili"),
    ("kn", "Kannada"),
    ("mr", "Marathi"),
    ("gu", "Gujarati"),
    ("pa", "Punjabi"),
    ("ml", "Malayalam"),
    ("fi", "Finnish"),
];

/// The detected language as langdetect's code (`unknown` when no language reaches
/// probability 0.1), or `None` where langdetect raises (no features).
pub(crate) fn detect_code(text: &str) -> Option<&'static str> {
    langdetect::detect(text).ok()
}

/// Whether langdetect detects English, or detects nothing at all (the reference then
/// counts the check as passed).
pub(crate) fn english_or_undetectable(text: &str) -> bool {
    detect_code(text).is_none_or(|code| code == "en")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_english() {
        assert!(english_or_undetectable(
            "This is a perfectly ordinary English sentence about the weather."
        ));
        assert!(!english_or_undetectable(
            "Dies ist ein ganz gewöhnlicher deutscher Satz über das Wetter."
        ));
        // no features: passes, as in the reference
        assert!(english_or_undetectable("12345 !!!"));
        assert!(english_or_undetectable(""));
    }
}
