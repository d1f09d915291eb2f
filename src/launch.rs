//! `hindsight learner --local-ranks N`: one learner rank per local GPU, as N child processes
//! of this one (what torchrun's `--nproc-per-node` does for PyTorch). A Kubernetes pod with
//! 8 GPUs runs one such launcher; its pod index is the node rank.
//!
//! - Local rank `i` is rank `node_rank x N + i`, gets `LOCAL_RANK=i` (so `--device cuda` is
//!   `cuda:i`), and listens on the base gRPC and metrics ports `+ 100 x i` (rank 0 of the
//!   node keeps the documented ports; the stride keeps clear of the other roles' defaults
//!   9103/9104 on a shared host).
//! - The ranks are a gang: when one exits with an error, the launcher stops the others
//!   (SIGTERM, then SIGKILL after the drain bound) and fails with that rank's exit, so the
//!   pod restarts whole and every rank resumes from rank 0's checkpoint. When all exit 0
//!   (`--max-steps` reached), so does the launcher.
//! - SIGTERM / Ctrl-C to the launcher goes to every rank, each drains as a learner does.
//! - Each child dies with the launcher (`PR_SET_PDEATHSIG`), so a `kill -9` of the launcher
//!   leaves no rank holding a GPU.

use std::future::Future;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hindsight_learner::LearnerArgs;
use hindsight_service::ToArgv;

use crate::supervise::{die_with_parent, Exit};

/// Port distance between local ranks.
pub const PORT_STRIDE: u16 = 100;

/// The launcher's global flags that its children take too.
#[derive(Clone, Debug)]
pub struct Globals {
    /// The metrics address of local rank 0 (`None`: metrics off).
    pub metrics_addr: Option<SocketAddr>,
    /// Compute threads of the launcher's budget (0: all cores), split between the ranks.
    pub threads: usize,
    /// `--log-format`, `--log-level` and their values.
    pub log_args: Vec<String>,
}

/// One child: its local rank, arguments and environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub local_rank: u32,
    pub rank: u32,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// The node rank: `--node-rank`, else torchrun's `NODE_RANK`, else `GROUP_RANK`, else 0.
pub fn node_rank(args: &LearnerArgs, env: impl Fn(&str) -> Option<String>) -> Result<u32> {
    if let Some(n) = args.node_rank {
        return Ok(n);
    }
    for name in ["NODE_RANK", "GROUP_RANK"] {
        if let Some(v) = env(name).filter(|v| !v.trim().is_empty()) {
            return v
                .trim()
                .parse()
                .with_context(|| format!("{name}={v:?} is not a number"));
        }
    }
    Ok(0)
}

fn shift(addr: SocketAddr, local_rank: u32) -> Result<SocketAddr> {
    let port = u32::from(addr.port()) + u32::from(PORT_STRIDE) * local_rank;
    let port = u16::try_from(port).with_context(|| {
        format!("local rank {local_rank}: port {port} of {addr} is above 65535")
    })?;
    Ok(SocketAddr::new(addr.ip(), port))
}

/// The children of `args` (which has `local_ranks` > 1) on node `node_rank`.
pub fn plan(args: &LearnerArgs, node_rank: u32, globals: &Globals) -> Result<Vec<Plan>> {
    let n = args.local_ranks;
    if args.rank.is_some() {
        bail!(
            "--rank and --local-ranks {n} do not go together: the launcher numbers its ranks \
             from --node-rank (rank = node rank x local ranks + local rank)"
        );
    }
    let device = args.device.trim();
    if device.starts_with("cuda:") {
        bail!(
            "--device {device} with --local-ranks {n} would put every rank on one GPU: give \
             --device cuda (local rank i takes cuda:i) or cpu"
        );
    }
    let world = args.world_size.unwrap_or(n);
    if world < (node_rank + 1) * n {
        bail!(
            "world size {world} is too small for node {node_rank} with {n} local ranks \
             (ranks {}..{}): the world size counts every rank of every node",
            node_rank * n,
            (node_rank + 1) * n - 1
        );
    }
    let threads = if globals.threads == 0 {
        0
    } else {
        (globals.threads / n as usize).max(1)
    };
    (0..n)
        .map(|i| {
            let rank = node_rank * n + i;
            let child = LearnerArgs {
                rank: Some(rank),
                world_size: Some(world),
                local_ranks: 1,
                node_rank: None,
                listen: shift(args.listen, i)?,
                learner_id: if rank == 0 {
                    args.learner_id.clone()
                } else {
                    format!("learner-{rank}")
                },
                // Only rank 0 writes the step log (the others train the same steps).
                step_log: if rank == 0 {
                    args.step_log.clone()
                } else {
                    None
                },
                ..args.clone()
            };
            let mut argv = globals.log_args.clone();
            argv.push("--metrics-addr".into());
            argv.push(match globals.metrics_addr {
                Some(a) => shift(a, i)?.to_string(),
                None => "off".into(),
            });
            argv.push("--threads".into());
            argv.push(threads.to_string());
            argv.push("learner".into());
            argv.extend(child.to_argv());
            Ok(Plan {
                local_rank: i,
                rank,
                argv,
                env: vec![
                    ("LOCAL_RANK".into(), i.to_string()),
                    ("LOCAL_WORLD_SIZE".into(), n.to_string()),
                    ("RANK".into(), rank.to_string()),
                    ("WORLD_SIZE".into(), world.to_string()),
                ],
            })
        })
        .collect()
}

