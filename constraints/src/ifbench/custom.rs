//! IFBench `custom:*` ids: one fixed task each (multiples of 7, multiple-choice
//! questions, African countries in reverse order, reversed sentences, a 26-sentence
//! alphabet story, European capitals by latitude, three CSV tasks and Napoleon's battle
//! dates). Their reference `build_description` ignores any kwargs.

use std::sync::LazyLock;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use super::csv::read_rows;
use super::fixed_entry;
use super::split::split_into_sentences;
use super::util::{decimal_value, py_len, py_lower, py_split, remove_punct, strip_punct_space};
use crate::pytext::{is_py_space, py_strip, PY_SPACE, PY_WORD};

fn re(p: &str) -> Regex {
    Regex::new(p).expect("static regex")
}

static DIGIT_RUNS: LazyLock<Regex> = LazyLock::new(|| re(r"\d+"));

/// `unicodedata.normalize('NFKD', s).encode('ASCII', 'ignore').decode('ASCII')`.
fn ascii_fold(s: &str) -> String {
    s.nfkd().filter(char::is_ascii).collect()
}

// ---- custom:multiples ----

fixed_entry!(
    MULTIPLES,
    "custom:multiples",
    "Count from 10 to 50 but only print multiples of 7.",
    multiples
);

fn multiples(value: &str) -> bool {
    let v = value.replace(',', ", ");
    DIGIT_RUNS
        .find_iter(&v)
        .map(|m| m.as_str())
        .eq(["14", "21", "28", "35", "42", "49"])
}

// ---- custom:mcq_count_length ----

fixed_entry!(
    MCQ_COUNT_LENGTH,
    "custom:mcq_count_length",
    "Generate 4 multiple choice questions with 5 options each about '20th century art history'. Each question should start with the label \"Question\". The questions should get progressively longer. Do not provide an explanation.",
    mcq_count_length
);

static QUESTION_SPLIT: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"\n*(?:Question \d+[.|):;]?{PY_SPACE}*)")));
static OPTION_LINE: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"^[A-Ea-e][.|)]{PY_SPACE}*{PY_WORD}")));

fn mcq_count_length(value: &str) -> bool {
    // value[value.find('Question'):] must be the whole value
    let same = match value.find("Question") {
        Some(i) => i == 0,
        None => value.chars().count() <= 1,
    };
    if !same {
        return false;
    }
    let questions: Vec<&str> = QUESTION_SPLIT
        .split(value)
        .map(py_strip)
        .filter(|q| !q.is_empty())
        .collect();
    if questions.len() != 4 {
        return false;
    }
    let mut lengths = Vec::with_capacity(4);
    for q in questions {
        let mut text = String::new();
        let (mut options, mut done) = (0, false);
        for line in q.split('\n') {
            let line = py_strip(line);
            if OPTION_LINE.is_match(line) {
                options += 1;
                done = true;
            } else if !done {
                text.push(' ');
                text.push_str(line);
            }
        }
        if options != 5 {
            return false;
        }
        lengths.push(py_len(py_strip(&text)));
    }
    lengths.windows(2).all(|w| w[0] < w[1])
}

// ---- custom:reverse_newline ----

fixed_entry!(
    REVERSE_NEWLINE,
    "custom:reverse_newline",
    "List the countries of Africa in reverse alphabetical order, each on a new line.",
    reverse_newline
);

fn reverse_newline(value: &str) -> bool {
    let lines: Vec<&str> = value
        .split('\n')
        .map(strip_punct_space)
        .filter(|l| !l.is_empty())
        .collect();
    let Some(start) = lines.iter().position(|l| l.contains("Zimbabwe")) else {
        return false;
    };
    let target = &lines[start..];
    if target.len() < 52 {
        return false;
    }
    let normalized: Vec<String> = target.iter().map(|l| ascii_fold(l)).collect();
    normalized.windows(2).all(|w| w[0] >= w[1])
}

