//! End-to-end tests of the replay server over real gRPC on 127.0.0.1:0: leases, rollout
//! validation, HiR batches, staleness, lease expiry, batch redelivery and durability.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hindsight_constraints::{CompiledRecord, PromptRecord};
use hindsight_model::ChatTokenizer;
use hindsight_proto::v1::replay_client::ReplayClient;
use hindsight_proto::v1::{
    AckBatchRequest, BatchStreamRequest, CommitBatchesRequest, LeaseRequest, LeaseResponse,
    RegisterLearnerRequest, RegisterLearnerResponse, ReleaseLeasesRequest, RenewLeasesRequest,
    ReplayStatusRequest, ReplayStatusResponse, Response, RolloutAck, RolloutGroup, TrainingBatch,
};
use hindsight_replay_server::{serve, Hindsight, ReplayArgs};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const ALL3: &str = "the sea is calm and blue. any other questions?";
const NO_COMMA_FAILS: &str = "the sea, calm and blue. any other questions?";
const LOWER_FAILS: &str = "The sea is calm. any other questions?";
const END_FAILS: &str = "the sea is calm and blue.";
const ONE_OF_3: &str = "The sea, calm. Any other questions?";
const NONE: &str = "The Sea, Calm.";

fn record() -> PromptRecord {
    serde_json::from_value(serde_json::json!({
        "id": "sea",
        "question": "Describe the sea.",
        "constraints": [
            {"instruction_id": "punctuation:no_comma", "kwargs": {}},
            {"instruction_id": "change_case:english_lowercase", "kwargs": {}},
            {"instruction_id": "startend:end_checker", "kwargs": {"end_phrase": "Any other questions?"}}
        ],
        "template": "type3"
    }))
    .unwrap()
}

fn write_prompts(dir: &Path) -> PathBuf {
    let path = dir.join("prompts.jsonl");
    std::fs::write(&path, serde_json::to_string(&record()).unwrap() + "\n").unwrap();
    path
}

fn tokenizer() -> ChatTokenizer {
    hindsight_model::load_tokenizer("tiny", &std::env::temp_dir()).unwrap()
}

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(args: ReplayArgs) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(args, listener, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn client(&self) -> ReplayClient<Channel> {
        ReplayClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("graceful shutdown within 10 s")
            .unwrap()
            .unwrap();
    }
}

fn args(dir: &Path) -> ReplayArgs {
    ReplayArgs {
        prompts: Some(write_prompts(dir)),
        cache_dir: Some(dir.join("cache")),
        group_size: 8,
        responses_per_prompt: 6,
        prompts_per_batch: 2,
        security: hindsight_service::ServerSecurityArgs {
            insecure: true,
            ..Default::default()
        },
        ..ReplayArgs::default()
    }
}

fn response(tok: &ChatTokenizer, text: &str, entropy: f32) -> Response {
    let token_ids = tok.encode(text).unwrap();
    let n = token_ids.len();
    Response {
        logprobs: (0..n).map(|i| -0.01 * (i % 50) as f32 - 0.001).collect(),
        entropies: vec![entropy; n],
        token_ids,
        finished: true,
        text: text.into(),
    }
}

fn group(
    lease: &LeaseResponse,
    i: usize,
    actor: &str,
    version: u64,
    responses: Vec<Response>,
) -> RolloutGroup {
    let p = &lease.prompts[i];
    RolloutGroup {
        actor_id: actor.into(),
        prompt_id: p.prompt_id.clone(),
        lease_id: p.lease_id.clone(),
        policy_version: version,
        responses,
        generation_ms: 5,
        model_fingerprint: String::new(),
    }
}

/// Entropy of response r in group g: distinct, ordered, small next to CLA gaps.
fn texts_group(tok: &ChatTokenizer, texts: &[&str], g: usize) -> Vec<Response> {
    texts
        .iter()
        .enumerate()
        .map(|(r, t)| response(tok, t, 0.1 * r as f32 + 0.01 * g as f32))
        .collect()
}

