//! The consumer runtime: one task per assigned partition applies its messages in offset order, in
//! batches, each batch in one transaction with the inbox; offsets are committed only after that
//! transaction committed.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};
use trialflow_outbox::Outbox;

use crate::config::{ConsumerConfig, ConsumerSpec};
use crate::error::{ConsumerError, HandlerError};
use crate::failure::{reason_of, retry_delay, send_to_dlq, sleep_or_shutdown};
use crate::handler::{Context, Handler, Message};
use crate::metrics as m;
use crate::rebalance::{Assigned, Key, PartitionQueue, RebalanceContext, WorkerHandle};
use crate::shared::Shared;
use crate::store::Sql;

/// The consumer's name in the process's readiness.
fn health_name(consumer: &str) -> String {
    format!("consumer:{consumer}")
}

/// Registers consumer `name` in the process's readiness as starting, before whatever its service
/// does ahead of [`run`] (connecting, loading its configuration): a process is not ready while a
/// consumer is still on its way.
pub fn starting(name: &str) {
    trialflow_outbox::health::not_ready(&health_name(name), "starting");
}

/// Runs a consumer until `shutdown`: subscribes, applies messages through `handler`, retries
/// parked messages, expires old inbox rows. Returns after finishing in-flight batches and leaving
/// the group.
pub async fn run<H: Handler>(
    spec: ConsumerSpec,
    config: ConsumerConfig,
    handler: H,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    m::describe();
    trialflow_outbox::kafka::check_connection(&config.kafka, trialflow_outbox::kafka::ClientKind::Consumer)
        .await?;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(config.database.connect_options()?);
    let outbox = Arc::new(Outbox::open(&pool, spec.schema.clone()).await?);
    let workers: Arc<Mutex<HashMap<Key, WorkerHandle>>> = Arc::default();
    let (assigned_tx, mut assigned) = mpsc::unbounded_channel();
    let health = health_name(&spec.name);
    trialflow_outbox::health::not_ready(&health, "joining the consumer group");
    trialflow_outbox::health::watch_database(&health, pool.clone());
    let queues = Arc::default();
    let consumer =
        Arc::new(create_consumer(&spec, &config, workers.clone(), Arc::downgrade(&queues), assigned_tx)?);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let shared = Arc::new(Shared {
        sql: Sql::new(&spec.schema),
        group: config.group_id.clone().unwrap_or_else(|| spec.name.clone()),
        spec,
        config,
        handler,
        pool,
        outbox,
        consumer: consumer.clone(),
        park_wake: Notify::new(),
    });
    info!(consumer = %shared.spec.name, topics = ?shared.spec.topics, "Consumer started.");

    let background = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::parking::run(shared.clone(), background.clone()));
    tasks.spawn(expire_inbox(shared.clone(), background.clone()));
    tasks.spawn(report_lag(shared.clone(), background.clone()));

    let mut joins = tokio::task::JoinSet::new();
    // One lock per partition, held by its worker while it runs: a partition revoked and assigned
    // again gets a new worker only once the old one has ended (its batch may outlive the revoke
    // wait), so two workers never apply one partition at once.
    let mut partition_locks: HashMap<Key, Arc<tokio::sync::Mutex<()>>> = HashMap::new();
    // The main queue only serves events (rebalances, errors): every partition has its own queue.
    let mut stream = consumer.stream();
    let mut outcome = Ok(());
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(ended) = joins.join_next() => {
                if let Err(error) = ended {
                    // A worker that died (not a handler panic: those are caught per batch) would
                    // leave its partition idle: stop, and let the process restart the consumer.
                    tracing::error!(consumer = %shared.spec.name, %error, "A partition worker died; stopping the consumer.");
                    outcome = Err(ConsumerError::WorkerDied(error.to_string()));
                    break;
                }
            }
            // Registered in `workers` by the rebalance callback already.
            Some(partition) = assigned.recv() => {
                let lock = partition_locks.entry(partition.key.clone()).or_default().clone();
                let shared = shared.clone();
                joins.spawn(async move {
                    let _running = lock.lock_owned().await;
                    partition_worker(shared, partition).await;
                });
            }
            received = stream.next() => match received {
                Some(Ok(m)) => {
                    // Fetched before its partition was split: applying it now could overtake
                    // messages already taken from the partition queue. Stop without committing
                    // it; the next start fetches it again from the committed offset.
                    warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(),
                        "Message on the main queue; restarting the consumer to keep partition order.");
                    outcome = Err(ConsumerError::Kafka(rdkafka::error::KafkaError::Canceled));
                    break;
                }
                Some(Err(error)) => warn!(%error, "Kafka consumer error; continuing."),
                None => break,
            },
        }
    }
    drop(stream);

    info!(consumer = %shared.spec.name, "Consumer stopping: finishing in-flight batches.");
    let handles: Vec<WorkerHandle> =
        workers.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, w)| w).collect();
    for w in &handles {
        w.cancel.cancel();
    }
    while joins.join_next().await.is_some() {}
    background.cancel();
    while tasks.join_next().await.is_some() {}
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
        debug!(%error, "Final offset commit had nothing to do.");
    }
    consumer.unsubscribe();
    // The partitions not spawned yet, then the queues: each holds the consumer.
    drop(assigned);
    drop(queues);
    trialflow_outbox::health::forget(&health);
    info!(consumer = %shared.spec.name, "Consumer stopped.");
    outcome
}

