//! The notifier over the real stack: alert events published through a test outbox and the relay
//! onto prefixed topics, the notifier (consumer + delivery worker) in-process, and a local webhook
//! receiver that verifies every signature and can be told to fail. A researcher must hear about an
//! alert once per recipient, channel and escalation level — not three times, and not never.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit,
};
use sha2::Sha256;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::notifier::{self, AlertNotification, Channel, NotifierConfig, Secret, Subscription};
use trialflow_consumers::{ConsumerConfig, ConsumerError};
use trialflow_outbox::kafka::TopicReader;
use trialflow_outbox::{Outbox, OutboxEvent, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::*;
use trialflow_testkit::{RunningRelay, database_url, init_logs, kafka, relay_config, unique, wait_until};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---- metrics: a process-wide recorder that sums counters and keeps histogram samples by name ----

#[derive(Debug, Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        lock(&self.0).push(value);
    }
}

#[derive(Debug, Default)]
struct TestRecorder {
    counters: Mutex<HashMap<String, Arc<Count>>>,
    histograms: Mutex<HashMap<String, Arc<Samples>>>,
}

impl metrics::Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(lock(&self.counters).entry(key.name().to_string()).or_default().clone())
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(lock(&self.histograms).entry(key.name().to_string()).or_default().clone())
    }
}

static RECORDER: LazyLock<TestRecorder> = LazyLock::new(TestRecorder::default);

fn recorder() -> &'static TestRecorder {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = metrics::set_global_recorder(&*RECORDER);
    });
    &RECORDER
}

fn counter(name: &str) -> u64 {
    lock(&recorder().counters).get(name).map_or(0, |c| c.0.load(Ordering::Relaxed))
}

fn histogram_samples(name: &str) -> usize {
    lock(&recorder().histograms).get(name).map_or(0, |h| lock(&h.0).len())
}

// ---- the webhook receiver -------------------------------------------------------------------

fn secret_of(recipient: &str) -> String {
    format!("secret-of-{recipient}")
}

/// Checks the signature the way a receiver would, with nothing of the notifier's code.
fn signature_valid(secret: &str, body: &[u8], header: &str) -> bool {
    let Some(digest) = header.strip_prefix("sha256=").and_then(|h| hex::decode(h).ok()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(body);
    mac.verify_slice(&digest).is_ok()
}

#[derive(Debug, Clone)]
struct Request {
    recipient: String,
    body: String,
    signature: String,
    signature_valid: bool,
    idempotency_key: String,
    timestamp: Option<i64>,
    content_type: String,
    answered: u16,
}

impl Request {
    fn notification(&self) -> anyhow::Result<AlertNotification> {
        Ok(serde_json::from_str(&self.body)?)
    }
}

#[derive(Debug, Default)]
struct ReceiverState {
    /// 500s still to answer, per recipient, before answering 200.
    failures_left: Mutex<HashMap<String, usize>>,
    always_fail: AtomicBool,
    requests: Mutex<Vec<Request>>,
}

async fn hook(
    State(state): State<Arc<ReceiverState>>,
    Path(recipient): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let signature = header("x-trialflow-signature");
    let valid = signature_valid(&secret_of(&recipient), &body, &signature);
    let fail = state.always_fail.load(Ordering::SeqCst) || {
        let mut left = lock(&state.failures_left);
        match left.get_mut(&recipient) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    };
    let status = if !valid {
        StatusCode::UNAUTHORIZED
    } else if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    lock(&state.requests).push(Request {
        recipient,
        body: String::from_utf8_lossy(&body).into_owned(),
        signature,
        signature_valid: valid,
        idempotency_key: header("idempotency-key"),
        timestamp: header("x-trialflow-timestamp").parse().ok(),
        content_type: header("content-type"),
        answered: status.as_u16(),
    });
    status
}

struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Receiver {
    async fn start() -> anyhow::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    async fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ReceiverState::default());
        let app = Router::new().route("/hook/{recipient}", post(hook)).with_state(state.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned()).into_future(),
        );
        Ok(Self { addr, state, stop, task })
    }

    fn url(&self, recipient: &str) -> String {
        url_at(self.addr, recipient)
    }

    fn fail_first(&self, recipient: &str, times: usize) {
        lock(&self.state.failures_left).insert(recipient.to_string(), times);
    }

    fn requests(&self) -> Vec<Request> {
        lock(&self.state.requests).clone()
    }

    fn delivered(&self) -> Vec<Request> {
        self.requests().into_iter().filter(|r| r.answered == 200).collect()
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }
}

