//! Logs and metrics for every role: `tracing` (human-readable or JSON lines) and the one
//! Prometheus exporter, which serves `/metrics` on `--metrics-addr` from the moment a process
//! starts. The service crates only *record* series through the `metrics` facade; histogram
//! buckets (`buckets.rs`) and the process-wide series (`process.rs`: build info, start time,
//! memory, CPU) are added here.

pub mod buckets;
pub mod process;

use std::net::SocketAddr;

use anyhow::{Context, Result};
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

/// Starts the Prometheus exporter's HTTP listener on `addr` (serves `/metrics`), labelling
/// every series with the process's role.
pub fn init_metrics(addr: SocketAddr, role: &str) -> Result<()> {
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .add_global_label("role", role);
    buckets::with_buckets(builder)?
        .install()
        .with_context(|| format!("starting the Prometheus exporter on {addr}"))?;
    process::start();
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    Ok(())
}
