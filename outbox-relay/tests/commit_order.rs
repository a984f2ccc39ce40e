//! Commit-order safety: a transaction that commits late must never be skipped, and nothing a
//! later transaction wrote may be read while an older one is still open.

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::Connection;
use trialflow_outbox::kafka::TopicReader;
use trialflow_outbox::store::Store;
use trialflow_outbox::{Outbox, OutboxEvent};
use trialflow_testkit::{RunningRelay, TestService, kafka, readable_rows, wait_until};
use uuid::Uuid;

fn event(topic: &str, key: &str) -> OutboxEvent {
    OutboxEvent {
        topic: topic.to_string(),
        key: key.to_string(),
        event_type: "TestEvent".to_string(),
        event_id: Uuid::now_v7(),
        content_type: "text/plain".to_string(),
        payload: key.as_bytes().to_vec(),
        headers: Default::default(),
    }
}

async fn read_ids(svc: &TestService, n: usize) -> anyhow::Result<BTreeSet<String>> {
    let msgs = TopicReader::new(&kafka(), &svc.topic, true)?
        .read_until(Duration::from_secs(30), move |m| m.len() >= n)
        .await?;
    Ok(msgs.iter().filter_map(|m| m.header("event_id").map(str::to_string)).collect())
}

/// Transaction A inserts first (lower seq, lower tx id) and commits last. A relay that tracked
/// "the highest seq published" would publish B's row and then skip A's forever.
#[tokio::test]
async fn late_commit_with_lower_sequence_is_published() -> anyhow::Result<()> {
    let svc = TestService::new(Some(&kafka()), 3).await?;
    let outbox = Outbox::open(&svc.pool, svc.schema.clone()).await?;

    let mut tx_a = svc.pool.begin().await?;
    let a = event(&svc.topic, "key-a");
    outbox.enqueue(&mut tx_a, a.clone()).await?;

    let mut tx_b = svc.pool.begin().await?;
    let b = event(&svc.topic, "key-b");
    outbox.enqueue(&mut tx_b, b.clone()).await?;
    tx_b.commit().await?;

    // B is committed but must not be readable while A (older) is open.
    let store = Store::new(&svc.schema);
    let mut conn = sqlx::PgConnection::connect(&trialflow_testkit::database_url()).await?;
    let all_shards: Vec<i32> = (0..outbox.shard_count() as i32).collect();
    let visible = store.read_batch(&mut conn, &all_shards, None, 100).await?;
    assert!(visible.is_empty(), "rows of a younger transaction were readable while an older one was open");

    tx_a.commit().await?;
    let visible = readable_rows(&store, &mut conn, &all_shards, 2, Duration::from_secs(20)).await?;
    let ids: Vec<Uuid> = visible.iter().map(|r| r.event_id).collect();
    assert_eq!(ids, vec![a.event_id, b.event_id], "both rows, in (tx_id, seq) order");

    let relay = RunningRelay::start(svc.relay_config(&kafka()));
    let published = read_ids(&svc, 2).await?;
    assert!(published.contains(&a.event_id.to_string()), "late-committing row was skipped");
    assert!(published.contains(&b.event_id.to_string()));
    wait_until("outbox drained", Duration::from_secs(20), || async { Ok(svc.outbox_len().await? == 0) })
        .await?;
    relay.stop().await
}

/// The lower seq belongs to the transaction with the HIGHER id, which commits last: the relay
/// has already moved past the other row when it appears, and must still publish it.
#[tokio::test]
async fn late_commit_with_higher_tx_id_is_published_after_cursor_moved() -> anyhow::Result<()> {
    let svc = TestService::new(Some(&kafka()), 3).await?;
    let outbox = Outbox::open(&svc.pool, svc.schema.clone()).await?;
    let relay = RunningRelay::start(svc.relay_config(&kafka()));

    let mut tx_b = svc.pool.begin().await?;
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut *tx_b).await?; // B takes the lower tx id
    let mut tx_a = svc.pool.begin().await?;
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut *tx_a).await?;
    let a = event(&svc.topic, "key-a");
    outbox.enqueue(&mut tx_a, a.clone()).await?; // A takes the lower seq
    let b = event(&svc.topic, "key-b");
    outbox.enqueue(&mut tx_b, b.clone()).await?;
    tx_b.commit().await?;

    // B (lower tx id, already ended) is published while A is still open...
    let published = read_ids(&svc, 1).await?;
    assert_eq!(published, BTreeSet::from([b.event_id.to_string()]));

    // ...and A's row, with the lower seq, still comes out after A commits.
    tx_a.commit().await?;
    let published = read_ids(&svc, 2).await?;
    assert!(published.contains(&a.event_id.to_string()), "row with lower seq committed late was skipped");
    wait_until("outbox drained", Duration::from_secs(20), || async { Ok(svc.outbox_len().await? == 0) })
        .await?;
    relay.stop().await
}

