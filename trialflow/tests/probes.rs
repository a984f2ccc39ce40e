//! The probes of the processes without an HTTP API of their own, as Kubernetes calls them: the real
//! `trialflow relay` and `trialflow consume monitoring`, each on its own `METRICS_ADDR`. `/healthz`
//! answers while the process runs; `/readyz` is 200 once the component works (the relay's lease
//! session is connected; the consumer has joined its group and been given its partitions), names
//! the component and, while its database is away, answers 503 with the reason; it is 200 again
//! when the database is back. `/metrics` is served beside them.

mod common;

use std::time::Duration;

use common::process::{Trialflow, free_addr, get};
use serde_json::Value;
use trialflow_outbox::topics::{self, TopicLayout};
use trialflow_schemas::topics::TopicNames;
use trialflow_testkit::{PgProxy, TestService, database_addr, kafka, unique};

/// The probes of one process whose component `component` needs the database behind `proxy`.
async fn probes_follow(
    mut process: Trialflow,
    addr: &str,
    proxy: &PgProxy,
    component: &str,
) -> anyhow::Result<()> {
    let ready = process.wait_readiness(addr, 200, Some((component, "ready"))).await?;
    assert_eq!(ready["ready"], true, "{ready}");
    let (code, health) = get(addr, "/healthz").await?;
    assert_eq!((code, &health["status"]), (200, &Value::from("ok")), "{health}");
    let (code, metrics) = get(addr, "/metrics").await?;
    assert_eq!(code, 200, "{metrics}");

    proxy.set_down(true);
    let away = process.wait_readiness(addr, 503, Some((component, "database"))).await?;
    assert_eq!(away["ready"], false, "{away}");
    // Alive all the same: a restart would not bring the database back.
    assert_eq!(get(addr, "/healthz").await?.0, 200);

    proxy.set_down(false);
    process.wait_readiness(addr, 200, Some((component, "ready"))).await?;
    process.terminate().await?;
    let status = process.exit_within(Duration::from_secs(30)).await?;
    assert!(status.success(), "{status}: {}", process.output());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_is_ready_with_its_lease_session_and_not_while_its_database_is_away() -> anyhow::Result<()>
{
    let proxy = PgProxy::start(database_addr()?).await?;
    let service = TestService::new(Some(&kafka()), 1).await?;
    let addr = free_addr()?;
    let relay = Trialflow::spawn(
        &["relay"],
        &[
            ("DATABASE_URL", proxy.database_url()),
            ("OUTBOX_SOURCES", service.schema.to_string()),
            ("METRICS_ADDR", addr.clone()),
        ],
    )?;
    probes_follow(relay, &addr, &proxy, &format!("relay:{}", service.schema)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_is_ready_with_its_partitions_and_not_while_its_database_is_away() -> anyhow::Result<()> {
    let proxy = PgProxy::start(database_addr()?).await?;
    // Its topics on the shared broker under a prefix of its own, as `trialflow topics apply` lays
    // them out; the group is its own too.
    let prefix = format!("{}.", unique("probes"));
    let layout = TopicLayout {
        names: TopicNames::new(prefix.clone()),
        partitions: 2,
        replication_factor: 1,
        min_insync_replicas: 1,
        dlq_suffix: trialflow_schemas::topics::DLQ_SUFFIX.to_string(),
        state_topic: None,
    };
    topics::apply(&kafka(), &topics::plan(&kafka(), &layout).await?).await?;
    let addr = free_addr()?;
    let consumer = Trialflow::spawn(
        &["consume", "monitoring"],
        &[
            ("DATABASE_URL", proxy.database_url()),
            ("TOPIC_PREFIX", prefix),
            ("CONSUMER_GROUP_ID", unique("probes")),
            ("METRICS_ADDR", addr.clone()),
        ],
    )?;
    probes_follow(consumer, &addr, &proxy, "consumer:monitoring").await
}
