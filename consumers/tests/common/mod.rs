//! The harness of the consumer tests that run the enrollment saga over the real stack: a private
//! pipeline (topics behind a prefix, schemas, relay) with enrollment and kit-allocation consumers
//! whose names are unique to the test (inbox key, metric label). A plain outbox stands in for the
//! site API. Each test binary uses part of it.
#![allow(dead_code)]

pub(crate) mod browser;
pub(crate) mod drive;

use std::time::Duration;

use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::enrollment::{self, Enrollment};
use trialflow_consumers::kit_allocation::{self, KitAllocation};
use trialflow_consumers::{ConsumerConfig, ConsumerError, ConsumerSpec};
use trialflow_outbox::kafka::TopicReader;
use trialflow_outbox::{Outbox, OutboxEvent, SchemaName};
use trialflow_schemas::topics::{DLQ_SUFFIX, TopicNames};
use trialflow_schemas::{AnyEvent, Date, Event, ReceivedKit, decode_any};
use trialflow_testkit::{RunningRelay, database_url, init_logs, kafka, relay_config, unique, wait_until};

/// How long a test waits for the pipeline to reach a state.
pub(crate) const WAIT: Duration = Duration::from_secs(180);

pub(crate) type Running = (CancellationToken, JoinHandle<Result<(), ConsumerError>>);

/// A private pipeline: its own topics, schemas, relay and consumers, whose names are unique to
/// the test (metric label and inbox key).
pub(crate) struct Trial {
    pub topics: TopicNames,
    pub enrollment: SchemaName,
    pub kits: SchemaName,
    pub pool: PgPool,
    pub outbox: Outbox,
    pub relay: Option<RunningRelay>,
    pub consumers: Vec<Running>,
}

impl Trial {
    pub(crate) async fn new(partitions: i32) -> anyhow::Result<Self> {
        init_logs();
        let topics = TopicNames::new(format!("{}.", unique("l").replace('_', "-")));
        trialflow_outbox::kafka::ensure_catalogue_topics(&kafka(), &topics, partitions, DLQ_SUFFIX).await?;
        let url = database_url();
        let source = SchemaName::new(unique("src"))?;
        let enrollment = SchemaName::new(unique("enr"))?;
        let kits = SchemaName::new(unique("kit"))?;
        trialflow_outbox::migrate(&url, &source).await?;
        enrollment::migrate(&url, &enrollment).await?;
        kit_allocation::migrate(&url, &kits).await?;
        let pool = PgPool::connect(&url).await?;
        let outbox = Outbox::open(&pool, source.clone()).await?;
        let relay = RunningRelay::start(relay_config(
            &kafka(),
            vec![source.clone(), enrollment.clone(), kits.clone()],
        ));
        Ok(Self { topics, enrollment, kits, pool, outbox, relay: Some(relay), consumers: Vec::new() })
    }

    /// The enrollment consumer's name in this test.
    pub(crate) fn enrollment_name(&self) -> String {
        format!("{}-{}", enrollment::NAME, self.enrollment)
    }

    pub(crate) fn kit_allocation_name(&self) -> String {
        format!("{}-{}", kit_allocation::NAME, self.kits)
    }

    pub(crate) fn config(&self, group: String) -> ConsumerConfig {
        let mut config = ConsumerConfig::local();
        config.database.database_url = database_url();
        config.kafka = kafka();
        config.group_id = Some(group);
        config.max_backoff_ms = 500;
        config.park_retry_ms = 200;
        config
    }

    /// Starts one more enrollment consumer instance (same group as the others).
    pub(crate) fn start_enrollment(&mut self) {
        let name = self.enrollment_name();
        let spec =
            ConsumerSpec { name: name.clone(), ..enrollment::spec(self.enrollment.clone(), &self.topics) };
        let stop = CancellationToken::new();
        let handle = tokio::spawn(trialflow_consumers::runtime::run(
            spec,
            self.config(name),
            Enrollment::new(self.enrollment.clone(), self.topics.clone()),
            stop.clone(),
        ));
        self.consumers.push((stop, handle));
    }

    /// Starts one more kit-allocation consumer instance (same group as the others).
    pub(crate) fn start_kit_allocation(&mut self) {
        let name = self.kit_allocation_name();
        let spec =
            ConsumerSpec { name: name.clone(), ..kit_allocation::spec(self.kits.clone(), &self.topics) };
        let stop = CancellationToken::new();
        let handle = tokio::spawn(trialflow_consumers::runtime::run(
            spec,
            self.config(name),
            KitAllocation::new(self.kits.clone(), self.topics.clone()),
            stop.clone(),
        ));
        self.consumers.push((stop, handle));
    }

    /// Publishes events the way a service does: one transaction through the outbox.
    pub(crate) async fn send(&self, events: Vec<OutboxEvent>) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        self.outbox.enqueue_all(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) fn event<E: Event>(&self, event: &E, key: &str) -> anyhow::Result<OutboxEvent> {
        Ok(OutboxEvent::avro(event, self.topics.of::<E>(), key)?)
    }

    pub(crate) async fn count(&self, sql: &str) -> anyhow::Result<i64> {
        let sql = sql.replace("{enr}", self.enrollment.as_str()).replace("{kit}", self.kits.as_str());
        Ok(sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&self.pool).await?)
    }

    pub(crate) async fn wait_count(&self, what: &str, sql: &str, expected: i64) -> anyhow::Result<()> {
        let waited = wait_until(what, WAIT, || async { Ok(self.count(sql).await? == expected) }).await;
        if let Err(e) = waited {
            anyhow::bail!("{e} (last count: {:?})", self.count(sql).await.ok());
        }
        Ok(())
    }

    /// Every catalogue event on `topic` (catalogue name), read from the beginning.
    pub(crate) async fn published(&self, topic: &str, expected: usize) -> anyhow::Result<Vec<AnyEvent>> {
        let reader = TopicReader::new(&kafka(), &self.topics.name(topic), true)?;
        let messages = reader.read_until(WAIT, move |m| m.len() >= expected).await?;
        Ok(messages.iter().filter_map(|m| decode_any(&m.payload).ok()).collect())
    }

    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        for (stop, _) in &self.consumers {
            stop.cancel();
        }
        for (_, handle) in self.consumers.drain(..) {
            handle.await??;
        }
        if let Some(relay) = self.relay.take() {
            relay.stop().await?;
        }
        Ok(())
    }
}

/// `per_arm` kits of each of `arms` (in that order), sequence numbers from `first_sequence`,
/// expiring in two years: the kits of a test shipment.
pub(crate) fn kits(
    site: &str,
    arms: &[&str],
    kit_type: &str,
    per_arm: i64,
    first_sequence: i64,
) -> Vec<ReceivedKit> {
    let expiry = Date::from(chrono::Utc::now().date_naive() + chrono::Days::new(730));
    let mut kits = Vec::new();
    for (a, arm) in arms.iter().enumerate() {
        for i in 0..per_arm {
            let sequence = first_sequence + a as i64 * per_arm + i;
            kits.push(ReceivedKit {
                kit_number: format!("K-{site}-{sequence:05}"),
                sequence_number: sequence,
                kit_type: kit_type.into(),
                lot: "LOT-1".into(),
                expiry_date: expiry,
                arm_code: arm.to_string(),
            });
        }
    }
    kits
}
