//! The load generator against an in-process pipeline (private schemas and topics): a small run
//! enrolls every subject and every vital sign and submission it reports arrives; a second run of
//! the same study is a replay that creates nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::{enrollment, epro, monitoring};
use trialflow_outbox::KafkaConfig;
use trialflow_pipeline::{Pipeline, PipelineConfig};
use trialflow_producers::site_api;
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{QuestionnaireResponseSubmitted, VitalSignRecorded};
use trialflow_simulation::load::{EPRO_EVERY, Input, LoadConfig, run_load};
use trialflow_testkit::{database_url, init_logs, kafka, wait_until};

const WAIT: Duration = Duration::from_secs(120);
const STUDY: &str = "LOADTEST";
const SUBJECTS: u32 = 30;
const RATE: u32 = 200;
const SECONDS: u64 = 2;

async fn count(pool: &PgPool, sql: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(AssertSqlSafe(sql.to_string())).fetch_one(pool).await?)
}

/// Whether `group` has committed past every offset in `last` on `topic`.
async fn caught_up(
    kafka: KafkaConfig,
    group: String,
    topic: String,
    last: BTreeMap<i32, i64>,
) -> anyhow::Result<bool> {
    let servers = kafka.bootstrap_servers.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut partitions = TopicPartitionList::new();
        for partition in last.keys() {
            partitions.add_partition(&topic, *partition);
        }
        let committed = consumer.committed_offsets(partitions, Duration::from_secs(10))?;
        Ok(last.iter().all(|(partition, offset)| {
            committed
                .find_partition(&topic, *partition)
                .is_some_and(|p| matches!(p.offset(), Offset::Offset(o) if o > *offset))
        }))
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_enrolls_every_subject_and_a_rerun_of_its_study_creates_nothing() -> anyhow::Result<()> {
    init_logs();
    let config = PipelineConfig::isolated("load", &database_url(), &kafka())?;
    let prefix = config.topics.prefix().to_string();
    let s = config.schemas.clone();
    let shutdown = CancellationToken::new();
    let pipeline = Pipeline::start(config, &shutdown).await?;

    let epoch = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap_or_default();
    let mut load = LoadConfig::local(STUDY, epoch);
    load.subjects = SUBJECTS;
    load.sites = 3;
    load.rate = RATE;
    load.duration = Duration::from_secs(SECONDS);
    load.site_api = format!("http://{}", pipeline.site_api_addr());
    load.epro_gateway = format!("http://{}", pipeline.epro_gateway_addr());
    load.kafka = kafka();
    load.topics = TopicNames::new(prefix.clone());
    load.progress = false;

    let first = run_load(load.clone(), &shutdown).await?;
    eprintln!("{first}");
    first.check()?;
    let n = u64::from(SUBJECTS);
    for input in [Input::Screening, Input::Consent, Input::EnrollmentRequest] {
        assert_eq!((first.sent(input), first.accepted(input)), (n, n), "{input}");
    }
    assert_eq!(first.subjects_requested, n);
    assert_eq!(first.enrollment_requested.len(), SUBJECTS as usize);
    let steady = u64::from(RATE) * SECONDS;
    let (vitals, submissions) = (first.accepted(Input::VitalSign), first.accepted(Input::Phq9Submission));
    assert_eq!((vitals, submissions), (steady - steady / EPRO_EVERY, steady / EPRO_EVERY));
    assert_eq!(first.sent(Input::VitalSign) + first.sent(Input::Phq9Submission), steady);
    assert_eq!(first.replayed, 0);

    let pool = PgPool::connect(&database_url()).await?;
    let enrolled = format!(
        "SELECT count(*) FROM {}.subject WHERE study_id = '{STUDY}' AND status = 'enrolled'",
        s[enrollment::NAME]
    );
    wait_until("every subject enrolled", WAIT, || async {
        Ok(count(&pool, &enrolled).await? == i64::from(SUBJECTS))
    })
    .await?;
    let observations =
        format!("SELECT count(*) FROM {}.observation WHERE study_id = '{STUDY}'", s[monitoring::NAME]);
    let decided = format!("SELECT count(*) FROM {}.submission WHERE study_id = '{STUDY}'", s[epro::NAME]);
    wait_until("every vital sign and submission judged", WAIT, || async {
        Ok(count(&pool, &observations).await? == vitals as i64
            && count(&pool, &decided).await? == submissions as i64)
    })
    .await?;
    let accepted = format!("{decided} AND outcome = 'accepted'");
    assert_eq!(count(&pool, &accepted).await?, submissions as i64, "every PHQ-9 is valid");
    // No vital sign or PHQ-9 alert: every generated value is normal. (Supply alerts can be
    // legitimate here: an assignment may reach kit allocation before its site's shipment, which
    // travels on another topic, and the subject is held — `HOLD-NO-KIT` — until it arrives.)
    let alerts = format!(
        "SELECT count(*) FROM {}.alert WHERE study_id = '{STUDY}' AND rule_id NOT IN ('HOLD-NO-KIT', 'SITE-LOW-STOCK')",
        s[monitoring::NAME]
    );
    assert_eq!(count(&pool, &alerts).await?, 0, "every generated value is normal");

    // The same study again, its enrollment requests in a pass of their own after every screening
    // and consent: every site API command is answered from the first run, and the steady inputs
    // are the same events again.
    let second = run_load(LoadConfig { enrollment_rate: Some(RATE), ..load }, &shutdown).await?;
    eprintln!("{second}");
    second.check()?;
    assert_eq!(second.enrollment_requested.len(), SUBJECTS as usize, "every subject's request sent");
    let commands: u64 = [Input::Study, Input::Site, Input::Shipment, Input::Screening, Input::Consent]
        .into_iter()
        .chain([Input::EnrollmentRequest])
        .map(|i| second.sent(i))
        .sum();
    assert_eq!(second.replayed, commands, "every site API command was a replay");
    let screened = format!("SELECT count(*) FROM {}.subject WHERE study_id = '{STUDY}'", s[site_api::NAME]);
    assert_eq!(count(&pool, &screened).await?, i64::from(SUBJECTS), "no new subject");
    let inputs = [
        (Input::VitalSign, monitoring::NAME, TopicNames::new(prefix.clone()).of::<VitalSignRecorded>()),
        (
            Input::Phq9Submission,
            epro::NAME,
            TopicNames::new(prefix.clone()).of::<QuestionnaireResponseSubmitted>(),
        ),
    ];
    for (input, consumer, topic) in inputs {
        let last = second.last_offsets.get(&input).cloned().unwrap_or_default();
        assert!(!last.is_empty(), "{input} landed somewhere");
        let group = format!("{prefix}{consumer}");
        wait_until(&format!("{consumer} consumed the rerun"), WAIT, || {
            caught_up(kafka(), group.clone(), topic.clone(), last.clone())
        })
        .await?;
    }
    assert_eq!(count(&pool, &enrolled).await?, i64::from(SUBJECTS));
    assert_eq!(count(&pool, &observations).await?, vitals as i64, "the vital signs were duplicates");
    assert_eq!(count(&pool, &accepted).await?, submissions as i64, "the submissions were exact duplicates");
    assert_eq!(count(&pool, &decided).await?, submissions as i64);

    shutdown.cancel();
    pipeline.wait().await
}
