//! The learner's ranks (ARCHITECTURE.md, "Learner ranks"): the group's collective, the
//! commands rank 0 broadcasts (`Step`, `Heartbeat`, `Stop`), the start-up synchronisation
//! (rank 0's resumed weights and optimizer state to every rank, then a weight-digest check),
//! the follower's loop (ranks other than 0: train on command, nothing else) and rank 0's
//! heartbeat while it waits for a batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hindsight_collective::tcp::TcpConfig;
use hindsight_collective::{Collective, Hello, Rendezvous, Single, TcpCollective, Wait};
use hindsight_proto::v1::TrainingBatch;
use prost::Message;
use tracing::{info, warn};

use crate::checkpoint::TrainerState;
use crate::trainer::{StepStats, Trainer};

/// How often rank 0 tells idle followers it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// What rank 0 tells the other ranks to do next.
#[derive(Debug)]
pub enum Command {
    /// Train `batch` as step `step` from weight version `version`.
    Step {
        step: u64,
        version: u64,
        batch: TrainingBatch,
    },
    /// Rank 0 is alive and waiting for data.
    Heartbeat,
    /// Training is over; exit.
    Stop,
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Command::Step {
                step,
                version,
                batch,
            } => {
                let mut out = vec![1u8];
                out.extend_from_slice(&step.to_le_bytes());
                out.extend_from_slice(&version.to_le_bytes());
                batch.encode(&mut out).expect("a Vec grows");
                out
            }
            Command::Heartbeat => vec![2],
            Command::Stop => vec![3],
        }
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        match b.first() {
            Some(1) if b.len() >= 17 => Ok(Command::Step {
                step: u64::from_le_bytes(b[1..9].try_into()?),
                version: u64::from_le_bytes(b[9..17].try_into()?),
                batch: TrainingBatch::decode(&b[17..]).context("decoding the broadcast batch")?,
            }),
            Some(2) => Ok(Command::Heartbeat),
            Some(3) => Ok(Command::Stop),
            _ => bail!("rank 0 sent an unknown command ({} bytes)", b.len()),
        }
    }
}

/// Which collective the ranks reduce gradients with (`--collective`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// NCCL when the learner trains on a GPU and the binary has the `nccl` feature, TCP
    /// otherwise (one rank: nothing at all).
    #[default]
    Auto,
    /// The TCP collective (host buffers; any device).
    Tcp,
    /// NCCL on the compute stream (a `--features cuda,nccl` build and a CUDA device); with one
    /// rank it still creates the communicator, which checks the NCCL set-up.
    Nccl,
}