fn create_consumer(
    spec: &ConsumerSpec,
    config: &ConsumerConfig,
    workers: Arc<Mutex<HashMap<Key, WorkerHandle>>>,
    queues: Weak<Mutex<HashMap<Key, Arc<PartitionQueue>>>>,
    assigned: mpsc::UnboundedSender<Assigned>,
) -> Result<StreamConsumer<RebalanceContext>, ConsumerError> {
    let client = config.kafka.consumer(&format!("trialflow-{}", spec.name), |client| {
        client
            .set("group.id", config.group_id.clone().unwrap_or_else(|| spec.name.clone()))
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", COMMIT_INTERVAL_MS.to_string())
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", config.heartbeat_interval_ms.to_string())
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", config.fetch_wait_ms.to_string());
    });
    let context = RebalanceContext {
        workers,
        consumer: std::sync::OnceLock::new(),
        queues,
        assigned,
        revoke_wait: config.revoke_wait(),
        health: health_name(&spec.name),
    };
    Ok(client.create_with_context(context)?)
}

fn owned(m: &rdkafka::message::BorrowedMessage<'_>) -> Message {
    let (headers, unreadable) = trialflow_outbox::kafka::read_headers(m);
    if unreadable > 0 {
        warn!(
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            unreadable,
            "Headers whose name is not UTF-8 were left out."
        );
    }
    Message {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers,
    }
}

/// Applies one partition's messages in order until cancelled (revocation or shutdown).
async fn partition_worker<H: Handler>(shared: Arc<Shared<H>>, partition: Assigned) {
    let Assigned { queue, cancel, started, done, .. } = partition;
    started.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut rx = queue.stream();
    let labels = [("consumer", shared.spec.name.clone())];
    loop {
        let first = tokio::select! {
            // Cancellation wins over fetching: a revoked worker takes nothing more.
            biased;
            _ = cancel.cancelled() => break,
            m = rx.next() => match m {
                Some(Ok(m)) => owned(&m),
                Some(Err(error)) => {
                    warn!(%error, "Kafka partition queue error; continuing.");
                    continue;
                }
                None => break,
            },
        };
        let mut batch = vec![first];
        fill(&shared, &mut batch, &mut rx);
        metrics::histogram!(m::BATCH_SIZE, &labels).record(batch.len() as f64);
        if !settle(&shared, &mut batch, &mut rx, &cancel).await {
            // Rolled back and not committed: the next owner gets these messages again.
            break;
        }
        let last = &batch[batch.len() - 1];
        store_offset(&shared, &last.topic, last.partition, last.offset + 1);
    }
    // The stream goes before the worker says it is done, so that nothing of this partition is
    // still taken here when the revocation completes (the queue stays, see `RebalanceContext`).
    drop(rx);
    let _ = done.send(());
}

