//! The notifier: tells researchers about safety signals within seconds, once, with the evidence.
//!
//! ```text
//! monitoring.alerts.v1 ─▶ AlertRaised / AlertEscalated ─▶ subscriptions matching study + severity
//!   (keyed by alert id)        │                             ─▶ one `delivery` row per
//!                              │                                (alert, recipient, channel, level)
//!                              ├ AlertUpdated ─▶ evidence added to the alert (later pages carry it)
//!                              └ AlertAcknowledged / AlertResolved ─▶ pending escalation pages
//!                                                                     cancelled (never the raise)
//! delivery (NOTIFY at commit) ─▶ worker: claim (SKIP LOCKED + lease) ─▶ signed POST to the webhook
//!     2xx ─▶ delivered + NotificationDelivered ─┐
//!     5xx/408/429/timeout ─▶ retry with backoff ├▶ monitoring.notifications.v1 (outbox, same
//!     other 4xx, or too old ─▶ NotificationFailed┘  transaction as the status change)
//! ```
//!
//! **Guarantee.** At most once per (alert, recipient, channel, escalation level) is the delivery
//! table's unique key: a redelivered event (the inbox skips it anyway), a second `AlertRaised` of
//! the same alert with a new event id, a restart or several workers can never create a second
//! delivery, and a delivered or failed one is never attempted again. Over HTTP that is the honest
//! limit: a worker that crashes (or loses the database) after the receiver answered 2xx but before
//! the outcome is committed leaves the claim to expire, and the POST is made again — the same
//! bytes, the same `Idempotency-Key: <alert_id>:<recipient_id>:<channel>:<level>`, which the
//! receiver deduplicates on. Nothing is lost: a delivery stays pending until it is delivered,
//! given up (`give_up_after_secs` after it was created → `NotificationFailed`) or refused (4xx
//! other than 408/429 → `NotificationFailed` at once).
//!
//! **Request.** `POST <url>` with the JSON of [`AlertNotification`] (the alert, its evidence, the
//! escalation level; never an arm or treatment), `Content-Type: application/json`,
//! `X-Trialflow-Signature: sha256=<hex HMAC-SHA256 of the exact body, keyed with the
//! subscription's secret>`, `X-Trialflow-Timestamp` (Unix seconds of the attempt) and the
//! `Idempotency-Key`. The body is fixed when the delivery is created, so every attempt sends the
//! same bytes.
//!
//! **Latency.** The consumer commits the delivery rows; a statement trigger NOTIFYs at that commit;
//! the worker LISTENs (any process) and claims at once. A fallback poll covers lost notifications,
//! and retries wake the worker when they come due (the timer is `next_attempt_at` in the row, so it
//! survives restarts).
//!
//! **Metrics**: `trialflow_notifications_delivered_total{channel}`,
//! `trialflow_notifications_failed_total{channel}`, `trialflow_notification_delivery_seconds
//! {trigger=raised|escalated}` (from the alert event being recorded to the receiver's 2xx).

mod breaker;
pub mod config;
mod deliver;
pub mod sign;
mod store;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use trialflow_outbox::SchemaName;
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{
    AlertEscalated, AlertRaised, AlertSeverity, AnyEvent, Envelope, Event, Evidence, Timestamp,
};
use uuid::Uuid;

pub use self::config::{Channel, NotifierArgs, NotifierConfig, Secret, Subscription};
pub use self::deliver::NOTIFY_CHANNEL;
use self::store::NewDelivery;
use crate::config::{ConsumerConfig, ConsumerSpec};
use crate::error::{ConsumerError, HandlerError};
use crate::events::decode;
use crate::handler::{Context, Handler, Message};

/// Consumer name (inbox key, default group id, metric label) and `source_system` of its events.
pub const NAME: &str = "notifier";
/// Its default service schema.
pub const SCHEMA: &str = "notifier";

pub(crate) const DELIVERED_TOTAL: &str = "trialflow_notifications_delivered_total";
pub(crate) const FAILED_TOTAL: &str = "trialflow_notifications_failed_total";
pub(crate) const DELIVERY_SECONDS: &str = "trialflow_notification_delivery_seconds";

pub fn schema() -> SchemaName {
    SchemaName::new(SCHEMA).unwrap_or_else(|_| unreachable!("`{SCHEMA}` is a valid schema name"))
}

/// Creates the consumer's schema: outbox, inbox, parked and its own tables (alerts, deliveries).
pub async fn migrate(database_url: &str, schema: &SchemaName) -> trialflow_outbox::Result<()> {
    crate::migrate(database_url, schema, Some(sqlx::migrate!("./migrations/notifier"))).await
}

/// What it consumes.
pub fn spec(schema: SchemaName, topics: &TopicNames) -> ConsumerSpec {
    ConsumerSpec { name: NAME.to_string(), schema, topics: vec![topics.name(topics::ALERTS)] }
}

