//! The relay's reads and deletes on one outbox table.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnectOptions;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, FromRow, PgConnection, PgPool};
use uuid::Uuid;

use crate::error::Result;
use crate::schema::SchemaName;

/// One unpublished row.
#[derive(Debug, Clone, FromRow)]
pub struct OutboxRow {
    pub seq: i64,
    /// The writing transaction's id (xid8) as text; compared in SQL only, never as text.
    #[sqlx(rename = "tx_id_text")]
    pub tx_id: String,
    /// The shard of its key.
    pub shard: i32,
    pub topic: String,
    pub key: String,
    pub event_id: Uuid,
    pub event_type: String,
    pub content_type: String,
    pub payload: Vec<u8>,
    pub headers: Json<BTreeMap<String, String>>,
    pub traceparent: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Set on raw rows (dead letters): the key as published, `None` for no key.
    pub key_bytes: Option<Vec<u8>>,
    /// Set on raw rows: the headers as published, instead of the columns above.
    pub raw_header_names: Option<Vec<Vec<u8>>>,
    pub raw_header_values: Option<Vec<Vec<u8>>>,
}

impl OutboxRow {
    /// Whether the row is a raw record, published byte for byte (see `RawRecord`).
    pub fn is_raw(&self) -> bool {
        self.raw_header_names.is_some()
    }
}

/// Position after the last row read: `(tx_id, seq)` in commit-safe order.
///
/// Safe to read on from because rows are only read below the snapshot's xmin: every transaction
/// with a smaller id has ended, and new transactions get larger ids, so no row can appear behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub tx_id: String,
    pub seq: i64,
}

impl Cursor {
    pub fn after(row: &OutboxRow) -> Self {
        Self { tx_id: row.tx_id.clone(), seq: row.seq }
    }
}

/// The backlog of one source, for the gauges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Unpublished rows in the outbox (rows waiting behind a quarantined row included).
    pub rows: i64,
    /// Age of the oldest unpublished row, in seconds.
    pub oldest_age_seconds: f64,
    /// Rows in the quarantine.
    pub quarantined: i64,
}

/// Every column of an outbox row, in the order the quarantine tables repeat them.
pub(crate) const ROW_COLUMNS: &str = "seq, tx_id, shard, topic, key, event_id, event_type, content_type, \
     payload, headers, traceparent, created_at, key_bytes, raw_header_names, raw_header_values";

/// The planner settings of the session the relay reads on (its lease session): no sort when an
/// index gives the order.
///
/// The read must walk the `(tx_id, seq)` index and stop after `limit` rows. PostgreSQL plans it
/// from the outbox's statistics, and those are usually of a near-empty table (a new outbox, or
/// one last analyzed between bursts): it then expects a few rows, fetches *every* readable row
/// with a bitmap scan and sorts them to keep the first `limit`. Each read then costs the whole
/// backlog (150 ms for 1,000 of 200,000 rows, against 0.6 ms by the index), and a backlog drains
/// in quadratic time. With sorts off the index is the only plan left that gives the order.
/// Pinned by `commit_order::the_read_walks_the_index_without_statistics`.
pub fn read_session(options: PgConnectOptions) -> PgConnectOptions {
    options.options([("enable_sort", "off")])
}

/// Prepared SQL of one source.
#[derive(Debug, Clone)]
pub struct Store {
    read_sql: String,
    /// The same read without the quarantine check, for while nothing is quarantined (the
    /// anti-join costs ~10 % of the relay's throughput even against an empty table).
    read_unguarded_sql: String,
    delete_sql: String,
    delete_published_sql: String,
    quarantine_sql: String,
    version_sql: String,
    stats_sql: String,
}

