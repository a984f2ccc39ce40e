//! A row the broker refuses for good stops only itself and the later rows of its key: it is
//! quarantined, every other key flows on in the same relay session, and after `retry` (the cause
//! fixed) or `discard` the rows of its key that waited follow, in order.
//!
//! The refusals: a record over the producer's `message.max.bytes` (refused at hand-off, on the
//! real broker), a topic that does not exist with auto-creation off and a topic authorization
//! failure (both reported in the delivery, on librdkafka's mock cluster).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sqlx::AssertSqlSafe;
use trialflow_outbox::kafka::{ReadMessage, TopicReader};
use trialflow_outbox::quarantine::{self, Selection};
use trialflow_outbox::shard::shard_lock_namespace;
use trialflow_outbox::{KafkaConfig, Outbox, OutboxError, OutboxEvent, SchemaName};
use trialflow_testkit::{RunningRelay, TestService, kafka, unique, wait_until};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// Commits one event of `key` to `topic`, numbered `n` (header `n`), with `payload_bytes` bytes.
async fn put(svc: &TestService, topic: &str, key: &str, n: u32, payload_bytes: usize) -> anyhow::Result<()> {
    let outbox = Outbox::open(&svc.pool, svc.schema.clone()).await?;
    let mut tx = svc.pool.begin().await?;
    outbox
        .enqueue(
            &mut tx,
            OutboxEvent {
                topic: topic.to_string(),
                key: key.to_string(),
                event_type: "Reading".to_string(),
                event_id: Uuid::now_v7(),
                content_type: "application/octet-stream".to_string(),
                payload: vec![b'x'; payload_bytes],
                headers: BTreeMap::from([("n".to_string(), n.to_string())]),
            },
        )
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Three small events for each of `keys`, numbered from 1.
async fn put_others(svc: &TestService, keys: &[&str]) -> anyhow::Result<()> {
    for n in 1..=3 {
        for key in keys {
            put(svc, &svc.topic, key, n, 10).await?;
        }
    }
    Ok(())
}

/// The `n` headers of `key`'s messages in arrival order, first deliveries only.
fn numbers(messages: &[ReadMessage], key: &str) -> Vec<u32> {
    let mut seen = Vec::new();
    for m in messages.iter().filter(|m| m.key == key) {
        let n = m.header("n").and_then(|n| n.parse().ok()).unwrap_or(0);
        if !seen.contains(&n) {
            seen.push(n);
        }
    }
    seen
}

/// Reads `topic` from the beginning until `done` holds.
async fn read(
    kafka: &KafkaConfig,
    topic: &str,
    done: impl FnMut(&[ReadMessage]) -> bool + Send + 'static,
) -> anyhow::Result<Vec<ReadMessage>> {
    Ok(TopicReader::new(kafka, topic, true)?.read_until(WAIT, done).await?)
}

/// The database sessions holding the source's shard leases: the same pids before and after a
/// refusal mean the relay's session was not torn down and restarted.
async fn lease_pids(svc: &TestService) -> anyhow::Result<Vec<i32>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT pid FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid::bigint = $1
         ORDER BY pid",
    )
    .bind(i64::from(shard_lock_namespace(&svc.schema)))
    .fetch_all(&svc.pool)
    .await?)
}

/// Rows of `key` still in the outbox, by their `n`.
async fn waiting(svc: &TestService, key: &str) -> anyhow::Result<Vec<u32>> {
    let sql =
        format!("SELECT (headers->>'n')::int FROM {}.outbox WHERE key = $1 ORDER BY tx_id, seq", svc.schema);
    let n: Vec<i32> = sqlx::query_scalar(AssertSqlSafe(sql)).bind(key).fetch_all(&svc.pool).await?;
    Ok(n.into_iter().map(|n| n as u32).collect())
}

async fn quarantined(svc: &TestService) -> anyhow::Result<Vec<quarantine::QuarantinedRow>> {
    Ok(quarantine::list(&svc.pool, &svc.schema).await?)
}

/// The relay's Kafka settings for a mock cluster (one request in flight, see failures.rs).
fn mock_kafka(
    cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    extra: &[(&str, &str)],
) -> KafkaConfig {
    let mut producer_settings = vec![("max.in.flight.requests.per.connection".into(), "1".into())];
    producer_settings.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    KafkaConfig {
        bootstrap_servers: cluster.bootstrap_servers(),
        producer_settings,
        ..KafkaConfig::default()
    }
}

