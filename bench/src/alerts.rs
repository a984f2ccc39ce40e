//! Group `alerts`: end-to-end latency from a VitalSignRecorded being produced (by an "EDC"
//! producer, straight to the clinical topic) to the researcher's webhook receiving the alert, at
//! 1,000 vitals/s: monitoring consumer → its outbox → relay → alerts topic → notifier → webhook.
//! One vital in 20 opens a new episode (a fresh subject's heart rate of 140/min); the rest are
//! normal readings. Baseline in the same run: a bare producer → bare consumer hop on the same
//! broker at the same rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trialflow_simulation::stats::nearest_rank;

use anyhow::bail;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::ConsumerConfig;
use trialflow_consumers::monitoring::{self, rules::RuleBook};
use trialflow_consumers::notifier::{self, NotifierConfig, config::parse_subscriptions};
use trialflow_outbox::{KafkaConfig, RelayConfig, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{Envelope, PartialDateTime, Timestamp, VitalSignRecorded};
use uuid::Uuid;

use crate::{bench, progress};

const PARTITIONS: i32 = 6;

fn vital(subject: &str, value: f64) -> VitalSignRecorded {
    let now = chrono::Utc::now();
    let mut envelope = Envelope::new("VitalSignRecorded", "BENCH-ALERTS", "edc", Timestamp::from(now));
    envelope.subject_id = Some(subject.to_string());
    envelope.site_id = Some("701".into());
    VitalSignRecorded {
        envelope,
        observation_id: Uuid::new_v4().to_string(),
        loinc_code: "8867-4".into(),
        value,
        unit: "/min".into(),
        position: None,
        effective: PartialDateTime::parse(&now.format("%Y-%m-%dT%H:%M:%S").to_string()),
        visit: Some("DAY 1".into()),
        visit_day: Some(1),
    }
}

/// The `p` quantile of `sorted` by nearest rank; NaN (printed as such) for no samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    nearest_rank(sorted, p).unwrap_or(f64::NAN)
}

type Received = Arc<Mutex<HashMap<String, Instant>>>;

/// A webhook receiver that notes when each subject's first alert arrived.
async fn receiver(stop: CancellationToken) -> anyhow::Result<(String, Received)> {
    let received: Received = Arc::default();
    let seen = received.clone();
    let url = trialflow_testkit::webhook::receiver(stop, move |_, body| {
        let now = Instant::now();
        if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body)
            && let Some(subject) = json["subject_id"].as_str()
        {
            seen.lock().unwrap_or_else(|e| e.into_inner()).entry(subject.to_string()).or_insert(now);
        }
    })
    .await?;
    Ok((url, received))
}

