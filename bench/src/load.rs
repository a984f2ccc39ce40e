//! Group `load`: the load generator (`trialflow load`) against the whole pipeline, started in this
//! process on fresh schemas and topics: 2,000 subjects enrolled through the site API at 500
//! requests/s, then 500 inputs/s (vital signs and PHQ-9 submissions) for 20 s. End to end: from a
//! subject's enrollment request to its SubjectEnrolled on the lifecycle topic (site API → relay →
//! enrollment → relay → kit allocation → relay → enrollment → relay → topic: four broker hops).
//! Baseline in the same run: one bare producer → bare consumer hop on the same broker at the same
//! rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trialflow_simulation::stats::{nearest_rank, sorted_f64};

use anyhow::{Context, bail};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use trialflow_outbox::KafkaConfig;
use trialflow_outbox::kafka::{ReadMessage, TopicReader};
use trialflow_pipeline::{Pipeline, PipelineConfig};
use trialflow_schemas::topics;
use trialflow_simulation::load::{LoadConfig, run_load};
use uuid::Uuid;

use crate::{bench, progress};

const PARTITIONS: i32 = 6;
const SUBJECTS: u32 = 2_000;
const RATE: u32 = 500;
const STEADY_SECS: u64 = 20;
const BASELINE_SECS: u64 = 10;
/// Longest wait for the last SubjectEnrolled after the load ended.
const SETTLE: Duration = Duration::from_secs(300);

/// When the first message of each (event type, key) arrived; the type is "" without the header.
type Arrivals = Arc<Mutex<HashMap<(String, String), Instant>>>;

fn arrivals_of(arrivals: &Arrivals, event_type: &str) -> HashMap<String, Instant> {
    let arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner());
    arrivals.iter().filter(|((t, _), _)| t == event_type).map(|((_, key), at)| (key.clone(), *at)).collect()
}

/// Reads `topic` from its beginning in the background, noting when the first message of each
/// event type and key arrived, until `expected` keys of `until` (an event type) are in or
/// `timeout` passes.
async fn watch(
    kafka: &KafkaConfig,
    topic: &str,
    until: &'static str,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<(Arrivals, tokio::task::JoinHandle<()>)> {
    let reader = TopicReader::new(kafka, topic, true)?;
    let arrivals: Arrivals = Arc::default();
    let noted = arrivals.clone();
    let (mut seen, mut done_count) = (0, 0);
    let done = move |read: &[ReadMessage]| {
        let now = Instant::now();
        let mut noted = noted.lock().unwrap_or_else(|e| e.into_inner());
        for m in &read[seen..] {
            let event_type = m.header("event_type").unwrap_or_default().to_string();
            let counts = event_type == until;
            if noted.insert((event_type, m.key.clone()), now).is_none() && counts {
                done_count += 1;
            }
        }
        seen = read.len();
        done_count >= expected
    };
    let task = tokio::spawn(async move {
        if let Err(e) = reader.read_until(timeout, done).await {
            progress(&format!("topic reader failed: {e}"));
        }
    });
    Ok((arrivals, task))
}

fn quantiles(ms: Vec<f64>) -> (f64, f64) {
    let ms = sorted_f64(ms);
    let at = |q: f64| nearest_rank(&ms, q).unwrap_or(f64::NAN);
    (at(0.50), at(0.99))
}

