//! `hindsight-evaluator`: does the model follow instructions? Benchmark prompts (IFEval,
//! IFBench or a file in their format) answered by our engine and scored by our verifiers,
//! used by `hindsight eval` (one model, one run) and by the evaluator role (every K-th
//! weight version the learner publishes, during training).
//!
//! - [`bench`]: the prompt set (shipped benchmarks are embedded; `--limit` takes a fixed
//!   slice);
//! - [`generate`]: responses with continuous batching and the model's chat template, and
//!   their scores (the `hindsight_constraints::score` functions `hindsight verify` uses);
//! - [`role`]: the evaluator service (`hindsight evaluator`);
//! - [`metrics`]: its Prometheus series.

pub mod bench;
pub mod generate;
pub mod metrics;
pub mod role;

pub use bench::{BenchError, Benchmark, EvalPrompt};
pub use role::{eval_line, run, EvaluatorArgs};
