//! `make bench`: throughput and latency figures, each printed as `BENCH <name>=<value> <unit>`,
//! with the raw baseline they are compared against measured in the same run. See
//! docs/benchmarks.md for what each figure means and the figures of record.

use std::collections::VecDeque;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use trialflow_outbox::config::{DEFAULT_DATABASE_URL, DEFAULT_KAFKA_BOOTSTRAP_SERVERS};
use trialflow_outbox::metrics::{COMMIT_TO_ACK_SECONDS, PUBLISHED_TOTAL};
use trialflow_outbox::{KafkaConfig, Outbox, OutboxEvent, RelayConfig, SchemaName};
use uuid::Uuid;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod alerts;
mod consumer;
mod debezium;
mod epro;
mod epro_gateway;
mod load;
mod monitoring;
mod risk;
mod scaling;
mod soak;
mod traced;

#[derive(Debug, Parser)]
#[command(about = "trialflow benchmarks")]
struct Args {
    /// Run only this group (`relay`, `debezium`, `consumer`, `epro`, `monitoring`, `alerts`, `risk`,
    /// `load`, `scaling` or `soak`).
    #[arg(long)]
    only: Option<String>,

    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    database_url: String,

    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = DEFAULT_KAFKA_BOOTSTRAP_SERVERS)]
    bootstrap_servers: String,

    /// Rows pre-filled into the outbox for the throughput run (and messages for the baseline).
    #[arg(long, default_value_t = 200_000)]
    events: u64,

    /// Payload size in bytes.
    #[arg(long, default_value_t = 300)]
    payload_bytes: usize,

    /// Distinct keys (subjects).
    #[arg(long, default_value_t = 1000)]
    keys: u64,

    /// Partitions of the benchmark topics.
    #[arg(long, default_value_t = 6)]
    partitions: i32,

    /// Steady write rate of the latency run (events/s, one event per transaction).
    #[arg(long, default_value_t = 2000)]
    latency_rate: u64,

    /// Relay batch size (default: the relay's default).
    #[arg(long)]
    batch_size: Option<u32>,

    /// Relay in-flight batches (default: the relay's default).
    #[arg(long)]
    max_in_flight_batches: Option<u32>,

    /// Duration of the latency run in seconds.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,

    /// Rows of the `scaling` group's backlog-drain run (0 skips it).
    #[arg(long, default_value_t = 5_000_000)]
    backlog_rows: u64,

    /// Where the `scaling` group writes its SVG plot (an existing folder, e.g. docs/benchmarks).
    #[arg(long, value_parser = scaling::plot_dir)]
    plot_dir: Option<std::path::PathBuf>,

    /// Minutes of steady mixed load of the `soak` group (resident memory of each component at 1
    /// and 10 minutes and at the end; at least 10).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(10..=1440))]
    soak_minutes: u64,
}

