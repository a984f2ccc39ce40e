//! Exactly-once publication (`OUTBOX_EXACTLY_ONCE=true`).
//!
//! The default relay publishes at least once: a relay that lost its shards while batches were in
//! flight (paused, cut off) may still publish them after the new owner did. Consumers dedupe by
//! event id, but other readers of the topics (a data-lake sink, an analytics job) would see the
//! duplicates. In this mode:
//!
//! * **Fencing.** Each shard has its own transactional producer whose `transactional.id` is the
//!   shard's (`<OUTBOX_TRANSACTIONAL_ID_PREFIX><source>.<shard>`). A relay that takes a shard over
//!   calls `init_transactions` before it reads a row: Kafka bumps the id's producer epoch, aborts
//!   the previous owner's open transaction and refuses everything it sends from then on
//!   (`ProducerFenced`).
//! * **One transaction per shard and batch.** The rows of a shard read in one batch go out in one
//!   transaction, which also writes a marker to the state topic (`OUTBOX_STATE_TOPIC`, compacted,
//!   key = the transactional id) naming the rows (seq and event id). The rows are deleted only after the
//!   commit, and the shard's next transaction starts only after that delete.
//! * **Recovery.** A relay can die between a commit and its delete; the rows are then published
//!   but still in the outbox. So at most one committed-but-undeleted transaction exists per shard,
//!   its last, and its marker names its rows: a new owner, once `init_transactions` has settled
//!   the previous owner's transaction (committed or aborted), reads the state topic
//!   (`read_committed`) to its end and deletes the rows of each adopted shard's last marker before
//!   it reads the outbox.
//! * **Readers** must read `read_committed` (librdkafka's and the consumers' default; Java's
//!   default is `read_uncommitted`): they then see each row once, in per-key order; a fenced or
//!   aborted transaction's records are never delivered to them.
//!
//! A row the broker refuses for good aborts its shard's transaction: the row is quarantined as in
//! the default mode and the shard's other rows are read again and go out in the next
//! transaction.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tracing::{debug, info};

use crate::config::RelayConfig;
use crate::error::{OutboxError, Result};
use crate::publisher::{self, Fault, SendError};
use crate::relay::{Refused, Sent};
use crate::schema::SchemaName;
use crate::store::{OutboxRow, Store};

/// Bound of each blocking transaction call (init, begin, commit, abort): within the default
/// shutdown grace.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The transaction timeout the relay's producers ask for unless `KAFKA_PRODUCER_CONFIG` sets
/// `transaction.timeout.ms`: how long a paused relay's open transaction holds back
/// `read_committed` readers before the broker aborts it, if no relay takes its shard over first.
const TRANSACTION_TIMEOUT_MS: &str = "10000";

/// `retry.backoff.ms` of the transactional producers unless `KAFKA_PRODUCER_CONFIG` sets it.
const RETRY_BACKOFF_MS: &str = "5";

/// What a transaction records on the state topic: the rows it published, by seq and event id. A
/// new owner deletes only rows that match both, so a marker written by anyone else (a forged or
/// corrupted one: seqs can be guessed, event ids of unpublished rows cannot) deletes nothing; a
/// marker that does not parse is ignored.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    seqs: Vec<i64>,
    event_ids: Vec<uuid::Uuid>,
}

/// The transactional producers of one relay session on one source, one per owned shard.
pub(crate) struct Transactions {
    config: Arc<RelayConfig>,
    source: SchemaName,
    producers: BTreeMap<i32, FutureProducer>,
}

/// What one batch's transactions did.
#[derive(Default)]
pub(crate) struct Outcome {
    /// Rows of committed transactions: delete them.
    pub committed: Vec<i64>,
    /// Rows the broker refuses for good: quarantine them.
    pub refused: Vec<Refused>,
    /// Whether a shard's transaction was aborted for a refused row: its other rows are still in
    /// the outbox and must be read again.
    pub aborted: bool,
}

impl Transactions {
    pub(crate) fn new(config: Arc<RelayConfig>, source: SchemaName) -> Self {
        Self { config, source, producers: BTreeMap::new() }
    }

    fn transactional_id(&self, shard: i32) -> String {
        transactional_id(&self.config.transactional_id_prefix, &self.source, shard)
    }

