//! Waiting until the pipeline has nothing left in flight: every outbox drained, every consumer
//! group caught up with the true end of its topics, and no parked message that is still moving.
//! The demo and the replay wait for this before they read the outcome ([`crate::summary`]).
//!
//! Each check reads, in this order, the outbox rows, the topics' end offsets, the groups' committed
//! offsets and the parked messages. An empty outbox before the offsets means every event written
//! before the check is on the broker and counted; one quiet check can still fall between a
//! consumer's commit and the relay picking up the events that commit wrote, so settled means two
//! quiet checks in a row.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use trialflow_outbox::{KafkaConfig, SchemaName};
use trialflow_pipeline::ConsumerGroup;

/// What was still in flight at one check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Backlog {
    /// Rows in the outboxes, i.e. events not yet acknowledged by the broker.
    pub outbox_rows: i64,
    /// Messages not yet committed by their consumer group, over every group and partition.
    pub consumer_lag: i64,
    /// Messages parked by the consumers, waiting for a dependency.
    pub parked: i64,
    /// Studies whose changed counts or subjects the risk service has not evaluated yet
    /// (`<schema>.dirty`, `<schema>.check_due`).
    pub pending_evaluations: i64,
}

/// Budget of one broker round trip (metadata, watermarks, committed offsets, reading to the end).
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// Least time between two checks: the two quiet checks that make "settled" are this far apart.
const CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// Parked messages that stay exactly as many for this long wait for something that is not coming
/// (an enrollment that never happens, say); they are retried only on their backoff schedule and
/// dead-lettered after `CONSUMER_PARK_MAX_AGE_SECS`, so they do not count as in flight.
const PARKED_QUIET: Duration = Duration::from_secs(2);
/// Lagging partitions named in a timeout error, at most.
const NAMED_PARTITIONS: usize = 12;

/// Waits until nothing is in flight: every outbox in `outboxes` is empty, every group of `groups`
/// has committed the true end of every partition of its topics (a partition with no messages and
/// no commit counts as caught up), and the parked messages in the consumer schemas among
/// `outboxes` (those with a `parked` table) are none or have not changed in number for 2 s; all
/// of it on two consecutive checks at least 250 ms apart. Returns the backlog of the last check
/// (its `parked` may be non-zero); `on_progress` sees every check. Fails after `timeout`, naming
/// what was still in flight. Reads only: it never joins a group or commits an offset.
///
/// The future owns copies of its inputs (not borrows), so it may outlive them or be spawned.
pub fn wait_settled<P: FnMut(&Backlog)>(
    pool: &PgPool,
    groups: &[ConsumerGroup],
    outboxes: &[SchemaName],
    kafka: &KafkaConfig,
    timeout: Duration,
    on_progress: P,
) -> impl Future<Output = anyhow::Result<Backlog>> + use<P> {
    let (pool, groups, outboxes, kafka) = (pool.clone(), groups.to_vec(), outboxes.to_vec(), kafka.clone());
    async move { settle(&pool, &groups, &outboxes, &kafka, timeout, on_progress).await }
}

async fn settle(
    pool: &PgPool,
    groups: &[ConsumerGroup],
    outboxes: &[SchemaName],
    kafka: &KafkaConfig,
    timeout: Duration,
    mut on_progress: impl FnMut(&Backlog),
) -> anyhow::Result<Backlog> {
    let deadline = Instant::now() + timeout;
    let consumer_schemas = with_table(pool, outboxes, "parked").await?;
    let evaluated_schemas = with_table(pool, outboxes, "dirty").await?;
    let committed = Arc::new(CommittedOffsets::new(kafka, groups)?);
    let mut parked_since: Option<(i64, Instant)> = None;
    let mut quiet_before = false;
    loop {
        let started = Instant::now();
        let check =
            check(pool, groups, outboxes, (&consumer_schemas, &evaluated_schemas), kafka, &committed).await?;
        let backlog = check.backlog;
        let parked_still = match parked_since {
            Some((count, since)) if count == backlog.parked => since.elapsed() >= PARKED_QUIET,
            _ => {
                parked_since = Some((backlog.parked, Instant::now()));
                false
            }
        };
        let quiet = backlog.outbox_rows == 0
            && backlog.consumer_lag == 0
            && backlog.pending_evaluations == 0
            && (backlog.parked == 0 || parked_still);
        on_progress(&backlog);
        if quiet && quiet_before {
            return Ok(backlog);
        }
        quiet_before = quiet;
        if Instant::now() >= deadline {
            let in_flight = check.in_flight(!parked_still);
            bail!("the pipeline did not settle within {timeout:?}; still in flight: {in_flight}");
        }
        tokio::time::sleep_until((started + CHECK_INTERVAL).max(Instant::now()).into()).await;
    }
}