async fn lease(client: &mut ReplayClient<Channel>, actor: &str, max: u32) -> LeaseResponse {
    client
        .lease_prompts(LeaseRequest {
            actor_id: actor.into(),
            max_prompts: max,
            policy_version: 0,
            model_fingerprint: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn submit(
    client: &mut ReplayClient<Channel>,
    groups: Vec<RolloutGroup>,
) -> Result<Vec<RolloutAck>, Status> {
    let mut acks = client
        .stream_rollouts(tokio_stream::iter(groups))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(ack) = acks.message().await? {
        out.push(ack);
    }
    Ok(out)
}

async fn status(client: &mut ReplayClient<Channel>) -> ReplayStatusResponse {
    client
        .status(ReplayStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn register(
    client: &mut ReplayClient<Channel>,
    step: u64,
    version: u64,
    committed: u64,
    trained: u64,
) -> Result<RegisterLearnerResponse, Status> {
    client
        .register_learner(RegisterLearnerRequest {
            learner_id: "learner".into(),
            learner_step: step,
            policy_version: version,
            committed_through_batch_id: committed,
            trained_through_batch_id: trained,
            model_fingerprint: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn stream(
    client: &mut ReplayClient<Channel>,
    incarnation: &str,
    trained: u64,
    prefetch: u32,
) -> Result<Streaming<TrainingBatch>, Status> {
    client
        .stream_batches(BatchStreamRequest {
            learner_id: "learner".into(),
            rank: 0,
            world_size: 1,
            incarnation: incarnation.into(),
            trained_through_batch_id: trained,
            prefetch,
        })
        .await
        .map(|r| r.into_inner())
}

/// A fresh learner: registers at step 0 and streams from the first batch.
async fn batches(client: &mut ReplayClient<Channel>) -> (String, Streaming<TrainingBatch>) {
    let inc = register(client, 0, 0, 0, 0).await.unwrap().incarnation;
    let s = stream(client, &inc, 0, 1).await.unwrap();
    (inc, s)
}

async fn next_batch(stream: &mut Streaming<TrainingBatch>) -> TrainingBatch {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a batch within 10 s")
        .unwrap()
        .expect("stream open")
}

async fn ack(
    client: &mut ReplayClient<Channel>,
    incarnation: &str,
    batch_id: u64,
    step: u64,
    version: u64,
) -> Result<(), Status> {
    client
        .ack_batch(AckBatchRequest {
            learner_id: "learner".into(),
            batch_id,
            learner_step: step,
            policy_version: version,
            incarnation: incarnation.into(),
        })
        .await
        .map(|_| ())
}

async fn commit(
    client: &mut ReplayClient<Channel>,
    incarnation: &str,
    through: u64,
) -> Result<u64, Status> {
    client
        .commit_batches(CommitBatchesRequest {
            learner_id: "learner".into(),
            incarnation: incarnation.into(),
            through_batch_id: through,
            learner_step: 0,
            policy_version: 0,
        })
        .await
        .map(|r| r.into_inner().committed_through_batch_id)
}

fn compiled() -> CompiledRecord {
    record().compile().unwrap()
}

#[tokio::test]
async fn hir_batch_has_originals_and_top_k_rewritten_replays() {
    let dir = tempfile::tempdir().unwrap();
    let batch_log = dir.path().join("logs/batches.jsonl");
    let server = Server::start(ReplayArgs {
        batch_log: Some(batch_log.clone()),
        ..args(dir.path())
    })
    .await;
    let mut client = server.client().await;
    let tok = tokenizer();
    let rec = compiled();

    let mut health = HealthClient::new(
        Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    for service in ["", "hindsight.v1.Replay"] {
        let h = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(h.status(), ServingStatus::Serving, "{service:?}");
    }

    let l = lease(&mut client, "actor-a", 2).await;
    assert_eq!(l.prompts.len(), 2);
    let sampling = l.sampling.unwrap();
    assert_eq!(sampling.responses_per_prompt, 6);
    assert_eq!(sampling.max_new_tokens, 256);
    assert_ne!(l.prompts[0].lease_id, l.prompts[1].lease_id);
    assert_eq!(l.prompts[0].instruction, rec.instruction());
    assert_eq!(
        l.prompts[0].prompt_token_ids,
        tok.encode_chat(&rec.instruction()).unwrap()
    );

    let texts = [ALL3, NO_COMMA_FAILS, LOWER_FAILS, END_FAILS, ONE_OF_3, NONE];
    let groups: Vec<RolloutGroup> = (0..2)
        .map(|g| group(&l, g, "actor-a", 0, texts_group(&tok, &texts, g)))
        .collect();
    let acks = submit(&mut client, groups.clone()).await.unwrap();
    assert_eq!(acks.len(), 2);
    assert!(acks.iter().all(|a| a.accepted), "{acks:?}");

    let (inc, mut stream) = batches(&mut client).await;
    let batch = next_batch(&mut stream).await;
    assert_eq!(batch.step, 1);
    let stats = batch.stats.unwrap();
    assert_eq!(
        (
            stats.groups,
            stats.original_samples,
            stats.replay_samples,
            stats.replay_shortfall
        ),
        (2, 12, 4, 0)
    );
    assert!((stats.success_rate - 2.0 / 12.0).abs() < 1e-6);
    assert!((stats.lambda - hindsight_constraints::hir::lambda(1, 2.0, 0.05)).abs() < 1e-12);
    assert_eq!(batch.samples.len(), 16);

    for (i, s) in batch.samples[..12].iter().enumerate() {
        let (g, r) = (i / 6, i % 6);
        let sent = &groups[g].responses[r];
        assert!(!s.is_replay);
        assert_eq!(s.group_index as usize, g);
        assert_eq!(s.reward, if r == 0 { 1.0 } else { 0.0 });
        assert_eq!(s.response_token_ids, sent.token_ids);
        assert_eq!(s.behaviour_logprobs, sent.logprobs);
        assert_eq!(s.instruction, rec.instruction());
        assert_eq!(s.loss_mask.len(), sent.token_ids.len());
        assert!(s.loss_mask.iter().all(|&m| m == 1));
        let p = s.provenance.as_ref().unwrap();
        assert_eq!(p.verdicts, rec.verify(texts[r]));
        assert_eq!(p.actor_id, "actor-a");
        assert!(p.kept_instruction_ids.is_empty());
    }
    // K = (8 - 6) * 2 = 4 replays: the CLA = 2/3 responses with the highest entropy.
    let picked: Vec<(u32, u32)> = batch.samples[12..]
        .iter()
        .map(|s| (s.group_index, s.provenance.as_ref().unwrap().response_index))
        .collect();
    assert_eq!(picked, vec![(1, 3), (0, 3), (1, 2), (0, 2)]);
    for s in &batch.samples[12..] {
        let p = s.provenance.as_ref().unwrap();
        let sent = &groups[s.group_index as usize].responses[p.response_index as usize];
        let verdicts = rec.verify(&sent.text);
        let rw = rec.rewrite(&verdicts).unwrap();
        assert!(s.is_replay);
        assert_eq!(s.reward, 1.0);
        assert_eq!(s.instruction, rw.instruction);
        for (i, d) in rec.descriptions.iter().enumerate() {
            assert_eq!(
                s.instruction.contains(d.as_str()),
                verdicts[i],
                "description {i} in {:?}",
                s.instruction
            );
        }
        assert_eq!(
            s.prompt_token_ids,
            tok.encode_chat(&rw.instruction).unwrap()
        );
        assert_eq!(s.response_token_ids, sent.token_ids);
        assert_eq!(s.behaviour_logprobs, sent.logprobs);
        assert_eq!(p.kept_instruction_ids, rw.kept_ids);
        assert_eq!(p.verdicts, verdicts);
        assert_eq!(p.instruction_ids.len(), 3);
        assert!((s.constraint_accuracy - 2.0 / 3.0).abs() < 1e-6);
    }

    for s in &batch.samples {
        let p = s.provenance.as_ref().unwrap();
        assert_eq!(p.group_seq, acks[s.group_index as usize].group_seq);
        assert_eq!(p.lease_id, l.prompts[s.group_index as usize].lease_id);
    }
    ack(&mut client, &inc, batch.batch_id, 1, 1).await.unwrap();
    let st = status(&mut client).await;
    assert_eq!(
        (
            st.groups_accepted,
            st.batches_built,
            st.batches_acked,
            st.replays_emitted
        ),
        (2, 1, 1, 4)
    );
    assert_eq!(
        (
            st.learner_step,
            st.policy_version,
            st.groups_waiting,
            st.leases_active
        ),
        (1, 1, 0, 0)
    );
    assert_eq!(st.actors.len(), 1);
    assert_eq!(st.actors[0].groups_accepted, 2);
    server.shutdown().await;

    // The batch log has one line per sample, with enough to re-derive rewards and rewrites.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&batch_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 16);
    for (line, s) in lines.iter().zip(&batch.samples) {
        assert_eq!(line["is_replay"], s.is_replay);
        assert_eq!(line["instruction"], s.instruction.as_str());
        let verdicts: Vec<bool> = serde_json::from_value(line["verdicts"].clone()).unwrap();
        assert_eq!(rec.verify(line["response"].as_str().unwrap()), verdicts);
        assert_eq!(line["reward"].as_f64().unwrap() as f32, s.reward);
        assert_eq!(line["batch_id"], batch.batch_id);
        assert_eq!(line["group_seq"], s.provenance.as_ref().unwrap().group_seq);
    }
}

#[tokio::test]
async fn replay_shortfall_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(args(dir.path())).await;
    let mut client = server.client().await;
    let tok = tokenizer();
    let l = lease(&mut client, "a", 2).await;
    let texts = [ALL3, ALL3, NONE, "", ONE_OF_3, ALL3];
    let groups = (0..2)
        .map(|g| group(&l, g, "a", 0, texts_group(&tok, &texts, g)))
        .collect();
    assert!(submit(&mut client, groups)
        .await
        .unwrap()
        .iter()
        .all(|a| a.accepted));
    let batch = next_batch(&mut batches(&mut client).await.1).await;
    let stats = batch.stats.unwrap();
    assert_eq!((stats.replay_samples, stats.replay_shortfall), (2, 2));
    assert_eq!(batch.samples.len(), 14);
    assert!(batch.samples[12..]
        .iter()
        .all(|s| s.is_replay && s.provenance.as_ref().unwrap().response_index == 4));
    server.shutdown().await;
}

#[tokio::test]
async fn hindsight_off_generates_n_and_replays_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = ReplayArgs {
        hindsight: Hindsight::Off,
        group_size: 4,
        prompts_per_batch: 1,
        ..args(dir.path())
    };
    let server = Server::start(a).await;
    let mut client = server.client().await;
    let tok = tokenizer();
    let l = lease(&mut client, "a", 1).await;
    assert_eq!(l.sampling.unwrap().responses_per_prompt, 4);
    // Six responses (m of hindsight-on) are wrong now.
    let wrong = group(
        &l,
        0,
        "a",
        0,
        texts_group(&tok, &[ALL3, END_FAILS, END_FAILS, NONE, ALL3, ALL3], 0),
    );
    assert_eq!(
        submit(&mut client, vec![wrong]).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let g = group(
        &l,
        0,
        "a",
        0,
        texts_group(&tok, &[ALL3, END_FAILS, END_FAILS, NONE], 0),
    );
    assert!(submit(&mut client, vec![g]).await.unwrap()[0].accepted);
    let batch = next_batch(&mut batches(&mut client).await.1).await;
    let stats = batch.stats.unwrap();
    assert_eq!(
        (
            stats.original_samples,
            stats.replay_samples,
            stats.replay_shortfall
        ),
        (4, 0, 0)
    );
    assert!(batch.samples.iter().all(|s| !s.is_replay));
    assert_eq!(status(&mut client).await.replays_emitted, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_groups_are_rejected_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(args(dir.path())).await;
    let mut client = server.client().await;
    let tok = tokenizer();
    let l = lease(&mut client, "a", 1).await;
    let good = group(
        &l,
        0,
        "a",
        0,
        texts_group(&tok, &[ALL3, NONE, ALL3, NONE, ALL3, NONE], 0),
    );
    let before = status(&mut client).await;

    let mut cases: Vec<(&str, RolloutGroup)> = Vec::new();
    let mut g = good.clone();
    g.lease_id = "no-such-lease".into();
    cases.push(("unknown lease", g));
    let mut g = good.clone();
    g.prompt_id = "no-such-prompt".into();
    cases.push(("unknown prompt", g));
    let mut g = good.clone();
    g.responses[2].logprobs.pop();
    cases.push(("logprobs shorter than tokens", g));
    let mut g = good.clone();
    g.responses[1].entropies.push(0.5);
    cases.push(("entropies longer than tokens", g));
    let mut g = good.clone();
    g.responses[0].logprobs[3] = f32::NAN;
    cases.push(("NaN logprob", g));
    let mut g = good.clone();
    g.responses[0].logprobs[1] = -7.0e4;
    cases.push(("absurdly small logprob", g));
    let mut g = good.clone();
    g.responses[0].entropies[1] = 1.0e3;
    cases.push(("entropy above ln(vocabulary)", g));
    let mut g = good.clone();
    g.responses[0].entropies[1] = f32::INFINITY;
    cases.push(("infinite entropy", g));
    let mut g = good.clone();
    g.actor_id = "y".repeat(8 << 20);
    cases.push(("8 MiB actor id", g));
    let mut g = good.clone();
    g.responses[0].logprobs[0] = 0.5;
    cases.push(("positive logprob", g));
    let mut g = good.clone();
    g.responses[0].entropies[0] = -1.0;
    cases.push(("negative entropy", g));
    let mut g = good.clone();
    g.responses.push(g.responses[0].clone());
    cases.push(("too many responses", g));
    let mut g = good.clone();
    g.responses[4].token_ids[0] = tok.vocab_size() as u32;
    cases.push(("token id >= vocab", g));
    let mut g = good.clone();
    g.policy_version = 1_000_000;
    cases.push(("policy version from the future", g));
    let mut g = good.clone();
    g.responses[0] = response(&tok, &"a".repeat(300), 0.1);
    cases.push(("too many tokens", g));

    // A lease with an absurd actor id is refused, and changes nothing.
    for (name, req) in [(
        "actor id too long",
        LeaseRequest {
            actor_id: "x".repeat(10_000),
            max_prompts: 1,
            policy_version: 0,
            model_fingerprint: String::new(),
        },
    )] {
        let err = client.lease_prompts(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
    }

    for (name, g) in &cases {
        let err = submit(&mut client, vec![g.clone()]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(!err.message().is_empty());
    }
    // An invalid group ends the stream; acked groups before it stay accepted (none here).
    let after = status(&mut client).await;
    assert_eq!(
        after.groups_rejected,
        before.groups_rejected + cases.len() as u64
    );
    let strip = |s: &ReplayStatusResponse| ReplayStatusResponse {
        groups_rejected: 0,
        actors: vec![],
        ..s.clone()
    };
    assert_eq!(strip(&after), strip(&before));

    // The lease is intact: the valid group is still accepted.
    let acks = submit(&mut client, vec![good.clone()]).await.unwrap();
    assert!(acks[0].accepted, "{acks:?}");
    // Resubmitting it is a harmless duplicate.
    let dup = submit(&mut client, vec![good]).await.unwrap();
    assert!(
        dup[0].accepted && dup[0].reason.contains("duplicate"),
        "{dup:?}"
    );
    assert_eq!(status(&mut client).await.groups_accepted, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn expired_leases_requeue_their_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(ReplayArgs {
        lease_timeout_ms: 150,
        ..args(dir.path())
    })
    .await;
    let mut client = server.client().await;
    let tok = tokenizer();
    let texts = [ALL3, NONE, ALL3, NONE, ALL3, NONE];

    let first = lease(&mut client, "slow", 1).await;
    assert_eq!(status(&mut client).await.leases_active, 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let st = status(&mut client).await;
    assert_eq!(
        (st.leases_active, st.leases_expired, st.prompts_queued),
        (0, 1, 1)
    );
    let renewed = client
        .renew_leases(RenewLeasesRequest {
            actor_id: "slow".into(),
            lease_ids: vec![first.prompts[0].lease_id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        renewed.unknown_lease_ids,
        vec![first.prompts[0].lease_id.clone()]
    );

    // Someone else leases the re-queued prompt: the late group is politely declined.
    let second = lease(&mut client, "fast", 1).await;
    assert_eq!(second.prompts[0].prompt_id, first.prompts[0].prompt_id);
    let late = submit(
        &mut client,
        vec![group(&first, 0, "slow", 0, texts_group(&tok, &texts, 0))],
    )
    .await
    .unwrap();
    assert!(!late[0].accepted);
    assert_eq!(late[0].reason, "lease expired");
    let on_time = submit(
        &mut client,
        vec![group(&second, 0, "fast", 0, texts_group(&tok, &texts, 0))],
    )
    .await
    .unwrap();
    assert!(on_time[0].accepted);

    // Expired but nobody took the prompt yet: the late work is rescued.
    let third = lease(&mut client, "slow", 1).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rescued = submit(
        &mut client,
        vec![group(&third, 0, "slow", 0, texts_group(&tok, &texts, 0))],
    )
    .await
    .unwrap();
    assert!(rescued[0].accepted, "{rescued:?}");
    let st = status(&mut client).await;
    assert_eq!(
        (st.leases_expired, st.groups_accepted, st.groups_waiting),
        (2, 2, 2),
        "batches are composed when a learner asks"
    );

    // Renew keeps a lease alive past its original deadline; release re-queues at once.
    let fourth = lease(&mut client, "slow", 1).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(80)).await;
        let r = client
            .renew_leases(RenewLeasesRequest {
                actor_id: "slow".into(),
                lease_ids: vec![fourth.prompts[0].lease_id.clone()],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.unknown_lease_ids.is_empty());
    }
    let released = client
        .release_leases(ReleaseLeasesRequest {
            actor_id: "slow".into(),
            lease_ids: vec![fourth.prompts[0].lease_id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.released, 1);
    assert_eq!(status(&mut client).await.leases_active, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn unacked_batches_are_redelivered_unchanged_and_backpressure_holds() {
    let dir = tempfile::tempdir().unwrap();
    let a = ReplayArgs {
        prompts_per_batch: 1,
        max_pending_batches: 2,
        ..args(dir.path())
    };
    let server = Server::start(a).await;
    let mut client = server.client().await;
    let tok = tokenizer();
    let texts = [ALL3, LOWER_FAILS, ALL3, NONE, END_FAILS, NONE];

    let l = lease(&mut client, "a", 10).await;
    assert_eq!(
        l.prompts.len(),
        2,
        "capacity is max_pending_batches * prompts_per_batch"
    );
    // At the bound a lease is refused with RESOURCE_EXHAUSTED and a retry delay.
    let full = client
        .lease_prompts(LeaseRequest {
            actor_id: "b".into(),
            max_prompts: 1,
            policy_version: 0,
            model_fingerprint: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(full.message().contains("--max-pending-batches"), "{full:?}");
    assert!(full.metadata().get("retry-after-ms").is_some());
    assert!(status(&mut client).await.leases_paused);
    let groups = (0..2)
        .map(|g| group(&l, g, "a", 0, texts_group(&tok, &texts, g)))
        .collect();
    assert!(submit(&mut client, groups)
        .await
        .unwrap()
        .iter()
        .all(|a| a.accepted));
    let full = client
        .lease_prompts(LeaseRequest {
            actor_id: "b".into(),
            max_prompts: 1,
            policy_version: 0,
            model_fingerprint: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        full.code(),
        Code::ResourceExhausted,
        "two untrained groups fill the bound"
    );

    let (inc, mut first) = batches(&mut client).await;
    let b1 = next_batch(&mut first).await;
    assert_eq!(b1.step, 1);
    // Prefetch 1: nothing else arrives before the ack.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), first.message())
            .await
            .is_err()
    );
    drop(first);

    let mut second = stream(&mut client, &inc, 0, 1).await.unwrap();
    let again = next_batch(&mut second).await;
    assert_eq!(again, b1, "the unacked batch is delivered again, unchanged");

    // Acks: unknown, out of order, hostile figures and old incarnations are refused and
    // change nothing.
    let before = status(&mut client).await;
    assert_eq!(
        ack(&mut client, &inc, 999, 1, 1).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        ack(&mut client, &inc, b1.batch_id, u64::MAX, u64::MAX)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument,
        "an ack advances step and version by exactly one"
    );
    assert_eq!(
        ack(&mut client, "someone-else", b1.batch_id, 1, 1)
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        commit(&mut client, &inc, b1.batch_id)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument,
        "a batch not yet trained cannot be committed"
    );
    let after = status(&mut client).await;
    assert_eq!(
        (
            after.learner_step,
            after.policy_version,
            after.batches_acked
        ),
        (
            before.learner_step,
            before.policy_version,
            before.batches_acked
        )
    );
    ack(&mut client, &inc, b1.batch_id, 1, 1).await.unwrap();
    ack(&mut client, &inc, b1.batch_id, 1, 1).await.unwrap();
    let b2 = next_batch(&mut second).await;
    assert_eq!(b2.batch_id, b1.batch_id + 1);
    assert_eq!(b2.step, 2, "built for the learner's next step");
    assert_eq!(
        lease(&mut client, "b", 5).await.prompts.len(),
        1,
        "one slot freed by the trained batch"
    );
    assert!(!status(&mut client).await.leases_paused);

    // A newer registration supersedes the old incarnation's stream and acks.
    let newer = register(&mut client, 1, 1, 0, b1.batch_id).await.unwrap();
    assert_ne!(newer.incarnation, inc);
    assert_eq!(newer.policy_version, 1);
    assert_eq!(
        ack(&mut client, &inc, b2.batch_id, 2, 2)
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let mut third = stream(&mut client, &newer.incarnation, b1.batch_id, 2)
        .await
        .unwrap();
    assert_eq!(next_batch(&mut third).await, b2);

    // Graceful shutdown with a learner stream open.
    server.shutdown().await;
}

#[tokio::test]
async fn stale_groups_are_dropped_and_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(ReplayArgs {
        max_staleness: 1,
        ..args(dir.path())
    })
    .await;
    let mut client = server.client().await;
    let tok = tokenizer();
    let texts = [ALL3, LOWER_FAILS, ALL3, NONE, END_FAILS, NONE];
    let l = lease(&mut client, "a", 3).await;
    let groups = (0..3)
        .map(|g| group(&l, g, "a", 0, texts_group(&tok, &texts, g)))
        .collect();
    assert!(submit(&mut client, groups)
        .await
        .unwrap()
        .iter()
        .all(|a| a.accepted));
    // A learner that holds version 5: the waiting version-0 groups are too stale.
    let reg = register(&mut client, 5, 5, 0, 0).await.unwrap();
    assert_eq!(reg.policy_version, 5);
    let mut s = stream(&mut client, &reg.incarnation, 0, 1).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.message())
            .await
            .is_err(),
        "no batch from stale groups"
    );
    let st = status(&mut client).await;
    assert_eq!(
        (st.groups_waiting, st.groups_stale, st.policy_version),
        (0, 3, 5)
    );
    assert!(st.prompts_queued >= 1);
    let l2 = lease(&mut client, "a", 1).await;
    let old = submit(
        &mut client,
        vec![group(&l2, 0, "a", 0, texts_group(&tok, &texts, 0))],
    )
    .await
    .unwrap();
    assert!(
        !old[0].accepted && old[0].reason.starts_with("stale"),
        "{old:?}"
    );
    server.shutdown().await;
}

/// The exactly-once protocol at the replay server: batches keep their ids and content across
/// restarts, stay until a checkpoint covers them, and are served again to a learner that
/// resumes from an older checkpoint; versions are never reused.
#[tokio::test]
async fn batches_survive_restarts_until_a_checkpoint_covers_them() {
    let dir = tempfile::tempdir().unwrap();
    let a = ReplayArgs {
        data_dir: Some(dir.path().join("data")),
        max_pending_batches: 8,
        ..args(dir.path())
    };
    let tok = tokenizer();
    let texts = [ALL3, LOWER_FAILS, ALL3, NONE, END_FAILS, NONE];

    let server = Server::start(a.clone()).await;
    let mut client = server.client().await;
    let l = lease(&mut client, "first-life", 5).await;
    assert_eq!(l.prompts.len(), 5);
    let groups: Vec<RolloutGroup> = (0..5)
        .map(|g| {
            group(
                &l,
                g,
                &format!("actor-{g}"),
                0,
                texts_group(&tok, &texts, g),
            )
        })
        .collect();
    let acks = submit(&mut client, groups).await.unwrap();
    assert!(acks.iter().all(|a| a.accepted));
    let seqs: Vec<u64> = acks.iter().map(|a| a.group_seq).collect();
    let (inc, mut s) = batches(&mut client).await;
    let b1 = next_batch(&mut s).await;
    ack(&mut client, &inc, b1.batch_id, 1, 1).await.unwrap();
    let b2 = next_batch(&mut s).await;
    let group_seqs = |b: &TrainingBatch| {
        let mut v: Vec<u64> = b
            .samples
            .iter()
            .map(|s| s.provenance.as_ref().unwrap().group_seq)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    assert_eq!(group_seqs(&b1), seqs[..2]);
    assert_eq!(group_seqs(&b2), seqs[2..4]);
    // Batch 2 is sent but never acked; then the server goes down.
    drop(s);
    server.shutdown().await;

    // Second life: both batches are back (batch 1 is trained but no checkpoint covers it).
    let server = Server::start(a.clone()).await;
    let mut client = server.client().await;
    let st = status(&mut client).await;
    assert_eq!(
        (
            st.learner_step,
            st.policy_version,
            st.batches_built,
            st.groups_waiting
        ),
        (1, 1, 2, 1),
        "{st:?}"
    );
    // The live learner (weights through batch 1) carries on: batch 2, unchanged.
    let reg = register(&mut client, 1, 1, 0, b1.batch_id).await.unwrap();
    assert_eq!(reg.policy_version, 1);
    let mut s = stream(&mut client, &reg.incarnation, b1.batch_id, 2)
        .await
        .unwrap();
    assert_eq!(next_batch(&mut s).await, b2, "same id, same content");
    drop(s);
    // The learner dies without a checkpoint and resumes from scratch: it is served batch 1
    // again, and must publish under a fresh version (1 is the dead learner's).
    let reg = register(&mut client, 0, 0, 0, 0).await.unwrap();
    assert_eq!(reg.policy_version, 2, "versions are never reused");
    let inc = reg.incarnation;
    let mut s = stream(&mut client, &inc, 0, 2).await.unwrap();
    assert_eq!(next_batch(&mut s).await, b1);
    assert_eq!(next_batch(&mut s).await, b2);
    // Rollouts of the orphaned version 1 are declined (not acknowledged).
    let l2 = lease(&mut client, "second-life", 1).await;
    let orphan = submit(
        &mut client,
        vec![group(&l2, 0, "a", 1, texts_group(&tok, &texts, 0))],
    )
    .await
    .unwrap();
    assert!(
        !orphan[0].accepted && orphan[0].reason.contains("crashed"),
        "{orphan:?}"
    );
    ack(&mut client, &inc, b1.batch_id, 1, 3).await.unwrap();
    ack(&mut client, &inc, b2.batch_id, 2, 4).await.unwrap();
    // A checkpoint through batch 2 is committed: both are forgotten.
    assert_eq!(
        commit(&mut client, &inc, b2.batch_id).await.unwrap(),
        b2.batch_id
    );
    // A late group with a lease of the first life is declined, not an error.
    let old = submit(
        &mut client,
        vec![group(&l, 4, "actor-4", 0, texts_group(&tok, &texts, 4))],
    )
    .await
    .unwrap();
    assert!(!old[0].accepted, "{old:?}");
    drop(s);
    server.shutdown().await;

    // Third life: what is left is the one waiting group; the learner's progress is kept, and
    // a learner resuming from before the commit is refused with a clear message.
    let server = Server::start(a).await;
    let mut client = server.client().await;
    let st = status(&mut client).await;
    assert_eq!(
        (
            st.groups_waiting,
            st.batches_built,
            st.committed_through_batch_id,
            st.learner_step,
            st.policy_version
        ),
        (1, 0, 2, 2, 4),
        "{st:?}"
    );
    let err = register(&mut client, 0, 0, 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("newest checkpoint"), "{err:?}");
    let err = register(&mut client, 9, 9, 2, 7).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let reg = register(&mut client, 2, 4, 2, 2).await.unwrap();
    assert_eq!(reg.policy_version, 4);
    server.shutdown().await;
}

/// The server decodes the tokens itself: a text that disagrees with them does not earn a
/// reward, and hostile requests get clear codes without changing anything.
#[tokio::test]
async fn the_reward_follows_the_tokens_and_hostile_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(args(dir.path())).await;
    let mut client = server.client().await;
    let tok = tokenizer();
    let l = lease(&mut client, "a", 2).await;
    // Every response's text claims success; the tokens say otherwise.
    let lying: Vec<Response> = (0..6)
        .map(|r| Response {
            text: ALL3.into(),
            ..response(&tok, NONE, 0.1 * r as f32)
        })
        .collect();
    let honest = texts_group(&tok, &[ALL3; 6], 1);
    let acks = submit(
        &mut client,
        vec![group(&l, 0, "a", 0, lying), group(&l, 1, "a", 0, honest)],
    )
    .await
    .unwrap();
    assert!(acks.iter().all(|a| a.accepted));
    let (_inc, mut s) = batches(&mut client).await;
    let b = next_batch(&mut s).await;
    for sample in b.samples.iter().filter(|s| !s.is_replay) {
        let expected = if sample.group_index == 0 { 0.0 } else { 1.0 };
        assert_eq!(sample.reward, expected, "{:?}", sample.provenance);
    }

    let before = status(&mut client).await;
    let huge = "z".repeat(10 << 20);
    let err = client
        .renew_leases(RenewLeasesRequest {
            actor_id: huge.clone(),
            lease_ids: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().len() < 200, "the id is not echoed back");
    let err = client
        .release_leases(ReleaseLeasesRequest {
            actor_id: "a".into(),
            lease_ids: (0..5000).map(|i| format!("l-{i}")).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Another actor cannot release (or renew) someone else's lease.
    let theirs = lease(&mut client, "owner", 1).await;
    let released = client
        .release_leases(ReleaseLeasesRequest {
            actor_id: "thief".into(),
            lease_ids: vec![theirs.prompts[0].lease_id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.released, 0);
    let renewed = client
        .renew_leases(RenewLeasesRequest {
            actor_id: "thief".into(),
            lease_ids: vec![theirs.prompts[0].lease_id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.unknown_lease_ids.len(), 1);
    // 20,000 actor ids cost neither memory without bound nor 20,000 metric series.
    for i in 0..300 {
        let _ = client
            .renew_leases(RenewLeasesRequest {
                actor_id: format!("actor-{i}"),
                lease_ids: vec![],
            })
            .await
            .unwrap();
    }
    let after = status(&mut client).await;
    assert_eq!(after.groups_accepted, before.groups_accepted);
    assert_eq!(after.leases_active, before.leases_active + 1);

    // Garbage on the rollout stream: a frame that is no RolloutGroup ends the stream with
    // INVALID_ARGUMENT (not OK with zero acks).
    #[derive(Clone, PartialEq, prost::Message)]
    struct Garbage {
        #[prost(uint64, tag = "5")]
        responses_as_a_number: u64,
    }
    let mut grpc = tonic::client::Grpc::new(
        tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<Garbage, RolloutAck>::default();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/hindsight.v1.Replay/StreamRollouts");
    let frames = tokio_stream::iter(vec![Garbage {
        responses_as_a_number: 7,
    }]);
    let result = grpc
        .streaming(tonic::Request::new(frames), path, codec)
        .await;
    let code = match result {
        Err(status) => status.code(),
        Ok(resp) => {
            let mut acks = resp.into_inner();
            match acks.message().await {
                Err(status) => status.code(),
                Ok(ack) => panic!("garbage answered with {ack:?}"),
            }
        }
    };
    assert_eq!(code, Code::InvalidArgument);
    assert_eq!(
        status(&mut client).await.groups_accepted,
        before.groups_accepted
    );
    server.shutdown().await;
}

#[tokio::test]
async fn generated_prompts_cycle_and_startup_errors_name_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let a = ReplayArgs {
        prompts: None,
        num_prompts: 3,
        prompts_per_batch: 8,
        ..args(dir.path())
    };
    let server = Server::start(a).await;
    let mut client = server.client().await;
    let l = lease(&mut client, "a", 7).await;
    assert_eq!(l.prompts.len(), 7, "three prompts cycle over epochs");
    assert_eq!(status(&mut client).await.prompts_total, 3);
    server.shutdown().await;

    let bad = dir.path().join("bad.jsonl");
    let mut rec = serde_json::to_value(record()).unwrap();
    rec["id"] = "broken-one".into();
    rec["constraints"][0]["instruction_id"] = "no:such_constraint".into();
    std::fs::write(&bad, rec.to_string() + "\n").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = serve(
        ReplayArgs {
            prompts: Some(bad),
            ..args(dir.path())
        },
        listener,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("broken-one"), "{err:#}");
}

/// Findings of the `requests` fuzz target (replay-server/fuzz), kept as regressions: a
/// registration at u64::MAX overflowed the version counter and the step arithmetic, and a
/// lease refused by the limiter still recorded (and labelled) its actor.
#[tokio::test]
async fn fuzz_findings_are_refused_without_a_state_change() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(ReplayArgs {
        max_pending_batches: 1,
        ..args(dir.path())
    })
    .await;
    let mut client = server.client().await;
    let before = status(&mut client).await;
    for (step, version) in [
        (u64::MAX, 0),
        (0, u64::MAX),
        (u64::MAX, u64::MAX),
        ((1 << 62) + 1, 1),
    ] {
        let err = register(&mut client, step, version, 0, 0)
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{step}/{version}: {err:?}"
        );
    }
    let after = status(&mut client).await;
    assert_eq!(
        (after.learner_step, after.policy_version),
        (before.learner_step, before.policy_version)
    );
    // The largest accepted counters still leave room for the `+ 1` of every ack.
    let inc = register(&mut client, 1 << 62, 1 << 62, 0, 0)
        .await
        .unwrap()
        .incarnation;
    assert!(status(&mut client).await.policy_version >= 1 << 62);

    // Fill the limiter (one uncommitted batch), then lease as a new actor: refused with
    // RESOURCE_EXHAUSTED, and the refused actor leaves no record behind.
    let tok = tokenizer();
    let l = lease(&mut client, "a", 2).await;
    let v = status(&mut client).await.policy_version;
    let acks = submit(
        &mut client,
        vec![
            group(&l, 0, "a", v, texts_group(&tok, &[ALL3; 6], 0)),
            group(&l, 1, "a", v, texts_group(&tok, &[ALL3; 6], 1)),
        ],
    )
    .await
    .unwrap();
    assert!(acks.iter().all(|a| a.accepted), "{acks:?}");
    let mut s = stream(&mut client, &inc, 0, 1).await.unwrap();
    let _ = next_batch(&mut s).await;
    let actors_before = status(&mut client).await.actors.len();
    let err = client
        .lease_prompts(LeaseRequest {
            actor_id: "refused-newcomer".into(),
            max_prompts: 1,
            policy_version: 0,
            model_fingerprint: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let after = status(&mut client).await;
    assert_eq!(after.actors.len(), actors_before);
    assert!(after
        .actors
        .iter()
        .all(|a| a.actor_id != "refused-newcomer"));
    server.shutdown().await;
}

/// The standard health service says NOT_SERVING as soon as the server drains, and the drain
/// is bounded: a client that keeps a call open (a health Watch never ends by itself) does not
/// keep the server from exiting past `--shutdown-timeout-secs`.
#[tokio::test]
async fn health_turns_not_serving_while_draining_and_the_drain_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(ReplayArgs {
        shutdown: hindsight_service::ShutdownArgs {
            shutdown_timeout_secs: 2,
        },
        ..args(dir.path())
    })
    .await;
    let mut health = HealthClient::new(
        Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    // The first answer may still be NOT_SERVING if the watch raced the start.
    while seen.last() != Some(&ServingStatus::Serving) {
        let m = tokio::time::timeout(Duration::from_secs(30), watch.message())
            .await
            .expect("a health update")
            .unwrap()
            .unwrap();
        seen.push(m.status());
    }
    let started = std::time::Instant::now();
    let Server { stop, task, .. } = server;
    let _ = stop.unwrap().send(());
    let m = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a health update after the signal")
        .unwrap()
        .unwrap();
    assert_eq!(m.status(), ServingStatus::NotServing);
    // The watch stays open: the server cuts it at the drain bound (2 s less the margin).
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the drain is bounded")
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    drop(watch);
}
