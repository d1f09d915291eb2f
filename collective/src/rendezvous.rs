//! Where the ranks meet and what they must agree on. [`Rendezvous::resolve`] takes the
//! `--rank` / `--world-size` / `--rendezvous HOST:PORT` flags and falls back to the names
//! torchrun and Kubeflow's PyTorchJob set (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`,
//! `LOCAL_RANK`), so a launcher written for PyTorch starts Hindsight ranks unchanged.
//! [`Hello`] is what each peer tells rank 0 when it connects; rank 0 refuses the whole group
//! when any peer's version, world size, config digest, model fingerprint or collective
//! backend differs from its own, naming the field and both values.

use serde::{Deserialize, Serialize};

/// Errors of the rendezvous (configuration and handshake).
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("{name}={value:?} is not a number")]
    BadEnv { name: &'static str, value: String },
    #[error("rank {rank} is outside world size {world_size}")]
    RankOutOfRange { rank: u32, world_size: u32 },
    #[error("world size {0}: needs at least one rank")]
    EmptyWorld(u32),
    #[error("world size {0} > 1 needs --rendezvous HOST:PORT (or MASTER_ADDR and MASTER_PORT)")]
    NoAddress(u32),
    #[error("rendezvous with rank 0 at {addr} refused: {reason}")]
    Refused { addr: String, reason: String },
    #[error("rendezvous at {addr}: {what} within {secs}s")]
    TimedOut {
        addr: String,
        what: String,
        secs: u64,
    },
    #[error("rendezvous at {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("rendezvous: malformed handshake message: {0}")]
    Malformed(String),
}

/// This process's place among the ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendezvous {
    pub rank: u32,
    pub world_size: u32,
    /// Rank 0's rendezvous address (`HOST:PORT`); `None` only for one rank.
    pub addr: Option<String>,
    /// The rank on this node (picks the GPU of `--device cuda`: `cuda:LOCAL_RANK`); 0 when
    /// `LOCAL_RANK` is unset (one rank per node, as in a one-GPU pod).
    pub local_rank: u32,
}

impl Rendezvous {
    /// Flags first, then the torchrun / PyTorchJob environment (`env` looks a name up).
    pub fn resolve(
        rank: Option<u32>,
        world_size: Option<u32>,
        addr: Option<String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, RendezvousError> {
        let num = |name: &'static str| -> Result<Option<u32>, RendezvousError> {
            match env(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| RendezvousError::BadEnv { name, value: v }),
            }
        };
        let rank = match rank {
            Some(r) => r,
            None => num("RANK")?.unwrap_or(0),
        };
        let world_size = match world_size {
            Some(w) => w,
            None => num("WORLD_SIZE")?.unwrap_or(1),
        };
        if world_size == 0 {
            return Err(RendezvousError::EmptyWorld(world_size));
        }
        if rank >= world_size {
            return Err(RendezvousError::RankOutOfRange { rank, world_size });
        }
        let addr = match addr {
            Some(a) => Some(a),
            None => match (env("MASTER_ADDR"), num("MASTER_PORT")?) {
                (Some(h), Some(p)) if !h.is_empty() => Some(format!("{h}:{p}")),
                _ => None,
            },
        };
        if world_size > 1 && addr.is_none() {
            return Err(RendezvousError::NoAddress(world_size));
        }
        let local_rank = num("LOCAL_RANK")?.unwrap_or(0);
        Ok(Self {
            rank,
            world_size,
            addr,
            local_rank,
        })
    }
}

/// What a rank declares at the rendezvous; every field but `rank` must equal rank 0's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub rank: u32,
    pub world_size: u32,
    /// The binary's version (a rank built from other code may compute other gradients).
    pub version: String,
    /// Digest of the training configuration (hyper-parameters that must be identical).
    pub config_digest: String,
    /// The model's fingerprint (`hindsight_policy::fingerprint`).
    pub model_fingerprint: String,
    /// The collective backend (`tcp`, `nccl`): every rank must run the same one.
    #[serde(default)]
    pub backend: String,
}

