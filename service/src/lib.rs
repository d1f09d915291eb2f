//! `hindsight-service`: the security shell every Hindsight role serves and dials through, so
//! that TLS and credentials are configured one way (same flags, same `HINDSIGHT_<FLAG>`
//! variables, same error messages) in the replay server, the learner and the actors.
//!
//! - Server side: [`ServerSecurityArgs`] (flags) -> [`ServerSecurity`] -> a TLS config for
//!   tonic and an [`AuthLayer`] that checks a per-role bearer token against a [`Policy`]
//!   (which [`Role`] may call which gRPC method; [`default_policy`] is Hindsight's table).
//! - Client side: [`ClientSecurityArgs`] -> [`ClientSecurity`] -> a channel (TLS when the URL
//!   is `https://`) and a [`TokenInterceptor`] that sends the role's token.
//! - Health: [`GrpcHealth`] (the standard `grpc.health.v1` service of a gRPC server, open to
//!   probes) and the process readiness behind every role's HTTP `/readyz` ([`set_ready`],
//!   [`set_not_ready`], [`readiness`]).
//! - [`check_writable_dir`]: a state directory (write-ahead log, checkpoints) checked at start.
//! - [`make_certs`]: a private CA, a server certificate and one token per role, for
//!   `hindsight certs`.
//!
//! A server refuses to start without TLS and tokens unless `--insecure` says so explicitly:
//! a replay server reachable by anyone would accept poisoned rollouts into training.

mod argv;
mod auth;
mod certs;
mod client;
mod config_error;
mod health;
mod role;
mod server;
mod shutdown;
mod state_dir;
mod tokens;

pub use argv::{assert_round_trip, from_env, Argv, ToArgv};
pub use auth::{AuthLayer, AuthService};
pub use certs::{
    make_certs, CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE, TOKENS_FILE,
};
pub use client::{AuthChannel, ClientSecurity, ClientSecurityArgs, TokenInterceptor};
pub use config_error::{ConfigError, ConfigResultExt};
pub use health::{readiness, set_not_ready, set_ready, GrpcHealth};
pub use role::{default_policy, Access, ParseRoleError, Policy, Role};
pub use server::{SecureServer, ServerSecurity, ServerSecurityArgs};
pub use shutdown::{ShutdownArgs, DEFAULT_SHUTDOWN_TIMEOUT_SECS};
pub use state_dir::check_writable_dir;
pub use tokens::{TokenFileError, TokenProblem, TokenTable};

/// Makes ring the process's rustls crypto provider. tonic's server builds its rustls config
/// with the process default; pinning it here keeps that working even if some other dependency
/// one day compiles in a second provider (rustls then refuses to guess). Idempotent.
fn install_crypto_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
