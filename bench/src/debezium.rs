//! Group `debezium`: our relay against what a user would deploy instead, Debezium's PostgreSQL
//! connector with its outbox event router, on the same PostgreSQL and the same broker in one run.
//!
//! Debezium runs the way it is usually deployed: a Kafka Connect standalone worker (Connect
//! 4.3.0, the version Debezium 3.6.1 is built against) in its own JVM, the connector reading a
//! `pgoutput` slot, the `EventRouter` transform turning each outbox row into a record on the
//! topic its `aggregatetype` names, keyed by `aggregateid`, written by Connect's producer.
//! `bench/debezium/setup.sh` pins the jars; [`Connect`] starts and stops the worker.
//!
//! Both sides are measured the same way, by one bare rdkafka reader per topic (assigned every
//! partition from the beginning, no group):
//! * **throughput**: the outbox is filled with `--events` rows of `--payload-bytes` (1,000 rows a
//!   transaction, as the `relay` group) before the pipeline starts; events/s from the first
//!   record the reader sees to the last. Debezium's slot is created before the fill, so its
//!   stream starts at the first row.
//! * **commit-to-visible latency**: once a probe row has come through (the pipeline streams) and
//!   after [`WARMUP_SECS`] of the same load (not counted: a freshly started JVM is still
//!   compiling, and a deployed pipeline is warm), 8 writers commit one row per transaction on a
//!   fixed schedule ([`LATENCY_RATE`] for [`LATENCY_SECS`], open loop); per row, from just after its commit returned to the writer to
//!   the moment the reader sees its record (matched on the event id header).
//!
//! The raw produce baseline is the `relay` group's, rerun here.
//!
//! Every run creates its own schema, slot, publication and topics (`bench_dbz_*`,
//! `bench.debezium*`); the slot and the publication are dropped whatever happens, also when a
//! step fails (a slot left behind would hold WAL forever). The worker's JVM exits when the
//! benchmark's end of its stdin closes, so a killed benchmark takes it along.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use trialflow_outbox::{KafkaConfig, Outbox, OutboxEvent, SchemaName};
use uuid::Uuid;

use super::{Args, bench, progress};

/// Steady write rate of the latency runs (events/s, one event per transaction).
const LATENCY_RATE: u64 = 1_000;
/// Length of the latency runs.
const LATENCY_SECS: u64 = 15;
/// Load before the latency run, at the same rate, not counted.
const WARMUP_SECS: u64 = 5;
/// Writers sharing the steady rate, as in the `relay` group.
const WRITERS: u64 = 8;
/// How long Connect may take from start to the first record (JVM start, plugin scan, slot).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);
/// The event id header each side writes: our relay's, and the event router's default.
const RELAY_ID_HEADER: &str = trialflow_outbox::publisher::headers::EVENT_ID;
const DEBEZIUM_ID_HEADER: &str = "id";

/// Where `bench/debezium/setup.sh` puts the jars and the launcher.
fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/debezium")
}

