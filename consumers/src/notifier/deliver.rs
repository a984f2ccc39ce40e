//! The delivery worker: claims due deliveries, POSTs them, records the outcome.
//!
//! Woken by a NOTIFY from the delivery table's trigger (at commit of the consumer transaction
//! that created deliveries, in any process), by the next retry coming due, or by the fallback
//! poll. Several workers (processes) may run side by side: claims are `FOR UPDATE SKIP LOCKED`
//! with a lease, so a crashed worker's claim expires and another takes the delivery over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};
use trialflow_outbox::retry::{backoff_delay, sleep_or_shutdown};
use trialflow_outbox::{Outbox, OutboxEvent, SchemaName};
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{AnyEvent, Envelope, Event, NotificationDelivered, NotificationFailed};

use super::breaker::{Breakers, Refusal};
use super::config::{Channel, NotifierConfig};
use super::sign::{self, IDEMPOTENCY_KEY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use super::store::{Claimed, Deliveries};
use super::{DELIVERED_TOTAL, DELIVERY_SECONDS, FAILED_TOTAL, NAME};
use crate::error::ConsumerError;

/// Why an attempt's outcome could not be recorded (the lease expires; the delivery is retried).
#[derive(Debug, thiserror::Error)]
enum RecordError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Outbox(#[from] trialflow_outbox::OutboxError),
    #[error("encoding {event}: {source}")]
    Encode { event: &'static str, source: trialflow_schemas::CodecError },
}

/// The channel the delivery trigger notifies on (payload: the schema name).
pub const NOTIFY_CHANNEL: &str = "trialflow_notifier";

/// Most deliveries attempted at once by one worker: a slow recipient holds a slot, not the
/// worker, and memory stays bounded however many are due.
const MAX_IN_FLIGHT: usize = 32;

/// Kept on top of the attempt timeout in a claim's lease, for recording the outcome.
const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// Longest error text kept in the row and in `NotificationFailed`.
const MAX_ERROR_LEN: usize = 500;

/// What one attempt came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Delivered,
    /// 5xx, 408, 429, timeout, connection error: worth another attempt.
    Retry(String),
    /// Any other answer (or no subscription any more): another attempt would end the same way.
    Fail(String),
}

/// Classifies an HTTP answer.
fn outcome_of(status: StatusCode) -> Outcome {
    if status.is_success() {
        Outcome::Delivered
    } else if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        Outcome::Retry(format!("HTTP {status}"))
    } else {
        Outcome::Fail(format!("HTTP {status}; not retried"))
    }
}

