//! The IFEval instruction ids (google-research `instructions.py`, as shipped in
//! lm_eval 0.4.13): one module per id, each exporting its registry [`Entry`].

use crate::registry::Entry;

mod bullet_lists;
mod end_checker;
mod english_capital;
mod english_lowercase;
mod forbidden_words;
mod highlighted_sections;
mod json_format;
mod keyword_frequency;
mod keywords_existence;
mod no_comma;
mod number_words;
mod postscript;
mod quotation;
mod title;

/// Registered IFEval ids (14 of the 25 so far).
pub(crate) const ENTRIES: &[Entry] = &[
    keywords_existence::ENTRY,
    keyword_frequency::ENTRY,
    forbidden_words::ENTRY,
    number_words::ENTRY,
    postscript::ENTRY,
    bullet_lists::ENTRY,
    highlighted_sections::ENTRY,
    json_format::ENTRY,
    title::ENTRY,
    end_checker::ENTRY,
    english_capital::ENTRY,
    english_lowercase::ENTRY,
    no_comma::ENTRY,
    quotation::ENTRY,
];