pub(crate) async fn group(args: &Args, kafka: &KafkaConfig, pool: &PgPool) -> anyhow::Result<()> {
    install()?;
    let run = Uuid::new_v4().simple().to_string()[..8].to_string();
    let topic = |side: &str, phase: &str| format!("bench.debezium.{run}.{side}.{phase}");
    let topics = Topics {
        raw: topic("raw", "tp"),
        debezium_tp: topic("debezium", "tp"),
        debezium_lat: topic("debezium", "lat"),
        relay_tp: topic("relay", "tp"),
        relay_lat: topic("relay", "lat"),
    };
    let all = [&topics.raw, &topics.debezium_tp, &topics.debezium_lat, &topics.relay_tp, &topics.relay_lat];
    let specs: Vec<(&str, i32)> = all.iter().map(|t| (t.as_str(), args.partitions)).collect();
    trialflow_outbox::kafka::ensure_topics(kafka, &specs).await?;
    let bench_run = BenchRun { args, kafka, pool, run, payload: vec![b'x'; args.payload_bytes] };

    progress(&format!("raw produce: {} messages of {} bytes", args.events, args.payload_bytes));
    let raw = super::raw_produce(args, kafka, &topics.raw, &bench_run.payload).await?;
    bench("debezium_raw_produce_throughput", raw, "events/s");

    let debezium = bench_run.debezium_throughput(&topics.debezium_tp).await?;
    let relay = bench_run.relay_throughput(&topics.relay_tp).await?;
    bench("debezium_throughput", debezium, "events/s");
    bench("relay_visible_throughput", relay, "events/s");
    bench("relay_throughput_vs_debezium", relay / debezium, "x");
    bench("debezium_vs_raw_produce", 100.0 * debezium / raw, "%");
    bench("relay_visible_vs_raw_produce", 100.0 * relay / raw, "%");

    let debezium = bench_run.debezium_latency(&topics.debezium_lat).await?;
    let relay = bench_run.relay_latency(&topics.relay_lat).await?;
    bench("debezium_commit_to_visible_p50", quantile(&debezium, 0.5), "ms");
    bench("debezium_commit_to_visible_p99", quantile(&debezium, 0.99), "ms");
    bench("relay_commit_to_visible_p50", quantile(&relay, 0.5), "ms");
    bench("relay_commit_to_visible_p99", quantile(&relay, 0.99), "ms");
    Ok(())
}

/// Installs (or checks) the pinned jars and the launcher; says what is missing otherwise.
fn install() -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("debezium/setup.sh");
    let status = std::process::Command::new(&script)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!(
            "{} failed ({status}; its message is above): the debezium group needs a JDK 17+ (java, \
             javac), Maven and Maven Central",
            script.display()
        );
    }
    Ok(())
}

struct Topics {
    raw: String,
    debezium_tp: String,
    debezium_lat: String,
    relay_tp: String,
    relay_lat: String,
}

struct BenchRun<'a> {
    args: &'a Args,
    kafka: &'a KafkaConfig,
    pool: &'a PgPool,
    run: String,
    payload: Vec<u8>,
}

