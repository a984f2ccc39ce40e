//! The runtime's guarantees against real PostgreSQL and a real broker over TCP.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::{ConsumerConfig, ConsumerSpec, Context, Handler, HandlerError, Message};
use trialflow_outbox::kafka::TopicReader;
use trialflow_outbox::{OutboxEvent, SchemaName};
use trialflow_testkit::{
    PgProxy, RunningRelay, database_addr, database_url, init_logs, kafka, unique, wait_until,
};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

/// Logs every application and emits one outbox event per message. Payloads: `ok:<text>`,
/// `needs:<name>` (permanent failure until config row `name` exists), `waits:<name>` ("not yet"
/// until it exists), `provides:<name>` (creates it); anything not UTF-8 is undecodable.
///
/// For the poison fence and rebalances: `transient:<text>` always fails as transient (a poison
/// the classification gets wrong), `sleep:<ms>` takes that long, `panic-once` panics the first
/// time, `flaky-after:<name>` waits for `name` and then fails as transient forever.
#[derive(Debug, Clone)]
struct Recorder {
    schema: SchemaName,
    /// Handlers running per partition right now, and how often two ran at once.
    active: Arc<Mutex<HashMap<i32, u32>>>,
    overlaps: Arc<AtomicU32>,
    panicked: Arc<AtomicBool>,
}

/// Counts a handler as running on its partition while alive.
struct Running<'a>(&'a Recorder, i32);

impl<'a> Running<'a> {
    fn start(recorder: &'a Recorder, partition: i32) -> Self {
        let mut active = recorder.active.lock().expect("not poisoned");
        let n = active.entry(partition).or_default();
        *n += 1;
        if *n > 1 {
            recorder.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        Self(recorder, partition)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Ok(mut active) = self.0.active.lock() {
            *active.entry(self.1).or_default() -= 1;
        }
    }
}

impl Handler for Recorder {
    type Batch = ();

    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        msg: &Message,
        ctx: &mut Context,
        _batch: &mut (),
    ) -> Result<(), HandlerError> {
        {
            let _running = Running::start(self, msg.partition);
            let text = std::str::from_utf8(msg.payload.as_deref().unwrap_or_default())
                .map_err(|e| HandlerError::permanent(format!("undecodable payload: {e}")))?;
            if let Some(why) = text.strip_prefix("transient:") {
                return Err(HandlerError::transient(format!("always failing: {why}")));
            } else if let Some(ms) = text.strip_prefix("sleep:") {
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            } else if text == "panic-once" && !self.panicked.swap(true, Ordering::SeqCst) {
                panic!("the handler panics once");
            } else if let Some(name) = text.strip_prefix("flaky-after:") {
                let sql = format!("SELECT count(*) FROM {}.config WHERE name = $1", self.schema);
                let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql)).bind(name).fetch_one(&mut **tx).await?;
                if n == 0 {
                    return Err(HandlerError::not_yet(format!("config:{name}"), "not seen yet"));
                }
                return Err(HandlerError::transient("fails on every retry"));
            } else if let Some(name) = text.strip_prefix("waits:") {
                let sql = format!("SELECT count(*) FROM {}.config WHERE name = $1", self.schema);
                let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql)).bind(name).fetch_one(&mut **tx).await?;
                if n == 0 {
                    return Err(HandlerError::not_yet(
                        format!("config:{name}"),
                        format!("configuration `{name}` not seen yet"),
                    ));
                }
            } else if let Some(name) = text.strip_prefix("provides:") {
                let sql = format!("INSERT INTO {}.config VALUES ($1) ON CONFLICT DO NOTHING", self.schema);
                sqlx::query(AssertSqlSafe(sql)).bind(name).execute(&mut **tx).await?;
                ctx.resolve(format!("config:{name}"));
            } else if let Some(name) = text.strip_prefix("needs:") {
                let sql = format!("SELECT count(*) FROM {}.config WHERE name = $1", self.schema);
                let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql)).bind(name).fetch_one(&mut **tx).await?;
                if n == 0 {
                    return Err(HandlerError::permanent(format!("unknown configuration `{name}`")));
                }
            } else if !text.starts_with("ok:") && !text.starts_with("sleep:") && text != "panic-once" {
                return Err(HandlerError::permanent(format!("unknown payload `{text}`")));
            }
            let event_id = self.event_id(msg)?;
            let sql = format!(
                "INSERT INTO {}.applied (event_id, partition, \"offset\", payload) VALUES ($1, $2, $3, $4)",
                self.schema
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(event_id)
                .bind(msg.partition)
                .bind(msg.offset)
                .bind(text)
                .execute(&mut **tx)
                .await?;
            ctx.outbox
                .enqueue(
                    tx,
                    OutboxEvent {
                        topic: format!("{}.out", msg.topic),
                        key: msg.key_str().unwrap_or_default().to_string(),
                        event_type: "Recorded".to_string(),
                        event_id: Uuid::now_v7(),
                        content_type: "text/plain".to_string(),
                        payload: text.as_bytes().to_vec(),
                        headers: [("caused_by".to_string(), event_id.to_string())].into(),
                    },
                )
                .await?;
            Ok(())
        }
    }
}

struct Fixture {
    schema: SchemaName,
    topic: String,
    pool: PgPool,
    producer: FutureProducer,
    recorder: Recorder,
}

