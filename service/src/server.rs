//! Server-side security flags and their validation: TLS identity (`--tls-cert`, `--tls-key`),
//! the token table (`--auth-tokens`) or an explicit `--insecure`.
//!
//! Every role that serves gRPC flattens [`ServerSecurityArgs`] into its flags and builds its
//! tonic server from [`ServerSecurity`], so the same flag means the same thing everywhere and
//! a misconfiguration stops the process at startup with one line saying what to pass, instead
//! of surfacing later as handshake failures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tower_layer::Stack;

use crate::auth::AuthLayer;
use crate::role::{default_policy, Policy, Role};
use crate::tokens::TokenTable;

/// How long a connection may take to finish its TLS handshake before the server drops it.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Security flags of a gRPC server. Without `--insecure`, TLS and tokens are both required.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerSecurityArgs {
    /// PEM certificate (chain) this server presents; `hindsight certs` writes `server.pem`.
    #[arg(long, env = "HINDSIGHT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert; `hindsight certs` writes `server-key.pem`.
    #[arg(long, env = "HINDSIGHT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Token table: lines `ROLE TOKEN` (roles: actor, learner, status); `hindsight certs`
    /// writes `tokens.txt`.
    #[arg(long, env = "HINDSIGHT_AUTH_TOKENS", value_name = "FILE")]
    pub auth_tokens: Option<PathBuf>,
    /// Serve without TLS and without authentication: anyone who can reach the port can call
    /// every method. Only for a closed network or a local test.
    #[arg(long, env = "HINDSIGHT_INSECURE")]
    pub insecure: bool,
}

/// A tonic server builder with the authorization layer (and TLS, if on) already applied.
pub type SecureServer = Server<Stack<AuthLayer, tower_layer::Identity>>;

/// A server's validated security settings.
#[derive(Clone, Debug)]
pub struct ServerSecurity {
    tls: Option<Arc<TlsPem>>,
    tokens: Option<TokenTable>,
}

struct TlsPem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsPem { .. }")
    }
}

impl ServerSecurity {
    /// Validates the flags and reads the files. Errors are one line naming the flag to fix,
    /// and are [`crate::ConfigError`]s.
    pub fn from_args(args: &ServerSecurityArgs) -> Result<Self> {
        Self::from_args_inner(args).map_err(crate::ConfigError::wrap)
    }

    fn from_args_inner(args: &ServerSecurityArgs) -> Result<Self> {
        crate::install_crypto_provider();
        if args.insecure {
            let given: Vec<&str> = [
                (args.tls_cert.is_some(), "--tls-cert"),
                (args.tls_key.is_some(), "--tls-key"),
                (args.auth_tokens.is_some(), "--auth-tokens"),
            ]
            .into_iter()
            .filter_map(|(set, name)| set.then_some(name))
            .collect();
            if !given.is_empty() {
                bail!(
                    "--insecure turns TLS and authentication off, but {} {} given: drop one or the other",
                    given.join(" and "),
                    if given.len() == 1 { "is" } else { "are" }
                );
            }
            tracing::warn!(
                "INSECURE: no TLS, no authentication; anyone who can reach this port can call \
                 every method (lease prompts, inject rollouts into training, read batches and \
                 weights). Run `hindsight certs` and pass --tls-cert, --tls-key and --auth-tokens \
                 instead."
            );
            return Ok(ServerSecurity {
                tls: None,
                tokens: None,
            });
        }
        let (cert, key) = match (&args.tls_cert, &args.tls_key) {
            (Some(c), Some(k)) => (c, k),
            (Some(_), None) => bail!(
                "--tls-cert needs --tls-key (its private key, PEM); `hindsight certs --out DIR` makes both"
            ),
            (None, Some(_)) => bail!(
                "--tls-key needs --tls-cert (the certificate, PEM); `hindsight certs --out DIR` makes both"
            ),
            (None, None) => bail!(
                "missing --tls-cert and --tls-key{}: a server needs TLS and tokens \
                 (`hindsight certs --out DIR` makes them) or an explicit --insecure",
                if args.auth_tokens.is_none() {
                    " and --auth-tokens"
                } else {
                    ""
                }
            ),
        };
        let Some(tokens_path) = &args.auth_tokens else {
            bail!(
                "missing --auth-tokens: a server needs TLS and tokens \
                 (`hindsight certs --out DIR` makes them) or an explicit --insecure"
            );
        };
        let tls = load_identity(cert, key)?;
        let tokens = TokenTable::load(tokens_path)?;
        tracing::info!(
            actor_tokens = tokens.count(Role::Actor),
            learner_tokens = tokens.count(Role::Learner),
            status_tokens = tokens.count(Role::Status),
            "TLS on; bearer tokens required"
        );
        Ok(ServerSecurity {
            tls: Some(Arc::new(tls)),
            tokens: Some(tokens),
        })
    }

