//! The whole pipeline on a three-broker Apache Kafka cluster (KRaft, every node broker and
//! controller) whose topics are laid out by `trialflow topics apply` with replication factor 3
//! and `min.insync.replicas=2`; every producer writes with `acks=all`. While the load generator
//! enrolls subjects and sends vital signs and ePRO submissions:
//! * one broker is killed with SIGKILL and restarted later;
//! * all three are restarted one at a time (a rolling restart, each killed with SIGKILL and back
//!   in sync before the next).
//!
//! Then the settle logic must find the true end of every partition, and: every subject enrolled
//! once, every vital sign observed once, every submission judged once (nothing lost, no effect
//! applied twice), and per subject the lifecycle events first arrive in the order the domain
//! allows (first-delivery order per key kept across leader elections).

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::{enrollment, epro, monitoring};
use trialflow_outbox::KafkaConfig;
use trialflow_outbox::kafka::TopicReader;
use trialflow_outbox::topics::{self, TopicLayout};
use trialflow_pipeline::{Pipeline, PipelineConfig, consumer_groups};
use trialflow_schemas::topics::{CLINICAL_OBSERVATIONS, EPRO_SUBMISSIONS, SUBJECT_LIFECYCLE, TopicNames};
use trialflow_simulation::load::{Input, LoadConfig, run_load};
use trialflow_simulation::settle::wait_settled;
use trialflow_testkit::{ClusterSpec, KafkaCluster, database_url, init_logs, wait_until};

const STUDY: &str = "CLUSTERTEST";
const SUBJECTS: u32 = 12;
const WAIT: Duration = Duration::from_secs(120);
const SETTLE: Duration = Duration::from_secs(240);

/// What happens to the cluster while the load runs.
#[derive(Debug, Clone, Copy)]
enum Disruption {
    /// Node 2 killed, restarted after a while.
    KillOne,
    /// Every node killed and restarted in turn, each back in sync before the next.
    Rolling,
}

/// Whether every partition of the topics behind `prefix` has all its replicas in sync.
fn fully_replicated(kafka: &KafkaConfig, prefix: &str) -> anyhow::Result<bool> {
    let admin: AdminClient<DefaultClientContext> = kafka.client("failover-test", |_| {}).create()?;
    let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(5))?;
    let topics: Vec<_> = metadata.topics().iter().filter(|t| t.name().starts_with(prefix)).collect();
    Ok(!topics.is_empty()
        && topics.iter().all(|t| t.partitions().iter().all(|p| p.isr().len() == p.replicas().len())))
}

async fn wait_replicated(kafka: &KafkaConfig, prefix: &str) -> anyhow::Result<()> {
    wait_until("every partition fully replicated", WAIT, || async {
        // A node that is coming back may not answer yet: not in sync, ask again.
        Ok(fully_replicated(kafka, prefix).unwrap_or(false))
    })
    .await
}

async fn disrupt(
    cluster: &mut KafkaCluster,
    how: Disruption,
    kafka: &KafkaConfig,
    prefix: &str,
) -> anyhow::Result<()> {
    let pause = || tokio::time::sleep(Duration::from_millis(1500));
    match how {
        Disruption::KillOne => {
            pause().await;
            cluster.kill(2)?;
            eprintln!("node 2 killed");
            pause().await;
            cluster.restart(2).await?;
            eprintln!("node 2 restarted");
        }
        Disruption::Rolling => {
            for node in cluster.node_ids() {
                wait_replicated(kafka, prefix).await?;
                cluster.kill(node)?;
                eprintln!("node {node} killed");
                pause().await;
                cluster.restart(node).await?;
                eprintln!("node {node} restarted");
            }
        }
    }
    wait_replicated(kafka, prefix).await
}

/// Rank of a lifecycle event in a subject's life (each caused by the one before: the site API
/// writes the first four, the enrollment service the last two in reaction): first deliveries must
/// not go down.
fn rank(event_type: &str) -> Option<u8> {
    Some(match event_type {
        // Screening records the eligibility assessment with it; consent comes later.
        "SubjectScreened" => 0,
        "EligibilityAssessed" => 1,
        "ConsentSigned" => 2,
        "EnrollmentRequested" => 3,
        "SubjectRandomized" => 4,
        "SubjectEnrolled" => 5,
        _ => return None,
    })
}

async fn count(pool: &PgPool, sql: String) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(pool).await?)
}

