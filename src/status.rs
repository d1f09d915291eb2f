//! `hindsight status`: asks each server's standard gRPC health service, the learner's newest
//! weight version (`Weights.Latest`) and the replay server's `Status` RPC, and prints one
//! readable report.

use anyhow::{Context, Result};
use hindsight_proto::v1::replay_client::ReplayClient;
use hindsight_proto::v1::weights_client::WeightsClient;
use hindsight_proto::v1::{LatestWeightsRequest, ReplayStatusRequest};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Replay server URL.
    #[arg(
        long,
        env = "HINDSIGHT_REPLAY",
        default_value = "http://127.0.0.1:50051"
    )]
    pub replay: String,
    /// Learner URL.
    #[arg(
        long,
        env = "HINDSIGHT_LEARNER",
        default_value = "http://127.0.0.1:50052"
    )]
    pub learner: String,
    /// TLS trust and the (read-only) credentials to use.
    #[command(flatten)]
    pub security: hindsight_service::ClientSecurityArgs,
}

pub async fn run(args: StatusArgs) -> Result<()> {
    let security = hindsight_service::ClientSecurity::from_args(&args.security)?;
    for (name, url) in [("replay-server", &args.replay), ("learner", &args.learner)] {
        match security.connect(url, 1).await {
            Ok(channel) => match HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
            {
                Ok(h) => println!("{name} {:?} at {url}", h.into_inner().status()),
                Err(e) => println!("{name} {url}: health check failed: {}", e.message()),
            },
            Err(e) => println!("{name} {url}: unreachable ({e:#})"),
        }
    }
    if let Ok(channel) = security.connect_authed(&args.learner, 1).await {
        match WeightsClient::new(channel)
            .latest(LatestWeightsRequest::default())
            .await
        {
            Ok(m) => {
                let m = m.into_inner();
                println!(
                    "learner: weights version {} (step {}, {} bytes)",
                    m.version, m.learner_step, m.total_bytes
                );
            }
            Err(e) => println!("learner: Weights.Latest failed: {}", e.message()),
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
