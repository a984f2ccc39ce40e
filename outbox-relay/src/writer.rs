//! The outbox writer: how a service publishes an event, inside its own transaction.

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::error::Result;
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

/// The outbox of one service schema.
#[derive(Debug, Clone)]
pub struct Outbox {
    schema: SchemaName,
    shard_count: u32,
    insert_sql: String,
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
        Ok(Self { schema, shard_count, insert_sql })
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
        if events.is_empty() {
            return Ok(());
        }
        let conn: &mut PgConnection = tx;
        let traceparent = current_traceparent();
        let n = events.len();
        let mut shards = Vec::with_capacity(n);
        let mut topics = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut content_types = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        for e in events {
            shards.push(shard_of(&e.key, self.shard_count) as i32);
            topics.push(e.topic.as_str());
            keys.push(e.key.as_str());
            ids.push(e.event_id);
            types.push(e.event_type.as_str());
            content_types.push(e.content_type.as_str());
            payloads.push(e.payload.as_slice());
            headers.push(sqlx::types::Json(&e.headers));
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
            .bind(vec![traceparent; n])
            .execute(conn)
            .await?;
        Ok(())
    }
}
