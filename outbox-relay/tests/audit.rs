//! The audit trail against a real PostgreSQL: appends form unbroken chains (also from many
//! concurrent writers, side by side in several chains, and only for transactions that commit),
//! the database refuses UPDATE, DELETE and TRUNCATE, and `verify` names the chain, the record and
//! the kind of break when a superuser tampers through SQL with the triggers bypassed.

use sqlx::{AssertSqlSafe, PgPool};
use trialflow_outbox::SchemaName;
use trialflow_outbox::audit::{self, AuditRecord, Break, Broken, StoredRecord};
use trialflow_testkit::TestService;

fn record(n: usize) -> AuditRecord {
    AuditRecord::by_person("alice", "site_staff", "subject.screened", "subject", format!("701-{n:04}"))
        .study("S1")
        .site(Some("701"))
        .change("status", serde_json::Value::Null, "screened")
        .change("age_years", serde_json::Value::Null, 71)
        .cause(format!("request:key-{n}"))
}

/// Appends `n` records, one transaction each.
async fn write(pool: &PgPool, schema: &SchemaName, n: usize) -> anyhow::Result<()> {
    for i in 0..n {
        let mut tx = pool.begin().await?;
        audit::append(&mut tx, schema, &[record(i)]).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Runs `sql` as a superuser with every trigger bypassed, as a tamperer would.
async fn tamper(pool: &PgPool, sql: &str) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await?;
    sqlx::query(AssertSqlSafe(sql.to_string())).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// The break `verify` finds, in chain 0 (where one writer at a time appends).
async fn broken(svc: &TestService) -> anyhow::Result<Break> {
    let found = broken_in(svc).await?;
    anyhow::ensure!(found.chain == 0, "a break in chain {}: {found}", found.chain);
    Ok(found.what)
}

async fn broken_in(svc: &TestService) -> anyhow::Result<Broken> {
    let verdict = audit::verify(&svc.pool, &svc.schema).await?;
    verdict.broken.clone().ok_or_else(|| anyhow::anyhow!("the tampered chain verified: {verdict:?}"))
}

/// Record `seq` of chain 0.
async fn stored(svc: &TestService, seq: i64) -> anyhow::Result<StoredRecord> {
    let mut conn = svc.pool.acquire().await?;
    let records = audit::read(&mut conn, &svc.schema, None, None, 10_000).await?;
    records
        .into_iter()
        .find(|r| (r.chain, r.seq) == (0, seq))
        .ok_or_else(|| anyhow::anyhow!("no record {seq}"))
}

#[tokio::test]
async fn an_untouched_chain_verifies_and_batches_take_consecutive_seqs() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    let empty = audit::verify(&svc.pool, &svc.schema).await?;
    assert!(empty.is_intact() && empty.records == 0, "{empty:?}");
    let chains: Vec<(i16, i64)> = empty.heads.iter().map(|h| (h.chain, h.seq)).collect();
    assert_eq!(chains, (0..audit::CHAINS).map(|c| (c, 0)).collect::<Vec<_>>(), "every chain at its genesis");
    write(&svc.pool, &svc.schema, 3).await?;
    let mut tx = svc.pool.begin().await?;
    let seqs = audit::append(&mut tx, &svc.schema, &[record(10), record(11), record(12)]).await?;
    tx.commit().await?;
    assert_eq!(seqs, (0, vec![4, 5, 6]), "one writer at a time: chain 0");
    let verdict = audit::verify(&svc.pool, &svc.schema).await?;
    assert!(verdict.is_intact(), "{verdict:?}");
    assert_eq!((verdict.records, verdict.heads[0].seq), (6, 6));
    assert_eq!(verdict.heads[0].hash, stored(&svc, 6).await?.hash);

    let r = stored(&svc, 5).await?;
    assert_eq!(
        (r.actor_user.as_str(), r.actor_role.as_str(), r.action.as_str()),
        ("alice", "site_staff", "subject.screened")
    );
    assert_eq!((r.entity_id.as_str(), r.cause.as_deref()), ("701-0011", Some("request:key-11")));
    let changes: serde_json::Value = serde_json::from_str(&r.changes)?;
    assert_eq!(changes[0], serde_json::json!({"field": "status", "old": null, "new": "screened"}));
    assert_eq!(r.recorded_at, stored(&svc, 4).await?.recorded_at, "one transaction, one time");
    Ok(())
}

#[tokio::test]
async fn a_rolled_back_transaction_leaves_no_record_and_no_gap() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    let mut tx = svc.pool.begin().await?;
    assert_eq!(audit::append(&mut tx, &svc.schema, &[record(1)]).await?, (0, vec![1]));
    tx.rollback().await?;
    let mut tx = svc.pool.begin().await?;
    assert_eq!(audit::append(&mut tx, &svc.schema, &[record(2)]).await?, (0, vec![1]), "seq 1 again");
    tx.commit().await?;
    let verdict = audit::verify(&svc.pool, &svc.schema).await?;
    assert!(verdict.is_intact() && verdict.records == 1, "{verdict:?}");
    Ok(())
}