/// A record over the producer's `message.max.bytes` (16 000 here) is quarantined; the later rows
/// of its key wait, every other key is published, in the same session. Raised limit + `retry`:
/// the quarantined row and then the rows that waited are published, in commit order.
#[tokio::test]
async fn oversized_record_is_quarantined_and_its_key_follows_after_retry() -> anyhow::Result<()> {
    let svc = TestService::new(Some(&kafka()), 2).await?;
    let small_limit =
        KafkaConfig { producer_settings: vec![("message.max.bytes".into(), "16000".into())], ..kafka() };
    put(&svc, &svc.topic, "big", 1, 10).await?;
    put(&svc, &svc.topic, "big", 2, 40_000).await?;
    put(&svc, &svc.topic, "big", 3, 10).await?;
    put_others(&svc, &["k1", "k2", "k3"]).await?;
    put(&svc, &svc.topic, "big", 4, 10).await?;

    let relay = RunningRelay::start(svc.relay_config(&small_limit));
    wait_until("every other row published", WAIT, || async { Ok(svc.outbox_len().await? == 2) }).await?;
    let sessions = lease_pids(&svc).await?;
    assert_eq!(waiting(&svc, "big").await?, [3, 4], "the later rows of the refused key wait");
    let q = quarantined(&svc).await?;
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!((q[0].key.as_str(), q[0].payload_bytes), ("big", 40_000));
    assert!(q[0].error.contains("MessageSizeTooLarge"), "{}", q[0].error);

    // More rows of other keys keep flowing in the same session; the waiting key stays put.
    put_others(&svc, &["k4"]).await?;
    put(&svc, &svc.topic, "big", 5, 10).await?;
    wait_until("k4 published", WAIT, || async { Ok(svc.outbox_len().await? == 3) }).await?;
    assert_eq!(lease_pids(&svc).await?, sessions, "the relay's session was not restarted");
    relay.stop().await?;

    // The limit raised (default producer settings), the row retried under its original ids.
    let relay = RunningRelay::start(svc.relay_config(&kafka()));
    let seqs = quarantine::retry(&svc.pool, &svc.schema, Selection::One(q[0].seq), "alice").await?;
    assert_eq!(seqs, [q[0].seq]);
    let retried =
        trialflow_outbox::audit::read(&mut *svc.pool.acquire().await?, &svc.schema, None, None, 10).await?;
    assert_eq!(
        retried
            .iter()
            .map(|r| (r.action.as_str(), r.actor_user.as_str(), r.entity_id.clone()))
            .collect::<Vec<_>>(),
        [("outbox.quarantine_retried", "alice", q[0].seq.to_string())]
    );
    wait_until("outbox drained after retry", WAIT, || async { Ok(svc.outbox_len().await? == 0) }).await?;
    assert!(quarantined(&svc).await?.is_empty());
    relay.stop().await?;

    let messages = read(&kafka(), &svc.topic, |m| {
        numbers(m, "big").len() >= 5 && ["k1", "k2", "k3", "k4"].iter().all(|k| numbers(m, k).len() >= 3)
    })
    .await?;
    assert_eq!(numbers(&messages, "big"), [1, 2, 3, 4, 5], "per-key order across the quarantine");
    for key in ["k1", "k2", "k3"] {
        assert_eq!(numbers(&messages, key), [1, 2, 3], "{key}");
    }
    assert_eq!(numbers(&messages, "k4"), [1, 2, 3]);
    Ok(())
}