/// Runs the consumer (alerts → deliveries) and the delivery worker until `shutdown`; if either
/// stops with an error, the other is stopped too and the error returned.
pub async fn run(
    spec: ConsumerSpec,
    consumer_config: ConsumerConfig,
    config: NotifierConfig,
    topics: TopicNames,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    describe_metrics();
    if config.subscriptions.is_empty() {
        warn!("No notifier subscriptions configured: alerts are recorded, nobody is notified.");
    }
    let config = Arc::new(config);
    let stop = shutdown.child_token();
    let handler = Notifier::new(spec.schema.clone(), config.subscriptions.clone());
    let worker = deliver::Worker::new(
        &consumer_config.database.database_url,
        spec.schema.clone(),
        topics,
        config.clone(),
    )?;
    let consume = async {
        let result = crate::runtime::run(spec, consumer_config, handler, stop.clone()).await;
        stop.cancel();
        result
    };
    let deliver = async {
        let result = worker.run(stop.clone()).await;
        stop.cancel();
        result
    };
    let (consumed, delivered) = tokio::join!(consume, deliver);
    consumed.and(delivered)
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(DELIVERED_TOTAL, Unit::Count, "Notifications delivered (2xx), by channel.");
    describe_counter!(FAILED_TOTAL, Unit::Count, "Notifications given up or refused, by channel.");
    describe_histogram!(
        DELIVERY_SECONDS,
        Unit::Seconds,
        "From the alert event (raise or escalation) being recorded to the receiver's 2xx."
    );
}

/// What a webhook receives: the alert with its evidence. Times are RFC 3339 (UTC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertNotification {
    pub alert_id: Uuid,
    /// `ALERT_RAISED` (level 0) or `ALERT_ESCALATED`.
    pub notification: String,
    pub escalation_level: i32,
    pub study_id: String,
    pub site_id: Option<String>,
    pub subject_id: Option<String>,
    pub rule_id: String,
    pub rule_version: i32,
    /// The current severity (an escalation may raise it).
    pub severity: AlertSeverity,
    /// Where the rule comes from, e.g. "CTCAE v5.0 hypertension grade 3" or "protocol".
    pub source_label: String,
    pub summary: String,
    pub evidence: Vec<EvidenceItem>,
    /// When the raising observation occurred.
    pub raised_at: String,
}

/// One observation behind an alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvidenceItem {
    pub event_id: Uuid,
    pub observed_at: String,
    pub description: String,
    pub value: Option<f64>,
    pub unit: Option<String>,
}

fn rfc3339(t: Timestamp) -> String {
    t.to_datetime().map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)).unwrap_or_default()
}

impl AlertNotification {
    fn new(raised: &AlertRaised, severity: AlertSeverity, escalation_level: i32) -> Self {
        let evidence = |e: &Evidence| EvidenceItem {
            event_id: e.event_id,
            observed_at: rfc3339(e.observed_at),
            description: e.description.clone(),
            value: e.value,
            unit: e.unit.clone(),
        };
        Self {
            alert_id: raised.alert_id,
            notification: if escalation_level == 0 { "ALERT_RAISED" } else { "ALERT_ESCALATED" }.to_string(),
            escalation_level,
            study_id: raised.envelope.study_id.clone(),
            site_id: raised.envelope.site_id.clone(),
            subject_id: raised.envelope.subject_id.clone(),
            rule_id: raised.rule_id.clone(),
            rule_version: raised.rule_version,
            severity,
            source_label: raised.source_label.clone(),
            summary: raised.summary.clone(),
            evidence: raised.evidence.iter().map(evidence).collect(),
            raised_at: rfc3339(raised.envelope.occurred_at),
        }
    }
}

fn alert_dependency(alert_id: Uuid) -> String {
    format!("alert:{alert_id}")
}

/// The handler: turns alert events into deliveries.
#[derive(Debug, Clone)]
pub struct Notifier {
    schema: SchemaName,
    subscriptions: Arc<Vec<Subscription>>,
}

impl Notifier {
    pub fn new(schema: SchemaName, subscriptions: Vec<Subscription>) -> Self {
        Self { schema, subscriptions: Arc::new(subscriptions) }
    }

    /// One delivery per matching recipient and channel for `level` of the alert.
    fn deliveries<E: Event>(
        &self,
        cause: &E,
        raised: &AlertRaised,
        severity: AlertSeverity,
        level: i32,
    ) -> Result<Vec<NewDelivery>, HandlerError> {
        let envelope = cause.envelope();
        let picked = config::recipients(&self.subscriptions, &envelope.study_id, severity);
        if picked.is_empty() {
            return Ok(Vec::new());
        }
        let body = serde_json::to_string(&AlertNotification::new(raised, severity, level))
            .map_err(|e| HandlerError::permanent(format!("alert {} as JSON: {e}", raised.alert_id)))?;
        let cause_json = serde_json::to_value(cause)
            .map_err(|e| HandlerError::permanent(format!("{} as JSON: {e}", E::NAME)))?;
        let triggered_at = envelope.recorded_at.to_datetime().unwrap_or_else(chrono::Utc::now);
        let traceparent = trialflow_outbox::trace::current_traceparent();
        Ok(picked
            .into_iter()
            .map(|s| NewDelivery {
                alert_id: raised.alert_id,
                recipient_id: s.recipient_id.clone(),
                channel: s.channel.as_str(),
                escalation_level: level,
                url: s.url.clone(),
                cause_type: E::NAME,
                cause: cause_json.clone(),
                triggered_at,
                body: body.clone(),
                traceparent: traceparent.clone(),
            })
            .collect())
    }

