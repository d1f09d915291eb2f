//! Logs, metrics and probes for every role: `tracing` (human-readable or JSON lines), the one
//! Prometheus recorder, and the small HTTP server of the metrics port, which answers
//!
//! - `GET /metrics`: the Prometheus text page;
//! - `GET /healthz`: 200 while the process is alive (it answers at all);
//! - `GET /readyz`: 200 when the process is ready, 503 with the reason otherwise (the
//!   readiness the roles set through `hindsight_service::set_ready` / `set_not_ready`).
//!
//! It serves from the moment a process starts. The service crates only *record* series
//! through the `metrics` facade; histogram buckets (`buckets.rs`) and the process-wide
//! series (`process.rs`: build info, start time, memory, CPU) are added here.

pub mod buckets;
pub mod process;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, EnvFilter};

/// Output format of the logs (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines with span fields (role, actor id, step).
    Text,
    /// One JSON object per line, for log shippers on clusters.
    Json,
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides `level`.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{level},h2=warn,tower=warn,hyper=warn,tonic=warn"))
    });
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// The Prometheus recorder's settings, in one place: every series is labelled with the
/// process's role, and histograms get explicit buckets (so they add up across processes).
pub fn prometheus_builder(role: &str) -> Result<PrometheusBuilder> {
    buckets::with_buckets(PrometheusBuilder::new().add_global_label("role", role))
}

/// How often the recorder's upkeep (histogram bucket maintenance) runs.
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the global Prometheus recorder and serves `/metrics`, `/healthz` and `/readyz`
/// on `addr`. A port that cannot be bound is an error (a configuration error: the address).
pub async fn init_metrics(addr: SocketAddr, role: &str) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics port --metrics-addr {addr}"))
        .map_err(hindsight_service::ConfigError::wrap)?;
    let handle = prometheus_builder(role)?
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP).await;
            upkeep.run_upkeep();
        }
    });
    process::start();
    let local = listener.local_addr()?;
    tokio::spawn(serve_http(listener, handle));
    tracing::info!(addr = %local, "serving /metrics, /healthz and /readyz");
    Ok(local)
}

/// Answers HTTP/1 requests on `listener` until the process exits.
pub async fn serve_http(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "metrics port: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = respond(&req, &handle);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A scraper that hangs up mid-request is not worth a log line.
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The answer to one request.
fn respond<B>(req: &Request<B>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, handle.render());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match hindsight_service::readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found (this port serves /metrics, /healthz and /readyz)\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (code, body)
    }

    /// The probes and the metrics page over a real socket. (Readiness is process-wide:
    /// this is the one test of this binary's unit tests that changes it.)
    #[tokio::test]
    async fn metrics_and_probes_over_http() {
        let recorder = prometheus_builder("test").unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("hindsight_test_things_total").increment(3);
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_http(listener, handle));

        let (code, body) = get(addr, "GET", "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            body.contains("hindsight_test_things_total{role=\"test\"} 3"),
            "{body}"
        );
        assert_eq!(get(addr, "GET", "/healthz").await, (200, "ok\n".into()));
        hindsight_service::set_not_ready("starting");
        assert_eq!(
            get(addr, "GET", "/readyz").await,
            (503, "not ready: starting\n".into())
        );
        hindsight_service::set_ready();
        assert_eq!(get(addr, "GET", "/readyz").await, (200, "ready\n".into()));
        hindsight_service::set_not_ready("draining");
        assert_eq!(
            get(addr, "GET", "/readyz").await,
            (503, "not ready: draining\n".into())
        );
        assert_eq!(get(addr, "GET", "/nope").await.0, 404);
        assert_eq!(get(addr, "POST", "/metrics").await.0, 405);
    }
}
