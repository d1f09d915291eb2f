//! The embedded data of `langdetect==1.0.9` (Apache-2.0, see
//! `constraints/licenses/langdetect-NOTICE`), converted by `build/langdetect_data.rs`:
//! the 55 language profiles as a table of per-language n-gram probabilities, and the
//! character tables of `messages.properties` that the normalisation uses.

use std::sync::OnceLock;

use hashbrown::HashMap;

const PROFILES_TSV: &str = include_str!(concat!(env!("OUT_DIR"), "/langdetect/profiles.tsv"));
const MESSAGES_TSV: &str = include_str!(concat!(env!("OUT_DIR"), "/langdetect/messages.tsv"));

/// The languages in the order the reference's detector holds them. langdetect loads its
/// profiles in `os.listdir` order, which depends on the file system; this is the order
/// of the oracle's installation (`shared/oracle`, ext4). The order decides the summation
/// order of the probability normalisation and which language wins an exact tie, so
/// verdicts equal the reference's bit for bit only in the same order.
pub(crate) const LANGS: [&str; 55] = [
    "pl", "gu", "zh-tw", "fi", "af", "ne", "ro", "da", "hr", "de", "pa", "en", "fa", "ca", "so",
    "ja", "ko", "es", "cs", "ru", "vi", "uk", "bn", "fr", "kn", "hu", "te", "lv", "sk", "sl", "el",
    "id", "it", "bg", "ta", "he", "sq", "hi", "th", "tr", "ml", "mk", "pt", "tl", "mr", "sv", "et",
    "nl", "sw", "cy", "no", "ur", "lt", "ar", "zh-cn",
];
pub(crate) const N_LANGS: usize = LANGS.len();

/// A gram of 1 to 3 characters as one integer: each character plus one in 21 bits, so
/// grams of different lengths never collide.
pub(crate) fn gram_key(gram: &[char]) -> u64 {
    gram.iter()
        .fold(0u64, |k, &c| (k << 21) | (u64::from(c) + 1))
}

pub(crate) struct Tables {
    /// gram key -> row of `probs`
    pub(crate) rows: HashMap<u64, u32>,
    /// `N_LANGS` probabilities per row: count / total count of grams of that length.
    pub(crate) probs: Vec<f64>,
    /// Latin-1 characters treated as spaces (`NGram.LATIN1_EXCLUDE`).
    pub(crate) latin1_excluded: Vec<char>,
    /// CJK ideograph -> the first ideograph of its class (`NGram.KANJI_*`).
    pub(crate) cjk: HashMap<char, char>,
    /// Vietnamese: base letters, combining marks, and per mark the precomposed letters.
    pub(crate) vi_letters: Vec<char>,
    pub(crate) vi_marks: Vec<char>,
    pub(crate) vi_composed: Vec<Vec<char>>,
}

pub(crate) fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(load)
}

fn load() -> Tables {
    let mut rows: HashMap<u64, u32> = HashMap::new();
    let mut probs: Vec<f64> = Vec::new();
    let mut lang: Option<(usize, [f64; 3])> = None;
    let mut seen = [false; N_LANGS];
    for line in PROFILES_TSV.lines() {
        if let Some(header) = line.strip_prefix('#') {
            let f: Vec<&str> = header.split('\t').collect();
            let index = LANGS
                .iter()
                .position(|l| *l == f[0])
                .unwrap_or_else(|| panic!("unknown langdetect profile {}", f[0]));
            seen[index] = true;
            let n = |i: usize| -> f64 { f[i].parse::<u64>().expect("n_words") as f64 };
            lang = Some((index, [n(1), n(2), n(3)]));
            continue;
        }
        let (index, n_words) = lang.expect("profile header first");
        let (gram, count) = line.split_once('\t').expect("gram\\tcount");
        let chars: Vec<char> = gram.chars().collect();
        let count = count.parse::<u64>().expect("count") as f64;
        let next = rows.len() as u32;
        let row = *rows.entry(gram_key(&chars)).or_insert(next);
        if row == next {
            probs.resize(probs.len() + N_LANGS, 0.0);
        }
        probs[row as usize * N_LANGS + index] = count / n_words[chars.len() - 1];
    }
    assert!(seen.iter().all(|s| *s), "every langdetect profile embedded");

    let messages: Vec<(&str, &str)> = MESSAGES_TSV
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .collect();
    let get = |key: &str| -> Vec<char> {
        messages
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("langdetect message {key}"))
            .1
            .chars()
            .collect()
    };
    let mut cjk = HashMap::new();
    for (_, class) in messages
        .iter()
        .filter(|(k, _)| k.starts_with("NGram.KANJI_"))
    {
        let representative = class.chars().next().expect("non-empty Kanji class");
        for c in class.chars() {
            cjk.insert(c, representative);
        }
    }
    Tables {
        rows,
        probs,
        latin1_excluded: get("NGram.LATIN1_EXCLUDE"),
        cjk,
        vi_letters: get("TO_NORMALIZE_VI_CHARS"),
        vi_marks: get("DMARK_CLASS"),
        vi_composed: ["0300", "0301", "0303", "0309", "0323"]
            .iter()
            .map(|m| get(&format!("NORMALIZED_VI_CHARS_{m}")))
            .collect(),
    }
}
