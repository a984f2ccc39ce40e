//! Parked messages: retried when their dependency is resolved (woken by the handler that resolved
//! it) or on a schedule, and dead-lettered once older than the maximum parking age.

use std::sync::Arc;

use futures::FutureExt;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use crate::error::HandlerError;
use crate::failure::{parked_retry_delay, retry_delay, send_to_dlq};
use crate::handler::{Context, Handler};
use crate::metrics as m;
use crate::shared::Shared;

const SLICE: i64 = 100;

pub(crate) async fn run<H: Handler>(shared: Arc<Shared<H>>, stop: CancellationToken) {
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match retry_due(&shared).await {
            Ok(n) if n as i64 == SLICE => continue, // more may be due
            Ok(_) => failures = 0,
            Err(error) => {
                failures += 1;
                debug!(consumer = %shared.spec.name, %error, "Parked retry failed; trying again later.");
            }
        }
        // Rows carry their own next_attempt_at; look for due ones every second (an indexed query).
        let wait = if failures > 0 {
            retry_delay(&shared.config, failures)
        } else {
            shared.config.park_retry().min(Duration::from_secs(1))
        };
        tokio::select! {
            _ = shared.park_wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => {}
        }
    }
}

/// One transaction over a slice of due parked messages; returns how many were due.
async fn retry_due<H: Handler>(shared: &Shared<H>) -> Result<usize, HandlerError> {
    let name = shared.spec.name.as_str();
    let max_age = chrono::Duration::seconds(shared.config.park_max_age_secs.min(i64::MAX as u64) as i64);
    let mut tx = shared.pool.begin().await?;
    let due = shared.sql.due(&mut tx, name, SLICE).await?;
    if !due.is_empty() {
        let dependencies: Vec<&str> = due.iter().map(|r| r.dependency.as_str()).collect();
        debug!(consumer = name, ?dependencies, "Retrying parked messages.");
    }
    // The same lock order as a live batch (see `Handler::prepare`), or parked messages released
    // together could deadlock with one. Its state is not used: each message runs alone below, in
    // a savepoint, with a state of its own (a rolled-back message must leave nothing in it).
    let messages: Vec<_> = due.iter().map(|row| row.message()).collect();
    shared.handler.prepare(&mut tx, &messages).await?;
    let mut resolved = Vec::new();
    let mut audit = Vec::new();
    let mut woke_keys = false;
    for (row, msg) in due.iter().zip(messages) {
        sqlx::query("SAVEPOINT parked").execute(&mut *tx).await?;
        let mut ctx = Context::new(shared.outbox.clone());
        let span = crate::span::process(&shared.group, &msg);
        let handled = async {
            let mut state = shared.handler.prepare(&mut tx, std::slice::from_ref(&msg)).await?;
            shared.handler.handle(&mut tx, &msg, &mut ctx, &mut state).await?;
            shared.handler.finish(&mut tx, state, &mut ctx).await?;
            shared.outbox.enqueue_traced(&mut tx, &ctx.events).await?;
            Ok::<(), HandlerError>(())
        }
        .instrument(span.clone());
        let attempt = std::panic::AssertUnwindSafe(handled).catch_unwind();
        let result =
            attempt.await.unwrap_or_else(|_| Err(HandlerError::Transient("handler panicked".into())));
        if let Err(e) = &result {
            crate::span::failed(&span, e);
        }
        let aged = chrono::Utc::now() - row.parked_at >= max_age;
        match result {
            Ok(()) => {
                sqlx::query("RELEASE SAVEPOINT parked").execute(&mut *tx).await?;
                shared.sql.unpark(&mut tx, name, row.event_id).await?;
                shared.sql.mark_applied(&mut tx, name, row.event_id).await?;
                shared.sql.wake_key(&mut tx, name, &msg).await?;
                woke_keys = true;
                resolved.extend(ctx.resolved);
                audit.extend(crate::runtime::caused_by(ctx.audit, &row.event_id));
                metrics::counter!(m::MESSAGES_TOTAL, "consumer" => name.to_string(), "outcome" => "unparked")
                    .increment(1);
            }
            // Rolling back to the savepoint fails when the database is gone: then the whole
            // slice is retried later. Otherwise this message alone is rescheduled, and ages out.
            Err(HandlerError::Transient(e)) => {
                sqlx::query("ROLLBACK TO SAVEPOINT parked").execute(&mut *tx).await?;
                if aged {
                    let reason =
                        format!("parked for more than {}s, failing on retry: {e}", max_age.num_seconds());
                    give_up(shared, &mut tx, row, &msg, "retries_exhausted", reason).await?;
                    woke_keys = true;
                } else {
                    debug!(consumer = name, event_id = %row.event_id, error = %e, "Parked message failed; rescheduled.");
                    reschedule(shared, &mut tx, row, &e, &row.dependency, max_age).await?;
                }
            }
            Err(HandlerError::NotYet { dependency, reason }) => {
                sqlx::query("ROLLBACK TO SAVEPOINT parked").execute(&mut *tx).await?;
                if aged {
                    let reason = format!(
                        "parked for more than {}s waiting for {dependency}: {reason}",
                        max_age.num_seconds()
                    );
                    give_up(shared, &mut tx, row, &msg, "not_yet", reason).await?;
                    woke_keys = true;
                } else {
                    reschedule(shared, &mut tx, row, &reason, &dependency, max_age).await?;
                }
            }
            Err(error @ HandlerError::Permanent(_)) => {
                sqlx::query("ROLLBACK TO SAVEPOINT parked").execute(&mut *tx).await?;
                give_up(shared, &mut tx, row, &msg, error.class(), error.to_string()).await?;
                woke_keys = true;
            }
        }
    }
    for dependency in &resolved {
        shared.sql.wake(&mut tx, name, dependency).await?;
    }
    trialflow_outbox::audit::append(&mut tx, &shared.spec.schema, &audit)
        .await
        .map_err(HandlerError::from)?;
    tx.commit().await?;
    if woke_keys {
        // Messages parked behind one of these keys are due now.
        shared.park_wake.notify_one();
    }
    Ok(due.len())
}

