use std::sync::OnceLock;

use hashbrown::HashMap;

use super::utils::{get_ranked_trigrams, pack};
use super::{ARABIC_LANGS, CYRILLIC_LANGS, DEVANAGARI_LANGS, HEBREW_LANGS, LATIN_LANGS};
use super::LangProfileList;
use super::{MAX_TOTAL_DISTANCE, MAX_TRIGRAM_DISTANCE};
#[cfg(test)]
use super::utils::get_trigrams_with_positions;
#[cfg(test)]
use super::{LangProfile, Trigram};
use crate::Lang;
use crate::core::{FilterList, Info, InternalQuery, Text, calculate_confidence};
use crate::scripts::grouping::MultiLangScript;

#[derive(Debug)]
pub struct RawOutcome {
    pub trigrams_count: usize,
    #[allow(dead_code)]
    pub raw_distances: Vec<(Lang, u32)>,
    pub scores: Vec<(Lang, f64)>,
}

#[inline]
pub fn detect(iquery: &InternalQuery) -> Option<Info> {
    let raw_outcome = raw_detect(iquery);
    let RawOutcome {
        trigrams_count,
        scores,
        ..
    } = raw_outcome;

    let mut raw_scores_iter = scores.into_iter();

    let opt_lang_score1 = raw_scores_iter.next();
    let opt_lang_score2 = raw_scores_iter.next();

    // TODO: Logic is duplicated in alphabets. Consider refactoring
    opt_lang_score1.map(|(lang1, score1)| {
        let script = iquery.multi_lang_script.to_script();
        let confidence = if let Some((_, score2)) = opt_lang_score2 {
            calculate_confidence(score1, score2, trigrams_count)
        } else {
            1.0
        };
        Info::new(script, lang1, confidence)
    })
}

#[inline]
pub fn raw_detect(iquery: &InternalQuery) -> RawOutcome {
    calculate_scores_in_profiles(&iquery.text, iquery.filter_list, iquery.multi_lang_script)
}

fn script_to_lang_profile_list(script: MultiLangScript) -> LangProfileList {
    use MultiLangScript as MLS;
    match script {
        MLS::Latin => LATIN_LANGS,
        MLS::Cyrillic => CYRILLIC_LANGS,
        MLS::Arabic => ARABIC_LANGS,
        MLS::Devanagari => DEVANAGARI_LANGS,
        MLS::Hebrew => HEBREW_LANGS,
    }
}

/// Inverted index of one profile list: trigram (packed, see [`pack`]) -> every
/// (index of the language in the list, rank of the trigram in its profile).
struct ProfileIndex {
    postings: HashMap<u64, Vec<(u16, u16)>>,
    /// `MAX_TRIGRAM_DISTANCE * profile.len()` per language: the distance when no
    /// trigram of the profile occurs in the text.
    base: Vec<i64>,
}

impl ProfileIndex {
    fn new(list: LangProfileList) -> Self {
        let mut postings: HashMap<u64, Vec<(u16, u16)>> = HashMap::new();
        let mut base = Vec::with_capacity(list.len());
        for (li, &(_, profile)) in list.iter().enumerate() {
            for (rank, t) in profile.iter().enumerate() {
                postings
                    .entry(pack(*t))
                    .or_default()
                    .push((li as u16, rank as u16));
            }
            base.push(MAX_TRIGRAM_DISTANCE as i64 * profile.len() as i64);
        }
        Self { postings, base }
    }
}

fn profile_index(script: MultiLangScript) -> &'static ProfileIndex {
    use MultiLangScript as MLS;
    static LATIN: OnceLock<ProfileIndex> = OnceLock::new();
    static CYRILLIC: OnceLock<ProfileIndex> = OnceLock::new();
    static ARABIC: OnceLock<ProfileIndex> = OnceLock::new();
    static DEVANAGARI: OnceLock<ProfileIndex> = OnceLock::new();
    static HEBREW: OnceLock<ProfileIndex> = OnceLock::new();
    let cell = match script {
        MLS::Latin => &LATIN,
        MLS::Cyrillic => &CYRILLIC,
        MLS::Arabic => &ARABIC,
        MLS::Devanagari => &DEVANAGARI,
        MLS::Hebrew => &HEBREW,
    };
    cell.get_or_init(|| ProfileIndex::new(script_to_lang_profile_list(script)))
}

