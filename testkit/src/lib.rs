//! Helpers shared by the integration tests. Every test gets its own service schema and its own
//! topic on the real local stack (`make up`), so tests run in parallel without seeing each other.
//!
//! * [`workload`]: the synthetic service the relay's tests write through the outbox
//!   ([`TestService`] puts one in a fresh schema).
//! * [`kafka_cluster`]: a private Apache Kafka cluster of `N` nodes for one test (kill and restart
//!   nodes, secured listeners), started from the jars `make up` installs.

pub mod idp;
pub mod kafka_cluster;
pub mod otlp;
pub mod pg_server;
pub mod tls;
pub mod webhook;
pub mod workload;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_outbox::config::{DEFAULT_DATABASE_URL, DEFAULT_KAFKA_BOOTSTRAP_SERVERS};
use trialflow_outbox::{DatabaseConfig, KafkaConfig, RelayConfig, SchemaName};

pub use crate::kafka_cluster::{ClusterSpec, KafkaCluster, Listener};
use crate::workload::Workload;

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_string())
}

/// The broker of the local stack (or `KAFKA_BOOTSTRAP_SERVERS`).
pub fn kafka() -> KafkaConfig {
    KafkaConfig {
        bootstrap_servers: std::env::var("KAFKA_BOOTSTRAP_SERVERS")
            .unwrap_or_else(|_| DEFAULT_KAFKA_BOOTSTRAP_SERVERS.to_string()),
        ..KafkaConfig::default()
    }
}

/// `prefix` plus a random suffix: names that no other test run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Logs of the code under test, shown for failing tests (`RUST_LOG` to change the level).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,trialflow_outbox=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// A fresh workload service in its own schema, publishing to its own topic.
#[derive(Debug)]
pub struct TestService {
    pub schema: SchemaName,
    pub topic: String,
    pub pool: PgPool,
    pub workload: Workload,
}

impl TestService {
    /// Migrates a new schema and creates a new topic on `kafka` (use `create_topic = false` when
    /// the broker is a mock cluster that creates it itself).
    pub async fn new(kafka: Option<&KafkaConfig>, partitions: i32) -> anyhow::Result<Self> {
        init_logs();
        let schema = SchemaName::new(unique("t"))?;
        let topic = unique("test.relay").replace('_', "-");
        let url = database_url();
        crate::workload::migrate(&url, &schema)
            .await
            .context("migrating the test schema (is `make up` running?)")?;
        if let Some(kafka) = kafka {
            trialflow_outbox::kafka::ensure_topics(kafka, &[(&topic, partitions)]).await?;
        }
        let pool = PgPoolOptions::new().max_connections(16).connect(&url).await?;
        let workload = Workload::open(pool.clone(), schema.clone(), &topic).await?;
        Ok(Self { schema, topic, pool, workload })
    }

    /// Unpublished rows in the outbox.
    pub async fn outbox_len(&self) -> anyhow::Result<i64> {
        let sql = format!("SELECT count(*) FROM {}.outbox", self.schema);
        Ok(sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&self.pool).await?)
    }

    /// A relay configuration for this service with short intervals, so tests finish quickly.
    pub fn relay_config(&self, kafka: &KafkaConfig) -> RelayConfig {
        relay_config(kafka, vec![self.schema.clone()])
    }
}

/// A relay configuration for `sources` with short intervals, so tests finish quickly.
pub fn relay_config(kafka: &KafkaConfig, sources: Vec<SchemaName>) -> RelayConfig {
    RelayConfig {
        database: DatabaseConfig::new(database_url()),
        kafka: kafka.clone(),
        poll_interval_ms: 100,
        rebalance_interval_ms: 200,
        stats_interval_ms: 500,
        shutdown_grace_ms: 2_000,
        max_backoff_ms: 500,
        batch_size: 100,
        ..RelayConfig::local(sources)
    }
}

/// A relay running in this process.
#[derive(Debug)]
pub struct RunningRelay {
    token: CancellationToken,
    handle: JoinHandle<trialflow_outbox::Result<()>>,
}

