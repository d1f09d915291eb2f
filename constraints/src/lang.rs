//! Language detection for the `change_case:english_*` and `language:response_language`
//! checkers.
//!
//! The reference calls `langdetect.detect(text) == "en"` (a seeded, probabilistic
//! character n-gram classifier) and counts the check as passed when langdetect raises
//! (no usable features). We use the `whatlang` crate instead (trigram classifier,
//! deterministic, pure Rust, from crates.io). Exact agreement with langdetect is not guaranteed on short
//! or mixed-language texts; the conformance tests list every disagreement on the golden
//! data. `whatlang` returning no answer (no letters of a known script) maps to "not
//! English"; the verdict only matters when the text has cased letters, where langdetect
//! practically always finds features and answers.
//!
//! `language:response_language` compares [`detect_code`] (whatlang's answer as the ISO
//! 639-1 code langdetect would report) with the requested code; "no answer" passes, as a
//! langdetect exception does in the reference. Languages whatlang knows but langdetect
//! does not are reported as Swahili (`sw`), the language langdetect knows and whatlang
//! does not.

use whatlang::Lang;

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

/// The ISO 639-1 code (as langdetect spells it) of a `whatlang` language.
fn iso639_1(lang: Lang) -> &'static str {
    match lang {
        Lang::Eng => "en",
        Lang::Spa => "es",
        Lang::Por => "pt",
        Lang::Ara => "ar",
        Lang::Hin => "hi",
        Lang::Fra => "fr",
        Lang::Rus => "ru",
        Lang::Deu => "de",
        Lang::Jpn => "ja",
        Lang::Ita => "it",
        Lang::Ben => "bn",
        Lang::Ukr => "uk",
        Lang::Tha => "th",
        Lang::Urd => "ur",
        Lang::Tam => "ta",
        Lang::Tel => "te",
        Lang::Bul => "bg",
        Lang::Kor => "ko",
        Lang::Pol => "pl",
        Lang::Heb => "he",
        Lang::Pes => "fa",
        Lang::Vie => "vi",
        Lang::Nep => "ne",
        Lang::Kan => "kn",
        Lang::Mar => "mr",
        Lang::Guj => "gu",
        Lang::Pan => "pa",
        Lang::Mal => "ml",
        Lang::Fin => "fi",
        Lang::Cmn => "zh-cn",
        Lang::Nld => "nl",
        Lang::Dan => "da",
        Lang::Swe => "sv",
        Lang::Tur => "tr",
        Lang::Hun => "hu",
        Lang::Ces => "cs",
        Lang::Ell => "el",
        Lang::Ron => "ro",
        Lang::Hrv => "hr",
        Lang::Slk => "sk",
        Lang::Slv => "sl",
        Lang::Lit => "lt",
        Lang::Lav => "lv",
        Lang::Est => "et",
        Lang::Cat => "ca",
        Lang::Afr => "af",
        Lang::Ind => "id",
        Lang::Tgl => "tl",
        Lang::Mkd => "mk",
        Lang::Nob => "no",
        // not among langdetect's 55 languages (Javanese, Shona, Zulu, Akan, Esperanto, ...):
        // the reference would answer with the nearest language it knows; for the
        // Latin-script African texts of this kind that is Swahili, the one Bantu
        // language it has (and the one whatlang lacks)
        _ => "sw",
    }
}

/// The detected language as langdetect's ISO 639-1 code (an approximation: see
/// [`iso639_1`] for languages only one of the two detectors knows), or `None` where nothing can be
/// detected (no letters: langdetect raises, and the reference counts the check as passed).
pub(crate) fn detect_code(text: &str) -> Option<&'static str> {
    whatlang::detect(text).map(|info| iso639_1(info.lang()))
}

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
