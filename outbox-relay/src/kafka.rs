//! Topic provisioning, for local runs, tests and benchmarks. In production topics are created by
//! whoever runs the cluster (see the Helm chart and README).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::error::{OutboxError, Result};
use crate::topics::{TopicLayout, WantedTopic};

/// Creates the topics that do not exist yet (`name`, `partitions`), replication factor 1, the
/// broker's default settings.
pub async fn ensure_topics(kafka: &KafkaConfig, topics: &[(&str, i32)]) -> Result<()> {
    let wanted: Vec<WantedTopic> = topics
        .iter()
        .map(|(name, partitions)| WantedTopic {
            name: name.to_string(),
            partitions: *partitions,
            replication_factor: 1,
            configs: Default::default(),
            restricted_to: None,
        })
        .collect();
    create_missing(kafka, &wanted).await.map(|_| ())
}

/// Creates the topics of the catalogue (behind `names`' prefix) with `partitions` and their
/// dead-letter topics (`<topic><dlq_suffix>`, one partition) that do not exist yet, with their
/// retention and clean-up ([`crate::topics::wanted`]), on one broker's terms (replication factor
/// 1). For a cluster, `trialflow topics apply` lays them out.
pub async fn ensure_catalogue_topics(
    kafka: &KafkaConfig,
    names: &trialflow_schemas::topics::TopicNames,
    partitions: i32,
    dlq_suffix: &str,
) -> Result<()> {
    let layout = TopicLayout {
        names: names.clone(),
        partitions,
        replication_factor: 1,
        min_insync_replicas: 1,
        dlq_suffix: dlq_suffix.to_string(),
        state_topic: None,
    };
    create_missing(kafka, &crate::topics::wanted(&layout)).await.map(|_| ())
}

/// Creates the topics of `wanted` that do not exist yet and waits until every partition of each
/// has a leader; returns how many it created.
pub(crate) async fn create_missing(kafka: &KafkaConfig, wanted: &[WantedTopic]) -> Result<usize> {
    let admin = crate::topics::admin(kafka)?;
    let new: Vec<NewTopic<'_>> = wanted
        .iter()
        .map(|t| {
            let topic = NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(t.replication_factor));
            t.configs.iter().fold(topic, |topic, (k, v)| topic.set(k, v))
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let mut created = 0;
    for result in admin.create_topics(&new, &opts).await.map_err(OutboxError::KafkaConfig)? {
        match result {
            Ok(_) => created += 1,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(OutboxError::KafkaConfig(rdkafka::error::KafkaError::AdminOp(code)))
                    .inspect_err(|_| tracing::error!(%topic, ?code, "Cannot create topic."));
            }
        }
    }
    let wanted: Vec<(String, i32)> = wanted.iter().map(|t| (t.name.clone(), t.partitions)).collect();
    tokio::task::spawn_blocking(move || wait_for_leaders(&admin, &wanted))
        .await
        .map_err(|e| OutboxError::TopicsNotReady(format!("the wait for leaders panicked: {e}")))??;
    Ok(created)
}

/// Which kind of component [`check_connection`] checks for: a producer's check also applies
/// `KAFKA_PRODUCER_CONFIG`; a consumer's connects with `KAFKA_CONFIG`, where the connection's
/// security settings belong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    Producer,
    Consumer,
}

/// How long [`check_connection`] waits for the cluster's first answer before it lets the
/// component start anyway.
const CHECK_WINDOW: Duration = Duration::from_secs(10);

