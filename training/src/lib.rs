//! `hindsight-training`: the policy as something to train. The differentiable
//! [`TrainableModel`] (on the CPU in f32/f64 its training forward and backward are the
//! hand-written whole-model pass of [`fused`]; elsewhere candle's autograd over the
//! [`primitives`]), the per-parameter gradient sums of micro-batches ([`GradSums`],
//! [`HostGrads`] for the collective), gradient norms, and a fused in-place [`AdamW`] whose
//! state checkpoints with the weights.

pub mod adamw;
pub mod fused;
pub mod primitives;
pub mod trainable;

#[cfg(test)]
mod tests;

pub use adamw::{grad_norm, AdamW};
pub use trainable::{GradSums, HostGrads, TrainForward, TrainableModel};