    fn producer(&self, shard: i32) -> Result<FutureProducer> {
        let kafka = &self.config.kafka;
        let mut config =
            publisher::producer_config(kafka, &format!("trialflow-relay-{}-{shard}", self.source));
        config.set("transactional.id", self.transactional_id(shard));
        if !kafka.producer_sets("transaction.timeout.ms") {
            config.set("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS);
        }
        // A transaction that starts right after the previous commit is often told to wait
        // (CONCURRENT_TRANSACTIONS) while the coordinator writes the commit markers; librdkafka
        // asks again after `retry.backoff.ms`, 100 ms by default, which would then bound every
        // shard at about one transaction per 100 ms. (Back-offs still grow exponentially up to
        // `retry.backoff.max.ms` during an outage.)
        if !kafka.producer_sets("retry.backoff.ms") {
            config.set("retry.backoff.ms", RETRY_BACKOFF_MS);
        }
        config.create().map_err(OutboxError::KafkaConfig)
    }

    /// Follows the lease: drops the producers of shards no longer `owned` and takes the newly
    /// owned ones over (fences their previous owner, deletes the rows its last committed
    /// transaction published). Call it after every rebalance, before reading.
    pub(crate) async fn adopt(&mut self, owned: &[i32], store: &Store, pool: &PgPool) -> Result<()> {
        self.producers.retain(|shard, _| owned.contains(shard));
        let new: Vec<i32> = owned.iter().copied().filter(|s| !self.producers.contains_key(s)).collect();
        if new.is_empty() {
            return Ok(());
        }
        let mut inits = tokio::task::JoinSet::new();
        for &shard in &new {
            let producer = self.producer(shard)?;
            inits.spawn(async move {
                let p = producer.clone();
                blocking(shard, move || p.init_transactions(TIMEOUT)).await.map(|()| (shard, producer))
            });
        }
        let mut fresh = BTreeMap::new();
        while let Some(init) = inits.join_next().await {
            let (shard, producer) = init.map_err(|e| panicked(new[0], &e))??;
            fresh.insert(shard, producer);
        }
        let ids: HashMap<String, i32> = new.iter().map(|s| (self.transactional_id(*s), *s)).collect();
        let (kafka, topic) = (self.config.kafka.clone(), self.config.state_topic.clone());
        let wanted: HashSet<String> = ids.keys().cloned().collect();
        let last = tokio::task::spawn_blocking(move || read_state(&kafka, &topic, &wanted))
            .await
            .map_err(|e| panicked(new[0], &e))??;
        for (id, marker) in last {
            let removed = store.delete_published(pool, &marker.seqs, &marker.event_ids).await?;
            if removed > 0 {
                info!(
                    source = %self.source,
                    shard = ids[&id],
                    rows = removed,
                    "Took over a shard whose last transaction was committed but its rows not yet deleted; deleted them."
                );
            }
        }
        debug!(source = %self.source, shards = ?new, "Shards taken over; their previous owner is fenced.");
        self.producers.extend(fresh);
        Ok(())
    }

    /// Publishes `rows` (of owned shards, in read order) in one transaction per shard, the shards
    /// side by side.
    pub(crate) async fn publish(&self, rows: Vec<OutboxRow>) -> Result<Outcome> {
        let mut by_shard: BTreeMap<i32, Vec<OutboxRow>> = BTreeMap::new();
        for row in rows {
            by_shard.entry(row.shard).or_default().push(row);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (shard, rows) in by_shard {
            // Rows are read from owned shards only, and every owned shard was adopted.
            let producer = self.producers.get(&shard).cloned().ok_or_else(|| {
                OutboxError::Database(sqlx::Error::Protocol(format!(
                    "read a row of shard {shard}, which has no transactional producer"
                )))
            })?;
            let marker = (self.config.state_topic.clone(), self.transactional_id(shard));
            tasks.spawn(publish_shard(shard, producer, rows, marker));
        }
        let mut outcome = Outcome::default();
        let mut failure = None;
        while let Some(done) = tasks.join_next().await {
            match done.map_err(|e| panicked(-1, &e)).and_then(|r| r) {
                Ok(shard) => {
                    outcome.committed.extend(shard.committed);
                    outcome.refused.extend(shard.refused);
                    outcome.aborted |= shard.aborted;
                }
                Err(error) => failure = failure.or(Some(error)),
            }
        }
        // The committed shards' rows are reported even when another shard failed: the caller
        // deletes them before the session ends.
        match failure {
            Some(error) if outcome.committed.is_empty() => Err(error),
            Some(error) => {
                debug!(source = %self.source, %error, "A shard's transaction failed beside committed ones.");
                outcome.aborted = true;
                Ok(outcome)
            }
            None => Ok(outcome),
        }
    }
}

/// The transactional id of `shard` of `source`.
pub fn transactional_id(prefix: &str, source: &SchemaName, shard: i32) -> String {
    format!("{prefix}{source}.{shard}")
}

fn panicked(shard: i32, error: &tokio::task::JoinError) -> OutboxError {
    tracing::error!(shard, %error, "A transaction task failed.");
    OutboxError::Transaction { shard, source: KafkaError::Canceled }
}

/// Runs a blocking transaction call of librdkafka on a blocking thread.
async fn blocking<T: Send + 'static>(
    shard: i32,
    call: impl FnOnce() -> KafkaResult<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| panicked(shard, &e))?
        .map_err(|source| OutboxError::Transaction { shard, source })
}