/// Connects once with the user's settings for a `kind` component and fails when the cluster
/// refuses them for good: SASL authentication failed (user, password or mechanism), the TLS
/// handshake failed (a CA that did not sign the broker's certificate, a certificate that does not
/// name the host), or the listener speaks another security protocol (a plaintext client on a TLS
/// listener). librdkafka retries such a connection for ever while every delivery and fetch waits,
/// so a command stops at start instead, with librdkafka's own reason. A cluster that is only down
/// or unreachable is no error here: the component starts and rides it out like any later outage
/// (a warning says so). Takes one metadata round trip, at most about [`CHECK_WINDOW`].
pub async fn check_connection(kafka: &KafkaConfig, kind: ClientKind) -> Result<()> {
    // A producer probes for either kind: it hands librdkafka's errors to its context with their
    // reason (a consumer returns only the code from its poll).
    let config = match kind {
        ClientKind::Producer => kafka.producer("trialflow-connection-check", |_| {}),
        ClientKind::Consumer => kafka.client("trialflow-connection-check", |_| {}),
    };
    let servers = kafka.bootstrap_servers.clone();
    let outcome = tokio::task::spawn_blocking(move || probe(&config))
        .await
        .map_err(|_| OutboxError::KafkaConfig(rdkafka::error::KafkaError::Canceled))??;
    match outcome {
        Probe::Answered => Ok(()),
        Probe::Refused(reason) => Err(OutboxError::KafkaRefused { servers, reason }),
        Probe::Unanswered(reason) => {
            tracing::warn!(
                servers,
                reason = reason.as_deref().unwrap_or("no answer"),
                "Kafka does not answer yet; starting anyway, its clients retry."
            );
            Ok(())
        }
    }
}

/// What [`check_connection`] saw.
enum Probe {
    Answered,
    /// A refusal that retrying cannot change, with librdkafka's reason.
    Refused(String),
    /// Down or unreachable (the last error, if any).
    Unanswered(Option<String>),
}

fn probe(config: &ClientConfig) -> Result<Probe> {
    use rdkafka::producer::{BaseProducer, Producer};
    let watch = ErrorWatch::default();
    let seen = watch.seen.clone();
    // librdkafka logs a closed connection (facility FAIL) at info level, and rdkafka's default
    // level follows the process's log filter, which may be stricter: asked for explicitly.
    let producer: BaseProducer<ErrorWatch> = config
        .clone()
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Info)
        .create_with_context(watch)
        .map_err(OutboxError::KafkaConfig)?;
    let started = std::time::Instant::now();
    let deadline = started + CHECK_WINDOW;
    loop {
        let answered = producer.client().fetch_metadata(None, Duration::from_millis(500)).is_ok();
        // Hands the errors librdkafka queued meanwhile to the context.
        producer.poll(Duration::ZERO);
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(refusal) = seen.refused {
            return Ok(Probe::Refused(refusal));
        }
        if answered {
            return Ok(Probe::Answered);
        }
        if seen.closed_at_hello >= MISMATCH_EVIDENCE {
            return Ok(Probe::Refused(format!(
                "the broker closes every connection at its first request (ApiVersion), as a listener \
                 that expects another security.protocol does (a plaintext client on a TLS or SASL \
                 listener); librdkafka: {}",
                seen.closed_message.unwrap_or_default()
            )));
        }
        // Connections refused (a broker down) end the check at once; connections the broker
        // accepts and then closes are watched until they say which it is.
        let refused_only = seen.all_down && seen.closed_at_hello == 0 && started.elapsed() >= DOWN_GRACE;
        if refused_only || std::time::Instant::now() >= deadline {
            return Ok(Probe::Unanswered(seen.last));
        }
    }
}

/// Connections closed by the broker at the first request before [`check_connection`] calls it a
/// protocol mismatch rather than a broker that happened to restart.
const MISMATCH_EVIDENCE: u32 = 2;

/// How long [`check_connection`] keeps watching after every broker is down, for the log line that
/// tells a closed connection from a refused one (log lines and error events arrive apart).
const DOWN_GRACE: Duration = Duration::from_secs(1);

/// The errors librdkafka reported to a probing client.
#[derive(Debug, Default, Clone)]
struct Seen {
    refused: Option<String>,
    all_down: bool,
    /// Connections the broker accepted and closed at the first request: what a TLS listener does
    /// to a plaintext client (librdkafka 2.12 reports it only as a log line, no error event).
    closed_at_hello: u32,
    closed_message: Option<String>,
    last: Option<String>,
}

#[derive(Default)]
struct ErrorWatch {
    seen: Arc<std::sync::Mutex<Seen>>,
}

