//! Unit tests: tiny-model gradients/consistency, sampling, serialisation,
//! AdamW, Hugging Face checkpoints and chat templates, and the real SmolLM2 checks.

mod hf;
mod smollm2;
mod tiny;
