//! The Kafka side of the gateway: one idempotent producer, one record per submission, and the
//! wait for the broker's acknowledgement that the 202 depends on.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use trialflow_http::ApiError;
use trialflow_outbox::publisher::headers;
use trialflow_schemas::{CONTENT_TYPE, CodecError, Event, QuestionnaireResponseSubmitted};

use super::config::EproGatewayConfig;
use super::{ACK_SECONDS, RECEIVED_AT_HEADER};

/// `client.id` of the gateway's producer.
pub const CLIENT_ID: &str = "trialflow-epro-gateway";

/// The most the producer queues locally (librdkafka `queue.buffering.max.kbytes`) unless
/// `KAFKA_CONFIG` or `KAFKA_PRODUCER_CONFIG` says otherwise. Beyond it a submission is answered 503 at once: while
/// the broker is slow or away, the gateway sheds load instead of growing its memory (librdkafka's
/// own default is 1 GiB).
pub const MAX_QUEUED_KBYTES: u64 = 64 * 1024;

/// How much longer than `message.timeout.ms` a request waits for librdkafka's verdict: it checks
/// for expired messages about once a second, so its answer can come that much late.
const ACK_GRACE: Duration = Duration::from_millis(1_500);

/// The producer settings of the gateway: the idempotent settings every trialflow producer uses
/// (`acks=all`, murmur2 partitioning), with `message.timeout.ms` = the ack timeout, so a message
/// librdkafka gives up on is one whose request was answered 503.
pub fn producer_config(config: &EproGatewayConfig) -> ClientConfig {
    let mut client = trialflow_outbox::publisher::producer_config(&config.kafka, CLIENT_ID);
    client.set("message.timeout.ms", config.ack_timeout_ms.to_string());
    if !config.kafka.producer_sets("queue.buffering.max.kbytes") {
        client.set("queue.buffering.max.kbytes", MAX_QUEUED_KBYTES.to_string());
    }
    client
}

/// Where the broker stored a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ack {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

/// Why a submission was not acknowledged.
#[derive(Debug)]
pub(crate) enum PublishError {
    /// The local queue is full (the broker is slow or away): shed load.
    QueueFull,
    /// librdkafka reported the delivery failed, e.g. `MessageTimedOut`.
    Failed(KafkaError),
    /// No verdict from librdkafka in time (see [`ACK_GRACE`]).
    NoVerdict(Duration),
    /// The event does not encode with its schema (a bug: the JSON fitted the same type).
    Encode(CodecError),
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        // Every 503 says a retry is safe: the event id is the client's, so the validation
        // consumer treats a resubmission of a message that did reach the broker as an exact
        // duplicate.
        let unavailable =
            |message: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
        match e {
            PublishError::QueueFull => {
                tracing::warn!("Producer queue full; answering 503.");
                unavailable("the gateway is overloaded; retry the same submission later".to_string())
            }
            PublishError::Failed(error) => {
                tracing::warn!(%error, "Submission not acknowledged; answering 503.");
                unavailable(format!(
                    "the event log did not acknowledge the submission ({error}); retry the same \
                     submission later"
                ))
            }
            PublishError::NoVerdict(waited) => {
                tracing::warn!(?waited, "No delivery verdict in time; answering 503.");
                unavailable(format!(
                    "the event log did not acknowledge the submission within {} ms; retry the same \
                     submission later",
                    waited.as_millis()
                ))
            }
            PublishError::Encode(e) => e.into(),
        }
    }
}

/// Produces submissions to their topic.
pub(crate) struct Publisher {
    producer: FutureProducer,
    topic: String,
    ack_timeout: Duration,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.topic)
            .field("ack_timeout", &self.ack_timeout)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    pub(crate) fn new(producer: FutureProducer, config: &EproGatewayConfig) -> Self {
        Self {
            producer,
            topic: config.topics.of::<QuestionnaireResponseSubmitted>(),
            ack_timeout: Duration::from_millis(config.ack_timeout_ms),
        }
    }

    /// Encodes `event`, produces it keyed by `subject_id` and waits for the broker's
    /// acknowledgement. The trace context of the current span (the request's) goes along.
    pub(crate) async fn publish(
        &self,
        event: &QuestionnaireResponseSubmitted,
        subject_id: &str,
        received_at: DateTime<Utc>,
    ) -> Result<Ack, PublishError> {
        let payload = trialflow_schemas::encode(event).map_err(PublishError::Encode)?;
        let event_id = event.envelope.event_id.to_string();
        let received_at = received_at.to_rfc3339_opts(SecondsFormat::Micros, true);
        let mut record_headers = OwnedHeaders::new_with_capacity(5)
            .insert(Header { key: headers::EVENT_ID, value: Some(event_id.as_bytes()) })
            .insert(Header { key: headers::EVENT_TYPE, value: Some(QuestionnaireResponseSubmitted::NAME) })
            .insert(Header { key: headers::CONTENT_TYPE, value: Some(CONTENT_TYPE) })
            .insert(Header { key: RECEIVED_AT_HEADER, value: Some(received_at.as_bytes()) });
        if let Some(tp) = trialflow_outbox::trace::current_traceparent() {
            record_headers =
                record_headers.insert(Header { key: headers::TRACEPARENT, value: Some(tp.as_bytes()) });
        }
        let record = FutureRecord::to(&self.topic).key(subject_id).payload(&payload).headers(record_headers);
        let delivery = self.producer.send_result(record).map_err(|(e, _)| match e {
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => PublishError::QueueFull,
            other => PublishError::Failed(other),
        })?;
        let started = Instant::now();
        let waited = self.ack_timeout + ACK_GRACE;
        let delivered = match tokio::time::timeout(waited, delivery).await {
            Err(_) => return Err(PublishError::NoVerdict(waited)),
            Ok(Err(_canceled)) => return Err(PublishError::Failed(KafkaError::Canceled)),
            Ok(Ok(Err((e, _)))) => return Err(PublishError::Failed(e)),
            Ok(Ok(Ok(delivered))) => delivered,
        };
        metrics::histogram!(ACK_SECONDS).record(started.elapsed().as_secs_f64());
        let ack = Ack { partition: delivered.partition, offset: delivered.offset };
        tracing::debug!(%event_id, ack.partition, ack.offset, "Submission acknowledged.");
        Ok(ack)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ack_timeout_is_the_message_timeout_and_the_queue_is_bounded() {
        let config = EproGatewayConfig { ack_timeout_ms: 1500, ..EproGatewayConfig::local() };
        let client = producer_config(&config);
        assert_eq!(client.get("message.timeout.ms"), Some("1500"));
        assert_eq!(client.get("enable.idempotence"), Some("true"));
        assert_eq!(client.get("client.id"), Some(CLIENT_ID));
        assert_eq!(client.get("queue.buffering.max.kbytes"), Some("65536"));

        let mut config = config;
        config.kafka.producer_settings.push(("queue.buffering.max.kbytes".into(), "1024".into()));
        assert_eq!(producer_config(&config).get("queue.buffering.max.kbytes"), Some("1024"));
    }

    #[test]
    fn unacknowledged_submissions_are_503_with_retry_after() {
        use axum::response::IntoResponse;
        for e in [
            PublishError::QueueFull,
            PublishError::Failed(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)),
            PublishError::NoVerdict(Duration::from_secs(3)),
        ] {
            let response = ApiError::from(e).into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(response.headers().contains_key(axum::http::header::RETRY_AFTER));
        }
    }
}
