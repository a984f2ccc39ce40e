//! The hostile-input suite for Kafka: a plain librdkafka producer (not the project's encoder)
//! sends a corpus of broken and malicious messages to every partition of every topic any consumer
//! reads, before, during and after a valid load on the same partitions. Asserted: every consumer
//! group's committed offset reaches the end of every partition within a bound; every undecodable
//! or unidentifiable message is on the topic's dead-letter topic, once per consumer that reads the
//! topic, with a reason; a decodable message with hostile text is settled (dead-lettered, or taken
//! and refused by the domain); no valid event is dead-lettered, and every valid event is applied
//! exactly once (the load's outcome is exact).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::{enrollment, epro, monitoring, notifier};
use trialflow_outbox::SchemaName;
use trialflow_outbox::kafka::{ReadMessage, TopicReader};
use trialflow_pipeline::{Pipeline, PipelineConfig, consumer_groups};
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{AnyEvent, Registry};
use trialflow_simulation::load::{Input, LoadConfig, run_load};
use trialflow_simulation::settle::wait_settled;
use trialflow_testkit::{database_url, init_logs, kafka};
use uuid::Uuid;

const STUDY: &str = "HOSTILETEST";
const SUBJECTS: u32 = 6;
/// How long the pipeline may take to commit the end of every partition once the last message is
/// sent.
const SETTLE: Duration = Duration::from_secs(240);

/// What must become of a hostile message, for every consumer that reads its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Undecodable or unidentifiable: on the dead-letter topic, with a reason.
    DeadLetter,
    /// Decodable, with hostile text: dead-lettered, or taken (the domain refuses or ignores it).
    Settled,
    /// A valid datum without a usable `event_id` header: dead-lettered by the consumers that
    /// deduplicate on the header, taken by those that read the id from the datum (ePRO
    /// validation: patient apps write the ingestion topic without our headers; the notifier).
    NoEventIdHeader,
}

#[derive(Debug, Clone)]
struct Sent {
    topic: String,
    partition: i32,
    offset: i64,
    kind: &'static str,
    expect: Expect,
    event_id: Option<Uuid>,
}

/// One corpus entry before sending.
struct Hostile {
    kind: &'static str,
    expect: Expect,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(&'static str, Vec<u8>)>,
    event_id: Option<Uuid>,
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect()
}

/// Single-object encoded events of the schema test vectors, by event name: real datums with known
/// fingerprints, read from the file other teams' encoders are checked against.
fn vectors() -> anyhow::Result<HashMap<String, Vec<u8>>> {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/test-vectors/single-object.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file)?)?;
    let mut out = HashMap::new();
    for v in json["vectors"].as_array().into_iter().flatten() {
        if let (Some(event), Some(hex)) = (v["event"].as_str(), v["single_object_hex"].as_str()) {
            out.insert(event.to_string(), unhex(hex));
        }
    }
    anyhow::ensure!(out.len() >= 3, "test vectors missing: {file}");
    Ok(out)
}

/// `sample` re-encoded with hostile envelope text and a fresh event id, on a study of its own.
fn with_text(sample: &[u8], edit: impl Fn(&mut serde_json::Value)) -> anyhow::Result<(Vec<u8>, Uuid)> {
    let registry = Registry::builtin();
    let event = registry.decode_any(sample)?;
    let mut json = event.to_json();
    let id = Uuid::now_v7();
    json["envelope"]["event_id"] = serde_json::json!(id.to_string());
    json["envelope"]["study_id"] = serde_json::json!(STUDY.to_string() + "-HOSTILE");
    edit(&mut json);
    let event = AnyEvent::from_json(event.name(), json)?;
    Ok((registry.encode_any(&event)?, id))
}

