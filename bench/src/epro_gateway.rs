//! Group `epro_gateway`: submission latency through the ePRO gateway (HTTP in, 202 after the
//! broker's acknowledgement), against a bare producer's acknowledgement latency for the same
//! encoded payloads at the same rate, measured in the same run.
//!
//! Both runs are open-loop: requests leave on a fixed timetable (`rate` per second, each in its own
//! task), whatever the previous ones are doing, and a request's latency counts from when it was
//! scheduled to leave, not from when it did. A stall then shows as the queue it builds, instead of
//! silently lowering the rate (coordinated omission).

use std::future::Future;
use std::time::Duration;
use trialflow_simulation::stats::nearest_rank;

use anyhow::{Context, bail};
use chrono::SecondsFormat;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trialflow_outbox::KafkaConfig;
use trialflow_outbox::publisher::headers;
use trialflow_producers::epro_gateway::config::DEFAULT_ACK_TIMEOUT_MS;
use trialflow_producers::epro_gateway::{self, EproGateway, EproGatewayConfig, RECEIVED_AT_HEADER};
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{
    Answer, CONTENT_TYPE, Envelope, Event, QuestionnaireResponseSubmitted, ResponseStatus, Timestamp,
};
use uuid::Uuid;

use crate::{bench, progress};

const PARTITIONS: i32 = 6;
/// Distinct subjects (keys) of the generated submissions.
const SUBJECTS: u64 = 1000;
/// Requests sent one after the other before each run (connections, metadata), not measured.
const WARM_UP: usize = 20;

pub(crate) async fn group(kafka: &KafkaConfig, rate: u64, seconds: u64) -> anyhow::Result<()> {
    if rate == 0 || seconds == 0 {
        bail!("the epro_gateway group needs a positive rate and duration (got {rate}/s for {seconds} s)");
    }
    let run = &Uuid::new_v4().simple().to_string()[..8];
    let topics = TopicNames::new(format!("bench-gw-{run}."));
    let topic = topics.of::<QuestionnaireResponseSubmitted>();
    trialflow_outbox::kafka::ensure_topics(kafka, &[(&topic, PARTITIONS)]).await?;
    let token = format!("bench-{run}");
    let config = EproGatewayConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        kafka: kafka.clone(),
        topics,
        tokens: vec![token.clone()],
        oidc: None,
        ack_timeout_ms: DEFAULT_ACK_TIMEOUT_MS,
        clock: Default::default(),
        max_future_skew_secs: trialflow_http::input::DEFAULT_MAX_FUTURE_SKEW_SECS,
        // A benchmark of the gateway, not of its limits.
        limits: trialflow_http::limits::Limits::unthrottled(),
    };
    let total = usize::try_from(rate * seconds)?;
    let submissions: Vec<QuestionnaireResponseSubmitted> =
        (0..(WARM_UP + total) as u64).map(submission).collect();

    let gateway = EproGateway::bind(config.clone()).await?;
    let url = format!("http://{}/v1/submissions", gateway.local_addr());
    let stop = CancellationToken::new();
    let server = tokio::spawn(gateway.run(stop.clone()));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let authorization = format!("Bearer {token}");
    let mut bodies = Vec::with_capacity(submissions.len());
    for s in &submissions {
        bodies.push(serde_json::to_vec(s)?);
    }
    let submit = |body: Vec<u8>| {
        let request = http
            .post(&url)
            .header("authorization", &authorization)
            .header("content-type", "application/json")
            .body(body);
        async move {
            let response = request.send().await.map_err(|e| e.to_string())?;
            if response.status() == reqwest::StatusCode::ACCEPTED {
                return Ok(());
            }
            let status = response.status();
            Err(format!("{status}: {}", response.text().await.unwrap_or_default()))
        }
    };
    let mut bodies = bodies.into_iter();
    for body in bodies.by_ref().take(WARM_UP) {
        submit(body)
            .await
            .map_err(anyhow::Error::msg)
            .context("warm-up submission (is `make up` running?)")?;
    }
    progress(&format!(
        "epro gateway: {rate} submissions/s for {seconds} s, open loop, {PARTITIONS} partitions"
    ));
    let gateway_run = open_loop(rate, bodies.collect(), submit).await?;
    stop.cancel();
    server.await??;
    gateway_run.report("epro gateway", total);
    let (p50, p99) = gateway_run.quantiles().context("no submission was accepted")?;
    bench("epro_gateway_ack_p50", p50, "ms");
    bench("epro_gateway_ack_p99", p99, "ms");
    bench("epro_gateway_errors", gateway_run.errors as f64, "requests");

    // Baseline: the gateway's own producer settings, no HTTP, no JSON, no checks.
    let mut client = epro_gateway::producer_config(&config);
    client.set("client.id", "bench-epro-raw");
    let producer: FutureProducer = client.create()?;
    let mut records = Vec::with_capacity(submissions.len());
    for s in &submissions {
        let key = s.envelope.subject_id.clone().unwrap_or_default();
        records.push((key, s.envelope.event_id.to_string(), trialflow_schemas::encode(s)?));
    }
    let produce = |(key, event_id, payload): (String, String, Vec<u8>)| {
        let (producer, topic) = (producer.clone(), topic.clone());
        async move {
            let received_at = chrono::Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
            let record_headers = OwnedHeaders::new_with_capacity(4)
                .insert(Header { key: headers::EVENT_ID, value: Some(event_id.as_str()) })
                .insert(Header {
                    key: headers::EVENT_TYPE,
                    value: Some(QuestionnaireResponseSubmitted::NAME),
                })
                .insert(Header { key: headers::CONTENT_TYPE, value: Some(CONTENT_TYPE) })
                .insert(Header { key: RECEIVED_AT_HEADER, value: Some(received_at.as_str()) });
            let record = FutureRecord::to(&topic).key(&key).payload(&payload).headers(record_headers);
            let delivery = producer.send_result(record).map_err(|(e, _)| e.to_string())?;
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e.to_string()),
                Err(_) => Err("delivery canceled".to_string()),
            }
        }
    };
    let mut records = records.into_iter();
    for record in records.by_ref().take(WARM_UP) {
        produce(record).await.map_err(anyhow::Error::msg).context("warm-up record")?;
    }
    progress(&format!("raw produce: {rate} records/s for {seconds} s, open loop"));
    let raw_run = open_loop(rate, records.collect(), produce).await?;
    raw_run.report("raw produce", total);
    let (raw_p50, raw_p99) = raw_run.quantiles().context("no record was acknowledged")?;
    progress(&format!("raw produce: ack p50 {raw_p50:.1} ms"));
    bench("kafka_produce_ack_p99_raw", raw_p99, "ms");
    Ok(())
}

