//! Sequences of hostile and honest requests against a real replay server (loopback gRPC, a
//! write-ahead log in a temporary directory, the tiny model's tokenizer), one server per
//! fuzzing process so that state accumulates across inputs as it does in a long run.
//!
//! Checked after every request: the server never panics (libFuzzer turns a panic in any task
//! into a crash), answers every request with OK or a status that names the caller's mistake
//! (never INTERNAL, UNKNOWN, UNAVAILABLE or DATA_LOSS), and a refused request changes none of
//! the counters that decide training (groups accepted, batches acked, learner step and
//! version, committed-through, leases held).
//!
//! Run: `cd replay-server/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run requests -- -max_total_time=600`
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use hindsight_model::ChatTokenizer;
use hindsight_proto::v1::replay_client::ReplayClient;
use hindsight_proto::v1::{
    AckBatchRequest, BatchStreamRequest, CommitBatchesRequest, LeaseRequest,
    RegisterLearnerRequest, ReleaseLeasesRequest, RenewLeasesRequest, ReplayStatusRequest,
    ReplayStatusResponse, Response, RolloutGroup,
};
use hindsight_replay_server::ReplayArgs;
use libfuzzer_sys::fuzz_target;
use tonic::transport::Channel;
use tonic::Code;

/// A number as a hostile or honest client would send it.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Num {
    Zero,
    One,
    Small(u8),
    /// The value the server currently holds for this field, plus a small offset.
    Current(i8),
    Max,
    Huge(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Text {
    Empty,
    /// One of a few honest actor or learner names.
    Name(u8),
    Long(u16),
    Unicode,
}

/// A lease id: one the server handed out (by index), a forged one, or none.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum LeaseRef {
    Held(u8),
    Forged(Text),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Float {
    Honest,
    Zero,
    Positive,
    Nan,
    Inf,
    NegInf,
    Huge,
}

#[derive(Arbitrary, Debug)]
enum Tokens {
    /// The tokens of one of a few honest answers.
    Answer(u8),
    Raw(Vec<u32>),
}

#[derive(Arbitrary, Debug)]
struct Resp {
    tokens: Tokens,
    logprob: Float,
    entropy: Float,
    /// Drop or add one log-prob (length mismatch).
    skew: i8,
    finished: bool,
}

#[derive(Arbitrary, Debug)]
struct Group {
    actor: Text,
    lease: LeaseRef,
    /// Use the prompt id the lease was given for (else a forged one).
    honest_prompt: bool,
    version: Num,
    responses: Vec<Resp>,
    generation_ms: Num,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Lease {
        actor: Text,
        max: u8,
        version: Num,
    },
    Renew {
        actor: Text,
        leases: Vec<LeaseRef>,
    },
    Release {
        actor: Text,
        leases: Vec<LeaseRef>,
    },
    Submit {
        groups: Vec<Group>,
    },
    Register {
        learner: Text,
        step: Num,
        version: Num,
        committed: Num,
        trained: Num,
    },
    Stream {
        honest_incarnation: bool,
        trained: Num,
        prefetch: u8,
        take: u8,
    },
    Ack {
        batch: Num,
        step: Num,
        version: Num,
        honest_incarnation: bool,
    },
    Commit {
        through: Num,
        step: Num,
        version: Num,
        honest_incarnation: bool,
    },
}

struct Harness {
    rt: tokio::runtime::Runtime,
    client: ReplayClient<Channel>,
    tokenizer: ChatTokenizer,
    answers: Vec<Vec<u32>>,
    _dir: tempfile::TempDir,
}

/// What the fuzzer has learned from the server so far (carried across inputs).
#[derive(Default)]
struct Memory {
    leases: Vec<(String, String)>,
    incarnation: String,
    served: Vec<u64>,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();
static MEMORY: std::sync::Mutex<Option<Memory>> = std::sync::Mutex::new(None);

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        // libFuzzer's C main does not ignore SIGPIPE as a Rust main does: without this, a
        // write to a connection the client dropped kills the process (the server is fine).
        // SAFETY: setting a signal disposition before any thread of ours starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let args = ReplayArgs {
            cache_dir: Some(dir.path().join("cache")),
            data_dir: Some(dir.path().join("wal")),
            num_prompts: 16,
            group_size: 8,
            responses_per_prompt: 6,
            prompts_per_batch: 2,
            lease_timeout_ms: 3_600_000,
            security: hindsight_service::ServerSecurityArgs {
                insecure: true,
                ..Default::default()
            },
            ..ReplayArgs::default()
        };
        let tokenizer =
            hindsight_model::load_tokenizer("tiny", &dir.path().join("cache")).unwrap();
        let answers = [
            "the sea is calm.",
            "",
            "Yes, no; maybe!",
            "ÄÖÜ 漢字 🙂",
            "a b c d e f g h",
        ]
        .iter()
        .map(|t| tokenizer.encode(t).unwrap())
        .collect();
        let client = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(hindsight_replay_server::serve(
                args,
                listener,
                std::future::pending(),
            ));
            for _ in 0..200 {
                if let Ok(c) = ReplayClient::connect(format!("http://{addr}")).await {
                    let mut c = c
                        .max_decoding_message_size(64 << 20)
                        .max_encoding_message_size(64 << 20);
                    if c.status(ReplayStatusRequest::default()).await.is_ok() {
                        return c;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the replay server did not start");
        });
        Harness {
            rt,
            client,
            tokenizer,
            answers,
            _dir: dir,
        }
    })
}