impl rdkafka::ClientContext for ErrorWatch {
    /// The probe's own client logs nothing: what it saw is summed up by [`check_connection`].
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        if facility == "FAIL" {
            self.closed_at_hello(message);
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // librdkafka names a protocol mismatch only in the reason of a transport failure
        // ("might be caused by incorrect security.protocol configuration (connecting to a SSL
        // listener?)"); a plain outage is a transport failure too, without that hint.
        let mismatch = code == Some(RDKafkaErrorCode::BrokerTransportFailure)
            && (reason.contains("security.protocol") || reason.contains("broker listener?"));
        if matches!(code, Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)) || mismatch {
            seen.refused.get_or_insert_with(|| reason.to_string());
        } else if code == Some(RDKafkaErrorCode::AllBrokersDown) {
            seen.all_down = true;
        }
        seen.last = Some(reason.to_string());
    }
}

impl ErrorWatch {
    fn closed_at_hello(&self, message: &str) {
        if message.contains("Disconnected") && message.contains("APIVERSION_QUERY") {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.closed_at_hello += 1;
            seen.closed_message = Some(message.to_string());
        }
    }
}

impl rdkafka::producer::ProducerContext for ErrorWatch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// The high watermark of `topic` [`partition`]. A partition whose leader was just elected (a
/// topic just created, a broker that just failed over) answers NotLeaderForPartition for a moment
/// even once the metadata names its leader: asked again until `timeout`.
fn high_watermark(
    consumer: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<i64> {
    use rdkafka::consumer::Consumer;
    use rdkafka::error::KafkaError;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match consumer.fetch_watermarks(topic, partition, timeout) {
            Ok((_, high)) => return Ok(high),
            Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::UnknownTopicOrPartition,
            )) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(OutboxError::KafkaConfig(e)),
        }
    }
}

/// How long [`ensure_topics`] waits for the leaders of the partitions it created.
const LEADER_WAIT: Duration = Duration::from_secs(30);

