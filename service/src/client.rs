//! Client-side security: the CA to trust (`--tls-ca`), the server name to verify
//! (`--tls-domain`), this process's bearer token (`--token-file` / `--token`), and a channel
//! that retries while servers start.
//!
//! Whether a connection uses TLS follows the URL (`https://` or `http://`), and a mismatch
//! between URL and flags is an error up front, never a silent downgrade to plain text.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::tokens::check_token;

/// Time to establish one connection (TCP and TLS); a peer that never answers is a failed try.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 receive windows of every client channel (stream and connection).
const STREAM_WINDOW_BYTES: u32 = 32 * 1024 * 1024;

/// Security flags of a gRPC client.
#[derive(clap::Args, Clone, Default, PartialEq, Eq)]
pub struct ClientSecurityArgs {
    /// PEM CA certificate to trust for `https://` URLs; `hindsight certs` writes `ca.pem`.
    #[arg(long, env = "HINDSIGHT_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// File holding this process's bearer token (e.g. `actor.token` from `hindsight certs`).
    /// Wins over --token.
    #[arg(long, env = "HINDSIGHT_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// This process's bearer token. Prefer --token-file: a command line is visible to every
    /// user of the machine.
    #[arg(
        long,
        env = "HINDSIGHT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Server name to verify in the server's certificate, when it differs from the URL's host
    /// (e.g. connecting by IP address to a certificate made for a service name).
    #[arg(long, env = "HINDSIGHT_TLS_DOMAIN", value_name = "NAME")]
    pub tls_domain: Option<String>,
}

impl std::fmt::Debug for ClientSecurityArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSecurityArgs")
            .field("tls_ca", &self.tls_ca)
            .field("token_file", &self.token_file)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls_domain", &self.tls_domain)
            .finish()
    }
}

/// Adds `authorization: Bearer <token>` to every request when a token is configured.
#[derive(Clone, Default)]
pub struct TokenInterceptor {
    header: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for TokenInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = if self.header.is_some() {
            "<redacted>"
        } else {
            "none"
        };
        f.debug_struct("TokenInterceptor")
            .field("token", &token)
            .finish()
    }
}

impl TokenInterceptor {
    /// An interceptor sending `token`; refuses a token no server would accept.
    pub fn new(token: &str) -> Result<Self> {
        check_token(token)?;
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .context("token is not a valid header value")?;
        // Keeps the token out of HPACK's dynamic table and out of Debug output.
        value.set_sensitive(true);
        Ok(TokenInterceptor {
            header: Some(value),
        })
    }

    /// An interceptor that adds nothing (no token configured).
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether requests get a token.
    pub fn has_token(&self) -> bool {
        self.header.is_some()
    }
}

impl Interceptor for TokenInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel that sends the token with every call: `ReplayClient::new(channel)` or, with a
/// plain [`Channel`], `ReplayClient::with_interceptor(channel, security.interceptor())`.
pub type AuthChannel = InterceptedService<Channel, TokenInterceptor>;

/// A client's validated security settings.
#[derive(Clone, Debug, Default)]
pub struct ClientSecurity {
    ca: Option<Certificate>,
    domain: Option<String>,
    interceptor: TokenInterceptor,
}

impl ClientSecurity {
    /// Reads the CA and the token. Without any flag: plain `http://` and no token. Errors
    /// are [`crate::ConfigError`]s.
    pub fn from_args(args: &ClientSecurityArgs) -> Result<Self> {
        Self::from_args_inner(args).map_err(crate::ConfigError::wrap)
    }