fn num(n: Num, current: u64) -> u64 {
    match n {
        Num::Zero => 0,
        Num::One => 1,
        Num::Small(v) => u64::from(v),
        Num::Current(d) => current.saturating_add_signed(i64::from(d)),
        Num::Max => u64::MAX,
        Num::Huge(v) => v,
    }
}

fn text(t: Text) -> String {
    match t {
        Text::Empty => String::new(),
        Text::Name(i) => format!("fuzz-{}", i % 4),
        Text::Long(n) => "x".repeat(usize::from(n) * 4),
        Text::Unicode => "\u{0}\u{202e}漢字\u{ffff}".into(),
    }
}

fn float(f: Float, honest: f32) -> f32 {
    match f {
        Float::Honest => honest,
        Float::Zero => 0.0,
        Float::Positive => 3.5,
        Float::Nan => f32::NAN,
        Float::Inf => f32::INFINITY,
        Float::NegInf => f32::NEG_INFINITY,
        Float::Huge => -1e30,
    }
}

fn lease_id(mem: &Memory, r: LeaseRef) -> (String, Option<String>) {
    match r {
        LeaseRef::Held(i) if !mem.leases.is_empty() => {
            let (lease, prompt) = &mem.leases[usize::from(i) % mem.leases.len()];
            (lease.clone(), Some(prompt.clone()))
        }
        LeaseRef::Held(_) => (String::new(), None),
        LeaseRef::Forged(t) => (text(t), None),
    }
}

/// The counters a refused request must leave alone.
fn decisive(s: &ReplayStatusResponse) -> [u64; 6] {
    [
        s.groups_accepted,
        s.batches_acked,
        s.learner_step,
        s.policy_version,
        s.committed_through_batch_id,
        s.leases_active,
    ]
}

fn check(code: Code, what: &str) {
    assert!(
        !matches!(
            code,
            Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented
        ),
        "{what} answered {code:?}"
    );
}

/// The connection was dropped under the call (hyper's HTTP/2 server closes a connection that
/// resets streams faster than any real client, which this harness does): whether the
/// request took effect is unknown, so only the server's liveness is checked afterwards.
fn connection_lost(code: Code) -> bool {
    matches!(code, Code::Cancelled | Code::Unavailable)
}