impl Fixture {
    async fn new(partitions: i32) -> anyhow::Result<Self> {
        init_logs();
        let schema = SchemaName::new(unique("c"))?;
        trialflow_consumers::migrate(&database_url(), &schema, Some(sqlx::migrate!("./tests/migrations")))
            .await?;
        let topic = unique("test.consumer").replace('_', "-");
        trialflow_outbox::kafka::ensure_topics(&kafka(), &[(&topic, partitions)]).await?;
        let pool = PgPool::connect(&database_url()).await?;
        let producer = trialflow_outbox::publisher::producer_config(&kafka(), "test").create()?;
        let recorder = Recorder {
            schema: schema.clone(),
            active: Arc::default(),
            overlaps: Arc::default(),
            panicked: Arc::default(),
        };
        Ok(Self { schema, topic, pool, producer, recorder })
    }

    fn spec(&self) -> ConsumerSpec {
        ConsumerSpec {
            name: format!("recorder-{}", self.schema),
            schema: self.schema.clone(),
            topics: vec![self.topic.clone()],
        }
    }

    fn config(&self, database_url: String) -> ConsumerConfig {
        let mut config = ConsumerConfig::local();
        config.database.database_url = database_url;
        config.kafka = kafka();
        config.max_backoff_ms = 500;
        config.park_retry_ms = 200;
        config
    }

    fn start(
        &self,
        config: ConsumerConfig,
    ) -> (CancellationToken, JoinHandle<Result<(), trialflow_consumers::ConsumerError>>) {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(trialflow_consumers::runtime::run(
            self.spec(),
            config,
            self.recorder.clone(),
            stop.clone(),
        ));
        (stop, handle)
    }

    /// A relay for the consumer's outbox (dead letters and the handler's events leave through it),
    /// and the dead-letter topic.
    async fn start_relay(&self) -> anyhow::Result<(String, RunningRelay)> {
        let dlq_topic = format!("{}{}", self.topic, trialflow_schemas::topics::DLQ_SUFFIX);
        let out_topic = format!("{}.out", self.topic);
        trialflow_outbox::kafka::ensure_topics(&kafka(), &[(&dlq_topic, 1), (&out_topic, 1)]).await?;
        let mut relay_config = trialflow_outbox::RelayConfig::local(vec![self.schema.clone()]);
        relay_config.kafka = kafka();
        relay_config.database.database_url = database_url();
        relay_config.poll_interval_ms = 100;
        Ok((dlq_topic, RunningRelay::start(relay_config)))
    }

    async fn produce(&self, key: &str, event_id: Uuid, payload: &[u8]) -> anyhow::Result<(i32, i64)> {
        let id = event_id.to_string();
        let headers = OwnedHeaders::new().insert(Header { key: "event_id", value: Some(id.as_bytes()) });
        let record = FutureRecord::to(&self.topic).key(key).payload(payload).headers(headers);
        let delivery = self.producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
        Ok((delivery.partition, delivery.offset))
    }