impl BenchRun<'_> {
    async fn debezium_throughput(&self, topic: &str) -> anyhow::Result<f64> {
        let capture = Capture::create(self.pool, &format!("bench_dbz_tp_{}", self.run)).await?;
        let measured = async {
            progress(&format!(
                "pre-filling the Debezium outbox {} with {} rows",
                capture.schema, self.args.events
            ));
            for start in (0..self.args.events).step_by(1000) {
                let end = (start + 1000).min(self.args.events);
                capture.insert_batch(self.pool, topic, start..end, self.args.keys, &self.payload).await?;
            }
            let reader = Reader::start(self.kafka, topic, self.args.partitions, self.args.events, None)?;
            progress("Debezium (Kafka Connect standalone) draining the outbox");
            let mut connect = Connect::start(self, &capture, "tp").await?;
            let waited = reader
                .wait_seen(self.args.events, Duration::from_secs(600), || connect.check_running())
                .await;
            connect.stop().await;
            waited?;
            reader.finish().await.map(|arrivals| rate(&arrivals))
        }
        .await;
        cleaned_up(measured, capture.remove(self.pool).await)
    }

    async fn relay_throughput(&self, topic: &str) -> anyhow::Result<f64> {
        let schema = SchemaName::from_str(&format!("bench_dbz_relay_tp_{}", self.run))?;
        trialflow_outbox::migrate(&self.args.database_url, &schema).await?;
        let measured = async {
            let outbox = Outbox::open(self.pool, schema.clone()).await?;
            progress(&format!("pre-filling the relay's outbox {schema} with {} rows", self.args.events));
            for start in (0..self.args.events).step_by(1000) {
                let events: Vec<OutboxEvent> = (start..(start + 1000).min(self.args.events))
                    .map(|i| super::event(topic, i, self.args, &self.payload))
                    .collect();
                let mut tx = self.pool.begin().await?;
                outbox.enqueue_all(&mut tx, &events).await?;
                tx.commit().await?;
            }
            let reader = Reader::start(self.kafka, topic, self.args.partitions, self.args.events, None)?;
            progress("relay draining the outbox");
            let stop = CancellationToken::new();
            let relay = self.spawn_relay(&schema, &stop);
            let waited = reader.wait_seen(self.args.events, Duration::from_secs(600), || Ok(())).await;
            stop.cancel();
            relay.await??;
            waited?;
            reader.finish().await.map(|arrivals| rate(&arrivals))
        }
        .await;
        cleaned_up(measured, drop_schema(self.pool, schema.as_str()).await)
    }

    async fn debezium_latency(&self, topic: &str) -> anyhow::Result<Vec<f64>> {
        let capture = Capture::create(self.pool, &format!("bench_dbz_lat_{}", self.run)).await?;
        let measured = async {
            let expected = 1 + LATENCY_RATE * (WARMUP_SECS + LATENCY_SECS);
            let reader =
                Reader::start(self.kafka, topic, self.args.partitions, expected, Some(DEBEZIUM_ID_HEADER))?;
            let mut connect = Connect::start(self, &capture, "lat").await?;
            let result = async {
                progress("waiting until Debezium streams (a probe row comes through)");
                capture.insert_batch(self.pool, topic, 0..1, self.args.keys, &self.payload).await?;
                reader.wait_seen(1, STARTUP_TIMEOUT, || connect.check_running()).await?;
                progress(&format!(
                    "Debezium latency: {LATENCY_RATE} events/s for {LATENCY_SECS} s, one event per transaction"
                ));
                let writer = Writer::Debezium(&capture);
                self.steady_writes(&writer, topic, WARMUP_SECS).await?;
                let committed = self.steady_writes(&writer, topic, LATENCY_SECS).await?;
                reader.wait_seen(expected, Duration::from_secs(120), || connect.check_running()).await?;
                Ok::<_, anyhow::Error>(committed)
            }
            .await;
            connect.stop().await;
            latencies(&result?, &reader.finish().await?)
        }
        .await;
        cleaned_up(measured, capture.remove(self.pool).await)
    }

    async fn relay_latency(&self, topic: &str) -> anyhow::Result<Vec<f64>> {
        let schema = SchemaName::from_str(&format!("bench_dbz_relay_lat_{}", self.run))?;
        trialflow_outbox::migrate(&self.args.database_url, &schema).await?;
        let measured = async {
            let outbox = Outbox::open(self.pool, schema.clone()).await?;
            let expected = 1 + LATENCY_RATE * (WARMUP_SECS + LATENCY_SECS);
            let reader =
                Reader::start(self.kafka, topic, self.args.partitions, expected, Some(RELAY_ID_HEADER))?;
            let stop = CancellationToken::new();
            let relay = self.spawn_relay(&schema, &stop);
            let writer = Writer::Relay(&outbox);
            let result = async {
                progress("waiting until the relay publishes (a probe row comes through)");
                writer.write(self.pool, topic, 0, self.args.keys, &self.payload).await?;
                reader.wait_seen(1, STARTUP_TIMEOUT, || Ok(())).await?;
                progress(&format!(
                    "relay latency: {LATENCY_RATE} events/s for {LATENCY_SECS} s, one event per transaction"
                ));
                self.steady_writes(&writer, topic, WARMUP_SECS).await?;
                let committed = self.steady_writes(&writer, topic, LATENCY_SECS).await?;
                reader.wait_seen(expected, Duration::from_secs(120), || Ok(())).await?;
                Ok::<_, anyhow::Error>(committed)
            }
            .await;
            stop.cancel();
            relay.await??;
            latencies(&result?, &reader.finish().await?)
        }
        .await;
        cleaned_up(measured, drop_schema(self.pool, schema.as_str()).await)
    }

    fn spawn_relay(
        &self,
        schema: &SchemaName,
        stop: &CancellationToken,
    ) -> tokio::task::JoinHandle<trialflow_outbox::Result<()>> {
        let config = super::relay_config(self.args, self.kafka, schema);
        tokio::spawn(trialflow_outbox::relay::run(config, stop.clone()))
    }

    /// [`LATENCY_RATE`] events/s for `secs`, each in its own transaction, from
    /// [`WRITERS`] writers on a fixed schedule (a late writer catches up rather than lowering the
    /// rate); returns each event id with the instant its commit returned.
    async fn steady_writes(
        &self,
        writer: &Writer<'_>,
        topic: &str,
        secs: u64,
    ) -> anyhow::Result<Vec<(Uuid, Instant)>> {
        let total = LATENCY_RATE * secs;
        let start = tokio::time::Instant::now();
        let writes = (0..WRITERS).map(|w| async move {
            let mut committed = Vec::new();
            for i in (w..total).step_by(WRITERS as usize) {
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / LATENCY_RATE as f64))
                    .await;
                let id = writer.write(self.pool, topic, i, self.args.keys, &self.payload).await?;
                committed.push((id, Instant::now()));
            }
            Ok::<_, anyhow::Error>(committed)
        });
        let committed: Vec<(Uuid, Instant)> =
            futures::future::try_join_all(writes).await?.into_iter().flatten().collect();
        let achieved = total as f64 / start.elapsed().as_secs_f64();
        progress(&format!("wrote {total} events at {achieved:.0} events/s"));
        Ok(committed)
    }
}

