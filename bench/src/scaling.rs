//! Group `scaling`: how cost grows (issue 20, item 5).
//!
//! * **Relay instances and shards**: one outbox of `events` rows committed in one transaction,
//!   drained by 1, 2 and 4 relay instances (each its own lease connection and shard share, in this
//!   process), with 16 and with 64 shards. The relays are started first and the figure waits until
//!   every instance holds its fair share of the shards, so it measures draining, not rebalancing.
//!   Baseline: the raw produce rate of the `relay` group's bare producer, measured here again.
//! * **Consumer instances**: `events` messages on a 6-partition topic applied by the consumer
//!   runtime with the `consumer` group's one-insert handler, by one instance and by two instances
//!   of one consumer group (in this process; the partitions split between them).
//! * **Backlog drain**: `backlog_rows` rows (default 5 million) enqueued while no relay runs, then
//!   one relay drains them; the rates of the first and of the last million are compared (flat is
//!   the goal: the relay reads by primary key from the head of each shard, so a long table must
//!   not slow it down).
//!
//! The figures print as `BENCH scaling_…` lines; with `--plot-dir` an SVG of the relay curve is
//! written there (`docs/benchmarks/` keeps the one of record).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::{ConsumerConfig, ConsumerSpec};
use trialflow_outbox::shard::shard_lock_namespace;
use trialflow_outbox::{KafkaConfig, Outbox, SchemaName};
use uuid::Uuid;

use crate::{Args, bench, consumer, event, progress, relay_baseline, relay_config, wait_drained};

const INSTANCES: &[usize] = &[1, 2, 4];
const SHARDS: &[u32] = &[16, 64];

pub(crate) async fn group(
    args: &Args,
    kafka: &KafkaConfig,
    pool: &PgPool,
    metrics: &PrometheusHandle,
) -> anyhow::Result<()> {
    let (run, topic, payload, raw) =
        relay_baseline(args, kafka, "scaling", "scaling_raw_produce_throughput").await?;
    let run = run.as_str();
    let mut curve: Vec<(u32, usize, f64)> = Vec::new();
    for &shards in SHARDS {
        for &instances in INSTANCES {
            let rate =
                drain_with(args, kafka, pool, metrics, run, &topic, &payload, shards, instances).await?;
            bench(&format!("scaling_relay_{instances}x_{shards}_shards_throughput"), rate, "events/s");
            bench(
                &format!("scaling_relay_{instances}x_{shards}_shards_vs_raw_produce"),
                100.0 * rate / raw,
                "%",
            );
            curve.push((shards, instances, rate));
        }
    }
    if let Some(dir) = &args.plot_dir {
        let path = dir.join("relay-instances.svg");
        std::fs::write(&path, relay_plot(&curve, raw))?;
        progress(&format!("wrote {}", path.display()));
    }

    consumer_instances(args, kafka, pool, metrics).await?;

    if args.backlog_rows > 0 {
        backlog(args, kafka, pool, run, &topic, &payload).await?;
    }
    Ok(())
}

/// The consumer runtime's throughput with one and with two instances of one group.
async fn consumer_instances(
    args: &Args,
    kafka: &KafkaConfig,
    pool: &PgPool,
    metrics: &PrometheusHandle,
) -> anyhow::Result<()> {
    let run = &Uuid::new_v4().simple().to_string()[..8];
    let schema = SchemaName::new(format!("bench_scale_consumer_{run}"))?;
    let topic = format!("bench.scaling-consumer.{run}");
    trialflow_consumers::migrate(&args.database_url, &schema, Some(sqlx::migrate!("./migrations"))).await?;
    trialflow_outbox::kafka::ensure_topics(kafka, &[(&topic, 6)]).await?;
    let config = ConsumerConfig {
        database: trialflow_outbox::DatabaseConfig::new(&args.database_url),
        kafka: kafka.clone(),
        ..ConsumerConfig::local()
    };
    let insert =
        format!("INSERT INTO {schema}.bench_rows (event_id, partition, \"offset\") VALUES ($1, $2, $3)");
    progress(&format!("producing {} events to {topic}", args.events));
    consumer::produce(kafka, &topic, args.events).await?;
    let mut rates = Vec::new();
    for instances in [1, 2] {
        progress(&format!("{instances} consumer instance(s) of one group applying them"));
        let spec = ConsumerSpec {
            name: format!("bench-scale-{run}-{instances}"),
            schema: schema.clone(),
            topics: vec![topic.clone()],
        };
        let rate =
            consumer::consume_with(spec, config.clone(), insert.clone(), args.events, metrics, instances)
                .await?;
        bench(&format!("scaling_consumer_{instances}x_throughput"), rate, "events/s");
        rates.push(rate);
    }
    bench("scaling_consumer_2x_vs_1x", 100.0 * rates[1] / rates[0], "%");
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(pool).await?;
    Ok(())
}

