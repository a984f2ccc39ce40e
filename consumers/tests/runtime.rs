//! The runtime's guarantees against real PostgreSQL and a real broker over TCP.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::{ConsumerConfig, ConsumerSpec, Context, Handler, HandlerError, Message};
use trialflow_outbox::{OutboxEvent, SchemaName};
use trialflow_testkit::{
    PgProxy, RunningRelay, database_addr, database_url, init_logs, kafka, unique, wait_until,
};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

/// Logs every application and emits one outbox event per message. Payloads: `ok:<text>`,
/// `needs:<name>` (permanent failure until config row `name` exists), `waits:<name>` ("not yet"
/// until it exists), `provides:<name>` (creates it); anything not UTF-8 is undecodable.
#[derive(Debug, Clone)]
struct Recorder {
    schema: SchemaName,
}

impl Handler for Recorder {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        msg: &Message,
        ctx: &mut Context,
    ) -> Result<(), HandlerError> {
        {
            let text = std::str::from_utf8(msg.payload.as_deref().unwrap_or_default())
                .map_err(|e| HandlerError::permanent(format!("undecodable payload: {e}")))?;
            if let Some(name) = text.strip_prefix("waits:") {
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
            } else if !text.starts_with("ok:") {
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
        Ok(Self { schema, topic, pool, producer })
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
            Recorder { schema: self.schema.clone() },
            stop.clone(),
        ));
        (stop, handle)
    }

    /// A relay for the consumer's outbox (dead letters and the handler's events leave through it),
    /// and the dead-letter topic.
    async fn start_relay(&self) -> anyhow::Result<(String, RunningRelay)> {
        let dlq_topic = format!("{}.dlq", self.topic);
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
        let sql = format!("SELECT count(*) FROM {}.parked", fx.schema);
        Ok(sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql)).fetch_one(&fx.pool).await? == 2)
    })
    .await?;
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
