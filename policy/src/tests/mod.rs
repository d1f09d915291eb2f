//! Unit tests of the sampler and the continuous-batching engine. The tests that check the
//! sampler against the trainable model (tiny models, SmolLM2, Hugging Face checkpoints) are
//! in `hindsight-training`.

mod engine;
mod tensor_engine;