async fn scenario(how: Disruption) -> anyhow::Result<()> {
    init_logs();
    // A SIGKILLed broker is noticed when its session with the controller times out; 9 s by
    // default, as long as the ePRO gateway's default ack timeout (10 s) waits before it answers
    // 503 "retry later". Production clusters that want failovers inside that window tune the same.
    let spec = ClusterSpec::nodes(3)
        .property("broker.session.timeout.ms", "3000")
        .property("broker.heartbeat.interval.ms", "500");
    let mut cluster = KafkaCluster::start(spec).await?;
    let kafka = cluster.kafka_config();
    let mut config = PipelineConfig::isolated("cluster", &database_url(), &kafka)?;
    let prefix = config.topics.prefix().to_string();
    let names = TopicNames::new(prefix.clone());
    // Laid out as an operator would: replication factor 3, min.insync.replicas 2.
    let layout = TopicLayout {
        names: names.clone(),
        partitions: config.partitions,
        replication_factor: 3,
        min_insync_replicas: 2,
        dlq_suffix: config.consumer.dlq_suffix.clone(),
        state_topic: None,
    };
    let plan = topics::plan(&kafka, &layout).await?;
    topics::apply(&kafka, &plan).await?;
    assert!(topics::plan(&kafka, &layout).await?.changes.is_empty(), "laid out");
    wait_replicated(&kafka, &prefix).await?;
    config.consumer.max_backoff_ms = 300;
    let s = config.schemas.clone();
    let groups = consumer_groups(&config);
    let sources = config.schemas.sources();

    let shutdown = CancellationToken::new();
    let pipeline = Pipeline::start(config, &shutdown).await?;
    // Checked in a block that returns its failure (no panics): the pipeline is stopped while the
    // cluster is still up, so a failure is reported instead of hanging in a consumer's close
    // against brokers already gone.
    let checked = async {
        let epoch = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap_or_default();
        let mut load = LoadConfig::local(STUDY, epoch);
        load.subjects = SUBJECTS;
        load.sites = 2;
        load.rate = 30;
        load.duration = Duration::from_secs(match how {
            Disruption::KillOne => 6,
            Disruption::Rolling => 20,
        });
        load.site_api = format!("http://{}", pipeline.site_api_addr());
        load.epro_gateway = format!("http://{}", pipeline.epro_gateway_addr());
        load.kafka = kafka.clone();
        load.topics = names.clone();
        load.progress = false;
        let (report, disrupted) =
            tokio::join!(run_load(load, &shutdown), disrupt(&mut cluster, how, &kafka, &prefix));
        disrupted?;
        let report = report?;
        report.check()?;

        let pool = PgPool::connect(&database_url()).await?;
        wait_settled(&pool, &groups, &sources, &kafka, SETTLE, |_| {}).await?;

        // What to look at when a count below is off: dead letters and parked messages by topic.
        let mut why = format!("load: {report}\n");
        for topic in [EPRO_SUBMISSIONS, CLINICAL_OBSERVATIONS, SUBJECT_LIFECYCLE] {
            let dlq = format!("{}{}", names.name(topic), trialflow_schemas::topics::DLQ_SUFFIX);
            let letters = TopicReader::new(&kafka, &dlq, true)?
                .read_until_idle(Duration::from_secs(1), Duration::from_secs(10))
                .await
                .map(|m| m.len())
                .unwrap_or_default();
            why.push_str(&format!("{dlq}: {letters} dead letters\n"));
        }
        for schema in [&s[enrollment::NAME], &s[epro::NAME], &s[monitoring::NAME]] {
            let parked = trialflow_consumers::store::parked_by_consumer(&pool, schema).await?;
            why.push_str(&format!("{schema}: parked {parked:?}\n"));
        }

        let n = i64::from(SUBJECTS);
        let enrolled = format!(
            "SELECT count(*) FROM {}.subject WHERE study_id = '{STUDY}' AND status = 'enrolled'",
            s[enrollment::NAME]
        );
        let found = count(&pool, enrolled).await?;
        anyhow::ensure!(found == n, "every subject enrolled once: {found} of {n}\n{why}");
        let observed =
            format!("SELECT count(*) FROM {}.observation WHERE study_id = '{STUDY}'", s[monitoring::NAME]);
        let vital_signs = report.accepted(Input::VitalSign) as i64;
        anyhow::ensure!(vital_signs > 0, "the load sent vital signs");
        let found = count(&pool, observed).await?;
        anyhow::ensure!(
            found == vital_signs,
            "every vital sign observed once: {found} of {vital_signs}\n{why}"
        );
        let judged = format!("SELECT count(*) FROM {}.submission WHERE study_id = '{STUDY}'", s[epro::NAME]);
        let (found, sent) = (count(&pool, judged).await?, report.accepted(Input::Phq9Submission) as i64);
        anyhow::ensure!(found == sent, "every submission judged once: {found} of {sent}\n{why}");

        // Per subject, first deliveries of its lifecycle in the domain's order.
        let lifecycle = names.name(SUBJECT_LIFECYCLE);
        let messages = TopicReader::new(&kafka, &lifecycle, true)?
            .read_until_idle(Duration::from_secs(3), Duration::from_secs(60))
            .await?;
        let mut seen = std::collections::HashSet::new();
        let mut last: HashMap<String, u8> = HashMap::new();
        let mut out_of_order = Vec::new();
        for m in &messages {
            if !seen.insert(m.header("event_id").unwrap_or_default().to_string()) {
                continue;
            }
            let Some(rank) = rank(m.header("event_type").unwrap_or_default()) else { continue };
            let before = last.insert(m.key.clone(), rank).unwrap_or(0);
            if rank < before {
                out_of_order.push(format!("{}: {:?} after rank {before}", m.key, m.header("event_type")));
            }
        }
        anyhow::ensure!(
            last.len() as u32 == SUBJECTS,
            "every subject's lifecycle on the topic: {}",
            last.len()
        );
        anyhow::ensure!(out_of_order.is_empty(), "first deliveries out of order: {out_of_order:?}");
        Ok(())
    }
    .await;

    shutdown.cancel();
    let stopped = pipeline.wait().await;
    checked?;
    stopped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_load_loses_nothing_and_applies_nothing_twice() -> anyhow::Result<()> {
    scenario(Disruption::KillOne).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_all_three_brokers_loses_nothing_and_applies_nothing_twice() -> anyhow::Result<()>
{
    scenario(Disruption::Rolling).await
}
