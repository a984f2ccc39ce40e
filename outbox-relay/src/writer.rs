//! The outbox writer: how a service publishes an event, inside its own transaction.

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::error::{OutboxError, Result};
use crate::migrate::shard_count;
use crate::schema::SchemaName;
use crate::shard::shard_of;
use crate::trace::current_traceparent;

/// An event to publish once the surrounding transaction commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Kafka topic, e.g. `clinical.vital-signs.v1`.
    pub topic: String,
    /// Kafka key: the aggregate id whose events must stay in order (subject id, site id, ...).
    pub key: String,
    /// The event type name, sent as the `event_type` header.
    pub event_type: String,
    /// Unique id of the event; consumers deduplicate on it.
    pub event_id: Uuid,
    /// MIME type of `payload`, sent as the `content-type` header.
    pub content_type: String,
    /// The encoded event.
    pub payload: Vec<u8>,
    /// Extra Kafka headers (string values).
    pub headers: BTreeMap<String, String>,
}

impl OutboxEvent {
    /// An event of the catalogue, Avro single-object encoded, to `topic` (the deployed name of
    /// `E::TOPIC`, see [`trialflow_schemas::topics::TopicNames`]) under `key`.
    pub fn avro<E: trialflow_schemas::Event>(
        event: &E,
        topic: String,
        key: impl Into<String>,
    ) -> std::result::Result<Self, trialflow_schemas::CodecError> {
        Ok(Self {
            topic,
            key: key.into(),
            event_type: E::NAME.to_string(),
            event_id: event.envelope().event_id,
            content_type: trialflow_schemas::CONTENT_TYPE.to_string(),
            payload: trialflow_schemas::encode(event)?,
            headers: BTreeMap::new(),
        })
    }
}

/// The largest event, in bytes (payload, key and headers), that [`Outbox::enqueue`] accepts.
/// Below Kafka's default `message.max.bytes` (1 MiB) with room for the record overhead, so an
/// accepted event is one the broker takes.
pub const MAX_EVENT_BYTES: usize = 900 * 1024;

/// The largest raw record (a dead letter), in bytes. A dead letter carries a message the broker
/// accepted (at most its `message.max.bytes`) plus the `dlq.*` headers; the relay's producer and
/// the dead-letter topics allow records up to [`crate::publisher::MAX_RECORD_BYTES`].
pub const MAX_RAW_RECORD_BYTES: usize = 1_900 * 1024;

/// A record published byte for byte: key and header values of any bytes (NUL, invalid UTF-8).
/// What a dead letter is made of; services publish [`OutboxEvent`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub topic: String,
    /// The Kafka key; `None` publishes without a key.
    pub key: Option<Vec<u8>>,
    /// The id the row is known by (the original event's when it had a readable one).
    pub event_id: Uuid,
    /// A printable name for operators (the original `event_type` header when readable).
    pub event_type: String,
    pub payload: Vec<u8>,
    /// Every header, in order, published exactly as given.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RawRecord {
    fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.payload.len()
            + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }
}

/// `bytes` as text a text column takes: invalid UTF-8 replaced, NUL and other control characters
/// escaped (`\u{0}`), so the summary columns of a raw row never fail on input.
pub fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().flat_map(char::escape_debug).collect()
}

impl OutboxEvent {
    /// Its size as [`MAX_EVENT_BYTES`] counts it: key, payload and headers.
    pub fn size(&self) -> usize {
        self.key.len()
            + self.payload.len()
            + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }
}

/// The outbox of one service schema.
#[derive(Debug, Clone)]
pub struct Outbox {
    schema: SchemaName,
    shard_count: u32,
    insert_sql: String,
    insert_raw_sql: String,
}