impl Hello {
    /// The fields in which `peer` differs from `self` (rank 0's), each as
    /// `field: rank 0 has A, rank R has B`; empty when they agree.
    pub fn differences(&self, peer: &Hello) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |field: &str, a: &str, b: &str| {
            if a != b {
                out.push(format!(
                    "{field}: rank 0 has {a:?}, rank {} has {b:?}",
                    peer.rank
                ));
            }
        };
        cmp("version", &self.version, &peer.version);
        cmp(
            "world size",
            &self.world_size.to_string(),
            &peer.world_size.to_string(),
        );
        cmp("config digest", &self.config_digest, &peer.config_digest);
        cmp(
            "model fingerprint",
            &self.model_fingerprint,
            &peer.model_fingerprint,
        );
        cmp("collective backend", &self.backend, &peer.backend);
        out
    }
}

/// Rank 0's answer to a [`Hello`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Welcome {
    /// Accepted; the opaque bytes a device backend needs (the NCCL unique id), possibly empty.
    Accepted { unique_id: Vec<u8> },
    /// The group is refused; the reason names every difference.
    Refused { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn flags_win_over_the_environment() {
        let r = Rendezvous::resolve(
            Some(1),
            Some(2),
            Some("h:1".into()),
            env(&[
                ("RANK", "0"),
                ("WORLD_SIZE", "8"),
                ("MASTER_ADDR", "x"),
                ("MASTER_PORT", "9"),
            ]),
        )
        .unwrap();
        assert_eq!(r.rank, 1);
        assert_eq!(r.world_size, 2);
        assert_eq!(r.addr.as_deref(), Some("h:1"));
        // No LOCAL_RANK: one rank on this node, the first GPU.
        assert_eq!(r.local_rank, 0);
    }

    #[test]
    fn torchrun_environment_is_the_fallback() {
        let r = Rendezvous::resolve(
            None,
            None,
            None,
            env(&[
                ("RANK", "3"),
                ("WORLD_SIZE", "4"),
                ("MASTER_ADDR", "learner-0.learner"),
                ("MASTER_PORT", "29500"),
                ("LOCAL_RANK", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(
            r,
            Rendezvous {
                rank: 3,
                world_size: 4,
                addr: Some("learner-0.learner:29500".into()),
                local_rank: 1
            }
        );
    }

    #[test]
    fn nothing_set_is_one_rank() {
        let r = Rendezvous::resolve(None, None, None, env(&[])).unwrap();
        assert_eq!((r.rank, r.world_size, r.addr), (0, 1, None));
    }

    #[test]
    fn bad_configurations_are_named() {
        let e = Rendezvous::resolve(Some(2), Some(2), Some("h:1".into()), env(&[])).unwrap_err();
        assert!(
            e.to_string().contains("rank 2 is outside world size 2"),
            "{e}"
        );
        let e = Rendezvous::resolve(None, Some(2), None, env(&[])).unwrap_err();
        assert!(e.to_string().contains("--rendezvous"), "{e}");
        let e = Rendezvous::resolve(None, None, None, env(&[("RANK", "x")])).unwrap_err();
        assert!(e.to_string().contains("RANK=\"x\""), "{e}");
        let e = Rendezvous::resolve(None, Some(0), None, env(&[])).unwrap_err();
        assert!(e.to_string().contains("at least one rank"), "{e}");
    }

    #[test]
    fn differences_name_the_field_and_both_values() {
        let a = Hello {
            rank: 0,
            world_size: 2,
            version: "0.1.0".into(),
            config_digest: "c1".into(),
            model_fingerprint: "f1".into(),
            backend: "tcp".into(),
        };
        let mut b = a.clone();
        b.rank = 1;
        assert!(a.differences(&b).is_empty());
        b.model_fingerprint = "f2".into();
        let d = a.differences(&b);
        assert_eq!(
            d,
            vec!["model fingerprint: rank 0 has \"f1\", rank 1 has \"f2\"".to_string()]
        );
        b.model_fingerprint = "f1".into();
        b.backend = "nccl".into();
        assert_eq!(
            a.differences(&b),
            vec!["collective backend: rank 0 has \"tcp\", rank 1 has \"nccl\"".to_string()]
        );
    }
}