    async fn applied(&self) -> anyhow::Result<HashMap<Uuid, i64>> {
        let sql = format!("SELECT event_id, count(*) FROM {}.applied GROUP BY event_id", self.schema);
        Ok(sqlx::query_as::<_, (Uuid, i64)>(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .collect())
    }

    async fn applied_once(&self, id: Uuid) -> anyhow::Result<bool> {
        Ok(self.applied().await?.get(&id) == Some(&1))
    }

    async fn outbox_events_caused_by(&self, id: Uuid) -> anyhow::Result<i64> {
        let sql = format!("SELECT count(*) FROM {}.outbox WHERE headers->>'caused_by' = $1", self.schema);
        Ok(sqlx::query_scalar(AssertSqlSafe(sql)).bind(id.to_string()).fetch_one(&self.pool).await?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_delivered_three_times_is_applied_once() -> anyhow::Result<()> {
    let fx = Fixture::new(1).await?;
    let (stop, handle) = fx.start(fx.config(database_url()));
    let id = Uuid::now_v7();
    for _ in 0..3 {
        fx.produce("subject-1", id, b"ok:reading").await?;
    }
    // A later message on the same partition: once it is applied, the three copies were taken.
    let sentinel = Uuid::now_v7();
    fx.produce("subject-1", sentinel, b"ok:sentinel").await?;
    wait_until("sentinel applied", WAIT, || async { fx.applied_once(sentinel).await }).await?;
    assert_eq!(fx.applied().await?.get(&id), Some(&1), "effect applied exactly once");
    assert_eq!(fx.outbox_events_caused_by(id).await?, 1, "handler's outbox event enqueued once");
    stop.cancel();
    handle.await??;
    Ok(())
}

/// The offset commit is lost after the database commit (the consumer task is aborted, and the
/// group's offsets are rewound to the start): on restart every message is redelivered and
/// skipped as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_offset_commit_redelivers_and_skips() -> anyhow::Result<()> {
    let fx = Fixture::new(2).await?;
    let (_stop, handle) = fx.start(fx.config(database_url()));
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    for (i, id) in ids.iter().enumerate() {
        fx.produce(&format!("subject-{}", i % 4), *id, b"ok:first").await?;
    }
    wait_until("all applied", WAIT, || async { Ok(fx.applied().await?.len() == 20) }).await?;
    handle.abort();
    let _ = handle.await;

    // Rewind the group to the beginning, as if no offset commit had ever landed.
    let group: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka().bootstrap_servers)
        .set("group.id", fx.spec().name)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(&fx.topic, p, Offset::Offset(0))?;
    }
    wait_until("group offsets rewound", WAIT, || {
        let r = group.commit(&tpl, rdkafka::consumer::CommitMode::Sync);
        async move { Ok(r.is_ok()) }
    })
    .await?;
    drop(group);

    let (stop, handle) = fx.start(fx.config(database_url()));
    let sentinels: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
    for (i, id) in sentinels.iter().enumerate() {
        fx.produce(&format!("subject-{i}"), *id, b"ok:sentinel").await?;
    }
    wait_until("sentinels applied", WAIT, || async {
        let applied = fx.applied().await?;
        Ok(sentinels.iter().all(|s| applied.contains_key(s)))
    })
    .await?;
    let applied = fx.applied().await?;
    assert!(ids.iter().all(|id| applied.get(id) == Some(&1)), "redelivered events applied once: {applied:?}");
    stop.cancel();
    handle.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_retried_and_everything_applied_once() -> anyhow::Result<()> {
    let fx = Fixture::new(3).await?;
    let proxy = PgProxy::start(database_addr()?).await?;
    let (stop, handle) = fx.start(fx.config(proxy.database_url()));
    let ids: Vec<Uuid> = (0..300).map(|_| Uuid::now_v7()).collect();
    for (i, id) in ids[..100].iter().enumerate() {
        fx.produce(&format!("subject-{}", i % 9), *id, b"ok:before").await?;
    }
    wait_until("first messages applied", WAIT, || async { Ok(!fx.applied().await?.is_empty()) }).await?;
    proxy.set_down(true);
    for (i, id) in ids[100..].iter().enumerate() {
        fx.produce(&format!("subject-{}", i % 9), *id, b"ok:during").await?;
    }
    tokio::time::sleep(Duration::from_secs(10)).await; // the outage itself, not a race guard
    proxy.set_down(false);
    wait_until("all applied after recovery", WAIT, || async { Ok(fx.applied().await?.len() == 300) }).await?;
    let applied = fx.applied().await?;
    assert!(applied.values().all(|n| *n == 1), "each applied once");
    stop.cancel();
    handle.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_the_dlq_and_a_fixed_message_replays_once() -> anyhow::Result<()> {
    let fx = Fixture::new(1).await?;
    let (dlq_topic, relay) = fx.start_relay().await?;
    let (stop, handle) = fx.start(fx.config(database_url()));

    let (before, garbage, needs, after) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    fx.produce("subject-1", before, b"ok:before").await?;
    let (_, garbage_offset) = fx.produce("subject-1", garbage, &[0xff, 0xfe, 0x00, 0x81]).await?;
    let (_, needs_offset) = fx.produce("subject-1", needs, b"needs:study-7").await?;
    fx.produce("subject-1", after, b"ok:after").await?;
    wait_until("messages after the poison applied", WAIT, || async { fx.applied_once(after).await }).await?;

    let letters = trialflow_consumers::dlq::list(&kafka(), &dlq_topic).await?;
    let entries: Vec<trialflow_consumers::dlq::DeadLetterEntry> = letters.iter().map(Into::into).collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let undecodable = entries.iter().find(|e| e.event_id == Some(garbage.to_string())).cloned();
    let undecodable = undecodable.unwrap_or_else(|| panic!("garbage not dead-lettered: {entries:?}"));
    assert_eq!(undecodable.error_class.as_deref(), Some("permanent"));
    assert!(undecodable.reason.as_deref().unwrap_or_default().contains("undecodable"));
    assert_eq!(undecodable.original_topic.as_deref(), Some(fx.topic.as_str()));
    assert_eq!(undecodable.original_offset, Some(garbage_offset.to_string()));
    assert_eq!(undecodable.consumer, Some(fx.spec().name));
    assert!(undecodable.attempts.is_some() && undecodable.first_failure_at.is_some());
    assert_eq!(
        letters
            .iter()
            .find(|m| m.header("event_id") == Some(&garbage.to_string()))
            .map(|m| m.payload.clone()),
        Some(vec![0xff, 0xfe, 0x00, 0x81])
    );
    let unknown = entries.iter().find(|e| e.event_id == Some(needs.to_string())).cloned();
    let unknown = unknown.unwrap_or_else(|| panic!("{entries:?}"));
    assert_eq!(unknown.original_offset, Some(needs_offset.to_string()));

    // The fix: the configuration the message needs now exists. Replay it (twice: still once).
    sqlx::query(AssertSqlSafe(format!("INSERT INTO {}.config VALUES ('study-7')", fx.schema)))
        .execute(&fx.pool)
        .await?;
    for _ in 0..2 {
        let replayed =
            trialflow_consumers::dlq::replay(&kafka(), &dlq_topic, unknown.partition, unknown.offset).await?;
        assert_eq!(replayed.map(|r| r.topic), Some(fx.topic.clone()));
    }
    let sentinel = Uuid::now_v7();
    fx.produce("subject-1", sentinel, b"ok:sentinel").await?;
    wait_until("sentinel after the replays applied", WAIT, || async { fx.applied_once(sentinel).await })
        .await?;
    assert_eq!(fx.applied().await?.get(&needs), Some(&1), "replayed message applied exactly once");
    assert_eq!(fx.applied().await?.get(&garbage), None);
    stop.cancel();
    handle.await??;
    relay.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_rebalances_apply_every_event_exactly_once() -> anyhow::Result<()> {
    let fx = Fixture::new(6).await?;
    let (stop_a, handle_a) = fx.start(fx.config(database_url()));
    let ids: Vec<Uuid> = (0..3000).map(|_| Uuid::now_v7()).collect();
    let producing = {
        let (producer, topic, ids) = (fx.producer.clone(), fx.topic.clone(), ids.clone());
        tokio::spawn(async move {
            for (i, id) in ids.iter().enumerate() {
                let key = format!("subject-{}", i % 60);
                let sid = id.to_string();
                let headers =
                    OwnedHeaders::new().insert(Header { key: "event_id", value: Some(sid.as_bytes()) });
                let record = FutureRecord::to(&topic).key(&key).payload("ok:x").headers(headers);
                producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
                if i % 500 == 499 {
                    tokio::time::sleep(Duration::from_millis(300)).await; // keep the stream going across rebalances
                }
            }
            Ok::<_, rdkafka::error::KafkaError>(())
        })
    };
    wait_until("instance A applying", WAIT, || async { Ok(fx.applied().await?.len() >= 300) }).await?;
    let (stop_b, handle_b) = fx.start(fx.config(database_url())); // rebalance: B joins
    wait_until("more applied after B joined", WAIT, || async { Ok(fx.applied().await?.len() >= 1500) })
        .await?;
    stop_a.cancel(); // rebalance: A leaves
    handle_a.await??;
    producing.await??;
    wait_until("all applied", WAIT, || async { Ok(fx.applied().await?.len() == 3000) }).await?;
    let applied = fx.applied().await?;
    let doubles: Vec<_> = applied.iter().filter(|(_, n)| **n != 1).collect();
    assert!(doubles.is_empty(), "applied more than once: {doubles:?}");
    stop_b.cancel();
    handle_b.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_messages_apply_when_their_dependency_arrives_or_expire_to_the_dlq() -> anyhow::Result<()> {
    let fx = Fixture::new(2).await?;
    let (dlq_topic, relay) = fx.start_relay().await?;
    let mut config = fx.config(database_url());
    config.park_retry_ms = 60_000; // only a resolved dependency (or the expiry below) retries soon
    config.park_max_age_secs = 3;
    let (stop, handle) = fx.start(config);

    // Different keys, so possibly different partitions: the dependency arrives on another path.
    let (waiting, provider, orphan) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    fx.produce("subject-1", waiting, b"waits:site-9").await?;
    fx.produce("subject-2", orphan, b"waits:never").await?;
    wait_until("two parked", WAIT, || async {
        let parked = trialflow_consumers::store::parked_by_consumer(&fx.pool, &fx.schema).await?;
        Ok(parked.iter().map(|(_, n)| n).sum::<i64>() == 2)
    })
    .await?;
    let parked = trialflow_consumers::store::parked_by_consumer(&fx.pool, &fx.schema).await?;
    assert_eq!(parked.len(), 1, "one consumer: {parked:?}");
    assert!(fx.applied().await?.is_empty());

    fx.produce("subject-3", provider, b"provides:site-9").await?;
    wait_until("parked message applied once its dependency arrived", WAIT, || async {
        fx.applied_once(waiting).await
    })
    .await?;

    // The orphan outlives the maximum parking age: dead-lettered with the reason.
    let letters = trialflow_outbox::kafka::TopicReader::new(&kafka(), &dlq_topic, true)?
        .read_until(WAIT, |m| !m.is_empty())
        .await?;
    assert_eq!(letters[0].header("event_id"), Some(orphan.to_string().as_str()));
    let reason = letters[0].header("dlq.reason").unwrap_or_default();
    assert!(reason.contains("parked for more than") && reason.contains("config:never"), "{reason}");
    assert_eq!(fx.applied().await?.get(&orphan), None);
    stop.cancel();
    handle.await??;
    relay.stop().await
}

// ---- Issue 13: nothing blocks forever --------------------------------------------------------

/// The class a real PostgreSQL error gets: the message's fault (permanent) or the environment's
/// (transient).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_errors_are_classified_by_their_cause() -> anyhow::Result<()> {
    use trialflow_consumers::error::is_transient_sqlx;
    init_logs();
    let pool = PgPool::connect(&database_url()).await?;
    let schema = unique("cls");
    for sql in [
        format!("CREATE SCHEMA {schema}"),
        format!("CREATE TABLE {schema}.t (id int PRIMARY KEY, v text)"),
        format!("CREATE INDEX ON {schema}.t (v)"),
        format!("INSERT INTO {schema}.t VALUES (1, 'a'), (2, 'b')"),
    ] {
        sqlx::query(AssertSqlSafe(sql)).execute(&pool).await?;
    }
    let code = |e: &sqlx::Error| e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned());
    let mut seen = Vec::new();
    let mut check = |what: &str, e: sqlx::Error, state: &str, transient: bool| {
        assert_eq!(code(&e).as_deref(), Some(state), "{what}: {e}");
        assert_eq!(is_transient_sqlx(&e), transient, "{what} ({state}) transient? {e}");
        let class = HandlerError::from(e);
        assert_eq!(matches!(class, HandlerError::Transient(_)), transient, "{what}: {class}");
        seen.push(state.to_string());
    };

    // The message's fault: permanent.
    let e =
        sqlx::query("SELECT $1::text").bind("a\0b").execute(&pool).await.expect_err("the statement fails");
    check("NUL in text", e, "22021", false);
    let e = sqlx::query("SELECT $1::text::jsonb")
        .bind("\"\\u0000\"")
        .execute(&pool)
        .await
        .expect_err("the statement fails");
    check("NUL escape in jsonb", e, "22P05", false);
    let e = sqlx::query("SELECT $1::int4 + 1")
        .bind(i32::MAX)
        .execute(&pool)
        .await
        .expect_err("the statement fails");
    check("integer out of range", e, "22003", false);
    let e = sqlx::query("SELECT $1::text::int4")
        .bind("12x")
        .execute(&pool)
        .await
        .expect_err("the statement fails");
    check("invalid text representation", e, "22P02", false);
    let big = format!(
        "INSERT INTO {schema}.t SELECT 3, string_agg(md5(random()::text), '') FROM generate_series(1, 2000)"
    );
    let e = sqlx::query(AssertSqlSafe(big)).execute(&pool).await.expect_err("the statement fails");
    check("index row too large", e, "54000", false);
    let e = sqlx::query(AssertSqlSafe(format!("INSERT INTO {schema}.t VALUES (1, 'dup')")))
        .execute(&pool)
        .await
        .expect_err("the statement fails");
    check("unique violation", e, "23505", false);

    // The environment's: transient.
    let e = sqlx::query(AssertSqlSafe(format!("SELECT * FROM {schema}.missing")))
        .execute(&pool)
        .await
        .expect_err("the statement fails");
    check("undefined table (a deployment fault every message hits)", e, "42P01", true);
    {
        let mut tx = pool.begin().await?;
        sqlx::query("SET LOCAL statement_timeout = 50").execute(&mut *tx).await?;
        let e = sqlx::query("SELECT pg_sleep(5)").execute(&mut *tx).await.expect_err("the statement fails");
        check("statement timeout", e, "57014", true);
    }
    {
        let mut holder = pool.begin().await?;
        sqlx::query(AssertSqlSafe(format!("SELECT * FROM {schema}.t WHERE id = 1 FOR UPDATE")))
            .execute(&mut *holder)
            .await?;
        let mut waiter = pool.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = 50").execute(&mut *waiter).await?;
        let e = sqlx::query(AssertSqlSafe(format!("UPDATE {schema}.t SET v = 'x' WHERE id = 1")))
            .execute(&mut *waiter)
            .await
            .expect_err("the statement fails");
        check("lock timeout", e, "55P03", true);
    }
    {
        // Two transactions lock two rows in opposite orders: PostgreSQL rolls one back.
        let (mut a, mut b) = (pool.begin().await?, pool.begin().await?);
        let lock = |id: i32| AssertSqlSafe(format!("UPDATE {schema}.t SET v = 'y' WHERE id = {id}"));
        sqlx::query(lock(1)).execute(&mut *a).await?;
        sqlx::query(lock(2)).execute(&mut *b).await?;
        let (ra, rb) =
            tokio::join!(sqlx::query(lock(2)).execute(&mut *a), sqlx::query(lock(1)).execute(&mut *b));
        let e = ra.err().or(rb.err()).expect("one of them is the deadlock victim");
        check("deadlock", e, "40P01", true);
    }
    {
        // Serializable transactions that each read what the other writes.
        let (mut a, mut b) = (pool.begin().await?, pool.begin().await?);
        for tx in [&mut a, &mut b] {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").execute(&mut **tx).await?;
            sqlx::query(AssertSqlSafe(format!("SELECT count(*) FROM {schema}.t"))).execute(&mut **tx).await?;
        }
        sqlx::query(AssertSqlSafe(format!("INSERT INTO {schema}.t VALUES (10, 'a')")))
            .execute(&mut *a)
            .await?;
        sqlx::query(AssertSqlSafe(format!("INSERT INTO {schema}.t VALUES (11, 'b')")))
            .execute(&mut *b)
            .await?;
        a.commit().await?;
        let e = match sqlx::query("SELECT 1").execute(&mut *b).await {
            Err(e) => e,
            Ok(_) => b.commit().await.expect_err("the statement fails"),
        };
        check("serialization failure", e, "40001", true);
    }
    {
        // An administrator terminates the session mid-statement.
        let mut victim = pool.acquire().await?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *victim).await?;
        let killer = pool.clone();
        let kill = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&killer).await
        });
        let e =
            sqlx::query("SELECT pg_sleep(10)").execute(&mut *victim).await.expect_err("the statement fails");
        kill.await??;
        check("admin shutdown", e, "57P01", true);
    }
    // Connection refused: no SQLSTATE at all.
    let e = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect("postgres://postgres@127.0.0.1:1/none")
        .await
        .expect_err("the statement fails");
    assert!(is_transient_sqlx(&e), "connection refused is transient: {e}");
    assert_eq!(seen.len(), 12, "{seen:?}");
    Ok(())
}