impl Outbox {
    /// Opens the outbox of `schema`, reading its shard count (fixed per outbox, see migrations).
    pub async fn open(pool: &PgPool, schema: SchemaName) -> Result<Self> {
        let mut conn = pool.acquire().await?;
        let shard_count = shard_count(&mut conn, &schema).await?;
        let insert_sql = format!(
            "INSERT INTO {schema}.outbox
                 (shard, topic, key, event_id, event_type, content_type, payload, headers, traceparent)
             SELECT s, t, k, i, e, c, p, h, tp
             FROM unnest($1::int[], $2::text[], $3::text[], $4::uuid[], $5::text[],
                         $6::text[], $7::bytea[], $8::jsonb[], $9::text[])
                  WITH ORDINALITY AS u(s, t, k, i, e, c, p, h, tp, ord)
             ORDER BY ord"
        );
        let insert_raw_sql = format!(
            "INSERT INTO {schema}.outbox (shard, topic, key, event_id, event_type, content_type, payload,
                 key_bytes, raw_header_names, raw_header_values)
             VALUES ($1, $2, $3, $4, $5, 'application/octet-stream', $6, $7, $8, $9)"
        );
        Ok(Self { schema, shard_count, insert_sql, insert_raw_sql })
    }

    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    /// Queues `event` in the caller's transaction: it is published if and only if that
    /// transaction commits. The current span's `traceparent` travels with it.
    pub async fn enqueue(&self, tx: &mut Transaction<'_, Postgres>, event: OutboxEvent) -> Result<()> {
        self.enqueue_all(tx, std::slice::from_ref(&event)).await
    }

    /// Queues several events in the caller's transaction, in the given order, with one statement.
    pub async fn enqueue_all(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[OutboxEvent],
    ) -> Result<()> {
        let traceparent = current_traceparent();
        self.insert(tx, events.iter().map(|e| (e, traceparent.as_deref())).collect()).await
    }

    /// Queues events gathered earlier, in the given order, with one statement, each with the
    /// `traceparent` of the span it was made in (taken with
    /// [`crate::trace::current_traceparent`] then): a consumer that writes a whole batch's events
    /// at its end keeps each message's trace.
    pub async fn enqueue_traced(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[(OutboxEvent, Option<String>)],
    ) -> Result<()> {
        self.insert(tx, events.iter().map(|(e, t)| (e, t.as_deref())).collect()).await
    }

    async fn insert(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: Vec<(&OutboxEvent, Option<&str>)>,
    ) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        if let Some((e, _)) = events.iter().find(|(e, _)| e.size() > MAX_EVENT_BYTES) {
            return Err(OutboxError::TooLarge {
                topic: e.topic.clone(),
                event_type: e.event_type.clone(),
                bytes: e.size(),
                limit: MAX_EVENT_BYTES,
            });
        }
        let conn: &mut PgConnection = tx;
        let n = events.len();
        let mut shards = Vec::with_capacity(n);
        let mut topics = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut content_types = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        let mut traceparents = Vec::with_capacity(n);
        for (e, traceparent) in events {
            shards.push(shard_of(&e.key, self.shard_count) as i32);
            topics.push(e.topic.as_str());
            keys.push(e.key.as_str());
            ids.push(e.event_id);
            types.push(e.event_type.as_str());
            content_types.push(e.content_type.as_str());
            payloads.push(e.payload.as_slice());
            headers.push(sqlx::types::Json(&e.headers));
            traceparents.push(traceparent);
        }
        // Rows are inserted in array order, so `seq` follows the order the caller gave.
        sqlx::query(AssertSqlSafe(self.insert_sql.as_str()))
            .bind(shards)
            .bind(topics)
            .bind(keys)
            .bind(ids)
            .bind(types)
            .bind(content_types)
            .bind(payloads)
            .bind(headers)
            .bind(traceparents)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Queues `record` in the caller's transaction, to be published byte for byte. Nothing in it
    /// can make the insert fail (bytes go to bytea columns), so a dead letter never becomes a
    /// second poison; only its size is checked.
    pub async fn enqueue_raw(&self, tx: &mut Transaction<'_, Postgres>, record: &RawRecord) -> Result<()> {
        if record.size() > MAX_RAW_RECORD_BYTES {
            return Err(OutboxError::TooLarge {
                topic: record.topic.clone(),
                event_type: record.event_type.clone(),
                bytes: record.size(),
                limit: MAX_RAW_RECORD_BYTES,
            });
        }
        let key = record.key.as_deref().map(printable).unwrap_or_default();
        let (names, values): (Vec<&[u8]>, Vec<&[u8]>) =
            record.headers.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).unzip();
        let conn: &mut PgConnection = tx;
        sqlx::query(AssertSqlSafe(self.insert_raw_sql.as_str()))
            .bind(shard_of(&key, self.shard_count) as i32)
            .bind(&record.topic)
            .bind(&key)
            .bind(record.event_id)
            .bind(if record.event_type.is_empty() {
                "unknown".into()
            } else {
                printable(record.event_type.as_bytes())
            })
            .bind(&record.payload)
            .bind(record.key.as_deref())
            .bind(names)
            .bind(values)
            .execute(conn)
            .await?;
        Ok(())
    }
}