/// The corpus for one topic, from a valid sample of a known schema.
fn corpus(sample: &[u8], n: usize) -> anyhow::Result<Vec<Hostile>> {
    let id = || Uuid::now_v7();
    let key = |k: &str| Some(format!("hostile-{n}-{k}").into_bytes());
    let dead = |kind, payload: Option<Vec<u8>>, headers: Vec<(&'static str, Vec<u8>)>, event_id| Hostile {
        kind,
        expect: Expect::DeadLetter,
        key: key(kind),
        payload,
        headers,
        event_id,
    };
    let with_id = |e: Uuid| vec![("event_id", e.to_string().into_bytes())];
    let mut out = Vec::new();
    let e = id();
    let random: Vec<u8> = (0..64u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    out.push(dead("random bytes", Some(random), with_id(e), Some(e)));
    let e = id();
    out.push(dead("empty value", Some(Vec::new()), with_id(e), Some(e)));
    let e = id();
    out.push(dead("null value", None, with_id(e), Some(e)));
    let e = id();
    out.push(dead("magic bytes only", Some(vec![0xC3, 0x01]), with_id(e), Some(e)));
    let e = id();
    let mut unknown = vec![0xC3, 0x01, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB];
    unknown.extend_from_slice(&sample[10..]);
    out.push(dead("unknown fingerprint", Some(unknown), with_id(e), Some(e)));
    let e = id();
    out.push(dead("truncated datum", Some(sample[..sample.len() / 2].to_vec()), with_id(e), Some(e)));
    let e = id();
    let mut garbage = sample[..10].to_vec();
    garbage.extend(std::iter::repeat_n(0xFF, 40));
    out.push(dead("random datum", Some(garbage), with_id(e), Some(e)));
    // A string whose bytes are an encoded surrogate (not UTF-8), the Avro lengths intact.
    let (mut surrogate, e) = with_text(sample, |j| {
        j["envelope"]["source_system"] = serde_json::json!("src\u{1}\u{1}\u{1}");
    })?;
    if let Some(at) = surrogate.windows(3).position(|w| w == [1, 1, 1]) {
        surrogate[at..at + 3].copy_from_slice(&[0xED, 0xA0, 0x80]);
    }
    out.push(dead("invalid surrogate in a string", Some(surrogate), with_id(e), Some(e)));
    let no_id = |kind, headers: Vec<(&'static str, Vec<u8>)>| -> anyhow::Result<Hostile> {
        let (valid, e) = with_text(sample, |_| {})?;
        Ok(Hostile { expect: Expect::NoEventIdHeader, ..dead(kind, Some(valid), headers, Some(e)) })
    };
    out.push(no_id("missing event_id", vec![])?);
    out.push(no_id("non-uuid event_id", vec![("event_id", b"not-a-uuid".to_vec())])?);
    out.push(no_id("NUL event_id", vec![("event_id", b"not-a-uuid\0\xff".to_vec())])?);
    let settled =
        |kind, key: Option<Vec<u8>>, payload: Vec<u8>, e: Uuid, extra: Option<(&'static str, Vec<u8>)>| {
            let mut headers = with_id(e);
            headers.extend(extra);
            Hostile { kind, expect: Expect::Settled, key, payload: Some(payload), headers, event_id: Some(e) }
        };
    let (nul, e) = with_text(sample, |j| {
        j["envelope"]["subject_id"] = serde_json::json!("SUBJ\u{0}ECT");
        j["envelope"]["source_system"] = serde_json::json!("edc\u{0}\u{7}");
    })?;
    out.push(settled("NUL and control characters in strings", key("nul"), nul, e, None));
    let (huge, e) = with_text(sample, |j| {
        j["envelope"]["subject_id"] = serde_json::json!("S".repeat(100 * 1024));
        j["envelope"]["actor"] = serde_json::json!("A".repeat(100 * 1024));
    })?;
    out.push(settled("100 KB strings", key("huge"), huge, e, None));
    let (plain, e) =
        with_text(sample, |j| j["envelope"]["subject_id"] = serde_json::json!("hostile-header"))?;
    out.push(settled(
        "header value not UTF-8",
        key("hdr"),
        plain,
        e,
        Some(("x-note", b"\xff\xfe\0".to_vec())),
    ));
    let (plain, e) = with_text(sample, |j| j["envelope"]["subject_id"] = serde_json::json!("hostile-nokey"))?;
    out.push(settled("no key", None, plain, e, None));
    Ok(out)
}

/// Whether `topic` (behind any prefix) is compacted: `cleanup.policy=compact` as the pipeline
/// creates it.
fn is_compacted(topic: &str) -> bool {
    trialflow_schemas::topics::POLICIES.iter().any(|p| p.compacted && topic.ends_with(p.topic))
}

/// Sends the corpus to every partition of every topic; returns what landed where.
async fn send_round(
    producer: &FutureProducer,
    topics: &BTreeSet<String>,
    samples: &HashMap<String, Vec<u8>>,
    partitions: i32,
    round: usize,
) -> anyhow::Result<Vec<Sent>> {
    let mut sent = Vec::new();
    for (t, topic) in topics.iter().enumerate() {
        let sample = samples.get(topic).or_else(|| samples.get("")).cloned().unwrap_or_default();
        for partition in 0..partitions {
            for h in corpus(&sample, round * 1000 + t * 10 + partition as usize)? {
                let mut headers = OwnedHeaders::new();
                for (k, v) in &h.headers {
                    headers = headers.insert(Header { key: k, value: Some(v.as_slice()) });
                }
                let mut record = FutureRecord::<[u8], [u8]>::to(topic).partition(partition).headers(headers);
                if let Some(key) = &h.key {
                    record = record.key(key.as_slice());
                }
                if let Some(payload) = &h.payload {
                    record = record.payload(payload.as_slice());
                }
                let delivery = match producer.send(record, Duration::from_secs(30)).await {
                    Ok(delivery) => delivery,
                    // The broker itself refuses a keyless record on a compacted topic (the study
                    // configuration): no consumer can ever see it.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::InvalidRecord), _))
                        if h.key.is_none() && is_compacted(topic) =>
                    {
                        continue;
                    }
                    Err((e, _)) => return Err(e.into()),
                };
                sent.push(Sent {
                    topic: topic.clone(),
                    partition: delivery.partition,
                    offset: delivery.offset,
                    kind: h.kind,
                    expect: h.expect,
                    event_id: h.event_id,
                });
            }
        }
    }
    Ok(sent)
}

async fn taken(pool: &PgPool, schema: &SchemaName, consumer: &str, id: Uuid) -> anyhow::Result<bool> {
    let sql = format!("SELECT count(*) FROM {schema}.inbox WHERE consumer = $1 AND event_id = $2");
    Ok(sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql)).bind(consumer).bind(id).fetch_one(pool).await? == 1)
}

