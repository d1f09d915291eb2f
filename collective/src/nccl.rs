//! The NCCL backend, for GPU ranks (cargo feature `nccl`). Two planes:
//!
//! - **Control**: a host [`Collective`] ([`crate::TcpCollective`] for several ranks,
//!   [`crate::Single`] for one) carries the rendezvous (rank 0 hands the NCCL unique id to the
//!   peers over it, no shared file), broadcasts of bytes, all-gathers and barriers. Its bounded
//!   reads already detect a dead peer.
//! - **Data**: an NCCL communicator on the caller's CUDA stream (the compute stream: candle's,
//!   so the reduction is ordered after the backward that produced the gradients without a
//!   host synchronisation). Device buffers are reduced in place
//!   ([`NcclCollective::all_reduce_device`]); host buffers go through a device copy.
//!
//! NCCL calls block (a collective waits for every peer; the first one also connects them), so
//! each operation is **watched** ([`crate::watchdog`]): it is armed with the operation
//! timeout, the caller polls the stream's completion, and the watchdog aborts the
//! communicator when the deadline passes (`ncclCommAbort`, documented to unblock the calls in
//! flight). If even that does not free the caller within [`ABORT_GRACE`], the watchdog ends
//! the process with a message naming the operation: a clear error within a bounded time in
//! every case, never a silent hang.
//!
//! Determinism: NCCL gives every rank the same bits (each chunk is reduced once and then
//! copied), but its summation order is its ring's, not rank order; so NCCL ranks agree bit for
//! bit with each other and match one rank within rounding, like the TCP backend.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, DeviceRepr};
use cudarc::nccl::sys;

use crate::watchdog::Watchdog;
use crate::{Collective, CollectiveError, Result, Traffic, Wait};

/// How long the watchdog waits, after aborting the communicator, for the blocked call to
/// return before it ends the process.
pub const ABORT_GRACE: Duration = Duration::from_secs(10);

/// Bytes of an NCCL unique id (what rank 0 hands out at the rendezvous).
pub const UNIQUE_ID_BYTES: usize = 128;

