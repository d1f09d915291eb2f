//! Model distribution over real gRPC on 127.0.0.1:0 (real replay server, the learner's real
//! `Weights` service, the real actor loop): an actor with no model files builds its policy
//! from the learner's description and weights and generates exactly what a local copy of
//! the model would; fingerprint mismatches are refused with FAILED_PRECONDITION naming both
//! fingerprints (replay server vs actor leases and rollouts, replay server vs learner, actor
//! vs learner); weight versions published while an actor generates never mix inside a group.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use hindsight_actor::{weights, ActorArgs};
use hindsight_learner::publish::WeightStore;
use hindsight_policy::{Device, Precision, Sampler, SamplingParams};
use hindsight_proto::v1::replay_client::ReplayClient;
use hindsight_proto::v1::weights_client::WeightsClient;
use hindsight_proto::v1::weights_server::WeightsServer;
use hindsight_proto::v1::{
    BatchStreamRequest, LeaseRequest, RegisterLearnerRequest, ReplayStatusRequest, Response,
    RolloutGroup,
};
use hindsight_replay_server::ReplayArgs;
use tokio::sync::oneshot;
use tonic::Code;

const TIMEOUT: Duration = Duration::from_secs(180);

/// The learner's `Weights` service for `model` (a tiny spec), served as the learner serves it.
struct Learner {
    url: String,
    store: WeightStore,
    _stop: oneshot::Sender<()>,
}

async fn learner(model: &str) -> Learner {
    learner_sharing(model, None).await
}

/// As [`learner`], also writing every version into `shared_dir` when given.
async fn learner_sharing(model: &str, shared_dir: Option<&Path>) -> Learner {
    let m = hindsight_policy::load(model, &std::env::temp_dir(), &Device::Cpu).unwrap();
    let d = hindsight_policy::ModelDescription::new(&m.config, &m.tokenizer).unwrap();
    let mut store =
        WeightStore::new(2, 64 * 1024).with_model(hindsight_proto::v1::ModelDescription {
            fingerprint: d.fingerprint(),
            name: m.name.clone(),
            description: d.to_bytes(),
        });
    if let Some(dir) = shared_dir {
        store = store.with_shared_dir(dir).unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let svc = WeightsServer::new(store.clone())
        .max_encoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move {
                    let _ = stopped.await;
                },
            ),
    );
    Learner {
        url: format!("http://{addr}"),
        store,
        _stop: stop,
    }
}

/// Safetensors bytes of the tiny model with `seed`'s weights.
fn tiny_payload(seed: u64) -> Vec<u8> {
    hindsight_policy::tiny(seed)
        .unwrap()
        .weights
        .to_safetensors_bytes()
        .unwrap()
}

fn fingerprint_of(model: &str) -> String {
    let i = hindsight_policy::load_model_info(model, &std::env::temp_dir()).unwrap();
    hindsight_policy::fingerprint(&i.config, &i.tokenizer).unwrap()
}