#[tokio::test]
async fn the_database_refuses_update_delete_truncate_and_records_off_the_chain() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    write(&svc.pool, &svc.schema, 2).await?;
    let s = &svc.schema;
    for sql in [
        format!("UPDATE {s}.audit_trail SET reason = 'edited' WHERE chain = 0 AND seq = 1"),
        format!("DELETE FROM {s}.audit_trail WHERE seq = 2"),
        format!("TRUNCATE {s}.audit_trail"),
        format!("UPDATE {s}.audit_head SET last_seq = 1"),
        format!("DELETE FROM {s}.audit_head"),
        format!("TRUNCATE {s}.audit_head"),
        format!(
            "INSERT INTO {s}.audit_head (chain, last_seq, last_hash) VALUES (99, 0, '\\x{}')",
            hex(&[0; 32])
        ),
    ] {
        let error = sqlx::query(AssertSqlSafe(sql.clone())).execute(&svc.pool).await.err();
        let message = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("append-only") || message.contains("moves only with an append"),
            "{sql}: {message:?}"
        );
    }
    // A record that does not follow the head, or does not link to it, is refused too.
    let last = stored(&svc, 2).await?;
    let insert = |seq: i64, prev: &[u8]| {
        format!(
            "INSERT INTO {s}.audit_trail (chain, seq, recorded_at, actor_user, actor_role, action, entity_type,
                 entity_id, changes, unblinded, prev_hash, hash)
             VALUES (0, {seq}, now(), 'mallory', 'admin', 'x', 'y', 'z', '[]', false, '\\x{}', '\\x{}')",
            hex(prev),
            hex(&[7; 32])
        )
    };
    for (sql, why) in
        [(insert(4, &last.hash), "do not follow its head"), (insert(3, &[9; 32]), "does not link")]
    {
        let error = sqlx::query(AssertSqlSafe(sql)).execute(&svc.pool).await.err();
        let message = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains(why), "{message:?}");
    }
    assert!(audit::verify(&svc.pool, &svc.schema).await?.is_intact());

    // Linked but with a made-up hash: the database takes it (it does not know the recipe), verify
    // names it.
    sqlx::query(AssertSqlSafe(insert(3, &last.hash))).execute(&svc.pool).await?;
    assert_eq!(broken(&svc).await?, Break::Edited { seq: 3 });
    Ok(())
}

#[tokio::test]
async fn verify_names_an_edited_record() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    write(&svc.pool, &svc.schema, 5).await?;
    tamper(
        &svc.pool,
        &format!("UPDATE {}.audit_trail SET actor_user = 'bob' WHERE chain = 0 AND seq = 3", svc.schema),
    )
    .await?;
    let found = broken(&svc).await?;
    assert_eq!(found, Break::Edited { seq: 3 });
    assert_eq!((found.kind(), found.seq()), ("edited", 3));
    assert!(found.to_string().contains("record 3 was edited"), "{found}");
    Ok(())
}

