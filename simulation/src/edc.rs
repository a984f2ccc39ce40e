//! An upstream EDC: publishes clinical records (vital signs, adverse events) straight to their
//! topics, as an external system integrated over Kafka would — no outbox of ours in between (the
//! EDC's own database is its source of truth). The record carries the producer's event id, so a
//! re-sent record is one the consumers already know.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use trialflow_outbox::KafkaConfig;
use trialflow_outbox::publisher::{headers, producer_config};
use trialflow_outbox::trace::semconv;
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{CONTENT_TYPE, CodecError, Event};

/// `client.id` of the EDC producer.
pub const CLIENT_ID: &str = "trialflow-edc";
/// How long a record may wait for the broker's acknowledgement unless configured otherwise.
pub const DEFAULT_DELIVERY_TIMEOUT_MS: u64 = 30_000;

#[derive(Debug, thiserror::Error)]
pub enum EdcError {
    #[error("creating the EDC producer: {0}")]
    Producer(KafkaError),
    #[error("encoding {0}")]
    Encode(#[from] CodecError),
    #[error("the event has no subject id to key it by")]
    NoKey,
    #[error("producing: {0}")]
    Produce(KafkaError),
}

/// Produces events to their topics, keyed by subject (the consumers' ordering unit).
pub struct EdcPublisher {
    producer: FutureProducer,
    topics: TopicNames,
}

impl std::fmt::Debug for EdcPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdcPublisher").field("topics", &self.topics).finish_non_exhaustive()
    }
}

impl EdcPublisher {
    /// An idempotent producer (`acks=all`): the broker keeps each record once and per subject in
    /// order, whatever librdkafka retries. Unlike the relay it gives up on a record after
    /// `KAFKA_DELIVERY_TIMEOUT_MS`, or [`DEFAULT_DELIVERY_TIMEOUT_MS`] when that is 0 (never): an
    /// upstream system reports the failure (its own store still has the record) rather than wait.
    pub fn new(kafka: &KafkaConfig, topics: TopicNames) -> Result<Self, EdcError> {
        let mut config = producer_config(kafka, CLIENT_ID);
        if kafka.delivery_timeout_ms == 0 {
            config.set("message.timeout.ms", DEFAULT_DELIVERY_TIMEOUT_MS.to_string());
        }
        let producer = config.create().map_err(EdcError::Producer)?;
        Ok(Self { producer, topics })
    }

    /// Hands `event` to the producer; the future resolves when the broker acknowledged it. When
    /// the local queue is full, returns `Ok(None)`: await earlier deliveries, then send again.
    ///
    /// Traced as a `publish <topic>` producer span (a child of the caller's current span, if
    /// any) covering the hand-off, whose `traceparent` the record carries: where a trace of the
    /// pipeline starts when the data comes from the EDC.
    pub fn send<E: Event>(&self, event: &E) -> Result<Option<DeliveryFuture>, EdcError> {
        let envelope = event.envelope();
        let key = envelope.subject_id.as_deref().ok_or(EdcError::NoKey)?;
        let payload = trialflow_schemas::encode(event)?;
        let event_id = envelope.event_id.to_string();
        let topic = self.topics.of::<E>();
        let span = tracing::info_span!(
            "publish",
            otel.name = format!("publish {topic}"),
            otel.kind = "producer",
            { semconv::MESSAGING_SYSTEM } = semconv::KAFKA,
            { semconv::OPERATION_TYPE } = "publish",
            { semconv::OPERATION_NAME } = "publish",
            { semconv::DESTINATION_NAME } = %topic,
            { semconv::KAFKA_MESSAGE_KEY } = key,
            { semconv::MESSAGE_ID } = %event_id,
            { semconv::CLIENT_ID } = CLIENT_ID,
        );
        let traceparent = trialflow_outbox::trace::traceparent_of(&span);
        let _entered = span.enter();
        let mut record_headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header { key: headers::EVENT_ID, value: Some(event_id.as_bytes()) })
            .insert(Header { key: headers::EVENT_TYPE, value: Some(E::NAME) })
            .insert(Header { key: headers::CONTENT_TYPE, value: Some(CONTENT_TYPE) });
        if let Some(traceparent) = &traceparent {
            record_headers = record_headers
                .insert(Header { key: headers::TRACEPARENT, value: Some(traceparent.as_bytes()) });
        }
        let record = FutureRecord::to(&topic).key(key).payload(&payload).headers(record_headers);
        match self.producer.send_result(record) {
            Ok(delivery) => Ok(Some(delivery)),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => Ok(None),
            Err((e, _)) => Err(EdcError::Produce(e)),
        }
    }
}
