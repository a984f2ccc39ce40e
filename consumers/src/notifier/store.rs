//! The notifier's SQL: alerts and deliveries. The handler's functions run inside the consumer's
//! transaction; the worker's claim and outcome statements run on its own pool.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};
use trialflow_outbox::SchemaName;
use trialflow_schemas::{AlertRaised, Evidence};
use uuid::Uuid;

use crate::error::HandlerError;

/// An alert as the notifier knows it.
#[derive(Debug)]
pub(crate) struct StoredAlert {
    pub(crate) raised: AlertRaised,
    pub(crate) closed: bool,
}

/// Records a raised alert; a second raise of the same alert changes nothing.
pub(crate) async fn record_raised(
    conn: &mut PgConnection,
    schema: &SchemaName,
    raised: &AlertRaised,
) -> Result<(), HandlerError> {
    let sql = format!(
        "INSERT INTO {schema}.alert (alert_id, study_id, raised) VALUES ($1, $2, $3)
         ON CONFLICT (alert_id) DO NOTHING"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(raised.alert_id)
        .bind(&raised.envelope.study_id)
        .bind(Json(raised))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(crate) async fn alert(
    conn: &mut PgConnection,
    schema: &SchemaName,
    alert_id: Uuid,
) -> Result<Option<StoredAlert>, HandlerError> {
    let sql = format!("SELECT raised, closed_at IS NOT NULL FROM {schema}.alert WHERE alert_id = $1");
    let Some(row) = sqlx::query(AssertSqlSafe(sql)).bind(alert_id).fetch_optional(&mut *conn).await? else {
        return Ok(None);
    };
    let Json(raised): Json<AlertRaised> = row.try_get(0).map_err(|e| {
        HandlerError::permanent(format!("stored AlertRaised of alert {alert_id} does not decode: {e}"))
    })?;
    Ok(Some(StoredAlert { raised, closed: row.try_get(1)? }))
}

/// Appends evidence to a known alert (later escalation pages carry it). Returns false for an
/// unknown alert.
pub(crate) async fn add_evidence(
    conn: &mut PgConnection,
    schema: &SchemaName,
    alert_id: Uuid,
    evidence: &[Evidence],
) -> Result<bool, HandlerError> {
    let sql = format!(
        "UPDATE {schema}.alert
         SET raised = jsonb_set(raised, '{{evidence}}', COALESCE(raised->'evidence', '[]'::jsonb) || $2::jsonb)
         WHERE alert_id = $1"
    );
    let done =
        sqlx::query(AssertSqlSafe(sql)).bind(alert_id).bind(Json(evidence)).execute(&mut *conn).await?;
    Ok(done.rows_affected() == 1)
}

/// Closes an alert (acknowledged or resolved) and cancels its pending escalation pages; the
/// level-0 raise notification is never cancelled. Returns how many were cancelled.
pub(crate) async fn close(
    conn: &mut PgConnection,
    schema: &SchemaName,
    alert_id: Uuid,
    why: &str,
) -> Result<u64, HandlerError> {
    let sql = format!(
        "WITH closed AS (
             UPDATE {schema}.alert SET closed_at = COALESCE(closed_at, now()), closed_by = COALESCE(closed_by, $2)
             WHERE alert_id = $1)
         UPDATE {schema}.delivery
         SET status = 'cancelled', finished_at = now(), lease_until = NULL, claim_id = NULL,
             last_error = 'alert ' || $2 || ' before this escalation page was delivered'
         WHERE alert_id = $1 AND escalation_level > 0 AND status = 'pending'"
    );
    let done = sqlx::query(AssertSqlSafe(sql)).bind(alert_id).bind(why).execute(&mut *conn).await?;
    Ok(done.rows_affected())
}

/// A delivery to create.
#[derive(Debug)]
pub(crate) struct NewDelivery {
    pub(crate) alert_id: Uuid,
    pub(crate) recipient_id: String,
    pub(crate) channel: &'static str,
    pub(crate) escalation_level: i32,
    pub(crate) url: String,
    pub(crate) cause_type: &'static str,
    pub(crate) cause: serde_json::Value,
    pub(crate) triggered_at: DateTime<Utc>,
    pub(crate) body: String,
    /// The creating transaction's trace context (see [`trialflow_outbox::trace`]).
    pub(crate) traceparent: Option<String>,
}

/// Creates the deliveries that do not exist yet (the unique key decides). Returns how many are new.
pub(crate) async fn create_deliveries(
    conn: &mut PgConnection,
    schema: &SchemaName,
    rows: &[NewDelivery],
) -> Result<u64, HandlerError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let sql = format!(
        "INSERT INTO {schema}.delivery
             (alert_id, recipient_id, channel, escalation_level, url, cause_type, cause, triggered_at, body,
              traceparent)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::text[], $6::text[],
                              $7::jsonb[], $8::timestamptz[], $9::text[], $10::text[])
         ON CONFLICT (alert_id, recipient_id, channel, escalation_level) DO NOTHING"
    );
    let column = |f: fn(&NewDelivery) -> String| rows.iter().map(f).collect::<Vec<_>>();
    let done = sqlx::query(AssertSqlSafe(sql))
        .bind(rows.iter().map(|r| r.alert_id).collect::<Vec<_>>())
        .bind(column(|r| r.recipient_id.clone()))
        .bind(column(|r| r.channel.to_string()))
        .bind(rows.iter().map(|r| r.escalation_level).collect::<Vec<_>>())
        .bind(column(|r| r.url.clone()))
        .bind(column(|r| r.cause_type.to_string()))
        .bind(rows.iter().map(|r| Json(&r.cause)).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.triggered_at).collect::<Vec<_>>())
        .bind(column(|r| r.body.clone()))
        .bind(rows.iter().map(|r| r.traceparent.clone()).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}

