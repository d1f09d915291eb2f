//! Unit tests: tiny-model gradients/consistency, sampling, serialisation,
//! AdamW, and the real SmolLM2 checks.

mod smollm2;
mod tiny;
