//! The security shell over real sockets: tonic servers on 127.0.0.1:0 behind `AuthLayer`, with
//! and without TLS, called by tonic clients built from `ClientSecurity`.
//!
//! The servers are stand-ins that answer every method with an empty message (and the caller's
//! `Role`, read from the request extensions, in `x-role` response metadata), and the clients call
//! paths with `()` messages. That keeps these tests about who may call what, not about the
//! protocol's messages, which change on their own schedule; one test calls through the
//! generated `ReplayClient` to show the wiring a role uses.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hindsight_service::{
    make_certs, AuthLayer, ClientSecurity, ClientSecurityArgs, Role, SecureServer, ServerSecurity,
    ServerSecurityArgs, TokenTable, CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE, TOKENS_FILE,
};
use tonic::body::Body;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Server;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

/// Longest any single step may take before the test calls it a hang.
const STEP: Duration = Duration::from_secs(20);

// ---- stand-in services -------------------------------------------------------------------

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Answers any unary call with `()` and the caller's role in `x-role`.
async fn echo(req: http::Request<Body>) -> Result<http::Response<Body>, Infallible> {
    let role = req.extensions().get::<Role>().copied();
    let handler = tower::service_fn(move |_req: tonic::Request<()>| async move {
        let mut resp = tonic::Response::new(());
        let who = role.map_or("none", Role::as_str);
        resp.metadata_mut().insert("x-role", who.parse().unwrap());
        Ok::<_, Status>(resp)
    });
    let mut grpc = tonic::server::Grpc::new(ProstCodec::<(), ()>::default());
    Ok(grpc.unary(handler, req).await)
}

macro_rules! echo_service {
    ($ty:ident, $name:literal) => {
        #[derive(Clone)]
        struct $ty;
        impl tonic::server::NamedService for $ty {
            const NAME: &'static str = $name;
        }
        impl tower::Service<http::Request<Body>> for $ty {
            type Response = http::Response<Body>;
            type Error = Infallible;
            type Future = BoxFuture<Result<Self::Response, Infallible>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, req: http::Request<Body>) -> Self::Future {
                Box::pin(echo(req))
            }
        }
    };
}

echo_service!(Replay, "hindsight.v1.Replay");
echo_service!(Weights, "hindsight.v1.Weights");
echo_service!(HealthEcho, "grpc.health.v1.Health");
echo_service!(Unlisted, "hindsight.v1.Admin");

/// Serves the stand-ins on 127.0.0.1:0 with `builder` (TLS and layer already applied).
async fn serve(mut builder: SecureServer) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = builder
        .add_service(Replay)
        .add_service(Weights)
        .add_service(HealthEcho)
        .add_service(Unlisted);
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

// ---- clients -------------------------------------------------------------------------------

/// The files `hindsight certs` writes, in a temporary directory.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        make_certs(dir.path(), &["replay-server".to_string()], true).unwrap();
        Certs { dir }
    }
    fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join(file)
    }
    fn server(&self) -> ServerSecurity {
        ServerSecurity::from_args(&ServerSecurityArgs {
            tls_cert: Some(self.path(SERVER_CERT_FILE)),
            tls_key: Some(self.path(SERVER_KEY_FILE)),
            auth_tokens: Some(self.path(TOKENS_FILE)),
            insecure: false,
        })
        .unwrap()
    }
    /// A TLS client holding `role`'s token (or none).
    fn client(&self, role: Option<Role>) -> ClientSecurity {
        ClientSecurity::from_args(&ClientSecurityArgs {
            tls_ca: Some(self.path(CA_CERT_FILE)),
            token_file: role.map(|r| self.path(&format!("{r}.token"))),
            ..Default::default()
        })
        .unwrap()
    }
    fn token(&self, role: Role) -> String {
        read_token(self.dir.path(), role)
    }
}

fn read_token(dir: &Path, role: Role) -> String {
    std::fs::read_to_string(dir.join(format!("{role}.token")))
        .unwrap()
        .trim()
        .to_string()
}

fn with_token(tls_ca: Option<&Path>, token: Option<&str>) -> ClientSecurity {
    ClientSecurity::from_args(&ClientSecurityArgs {
        tls_ca: tls_ca.map(Path::to_path_buf),
        token: token.map(str::to_string),
        ..Default::default()
    })
    .unwrap()
}

/// A refused call: the status code and message (comparable, unlike `Status`).
#[derive(Debug, PartialEq)]
struct Refused {
    code: Code,
    message: String,
}

