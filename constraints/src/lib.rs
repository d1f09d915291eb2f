//! `hindsight-constraints`: the verifiable-constraint library behind Hindsight
//! instruction Replay (HiR, arXiv 2512.23457).
//!
//! It provides
//! * verifiers with the exact semantics of the reference IFEval checkers
//!   (google-research / lm_eval 0.4.13 `instructions.py`), in strict and loose mode
//!   ([`Constraint`], [`build`]);
//! * the instruction text each checker's `build_description` writes ([`describe`]);
//! * training-prompt records, their layout and the HiR rewrite ([`PromptRecord`],
//!   [`CompiledRecord`], [`Rewrite`], [`load_jsonl`]);
//! * a seeded prompt generator ([`generate_prompts`]);
//! * the HiR reward, selection and layout functions ([`hir`]);
//! * a port of the `langdetect` language detector the reference checkers call
//!   ([`langdetect`]).
//! * benchmark scoring shared by `verify`, `eval` and the evaluator ([`score`]) and the
//!   embedded IFEval / IFBench prompts ([`benchmarks`]).
//!
//! Everything except [`load_jsonl`] is pure and total: no I/O, and no verifier panics
//! on any input (invalid kwargs are rejected once, at build time, with a
//! [`ConstraintError`]).
//!
//! # Deliberate differences from the reference
//! * Missing, ill-typed or negative kwargs (where the reference draws a random value) and
//!   blank keywords / end phrases / postscript markers are rejected at build time.
//! * Keywords, forbidden words and custom postscript markers are regex patterns in the
//!   reference. Plain words (no metacharacter) behave exactly as in Python (including
//!   Python's `\b`); patterns with metacharacters are compiled by the `regex` crate
//!   (same meaning for common syntax; Python-only syntax is a build error).
//! * JSON nested deeper than Python's recursion limit gets a grammatical verdict where
//!   the reference raises `RecursionError`.
//! * Unicode property tables come from Rust's `std` / `regex`, not Python 3.11's.

pub mod benchmarks;
mod constraint;
mod generator;
pub mod hir;
mod ifbench;
mod ifeval;
mod jsonval;
mod kwargs;
mod lang;
pub mod langdetect;
mod loose;
mod pytext;
mod record;
mod registry;
pub mod score;
mod sentences;
mod wordtok;

pub use constraint::{Constraint, ConstraintError, ConstraintSpec};
pub use generator::generate_prompts;
pub use record::{load_jsonl, CompiledRecord, LoadError, PromptRecord, Rewrite, Template};
pub use registry::{build, build_from, describe, supported_ids};
pub use serde_json::{Map, Value};
pub use wordtok::with_response_cache;