fn url_at(addr: SocketAddr, recipient: &str) -> String {
    format!("http://{addr}/hook/{recipient}")
}

fn subscription(url: String, recipient: &str, study_id: &str, min_severity: AlertSeverity) -> Subscription {
    Subscription {
        recipient_id: recipient.to_string(),
        study_id: study_id.to_string(),
        min_severity,
        channel: Channel::Webhook,
        url,
        secret: Secret::new(secret_of(recipient)),
    }
}

fn notifier_config(subscriptions: Vec<Subscription>) -> NotifierConfig {
    NotifierConfig {
        subscriptions,
        max_attempt_timeout_ms: 2_000,
        give_up_after_secs: 3_600,
        max_backoff_ms: 200,
        poll_interval_ms: 200,
        // Off, so each test sees every attempt reach its receiver; the breaker has its own test.
        breaker_failures: 0,
        breaker_open_ms: 30_000,
    }
}

// ---- the stack: prefixed topics, a source outbox for the test's alert events, the relay ------

/// One row of the delivery table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Delivery {
    alert_id: Uuid,
    recipient_id: String,
    level: i32,
    status: String,
    attempts: i32,
    last_error: Option<String>,
}

struct Stack {
    names: TopicNames,
    schema: SchemaName,
    pool: PgPool,
    outbox: Outbox,
    relay: RunningRelay,
}

struct RunningNotifier {
    stop: CancellationToken,
    handle: JoinHandle<Result<(), ConsumerError>>,
}

impl RunningNotifier {
    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.handle.await??;
        Ok(())
    }
}

impl Stack {
    async fn new() -> anyhow::Result<Self> {
        init_logs();
        recorder();
        let names = TopicNames::new(format!("{}.", unique("notifier").replace('_', "-")));
        let alerts = names.name(topics::ALERTS);
        let wanted = [
            (alerts.clone(), 2),
            (format!("{alerts}{}", topics::DLQ_SUFFIX), 1),
            (names.name(topics::NOTIFICATIONS), 2),
        ];
        let refs: Vec<(&str, i32)> = wanted.iter().map(|(t, p)| (t.as_str(), *p)).collect();
        trialflow_outbox::kafka::ensure_topics(&kafka(), &refs).await?;
        let url = database_url();
        let (source, schema) = (SchemaName::new(unique("src"))?, SchemaName::new(unique("notifier"))?);
        trialflow_outbox::migrate(&url, &source).await?;
        notifier::migrate(&url, &schema).await?;
        let pool = PgPool::connect(&url).await?;
        let outbox = Outbox::open(&pool, source.clone()).await?;
        let relay = RunningRelay::start(relay_config(&kafka(), vec![source, schema.clone()]));
        Ok(Self { names, schema, pool, outbox, relay })
    }

    fn start(&self, config: NotifierConfig) -> RunningNotifier {
        let mut consumer = ConsumerConfig::local();
        consumer.database.database_url = database_url();
        consumer.kafka = kafka();
        consumer.group_id = Some(format!("notifier-{}", self.schema));
        consumer.park_retry_ms = 200;
        consumer.max_backoff_ms = 500;
        let stop = CancellationToken::new();
        let handle = tokio::spawn(notifier::run(
            notifier::spec(self.schema.clone(), &self.names),
            consumer,
            config,
            self.names.clone(),
            stop.clone(),
        ));
        RunningNotifier { stop, handle }
    }