fn truncated(mut text: String) -> String {
    if text.len() > MAX_ERROR_LEN {
        let mut end = MAX_ERROR_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[derive(Debug)]
pub(crate) struct Worker {
    pool: PgPool,
    schema: SchemaName,
    topics: TopicNames,
    config: Arc<NotifierConfig>,
    deliveries: Deliveries,
    http: reqwest::Client,
    breakers: Breakers,
}

impl Worker {
    pub(crate) fn new(
        database_url: &str,
        schema: SchemaName,
        topics: TopicNames,
        config: Arc<NotifierConfig>,
    ) -> Result<Self, ConsumerError> {
        let pool = PgPoolOptions::new()
            .max_connections(6)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(trialflow_outbox::DatabaseConfig::connect_options_for(database_url)?);
        // Redirects are not followed: a signed POST is meant for the configured URL only.
        let http = reqwest::Client::builder()
            .timeout(config.attempt_timeout())
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("trialflow-notifier/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                ConsumerError::Database(sqlx::Error::Configuration(
                    format!("webhook HTTP client: {e}").into(),
                ))
            })?;
        let breakers = Breakers::new(config.breaker_failures, Duration::from_millis(config.breaker_open_ms));
        Ok(Self { deliveries: Deliveries::new(&schema), pool, schema, topics, config, http, breakers })
    }

    /// Runs until `shutdown`, then lets in-flight attempts finish (each is bounded by the attempt
    /// timeout) and returns.
    pub(crate) async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let outbox = Outbox::open(&self.pool, self.schema.clone()).await?;
        let worker = Arc::new(Attempts { worker: self, outbox });
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(
            worker.worker.pool.clone(),
            worker.worker.schema.clone(),
            wake.clone(),
            shutdown.clone(),
        ));
        let lease = worker.worker.config.attempt_timeout() + LEASE_MARGIN;
        let poll = worker.worker.config.poll_interval();
        let mut in_flight: JoinSet<()> = JoinSet::new();
        let mut failures = 0u32;
        info!(schema = %worker.worker.schema, "Notification delivery worker started.");
        while !shutdown.is_cancelled() {
            let free = MAX_IN_FLIGHT.saturating_sub(in_flight.len());
            let mut wait = poll;
            if free > 0 {
                match worker.worker.deliveries.claim(&worker.worker.pool, free, lease).await {
                    Ok(claimed) => {
                        failures = 0;
                        let full = claimed.len() == free;
                        let claimed_any = !claimed.is_empty();
                        for d in claimed {
                            in_flight.spawn(worker.clone().attempt(d));
                        }
                        if !full {
                            // Something due but not claimable (another worker's claim being
                            // written): look again shortly rather than spin.
                            let floor = if claimed_any { Duration::ZERO } else { Duration::from_millis(5) };
                            wait = match worker.worker.deliveries.next_due(&worker.worker.pool).await {
                                Ok(Some(due)) => due.clamp(floor, poll),
                                Ok(None) => poll,
                                Err(error) => {
                                    debug!(%error, "Cannot read the next due delivery; polling.");
                                    poll
                                }
                            };
                        }
                    }
                    Err(error) => {
                        failures += 1;
                        wait = backoff_delay(failures, worker.worker.config.max_backoff())
                            .min(poll.max(Duration::from_secs(5)));
                        warn!(%error, ?wait, "Cannot claim deliveries; trying again.");
                    }
                }
            }
            if wait.is_zero() && in_flight.len() < MAX_IN_FLIGHT {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = wake.notified() => {}
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        while in_flight.join_next().await.is_some() {}
        listener.abort();
        info!(schema = %worker.worker.schema, "Notification delivery worker stopped.");
        Ok(())
    }
}

/// Listens for the delivery trigger's notifications for `schema` and wakes the worker. Reconnects
/// with backoff; after a reconnect the worker is woken to catch up on what it may have missed.
async fn listen(pool: PgPool, schema: SchemaName, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(error) => {
                failures += 1;
                debug!(%error, "Delivery listener cannot connect; polling meanwhile.");
                sleep_or_shutdown(backoff_delay(failures, Duration::from_secs(5)), &shutdown).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(NOTIFY_CHANNEL).await {
            failures += 1;
            debug!(%error, "LISTEN failed; polling meanwhile.");
            sleep_or_shutdown(backoff_delay(failures, Duration::from_secs(5)), &shutdown).await;
            continue;
        }
        wake.notify_one();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                n = listener.try_recv() => match n {
                    Ok(Some(n)) => {
                        failures = 0;
                        if n.payload() == schema.as_str() {
                            wake.notify_one();
                        }
                    }
                    Ok(None) => wake.notify_one(),
                    Err(error) => {
                        failures += 1;
                        debug!(%error, "Delivery listener lost its connection.");
                        sleep_or_shutdown(backoff_delay(failures, Duration::from_secs(5)), &shutdown).await;
                        break;
                    }
                },
            }
        }
    }
}

#[derive(Debug)]
struct Attempts {
    worker: Worker,
    outbox: Outbox,
}