struct Rank {
    plan: Plan,
    child: Child,
    exit: Option<Exit>,
}

impl Rank {
    fn reap(&mut self) -> Option<Exit> {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(Exit::from_status(status));
            }
        }
        self.exit
    }

    fn signal(&mut self, sig: libc::c_int) {
        if self.reap().is_none() {
            // SAFETY: kill(2) on a child we have not reaped, so the pid is still ours.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, sig);
            }
        }
    }
}

/// Stops every running rank: SIGTERM, then SIGKILL after `grace`.
fn stop_all(ranks: &mut [Rank], grace: Duration) {
    for r in ranks.iter_mut() {
        r.signal(libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && ranks.iter_mut().any(|r| r.reap().is_none()) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for r in ranks.iter_mut() {
        if r.reap().is_none() {
            tracing::warn!(
                rank = r.plan.rank,
                "still running {grace:?} after SIGTERM: SIGKILL"
            );
            let _ = r.child.kill();
            let _ = r.child.wait();
            r.exit = Some(Exit::Signal(libc::SIGKILL));
        }
    }
}

/// Runs the local ranks until they all finish, one fails, or `shutdown` resolves.
pub async fn run(
    args: LearnerArgs,
    globals: Globals,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let node = node_rank(&args, |k| std::env::var(k).ok())
        .map_err(hindsight_service::ConfigError::wrap)?;
    let plans = plan(&args, node, &globals).map_err(hindsight_service::ConfigError::wrap)?;
    let exe = std::env::current_exe().context("finding this executable")?;
    let grace = args.shutdown.bound() + Duration::from_secs(5);
    let mut ranks = Vec::with_capacity(plans.len());
    for plan in plans {
        let mut cmd = Command::new(&exe);
        cmd.args(&plan.argv)
            .envs(plan.env.iter().cloned())
            .stdin(Stdio::null());
        die_with_parent(&mut cmd);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut ranks, grace);
                return Err(e).with_context(|| format!("starting learner rank {}", plan.rank));
            }
        };
        tracing::info!(
            rank = plan.rank,
            local_rank = plan.local_rank,
            pid = child.id(),
            "started learner rank"
        );
        ranks.push(Rank {
            plan,
            child,
            exit: None,
        });
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("stopping the local ranks");
                tokio::task::block_in_place(|| stop_all(&mut ranks, grace));
                return failure(&ranks).map_or(Ok(()), Err);
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if let Some(i) = ranks
            .iter_mut()
            .position(|r| r.reap().is_some_and(|e| !e.success()))
        {
            let (rank, exit) = (ranks[i].plan.rank, ranks[i].exit.expect("reaped"));
            tracing::error!(
                rank,
                "learner rank {rank} exited ({}): stopping the other ranks",
                exit.describe_long()
            );
            tokio::task::block_in_place(|| stop_all(&mut ranks, grace));
            bail!("learner rank {rank} exited ({})", exit.describe_long());
        }
        if ranks.iter_mut().all(|r| r.reap().is_some()) {
            return Ok(());
        }
    }
}

