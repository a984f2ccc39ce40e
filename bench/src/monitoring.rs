//! Group `monitoring`: the monitoring consumer judging 20,000 vital signs (6 partitions, one
//! instance, the built-in rule set) into stored readings, alert episodes and their outbox rows,
//! beside a bare consumer's read rate of the same topic.
//!
//! The readings: 1,000 subjects with 20 readings each (heart rate, systolic and diastolic blood
//! pressure, temperature, body weight — every code a built-in rule judges, the weight by the
//! subject-baseline rule), one visit per day in the subject's order; about one reading in 25 is a
//! heart rate of 140/min (every 47th and every 50th), which opens its subject's episode the first
//! time and adds evidence after (the every-50th fall on 20 subjects, 20 times each).

use std::time::{Duration, Instant};

use anyhow::bail;
use chrono::Utc;
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::ConsumerConfig;
use trialflow_consumers::monitoring::{self, rules::RuleBook};
use trialflow_outbox::{KafkaConfig, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{Envelope, PartialDateTime, Timestamp, VitalSignRecorded};
use uuid::Uuid;

use crate::{bench, progress};

const PARTITIONS: i32 = 6;
const SUBJECTS: u64 = 1000;
const STUDY: &str = "BENCH-MON";
/// LOINC code, unit, normal value.
const VITALS: [(&str, &str, f64); 5] = [
    ("8867-4", "/min", 72.0),
    ("8480-6", "mm[Hg]", 122.0),
    ("8462-4", "mm[Hg]", 78.0),
    ("8310-5", "Cel", 36.8),
    ("29463-7", "kg", 71.0),
];

/// Reading `i`: subject `i mod 1000`, its `i / 1000`-th reading, on day `i / 1000` of the study.
fn vital(i: u64) -> VitalSignRecorded {
    let n = i / SUBJECTS;
    let at = Utc::now() - chrono::Duration::days(30) + chrono::Duration::days(n as i64);
    let (code, unit, normal) = VITALS[(i % VITALS.len() as u64) as usize];
    let wobble = ((i * 7) % 5) as f64 * 0.2;
    let (code, unit, value) = if high(i) { ("8867-4", "/min", 140.0) } else { (code, unit, normal + wobble) };
    let mut envelope = Envelope::new("VitalSignRecorded", STUDY, "bench-edc", Timestamp::from(at));
    envelope.subject_id = Some(format!("S-{:05}", i % SUBJECTS));
    envelope.site_id = Some(format!("{}", 700 + i % 10));
    VitalSignRecorded {
        envelope,
        observation_id: Uuid::new_v4().to_string(),
        loinc_code: code.into(),
        value,
        unit: unit.into(),
        position: None,
        effective: PartialDateTime::parse(&at.format("%Y-%m-%dT%H:%M:%S").to_string()),
        visit: Some(format!("DAY {n}")),
        visit_day: Some(n as i32),
    }
}

fn high(i: u64) -> bool {
    i.is_multiple_of(47) || i.is_multiple_of(50)
}

async fn produce(kafka: &KafkaConfig, topic: &str, n: u64) -> anyhow::Result<()> {
    crate::produce_events(kafka, topic, "bench-monitoring", n, vital).await
}

pub(crate) async fn group(
    database_url: &str,
    kafka: &KafkaConfig,
    pool: &PgPool,
    metrics_handle: Option<&metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<()> {
    let n = 20_000;
    let run = &Uuid::new_v4().simple().to_string()[..8];
    let schema = SchemaName::new(format!("bench_mon_{run}"))?;
    let names = TopicNames::new(format!("bench-{run}."));
    let topic = names.name(topics::CLINICAL_OBSERVATIONS);
    monitoring::migrate(database_url, &schema).await?;
    let spec = monitoring::spec(schema.clone(), &names);
    let wanted: Vec<(&str, i32)> = spec.topics.iter().map(|t| (t.as_str(), PARTITIONS)).collect();
    trialflow_outbox::kafka::ensure_topics(kafka, &wanted).await?;
    progress(&format!("producing {n} vital signs to {topic}"));
    produce(kafka, &topic, n).await?;

    let started = Instant::now();
    let count = n as usize;
    let read = trialflow_outbox::kafka::TopicReader::new(kafka, &topic, true)?
        .read_until(Duration::from_secs(300), move |m| m.len() >= count)
        .await?;
    let raw = read.len() as f64 / started.elapsed().as_secs_f64();
    bench("monitoring_raw_consume_throughput", raw, "vital signs/s");

    progress("monitoring consumer judging them");
    let stop = CancellationToken::new();
    let config = ConsumerConfig {
        database: trialflow_outbox::DatabaseConfig::new(database_url),
        kafka: kafka.clone(),
        group_id: Some(format!("bench-monitoring-{run}")),
        ..ConsumerConfig::local()
    };
    let rules = RuleBook::load(None).map_err(anyhow::Error::msg)?;
    let consumer = tokio::spawn(monitoring::run(spec, config, rules, names.clone(), stop.clone()));
    let Some(handle) = metrics_handle else { bail!("the monitoring benchmark needs the metrics recorder") };
    let rate = crate::applied_rate(handle, monitoring::NAME, n).await?;
    stop.cancel();
    consumer.await??;
    let stored = format!("SELECT count(*) FROM {schema}.observation");
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(stored)).fetch_one(pool).await?;
    if rows as u64 != n {
        bail!("{rows} stored readings for {n} vital signs");
    }
    let episodes = format!("SELECT count(*) FROM {schema}.alert");
    let alerts: i64 = sqlx::query_scalar(AssertSqlSafe(episodes)).fetch_one(pool).await?;
    let expected =
        (0..n).filter(|i| high(*i)).map(|i| i % SUBJECTS).collect::<std::collections::HashSet<_>>();
    if alerts as usize != expected.len() {
        bail!("{alerts} alert episodes, expected one per subject with a high heart rate");
    }
    bench("monitoring_throughput", rate, "vital signs/s");
    bench("monitoring_vs_raw_consume", 100.0 * rate / raw, "%");
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(pool).await?;
    Ok(())
}
