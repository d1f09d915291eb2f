//! Character normalisation and the sliding n-gram window of langdetect's `NGram`.
//!
//! Each character is first mapped by its Unicode block: ASCII non-letters, general
//! punctuation and a few Latin-1 signs become spaces; Romanian comma-below letters become
//! their cedilla forms; Farsi yeh becomes Arabic yeh; the Vietnamese-specific part of
//! Latin Extended Additional collapses to one letter; every Hiragana, Katakana, Bopomofo
//! and Hangul syllable collapses to one representative of its script, and CJK ideographs
//! to the first ideograph of their frequency class. The window then yields the 1-, 2- and
//! 3-grams ending at each character, restarting at every space, and yields nothing inside
//! a word once two upper-case letters in a row were seen (acronyms and all-caps words
//! carry little language signal).

use super::profiles::Tables;

/// `NGram.normalize(ch)`.
pub(crate) fn normalize(t: &Tables, ch: char) -> char {
    let cp = u32::from(ch);
    match cp {
        0x0000..=0x007F => {
            if ch.is_ascii_alphabetic() {
                ch
            } else {
                ' '
            }
        }
        0x0080..=0x00FF => {
            if t.latin1_excluded.contains(&ch) {
                ' '
            } else {
                ch
            }
        }
        // Latin Extended-B: Romanian s/t with comma below -> with cedilla
        0x0180..=0x024F => match cp {
            0x0219 => '\u{015f}',
            0x021b => '\u{0163}',
            _ => ch,
        },
        // General Punctuation
        0x2000..=0x206F => ' ',
        // Arabic: Farsi yeh -> Arabic yeh
        0x0600..=0x06FF => {
            if cp == 0x06cc {
                '\u{064a}'
            } else {
                ch
            }
        }
        // Latin Extended Additional
        0x1E00..=0x1EFF => {
            if cp >= 0x1ea0 {
                '\u{1ec3}'
            } else {
                ch
            }
        }
        0x3040..=0x309F => '\u{3042}',                   // Hiragana
        0x30A0..=0x30FF => '\u{30a2}',                   // Katakana
        0x3100..=0x312F | 0x31A0..=0x31BF => '\u{3105}', // Bopomofo (+ Extended)
        0x4E00..=0x9FFF => t.cjk.get(&ch).copied().unwrap_or(ch), // CJK Unified Ideographs
        0xAC00..=0xD7AF => '\u{ac00}',                   // Hangul Syllables
        _ => ch,
    }
}

/// `NGram.normalize_vi(text)`: a base vowel followed by a combining grave, acute, tilde,
/// hook above or dot below becomes the precomposed letter.
pub(crate) fn normalize_vi(t: &Tables, text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if let Some(letter) = t.vi_letters.iter().position(|&l| l == c) {
            if let Some(mark) = chars
                .peek()
                .and_then(|m| t.vi_marks.iter().position(|d| d == m))
            {
                chars.next();
                out.push(t.vi_composed[mark][letter]);
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// The last (up to) three normalised characters and whether the current word is in
/// capitals.
pub(crate) struct Window {
    grams: [char; 3],
    len: usize,
    pub(crate) capital_word: bool,
}

impl Window {
    pub(crate) fn new() -> Self {
        Window {
            grams: [' '; 3],
            len: 1,
            capital_word: false,
        }
    }

    /// `NGram.add_char` with an already normalised character.
    pub(crate) fn push(&mut self, ch: char) {
        let last = self.grams[self.len - 1];
        if last == ' ' {
            self.grams[0] = ' ';
            self.len = 1;
            self.capital_word = false;
            if ch == ' ' {
                return;
            }
        } else if self.len >= 3 {
            self.grams.copy_within(1..3, 0);
            self.len = 2;
        }
        self.grams[self.len] = ch;
        self.len += 1;
        if ch.is_uppercase() {
            if last.is_uppercase() {
                self.capital_word = true;
            }
        } else {
            self.capital_word = false;
        }
    }

    /// The `n` last characters, if there are that many.
    pub(crate) fn last(&self, n: usize) -> Option<&[char]> {
        (n <= self.len).then(|| &self.grams[self.len - n..self.len])
    }
}
