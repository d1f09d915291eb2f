//! Fuzz target for the verify entry point: the input is split into a kwargs JSON document
//! and a response; every supported instruction id is built from the kwargs (a build error
//! is fine) and checked strict and loose on the response. Nothing may panic.
//! Run: `cd constraints/fuzz && cargo +nightly fuzz run verify`.
#![no_main]

use hindsight_constraints::{build, supported_ids, ConstraintSpec, Map, Value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (kw, response) = text.split_once('\u{0}').unwrap_or(("{}", text));
    let kwargs: Map<String, Value> = serde_json::from_str(kw).unwrap_or_default();
    for id in supported_ids() {
        if let Ok(c) = build(&ConstraintSpec::new(*id, kwargs.clone())) {
            let _ = c.check_strict(response);
            let _ = c.check_loose(response);
            let _ = c.description();
        }
    }
});