#[tokio::test]
async fn verify_names_a_record_replaced_with_a_recomputed_hash() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    write(&svc.pool, &svc.schema, 5).await?;
    let s = &svc.schema;
    tamper(&svc.pool, &format!("UPDATE {s}.audit_trail SET changes = '[]' WHERE chain = 0 AND seq = 3"))
        .await?;
    let hash = stored(&svc, 3).await?.expected_hash();
    tamper(
        &svc.pool,
        &format!("UPDATE {s}.audit_trail SET hash = '\\x{}' WHERE chain = 0 AND seq = 3", hex(&hash)),
    )
    .await?;
    assert_eq!(broken(&svc).await?, Break::Unlinked { seq: 4 });
    Ok(())
}

#[tokio::test]
async fn verify_names_deleted_records() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    write(&svc.pool, &svc.schema, 5).await?;
    let s = &svc.schema;
    tamper(&svc.pool, &format!("DELETE FROM {s}.audit_trail WHERE chain = 0 AND seq = 3")).await?;
    let found = broken(&svc).await?;
    assert_eq!(found, Break::Deleted { from: 3, to: 3 });
    assert!(found.to_string().contains("record 3 was deleted"), "{found}");

    let svc = TestService::new(None, 1).await?;
    write(&svc.pool, &svc.schema, 5).await?;
    let s = &svc.schema;
    tamper(&svc.pool, &format!("DELETE FROM {s}.audit_trail WHERE chain = 0 AND seq >= 4")).await?;
    assert_eq!(broken(&svc).await?, Break::TailDeleted { last: 3, head: 5 });

    let svc = TestService::new(None, 1).await?;
    write(&svc.pool, &svc.schema, 3).await?;
    let s = &svc.schema;
    tamper(&svc.pool, &format!("DELETE FROM {s}.audit_trail WHERE chain = 0 AND seq = 1")).await?;
    assert_eq!(broken(&svc).await?, Break::Deleted { from: 1, to: 1 });
    Ok(())
}

#[tokio::test]
async fn verify_names_a_forged_record_inserted_with_the_triggers_bypassed() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    write(&svc.pool, &svc.schema, 4).await?;
    // A copy of record 4 as record 5, linked and with the right hash for its content: only the
    // head, which the bypass did not move, gives it away.
    let mut forged = stored(&svc, 4).await?;
    forged.seq = 5;
    forged.prev_hash = forged.hash.clone();
    forged.actor_user = "mallory".into();
    let hash = forged.expected_hash();
    let s = &svc.schema;
    tamper(
        &svc.pool,
        &format!(
            "INSERT INTO {s}.audit_trail (chain, seq, recorded_at, actor_user, actor_role, action, entity_type,
                 entity_id, study_id, site_id, changes, unblinded, reason, cause, prev_hash, hash)
             SELECT 0, 5, recorded_at, 'mallory', actor_role, action, entity_type, entity_id, study_id,
                    site_id, changes, unblinded, reason, cause, '\\x{}', '\\x{}'
             FROM {s}.audit_trail WHERE chain = 0 AND seq = 4",
            hex(&forged.prev_hash),
            hex(&hash)
        ),
    )
    .await?;
    assert_eq!(stored(&svc, 5).await?.expected_hash(), hash, "a well-forged record");
    let found = broken(&svc).await?;
    assert_eq!(found, Break::BeyondHead { seq: 5, head: 4 });
    assert_eq!(found.kind(), "inserted");
    Ok(())
}

