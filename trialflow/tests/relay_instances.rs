//! Three `trialflow relay` processes drain one outbox while a writer keeps committing; one of
//! them is killed with SIGKILL mid-stream. Every row must be published at least once and, per
//! key, first deliveries must arrive in commit order.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::process::{Child, Command};
use trialflow_outbox::shard::shard_lock_namespace;
use trialflow_testkit::workload::{check_delivery, read_events};
use trialflow_testkit::{TestService, database_url, kafka, wait_until};

const EVENTS: u64 = 6000;
const WAIT: Duration = Duration::from_secs(120);

fn spawn_relay(svc: &TestService) -> anyhow::Result<Child> {
    Ok(Command::new(env!("CARGO_BIN_EXE_trialflow"))
        .arg("relay")
        .env("DATABASE_URL", database_url())
        .env("KAFKA_BOOTSTRAP_SERVERS", kafka().bootstrap_servers)
        .env("OUTBOX_SOURCES", svc.schema.as_str())
        .env("OUTBOX_BATCH_SIZE", "50")
        .env("OUTBOX_REBALANCE_INTERVAL_MS", "200")
        .env("OUTBOX_POLL_INTERVAL_MS", "100")
        .env("OUTBOX_MAX_BACKOFF_MS", "500")
        .env("METRICS_ADDR", "")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}

/// Relay sessions that currently own at least one shard of the test outbox.
async fn owners(svc: &TestService) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(DISTINCT pid) FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid::bigint = $1",
    )
    .bind(i64::from(shard_lock_namespace(&svc.schema)))
    .fetch_one(&svc.pool)
    .await?)
}

#[tokio::test]
async fn three_relays_one_killed_keep_per_key_order() -> anyhow::Result<()> {
    let svc = TestService::new(Some(&kafka()), 6).await?;
    let mut relays = vec![spawn_relay(&svc)?, spawn_relay(&svc)?, spawn_relay(&svc)?];
    wait_until("all three relays own shards", WAIT, || async { Ok(owners(&svc).await? == 3) }).await?;

    let writer = {
        let workload = svc.workload.clone();
        tokio::spawn(
            async move { workload.generate("multi", 60, EVENTS, 4, Arc::new(AtomicU64::new(0))).await },
        )
    };
    // Mid-stream: some rows are published, more are being written.
    wait_until("publishing under way", WAIT, || async {
        let pending = svc.outbox_len().await?;
        let written: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {}.vital_sign",
            svc.schema
        )))
        .fetch_one(&svc.pool)
        .await?;
        Ok(written >= 1000 && written - pending >= 500)
    })
    .await?;
    let mut victim = relays.remove(1);
    victim.start_kill()?; // SIGKILL: no cleanup, its connections just drop
    victim.wait().await?;

    writer.await??;
    wait_until("outbox drained by the survivors", WAIT, || async { Ok(svc.outbox_len().await? == 0) })
        .await?;
    assert_eq!(owners(&svc).await?, 2, "the survivors own every shard");

    for relay in &mut relays {
        let pid = relay.id().map(|p| p.to_string()).unwrap_or_default();
        Command::new("kill").args(["-TERM", &pid]).status().await?;
        let status = relay.wait().await?;
        assert!(status.success(), "relay exits cleanly on SIGTERM: {status}");
    }

    let messages = read_events(&kafka(), &svc.topic, EVENTS, Duration::ZERO, WAIT).await?;
    let report = check_delivery(&messages);
    assert_eq!(report.distinct, EVENTS, "events lost: {report:?}");
    assert_eq!(report.order_violations, 0, "per-key order broken: {report:?}");
    Ok(())
}