/// A fresh NCCL unique id (rank 0 creates it before the rendezvous and hands it out).
pub fn new_unique_id() -> Result<Vec<u8>> {
    let id = cudarc::nccl::result::get_uniqueid()
        .map_err(|e| device_err("creating the NCCL unique id", e.0, None))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// The version of the NCCL library loaded at run time, as `major.minor.patch`.
pub fn library_version() -> Result<String> {
    let v = cudarc::nccl::result::get_nccl_version()
        .map_err(|e| device_err("reading the NCCL version", e.0, None))?;
    Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

/// An element type NCCL reduces.
pub trait Element: cudarc::nccl::NcclType + DeviceRepr + Copy {}
impl Element for f32 {}
impl Element for f64 {}

/// The communicator handle, shared with the watchdog (which may abort it from its thread).
struct Comm {
    raw: sys::ncclComm_t,
    /// Set once the communicator is aborted, which frees the handle: nothing may use it after.
    /// The owner holds the lock while it asks the communicator for its state, so an abort
    /// from the watchdog never frees the handle under such a call.
    aborted: Mutex<bool>,
}

// SAFETY: the handle is used for operations by the owning rank's thread only. The other
// thread (the watchdog's) only calls `ncclCommAbort`, under `aborted`'s lock, which NCCL
// allows while an operation is blocked (it is how a hung collective is cancelled); every
// other use of the handle takes that lock and checks that it is not aborted.
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

/// What the communicator says about itself while an operation runs.
enum CommState {
    Fine,
    Failed(sys::ncclResult_t),
    Aborted,
}

impl Comm {
    fn lock(&self) -> std::sync::MutexGuard<'_, bool> {
        self.aborted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Aborts once; later calls do nothing.
    fn abort(&self) {
        let mut aborted = self.lock();
        if !*aborted {
            // SAFETY: a communicator created by `ncclCommInitRank`, aborted at most once.
            unsafe {
                sys::ncclCommAbort(self.raw);
            }
            *aborted = true;
        }
    }

    fn is_aborted(&self) -> bool {
        *self.lock()
    }

    /// The communicator's asynchronous error state (a peer failed, a network error).
    fn state(&self) -> CommState {
        let aborted = self.lock();
        if *aborted {
            return CommState::Aborted;
        }
        let mut code = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator (not aborted, and it cannot be while we hold the lock).
        let rc = unsafe { sys::ncclCommGetAsyncError(self.raw, &mut code) };
        match (rc, code) {
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess)
            | (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclInProgress) => {
                CommState::Fine
            }
            (sys::ncclResult_t::ncclSuccess, failed) | (failed, _) => CommState::Failed(failed),
        }
    }

    fn last_error(&self) -> Option<String> {
        let aborted = self.lock();
        if *aborted {
            return None;
        }
        // SAFETY: a live communicator; NCCL returns a NUL-terminated string or null.
        let p = unsafe { sys::ncclGetLastError(self.raw) };
        (!p.is_null())
            .then(|| {
                unsafe { std::ffi::CStr::from_ptr(p) }
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|s| !s.is_empty())
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        // No operation is in flight once the owner drops it: abort frees the communicator
        // without waiting for peers that may already be gone.
        self.abort();
    }
}

fn device_err(op: &'static str, code: sys::ncclResult_t, comm: Option<&Comm>) -> CollectiveError {
    // SAFETY: NCCL returns a static NUL-terminated string for every result code.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(code)) }
        .to_string_lossy()
        .into_owned();
    let detail = comm.and_then(Comm::last_error);
    CollectiveError::Device {
        op,
        message: match detail {
            Some(d) => format!("{code:?} ({text}): {d}"),
            None => format!("{code:?} ({text})"),
        },
    }
}

fn driver_err(op: &'static str, e: cudarc::driver::DriverError) -> CollectiveError {
    CollectiveError::Device {
        op,
        message: format!("CUDA: {e}"),
    }
}

/// One GPU rank's collective (see the module docs).
pub struct NcclCollective {
    control: Box<dyn Collective>,
    stream: Arc<CudaStream>,
    comm: Arc<Comm>,
    dog: Watchdog,
    traffic: Traffic,
}

impl NcclCollective {
    /// Joins the NCCL communicator of `control`'s ranks on `stream`'s device, with `unique_id`
    /// (rank 0's [`new_unique_id`], which the others received at the rendezvous). Blocks until
    /// every rank has joined, at most `join_timeout` plus [`ABORT_GRACE`] (then the process
    /// exits with a message); every operation after that is bounded by `timeout`.
    pub fn new(
        control: Box<dyn Collective>,
        stream: Arc<CudaStream>,
        unique_id: &[u8],
        timeout: Duration,
        join_timeout: Duration,
    ) -> Result<Self> {
        let (rank, world) = (control.rank(), control.world_size());
        if unique_id.len() != UNIQUE_ID_BYTES {
            return Err(CollectiveError::OutOfStep(format!(
                "an NCCL unique id has {UNIQUE_ID_BYTES} bytes, rank 0 handed out {} \
                 (is rank 0 running the TCP backend?)",
                unique_id.len()
            )));
        }
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(unique_id) {
            *d = *s as _;
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_err("binding the CUDA context", e))?;
        // The watchdog covers the join itself (a peer that died after the rendezvous); until
        // the communicator exists there is nothing to abort, and the grace ends the process.
        let slot: Arc<Mutex<Option<Arc<Comm>>>> = Arc::default();
        let target = Arc::clone(&slot);
        let dog = Watchdog::start(
            &format!("learner rank {rank} NCCL"),
            timeout,
            ABORT_GRACE,
            move |_| {
                let comm = target.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(c) = comm {
                    c.abort();
                }
            },
        );
        let raw = {
            let _armed = dog.arm_for("joining the NCCL communicator", join_timeout)?;
            let mut raw: sys::ncclComm_t = std::ptr::null_mut();
            // SAFETY: `raw` receives the new communicator; `id` is 128 bytes from rank 0.
            let code = unsafe { sys::ncclCommInitRank(&mut raw, world as i32, id, rank as i32) };
            if code != sys::ncclResult_t::ncclSuccess {
                return Err(device_err("joining the NCCL communicator", code, None));
            }
            raw
        };
        let comm = Arc::new(Comm {
            raw,
            aborted: Mutex::new(false),
        });
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&comm));
        Ok(Self {
            control,
            stream,
            comm,
            dog,
            traffic: Traffic::default(),
        })
    }

    /// The stream the collectives run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Element-wise sum over the ranks of a device buffer, in place, on the stream; returns
    /// once the result is there (so the caller may read it from any stream).
    pub fn all_reduce_device<T: Element>(&mut self, buf: &mut CudaSlice<T>) -> Result<()> {
        const OP: &str = "all-reduce on the GPU";
        let n = buf.len();
        if n == 0 {
            return Ok(());
        }
        // One rank still runs the call (a copy in place): `--collective nccl` with one rank
        // is how a single GPU checks the whole path.
        if self.comm.is_aborted() {
            return Err(self.aborted(OP));
        }
        // The caller's thread may change between steps (an async runtime's blocking section):
        // make this communicator's context current before NCCL enqueues on it.
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_err(OP, e))?;
        let armed = self.dog.arm(OP)?;
        {
            let (ptr, _record) = buf.device_ptr_mut(&self.stream);
            // SAFETY: `ptr` holds `n` elements of `T` on this communicator's device, and the
            // reduction is enqueued on the stream that owns the buffer's pending work.
            let code = unsafe {
                sys::ncclAllReduce(
                    ptr as *const _,
                    ptr as *mut _,
                    n,
                    T::as_nccl_type(),
                    sys::ncclRedOp_t::ncclSum,
                    self.comm.raw,
                    self.stream.cu_stream() as _,
                )
            };
            if code != sys::ncclResult_t::ncclSuccess {
                return Err(self.failed(OP, code));
            }
        }
        self.wait(OP)?;
        drop(armed);
        // A ring all-reduce sends and receives 2 (N - 1) / N of the buffer on every rank
        // (nothing with one rank).
        let world = self.control.world_size() as u64;
        let bytes = (n * std::mem::size_of::<T>()) as u64 * 2 * (world - 1) / world;
        self.traffic.sent += bytes;
        self.traffic.received += bytes;
        Ok(())
    }

    /// Host buffers: copied to the device, reduced there, copied back.
    fn all_reduce_host<T: Element>(&mut self, buf: &mut [T]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self
            .stream
            .clone_htod(buf)
            .map_err(|e| driver_err("copying a buffer to the GPU", e))?;
        self.all_reduce_device(&mut dev)?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| driver_err("copying a reduced buffer to the host", e))?;
        self.stream
            .synchronize()
            .map_err(|e| driver_err("copying a reduced buffer to the host", e))
    }

    /// Polls the stream until the enqueued work is done, the communicator reports an
    /// asynchronous error, or the watchdog fires. Work that "completes" because the
    /// communicator was aborted under it is an error, not a result.
    fn wait(&self, op: &'static str) -> Result<()> {
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| driver_err(op, e))?;
        let mut pause = Duration::from_micros(20);
        loop {
            match done.try_is_complete() {
                Ok(true) if self.comm.is_aborted() => return Err(self.aborted(op)),
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(_) if self.comm.is_aborted() => return Err(self.aborted(op)),
                Err(e) => return Err(driver_err(op, e)),
            }
            match self.comm.state() {
                CommState::Fine => {}
                CommState::Aborted => return Err(self.aborted(op)),
                CommState::Failed(code) => {
                    let err = device_err(op, code, Some(&self.comm));
                    self.comm.abort();
                    return Err(err);
                }
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// An NCCL call returned `code`.
    fn failed(&self, op: &'static str, code: sys::ncclResult_t) -> CollectiveError {
        if self.comm.is_aborted() {
            self.aborted(op)
        } else {
            device_err(op, code, Some(&self.comm))
        }
    }

    /// The error of an operation on an aborted communicator: the watchdog's timeout when it
    /// fired, else the earlier failure that aborted it.
    fn aborted(&self, op: &'static str) -> CollectiveError {
        match self.dog.fired() {
            Some(fired) => self.dog.timed_out(fired),
            None => CollectiveError::Device {
                op,
                message: "the NCCL communicator was aborted after an earlier error".into(),
            },
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> u32 {
        self.control.rank()
    }
    fn world_size(&self) -> u32 {
        self.control.world_size()
    }
    fn all_reduce_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_host(buf)
    }
    fn all_reduce_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce_host(buf)
    }
    fn broadcast(&mut self, buf: &mut Vec<u8>, wait: Wait) -> Result<()> {
        self.control.broadcast(buf, wait)
    }
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.control.all_gather(mine)
    }
    fn barrier(&mut self) -> Result<()> {
        self.control.barrier()
    }
    fn traffic(&self) -> Traffic {
        let c = self.control.traffic();
        Traffic {
            sent: c.sent + self.traffic.sent,
            received: c.received + self.traffic.received,
        }
    }
    fn nccl(&mut self) -> Option<&mut NcclCollective> {
        Some(self)
    }
}