const GROUPS: &[&str] =
    &["relay", "debezium", "consumer", "epro", "monitoring", "alerts", "risk", "load", "scaling", "soak"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(only) = &args.only
        && !GROUPS.contains(&only.as_str())
    {
        bail!("unknown benchmark group `{only}`; groups: {}", GROUPS.join(", "));
    }
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;

    let kafka = KafkaConfig { bootstrap_servers: args.bootstrap_servers.clone(), ..KafkaConfig::default() };
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&args.database_url)
        .await
        .with_context(|| format!("connecting to {} (is `make up` running?)", args.database_url))?;
    if args.only.as_deref().is_none_or(|g| g == "relay") {
        relay_group(&args, &kafka, &pool, &metrics).await?;
    }
    if args.only.as_deref().is_none_or(|g| g == "debezium") {
        debezium::group(&args, &kafka, &pool).await?;
    }
    if args.only.as_deref().is_none_or(|g| g == "consumer") {
        consumer::group(&args.database_url, &kafka, &pool, args.events, Some(&metrics)).await?;
    }
    if args.only.as_deref().is_none_or(|g| g == "epro") {
        epro::group(&args.database_url, &kafka, &pool, Some(&metrics)).await?;
    }
    if args.only.as_deref().is_none_or(|g| g == "monitoring") {
        monitoring::group(&args.database_url, &kafka, &pool, Some(&metrics)).await?;
    }
    if args.only.as_deref().is_none_or(|g| g == "alerts") {
        alerts::group(&args.database_url, &kafka, 1_000, 15).await?;
    }
    if args.only.as_deref().is_none_or(|g| g == "risk") {
        risk::group(&args.database_url, &kafka, &pool, Some(&metrics)).await?;
    }
    if args.only.as_deref().is_none_or(|g| g == "load") {
        load::group(&args.database_url, &kafka, &pool).await?;
    }
    if args.only.as_deref().is_none_or(|g| g == "scaling") {
        scaling::group(&args, &kafka, &pool, &metrics).await?;
    }
    if args.only.as_deref().is_none_or(|g| g == "soak") {
        soak::group(&args.database_url, &args.bootstrap_servers, &pool, args.soak_minutes).await?;
    }
    Ok(())
}