/// `discard` with the relay running: the rows that waited flow on at once (the relay reads from
/// the head when the quarantine changes), and the discarded row is kept with who and why.
/// Mistakes are refused with a message naming them.
#[tokio::test]
async fn discarded_row_is_audited_and_its_key_flows_on() -> anyhow::Result<()> {
    let svc = TestService::new(Some(&kafka()), 2).await?;
    let small_limit =
        KafkaConfig { producer_settings: vec![("message.max.bytes".into(), "16000".into())], ..kafka() };
    put(&svc, &svc.topic, "big", 1, 40_000).await?;
    put(&svc, &svc.topic, "big", 2, 10).await?;
    put_others(&svc, &["k1"]).await?;
    let relay = RunningRelay::start(svc.relay_config(&small_limit));
    wait_until("the refused row quarantined, k1 published", WAIT, || async {
        Ok(svc.outbox_len().await? == 1 && quarantined(&svc).await?.len() == 1)
    })
    .await?;
    let seq = quarantined(&svc).await?[0].seq;

    // What an operator can get wrong.
    let unaccounted = quarantine::discard(&svc.pool, &svc.schema, seq, " ", "no longer needed").await;
    assert!(matches!(unaccounted, Err(OutboxError::DiscardUnaccounted { .. })), "{unaccounted:?}");
    let unknown = quarantine::discard(&svc.pool, &svc.schema, seq + 1000, "alice", "typo").await;
    let Err(e @ OutboxError::NotQuarantined { .. }) = unknown else { panic!("{unknown:?}") };
    assert!(e.to_string().contains(&format!("no quarantined row {}", seq + 1000)), "{e}");
    let retry_unknown = quarantine::retry(&svc.pool, &svc.schema, Selection::One(seq + 1000), "alice").await;
    assert!(matches!(retry_unknown, Err(OutboxError::NotQuarantined { .. })), "{retry_unknown:?}");
    let nowhere = SchemaName::new(unique("no_such_source"))?;
    let missing = quarantine::list(&svc.pool, &nowhere).await;
    let Err(e @ OutboxError::UnknownSource(_)) = missing else { panic!("{missing:?}") };
    assert!(e.to_string().contains(nowhere.as_str()), "{e}");
    assert_eq!(quarantine::retry(&svc.pool, &nowhere, Selection::All, "alice").await.ok(), None);

    quarantine::discard(&svc.pool, &svc.schema, seq, "alice", "test event, never valid").await?;
    wait_until("the waiting row published by the running relay", WAIT, || async {
        Ok(svc.outbox_len().await? == 0)
    })
    .await?;
    relay.stop().await?;
    assert!(quarantined(&svc).await?.is_empty());
    let audit: (i64, String, String, i32, String) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT seq, discarded_by, reason, octet_length(payload), error
         FROM {}.outbox_quarantine_discarded",
        svc.schema
    )))
    .fetch_one(&svc.pool)
    .await?;
    assert_eq!(
        (audit.0, audit.1.as_str(), audit.2.as_str(), audit.3),
        (seq, "alice", "test event, never valid", 40_000)
    );
    assert!(audit.4.contains("MessageSizeTooLarge"), "{}", audit.4);
    // And in the audit trail, in the same transaction: who, why; the refused attempts left none.
    let mut conn = svc.pool.acquire().await?;
    let trail = trialflow_outbox::audit::read(&mut conn, &svc.schema, None, None, 10).await?;
    let [record] = trail.as_slice() else { panic!("{trail:?}") };
    assert_eq!(
        (record.action.as_str(), record.actor_user.as_str(), record.actor_role.as_str()),
        ("outbox.quarantine_discarded", "alice", "operator")
    );
    assert_eq!(
        (record.entity_id.clone(), record.reason.as_deref()),
        (seq.to_string(), Some("test event, never valid"))
    );
    drop(conn);

    let messages =
        read(&kafka(), &svc.topic, |m| !numbers(m, "big").is_empty() && numbers(m, "k1").len() >= 3).await?;
    assert_eq!(numbers(&messages, "big"), [2]);
    assert_eq!(numbers(&messages, "k1"), [1, 2, 3]);
    Ok(())
}