/// Dead-letter rows waiting in the consumer's outbox (not yet relayed).
async fn dead_letter_rows(fx: &Fixture) -> anyhow::Result<i64> {
    let sql = format!("SELECT count(*) FROM {}.outbox WHERE topic LIKE '%.dlq'", fx.schema);
    Ok(sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&fx.pool).await?)
}

/// A message that fails "transiently" forever (a poison the classification gets wrong) is found
/// by the fence and dead-lettered as `retries_exhausted`; the messages behind it are applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poison_fence_dead_letters_a_misclassified_poison_and_the_partition_moves_on()
-> anyhow::Result<()> {
    let fx = Fixture::new(1).await?;
    let (dlq_topic, relay) = fx.start_relay().await?;
    let mut config = fx.config(database_url());
    config.poison_attempts = 2;
    config.max_backoff_ms = 200;
    let (stop, handle) = fx.start(config);
    let (before, poison, after) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    fx.produce("subject-1", before, b"ok:before").await?;
    fx.produce("subject-1", poison, b"transient:misclassified").await?;
    let (_, after_offset) = fx.produce("subject-1", after, b"ok:after").await?;
    wait_until("the message behind the poison applied", WAIT, || async { fx.applied_once(after).await })
        .await?;
    let letters = TopicReader::new(&kafka(), &dlq_topic, true)?.read_until(WAIT, |m| !m.is_empty()).await?;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].header("event_id"), Some(poison.to_string().as_str()));
    assert_eq!(letters[0].header("dlq.error_class"), Some("retries_exhausted"));
    let reason = letters[0].header("dlq.reason").unwrap_or_default();
    assert!(reason.contains("always failing: misclassified"), "{reason}");
    assert!(fx.applied_once(before).await?);
    assert_eq!(fx.applied().await?.get(&poison), None);
    wait_until("the partition's offset committed to its end", WAIT, || async {
        Ok(committed_offset(&fx, 0).await? == Some(after_offset + 1))
    })
    .await?;
    stop.cancel();
    handle.await??;
    relay.stop().await
}