    /// No TLS, no authentication, without the flags (tests and in-process tools). Logs the
    /// same warning as `--insecure`.
    pub fn insecure() -> Self {
        Self::from_args(&ServerSecurityArgs {
            insecure: true,
            ..Default::default()
        })
        .expect("insecure settings are always valid")
    }

    /// Whether this server runs without TLS and authentication.
    pub fn is_insecure(&self) -> bool {
        self.tokens.is_none()
    }

    /// The TLS configuration for `Server::builder().tls_config(..)`; `None` when insecure.
    pub fn tls_config(&self) -> Option<ServerTlsConfig> {
        self.tls.as_ref().map(|pem| {
            ServerTlsConfig::new()
                .identity(Identity::from_pem(&pem.cert, &pem.key))
                .timeout(TLS_HANDSHAKE_TIMEOUT)
        })
    }

    /// The authorization layer with Hindsight's [`default_policy`].
    pub fn layer(&self) -> AuthLayer {
        self.layer_with_policy(default_policy)
    }

    /// The authorization layer with another access table.
    pub fn layer_with_policy(&self, policy: Policy) -> AuthLayer {
        match &self.tokens {
            Some(tokens) => AuthLayer::new(tokens.clone(), policy),
            None => AuthLayer::insecure(),
        }
    }

    /// `Server::builder()` with TLS (if on) and the authorization layer ([`default_policy`]);
    /// add services and serve as usual. Further builder settings may still be chained.
    pub fn server(&self) -> Result<SecureServer> {
        self.server_with_policy(default_policy)
    }

    /// [`ServerSecurity::server`] with another access table.
    pub fn server_with_policy(&self, policy: Policy) -> Result<SecureServer> {
        let mut builder = Server::builder();
        if let Some(tls) = self.tls_config() {
            builder = builder
                .tls_config(tls)
                .context("configuring the server's TLS")?;
        }
        Ok(builder.layer(self.layer_with_policy(policy)))
    }
}