/// Retries `row` later, with a backoff of its own, no later than its maximum age.
async fn reschedule<H: Handler>(
    shared: &Shared<H>,
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    row: &crate::store::ParkedRow,
    reason: &str,
    dependency: &str,
    max_age: chrono::Duration,
) -> Result<(), HandlerError> {
    let delay = parked_retry_delay(&shared.config, row.attempts as u32 + 1);
    let (retry, limit) = (delay.as_secs_f64(), max_age.num_seconds() as f64);
    shared.sql.reschedule(tx, &shared.spec.name, row.event_id, reason, dependency, retry, limit).await?;
    Ok(())
}

/// Dead-letters a parked message and forgets it, so that a replay after a fix is applied.
async fn give_up<H: Handler>(
    shared: &Shared<H>,
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    row: &crate::store::ParkedRow,
    msg: &crate::handler::Message,
    class: &str,
    reason: String,
) -> Result<(), HandlerError> {
    let name = shared.spec.name.as_str();
    warn!(consumer = name, event_id = %row.event_id, dependency = %row.dependency, last_reason = %row.reason,
        "Giving up on a parked message.");
    send_to_dlq(shared, tx, msg, class, reason, row.attempts as u32, row.parked_at).await?;
    shared.sql.wake_key(tx, name, msg).await?;
    shared.sql.unpark(tx, name, row.event_id).await?;
    shared.sql.forget(tx, name, row.event_id).await?;
    metrics::counter!(m::MESSAGES_TOTAL, "consumer" => name.to_string(), "outcome" => "dead_lettered")
        .increment(1);
    Ok(())
}
