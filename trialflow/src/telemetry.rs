//! Logs, traces and metrics, set up once for every subcommand.

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Args, ValueEnum};
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
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

    /// Address of the Prometheus `/metrics` endpoint and the `/healthz` and `/readyz` probes; empty
    /// disables them.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9464", global = true)]
    pub metrics_addr: String,
}

/// Flushes spans on drop.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports every span ended so far (the batch exporter otherwise sends every few seconds).
    pub fn force_flush(&self) -> anyhow::Result<()> {
        match &self.provider {
            Some(provider) => provider.force_flush().context("flushing spans to the OTLP endpoint"),
            None => Ok(()),
        }
    }
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

/// Which spans are exported over OTLP, whatever `RUST_LOG` says: trialflow's spans are at INFO.
pub const SPAN_FILTER: &str = "info";

/// Installs the tracing subscriber (filter from `RUST_LOG`, default `default_filter`), the OTLP
/// span exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OTLP over HTTP; the standard `OTEL_*`
/// variables apply), and the Prometheus endpoint.
pub fn init(
    config: &TelemetryConfig,
    service: &'static str,
    default_filter: &str,
) -> anyhow::Result<TelemetryGuard> {
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => Some(otlp_provider(service, None)?),
        _ => None,
    };
    let guard = install_subscriber(config, default_filter, provider)?;
    install_metrics(&config.metrics_addr)?;
    Ok(guard)
}

/// Like [`init`], with spans exported over OTLP/HTTP to `traces_url`, the full URL of the
/// collector's traces endpoint (e.g. `http://127.0.0.1:4318/v1/traces`), whatever the
/// environment says: for tests and benchmarks that receive the spans in-process.
pub fn init_with_otlp_endpoint(
    config: &TelemetryConfig,
    service: &'static str,
    default_filter: &str,
    traces_url: &str,
) -> anyhow::Result<TelemetryGuard> {
    let provider = otlp_provider(service, Some(traces_url))?;
    let guard = install_subscriber(config, default_filter, Some(provider))?;
    install_metrics(&config.metrics_addr)?;
    Ok(guard)
}

fn install_subscriber(
    config: &TelemetryConfig,
    default_filter: &str,
    provider: Option<SdkTracerProvider>,
) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = match config.log_format {
        LogFormat::Human => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    // Spans have a filter of their own: quieter logs (`RUST_LOG=warn`) must not end the traces.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("trialflow"))
            .with_filter(EnvFilter::new(SPAN_FILTER))
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .try_init()
        .context("installing the tracing subscriber")?;
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
    }
    Ok(TelemetryGuard { provider })
}

/// The span pipeline: batches exported over OTLP/HTTP (protobuf) to `traces_url`, or where the
/// standard `OTEL_EXPORTER_OTLP_*` variables say.
fn otlp_provider(service: &'static str, traces_url: Option<&str>) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(url) = traces_url {
        builder = builder.with_endpoint(url);
    }
    let exporter =
        builder.build().context("building the OTLP span exporter (check OTEL_EXPORTER_OTLP_ENDPOINT)")?;
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
