//! Group `risk`: the risk service counting a mixed clinical stream (vital signs, adverse events,
//! lifecycle events of 1,000 subjects at 20 sites, 6 partitions per topic, one instance) beside a
//! bare consumer reading the same three topics; then the latency from an adverse event produced to
//! its site's updated AE-rate row, beside a bare consumer's produce-to-read latency.

use std::time::{Duration, Instant};

use anyhow::bail;
use chrono::{DateTime, Days, TimeZone, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::ConsumerConfig;
use trialflow_consumers::risk;
use trialflow_outbox::{KafkaConfig, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{
    AdverseEventReported, Envelope, Event, PartialDateTime, SubjectEnrolled, Timestamp, VitalSignRecorded,
};
use trialflow_simulation::stats::nearest_rank;
use uuid::Uuid;

use crate::{bench, progress};

const PARTITIONS: i32 = 6;
const SUBJECTS: u64 = 1000;
const SITES: u64 = 20;
const STUDY: &str = "BENCH-RISK";
/// Latency samples (one adverse event at a time).
const SAMPLES: usize = 40;

fn day(d: u64) -> DateTime<Utc> {
    let start = Utc.with_ymd_and_hms(2026, 1, 5, 12, 0, 0).single().unwrap_or_default();
    start.checked_add_days(Days::new(d)).unwrap_or(start)
}

fn envelope(event_type: &str, subject: u64, at: DateTime<Utc>) -> Envelope {
    let mut e = Envelope::new(event_type, STUDY, "bench-edc", Timestamp::from(at));
    e.subject_id = Some(format!("S-{subject:05}"));
    e.site_id = Some(format!("{}", 700 + subject % SITES));
    e
}

fn adverse_event(subject: u64, d: u64, id: &str) -> AdverseEventReported {
    AdverseEventReported {
        envelope: envelope(AdverseEventReported::NAME, subject, day(d)),
        ae_id: id.to_string(),
        term: "Headache".into(),
        meddra_code: None,
        severity: Some("MILD".into()),
        ctcae_grade: None,
        serious: id.ends_with('7'),
        seriousness_criteria: Vec::new(),
        onset: PartialDateTime::parse(&day(d).format("%Y-%m-%d").to_string()),
        sponsor_received_at: Timestamp::from(day(d)),
    }
}

/// Event `i` of the stream: the subjects' enrollments first, then 85 % vital signs and 15 %
/// adverse events, a day further every 2,000 events.
fn encoded(i: u64, names: &TopicNames) -> anyhow::Result<(String, String, Vec<u8>, String)> {
    let subject = i % SUBJECTS;
    let key = format!("S-{subject:05}");
    if i < SUBJECTS {
        let e = SubjectEnrolled {
            envelope: envelope(SubjectEnrolled::NAME, subject, day(0)),
            randomization_number: format!("R{i}"),
            kit_number: format!("K{i}"),
        };
        let id = e.envelope.event_id.to_string();
        return Ok((names.of::<SubjectEnrolled>(), key, trialflow_schemas::encode(&e)?, id));
    }
    let d = 1 + i / 2000;
    if i % 20 < 3 {
        let e = adverse_event(subject, d, &format!("AE-{i}"));
        let id = e.envelope.event_id.to_string();
        return Ok((names.of::<AdverseEventReported>(), key, trialflow_schemas::encode(&e)?, id));
    }
    let e = VitalSignRecorded {
        envelope: envelope(VitalSignRecorded::NAME, subject, day(d)),
        observation_id: format!("O-{i}"),
        loinc_code: "8867-4".into(),
        value: 60.0 + (i % 40) as f64,
        unit: "/min".into(),
        position: None,
        effective: PartialDateTime::parse(&day(d).format("%Y-%m-%dT%H:%M:%S").to_string()),
        visit: None,
        visit_day: None,
    };
    let id = e.envelope.event_id.to_string();
    Ok((names.of::<VitalSignRecorded>(), key, trialflow_schemas::encode(&e)?, id))
}

async fn produce(producer: &FutureProducer, names: &TopicNames, n: u64) -> anyhow::Result<()> {
    crate::send_all(producer, (0..n).map(|i| encoded(i, names))).await
}

fn read_topics(names: &TopicNames) -> Vec<String> {
    [topics::SUBJECT_LIFECYCLE, topics::ADVERSE_EVENTS, topics::CLINICAL_OBSERVATIONS]
        .iter()
        .map(|t| names.name(t))
        .collect()
}

/// A bare consumer of the three topics from their start (a fresh group).
fn bare_consumer(kafka: &KafkaConfig, group: &str, names: &TopicNames) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = kafka
        .consumer("bench-risk-raw", |c| {
            c.set("group.id", group).set("auto.offset.reset", "earliest").set("enable.auto.commit", "false");
        })
        .create()?;
    let topics = read_topics(names);
    consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(consumer)
}

pub(crate) async fn group(
    database_url: &str,
    kafka: &KafkaConfig,
    pool: &PgPool,
    metrics_handle: Option<&metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<()> {
    let n: u64 = 100_000;
    let run = &Uuid::new_v4().simple().to_string()[..8];
    let schema = SchemaName::new(format!("bench_risk_{run}"))?;
    let names = TopicNames::new(format!("bench-{run}."));
    risk::migrate(database_url, &schema).await?;
    let wanted: Vec<(String, i32)> = read_topics(&names)
        .into_iter()
        .chain([names.name(topics::KRI_FLAGS)])
        .map(|t| (t, PARTITIONS))
        .collect();
    let refs: Vec<(&str, i32)> = wanted.iter().map(|(t, p)| (t.as_str(), *p)).collect();
    trialflow_outbox::kafka::ensure_topics(kafka, &refs).await?;
    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(kafka, "bench-risk").create()?;
    progress(&format!("producing {n} clinical events ({SUBJECTS} subjects, {SITES} sites)"));
    produce(&producer, &names, n).await?;

    // Baseline: a bare consumer reading the same messages.
    let raw = bare_consumer(kafka, &format!("bench-risk-raw-{run}"), &names)?;
    let (mut seen, mut started) = (0u64, None);
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen < n {
        if Instant::now() > deadline {
            bail!("the bare consumer read {seen} of {n} messages in 5 minutes");
        }
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), raw.recv()).await {
            started.get_or_insert_with(Instant::now);
            seen += 1;
        }
    }
    let raw_rate = (n - 1) as f64 / started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
    bench("risk_raw_consume_throughput", raw_rate, "events/s");

    progress("risk service counting them");
    let stop = CancellationToken::new();
    let config = ConsumerConfig {
        database: trialflow_outbox::DatabaseConfig::new(database_url),
        kafka: kafka.clone(),
        group_id: Some(format!("bench-risk-{run}")),
        ..ConsumerConfig::local()
    };
    let consumer = tokio::spawn(risk::run(
        risk::spec(schema.clone(), &names),
        config,
        names.clone(),
        risk::RiskConfig::default(),
        stop.clone(),
    ));
    let Some(handle) = metrics_handle else { bail!("the risk benchmark needs the metrics recorder") };
    let rate = crate::applied_rate(handle, risk::NAME, n).await?;
    bench("risk_throughput", rate, "events/s");
    bench("risk_share_of_raw_consume", 100.0 * rate / raw_rate, "%");

    // Latency: one adverse event at a time, until its site's AE-rate row counts it.
    progress(&format!("{SAMPLES} adverse events, each until its site's score is updated"));
    let count_sql = format!(
        "SELECT coalesce(max(numerator), 0) FROM {schema}.site_kri WHERE study_id = $1 AND site_id = $2 AND kri = 'AE_RATE'"
    );
    let mut latencies = Vec::with_capacity(SAMPLES);
    for k in 0..SAMPLES {
        let subject = (k as u64 * 37) % SUBJECTS;
        let site = format!("{}", 700 + subject % SITES);
        let expected: f64 = sqlx::query_scalar(AssertSqlSafe(count_sql.clone()))
            .bind(STUDY)
            .bind(&site)
            .fetch_one(pool)
            .await?;
        let e = adverse_event(subject, 1 + n / 2000, &format!("AE-LAT-{k}"));
        let payload = trialflow_schemas::encode(&e)?;
        let id = e.envelope.event_id.to_string();
        let headers = OwnedHeaders::new().insert(Header { key: "event_id", value: Some(id.as_str()) });
        let topic = names.of::<AdverseEventReported>();
        let key = format!("S-{subject:05}");
        let sent = Instant::now();
        let record = FutureRecord::to(&topic).key(&key).payload(&payload).headers(headers);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
        loop {
            let now: f64 = sqlx::query_scalar(AssertSqlSafe(count_sql.clone()))
                .bind(STUDY)
                .bind(&site)
                .fetch_one(pool)
                .await?;
            if now > expected {
                break;
            }
            if sent.elapsed() > Duration::from_secs(30) {
                bail!("site {site}'s AE rate did not count a new adverse event within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    stop.cancel();
    consumer.await??;
    latencies.sort_by(f64::total_cmp);
    let p = |q: f64| nearest_rank(&latencies, q).unwrap_or(f64::NAN);
    bench("risk_ae_to_site_score_p50", p(0.5), "ms");
    bench("risk_ae_to_site_score_p99", p(0.99), "ms");

    // Baseline: the same produce, read by a bare consumer already at the end of the topic.
    let topic = names.of::<AdverseEventReported>();
    let tail: StreamConsumer = kafka
        .consumer("bench-risk-tail", |c| {
            c.set("group.id", format!("bench-risk-tail-{run}")).set("auto.offset.reset", "latest");
        })
        .create()?;
    tail.subscribe(&[topic.as_str()])?;
    // Joined once it has its partitions.
    let joined = Instant::now() + Duration::from_secs(30);
    while tail.assignment().map(|a| a.count()).unwrap_or(0) == 0 && Instant::now() < joined {
        let _ = tokio::time::timeout(Duration::from_millis(100), tail.recv()).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut raw_latencies = Vec::with_capacity(SAMPLES);
    for k in 0..SAMPLES {
        let key = format!("raw-{k}");
        let sent = Instant::now();
        let record = FutureRecord::to(&topic).key(&key).payload(b"raw".as_slice());
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), tail.recv()).await {
                Ok(Ok(m)) if rdkafka::Message::key(&m) == Some(key.as_bytes()) => break,
                Ok(_) => {}
                Err(_) => bail!("the bare consumer did not read {key} within 10 s"),
            }
        }
        raw_latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    raw_latencies.sort_by(f64::total_cmp);
    let p = |q: f64| nearest_rank(&raw_latencies, q).unwrap_or(f64::NAN);
    bench("risk_raw_produce_to_read_p50", p(0.5), "ms");
    bench("risk_raw_produce_to_read_p99", p(0.99), "ms");
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(pool).await?;
    Ok(())
}
