//! The quarantine of one outbox: rows the broker refuses for good, moved aside by the relay (see
//! [`crate::relay`]), and what an operator does with them: list, put back ([`retry`]) or discard
//! ([`discard`], audited in `outbox_quarantine_discarded`).
//!
//! Per-key order: while a row is quarantined, the later rows of its key wait in the outbox (the
//! relay's read skips them). [`retry`] puts a row back under its *original* `seq` and `tx_id`, not
//! as a new insert: a new insert would get a newer `tx_id` than the rows of its key that waited,
//! and the relay, reading in `(tx_id, seq)` order, would publish them first. Under its old ids the
//! row is read before them. An old `tx_id` is below the relay's cursor, which is why both `retry`
//! and `discard` bump `outbox_settings.quarantine_version` in their transaction: the relay reads
//! from the head when it sees the version change, and the waiting rows (below the cursor too)
//! become readable in the same transaction that makes the version change visible.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, Connection, FromRow, PgConnection, PgPool};
use uuid::Uuid;

use crate::audit::{self, AuditRecord};
use crate::error::{OutboxError, Result};
use crate::migrate::shard_count;
use crate::relay::NOTIFY_CHANNEL;
use crate::schema::SchemaName;
use crate::shard::shard_of;
use crate::store::ROW_COLUMNS;
use crate::writer::printable;

/// A quarantined row, as operators see it (the payload by its size).
#[derive(Debug, Clone, FromRow)]
pub struct QuarantinedRow {
    pub seq: i64,
    /// The writing transaction's id (xid8) as text.
    #[sqlx(rename = "tx_id_text")]
    pub tx_id: String,
    pub topic: String,
    /// The key as text (a printable summary for raw rows).
    pub key: String,
    /// Raw rows: the key as published (`None`: no key).
    pub key_bytes: Option<Vec<u8>>,
    /// Whether the row is a raw record (a dead letter), published byte for byte.
    pub raw: bool,
    pub event_id: Uuid,
    pub event_type: String,
    pub payload_bytes: i32,
    /// Why the broker refused it.
    pub error: String,
    pub created_at: DateTime<Utc>,
    pub quarantined_at: DateTime<Utc>,
}

impl QuarantinedRow {
    /// The key as a terminal can show it: control characters escaped, invalid UTF-8 replaced;
    /// `(none)` for a raw row without a key.
    pub fn printable_key(&self) -> String {
        match (&self.key_bytes, self.raw) {
            (Some(bytes), _) => printable(bytes),
            (None, true) => "(none)".to_string(),
            (None, false) => printable(self.key.as_bytes()),
        }
    }
}

/// Which quarantined rows a [`retry`] puts back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    One(i64),
    All,
}

/// The quarantined rows of `schema`, in commit order.
pub async fn list(pool: &PgPool, schema: &SchemaName) -> Result<Vec<QuarantinedRow>> {
    let mut conn = pool.acquire().await?;
    check_source(&mut conn, schema).await?;
    let sql = format!(
        "SELECT seq, tx_id::text AS tx_id_text, topic, key, key_bytes, raw_header_names IS NOT NULL AS raw,
                event_id, event_type, octet_length(payload) AS payload_bytes, error, created_at,
                quarantined_at
         FROM {schema}.outbox_quarantine
         ORDER BY outbox_quarantine.tx_id, outbox_quarantine.seq"
    );
    Ok(sqlx::query_as(AssertSqlSafe(sql)).fetch_all(&mut *conn).await?)
}