    async fn raised(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        raised: &AlertRaised,
        ctx: &mut Context,
    ) -> Result<(), HandlerError> {
        store::record_raised(tx, &self.schema, raised).await?;
        let rows = self.deliveries(raised, raised, raised.severity, 0)?;
        let created = store::create_deliveries(tx, &self.schema, &rows).await?;
        debug!(alert_id = %raised.alert_id, matched = rows.len(), created, "Alert raised; deliveries created.");
        ctx.resolve(alert_dependency(raised.alert_id));
        Ok(())
    }

    async fn escalated(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        e: &AlertEscalated,
    ) -> Result<(), HandlerError> {
        if e.level < 1 {
            return Err(HandlerError::permanent(format!(
                "AlertEscalated of alert {} with level {}; escalation levels start at 1 (0 is the raise)",
                e.alert_id, e.level
            )));
        }
        let Some(alert) = store::alert(tx, &self.schema, e.alert_id).await? else {
            return Err(HandlerError::not_yet(
                alert_dependency(e.alert_id),
                format!("AlertEscalated of alert {} before its AlertRaised", e.alert_id),
            ));
        };
        if alert.closed {
            debug!(alert_id = %e.alert_id, level = e.level, "Escalation of a closed alert; nobody paged.");
            return Ok(());
        }
        let rows = self.deliveries(e, &alert.raised, e.severity, e.level)?;
        let created = store::create_deliveries(tx, &self.schema, &rows).await?;
        debug!(alert_id = %e.alert_id, level = e.level, matched = rows.len(), created, "Alert escalated.");
        Ok(())
    }

    async fn closed(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        envelope: &Envelope,
        alert_id: Uuid,
        why: &str,
    ) -> Result<(), HandlerError> {
        let cancelled = store::close(tx, &self.schema, alert_id, why).await?;
        debug!(%alert_id, event = envelope.event_type, cancelled, "Alert closed; pending escalation pages cancelled.");
        Ok(())
    }
}

impl Handler for Notifier {
    type Batch = ();

    /// Without an `event_id` header the envelope's event id is used.
    fn event_id(&self, message: &Message) -> Result<Uuid, HandlerError> {
        if let Some(id) = message.header_str("event_id").and_then(|h| Uuid::parse_str(h).ok()) {
            return Ok(id);
        }
        Ok(decode(message)?.envelope().event_id)
    }

    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &Message,
        ctx: &mut Context,
        _batch: &mut (),
    ) -> Result<(), HandlerError> {
        match decode(message)? {
            AnyEvent::AlertRaised(r) => self.raised(tx, &r, ctx).await,
            AnyEvent::AlertEscalated(e) => self.escalated(tx, &e).await,
            AnyEvent::AlertUpdated(u) => {
                if !store::add_evidence(tx, &self.schema, u.alert_id, &u.evidence).await? {
                    debug!(alert_id = %u.alert_id, "Evidence for an alert never raised here; ignored.");
                }
                Ok(())
            }
            AnyEvent::AlertAcknowledged(a) => self.closed(tx, &a.envelope, a.alert_id, "acknowledged").await,
            AnyEvent::AlertResolved(r) => self.closed(tx, &r.envelope, r.alert_id, "resolved").await,
            other => {
                debug!(event = other.name(), "Not an alert event; ignored.");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_carries_the_alert_and_its_evidence() {
        let mut envelope =
            Envelope::new(AlertRaised::NAME, "CARDIO-3", "monitoring", Timestamp(1_700_000_000_000_000));
        envelope.site_id = Some("101".into());
        envelope.subject_id = Some("101-004".into());
        let raised = AlertRaised {
            envelope,
            alert_id: Uuid::now_v7(),
            rule_id: "bp-grade3".into(),
            rule_version: 2,
            severity: AlertSeverity::High,
            source_label: "CTCAE v5.0 hypertension grade 3".into(),
            summary: "Systolic 172 mmHg".into(),
            evidence: vec![Evidence {
                event_id: Uuid::now_v7(),
                observed_at: Timestamp(1_700_000_000_000_000),
                description: "systolic blood pressure".into(),
                value: Some(172.0),
                unit: Some("mm[Hg]".into()),
            }],
        };
        let body = AlertNotification::new(&raised, AlertSeverity::Critical, 1);
        assert_eq!(body.notification, "ALERT_ESCALATED");
        assert_eq!(body.severity, AlertSeverity::Critical);
        assert_eq!(body.evidence.len(), 1);
        assert_eq!(body.raised_at, "2023-11-14T22:13:20.000Z");
        let json = serde_json::to_value(&body).unwrap_or_default();
        assert_eq!(json["severity"], "CRITICAL");
        assert_eq!(json["subject_id"], "101-004");
        assert!(json.get("arm").is_none() && json.get("treatment").is_none());
    }
}
