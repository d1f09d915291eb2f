//! IFBench `count:*` ids: word-count range, unique words, coordinating conjunctions,
//! person names, numbers, punctuation cover, every N-th word Japanese, pronouns and
//! multiple keyword counts (reference `WordCountRangeChecker` ... `KeywordsMultipleChecker`).

use hashbrown::HashSet;

use super::util::{self, py_lower, py_split, remove_punct, strip_punct_space, PyNum};
use super::{fixed_entry, num_entry};
use crate::kwargs::Kwargs;
use crate::registry::Entry;
use crate::{pytext, Constraint, ConstraintError};

// ---- count:word_count_range ----

pub(crate) const WORD_COUNT_RANGE: Entry = Entry {
    id: "count:word_count_range",
    kwargs: &["min_words", "max_words"],
    build: build_word_count_range,
};

struct WordCountRange {
    min: PyNum,
    max: PyNum,
}

fn build_word_count_range(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(WordCountRange {
        min: util::num(kw, "min_words", 0.0)?,
        max: util::num(kw, "max_words", 0.0)?,
    }))
}

impl Constraint for WordCountRange {
    fn id(&self) -> &str {
        WORD_COUNT_RANGE.id
    }
    fn follows(&self, response: &str) -> bool {
        let n = pytext::count_words(response);
        self.min.le_count(n) && self.max.ge_count(n)
    }
    fn description(&self) -> String {
        format!(
            "The response must contain between {} and {} words.",
            self.min.py_str(),
            self.max.py_str()
        )
    }
}

// ---- count:unique_word_count ----

num_entry!(
    UNIQUE_WORD_COUNT,
    "count:unique_word_count",
    "N",
    0.0,
    |n| format!("Use at least {} unique words in the response.", n.py_str()),
    unique_word_count
);

fn unique_word_count(value: &str, n: PyNum) -> bool {
    let lower = py_lower(value);
    let unique: HashSet<&str> = py_split(&lower).map(strip_punct_space).collect();
    n.le_count(unique.len())
}

// ---- count:conjunctions ----

num_entry!(
    CONJUNCTIONS,
    "count:conjunctions",
    "small_n",
    0.0,
    |n| format!(
        "Use at least {} different coordinating conjunctions in the response.",
        n.py_str()
    ),
    conjunctions
);

fn conjunctions(value: &str, n: PyNum) -> bool {
    const CONJ: [&str; 7] = ["and", "but", "for", "nor", "or", "so", "yet"];
    // the set holds the words as written (so "And" and "and" count twice)
    let unique: HashSet<&str> = py_split(value)
        .filter(|w| CONJ.contains(&py_lower(strip_punct_space(w)).as_str()))
        .collect();
    n.le_count(unique.len())
}

// ---- count:person_names ----

const PERSON_NAMES_LIST: [&str; 50] = [
    "Emma",
    "Liam",
    "Sophia",
    "Jackson",
    "Olivia",
    "Noah",
    "Ava",
    "Lucas",
    "Isabella",
    "Mason",
    "Mia",
    "Ethan",
    "Charlotte",
    "Alexander",
    "Amelia",
    "Benjamin",
    "Harper",
    "Leo",
    "Zoe",
    "Daniel",
    "Chloe",
    "Samuel",
    "Lily",
    "Matthew",
    "Grace",
    "Owen",
    "Abigail",
    "Gabriel",
    "Ella",
    "Jacob",
    "Scarlett",
    "Nathan",
    "Victoria",
    "Elijah",
    "Layla",
    "Nicholas",
    "Audrey",
    "David",
    "Hannah",
    "Christopher",
    "Penelope",
    "Thomas",
    "Nora",
    "Andrew",
    "Aria",
    "Joseph",
    "Claire",
    "Ryan",
    "Stella",
    "Jonathan",
];

num_entry!(
    PERSON_NAMES,
    "count:person_names",
    "N",
    0.0,
    |n| {
        format!(
        "Mention at least {} different person names in the response, from this list of person names: {} .",
        n.py_str(),
        PERSON_NAMES_LIST.join(", ")
    )
    },
    person_names
);

fn person_names(value: &str, n: PyNum) -> bool {
    let found = PERSON_NAMES_LIST
        .iter()
        .filter(|name| value.contains(*name))
        .count();
    n.le_count(found)
}

// ---- count:numbers ----

num_entry!(
    NUMBERS,
    "count:numbers",
    "N",
    0.0,
    |n| format!("Include exactly {} numbers in the response.", n.py_str()),
    numbers
);

static DIGIT_RUNS: std::sync::LazyLock<regex::Regex> =
    std::sync::LazyLock::new(|| regex::Regex::new(r"\d+").expect("static regex"));

fn numbers(value: &str, n: PyNum) -> bool {
    n.eq_count(DIGIT_RUNS.find_iter(&remove_punct(value)).count())
}

// ---- count:punctuation ----

fixed_entry!(
    PUNCTUATION,
    "count:punctuation",
    "Use every standard punctuation mark at least once, including semicolons, colons, and the interrobang (?!).",
    punctuation
);

