//! Dead-letter operations behind `trialflow dlq list|show|replay`.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use trialflow_outbox::KafkaConfig;
use trialflow_outbox::kafka::{ReadMessage, TopicReader};

use crate::error::ConsumerError;
use crate::store::dlq_headers as h;

/// One dead letter, as `dlq list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetterEntry {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub consumer: Option<String>,
    pub error_class: Option<String>,
    pub reason: Option<String>,
    pub original_topic: Option<String>,
    pub original_partition: Option<String>,
    pub original_offset: Option<String>,
    pub attempts: Option<String>,
    pub first_failure_at: Option<String>,
    pub payload_bytes: usize,
}

impl From<&ReadMessage> for DeadLetterEntry {
    fn from(m: &ReadMessage) -> Self {
        let get = |name: &str| m.header(name).map(str::to_string);
        Self {
            partition: m.partition,
            offset: m.offset,
            key: m.key.clone(),
            event_id: get("event_id"),
            event_type: get("event_type"),
            consumer: get(h::CONSUMER),
            error_class: get(h::ERROR_CLASS),
            reason: get(h::REASON),
            original_topic: get(h::ORIGINAL_TOPIC),
            original_partition: get(h::ORIGINAL_PARTITION),
            original_offset: get(h::ORIGINAL_OFFSET),
            attempts: get(h::ATTEMPTS),
            first_failure_at: get(h::FIRST_FAILURE_AT),
            payload_bytes: m.payload.len(),
        }
    }
}

/// Every dead letter currently on `dlq_topic`.
pub async fn list(kafka: &KafkaConfig, dlq_topic: &str) -> Result<Vec<ReadMessage>, ConsumerError> {
    Ok(TopicReader::new(kafka, dlq_topic, true)?
        .read_until_idle(Duration::from_secs(2), Duration::from_secs(60))
        .await?)
}

/// The dead letter at `partition`/`offset` of `dlq_topic`.
pub async fn show(
    kafka: &KafkaConfig,
    dlq_topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<ReadMessage>, ConsumerError> {
    let found = TopicReader::at(kafka, dlq_topic, partition, offset)?
        .read_until(Duration::from_secs(10), |m| !m.is_empty())
        .await?;
    Ok(found.into_iter().find(|m| m.offset == offset && m.partition == partition))
}

/// Where a replayed message went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Produces the dead letter at `partition`/`offset` again to its original topic: same key,
/// payload and headers (its original `event_id`, so consumers still deduplicate), without the
/// `dlq.*` headers, plus `replayed_from`.
pub async fn replay(
    kafka: &KafkaConfig,
    dlq_topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<Replayed>, ConsumerError> {
    let Some(letter) = show(kafka, dlq_topic, partition, offset).await? else { return Ok(None) };
    let Some(target) = letter.header(h::ORIGINAL_TOPIC).map(str::to_string) else { return Ok(None) };
    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(kafka, "trialflow-dlq-replay").create()?;
    let replayed_from = format!("{dlq_topic}/{partition}/{offset}");
    let mut headers = OwnedHeaders::new();
    for (k, v) in letter.raw_headers.iter().filter(|(k, _)| !k.starts_with(h::PREFIX)) {
        headers = headers.insert(Header { key: k, value: Some(v.as_slice()) });
    }
    headers = headers.insert(Header { key: "replayed_from", value: Some(replayed_from.as_bytes()) });
    // Byte for byte: the original key (or none), payload and headers.
    let mut record = FutureRecord::<[u8], [u8]>::to(&target).payload(&letter.payload).headers(headers);
    if let Some(key) = &letter.raw_key {
        record = record.key(key.as_slice());
    }
    let delivery = producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    Ok(Some(Replayed { topic: target, partition: delivery.partition, offset: delivery.offset }))
}
