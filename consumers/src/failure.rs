//! What happens to a message that fails: when it is tried again, and how it is dead-lettered.
//! The partition workers (`runtime`) and the parking loop (`parking`) both come here.

use std::time::Duration;

use tracing::warn;
use trialflow_outbox::{Outbox, RawRecord};
use uuid::Uuid;

use crate::config::ConsumerConfig;
use crate::error::HandlerError;
use crate::handler::{Handler, Message};
use crate::shared::Shared;
use crate::store::dlq_headers;

pub(crate) use trialflow_outbox::retry::{backoff_delay, sleep_or_shutdown};

/// The wait before a failed batch (or a failed pass of the parking loop) is tried again: an
/// exponential backoff capped at `CONSUMER_MAX_BACKOFF_MS`.
pub(crate) fn retry_delay(config: &ConsumerConfig, failures: u32) -> Duration {
    backoff_delay(failures, config.max_backoff())
}

/// When a parked message that failed again is next tried: its own backoff, at least the parking
/// retry interval, at most an hour.
pub(crate) fn parked_retry_delay(config: &ConsumerConfig, attempts: u32) -> Duration {
    let delay = backoff_delay(attempts, config.park_retry() * 12);
    delay.max(config.park_retry()).min(Duration::from_secs(3600))
}

pub(crate) fn reason_of(error: &HandlerError) -> String {
    match error {
        HandlerError::Permanent(r) | HandlerError::Transient(r) => r.clone(),
        HandlerError::NotYet { reason, .. } => reason.clone(),
    }
}

/// Dead-letters `msg` in `tx`: `class` is `permanent`, `not_yet` (parked too long) or
/// `retries_exhausted` (the poison fence).
pub(crate) async fn send_to_dlq<H: Handler>(
    shared: &Shared<H>,
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    msg: &Message,
    class: &str,
    reason: String,
    attempts: u32,
    first_failure: chrono::DateTime<chrono::Utc>,
) -> Result<(), HandlerError> {
    warn!(consumer = %shared.spec.name, topic = %msg.topic, partition = msg.partition, offset = msg.offset,
        %reason, "Dead-lettering message.");
    let letter = DeadLetter {
        consumer: &shared.spec.name,
        class,
        reason,
        attempts: attempts as i32,
        first_failure_at: first_failure,
    };
    let topic = format!("{}{}", msg.topic, shared.config.dlq_suffix);
    dead_letter(tx, &shared.outbox, topic, msg, letter).await?;
    Ok(())
}

/// Why and how a message is dead-lettered.
#[derive(Debug)]
pub(crate) struct DeadLetter<'a> {
    pub consumer: &'a str,
    pub class: &'a str,
    pub reason: String,
    pub attempts: i32,
    pub first_failure_at: chrono::DateTime<chrono::Utc>,
}

/// Longest `dlq.reason`; longer reasons (which may quote the message) are cut.
const MAX_REASON_BYTES: usize = 4096;

/// Enqueues `msg` to its dead-letter topic through the consumer's outbox, byte for byte: the
/// original key, payload and every original header, plus `dlq.*` headers saying who failed it,
/// why, and where it was. Nothing in the message can make this fail (see [`RawRecord`]).
pub(crate) async fn dead_letter(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    outbox: &Outbox,
    dlq_topic: String,
    msg: &Message,
    letter: DeadLetter<'_>,
) -> Result<(), trialflow_outbox::OutboxError> {
    use dlq_headers as h;
    let mut reason = letter.reason.into_bytes();
    if reason.len() > MAX_REASON_BYTES {
        reason.truncate(MAX_REASON_BYTES);
        reason.extend_from_slice("…".as_bytes());
    }
    let mut headers: Vec<(Vec<u8>, Vec<u8>)> =
        msg.headers.iter().map(|(k, v)| (k.clone().into_bytes(), v.clone())).collect();
    for (name, value) in [
        (h::CONSUMER, letter.consumer.as_bytes().to_vec()),
        (h::ERROR_CLASS, letter.class.as_bytes().to_vec()),
        (h::REASON, reason),
        (h::ORIGINAL_TOPIC, msg.topic.clone().into_bytes()),
        (h::ORIGINAL_PARTITION, msg.partition.to_string().into_bytes()),
        (h::ORIGINAL_OFFSET, msg.offset.to_string().into_bytes()),
        (h::ATTEMPTS, letter.attempts.to_string().into_bytes()),
        (h::FIRST_FAILURE_AT, letter.first_failure_at.to_rfc3339().into_bytes()),
    ] {
        headers.push((name.as_bytes().to_vec(), value));
    }
    let record = RawRecord {
        topic: dlq_topic,
        key: msg.key.clone(),
        // The original event id when readable, so that a replay is still deduplicated against it.
        event_id: msg
            .header_str("event_id")
            .and_then(|s| Uuid::parse_str(s).ok())
            .unwrap_or_else(Uuid::now_v7),
        event_type: msg.header_str("event_type").unwrap_or("unknown").to_string(),
        payload: msg.payload.clone().unwrap_or_default(),
        headers,
    };
    outbox.enqueue_raw(tx, &record).await
}
