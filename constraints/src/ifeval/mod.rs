//! The IFEval instruction ids (google-research `instructions.py`, as shipped in
//! lm_eval 0.4.13): one module per id, each exporting its registry [`Entry`].

use crate::registry::Entry;

mod bullet_lists;
mod capital_word_frequency;
mod constrained_response;
mod end_checker;
mod english_capital;
mod english_lowercase;
mod forbidden_words;
mod highlighted_sections;
mod json_format;
mod keyword_frequency;
mod keywords_existence;
mod letter_frequency;
mod multiple_sections;
mod no_comma;
mod nth_paragraph_first_word;
mod number_paragraphs;
mod number_placeholders;
mod number_sentences;
mod number_words;
mod postscript;
mod quotation;
mod repeat_prompt;
mod response_language;
mod title;
mod two_responses;

/// Registered IFEval ids (all 25, in the order of the reference registry table).
pub(crate) const ENTRIES: &[Entry] = &[
    keywords_existence::ENTRY,
    keyword_frequency::ENTRY,
    forbidden_words::ENTRY,
    letter_frequency::ENTRY,
    response_language::ENTRY,
    number_sentences::ENTRY,
    number_paragraphs::ENTRY,
    number_words::ENTRY,
    nth_paragraph_first_word::ENTRY,
    number_placeholders::ENTRY,
    postscript::ENTRY,
    bullet_lists::ENTRY,
    constrained_response::ENTRY,
    highlighted_sections::ENTRY,
    multiple_sections::ENTRY,
    json_format::ENTRY,
    title::ENTRY,
    two_responses::ENTRY,
    repeat_prompt::ENTRY,
    end_checker::ENTRY,
    capital_word_frequency::ENTRY,
    english_capital::ENTRY,
    english_lowercase::ENTRY,
    no_comma::ENTRY,
    quotation::ENTRY,
];