async fn count(pool: &PgPool, sql: String) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(pool).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_on_every_consumed_topic_never_block_and_are_dead_lettered() -> anyhow::Result<()> {
    init_logs();
    let mut config = PipelineConfig::isolated("hostile", &database_url(), &kafka())?;
    config.consumer.poison_attempts = 3;
    config.consumer.max_backoff_ms = 300;
    let prefix = config.topics.prefix().to_string();
    let names = TopicNames::new(prefix.clone());
    let s = config.schemas.clone();
    let groups = consumer_groups(&config);
    let partitions = config.partitions;
    let dlq_suffix = config.consumer.dlq_suffix.clone();
    let sources = config.schemas.sources();
    // Which consumer (name, schema) reads each topic: every consumer of the registry.
    let consumers: Vec<(&str, SchemaName)> = trialflow_pipeline::services::consumers()
        .map(|(service, _)| (service.name, s[service.name].clone()))
        .collect();
    let mut readers: HashMap<String, Vec<(&str, SchemaName)>> = HashMap::new();
    for group in &groups {
        let (name, schema) = consumers
            .iter()
            .find(|(name, _)| group.group_id == format!("{prefix}{name}"))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("unknown group {}", group.group_id))?;
        for topic in &group.topics {
            readers.entry(topic.clone()).or_default().push((name, schema.clone()));
        }
    }
    let topics: BTreeSet<String> = readers.keys().cloned().collect();
    assert!(topics.len() >= 8, "every consumed topic: {topics:?}");

    // Valid datums of known schemas: the vector of the topic's own event where there is one,
    // another known event elsewhere (a known fingerprint of a type the topic does not carry).
    let vectors = vectors()?;
    let mut samples: HashMap<String, Vec<u8>> = HashMap::new();
    for bytes in vectors.values() {
        if let Ok(any) = Registry::builtin().decode_any(bytes) {
            samples.insert(names.name(any.topic()), bytes.clone());
        }
    }
    samples.insert(String::new(), vectors["VitalSignRecorded"].clone());

    let shutdown = CancellationToken::new();
    let pipeline = Pipeline::start(config, &shutdown).await?;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka().bootstrap_servers)
        .set("message.max.bytes", "2000000")
        .create()?;

    let mut sent = send_round(&producer, &topics, &samples, partitions, 1).await?;
    let epoch = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap_or_default();
    let mut load = LoadConfig::local(STUDY, epoch);
    load.subjects = SUBJECTS;
    load.sites = 2;
    load.rate = 40;
    load.duration = Duration::from_secs(2);
    load.site_api = format!("http://{}", pipeline.site_api_addr());
    load.epro_gateway = format!("http://{}", pipeline.epro_gateway_addr());
    load.kafka = kafka();
    load.topics = names.clone();
    load.progress = false;
    let (report, during) =
        tokio::join!(run_load(load, &shutdown), send_round(&producer, &topics, &samples, partitions, 2));
    let report = report?;
    sent.extend(during?);
    report.check()?;
    sent.extend(send_round(&producer, &topics, &samples, partitions, 3).await?);
    eprintln!("sent {} hostile messages to {} topics", sent.len(), topics.len());

    // 1. Nothing blocks: every group commits the end of every partition.
    let pool = PgPool::connect(&database_url()).await?;
    wait_settled(&pool, &groups, &sources, &kafka(), SETTLE, |_| {}).await?;

    // 2. Every hostile message is dead-lettered (or settled) by every consumer of its topic.
    let mut letters: HashMap<(String, String, i32, i64), ReadMessage> = HashMap::new();
    for topic in &topics {
        let dlq = format!("{topic}{dlq_suffix}");
        for m in TopicReader::new(&kafka(), &dlq, true)?
            .read_until_idle(Duration::from_secs(3), Duration::from_secs(60))
            .await?
        {
            let get = |h: &str| m.header(h).unwrap_or_default().to_string();
            let coordinates = (
                get("dlq.consumer"),
                get("dlq.original_topic"),
                get("dlq.original_partition").parse().unwrap_or(-1),
                get("dlq.original_offset").parse().unwrap_or(-1),
            );
            assert_eq!(&coordinates.1, topic, "dead letter on the wrong topic: {dlq}");
            assert!(!m.header("dlq.reason").unwrap_or_default().is_empty(), "a dead letter without a reason");
            letters.insert(coordinates, m);
        }
    }
    let mut failures = Vec::new();
    for h in &sent {
        for (consumer, schema) in &readers[&h.topic] {
            let letter =
                letters.contains_key(&(consumer.to_string(), h.topic.clone(), h.partition, h.offset));
            let ok = match h.expect {
                Expect::DeadLetter => letter,
                Expect::NoEventIdHeader if ![epro::NAME, notifier::NAME].contains(consumer) => letter,
                Expect::Settled | Expect::NoEventIdHeader => {
                    letter
                        || match h.event_id {
                            Some(id) => taken(&pool, schema, consumer, id).await?,
                            None => false,
                        }
                }
            };
            if !ok {
                failures.push(format!("{consumer}: {} at {}/{}/{}", h.kind, h.topic, h.partition, h.offset));
            }
        }
    }
    assert!(failures.is_empty(), "{} not settled:\n{}", failures.len(), failures.join("\n"));

    // 3. No valid event was dead-lettered: every dead letter is one of the hostile messages.
    let hostile: HashSet<(String, i32, i64)> =
        sent.iter().map(|h| (h.topic.clone(), h.partition, h.offset)).collect();
    let strays: Vec<_> =
        letters.keys().filter(|(_, t, p, o)| !hostile.contains(&(t.clone(), *p, *o))).collect();
    assert!(strays.is_empty(), "valid events dead-lettered: {strays:?}");

    // 4. The valid load came out exactly: every subject enrolled once, every vital sign observed
    // once, every submission judged once.
    let n = i64::from(SUBJECTS);
    let enrolled = format!(
        "SELECT count(*) FROM {}.subject WHERE study_id = '{STUDY}' AND status = 'enrolled'",
        s[enrollment::NAME]
    );
    assert_eq!(count(&pool, enrolled).await?, n, "every subject enrolled");
    let observed =
        format!("SELECT count(*) FROM {}.observation WHERE study_id = '{STUDY}'", s[monitoring::NAME]);
    assert_eq!(
        count(&pool, observed).await?,
        report.accepted(Input::VitalSign) as i64,
        "every vital sign once"
    );
    let judged = format!("SELECT count(*) FROM {}.submission WHERE study_id = '{STUDY}'", s[epro::NAME]);
    assert_eq!(
        count(&pool, judged).await?,
        report.accepted(Input::Phq9Submission) as i64,
        "every submission once"
    );

    shutdown.cancel();
    pipeline.wait().await
}
