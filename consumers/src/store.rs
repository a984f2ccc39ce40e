//! SQL of the runtime on a consumer's schema: the inbox and parked messages, and the names of the
//! headers a dead letter carries (dead letters themselves are written by `failure`, through the
//! consumer's outbox, in the same transaction that moves on).

use sqlx::{AssertSqlSafe, FromRow, PgConnection};
use trialflow_outbox::SchemaName;
use trialflow_outbox::writer::printable;
use uuid::Uuid;

use crate::handler::Message;

/// Dead-letter header names (besides the original message's own headers).
pub mod dlq_headers {
    pub const CONSUMER: &str = "dlq.consumer";
    pub const ERROR_CLASS: &str = "dlq.error_class";
    pub const REASON: &str = "dlq.reason";
    pub const ORIGINAL_TOPIC: &str = "dlq.original_topic";
    pub const ORIGINAL_PARTITION: &str = "dlq.original_partition";
    pub const ORIGINAL_OFFSET: &str = "dlq.original_offset";
    pub const ATTEMPTS: &str = "dlq.attempts";
    pub const FIRST_FAILURE_AT: &str = "dlq.first_failure_at";
    /// Prefix of every dead-letter header; `dlq replay` strips them.
    pub const PREFIX: &str = "dlq.";
}

#[derive(Debug, Clone)]
pub(crate) struct Sql {
    insert_inbox: String,
    insert_inbox_all: String,
    mark_applied: String,
    delete_inbox: String,
    insert_parked: String,
    due_parked: String,
    reschedule_parked: String,
    delete_parked: String,
    wake_parked: String,
    wake_parked_key: String,
    parked_keys: String,
    expire_inbox: String,
}

/// A parked message as stored.
#[derive(Debug, FromRow)]
pub(crate) struct ParkedRow {
    pub(crate) event_id: Uuid,
    pub(crate) dependency: String,
    pub(crate) reason: String,
    pub(crate) topic: String,
    pub(crate) kafka_partition: i32,
    pub(crate) kafka_offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) headers: sqlx::types::Json<Vec<(String, Vec<u8>)>>,
    pub(crate) attempts: i32,
    pub(crate) parked_at: chrono::DateTime<chrono::Utc>,
}

impl ParkedRow {
    pub(crate) fn message(&self) -> Message {
        Message {
            topic: self.topic.clone(),
            partition: self.kafka_partition,
            offset: self.kafka_offset,
            key: self.key.clone(),
            payload: self.payload.clone(),
            headers: self.headers.0.clone(),
        }
    }
}

