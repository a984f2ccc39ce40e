//! The exactly-once relay's takeover of shards whose previous owner died mid-way, against the
//! real broker:
//! * shard A's owner committed a transaction (rows + its state-topic marker) and died before
//!   deleting the rows: the next owner deletes them without publishing them again;
//! * shard B's owner died with a transaction open: the next owner's `init_transactions` aborts it,
//!   and the rows go out once, in the next owner's transaction.
//!
//! A `read_committed` reader then sees every event exactly once, per key in commit order. Garbage
//! and forged markers on the state topic delete nothing and block nothing. (The relay-process
//! version, with SIGSTOP/SIGCONT, is trialflow/tests/relay_fencing.rs.)

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use trialflow_outbox::exactly_once::transactional_id;
use trialflow_outbox::kafka::{TopicReader, ensure_topics};
use trialflow_outbox::publisher;
use trialflow_outbox::store::{OutboxRow, Store};
use trialflow_testkit::workload::{check_delivery, read_events};
use trialflow_testkit::{RunningRelay, TestService, kafka, readable_rows, unique, wait_until};

const EVENTS: u64 = 200;
const PREFIX: &str = "test-relay.";
const WAIT: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_secs(10);

/// A transactional producer of `shard` as a relay would have it.
fn shard_producer(svc: &TestService, shard: i32) -> anyhow::Result<FutureProducer> {
    let mut config = publisher::producer_config(&kafka(), "dead-relay");
    config.set("transactional.id", transactional_id(PREFIX, &svc.schema, shard));
    let producer: FutureProducer = config.create()?;
    producer.init_transactions(TIMEOUT)?;
    producer.begin_transaction()?;
    Ok(producer)
}

/// Sends `rows` (and, when `state_topic` is given, their marker) in the producer's transaction.
async fn send(
    producer: &FutureProducer,
    svc: &TestService,
    rows: &[&OutboxRow],
    state_topic: Option<&str>,
) -> anyhow::Result<()> {
    let mut deliveries = Vec::new();
    for row in rows {
        deliveries.push(
            publisher::send(producer, row, &publisher::PublishSpan::default())
                .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        );
    }
    if let Some(topic) = state_topic {
        // The marker's format as the README documents it: the published rows' seqs and event ids.
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        let event_ids: Vec<String> = rows.iter().map(|r| r.event_id.to_string()).collect();
        let marker = serde_json::json!({ "seqs": seqs, "event_ids": event_ids }).to_string();
        let key = transactional_id(PREFIX, &svc.schema, rows[0].shard);
        producer.send_result(FutureRecord::to(topic).key(&key).payload(&marker)).map_err(|(e, _)| e)?;
    }
    producer.flush(TIMEOUT)?;
    for delivery in deliveries {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

#[tokio::test]
async fn a_new_owner_finishes_what_a_dead_owner_committed_or_left_open() -> anyhow::Result<()> {
    let svc = TestService::new(Some(&kafka()), 3).await?;
    let state_topic = unique("relay-state");
    ensure_topics(&kafka(), &[(&state_topic, 1)]).await?;
    svc.workload.generate("eos", 20, EVENTS, 4, Arc::new(AtomicU64::new(0))).await?;

    let mut conn = svc.pool.acquire().await?;
    let all_shards: Vec<i32> = (0..16).collect();
    let rows = readable_rows(&Store::new(&svc.schema), &mut conn, &all_shards, EVENTS as usize, WAIT).await?;
    assert_eq!(rows.len() as u64, EVENTS);
    let (shard_a, shard_b) = (rows[0].shard, rows.iter().map(|r| r.shard).find(|s| *s != rows[0].shard));
    let shard_b = shard_b.expect("rows in two shards");
    let of = |shard: i32| rows.iter().filter(move |r| r.shard == shard).take(5).collect::<Vec<_>>();
    let (committed, open) = (of(shard_a), of(shard_b));

    // Shard A: committed with its marker, never deleted.
    let a = shard_producer(&svc, shard_a)?;
    send(&a, &svc, &committed, Some(&state_topic)).await?;
    a.commit_transaction(TIMEOUT)?;
    // Shard B: sent, never committed (the producer dies with the transaction open).
    let b = shard_producer(&svc, shard_b)?;
    send(&b, &svc, &open, None).await?;
    drop(b);

    let mut config = svc.relay_config(&kafka());
    config.exactly_once = true;
    config.transactional_id_prefix = PREFIX.to_string();
    config.state_topic = state_topic.clone();
    let relay = RunningRelay::start(config);
    wait_until("outbox drained", WAIT, || async { Ok(svc.outbox_len().await? == 0) }).await?;
    relay.stop().await?;

    let messages = read_events(&kafka(), &svc.topic, EVENTS, Duration::from_secs(1), WAIT).await?;
    let report = check_delivery(&messages);
    assert_eq!(report.distinct, EVENTS, "events lost: {report:?}");
    assert_eq!(report.duplicates, 0, "the committed rows were published again: {report:?}");
    assert_eq!(report.order_violations, 0, "per-key order broken: {report:?}");
    Ok(())
}

#[tokio::test]
async fn a_missing_state_topic_stops_the_relay_at_start_with_a_clear_error() -> anyhow::Result<()> {
    let svc = TestService::new(Some(&kafka()), 1).await?;
    let mut config = svc.relay_config(&kafka());
    config.exactly_once = true;
    config.state_topic = unique("no-such-state-topic");
    let error = trialflow_outbox::relay::run(config.clone(), Default::default()).await.expect_err("refused");
    let message = error.to_string();
    assert!(message.contains(&format!("state topic `{}` does not exist", config.state_topic)), "{message}");
    assert!(message.contains("trialflow topics apply"), "{message}");
    Ok(())
}

#[test]
fn hostile_exactly_once_settings_are_refused_with_a_reason() {
    use trialflow_outbox::RelayConfig;
    use trialflow_outbox::config::from_args;
    let refused =
        |args: &[&str]| from_args::<RelayConfig>(args).map(|_| ()).expect_err("refused").to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--state-topic", "state topic"], "' ' is not allowed"),
        (&["--state-topic", "st\0ate"], "'\\0' is not allowed"),
        (&["--state-topic", ""], "0 characters; 1 to 200"),
        (&["--transactional-id-prefix", "relay/"], "'/' is not allowed"),
        (&["--exactly-once", "yes"], "invalid value 'yes'"),
        (&["--lease-timeout-ms", "-1"], "unexpected argument '-1'"),
    ];
    for (args, expected) in cases {
        let message = refused(args);
        assert!(message.contains(expected), "{args:?}: {message}");
    }
}

#[tokio::test]
async fn a_lease_timeout_healthy_relays_could_not_keep_is_refused_at_start() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    let mut config = svc.relay_config(&kafka());
    config.lease_timeout_ms = 500; // below 3 × the 200 ms rebalance interval
    let error = trialflow_outbox::relay::run(config, Default::default()).await.expect_err("refused");
    assert!(error.to_string().contains("OUTBOX_LEASE_TIMEOUT_MS=500 is below 3 ×"), "{error}");
    Ok(())
}