    fn from_args_inner(args: &ClientSecurityArgs) -> Result<Self> {
        crate::install_crypto_provider();
        let ca = match &args.tls_ca {
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("reading --tls-ca {}", path.display()))?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    bail!("--tls-ca {} holds no PEM certificate", path.display());
                }
                Some(Certificate::from_pem(pem))
            }
            None => None,
        };
        let interceptor = match (&args.token_file, &args.token) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --token-file {}", path.display()))?;
                TokenInterceptor::new(text.trim())
                    .with_context(|| format!("in --token-file {}", path.display()))?
            }
            (None, Some(token)) => TokenInterceptor::new(token.trim()).context("in --token")?,
            (None, None) => TokenInterceptor::none(),
        };
        Ok(ClientSecurity {
            ca,
            domain: args.tls_domain.clone(),
            interceptor,
        })
    }

    /// No CA, no token: plain `http://` connections without credentials.
    pub fn plain() -> Self {
        Self::default()
    }

    /// The interceptor adding this client's token (a no-op without one).
    pub fn interceptor(&self) -> TokenInterceptor {
        self.interceptor.clone()
    }

    /// The endpoint for `url`, with TLS for `https://` (checked against the flags). Errors
    /// (a bad URL, a URL that does not fit the flags) are [`crate::ConfigError`]s.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint> {
        self.endpoint_inner(url).map_err(crate::ConfigError::wrap)
    }

    fn endpoint_inner(&self, url: &str) -> Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .with_context(|| format!("bad URL {url:?}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            // Large receive windows: a weight transfer (hundreds of MB) must not stall on
            // HTTP/2 flow control; small messages are unaffected.
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(STREAM_WINDOW_BYTES);
        match (endpoint.uri().scheme_str(), &self.ca) {
            (Some("https"), Some(ca)) => {
                let mut tls = ClientTlsConfig::new().ca_certificate(ca.clone());
                if let Some(domain) = &self.domain {
                    tls = tls.domain_name(domain.clone());
                }
                endpoint
                    .tls_config(tls)
                    .with_context(|| format!("configuring TLS for {url}"))
            }
            (Some("https"), None) => bail!(
                "{url} is https:// but no --tls-ca (HINDSIGHT_TLS_CA) is given: pass the CA \
                 that signed the server's certificate (`hindsight certs` writes ca.pem)"
            ),
            (Some("http"), Some(_)) => bail!(
                "--tls-ca is given but {url} is plain http://: use https:// URLs with --tls-ca"
            ),
            (Some("http"), None) => Ok(endpoint),
            _ => bail!("{url}: expected an http:// or https:// URL"),
        }
    }

    /// Opens a channel to `url`, retrying with exponential back-off (100 ms doubling to 2 s)
    /// for up to `attempts` tries so services may start in any order; each failed try is
    /// logged. A TLS failure (wrong CA, wrong name) is not retried: it will not fix itself.
    pub async fn connect(&self, url: &str, attempts: u32) -> Result<Channel> {
        let endpoint = self.endpoint(url)?;
        let mut delay = Duration::from_millis(100);
        let mut tried = 0;
        loop {
            tried += 1;
            match endpoint.connect().await {
                Ok(channel) => return Ok(channel),
                Err(e) => {
                    if let Some(tls) = tls_error(&e) {
                        return Err(tls_failure(url, tls));
                    }
                    if tried >= attempts.max(1) {
                        return Err(anyhow::Error::new(e)
                            .context(format!("connecting to {url} ({tried} tries)")));
                    }
                    tracing::warn!(error = %DisplayChain(&e), url, "not reachable yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// [`ClientSecurity::connect`], returning a channel that adds the token to every call.
    pub async fn connect_authed(&self, url: &str, attempts: u32) -> Result<AuthChannel> {
        let channel = self.connect(url, attempts).await?;
        Ok(InterceptedService::new(channel, self.interceptor()))
    }
}

/// The rustls error behind a connection error, if the TLS handshake is what failed.
fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut source: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // tokio-rustls wraps the rustls error in an io::Error, whose `source()` skips it.
        if let Some(tls) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        source = err.source();
    }
    None
}

/// A failed handshake, with a hint at the usual cause. Not retried: a wrong CA, a wrong name
/// or a server without TLS will not fix itself while we wait.
fn tls_failure(url: &str, e: &rustls::Error) -> anyhow::Error {
    let hint = match e {
        rustls::Error::InvalidCertificate(_) => {
            "is --tls-ca the CA that signed the server's certificate, and is the URL's host \
             (or --tls-domain) one of the names it was made for?"
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the server does not seem to speak TLS: if it runs with --insecure, use an \
             http:// URL"
        }
        _ => "check --tls-ca and the server's --tls-cert",
    };
    // The rustls error itself is the source (tonic's wrapper only repeats it).
    anyhow::Error::new(e.clone()).context(format!("TLS handshake with {url} failed ({hint})"))
}

/// An error with its sources, `a: b: c`, for log fields (tonic's own Display says only
/// "transport error").
struct DisplayChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        security: ClientSecurityArgs,
    }

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn token_file_wins_over_token_and_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("actor.token");
        std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
        let sec = ClientSecurity::from_args(&ClientSecurityArgs {
            token_file: Some(file),
            token: Some("ignored-because-the-file-wins".into()),
            ..Default::default()
        })
        .unwrap();
        let mut i = sec.interceptor();
        let req = i.call(tonic::Request::new(())).unwrap();
        let value = req.metadata().get("authorization").unwrap();
        assert_eq!(value.to_str().unwrap(), format!("Bearer {TOKEN}"));
        assert!(value.is_sensitive());

        let sec = ClientSecurity::from_args(&ClientSecurityArgs {
            token: Some(TOKEN.into()),
            ..Default::default()
        })
        .unwrap();
        let req = sec.interceptor().call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_some());

        let req = ClientSecurity::plain()
            .interceptor()
            .call(tonic::Request::new(()))
            .unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }

    #[test]
    fn bad_tokens_and_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.token");
        std::fs::write(&empty, "\n").unwrap();
        let e = |args: ClientSecurityArgs| {
            format!("{:#}", ClientSecurity::from_args(&args).unwrap_err())
        };
        let msg = e(ClientSecurityArgs {
            token_file: Some(empty),
            ..Default::default()
        });
        assert!(
            msg.contains("--token-file") && msg.contains("token is empty"),
            "{msg}"
        );
        let msg = e(ClientSecurityArgs {
            token: Some("short".into()),
            ..Default::default()
        });
        assert!(
            msg.contains("--token") && msg.contains("at least 16"),
            "{msg}"
        );
        let msg = e(ClientSecurityArgs {
            tls_ca: Some(dir.path().join("nope.pem")),
            ..Default::default()
        });
        assert!(
            msg.contains("reading --tls-ca") && msg.contains("nope.pem"),
            "{msg}"
        );
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let msg = e(ClientSecurityArgs {
            tls_ca: Some(not_pem),
            ..Default::default()
        });
        assert!(msg.contains("no PEM certificate"), "{msg}");
    }

    #[test]
    fn url_scheme_must_match_the_tls_flags() {
        let dir = tempfile::tempdir().unwrap();
        crate::make_certs(dir.path(), &[], false).unwrap();
        let with_ca = ClientSecurity::from_args(&ClientSecurityArgs {
            tls_ca: Some(dir.path().join(crate::CA_CERT_FILE)),
            ..Default::default()
        })
        .unwrap();
        let plain = ClientSecurity::plain();
        assert!(with_ca.endpoint("https://localhost:1").is_ok());
        assert!(plain.endpoint("http://localhost:1").is_ok());
        let msg = format!("{:#}", with_ca.endpoint("http://localhost:1").unwrap_err());
        assert!(msg.contains("use https:// URLs with --tls-ca"), "{msg}");
        let msg = format!("{:#}", plain.endpoint("https://localhost:1").unwrap_err());
        assert!(
            msg.contains("no --tls-ca") && msg.contains("ca.pem"),
            "{msg}"
        );
        let msg = format!("{:#}", plain.endpoint("localhost:1").unwrap_err());
        assert!(msg.contains("http://"), "{msg}");
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let args = ClientSecurityArgs {
            token: Some(TOKEN.into()),
            ..Default::default()
        };
        let sec = ClientSecurity::from_args(&args).unwrap();
        for shown in [format!("{args:?}"), format!("{sec:?}")] {
            assert!(!shown.contains(TOKEN), "{shown}");
        }
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for var in [
            "HINDSIGHT_TLS_CA",
            "HINDSIGHT_TOKEN_FILE",
            "HINDSIGHT_TOKEN",
            "HINDSIGHT_TLS_DOMAIN",
        ] {
            assert!(help.contains(var), "{var} not in\n{help}");
        }
    }
}