impl Refused {
    fn code(&self) -> Code {
        self.code
    }
    fn message(&self) -> &str {
        &self.message
    }
}

/// Calls `path` with `()`; the response's `x-role`, or the refusal.
async fn call(sec: &ClientSecurity, url: &str, path: &'static str) -> Result<String, Refused> {
    let step = async {
        let channel = sec
            .connect_authed(url, 1)
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}")))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let resp = grpc
            .unary(
                tonic::Request::new(()),
                PathAndQuery::from_static(path),
                ProstCodec::<(), ()>::default(),
            )
            .await?;
        Ok(resp
            .metadata()
            .get("x-role")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string())
    };
    let result: Result<String, Status> = tokio::time::timeout(STEP, step)
        .await
        .unwrap_or_else(|_| panic!("calling {path} on {url} hung for {STEP:?}"));
    result.map_err(|s| Refused {
        code: s.code(),
        message: s.message().to_string(),
    })
}

const LEASE: &str = "/hindsight.v1.Replay/LeasePrompts";

/// Every method of the access table, the roles allowed, and methods nobody may call.
const TABLE: &[(&str, &[Role])] = &[
    ("/hindsight.v1.Replay/LeasePrompts", &[Role::Actor]),
    ("/hindsight.v1.Replay/RenewLeases", &[Role::Actor]),
    ("/hindsight.v1.Replay/ReleaseLeases", &[Role::Actor]),
    ("/hindsight.v1.Replay/StreamRollouts", &[Role::Actor]),
    ("/hindsight.v1.Replay/StreamBatches", &[Role::Learner]),
    ("/hindsight.v1.Replay/AckBatch", &[Role::Learner]),
    ("/hindsight.v1.Replay/RegisterLearner", &[Role::Learner]),
    ("/hindsight.v1.Replay/CommitBatches", &[Role::Learner]),
    (
        "/hindsight.v1.Replay/Status",
        &[Role::Actor, Role::Learner, Role::Status],
    ),
    (
        "/hindsight.v1.Weights/Latest",
        &[Role::Actor, Role::Learner, Role::Status],
    ),
    ("/hindsight.v1.Weights/Fetch", &[Role::Actor, Role::Learner]),
    ("/hindsight.v1.Weights/Publish", &[]),
    ("/hindsight.v1.Replay/Reset", &[]),
    ("/hindsight.v1.Admin/Shutdown", &[]),
];

const HEALTH: [&str; 2] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
];

/// Checks the whole access table against a server at `url`; `client(role)` builds a client.
async fn check_table(url: &str, client: impl Fn(Option<Role>) -> ClientSecurity) {
    for (path, allowed) in TABLE {
        for role in Role::ALL {
            let got = call(&client(Some(role)), url, path).await;
            if allowed.contains(&role) {
                assert_eq!(got, Ok(role.to_string()), "{role} calling {path}");
            } else {
                let s = got.expect_err(&format!("{role} calling {path} must be refused"));
                assert_eq!(
                    s.code(),
                    Code::PermissionDenied,
                    "{role} calling {path}: {s:?}"
                );
                assert!(
                    s.message().contains(&format!("`{role}`")) && s.message().contains(path),
                    "{role} calling {path}: {}",
                    s.message()
                );
            }
        }
        // Without credentials, every non-open method is refused as unauthenticated.
        let s = call(&client(None), url, path).await.unwrap_err();
        assert_eq!(
            s.code(),
            Code::Unauthenticated,
            "no token calling {path}: {s:?}"
        );
        assert!(
            s.message().contains("missing `authorization"),
            "{}",
            s.message()
        );
    }
    for path in HEALTH {
        assert_eq!(
            call(&client(None), url, path).await,
            Ok("none".into()),
            "{path}"
        );
        // Open methods answer holders of tokens too (without needing one).
        assert_eq!(
            call(&client(Some(Role::Status)), url, path).await,
            Ok("none".into())
        );
    }
}

// ---- tests ---------------------------------------------------------------------------------