/// The first offset and the end offset (the high watermark: last offset + 1) of every partition of
/// `topics`, keyed by (topic, partition). Topics that do not exist are left out. The watermarks
/// come from ListOffsets, which a partition's newly elected leader does not answer until it knows
/// its high watermark (KIP-207): a partition without an answer yet is asked again. The topics are
/// read in parallel, on blocking threads.
pub async fn true_end_offsets(
    kafka: &KafkaConfig,
    topics: &[String],
) -> anyhow::Result<HashMap<(String, i32), (i64, i64)>> {
    let kafka = kafka.clone();
    let topics: BTreeSet<String> = topics.iter().cloned().collect();
    tokio::task::spawn_blocking(move || {
        std::thread::scope(|scope| {
            let readers: Vec<_> =
                topics.iter().map(|topic| scope.spawn(|| read_topic_ends(&kafka, topic))).collect();
            let mut ends = HashMap::new();
            for (topic, reader) in topics.iter().zip(readers) {
                let partitions = reader
                    .join()
                    .map_err(|_| anyhow::anyhow!("the end-offset reader of {topic} panicked"))??;
                ends.extend(partitions.into_iter().map(|(p, range)| ((topic.clone(), p), range)));
            }
            Ok(ends)
        })
    })
    .await
    .context("the end-offset reader panicked")?
}

/// A reader's settings (`KAFKA_CONFIG`, not the group consumers' `KAFKA_CONSUMER_CONFIG`): it
/// assigns itself partitions and commits nothing.
fn client_config(kafka: &KafkaConfig, group_id: &str) -> ClientConfig {
    kafka.client("trialflow-settle", |config| {
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.wait.max.ms", "10");
    })
}

/// (first offset, end) of each partition of `topic`; empty when the topic does not exist.
fn read_topic_ends(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<BTreeMap<i32, (i64, i64)>> {
    // A group id nobody else uses; nothing is ever committed under it.
    let reader = format!("trialflow-settle-{}", uuid::Uuid::new_v4());
    let consumer: BaseConsumer =
        client_config(kafka, &reader).create().context("creating an end-offset reader")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let mut partitions = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic && t.error().is_none()) {
        for p in t.partitions() {
            partitions.add_partition(topic, p.id());
        }
    }
    if partitions.count() == 0 {
        return Ok(BTreeMap::new());
    }
    // Both watermarks of every partition in two requests: ListOffsets at the special timestamps
    // "earliest" and "latest" (librdkafka's Beginning and End).
    let watermark = |at: Offset| -> anyhow::Result<BTreeMap<i32, i64>> {
        let mut query = partitions.clone();
        query.set_all_offsets(at)?;
        let answer = consumer
            .offsets_for_times(query, KAFKA_TIMEOUT)
            .with_context(|| format!("reading the watermarks of {topic}"))?;
        answer
            .elements()
            .iter()
            .map(|e| {
                e.error().with_context(|| format!("watermark of {topic} [{}]", e.partition()))?;
                match e.offset() {
                    Offset::Offset(o) => Ok((e.partition(), o)),
                    other => bail!("watermark of {topic} [{}]: {other:?}", e.partition()),
                }
            })
            .collect()
    };
    // A partition without a leader yet (a topic just created, a leader election under way)
    // answers with an error for a moment: ask again until KAFKA_TIMEOUT.
    let deadline = Instant::now() + KAFKA_TIMEOUT;
    let both = || Ok((watermark(Offset::Beginning)?, watermark(Offset::End)?));
    let (first, reported) = loop {
        match both() {
            Ok(watermarks) => break watermarks,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %format!("{e:#}"), topic, "Watermarks not available yet; asking again.");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    };
    Ok(first
        .into_iter()
        .map(|(partition, low)| (partition, (low, reported.get(&partition).copied().unwrap_or(low).max(low))))
        .collect())
}

