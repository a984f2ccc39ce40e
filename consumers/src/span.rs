//! The consumer's `process <topic>` span: one per message a handler applies, a child of the
//! context in the message's `traceparent` header (the relay's `publish` span, or an upstream
//! producer's). Everything the handler writes to its outbox runs inside it, so the events it
//! causes carry the same trace to the next hop.
//!
//! Parent/child rather than span links: a batch is one transaction, but each message is handled on
//! its own inside it, so each gets its own span under its own producer's context; the batch
//! itself (inbox insert, commit) has no span. A batch that is rolled back and retried shows its
//! messages' spans once per attempt (the failed ones with `otel.status_code=ERROR`).

use tracing::field::Empty;
use trialflow_outbox::publisher::headers;
use trialflow_outbox::trace::{continue_trace, semconv};

use crate::error::HandlerError;
use crate::handler::Message;

/// The span `group`'s handling of `msg` runs in.
pub(crate) fn process(group: &str, msg: &Message) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = format!("process {}", msg.topic),
        otel.kind = "consumer",
        otel.status_code = Empty,
        { semconv::MESSAGING_SYSTEM } = semconv::KAFKA,
        { semconv::OPERATION_TYPE } = "process",
        { semconv::OPERATION_NAME } = "process",
        { semconv::DESTINATION_NAME } = %msg.topic,
        { semconv::PARTITION_ID } = %msg.partition,
        { semconv::KAFKA_OFFSET } = msg.offset,
        { semconv::CONSUMER_GROUP } = group,
        { semconv::KAFKA_MESSAGE_KEY } = Empty,
        { semconv::MESSAGE_ID } = Empty,
        { semconv::ERROR_TYPE } = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    // Keys that are not text are left out, as the conventions ask.
    if let Some(key) = msg.key_str() {
        span.record(semconv::KAFKA_MESSAGE_KEY, key);
    }
    if let Some(id) = msg.header_str(headers::EVENT_ID) {
        span.record(semconv::MESSAGE_ID, id);
    }
    continue_trace(&span, msg.header_str(headers::TRACEPARENT));
    span
}

/// Marks `span` failed with the error's class (`transient`, `permanent`); a message parked for a
/// dependency (`not_yet`) has not failed.
pub(crate) fn failed(span: &tracing::Span, error: &HandlerError) {
    if matches!(error, HandlerError::NotYet { .. }) {
        return;
    }
    span.record("otel.status_code", "ERROR");
    span.record(semconv::ERROR_TYPE, error.class());
}
