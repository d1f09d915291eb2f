//! `hindsight health ADDR`: one probe, exit code 0 when the target is serving / ready and 1
//! otherwise, with one line saying which. It is the container `HEALTHCHECK` (an image
//! without a shell or curl), so it is quick and bounded by `--timeout-ms`.
//!
//! - `http(s)://host:port` of a gRPC server: the standard `grpc.health.v1.Health/Check`
//!   (`--service NAME`, default the whole server), over TLS with `--tls-ca` for `https://`;
//!   no token needed.
//! - `--http host:port`, or a URL with a path (`http://host:9101/readyz`): HTTP `GET` of the
//!   metrics port's `/readyz` (or the path given).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// What to ask: a gRPC server URL (`http://host:50051`, `https://...`), or with --http a
    /// metrics port (`host:9101`, `http://host:9101`, `http://host:9101/readyz`).
    #[arg(required_unless_present = "local")]
    pub addr: Option<String>,
    /// Ask this machine's own process (a container's HEALTHCHECK): `/readyz` on 127.0.0.1 at
    /// the port of HINDSIGHT_METRICS_ADDR, or, when that is not set, at the roles' default
    /// metrics ports (9101, 9102, 9103, 9104; the first that answers decides).
    #[arg(long, env = "HINDSIGHT_LOCAL", conflicts_with = "addr")]
    pub local: bool,
    /// Ask the HTTP `/readyz` of a metrics port instead of the gRPC health service.
    #[arg(long, env = "HINDSIGHT_HTTP")]
    pub http: bool,
    /// gRPC service to ask about (e.g. `hindsight.v1.Replay`); empty = the whole server.
    #[arg(long, env = "HINDSIGHT_SERVICE", default_value = "")]
    pub service: String,
    /// Give up (exit 1) after this many milliseconds.
    #[arg(long, env = "HINDSIGHT_TIMEOUT_MS", default_value_t = 2000)]
    pub timeout_ms: u64,
    /// TLS trust for `https://` gRPC URLs (health needs no token).
    #[command(flatten)]
    pub security: hindsight_service::ClientSecurityArgs,
}

/// Whether `addr` names an HTTP endpoint rather than a gRPC server: `--http`, or a URL with
/// a path.
fn is_http(args: &HealthArgs) -> bool {
    if args.http || args.local {
        return true;
    }
    let addr = args.addr.as_deref().unwrap_or_default();
    let rest = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    rest.split_once('/')
        .is_some_and(|(_, path)| !path.is_empty())
}

/// Runs the probe: `Ok(true)` serving / ready, `Ok(false)` not (the line says why); `Err`
/// for a configuration error (bad flags), which the caller reports with exit code 2.
pub async fn run(mut args: HealthArgs) -> Result<bool> {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    if args.local {
        args.addr = Some(local_target()?);
    }
    let addr = args.addr.clone().unwrap_or_default();
    let http = is_http(&args);
    let what = if http {
        "HTTP readiness"
    } else {
        "gRPC health"
    };
    let probe = async {
        if http {
            http_ready(&addr).await
        } else {
            grpc_serving(&args).await
        }
    };
    let outcome = match tokio::time::timeout(timeout, probe).await {
        Ok(r) => r,
        Err(_) => Ok(Err(format!("no answer within {} ms", args.timeout_ms))),
    };
    match outcome? {
        Ok(line) => {
            println!("{addr}: {line}");
            Ok(true)
        }
        Err(why) => {
            eprintln!("{addr}: {what}: {why}");
            Ok(false)
        }
    }
}

/// The `--local` target: this machine's metrics port from HINDSIGHT_METRICS_ADDR, else the
/// first default role port that accepts a connection.
fn local_target() -> Result<String> {
    if let Ok(addr) = std::env::var("HINDSIGHT_METRICS_ADDR") {
        let port = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .with_context(|| format!("HINDSIGHT_METRICS_ADDR={addr:?}: no port"))
            .map_err(hindsight_service::ConfigError::wrap)?;
        return Ok(format!("127.0.0.1:{port}"));
    }
    for port in [
        crate::REPLAY_METRICS_PORT,
        crate::LEARNER_METRICS_PORT,
        crate::ACTOR_METRICS_PORT,
        crate::EVALUATOR_METRICS_PORT,
    ] {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(addr.to_string());
        }
    }
    Ok(format!("127.0.0.1:{}", crate::REPLAY_METRICS_PORT))
}