/// A group's committed offset per (topic, partition); `None`: nothing committed yet.
type Committed = HashMap<(String, i32), Option<i64>>;

/// One client per consumer group, kept for the whole wait, that asks the group coordinator for
/// the group's committed offsets without joining the group (it never subscribes nor commits).
struct CommittedOffsets {
    readers: Vec<(ConsumerGroup, BaseConsumer)>,
}

impl CommittedOffsets {
    fn new(kafka: &KafkaConfig, groups: &[ConsumerGroup]) -> anyhow::Result<Self> {
        let readers = groups
            .iter()
            .map(|g| {
                let consumer = client_config(kafka, &g.group_id)
                    .create()
                    .with_context(|| format!("creating the committed-offset reader of {}", g.group_id))?;
                Ok((g.clone(), consumer))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { readers })
    }

    /// For each group (in order), what it has committed on each of `partitions` of its topics
    /// (`None`: nothing committed yet). Blocking.
    fn read(&self, partitions: &[(String, i32)]) -> anyhow::Result<Vec<Committed>> {
        let mut out = Vec::with_capacity(self.readers.len());
        for (group, consumer) in &self.readers {
            let mut list = TopicPartitionList::new();
            for (topic, partition) in partitions.iter().filter(|(t, _)| group.topics.contains(t)) {
                list.add_partition(topic, *partition);
            }
            let mut offsets = HashMap::new();
            if list.count() > 0 {
                let committed = consumer
                    .committed_offsets(list, KAFKA_TIMEOUT)
                    .with_context(|| format!("reading the committed offsets of group {}", group.group_id))?;
                for e in committed.elements() {
                    e.error().with_context(|| {
                        format!(
                            "committed offset of group {} on {} [{}]",
                            group.group_id,
                            e.topic(),
                            e.partition()
                        )
                    })?;
                    let offset = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    offsets.insert((e.topic().to_string(), e.partition()), offset);
                }
            }
            out.push(offsets);
        }
        Ok(out)
    }
}

/// A partition a group has not caught up with.
#[derive(Debug, Clone)]
struct Lag {
    group_id: String,
    topic: String,
    partition: i32,
    committed: Option<i64>,
    end: i64,
}

/// One check and its details, for the error when the pipeline does not settle.
#[derive(Debug, Clone, Default)]
struct Check {
    backlog: Backlog,
    outboxes: Vec<(String, i64)>,
    lagging: Vec<Lag>,
    /// (schema, consumer, parked messages).
    parked: Vec<(String, String, i64)>,
    /// (schema, studies waiting for their KRI evaluation).
    pending: Vec<(String, i64)>,
}

impl Check {
    /// What was in flight; parked messages only when their number was still changing.
    fn in_flight(&self, parked_moving: bool) -> String {
        let mut out = Vec::new();
        let rows: Vec<String> =
            self.outboxes.iter().filter(|(_, n)| *n > 0).map(|(s, n)| format!("{s} {n}")).collect();
        if !rows.is_empty() {
            out.push(format!("outbox rows: {}", rows.join(", ")));
        }
        if !self.lagging.is_empty() {
            let mut lag = String::from("consumer lag: ");
            for (i, l) in self.lagging.iter().take(NAMED_PARTITIONS).enumerate() {
                let committed = l.committed.map_or("nothing".to_string(), |c| c.to_string());
                let sep = if i == 0 { "" } else { ", " };
                let _ = write!(
                    lag,
                    "{sep}group {} on {} [{}] committed {committed} of {}",
                    l.group_id, l.topic, l.partition, l.end
                );
            }
            if self.lagging.len() > NAMED_PARTITIONS {
                let _ = write!(lag, " and {} more partitions", self.lagging.len() - NAMED_PARTITIONS);
            }
            out.push(lag);
        }
        let pending: Vec<String> = self.pending.iter().map(|(s, n)| format!("{s} {n}")).collect();
        if !pending.is_empty() {
            out.push(format!("studies waiting for their KRI evaluation: {}", pending.join(", ")));
        }
        let parked: Vec<String> = self.parked.iter().map(|(s, c, n)| format!("{c} ({s}) {n}")).collect();
        if parked_moving && !parked.is_empty() {
            out.push(format!("parked messages still changing: {}", parked.join(", ")));
        }
        if out.is_empty() {
            "nothing at the last check, but not on two checks in a row".into()
        } else {
            out.join("; ")
        }
    }
}

/// The schemas among `schemas` that have a table `table`: `parked` for the consumers (the site
/// API has none), `dirty` for the risk service's studies waiting for an evaluation.
async fn with_table(pool: &PgPool, schemas: &[SchemaName], table: &str) -> anyhow::Result<Vec<SchemaName>> {
    let mut out = Vec::new();
    for schema in schemas {
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables
                            WHERE table_schema = $1 AND table_name = $2)",
        )
        .bind(schema.as_str())
        .bind(table)
        .fetch_one(pool)
        .await
        .with_context(|| format!("looking for {schema}.{table}"))?;
        if exists {
            out.push(schema.clone());
        }
    }
    Ok(out)
}

