//! The audit trail against a real PostgreSQL: appends form one chain (also from many concurrent
//! writers, and only for transactions that commit), the database refuses UPDATE, DELETE and
//! TRUNCATE, and `verify` names the record and the kind of break when a superuser tampers through
//! SQL with the triggers bypassed.

use sqlx::{AssertSqlSafe, PgPool};
use trialflow_outbox::SchemaName;
use trialflow_outbox::audit::{self, AuditRecord, Break, StoredRecord};
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

async fn broken(svc: &TestService) -> anyhow::Result<Break> {
    let verdict = audit::verify(&svc.pool, &svc.schema).await?;
    verdict.broken.clone().ok_or_else(|| anyhow::anyhow!("the tampered chain verified: {verdict:?}"))
}

async fn stored(svc: &TestService, seq: i64) -> anyhow::Result<StoredRecord> {
    let mut conn = svc.pool.acquire().await?;
    let records = audit::read(&mut conn, &svc.schema, None, seq - 1, 1).await?;
    records.into_iter().next().ok_or_else(|| anyhow::anyhow!("no record {seq}"))
}

#[tokio::test]
async fn an_untouched_chain_verifies_and_batches_take_consecutive_seqs() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    let empty = audit::verify(&svc.pool, &svc.schema).await?;
    assert!(empty.is_intact() && empty.records == 0 && empty.head_seq == 0, "{empty:?}");
    write(&svc.pool, &svc.schema, 3).await?;
    let mut tx = svc.pool.begin().await?;
    let seqs = audit::append(&mut tx, &svc.schema, &[record(10), record(11), record(12)]).await?;
    tx.commit().await?;
    assert_eq!(seqs, [4, 5, 6]);
    let verdict = audit::verify(&svc.pool, &svc.schema).await?;
    assert!(verdict.is_intact(), "{verdict:?}");
    assert_eq!((verdict.records, verdict.head_seq), (6, 6));
    assert_eq!(verdict.head_hash, stored(&svc, 6).await?.hash);

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
    assert_eq!(audit::append(&mut tx, &svc.schema, &[record(1)]).await?, [1]);
    tx.rollback().await?;
    let mut tx = svc.pool.begin().await?;
    assert_eq!(audit::append(&mut tx, &svc.schema, &[record(2)]).await?, [1], "seq 1 again");
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
        format!("UPDATE {s}.audit_trail SET reason = 'edited' WHERE seq = 1"),
        format!("DELETE FROM {s}.audit_trail WHERE seq = 2"),
        format!("TRUNCATE {s}.audit_trail"),
        format!("UPDATE {s}.audit_head SET last_seq = 1"),
        format!("DELETE FROM {s}.audit_head"),
        format!("TRUNCATE {s}.audit_head"),
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
            "INSERT INTO {s}.audit_trail (seq, recorded_at, actor_user, actor_role, action, entity_type,
                 entity_id, changes, unblinded, prev_hash, hash)
             VALUES ({seq}, now(), 'mallory', 'admin', 'x', 'y', 'z', '[]', false, '\\x{}', '\\x{}')",
            hex(prev),
            hex(&[7; 32])
        )
    };
    for (sql, why) in
        [(insert(4, &last.hash), "do not follow the head"), (insert(3, &[9; 32]), "does not link")]
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
    tamper(&svc.pool, &format!("UPDATE {}.audit_trail SET actor_user = 'bob' WHERE seq = 3", svc.schema))
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
    tamper(&svc.pool, &format!("UPDATE {s}.audit_trail SET changes = '[]' WHERE seq = 3")).await?;
    let hash = stored(&svc, 3).await?.expected_hash();
    tamper(&svc.pool, &format!("UPDATE {s}.audit_trail SET hash = '\\x{}' WHERE seq = 3", hex(&hash)))
        .await?;
    assert_eq!(broken(&svc).await?, Break::Unlinked { seq: 4 });
    Ok(())
}

#[tokio::test]
async fn verify_names_deleted_records() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    write(&svc.pool, &svc.schema, 5).await?;
    let s = &svc.schema;
    tamper(&svc.pool, &format!("DELETE FROM {s}.audit_trail WHERE seq = 3")).await?;
    let found = broken(&svc).await?;
    assert_eq!(found, Break::Deleted { from: 3, to: 3 });
    assert!(found.to_string().contains("record 3 was deleted"), "{found}");

    let svc = TestService::new(None, 1).await?;
    write(&svc.pool, &svc.schema, 5).await?;
    let s = &svc.schema;
    tamper(&svc.pool, &format!("DELETE FROM {s}.audit_trail WHERE seq >= 4")).await?;
    assert_eq!(broken(&svc).await?, Break::TailDeleted { last: 3, head: 5 });

    let svc = TestService::new(None, 1).await?;
    write(&svc.pool, &svc.schema, 3).await?;
    let s = &svc.schema;
    tamper(&svc.pool, &format!("DELETE FROM {s}.audit_trail WHERE seq = 1")).await?;
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
            "INSERT INTO {s}.audit_trail (seq, recorded_at, actor_user, actor_role, action, entity_type,
                 entity_id, study_id, site_id, changes, unblinded, reason, cause, prev_hash, hash)
             SELECT 5, recorded_at, 'mallory', actor_role, action, entity_type, entity_id, study_id,
                    site_id, changes, unblinded, reason, cause, '\\x{}', '\\x{}'
             FROM {s}.audit_trail WHERE seq = 4",
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
async fn many_concurrent_writers_make_one_unbroken_chain() -> anyhow::Result<()> {
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
    assert_eq!((verdict.records, verdict.head_seq), (expected, expected as i64));
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