/// A delivery a worker has claimed for one attempt.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    pub(crate) delivery_id: i64,
    pub(crate) claim_id: Uuid,
    pub(crate) alert_id: Uuid,
    pub(crate) recipient_id: String,
    pub(crate) channel: String,
    pub(crate) escalation_level: i32,
    pub(crate) url: String,
    pub(crate) body: String,
    pub(crate) cause_type: String,
    pub(crate) cause: serde_json::Value,
    pub(crate) triggered_at: DateTime<Utc>,
    /// Attempts including this one.
    pub(crate) attempts: i32,
    /// The trace the attempt's spans continue.
    pub(crate) traceparent: Option<String>,
}

/// The deliveries and the worker's statements on them.
#[derive(Debug, Clone)]
pub(crate) struct Deliveries {
    claim: String,
    next_due: String,
    delivered: String,
    retry: String,
    failed: String,
}

impl Deliveries {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let returning =
            "d.delivery_id, d.claim_id, d.alert_id, d.recipient_id, d.channel, d.escalation_level,
                         d.url, d.body, d.cause_type, d.cause, d.triggered_at, d.attempts, d.traceparent";
        Self {
            // Due, unclaimed (or claimed by a worker whose lease ran out), oldest first; SKIP LOCKED
            // lets several workers claim side by side without waiting for each other.
            claim: format!(
                "WITH due AS (
                     SELECT delivery_id FROM {schema}.delivery
                     WHERE status = 'pending' AND next_attempt_at <= now()
                       AND (lease_until IS NULL OR lease_until <= now())
                     ORDER BY next_attempt_at
                     LIMIT $1
                     FOR UPDATE SKIP LOCKED)
                 UPDATE {schema}.delivery d
                 SET lease_until = now() + make_interval(secs => $2), claim_id = $3, attempts = d.attempts + 1
                 FROM due WHERE d.delivery_id = due.delivery_id
                 RETURNING {returning}"
            ),
            next_due: format!(
                "SELECT EXTRACT(EPOCH FROM min(GREATEST(next_attempt_at, COALESCE(lease_until, next_attempt_at))) - now())::float8
                 FROM {schema}.delivery WHERE status = 'pending'"
            ),
            delivered: format!(
                "UPDATE {schema}.delivery
                 SET status = 'delivered', finished_at = now(), lease_until = NULL, claim_id = NULL, last_error = NULL
                 WHERE delivery_id = $1 AND claim_id = $2 AND status = 'pending'"
            ),
            // The last attempt is made at the give-up deadline, not skipped because of the backoff.
            retry: format!(
                "UPDATE {schema}.delivery
                 SET next_attempt_at = LEAST(now() + make_interval(secs => $3), created_at + make_interval(secs => $4)),
                     lease_until = NULL, claim_id = NULL, last_error = $5
                 WHERE delivery_id = $1 AND claim_id = $2 AND status = 'pending'
                   AND now() < created_at + make_interval(secs => $4)"
            ),
            failed: format!(
                "UPDATE {schema}.delivery
                 SET status = 'failed', finished_at = now(), lease_until = NULL, claim_id = NULL, last_error = $3
                 WHERE delivery_id = $1 AND claim_id = $2 AND status = 'pending'"
            ),
        }
    }

    /// Claims up to `limit` due deliveries for `lease`, counting the attempt.
    pub(crate) async fn claim(
        &self,
        pool: &PgPool,
        limit: usize,
        lease: Duration,
    ) -> sqlx::Result<Vec<Claimed>> {
        let rows = sqlx::query(AssertSqlSafe(self.claim.as_str()))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(lease.as_secs_f64())
            .bind(Uuid::new_v4())
            .fetch_all(pool)
            .await?;
        rows.iter()
            .map(|row| {
                let Json(cause): Json<serde_json::Value> = row.try_get("cause")?;
                Ok(Claimed {
                    delivery_id: row.try_get("delivery_id")?,
                    claim_id: row.try_get("claim_id")?,
                    alert_id: row.try_get("alert_id")?,
                    recipient_id: row.try_get("recipient_id")?,
                    channel: row.try_get("channel")?,
                    escalation_level: row.try_get("escalation_level")?,
                    url: row.try_get("url")?,
                    body: row.try_get("body")?,
                    cause_type: row.try_get("cause_type")?,
                    cause,
                    triggered_at: row.try_get("triggered_at")?,
                    attempts: row.try_get("attempts")?,
                    traceparent: row.try_get("traceparent")?,
                })
            })
            .collect()
    }

    /// How long until the next pending delivery is due (zero if one is due now); `None` if none is
    /// pending.
    pub(crate) async fn next_due(&self, pool: &PgPool) -> sqlx::Result<Option<Duration>> {
        let secs: Option<f64> =
            sqlx::query_scalar(AssertSqlSafe(self.next_due.as_str())).fetch_one(pool).await?;
        Ok(secs.map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)))
    }

    /// Marks the claimed delivery delivered. False if the claim was lost meanwhile (lease expired
    /// and another worker took it, or the alert was closed and the page cancelled).
    pub(crate) async fn delivered(&self, conn: &mut PgConnection, d: &Claimed) -> sqlx::Result<bool> {
        let done = sqlx::query(AssertSqlSafe(self.delivered.as_str()))
            .bind(d.delivery_id)
            .bind(d.claim_id)
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Schedules another attempt after `backoff`, unless the delivery is `give_up` old. False if
    /// it was not rescheduled (too old, or the claim was lost).
    pub(crate) async fn retry(
        &self,
        conn: &mut PgConnection,
        d: &Claimed,
        backoff: Duration,
        give_up: Duration,
        error: &str,
    ) -> sqlx::Result<bool> {
        let done = sqlx::query(AssertSqlSafe(self.retry.as_str()))
            .bind(d.delivery_id)
            .bind(d.claim_id)
            .bind(backoff.as_secs_f64())
            .bind(give_up.as_secs_f64())
            .bind(error)
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks the claimed delivery failed for good. False if the claim was lost meanwhile.
    pub(crate) async fn failed(
        &self,
        conn: &mut PgConnection,
        d: &Claimed,
        error: &str,
    ) -> sqlx::Result<bool> {
        let done = sqlx::query(AssertSqlSafe(self.failed.as_str()))
            .bind(d.delivery_id)
            .bind(d.claim_id)
            .bind(error)
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