/// One shard's transaction.
#[derive(Default)]
struct ShardOutcome {
    committed: Vec<i64>,
    refused: Vec<Refused>,
    aborted: bool,
}

async fn publish_shard(
    shard: i32,
    producer: FutureProducer,
    rows: Vec<OutboxRow>,
    (state_topic, marker_key): (String, String),
) -> Result<ShardOutcome> {
    let p = producer.clone();
    blocking(shard, move || p.begin_transaction()).await?;
    let mut outcome = ShardOutcome::default();
    let mut deliveries: Vec<(Sent, DeliveryFuture)> = Vec::with_capacity(rows.len());
    let mut refused_keys: HashSet<&str> = HashSet::new();
    for row in &rows {
        if refused_keys.contains(row.key.as_str()) {
            continue;
        }
        let mut sent = Sent::of(row);
        loop {
            match publisher::send(&producer, row, &sent.span) {
                Ok(delivery) => deliveries.push((sent, delivery)),
                // librdkafka drains its queue on its own threads.
                Err(SendError::QueueFull) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                // Refused at hand-off: never part of the transaction.
                Err(SendError::Failed(OutboxError::Delivery { source, .. }))
                    if publisher::classify(&source) == Fault::Row =>
                {
                    sent.span.failed(&source);
                    outcome.refused.push(Refused { row: sent, error: source });
                    refused_keys.insert(&row.key);
                }
                Err(SendError::Failed(error)) => {
                    abort(shard, &producer).await;
                    return Err(error);
                }
            }
            break;
        }
    }
    let seqs: Vec<i64> = deliveries.iter().map(|(row, _)| row.seq).collect();
    let sent: HashSet<i64> = seqs.iter().copied().collect();
    let event_ids = rows.iter().filter(|r| sent.contains(&r.seq)).map(|r| r.event_id).collect();
    let marker = serde_json::to_vec(&Marker { seqs: seqs.clone(), event_ids }).unwrap_or_default();
    let record = FutureRecord::to(&state_topic).key(&marker_key).payload(&marker);
    if let Err((source, _)) = producer.send_result(record) {
        abort(shard, &producer).await;
        return Err(OutboxError::Transaction { shard, source });
    }
    let p = producer.clone();
    match blocking(shard, move || p.commit_transaction(TIMEOUT)).await {
        Ok(()) => {
            outcome.committed = seqs;
            Ok(outcome)
        }
        Err(OutboxError::Transaction { source: KafkaError::Transaction(error), .. })
            if error.txn_requires_abort() =>
        {
            abort(shard, &producer).await;
            // Which records the broker refused for good (the others were aborted with them).
            for (row, delivery) in deliveries {
                if let Ok(Err((error, _))) = delivery.await
                    && publisher::classify(&error) == Fault::Row
                {
                    outcome.refused.push(Refused { row, error });
                }
            }
            if outcome.refused.is_empty() {
                return Err(OutboxError::Transaction { shard, source: KafkaError::Transaction(error) });
            }
            outcome.aborted = true;
            Ok(outcome)
        }
        Err(error) => Err(error),
    }
}

/// Aborts the open transaction; best effort (a fenced producer cannot, and needs not).
async fn abort(shard: i32, producer: &FutureProducer) {
    let p = producer.clone();
    if let Err(error) = blocking(shard, move || p.abort_transaction(TIMEOUT)).await {
        debug!(shard, %error, "Cannot abort the transaction.");
    }
}