/// Adds the messages already fetched, up to the batch size.
fn fill<'q, S>(shared: &Shared<impl Handler>, batch: &mut Vec<Message>, rx: &mut S)
where
    S: futures::Stream<Item = rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'q>>> + Unpin,
{
    while batch.len() < shared.config.max_batch as usize {
        match rx.next().now_or_never() {
            Some(Some(Ok(m))) => batch.push(owned(&m)),
            _ => break,
        }
    }
}

/// Applies `batch` until every message is settled (applied, skipped, parked or dead-lettered):
/// true; false when cancelled first. A batch that keeps failing goes through the poison fence.
async fn settle<'q, H: Handler, S>(
    shared: &Shared<H>,
    batch: &mut Vec<Message>,
    rx: &mut S,
    cancel: &CancellationToken,
) -> bool
where
    S: futures::Stream<Item = rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'q>>> + Unpin,
{
    let labels = [("consumer", shared.spec.name.clone())];
    let first_failure = chrono::Utc::now();
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let attempt = apply_batch(shared, batch, failures + 1, first_failure, Mode::Commit);
        let error = match guarded(shared, cancel, attempt).await {
            None => return false,
            Some(Ok(())) => {
                metrics::histogram!(m::BATCH_SECONDS, &labels).record(started.elapsed().as_secs_f64());
                return true;
            }
            Some(Err(error)) => error,
        };
        failures += 1;
        metrics::counter!(m::RETRIES_TOTAL, &labels).increment(1);
        if failures >= shared.config.poison_attempts {
            info!(consumer = %shared.spec.name, partition = batch[0].partition, messages = batch.len(), %error,
                "Batch keeps failing; applying its messages one at a time.");
            return isolate(shared, batch, rx, cancel, first_failure).await;
        }
        let delay = retry_delay(&shared.config, failures);
        warn!(consumer = %shared.spec.name, partition = batch[0].partition, %error, attempt = failures,
            retry_in_ms = delay.as_millis() as u64, "Batch failed; rolled back, retrying.");
        if !sleep_or_shutdown(delay, cancel).await {
            return false;
        }
    }
}

/// The poison fence: applies the messages of a batch that keeps failing one at a time, each in
/// its own transaction, committing the offset after each. A message that keeps failing alone is
/// poison when another message of its partition applies meanwhile (tried in a transaction that
/// is rolled back, so order holds): it is dead-lettered as `retries_exhausted` with its last
/// error and the partition moves on. When no other message applies (the database is down, a
/// table is missing), it is retried on and never dead-lettered: an outage must not turn into
/// dead letters. This needs no correct classification of the error.
async fn isolate<'q, H: Handler, S>(
    shared: &Shared<H>,
    batch: &mut Vec<Message>,
    rx: &mut S,
    cancel: &CancellationToken,
    first_failure: chrono::DateTime<chrono::Utc>,
) -> bool
where
    S: futures::Stream<Item = rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'q>>> + Unpin,
{
    let name = shared.spec.name.as_str();
    let mut i = 0;
    while i < batch.len() {
        let mut failures = 0u32;
        loop {
            let error = match apply_alone(shared, &batch[i], failures + 1, first_failure, cancel).await {
                None => return false,
                Some(Ok(())) => break,
                Some(Err(error)) => error,
            };
            failures += 1;
            if failures >= shared.config.poison_attempts
                && is_poison(shared, batch, i, rx, cancel, failures).await
            {
                // Its failures may all predate the witness (an outage that just ended): it is to
                // blame only if it fails again now that another message has applied.
                let error = match apply_alone(shared, &batch[i], failures + 1, first_failure, cancel).await {
                    None => return false,
                    Some(Ok(())) => break,
                    Some(Err(error)) => error,
                };
                failures += 1;
                let msg = &batch[i];
                warn!(consumer = name, topic = %msg.topic, partition = msg.partition, offset = msg.offset, %error,
                    "A message fails alone while others apply: dead-lettering it.");
                let reason =
                    format!("retries exhausted after {failures} attempts alone; last error: {error}");
                let letter = dead_letter_alone(shared, msg, reason, failures, first_failure);
                match guarded(shared, cancel, letter).await {
                    None => return false,
                    Some(Ok(())) => {
                        metrics::counter!(m::MESSAGES_TOTAL, "consumer" => name.to_string(), "outcome" => "dead_lettered")
                            .increment(1);
                        break;
                    }
                    Some(Err(e)) => warn!(consumer = name, error = %e, "Dead-lettering failed; retrying."),
                }
            }
            let delay = retry_delay(&shared.config, failures);
            warn!(consumer = name, partition = batch[i].partition, offset = batch[i].offset, %error,
                attempt = failures, retry_in_ms = delay.as_millis() as u64, "Message failed alone; retrying.");
            if !sleep_or_shutdown(delay, cancel).await {
                return false;
            }
        }
        store_offset(shared, &batch[i].topic, batch[i].partition, batch[i].offset + 1);
        i += 1;
    }
    true
}