/// When nothing can be applied (the database is down), the fence never dead-letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_never_turned_into_dead_letters() -> anyhow::Result<()> {
    let fx = Fixture::new(1).await?;
    let proxy = PgProxy::start(database_addr()?).await?;
    let mut config = fx.config(proxy.database_url());
    config.poison_attempts = 1;
    config.max_backoff_ms = 100;
    let (stop, handle) = fx.start(config);
    let first = Uuid::now_v7();
    fx.produce("subject-1", first, b"ok:first").await?;
    wait_until("first applied", WAIT, || async { fx.applied_once(first).await }).await?;
    proxy.set_down(true);
    let during: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    for id in &during {
        fx.produce("subject-1", *id, b"ok:during").await?;
    }
    // Long enough for many fence rounds at these settings (attempts of 100 ms backoff).
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.set_down(false);
    wait_until("all applied after the outage", WAIT, || async {
        let applied = fx.applied().await?;
        Ok(during.iter().all(|id| applied.get(id) == Some(&1)))
    })
    .await?;
    assert_eq!(dead_letter_rows(&fx).await?, 0, "an outage dead-lettered messages");
    stop.cancel();
    handle.await??;
    Ok(())
}

/// Hostile keys, headers and payloads reach the dead-letter topic byte for byte (a dead letter
/// never becomes a second poison), and the partition moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_are_dead_lettered_losslessly() -> anyhow::Result<()> {
    let fx = Fixture::new(1).await?;
    let (dlq_topic, relay) = fx.start_relay().await?;
    let (stop, handle) = fx.start(fx.config(database_url()));
    let send = |key: Option<Vec<u8>>, headers: Vec<(&'static str, Vec<u8>)>, payload: Vec<u8>| {
        let (producer, topic) = (fx.producer.clone(), fx.topic.clone());
        async move {
            let mut hs = OwnedHeaders::new();
            for (k, v) in &headers {
                hs = hs.insert(Header { key: k, value: Some(v.as_slice()) });
            }
            let mut record = FutureRecord::<[u8], [u8]>::to(&topic).payload(&payload).headers(hs);
            if let Some(key) = &key {
                record = record.key(key.as_slice());
            }
            producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
            anyhow::Ok(())
        }
    };
    let mut big = b"ok:".to_vec();
    big.extend(std::iter::repeat_n(b'\0', 900 * 1024));
    type Case = (Option<Vec<u8>>, Vec<(&'static str, Vec<u8>)>, Vec<u8>);
    let cases: Vec<Case> = vec![
        // The reported case: a NUL and invalid UTF-8 in the event id.
        (Some(b"subject-1".to_vec()), vec![("event_id", b"not-a-uuid\0\xff".to_vec())], b"ok:x".to_vec()),
        (Some(b"subject-1".to_vec()), vec![("event_id", b"not-a-uuid\0".to_vec())], b"ok:x".to_vec()),
        // Valid id, hostile key and header values, a payload whose text PostgreSQL refuses.
        (
            Some(b"\0\xff\xfe key".to_vec()),
            vec![
                ("event_id", Uuid::now_v7().to_string().into_bytes()),
                ("x-note", b"\0\x01\xc3\x28".to_vec()),
            ],
            b"ok:with a \0 NUL".to_vec(),
        ),
        // No key, no headers at all.
        (None, vec![], b"ok:no id".to_vec()),
        // Nearly a megabyte, NULs all the way.
        (Some(b"subject-1".to_vec()), vec![("event_id", Uuid::now_v7().to_string().into_bytes())], big),
    ];
    for (key, headers, payload) in &cases {
        send(key.clone(), headers.clone(), payload.clone()).await?;
    }
    let sentinel = Uuid::now_v7();
    fx.produce("subject-1", sentinel, b"ok:sentinel").await?;
    wait_until("the sentinel behind the hostile messages applied", WAIT, || async {
        fx.applied_once(sentinel).await
    })
    .await?;
    let letters =
        TopicReader::new(&kafka(), &dlq_topic, true)?.read_until(WAIT, move |m| m.len() >= 5).await?;
    assert_eq!(letters.len(), cases.len(), "every hostile message dead-lettered once");
    for (letter, (key, headers, payload)) in letters.iter().zip(&cases) {
        assert_eq!(&letter.raw_key, key, "key kept byte for byte");
        assert_eq!(&letter.payload, payload, "payload kept byte for byte");
        for (name, value) in headers {
            let got = letter.raw_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
            assert_eq!(got, Some(value), "header {name} kept byte for byte");
        }
        assert_eq!(letter.header("dlq.error_class"), Some("permanent"));
        assert!(!letter.header("dlq.reason").unwrap_or_default().is_empty());
    }
    stop.cancel();
    handle.await??;
    relay.stop().await
}

/// A handler that panics is caught: the batch is retried and applied; the partition goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_once_is_retried_and_the_partition_goes_on() -> anyhow::Result<()> {
    let fx = Fixture::new(1).await?;
    let (stop, handle) = fx.start(fx.config(database_url()));
    let (panics, after) = (Uuid::now_v7(), Uuid::now_v7());
    fx.produce("subject-1", panics, b"panic-once").await?;
    fx.produce("subject-1", after, b"ok:after").await?;
    wait_until("both applied", WAIT, || async {
        Ok(fx.applied_once(panics).await? && fx.applied_once(after).await?)
    })
    .await?;
    assert!(fx.recorder.panicked.load(Ordering::SeqCst), "the handler did panic");
    stop.cancel();
    handle.await??;
    Ok(())
}