/// Fills an outbox of `shards` shards with `args.events` rows in one transaction once `instances`
/// relays each own their share, and returns events/s from the commit to the empty outbox.
#[allow(clippy::too_many_arguments)]
async fn drain_with(
    args: &Args,
    kafka: &KafkaConfig,
    pool: &PgPool,
    metrics: &PrometheusHandle,
    run: &str,
    topic: &str,
    payload: &[u8],
    shards: u32,
    instances: usize,
) -> anyhow::Result<f64> {
    let schema = SchemaName::new(format!("bench_scale_{instances}x{shards}_{run}"))?;
    trialflow_outbox::migrate(&args.database_url, &schema).await?;
    trialflow_outbox::set_shard_count(&args.database_url, &schema, shards).await?;
    let outbox = Outbox::open(pool, schema.clone()).await?;
    let stop = CancellationToken::new();
    let mut relays = Vec::new();
    for _ in 0..instances {
        let mut config = relay_config(args, kafka, &schema);
        config.rebalance_interval_ms = 200;
        relays.push(tokio::spawn(trialflow_outbox::relay::run(config, stop.clone())));
    }
    progress(&format!("{instances} relay(s), {shards} shards: waiting for a fair split"));
    wait_balanced(pool, &schema, shards, instances).await?;

    let mut tx = pool.begin().await?;
    for chunk_start in (0..args.events).step_by(1000) {
        let events: Vec<_> = (chunk_start..(chunk_start + 1000).min(args.events))
            .map(|i| event(topic, i, args, payload))
            .collect();
        outbox.enqueue_all(&mut tx, &events).await?;
    }
    tx.commit().await?;
    let started = Instant::now();
    wait_drained(pool, metrics, &schema, args.events, Duration::from_secs(600)).await?;
    let rate = args.events as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    for relay in relays {
        relay.await??;
    }
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(pool).await?;
    Ok(rate)
}