#[tokio::test]
async fn many_concurrent_writers_make_unbroken_chains() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    let (writers, each) = (12, 15);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (pool, schema) = (svc.pool.clone(), svc.schema.clone());
        tasks.spawn(async move {
            for i in 0..each {
                let mut tx = pool.begin().await?;
                // Something before the append, as a service does, and batches of 1 to 3.
                sqlx::query("SELECT pg_sleep(0.001)").execute(&mut *tx).await?;
                let batch: Vec<AuditRecord> = (0..=(i % 3)).map(|k| record(w * 1000 + i * 10 + k)).collect();
                audit::append(&mut tx, &schema, &batch).await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let expected = writers as u64 * (0..each).map(|i| (i % 3 + 1) as u64).sum::<u64>();
    let verdict = audit::verify(&svc.pool, &svc.schema).await?;
    assert!(verdict.is_intact(), "{verdict:?}");
    let heads: i64 = verdict.heads.iter().map(|h| h.seq).sum();
    assert_eq!((verdict.records, heads), (expected, expected as i64));
    Ok(())
}

/// Transactions that hold a chain's head do not make the next writer wait: it takes the next
/// free chain; when all are held it waits for one (this connection's), then goes on. Every chain
/// verifies, and the records list in time order across the chains.
#[tokio::test]
async fn writers_side_by_side_take_free_chains_and_wait_only_when_all_are_held() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    let mut open = Vec::new();
    for i in 0..audit::CHAINS {
        let mut tx = svc.pool.begin().await?;
        let taken = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            audit::append(&mut tx, &svc.schema, &[record(i as usize)]),
        )
        .await
        .map_err(|_| anyhow::anyhow!("writer {i} waited though chain {i} was free"))??;
        assert_eq!(taken, (i, vec![1]), "the lowest free chain");
        open.push(tx);
    }
    // Every head held: the next writer waits, as PostgreSQL shows, until one commits.
    let mut conn = svc.pool.acquire().await?.detach();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut conn).await?;
    let schema = svc.schema.clone();
    let waiting = tokio::spawn(async move {
        let mut tx = sqlx::Connection::begin(&mut conn).await?;
        let taken = audit::append(&mut tx, &schema, &[record(100)]).await?;
        tx.commit().await?;
        anyhow::Ok(taken)
    });
    trialflow_testkit::wait_until(
        "the ninth writer waits for a head",
        std::time::Duration::from_secs(10),
        || {
            let pool = svc.pool.clone();
            async move {
                let wait: Option<String> =
                    sqlx::query_scalar("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1")
                        .bind(pid)
                        .fetch_optional(&pool)
                        .await?
                        .flatten();
                Ok(wait.as_deref() == Some("Lock"))
            }
        },
    )
    .await?;
    let own = (pid % i32::from(audit::CHAINS)) as i16;
    for tx in open {
        tx.commit().await?;
    }
    assert_eq!(waiting.await??, (own, vec![2]), "the chain of its connection, after the record there");

    let verdict = audit::verify(&svc.pool, &svc.schema).await?;
    assert!(verdict.is_intact(), "{verdict:?}");
    assert_eq!(verdict.records, audit::CHAINS as u64 + 1);
    let mut conn = svc.pool.acquire().await?;
    let listed = audit::read(&mut conn, &svc.schema, None, None, 100).await?;
    let positions: Vec<_> = listed.iter().map(StoredRecord::position).collect();
    assert!(positions.is_sorted(), "time order: {positions:?}");
    // Page by page from a position: the same records.
    let first = audit::read(&mut conn, &svc.schema, None, None, 4).await?;
    let rest =
        audit::read(&mut conn, &svc.schema, None, first.last().map(StoredRecord::position).as_ref(), 100)
            .await?;
    assert_eq!([first, rest].concat(), listed);
    Ok(())
}

/// A break in a chain other than 0 is named with its chain; a record moved to another chain
/// leaves a gap in its own.
#[tokio::test]
async fn verify_names_the_chain_of_a_break() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    // Two writers at once: chains 0 and 1, three records each.
    for i in 0..3 {
        let mut a = svc.pool.begin().await?;
        let mut b = svc.pool.begin().await?;
        assert_eq!(audit::append(&mut a, &svc.schema, &[record(i)]).await?.0, 0);
        assert_eq!(audit::append(&mut b, &svc.schema, &[record(10 + i)]).await?.0, 1);
        a.commit().await?;
        b.commit().await?;
    }
    assert!(audit::verify(&svc.pool, &svc.schema).await?.is_intact());
    let s = &svc.schema;
    tamper(&svc.pool, &format!("UPDATE {s}.audit_trail SET chain = 2 WHERE chain = 1 AND seq = 2")).await?;
    let found = broken_in(&svc).await?;
    assert_eq!(found, Broken { chain: 1, what: Break::Deleted { from: 2, to: 2 } });
    assert_eq!(found.to_string(), "chain 1: record 2 was deleted");
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
