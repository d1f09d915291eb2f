//! Build-time data for the language detector (`src/langdetect/profiles.rs` embeds the
//! results from `$OUT_DIR/langdetect/`): the 55 language profiles (character 1- to
//! 3-gram counts) and the normalisation tables (`messages.properties`: Latin-1 characters
//! treated as spaces, the Kanji classes, the Vietnamese diacritic tables) of the PyPI
//! package `langdetect==1.0.9` (Apache-2.0; `constraints/licenses/langdetect-NOTICE`), the
//! detector the reference checkers call.
//!
//! The source distribution is looked up like the wheels of `ifbench_data.rs`
//! (`$HINDSIGHT_WHEELHOUSE`, the cache, else `pip download --no-deps`) and checked against
//! a pinned SHA-256; Python 3 (standard library only) reads the tarball and writes two
//! plain tables:
//!
//! * `profiles.tsv`: per language a header `#<name>\t<n1>\t<n2>\t<n3>` (the n-gram totals
//!   by length) followed by `<gram>\t<count>` lines, grams of 1 to 3 characters only
//!   (longer keys never match an extracted n-gram);
//! * `messages.tsv`: `<key>\t<value>` with the `\uXXXX` escapes decoded, in file order.

use std::path::PathBuf;
use std::process::Command;

use super::ifbench_data::{wheel, Wheel};
use super::python;

const LANGDETECT: Wheel = Wheel {
    spec: "langdetect==1.0.9",
    file: "langdetect-1.0.9.tar.gz",
    sha256: "cbc1fef89f8d062739774bd51eda3da3274006b3661d199c2655f6b3f6d605a0",
};

const CONVERT_PY: &str = r##"
import json, sys, tarfile
src, out = sys.argv[1], sys.argv[2]
root = "langdetect-1.0.9/langdetect/"
tar = tarfile.open(src, "r:gz")
names = sorted(m.name for m in tar.getmembers()
               if m.isfile() and m.name.startswith(root + "profiles/"))
assert len(names) == 55, len(names)
with open(out + "/profiles.tsv", "w", encoding="utf-8", newline="\n") as f:
    for name in names:
        p = json.loads(tar.extractfile(name).read().decode("utf-8"))
        assert len(p["n_words"]) == 3
        f.write("#%s\t%d\t%d\t%d\n" % (p["name"], *p["n_words"]))
        for gram, count in sorted(p["freq"].items()):
            if 1 <= len(gram) <= 3:
                assert "\t" not in gram and "\n" not in gram, repr(gram)
                f.write("%s\t%d\n" % (gram, count))
props = tar.extractfile(root + "utils/messages.properties").read().decode("ascii")
with open(out + "/messages.tsv", "w", encoding="utf-8", newline="\n") as f:
    for line in props.splitlines():
        key, _, value = line.strip().partition("=")
        if not key:
            continue
        value = value.encode().decode("unicode_escape")
        assert "\t" not in value and "\n" not in value, key
        f.write("%s\t%s\n" % (key, value))
"##;

/// Writes `$OUT_DIR/langdetect/{profiles.tsv, messages.tsv}`.
pub fn generate() {
    println!("cargo:rerun-if-changed=build/langdetect_data.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("langdetect");
    std::fs::create_dir_all(&out).expect("create OUT_DIR/langdetect");
    let sdist = wheel(&LANGDETECT);
    let output = Command::new(python())
        .arg("-c")
        .arg(CONVERT_PY)
        .arg(&sdist)
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python()));
    assert!(
        output.status.success(),
        "converting {}: {}",
        sdist.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}
