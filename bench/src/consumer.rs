//! Group `consumer`: the consumer runtime applying 200,000 events (6 partitions, one instance) with
//! a trivial handler that writes one row per event, against PostgreSQL's raw rate for the same
//! inserts batched the same way (transactions of `max_batch` rows, one writer per partition).
//! Then once more with spans exported (`consumer_throughput_traced`): the cost of tracing.

use std::time::{Duration, Instant};

use anyhow::bail;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::{ConsumerConfig, ConsumerSpec, Context, Handler, HandlerError, Message};
use trialflow_outbox::{KafkaConfig, SchemaName};
use uuid::Uuid;

use crate::traced::Subscriber;
use crate::{bench, progress};

const PARTITIONS: i32 = 6;

struct RowWriter {
    insert: String,
}

impl Handler for RowWriter {
    type Batch = ();

    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        msg: &Message,
        _ctx: &mut Context,
        _batch: &mut (),
    ) -> Result<(), HandlerError> {
        let event_id = self.event_id(msg)?;
        sqlx::query(AssertSqlSafe(self.insert.as_str()))
            .bind(event_id)
            .bind(msg.partition)
            .bind(msg.offset)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

pub(crate) async fn group(
    database_url: &str,
    kafka: &KafkaConfig,
    pool: &PgPool,
    events: u64,
    metrics_handle: Option<&metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<()> {
    let run = &Uuid::new_v4().simple().to_string()[..8];
    let schema = SchemaName::new(format!("bench_consumer_{run}"))?;
    let topic = format!("bench.consumer.{run}");
    trialflow_consumers::migrate(database_url, &schema, Some(sqlx::migrate!("./migrations"))).await?;
    trialflow_outbox::kafka::ensure_topics(kafka, &[(&topic, PARTITIONS)]).await?;
    let config = ConsumerConfig {
        database: trialflow_outbox::DatabaseConfig::new(database_url),
        kafka: kafka.clone(),
        ..ConsumerConfig::local()
    };
    let insert =
        format!("INSERT INTO {schema}.bench_rows (event_id, partition, \"offset\") VALUES ($1, $2, $3)");

    // Baseline: the same inserts, same batching, straight into PostgreSQL.
    let raw = raw_inserts(pool, &insert, events, config.max_batch as u64).await?;
    bench("raw_insert_throughput", raw, "events/s");
    sqlx::query(AssertSqlSafe(format!("TRUNCATE {schema}.bench_rows"))).execute(pool).await?;

    progress(&format!("producing {events} events to {topic}"));
    produce(kafka, &topic, events).await?;

    // Informational: how fast a bare librdkafka consumer reads the same topic from this broker.
    let started = Instant::now();
    let n = events as usize;
    let read = trialflow_outbox::kafka::TopicReader::new(kafka, &topic, true)?
        .read_until(Duration::from_secs(300), move |m| m.len() >= n)
        .await?;
    bench("raw_consume_throughput", read.len() as f64 / started.elapsed().as_secs_f64(), "events/s");

    progress("consumer applying them");
    let Some(handle) = metrics_handle else { bail!("the consumer benchmark needs the metrics recorder") };
    let spec =
        ConsumerSpec { name: format!("bench-{run}"), schema: schema.clone(), topics: vec![topic.clone()] };
    let rate = consume(spec, config.clone(), insert.clone(), events, handle).await?;
    bench("consumer_throughput", rate, "events/s");
    for line in handle.render().lines().filter(|l| {
        l.starts_with("trialflow_consumer_")
            && (l.contains("quantile=\"0.5\"") || l.contains("_sum") || l.contains("_count"))
    }) {
        progress(line);
    }

    // The same events again, by a second and a third group, under the subscriber `trialflow`
    // installs: its logs alone (no OTLP endpoint), then with spans exported (a `process` span per
    // message, a child of its traceparent header, batched and sent over OTLP/HTTP to a receiver
    // in this process).
    let mut figures = Vec::new();
    for (subscriber, suffix) in [(Subscriber::Logs, "logs"), (Subscriber::LogsAndSpans, "traced")] {
        progress(&format!("consumer applying them again, {subscriber:?}"));
        sqlx::query(AssertSqlSafe(format!("TRUNCATE {schema}.bench_rows"))).execute(pool).await?;
        let spec = ConsumerSpec {
            name: format!("bench-{run}-{suffix}"),
            schema: schema.clone(),
            topics: vec![topic.clone()],
        };
        let (config, insert, handle) = (config.clone(), insert.clone(), handle.clone());
        let work = move || async move { consume(spec, config, insert, events, &handle).await };
        figures.push(crate::traced::run(subscriber, work).await?);
    }
    let [(logs, _), (traced, exported)] = figures[..] else { bail!("two subscribed runs") };
    bench("consumer_throughput_logs", logs, "events/s");
    bench("consumer_throughput_traced", traced, "events/s");
    bench("consumer_traced_vs_untraced", 100.0 * traced / rate, "%");
    bench("consumer_traced_vs_logs", 100.0 * traced / logs, "%");
    bench("consumer_traced_spans_exported", exported as f64, "spans");
    bench("consumer_vs_raw_insert", 100.0 * rate / raw, "%");
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(pool).await?;
    Ok(())
}

/// Runs the consumer runtime over the topic until `events` are applied; events/s from the first
/// applied one (joining the group is not throughput). Progress is read from the runtime's own
/// counter, so measuring puts no load on the database.
async fn consume(
    spec: ConsumerSpec,
    config: ConsumerConfig,
    insert: String,
    events: u64,
    handle: &metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<f64> {
    consume_with(spec, config, insert, events, handle, 1).await
}

/// [`consume`] by `instances` members of one consumer group (the partitions split between them).
pub(crate) async fn consume_with(
    spec: ConsumerSpec,
    config: ConsumerConfig,
    insert: String,
    events: u64,
    handle: &metrics_exporter_prometheus::PrometheusHandle,
    instances: usize,
) -> anyhow::Result<f64> {
    let stop = CancellationToken::new();
    let name = spec.name.clone();
    let consumers: Vec<_> = (0..instances)
        .map(|_| {
            let (spec, config, handler) =
                (spec.clone(), config.clone(), RowWriter { insert: insert.clone() });
            tokio::spawn(trialflow_consumers::runtime::run(spec, config, handler, stop.clone()))
        })
        .collect();
    let counter = format!("trialflow_consumer_messages_total{{consumer=\"{name}\",outcome=\"applied\"}}");
    let count = || crate::counter_value(handle, &counter) as i64;
    let deadline = Instant::now() + Duration::from_secs(900);
    let (mut started, mut first) = (None, 0i64);
    loop {
        let n = count();
        if started.is_none() && n > 0 {
            started = Some(Instant::now());
            first = n;
        }
        if n as u64 >= events {
            break;
        }
        if Instant::now() > deadline {
            bail!("consumer {name} applied {n} of {events} events in 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
    stop.cancel();
    for consumer in consumers {
        consumer.await??;
    }
    Ok((events as i64 - first) as f64 / elapsed)
}

async fn raw_inserts(pool: &PgPool, insert: &str, events: u64, batch: u64) -> anyhow::Result<f64> {
    progress(&format!("raw inserts: {events} rows, {batch} per transaction, {PARTITIONS} writers"));
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..PARTITIONS as u64 {
        let (pool, insert) = (pool.clone(), insert.to_string());
        let mine = events / PARTITIONS as u64 + u64::from(w < events % PARTITIONS as u64);
        writers.spawn(async move {
            let mut done = 0;
            while done < mine {
                let mut tx = pool.begin().await?;
                for i in 0..batch.min(mine - done) {
                    sqlx::query(AssertSqlSafe(insert.as_str()))
                        .bind(Uuid::now_v7())
                        .bind(w as i32)
                        .bind((done + i) as i64)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                done += batch.min(mine - done);
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = writers.join_next().await {
        r??;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

pub(crate) async fn produce(kafka: &KafkaConfig, topic: &str, events: u64) -> anyhow::Result<()> {
    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(kafka, "bench-consumer").create()?;
    let mut in_flight = std::collections::VecDeque::new();
    for i in 0..events {
        let id = Uuid::now_v7().to_string();
        let key = format!("subject-{:05}", i % 1000);
        // As the relay sends a traced writer's rows: the traced run's spans continue these traces.
        let traceparent = format!("00-{}-{:016x}-01", Uuid::new_v4().simple(), i + 1);
        let headers = OwnedHeaders::new()
            .insert(Header { key: "event_id", value: Some(id.as_bytes()) })
            .insert(Header { key: "traceparent", value: Some(traceparent.as_bytes()) });
        in_flight.push_back(
            producer
                .send_result(FutureRecord::to(topic).key(&key).payload("x").headers(headers))
                .map_err(|(e, _)| e)?,
        );
        if in_flight.len() >= 10_000
            && let Some(d) = in_flight.pop_front()
        {
            d.await?.map_err(|(e, _)| e)?;
        }
    }
    for d in in_flight {
        d.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}