/// Transaction ids are compared as numbers: `9` before `10` (as text `10` sorts first).
#[tokio::test]
async fn transaction_ids_order_numerically() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    let sql = format!(
        "INSERT INTO {s}.outbox (tx_id, shard, topic, key, event_id, event_type, content_type, payload)
         VALUES ('10'::xid8, 0, 't', 'k', gen_random_uuid(), 'E', 'x', ''),
                ('9'::xid8, 0, 't', 'k', gen_random_uuid(), 'E', 'x', ''),
                ('100'::xid8, 0, 't', 'k', gen_random_uuid(), 'E', 'x', '')",
        s = svc.schema
    );
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&svc.pool).await?;
    let store = Store::new(&svc.schema);
    let mut conn = sqlx::PgConnection::connect(&trialflow_testkit::database_url()).await?;
    let rows = store.read_batch(&mut conn, &[0], None, 10).await?;
    let tx_ids: Vec<&str> = rows.iter().map(|r| r.tx_id.as_str()).collect();
    assert_eq!(tx_ids, ["9", "10", "100"]);
    // And the cursor continues numerically too.
    let rest = store
        .read_batch(&mut conn, &[0], Some(&trialflow_outbox::store::Cursor::after(&rows[0])), 10)
        .await?;
    let tx_ids: Vec<&str> = rest.iter().map(|r| r.tx_id.as_str()).collect();
    assert_eq!(tx_ids, ["10", "100"]);
    Ok(())
}

/// The read walks the `(tx_id, seq)` index and stops after its limit, whatever the outbox's
/// statistics say. Without them (a new outbox, or one last analyzed near-empty) PostgreSQL
/// would fetch the whole backlog and sort it on every read: a backlog would drain in quadratic
/// time. The relay reads on a session with `store::read_session`'s settings.
#[tokio::test]
async fn the_read_walks_the_index_without_statistics() -> anyhow::Result<()> {
    use std::str::FromStr;
    let svc = TestService::new(None, 1).await?;
    let s = &svc.schema;
    // A backlog in 20 transactions that autovacuum will not analyze during the test.
    sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE {s}.outbox SET (autovacuum_enabled = false)")))
        .execute(&svc.pool)
        .await?;
    for t in 0..20 {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {s}.outbox (shard, topic, key, event_id, event_type, content_type, payload)
             SELECT i % 16, 't', 'key-' || (i % 1000), gen_random_uuid(), 'E', 'x', convert_to(repeat('x', 300), 'UTF8')
             FROM generate_series({from}, {to}) i",
            from = t * 1000,
            to = t * 1000 + 999
        )))
        .execute(&svc.pool)
        .await?;
    }
    let store = Store::new(s);
    let shards: Vec<i32> = (0..16).collect();
    let options = sqlx::postgres::PgConnectOptions::from_str(&trialflow_testkit::database_url())?;

    // Precondition: a session without the settings sorts the whole backlog (else this test
    // would show nothing).
    let mut plain = sqlx::PgConnection::connect_with(&options).await?;
    let plan = store.explain_read(&mut plain, &shards, 1000, false).await?;
    assert!(plan.contains("Sort"), "expected the plain session to sort, got:\n{plan}");

    let mut relay_session =
        sqlx::PgConnection::connect_with(&trialflow_outbox::store::read_session(options)).await?;
    for quarantined in [false, true] {
        let plan = store.explain_read(&mut relay_session, &shards, 1000, quarantined).await?;
        assert!(
            plan.contains("Index Scan using outbox_commit_order") && !plan.contains("Sort"),
            "the read (quarantine checked: {quarantined}) must walk the index, got:\n{plan}"
        );
    }
    // And it reads in order, from the first transaction on.
    let rows = store.read_batch(&mut relay_session, &shards, None, 1000).await?;
    assert_eq!(rows.len(), 1000);
    assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq), "rows of one transaction in seq order");
    Ok(())
}