/// The rate (messages/s) at which consumer `consumer` applies its next `n` messages, read from the
/// runtime's `applied` counter in `handle`; timed from its first application (joining the group is
/// not throughput). Call it right after starting the consumer.
pub(crate) async fn applied_rate(handle: &PrometheusHandle, consumer: &str, n: u64) -> anyhow::Result<f64> {
    let counter = format!("trialflow_consumer_messages_total{{consumer=\"{consumer}\",outcome=\"applied\"}}");
    let applied = || counter_value(handle, &counter);
    let before = applied();
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut started, mut first) = (None, 0);
    loop {
        let done = applied() - before;
        if started.is_none() && done > 0 {
            (started, first) = (Some(Instant::now()), done);
        }
        if done >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("{consumer} applied {done} of {n} messages in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((n - first) as f64 / started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(f64::NAN))
}

/// The value of the counter `series` (name and labels, as rendered) in `handle`; 0 before its
/// first increment.
pub(crate) fn counter_value(handle: &PrometheusHandle, series: &str) -> u64 {
    handle
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

pub(crate) fn bench(name: &str, value: f64, unit: &str) {
    println!("BENCH {name}={value:.1} {unit}");
}

/// The raw baselines' sender: produces `total` copies of `payload` keyed `raw-<i>` at `rate` per
/// second from now, each on its own schedule (a late one does not delay the next); returns each
/// key with its scheduled send, the instant latencies count from.
pub(crate) async fn paced_produce(
    producer: &FutureProducer,
    topic: &str,
    payload: &[u8],
    rate: f64,
    total: usize,
) -> anyhow::Result<Vec<(String, Instant)>> {
    let started = Instant::now();
    let mut sent = Vec::with_capacity(total);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let key = format!("raw-{i}");
        sent.push((key.clone(), due));
        let (producer, topic, payload) = (producer.clone(), topic.to_string(), payload.to_vec());
        tasks.spawn(async move {
            let record = FutureRecord::to(&topic).key(&key).payload(&payload);
            producer.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| e)
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(sent)
}

/// Produces `n` events made by `make(i)` to `topic`, keyed by subject, each with its `event_id`
/// header (as the relay sends them), Avro-encoded; waits for every acknowledgement.
pub(crate) async fn produce_events<E: trialflow_schemas::Event>(
    kafka: &KafkaConfig,
    topic: &str,
    client: &str,
    n: u64,
    make: impl Fn(u64) -> E,
) -> anyhow::Result<()> {
    let producer: FutureProducer = trialflow_outbox::publisher::producer_config(kafka, client).create()?;
    let records = (0..n).map(|i| {
        let event = make(i);
        let key = event.envelope().subject_id.clone().unwrap_or_default();
        let id = event.envelope().event_id.to_string();
        Ok((topic.to_string(), key, trialflow_schemas::encode(&event)?, id))
    });
    send_all(&producer, records).await
}

/// Sends each `(topic, key, payload, event id)` with its `event_id` header (as the relay sends
/// them), at most 5,000 unacknowledged at once; waits for every acknowledgement.
pub(crate) async fn send_all(
    producer: &FutureProducer,
    records: impl Iterator<Item = anyhow::Result<(String, String, Vec<u8>, String)>>,
) -> anyhow::Result<()> {
    let mut pending = Vec::new();
    for record in records {
        let (topic, key, payload, id) = record?;
        let headers = OwnedHeaders::new().insert(Header { key: "event_id", value: Some(id.as_str()) });
        let record = FutureRecord::to(&topic).key(&key).payload(&payload).headers(headers);
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
        if pending.len() >= 5000 {
            for d in pending.drain(..) {
                d.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for d in pending {
        d.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

pub(crate) fn progress(msg: &str) {
    eprintln!("[bench] {msg}");
}

fn event(topic: &str, i: u64, args: &Args, payload: &[u8]) -> OutboxEvent {
    OutboxEvent {
        topic: topic.to_string(),
        key: format!("subject-{:05}", i % args.keys),
        event_type: "BenchEvent".to_string(),
        event_id: Uuid::now_v7(),
        content_type: "application/octet-stream".to_string(),
        payload: payload.to_vec(),
        headers: Default::default(),
    }
}

async fn relay_group(
    args: &Args,
    kafka: &KafkaConfig,
    pool: &PgPool,
    metrics: &PrometheusHandle,
) -> anyhow::Result<()> {
    let (run, topic, payload, raw) = relay_baseline(args, kafka, "relay", "raw_produce_throughput").await?;
    for exactly_once in [false, true] {
        relay_mode(args, kafka, pool, metrics, &run, &topic, &payload, raw, exactly_once).await?;
    }
    Ok(())
}

/// A fresh topic `bench.<group>.<run>` and the relay groups' baseline on it: a bare idempotent
/// rdkafka producer sending the same messages to the same broker (printed as `figure`).
/// Returns the run id, the topic, the payload and the raw rate (events/s).
async fn relay_baseline(
    args: &Args,
    kafka: &KafkaConfig,
    group: &str,
    figure: &str,
) -> anyhow::Result<(String, String, Vec<u8>, f64)> {
    let run = Uuid::new_v4().simple().to_string()[..8].to_string();
    let topic = format!("bench.{group}.{run}");
    trialflow_outbox::kafka::ensure_topics(kafka, &[(&topic, args.partitions)]).await?;
    let payload = vec![b'x'; args.payload_bytes];
    progress(&format!("raw produce: {} messages of {} bytes", args.events, args.payload_bytes));
    let raw = raw_produce(args, kafka, &topic, &payload).await?;
    bench(figure, raw, "events/s");
    Ok((run, topic, payload, raw))
}

/// The relay's throughput (draining a pre-filled outbox) and commit-to-ack latency (at a steady
/// rate), in the default mode (`relay_*`) or the exactly-once mode (`relay_eos_*`, where the ack
/// is the transaction's commit: the moment read_committed readers see the row).
#[allow(clippy::too_many_arguments)]
async fn relay_mode(
    args: &Args,
    kafka: &KafkaConfig,
    pool: &PgPool,
    metrics: &PrometheusHandle,
    run: &str,
    topic: &str,
    payload: &[u8],
    raw: f64,
    exactly_once: bool,
) -> anyhow::Result<()> {
    let (mode, name) = if exactly_once { ("eos_", "exactly-once relay") } else { ("", "relay") };
    let mut state_topic = None;
    if exactly_once {
        let name = format!("bench.relay-state.{run}");
        trialflow_outbox::kafka::ensure_topics(kafka, &[(&name, 1)]).await?;
        state_topic = Some(name);
    }
    let config = |schema: &SchemaName| {
        let mut config = relay_config(args, kafka, schema);
        config.exactly_once = exactly_once;
        if let Some(topic) = &state_topic {
            config.state_topic = topic.clone();
        }
        config
    };
    let schema = SchemaName::from_str(&format!("bench_{mode}tp_{run}"))?;
    trialflow_outbox::migrate(&args.database_url, &schema).await?;
    let outbox = Outbox::open(pool, schema.clone()).await?;
    progress(&format!("pre-filling the outbox of {schema} with {} rows", args.events));
    let started = Instant::now();
    for chunk_start in (0..args.events).step_by(1000) {
        let events: Vec<OutboxEvent> = (chunk_start..(chunk_start + 1000).min(args.events))
            .map(|i| event(topic, i, args, payload))
            .collect();
        let mut tx = pool.begin().await?;
        outbox.enqueue_all(&mut tx, &events).await?;
        tx.commit().await?;
    }
    if !exactly_once {
        bench("outbox_enqueue_throughput", args.events as f64 / started.elapsed().as_secs_f64(), "events/s");
    }

    progress(&format!("{name} draining the outbox"));
    let stop = CancellationToken::new();
    let relay = tokio::spawn(trialflow_outbox::relay::run(config(&schema), stop.clone()));
    let started = Instant::now();
    wait_drained(pool, metrics, &schema, args.events, Duration::from_secs(600)).await?;
    let relay_rate = args.events as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    relay.await??;
    bench(&format!("relay_{mode}throughput"), relay_rate, "events/s");
    bench(&format!("relay_{mode}vs_raw_produce"), 100.0 * relay_rate / raw, "%");
    // Dropped now so that autovacuum of its dead rows does not run during the latency run.
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(pool).await?;

    // Latency: commit to broker acknowledgement at a steady rate.
    let schema = SchemaName::from_str(&format!("bench_{mode}lat_{run}"))?;
    trialflow_outbox::migrate(&args.database_url, &schema).await?;
    let outbox = Outbox::open(pool, schema.clone()).await?;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(trialflow_outbox::relay::run(config(&schema), stop.clone()));
    progress(&format!(
        "{name} latency: {} events/s for {} s, one event per transaction",
        args.latency_rate, args.latency_secs
    ));
    steady_writes(args, pool, &outbox, topic, payload).await?;
    wait_empty(pool, &schema, Duration::from_secs(120)).await?;
    stop.cancel();
    relay.await??;
    let (p50, p99) = quantiles(metrics, schema.as_str())?;
    bench(&format!("relay_{mode}commit_to_ack_p50"), p50 * 1000.0, "ms");
    bench(&format!("relay_{mode}commit_to_ack_p99"), p99 * 1000.0, "ms");

    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(pool).await?;
    Ok(())
}

fn relay_config(args: &Args, kafka: &KafkaConfig, schema: &SchemaName) -> RelayConfig {
    let mut config = RelayConfig::local(vec![schema.clone()]);
    config.database.database_url = args.database_url.clone();
    config.kafka = kafka.clone();
    config.batch_size = args.batch_size.unwrap_or(config.batch_size);
    config.max_in_flight_batches = args.max_in_flight_batches.unwrap_or(config.max_in_flight_batches);
    config
}

async fn raw_produce(args: &Args, kafka: &KafkaConfig, topic: &str, payload: &[u8]) -> anyhow::Result<f64> {
    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(kafka, "bench-raw").create()?;
    let max_in_flight = 8 * 1000; // what the relay allows itself by default
    let mut in_flight = VecDeque::with_capacity(max_in_flight);
    let started = Instant::now();
    for i in 0..args.events {
        let key = format!("subject-{:05}", i % args.keys);
        let id = Uuid::now_v7().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: "event_id", value: Some(id.as_bytes()) })
            .insert(Header { key: "event_type", value: Some("BenchEvent".as_bytes()) })
            .insert(Header { key: "content-type", value: Some("application/octet-stream".as_bytes()) });
        let record = FutureRecord::to(topic).key(&key).payload(payload).headers(headers);
        let delivery = producer.send_result(record).map_err(|(e, _)| e)?;
        in_flight.push_back(delivery);
        if in_flight.len() >= max_in_flight
            && let Some(oldest) = in_flight.pop_front()
        {
            oldest.await?.map_err(|(e, _)| e)?;
        }
    }
    for delivery in in_flight {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(args.events as f64 / started.elapsed().as_secs_f64())
}

/// Writes `latency_rate` events/s for `latency_secs`, each in its own transaction, from 8
/// writers on a fixed schedule (a late writer catches up rather than lowering the rate).
async fn steady_writes(
    args: &Args,
    pool: &PgPool,
    outbox: &Outbox,
    topic: &str,
    payload: &[u8],
) -> anyhow::Result<()> {
    let writers = 8u64;
    let total = args.latency_rate * args.latency_secs;
    let interval = Duration::from_secs_f64(writers as f64 / args.latency_rate as f64);
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (pool, outbox, topic, payload) =
            (pool.clone(), outbox.clone(), topic.to_string(), payload.to_vec());
        let per_writer: Vec<u64> = (0..total).filter(|i| i % writers == w).collect();
        let key_count = args.keys;
        tasks.spawn(async move {
            for (n, i) in per_writer.into_iter().enumerate() {
                tokio::time::sleep_until(start + interval * n as u32).await;
                let e = OutboxEvent {
                    topic: topic.clone(),
                    key: format!("subject-{:05}", i % key_count),
                    event_type: "BenchEvent".to_string(),
                    event_id: Uuid::now_v7(),
                    content_type: "application/octet-stream".to_string(),
                    payload: payload.clone(),
                    headers: Default::default(),
                };
                let mut tx = pool.begin().await?;
                outbox.enqueue(&mut tx, e).await?;
                tx.commit().await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    progress(&format!("latency run wrote {total} events at {achieved:.0} events/s"));
    Ok(())
}

/// Waits until the relays of this process have published `rows` rows of `schema` (their counter,
/// read in-process), then until its outbox is empty (the deletes of the last batches). Polling the
/// table all along would scan the deleted rows every 10 ms on the PostgreSQL the relay reads from.
pub(crate) async fn wait_drained(
    pool: &PgPool,
    metrics: &PrometheusHandle,
    schema: &SchemaName,
    rows: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let counter = format!("{PUBLISHED_TOTAL}{{source=\"{schema}\"}}");
    let published = || counter_value(metrics, &counter);
    let deadline = Instant::now() + timeout;
    while published() < rows {
        if Instant::now() > deadline {
            bail!("outbox {schema}: {} of {rows} rows published after {timeout:?}", published());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_empty(pool, schema, deadline.saturating_duration_since(Instant::now())).await
}

async fn wait_empty(pool: &PgPool, schema: &SchemaName, timeout: Duration) -> anyhow::Result<()> {
    let sql = format!("SELECT NOT EXISTS (SELECT 1 FROM {schema}.outbox)");
    let deadline = Instant::now() + timeout;
    while !sqlx::query_scalar::<_, bool>(AssertSqlSafe(sql.as_str())).fetch_one(pool).await? {
        if Instant::now() > deadline {
            bail!("outbox {schema} not drained after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// p50 and p99 (seconds) of the relay's commit-to-ack summary for `source`.
fn quantiles(metrics: &PrometheusHandle, source: &str) -> anyhow::Result<(f64, f64)> {
    let text = metrics.render();
    let find = |q: &str| {
        let prefix = format!("{COMMIT_TO_ACK_SECONDS}{{source=\"{source}\",quantile=\"{q}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("no {q} quantile of {COMMIT_TO_ACK_SECONDS} for {source}"))
    };
    Ok((find("0.5")?, find("0.99")?))
}