/// Puts quarantined rows back into the outbox under their original `seq` and `tx_id` (see the
/// module docs for why), in one transaction, with an audit record per row naming the operator
/// `by`. Returns their seqs, in commit order. The shard is recomputed with the outbox's current
/// shard count.
pub async fn retry(pool: &PgPool, schema: &SchemaName, which: Selection, by: &str) -> Result<Vec<i64>> {
    let by = by.trim();
    if by.is_empty() {
        return Err(OutboxError::AuditRecord("retrying quarantined rows needs who (--by)".into()));
    }
    let mut conn = pool.acquire().await?;
    check_source(&mut conn, schema).await?;
    let mut tx = conn.begin().await?;
    let one = match which {
        Selection::One(seq) => Some(seq),
        Selection::All => None,
    };
    let rows: Vec<(i64, String, String, Uuid)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT seq, key, topic, event_id FROM {schema}.outbox_quarantine
         WHERE $1::bigint IS NULL OR seq = $1
         ORDER BY tx_id, seq
         FOR UPDATE"
    )))
    .bind(one)
    .fetch_all(&mut *tx)
    .await?;
    if let (Some(seq), true) = (one, rows.is_empty()) {
        return Err(OutboxError::NotQuarantined { schema: schema.to_string(), seq });
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    // The writer's hash, on the same text column it hashed: the shard count may have changed
    // while the row was away (`set_shard_count` only waits for the outbox to be empty).
    let shards = shard_count(&mut tx, schema).await?;
    let (seqs, row_shards): (Vec<i64>, Vec<i32>) =
        rows.iter().map(|(seq, key, ..)| (*seq, shard_of(key, shards) as i32)).unzip();
    sqlx::query(AssertSqlSafe(format!(
        "WITH moved AS (
             DELETE FROM {schema}.outbox_quarantine WHERE seq = ANY($1) RETURNING {ROW_COLUMNS})
         INSERT INTO {schema}.outbox ({ROW_COLUMNS}) OVERRIDING SYSTEM VALUE
         SELECT seq, tx_id, f.shard, topic, key, event_id, event_type, content_type, payload, headers,
                traceparent, created_at, key_bytes, raw_header_names, raw_header_values
         FROM moved JOIN unnest($1::bigint[], $2::int[]) AS f(seq, shard) USING (seq)"
    )))
    .bind(&seqs)
    .bind(row_shards)
    .execute(&mut *tx)
    .await?;
    let records: Vec<AuditRecord> = rows
        .iter()
        .map(|(seq, _, topic, event_id)| {
            AuditRecord::by_operator(by, "outbox.quarantine_retried", "outbox_row", seq.to_string())
                .change("state", "quarantined", "outbox")
                .change("topic", Value::Null, topic.as_str())
                .change("event_id", Value::Null, event_id.to_string())
                .cause("command:trialflow outbox quarantine retry")
        })
        .collect();
    audit::append(&mut tx, schema, &records).await?;
    changed(&mut tx, schema).await?;
    tx.commit().await?;
    Ok(seqs)
}

/// Deletes a quarantined row for good, recording its content with who discarded it, why and
/// when in `outbox_quarantine_discarded`, and an audit record (same transaction). The later rows
/// of its key flow on.
pub async fn discard(pool: &PgPool, schema: &SchemaName, seq: i64, by: &str, reason: &str) -> Result<()> {
    let (by, reason) = (by.trim(), reason.trim());
    if by.is_empty() || reason.is_empty() {
        return Err(OutboxError::DiscardUnaccounted { seq });
    }
    let mut conn = pool.acquire().await?;
    check_source(&mut conn, schema).await?;
    let mut tx = conn.begin().await?;
    let done: Option<(String, Uuid, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "WITH gone AS (
             DELETE FROM {schema}.outbox_quarantine WHERE seq = $1
             RETURNING {ROW_COLUMNS}, error, quarantined_at)
         INSERT INTO {schema}.outbox_quarantine_discarded
             ({ROW_COLUMNS}, error, quarantined_at, discarded_by, reason)
         SELECT {ROW_COLUMNS}, error, quarantined_at, $2, $3 FROM gone
         RETURNING topic, event_id, event_type"
    )))
    .bind(seq)
    .bind(by)
    .bind(reason)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((topic, event_id, event_type)) = done else {
        return Err(OutboxError::NotQuarantined { schema: schema.to_string(), seq });
    };
    let record = AuditRecord::by_operator(by, "outbox.quarantine_discarded", "outbox_row", seq.to_string())
        .change("state", "quarantined", "discarded")
        .change("topic", Value::Null, topic)
        .change("event_id", Value::Null, event_id.to_string())
        .change("event_type", Value::Null, event_type)
        .reason(reason)
        .cause("command:trialflow outbox quarantine discard");
    audit::append(&mut tx, schema, &[record]).await?;
    changed(&mut tx, schema).await?;
    tx.commit().await?;
    Ok(())
}

/// Tells the relays, in the caller's transaction, that a quarantined row left: the version
/// makes them read from the head (reliably, see [`crate::store::Store`]), the notification wakes
/// them now.
async fn changed(conn: &mut PgConnection, schema: &SchemaName) -> Result<()> {
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {schema}.outbox_settings SET quarantine_version = quarantine_version + 1"
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_CHANNEL)
        .bind(schema.as_str())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Fails with [`OutboxError::UnknownSource`] unless `schema` has an outbox quarantine.
async fn check_source(conn: &mut PgConnection, schema: &SchemaName) -> Result<()> {
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!("{schema}.outbox_quarantine"))
        .fetch_one(&mut *conn)
        .await?;
    match table {
        Some(_) => Ok(()),
        None => Err(OutboxError::UnknownSource(schema.to_string())),
    }
}
