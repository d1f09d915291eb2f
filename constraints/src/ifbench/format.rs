//! IFBench `format:*` ids (except `format:title_case`, which needs nltk's word tokenizer,
//! see `tokenized.rs`): nested brackets and quotes, answer options, one word per line,
//! emoji sentence ends, indentation stairs, quote explanations, custom list markers,
//! italic theses, sub-bullets, sentences before bullets, an output template and no
//! whitespace.

use std::sync::LazyLock;

use regex::Regex;

use super::count::py_count;
use super::split::split_into_sentences;
use super::util::{py_lower, py_split, remove_punct, strip_punct_space};
use super::{data, fixed_entry};
use crate::kwargs::Kwargs;
use crate::pytext::{is_py_space, py_strip, PY_WORD};
use crate::registry::Entry;
use crate::{Constraint, ConstraintError};

// ---- format:parentheses ----

fixed_entry!(
    PARENTHESES,
    "format:parentheses",
    "Nest parentheses (and [brackets {and braces}]) at least 5 levels deep.",
    parentheses
);

fn parentheses(value: &str) -> bool {
    let mut levels: Vec<char> = Vec::new();
    let mut max_depth = 0usize;
    for c in value.chars() {
        match c {
            '(' | '[' | '{' => {
                levels.push(c);
                max_depth = max_depth.max(levels.len());
            }
            ')' | ']' | '}' => {
                let matches = matches!(
                    (levels.last(), c),
                    (Some('('), ')') | (Some('['), ']') | (Some('{'), '}')
                );
                if matches {
                    levels.pop();
                    if max_depth >= 5 && levels.len() < max_depth {
                        return true;
                    }
                } else {
                    levels.clear();
                    max_depth = 0;
                }
            }
            _ => {}
        }
    }
    false
}

// ---- format:quotes ----

fixed_entry!(
    QUOTES,
    "format:quotes",
    "Include quotes within quotes within quotes, at least 3 levels deep, alternating between double quotes and single quotes.",
    quotes
);

fn quotes(value: &str) -> bool {
    let mut levels: Vec<char> = Vec::new();
    let (mut reached, mut current) = (0i64, 0i64);
    for c in value.chars() {
        if levels.last() == Some(&c) {
            levels.pop();
            current -= 1;
            if reached - current >= 3 {
                return true;
            }
        } else if c == '"' || c == '\'' {
            levels.push(c);
            current += 1;
            reached = reached.max(current);
        }
    }
    false
}

// ---- format:options ----

pub(crate) const OPTIONS: Entry = Entry {
    id: "format:options",
    kwargs: &["options"],
    build: build_options,
};

struct Options {
    text: String,
    options: Vec<String>,
    strict: bool,
}

static ABC: LazyLock<Regex> = LazyLock::new(|| {
    let nw = format!("[^{}]*", &PY_WORD[1..PY_WORD.len() - 1]);
    Regex::new(&format!("^{nw}[aA]{nw}[bB]{nw}[cC]")).expect("static regex")
});

fn build_options(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    let text = kw.string("options")?;
    let sep = if text.contains('/') {
        "/"
    } else if text.contains("or") {
        "or"
    } else {
        ","
    };
    Ok(Box::new(Options {
        text: text.to_string(),
        options: text.split(sep).map(|o| py_strip(o).to_string()).collect(),
        strict: ABC.is_match(text),
    }))
}

impl Constraint for Options {
    fn id(&self) -> &str {
        OPTIONS.id
    }
    fn follows(&self, response: &str) -> bool {
        if self.strict {
            return self.options.iter().any(|o| o == response);
        }
        let v = py_lower(strip_punct_space(response));
        self.options
            .iter()
            .any(|o| py_lower(strip_punct_space(o)) == v)
    }
    fn description(&self) -> String {
        format!(
            "Answer with one of the following options: {}. Do not give any explanation.",
            self.text
        )
    }
}

// ---- format:newline ----

fixed_entry!(
    NEWLINE,
    "format:newline",
    "Write each word on a new line.",
    newline
);

fn newline(value: &str) -> bool {
    let value = remove_punct(value);
    let stripped = py_strip(&value);
    let lines = stripped.split('\n').filter(|l| !l.is_empty()).count();
    lines == py_split(stripped).count()
}

// ---- format:emoji ----

fixed_entry!(
    EMOJI,
    "format:emoji",
    "Please use an emoji at the end of every sentence.",
    emoji_sentences
);

fn emoji_sentences(value: &str) -> bool {
    let sentences = split_into_sentences(value);
    let stripped: Vec<Vec<char>> = sentences
        .iter()
        .map(|s| py_strip(&remove_punct(s)).chars().collect())
        .collect();
    for (i, s) in stripped.iter().enumerate() {
        let Some(&last) = s.last() else {
            return false;
        };
        let second_last = if s.len() > 1 { s[s.len() - 2] } else { last };
        if !data::is_emoji(last) && !data::is_emoji(second_last) {
            match stripped.get(i + 1) {
                Some(next) => match next.first() {
                    Some(&first) if data::is_emoji(first) => {}
                    _ => return false,
                },
                None => return false,
            }
        }
    }
    true
}