/// The outbox each side reads.
enum Writer<'a> {
    Relay(&'a Outbox),
    Debezium(&'a Capture),
}

impl Writer<'_> {
    /// Commits event `i` in a transaction of its own; returns its id.
    async fn write(
        &self,
        pool: &PgPool,
        topic: &str,
        i: u64,
        keys: u64,
        payload: &[u8],
    ) -> anyhow::Result<Uuid> {
        match self {
            Writer::Relay(outbox) => {
                let event = OutboxEvent {
                    topic: topic.to_string(),
                    key: format!("subject-{:05}", i % keys),
                    event_type: "BenchEvent".to_string(),
                    event_id: Uuid::now_v7(),
                    content_type: "application/octet-stream".to_string(),
                    payload: payload.to_vec(),
                    headers: Default::default(),
                };
                let id = event.event_id;
                let mut tx = pool.begin().await?;
                outbox.enqueue(&mut tx, event).await?;
                tx.commit().await?;
                Ok(id)
            }
            Writer::Debezium(capture) => capture.insert_batch(pool, topic, i..i + 1, keys, payload).await,
        }
    }
}

/// Debezium's side in PostgreSQL: a schema holding an outbox table of the event router's expected
/// shape, a publication of that table and a `pgoutput` slot, all named `name`.
struct Capture {
    schema: SchemaName,
}