/// Applies `msg` on its own (attempt number `attempt`); `None` when cancelled.
async fn apply_alone<H: Handler>(
    shared: &Shared<H>,
    msg: &Message,
    attempt: u32,
    first_failure: chrono::DateTime<chrono::Utc>,
    cancel: &CancellationToken,
) -> Option<Result<(), HandlerError>> {
    let one = std::slice::from_ref(msg);
    guarded(shared, cancel, apply_batch(shared, one, attempt, first_failure, Mode::Commit)).await
}

/// Other messages tried as witnesses that the environment works, at most.
const MAX_WITNESSES: usize = 8;

/// How often librdkafka commits the offsets of applied batches (ms). Only how soon lag reads 0
/// depends on it: a redelivery after a crash is skipped by the inbox.
pub const COMMIT_INTERVAL_MS: u64 = 1000;

/// Whether `batch[i]`, which keeps failing alone, is to blame: another message of the partition
/// applies (rolled back). With no other message fetched, only after twice the attempts and a
/// database that answers a write transaction.
async fn is_poison<'q, H: Handler, S>(
    shared: &Shared<H>,
    batch: &mut Vec<Message>,
    i: usize,
    rx: &mut S,
    cancel: &CancellationToken,
    failures: u32,
) -> bool
where
    S: futures::Stream<Item = rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'q>>> + Unpin,
{
    if i + 1 == batch.len() {
        fill(shared, batch, rx);
    }
    let first_failure = chrono::Utc::now();
    for witness in batch[i + 1..].iter().take(MAX_WITNESSES) {
        let dry_run = apply_batch(shared, std::slice::from_ref(witness), 1, first_failure, Mode::DryRun);
        if let Some(Ok(())) = guarded(shared, cancel, dry_run).await {
            return true;
        }
    }
    i + 1 == batch.len()
        && failures >= 2 * shared.config.poison_attempts
        && database_answers(&shared.pool).await
}

/// Whether the database accepts a write transaction right now.
async fn database_answers(pool: &PgPool) -> bool {
    let Ok(mut tx) = pool.begin().await else { return false };
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut *tx).await.is_ok() && tx.rollback().await.is_ok()
}

async fn dead_letter_alone<H: Handler>(
    shared: &Shared<H>,
    msg: &Message,
    reason: String,
    attempts: u32,
    first_failure: chrono::DateTime<chrono::Utc>,
) -> Result<(), HandlerError> {
    let mut tx = shared.pool.begin().await?;
    send_to_dlq(shared, &mut tx, msg, "retries_exhausted", reason, attempts, first_failure).await?;
    tx.commit().await?;
    Ok(())
}

/// Runs one attempt: its outcome, a caught panic as a transient failure (the transaction is
/// dropped, so rolled back), or `None` when cancelled and the shutdown grace has passed.
async fn guarded<H: Handler>(
    shared: &Shared<H>,
    cancel: &CancellationToken,
    attempt: impl Future<Output = Result<(), HandlerError>>,
) -> Option<Result<(), HandlerError>> {
    let attempt = std::panic::AssertUnwindSafe(attempt).catch_unwind();
    let grace = shared.config.shutdown_grace();
    let result = tokio::select! {
        biased;
        result = attempt => result,
        _ = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => {
            warn!(consumer = %shared.spec.name, grace_ms = grace.as_millis() as u64,
                "A batch outlived the shutdown grace; rolled back.");
            return None;
        }
    };
    Some(result.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_string());
        tracing::error!(consumer = %shared.spec.name, panic = %what, "Handler panicked; batch rolled back.");
        Err(HandlerError::Transient(format!("handler panicked: {what}")))
    }))
}