/// Per-key order holds across parking: a later message of a key with a parked message parks
/// behind it and is applied after it; other keys flow on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_messages_of_a_parked_key_wait_behind_it() -> anyhow::Result<()> {
    let fx = Fixture::new(1).await?;
    let mut config = fx.config(database_url());
    config.park_retry_ms = 100;
    let (stop, handle) = fx.start(config);
    let (first, second, other, provider) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    fx.produce("subject-1", first, b"waits:site-3").await?;
    fx.produce("subject-1", second, b"ok:second of subject-1").await?;
    fx.produce("subject-2", other, b"ok:another key").await?;
    wait_until("the other key applied", WAIT, || async { fx.applied_once(other).await }).await?;
    assert!(!fx.applied().await?.contains_key(&second), "a later message overtook its parked key");
    fx.produce("subject-3", provider, b"provides:site-3").await?;
    wait_until("both messages of the parked key applied", WAIT, || async {
        Ok(fx.applied_once(first).await? && fx.applied_once(second).await?)
    })
    .await?;
    let sql = format!("SELECT event_id FROM {}.applied ORDER BY applied_at", fx.schema);
    let order: Vec<Uuid> = sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(&fx.pool).await?;
    let pos = |id: Uuid| order.iter().position(|x| *x == id);
    assert!(pos(first) < pos(second), "applied in key order: {order:?}");
    stop.cancel();
    handle.await??;
    Ok(())
}