/// The first rank that did not exit 0 after a stop (a drain that failed).
fn failure(ranks: &[Rank]) -> Option<anyhow::Error> {
    ranks.iter().find_map(|r| {
        r.exit.filter(|e| !e.success()).map(|e| {
            anyhow::anyhow!(
                "learner rank {} exited ({})",
                r.plan.rank,
                e.describe_long()
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        learner: LearnerArgs,
    }

    fn globals() -> Globals {
        Globals {
            metrics_addr: Some("0.0.0.0:9102".parse().unwrap()),
            threads: 16,
            log_args: vec!["--log-level".into(), "info".into()],
        }
    }

    #[test]
    fn ranks_gpus_and_ports_follow_the_node_and_local_rank() {
        let args = LearnerArgs {
            local_ranks: 4,
            world_size: Some(8),
            device: "cuda".into(),
            ..LearnerArgs::default()
        };
        let plans = plan(&args, 1, &globals()).unwrap();
        assert_eq!(plans.len(), 4);
        for (i, p) in plans.iter().enumerate() {
            let i = i as u32;
            assert_eq!((p.local_rank, p.rank), (i, 4 + i));
            assert!(p.env.contains(&("LOCAL_RANK".into(), i.to_string())));
            // The global flags, then the subcommand and its flags, which parse back to one
            // rank of the group.
            let at = p.argv.iter().position(|a| a == "learner").unwrap();
            let metrics = &p.argv[p.argv.iter().position(|a| a == "--metrics-addr").unwrap() + 1];
            assert_eq!(metrics, &format!("0.0.0.0:{}", 9102 + 100 * i));
            let threads = &p.argv[p.argv.iter().position(|a| a == "--threads").unwrap() + 1];
            assert_eq!(threads, "4");
            let child = Cli::try_parse_from(
                std::iter::once("x".to_string()).chain(p.argv[at + 1..].iter().cloned()),
            )
            .unwrap()
            .learner;
            assert_eq!(child.rank, Some(4 + i));
            assert_eq!(child.world_size, Some(8));
            assert_eq!(child.local_ranks, 1, "a child must not launch ranks itself");
            assert_eq!(child.node_rank, None);
            assert_eq!(child.device, "cuda");
            assert_eq!(child.listen.port(), 50052 + 100 * i as u16);
            assert_eq!(child.learner_id, format!("learner-{}", 4 + i));
        }
    }

    #[test]
    fn node_zero_keeps_rank_zero_its_id_and_step_log() {
        let args = LearnerArgs {
            local_ranks: 2,
            step_log: Some("steps.jsonl".into()),
            ..LearnerArgs::default()
        };
        let plans = plan(&args, 0, &globals()).unwrap();
        let ids: Vec<_> = plans.iter().map(|p| p.rank).collect();
        assert_eq!(ids, vec![0, 1]);
        let has_log = |p: &Plan| p.argv.iter().any(|a| a == "--step-log");
        assert!(has_log(&plans[0]) && !has_log(&plans[1]));
        assert!(plans[0]
            .argv
            .windows(2)
            .any(|w| w[0] == "--learner-id" && w[1] == "learner-0"));
    }

    #[test]
    fn impossible_layouts_say_what_is_wrong() {
        let base = LearnerArgs {
            local_ranks: 8,
            world_size: Some(16),
            ..LearnerArgs::default()
        };
        let e = plan(
            &LearnerArgs {
                device: "cuda:0".into(),
                ..base.clone()
            },
            0,
            &globals(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("every rank on one GPU"), "{e}");
        let e = plan(&base, 2, &globals()).unwrap_err();
        assert!(
            e.to_string()
                .contains("world size 16 is too small for node 2"),
            "{e}"
        );
        let e = plan(
            &LearnerArgs {
                rank: Some(3),
                ..base.clone()
            },
            0,
            &globals(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--rank and --local-ranks"), "{e}");
        let far = Globals {
            metrics_addr: Some("0.0.0.0:65500".parse().unwrap()),
            ..globals()
        };
        let e = plan(&base, 1, &far).unwrap_err();
        assert!(e.to_string().contains("above 65535"), "{e}");
    }

    #[test]
    fn the_node_rank_comes_from_the_flag_then_torchrun_names() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let args = LearnerArgs::default();
        assert_eq!(node_rank(&args, env(&[])).unwrap(), 0);
        assert_eq!(node_rank(&args, env(&[("GROUP_RANK", "2")])).unwrap(), 2);
        assert_eq!(
            node_rank(&args, env(&[("NODE_RANK", "1"), ("GROUP_RANK", "2")])).unwrap(),
            1
        );
        let flag = LearnerArgs {
            node_rank: Some(3),
            ..LearnerArgs::default()
        };
        assert_eq!(node_rank(&flag, env(&[("NODE_RANK", "1")])).unwrap(), 3);
        let e = node_rank(&args, env(&[("NODE_RANK", "x")])).unwrap_err();
        assert!(e.to_string().contains("NODE_RANK=\"x\""), "{e}");
    }
}