impl Capture {
    async fn create(pool: &PgPool, name: &str) -> anyhow::Result<Self> {
        let schema = SchemaName::from_str(name)?;
        let mut conn = pool.acquire().await?;
        // The router's default column names (`id` goes to the `id` header, `aggregateid` is the
        // key, `aggregatetype` names the topic); `payload` is bytea because our events are opaque
        // bytes (Avro), not JSON. No other index than the key: Debezium reads the WAL, not the table.
        for sql in [
            format!("CREATE SCHEMA {schema}"),
            format!(
                "CREATE TABLE {schema}.outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, \
                 aggregateid text NOT NULL, type text NOT NULL, payload bytea NOT NULL)"
            ),
            format!("CREATE PUBLICATION {schema} FOR TABLE {schema}.outbox"),
        ] {
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *conn).await?;
        }
        let created = sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(schema.as_str())
            .execute(&mut *conn)
            .await;
        let capture = Self { schema };
        if let Err(e) = created {
            capture.remove(pool).await?;
            return Err(e)
                .context("creating the replication slot (is wal_level = logical? `make up` sets it)");
        }
        Ok(capture)
    }

    /// Inserts events `range` in one transaction; returns the last one's id.
    async fn insert_batch(
        &self,
        pool: &PgPool,
        topic: &str,
        range: std::ops::Range<u64>,
        keys: u64,
        payload: &[u8],
    ) -> anyhow::Result<Uuid> {
        let ids: Vec<Uuid> = range.clone().map(|_| Uuid::now_v7()).collect();
        let keys: Vec<String> = range.map(|i| format!("subject-{:05}", i % keys)).collect();
        let n = ids.len();
        let schema = &self.schema;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {schema}.outbox (id, aggregatetype, aggregateid, type, payload) \
             SELECT id, $2, aggregateid, 'BenchEvent', $3 FROM UNNEST($1::uuid[], $4::text[]) AS e(id, aggregateid)"
        )))
        .bind(&ids)
        .bind(topic)
        .bind(payload)
        .bind(&keys)
        .execute(pool)
        .await?;
        ids.last().copied().with_context(|| format!("inserting {n} rows"))
    }

    /// Drops the slot (waiting for the worker's connection to go, then ending it), the publication
    /// and the schema.
    async fn remove(&self, pool: &PgPool) -> anyhow::Result<()> {
        let name = self.schema.as_str();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let dropped = sqlx::query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(name)
            .execute(pool)
            .await;
            match dropped {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("dropping replication slot {name}"));
                }
                Err(_) => {
                    // Still active: the worker has not let go. Give it a moment, then end it.
                    if Instant::now() + Duration::from_secs(15) > deadline {
                        sqlx::query(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                             WHERE slot_name = $1 AND active",
                        )
                        .bind(name)
                        .execute(pool)
                        .await?;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        sqlx::query(AssertSqlSafe(format!("DROP PUBLICATION IF EXISTS {name}"))).execute(pool).await?;
        drop_schema(pool, name).await
    }
}

/// A measurement's result after its clean-up: the measurement's error first, if any.
fn cleaned_up<T>(measured: anyhow::Result<T>, cleanup: anyhow::Result<()>) -> anyhow::Result<T> {
    match (measured, cleanup) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(e)) | (Err(e), Ok(())) => Err(e),
        (Err(e), Err(cleanup)) => Err(e.context(format!("cleaning up failed too: {cleanup:#}"))),
    }
}

async fn drop_schema(pool: &PgPool, name: &str) -> anyhow::Result<()> {
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {name} CASCADE"))).execute(pool).await?;
    Ok(())
}

/// A Kafka Connect standalone worker running the Debezium connector for one [`Capture`].
struct Connect {
    child: Child,
    dir: PathBuf,
}