/// A parked message that fails on every retry is rescheduled on its own (the others of its slice
/// apply) and ages out to the dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_message_that_keeps_failing_ages_out_alone() -> anyhow::Result<()> {
    let fx = Fixture::new(1).await?;
    let (dlq_topic, relay) = fx.start_relay().await?;
    let mut config = fx.config(database_url());
    config.park_retry_ms = 100;
    config.park_max_age_secs = 4;
    let (stop, handle) = fx.start(config);
    let (flaky, waiting, provider) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    fx.produce("subject-1", flaky, b"flaky-after:site-4").await?;
    fx.produce("subject-2", waiting, b"waits:site-4").await?;
    wait_until("two parked", WAIT, || async {
        let sql = format!("SELECT count(*) FROM {}.parked", fx.schema);
        Ok(sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql)).fetch_one(&fx.pool).await? == 2)
    })
    .await?;
    fx.produce("subject-3", provider, b"provides:site-4").await?;
    wait_until("the healthy parked message applied", WAIT, || async { fx.applied_once(waiting).await })
        .await?;
    let letters = TopicReader::new(&kafka(), &dlq_topic, true)?.read_until(WAIT, |m| !m.is_empty()).await?;
    assert_eq!(letters[0].header("event_id"), Some(flaky.to_string().as_str()));
    assert_eq!(letters[0].header("dlq.error_class"), Some("retries_exhausted"));
    assert!(letters[0].header("dlq.reason").unwrap_or_default().contains("fails on every retry"));
    stop.cancel();
    handle.await??;
    relay.stop().await
}