// ---- format:line_indent ----

fixed_entry!(
    LINE_INDENT,
    "format:line_indent",
    "Create stairs by incrementally indenting each new line.",
    line_indent
);

fn line_indent(value: &str) -> bool {
    let mut lines: std::collections::VecDeque<&str> = value.split('\n').collect();
    // the reference removes blank lines while iterating over the same list: each
    // `remove` deletes the first equal line and makes the iterator skip one element
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        if py_strip(line).is_empty() {
            if let Some(pos) = lines.iter().position(|l| *l == line) {
                lines.remove(pos);
            }
        }
    }
    let indent = |l: &str| l.len() - l.trim_start_matches(' ').len();
    let lines = lines.make_contiguous();
    lines.windows(2).all(|w| indent(w[1]) > indent(w[0]))
}

// ---- format:quote_unquote ----

fixed_entry!(
    QUOTE_UNQUOTE,
    "format:quote_unquote",
    "Every quoted phrase must be followed by an unquoted explanation.",
    quote_unquote
);

fn quote_unquote(value: &str) -> bool {
    let v = value.replace(['“', '”'], "\"").replace("'\"'", "");
    let v: String = v.split(is_py_space).collect();
    if v.contains("\"\"") {
        return false;
    }
    let stripped =
        v.trim_matches(|c: char| c.is_ascii_digit() || (c.is_ascii_punctuation() && c != '"'));
    match stripped.chars().next_back() {
        Some(c) => c != '"',
        None => false, // the reference raises IndexError
    }
}

// ---- format:list ----

pub(crate) const LIST: Entry = Entry {
    id: "format:list",
    kwargs: &["sep"],
    build: build_list,
};

struct List {
    sep: String,
}

fn build_list(kw: &Kwargs<'_>) -> Result<Box<dyn Constraint>, ConstraintError> {
    Ok(Box::new(List {
        sep: kw.string("sep")?.to_string(),
    }))
}

impl Constraint for List {
    fn id(&self) -> &str {
        LIST.id
    }
    fn follows(&self, response: &str) -> bool {
        py_count(response, &self.sep) >= 2
    }
    fn description(&self) -> String {
        format!(
            "Answer with a list of items, instead of bullet points use {}.",
            self.sep
        )
    }
}

// ---- format:thesis ----

fixed_entry!(
    THESIS,
    "format:thesis",
    "Each section must begin with a thesis statement in italics, use HTML to indicate the italics.",
    thesis
);

fn thesis(value: &str) -> bool {
    let Some(start) = value.find("<i>").or_else(|| value.find("<em>")) else {
        return false;
    };
    let v = &value[start..];
    let Some(end) = v.find("</i>").or_else(|| v.find("</em>")) else {
        return false;
    };
    // value[3:end] and value[end + 4:] (the tags are ASCII, so byte = char offsets)
    let thesis = if end > 3 { &v[3..end] } else { "" };
    if py_strip(thesis).is_empty() {
        return false;
    }
    !py_strip(v.get(end + 4..).unwrap_or("")).is_empty()
}

// ---- format:sub-bullets ----

fixed_entry!(
    SUB_BULLETS,
    "format:sub-bullets",
    "Your response must include bullet points denoted by * and at least one sub-bullet point denoted by - for each bullet point.",
    sub_bullets
);

fn sub_bullets(value: &str) -> bool {
    value.split('*').skip(1).all(|b| b.contains('-'))
}

// ---- format:no_bullets_bullets ----

fixed_entry!(
    NO_BULLETS_BULLETS,
    "format:no_bullets_bullets",
    "Your answer must contain at least two sentences ending in a period followed by at least two bullet points denoted by *.",
    no_bullets_bullets
);

fn no_bullets_bullets(value: &str) -> bool {
    // `sentences` is a flag first and then the last line's sentence list (its truthiness)
    let mut in_sentences = true;
    let (mut n_sentences, mut n_bullets) = (0usize, 0usize);
    for line in value.split('\n') {
        let line = py_strip(line);
        if line.starts_with('*') {
            in_sentences = false;
            if n_sentences < 2 {
                return false;
            }
            n_bullets += 1;
        } else if in_sentences {
            let s = split_into_sentences(line);
            n_sentences += s.len();
            in_sentences = !s.is_empty();
        } else {
            return false;
        }
    }
    n_bullets >= 2
}

// ---- format:output_template ----

fixed_entry!(
    OUTPUT_TEMPLATE,
    "format:output_template",
    "Use this exact template for your response: My Answer: [answer] My Conclusion: [conclusion] Future Outlook: [outlook]",
    output_template
);

fn output_template(value: &str) -> bool {
    value.contains("My Answer:")
        && value.contains("My Conclusion:")
        && value.contains("Future Outlook:")
}

// ---- format:no_whitespace ----

fixed_entry!(
    NO_WHITESPACE,
    "format:no_whitespace",
    "The output should not contain any whitespace.",
    no_whitespace
);

fn no_whitespace(value: &str) -> bool {
    !value.chars().any(is_py_space)
}