/// Waits until `instances` relay sessions own every shard of `schema`, none more than its share.
async fn wait_balanced(
    pool: &PgPool,
    schema: &SchemaName,
    shards: u32,
    instances: usize,
) -> anyhow::Result<()> {
    let fair = shards.div_ceil(instances as u32) as i64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (owners, owned, most): (i64, i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), coalesce(sum(n), 0)::bigint, max(n) FROM (
                 SELECT pid, count(*) AS n FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid::bigint = $1
                 GROUP BY pid) AS held",
        )
        .bind(i64::from(shard_lock_namespace(schema)))
        .fetch_one(pool)
        .await?;
        if owners == instances as i64 && owned == i64::from(shards) && most.unwrap_or(0) <= fair {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{instances} relays did not split {shards} shards within 60 s ({owners} own {owned})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A backlog of `args.backlog_rows` drained by one relay: the rates of the first and the last
/// million rows (or tenth, for a smaller backlog).
async fn backlog(
    args: &Args,
    kafka: &KafkaConfig,
    pool: &PgPool,
    run: &str,
    topic: &str,
    payload: &[u8],
) -> anyhow::Result<()> {
    let rows = args.backlog_rows;
    let slice = 1_000_000.min(rows / 10).max(1);
    let schema = SchemaName::new(format!("bench_backlog_{run}"))?;
    trialflow_outbox::migrate(&args.database_url, &schema).await?;
    let outbox = Outbox::open(pool, schema.clone()).await?;
    progress(&format!("backlog: enqueueing {rows} rows (no relay running)"));
    let started = Instant::now();
    for chunk_start in (0..rows).step_by(5000) {
        let events: Vec<_> =
            (chunk_start..(chunk_start + 5000).min(rows)).map(|i| event(topic, i, args, payload)).collect();
        let mut tx = pool.begin().await?;
        outbox.enqueue_all(&mut tx, &events).await?;
        tx.commit().await?;
        if chunk_start % 500_000 == 0 {
            progress(&format!("  {chunk_start} rows enqueued"));
        }
    }
    bench("scaling_backlog_enqueue_throughput", rows as f64 / started.elapsed().as_secs_f64(), "events/s");
    // No ANALYZE: the relay's read must not depend on the outbox's statistics (`read_session`).

    progress(&format!("backlog: one relay draining {rows} rows"));
    let stop = CancellationToken::new();
    let relay = tokio::spawn(trialflow_outbox::relay::run(relay_config(args, kafka, &schema), stop.clone()));
    let count = format!("SELECT count(*) FROM {schema}.outbox");
    let started = Instant::now();
    // (remaining, elapsed) samples; rates between the samples around each slice's ends.
    let mut samples: Vec<(u64, f64)> = vec![(rows, 0.0)];
    loop {
        let left: i64 = sqlx::query_scalar(AssertSqlSafe(count.as_str())).fetch_one(pool).await?;
        samples.push((left as u64, started.elapsed().as_secs_f64()));
        if left == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("backlog not drained in an hour ({left} rows left)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    relay.await??;
    let total = started.elapsed().as_secs_f64();
    let at = |remaining: u64| samples.iter().find(|(left, _)| *left <= remaining).map_or(total, |(_, t)| *t);
    let first = slice as f64 / at(rows - slice);
    let last = slice as f64 / (total - at(slice));
    bench("scaling_backlog_drain_throughput", rows as f64 / total, "events/s");
    bench("scaling_backlog_first_slice_throughput", first, "events/s");
    bench("scaling_backlog_last_slice_throughput", last, "events/s");
    bench("scaling_backlog_last_vs_first", 100.0 * last / first, "%");
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(pool).await?;
    Ok(())
}

/// The relay's throughput against its instances, one line per shard count, and the raw produce
/// rate as a dashed line: a small self-contained SVG.
fn relay_plot(curve: &[(u32, usize, f64)], raw: f64) -> String {
    let (width, height, margin) = (560.0, 320.0, 60.0);
    let top = curve.iter().map(|c| c.2).fold(raw, f64::max) * 1.1;
    let x = |instances: usize| {
        let i = INSTANCES.iter().position(|n| *n == instances).unwrap_or(0) as f64;
        margin + i * (width - 2.0 * margin) / (INSTANCES.len() - 1).max(1) as f64
    };
    let y = |rate: f64| height - margin - rate / top * (height - 2.0 * margin);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"{margin}\" y=\"24\" font-size=\"14\">Relay throughput (events/s) by instances</text>\n\
         <line x1=\"{margin}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{margin}\" y1=\"{margin}\" x2=\"{margin}\" y2=\"{b}\" stroke=\"black\"/>\n",
        b = height - margin,
        r = width - margin
    );
    for &n in INSTANCES {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{n}</text>",
            x(n),
            height - margin + 18.0
        );
    }
    for tick in 0..=4 {
        let rate = top * f64::from(tick) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}k</text>",
            margin - 6.0,
            y(rate) + 4.0,
            rate / 1000.0
        );
    }
    let _ = writeln!(
        svg,
        "<line x1=\"{margin}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"gray\" stroke-dasharray=\"6 4\"/>\
         <text x=\"{1}\" y=\"{2}\" text-anchor=\"end\" fill=\"gray\">raw produce</text>",
        y(raw),
        width - margin,
        y(raw) - 6.0
    );
    for (shards, colour) in SHARDS.iter().zip(["#1f77b4", "#d62728"]) {
        let points: Vec<String> =
            curve.iter().filter(|c| c.0 == *shards).map(|c| format!("{:.1},{:.1}", x(c.1), y(c.2))).collect();
        let _ = writeln!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>",
            points.join(" ")
        );
        let label_y = if *shards == SHARDS[0] { margin + 4.0 } else { margin + 20.0 };
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{label_y}\" fill=\"{colour}\">{shards} shards</text>",
            width - margin - 80.0
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">relay instances</text>",
        width / 2.0,
        height - 18.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// The plot's directory must exist: the benchmark writes, it does not create folders.
pub(crate) fn plot_dir(value: &str) -> Result<std::path::PathBuf, String> {
    let path = Path::new(value);
    if path.is_dir() { Ok(path.to_path_buf()) } else { Err(format!("{value}: not a directory")) }
}