/// Waits until every partition of `topics` has a leader. A broker may answer CreateTopics before
/// its controller elected them (Apache Kafka does), and a client asking in between is told
/// NotLeaderForPartition; callers of [`ensure_topics`] get topics they can use at once.
fn wait_for_leaders(admin: &AdminClient<DefaultClientContext>, topics: &[(String, i32)]) -> Result<()> {
    let deadline = std::time::Instant::now() + LEADER_WAIT;
    loop {
        let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(10));
        let waiting: Vec<&str> = match &metadata {
            Ok(metadata) => topics
                .iter()
                .filter(|(name, partitions)| {
                    !metadata.topics().iter().any(|t| {
                        t.name() == name
                            && t.error().is_none()
                            && t.partitions().len() >= usize::try_from(*partitions).unwrap_or_default()
                            && t.partitions().iter().all(|p| p.error().is_none() && p.leader() >= 0)
                    })
                })
                .map(|(name, _)| name.as_str())
                .collect(),
            Err(_) => topics.iter().map(|(name, _)| name.as_str()).collect(),
        };
        if waiting.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let why = metadata.err().map(|e| format!(" (last metadata request: {e})")).unwrap_or_default();
            return Err(OutboxError::TopicsNotReady(format!(
                "no leader for every partition of {} after {LEADER_WAIT:?}{why}",
                waiting.join(", ")
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The headers of a received message (a null value reads as empty), and how many could not be
/// read. rdkafka panics on a header name that is not UTF-8 (it unwraps the name's `CStr`), and any
/// producer can send one: each header is read on its own behind `catch_unwind`, so such a header
/// is skipped instead of taking the reading task down.
pub fn read_headers<M: rdkafka::Message>(msg: &M) -> (Vec<(String, Vec<u8>)>, usize) {
    use rdkafka::message::Headers;
    let Some(headers) = msg.headers() else { return (Vec::new(), 0) };
    let mut out = Vec::with_capacity(headers.count());
    let mut unreadable = 0;
    for i in 0..headers.count() {
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            headers.try_get(i).map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
        }));
        match read {
            Ok(Some(h)) => out.push(h),
            Ok(None) => {}
            Err(_) => unreadable += 1,
        }
    }
    (out, unreadable)
}

/// One message read back from a topic.
#[derive(Debug, Clone)]
pub struct ReadMessage {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    /// The key exactly as received (`None`: no key); `key` is its lossy text.
    pub raw_key: Option<Vec<u8>>,
    /// The headers exactly as received; `headers` is their lossy text.
    pub raw_headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp (the producer's create time), milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
}

impl ReadMessage {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Reads a topic back without a consumer group (assigned partitions, nothing committed): what the
/// demo and the tests use to check what was published.
pub struct TopicReader {
    consumer: rdkafka::consumer::BaseConsumer,
}

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicReader").finish_non_exhaustive()
    }
}

impl TopicReader {
    /// Starts at the current end of every partition of `topic`, or at the beginning when
    /// `from_beginning`. The end is each partition's high watermark when it is called: messages
    /// produced before that are not read.
    pub fn new(kafka: &KafkaConfig, topic: &str, from_beginning: bool) -> Result<Self> {
        use rdkafka::consumer::Consumer;
        use rdkafka::{Offset, TopicPartitionList};
        let consumer = Self::client(kafka)?;
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(OutboxError::KafkaConfig)?;
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        let mut assignment = TopicPartitionList::new();
        for p in partitions {
            let offset = if from_beginning {
                Offset::Beginning
            } else {
                Offset::Offset(high_watermark(&consumer, topic, p, timeout)?)
            };
            assignment.add_partition_offset(topic, p, offset).map_err(OutboxError::KafkaConfig)?;
        }
        consumer.assign(&assignment).map_err(OutboxError::KafkaConfig)?;
        Ok(Self { consumer })
    }

    /// Starts at `offset` of one partition.
    pub fn at(kafka: &KafkaConfig, topic: &str, partition: i32, offset: i64) -> Result<Self> {
        use rdkafka::consumer::Consumer;
        use rdkafka::{Offset, TopicPartitionList};
        let consumer = Self::client(kafka)?;
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(OutboxError::KafkaConfig)?;
        consumer.assign(&assignment).map_err(OutboxError::KafkaConfig)?;
        Ok(Self { consumer })
    }

    fn client(kafka: &KafkaConfig) -> Result<rdkafka::consumer::BaseConsumer> {
        kafka
            .client("trialflow-reader", |config| {
                config
                    .set("group.id", format!("trialflow-reader-{}", uuid::Uuid::new_v4()))
                    .set("enable.auto.commit", "false")
                    .set("fetch.wait.max.ms", "50");
            })
            .create()
            .map_err(OutboxError::KafkaConfig)
    }

    /// Reads until no message arrived for `idle` (or `max` passed): everything currently there.
    pub async fn read_until_idle(self, idle: Duration, max: Duration) -> Result<Vec<ReadMessage>> {
        let mut last_len = 0;
        let mut last_change = std::time::Instant::now();
        self.read_until(max, move |m| {
            if m.len() != last_len {
                last_len = m.len();
                last_change = std::time::Instant::now();
            }
            last_change.elapsed() >= idle
        })
        .await
    }

    /// Reads until `done` says so or `timeout` passes; returns what was read. Runs the blocking
    /// poll on a blocking thread.
    pub async fn read_until(
        self,
        timeout: Duration,
        mut done: impl FnMut(&[ReadMessage]) -> bool + Send + 'static,
    ) -> Result<Vec<ReadMessage>> {
        tokio::task::spawn_blocking(move || {
            use rdkafka::Message;
            let deadline = std::time::Instant::now() + timeout;
            let mut out = Vec::new();
            while !done(&out) && std::time::Instant::now() < deadline {
                let Some(result) = self.consumer.poll(Duration::from_millis(100)) else { continue };
                let msg = result.map_err(OutboxError::KafkaConfig)?;
                let (raw_headers, _) = read_headers(&msg);
                let headers = raw_headers
                    .iter()
                    .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                    .collect();
                out.push(ReadMessage {
                    partition: msg.partition(),
                    offset: msg.offset(),
                    key: String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned(),
                    raw_key: msg.key().map(<[u8]>::to_vec),
                    raw_headers,
                    payload: msg.payload().unwrap_or_default().to_vec(),
                    headers,
                    timestamp_ms: msg.timestamp().to_millis(),
                });
            }
            Ok(out)
        })
        .await
        .unwrap_or_else(|e| {
            Err(OutboxError::KafkaConfig(rdkafka::error::KafkaError::Canceled))
                .inspect_err(|_| tracing::error!(%e, "Topic reader panicked."))
        })
    }
}