fn punctuation(value: &str) -> bool {
    if !(value.contains("!?") || value.contains("?!") || value.contains('‽')) {
        return false;
    }
    let mut rest = value.replacen("?!", "", 1);
    if rest.len() == value.len() {
        rest = value.replacen("!?", "", 1);
    }
    ['.', ',', '!', '?', ';', ':']
        .iter()
        .all(|p| rest.contains(*p))
}

// ---- count:words_japanese ----

pub(crate) const WORDS_JAPANESE: Entry = Entry {
    id: "count:words_japanese",
    kwargs: &["N"],
    build: build_words_japanese,
};

fn build_words_japanese(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let n = util::num(kw, "N", 0.0)?;
    if n.as_f64() == 0.0 {
        // the reference divides by N
        return Err(kw.error("kwarg `N` must not be 0"));
    }
    Ok(Box::new(super::WithNum {
        id: "count:words_japanese",
        n,
        describe: describe_japanese,
        check: words_japanese,
    }))
}

fn describe_japanese(n: PyNum) -> String {
    let m = n.as_f64() % 10.0; // `N % 10` (N > 0 here)
    let ns = n.py_str();
    if m == 1.0 {
        format!("Every {ns}st of your response must be in Japanese.")
    } else if m == 2.0 {
        format!("Every {ns}nd of your response must be in Japanese.")
    } else if m == 3.0 {
        format!("Every {ns}rd of your response must be in Japanese.")
    } else {
        format!("Every {ns}th word of your response must be in Japanese.")
    }
}

fn is_japanese_char(c: char) -> bool {
    matches!(c as u32, 0x3040..=0x30ff | 0x4e00..=0x9fff)
}

fn py_mod_is_zero(a: f64, b: f64) -> bool {
    // Python's `a % b == 0` for finite floats (and ints): the remainder is 0
    (a % b) == 0.0
}

fn words_japanese(value: &str, n: PyNum) -> bool {
    let step = n.as_f64();
    py_split(value).enumerate().all(|(i, word)| {
        let word = strip_punct_space(word);
        let due = match n {
            PyNum::Int(k) => ((i as i64) + 1) % k == 0,
            PyNum::Float(_) => py_mod_is_zero((i + 1) as f64, step),
        };
        !due || word.is_empty() || util::py_isdigit(word) || word.chars().any(is_japanese_char)
    })
}

// ---- count:pronouns ----

num_entry!(
    PRONOUNS,
    "count:pronouns",
    "N",
    0.0,
    |n| format!(
        "The response should include at least {} pronouns.",
        n.py_str()
    ),
    pronouns
);

fn pronouns(value: &str, n: PyNum) -> bool {
    const PRONOUNS: [&str; 31] = [
        "i",
        "me",
        "my",
        "mine",
        "myself",
        "we",
        "us",
        "our",
        "ours",
        "ourselves",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "he",
        "him",
        "his",
        "himself",
        "she",
        "her",
        "hers",
        "herself",
        "it",
        "its",
        "itself",
        "they",
        "them",
        "their",
        "theirs",
        "themselves",
    ];
    let text = remove_punct(&py_lower(&value.replace('/', " ")));
    let count = py_split(&text).filter(|w| PRONOUNS.contains(w)).count();
    n.le_count(count)
}

// ---- count:keywords_multiple ----

pub(crate) const KEYWORDS_MULTIPLE: Entry = Entry {
    id: "count:keywords_multiple",
    kwargs: &["keyword1", "keyword2", "keyword3", "keyword4", "keyword5"],
    build: build_keywords_multiple,
};

struct KeywordsMultiple {
    keywords: [String; 5],
}

fn build_keywords_multiple(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let k = |key: &str| kw.string(key).map(|s| pytext::py_strip(s).to_string());
    Ok(Box::new(KeywordsMultiple {
        keywords: [
            k("keyword1")?,
            k("keyword2")?,
            k("keyword3")?,
            k("keyword4")?,
            k("keyword5")?,
        ],
    }))
}

/// Python `haystack.count(needle)` (non-overlapping; `len + 1` for an empty needle).
pub(crate) fn py_count(haystack: &str, needle: &str) -> usize {
    if needle.is_empty() {
        haystack.chars().count() + 1
    } else {
        haystack.matches(needle).count()
    }
}

impl Constraint for KeywordsMultiple {
    fn id(&self) -> &str {
        KEYWORDS_MULTIPLE.id
    }
    fn follows(&self, response: &str) -> bool {
        let lower = py_lower(response);
        self.keywords
            .iter()
            .zip([1, 2, 3, 5, 7])
            .all(|(k, n)| py_count(&lower, &py_lower(k)) == n)
    }
    fn description(&self) -> String {
        let [k1, k2, k3, k4, k5] = &self.keywords;
        format!(
            "Include keyword {k1} once in your response, keyword {k2} twice in your response, \
             keyword {k3} three times in your response, keyword {k4} five times in your \
             response, and keyword {k5} seven times in your response."
        )
    }
}