impl RunningRelay {
    pub fn start(config: RelayConfig) -> Self {
        let token = CancellationToken::new();
        let handle = tokio::spawn(trialflow_outbox::relay::run(config, token.clone()));
        Self { token, handle }
    }

    /// Graceful stop: in-flight work finishes.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        self.handle.await??;
        Ok(())
    }

    /// A crash: the task is dropped wherever it is; its connections close, its leases go.
    pub async fn crash(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

/// Polls `condition` every 50 ms until it holds; fails with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The outbox rows of `shards` the relay may read now, once there are `expected` of them.
///
/// The relay reads only rows of transactions older than the oldest one still open, and that
/// horizon (the snapshot's xmin) is cluster-wide: a transaction of a test running beside this
/// one holds it back for a moment after this test's own commits. Waits for the rows rather than
/// expecting them at once; returns what is readable at `timeout` so the caller's assertion says
/// what was missing.
pub async fn readable_rows(
    store: &trialflow_outbox::store::Store,
    conn: &mut sqlx::PgConnection,
    shards: &[i32],
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<trialflow_outbox::store::OutboxRow>> {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = store.read_batch(conn, shards, None, expected.max(1) as u32 * 2).await?;
        if rows.len() >= expected || Instant::now() >= deadline {
            return Ok(rows);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy in front of PostgreSQL that a test can take down: existing connections are cut
/// and new ones refused until it is up again. A database outage for one client, without stopping
/// the server other tests share.
#[derive(Debug, Clone)]
pub struct PgProxy {
    pub port: u16,
    down: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl PgProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (down, _) = tokio::sync::watch::channel(false);
        let down = std::sync::Arc::new(down);
        let state = down.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut watch = state.subscribe();
                if *watch.borrow() {
                    continue; // refused: dropped at once
                }
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        Ok(Self { port, down })
    }

    /// The database URL through this proxy.
    pub fn database_url(&self) -> String {
        let url = database_url();
        let (head, tail) =
            url.rsplit_once('@').unwrap_or(("postgres://postgres", "127.0.0.1:55432/trialflow"));
        let db = tail.split_once('/').map(|(_, db)| db).unwrap_or("trialflow");
        format!("{head}@127.0.0.1:{}/{db}", self.port)
    }

    pub fn set_down(&self, down: bool) {
        // send_replace: `send` does nothing while no connection (receiver) exists.
        self.down.send_replace(down);
    }
}

/// The PostgreSQL address of `DATABASE_URL` (host:port).
pub fn database_addr() -> anyhow::Result<std::net::SocketAddr> {
    let url = database_url();
    let host_port = url.rsplit_once('@').map(|(_, t)| t).unwrap_or(&url);
    let host_port = host_port.split('/').next().unwrap_or("127.0.0.1:55432");
    use std::net::ToSocketAddrs;
    host_port.to_socket_addrs()?.next().context("DATABASE_URL has no host:port")
}

/// A client of the site API as the end-to-end tests use it: commands with a fresh idempotency key.
#[derive(Debug, Clone)]
pub struct SiteApi {
    pub http: reqwest::Client,
    /// `http://host:port` of the site API.
    pub base: String,
}

impl SiteApi {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self { http: reqwest::Client::new(), base: format!("http://{addr}") }
    }

    /// POSTs `body` to `/v1/studies{path}` as `token` with a fresh idempotency key; expects 201
    /// and returns the created resource.
    pub async fn post(
        &self,
        token: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let response = self
            .http
            .post(format!("{}/v1/studies{path}", self.base))
            .bearer_auth(token)
            .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
            .json(body)
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        anyhow::ensure!(status == reqwest::StatusCode::CREATED, "POST {path}: {status} {body}");
        Ok(body)
    }
}

/// Serves `app` on a free local port until `stop`; returns the address.
pub async fn serve(stop: CancellationToken, app: axum::Router) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
    });
    Ok(addr)
}