/// A batch outlives the revoke wait while its partition is revoked and assigned again to the same
/// member: the new worker starts only after the old one ended, never two at once, nothing idle,
/// also long after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_batch_across_a_rebalance_never_runs_beside_its_successor() -> anyhow::Result<()> {
    let fx = Fixture::new(1).await?;
    let mut config = fx.config(database_url());
    config.revoke_wait_ms = 200;
    let (stop, handle) = fx.start(config);
    let warm = Uuid::now_v7();
    fx.produce("subject-1", warm, b"ok:warm").await?;
    wait_until("assigned and applying", WAIT, || async { fx.applied_once(warm).await }).await?;
    let slow = Uuid::now_v7();
    fx.produce("subject-1", slow, b"sleep:4000").await?;
    wait_until("the slow batch running", WAIT, || async {
        Ok(fx.recorder.active.lock().expect("not poisoned").get(&0).copied().unwrap_or(0) > 0)
    })
    .await?;
    // Another member joins the group for another topic: every partition is revoked and this one
    // is assigned back to the same member while its slow batch still runs.
    let other_topic = unique("test.other").replace('_', "-");
    trialflow_outbox::kafka::ensure_topics(&kafka(), &[(&other_topic, 1)]).await?;
    let other: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka().bootstrap_servers)
        .set("group.id", fx.spec().name)
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()?;
    other.subscribe(&[&other_topic])?;
    // It stays in the group until the end (leaving would rebalance once more).
    let leave = Arc::new(AtomicBool::new(false));
    let polling = tokio::task::spawn_blocking({
        let leave = leave.clone();
        move || {
            let until = Instant::now() + WAIT;
            while !leave.load(Ordering::SeqCst) && Instant::now() < until {
                let _ = other.poll(Duration::from_millis(100));
            }
            other
        }
    });
    let after: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    for id in &after {
        fx.produce("subject-1", *id, b"ok:after the rebalance").await?;
        tokio::time::sleep(Duration::from_millis(100)).await; // spread over the rebalance
    }
    wait_until("everything after the rebalance applied", WAIT, || async {
        let applied = fx.applied().await?;
        Ok(applied.get(&slow) == Some(&1) && after.iter().all(|id| applied.get(id) == Some(&1)))
    })
    .await?;
    assert_eq!(fx.recorder.overlaps.load(Ordering::SeqCst), 0, "two workers applied one partition at once");
    // The old worker ended after its successor took the partition's queue: the successor is still
    // woken by what arrives later (an old queue handle dropped late once silenced the new one
    // until the next rebalance: a partition stuck with nothing logged).
    let late = Uuid::now_v7();
    fx.produce("subject-1", late, b"ok:long after the rebalance").await?;
    wait_until("a message long after the rebalance applied", WAIT, || async { fx.applied_once(late).await })
        .await?;
    leave.store(true, Ordering::SeqCst);
    drop(polling.await?);
    stop.cancel();
    handle.await??;
    Ok(())
}

/// Shutdown is bounded: a consumer whose partition keeps failing, or whose batch hangs, stops
/// within its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_while_partitions_fail_or_hang() -> anyhow::Result<()> {
    let fx = Fixture::new(2).await?;
    let mut config = fx.config(database_url());
    config.poison_attempts = 1_000;
    config.shutdown_grace_ms = 500;
    let (stop, handle) = fx.start(config);
    let (failing, hanging) = (Uuid::now_v7(), Uuid::now_v7());
    let (p1, _) = fx.produce("subject-1", failing, b"transient:forever").await?;
    // Another key on the other partition (murmur2 of these keys), hanging in its handler.
    let mut key = 0;
    let p2 = loop {
        key += 1;
        let probe = Uuid::now_v7();
        let (p, _) = fx.produce(&format!("subject-{key}"), probe, b"ok:probe").await?;
        if p != p1 {
            break format!("subject-{key}");
        }
    };
    fx.produce(&p2, hanging, b"sleep:600000").await?;
    wait_until("both partitions stuck", WAIT, || async {
        let active = fx.recorder.active.lock().expect("not poisoned").values().sum::<u32>();
        Ok(active > 0)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await; // let the failing one back off a few times
    let started = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), handle).await???;
    assert!(started.elapsed() < Duration::from_secs(5), "stopped after {:?}", started.elapsed());
    Ok(())
}

/// The group's committed offset of `partition`.
async fn committed_offset(fx: &Fixture, partition: i32) -> anyhow::Result<Option<i64>> {
    let group: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka().bootstrap_servers)
        .set("group.id", fx.spec().name)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&fx.topic, partition);
    let committed =
        tokio::task::spawn_blocking(move || group.committed_offsets(tpl, Duration::from_secs(10))).await??;
    Ok(committed.elements().first().and_then(|e| match e.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }))
}

/// A commit lost in a coordinator failover (here: the mock broker answers the first offset commits
/// with "coordinator load in progress", which librdkafka does not retry by itself) is committed
/// later anyway: the partition receives nothing more, and its group's offset still reaches its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_offset_commit_is_committed_again_without_new_messages() -> anyhow::Result<()> {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let fx = Fixture::new(1).await?;
    let cluster = MockCluster::new(1)?;
    cluster.create_topic(&fx.topic, 1, 1)?;
    let mock = trialflow_outbox::KafkaConfig {
        bootstrap_servers: cluster.bootstrap_servers(),
        ..trialflow_outbox::KafkaConfig::default()
    };
    let producer: FutureProducer = trialflow_outbox::publisher::producer_config(&mock, "test").create()?;
    let mut config = fx.config(database_url());
    config.kafka = mock.clone();
    let (stop, handle) = fx.start(config);

    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 3],
    );
    let id = Uuid::now_v7();
    let headers =
        OwnedHeaders::new().insert(Header { key: "event_id", value: Some(id.to_string().as_bytes()) });
    let record = FutureRecord::to(&fx.topic).key("subject-1").payload(&b"ok:once"[..]).headers(headers);
    let delivery = producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
    wait_until("the message applied", WAIT, || async { fx.applied_once(id).await }).await?;

    let group = fx.spec().name;
    let topic = fx.topic.clone();
    wait_until("the group's offset committed to the partition's end", WAIT, || {
        let (group, topic, bootstrap) = (group.clone(), topic.clone(), mock.bootstrap_servers.clone());
        async move {
            let reader: BaseConsumer =
                ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create()?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, 0);
            let committed =
                tokio::task::spawn_blocking(move || reader.committed_offsets(tpl, Duration::from_secs(5)))
                    .await??;
            Ok(committed.elements().first().map(|e| e.offset()) == Some(Offset::Offset(delivery.offset + 1)))
        }
    })
    .await?;
    assert!(fx.applied_once(id).await?, "applied once");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), handle).await???;
    Ok(())
}