impl Connect {
    /// The worker's and the connector's settings: what a user tuning for throughput and latency
    /// would set (docs/benchmarks.md, group `debezium`, explains each).
    fn settings(
        run: &BenchRun<'_>,
        capture: &Capture,
        dir: &Path,
    ) -> anyhow::Result<[Vec<(String, String)>; 2]> {
        let db = reqwest::Url::parse(&run.args.database_url)
            .with_context(|| format!("parsing DATABASE_URL {}", run.args.database_url))?;
        let name = capture.schema.as_str();
        let s = |k: &str, v: &str| (k.to_string(), v.to_string());
        let worker = vec![
            s("bootstrap.servers", &run.kafka.bootstrap_servers),
            s("key.converter", "org.apache.kafka.connect.storage.StringConverter"),
            s("value.converter", "org.apache.kafka.connect.converters.ByteArrayConverter"),
            s("offset.storage.file.filename", &dir.join("offsets").to_string_lossy()),
            s("offset.flush.interval.ms", "10000"),
            s("listeners", "http://127.0.0.1:0"),
            s("plugin.discovery", "service_load"),
            // Like our relay's producer: idempotent, acks=all, 5 ms linger, librdkafka's 1 MB
            // batches. Connect's own default of one request in flight would halve the rate.
            s("producer.enable.idempotence", "true"),
            s("producer.acks", "all"),
            s("producer.max.in.flight.requests.per.connection", "5"),
            s("producer.linger.ms", &run.kafka.linger_ms.to_string()),
            s("producer.batch.size", "1000000"),
        ];
        let connector = vec![
            s("name", name),
            s("connector.class", "io.debezium.connector.postgresql.PostgresConnector"),
            s("tasks.max", "1"),
            s("database.hostname", db.host_str().unwrap_or("127.0.0.1")),
            s("database.port", &db.port().unwrap_or(5432).to_string()),
            s("database.user", if db.username().is_empty() { "postgres" } else { db.username() }),
            s("database.password", db.password().unwrap_or("")),
            s("database.dbname", db.path().trim_start_matches('/')),
            s("topic.prefix", name),
            s("plugin.name", "pgoutput"),
            s("slot.name", name),
            s("publication.name", name),
            s("publication.autocreate.mode", "disabled"),
            s("table.include.list", &format!("{name}.outbox")),
            // Stream from the slot's start: the pre-filled rows are changes, not a snapshot.
            s("snapshot.mode", "no_data"),
            // Defaults 2048 / 8192 / 500 ms: bigger batches for throughput, and a 10 ms poll so an
            // idle queue does not add up to half a second to latency.
            s("max.batch.size", "8192"),
            s("max.queue.size", "32768"),
            s("poll.interval.ms", "10"),
            s("transforms", "outbox"),
            s("transforms.outbox.type", "io.debezium.transforms.outbox.EventRouter"),
            s("transforms.outbox.route.topic.replacement", "${routedByValue}"),
            s("transforms.outbox.table.fields.additional.placement", "type:header:event_type"),
        ];
        Ok([worker, connector])
    }

    async fn start(run: &BenchRun<'_>, capture: &Capture, phase: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("trialflow-bench-debezium-{}-{phase}", run.run));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let [worker, connector] = Self::settings(run, capture, &dir)?;
        let write = |file: &str, settings: &[(String, String)]| {
            let text: String = settings.iter().map(|(k, v)| format!("{k}={}\n", escape(v))).collect();
            let path = dir.join(file);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok::<_, anyhow::Error>(path)
        };
        let (worker, connector) =
            (write("worker.properties", &worker)?, write("connector.properties", &connector)?);
        let tools = tools_dir();
        let classes = tools.join("classes");
        let log = dir.join("connect.log");
        let output = std::fs::File::create(dir.join("stdout.log"))?;
        let child = Command::new("java")
            .arg("-Xmx1g")
            .arg(format!("-Ddebezium.bench.log={}", log.display()))
            .arg(format!("-Dlog4j2.configurationFile={}", classes.join("log4j2.properties").display()))
            .arg("-cp")
            .arg(format!("{}:{}/*", classes.display(), tools.join("libs").display()))
            .arg("Launch")
            .arg(&worker)
            .arg(&connector)
            .stdin(Stdio::piped())
            .stdout(output.try_clone()?)
            .stderr(output)
            .kill_on_drop(true)
            .spawn()
            .context("starting java (the debezium group needs a JDK 17+ on PATH)")?;
        progress(&format!("Kafka Connect started; its log: {}", log.display()));
        Ok(Self { child, dir })
    }

    /// An error with the log's last lines if the worker has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(self.dir.join("connect.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).take(10).collect();
            bail!(
                "Kafka Connect exited ({status}); first errors of {}:\n{}",
                self.dir.join("connect.log").display(),
                tail.join("\n")
            );
        }
        Ok(())
    }

    /// Closes the worker's stdin (the launcher exits through Connect's shutdown hook: the task
    /// stops and its replication connection closes); kills it if it has not gone in 60 s.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(_) => {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
            Err(_) => {
                progress(&format!(
                    "Kafka Connect did not stop in 60 s; killing it (logs in {})",
                    self.dir.display()
                ));
                let _ = self.child.kill().await;
            }
        }
    }
}

/// A value in a Java properties file.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\")
}

/// When a record came into view, and its event id when the reader was asked for it.
struct Arrival {
    id: Option<Uuid>,
    at: Instant,
}

