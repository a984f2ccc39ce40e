//! A synthetic vital-sign service: each reading is a domain row and an outbox event written in one
//! transaction. The relay's tests use it to drive the relay the way a real service does, each in a
//! schema of its own ([`crate::TestService`]). A test fixture: `trialflow migrate` does not create
//! it and no relay publishes it unless named as a source.

use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgPool};
use trialflow_outbox::{Outbox, OutboxEvent, SchemaName};
use uuid::Uuid;

pub const EVENT_TYPE: &str = "WorkloadVitalSignRecorded";
pub const CONTENT_TYPE: &str = "application/json";

/// The event published for each reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitalSignEvent {
    pub event_id: Uuid,
    pub subject_id: String,
    /// 1, 2, 3, ... per subject, in commit order: lets a reader check per-key order.
    pub subject_seq: u64,
    pub loinc: String,
    pub value: f64,
    pub unit: String,
}

/// Creates a workload schema: its outbox and its own table.
pub async fn migrate(database_url: &str, schema: &SchemaName) -> trialflow_outbox::Result<()> {
    trialflow_outbox::migrate_service(database_url, schema, sqlx::migrate!("./migrations/workload")).await
}

/// The workload service.
#[derive(Debug, Clone)]
pub struct Workload {
    pool: PgPool,
    outbox: Outbox,
    topic: String,
    insert_sql: String,
}

impl Workload {
    /// The workload living in `schema`, publishing to `topic`.
    pub async fn open(pool: PgPool, schema: SchemaName, topic: &str) -> trialflow_outbox::Result<Self> {
        let insert_sql = format!(
            "INSERT INTO {schema}.vital_sign (id, subject_id, subject_seq, loinc, value, unit)
             VALUES ($1, $2, $3, $4, $5, $6)"
        );
        let outbox = Outbox::open(&pool, schema).await?;
        Ok(Self { pool, outbox, topic: topic.to_string(), insert_sql })
    }

    /// Records one reading: the row and its event commit together or not at all.
    pub async fn record(
        &self,
        subject_id: &str,
        subject_seq: u64,
        value: f64,
    ) -> trialflow_outbox::Result<Uuid> {
        let event = VitalSignEvent {
            event_id: Uuid::now_v7(),
            subject_id: subject_id.to_string(),
            subject_seq,
            loinc: "8480-6".to_string(), // systolic blood pressure
            value,
            unit: "mm[Hg]".to_string(),
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(AssertSqlSafe(self.insert_sql.as_str()))
            .bind(event.event_id)
            .bind(&event.subject_id)
            .bind(subject_seq as i64)
            .bind(&event.loinc)
            .bind(event.value)
            .bind(&event.unit)
            .execute(&mut *tx)
            .await?;
        self.outbox.enqueue(&mut tx, outbox_event(&self.topic, &event)).await?;
        tx.commit().await?;
        Ok(event.event_id)
    }
}

/// The outbox row of a workload event.
pub fn outbox_event(topic: &str, event: &VitalSignEvent) -> OutboxEvent {
    OutboxEvent {
        topic: topic.to_string(),
        key: event.subject_id.clone(),
        event_type: EVENT_TYPE.to_string(),
        event_id: event.event_id,
        content_type: CONTENT_TYPE.to_string(),
        payload: serde_json::to_vec(event).unwrap_or_default(),
        headers: Default::default(),
    }
}

/// The subject id of the i-th synthetic subject of a run.
pub fn subject_id(run: &str, i: u64) -> String {
    format!("{run}-subject-{i:05}")
}

impl Workload {
    /// Writes `events` readings spread round-robin over `subjects` (ids prefixed with `run`), with `writers` concurrent
    /// writers. Each subject is written by one writer, so its readings commit in `subject_seq`
    /// order. `written` counts committed readings (for progress output).
    pub async fn generate(
        &self,
        run: &str,
        subjects: u64,
        events: u64,
        writers: u64,
        written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> trialflow_outbox::Result<()> {
        let subjects = subjects.max(1);
        let writers = writers.clamp(1, subjects);
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..writers {
            let this = self.clone();
            let written = written.clone();
            let run = run.to_string();
            tasks.spawn(async move {
                for j in (0..events).filter(|j| (j % subjects) % writers == w) {
                    let value = 110.0 + (j % 60) as f64;
                    this.record(&subject_id(&run, j % subjects), j / subjects + 1, value).await?;
                    written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok::<_, trialflow_outbox::OutboxError>(())
            });
        }
        while let Some(result) = tasks.join_next().await {
            // A writer that panicked fails the caller rather than leaving rows silently missing.
            result.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        }
        Ok(())
    }
}

/// Reads `topic` from the beginning until `distinct` different event ids were seen, then for
/// `linger` more (to catch a late duplicate), or until `timeout`; returns every message read.
pub async fn read_events(
    kafka: &trialflow_outbox::KafkaConfig,
    topic: &str,
    distinct: u64,
    linger: std::time::Duration,
    timeout: std::time::Duration,
) -> trialflow_outbox::Result<Vec<trialflow_outbox::kafka::ReadMessage>> {
    let mut seen = std::collections::HashSet::new();
    let mut scanned = 0;
    let mut complete_at: Option<std::time::Instant> = None;
    trialflow_outbox::kafka::TopicReader::new(kafka, topic, true)?
        .read_until(timeout, move |m| {
            for msg in &m[scanned..] {
                seen.insert(msg.header("event_id").unwrap_or_default().to_string());
            }
            scanned = m.len();
            if seen.len() as u64 >= distinct && complete_at.is_none() {
                complete_at = Some(std::time::Instant::now());
            }
            complete_at.is_some_and(|at| at.elapsed() >= linger)
        })
        .await
}

/// What a reader saw of the workload topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Messages read, duplicates included.
    pub messages: u64,
    /// Distinct event ids.
    pub distinct: u64,
    /// Messages whose event id had been seen before (allowed: at-least-once).
    pub duplicates: u64,
    /// First deliveries of a subject that did not follow the previous one (must be 0).
    pub order_violations: u64,
    /// Messages whose payload was not a workload event (must be 0).
    pub undecodable: u64,
}

/// Checks delivery: every event counted once, and per subject the first deliveries arrive as
/// 1, 2, 3, ... (`subject_seq` is assigned in commit order).
pub fn check_delivery(messages: &[trialflow_outbox::kafka::ReadMessage]) -> DeliveryReport {
    use std::collections::{HashMap, HashSet};
    let mut report = DeliveryReport { messages: messages.len() as u64, ..Default::default() };
    let mut seen = HashSet::new();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    for m in messages {
        let Ok(event) = serde_json::from_slice::<VitalSignEvent>(&m.payload) else {
            report.undecodable += 1;
            continue;
        };
        if !seen.insert(event.event_id) {
            report.duplicates += 1;
            continue;
        }
        let last = last_seq.entry(event.subject_id).or_insert(0);
        if event.subject_seq != *last + 1 {
            report.order_violations += 1;
        }
        *last = (*last).max(event.subject_seq);
    }
    report.distinct = seen.len() as u64;
    report
}
