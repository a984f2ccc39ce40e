//! The Kafka side of the relay: an idempotent producer and the mapping of rows to records.

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::config::KafkaConfig;
use crate::error::{OutboxError, Result};
use crate::store::OutboxRow;
use crate::trace::semconv;

/// Kafka header names set on every published event.
pub mod headers {
    pub const EVENT_ID: &str = "event_id";
    pub const EVENT_TYPE: &str = "event_type";
    pub const TRACEPARENT: &str = "traceparent";
    pub const CONTENT_TYPE: &str = "content-type";
}

/// The largest record the relay's producer sends (librdkafka's `message.max.bytes`): room for a
/// dead letter of a 1 MiB message with its `dlq.*` headers. Brokers enforce their own per-topic
/// limit; a record they refuse is quarantined (see the relay), never retried forever.
pub const MAX_RECORD_BYTES: usize = 2 * 1024 * 1024;

/// librdkafka settings shared by every trialflow producer: idempotent (no duplicates or reordering
/// from the producer's own retries) and Java-compatible key partitioning (murmur2), so clients in
/// other languages find a key on the same partition.
/// The user's `KAFKA_CONFIG` and `KAFKA_PRODUCER_CONFIG` come on top ([`KafkaConfig::producer`]).
pub fn producer_config(kafka: &KafkaConfig, client_id: &str) -> ClientConfig {
    kafka.producer(client_id, |config| {
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", kafka.linger_ms.to_string())
            .set("message.timeout.ms", kafka.delivery_timeout_ms.to_string())
            .set("message.max.bytes", MAX_RECORD_BYTES.to_string());
    })
}

/// Builds the idempotent producer the relay publishes with.
pub fn build_producer(kafka: &KafkaConfig) -> Result<FutureProducer> {
    producer_config(kafka, RELAY_CLIENT_ID).create().map_err(OutboxError::KafkaConfig)
}

/// Whose fault a failed delivery is: what the relay does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The broker refuses this row for good (or refuses its topic for good): retrying cannot
    /// succeed. The row is quarantined and only the later rows of its key wait; everything else
    /// flows on.
    Row,
    /// The broker or the network (down, timeouts, leader changes), or a setting that concerns every
    /// row alike: the session fails and starts again after a backoff, as for any outage.
    Transient,
}

/// Classifies a failed delivery, reported either at hand-off (`send_result`, librdkafka's local
/// checks) or in the delivery report.
///
/// Row faults are the codes that name *this record or its topic* and that librdkafka itself gives
/// up on (it retries the others internally before reporting them):
/// * `MessageSizeTooLarge` — over the producer's `message.max.bytes` (refused at hand-off) or the
///   topic's `max.message.bytes` (refused by the broker). librdkafka closes a batch at
///   `batch.size` (1 MB), below Kafka's default topic limit, so an oversized record travels alone
///   and small batch mates are not refused with it; a topic limit below `batch.size` could take
///   batch mates along, and those come back with `retry`.
/// * `MessageBatchTooLarge` (RECORD_LIST_TOO_LARGE), `InvalidMessageSize`, `InvalidRecord` (e.g. a
///   keyless record on a compacted topic), `PolicyViolation`, `UnsupportedForMessageFormat`: the
///   broker's verdict on the record itself.
/// * `TopicAuthorizationFailed`, `InvalidTopic`: the topic is off limits or cannot exist.
/// * `UnknownTopicOrPartition`, `UnknownTopic`, `UnknownPartition`: the topic does not exist.
///   librdkafka reports these only once the metadata still says so after
///   `topic.metadata.propagation.max.ms` (a produce response saying it is retried after a
///   metadata refresh), so what arrives here has persisted — a `.dlq` topic nobody provisioned on
///   a cluster with auto-creation off.
///
/// Deliberately transient: `InvalidRequiredAcks` and `ClusterAuthorizationFailed` refuse the
/// producer's settings or identity, not a row — quarantining would empty the whole outbox into the
/// quarantine; they fail the session (visible in `trialflow_outbox_errors_total`) until fixed.
/// `MessageTimedOut` (only with `KAFKA_DELIVERY_TIMEOUT_MS` > 0) is an outage. Errors that are not
/// Kafka error codes (a cancelled delivery, a dropped producer) are transient too.
pub fn classify(error: &KafkaError) -> Fault {
    use RDKafkaErrorCode as C;
    let KafkaError::MessageProduction(code) = error else { return Fault::Transient };
    match code {
        C::MessageSizeTooLarge
        | C::MessageBatchTooLarge
        | C::InvalidMessageSize
        | C::InvalidRecord
        | C::PolicyViolation
        | C::UnsupportedForMessageFormat
        | C::TopicAuthorizationFailed
        | C::InvalidTopic
        | C::UnknownTopicOrPartition
        | C::UnknownTopic
        | C::UnknownPartition => Fault::Row,
        _ => Fault::Transient,
    }
}