impl Store {
    pub fn new(schema: &SchemaName) -> Self {
        // The relay's read, in commit-safe order, with `condition` added to its filter.
        let read = |condition: &str| {
            format!(
                "SELECT seq, tx_id::text AS tx_id_text, shard, topic, key, event_id, event_type, content_type,
                        payload, headers, traceparent, created_at, key_bytes, raw_header_names,
                        raw_header_values
                 FROM {schema}.outbox
                 WHERE shard = ANY($1)
                   AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
                   AND (tx_id, seq) > ($2::text::xid8, $3)
                   {condition}
                 -- Qualified: ordering by the text alias would sort ids as strings ('10' < '9').
                 ORDER BY outbox.tx_id, outbox.seq
                 LIMIT $4"
            )
        };
        Self {
            read_sql: read(&format!(
                // Per-key order across the quarantine: a row waits while an earlier row of its
                // key is quarantined (earlier rows of the key, and every other key, flow on). The
                // cursor moves past the rows skipped here; they are read again because they can
                // only become readable when a quarantined row leaves (retry or discard), which
                // bumps `outbox_settings.quarantine_version` in the same transaction, and the
                // relay reads from the head whenever that version changes (see `relay.rs`). The
                // relay's own quarantining only adds blocks.
                "AND NOT EXISTS (
                     SELECT 1 FROM {schema}.outbox_quarantine q
                     WHERE q.key = outbox.key AND (q.tx_id, q.seq) < (outbox.tx_id, outbox.seq))"
            )),
            read_unguarded_sql: read(""),
            delete_sql: format!("DELETE FROM {schema}.outbox WHERE seq = ANY($1)"),
            delete_published_sql: format!(
                "DELETE FROM {schema}.outbox o
                 USING unnest($1::bigint[], $2::uuid[]) AS p(seq, event_id)
                 WHERE o.seq = p.seq AND o.event_id = p.event_id"
            ),
            // One statement, so one transaction: a row is in the outbox or in the quarantine,
            // never in both or neither.
            quarantine_sql: format!(
                "WITH moved AS (
                     DELETE FROM {schema}.outbox WHERE seq = ANY($1) RETURNING {ROW_COLUMNS})
                 INSERT INTO {schema}.outbox_quarantine ({ROW_COLUMNS}, error)
                 SELECT {ROW_COLUMNS}, f.error
                 FROM moved JOIN unnest($1::bigint[], $2::text[]) AS f(seq, error) USING (seq)"
            ),
            version_sql: format!(
                "SELECT quarantine_version, EXISTS (SELECT 1 FROM {schema}.outbox_quarantine)
                 FROM {schema}.outbox_settings"
            ),
            stats_sql: format!(
                "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at))::float8, 0),
                        (SELECT count(*) FROM {schema}.outbox_quarantine)
                 FROM {schema}.outbox"
            ),
        }
    }

    /// The next rows of `shards` after `cursor`, oldest transaction first.
    pub async fn read_batch(
        &self,
        conn: &mut PgConnection,
        shards: &[i32],
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> Result<Vec<OutboxRow>> {
        self.read_batch_checked(conn, shards, cursor, limit, true).await
    }

    /// [`Store::read_batch`], checking the quarantine only when `quarantined` says a row may be
    /// there: rows of a key are in one shard, and only the shard's owner quarantines them, so the
    /// owner knows when it must look (see [`Store::quarantine_version`]).
    pub async fn read_batch_checked(
        &self,
        conn: &mut PgConnection,
        shards: &[i32],
        cursor: Option<&Cursor>,
        limit: u32,
        quarantined: bool,
    ) -> Result<Vec<OutboxRow>> {
        let (tx_id, seq) = cursor.map_or(("0", 0), |c| (c.tx_id.as_str(), c.seq));
        let sql = if quarantined { &self.read_sql } else { &self.read_unguarded_sql };
        Ok(sqlx::query_as(AssertSqlSafe(sql.as_str()))
            .bind(shards)
            .bind(tx_id)
            .bind(seq)
            .bind(i64::from(limit))
            .fetch_all(conn)
            .await?)
    }

    /// The plan PostgreSQL gives [`Store::read_batch_checked`] on `conn` (`EXPLAIN` text), to check
    /// that the read walks the index (see [`read_session`]).
    pub async fn explain_read(
        &self,
        conn: &mut PgConnection,
        shards: &[i32],
        limit: u32,
        quarantined: bool,
    ) -> Result<String> {
        let sql = if quarantined { &self.read_sql } else { &self.read_unguarded_sql };
        let lines: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN {sql}")))
            .bind(shards)
            .bind("0")
            .bind(0i64)
            .bind(i64::from(limit))
            .fetch_all(conn)
            .await?;
        Ok(lines.join("\n"))
    }

    /// Deletes rows the broker acknowledged; returns how many were still there.
    pub async fn delete(&self, pool: &PgPool, seqs: &[i64]) -> Result<u64> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(AssertSqlSafe(self.delete_sql.as_str())).bind(seqs).execute(pool).await?;
        Ok(done.rows_affected())
    }

    /// Deletes the rows that match both a seq and its event id (pairs in order); returns how many
    /// were there. For rows named by a record of the exactly-once relay's state topic.
    pub async fn delete_published(&self, pool: &PgPool, seqs: &[i64], event_ids: &[Uuid]) -> Result<u64> {
        if seqs.is_empty() || seqs.len() != event_ids.len() {
            return Ok(0);
        }
        let done = sqlx::query(AssertSqlSafe(self.delete_published_sql.as_str()))
            .bind(seqs)
            .bind(event_ids)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Moves rows the broker refuses for good to the quarantine, each with its error. Returns
    /// how many were moved (a row already gone is skipped).
    pub async fn quarantine(&self, pool: &PgPool, rows: &[(i64, String)]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let (seqs, errors): (Vec<i64>, Vec<&str>) = rows.iter().map(|(s, e)| (*s, e.as_str())).unzip();
        let done = sqlx::query(AssertSqlSafe(self.quarantine_sql.as_str()))
            .bind(seqs)
            .bind(errors)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// The quarantine's version (it changes whenever a quarantined row leaves) and whether any row
    /// is quarantined.
    pub async fn quarantine_version(&self, conn: &mut PgConnection) -> Result<(i64, bool)> {
        Ok(sqlx::query_as(AssertSqlSafe(self.version_sql.as_str())).fetch_one(conn).await?)
    }

    /// Unpublished rows, the age of the oldest and the quarantined rows.
    pub async fn stats(&self, pool: &PgPool) -> Result<Stats> {
        let (rows, oldest_age_seconds, quarantined) =
            sqlx::query_as(AssertSqlSafe(self.stats_sql.as_str())).fetch_one(pool).await?;
        Ok(Stats { rows, oldest_age_seconds, quarantined })
    }
}