/// At start: the state topic exists. A broker that cannot be asked now is not an error (the relay
/// retries as for any outage); a cluster that answers without the topic is.
pub(crate) async fn check_state_topic(config: &RelayConfig) -> Result<()> {
    let (kafka, topic) = (config.kafka.clone(), config.state_topic.clone());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = state_reader(&kafka)?;
        let Ok(metadata) = consumer.fetch_metadata(Some(&topic), TIMEOUT) else { return Ok(()) };
        match metadata.topics().iter().find(|t| t.name() == topic) {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
            Some(t)
                if t.error().is_some_and(|e| {
                    e != rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART
                }) =>
            {
                Ok(())
            }
            _ => Err(missing_state_topic(&topic)),
        }
    })
    .await
    .map_err(|e| panicked(-1, &e))?
}

fn missing_state_topic(topic: &str) -> OutboxError {
    OutboxError::Setting(format!(
        "the exactly-once relay's state topic `{topic}` does not exist: create it with `trialflow topics \
         apply` (or set OUTBOX_STATE_TOPIC)"
    ))
}

/// A `read_committed` reader of the state topic.
fn state_reader(kafka: &crate::config::KafkaConfig) -> Result<BaseConsumer> {
    let mut config = kafka.client("trialflow-relay-state", |config| {
        config
            .set("group.id", format!("trialflow-relay-state-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "50");
    });
    // Recovery is only right on committed markers, whatever KAFKA_CONFIG says.
    config.set("isolation.level", "read_committed");
    config.create().map_err(OutboxError::KafkaConfig)
}

/// How long the state topic may take to be readable to its end: a transaction left open by a
/// paused relay holds `read_committed` readers back until it is fenced or times out.
const STATE_READ_DEADLINE: Duration = Duration::from_secs(30);

/// The last marker of each transactional id in `wanted`, read `read_committed` from the state
/// topic's beginning to its end.
fn read_state(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    wanted: &HashSet<String>,
) -> Result<HashMap<String, Marker>> {
    let consumer = state_reader(kafka)?;
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT).map_err(OutboxError::KafkaConfig)?;
    let missing = || missing_state_topic(topic);
    let described = metadata.topics().iter().find(|t| t.name() == topic).ok_or_else(missing)?;
    if described.error().is_some() || described.partitions().is_empty() {
        return Err(missing());
    }
    let mut assignment = TopicPartitionList::new();
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for partition in described.partitions() {
        let (_, high) =
            consumer.fetch_watermarks(topic, partition.id(), TIMEOUT).map_err(OutboxError::KafkaConfig)?;
        if high > 0 {
            ends.insert(partition.id(), high);
            assignment
                .add_partition_offset(topic, partition.id(), Offset::Beginning)
                .map_err(OutboxError::KafkaConfig)?;
        }
    }
    let mut last = HashMap::new();
    if ends.is_empty() {
        return Ok(last);
    }
    consumer.assign(&assignment).map_err(OutboxError::KafkaConfig)?;
    let deadline = Instant::now() + STATE_READ_DEADLINE;
    while !ends.is_empty() {
        if Instant::now() >= deadline {
            return Err(OutboxError::TopicsNotReady(format!(
                "the state topic `{topic}` was not readable to its end within {}s (partitions {:?}): a \
                 transaction is open, e.g. a paused relay's, until it is fenced or times out",
                STATE_READ_DEADLINE.as_secs(),
                ends.keys().collect::<Vec<_>>()
            )));
        }
        match consumer.poll(Duration::from_millis(100)) {
            // Nothing more for now: done with the partitions whose position reached their end
            // (the position moves past the transaction markers at the end).
            None => {
                let position = consumer.position().map_err(OutboxError::KafkaConfig)?;
                ends.retain(|partition, end| {
                    let at = position.find_partition(topic, *partition).and_then(|p| p.offset().to_raw());
                    at.is_none_or(|at| at < *end)
                });
            }
            Some(Err(error)) => return Err(OutboxError::KafkaConfig(error)),
            Some(Ok(message)) => {
                let key = message.key().map(String::from_utf8_lossy).unwrap_or_default();
                if wanted.contains(key.as_ref())
                    && let Some(marker) =
                        message.payload().and_then(|p| serde_json::from_slice::<Marker>(p).ok())
                {
                    last.insert(key.into_owned(), marker);
                }
                if ends.get(&message.partition()).is_some_and(|end| message.offset() + 1 >= *end) {
                    ends.remove(&message.partition());
                }
            }
        }
    }
    Ok(last)
}