/// The latencies (from the scheduled send) of the requests that succeeded, and how many failed.
#[derive(Debug)]
struct Run {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

impl Run {
    fn report(&self, what: &str, total: usize) {
        progress(&format!("{what}: {} of {total} succeeded", self.latencies.len()));
        if let Some(e) = &self.first_error {
            progress(&format!("{what}: {} failed, the first with: {e}", self.errors));
        }
    }

    /// p50 and p99 in milliseconds (nearest rank); `None` when nothing succeeded.
    fn quantiles(&self) -> Option<(f64, f64)> {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let at = |q: f64| nearest_rank(&sorted, q).map(|d| d.as_secs_f64() * 1000.0);
        Some((at(0.5)?, at(0.99)?))
    }
}

/// Sends `requests` at `rate` per second on a fixed timetable, each in its own task. `send` only
/// builds the future; the work happens in the task, so a slow request never delays the next one.
async fn open_loop<T, F, Fut>(rate: u64, requests: Vec<T>, send: F) -> anyhow::Result<Run>
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let count = requests.len();
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, request) in requests.into_iter().enumerate() {
        let scheduled = start + period.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled).await;
        let request = send(request);
        tasks.spawn(async move { request.await.map(|()| scheduled.elapsed()) });
    }
    let sent_in = start.elapsed();
    let mut run = Run { latencies: Vec::with_capacity(count), errors: 0, first_error: None };
    while let Some(outcome) = tasks.join_next().await {
        match outcome? {
            Ok(latency) => run.latencies.push(latency),
            Err(e) => {
                run.errors += 1;
                run.first_error.get_or_insert(e);
            }
        }
    }
    progress(&format!(
        "sent {count} in {:.2} s ({:.0}/s)",
        sent_in.as_secs_f64(),
        count as f64 / sent_in.as_secs_f64()
    ));
    Ok(run)
}

/// A PHQ-9-like response of subject `i % SUBJECTS`: nine scored items and a coded one.
fn submission(i: u64) -> QuestionnaireResponseSubmitted {
    let now = Timestamp::now();
    let mut envelope = Envelope::new(QuestionnaireResponseSubmitted::NAME, "BENCH01", "epro-app", now);
    envelope.site_id = Some(format!("site-{:02}", i % 20));
    envelope.subject_id = Some(format!("subject-{:05}", i % SUBJECTS));
    let item = |n: u64| Answer::integer(format!("phq9-{n}"), ((i + n) % 4) as i32);
    let mut items: Vec<Answer> = (1..=9).map(item).collect();
    items.push(Answer::text("phq9-10", "LA6568-5"));
    QuestionnaireResponseSubmitted {
        envelope,
        submission_id: Uuid::now_v7(),
        questionnaire: "http://loinc.org/44249-1".to_string(),
        questionnaire_version: "1.0".to_string(),
        scheduled_occurrence: Some("DAY-28".to_string()),
        status: ResponseStatus::Completed,
        authored_at: now,
        device_time_zone: "Europe/Berlin".to_string(),
        items,
    }
}