impl Attempts {
    /// One attempt of one claimed delivery, and its outcome recorded. If recording fails the
    /// claim's lease runs out and the delivery is attempted again: the receiver sees the same
    /// Idempotency-Key.
    ///
    /// Traced as a `deliver notification` span, a child of the notifier's `process` span that
    /// created the delivery (its `traceparent` is stored with the row), around the webhook's HTTP
    /// client span and the outcome's transaction (so `NotificationDelivered` / `Failed` continue
    /// the alert's trace). Each attempt is a span of its own under the same parent.
    async fn attempt(self: Arc<Self>, d: Claimed) {
        let span = tracing::info_span!(
            "deliver notification",
            alert_id = %d.alert_id,
            recipient_id = %d.recipient_id,
            channel = %d.channel,
            escalation_level = d.escalation_level,
            attempt = d.attempts,
            outcome = tracing::field::Empty,
        );
        trialflow_outbox::trace::continue_trace(&span, d.traceparent.as_deref());
        async {
            let outcome = self.post(&d).await;
            let name = match &outcome {
                Outcome::Delivered => "delivered",
                Outcome::Retry(_) => "retry",
                Outcome::Fail(_) => "failed",
            };
            tracing::Span::current().record("outcome", name);
            if let Err(error) = self.record(&d, &outcome).await {
                warn!(
                    %error, alert_id = %d.alert_id, recipient_id = %d.recipient_id, ?outcome,
                    "Delivery outcome not recorded; it will be attempted again when the claim expires."
                );
            }
        }
        .instrument(span)
        .await
    }

    async fn post(&self, d: &Claimed) -> Outcome {
        let w = &self.worker;
        let Some(channel) = Channel::parse(&d.channel) else {
            return Outcome::Fail(format!("channel `{}` is not supported", d.channel));
        };
        let Some(secret) = w.config.secret(&d.recipient_id, channel, &d.url) else {
            return Outcome::Fail(format!(
                "no subscription of recipient `{}` to {} any more; not sent",
                d.recipient_id, d.url
            ));
        };
        match w.breakers.allow(&d.url, Instant::now()) {
            Ok(()) => {}
            Err(Refusal::Open(wait)) => {
                return Outcome::Retry(format!(
                    "not sent: the circuit of {} is open after consecutive failures; next probe in {} ms",
                    d.url,
                    wait.as_millis()
                ));
            }
            Err(Refusal::Probing) => {
                return Outcome::Retry(format!(
                    "not sent: a probe of {}'s open circuit is on its way",
                    d.url
                ));
            }
        }
        let key = idempotency_key(d);
        let span = http_client_span(&d.url);
        let mut request = w
            .http
            .post(&d.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, sign::sign(secret.expose(), d.body.as_bytes()))
            .header(TIMESTAMP_HEADER, chrono::Utc::now().timestamp().to_string())
            .header(IDEMPOTENCY_KEY_HEADER, &key)
            .body(d.body.clone());
        if let Some(traceparent) = trialflow_outbox::trace::traceparent_of(&span) {
            request = request.header(trialflow_outbox::publisher::headers::TRACEPARENT, traceparent);
        }
        let sent = request.send().instrument(span.clone()).await;
        match &sent {
            Ok(response) => {
                let status = response.status();
                span.record("http.response.status_code", status.as_u16());
                if status.is_client_error() || status.is_server_error() {
                    span.record("otel.status_code", "ERROR");
                    span.record("error.type", status.as_str());
                }
            }
            Err(e) => {
                span.record("otel.status_code", "ERROR");
                span.record("error.type", if e.is_timeout() { "timeout" } else { "transport" });
            }
        }
        drop(span);
        let outcome = match sent {
            Ok(response) => outcome_of(response.status()),
            Err(e) if e.is_builder() => {
                // Not the endpoint's doing: its circuit learns nothing.
                return Outcome::Fail(format!("cannot build the request to {}: {e}", d.url));
            }
            Err(e) if e.is_timeout() => {
                Outcome::Retry(format!("no answer within {:?}: {e}", w.config.attempt_timeout()))
            }
            Err(e) => Outcome::Retry(format!("{e}: {}", error_chain(&e))),
        };
        match outcome {
            Outcome::Retry(_) => w.breakers.failed(&d.url, Instant::now()),
            Outcome::Delivered | Outcome::Fail(_) => w.breakers.answered(&d.url),
        }
        outcome
    }