pub(crate) async fn group(
    database_url: &str,
    kafka: &KafkaConfig,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<()> {
    let run = &Uuid::new_v4().simple().to_string()[..8];
    let names = TopicNames::new(format!("bench-{run}."));
    trialflow_outbox::kafka::ensure_catalogue_topics(kafka, &names, PARTITIONS, topics::DLQ_SUFFIX).await?;
    trialflow_outbox::kafka::ensure_topics(kafka, &[(&format!("bench-{run}.raw"), PARTITIONS)]).await?;
    raw_baseline(kafka, &format!("bench-{run}.raw"), rate, seconds).await?;

    let mon = SchemaName::new(format!("bench_mon_{run}"))?;
    let ntf = SchemaName::new(format!("bench_ntf_{run}"))?;
    monitoring::migrate(database_url, &mon).await?;
    notifier::migrate(database_url, &ntf).await?;
    let stop = CancellationToken::new();
    let (url, received) = receiver(stop.clone()).await?;
    let mut relay = RelayConfig::local(vec![mon.clone(), ntf.clone()]);
    relay.database.database_url = database_url.to_string();
    relay.kafka = kafka.clone();
    let relay = tokio::spawn(trialflow_outbox::relay::run(relay, stop.clone()));
    let consumer = |group: &str| ConsumerConfig {
        database: trialflow_outbox::DatabaseConfig::new(database_url),
        kafka: kafka.clone(),
        group_id: Some(format!("bench-{group}-{run}")),
        ..ConsumerConfig::local()
    };
    let rules = RuleBook::load(None).map_err(anyhow::Error::msg)?;
    let monitor = tokio::spawn(monitoring::run(
        monitoring::spec(mon.clone(), &names),
        consumer("mon"),
        rules,
        names.clone(),
        stop.clone(),
    ));
    let subscriptions = format!(
        r#"[{{"recipient_id": "bench", "study_id": "*", "min_severity": "INFO", "channel": "webhook",
             "url": "{url}", "secret": "bench-secret"}}]"#
    );
    let config = NotifierConfig {
        subscriptions: parse_subscriptions(&subscriptions, "bench")?,
        max_attempt_timeout_ms: 5_000,
        give_up_after_secs: 600,
        max_backoff_ms: 1_000,
        poll_interval_ms: 1_000,
        breaker_failures: 5,
        breaker_open_ms: 30_000,
    };
    let notify = tokio::spawn(notifier::run(
        notifier::spec(ntf.clone(), &names),
        consumer("ntf"),
        config,
        names.clone(),
        stop.clone(),
    ));

    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(kafka, "bench-edc").create()?;
    let topic = names.name(topics::CLINICAL_OBSERVATIONS);
    let send = |subject: String, value: f64| {
        let event = vital(&subject, value);
        let payload = trialflow_schemas::encode(&event);
        let id = event.envelope.event_id.to_string();
        let (producer, topic) = (producer.clone(), topic.clone());
        async move {
            let payload = payload?;
            let headers = OwnedHeaders::new().insert(Header { key: "event_id", value: Some(id.as_str()) });
            let record = FutureRecord::to(&topic).key(&subject).payload(&payload).headers(headers);
            producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
            anyhow::Ok(())
        }
    };
    // Warm-up: both consumers joined their groups and the whole chain answered once.
    progress("warming up the chain (groups joining)");
    send("WARMUP".into(), 150.0).await?;
    let deadline = Instant::now() + Duration::from_secs(90);
    while !received.lock().unwrap_or_else(|e| e.into_inner()).contains_key("WARMUP") {
        if Instant::now() > deadline {
            bail!("no webhook for the warm-up vital within 90 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    progress(&format!("{rate} vitals/s for {seconds} s, 1 in 20 opening an episode"));
    let total = rate * seconds;
    let started = Instant::now();
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let (subject, value) =
            if i % 20 == 0 { (format!("T-{i}"), 140.0) } else { (format!("N-{}", i % 500), 70.0) };
        if value > 100.0 {
            sent_at.insert(subject.clone(), due);
        }
        tasks.spawn(send(subject, value));
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got =
            received.lock().unwrap_or_else(|e| e.into_inner()).keys().filter(|k| k.starts_with("T-")).count();
        if got >= sent_at.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = received.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut latencies: Vec<f64> = sent_at
        .iter()
        .filter_map(|(s, at)| got.get(s).map(|r| r.saturating_duration_since(*at).as_secs_f64() * 1000.0))
        .collect();
    latencies.sort_by(f64::total_cmp);
    stop.cancel();
    for task in [monitor, notify] {
        task.await??;
    }
    relay.await??;
    bench("vital_to_webhook_p50", percentile(&latencies, 0.50), "ms");
    bench("vital_to_webhook_p99", percentile(&latencies, 0.99), "ms");
    bench("vital_to_webhook_missing", (sent_at.len() - latencies.len()) as f64, "alerts");
    Ok(())
}

/// Bare producer → bare consumer latency on the same broker at the same rate (p99).
async fn raw_baseline(kafka: &KafkaConfig, topic: &str, rate: u64, seconds: u64) -> anyhow::Result<()> {
    progress("baseline: bare produce → consume latency");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", "bench-raw")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let total = (rate * seconds) as usize;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let reader = tokio::task::spawn_blocking(move || {
        use rdkafka::Message;
        let mut got: HashMap<String, Instant> = HashMap::new();
        let mut ready = Some(ready_tx);
        let deadline = Instant::now() + Duration::from_secs(seconds + 90);
        while got.len() < total + 1 && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                if key == "raw-warmup" {
                    ready.take().map(|r| r.send(()));
                }
                got.entry(key).or_insert_with(Instant::now);
            }
        }
        got
    });
    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(kafka, "bench-raw").create()?;
    let payload = trialflow_schemas::encode(&vital("RAW", 70.0))?;
    // Timed only once the consumer reads: connecting is not latency.
    let warmup = FutureRecord::to(topic).key("raw-warmup").payload(&payload);
    producer.send(warmup, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    tokio::time::timeout(Duration::from_secs(60), ready_rx).await??;
    let sent = crate::paced_produce(&producer, topic, &payload, rate as f64, total).await?;
    let got = reader.await?;
    let mut latencies: Vec<f64> = sent
        .iter()
        .filter_map(|(k, at)| got.get(k).map(|r| r.saturating_duration_since(*at).as_secs_f64() * 1000.0))
        .collect();
    latencies.sort_by(f64::total_cmp);
    bench("kafka_produce_to_consume_p99_raw", percentile(&latencies, 0.99), "ms");
    Ok(())
}
