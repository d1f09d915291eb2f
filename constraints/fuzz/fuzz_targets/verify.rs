//! Fuzz target for the verify entry point: the input is split into a kwargs JSON document
//! and a response; every supported instruction id is built from the kwargs (a build error
//! is fine) and checked strict and loose on the response. Nothing may panic, and the
//! verdicts inside a `with_response_cache` scope (with `check_loose_given_strict`, as
//! `hindsight verify` computes them) must equal the plain ones.
//! Run: `cd constraints/fuzz && cargo +nightly fuzz run verify`.
#![no_main]

use hindsight_constraints::{
    build, supported_ids, with_response_cache, Constraint, ConstraintSpec, Map, Value,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (kw, response) = text.split_once('\u{0}').unwrap_or(("{}", text));
    let kwargs: Map<String, Value> = serde_json::from_str(kw).unwrap_or_default();
    let built: Vec<Box<dyn Constraint>> = supported_ids()
        .iter()
        .filter_map(|id| build(&ConstraintSpec::new(*id, kwargs.clone())).ok())
        .collect();
    let plain: Vec<(bool, bool)> = built
        .iter()
        .map(|c| {
            let _ = c.description();
            (c.check_strict(response), c.check_loose(response))
        })
        .collect();
    let cached: Vec<(bool, bool)> = with_response_cache(|| {
        built
            .iter()
            .map(|c| {
                let strict = c.check_strict(response);
                (strict, c.check_loose_given_strict(response, strict))
            })
            .collect()
    });
    assert_eq!(plain, cached, "{response:?}");
});