#[tokio::test]
async fn tls_and_tokens_enforce_the_access_table() {
    let certs = Certs::new();
    let addr = serve(certs.server().server().unwrap()).await;
    let url = format!("https://127.0.0.1:{}", addr.port());
    check_table(&url, |role| certs.client(role)).await;

    // A token that is in no table.
    let stranger = with_token(
        Some(&certs.path(CA_CERT_FILE)),
        Some("f".repeat(64).as_str()),
    );
    let s = call(&stranger, &url, LEASE).await.unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (Code::Unauthenticated, "unknown credentials")
    );

    // The certificate is valid for localhost and the extra name; --tls-domain picks the name.
    let url_localhost = format!("https://localhost:{}", addr.port());
    assert_eq!(
        call(&certs.client(Some(Role::Actor)), &url_localhost, LEASE).await,
        Ok("actor".into())
    );
    let as_service = ClientSecurity::from_args(&ClientSecurityArgs {
        tls_ca: Some(certs.path(CA_CERT_FILE)),
        token_file: Some(certs.path("learner.token")),
        tls_domain: Some("replay-server".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        call(&as_service, &url, "/hindsight.v1.Replay/AckBatch").await,
        Ok("learner".into())
    );
}

#[tokio::test]
async fn tokens_without_tls_enforce_the_same_table() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &[], false).unwrap();
    let table = TokenTable::load(&dir.path().join(TOKENS_FILE)).unwrap();
    // The layer alone, as a role would wire it: builder().layer(..).
    let addr =
        serve(Server::builder().layer(AuthLayer::new(table, hindsight_service::default_policy)))
            .await;
    let url = format!("http://127.0.0.1:{}", addr.port());
    check_table(&url, |role| {
        let token = role.map(|r| read_token(dir.path(), r));
        with_token(None, token.as_deref())
    })
    .await;
}

#[tokio::test]
async fn insecure_mode_lets_everything_through() {
    let addr = serve(ServerSecurity::insecure().server().unwrap()).await;
    let url = format!("http://127.0.0.1:{}", addr.port());
    let anonymous = ClientSecurity::plain();
    let holder = with_token(None, Some("0123456789abcdef0123"));
    for (path, _) in TABLE {
        assert_eq!(
            call(&anonymous, &url, path).await,
            Ok("none".into()),
            "{path}"
        );
        assert_eq!(call(&holder, &url, path).await, Ok("none".into()), "{path}");
    }
    for path in HEALTH {
        assert_eq!(
            call(&anonymous, &url, path).await,
            Ok("none".into()),
            "{path}"
        );
    }
}

#[tokio::test]
async fn generated_clients_work_through_the_interceptor() {
    use hindsight_proto::replay_client::ReplayClient;
    let certs = Certs::new();
    let addr = serve(certs.server().server().unwrap()).await;
    let url = format!("https://localhost:{}", addr.port());
    let sec = certs.client(Some(Role::Status));
    let channel = tokio::time::timeout(STEP, sec.connect(&url, 3))
        .await
        .unwrap()
        .unwrap();
    let mut replay = ReplayClient::with_interceptor(channel, sec.interceptor());
    let resp = replay
        .status(hindsight_proto::ReplayStatusRequest::default())
        .await
        .unwrap();
    assert_eq!(resp.metadata().get("x-role").unwrap(), "status");

    // The same, through connect_authed; and a status token cannot lease prompts.
    let mut replay = ReplayClient::new(sec.connect_authed(&url, 3).await.unwrap());
    let s = replay
        .lease_prompts(hindsight_proto::LeaseRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("`status`") && s.message().contains(LEASE),
        "{s:?}"
    );

    // Streaming calls get the refusal as the stream's status, like unary ones.
    let s = replay
        .stream_rollouts(tokio_stream::empty())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let anonymous = ClientSecurity::from_args(&ClientSecurityArgs {
        tls_ca: Some(certs.path(CA_CERT_FILE)),
        ..Default::default()
    })
    .unwrap();
    let mut anonymous = ReplayClient::new(anonymous.connect_authed(&url, 3).await.unwrap());
    let s = anonymous
        .stream_batches(hindsight_proto::BatchStreamRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
}

#[tokio::test]
async fn tls_client_against_a_plain_server_fails_promptly() {
    let certs = Certs::new();
    let addr = serve(ServerSecurity::insecure().server().unwrap()).await;
    let url = format!("https://127.0.0.1:{}", addr.port());
    let t = Instant::now();
    let s = call(&certs.client(Some(Role::Actor)), &url, LEASE)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(
        s.message().contains("TLS handshake") && s.message().contains("does not seem to speak TLS"),
        "{s:?}"
    );
    println!(
        "TLS client vs plain server: {:?} after {:?}",
        s.message(),
        t.elapsed()
    );
}

#[tokio::test]
async fn plain_client_against_a_tls_server_fails_promptly() {
    let certs = Certs::new();
    let addr = serve(certs.server().server().unwrap()).await;
    let url = format!("http://127.0.0.1:{}", addr.port());
    let token = certs.token(Role::Actor);
    let t = Instant::now();
    // The connection may open (TCP) and fail at the first call, or fail to open: never succeed.
    let s = call(&with_token(None, Some(&token)), &url, LEASE)
        .await
        .unwrap_err();
    assert!(
        matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Internal),
        "{s:?}"
    );
    println!("plain client vs TLS server: {s:?} after {:?}", t.elapsed());
}