impl Sql {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        Self {
            insert_inbox: format!(
                "INSERT INTO {schema}.inbox (consumer, event_id, outcome, topic, kafka_partition, kafka_offset)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
            ),
            insert_inbox_all: format!(
                "INSERT INTO {schema}.inbox (consumer, event_id, outcome, topic, kafka_partition, kafka_offset)
                 SELECT $1, e, 'applied', $2, $3, o FROM unnest($4::uuid[], $5::bigint[]) AS u(e, o)
                 ON CONFLICT DO NOTHING RETURNING event_id"
            ),
            mark_applied: format!(
                "UPDATE {schema}.inbox SET outcome = 'applied', processed_at = now() WHERE consumer = $1 AND event_id = $2"
            ),
            delete_inbox: format!("DELETE FROM {schema}.inbox WHERE consumer = $1 AND event_id = $2"),
            insert_parked: format!(
                "INSERT INTO {schema}.parked (consumer, event_id, dependency, reason, topic, kafka_partition,
                     kafka_offset, key, payload, headers, next_attempt_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + make_interval(secs => least($11, $12)))
                 ON CONFLICT DO NOTHING"
            ),
            due_parked: format!(
                "SELECT event_id, dependency, reason, topic, kafka_partition, kafka_offset, key, payload, headers,
                        attempts, parked_at
                 FROM {schema}.parked p WHERE consumer = $1 AND next_attempt_at <= now()
                   -- Per-key order: never before an earlier parked message of the same key.
                   AND NOT EXISTS (SELECT 1 FROM {schema}.parked e
                                   WHERE e.key = p.key AND e.consumer = p.consumer AND e.topic = p.topic
                                     AND e.kafka_partition = p.kafka_partition AND e.kafka_offset < p.kafka_offset)
                 ORDER BY parked_at, kafka_offset LIMIT $2 FOR UPDATE SKIP LOCKED"
            ),
            reschedule_parked: format!(
                "UPDATE {schema}.parked SET attempts = attempts + 1, reason = $3, dependency = $4,
                     next_attempt_at = least(now() + make_interval(secs => $5), parked_at + make_interval(secs => $6))
                 WHERE consumer = $1 AND event_id = $2"
            ),
            delete_parked: format!("DELETE FROM {schema}.parked WHERE consumer = $1 AND event_id = $2"),
            wake_parked: format!(
                "UPDATE {schema}.parked SET next_attempt_at = now() WHERE consumer = $1 AND dependency = $2"
            ),
            wake_parked_key: format!(
                "UPDATE {schema}.parked SET next_attempt_at = now()
                 WHERE key = $4 AND consumer = $1 AND topic = $2 AND kafka_partition = $3"
            ),
            parked_keys: format!(
                "SELECT DISTINCT key FROM {schema}.parked
                 WHERE key = ANY($4) AND consumer = $1 AND topic = $2 AND kafka_partition = $3"
            ),
            expire_inbox: format!(
                "DELETE FROM {schema}.inbox WHERE ctid IN (SELECT ctid FROM {schema}.inbox
                     WHERE consumer = $1 AND outcome = 'applied' AND processed_at < now() - make_interval(hours => $2)
                     LIMIT 10000)"
            ),
        }
    }

    /// Records the event; false when it was recorded before (a redelivery).
    pub(crate) async fn take(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        event_id: Uuid,
        outcome: &str,
        msg: &Message,
    ) -> sqlx::Result<bool> {
        let done = sqlx::query(AssertSqlSafe(self.insert_inbox.as_str()))
            .bind(consumer)
            .bind(event_id)
            .bind(outcome)
            .bind(&msg.topic)
            .bind(msg.partition)
            .bind(msg.offset)
            .execute(conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the events of one partition's batch; returns those not recorded before.
    pub(crate) async fn take_all(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        first: &Message,
        event_ids: &[Uuid],
        offsets: &[i64],
    ) -> sqlx::Result<std::collections::HashSet<Uuid>> {
        if event_ids.is_empty() {
            return Ok(Default::default());
        }
        let rows: Vec<Uuid> = sqlx::query_scalar(AssertSqlSafe(self.insert_inbox_all.as_str()))
            .bind(consumer)
            .bind(&first.topic)
            .bind(first.partition)
            .bind(event_ids)
            .bind(offsets)
            .fetch_all(conn)
            .await?;
        Ok(rows.into_iter().collect())
    }

    pub(crate) async fn mark_applied(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        event_id: Uuid,
    ) -> sqlx::Result<()> {
        sqlx::query(AssertSqlSafe(self.mark_applied.as_str()))
            .bind(consumer)
            .bind(event_id)
            .execute(conn)
            .await?;
        Ok(())
    }

    pub(crate) async fn forget(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        event_id: Uuid,
    ) -> sqlx::Result<()> {
        sqlx::query(AssertSqlSafe(self.delete_inbox.as_str()))
            .bind(consumer)
            .bind(event_id)
            .execute(conn)
            .await?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn park(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        event_id: Uuid,
        dependency: &str,
        reason: &str,
        msg: &Message,
        retry_in_secs: f64,
        max_age_secs: f64,
    ) -> sqlx::Result<()> {
        sqlx::query(AssertSqlSafe(self.insert_parked.as_str()))
            .bind(consumer)
            .bind(event_id)
            .bind(printable(dependency.as_bytes()))
            .bind(printable(reason.as_bytes()))
            .bind(&msg.topic)
            .bind(msg.partition)
            .bind(msg.offset)
            .bind(msg.key.as_deref())
            .bind(msg.payload.as_deref())
            .bind(sqlx::types::Json(&msg.headers))
            .bind(retry_in_secs)
            .bind(max_age_secs)
            .execute(conn)
            .await?;
        Ok(())
    }

    pub(crate) async fn due(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        limit: i64,
    ) -> sqlx::Result<Vec<ParkedRow>> {
        sqlx::query_as(AssertSqlSafe(self.due_parked.as_str()))
            .bind(consumer)
            .bind(limit)
            .fetch_all(conn)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn reschedule(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        event_id: Uuid,
        reason: &str,
        dependency: &str,
        retry_in_secs: f64,
        max_age_secs: f64,
    ) -> sqlx::Result<()> {
        sqlx::query(AssertSqlSafe(self.reschedule_parked.as_str()))
            .bind(consumer)
            .bind(event_id)
            .bind(printable(reason.as_bytes()))
            .bind(printable(dependency.as_bytes()))
            .bind(retry_in_secs)
            .bind(max_age_secs)
            .execute(conn)
            .await?;
        Ok(())
    }

    pub(crate) async fn unpark(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        event_id: Uuid,
    ) -> sqlx::Result<()> {
        sqlx::query(AssertSqlSafe(self.delete_parked.as_str()))
            .bind(consumer)
            .bind(event_id)
            .execute(conn)
            .await?;
        Ok(())
    }

    pub(crate) async fn wake(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        dependency: &str,
    ) -> sqlx::Result<u64> {
        Ok(sqlx::query(AssertSqlSafe(self.wake_parked.as_str()))
            .bind(consumer)
            .bind(dependency)
            .execute(conn)
            .await?
            .rows_affected())
    }

    /// Makes the parked messages of `msg`'s key on its partition due now (the one before them was
    /// applied or dead-lettered).
    pub(crate) async fn wake_key(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        msg: &Message,
    ) -> sqlx::Result<()> {
        let Some(key) = &msg.key else { return Ok(()) };
        sqlx::query(AssertSqlSafe(self.wake_parked_key.as_str()))
            .bind(consumer)
            .bind(&msg.topic)
            .bind(msg.partition)
            .bind(key)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Which of `keys` have a parked message on `topic`/`partition`.
    pub(crate) async fn parked_keys(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        first: &Message,
        keys: &[&[u8]],
    ) -> sqlx::Result<std::collections::HashSet<Vec<u8>>> {
        if keys.is_empty() {
            return Ok(Default::default());
        }
        let rows: Vec<Vec<u8>> = sqlx::query_scalar(AssertSqlSafe(self.parked_keys.as_str()))
            .bind(consumer)
            .bind(&first.topic)
            .bind(first.partition)
            .bind(keys)
            .fetch_all(conn)
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// Deletes a slice of expired inbox rows; returns how many.
    pub(crate) async fn expire(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        hours: i32,
    ) -> sqlx::Result<u64> {
        Ok(sqlx::query(AssertSqlSafe(self.expire_inbox.as_str()))
            .bind(consumer)
            .bind(hours)
            .execute(conn)
            .await?
            .rows_affected())
    }
}

/// Parked messages per consumer on schema `schema`, by consumer name: what is still waiting for
/// its dependency (the simulation's settle check reports them).
pub async fn parked_by_consumer(
    pool: &sqlx::PgPool,
    schema: &SchemaName,
) -> sqlx::Result<Vec<(String, i64)>> {
    let sql = format!("SELECT consumer, count(*) FROM {schema}.parked GROUP BY consumer ORDER BY consumer");
    sqlx::query_as(AssertSqlSafe(sql)).fetch_all(pool).await
}
