//! Logs, traces and metrics, set up once for every subcommand.

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Args, ValueEnum};
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Telemetry settings shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct TelemetryConfig {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,

    /// Address of the Prometheus `/metrics` endpoint; empty disables it.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9464", global = true)]
    pub metrics_addr: String,
}

/// Flushes spans on drop.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// The log filter when `RUST_LOG` is not set.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn";

/// Installs the tracing subscriber (filter from `RUST_LOG`, default `default_filter`), the OTLP
/// span exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OTLP over HTTP; the standard `OTEL_*`
/// variables apply), and the Prometheus endpoint.
pub fn init(
    config: &TelemetryConfig,
    service: &'static str,
    default_filter: &str,
) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => Some(otlp_provider(service)?),
        _ => None,
    };
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("trialflow")));
    let (human, json) = match config.log_format {
        LogFormat::Human => (Some(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)), None),
        LogFormat::Json => (None, Some(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr))),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(human)
        .with(json)
        .with(otel)
        .try_init()
        .context("installing the tracing subscriber")?;
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
    }
    install_metrics(&config.metrics_addr)?;
    Ok(TelemetryGuard { provider })
}

fn otlp_provider(service: &'static str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .context("building the OTLP span exporter (check OTEL_EXPORTER_OTLP_ENDPOINT)")?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// How often histograms are compacted when nobody scrapes.
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves, on `addr` (empty: nothing), `GET /metrics` (Prometheus), `GET /healthz` (liveness:
/// the process answers) and `GET /readyz` (readiness: every long-running component of the
/// process is working and reaches its database, see `trialflow_outbox::health`; 503 with each
/// component's reason otherwise). The listener is bound here, so a taken port fails the start.
fn install_metrics(addr: &str) -> anyhow::Result<()> {
    use axum::routing::get;
    if addr.trim().is_empty() {
        return Ok(());
    }
    let addr: SocketAddr = addr.parse().with_context(|| format!("METRICS_ADDR `{addr}` is not host:port"))?;
    let taken = || {
        format!(
            "serving metrics and probes on {addr} (set METRICS_ADDR to another port, or empty to disable)"
        )
    };
    let listener = std::net::TcpListener::bind(addr).with_context(taken)?;
    listener.set_nonblocking(true).with_context(taken)?;
    let listener = tokio::net::TcpListener::from_std(listener).with_context(taken)?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(METRICS_UPKEEP).await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(readiness));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "The metrics and probes endpoint stopped.");
        }
    });
    Ok(())
}

/// `GET /readyz`: 200 when every component is ready, else 503; each component with its reason.
async fn readiness() -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let states = trialflow_outbox::health::check().await;
    let ready = states.values().all(Option::is_none);
    let components: serde_json::Map<String, serde_json::Value> = states
        .into_iter()
        .map(|(name, why)| (name, why.map_or(serde_json::json!("ready"), serde_json::Value::from)))
        .collect();
    let status = if ready { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(serde_json::json!({"ready": ready, "components": components})))
}