async fn check(
    pool: &PgPool,
    groups: &[ConsumerGroup],
    outboxes: &[SchemaName],
    (consumer_schemas, evaluated_schemas): (&[SchemaName], &[SchemaName]),
    kafka: &KafkaConfig,
    committed: &Arc<CommittedOffsets>,
) -> anyhow::Result<Check> {
    let mut check = Check::default();
    for schema in outboxes {
        let rows = trialflow_outbox::store::Store::new(schema)
            .stats(pool)
            .await
            .with_context(|| format!("counting the rows of {schema}.outbox"))?
            .rows;
        check.backlog.outbox_rows += rows;
        check.outboxes.push((schema.to_string(), rows));
    }

    let topics: Vec<String> = groups.iter().flat_map(|g| g.topics.iter().cloned()).collect();
    let mut ends: Vec<((String, i32), (i64, i64))> =
        true_end_offsets(kafka, &topics).await?.into_iter().collect();
    ends.sort();
    let partitions: Vec<(String, i32)> = ends.iter().map(|(tp, _)| tp.clone()).collect();
    let reader = Arc::clone(committed);
    let committed = tokio::task::spawn_blocking(move || reader.read(&partitions))
        .await
        .context("the committed-offset reader panicked")??;
    for (group, committed) in groups.iter().zip(committed) {
        for ((topic, partition), (low, end)) in ends.iter().filter(|((t, _), _)| group.topics.contains(t)) {
            let done = committed.get(&(topic.clone(), *partition)).copied().flatten();
            // Nothing committed: the group starts at the first offset (auto.offset.reset=earliest).
            let lag = (end - done.unwrap_or(*low).max(*low)).max(0);
            if lag > 0 {
                check.backlog.consumer_lag += lag;
                check.lagging.push(Lag {
                    group_id: group.group_id.clone(),
                    topic: topic.clone(),
                    partition: *partition,
                    committed: done,
                    end: *end,
                });
            }
        }
    }

    for schema in consumer_schemas {
        let rows = trialflow_consumers::store::parked_by_consumer(pool, schema)
            .await
            .with_context(|| format!("counting the rows of {schema}.parked"))?;
        for (consumer, n) in rows {
            check.backlog.parked += n;
            check.parked.push((schema.to_string(), consumer, n));
        }
    }
    for schema in evaluated_schemas {
        let sql = format!(
            "SELECT count(DISTINCT study_id) FROM (SELECT study_id FROM {schema}.dirty
             UNION ALL SELECT study_id FROM {schema}.check_due) marks"
        );
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(pool)
            .await
            .with_context(|| format!("counting the rows of {schema}.dirty and check_due"))?;
        check.backlog.pending_evaluations += n;
        if n > 0 {
            check.pending.push((schema.to_string(), n));
        }
    }
    Ok(check)
}