#[tokio::test]
async fn garbage_on_the_state_topic_is_ignored_and_nothing_is_stuck() -> anyhow::Result<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    let svc = TestService::new(Some(&kafka()), 3).await?;
    let state_topic = unique("relay-state");
    ensure_topics(&kafka(), &[(&state_topic, 1)]).await?;
    svc.workload.generate("eos-garbage", 10, 50, 2, Arc::new(AtomicU64::new(0))).await?;

    // What a broken or malicious writer could leave there, under every shard's key and none:
    // invalid UTF-8 and JSON, NUL and control characters, wrong types, a huge value, no value.
    let producer: FutureProducer = publisher::producer_config(&kafka(), "garbage").create()?;
    let huge = format!("{{\"seqs\":[{}]}}", vec!["1"; 200_000].join(","));
    let forged = serde_json::json!({
        "seqs": (1..=50).collect::<Vec<i64>>(),
        "event_ids": (1..=50).map(|_| uuid::Uuid::new_v4().to_string()).collect::<Vec<_>>(),
    })
    .to_string();
    let bodies: Vec<Option<Vec<u8>>> = vec![
        Some(b"\xff\xfe\x00garbage".to_vec()),
        Some(b"{\"seqs\":\"1,2,3\"}".to_vec()),
        Some(b"{\"seqs\":[1.5, \"x\", null]}".to_vec()),
        Some(b"{\"seq\x00s\":[1]}\x07".to_vec()),
        // Well-formed but forged: guessable seqs, event ids nobody published.
        Some(forged.into_bytes()),
        Some(b"[]".to_vec()),
        Some(huge.into_bytes()),
        None,
    ];
    for shard in 0..16 {
        for key in [transactional_id(PREFIX, &svc.schema, shard).into_bytes(), b"\x00\xff".to_vec()] {
            for body in &bodies {
                let headers = OwnedHeaders::new().insert(Header { key: "x-junk", value: Some(&b"\xff"[..]) });
                let mut record =
                    FutureRecord::<[u8], [u8]>::to(&state_topic).key(key.as_slice()).headers(headers);
                if let Some(body) = body {
                    record = record.payload(body.as_slice());
                }
                producer.send(record, TIMEOUT).await.map_err(|(e, _)| e)?;
            }
        }
    }

    let mut config = svc.relay_config(&kafka());
    config.exactly_once = true;
    config.transactional_id_prefix = PREFIX.to_string();
    config.state_topic = state_topic;
    let relay = RunningRelay::start(config);
    wait_until("outbox drained", WAIT, || async { Ok(svc.outbox_len().await? == 0) }).await?;
    relay.stop().await?;
    let messages = TopicReader::new(&kafka(), &svc.topic, true)?.read_until(WAIT, |m| m.len() >= 50).await?;
    let report = check_delivery(&messages);
    assert_eq!((report.distinct, report.duplicates, report.order_violations), (50, 0, 0), "{report:?}");
    Ok(())
}
