//! `hindsight-collective`: what the learner ranks say to each other. The [`Collective`]
//! trait (rank, world size, all-reduce sum of f32/f64 buffers, broadcast of bytes from rank 0,
//! all-gather, barrier) and its backends: [`Single`] (one rank: every call is a no-op, today's
//! path), [`tcp::TcpCollective`] (separate processes over real sockets, for CPU ranks) and,
//! with the `nccl` feature, `nccl::NcclCollective` (GPU ranks: NCCL all-reduce on the compute
//! stream, the TCP collective as its control plane).
//! [`rendezvous`] resolves `--rank`/`--world-size`/`--rendezvous` with the torchrun /
//! PyTorchJob environment fallbacks and carries the handshake in which rank 0 checks every
//! peer's version, config digest and model fingerprint.
//!
//! Determinism is part of the contract: every backend gives every rank bit-identical results,
//! and an all-reduce sums in rank order (`((b0 + b1) + b2) + ...` element-wise), so N ranks
//! can be compared bit for bit with each other and, within rounding, with one rank.
//!
//! No tensor library here: the NCCL backend reduces CUDA buffers (cudarc's `CudaSlice`) in
//! place; turning a tensor into one is the caller's (the learner's) business.

#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
pub mod tcp;
pub mod watchdog;

use std::time::Duration;

pub use rendezvous::{Hello, Rendezvous, RendezvousError};
pub use tcp::TcpCollective;

/// What can go wrong between ranks. Every variant names the peer and the operation, so a
/// dead or stalled rank is identified in the log of every other rank.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {peer}: {op} failed: {source}")]
    Io {
        peer: u32,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("rank {peer}: no answer to {op} within {timeout:?} (stalled or dead peer)")]
    Timeout {
        peer: u32,
        op: &'static str,
        timeout: Duration,
    },
    #[error("rank {peer} closed the connection during {op} (the process died or stopped)")]
    Closed { peer: u32, op: &'static str },
    #[error("ranks out of step: {0}")]
    OutOfStep(String),
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    #[error("{op}: {message}")]
    Device { op: &'static str, message: String },
    #[error(
        "{op} on the GPU did not complete within {timeout:?} (a stalled or dead rank); \
         the NCCL communicator was aborted"
    )]
    DeviceTimeout { op: &'static str, timeout: Duration },
}

pub type Result<T> = std::result::Result<T, CollectiveError>;

/// How long a rank waits for an operation's data from its peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The backend's operation timeout (the normal case: a peer that does not answer in time
    /// is stalled or dead).
    Bounded,
    /// This long (a follower waiting for rank 0's next command while rank 0 waits for data;
    /// rank 0 sends heartbeats meanwhile).
    For(Duration),
}

/// The collective operations the learner ranks need. Every rank calls the same operations
/// in the same order; a backend detects calls that do not match and reports them.
pub trait Collective: Send {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> u32;
    /// Number of ranks.
    fn world_size(&self) -> u32;
    /// Element-wise sum over the ranks, in rank order; on return every rank's `buf` holds the
    /// same bits.
    fn all_reduce_f32(&mut self, buf: &mut [f32]) -> Result<()>;
    /// As [`Collective::all_reduce_f32`] for f64.
    fn all_reduce_f64(&mut self, buf: &mut [f64]) -> Result<()>;
    /// Rank 0's `buf` replaces every other rank's.
    fn broadcast(&mut self, buf: &mut Vec<u8>, wait: Wait) -> Result<()>;
    /// Every rank's `mine`, indexed by rank, on every rank.
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()> {
        self.all_gather(&[]).map(|_| ())
    }
    /// Bytes this rank has sent and received so far (the collective's cost, for metrics and
    /// `hindsight bench`).
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }
    /// The NCCL backend, which also reduces device buffers in place; `None` for host backends.
    #[cfg(feature = "nccl")]
    fn nccl(&mut self) -> Option<&mut nccl::NcclCollective> {
        None
    }
}

/// Bytes moved by a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

/// One rank: every operation is the identity (no copy, no socket).
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> u32 {
        0
    }
    fn world_size(&self) -> u32 {
        1
    }
    fn all_reduce_f32(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&mut self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut Vec<u8>, _wait: Wait) -> Result<()> {
        Ok(())
    }
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
}

/// Maximum over the ranks of each element (via an all-gather: for small buffers such as
/// statistics).
pub fn all_max_f64(c: &mut dyn Collective, buf: &mut [f64]) -> Result<()> {
    let mine: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
    let all = c.all_gather(&mine)?;
    for (r, bytes) in all.iter().enumerate() {
        if bytes.len() != mine.len() {
            return Err(CollectiveError::OutOfStep(format!(
                "all_max of {} values, rank {r} sent {}",
                buf.len(),
                bytes.len() / 8
            )));
        }
        for (x, b) in buf.iter_mut().zip(bytes.chunks_exact(8)) {
            let v = f64::from_le_bytes(b.try_into().expect("8 bytes"));
            if v > *x || x.is_nan() {
                *x = v;
            }
        }
    }
    Ok(())
}