/// Why a row could not be handed to the producer.
#[derive(Debug)]
pub enum SendError {
    /// The local queue is full: wait for acknowledgements, then try again.
    QueueFull,
    /// Anything else: see [`classify`] on the `Delivery` error's source.
    Failed(OutboxError),
}

/// The `publish <topic>` span of one traced row, from its hand-off to the producer to the broker's
/// acknowledgement (dropped then, which ends it). A child of the context the writer stored with
/// the row; the record's `traceparent` header names this span, so the consumers' spans are its
/// children. Rows written without a trace context get no span (so a relay that does not export
/// spans costs nothing per row), and where the relay does not export spans the stored
/// `traceparent` is passed on unchanged.
#[derive(Debug, Default)]
pub struct PublishSpan {
    span: Option<tracing::Span>,
    traceparent: Option<String>,
}

impl PublishSpan {
    /// The span for `row`, made once per row (not per send attempt: a full queue retries).
    pub fn of(row: &OutboxRow) -> Self {
        let Some(stored) = row.traceparent.as_deref() else { return Self::default() };
        if row.raw_header_names.is_some() {
            // Raw records (dead letters, replays) carry their headers byte for byte.
            return Self::default();
        }
        let span = tracing::info_span!(
            "publish",
            otel.name = format!("publish {}", row.topic),
            otel.kind = "producer",
            otel.status_code = tracing::field::Empty,
            { semconv::MESSAGING_SYSTEM } = semconv::KAFKA,
            { semconv::OPERATION_TYPE } = "publish",
            { semconv::OPERATION_NAME } = "publish",
            { semconv::DESTINATION_NAME } = %row.topic,
            { semconv::KAFKA_MESSAGE_KEY } = %row.key,
            { semconv::MESSAGE_ID } = %row.event_id,
            { semconv::CLIENT_ID } = RELAY_CLIENT_ID,
            { semconv::PARTITION_ID } = tracing::field::Empty,
            { semconv::KAFKA_OFFSET } = tracing::field::Empty,
            { semconv::ERROR_TYPE } = tracing::field::Empty,
            "outbox.seq" = row.seq,
            "event_type" = %row.event_type,
        );
        crate::trace::continue_trace(&span, Some(stored));
        let traceparent = crate::trace::traceparent_of(&span).or_else(|| Some(stored.to_string()));
        Self { span: Some(span), traceparent }
    }

    /// The broker acknowledged the record at `partition` / `offset`.
    pub fn acknowledged(&mut self, partition: i32, offset: i64) {
        if let Some(span) = self.span.take() {
            span.record(semconv::PARTITION_ID, tracing::field::display(partition));
            span.record(semconv::KAFKA_OFFSET, offset);
        }
    }

    /// The delivery failed (refused for good, or transiently: the row is published again, under a
    /// new span of the same parent).
    pub fn failed(&mut self, error: &KafkaError) {
        if let Some(span) = self.span.take() {
            span.record("otel.status_code", "ERROR");
            let kind = match error {
                KafkaError::MessageProduction(code) => format!("{code:?}"),
                other => format!("{other}"),
            };
            span.record(semconv::ERROR_TYPE, kind.as_str());
        }
    }
}

/// The relay producer's `client.id`.
pub const RELAY_CLIENT_ID: &str = "trialflow-relay";