/// Reads the certificate and key and checks, with rustls itself, that they make a usable
/// server identity (parseable, key matching the certificate), so that a wrong file is a
/// startup error rather than every handshake failing.
fn load_identity(cert_path: &Path, key_path: &Path) -> Result<TlsPem> {
    let cert = std::fs::read(cert_path)
        .with_context(|| format!("reading --tls-cert {}", cert_path.display()))?;
    let key = std::fs::read(key_path)
        .with_context(|| format!("reading --tls-key {}", key_path.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing --tls-cert {}", cert_path.display()))?;
    if chain.is_empty() {
        bail!(
            "--tls-cert {} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)",
            cert_path.display()
        );
    }
    let private_key = PrivateKeyDer::from_pem_slice(&key)
        .with_context(|| format!("--tls-key {} holds no PEM private key", key_path.display()))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("rustls protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .with_context(|| {
            format!(
                "--tls-key {} does not go with --tls-cert {}",
                key_path.display(),
                cert_path.display()
            )
        })?;
    Ok(TlsPem { cert, key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        security: ServerSecurityArgs,
    }

    fn err(args: ServerSecurityArgs) -> String {
        format!("{:#}", ServerSecurity::from_args(&args).unwrap_err())
    }

    fn p(s: &str) -> Option<PathBuf> {
        Some(PathBuf::from(s))
    }

    #[test]
    fn missing_flags_are_named_with_the_way_to_make_them() {
        let e = err(ServerSecurityArgs::default());
        assert!(
            e.contains("missing --tls-cert and --tls-key and --auth-tokens")
                && e.contains("hindsight certs")
                && e.contains("--insecure")
                && !e.contains('\n'),
            "{e}"
        );
        let e = err(ServerSecurityArgs {
            auth_tokens: p("t"),
            ..Default::default()
        });
        assert!(e.starts_with("missing --tls-cert and --tls-key:"), "{e}");
        let e = err(ServerSecurityArgs {
            tls_cert: p("c"),
            auth_tokens: p("t"),
            ..Default::default()
        });
        assert!(
            e.starts_with("--tls-cert needs --tls-key") && e.contains("hindsight certs"),
            "{e}"
        );
        let e = err(ServerSecurityArgs {
            tls_key: p("k"),
            ..Default::default()
        });
        assert!(e.starts_with("--tls-key needs --tls-cert"), "{e}");
        let e = err(ServerSecurityArgs {
            tls_cert: p("c"),
            tls_key: p("k"),
            ..Default::default()
        });
        assert!(
            e.starts_with("missing --auth-tokens") && e.contains("hindsight certs"),
            "{e}"
        );
        let e = err(ServerSecurityArgs {
            insecure: true,
            tls_cert: p("c"),
            auth_tokens: p("t"),
            ..Default::default()
        });
        assert!(
            e.contains("--insecure") && e.contains("--tls-cert and --auth-tokens are given"),
            "{e}"
        );
    }

    #[test]
    fn insecure_is_explicit_and_turns_everything_off() {
        let sec = ServerSecurity::from_args(&ServerSecurityArgs {
            insecure: true,
            ..Default::default()
        })
        .unwrap();
        assert!(sec.is_insecure());
        assert!(sec.tls_config().is_none());
        assert!(ServerSecurity::insecure().is_insecure());
    }

    #[test]
    fn bad_files_are_startup_errors_naming_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        crate::make_certs(dir.path(), &[], false).unwrap();
        let f = |name: &str| Some(dir.path().join(name));
        let good = ServerSecurityArgs {
            tls_cert: f(crate::SERVER_CERT_FILE),
            tls_key: f(crate::SERVER_KEY_FILE),
            auth_tokens: f(crate::TOKENS_FILE),
            insecure: false,
        };
        let sec = ServerSecurity::from_args(&good).unwrap();
        assert!(!sec.is_insecure() && sec.tls_config().is_some());

        // The CA's key is a valid key, but not the server certificate's.
        let e = err(ServerSecurityArgs {
            tls_key: f(crate::CA_KEY_FILE),
            ..good.clone()
        });
        assert!(e.contains("does not go with --tls-cert"), "{e}");
        // Key and certificate swapped.
        let e = err(ServerSecurityArgs {
            tls_cert: f(crate::SERVER_KEY_FILE),
            tls_key: f(crate::SERVER_CERT_FILE),
            ..good.clone()
        });
        assert!(
            e.contains("--tls-cert") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = err(ServerSecurityArgs {
            tls_cert: f("missing.pem"),
            ..good.clone()
        });
        assert!(
            e.contains("reading --tls-cert") && e.contains("missing.pem"),
            "{e}"
        );
        // A token file that is really a certificate.
        let e = err(ServerSecurityArgs {
            auth_tokens: f(crate::CA_CERT_FILE),
            ..good.clone()
        });
        assert!(e.contains("--auth-tokens") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn flags_and_environment_variables() {
        let cli = Cli::try_parse_from([
            "x",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--auth-tokens",
            "t.txt",
        ])
        .unwrap();
        assert_eq!(
            cli.security,
            ServerSecurityArgs {
                tls_cert: p("c.pem"),
                tls_key: p("k.pem"),
                auth_tokens: p("t.txt"),
                insecure: false,
            }
        );
        assert!(
            Cli::try_parse_from(["x", "--insecure"])
                .unwrap()
                .security
                .insecure
        );
        // Every flag names its HINDSIGHT_ variable in --help.
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for var in [
            "HINDSIGHT_TLS_CERT",
            "HINDSIGHT_TLS_KEY",
            "HINDSIGHT_AUTH_TOKENS",
            "HINDSIGHT_INSECURE",
        ] {
            assert!(help.contains(var), "{var} not in\n{help}");
        }
    }
}
