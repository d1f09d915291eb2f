//! The replay server's trust model over real TLS sockets (ARCHITECTURE.md, "Trust model"):
//! every RPC without credentials, with another role's credentials and with the right ones;
//! the hostile `AckBatch` (step and version 2^64-1) is refused and changes nothing; a plain
//! client cannot talk to the TLS server.

use std::path::Path;
use std::time::Duration;

use hindsight_proto::v1::replay_client::ReplayClient;
use hindsight_proto::v1::{
    AckBatchRequest, BatchStreamRequest, CommitBatchesRequest, LeaseRequest,
    RegisterLearnerRequest, ReleaseLeasesRequest, RenewLeasesRequest, ReplayStatusRequest,
    RolloutGroup,
};
use hindsight_replay_server::{serve, ReplayArgs};
use hindsight_service::{AuthChannel, ClientSecurity, ClientSecurityArgs, ServerSecurityArgs};
use tonic::Code;

fn client_security(secrets: &Path, role: Option<&str>) -> ClientSecurity {
    ClientSecurity::from_args(&ClientSecurityArgs {
        tls_ca: Some(secrets.join(hindsight_service::CA_CERT_FILE)),
        token_file: role.map(|r| secrets.join(format!("{r}.token"))),
        ..Default::default()
    })
    .unwrap()
}

async fn client(url: &str, secrets: &Path, role: Option<&str>) -> ReplayClient<AuthChannel> {
    ReplayClient::new(
        client_security(secrets, role)
            .connect_authed(url, 20)
            .await
            .unwrap(),
    )
}

/// The code of every Replay RPC called with `c` (cheap, harmless requests).
async fn codes(c: &mut ReplayClient<AuthChannel>) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), tonic::Status>| match r {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    };
    let mut out = Vec::new();
    out.push((
        "LeasePrompts",
        code(
            c.lease_prompts(LeaseRequest {
                actor_id: "a".into(),
                max_prompts: 1,
                policy_version: 0,
                model_fingerprint: String::new(),
            })
            .await
            .map(|_| ()),
        ),
    ));
    out.push((
        "RenewLeases",
        code(
            c.renew_leases(RenewLeasesRequest {
                actor_id: "a".into(),
                lease_ids: vec![],
            })
            .await
            .map(|_| ()),
        ),
    ));
    out.push((
        "ReleaseLeases",
        code(
            c.release_leases(ReleaseLeasesRequest {
                actor_id: "a".into(),
                lease_ids: vec![],
            })
            .await
            .map(|_| ()),
        ),
    ));
    let stream = c
        .stream_rollouts(tokio_stream::iter(Vec::<RolloutGroup>::new()))
        .await;
    let stream_code = match stream {
        Err(s) => s.code(),
        Ok(r) => match r.into_inner().message().await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        },
    };
    out.push(("StreamRollouts", stream_code));
    out.push((
        "Status",
        code(c.status(ReplayStatusRequest {}).await.map(|_| ())),
    ));
    let registered = c
        .register_learner(RegisterLearnerRequest {
            learner_id: "l".into(),
            ..Default::default()
        })
        .await;
    let incarnation = registered
        .as_ref()
        .map(|r| r.get_ref().incarnation.clone())
        .unwrap_or_default();
    out.push(("RegisterLearner", code(registered.map(|_| ()))));
    out.push((
        "StreamBatches",
        code(
            c.stream_batches(BatchStreamRequest {
                learner_id: "l".into(),
                incarnation: incarnation.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
    ));
    // A repeated ack of "batch 0" is a no-op for a registered learner.
    out.push((
        "AckBatch",
        code(
            c.ack_batch(AckBatchRequest {
                learner_id: "l".into(),
                batch_id: 0,
                incarnation: incarnation.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
    ));
    out.push((
        "CommitBatches",
        code(
            c.commit_batches(CommitBatchesRequest {
                learner_id: "l".into(),
                incarnation,
                through_batch_id: 0,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
    ));
    out
}

#[tokio::test]
async fn every_rpc_needs_the_right_role_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    hindsight_service::make_certs(&secrets, &[], false).unwrap();
    std::fs::write(
        dir.path().join("prompts.jsonl"),
        serde_json::to_string(&hindsight_constraints::generate_prompts(1, 4)[0]).unwrap() + "\n",
    )
    .unwrap();
    let args = ReplayArgs {
        prompts: Some(dir.path().join("prompts.jsonl")),
        cache_dir: Some(dir.path().join("cache")),
        security: ServerSecurityArgs {
            tls_cert: Some(secrets.join(hindsight_service::SERVER_CERT_FILE)),
            tls_key: Some(secrets.join(hindsight_service::SERVER_KEY_FILE)),
            auth_tokens: Some(secrets.join(hindsight_service::TOKENS_FILE)),
            insecure: false,
        },
        ..ReplayArgs::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(args, listener, async move {
        let _ = stopped.await;
    }));
    let url = format!("https://{addr}");

    let actor_rpcs = [
        "LeasePrompts",
        "RenewLeases",
        "ReleaseLeases",
        "StreamRollouts",
    ];
    let learner_rpcs = [
        "RegisterLearner",
        "StreamBatches",
        "AckBatch",
        "CommitBatches",
    ];
    for role in [None, Some("actor"), Some("learner"), Some("status")] {
        let mut c = client(&url, &secrets, role).await;
        for (rpc, code) in codes(&mut c).await {
            let allowed = match role {
                None => false,
                Some("actor") => actor_rpcs.contains(&rpc) || rpc == "Status",
                Some("learner") => learner_rpcs.contains(&rpc) || rpc == "Status",
                Some(_) => rpc == "Status",
            };
            let expected_refusal = if role.is_none() {
                Code::Unauthenticated
            } else {
                Code::PermissionDenied
            };
            if allowed {
                assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{role:?} {rpc}: {code:?}"
                );
            } else {
                assert_eq!(code, expected_refusal, "{role:?} {rpc}");
            }
        }
    }

    // The hostile ack of the issue: refused, and nothing moves (not even with a learner's
    // token: step and version advance one at a time).
    let mut learner = client(&url, &secrets, Some("learner")).await;
    let inc = learner
        .register_learner(RegisterLearnerRequest {
            learner_id: "l".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .incarnation;
    let mut status = client(&url, &secrets, Some("status")).await;
    let before = status
        .status(ReplayStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    for (who, c) in [
        ("actor", &mut client(&url, &secrets, Some("actor")).await),
        ("learner", &mut learner),
    ] {
        let err = c
            .ack_batch(AckBatchRequest {
                learner_id: "l".into(),
                batch_id: 1,
                learner_step: u64::MAX,
                policy_version: u64::MAX,
                incarnation: inc.clone(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err.code(), Code::PermissionDenied | Code::InvalidArgument),
            "{who}: {err:?}"
        );
    }
    let after = status
        .status(ReplayStatusRequest {})
        .await
        .unwrap()
        .into_inner();
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

    // A client without TLS cannot use the TLS port.
    let plain = tokio::time::timeout(Duration::from_secs(10), async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await;
        match channel {
            Err(_) => true,
            Ok(ch) => ReplayClient::new(ch)
                .status(ReplayStatusRequest {})
                .await
                .is_err(),
        }
    })
    .await
    .expect("a plain client gets an answer, not a hang");
    assert!(plain, "a plain-text client was served by the TLS port");

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
