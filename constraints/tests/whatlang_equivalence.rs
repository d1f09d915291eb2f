//! The vendored `whatlang` (constraints/vendor/whatlang, faster trigram scorer) answers
//! exactly as upstream whatlang 0.18.0 — same language, script and confidence bits — on
//! every golden response, its loose variants (lines removed, `*` removed) and random
//! texts mixing scripts.

mod common;

use rand::{Rng, SeedableRng};

fn same(text: &str) {
    let ours = whatlang::detect(text).map(|i| (format!("{:?}/{:?}", i.lang(), i.script()), i.confidence().to_bits()));
    let theirs = whatlang_upstream::detect(text)
        .map(|i| (format!("{:?}/{:?}", i.lang(), i.script()), i.confidence().to_bits()));
    assert_eq!(ours, theirs, "{text:?}");
}

fn variants(text: &str) -> Vec<String> {
    let mut v = vec![text.to_string(), text.replace('*', "")];
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.len() > 1 {
        v.push(lines[1..].join("\n"));
        v.push(lines[..lines.len() - 1].join("\n"));
    }
    v
}

#[test]
fn golden_responses_detect_identically() {
    let dir = common::oracle_dir();
    let mut n = 0;
    for f in [
        "data/ifeval/input_response_data_gpt4_20231107_145030.jsonl",
        "data/ifbench/sample_output.jsonl",
    ] {
        for r in common::read_jsonl(&dir.join(f)) {
            for v in variants(r["response"].as_str().unwrap_or("")) {
                same(&v);
                same(&v.to_uppercase());
                same(&v.to_lowercase());
                n += 1;
            }
        }
    }
    assert!(n > 1000, "{n}");
}

#[test]
fn random_texts_detect_identically() {
    let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyz     .,'-!?0123ÄÖÜßéèñçабвгдежзийклмнопрстуфхцчшщыэюяіїєأبتثجحخدذرزسشصضطظعغفقكلمنهويאבגדהוזחטיכלמנסעפצקרשתकखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह中文字日本語ひらがなカタカナ한국어"
        .chars()
        .collect();
    let words = [
        "the", "and", "of", "der", "die", "und", "les", "des", "que", "los", "het", "och",
        "это", "что", "на", "في", "من", "של", "את", "है", "के", "और",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for _ in 0..3000 {
        let mut s = String::new();
        let len = rng.random_range(0..400);
        while s.chars().count() < len {
            if rng.random_bool(0.5) {
                s.push_str(words[rng.random_range(0..words.len())]);
                s.push(' ');
            } else {
                s.push(alphabet[rng.random_range(0..alphabet.len())]);
            }
        }
        same(&s);
    }
}
