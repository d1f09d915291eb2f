//! Build script: obtains NLTK's English Punkt parameters (`punkt_tab/english/*`, the data
//! behind the reference `nltk.sent_tokenize` / `nltk.word_tokenize`) and copies them into
//! `$OUT_DIR/punkt_english/`, from where `src/sentences.rs` embeds them.
//!
//! Sources, in order:
//! 1. `$HINDSIGHT_NLTK_DATA`: an existing `nltk_data` directory (offline builds); the files
//!    are read from `tokenizers/punkt_tab/english/`.
//! 2. The cache (`$HINDSIGHT_CACHE`, default `~/.cache/hindsight/build-data`): a
//!    `punkt_tab.zip` checked earlier.
//! 3. PyPI: `python3 -m pip download --no-deps llama-index-core==0.14.25` (the wheel
//!    vendors the genuine NLTK data package `punkt_tab.zip`); the wheel and the inner
//!    `punkt_tab.zip` are checked against pinned SHA-256 values (the latter is the value
//!    of NLTK's own data index), then the English files are extracted with
//!    `python3 -m zipfile`-equivalent code.
//!
//! Every file read is verified against a pinned SHA-256 (whatever the source), so the
//! embedded parameters are exactly NLTK's.
//!
//! `build/ifbench_data.rs` and `build/langdetect_data.rs` add the IFBench checkers' data
//! and the language detector's profiles the same way.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

#[path = "build/ifbench_data.rs"]
mod ifbench_data;
#[path = "build/langdetect_data.rs"]
mod langdetect_data;

const WHEEL: &str = "llama-index-core==0.14.25";
const WHEEL_FILE: &str = "llama_index_core-0.14.25-py3-none-any.whl";
const WHEEL_SHA256: &str = "caa7d9c5ac9b13dc33400cf8d5e92e689b6d1e4497eb9bfa50d6f52ca2eb22a1";
const ZIP_MEMBER: &str = "llama_index/core/_static/nltk_cache/tokenizers/punkt_tab.zip";
/// sha256 of `punkt_tab.zip` in NLTK's data index.
const PUNKT_TAB_SHA256: &str = "e57f64187974277726a3417ca6f181ec5403676c717672eef6a748a7b20e0106";
/// The four English parameter files and their SHA-256 (from the verified zip).
const FILES: [(&str, &str); 4] = [
    (
        "abbrev_types.txt",
        "92a3e070f43d9b4c5534758ca40ad7343b04e7e29bfe0c2eb658a39445a4f779",
    ),
    (
        "collocations.tab",
        "8e2da1225e4dd2cc9dba261ee231ccb134859e21b46006e7f472c5ee269af0cf",
    ),
    (
        "sent_starters.txt",
        "f3f8535483e1dba487241b764945168123bca3209a9645e59acd1225dc76edac",
    ),
    (
        "ortho_context.tab",
        "4bbcca25ed3d3f06c02402abf8419b9f033b8adc06e7b482eca4e45f81a5dc4c",
    ),
];

fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HINDSIGHT_CACHE") {
        return PathBuf::from(d).join("build-data");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/hindsight/build-data")
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Run a small Python program (zipfile only; no third-party packages).
fn py(script: &str, args: &[&Path]) -> Result<(), String> {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python()))?;
    if !out.status.success() {
        return Err(format!(
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Ensure `cache/punkt_tab.zip` exists with the pinned hash, downloading if needed.
fn punkt_zip(cache: &Path) -> Result<PathBuf, String> {
    let zip = cache.join("punkt_tab.zip");
    if let Ok(data) = std::fs::read(&zip) {
        if sha256_hex(&data) == PUNKT_TAB_SHA256 {
            return Ok(zip);
        }
    }
    std::fs::create_dir_all(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let wheel = cache.join(WHEEL_FILE);
    let ok = std::fs::read(&wheel).is_ok_and(|d| sha256_hex(&d) == WHEEL_SHA256);
    if !ok {
        let status = Command::new(python())
            .args(["-m", "pip", "download", "-q", "--no-deps", "-d"])
            .arg(cache)
            .arg(WHEEL)
            .status()
            .map_err(|e| format!("cannot run pip: {e}"))?;
        if !status.success() {
            return Err(format!("`pip download {WHEEL}` failed"));
        }
        let data = std::fs::read(&wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
        let got = sha256_hex(&data);
        if got != WHEEL_SHA256 {
            return Err(format!(
                "{WHEEL_FILE}: sha256 {got}, expected {WHEEL_SHA256}"
            ));
        }
    }
    py(
        &format!(
            "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read({ZIP_MEMBER:?}))"
        ),
        &[&wheel, &zip],
    )?;
    let got = sha256_hex(&std::fs::read(&zip).map_err(|e| e.to_string())?);
    if got != PUNKT_TAB_SHA256 {
        let _ = std::fs::remove_file(&zip);
        return Err(format!(
            "punkt_tab.zip: sha256 {got}, expected {PUNKT_TAB_SHA256}"
        ));
    }
    Ok(zip)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=HINDSIGHT_NLTK_DATA");
    println!("cargo:rerun-if-env-changed=HINDSIGHT_CACHE");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("punkt_english");
    std::fs::create_dir_all(&out).expect("create OUT_DIR/punkt_english");

    let src_dir = if let Some(d) = std::env::var_os("HINDSIGHT_NLTK_DATA") {
        PathBuf::from(d).join("tokenizers/punkt_tab/english")
    } else {
        let cache = cache_dir();
        let zip = punkt_zip(&cache).unwrap_or_else(|e| {
            panic!(
                "cannot obtain NLTK punkt_tab from PyPI ({e}). Set HINDSIGHT_NLTK_DATA to an \
                 nltk_data directory holding tokenizers/punkt_tab/english/ for offline builds."
            )
        });
        let dir = cache.join("punkt_tab_extracted");
        py(
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], \
             [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith('punkt_tab/english/')])",
            &[&zip, &dir],
        )
        .unwrap_or_else(|e| panic!("extracting punkt_tab.zip: {e}"));
        dir.join("punkt_tab/english")
    };
    for (name, sha) in FILES {
        let path = src_dir.join(name);
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let got = sha256_hex(&data);
        assert!(
            got == sha,
            "{}: sha256 {got}, expected {sha} (not NLTK's punkt_tab English model)",
            path.display()
        );
        std::fs::write(out.join(name), &data).expect("write OUT_DIR file");
        println!("cargo:rerun-if-changed={}", path.display());
    }
    ifbench_data::generate();
    langdetect_data::generate();
}