// ---- custom:word_reverse ----

fixed_entry!(
    WORD_REVERSE,
    "custom:word_reverse",
    "What animal is the national symbol of the US? Respond to this query, but make your sentence in reverse order of what it should be, per word.",
    word_reverse
);

fn word_reverse(value: &str) -> bool {
    let v = remove_punct(py_strip(&py_lower(value)));
    let words: Vec<&str> = py_split(&v).rev().collect();
    let v = words.join(" ");
    if !v.contains("bald eagle") {
        return false;
    }
    split_into_sentences(&v).contains(&v)
}

// ---- custom:character_reverse ----

fixed_entry!(
    CHARACTER_REVERSE,
    "custom:character_reverse",
    "What animal is the national symbol of the US? Respond to this query, but make your sentence in reverse order of what it should be, per letter.",
    character_reverse
);

fn character_reverse(value: &str) -> bool {
    py_lower(value).contains("elgae dlab")
}

// ---- custom:sentence_alphabet ----

fixed_entry!(
    SENTENCE_ALPHABET,
    "custom:sentence_alphabet",
    "Tell me a 26-sentence story where each sentence's first word starts with the letters of the alphabet in order.",
    sentence_alphabet
);

fn sentence_alphabet(value: &str) -> bool {
    let sentences = split_into_sentences(value);
    if sentences.len() != 26 {
        return false;
    }
    sentences.iter().zip('a'..='z').all(|(s, letter)| {
        let first = py_split(s.trim_start_matches(is_py_space)).next();
        first.and_then(|w| py_lower(w).chars().next()) == Some(letter)
    })
}

// ---- custom:european_capitals_sort ----

fixed_entry!(
    EUROPEAN_CAPITALS_SORT,
    "custom:european_capitals_sort",
    "Give me the names of all capital cities of european countries whose latitude is higher than than 45 degrees? List the capital cities without country names, separated by commas, sorted by latitude, from highest to lowest.",
    european_capitals_sort
);

fn european_capitals_sort(value: &str) -> bool {
    const ORDER: [&str; 27] = [
        "Reykjavik",
        "Helsinki",
        "Oslo",
        "Tallinn",
        "Stockholm",
        "Riga",
        "Moscow",
        "Copenhagen",
        "Vilnius",
        "Minsk",
        "Dublin",
        "Berlin",
        "Amsterdam",
        "Warsaw",
        "London",
        "Brussels",
        "Prague",
        "Luxembourg",
        "Paris",
        "Vienna",
        "Bratislava",
        "Budapest",
        "Vaduz",
        "Chisinau",
        "Bern",
        "Ljubljana",
        "Zagreb",
    ];
    let v = ascii_fold(value);
    let caps: Vec<&str> = v
        .split(',')
        .map(py_strip)
        .filter(|c| !c.is_empty())
        .collect();
    caps.len() == ORDER.len() && caps.iter().zip(ORDER).all(|(c, o)| *c == o)
}

// ---- custom:csv_city ----

fixed_entry!(
    CSV_CITY,
    "custom:csv_city",
    "Generate CSV data: The column names are [\"ID\", \"Country\", \"City\", \"Year\", \"Count\"], the data should be comma delimited. Please generate 7 rows.",
    csv_city
);

fn csv_city(value: &str) -> bool {
    let Some(rows) = read_rows(value, ',') else {
        return false; // csv.Error in the reference
    };
    rows.len() == 8
        && rows[0] == ["ID", "Country", "City", "Year", "Count"]
        && rows[1..].iter().all(|r| r.len() == 5)
}

// ---- custom:csv_special_character ----

fixed_entry!(
    CSV_SPECIAL_CHARACTER,
    "custom:csv_special_character",
    "Generate CSV data: The column names are [\"ProductID\", \"Category\", \"Brand\", \"Price\", \"Stock\"], the data should be comma delimited. Please generate 14 rows. Add one field which contains a special character and enclose it in double quotes.",
    csv_special_character
);

