//! W3C trace context across the outbox and Kafka: how one trace follows an event from the request
//! that wrote it, through the relay and the broker, to the consumers that apply it.
//!
//! * The writer stores the `traceparent` of the current span with each outbox row.
//! * The relay's `publish <topic>` span is a child of that stored context, and the record's
//!   `traceparent` header names the publish span.
//! * A consumer's `process <topic>` span is a child of the header's context; what it writes to its
//!   own outbox inherits it, so the next hop continues the same trace.
//!
//! The span names and attributes follow the OpenTelemetry messaging semantic conventions as of
//! semconv v1.27.0 ([`semconv`]). Everything here is a no-op unless the process exports spans
//! (a `tracing-opentelemetry` layer is installed): then no span has a valid context, no
//! `traceparent` is written, and a stored one is passed through unchanged.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Attribute names and values of the OpenTelemetry semantic conventions (v1.27.0) that trialflow's
/// spans use, in one place.
pub mod semconv {
    pub const MESSAGING_SYSTEM: &str = "messaging.system";
    /// Always `kafka`.
    pub const KAFKA: &str = "kafka";
    pub const OPERATION_TYPE: &str = "messaging.operation.type";
    pub const OPERATION_NAME: &str = "messaging.operation.name";
    pub const DESTINATION_NAME: &str = "messaging.destination.name";
    pub const PARTITION_ID: &str = "messaging.destination.partition.id";
    pub const MESSAGE_ID: &str = "messaging.message.id";
    pub const KAFKA_MESSAGE_KEY: &str = "messaging.kafka.message.key";
    pub const KAFKA_OFFSET: &str = "messaging.kafka.offset";
    pub const CONSUMER_GROUP: &str = "messaging.consumer.group.name";
    pub const CLIENT_ID: &str = "messaging.client.id";
    pub const ERROR_TYPE: &str = "error.type";
}

/// The W3C `traceparent` of the current span, if tracing exports to OpenTelemetry.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The W3C `traceparent` naming `span`, if tracing exports to OpenTelemetry. This starts the
/// OpenTelemetry span: set its parent ([`continue_trace`]) before.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span = context.span();
    let sc = span.span_context();
    sc.is_valid().then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// Parses a W3C `traceparent` (`version-traceid-parentid-flags`, lowercase hex) into a remote span
/// context. Versions other than `00` are read by their first four fields, as the recommendation
/// asks; `ff`, all-zero ids and malformed values give `None`.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex =
        |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !lower_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !(lower_hex(trace_id, 32) && lower_hex(span_id, 16) && lower_hex(flags, 2)) {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

/// Makes `span` a child of the trace `traceparent` names. Call it before the span is first
/// entered; a missing or malformed value leaves the span where it is (a new trace, or the child
/// of the current span). Returns whether the parent was set.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) -> bool {
    let Some(remote) = traceparent.and_then(parse_traceparent) else { return false };
    span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_parsed_as_the_recommendation_says() {
        let sc = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let sc = sc.expect("a valid traceparent");
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        let unsampled = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert!(unsampled.is_some_and(|sc| !sc.is_sampled()));
        // A later version may append fields.
        assert!(parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }
}
