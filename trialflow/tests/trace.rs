//! One trace, end to end: a vital sign produced by the "EDC" raises an alert that a researcher's
//! webhook is subscribed to, and one trace id connects every hop, each span the child of the one
//! before, following the W3C `traceparent` through Kafka headers and the outbox:
//!
//! ```text
//! publish <clinical topic>        EDC producer (the record's traceparent header)
//! └ process <clinical topic>      monitoring consumer (its outbox row stores this context)
//!   └ publish <alerts topic>      the relay publishing AlertRaised (the record's header)
//!     └ process <alerts topic>    notifier consumer (the delivery row stores this context)
//!       └ deliver notification    the delivery worker's attempt
//!         └ POST                  the webhook request, which carries the traceparent
//! ```
//!
//! The spans are exported the way production exports them: `trialflow::telemetry` with its OTLP
//! exporter (HTTP, protobuf), here pointed at a receiver in this test. A process installs one
//! global subscriber, hence a test binary of its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio_util::sync::CancellationToken;
use trialflow::telemetry::{self, LogFormat, TelemetryConfig};
use trialflow_consumers::notifier::config::parse_subscriptions;
use trialflow_consumers::{monitoring, notifier};
use trialflow_pipeline::{Pipeline, PipelineConfig};
use trialflow_schemas::topics;
use trialflow_schemas::{Envelope, PartialDateTime, Timestamp, VitalSignRecorded};
use trialflow_simulation::edc::EdcPublisher;
use trialflow_testkit::{database_url, kafka, wait_until};

const WAIT: Duration = Duration::from_secs(120);

/// The spans an in-process OTLP/HTTP receiver got, with their service names.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// Serves `POST /v1/traces` (OTLP/HTTP, protobuf) on a free port; its URL and what it receives.
async fn otlp_receiver(stop: CancellationToken) -> anyhow::Result<(String, Received)> {
    let received: Received = Arc::default();
    let sink = received.clone();
    let url = trialflow_testkit::otlp::receiver(stop, move |request| {
        let mut spans = sink.lock().unwrap_or_else(|e| e.into_inner());
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(AnyValue::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
    })
    .await?;
    Ok((url, received))
}

/// A researcher's webhook: the `traceparent` header of each request it gets.
async fn webhook(stop: CancellationToken) -> anyhow::Result<(String, Arc<Mutex<Vec<Option<String>>>>)> {
    let received: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let sink = received.clone();
    let url = trialflow_testkit::webhook::receiver(stop, move |headers, _| {
        let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string);
        sink.lock().unwrap_or_else(|e| e.into_inner()).push(traceparent);
    })
    .await?;
    Ok((url, received))
}

/// A heart rate of 140/min: the default rule book's tachycardia alert.
fn vital(study: &str, subject: &str) -> VitalSignRecorded {
    let now = chrono::Utc::now();
    let mut envelope = Envelope::new("VitalSignRecorded", study, "edc", Timestamp::from(now));
    envelope.subject_id = Some(subject.to_string());
    envelope.site_id = Some("701".into());
    VitalSignRecorded {
        envelope,
        observation_id: uuid::Uuid::new_v4().to_string(),
        loinc_code: "8867-4".into(),
        value: 140.0,
        unit: "/min".into(),
        position: None,
        effective: PartialDateTime::parse(&now.format("%Y-%m-%dT%H:%M:%S").to_string()),
        visit: Some("DAY 1".into()),
        visit_day: Some(1),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(i) => i.to_string(),
        AnyValue::BoolValue(b) => b.to_string(),
        AnyValue::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

/// The one span of `trace` named `name` whose parent is `parent`, with `kind`.
fn child<'a>(spans: &'a [Span], parent: &Span, name: &str, kind: SpanKind) -> anyhow::Result<&'a Span> {
    child_where(spans, parent, name, kind, |_| true)
}

/// The one span of consumer group `group` named `name` under `parent`, with `kind`: a topic
/// several groups read has one `process` span per group under the record's `publish` span.
fn child_of_group<'a>(
    spans: &'a [Span],
    parent: &Span,
    name: &str,
    kind: SpanKind,
    group: &str,
) -> anyhow::Result<&'a Span> {
    child_where(spans, parent, name, kind, |s| {
        attribute(s, "messaging.consumer.group.name").as_deref() == Some(group)
    })
}

