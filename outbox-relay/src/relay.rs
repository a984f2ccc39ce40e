//! The relay: drains the outboxes of several service schemas into Kafka.
//!
//! Per source, one worker owns a share of the shards (see [`crate::shard`]), reads their rows in
//! `(tx_id, seq)` order below the snapshot xmin, hands them to the idempotent producer in batches
//! (at most `max_in_flight_batches` awaiting acknowledgement) and deletes a row only after the
//! broker acknowledged it. A transient failure (database, broker, network) drops the in-flight
//! work, backs off, and starts again from the rows still in the outbox: a row may be published
//! twice, never lost, never overtaken.
//!
//! A row the broker refuses for good ([`publisher::classify`]: topic not authorized or missing,
//! record too large, ...) stops only itself: it is moved to the quarantine (`outbox_quarantine`,
//! one transaction) with the error, the later rows of its key wait in the outbox (the read skips
//! them, see [`Store`]) and every other key flows on, in the same session, without a backoff. An
//! operator puts it back (`trialflow outbox quarantine retry`) or discards it.
//!
//! Honest limit: rows of the same key already handed to the producer when the refusal is reported
//! (the deliveries of up to `max_in_flight_batches` batches) are not recalled; if the broker takes
//! them they are published before the quarantined row comes back. Rows read afterwards wait.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, Producer};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::RelayConfig;
use crate::error::{OutboxError, Result};
use crate::exactly_once::Transactions;
use crate::metrics as m;
use crate::migrate::shard_count;
use crate::publisher::{self, Fault, SendError};
use crate::retry::{backoff_delay, sleep_or_shutdown};
use crate::schema::SchemaName;
use crate::shard::ShardLease;
use crate::store::{Cursor, OutboxRow, Store};

/// The channel outbox triggers notify on (payload: the schema name).
pub const NOTIFY_CHANNEL: &str = "trialflow_outbox";

/// `application_name` of the relay's database sessions (visible in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "trialflow-relay";