struct Replay {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

fn replay_args(dir: &Path, model: &str) -> ReplayArgs {
    ReplayArgs {
        model: model.into(),
        cache_dir: Some(dir.join("cache")),
        num_prompts: 32,
        group_size: 4,
        responses_per_prompt: 2,
        prompts_per_batch: 2,
        max_new_tokens: 12,
        max_pending_batches: 64,
        security: hindsight_service::ServerSecurityArgs {
            insecure: true,
            ..Default::default()
        },
        ..ReplayArgs::default()
    }
}

async fn replay(args: ReplayArgs) -> Replay {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(hindsight_replay_server::serve(args, listener, async move {
        let _ = stopped.await;
    }));
    Replay { addr, _stop: stop }
}

#[derive(Parser)]
struct ActorCli {
    #[command(flatten)]
    args: ActorArgs,
}

fn actor_args(replay: &Replay, learner_url: &str, extra: &[&str]) -> ActorArgs {
    let mut argv = vec![
        "actor".to_string(),
        "--replay".into(),
        format!("http://{}", replay.addr),
        "--learner".into(),
        learner_url.into(),
        "--prompts-per-lease".into(),
        "1".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    ActorCli::try_parse_from(argv).unwrap().args
}

async fn run_actor(args: ActorArgs) -> anyhow::Result<()> {
    tokio::time::timeout(
        TIMEOUT,
        hindsight_actor::run(args, std::future::pending::<()>()),
    )
    .await
    .expect("the actor finished in time")
}

async fn next_update(f: &weights::Follower) -> weights::Update {
    tokio::time::timeout(TIMEOUT, f.next())
        .await
        .expect("a version in time")
        .expect("a usable version")
}

/// Co-located followers: one that mounts the learner's shared directory maps each version's
/// file (and generates exactly what the same weights loaded locally generate, also after
/// the learner removed the file of the version it holds); one whose directory lacks the
/// file takes the same versions over gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_co_located_follower_maps_the_learners_shared_weights_file() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("weights");
    let learner = learner_sharing("tiny:7", Some(&shared)).await;
    learner.store.publish(0, 0, tiny_payload(7));
    let sec = hindsight_service::ClientSecurity::from_args(&Default::default()).unwrap();
    let client = WeightsClient::new(sec.connect_authed(&learner.url, 3).await.unwrap())
        .max_decoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES);
    let model = weights::learner_model(&mut client.clone())
        .await
        .unwrap()
        .unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let follow = |shared_dir: &Path| {
        weights::Follower::start(
            client.clone(),
            weights::FollowSpec {
                fingerprint: model.fingerprint.clone(),
                config: model.config.clone(),
                device: Device::Cpu,
                precision: Precision::F32,
                shared_dir: Some(shared_dir.to_path_buf()),
            },
            None,
            stop.clone(),
        )
    };
    let prompt = model.tokenizer.encode_chat("Say hello.").unwrap();
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: 24,
        seed: 5,
    };
    let generate = |s: &mut Sampler| s.generate(std::slice::from_ref(&prompt), &params).unwrap();
    let local = |seed: u64| {
        let m = hindsight_policy::tiny(seed).unwrap();
        let mut s = Sampler::new(
            &m.config,
            &m.weights,
            m.tokenizer.stop_token_ids(),
            &Device::Cpu,
        )
        .unwrap();
        generate(&mut s)
    };
    let sampler_for = |u: weights::Update| {
        Sampler::from_prepared(
            &model.config,
            model.tokenizer.stop_token_ids(),
            &Device::Cpu,
            Precision::F32,
            u.weights,
        )
        .unwrap()
    };

    let mapping = follow(&shared);
    let first = next_update(&mapping).await;
    assert!(first.shared, "version 0 was mapped from the shared file");
    assert_eq!(first.version, 0);
    assert_eq!(
        first.weights.mapped_bytes().map(|(m, t)| m == t),
        Some(true)
    );
    let mut on_v0 = sampler_for(first);
    assert_eq!(generate(&mut on_v0), local(7));

    learner.store.publish(1, 1, tiny_payload(8));
    let second = next_update(&mapping).await;
    assert!(second.shared);
    assert_eq!(second.version, 1);
    let mut on_v1 = sampler_for(second);
    assert_eq!(generate(&mut on_v1), local(8));

    // A follower whose directory does not hold the file takes the version over gRPC.
    let elsewhere = dir.path().join("not-the-learners");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let fetching = follow(&elsewhere);
    let fetched = next_update(&fetching).await;
    assert!(!fetched.shared, "no file there: fetched over gRPC");
    assert_eq!(fetched.version, 1);
    assert_eq!(generate(&mut sampler_for(fetched)), local(8));

    // Versions 0 and 1 leave the store and their files go; the samplers mapping them keep
    // generating the same.
    learner.store.publish(2, 2, tiny_payload(9));
    learner.store.publish(3, 3, tiny_payload(10));
    let names: Vec<String> = std::fs::read_dir(&shared)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "only the kept versions' files stay: {names:?}"
    );
    assert!(
        names.iter().all(|n| n.starts_with("weights-v0000000")),
        "{names:?}"
    );
    assert_eq!(generate(&mut on_v0), local(7));
    assert_eq!(generate(&mut on_v1), local(8));
    let _ = stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_without_model_files_generates_with_the_learners_model() {
    let dir = tempfile::tempdir().unwrap();
    let learner = learner("tiny:7").await;
    learner.store.publish(0, 0, tiny_payload(7));
    let replay = replay(replay_args(dir.path(), "tiny")).await;

    // The policy an actor builds from the learner alone generates bit for bit what the
    // model loaded locally generates.
    let sec = hindsight_service::ClientSecurity::from_args(&Default::default()).unwrap();
    let authed = WeightsClient::new(sec.connect_authed(&learner.url, 3).await.unwrap())
        .max_decoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES);
    let model = weights::learner_model(&mut authed.clone())
        .await
        .unwrap()
        .expect("the learner describes its model");
    assert_eq!(model.fingerprint, fingerprint_of("tiny"));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let follower = weights::Follower::start(
        authed,
        weights::FollowSpec {
            fingerprint: model.fingerprint.clone(),
            config: model.config.clone(),
            device: Device::Cpu,
            precision: Precision::F32,
            shared_dir: None,
        },
        None,
        stop,
    );
    let first = tokio::time::timeout(TIMEOUT, follower.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.version, 0);
    let mut remote = Sampler::from_prepared(
        &model.config,
        model.tokenizer.stop_token_ids(),
        &Device::Cpu,
        Precision::F32,
        first.weights,
    )
    .unwrap();
    let local_model = hindsight_policy::tiny(7).unwrap();
    let mut local = Sampler::new(
        &local_model.config,
        &local_model.weights,
        local_model.tokenizer.stop_token_ids(),
        &Device::Cpu,
    )
    .unwrap();
    let prompt = model.tokenizer.encode_chat("Say hello.").unwrap();
    assert_eq!(
        prompt,
        local_model.tokenizer.encode_chat("Say hello.").unwrap()
    );
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: 24,
        seed: 11,
    };
    let a = remote
        .generate(std::slice::from_ref(&prompt), &params)
        .unwrap();
    let b = local.generate(&[prompt], &params).unwrap();
    assert_eq!(a[0].token_ids, b[0].token_ids);
    assert_eq!(a[0].logprobs, b[0].logprobs);
    let _ = stop_tx.send(true);

    // The actor process loop with nothing but the two addresses (and an empty cache).
    let args = actor_args(
        &replay,
        &learner.url,
        &[
            "--max-groups",
            "2",
            "--cache-dir",
            dir.path().join("empty-cache").to_str().unwrap(),
        ],
    );
    assert!(args.follow.model.is_none());
    run_actor(args).await.expect("the actor ran");
    let status = ReplayClient::connect(format!("http://{}", replay.addr))
        .await
        .unwrap()
        .status(ReplayStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.groups_accepted >= 2, "{status:?}");
    assert!(
        !dir.path().join("empty-cache").exists(),
        "no model files fetched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprint_mismatches_are_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = fingerprint_of("tiny");
    let qwen = fingerprint_of("tiny-qwen2");
    assert_ne!(tiny, qwen);
    let replay = replay(replay_args(dir.path(), "tiny")).await;
    let mut client = ReplayClient::connect(format!("http://{}", replay.addr))
        .await
        .unwrap();
    let names_both = |msg: &str| msg.contains(&tiny) && msg.contains(&qwen);

    // A lease for another model.
    let e = client
        .lease_prompts(LeaseRequest {
            actor_id: "a".into(),
            max_prompts: 1,
            policy_version: 0,
            model_fingerprint: qwen.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(names_both(e.message()), "{}", e.message());

    // The same model: leased, and the lease names the server's model.
    let lease = client
        .lease_prompts(LeaseRequest {
            actor_id: "a".into(),
            max_prompts: 1,
            policy_version: 0,
            model_fingerprint: tiny.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.model_fingerprint, tiny);
    let p = &lease.prompts[0];

    // Rollouts of another model end the stream, and nothing is accepted.
    let group = RolloutGroup {
        actor_id: "a".into(),
        prompt_id: p.prompt_id.clone(),
        lease_id: p.lease_id.clone(),
        policy_version: 0,
        responses: vec![
            Response {
                token_ids: vec![104, 105],
                logprobs: vec![-1.0, -1.0],
                entropies: vec![1.0, 1.0],
                finished: false,
                text: String::new(),
            };
            2
        ],
        generation_ms: 1,
        model_fingerprint: qwen.clone(),
    };
    let mut acks = client
        .stream_rollouts(tokio_stream::iter(vec![group]))
        .await
        .unwrap()
        .into_inner();
    let e = acks.message().await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(names_both(e.message()), "{}", e.message());

    // A learner of another model.
    let e = client
        .register_learner(RegisterLearnerRequest {
            learner_id: "l".into(),
            model_fingerprint: qwen.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(names_both(e.message()), "{}", e.message());
    let status = client
        .status(ReplayStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.groups_accepted, 0);

    // An actor with a local model that is not the learner's refuses to start.
    let tiny_learner = learner("tiny").await;
    tiny_learner.store.publish(0, 0, tiny_payload(0));
    let e = run_actor(actor_args(
        &replay,
        &tiny_learner.url,
        &["--model", "tiny-qwen2"],
    ))
    .await
    .unwrap_err();
    assert!(names_both(&format!("{e:#}")), "{e:#}");

    // An actor taking the learner's model (qwen2) is refused by the replay server (tiny).
    let qwen_learner = learner("tiny-qwen2").await;
    qwen_learner.store.publish(
        0,
        0,
        hindsight_policy::load("tiny-qwen2", &std::env::temp_dir(), &Device::Cpu)
            .unwrap()
            .weights
            .to_safetensors_bytes()
            .unwrap(),
    );
    let e = run_actor(actor_args(&replay, &qwen_learner.url, &[]))
        .await
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(names_both(&msg) && msg.contains("refused"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_published_while_the_actor_generates_never_mix_inside_a_group() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let learner = learner("tiny").await;
    learner.store.publish(0, 0, tiny_payload(100));
    let replay = replay(ReplayArgs {
        max_staleness: 1_000_000,
        ..replay_args(dir.path(), "tiny")
    })
    .await;
    // The replay server accepts versions up to the newest a learner announced: a reader
    // registers as a learner far ahead of what the test publishes, and later reads batches.
    let mut client = ReplayClient::connect(format!("http://{}", replay.addr))
        .await
        .unwrap()
        .max_decoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES);
    let reg = client
        .register_learner(RegisterLearnerRequest {
            learner_id: "reader".into(),
            policy_version: 100_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // A new version (other weights) every 30 ms while the actor works: version v is tiny
    // with seed 100 + v, so the log-probs tell which weights made each response.
    let store = learner.store.clone();
    let publisher = tokio::spawn(async move {
        let mut v = 0u64;
        loop {
            tokio::time::sleep(Duration::from_millis(30)).await;
            v += 1;
            let payload = tokio::task::spawn_blocking(move || tiny_payload(100 + v))
                .await
                .unwrap();
            store.publish(v, v, payload);
        }
    });
    run_actor(actor_args(&replay, &learner.url, &["--max-groups", "8"]))
        .await
        .unwrap();
    publisher.abort();

    // Read every batch as the learner and check each original response against the weights
    // of the version its group names.
    let mut batches = client
        .stream_batches(BatchStreamRequest {
            learner_id: "reader".into(),
            world_size: 1,
            incarnation: reg.incarnation,
            prefetch: 16,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut versions = std::collections::BTreeSet::new();
    let mut checked = 0;
    let mut discriminating = 0;
    for _ in 0..4 {
        let batch = tokio::time::timeout(TIMEOUT, batches.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        for s in batch.samples.iter().filter(|s| !s.is_replay) {
            let v = s.provenance.as_ref().unwrap().policy_version;
            versions.insert(v);
            let err = logprob_error(100 + v, s, batch.temperature);
            assert!(
                err < 1e-3,
                "version {v}: behaviour log-probs differ by {err} from its weights"
            );
            if logprob_error(100 + v + 1, s, batch.temperature) > 1e-2 {
                discriminating += 1;
            }
            checked += 1;
        }
    }
    assert!(checked >= 8, "{checked} responses checked");
    assert!(
        discriminating * 2 >= checked,
        "other weights must not explain the log-probs ({discriminating} of {checked})"
    );
    assert!(
        versions.len() >= 2,
        "groups came from versions {versions:?}: the test needs the versions to change while generating"
    );
}

/// Largest |behaviour log-prob - log-prob under tiny(seed)| over a sample's response.
fn logprob_error(seed: u64, s: &hindsight_proto::v1::Sample, temperature: f32) -> f32 {
    let m = hindsight_policy::tiny(seed).unwrap();
    let sampler = Sampler::new(
        &m.config,
        &m.weights,
        m.tokenizer.stop_token_ids(),
        &Device::Cpu,
    )
    .unwrap();
    let mut tokens = s.prompt_token_ids.clone();
    tokens.extend(&s.response_token_ids);
    let logits = sampler.logits(&tokens).unwrap();
    let logits: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let p = s.prompt_token_ids.len();
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let mut worst = 0f32;
    for (i, (&tok, &lp)) in s
        .response_token_ids
        .iter()
        .zip(&s.behaviour_logprobs)
        .enumerate()
    {
        let row = &logits[p + i - 1];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x / t));
        let lse = row.iter().map(|&x| (x / t - max).exp()).sum::<f32>().ln() + max;
        let want = row[tok as usize] / t - lse;
        worst = worst.max((want - lp).abs());
    }
    worst
}