    async fn publish(&self, events: &[OutboxEvent]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        self.outbox.enqueue_all(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn deliveries(&self) -> anyhow::Result<Vec<Delivery>> {
        let sql = format!(
            "SELECT alert_id, recipient_id, escalation_level, status, attempts, last_error FROM {}.delivery
             ORDER BY alert_id, recipient_id, escalation_level",
            self.schema
        );
        let rows: Vec<(Uuid, String, i32, String, i32, Option<String>)> =
            sqlx::query_as(AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .map(|(alert_id, recipient_id, level, status, attempts, last_error)| Delivery {
                alert_id,
                recipient_id,
                level,
                status,
                attempts,
                last_error,
            })
            .collect())
    }

    /// Every notification event the notifier published, once its outbox is drained.
    async fn notification_events(&self) -> anyhow::Result<Vec<AnyEvent>> {
        let pending = format!("SELECT count(*) FROM {}.outbox", self.schema);
        wait_until("the notifier's outbox published", WAIT, || async {
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(pending.as_str())).fetch_one(&self.pool).await?;
            Ok(n == 0)
        })
        .await?;
        let read = TopicReader::new(&kafka(), &self.names.name(topics::NOTIFICATIONS), true)?
            .read_until_idle(Duration::from_secs(2), WAIT)
            .await?;
        read.iter().map(|m| Ok(decode_any(&m.payload)?)).collect()
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.relay.stop().await
    }
}

// ---- alert events as the monitoring consumer publishes them --------------------------------

fn raised(study_id: &str, severity: AlertSeverity) -> AlertRaised {
    let mut envelope = Envelope::new(AlertRaised::NAME, study_id, "monitoring", Timestamp::now());
    envelope.site_id = Some("101".into());
    envelope.subject_id = Some("101-004".into());
    AlertRaised {
        envelope,
        alert_id: Uuid::now_v7(),
        rule_id: "bp-grade3".into(),
        rule_version: 1,
        severity,
        source_label: "CTCAE v5.0 hypertension grade 3".into(),
        summary: "Systolic blood pressure 172 mmHg".into(),
        evidence: vec![Evidence {
            event_id: Uuid::now_v7(),
            observed_at: Timestamp::now(),
            description: "systolic blood pressure".into(),
            value: Some(172.0),
            unit: Some("mm[Hg]".into()),
        }],
    }
}

fn escalated(alert: &AlertRaised, level: i32, severity: AlertSeverity) -> AlertEscalated {
    AlertEscalated {
        envelope: Envelope::caused_by(&alert.envelope, AlertEscalated::NAME, "monitoring"),
        alert_id: alert.alert_id,
        level,
        severity,
    }
}

fn acknowledged(alert: &AlertRaised) -> AlertAcknowledged {
    AlertAcknowledged {
        envelope: Envelope::caused_by(&alert.envelope, AlertAcknowledged::NAME, "monitoring"),
        alert_id: alert.alert_id,
        reason: "PI called the subject; repeat measurement booked".into(),
    }
}

fn row<E: Event>(names: &TopicNames, event: &E, alert_id: Uuid) -> anyhow::Result<OutboxEvent> {
    Ok(OutboxEvent::avro(event, names.of::<E>(), alert_id.to_string())?)
}

fn key(alert_id: Uuid, recipient: &str, level: i32) -> String {
    format!("{alert_id}:{recipient}:webhook:{level}")
}

/// Lets anything that should not happen have the time to happen.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1_500)).await;
}

