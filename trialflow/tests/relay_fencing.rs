//! The exactly-once relay (`OUTBOX_EXACTLY_ONCE=true`): two `trialflow relay` processes drain one
//! outbox while a writer keeps committing. One is frozen with SIGSTOP, possibly mid-transaction;
//! PostgreSQL ends its silent lease session after `OUTBOX_LEASE_TIMEOUT_MS`, the other relay
//! takes its shards over and fences it; then it is resumed with SIGCONT and whatever it still had
//! in flight is refused. A `read_committed` reader (librdkafka's default, and the consumers') must
//! see every event exactly once, and per key in commit order.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::process::{Child, Command};
use trialflow_outbox::kafka::ensure_topics;
use trialflow_outbox::shard::shard_lock_namespace;
use trialflow_testkit::workload::{check_delivery, read_events};
use trialflow_testkit::{TestService, database_url, kafka, unique, wait_until};

const EVENTS: u64 = 4000;
const WAIT: Duration = Duration::from_secs(120);

fn spawn_relay(svc: &TestService, state_topic: &str, log: &std::path::Path) -> anyhow::Result<Child> {
    Ok(Command::new(env!("CARGO_BIN_EXE_trialflow"))
        .arg("relay")
        .env("DATABASE_URL", database_url())
        .env("KAFKA_BOOTSTRAP_SERVERS", kafka().bootstrap_servers)
        .env("OUTBOX_SOURCES", svc.schema.as_str())
        .env("OUTBOX_EXACTLY_ONCE", "true")
        .env("OUTBOX_STATE_TOPIC", state_topic)
        .env("OUTBOX_LEASE_TIMEOUT_MS", "1500")
        .env("OUTBOX_BATCH_SIZE", "50")
        .env("OUTBOX_REBALANCE_INTERVAL_MS", "200")
        .env("OUTBOX_POLL_INTERVAL_MS", "100")
        .env("OUTBOX_MAX_BACKOFF_MS", "500")
        .env("METRICS_ADDR", "")
        .env("RUST_LOG", "info,rdkafka=warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log)?)
        .stderr(std::fs::File::create(log.with_extension("err"))?)
        .kill_on_drop(true)
        .spawn()?)
}

/// Shards owned per relay session: `(pid, shards)`.
async fn ownership(svc: &TestService) -> anyhow::Result<Vec<(i32, i64)>> {
    Ok(sqlx::query_as(
        "SELECT pid, count(*) FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid::bigint = $1
         GROUP BY pid ORDER BY pid",
    )
    .bind(i64::from(shard_lock_namespace(&svc.schema)))
    .fetch_all(&svc.pool)
    .await?)
}

async fn published(svc: &TestService) -> anyhow::Result<i64> {
    let written: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {}.vital_sign", svc.schema)))
            .fetch_one(&svc.pool)
            .await?;
    Ok(written - svc.outbox_len().await?)
}

async fn signal(child: &Child, name: &str) -> anyhow::Result<()> {
    let pid = child.id().map(|p| p.to_string()).unwrap_or_default();
    anyhow::ensure!(Command::new("kill").args([&format!("-{name}"), &pid]).status().await?.success());
    Ok(())
}

#[tokio::test]
async fn a_paused_relay_is_fenced_and_readers_see_every_event_once_in_order() -> anyhow::Result<()> {
    let svc = TestService::new(Some(&kafka()), 6).await?;
    let state_topic = unique("relay-state");
    ensure_topics(&kafka(), &[(&state_topic, 1)]).await?;
    let logs = std::env::temp_dir().join(&state_topic);
    std::fs::create_dir_all(&logs)?;
    let (log_a, log_b) = (logs.join("a.log"), logs.join("b.log"));
    let mut paused = spawn_relay(&svc, &state_topic, &log_a)?;
    let mut other = spawn_relay(&svc, &state_topic, &log_b)?;
    let outcome = async {
        wait_until("both relays own shards", WAIT, || async { Ok(ownership(&svc).await?.len() == 2) })
            .await?;
        let writer = {
            let workload = svc.workload.clone();
            tokio::spawn(async move {
                workload.generate("fence", 60, EVENTS, 4, Arc::new(AtomicU64::new(0))).await
            })
        };
        wait_until("publishing under way", WAIT, || async { Ok(published(&svc).await? >= 500) }).await?;

        signal(&paused, "STOP").await?;
        wait_until("the other relay took every shard over", WAIT, || async {
            let owners = ownership(&svc).await?;
            Ok(owners.len() == 1 && owners[0].1 == 16)
        })
        .await?;
        let before = published(&svc).await?;
        wait_until("the other relay publishes the paused one's shards", WAIT, || async {
            Ok(published(&svc).await? >= before + 300 || svc.outbox_len().await? == 0)
        })
        .await?;
        signal(&paused, "CONT").await?;

        writer.await??;
        wait_until("outbox drained", WAIT, || async { Ok(svc.outbox_len().await? == 0) }).await?;
        for relay in [&mut paused, &mut other] {
            signal(relay, "TERM").await?;
            let status = relay.wait().await?;
            anyhow::ensure!(status.success(), "relay exits cleanly on SIGTERM: {status}");
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(error) = outcome {
        for log in [&log_a, &log_b] {
            eprintln!("--- {}:\n{}", log.display(), std::fs::read_to_string(log.with_extension("err"))?);
        }
        return Err(error);
    }

    // librdkafka reads read_committed unless told otherwise; a little longer than needed, to catch
    // a late duplicate.
    let messages = read_events(&kafka(), &svc.topic, EVENTS, Duration::from_secs(2), WAIT).await?;
    let report = check_delivery(&messages);
    assert_eq!(report.distinct, EVENTS, "events lost: {report:?}");
    assert_eq!(report.duplicates, 0, "a read_committed reader saw duplicates: {report:?}");
    assert_eq!(report.order_violations, 0, "per-key order broken: {report:?}");

    let paused_log = std::fs::read_to_string(log_a.with_extension("err"))?;
    let fenced = paused_log.lines().filter(|l| l.contains("transaction") && l.contains("WARN")).count();
    println!("the paused relay's failed transactions after SIGCONT: {fenced}");
    Ok(())
}
