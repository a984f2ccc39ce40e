//! Part of a benchmark under a subscriber, beside the same work without one: a runtime of its own
//! whose threads have the subscriber `trialflow` installs — its log layer (`info,sqlx=warn`,
//! written to nowhere here) and, with spans, the OpenTelemetry layer (batched, OTLP/HTTP
//! protobuf, as when `OTEL_EXPORTER_OTLP_ENDPOINT` is set) exporting to a receiver in this
//! process that decodes and counts the spans. The rest of the process keeps no subscriber, so
//! the other figures are untouched.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer};

thread_local! {
    /// The traced runtime's subscriber, as the default of each of its threads while it lives.
    static DEFAULT: RefCell<Option<tracing::dispatcher::DefaultGuard>> = const { RefCell::new(None) };
}

/// What the runtime's threads are subscribed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Subscriber {
    /// The log layer only: `trialflow` without `OTEL_EXPORTER_OTLP_ENDPOINT`.
    Logs,
    /// Logs and spans exported: `trialflow` with `OTEL_EXPORTER_OTLP_ENDPOINT`.
    LogsAndSpans,
}

/// Runs `work` on a runtime subscribed with `subscriber`; its result and how many spans the
/// receiver got.
pub(crate) async fn run<F, Fut, T>(subscriber: Subscriber, work: F) -> anyhow::Result<(T, u64)>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    let stop = CancellationToken::new();
    let (url, spans) = receiver(stop.clone()).await?;
    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<T> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url)
            .build()
            .context("building the OTLP span exporter")?;
        let resource = opentelemetry_sdk::Resource::builder().with_service_name("trialflow-bench").build();
        let provider =
            SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(EnvFilter::new("info,sqlx=warn"));
        let spans = (subscriber == Subscriber::LogsAndSpans).then(|| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("trialflow"))
                .with_filter(EnvFilter::new("info"))
        });
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(logs).with(spans));
        let each_thread = dispatch.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .on_thread_start(move || {
                DEFAULT.with(|d| *d.borrow_mut() = Some(tracing::dispatcher::set_default(&each_thread)));
            })
            .on_thread_stop(|| DEFAULT.with(|d| drop(d.borrow_mut().take())))
            .build()
            .context("starting the traced runtime")?;
        let result = {
            let _default = tracing::dispatcher::set_default(&dispatch);
            runtime.block_on(work())
        };
        drop(runtime);
        provider.force_flush().context("flushing the spans")?;
        provider.shutdown().context("stopping the span exporter")?;
        result
    })
    .await??;
    stop.cancel();
    Ok((result, spans.load(Ordering::Relaxed)))
}

/// An OTLP/HTTP traces endpoint on a free port that counts the spans it is sent.
async fn receiver(stop: CancellationToken) -> anyhow::Result<(String, Arc<AtomicU64>)> {
    let spans = Arc::new(AtomicU64::new(0));
    let count = spans.clone();
    let url = trialflow_testkit::otlp::receiver(stop, move |request| {
        let n: usize =
            request.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        count.fetch_add(n as u64, Ordering::Relaxed);
    })
    .await?;
    Ok((url, spans))
}