/// Marks everything up to `next` as applied (its transaction committed). librdkafka commits the
/// stored offsets every [`COMMIT_INTERVAL_MS`], on revocation and on close, and tries again at the
/// next interval when a commit fails: a commit lost in a coordinator failover cannot leave the
/// group's offset behind for good on a partition that receives nothing more.
fn store_offset<H>(shared: &Shared<H>, topic: &str, partition: i32, next: i64) {
    // `store_offsets` stores the offsets as given (`store_offset` would store `next + 1`).
    let mut tpl = TopicPartitionList::new();
    let stored = tpl
        .add_partition_offset(topic, partition, Offset::Offset(next))
        .and_then(|()| shared.consumer.store_offsets(&tpl));
    if let Err(error) = stored {
        // The partition was revoked meanwhile: its next owner gets the messages again and the
        // inbox skips them.
        debug!(%error, topic, partition, "Offset not stored.");
    }
}

/// Why a batch did not commit.
enum BatchError {
    /// Roll back, back off, retry the batch.
    Transient(HandlerError),
    /// Roll back and run the batch again without applying the message at this offset (it is
    /// dead-lettered or parked instead).
    Exclude(i64, HandlerError),
}

impl From<sqlx::Error> for BatchError {
    fn from(e: sqlx::Error) -> Self {
        Self::Transient(HandlerError::Transient(e.to_string()))
    }
}

impl From<HandlerError> for BatchError {
    fn from(e: HandlerError) -> Self {
        Self::Transient(e)
    }
}

/// Whether a batch's transaction commits, or only tells whether it would (the poison fence's
/// witnesses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Commit,
    DryRun,
}

/// Applies a batch until it commits or fails transiently. A message that fails permanently (or
/// says "not yet") makes the batch roll back and run again with that message set aside: no
/// savepoints per message on the happy path, and no partial batch is ever committed.
async fn apply_batch<H: Handler>(
    shared: &Shared<H>,
    batch: &[Message],
    attempts: u32,
    first_failure: chrono::DateTime<chrono::Utc>,
    mode: Mode,
) -> Result<(), HandlerError> {
    let mut excluded: HashMap<i64, HandlerError> = HashMap::new();
    loop {
        match try_batch(shared, batch, &excluded, attempts, first_failure, mode).await {
            Ok(()) => return Ok(()),
            Err(BatchError::Transient(e)) => return Err(e),
            Err(BatchError::Exclude(offset, e)) => {
                excluded.insert(offset, e);
            }
        }
    }
}