impl Backend {
    /// The backend `self` means for this device and world size; `None`: one rank, no
    /// collective. A choice this binary or device cannot honour is an error that says why.
    pub fn resolve(self, device: &candle_core::Device, world_size: u32) -> Result<Option<Self>> {
        let nccl_built = cfg!(feature = "nccl");
        match self {
            Backend::Auto if world_size == 1 => Ok(None),
            Backend::Auto if device.is_cuda() && nccl_built => Ok(Some(Backend::Nccl)),
            Backend::Auto | Backend::Tcp if world_size == 1 => Ok(None),
            Backend::Auto | Backend::Tcp => Ok(Some(Backend::Tcp)),
            Backend::Nccl if !nccl_built => bail!(
                "--collective nccl needs a binary built with `--features cuda,nccl` \
                 (scripts/cuda-toolchain.sh --nccl)"
            ),
            Backend::Nccl if !device.is_cuda() => {
                bail!("--collective nccl needs a CUDA --device (cuda or cuda:N)")
            }
            Backend::Nccl => Ok(Some(Backend::Nccl)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Tcp => "tcp",
            Backend::Nccl => "nccl",
        }
    }
}

/// The rank settings of `hindsight learner`.
#[derive(Clone, Debug)]
pub struct RankSettings {
    pub rendezvous: Rendezvous,
    pub op_timeout: Duration,
    pub rendezvous_timeout: Duration,
    /// Compare weight digests every this many steps (0: only at start).
    pub digest_every: u64,
    /// The collective, as resolved for the device (`None`: one rank, no collective).
    pub backend: Option<Backend>,
}

/// SHA-256 of the training configuration as JSON: every hyper-parameter that changes the
/// update (ranks must agree on it).
pub fn config_digest(trainer: &Trainer) -> Result<String> {
    let json = serde_json::to_vec(&trainer.config)?;
    Ok(hindsight_proto::sha256_hex(&json))
}

/// Joins the group (one rank without NCCL: the no-op collective). Blocking.
pub fn connect(
    settings: &RankSettings,
    trainer: &Trainer,
    model_fingerprint: &str,
) -> Result<Box<dyn Collective>> {
    let r = &settings.rendezvous;
    let Some(backend) = settings.backend else {
        return Ok(Box::new(Single));
    };
    // NCCL: rank 0 makes the communicator's unique id and hands it out at the rendezvous.
    let unique_id = if backend == Backend::Nccl && r.rank == 0 {
        nccl_unique_id()?
    } else {
        Vec::new()
    };
    let (control, unique_id): (Box<dyn Collective>, Vec<u8>) = if r.world_size == 1 {
        (Box::new(Single), unique_id)
    } else {
        let addr = r
            .addr
            .clone()
            .context("a world size above 1 needs --rendezvous")?;
        let hello = Hello {
            rank: r.rank,
            world_size: r.world_size,
            version: env!("CARGO_PKG_VERSION").to_string(),
            config_digest: config_digest(trainer)?,
            model_fingerprint: model_fingerprint.to_string(),
            backend: backend.name().to_string(),
        };
        info!(rank = r.rank, world_size = r.world_size, %addr, backend = backend.name(), "joining the learner ranks");
        let config = TcpConfig {
            op_timeout: settings.op_timeout,
            rendezvous_timeout: settings.rendezvous_timeout,
            ..TcpConfig::default()
        };
        let tcp = TcpCollective::establish(&addr, hello, unique_id, config)?;
        // Every rank now holds rank 0's id (rank 0 its own).
        let id = tcp.unique_id().to_vec();
        (Box::new(tcp), id)
    };
    let c = match backend {
        Backend::Nccl => join_nccl(control, trainer, unique_id, settings)?,
        _ => control,
    };
    info!(
        rank = r.rank,
        world_size = r.world_size,
        backend = backend.name(),
        "learner ranks joined"
    );
    Ok(c)
}

#[cfg(feature = "nccl")]
fn nccl_unique_id() -> Result<Vec<u8>> {
    Ok(hindsight_collective::nccl::new_unique_id()?)
}

#[cfg(not(feature = "nccl"))]
fn nccl_unique_id() -> Result<Vec<u8>> {
    bail!("this binary has no NCCL (build it with `--features cuda,nccl`)")
}

/// The NCCL communicator on the trainer's CUDA stream, `control` as its host plane.
#[cfg(feature = "nccl")]
fn join_nccl(
    control: Box<dyn Collective>,
    trainer: &Trainer,
    unique_id: Vec<u8>,
    settings: &RankSettings,
) -> Result<Box<dyn Collective>> {
    use hindsight_collective::nccl::{library_version, NcclCollective};
    let candle_core::Device::Cuda(dev) = trainer.device() else {
        bail!("the NCCL collective needs a CUDA device");
    };
    info!(nccl = %library_version()?, "joining the NCCL communicator");
    Ok(Box::new(NcclCollective::new(
        control,
        dev.cuda_stream(),
        &unique_id,
        settings.op_timeout,
        settings.rendezvous_timeout,
    )?))
}

#[cfg(not(feature = "nccl"))]
fn join_nccl(
    _control: Box<dyn Collective>,
    _trainer: &Trainer,
    _unique_id: Vec<u8>,
    _settings: &RankSettings,
) -> Result<Box<dyn Collective>> {
    bail!("this binary has no NCCL (build it with `--features cuda,nccl`)")
}

/// Start-up: rank 0's resumed state (if any) to every rank, then the digest check. Returns
/// the trainer state rank 0 resumed from (followers: what rank 0 sent).
pub fn synchronise(
    c: &mut dyn Collective,
    trainer: &mut Trainer,
    resumed: Option<(&TrainerState, &[u8], &[u8])>,
) -> Result<Option<TrainerState>> {
    if c.world_size() == 1 {
        return Ok(resumed.map(|(s, _, _)| s.clone()));
    }
    let mut buf = Vec::new();
    if c.rank() == 0 {
        if let Some((state, weights, optimizer)) = &resumed {
            for part in [serde_json::to_vec(state)?.as_slice(), *weights, *optimizer] {
                buf.extend_from_slice(&(part.len() as u64).to_le_bytes());
                buf.extend_from_slice(part);
            }
        }
    }
    c.broadcast(&mut buf, Wait::Bounded)
        .context("broadcasting the resumed state")?;
    let mut state = resumed.map(|(s, _, _)| s.clone());
    if c.rank() != 0 && !buf.is_empty() {
        let mut parts = Vec::new();
        let mut rest = &buf[..];
        while rest.len() >= 8 {
            let n = u64::from_le_bytes(rest[..8].try_into()?) as usize;
            ensure!(rest.len() >= 8 + n, "truncated resume broadcast");
            parts.push(&rest[8..8 + n]);
            rest = &rest[8 + n..];
        }
        ensure!(
            parts.len() == 3,
            "resume broadcast has {} parts",
            parts.len()
        );
        trainer.import_weights(parts[1])?;
        trainer.optimizer.load_state(parts[2])?;
        let s: TrainerState = serde_json::from_slice(parts[0])?;
        info!(
            step = s.step,
            "took rank 0's resumed weights and optimizer state"
        );
        state = Some(s);
    }
    check_digest(c, trainer, state.as_ref().map_or(0, |s| s.step))?;
    Ok(state)
}

/// Every rank's weight digest must equal rank 0's; otherwise every rank stops with an error
/// naming the ranks that differ.
pub fn check_digest(c: &mut dyn Collective, trainer: &Trainer, step: u64) -> Result<()> {
    if c.world_size() == 1 {
        return Ok(());
    }
    let mine = trainer.weight_digest()?;
    let all = c
        .all_gather(mine.as_bytes())
        .context("gathering weight digests")?;
    let differ: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, d)| *d != &all[0])
        .map(|(r, d)| format!("rank {r} has {}", String::from_utf8_lossy(d)))
        .collect();
    ensure!(
        differ.is_empty(),
        "weights differ between ranks at step {step}: rank 0 has {}, {}",
        String::from_utf8_lossy(&all[0]),
        differ.join(", ")
    );
    info!(step, digest = %mine, "every rank holds the same weights");
    Ok(())
}

