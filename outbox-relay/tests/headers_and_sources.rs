//! What a published event carries (key, headers, trace context), and one relay serving several
//! outbox sources.

use std::collections::BTreeMap;
use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TracerProvider};
use tracing::Instrument;
use tracing::instrument::WithSubscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use trialflow_outbox::kafka::TopicReader;
use trialflow_outbox::{Outbox, OutboxEvent, RelayConfig};
use trialflow_testkit::{RunningRelay, TestService, kafka, wait_until};
use uuid::Uuid;

#[tokio::test]
async fn published_event_carries_key_headers_and_the_writers_traceparent() -> anyhow::Result<()> {
    let svc = TestService::new(Some(&kafka()), 2).await?;
    let outbox = Outbox::open(&svc.pool, svc.schema.clone()).await?;
    let event = OutboxEvent {
        topic: svc.topic.clone(),
        key: "subject-7".to_string(),
        event_type: "SubjectScreened".to_string(),
        event_id: Uuid::now_v7(),
        content_type: "application/json".to_string(),
        payload: br#"{"ok":true}"#.to_vec(),
        headers: BTreeMap::from([("study".to_string(), "CDISCPILOT01".to_string())]),
    };

    // The writer runs inside a span of an OpenTelemetry-enabled subscriber, as a request
    // handler would.
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let (pool, outbox2, event2) = (svc.pool.clone(), outbox.clone(), event.clone());
    let trace_id = async move {
        let span = tracing::info_span!("screen_subject");
        let trace_id = span.context().span().span_context().trace_id().to_string();
        async move {
            let mut tx = pool.begin().await?;
            outbox2.enqueue(&mut tx, event2).await?;
            tx.commit().await?;
            Ok::<_, anyhow::Error>(trace_id)
        }
        .instrument(span)
        .await
    }
    .with_subscriber(subscriber)
    .await?;

    let relay = RunningRelay::start(svc.relay_config(&kafka()));
    let messages = TopicReader::new(&kafka(), &svc.topic, true)?
        .read_until(Duration::from_secs(30), |m| !m.is_empty())
        .await?;
    relay.stop().await?;
    let m = &messages[0];
    assert_eq!(m.key, "subject-7");
    assert_eq!(m.payload, event.payload);
    assert_eq!(m.header("event_id"), Some(event.event_id.to_string().as_str()));
    assert_eq!(m.header("event_type"), Some("SubjectScreened"));
    assert_eq!(m.header("content-type"), Some("application/json"));
    assert_eq!(m.header("study"), Some("CDISCPILOT01"));
    let traceparent = m.header("traceparent").unwrap_or_default();
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")) && traceparent.len() == 55,
        "traceparent {traceparent:?} does not carry trace {trace_id}"
    );
    Ok(())
}

#[tokio::test]
async fn one_relay_serves_several_sources() -> anyhow::Result<()> {
    let first = TestService::new(Some(&kafka()), 2).await?;
    let second = TestService::new(Some(&kafka()), 2).await?;
    let config = RelayConfig {
        sources: vec![first.schema.clone(), second.schema.clone()],
        ..first.relay_config(&kafka())
    };
    let relay = RunningRelay::start(config);
    for svc in [&first, &second] {
        svc.workload.record("subject-1", 1, 120.0).await?;
        svc.workload.record("subject-1", 2, 121.0).await?;
    }
    for svc in [&first, &second] {
        wait_until("both outboxes drained", Duration::from_secs(30), || async {
            Ok(svc.outbox_len().await? == 0)
        })
        .await?;
        let messages = TopicReader::new(&kafka(), &svc.topic, true)?
            .read_until(Duration::from_secs(30), |m| m.len() >= 2)
            .await?;
        assert_eq!(messages.len(), 2);
    }
    relay.stop().await
}