fn child_where<'a>(
    spans: &'a [Span],
    parent: &Span,
    name: &str,
    kind: SpanKind,
    also: impl Fn(&Span) -> bool,
) -> anyhow::Result<&'a Span> {
    let found: Vec<&Span> =
        spans.iter().filter(|s| s.name == name && s.parent_span_id == parent.span_id && also(s)).collect();
    match found.as_slice() {
        [one] => {
            anyhow::ensure!(one.kind == kind as i32, "span `{name}` is of kind {} not {kind:?}", one.kind);
            Ok(one)
        }
        [] => anyhow::bail!("no span `{name}` under `{}` ({})", parent.name, hex(&parent.span_id)),
        more => anyhow::bail!("{} spans `{name}` under `{}`", more.len(), parent.name),
    }
}

fn assert_attributes(span: &Span, expected: &[(&str, &str)]) {
    for (key, value) in expected {
        assert_eq!(attribute(span, key).as_deref(), Some(*value), "`{}`'s {key}", span.name);
    }
}

/// The spans of `trace` as an indented tree, for the test's output.
fn tree(spans: &[Span]) -> String {
    fn walk(spans: &[Span], parent: &[u8], depth: usize, out: &mut String) {
        let mut children: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id == parent).collect();
        children.sort_by_key(|s| s.start_time_unix_nano);
        for s in children {
            let kind = SpanKind::try_from(s.kind).map(|k| k.as_str_name()).unwrap_or("?");
            out.push_str(&format!("{}{} [{kind}] {}\n", "  ".repeat(depth), s.name, hex(&s.span_id)));
            walk(spans, &s.span_id, depth + 1, out);
        }
    }
    let ids: std::collections::HashSet<&[u8]> = spans.iter().map(|s| s.span_id.as_slice()).collect();
    let mut out = String::new();
    let mut roots: Vec<&Span> = spans.iter().filter(|s| !ids.contains(s.parent_span_id.as_slice())).collect();
    roots.sort_by_key(|s| s.start_time_unix_nano);
    for root in roots {
        let kind = SpanKind::try_from(root.kind).map(|k| k.as_str_name()).unwrap_or("?");
        out.push_str(&format!("{} [{kind}] {}\n", root.name, hex(&root.span_id)));
        walk(spans, &root.span_id, 1, &mut out);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_connects_a_vital_sign_to_the_webhook_it_raises() -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let (traces_url, exported) = otlp_receiver(stop.clone()).await?;
    let logs = TelemetryConfig { log_format: LogFormat::Human, metrics_addr: String::new() };
    let telemetry = telemetry::init_with_otlp_endpoint(&logs, "trialflow", "warn", &traces_url)?;
    let (hook_url, hooks) = webhook(stop.clone()).await?;

    let mut config = PipelineConfig::isolated("trace", &database_url(), &kafka())?;
    let subscriptions = format!(
        r#"[{{"recipient_id": "dr-trace", "study_id": "TRACE", "min_severity": "INFO",
             "channel": "webhook", "url": "{hook_url}", "secret": "trace-secret"}}]"#
    );
    config.settings.notifier.subscriptions = parse_subscriptions(&subscriptions, "the trace test")?;
    let names = config.topics.clone();
    let clinical = names.name(topics::CLINICAL_OBSERVATIONS);
    let alerts = names.name(topics::ALERTS);
    let shutdown = CancellationToken::new();
    let pipeline = Pipeline::start(config, &shutdown).await?;

    let edc = EdcPublisher::new(&kafka(), names.clone())?;
    let delivery = edc.send(&vital("TRACE", "701-0001"))?.context("the EDC producer's queue is empty")?;
    delivery.await?.map_err(|(e, _)| e)?;
    wait_until("the webhook is called", WAIT, || {
        let called = !hooks.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
        async move { Ok(called) }
    })
    .await?;
    let traceparent = hooks.lock().unwrap_or_else(|e| e.into_inner())[0].clone();
    let traceparent = traceparent.context("the webhook request carries no traceparent")?;
    let parts: Vec<&str> = traceparent.split('-').collect();
    anyhow::ensure!(parts.len() == 4 && parts[0] == "00", "traceparent `{traceparent}` is not W3C");
    let (trace_id, webhook_parent) = (parts[1].to_string(), parts[2].to_string());

    // Spans are exported when they end: the client span once the answer is read, a moment after
    // the webhook saw the request, the delivery's span once the outcome is recorded. Flush until
    // the chain from the client span up to a root is whole (an exported span is final).
    let trace = |exported: &Received| -> Vec<Span> {
        let spans = exported.lock().unwrap_or_else(|e| e.into_inner());
        spans.iter().filter(|(_, s)| hex(&s.trace_id) == trace_id).map(|(_, s)| s.clone()).collect()
    };
    let chain_is_whole = |spans: &[Span]| {
        let mut id = webhook_parent.clone();
        loop {
            let Some(span) = spans.iter().find(|s| hex(&s.span_id) == id) else { return false };
            if span.parent_span_id.is_empty() {
                return true;
            }
            id = hex(&span.parent_span_id);
        }
    };
    wait_until("the trace's spans are exported", WAIT, || {
        let flushed = tokio::task::block_in_place(|| telemetry.force_flush());
        let whole = chain_is_whole(&trace(&exported));
        async move { flushed.map(|()| whole) }
    })
    .await?;
    let spans = trace(&exported);
    println!("trace {trace_id}:\n{}", tree(&spans));
    assert!(
        exported.lock().unwrap_or_else(|e| e.into_inner()).iter().all(|(service, _)| service == "trialflow"),
        "spans carry the service name"
    );

    let monitoring_group = format!("{}{}", names.prefix(), monitoring::NAME);
    let notifier_group = format!("{}{}", names.prefix(), notifier::NAME);
    // The EDC's publish span starts the trace.
    let ingest = spans
        .iter()
        .find(|s| s.name == format!("publish {clinical}") && s.parent_span_id.is_empty())
        .with_context(|| format!("no root `publish {clinical}` span in:\n{}", tree(&spans)))?;
    assert_eq!(ingest.kind, SpanKind::Producer as i32);
    assert_attributes(
        ingest,
        &[
            ("messaging.system", "kafka"),
            ("messaging.operation.type", "publish"),
            ("messaging.destination.name", &clinical),
            ("messaging.kafka.message.key", "701-0001"),
        ],
    );
    // Monitoring and the risk service both read the clinical topic: one `process` span each.
    let monitored = child_of_group(
        &spans,
        ingest,
        &format!("process {clinical}"),
        SpanKind::Consumer,
        &monitoring_group,
    )?;
    assert_attributes(
        monitored,
        &[
            ("messaging.system", "kafka"),
            ("messaging.operation.type", "process"),
            ("messaging.destination.name", &clinical),
            ("messaging.consumer.group.name", &monitoring_group),
            ("messaging.kafka.message.key", "701-0001"),
        ],
    );
    assert!(attribute(monitored, "messaging.kafka.offset").is_some(), "the offset is recorded");
    let relayed = child(&spans, monitored, &format!("publish {alerts}"), SpanKind::Producer)?;
    assert_attributes(
        relayed,
        &[
            ("messaging.system", "kafka"),
            ("messaging.operation.type", "publish"),
            ("messaging.destination.name", &alerts),
            ("event_type", "AlertRaised"),
        ],
    );
    assert!(attribute(relayed, "messaging.kafka.offset").is_some(), "the acknowledged offset is recorded");
    let notified = child(&spans, relayed, &format!("process {alerts}"), SpanKind::Consumer)?;
    assert_attributes(
        notified,
        &[("messaging.operation.type", "process"), ("messaging.consumer.group.name", &notifier_group)],
    );
    let delivered = child(&spans, notified, "deliver notification", SpanKind::Internal)?;
    assert_attributes(delivered, &[("outcome", "delivered"), ("recipient_id", "dr-trace")]);
    let posted = child(&spans, delivered, "POST", SpanKind::Client)?;
    assert_attributes(
        posted,
        &[
            ("http.request.method", "POST"),
            ("server.address", "127.0.0.1"),
            ("url.full", &hook_url),
            ("http.response.status_code", "200"),
        ],
    );
    assert_eq!(hex(&posted.span_id), webhook_parent, "the webhook request names its client span");

    pipeline.stop().await?;
    // The receiver outlives the exporter's last flush (on drop).
    tokio::task::block_in_place(|| drop(telemetry));
    stop.cancel();
    Ok(())
}