// ---- scenarios ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_alert_reaches_the_receiver_once_signed_with_its_evidence() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    let stack = Stack::new().await?;
    let delivered_before = counter("trialflow_notifications_delivered_total");
    let notifier = stack.start(notifier_config(vec![subscription(
        receiver.url("safety-desk"),
        "safety-desk",
        "*",
        AlertSeverity::High,
    )]));
    let alert = raised("CARDIO-3", AlertSeverity::High);
    let published = Instant::now();
    stack.publish(&[row(&stack.names, &alert, alert.alert_id)?]).await?;
    wait_until("the alert at the receiver", WAIT, || async { Ok(!receiver.requests().is_empty()) }).await?;
    let latency = published.elapsed();
    wait_until("the delivery recorded", WAIT, || async {
        Ok(stack.deliveries().await?.iter().any(|d| d.status == "delivered"))
    })
    .await?;
    settle().await;

    let requests = receiver.requests();
    assert_eq!(requests.len(), 1, "exactly one POST: {requests:?}");
    let r = &requests[0];
    assert!(r.signature_valid && r.signature.starts_with("sha256="), "{r:?}");
    assert_eq!(r.answered, 200);
    assert_eq!(r.recipient, "safety-desk");
    assert_eq!(r.idempotency_key, key(alert.alert_id, "safety-desk", 0));
    assert_eq!(r.content_type, "application/json");
    let sent_at = r.timestamp.ok_or_else(|| anyhow::anyhow!("no X-Trialflow-Timestamp"))?;
    assert!((chrono::Utc::now().timestamp() - sent_at).abs() < 120);
    let body = r.notification()?;
    assert_eq!(body.alert_id, alert.alert_id);
    assert_eq!(body.notification, "ALERT_RAISED");
    assert_eq!(body.escalation_level, 0);
    assert_eq!(body.severity, AlertSeverity::High);
    assert_eq!((body.study_id.as_str(), body.site_id.as_deref()), ("CARDIO-3", Some("101")));
    assert_eq!(body.subject_id.as_deref(), Some("101-004"));
    assert_eq!((body.rule_id.as_str(), body.rule_version), ("bp-grade3", 1));
    assert_eq!(body.source_label, alert.source_label);
    assert_eq!(body.summary, alert.summary);
    assert_eq!(body.evidence.len(), 1);
    assert_eq!(body.evidence[0].value, Some(172.0));
    let json: serde_json::Value = serde_json::from_str(&r.body)?;
    for blinded in ["arm", "arm_code", "treatment", "kit_number"] {
        assert!(json.get(blinded).is_none(), "{blinded} must never leave in a notification");
    }

    let events = stack.notification_events().await?;
    assert_eq!(events.len(), 1, "{events:?}");
    let AnyEvent::NotificationDelivered(n) = &events[0] else { anyhow::bail!("{:?}", events[0]) };
    assert_eq!((n.alert_id, n.recipient_id.as_str()), (alert.alert_id, "safety-desk"));
    assert_eq!((n.channel, n.escalation_level, n.attempts), (NotificationChannel::Webhook, 0, 1));
    assert_eq!(n.envelope.causation_id, Some(alert.envelope.event_id));
    assert_eq!(n.envelope.study_id, "CARDIO-3");
    assert!(counter("trialflow_notifications_delivered_total") > delivered_before);
    assert!(histogram_samples("trialflow_notification_delivery_seconds") > 0);
    eprintln!("alert published → webhook received (consumer joining its group): {latency:?}");

    notifier.stop().await?;
    receiver.stop().await?;
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_one_delivery_succeeds() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    receiver.fail_first("pi-101", 2);
    let stack = Stack::new().await?;
    let notifier = stack.start(notifier_config(vec![subscription(
        receiver.url("pi-101"),
        "pi-101",
        "CARDIO-3",
        AlertSeverity::Warning,
    )]));
    let alert = raised("CARDIO-3", AlertSeverity::Warning);
    stack.publish(&[row(&stack.names, &alert, alert.alert_id)?]).await?;
    wait_until("delivered after two 500s", WAIT, || async {
        Ok(stack.deliveries().await?.iter().any(|d| d.status == "delivered"))
    })
    .await?;
    settle().await;

    let requests = receiver.requests();
    let answers: Vec<u16> = requests.iter().map(|r| r.answered).collect();
    assert_eq!(answers, [500, 500, 200]);
    assert!(requests.iter().all(|r| r.idempotency_key == key(alert.alert_id, "pi-101", 0)));
    assert!(
        requests.iter().all(|r| r.body == requests[0].body && r.signature_valid),
        "same bytes every time"
    );
    let deliveries = stack.deliveries().await?;
    assert_eq!(deliveries.len(), 1);
    assert_eq!((deliveries[0].status.as_str(), deliveries[0].attempts), ("delivered", 3));
    let events = stack.notification_events().await?;
    assert_eq!(events.len(), 1, "{events:?}");
    let AnyEvent::NotificationDelivered(n) = &events[0] else { anyhow::bail!("{:?}", events[0]) };
    assert_eq!(n.attempts, 3);

    notifier.stop().await?;
    receiver.stop().await?;
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_or_repeated_raise_is_sent_once_and_an_escalation_once_more() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    let stack = Stack::new().await?;
    let notifier = stack.start(notifier_config(vec![subscription(
        receiver.url("safety-desk"),
        "safety-desk",
        "*",
        AlertSeverity::High,
    )]));
    let alert = raised("CARDIO-3", AlertSeverity::High);
    let same_event = row(&stack.names, &alert, alert.alert_id)?;
    // The same event twice (a relay redelivery), and the same alert raised again with a new event id.
    let mut again = alert.clone();
    again.envelope.event_id = Uuid::now_v7();
    stack.publish(std::slice::from_ref(&same_event)).await?;
    stack.publish(&[same_event, row(&stack.names, &again, alert.alert_id)?]).await?;
    wait_until("the raise delivered", WAIT, || async { Ok(!receiver.delivered().is_empty()) }).await?;
    settle().await;
    assert_eq!(receiver.requests().len(), 1, "one POST for three raise messages");

    let escalation = escalated(&alert, 1, AlertSeverity::Critical);
    let published = Instant::now();
    stack.publish(&[row(&stack.names, &escalation, alert.alert_id)?]).await?;
    wait_until("the escalation delivered", WAIT, || async { Ok(receiver.delivered().len() >= 2) }).await?;
    // Consumer already in its group: outbox → relay → broker → notifier → webhook.
    eprintln!("escalation published → webhook received: {:?}", published.elapsed());
    settle().await;

    let requests = receiver.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[1].idempotency_key, key(alert.alert_id, "safety-desk", 1));
    let page = requests[1].notification()?;
    assert_eq!((page.notification.as_str(), page.escalation_level), ("ALERT_ESCALATED", 1));
    assert_eq!(page.severity, AlertSeverity::Critical);
    assert_eq!(page.summary, alert.summary, "the escalation page repeats the alert");
    assert_eq!(page.evidence.len(), 1, "with its evidence");
    let levels: Vec<(i32, String)> =
        stack.deliveries().await?.into_iter().map(|d| (d.level, d.status)).collect();
    assert_eq!(levels, [(0, "delivered".to_string()), (1, "delivered".to_string())]);
    let events = stack.notification_events().await?;
    let mut delivered_levels: Vec<i32> = events
        .iter()
        .filter_map(|e| match e {
            AnyEvent::NotificationDelivered(n) => Some(n.escalation_level),
            _ => None,
        })
        .collect();
    delivered_levels.sort();
    assert_eq!(delivered_levels, [0, 1], "{events:?}");

    notifier.stop().await?;
    receiver.stop().await?;
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_keeps_failing_is_given_up_with_the_last_error() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    receiver.state.always_fail.store(true, Ordering::SeqCst);
    let stack = Stack::new().await?;
    let failed_before = counter("trialflow_notifications_failed_total");
    let config = NotifierConfig {
        give_up_after_secs: 2,
        max_backoff_ms: 300,
        ..notifier_config(vec![subscription(receiver.url("pi-101"), "pi-101", "*", AlertSeverity::Info)])
    };
    let notifier = stack.start(config);
    let alert = raised("CARDIO-3", AlertSeverity::Warning);
    stack.publish(&[row(&stack.names, &alert, alert.alert_id)?]).await?;
    wait_until("the delivery given up", WAIT, || async {
        Ok(stack.deliveries().await?.iter().any(|d| d.status == "failed"))
    })
    .await?;
    settle().await;

    let deliveries = stack.deliveries().await?;
    assert_eq!(deliveries.len(), 1);
    let d = &deliveries[0];
    assert!(d.attempts >= 2, "{d:?}");
    assert!(d.last_error.as_deref().is_some_and(|e| e.contains("500")), "{d:?}");
    assert_eq!(receiver.requests().len(), d.attempts as usize, "every attempt reached the receiver");
    let events = stack.notification_events().await?;
    assert_eq!(events.len(), 1, "{events:?}");
    let AnyEvent::NotificationFailed(f) = &events[0] else { anyhow::bail!("{:?}", events[0]) };
    assert_eq!((f.alert_id, f.recipient_id.as_str(), f.escalation_level), (alert.alert_id, "pi-101", 0));
    assert_eq!(f.attempts, d.attempts);
    assert!(f.last_error.contains("500") && f.last_error.contains("gave up"), "{}", f.last_error);
    assert!(counter("trialflow_notifications_failed_total") > failed_before);

    notifier.stop().await?;
    receiver.stop().await?;
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_opens_its_circuit_and_a_successful_probe_closes_it() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    receiver.state.always_fail.store(true, Ordering::SeqCst);
    let stack = Stack::new().await?;
    let config = NotifierConfig {
        max_backoff_ms: 100,
        breaker_failures: 3,
        breaker_open_ms: 3_000,
        ..notifier_config(vec![subscription(receiver.url("pi-101"), "pi-101", "*", AlertSeverity::Info)])
    };
    let notifier = stack.start(config);
    let alert = raised("CARDIO-4", AlertSeverity::Warning);
    stack.publish(&[row(&stack.names, &alert, alert.alert_id)?]).await?;
    wait_until("attempts held back by the open circuit", WAIT, || async {
        let deliveries = stack.deliveries().await?;
        Ok(deliveries.iter().any(|d| d.last_error.as_deref().is_some_and(|e| e.contains("circuit"))))
    })
    .await?;
    let requests = receiver.requests();
    assert_eq!(
        requests.len(),
        3,
        "three failures open the circuit; nothing sent while it is open: {requests:?}"
    );

    // The endpoint recovers: after the open period one probe goes out, succeeds, and delivers.
    receiver.state.always_fail.store(false, Ordering::SeqCst);
    wait_until("delivered by the probe", WAIT, || async {
        Ok(stack.deliveries().await?.iter().any(|d| d.status == "delivered"))
    })
    .await?;
    let answers: Vec<u16> = receiver.requests().iter().map(|r| r.answered).collect();
    assert_eq!(answers, [500, 500, 500, 200], "one probe after the open period");
    let d = &stack.deliveries().await?[0];
    assert!(d.attempts > 4, "attempts went on while the circuit was open: {d:?}");

    notifier.stop().await?;
    receiver.stop().await?;
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_filter_by_study_and_minimum_severity() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    let stack = Stack::new().await?;
    let notifier = stack.start(notifier_config(vec![
        subscription(receiver.url("high-desk"), "high-desk", "*", AlertSeverity::High),
        subscription(receiver.url("b-team"), "b-team", "STUDY-B", AlertSeverity::Warning),
        subscription(receiver.url("all-info"), "all-info", "*", AlertSeverity::Info),
    ]));
    let a_warning = raised("STUDY-A", AlertSeverity::Warning);
    let b_warning = raised("STUDY-B", AlertSeverity::Warning);
    let a_high = raised("STUDY-A", AlertSeverity::High);
    stack
        .publish(&[
            row(&stack.names, &a_warning, a_warning.alert_id)?,
            row(&stack.names, &b_warning, b_warning.alert_id)?,
            row(&stack.names, &a_high, a_high.alert_id)?,
        ])
        .await?;
    wait_until("five notifications", WAIT, || async { Ok(receiver.delivered().len() >= 5) }).await?;
    settle().await;

    let got: BTreeSet<(Uuid, String)> = receiver
        .requests()
        .iter()
        .map(|r| Ok((r.notification()?.alert_id, r.recipient.clone())))
        .collect::<anyhow::Result<_>>()?;
    let expected: BTreeSet<(Uuid, String)> = [
        (a_warning.alert_id, "all-info"),
        (b_warning.alert_id, "b-team"),
        (b_warning.alert_id, "all-info"),
        (a_high.alert_id, "high-desk"),
        (a_high.alert_id, "all-info"),
    ]
    .into_iter()
    .map(|(a, r)| (a, r.to_string()))
    .collect();
    assert_eq!(got, expected, "a WARNING never reaches the HIGH-only desk; STUDY-B's team only its study");
    assert_eq!(receiver.requests().len(), 5);

    notifier.stop().await?;
    receiver.stop().await?;
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_delivery_survives_a_restart_and_is_delivered_once() -> anyhow::Result<()> {
    // The receiver's address is known, but nothing listens there yet: connections are refused.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let stack = Stack::new().await?;
    let config =
        || notifier_config(vec![subscription(url_at(addr, "pi-101"), "pi-101", "*", AlertSeverity::Info)]);
    let first = stack.start(config());
    let alert = raised("CARDIO-3", AlertSeverity::High);
    stack.publish(&[row(&stack.names, &alert, alert.alert_id)?]).await?;
    wait_until("attempts failing while the receiver is down", WAIT, || async {
        Ok(stack.deliveries().await?.iter().any(|d| d.status == "pending" && d.attempts >= 2))
    })
    .await?;
    first.stop().await?;
    let before = stack.deliveries().await?;
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].status, "pending");
    assert!(before[0].last_error.is_some(), "{before:?}");

    let receiver = Receiver::start_on(addr).await?;
    let second = stack.start(config());
    wait_until("delivered by the restarted notifier", WAIT, || async {
        Ok(!receiver.delivered().is_empty())
    })
    .await?;
    wait_until("the delivery recorded", WAIT, || async {
        Ok(stack.deliveries().await?.iter().all(|d| d.status == "delivered"))
    })
    .await?;
    settle().await;
    assert_eq!(receiver.requests().len(), 1, "{:?}", receiver.requests());
    let after = stack.deliveries().await?;
    assert!(after[0].attempts > before[0].attempts);
    let events = stack.notification_events().await?;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(matches!(&events[0], AnyEvent::NotificationDelivered(n) if n.attempts == after[0].attempts));

    second.stop().await?;
    receiver.stop().await?;
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledging_cancels_pending_escalation_pages_but_never_the_raise() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    receiver.state.always_fail.store(true, Ordering::SeqCst);
    let stack = Stack::new().await?;
    let notifier = stack.start(notifier_config(vec![subscription(
        receiver.url("pi-101"),
        "pi-101",
        "*",
        AlertSeverity::Info,
    )]));
    let alert = raised("CARDIO-3", AlertSeverity::High);
    let escalation = escalated(&alert, 1, AlertSeverity::Critical);
    stack
        .publish(&[
            row(&stack.names, &alert, alert.alert_id)?,
            row(&stack.names, &escalation, alert.alert_id)?,
        ])
        .await?;
    wait_until("both pages attempted", WAIT, || async {
        let d = stack.deliveries().await?;
        Ok(d.len() == 2 && d.iter().all(|d| d.attempts >= 1))
    })
    .await?;
    stack.publish(&[row(&stack.names, &acknowledged(&alert), alert.alert_id)?]).await?;
    wait_until("the escalation page cancelled", WAIT, || async {
        Ok(stack.deliveries().await?.iter().any(|d| d.level == 1 && d.status == "cancelled"))
    })
    .await?;
    // A late escalation of the acknowledged alert pages nobody.
    let late = escalated(&alert, 2, AlertSeverity::Critical);
    stack.publish(&[row(&stack.names, &late, alert.alert_id)?]).await?;
    receiver.state.always_fail.store(false, Ordering::SeqCst);
    wait_until("the raise delivered", WAIT, || async { Ok(!receiver.delivered().is_empty()) }).await?;
    settle().await;

    let delivered: Vec<String> = receiver.delivered().into_iter().map(|r| r.idempotency_key).collect();
    assert_eq!(delivered, [key(alert.alert_id, "pi-101", 0)]);
    let states: Vec<(i32, String)> =
        stack.deliveries().await?.into_iter().map(|d| (d.level, d.status)).collect();
    assert_eq!(states, [(0, "delivered".to_string()), (1, "cancelled".to_string())]);

    notifier.stop().await?;
    receiver.stop().await?;
    stack.stop().await
}