/// Hands `row` to the producer; the returned future resolves on broker acknowledgement. The
/// record's `traceparent` is `span`'s.
pub fn send(
    producer: &FutureProducer,
    row: &OutboxRow,
    span: &PublishSpan,
) -> Result<DeliveryFuture, SendError> {
    if let (Some(names), Some(values)) = (&row.raw_header_names, &row.raw_header_values) {
        return send_raw(producer, row, names, values);
    }
    let event_id = row.event_id.to_string();
    let mut headers = OwnedHeaders::new_with_capacity(4 + row.headers.len())
        .insert(Header { key: headers::EVENT_ID, value: Some(event_id.as_bytes()) })
        .insert(Header { key: headers::EVENT_TYPE, value: Some(row.event_type.as_bytes()) })
        .insert(Header { key: headers::CONTENT_TYPE, value: Some(row.content_type.as_bytes()) });
    if let Some(tp) = span.traceparent.as_deref().or(row.traceparent.as_deref()) {
        headers = headers.insert(Header { key: headers::TRACEPARENT, value: Some(tp.as_bytes()) });
    }
    for (key, value) in row.headers.iter() {
        headers = headers.insert(Header { key: key.as_str(), value: Some(value.as_bytes()) });
    }
    let record = FutureRecord::to(&row.topic).key(&row.key).payload(&row.payload).headers(headers);
    producer.send_result(record).map_err(|(e, _)| send_error(row, e))
}

/// A raw row: its key bytes (or none) and its headers exactly as stored. Header names are text
/// in librdkafka; a name that is not UTF-8 is sent with its invalid bytes replaced.
fn send_raw(
    producer: &FutureProducer,
    row: &OutboxRow,
    names: &[Vec<u8>],
    values: &[Vec<u8>],
) -> Result<DeliveryFuture, SendError> {
    let names: Vec<std::borrow::Cow<'_, str>> = names.iter().map(|n| String::from_utf8_lossy(n)).collect();
    let mut headers = OwnedHeaders::new_with_capacity(names.len());
    for (name, value) in names.iter().zip(values) {
        headers = headers.insert(Header { key: name, value: Some(value.as_slice()) });
    }
    let mut record = FutureRecord::<[u8], [u8]>::to(&row.topic).payload(&row.payload).headers(headers);
    if let Some(key) = &row.key_bytes {
        record = record.key(key.as_slice());
    }
    producer.send_result(record).map_err(|(e, _)| send_error(row, e))
}

fn send_error(row: &OutboxRow, e: KafkaError) -> SendError {
    match e {
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => SendError::QueueFull,
        source => SendError::Failed(OutboxError::Delivery { seq: row.seq, topic: row.topic.clone(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_errors_are_classified_row_or_transient() {
        use RDKafkaErrorCode as C;
        let table = [
            // The record or its topic, for good: quarantine the row.
            (C::MessageSizeTooLarge, Fault::Row),
            (C::MessageBatchTooLarge, Fault::Row),
            (C::InvalidMessageSize, Fault::Row),
            (C::InvalidRecord, Fault::Row),
            (C::PolicyViolation, Fault::Row),
            (C::UnsupportedForMessageFormat, Fault::Row),
            (C::TopicAuthorizationFailed, Fault::Row),
            (C::InvalidTopic, Fault::Row),
            (C::UnknownTopicOrPartition, Fault::Row),
            (C::UnknownTopic, Fault::Row),
            (C::UnknownPartition, Fault::Row),
            // The producer's settings or identity: every row alike, never a row's fault.
            (C::InvalidRequiredAcks, Fault::Transient),
            (C::ClusterAuthorizationFailed, Fault::Transient),
            // Outages and what librdkafka retries.
            (C::BrokerNotAvailable, Fault::Transient),
            (C::NotLeaderForPartition, Fault::Transient),
            (C::RequestTimedOut, Fault::Transient),
            (C::MessageTimedOut, Fault::Transient),
            (C::NotEnoughReplicas, Fault::Transient),
            (C::NotEnoughReplicasAfterAppend, Fault::Transient),
            (C::BrokerTransportFailure, Fault::Transient),
            (C::AllBrokersDown, Fault::Transient),
            (C::InvalidMessage, Fault::Transient),
            (C::QueueFull, Fault::Transient),
            (C::Fatal, Fault::Transient),
        ];
        for (code, fault) in table {
            assert_eq!(classify(&KafkaError::MessageProduction(code)), fault, "{code:?}");
        }
        assert_eq!(classify(&KafkaError::Canceled), Fault::Transient, "no code: transient");
    }
}
