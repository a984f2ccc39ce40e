//! Drives a handler the way the runtime drives it (`prepare`, `handle` per message, `finish`, the
//! queued events, commit), without the broker.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use trialflow_consumers::epro;
use trialflow_consumers::{Context, Handler, HandlerError, Message};
use trialflow_outbox::Outbox;
use trialflow_schemas::{Event, encode};

/// `event` as a message of `topic` keyed by its subject, at `offset`.
pub(crate) fn message<E: Event>(
    topic: &str,
    offset: i64,
    event: &E,
    received_at: Option<DateTime<Utc>>,
) -> Message {
    let envelope = event.envelope();
    let mut headers = vec![("event_id".to_string(), envelope.event_id.to_string().into_bytes())];
    if let Some(received) = received_at {
        headers.push((epro::RECEIVED_AT_HEADER.to_string(), received.to_rfc3339().into_bytes()));
    }
    Message {
        topic: topic.to_string(),
        partition: 0,
        offset,
        key: envelope.subject_id.clone().map(String::into_bytes),
        payload: encode(event).ok(),
        headers,
    }
}

/// Applies `batch` in one transaction as the runtime does; returns each message's outcome (its
/// queued events' types, or its error) and commits unless a message or `finish` failed.
pub(crate) async fn apply<H: Handler>(
    handler: &H,
    pool: &PgPool,
    outbox: &Arc<Outbox>,
    batch: &[Message],
) -> anyhow::Result<Result<Vec<Vec<String>>, HandlerError>> {
    let mut tx = pool.begin().await?;
    let mut state = match handler.prepare(&mut tx, batch).await {
        Ok(state) => state,
        Err(e) => return Ok(Err(e)),
    };
    let mut outcomes = Vec::new();
    let mut events = Vec::new();
    for msg in batch {
        let mut ctx = Context::new(outbox.clone());
        if let Err(e) = handler.handle(&mut tx, msg, &mut ctx, &mut state).await {
            return Ok(Err(e));
        }
        outcomes.push(ctx.enqueued().map(|e| e.event_type.clone()).collect());
        events.extend(ctx.enqueued().cloned());
    }
    let mut ctx = Context::new(outbox.clone());
    if let Err(e) = handler.finish(&mut tx, state, &mut ctx).await {
        return Ok(Err(e));
    }
    events.extend(ctx.enqueued().cloned());
    outbox.enqueue_all(&mut tx, &events).await?;
    tx.commit().await?;
    Ok(Ok(outcomes))
}