    async fn record(&self, d: &Claimed, outcome: &Outcome) -> Result<(), RecordError> {
        let w = &self.worker;
        let mut tx = w.pool.begin().await?;
        match outcome {
            Outcome::Delivered => {
                if !w.deliveries.delivered(&mut tx, d).await? {
                    debug!(alert_id = %d.alert_id, recipient_id = %d.recipient_id, "Delivered, but the claim was lost meanwhile.");
                    return Ok(());
                }
                let event = NotificationDelivered {
                    envelope: self.envelope::<NotificationDelivered>(d),
                    alert_id: d.alert_id,
                    recipient_id: d.recipient_id.clone(),
                    channel: channel_of(d),
                    escalation_level: d.escalation_level,
                    attempts: d.attempts,
                };
                self.outbox.enqueue(&mut tx, self.event(&event, d)?).await?;
                tx.commit().await?;
                let latency = (chrono::Utc::now() - d.triggered_at).to_std().unwrap_or_default();
                let trigger = if d.escalation_level == 0 { "raised" } else { "escalated" };
                metrics::counter!(DELIVERED_TOTAL, "channel" => d.channel.clone()).increment(1);
                metrics::histogram!(DELIVERY_SECONDS, "trigger" => trigger).record(latency.as_secs_f64());
                debug!(
                    alert_id = %d.alert_id, recipient_id = %d.recipient_id, level = d.escalation_level,
                    attempts = d.attempts, ?latency, "Notification delivered."
                );
            }
            Outcome::Retry(error) => {
                let error = truncated(error.clone());
                let backoff = backoff_delay(u32::try_from(d.attempts).unwrap_or(1), w.config.max_backoff());
                let give_up = Duration::from_secs(w.config.give_up_after_secs);
                if w.deliveries.retry(&mut tx, d, backoff, give_up, &error).await? {
                    tx.commit().await?;
                    debug!(
                        alert_id = %d.alert_id, recipient_id = %d.recipient_id, attempts = d.attempts,
                        %error, ?backoff, "Notification attempt failed; trying again."
                    );
                    return Ok(());
                }
                let error = format!("gave up after {} attempts: {error}", d.attempts);
                self.fail(tx, d, &error).await?;
            }
            Outcome::Fail(error) => self.fail(tx, d, &truncated(error.clone())).await?,
        }
        Ok(())
    }

    async fn fail(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        d: &Claimed,
        error: &str,
    ) -> Result<(), RecordError> {
        if !self.worker.deliveries.failed(&mut tx, d, error).await? {
            return Ok(());
        }
        let event = NotificationFailed {
            envelope: self.envelope::<NotificationFailed>(d),
            alert_id: d.alert_id,
            recipient_id: d.recipient_id.clone(),
            channel: channel_of(d),
            escalation_level: d.escalation_level,
            attempts: d.attempts,
            last_error: error.to_string(),
        };
        self.outbox.enqueue(&mut tx, self.event(&event, d)?).await?;
        tx.commit().await?;
        metrics::counter!(FAILED_TOTAL, "channel" => d.channel.clone()).increment(1);
        warn!(
            alert_id = %d.alert_id, recipient_id = %d.recipient_id, level = d.escalation_level,
            attempts = d.attempts, error, "Notification failed for good."
        );
        Ok(())
    }

    /// Caused by the stored AlertRaised/AlertEscalated, so the notification joins the alert's flow.
    fn envelope<E: Event>(&self, d: &Claimed) -> Envelope {
        match AnyEvent::from_json(&d.cause_type, d.cause.clone()) {
            Ok(cause) => Envelope::caused_by(cause.envelope(), E::NAME, NAME),
            Err(error) => {
                warn!(%error, alert_id = %d.alert_id, "Stored cause does not decode; notification event without causation.");
                let mut envelope = Envelope::new(E::NAME, "", NAME, trialflow_schemas::Timestamp::now());
                envelope.study_id = d
                    .cause
                    .pointer("/envelope/study_id")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string();
                envelope
            }
        }
    }