pub(crate) async fn group(database_url: &str, kafka: &KafkaConfig, pool: &PgPool) -> anyhow::Result<()> {
    let mut config = PipelineConfig::isolated("bench_load", database_url, kafka)?;
    config.partitions = PARTITIONS;
    let names = config.topics.clone();
    let run = &Uuid::new_v4().simple().to_string()[..8];

    // Baseline first, so the pipeline does not share the machine with it.
    let raw_topic = names.name("raw");
    trialflow_outbox::kafka::ensure_topics(kafka, &[(&raw_topic, PARTITIONS)]).await?;
    let (raw_p50, raw_p99) = raw_hop(kafka, &raw_topic).await?;

    let schemas = config.schemas.sources();
    let shutdown = CancellationToken::new();
    let pipeline = Pipeline::start(config, &shutdown).await.context("starting the pipeline")?;

    let lifecycle = names.name(topics::SUBJECT_LIFECYCLE);
    let expected = SUBJECTS as usize;
    let (lifecycle, reader) = watch(kafka, &lifecycle, "SubjectEnrolled", expected, SETTLE * 2).await?;
    // The middle of the saga, for the breakdown: the kit-allocation consumer's answers.
    let allocations = names.name(topics::KIT_ALLOCATIONS);
    let (allocations, allocation_reader) =
        watch(kafka, &allocations, "KitAllocated", expected, SETTLE * 2).await?;
    let epoch = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap_or_default();
    let mut load = LoadConfig::local(&format!("BENCH-{run}"), epoch);
    load.subjects = SUBJECTS;
    load.rate = RATE;
    load.duration = Duration::from_secs(STEADY_SECS);
    load.site_api = format!("http://{}", pipeline.site_api_addr());
    load.epro_gateway = format!("http://{}", pipeline.epro_gateway_addr());
    load.kafka = kafka.clone();
    load.topics = names;
    progress(&format!(
        "load: {SUBJECTS} subjects at {RATE} requests/s, then {RATE} inputs/s for {STEADY_SECS} s"
    ));
    let report = run_load(load, &shutdown).await?;
    eprintln!("{report}");

    let deadline = Instant::now() + SETTLE;
    while arrivals_of(&lifecycle, "SubjectEnrolled").len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let enrolled = arrivals_of(&lifecycle, "SubjectEnrolled");
    let randomized = arrivals_of(&lifecycle, "SubjectRandomized");
    let allocated = arrivals_of(&allocations, "KitAllocated");
    reader.abort();
    allocation_reader.abort();
    shutdown.cancel();
    pipeline.wait().await?;
    for schema in &schemas {
        sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(pool).await?;
    }
    report.check()?;
    if enrolled.len() < expected {
        bail!("{} of {expected} subjects enrolled within {SETTLE:?} of the end of the load", enrolled.len());
    }

    // From each enrollment request to when `stage` was read, in ms.
    let since_request = |stage: &HashMap<String, Instant>| -> Vec<f64> {
        report
            .enrollment_requested
            .iter()
            .filter_map(|(subject, sent)| {
                stage.get(subject).map(|at| at.duration_since(*sent).as_secs_f64() * 1e3)
            })
            .collect()
    };
    let first_request = report.enrollment_requested.iter().map(|(_, at)| *at).min();
    let last_enrolled = enrolled.values().max().copied();
    let (Some(first_request), Some(last_enrolled)) = (first_request, last_enrolled) else {
        bail!("no enrollment was requested");
    };
    let (e2e_p50, e2e_p99) = quantiles(since_request(&enrolled));
    for (stage, arrivals) in [("randomized", &randomized), ("kit allocated", &allocated)] {
        let (p50, p99) = quantiles(since_request(arrivals));
        progress(&format!("enrollment request → {stage}: p50 {p50:.0} ms, p99 {p99:.0} ms"));
    }
    bench("load_enrollment_requests_per_s", report.enrollment.rate(), "requests/s");
    bench(
        "load_enrollments_per_s",
        expected as f64 / last_enrolled.duration_since(first_request).as_secs_f64(),
        "subjects/s",
    );
    bench("load_inputs_per_s", report.steady.rate(), "inputs/s");
    bench("load_enrollment_e2e_p50", e2e_p50, "ms");
    bench("load_enrollment_e2e_p99", e2e_p99, "ms");
    if let Some(q) = report.gateway_ack {
        bench("load_gateway_ack_p99", q.p99.as_secs_f64() * 1e3, "ms");
    }
    bench("load_raw_produce_to_consume_p50", raw_p50, "ms");
    bench("load_raw_produce_to_consume_p99", raw_p99, "ms");
    Ok(())
}

/// p50 and p99 (ms) of a bare producer → bare consumer hop, `RATE` messages/s for
/// `BASELINE_SECS`, each measured from its scheduled send.
async fn raw_hop(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<(f64, f64)> {
    progress(&format!("baseline: bare produce → consume, {RATE} messages/s for {BASELINE_SECS} s"));
    let total = (u64::from(RATE) * BASELINE_SECS) as usize;
    let (arrived, reader) =
        watch(kafka, topic, "", total + 1, Duration::from_secs(BASELINE_SECS + 120)).await?;
    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(kafka, "bench-load-raw").create()?;
    let payload = vec![b'x'; 300];
    // Timed only once the reader reads: connecting is not latency.
    let warmup = FutureRecord::to(topic).key("warmup").payload(&payload);
    producer.send(warmup, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !arrivals_of(&arrived, "").contains_key("warmup") {
        if Instant::now() > deadline {
            bail!("the baseline reader saw nothing within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = crate::paced_produce(&producer, topic, &payload, f64::from(RATE), total).await?;
    reader.await?;
    let arrived = arrivals_of(&arrived, "");
    let ms: Vec<f64> = sent
        .iter()
        .filter_map(|(key, due)| {
            arrived.get(key).map(|at| at.saturating_duration_since(*due).as_secs_f64() * 1e3)
        })
        .collect();
    if ms.len() < total {
        bail!("the baseline reader saw {} of {total} messages", ms.len());
    }
    Ok(quantiles(ms))
}
