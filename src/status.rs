//! `hindsight status`: asks each service's Health endpoint and the replay server's Status RPC,
//! and prints one readable report (or JSON with `--json`).

use anyhow::{Context, Result};
use hindsight_proto::v1::health_client::HealthClient;
use hindsight_proto::v1::replay_client::ReplayClient;
use hindsight_proto::v1::{HealthCheckRequest, ReplayStatusRequest};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Replay server URL.
    #[arg(
        long,
        env = "HINDSIGHT_REPLAY_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub replay: String,
    /// Learner URL.
    #[arg(
        long,
        env = "HINDSIGHT_LEARNER_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub learner: String,
    /// TLS trust and the (read-only) credentials to use.
    #[command(flatten)]
    pub security: hindsight_service::ClientSecurityArgs,
}

pub async fn run(args: StatusArgs) -> Result<()> {
    let security = hindsight_service::ClientSecurity::from_args(&args.security)?;
    for url in [&args.replay, &args.learner] {
        match security.connect_authed(url, 1).await {
            Ok(channel) => match HealthClient::new(channel)
                .check(HealthCheckRequest {})
                .await
            {
                Ok(h) => {
                    let h = h.into_inner();
                    println!(
                        "{url}: {} {:?} up {:.0}s, policy version {}, {:?}",
                        h.role,
                        h.status(),
                        h.uptime_ms as f64 / 1000.0,
                        h.policy_version,
                        h.details
                    );
                }
                Err(e) => println!("{url}: health check failed: {}", e.message()),
            },
            Err(e) => println!("{url}: unreachable ({e})"),
        }
    }
    let mut replay = ReplayClient::new(
        security
            .connect_authed(&args.replay, 1)
            .await
            .with_context(|| format!("connecting to {}", args.replay))?,
    );
    let s = replay.status(ReplayStatusRequest {}).await?.into_inner();
    println!(
        "replay: prompts queued {} / {}, leases active {} (expired {}), groups accepted {} rejected {} waiting {}, batches built {} acked {}, replays {}, learner step {}, policy version {}",
        s.prompts_queued, s.prompts_total, s.leases_active, s.leases_expired, s.groups_accepted,
        s.groups_rejected, s.groups_waiting, s.batches_built, s.batches_acked, s.replays_emitted,
        s.learner_step, s.policy_version
    );
    println!(
        "replay: pending groups {} ({} bytes, {} batches), leases paused {}, committed through batch {}, stale groups {}, orphaned groups {}",
        s.pending_groups, s.pending_bytes, s.pending_batches, s.leases_paused,
        s.committed_through_batch_id, s.groups_stale, s.groups_orphaned
    );
    for a in s.actors {
        println!(
            "  actor {}: policy version {}, groups {}",
            a.actor_id, a.policy_version, a.groups_accepted
        );
    }
    Ok(())
}