/// A bare reader of every partition of a topic from the beginning, on a thread of its own (so
/// the relay under test does not share its runtime), stopping after `expected` records.
struct Reader {
    seen: Arc<AtomicU64>,
    stop: CancellationToken,
    thread: tokio::task::JoinHandle<anyhow::Result<Vec<Arrival>>>,
}

impl Reader {
    fn start(
        kafka: &KafkaConfig,
        topic: &str,
        partitions: i32,
        expected: u64,
        id_header: Option<&'static str>,
    ) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = kafka
            .client("bench-debezium-reader", |c| {
                c.set("group.id", format!("bench-debezium-reader-{}", Uuid::new_v4()))
                    .set("enable.auto.commit", "false")
                    .set("fetch.wait.max.ms", "50");
            })
            .create()?;
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let (seen, stop) = (Arc::new(AtomicU64::new(0)), CancellationToken::new());
        let (counter, stopped) = (seen.clone(), stop.clone());
        let thread = tokio::task::spawn_blocking(move || {
            let mut arrivals = Vec::with_capacity(expected as usize);
            while (arrivals.len() as u64) < expected && !stopped.is_cancelled() {
                let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
                let message = message?;
                let at = Instant::now();
                let id = match id_header {
                    None => None,
                    Some(name) => Some(event_id(&message, name)?),
                };
                arrivals.push(Arrival { id, at });
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok(arrivals)
        });
        Ok(Self { seen, stop, thread })
    }

    /// Waits until `n` records were seen; `running` reports a pipeline that has died.
    async fn wait_seen(
        &self,
        n: u64,
        timeout: Duration,
        mut running: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.seen.load(Ordering::Relaxed) < n {
            running()?;
            if Instant::now() > deadline {
                bail!("saw {} of {n} records in {timeout:?}", self.seen.load(Ordering::Relaxed));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn finish(self) -> anyhow::Result<Vec<Arrival>> {
        self.stop.cancel();
        self.thread.await?
    }
}

fn event_id<M: rdkafka::Message>(message: &M, name: &str) -> anyhow::Result<Uuid> {
    let (headers, _) = trialflow_outbox::kafka::read_headers(message);
    let value = headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice()).with_context(|| {
        let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
        format!("a record without the `{name}` header (headers: {names:?})")
    })?;
    let text = std::str::from_utf8(value).context("the event id header is not UTF-8")?;
    // The router's header converter may quote a string.
    Uuid::parse_str(text.trim_matches('"')).with_context(|| format!("event id header `{text}`"))
}

/// Records/s from the first arrival to the last.
fn rate(arrivals: &[Arrival]) -> f64 {
    match (arrivals.first(), arrivals.last()) {
        (Some(first), Some(last)) if arrivals.len() > 1 => {
            (arrivals.len() - 1) as f64 / last.at.duration_since(first.at).as_secs_f64()
        }
        _ => f64::NAN,
    }
}

/// Per committed event, milliseconds from its commit to its arrival, sorted.
fn latencies(committed: &[(Uuid, Instant)], arrivals: &[Arrival]) -> anyhow::Result<Vec<f64>> {
    let seen: HashMap<Uuid, Instant> = arrivals.iter().filter_map(|a| a.id.map(|id| (id, a.at))).collect();
    let mut missing = 0;
    let mut ms: Vec<f64> = committed
        .iter()
        .filter_map(|(id, at)| match seen.get(id) {
            // Saturating: the record can arrive a hair before the writer's task runs again.
            Some(visible) => Some(visible.saturating_duration_since(*at).as_secs_f64() * 1000.0),
            None => {
                missing += 1;
                None
            }
        })
        .collect();
    if missing > 0 {
        bail!("{missing} of {} committed events never became visible", committed.len());
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

/// Nearest-rank quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), 50.0);
        assert_eq!(quantile(&values, 0.99), 99.0);
        assert_eq!(quantile(&values[..1], 0.99), 1.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