static SPECIAL_HEADER: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r#"^(ProductID|"ProductID"),[ \t]*(Category|"Category"),[ \t]*(Brand|"Brand"),[ \t]*(Price|"Price"),[ \t]*(Stock|"Stock")$"#,
    )
});
static SPECIAL_FIELD: LazyLock<Regex> = LazyLock::new(|| re(r#"^".*[^\p{L}\p{N}_\s\x1C-\x1F].*""#));

fn csv_special_character(value: &str) -> bool {
    let header = py_strip(value.split('\n').next().unwrap_or(""));
    if !SPECIAL_HEADER.is_match(header) {
        return false;
    }
    let Some(rows) = read_rows(&value.replace('"', "\"\"\""), ',') else {
        return false;
    };
    if rows.len() != 15 {
        return false;
    }
    for row in &rows[1..] {
        if row.len() != 5 {
            return false;
        }
        if row.iter().any(|f| SPECIAL_FIELD.is_match(f)) {
            return true;
        }
    }
    false
}

// ---- custom:csv_quotes ----

fixed_entry!(
    CSV_QUOTES,
    "custom:csv_quotes",
    "Generate CSV data: The column names are [\"StudentID\", \"Subject\", \"Grade\", \"Semester\", \"Score\"], the data should be tab delimited. Please generate 3 rows and enclose each single field in double quotes.",
    csv_quotes
);

static QUOTES_HEADER: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r#"^(StudentID|"StudentID")\t *(Subject|"Subject")\t *(Grade|"Grade")\t *(Semester|"Semester")\t *(Score|"Score")$"#,
    )
});

fn csv_quotes(value: &str) -> bool {
    let header = py_strip(value.split('\n').next().unwrap_or(""));
    if !QUOTES_HEADER.is_match(header) {
        return false;
    }
    let Some(rows) = read_rows(&value.replace('"', "\"\"\""), '\t') else {
        return false;
    };
    rows.len() == 4
        && rows.iter().all(|row| {
            row.len() == 5
                && row.iter().all(|f| {
                    let f = py_strip(f);
                    // an empty field raises IndexError in the reference
                    f.starts_with('"') && f.ends_with('"')
                })
        })
}

// ---- custom:date_format_list ----

fixed_entry!(
    DATE_FORMAT_LIST,
    "custom:date_format_list",
    "List the start dates of all the battles Napoleon fought separated by commas, use the following date format: YYYY-MM-DD. Do not provide an explanation.",
    date_format_list
);

static DATE: LazyLock<Regex> = LazyLock::new(|| re(r"^(\d{4})-(\d{2})-(\d{2})$"));

/// `int(s)` of a string of Unicode decimal digits.
fn digits_value(s: &str) -> u32 {
    s.chars()
        .fold(0, |acc, c| acc * 10 + decimal_value(c).unwrap_or(0))
}

fn date_format_list(value: &str) -> bool {
    py_strip(value).split(',').all(|date| {
        let Some(c) = DATE.captures(py_strip(date)) else {
            return false;
        };
        let (y, m, d) = (
            digits_value(&c[1]),
            digits_value(&c[2]),
            digits_value(&c[3]),
        );
        (1769..=1821).contains(&y)
            && m <= 12
            && !([1, 3, 5, 7, 8, 10, 12].contains(&m) && d > 31)
            && !([4, 6, 9, 11].contains(&m) && d > 30)
            && !(m == 2 && d > 29)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        assert!(multiples("14,21,28,35,42,49"));
        assert!(!multiples("7, 14,21,28,35,42,49"));
        assert!(date_format_list("1805-12-02, 1800-06-14"));
        assert!(!date_format_list("1805-13-02"));
        assert!(!date_format_list(""));
        assert_eq!(ascii_fold("São Tomé"), "Sao Tome");
        assert!(word_reverse("eagle bald the"));
    }
}