#[inline]
fn calculate_scores_in_profiles(
    text: &Text,
    filter_list: &FilterList,
    script: MultiLangScript,
) -> RawOutcome {
    let lang_profile_list = script_to_lang_profile_list(script);
    let index = profile_index(script);
    let mut lang_distances: Vec<(Lang, u32)> = vec![];

    let ranked = get_ranked_trigrams(&text.lowercase());
    let unique_trigrams_count = ranked.len();

    // Upstream: for each profile trigram at rank i, |n - i| when the text has it at
    // position n, MAX_TRIGRAM_DISTANCE otherwise. Equivalently the all-missing total
    // minus (MAX_TRIGRAM_DISTANCE - |n - i|) for every (text trigram, profile rank) pair.
    let mut totals: Vec<i64> = index.base.clone();
    for (n, key) in ranked.iter().enumerate() {
        if let Some(post) = index.postings.get(key) {
            for &(li, rank) in post {
                let d = (n as i64 - rank as i64).abs();
                totals[li as usize] -= MAX_TRIGRAM_DISTANCE as i64 - d;
            }
        }
    }

    let count = unique_trigrams_count as u32;
    for (li, &(lang, _)) in lang_profile_list.iter().enumerate() {
        if !filter_list.is_allowed(lang) {
            continue;
        }
        let mut total_dist = totals[li] as u32;
        if MAX_TRIGRAM_DISTANCE > count {
            let delta = MAX_TRIGRAM_DISTANCE - count;
            total_dist -= delta * MAX_TRIGRAM_DISTANCE;
        }
        lang_distances.push((lang, total_dist.clamp(0, MAX_TOTAL_DISTANCE)));
    }

    // Sort languages by distance
    lang_distances.sort_unstable_by_key(|(_, dist)| *dist);

    let max_dist = unique_trigrams_count as u32 * MAX_TRIGRAM_DISTANCE;

    let raw_scores = lang_distances
        .iter()
        .map(|&(lang, distance)| (lang, distance_to_raw_score(distance, max_dist)))
        .collect();

    RawOutcome {
        trigrams_count: unique_trigrams_count,
        scores: raw_scores,
        raw_distances: lang_distances,
    }
}

/// Upstream's per-language distance (kept for the equivalence test).
#[cfg(test)]
fn calculate_distance(lang_trigrams: LangProfile, text_trigrams: &HashMap<Trigram, u32>) -> u32 {
    let mut total_dist = 0u32;

    for (i, &trigram) in lang_trigrams.iter().enumerate() {
        let dist = match text_trigrams.get(&trigram) {
            Some(&n) => (n as i32 - i as i32).unsigned_abs(),
            None => MAX_TRIGRAM_DISTANCE,
        };
        total_dist += dist;
    }

    let count = text_trigrams.len() as u32;

    if MAX_TRIGRAM_DISTANCE > count {
        let delta = MAX_TRIGRAM_DISTANCE - count;
        total_dist -= delta * MAX_TRIGRAM_DISTANCE;
    }

    total_dist.clamp(0, MAX_TOTAL_DISTANCE)
}

#[inline]
fn distance_to_raw_score(distance: u32, max_distance: u32) -> f64 {
    let similarity = max_distance - distance;
    similarity as f64 / max_distance as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_when_german_is_given() {
        let text = "Die Ordnung muss für immer in diesem Codebase bleiben";
        let iq = InternalQuery {
            text: Text::new(text),
            filter_list: &FilterList::default(),
            multi_lang_script: MultiLangScript::Latin,
        };
        let raw_outcome = raw_detect(&iq);

        assert_eq!(raw_outcome.trigrams_count, 50);

        let &(first_lang, first_score) = raw_outcome.scores.first().unwrap();
        let &(_last_lang, last_score) = raw_outcome.scores.last().unwrap();

        assert_eq!(first_lang, Lang::Deu);

        assert!(first_score >= 0.0);
        assert!(first_score <= 1.0);

        assert!(last_score >= 0.0);
        assert!(last_score <= 1.0);
    }

    /// The inverted-index distances equal upstream's per-language lookups.
    #[test]
    fn inverted_index_matches_upstream_distance() {
        let texts = [
            "Die Ordnung muss für immer in diesem Codebase bleiben",
            "the quick brown fox jumps over the lazy dog and then some more text follows",
            "a",
            "",
            "Та нічого, все нормально. А в тебе як?",
            "xaaaaabbbb    d",
        ];
        let mut long = String::new();
        for i in 0..400 {
            long.push_str(&format!("word{} zyx{} the of and qu{} ", i, i * 7, i % 13));
        }
        for text in texts.iter().copied().chain([long.as_str()]) {
            for script in [
                MultiLangScript::Latin,
                MultiLangScript::Cyrillic,
                MultiLangScript::Arabic,
                MultiLangScript::Devanagari,
                MultiLangScript::Hebrew,
            ] {
                let t = Text::new(text);
                let fast = calculate_scores_in_profiles(&t, &FilterList::default(), script);
                let positions = get_trigrams_with_positions(&t.lowercase()).trigram_positions;
                let slow: Vec<(Lang, u32)> = script_to_lang_profile_list(script)
                    .iter()
                    .map(|&(lang, p)| (lang, calculate_distance(p, &positions)))
                    .collect();
                for (lang, d) in &fast.raw_distances {
                    let s = slow.iter().find(|(l, _)| l == lang).unwrap().1;
                    assert_eq!(*d, s, "{text:?} {lang:?}");
                }
                assert_eq!(fast.trigrams_count, positions.len());
                let ranked = get_ranked_trigrams(&t.lowercase());
                assert_eq!(ranked.len(), positions.len());
                for (&tri, &n) in &positions {
                    assert_eq!(ranked[n as usize], pack(tri), "{text:?}");
                }
            }
        }
    }
}
