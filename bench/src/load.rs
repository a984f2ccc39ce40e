//! Group `load`: the load generator (`trialflow load`) against the whole pipeline, started in this
//! process on fresh schemas and topics, in two runs (two studies):
//!
//! * **burst**: 2,000 subjects screened and consented at 500 requests/s, then their enrollment
//!   requests at 400/s, faster than the saga's goal of 200 enrollments/s, then 500 inputs/s
//!   (vital signs and PHQ-9 submissions) for 20 s. Enrollments/s = subjects over the time from
//!   the first request to the last SubjectEnrolled.
//! * **sustained**: 3,000 subjects, their enrollment requests at 100/s for 30 s: the latency of
//!   the saga when it keeps up.
//!
//! End to end: from a subject's enrollment request to its SubjectEnrolled on the lifecycle topic
//! (site API → relay → enrollment → relay → kit allocation → relay → enrollment → relay → topic:
//! four broker hops). Baseline in the same run: one bare producer → bare consumer hop on the same
//! broker at 500 messages/s.

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
use trialflow_simulation::load::{LoadConfig, LoadReport, run_load};
use uuid::Uuid;

use crate::{bench, progress};

const PARTITIONS: i32 = 6;
const SUBJECTS: u32 = 2_000;
const RATE: u32 = 500;
/// Enrollment requests/s of the burst: above the goal of 200 enrollments/s.
const BURST_RATE: u32 = 400;
/// Enrollment requests/s and seconds of the sustained run.
const SUSTAINED_RATE: u32 = 100;
const SUSTAINED_SECS: u32 = 30;
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

/// Reads what is published to `topic` from now on in the background, noting when the first
/// message of each event type and key arrived, until `expected` keys of `until` (an event type)
/// are in or `timeout` passes.
async fn watch(
    kafka: &KafkaConfig,
    topic: &str,
    until: &'static str,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<(Arrivals, tokio::task::JoinHandle<()>)> {
    let reader = TopicReader::new(kafka, topic, false)?;
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
    let epoch = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap_or_default();
    let mut load = LoadConfig::local(&format!("BENCH-{run}"), epoch);
    load.site_api = format!("http://{}", pipeline.site_api_addr());
    load.epro_gateway = format!("http://{}", pipeline.epro_gateway_addr());
    load.kafka = kafka.clone();
    load.topics = names;
    load.rate = RATE;

    let burst = LoadConfig {
        subjects: SUBJECTS,
        enrollment_rate: Some(BURST_RATE),
        duration: Duration::from_secs(STEADY_SECS),
        ..load.clone()
    };
    let sustained = LoadConfig {
        study: format!("BENCH-{run}-S"),
        subjects: SUSTAINED_RATE * SUSTAINED_SECS,
        enrollment_rate: Some(SUSTAINED_RATE),
        duration: Duration::ZERO,
        ..load
    };
    let runs = async {
        progress(&format!(
            "load, burst: {SUBJECTS} subjects screened and consented at {RATE} requests/s, their \
             enrollment requests at {BURST_RATE}/s, then {RATE} inputs/s for {STEADY_SECS} s"
        ));
        let burst = saga_run(kafka, burst, &shutdown).await?;
        progress(&format!(
            "load, sustained: {} subjects, enrollment requests at {SUSTAINED_RATE}/s",
            SUSTAINED_RATE * SUSTAINED_SECS
        ));
        let sustained = saga_run(kafka, sustained, &shutdown).await?;
        anyhow::Ok((burst, sustained))
    }
    .await;
    shutdown.cancel();
    pipeline.wait().await?;
    for schema in &schemas {
        sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(pool).await?;
    }
    let (burst, sustained) = runs?;

    bench("load_enrollment_requests_per_s", burst.requests_per_s, "requests/s");
    bench("load_enrollments_per_s", burst.enrolled_per_s, "subjects/s");
    bench("load_inputs_per_s", burst.report.steady.rate(), "inputs/s");
    bench("load_enrollment_e2e_p50", burst.e2e.0, "ms");
    bench("load_enrollment_e2e_p99", burst.e2e.1, "ms");
    if let Some(q) = burst.report.gateway_ack {
        bench("load_gateway_ack_p99", q.p99.as_secs_f64() * 1e3, "ms");
    }
    bench("load_sustained_enrollment_requests_per_s", sustained.requests_per_s, "requests/s");
    bench("load_sustained_enrollment_e2e_p50", sustained.e2e.0, "ms");
    bench("load_sustained_enrollment_e2e_p99", sustained.e2e.1, "ms");
    bench("load_raw_produce_to_consume_p50", raw_p50, "ms");
    bench("load_raw_produce_to_consume_p99", raw_p99, "ms");
    Ok(())
}

/// What one study's enrollment through the saga measured.
struct SagaRun {
    report: LoadReport,
    /// Enrollment requests/s achieved, first to last.
    requests_per_s: f64,
    /// Subjects over the time from the first request to the last SubjectEnrolled.
    enrolled_per_s: f64,
    /// Request → SubjectEnrolled p50 and p99, ms.
    e2e: (f64, f64),
}

/// Runs the load generator with `load` and follows its subjects to SubjectEnrolled.
async fn saga_run(
    kafka: &KafkaConfig,
    load: LoadConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<SagaRun> {
    let expected = load.subjects as usize;
    let lifecycle = load.topics.name(topics::SUBJECT_LIFECYCLE);
    let (lifecycle, reader) = watch(kafka, &lifecycle, "SubjectEnrolled", expected, SETTLE * 2).await?;
    // The middle of the saga, for the breakdown: the kit-allocation consumer's answers.
    let allocations = load.topics.name(topics::KIT_ALLOCATIONS);
    let (allocations, allocation_reader) =
        watch(kafka, &allocations, "KitAllocated", expected, SETTLE * 2).await?;
    let report = run_load(load, shutdown).await?;
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
    let requests = report.enrollment_requested.iter().map(|(_, at)| *at);
    let (Some(first_request), Some(last_request)) = (requests.clone().min(), requests.max()) else {
        bail!("no enrollment was requested");
    };
    let Some(last_enrolled) = enrolled.values().max().copied() else {
        bail!("no subject enrolled");
    };
    for (stage, arrivals) in [("randomized", &randomized), ("kit allocated", &allocated)] {
        let (p50, p99) = quantiles(since_request(arrivals));
        progress(&format!("enrollment request → {stage}: p50 {p50:.0} ms, p99 {p99:.0} ms"));
    }
    let e2e = quantiles(since_request(&enrolled));
    let requests_per_s =
        (expected.saturating_sub(1)) as f64 / last_request.duration_since(first_request).as_secs_f64();
    let enrolled_per_s = expected as f64 / last_enrolled.duration_since(first_request).as_secs_f64();
    progress(&format!(
        "{expected} enrollment requests at {requests_per_s:.0}/s: {enrolled_per_s:.0} enrolled/s, \
         request → enrolled p50 {:.0} ms, p99 {:.0} ms",
        e2e.0, e2e.1
    ));
    Ok(SagaRun { report, requests_per_s, enrolled_per_s, e2e })
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