/// One transaction: the handler's batch state and batch-wide locks ([`Handler::prepare`]), the
/// inbox rows of the whole batch in one statement (a conflict means already taken), then the
/// handler per new message in offset order, dead letters and parked messages of the set-aside
/// ones, messages parked behind an earlier parked message of their key; the handler's batch
/// writes ([`Handler::finish`]), the outbox events of the applied messages in one statement,
/// dependency wake-ups, the audit records; commit.
async fn try_batch<H: Handler>(
    shared: &Shared<H>,
    batch: &[Message],
    excluded: &HashMap<i64, HandlerError>,
    attempts: u32,
    first_failure: chrono::DateTime<chrono::Utc>,
    mode: Mode,
) -> Result<(), BatchError> {
    let name = shared.spec.name.as_str();
    let mut ids = Vec::with_capacity(batch.len());
    for msg in batch {
        match shared.handler.event_id(msg) {
            Ok(id) => ids.push(Ok(id)),
            Err(HandlerError::Transient(e)) => return Err(BatchError::Transient(HandlerError::Transient(e))),
            Err(e) => ids.push(Err(e)),
        }
    }
    let mut tx = shared.pool.begin().await?;
    // Whatever `prepare` says, the batch is retried whole: it runs before any message is applied,
    // so no single message can be set aside for it.
    let mut state = match shared.handler.prepare(&mut tx, batch).await {
        Ok(state) => state,
        Err(e) => {
            return Err(BatchError::Transient(HandlerError::Transient(format!("preparing the batch: {e}"))));
        }
    };
    let behind = behind_parked_keys(shared, &mut tx, batch, &ids, excluded).await?;
    let (take_ids, take_offsets): (Vec<uuid::Uuid>, Vec<i64>) = batch
        .iter()
        .zip(&ids)
        .filter(|(m, _)| !excluded.contains_key(&m.offset) && !behind.contains(&m.offset))
        .filter_map(|(m, id)| id.as_ref().ok().map(|id| (*id, m.offset)))
        .unzip();
    let mut new = shared.sql.take_all(&mut tx, name, &batch[0], &take_ids, &take_offsets).await?;

    let mut resolved = Vec::new();
    let mut audit = Vec::new();
    let mut events = Vec::new();
    let mut outcomes: HashMap<&'static str, u64> = HashMap::new();
    let processing = metrics::histogram!(m::PROCESSING_SECONDS, "consumer" => name.to_string());
    for (msg, id) in batch.iter().zip(&ids) {
        let outcome = match (id, excluded.get(&msg.offset)) {
            (Err(e), _) | (Ok(_), Some(e @ HandlerError::Permanent(_))) => {
                send_to_dlq(shared, &mut tx, msg, e.class(), reason_of(e), attempts, first_failure).await?;
                "dead_lettered"
            }
            (Ok(id), Some(HandlerError::NotYet { dependency, reason })) => {
                park(shared, &mut tx, msg, *id, dependency, reason).await?
            }
            (Ok(id), None) if behind.contains(&msg.offset) => {
                let dependency = KEY_ORDER_DEPENDENCY;
                let reason = "an earlier message of its key on this partition is parked";
                park(shared, &mut tx, msg, *id, dependency, reason).await?
            }
            (Ok(_), Some(HandlerError::Transient(e))) => {
                return Err(BatchError::Transient(HandlerError::Transient(e.clone())));
            }
            (Ok(id), None) if !new.remove(id) => "duplicate",
            (Ok(id), None) => {
                let started = Instant::now();
                let mut ctx = Context::new(shared.outbox.clone());
                let span = crate::span::process(&shared.group, msg);
                let result =
                    shared.handler.handle(&mut tx, msg, &mut ctx, &mut state).instrument(span.clone()).await;
                processing.record(started.elapsed().as_secs_f64());
                if let Err(e) = &result {
                    crate::span::failed(&span, e);
                }
                match result {
                    Ok(()) => {
                        resolved.extend(ctx.resolved);
                        audit.extend(caused_by(ctx.audit, id));
                        events.extend(ctx.events);
                        "applied"
                    }
                    Err(HandlerError::Transient(e)) => {
                        return Err(BatchError::Transient(HandlerError::Transient(e)));
                    }
                    Err(e) => return Err(BatchError::Exclude(msg.offset, e)),
                }
            }
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    // Like `prepare`, not one message's doing: the batch is retried whole (and, if it keeps
    // failing, applied one message at a time by the poison fence).
    let mut ctx = Context::new(shared.outbox.clone());
    if let Err(e) = shared.handler.finish(&mut tx, state, &mut ctx).await {
        return Err(BatchError::Transient(HandlerError::Transient(format!("finishing the batch: {e}"))));
    }
    resolved.extend(ctx.resolved);
    audit.extend(ctx.audit);
    events.extend(ctx.events);
    shared.outbox.enqueue_traced(&mut tx, &events).await.map_err(HandlerError::from)?;
    for dependency in &resolved {
        shared.sql.wake(&mut tx, name, dependency).await?;
    }
    // Last: a chain's head is held from here to the commit only.
    trialflow_outbox::audit::append(&mut tx, &shared.spec.schema, &audit)
        .await
        .map_err(HandlerError::from)?;
    if mode == Mode::DryRun {
        tx.rollback().await?;
        return Ok(());
    }
    tx.commit().await?;
    for (outcome, n) in outcomes {
        metrics::counter!(m::MESSAGES_TOTAL, "consumer" => name.to_string(), "outcome" => outcome)
            .increment(n);
    }
    if !resolved.is_empty() {
        shared.park_wake.notify_one();
    }
    Ok(())
}

/// The audit records of a message, caused by its event id unless they name their cause.
pub(crate) fn caused_by(
    records: Vec<trialflow_outbox::AuditRecord>,
    event_id: &uuid::Uuid,
) -> impl Iterator<Item = trialflow_outbox::AuditRecord> {
    records.into_iter().map(move |r| r.or_cause(|| format!("event:{event_id}")))
}

/// The dependency of a message parked behind an earlier parked message of its key: it is woken
/// when that one is applied or dead-lettered.
pub(crate) const KEY_ORDER_DEPENDENCY: &str = "key order";

/// Which messages of the batch must park behind an earlier parked message of their key (per-key
/// order): their key has a parked message on this partition, or an earlier message of the batch
/// parks now. Their offsets.
async fn behind_parked_keys<H: Handler>(
    shared: &Shared<H>,
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    batch: &[Message],
    ids: &[Result<uuid::Uuid, HandlerError>],
    excluded: &HashMap<i64, HandlerError>,
) -> Result<HashSet<i64>, BatchError> {
    let keys: Vec<&[u8]> = batch.iter().filter_map(|m| m.key.as_deref()).collect();
    let mut blocked = shared.sql.parked_keys(tx, &shared.spec.name, &batch[0], &keys).await?;
    let mut behind = HashSet::new();
    for (msg, id) in batch.iter().zip(ids) {
        let Some(key) = &msg.key else { continue };
        match excluded.get(&msg.offset) {
            Some(HandlerError::NotYet { .. }) => {
                blocked.insert(key.clone());
            }
            Some(_) => {}
            None if id.is_ok() && blocked.contains(key) => {
                behind.insert(msg.offset);
            }
            None => {}
        }
    }
    Ok(behind)
}

/// Parks a message (unless it was taken before: then it is a duplicate) and says which.
async fn park<H: Handler>(
    shared: &Shared<H>,
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    msg: &Message,
    event_id: uuid::Uuid,
    dependency: &str,
    reason: &str,
) -> Result<&'static str, HandlerError> {
    let name = shared.spec.name.as_str();
    if !shared.sql.take(tx, name, event_id, "parked", msg).await? {
        return Ok("duplicate");
    }
    let retry = shared.config.park_retry().as_secs_f64();
    let max_age = shared.config.park_max_age_secs as f64;
    shared.sql.park(tx, name, event_id, dependency, reason, msg, retry, max_age).await?;
    debug!(consumer = name, %event_id, dependency, reason, "Parked message.");
    Ok("parked")
}

/// Every 10 s: messages between each assigned partition's position and its end, summed per topic.
async fn report_lag<H: Handler>(shared: Arc<Shared<H>>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.cancelled() => return,
        }
        let consumer = shared.consumer.clone();
        // Watermark queries block: keep them off the async threads.
        let lag = tokio::task::spawn_blocking(move || {
            let mut lag: HashMap<String, i64> = HashMap::new();
            let Ok(position) = consumer.position() else { return lag };
            for e in position.elements() {
                let Offset::Offset(pos) = e.offset() else { continue };
                if let Ok((_, high)) =
                    consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(2))
                {
                    *lag.entry(e.topic().to_string()).or_default() += (high - pos).max(0);
                }
            }
            lag
        })
        .await
        .unwrap_or_default();
        for (topic, n) in lag {
            metrics::gauge!(m::LAG_MESSAGES, "consumer" => shared.spec.name.clone(), "topic" => topic)
                .set(n as f64);
        }
    }
}

/// Deletes inbox rows past the retention window, a slice at a time, every few minutes.
async fn expire_inbox<H: Handler>(shared: Arc<Shared<H>>, stop: CancellationToken) {
    let hours = shared.config.inbox_retention_hours.min(i32::MAX as u64) as i32;
    while !stop.is_cancelled() {
        match shared.pool.acquire().await {
            Ok(mut conn) => loop {
                match shared.sql.expire(&mut conn, &shared.spec.name, hours).await {
                    Ok(n) if n > 0 => debug!(consumer = %shared.spec.name, rows = n, "Expired inbox rows."),
                    Ok(_) => break,
                    Err(error) => {
                        debug!(%error, "Inbox expiry failed; trying again later.");
                        break;
                    }
                }
            },
            Err(error) => debug!(%error, "Inbox expiry cannot connect; trying again later."),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(300)) => {}
            _ = stop.cancelled() => {}
        }
    }
}