#[tokio::test]
async fn a_wrong_ca_or_name_is_refused_without_retrying() {
    let certs = Certs::new();
    let other = Certs::new();
    let addr = serve(certs.server().server().unwrap()).await;
    let url = format!("https://127.0.0.1:{}", addr.port());

    // Trusting another cluster's CA: the handshake fails, and 10 attempts are not spent
    // (their back-off alone would take over 10 s).
    let t = Instant::now();
    let err = tokio::time::timeout(STEP, other.client(Some(Role::Actor)).connect(&url, 10))
        .await
        .expect("connect hung")
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("TLS handshake") && msg.contains("--tls-ca") && msg.contains("UnknownIssuer"),
        "{msg}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}: {msg}",
        t.elapsed()
    );

    // The right CA, but a name the certificate does not carry.
    let wrong_name = ClientSecurity::from_args(&ClientSecurityArgs {
        tls_ca: Some(certs.path(CA_CERT_FILE)),
        tls_domain: Some("learner".into()),
        ..Default::default()
    })
    .unwrap();
    let err = tokio::time::timeout(STEP, wrong_name.connect(&url, 10))
        .await
        .expect("connect hung")
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("TLS handshake") && msg.contains("not valid for name \"learner\""),
        "{msg}"
    );
}

#[tokio::test]
async fn connect_retries_until_the_server_is_up_and_gives_up_with_the_count() {
    // Nothing listens: two tries, then an error saying so.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let err = tokio::time::timeout(STEP, ClientSecurity::plain().connect(&url, 2))
        .await
        .unwrap()
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("(2 tries)") && msg.contains(&url), "{msg}");

    // A server that starts late on that port is found by the retries.
    let server = async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        ServerSecurity::insecure()
            .server()
            .unwrap()
            .add_service(HealthEcho)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    };
    tokio::spawn(server);
    let channel = tokio::time::timeout(STEP, ClientSecurity::plain().connect(&url, 20))
        .await
        .unwrap();
    assert!(channel.is_ok(), "{:?}", channel.err());
}

/// The real standard health service (`tonic-health` behind [`hindsight_service::GrpcHealth`])
/// on a TLS server with tokens: a probe without a token gets an answer, over TLS only, and the
/// answer follows the handle (NOT_SERVING until ready, again while draining).
#[tokio::test]
async fn standard_health_answers_probes_without_a_token_over_tls() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let certs = Certs::new();
    let (health, health_server) =
        hindsight_service::GrpcHealth::new(&["hindsight.v1.Replay"]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = certs
        .server()
        .server()
        .unwrap()
        .add_service(health_server)
        .add_service(Replay);
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let url = format!("https://127.0.0.1:{}", addr.port());
    let no_token = certs.client(None);
    let check = |service: &'static str| {
        let no_token = no_token.clone();
        let url = url.clone();
        async move {
            let channel = no_token.connect(&url, 20).await.unwrap();
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .map(|r| r.into_inner().status())
        }
    };
    for service in ["", "hindsight.v1.Replay"] {
        let got = tokio::time::timeout(STEP, check(service)).await.unwrap();
        assert_eq!(got.unwrap(), ServingStatus::NotServing, "{service:?}");
    }
    health.serving().await;
    for service in ["", "hindsight.v1.Replay"] {
        let got = tokio::time::timeout(STEP, check(service)).await.unwrap();
        assert_eq!(got.unwrap(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = tokio::time::timeout(STEP, check("hindsight.v1.Nope"))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    // The other services still want a token.
    let s = call(&no_token, &url, LEASE).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    // Plain text to the TLS port gets no health answer.
    let plain = format!("http://127.0.0.1:{}", addr.port());
    let channel = ClientSecurity::plain().connect(&plain, 1).await;
    if let Ok(channel) = channel {
        let r = tokio::time::timeout(
            STEP,
            HealthClient::new(channel).check(HealthCheckRequest::default()),
        )
        .await
        .unwrap();
        assert!(r.is_err(), "plain text answered: {r:?}");
    }
    health.draining().await;
    let got = tokio::time::timeout(STEP, check("")).await.unwrap();
    assert_eq!(got.unwrap(), ServingStatus::NotServing);
}