/// The server's Status, on a fresh connection if the shared one was dropped; panics when the
/// server stopped answering.
async fn status(client: &mut ReplayClient<Channel>) -> ReplayStatusResponse {
    let mut last = None;
    for _ in 0..50 {
        match client.status(ReplayStatusRequest::default()).await {
            Ok(s) => return s.into_inner(),
            Err(e) if connection_lost(e.code()) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("status answered {e:?}"),
        }
    }
    panic!("the replay server stopped answering: {last:?}")
}

fuzz_target!(|ops: Vec<Op>| {
    let h = harness();
    let mut guard = MEMORY.lock().unwrap();
    let mem = guard.get_or_insert_with(Memory::default);
    let mut client = h.client.clone();
    h.rt.block_on(async {
        for op in ops.into_iter().take(16) {
            let before = status(&mut client).await;
            let what = format!("{op:?}");
            let what = &what[..what.len().min(300)];
            let refused = match op {
                Op::Lease {
                    actor,
                    max,
                    version,
                } => {
                    let r = client
                        .lease_prompts(LeaseRequest {
                            actor_id: text(actor),
                            max_prompts: u32::from(max),
                            policy_version: num(version, before.policy_version),
                            model_fingerprint: String::new(),
                        })
                        .await;
                    match r {
                        Ok(r) => {
                            for p in r.into_inner().prompts {
                                mem.leases.push((p.lease_id, p.prompt_id));
                            }
                            if mem.leases.len() > 64 {
                                mem.leases.drain(..32);
                            }
                            None
                        }
                        Err(s) => Some(s.code()),
                    }
                }
                Op::Renew { actor, leases } => client
                    .renew_leases(RenewLeasesRequest {
                        actor_id: text(actor),
                        lease_ids: leases.into_iter().map(|l| lease_id(mem, l).0).collect(),
                    })
                    .await
                    .err()
                    .map(|s| s.code()),
                Op::Release { actor, leases } => {
                    let r = client
                        .release_leases(ReleaseLeasesRequest {
                            actor_id: text(actor),
                            lease_ids: leases.into_iter().map(|l| lease_id(mem, l).0).collect(),
                        })
                        .await;
                    // A release legitimately changes the number of leases held.
                    match r {
                        Ok(_) => None,
                        Err(s) => Some(s.code()),
                    }
                }
                Op::Submit { groups } => {
                    let groups: Vec<RolloutGroup> = groups
                        .into_iter()
                        .take(8)
                        .map(|g| {
                            let (lease, prompt) = lease_id(mem, g.lease);
                            let prompt = match (g.honest_prompt, prompt) {
                                (true, Some(p)) => p,
                                _ => text(g.actor),
                            };
                            RolloutGroup {
                                actor_id: text(g.actor),
                                prompt_id: prompt,
                                lease_id: lease,
                                policy_version: num(g.version, before.policy_version),
                                generation_ms: num(g.generation_ms, 10),
                                model_fingerprint: String::new(),
                                responses: g
                                    .responses
                                    .into_iter()
                                    .take(12)
                                    .map(|r| {
                                        let token_ids = match r.tokens {
                                            Tokens::Answer(i) => {
                                                h.answers[usize::from(i) % h.answers.len()].clone()
                                            }
                                            Tokens::Raw(t) => t.into_iter().take(512).collect(),
                                        };
                                        let n = token_ids.len();
                                        let m =
                                            n.saturating_add_signed(isize::from(r.skew.signum()));
                                        Response {
                                            logprobs: vec![float(r.logprob, -0.5); m],
                                            entropies: vec![float(r.entropy, 0.3); n],
                                            token_ids,
                                            finished: r.finished,
                                            text: String::new(),
                                        }
                                    })
                                    .collect(),
                            }
                        })
                        .collect();
                    let n = groups.len();
                    match client.stream_rollouts(tokio_stream::iter(groups)).await {
                        Err(s) => Some(s.code()),
                        Ok(acks) => {
                            let mut acks = acks.into_inner();
                            let mut end = None;
                            for _ in 0..n {
                                match acks.message().await {
                                    Ok(Some(_)) => {}
                                    Ok(None) => break,
                                    Err(s) => {
                                        // A stream may be ended after some groups were
                                        // accepted: only the code is checked.
                                        check(s.code(), what);
                                        end = None;
                                        break;
                                    }
                                }
                            }
                            end
                        }
                    }
                }
                Op::Register {
                    learner,
                    step,
                    version,
                    committed,
                    trained,
                } => {
                    let r = client
                        .register_learner(RegisterLearnerRequest {
                            learner_id: text(learner),
                            learner_step: num(step, before.learner_step),
                            policy_version: num(version, before.policy_version),
                            committed_through_batch_id: num(
                                committed,
                                before.committed_through_batch_id,
                            ),
                            trained_through_batch_id: num(
                                trained,
                                before.committed_through_batch_id,
                            ),
                            model_fingerprint: String::new(),
                        })
                        .await;
                    match r {
                        Ok(r) => {
                            mem.incarnation = r.into_inner().incarnation;
                            mem.served.clear();
                            // Registration legitimately moves step and version.
                            None
                        }
                        Err(s) => Some(s.code()),
                    }
                }
                Op::Stream {
                    honest_incarnation,
                    trained,
                    prefetch,
                    take,
                } => {
                    let r = client
                        .stream_batches(BatchStreamRequest {
                            learner_id: "fuzz-learner".into(),
                            rank: 0,
                            world_size: 1,
                            incarnation: if honest_incarnation {
                                mem.incarnation.clone()
                            } else {
                                "forged".into()
                            },
                            trained_through_batch_id: num(
                                trained,
                                before.committed_through_batch_id,
                            ),
                            prefetch: u32::from(prefetch),
                        })
                        .await;
                    match r {
                        Err(s) => Some(s.code()),
                        Ok(s) => {
                            let mut s = s.into_inner();
                            for _ in 0..(take % 4) {
                                match tokio::time::timeout(Duration::from_millis(30), s.message())
                                    .await
                                {
                                    Ok(Ok(Some(b))) => mem.served.push(b.batch_id),
                                    Ok(Err(st)) => {
                                        check(st.code(), what);
                                        break;
                                    }
                                    _ => break,
                                }
                            }
                            None
                        }
                    }
                }
                Op::Ack {
                    batch,
                    step,
                    version,
                    honest_incarnation,
                } => {
                    let served = mem.served.first().copied().unwrap_or(0);
                    let r = client
                        .ack_batch(AckBatchRequest {
                            learner_id: "fuzz-learner".into(),
                            batch_id: num(batch, served),
                            learner_step: num(step, before.learner_step + 1),
                            policy_version: num(version, before.policy_version + 1),
                            incarnation: if honest_incarnation {
                                mem.incarnation.clone()
                            } else {
                                "forged".into()
                            },
                        })
                        .await;
                    match r {
                        Ok(_) => {
                            if !mem.served.is_empty() {
                                mem.served.remove(0);
                            }
                            None
                        }
                        Err(s) => Some(s.code()),
                    }
                }
                Op::Commit {
                    through,
                    step,
                    version,
                    honest_incarnation,
                } => client
                    .commit_batches(CommitBatchesRequest {
                        learner_id: "fuzz-learner".into(),
                        incarnation: if honest_incarnation {
                            mem.incarnation.clone()
                        } else {
                            "forged".into()
                        },
                        through_batch_id: num(through, before.batches_acked),
                        learner_step: num(step, before.learner_step),
                        policy_version: num(version, before.policy_version),
                    })
                    .await
                    .err()
                    .map(|s| s.code()),
            };
            if let Some(code) = refused {
                check(code, what);
                let after = status(&mut client).await;
                if connection_lost(code) {
                    continue;
                }
                assert_eq!(
                    decisive(&before),
                    decisive(&after),
                    "a refused request ({code:?}) changed the state: {what}"
                );
            }
        }
    });
    let _ = &h.tokenizer;
});