/// Runs the relay until `shutdown` is cancelled; then finishes in-flight work (up to the shutdown
/// grace) and returns. Fails only on permanent errors (bad configuration).
pub async fn run(config: RelayConfig, shutdown: CancellationToken) -> Result<()> {
    m::describe();
    if config.sources.is_empty() {
        return Err(OutboxError::InvalidSchemaName(String::new()));
    }
    let lease_timeout = config.lease_timeout().map_err(OutboxError::Setting)?;
    if config.exactly_once {
        crate::exactly_once::check_state_topic(&config).await?;
    }
    let config = Arc::new(config);
    let connect_options = config.database.connect_options()?.application_name(APPLICATION_NAME);
    // The lease sessions, which also read the rows (planned by the index, see `read_session`).
    // PostgreSQL ends one that stays silent, which frees its shards.
    let lease_options = crate::store::read_session(match lease_timeout {
        Some(timeout) => connect_options.clone().options([("idle_session_timeout", timeout.as_millis())]),
        None => connect_options.clone(),
    });
    // Lazy: a database that is down at start is retried like one that goes down later.
    let pool = PgPoolOptions::new()
        .max_connections(2 * config.sources.len() as u32 + 2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(connect_options.clone());
    let producer = publisher::build_producer(&config.kafka)?;
    crate::kafka::check_connection(&config.kafka, crate::kafka::ClientKind::Producer).await?;

    let wakers: Arc<HashMap<SchemaName, Arc<Notify>>> =
        Arc::new(config.sources.iter().map(|s| (s.clone(), Arc::new(Notify::new()))).collect());
    let mut tasks = JoinSet::new();
    tasks.spawn(listen(pool.clone(), wakers.clone(), shutdown.clone()));
    for source in &config.sources {
        let worker = SourceRelay {
            lease_options: lease_options.clone(),
            store: Store::new(source),
            source: source.clone(),
            config: config.clone(),
            pool: pool.clone(),
            producer: producer.clone(),
            wake: wakers[source].clone(),
            shutdown: shutdown.clone(),
            refused_topics: std::sync::Mutex::default(),
        };
        tasks.spawn(report_stats(
            worker.store.clone(),
            source.clone(),
            pool.clone(),
            config.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(worker.run());
    }
    let sources: Vec<&str> = config.sources.iter().map(SchemaName::as_str).collect();
    info!(sources = %sources.join(","), bootstrap = %config.kafka.bootstrap_servers, "Relay started.");
    while tasks.join_next().await.is_some() {}
    pool.close().await;
    info!("Relay stopped.");
    Ok(())
}

/// Forwards outbox notifications to the worker of their source. On a lost connection every worker
/// is woken, since notifications may have been missed meanwhile.
async fn listen(pool: PgPool, wakers: Arc<HashMap<SchemaName, Arc<Notify>>>, shutdown: CancellationToken) {
    let wake_all = || wakers.values().for_each(|w| w.notify_one());
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(error) => {
                debug!(%error, "Outbox listener cannot connect; relying on polling meanwhile.");
                failures += 1;
                sleep_or_shutdown(backoff_delay(failures, Duration::from_secs(5)), &shutdown).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(NOTIFY_CHANNEL).await {
            debug!(%error, "LISTEN failed; relying on polling meanwhile.");
            failures += 1;
            sleep_or_shutdown(backoff_delay(failures, Duration::from_secs(5)), &shutdown).await;
            continue;
        }
        wake_all();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                n = listener.try_recv() => match n {
                    Ok(Some(n)) => {
                        failures = 0;
                        if let Some(w) = SchemaName::new(n.payload()).ok().and_then(|s| wakers.get(&s)) {
                            w.notify_one();
                        }
                    }
                    // The connection was lost and will be re-established: catch up by polling.
                    Ok(None) => wake_all(),
                    Err(error) => {
                        debug!(%error, "Outbox listener lost its connection.");
                        failures += 1;
                        wake_all();
                        sleep_or_shutdown(backoff_delay(failures, Duration::from_secs(5)), &shutdown).await;
                        break;
                    }
                }
            }
        }
    }
}

/// Refreshes the backlog gauges of one source.
async fn report_stats(
    store: Store,
    source: SchemaName,
    pool: PgPool,
    config: Arc<RelayConfig>,
    shutdown: CancellationToken,
) {
    let labels = [("source", source.to_string())];
    while !shutdown.is_cancelled() {
        match store.stats(&pool).await {
            Ok(stats) => {
                metrics::gauge!(m::BACKLOG_ROWS, &labels).set(stats.rows as f64);
                metrics::gauge!(m::OLDEST_ROW_AGE_SECONDS, &labels).set(stats.oldest_age_seconds);
                metrics::gauge!(m::QUARANTINED_ROWS, &labels).set(stats.quarantined as f64);
            }
            Err(error) => debug!(%source, %error, "Cannot read outbox backlog."),
        }
        sleep_or_shutdown(config.stats_interval(), &shutdown).await;
    }
}

/// Deletes of acknowledged rows running at once, per source.
const MAX_PENDING_DELETES: usize = 2;

/// Work of one session that is not finished: batches awaiting acknowledgement (oldest first)
/// and deletes of acknowledged rows. Dropping it abandons both; the rows stay in the outbox.
#[derive(Default)]
struct Pipeline {
    batches: VecDeque<InFlight>,
    deletes: VecDeque<tokio::task::JoinHandle<Result<()>>>,
}

async fn join_delete(delete: tokio::task::JoinHandle<Result<()>>) -> Result<()> {
    delete.await.unwrap_or_else(|e| {
        Err(OutboxError::Database(sqlx::Error::Protocol(format!("delete task failed: {e}"))))
    })
}

/// A batch handed to the producer. Its acknowledgements are awaited by a task of its own, so
/// each is observed (and its latency recorded) the moment it arrives.
struct InFlight {
    started: Instant,
    acks: tokio::task::JoinHandle<Acks>,
}

/// A row handed to the producer: what the relay needs to know about it once its delivery ends.
pub(crate) struct Sent {
    pub(crate) seq: i64,
    pub(crate) key: String,
    pub(crate) topic: String,
    pub(crate) created_at: DateTime<Utc>,
    /// Ends when the delivery does (see [`publisher::PublishSpan`]).
    pub(crate) span: publisher::PublishSpan,
}

impl Sent {
    pub(crate) fn of(row: &OutboxRow) -> Self {
        Self {
            seq: row.seq,
            key: row.key.clone(),
            topic: row.topic.clone(),
            created_at: row.created_at,
            span: publisher::PublishSpan::of(row),
        }
    }
}

/// A row the broker refuses for good, on its way to the quarantine.
pub(crate) struct Refused {
    pub(crate) row: Sent,
    pub(crate) error: KafkaError,
}

/// The outcome of a batch, row by row: acknowledged rows and rows refused for good, in order, up
/// to the first transient failure (from there on every row stays in the outbox, as the session
/// starts again).
#[derive(Default)]
struct Acks {
    acked: Vec<i64>,
    refused: Vec<Refused>,
    failure: Option<OutboxError>,
}

fn canceled(seq: i64) -> OutboxError {
    OutboxError::Delivery { seq, topic: String::new(), source: KafkaError::Canceled }
}

/// Awaits the deliveries in order, each on its own: a row refused for good does not stop the
/// rows behind it; a transient failure does.
async fn await_acks(rows: Vec<(Sent, DeliveryFuture)>, commit_to_ack: metrics::Histogram) -> Acks {
    let mut acks = Acks { acked: Vec::with_capacity(rows.len()), ..Acks::default() };
    for (mut row, delivery) in rows {
        match delivery.await {
            Ok(Ok(delivery)) => {
                let age = (Utc::now() - row.created_at).to_std().unwrap_or_default();
                commit_to_ack.record(age.as_secs_f64());
                acks.acked.push(row.seq);
                row.span.acknowledged(delivery.partition, delivery.offset);
            }
            Ok(Err((error, _))) if publisher::classify(&error) == Fault::Row => {
                row.span.failed(&error);
                acks.refused.push(Refused { row, error });
            }
            Ok(Err((source, _))) => {
                row.span.failed(&source);
                acks.failure = Some(OutboxError::Delivery { seq: row.seq, topic: row.topic, source });
                break;
            }
            Err(_canceled) => {
                acks.failure = Some(canceled(row.seq));
                break;
            }
        }
    }
    acks
}

struct SourceRelay {
    source: SchemaName,
    /// How the lease session connects (see `OUTBOX_LEASE_TIMEOUT_MS`).
    lease_options: PgConnectOptions,
    store: Store,
    config: Arc<RelayConfig>,
    pool: PgPool,
    producer: FutureProducer,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    /// Topics of rows this relay quarantined. librdkafka remembers a topic it found missing or
    /// unauthorized until its next metadata refresh (`topic.metadata.refresh.interval.ms`, 5 min
    /// by default) and refuses its records at hand-off meanwhile; when rows leave the quarantine
    /// their metadata is refreshed first, so a retry after the fix is not refused again.
    refused_topics: std::sync::Mutex<HashSet<String>>,
}

impl SourceRelay {
    /// Its name in the process's readiness (`GET /readyz`).
    fn health_name(&self) -> String {
        format!("relay:{}", self.source)
    }

    async fn run(self) {
        let health = self.health_name();
        crate::health::not_ready(&health, "connecting the lease session");
        crate::health::watch_database(&health, self.pool.clone());
        let mut failures = 0u32;
        while !self.shutdown.is_cancelled() {
            let error = match self.session(&mut failures).await {
                Ok(()) => break,
                Err(e) => e,
            };
            crate::health::not_ready(&health, format!("lease session failed: {error}"));
            failures += 1;
            let delay = backoff_delay(failures, self.config.max_backoff());
            let kind = if error.is_transient() { "transient" } else { "permanent" };
            metrics::counter!(m::ERRORS_TOTAL, "source" => self.source.to_string(), "kind" => kind)
                .increment(1);
            warn!(source = %self.source, %error, kind, retry_in_ms = delay.as_millis() as u64, "Relay failed; retrying.");
            sleep_or_shutdown(delay, &self.shutdown).await;
        }
        metrics::gauge!(m::OWNED_SHARDS, "source" => self.source.to_string()).set(0.0);
        crate::health::forget(&health);
    }

    /// One lease session: owns shards and publishes until shutdown (Ok) or a failure (Err). The
    /// lease connection is closed on return, which releases every shard.
    async fn session(&self, failures: &mut u32) -> Result<()> {
        let mut lease = ShardLease::connect(&self.lease_options, &self.source).await?;
        crate::health::ready(&self.health_name());
        let mut in_flight = Pipeline::default();
        let mut transactions =
            self.config.exactly_once.then(|| Transactions::new(self.config.clone(), self.source.clone()));
        let result = self.publish_loop(&mut lease, &mut in_flight, &mut transactions, failures).await;
        // On failure, whatever is still in flight is abandoned: those rows stay in the outbox and
        // are read again. librdkafka delivers queued messages in order, so a re-send can only
        // duplicate, never overtake.
        drop(in_flight);
        lease.close().await;
        result
    }

    async fn publish_loop(
        &self,
        lease: &mut ShardLease,
        in_flight: &mut Pipeline,
        transactions: &mut Option<Transactions>,
        failures: &mut u32,
    ) -> Result<()> {
        let max_in_flight = self.config.max_in_flight_batches as usize;
        let mut cursor: Option<Cursor> = None;
        let mut quarantine_version: Option<i64> = None;
        let mut next_rebalance = Instant::now();
        // After a notification that found nothing readable (an older transaction still open),
        // look again soon rather than after the full poll interval.
        let mut recheck: Option<Duration> = None;
        loop {
            if self.shutdown.is_cancelled() {
                return self.drain(in_flight).await;
            }
            if Instant::now() >= next_rebalance {
                self.drain(in_flight).await?;
                let before = lease.owned();
                let shards = shard_count(lease.conn(), &self.source).await?;
                lease.rebalance(shards).await?;
                if let Some(transactions) = transactions.as_mut() {
                    transactions.adopt(&lease.owned(), &self.store, &self.pool).await?;
                }
                metrics::gauge!(m::OWNED_SHARDS, "source" => self.source.to_string())
                    .set(lease.owned().len() as f64);
                debug!(source = %self.source, owned = ?lease.owned(), "Shard lease rebalanced.");
                // A newly owned shard may have rows behind the cursor; otherwise keep it (reading
                // from the head again would wade through the dead tuples of deleted rows).
                if lease.owned() != before {
                    cursor = None;
                }
                next_rebalance = Instant::now() + self.config.rebalance_interval();
            }
            // The cursor has moved past rows that wait behind a quarantined row of their key (the
            // read skips them). When a quarantined row leaves (retry, discard) the version
            // changes and the read starts from the head again, so they and a retried row (back
            // under its original, older tx_id) are read. Only once nothing is in flight: reading
            // from the head sooner would hand in-flight rows to the producer a second time.
            let (version, quarantined) = self.store.quarantine_version(lease.conn()).await?;
            if quarantine_version.is_some_and(|v| v != version) {
                self.drain(in_flight).await?;
                self.refresh_refused_topics().await;
                debug!(source = %self.source, version, "Quarantine changed; reading from the head.");
                cursor = None;
            }
            quarantine_version = Some(version);
            let owned = lease.owned();
            let rows = if owned.is_empty() {
                Vec::new()
            } else {
                let (conn, batch) = (lease.conn(), self.config.batch_size);
                self.store.read_batch_checked(conn, &owned, cursor.as_ref(), batch, quarantined).await?
            };
            let Some(last) = rows.last() else {
                if !in_flight.batches.is_empty() {
                    self.complete_oldest(in_flight).await?;
                    *failures = 0;
                    continue;
                }
                let poll = self.config.poll_interval();
                let wait =
                    recheck.unwrap_or(poll).min(next_rebalance.saturating_duration_since(Instant::now()));
                let notified = tokio::select! {
                    _ = self.wake.notified() => true,
                    _ = tokio::time::sleep(wait) => false,
                    _ = self.shutdown.cancelled() => false,
                };
                recheck = if notified {
                    Some(Duration::from_millis(5))
                } else {
                    recheck.map(|d| (d * 2).min(poll)).filter(|d| *d < poll)
                };
                continue;
            };
            recheck = None;
            cursor = Some(Cursor::after(last));
            if let Some(transactions) = transactions.as_ref() {
                if self.publish_transactions(transactions, rows).await? {
                    // A shard's transaction was aborted: its other rows are behind the cursor.
                    cursor = None;
                }
                *failures = 0;
                continue;
            }
            let batch = self.send_batch(rows, in_flight).await?;
            in_flight.batches.push_back(batch);
            while in_flight.batches.len() >= max_in_flight {
                self.complete_oldest(in_flight).await?;
            }
            *failures = 0;
        }
    }

    /// Hands every row to the producer, in order. A full producer queue is waited out by
    /// completing older batches, never by buffering more. A row refused at hand-off for good
    /// (librdkafka's own checks: too large, unknown topic) is quarantined at once, and the later
    /// rows of its key in this batch are not sent: they stay in the outbox, where the read skips
    /// them from now on.
    async fn send_batch(&self, rows: Vec<OutboxRow>, in_flight: &mut Pipeline) -> Result<InFlight> {
        let started = Instant::now();
        let mut deliveries = Vec::with_capacity(rows.len());
        let mut refused_keys: HashSet<&str> = HashSet::new();
        for row in &rows {
            if refused_keys.contains(row.key.as_str()) {
                continue;
            }
            let sent = Sent::of(row);
            loop {
                match publisher::send(&self.producer, row, &sent.span) {
                    Ok(delivery) => {
                        deliveries.push((sent, delivery));
                        break;
                    }
                    Err(SendError::QueueFull) if !in_flight.batches.is_empty() => {
                        self.complete_oldest(in_flight).await?
                    }
                    Err(SendError::QueueFull) => tokio::time::sleep(Duration::from_millis(5)).await,
                    Err(SendError::Failed(OutboxError::Delivery { source, .. }))
                        if publisher::classify(&source) == Fault::Row =>
                    {
                        let mut sent = sent;
                        sent.span.failed(&source);
                        self.quarantine(vec![Refused { row: sent, error: source }]).await?;
                        refused_keys.insert(&row.key);
                        break;
                    }
                    Err(SendError::Failed(e)) => return Err(e),
                }
            }
        }
        let commit_to_ack =
            metrics::histogram!(m::COMMIT_TO_ACK_SECONDS, "source" => self.source.to_string());
        Ok(InFlight { started, acks: tokio::spawn(await_acks(deliveries, commit_to_ack)) })
    }

    /// Exactly-once mode: publishes `rows` in one transaction per shard, quarantines the rows
    /// refused for good and deletes the committed ones before the shards' next transactions.
    /// Returns whether a transaction was aborted (its other rows must be read again).
    async fn publish_transactions(&self, transactions: &Transactions, rows: Vec<OutboxRow>) -> Result<bool> {
        let labels = [("source", self.source.to_string())];
        let started = Instant::now();
        let created: HashMap<i64, DateTime<Utc>> = rows.iter().map(|r| (r.seq, r.created_at)).collect();
        let outcome = transactions.publish(rows).await?;
        // Committed: visible to read_committed readers from now on.
        let now = Utc::now();
        self.quarantine(outcome.refused).await?;
        self.store.delete(&self.pool, &outcome.committed).await?;
        let commit_to_ack = metrics::histogram!(m::COMMIT_TO_ACK_SECONDS, &labels);
        for seq in &outcome.committed {
            if let Some(at) = created.get(seq) {
                commit_to_ack.record((now - *at).to_std().unwrap_or_default().as_secs_f64());
            }
        }
        metrics::counter!(m::PUBLISHED_TOTAL, &labels).increment(outcome.committed.len() as u64);
        metrics::histogram!(m::BATCH_DURATION_SECONDS, &labels).record(started.elapsed().as_secs_f64());
        Ok(outcome.aborted)
    }

    /// Completes every batch and waits for every delete.
    async fn drain(&self, in_flight: &mut Pipeline) -> Result<()> {
        while !in_flight.batches.is_empty() {
            self.complete_oldest(in_flight).await?;
        }
        while let Some(delete) = in_flight.deletes.pop_front() {
            join_delete(delete).await?;
        }
        Ok(())
    }

    /// Awaits the acknowledgements of the oldest batch, quarantines the rows refused for good and
    /// deletes the acknowledged rows. A transient failure ends the session after that: rows from
    /// the failed one on stay in the outbox.
    async fn complete_oldest(&self, in_flight: &mut Pipeline) -> Result<()> {
        let Some(mut batch) = in_flight.batches.pop_front() else { return Ok(()) };
        let labels = [("source", self.source.to_string())];
        let lost = || Acks { failure: Some(canceled(0)), ..Acks::default() };
        let Acks { acked, refused, failure } = tokio::select! {
            acks = &mut batch.acks => acks.unwrap_or_else(|_| lost()),
            _ = self.grace_expired() => {
                batch.acks.abort();
                lost()
            }
        };
        // Before the session may end on `failure`: these rows are refused whatever happens next.
        self.quarantine(refused).await?;
        metrics::counter!(m::PUBLISHED_TOTAL, &labels).increment(acked.len() as u64);
        debug!(source = %self.source, rows = acked.len(), "Published outbox batch.");
        // Deleting an acknowledged row is safe whenever it happens, so deletes run beside the next
        // reads; a bounded number of them at once.
        while in_flight.deletes.len() >= MAX_PENDING_DELETES {
            if let Some(delete) = in_flight.deletes.pop_front() {
                join_delete(delete).await?;
            }
        }
        let (store, pool, started) = (self.store.clone(), self.pool.clone(), batch.started);
        let batch_duration = metrics::histogram!(m::BATCH_DURATION_SECONDS, &labels);
        in_flight.deletes.push_back(tokio::spawn(async move {
            store.delete(&pool, &acked).await?;
            batch_duration.record(started.elapsed().as_secs_f64());
            Ok(())
        }));
        failure.map_or(Ok(()), Err)
    }

    /// Moves rows refused for good to the quarantine (one transaction) and says so.
    async fn quarantine(&self, refused: Vec<Refused>) -> Result<()> {
        if refused.is_empty() {
            return Ok(());
        }
        let rows: Vec<(i64, String)> = refused.iter().map(|r| (r.row.seq, r.error.to_string())).collect();
        let moved = self.store.quarantine(&self.pool, &rows).await?;
        if let Ok(mut topics) = self.refused_topics.lock() {
            topics.extend(refused.iter().map(|r| r.row.topic.clone()));
        }
        for Refused { row, error } in &refused {
            warn!(
                source = %self.source,
                seq = row.seq,
                topic = %row.topic,
                key = %row.key.escape_debug(),
                %error,
                "Outbox row quarantined: the broker refuses it for good; later rows of its key wait \
                 until `trialflow outbox quarantine retry` or `discard`."
            );
        }
        metrics::counter!(m::QUARANTINED_TOTAL, "source" => self.source.to_string()).increment(moved);
        if moved < rows.len() as u64 {
            // Someone else removed a row we read (not a relay: we own its shard). The later rows
            // of its key may be behind the cursor without a quarantined row holding them: start
            // the session over, which reads from the head.
            return Err(OutboxError::Database(sqlx::Error::Protocol(format!(
                "{} of {} refused rows were no longer in the outbox of `{}`",
                rows.len() as u64 - moved,
                rows.len(),
                self.source
            ))));
        }
        Ok(())
    }

    /// Asks the broker about the topics of quarantined rows again (see `refused_topics`). Best
    /// effort: a topic still missing or unauthorized just sends its rows back to the quarantine.
    async fn refresh_refused_topics(&self) {
        let topics: Vec<String> = match self.refused_topics.lock() {
            Ok(mut topics) => topics.drain().collect(),
            Err(_) => return,
        };
        for topic in topics {
            let producer = self.producer.clone();
            let refreshed = tokio::task::spawn_blocking(move || {
                producer.client().fetch_metadata(Some(&topic), Duration::from_secs(5)).map(|_| topic)
            })
            .await;
            match refreshed {
                Ok(Ok(topic)) => debug!(source = %self.source, topic, "Topic metadata refreshed."),
                Ok(Err(error)) => debug!(source = %self.source, %error, "Cannot refresh topic metadata."),
                Err(error) => debug!(source = %self.source, %error, "Topic metadata refresh failed."),
            }
        }
    }

    /// Resolves once shutdown was requested and the grace period has passed since.
    async fn grace_expired(&self) {
        self.shutdown.cancelled().await;
        tokio::time::sleep(self.config.shutdown_grace()).await;
    }
}
