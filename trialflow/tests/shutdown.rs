//! Shutdown is bounded at the process level: the real `trialflow` binary, on private schemas,
//! topics and ports (`PIPELINE_ISOLATED`), stops within `SHUTDOWN_GRACE_SECS` after SIGTERM while
//! its database is down and a partition keeps failing, and a replay whose settle times out exits
//! non-zero at once instead of running on.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_testkit::{PgProxy, database_addr, database_url, kafka};

/// The process grace the tests run with, and what they allow beyond it (process start-up of the
/// signal path, the test's own polling).
const GRACE: Duration = Duration::from_secs(20);
const MARGIN: Duration = Duration::from_secs(5);
const START: Duration = Duration::from_secs(180);

/// A `trialflow` process whose output lines are collected as they come.
struct Trialflow {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Trialflow {
    fn spawn(args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Self> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_trialflow"));
        command
            .args(args)
            .env("KAFKA_BOOTSTRAP_SERVERS", kafka().bootstrap_servers)
            .env("METRICS_ADDR", "")
            .env("SHUTDOWN_GRACE_SECS", GRACE.as_secs().to_string())
            .env("TOPIC_PARTITIONS", "2")
            .env("RUST_LOG", "info,sqlx=warn,librdkafka=off,rdkafka=off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            collect(out, lines.clone());
        }
        if let Some(err) = child.stderr.take() {
            collect(err, lines.clone());
        }
        Ok(Self { child, lines })
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    /// The first output line containing `needle`, waiting for it up to `within`.
    async fn line(&mut self, needle: &str, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let found = self
                .lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|l| l.contains(needle))
                .cloned();
            if let Some(line) = found {
                return Ok(line);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                anyhow::bail!("trialflow exited ({status}) before printing `{needle}`:\n{}", self.output());
            }
            if Instant::now() > deadline {
                anyhow::bail!("no `{needle}` within {within:?}:\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.child.id().ok_or_else(|| anyhow::anyhow!("trialflow has already exited"))?;
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        anyhow::ensure!(status.success(), "kill -TERM {pid}: {status}");
        Ok(())
    }

    /// Its exit status, if it comes within `limit` (otherwise it is killed and the test fails).
    async fn exit_within(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => {
                // Let the readers take the last lines.
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(status?)
            }
            Err(_) => {
                self.child.start_kill()?;
                anyhow::bail!("still running {limit:?} later; killed it. Output:\n{}", self.output())
            }
        }
    }
}

fn collect(stream: impl AsyncRead + Unpin + Send + 'static, lines: Arc<Mutex<Vec<String>>>) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_within_the_shutdown_grace_while_the_database_is_down() -> anyhow::Result<()> {
    let proxy = PgProxy::start(database_addr()?).await?;
    let mut trialflow = Trialflow::spawn(
        &["run"],
        &[("DATABASE_URL", proxy.database_url()), ("PIPELINE_ISOLATED", "shutdown".into())],
    )?;
    let banner = trialflow.line("topic prefix `", START).await?;
    let prefix = banner.split('`').nth(1).unwrap_or_default().to_string();
    trialflow.line("trialflow is running", START).await?;

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