    fn event<E: Event>(&self, event: &E, d: &Claimed) -> Result<OutboxEvent, RecordError> {
        OutboxEvent::avro(event, self.worker.topics.of::<E>(), d.alert_id.to_string())
            .map_err(|source| RecordError::Encode { event: E::NAME, source })
    }
}

fn channel_of(d: &Claimed) -> trialflow_schemas::NotificationChannel {
    Channel::parse(&d.channel).map_or(trialflow_schemas::NotificationChannel::Other, Channel::event_channel)
}

/// The webhook request's HTTP client span (OpenTelemetry HTTP semantic conventions): named after
/// the method, with the server's address and port and the URL without its secrets (see
/// [`redacted_url`]); the status code is recorded when the answer arrives.
fn http_client_span(url: &str) -> tracing::Span {
    let parsed = reqwest::Url::parse(url).ok();
    let host = parsed.as_ref().and_then(|u| u.host_str().map(str::to_string)).unwrap_or_default();
    let port = parsed.as_ref().and_then(reqwest::Url::port_or_known_default).map(i64::from);
    tracing::info_span!(
        "POST",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        "http.request.method" = "POST",
        "server.address" = %host,
        "server.port" = port,
        "url.full" = %redacted_url(url),
        "http.response.status_code" = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
    )
}

/// `url` for a span attribute: credentials (`user:password@`) and the values of query parameters
/// replaced by `REDACTED`, as webhook URLs often carry their token there; the path is kept.
fn redacted_url(url: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else { return "REDACTED".to_string() };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        let _ = parsed.set_username("REDACTED");
        let _ = parsed.set_password(Some("REDACTED"));
    }
    if parsed.query().is_some() {
        let keys: Vec<String> = parsed.query_pairs().map(|(k, _)| k.into_owned()).collect();
        parsed.query_pairs_mut().clear().extend_pairs(keys.iter().map(|k| (k.as_str(), "REDACTED")));
    }
    parsed.to_string()
}

/// `<alert_id>:<recipient_id>:<channel>:<level>`: one delivery's key, the same on every attempt.
fn idempotency_key(d: &Claimed) -> String {
    format!("{}:{}:{}:{}", d.alert_id, d.recipient_id, d.channel, d.escalation_level)
}

/// The causes of a transport error (reqwest's Display names only the outermost).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_retry_or_fail() {
        assert_eq!(outcome_of(StatusCode::OK), Outcome::Delivered);
        assert_eq!(outcome_of(StatusCode::NO_CONTENT), Outcome::Delivered);
        for s in [500, 502, 503, 504, 408, 429] {
            let status = StatusCode::from_u16(s).unwrap_or_default();
            assert!(matches!(outcome_of(status), Outcome::Retry(_)), "{s}");
        }
        for s in [301, 400, 401, 403, 404, 410, 422] {
            let status = StatusCode::from_u16(s).unwrap_or_default();
            assert!(matches!(outcome_of(status), Outcome::Fail(_)), "{s}");
        }
    }

    #[test]
    fn span_urls_keep_no_secrets() {
        assert_eq!(
            redacted_url("https://hooks.example.org/v1/alerts"),
            "https://hooks.example.org/v1/alerts"
        );
        assert_eq!(
            redacted_url("https://bob:hunter2@hooks.example.org/a?token=s3cret&x=1"),
            "https://REDACTED:REDACTED@hooks.example.org/a?token=REDACTED&x=REDACTED"
        );
        assert_eq!(redacted_url("not a url"), "REDACTED");
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        let cut = truncated("é".repeat(400));
        assert!(cut.len() <= MAX_ERROR_LEN);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