/// `Ok(Ok(line))` serving, `Ok(Err(why))` not serving or unreachable, `Err` bad flags.
async fn grpc_serving(args: &HealthArgs) -> Result<Result<String, String>> {
    let url = args.addr.clone().unwrap_or_default();
    let security = hindsight_service::ClientSecurity::from_args(&args.security)?;
    // Validates the URL against the flags before anything is dialled.
    security.endpoint(&url)?;
    let channel = match security.connect(&url, 1).await {
        Ok(c) => c,
        Err(e) => return Ok(Err(format!("unreachable: {e:#}"))),
    };
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await;
    let service = if args.service.is_empty() {
        "server".to_string()
    } else {
        format!("service {}", args.service)
    };
    Ok(match answer {
        Ok(r) => match r.into_inner().status() {
            ServingStatus::Serving => Ok(format!("SERVING ({service})")),
            other => Err(format!("{} ({service})", other.as_str_name())),
        },
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    })
}

/// Host, port and path of an HTTP probe target (`host:port`, `http://host:port[/path]`).
fn http_target(addr: &str) -> Result<(String, String)> {
    if addr.starts_with("https://") {
        bail!("{addr}: the metrics port speaks plain HTTP; use http://");
    }
    let rest = addr.strip_prefix("http://").unwrap_or(addr);
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) if !p.is_empty() => (h, format!("/{p}")),
        Some((h, _)) => (h, "/readyz".to_string()),
        None => (rest, "/readyz".to_string()),
    };
    let Some((_, port)) = host.rsplit_once(':') else {
        bail!("{addr}: expected HOST:PORT (e.g. 127.0.0.1:9101)");
    };
    port.parse::<u16>()
        .with_context(|| format!("{addr}: bad port {port:?}"))?;
    Ok((host.to_string(), path))
}

/// `GET` of the probe path: 200 is ready, anything else is not (with the body's first line).
async fn http_ready(addr: &str) -> Result<Result<String, String>> {
    let (host, path) = http_target(addr).map_err(hindsight_service::ConfigError::wrap)?;
    let mut stream = match tokio::net::TcpStream::connect(&host).await {
        Ok(s) => s,
        Err(e) => return Ok(Err(format!("unreachable: {e}"))),
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return Ok(Err(format!("sending the request: {e}")));
    }
    let mut response = Vec::new();
    // A probe answer is a few bytes; a page that never ends is cut at 64 KiB.
    if let Err(e) = (&mut stream)
        .take(64 * 1024)
        .read_to_end(&mut response)
        .await
    {
        return Ok(Err(format!("reading the answer: {e}")));
    }
    let response = String::from_utf8_lossy(&response);
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    Ok(match code {
        Some(200) => Ok(format!("{path}: 200 {body}")),
        Some(c) => Err(format!("{path}: {c} {body}")),
        None => Err(format!("{path}: not an HTTP answer")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            http_target("127.0.0.1:9101").unwrap(),
            ("127.0.0.1:9101".into(), "/readyz".into())
        );
        assert_eq!(
            http_target("http://replay:9101/healthz").unwrap(),
            ("replay:9101".into(), "/healthz".into())
        );
        assert_eq!(
            http_target("http://replay:9101/").unwrap(),
            ("replay:9101".into(), "/readyz".into())
        );
        assert!(http_target("replay").is_err());
        assert!(http_target("replay:x").is_err());
        assert!(http_target("https://replay:9101").is_err());
    }

    #[test]
    fn http_mode_follows_the_flag_or_a_path() {
        let a = |addr: &str, http: bool| HealthArgs {
            addr: Some(addr.into()),
            local: false,
            http,
            service: String::new(),
            timeout_ms: 1,
            security: Default::default(),
        };
        assert!(!is_http(&a("http://127.0.0.1:50051", false)));
        assert!(!is_http(&a("https://replay:50051/", false)));
        assert!(is_http(&a("http://127.0.0.1:9101/readyz", false)));
        assert!(is_http(&a("127.0.0.1:9101", true)));
    }
}