/// Rank 0's handle on the group: each step is broadcast and taken under one lock, and a
/// heartbeat thread speaks while nothing else does.
pub struct Leader {
    coll: Arc<Mutex<Box<dyn Collective>>>,
    last: Arc<Mutex<Instant>>,
    done: Arc<AtomicBool>,
    failed: Arc<Mutex<Option<String>>>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
    digest_every: u64,
    world_size: u32,
}

impl Leader {
    /// Wraps rank 0's collective; `on_failure` runs (once) if a heartbeat finds a dead peer.
    pub fn new(
        coll: Box<dyn Collective>,
        digest_every: u64,
        on_failure: impl FnOnce() + Send + 'static,
    ) -> Self {
        let world_size = coll.world_size();
        let multi = world_size > 1;
        let coll = Arc::new(Mutex::new(coll));
        let last = Arc::new(Mutex::new(Instant::now()));
        let done = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(None));
        let heartbeat = multi.then(|| {
            let (coll, last, done, failed) =
                (coll.clone(), last.clone(), done.clone(), failed.clone());
            std::thread::Builder::new()
                .name("rank-heartbeat".into())
                .spawn(move || {
                    while !done.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                        if last.lock().unwrap().elapsed() < HEARTBEAT {
                            continue;
                        }
                        let mut c = coll.lock().unwrap();
                        if done.load(Ordering::Relaxed) {
                            break;
                        }
                        let mut b = Command::Heartbeat.encode();
                        if let Err(e) = c.broadcast(&mut b, Wait::Bounded) {
                            warn!(error = %e, "a learner rank is gone; stopping");
                            *failed.lock().unwrap() = Some(e.to_string());
                            done.store(true, Ordering::Relaxed);
                            on_failure();
                            break;
                        }
                        *last.lock().unwrap() = Instant::now();
                    }
                })
                .expect("spawning the heartbeat thread")
        });
        Self {
            coll,
            last,
            done,
            failed,
            heartbeat,
            digest_every,
            world_size,
        }
    }

    /// Number of ranks.
    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    /// Runs `f` with the collective while no heartbeat can interleave.
    pub fn with<R>(&self, f: impl FnOnce(&mut dyn Collective) -> Result<R>) -> Result<R> {
        self.check()?;
        let mut c = self.coll.lock().unwrap();
        let r = f(&mut **c);
        *self.last.lock().unwrap() = Instant::now();
        r
    }

    /// One training step of the whole group on `batch`.
    pub fn step(
        &self,
        trainer: &mut Trainer,
        batch: &TrainingBatch,
        step: u64,
        version: u64,
    ) -> Result<StepStats> {
        let digest_every = self.digest_every;
        self.with(|c| {
            if c.world_size() > 1 {
                let mut b = Command::Step {
                    step,
                    version,
                    batch: batch.clone(),
                }
                .encode();
                c.broadcast(&mut b, Wait::Bounded)
                    .context("sending the batch to the other ranks")?;
            }
            let stats = trainer.train_step_with(c, batch, step, version)?;
            if digest_every > 0 && step.is_multiple_of(digest_every) {
                check_digest(c, trainer, step)?;
            }
            Ok(stats)
        })
    }

    /// Why the group failed between steps, if it did.
    pub fn check(&self) -> Result<()> {
        match &*self.failed.lock().unwrap() {
            Some(e) => bail!("learner ranks failed: {e}"),
            None => Ok(()),
        }
    }

    /// Tells the followers to exit (best effort) and stops the heartbeat.
    pub fn stop(mut self) {
        let mut c = self.coll.lock().unwrap();
        self.done.store(true, Ordering::Relaxed);
        if c.world_size() > 1 && self.failed.lock().unwrap().is_none() {
            let mut b = Command::Stop.encode();
            if let Err(e) = c.broadcast(&mut b, Wait::Bounded) {
                warn!(error = %e, "could not tell the other ranks to stop");
            }
        }
        drop(c);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
    }
}

