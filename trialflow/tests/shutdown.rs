//! Shutdown is bounded at the process level: the real `trialflow` binary, on private schemas,
//! topics and ports (`PIPELINE_ISOLATED`), stops within `SHUTDOWN_GRACE_SECS` after SIGTERM while
//! its database is down and a partition keeps failing, and a replay whose settle times out exits
//! non-zero at once instead of running on.

mod common;

use std::time::{Duration, Instant};

use common::process::{Trialflow, free_addr};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_testkit::{PgProxy, database_addr, database_url, kafka};

/// The process grace the tests run with, and what they allow beyond it (process start-up of the
/// signal path, the test's own polling).
const GRACE: Duration = Duration::from_secs(20);
const MARGIN: Duration = Duration::from_secs(5);
const START: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_within_the_shutdown_grace_while_the_database_is_down() -> anyhow::Result<()> {
    let proxy = PgProxy::start(database_addr()?).await?;
    let probes = free_addr()?;
    let mut trialflow = Trialflow::spawn(
        &["run"],
        &[
            ("DATABASE_URL", proxy.database_url()),
            ("METRICS_ADDR", probes.clone()),
            ("PIPELINE_ISOLATED", "shutdown".into()),
            ("SHUTDOWN_GRACE_SECS", GRACE.as_secs().to_string()),
        ],
    )?;
    let banner = trialflow.line("topic prefix `", START).await?;
    let prefix = banner.split('`').nth(1).unwrap_or_default().to_string();
    trialflow.line("trialflow is running", START).await?;
    // Every component started (the database going away during a consumer's start-up is a start
    // failure, not what this test is about).
    trialflow.wait_readiness(&probes, 200, None).await?;

    // A message the monitoring consumer cannot apply while the database is away: its partition
    // keeps failing and retrying, as does every other component that needs the database.
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", kafka().bootstrap_servers).create()?;
    let topic = TopicNames::new(prefix).name(topics::CLINICAL_OBSERVATIONS);
    producer
        .send(FutureRecord::to(&topic).key("subject").payload("not avro"), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)?;
    proxy.set_down(true);
    trialflow.line("Batch failed; rolled back, retrying.", Duration::from_secs(60)).await?;

    trialflow.terminate().await?;
    let signalled = Instant::now();
    let status = trialflow.exit_within(GRACE + MARGIN).await?;
    let took = signalled.elapsed();
    let output = trialflow.output();
    eprintln!("exited {status} {took:?} after SIGTERM:\n{output}");
    assert!(took <= GRACE + MARGIN, "took {took:?}");
    // Stopped within the grace: every component let go, nothing had to be cut off.
    assert!(status.success(), "{status}: {output}");
    assert!(!output.contains("Did not stop within SHUTDOWN_GRACE_SECS"), "{output}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_settle_times_out_exits_non_zero_at_once() -> anyhow::Result<()> {
    let data_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.data/cdisc-pilot");
    let summary = std::env::temp_dir().join(format!("shutdown-summary-{}.json", uuid::Uuid::new_v4()));
    let mut trialflow = Trialflow::spawn(
        &["replay", "cdisc-pilot", "--sites", "706"],
        &[
            ("SHUTDOWN_GRACE_SECS", GRACE.as_secs().to_string()),
            ("DATABASE_URL", database_url()),
            ("PIPELINE_ISOLATED", "shutdown_replay".into()),
            ("CDISC_PILOT_DIR", data_dir.display().to_string()),
            ("DEMO_SUMMARY", summary.display().to_string()),
            // Nothing settles in no time: the first check fails the replay.
            ("REPLAY_SETTLE_TIMEOUT_SECS", "0".into()),
        ],
    )?;
    trialflow.line("Waiting for the pipeline to finish", START).await?;
    let settling = Instant::now();
    let status = trialflow.exit_within(GRACE + MARGIN).await?;
    let took = settling.elapsed();
    let output = trialflow.output();
    eprintln!("exited {status} {took:?} after the settle began:\n{output}");
    assert!(!status.success(), "a failed replay exits non-zero: {output}");
    assert_eq!(status.code(), Some(1), "an error, not the watchdog: {output}");
    assert!(output.contains("did not settle within"), "{output}");
    assert!(!summary.exists(), "no summary for a failed replay");
    Ok(())
}
