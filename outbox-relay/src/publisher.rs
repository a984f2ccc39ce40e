//! The Kafka side of the relay: an idempotent producer and the mapping of rows to records.

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::config::KafkaConfig;
use crate::error::{OutboxError, Result};
use crate::store::OutboxRow;

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
pub fn producer_config(kafka: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", kafka.linger_ms.to_string())
        .set("message.timeout.ms", kafka.delivery_timeout_ms.to_string())
        .set("message.max.bytes", MAX_RECORD_BYTES.to_string());
    for (key, value) in &kafka.producer_config {
        config.set(key, value);
    }
    config
}

/// Builds the idempotent producer the relay publishes with.
pub fn build_producer(kafka: &KafkaConfig) -> Result<FutureProducer> {
    producer_config(kafka, "trialflow-relay").create().map_err(OutboxError::KafkaConfig)
}

/// Why a row could not be handed to the producer.
#[derive(Debug)]
pub enum SendError {
    /// The local queue is full: wait for acknowledgements, then try again.
    QueueFull,
    /// Anything else: the batch fails and is retried from the outbox.
    Failed(OutboxError),
}

/// Hands `row` to the producer; the returned future resolves on broker acknowledgement.
pub fn send(producer: &FutureProducer, row: &OutboxRow) -> Result<DeliveryFuture, SendError> {
    if let (Some(names), Some(values)) = (&row.raw_header_names, &row.raw_header_values) {
        return send_raw(producer, row, names, values);
    }
    let event_id = row.event_id.to_string();
    let mut headers = OwnedHeaders::new_with_capacity(4 + row.headers.len())
        .insert(Header { key: headers::EVENT_ID, value: Some(event_id.as_bytes()) })
        .insert(Header { key: headers::EVENT_TYPE, value: Some(row.event_type.as_bytes()) })
        .insert(Header { key: headers::CONTENT_TYPE, value: Some(row.content_type.as_bytes()) });
    if let Some(tp) = &row.traceparent {
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