/// A dead-letter topic nobody provisioned on a cluster with auto-creation off: librdkafka reports
/// the record as refused (UnknownTopicOrPartition) once the metadata still says so after its
/// propagation allowance, and refuses later records to it at hand-off (UnknownTopic). Both are
/// quarantined, the next row of the key waits, others flow. Topic created + `retry --all` with the
/// relay running: the rows arrive, in order.
#[tokio::test]
async fn missing_topic_is_quarantined_and_others_flow() -> anyhow::Result<()> {
    let cluster = MockCluster::new(1)?;
    // Auto-creation off (a producer asks for it by default); a short propagation allowance.
    let kafka = mock_kafka(
        &cluster,
        &[("allow.auto.create.topics", "false"), ("topic.metadata.propagation.max.ms", "500")],
    );
    let svc = TestService::new(None, 1).await?;
    cluster.create_topic(&svc.topic, 2, 1)?;
    let missing = format!("{}.dlq", svc.topic);
    put(&svc, &missing, "lost", 1, 10).await?;
    put_others(&svc, &["k1", "k2"]).await?;

    let relay = RunningRelay::start(svc.relay_config(&kafka));
    wait_until("the row to the missing topic quarantined, others published", WAIT, || async {
        Ok(svc.outbox_len().await? == 0 && quarantined(&svc).await?.len() == 1)
    })
    .await?;
    let sessions = lease_pids(&svc).await?;
    let q = quarantined(&svc).await?;
    assert_eq!(q[0].topic, missing);
    assert!(q[0].error.contains("UnknownTopicOrPartition"), "{}", q[0].error);

    put(&svc, &missing, "lost", 2, 10).await?;
    put(&svc, &missing, "gone", 1, 10).await?;
    put_others(&svc, &["k3"]).await?;
    wait_until("the later row of the key waits, the new key's row quarantined", WAIT, || async {
        Ok(svc.outbox_len().await? == 1 && quarantined(&svc).await?.len() == 2)
    })
    .await?;
    assert_eq!(waiting(&svc, "lost").await?, [2]);
    let gone = &quarantined(&svc).await?[1];
    assert_eq!(gone.key, "gone");
    assert!(gone.error.contains("UnknownTopic"), "{}", gone.error);
    assert_eq!(lease_pids(&svc).await?, sessions, "the relay's session was not restarted");

    cluster.create_topic(&missing, 1, 1)?;
    assert_eq!(quarantine::retry(&svc.pool, &svc.schema, Selection::All, "alice").await?.len(), 2);
    wait_until("outbox drained after retry", WAIT, || async {
        Ok(svc.outbox_len().await? == 0 && quarantined(&svc).await?.is_empty())
    })
    .await?;
    relay.stop().await?;

    let messages =
        read(&kafka, &missing, |m| numbers(m, "lost").len() >= 2 && !numbers(m, "gone").is_empty()).await?;
    assert_eq!(numbers(&messages, "lost"), [1, 2], "the retried row first, then the one that waited");
    assert_eq!(numbers(&messages, "gone"), [1]);
    // Keys spread over two partitions: wait for each key asserted, not for the last one written.
    let messages =
        read(&kafka, &svc.topic, |m| ["k1", "k2", "k3"].iter().all(|k| numbers(m, k).len() >= 3)).await?;
    for key in ["k1", "k2", "k3"] {
        assert_eq!(numbers(&messages, key), [1, 2, 3], "{key}");
    }
    Ok(())
}

/// The broker answers a produce request with TOPIC_AUTHORIZATION_FAILED: the row is quarantined
/// (librdkafka then refuses its topic until a metadata refresh), the next row of its key waits,
/// other keys flow in the same session. The ACL fixed, `retry --all` with the relay running: the
/// quarantined row, then the one that waited.
#[tokio::test]
async fn topic_authorization_failure_is_quarantined_and_retried_in_order() -> anyhow::Result<()> {
    let cluster = MockCluster::new(1)?;
    let kafka = mock_kafka(&cluster, &[]);
    let svc = TestService::new(None, 1).await?;
    let restricted = format!("{}.restricted", svc.topic);
    cluster.create_topic(&svc.topic, 2, 1)?;
    cluster.create_topic(&restricted, 1, 1)?;
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    // Alone in the first produce request, which the broker refuses.
    put(&svc, &restricted, "denied", 1, 10).await?;
    let relay = RunningRelay::start(svc.relay_config(&kafka));
    wait_until("the refused row quarantined", WAIT, || async { Ok(quarantined(&svc).await?.len() == 1) })
        .await?;
    let sessions = lease_pids(&svc).await?;
    let q = quarantined(&svc).await?;
    assert!(q[0].error.contains("TopicAuthorizationFailed"), "{}", q[0].error);

    put(&svc, &restricted, "denied", 2, 10).await?;
    put_others(&svc, &["k1", "k2"]).await?;
    wait_until("other keys published", WAIT, || async { Ok(svc.outbox_len().await? == 1) }).await?;
    assert_eq!(waiting(&svc, "denied").await?, [2]);
    assert_eq!(quarantined(&svc).await?.len(), 1, "the waiting row was never sent");
    assert_eq!(lease_pids(&svc).await?, sessions, "the relay's session was not restarted");

    assert_eq!(quarantine::retry(&svc.pool, &svc.schema, Selection::All, "alice").await?, [q[0].seq]);
    wait_until("outbox drained after retry", WAIT, || async {
        Ok(svc.outbox_len().await? == 0 && quarantined(&svc).await?.is_empty())
    })
    .await?;
    relay.stop().await?;

    let messages = read(&kafka, &restricted, |m| numbers(m, "denied").len() >= 2).await?;
    assert_eq!(numbers(&messages, "denied"), [1, 2], "the retried row first, then the one that waited");
    let messages =
        read(&kafka, &svc.topic, |m| ["k1", "k2"].iter().all(|k| numbers(m, k).len() >= 3)).await?;
    for key in ["k1", "k2"] {
        assert_eq!(numbers(&messages, key), [1, 2, 3], "{key}");
    }
    Ok(())
}
