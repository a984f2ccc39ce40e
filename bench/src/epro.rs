//! Group `epro`: the validation consumer deciding 20,000 PHQ-9 submissions (6 partitions, one
//! instance; 97 % valid, 3 % invalid) into accepted/rejected outbox rows, beside a bare consumer's
//! read rate of the same topic; and the ingestion gateway's acknowledgement latency at 500
//! requests/s beside the broker's raw produce-acknowledgement latency.

use std::time::{Duration, Instant};

use anyhow::bail;
use chrono::Utc;
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::ConsumerConfig;
use trialflow_consumers::epro::{self, EproValidation, catalogue::Catalogue};
use trialflow_outbox::{KafkaConfig, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{Answer, Envelope, QuestionnaireResponseSubmitted, ResponseStatus, Timestamp};
use uuid::Uuid;

use crate::{bench, progress};

const PARTITIONS: i32 = 6;
const SUBJECTS: u64 = 1000;
const STUDY: &str = "BENCH-EPRO";
const PHQ9: [&str; 9] =
    ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8"];

fn submission(i: u64) -> QuestionnaireResponseSubmitted {
    let authored = Utc::now() - chrono::Duration::days(2);
    let mut envelope =
        Envelope::new("QuestionnaireResponseSubmitted", STUDY, "bench-app", Timestamp::from(authored));
    envelope.subject_id = Some(format!("S-{:05}", i % SUBJECTS));
    let score = |k: u64| ((i + k) % 4) as i32;
    let mut items: Vec<Answer> =
        PHQ9.iter().zip(0..).map(|(l, k)| Answer::integer(l.to_string(), score(k))).collect();
    items.push(Answer::integer("69722-7", 1));
    if i.is_multiple_of(33) {
        items[0].value_integer = Some(7); // 3 % out of range
    }
    QuestionnaireResponseSubmitted {
        envelope,
        submission_id: Uuid::new_v4(),
        questionnaire: "PHQ-9".into(),
        questionnaire_version: "1.0".into(),
        scheduled_occurrence: None,
        status: ResponseStatus::Completed,
        authored_at: Timestamp::from(authored),
        device_time_zone: "Europe/Berlin".into(),
        items,
    }
}

async fn produce(kafka: &KafkaConfig, topic: &str, n: u64) -> anyhow::Result<()> {
    crate::produce_events(kafka, topic, "bench-epro", n, submission).await
}

pub(crate) async fn group(
    database_url: &str,
    kafka: &KafkaConfig,
    pool: &PgPool,
    metrics_handle: Option<&metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<()> {
    validation(database_url, kafka, pool, 20_000, metrics_handle).await?;
    crate::epro_gateway::group(kafka, 500, 15).await
}

async fn validation(
    database_url: &str,
    kafka: &KafkaConfig,
    pool: &PgPool,
    n: u64,
    metrics_handle: Option<&metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<()> {
    let run = &Uuid::new_v4().simple().to_string()[..8];
    let schema = SchemaName::new(format!("bench_epro_{run}"))?;
    let names = TopicNames::new(format!("bench-{run}."));
    let topic = names.name(topics::EPRO_SUBMISSIONS);
    epro::migrate(database_url, &schema).await?;
    let wanted = [(topic.clone(), PARTITIONS), (names.name(topics::SUBJECT_LIFECYCLE), PARTITIONS)];
    let refs: Vec<(&str, i32)> = wanted.iter().map(|(t, p)| (t.as_str(), *p)).collect();
    trialflow_outbox::kafka::ensure_topics(kafka, &refs).await?;
    // The subjects are seeded in the consumer's own table: this measures submissions, not the
    // lifecycle events that would otherwise announce them.
    let seed = format!(
        "INSERT INTO {schema}.subject (study_id, subject_id, time_zone, enrolled_at)
         SELECT $1, 'S-' || lpad(g::text, 5, '0'), 'Europe/Berlin', now() - interval '30 days'
         FROM generate_series(0, $2 - 1) g"
    );
    sqlx::query(AssertSqlSafe(seed)).bind(STUDY).bind(SUBJECTS as i64).execute(pool).await?;
    progress(&format!("producing {n} submissions to {topic}"));
    produce(kafka, &topic, n).await?;

    let started = Instant::now();
    let count = n as usize;
    let read = trialflow_outbox::kafka::TopicReader::new(kafka, &topic, true)?
        .read_until(Duration::from_secs(300), move |m| m.len() >= count)
        .await?;
    let raw = read.len() as f64 / started.elapsed().as_secs_f64();
    bench("epro_raw_consume_throughput", raw, "submissions/s");

    progress("validation consumer deciding them");
    let stop = CancellationToken::new();
    let config = ConsumerConfig {
        database: trialflow_outbox::DatabaseConfig::new(database_url),
        kafka: kafka.clone(),
        group_id: Some(format!("bench-epro-{run}")),
        ..ConsumerConfig::local()
    };
    let handler = EproValidation::new(schema.clone(), names.clone(), Catalogue::load(None)?);
    let consumer = tokio::spawn(trialflow_consumers::runtime::run(
        epro::spec(schema.clone(), &names),
        config,
        handler,
        stop.clone(),
    ));
    let Some(handle) = metrics_handle else { bail!("the epro benchmark needs the metrics recorder") };
    let rate = crate::applied_rate(handle, epro::NAME, n).await?;
    stop.cancel();
    consumer.await??;
    let outcomes = format!("SELECT count(*) FROM {schema}.outbox");
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(outcomes)).fetch_one(pool).await?;
    if rows as u64 != n {
        bail!("{rows} outcome rows in the outbox for {n} submissions");
    }
    bench("epro_validation_throughput", rate, "submissions/s");
    bench("epro_validation_vs_raw_consume", 100.0 * rate / raw, "%");
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(pool).await?;
    Ok(())
}