/// A follower's life: wait for rank 0's commands (a heartbeat at least every
/// [`HEARTBEAT`], bounded by `idle_timeout`), train on every `Step`, return at `Stop`.
/// `stopping` ends the loop between commands (SIGTERM); `on_step` sees every step's figures.
pub fn follow(
    c: &mut dyn Collective,
    trainer: &mut Trainer,
    idle_timeout: Duration,
    digest_every: u64,
    stopping: &AtomicBool,
    mut on_step: impl FnMut(&StepStats),
) -> Result<()> {
    loop {
        if stopping.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut buf = Vec::new();
        c.broadcast(&mut buf, Wait::For(idle_timeout + HEARTBEAT))
            .context("waiting for rank 0")?;
        match Command::decode(&buf)? {
            Command::Heartbeat => {}
            Command::Stop => {
                info!("rank 0 says training is over");
                return Ok(());
            }
            Command::Step {
                step,
                version,
                batch,
            } => {
                let stats = trainer.train_step_with(c, &batch, step, version)?;
                if digest_every > 0 && step.is_multiple_of(digest_every) {
                    check_digest(c, trainer, step)?;
                }
                info!(
                    step,
                    loss = stats.loss,
                    grad_norm = stats.grad_norm,
                    secs = format!("{:.2}", stats.step_seconds),
                    "step done (follower)"
                );
                on_step(&stats);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_follows_the_device_the_world_and_the_build() {
        let cpu = candle_core::Device::Cpu;
        assert_eq!(Backend::Auto.resolve(&cpu, 1).unwrap(), None);
        assert_eq!(Backend::Tcp.resolve(&cpu, 1).unwrap(), None);
        assert_eq!(Backend::Auto.resolve(&cpu, 2).unwrap(), Some(Backend::Tcp));
        assert_eq!(Backend::Tcp.resolve(&cpu, 4).unwrap(), Some(Backend::Tcp));
        let e = Backend::Nccl.resolve(&cpu, 2).unwrap_err().to_string();
        if cfg!(feature = "nccl") {
            assert!(e.contains("needs a CUDA --device"), "{e}");
        } else {
            assert!(e.contains("--features cuda,nccl"), "{e}");
        }
    }

    #[test]
    fn commands_survive_the_wire() {
        let batch = TrainingBatch {
            batch_id: 7,
            step: 3,
            ..Default::default()
        };
        let c = Command::Step {
            step: 3,
            version: 2,
            batch: batch.clone(),
        };
        match Command::decode(&c.encode()).unwrap() {
            Command::Step {
                step,
                version,
                batch: b,
            } => assert_eq!((step, version, b), (3, 2, batch)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Command::decode(&Command::Stop.encode()).unwrap(),
            Command::Stop
        ));
        let e = Command::decode(&[9]).unwrap_err().to_string();
        assert!(e.contains("unknown command"), "{e}");
    }
}
