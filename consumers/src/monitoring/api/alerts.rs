//! An alert as the API shows it, its detail, and the two decisions a researcher takes on one:
//! acknowledge and resolve. (The list is [`super::list`].)

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use sqlx::{AssertSqlSafe, PgConnection};
use trialflow_http::ApiError;
use trialflow_http::auth::Principal;
use trialflow_http::input::{self, BodyRules, MAX_FREE_TEXT_CHARS, check_free_text};
use trialflow_outbox::{AuditRecord, OutboxEvent, SchemaName};
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{AlertAcknowledged, AlertResolved, Envelope, Event, Timestamp};
use uuid::Uuid;

use super::{AlertState, MAX_BODY_BYTES, Researcher, SOURCE_SYSTEM, openapi};

/// Longest reason a decision may carry (free text: tabs and line breaks allowed).
const MAX_REASON_CHARS: usize = MAX_FREE_TEXT_CHARS;
/// The decisions' body: its reason is free text.
const DECISION_BODY: BodyRules = BodyRules { free_text: &["reason"] };

/// An alert's severities, least severe first (the monitoring schema's check).
pub(super) const SEVERITIES: [&str; 4] = ["INFO", "WARNING", "HIGH", "CRITICAL"];
/// An alert's states, in the order an episode goes through them.
pub(super) const STATUSES: [&str; 3] = ["open", "acknowledged", "resolved"];

/// An alert as the API shows it (list, detail, decisions and the stream's data): one episode of
/// a monitoring rule for a subject (or a site, for site-level rules). Every field is always
/// present; the optional ones are `null` when they do not apply.
#[derive(Debug, Clone, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub(super) struct Alert {
    /// The alert's id.
    pub(super) alert_id: Uuid,
    /// The study (protocol) id.
    pub(super) study_id: String,
    /// The site, when the events that raised the alert named one.
    #[schema(required = true)]
    pub(super) site_id: Option<String>,
    /// The subject; `null` for a site-level alert (e.g. low kit stock).
    #[schema(required = true)]
    pub(super) subject_id: Option<String>,
    /// The monitoring rule that raised the alert.
    pub(super) rule_id: String,
    /// The version of the rule set the rule came from.
    pub(super) rule_version: i32,
    #[schema(schema_with = severity_schema)]
    pub(super) severity: String,
    /// Where the rule's threshold comes from (e.g. `CTCAE v5.0 grade 3`, `protocol`).
    pub(super) source_label: String,
    /// One line for the inbox (e.g. `Systolic blood pressure 182 mmHg`).
    pub(super) summary: String,
    #[schema(schema_with = status_schema)]
    pub(super) status: String,
    /// Escalation level reached while open and unacknowledged (0: not escalated).
    #[schema(minimum = 0)]
    pub(super) level: i32,
    /// Effective time of the first evidence (when it was observed).
    #[serde(serialize_with = "rfc3339")]
    pub(super) effective_at: DateTime<Utc>,
    /// When the alert was raised: the list's order.
    #[serde(serialize_with = "rfc3339")]
    pub(super) raised_at: DateTime<Utc>,
    #[serde(serialize_with = "opt_rfc3339")]
    #[schema(required = true)]
    pub(super) acknowledged_at: Option<DateTime<Utc>>,
    /// The user who acknowledged it.
    #[schema(required = true)]
    pub(super) acknowledged_by: Option<String>,
    #[schema(required = true)]
    pub(super) ack_reason: Option<String>,
    #[serde(serialize_with = "opt_rfc3339")]
    #[schema(required = true)]
    pub(super) resolved_at: Option<DateTime<Utc>>,
    /// The user who resolved it.
    #[schema(required = true)]
    pub(super) resolved_by: Option<String>,
    #[schema(required = true)]
    pub(super) resolve_reason: Option<String>,
    /// Readings and events that support the alert (a repeat adds evidence, not an alert).
    #[schema(minimum = 0)]
    pub(super) evidence_count: i64,
}

/// `severity` in the document: one of [`SEVERITIES`].
fn severity_schema() -> utoipa::openapi::Object {
    openapi::one_of(&SEVERITIES, "How urgent the rule rates the finding, least severe first.")
}

/// `status` in the document: one of [`STATUSES`].
fn status_schema() -> utoipa::openapi::Object {
    openapi::one_of(
        &STATUSES,
        "`open` until a researcher acknowledges (stops escalation) or resolves it (ends the episode).",
    )
}

/// `SELECT <every field of [`Alert`]> FROM <schema>.alert a`, for queries to add their own
/// joins, conditions and order.
pub(super) fn select_alerts(s: &SchemaName) -> String {
    format!(
        "SELECT a.alert_id, a.study_id, a.site_id, a.subject_id, a.rule_id, a.rule_version, a.severity,
                a.source_label, a.summary, a.status, a.level, a.effective_at, a.raised_at,
                a.acknowledged_at, a.acknowledged_by, a.ack_reason, a.resolved_at, a.resolved_by,
                a.resolve_reason,
                (SELECT count(*) FROM {s}.alert_evidence e WHERE e.alert_id = a.alert_id) AS evidence_count
         FROM {s}.alert a"
    )
}

/// A reading or event that supports an alert.
#[derive(Debug, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub(super) struct EvidenceItem {
    /// The event it came from.
    event_id: Uuid,
    #[serde(serialize_with = "rfc3339")]
    observed_at: DateTime<Utc>,
    description: String,
    #[schema(required = true)]
    value: Option<f64>,
    /// UCUM unit of `value`.
    #[schema(required = true)]
    unit: Option<String>,
}

/// One change of an alert: the audit trail (who, when, why).
#[derive(Debug, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub(super) struct TimelineEntry {
    /// Increasing; the stream's event id.
    id: i64,
    #[schema(schema_with = history_kind_schema)]
    kind: String,
    #[serde(serialize_with = "rfc3339")]
    at: DateTime<Utc>,
    /// The user, or `monitoring` for the monitoring consumer.
    actor: String,
    /// What the change carries (a decision's `reason`, an escalation's `level`, ...).
    #[schema(value_type = Object)]
    detail: serde_json::Value,
}

/// The kinds of [`TimelineEntry`] (the monitoring schema's check).
pub(super) const HISTORY_KINDS: [&str; 5] = ["raised", "updated", "escalated", "acknowledged", "resolved"];

fn history_kind_schema() -> utoipa::openapi::Object {
    openapi::one_of(&HISTORY_KINDS, "What happened; also the stream's event name.")
}

/// An alert with its evidence and its timeline, read in one snapshot.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct AlertDetail {
    #[serde(flatten)]
    alert: Alert,
    /// In the order observed.
    evidence: Vec<EvidenceItem>,
    /// Oldest first.
    timeline: Vec<TimelineEntry>,
}

/// RFC 3339 in UTC with microseconds, the precision PostgreSQL keeps.
pub(super) fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(super) fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

pub(super) fn opt_rfc3339<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

// ---- detail ----------------------------------------------------------------------------------

/// The alert id of a path; one that is not a UUID names no alert (404).
fn alert_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found(format!("no alert `{raw}`")))
}

async fn fetch_alert(
    conn: &mut PgConnection,
    s: &SchemaName,
    alert_id: Uuid,
) -> Result<Option<Alert>, ApiError> {
    let sql = format!("{} WHERE a.alert_id = $1", select_alerts(s));
    Ok(sqlx::query_as(AssertSqlSafe(sql)).bind(alert_id).fetch_optional(conn).await?)
}

/// One alert, with its evidence and timeline
#[utoipa::path(
    get,
    path = "/v1/alerts/{alert_id}",
    tag = "alerts",
    params(openapi::AlertIdParam),
    responses(
        (status = 200, description = "The alert.", body = AlertDetail),
        (status = 401, response = openapi::Unauthenticated),
        (status = 403, response = openapi::Forbidden),
        (status = 404, response = openapi::NoSuchAlert),
        (status = 422, response = openapi::InvalidText),
        (status = 500, response = openapi::Internal),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bearer" = []))
)]
pub(super) async fn get_alert(
    State(api): State<AlertState>,
    Researcher(principal): Researcher,
    Path(raw_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = alert_id(&raw_id)?;
    let s = &api.schema;
    // One snapshot for the three reads, so the counts, evidence and timeline agree.
    let mut tx = api.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    let alert =
        fetch_alert(&mut tx, s, id).await?.ok_or_else(|| ApiError::not_found(format!("no alert `{id}`")))?;
    in_scope(&principal, id, &alert.study_id)?;
    let evidence: Vec<EvidenceItem> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT event_id, observed_at, description, value, unit FROM {s}.alert_evidence
         WHERE alert_id = $1 ORDER BY observed_at, event_id"
    )))
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    let timeline: Vec<TimelineEntry> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, kind, at, actor, detail FROM {s}.alert_history WHERE alert_id = $1 ORDER BY id"
    )))
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let detail = AlertDetail { alert, evidence, timeline };
    Ok(Json(serde_json::to_value(detail).map_err(|e| {
        tracing::error!(error = %e, "Alert detail does not serialize; answering 500.");
        ApiError::internal()
    })?))
}

/// 403 `out_of_scope` for an alert of a study outside the caller's token.
fn in_scope(principal: &Principal, id: Uuid, study_id: &str) -> Result<(), ApiError> {
    if principal.scope.studies.contains(study_id) {
        return Ok(());
    }
    Err(ApiError::out_of_scope(format!("alert `{id}` is of a study outside your token")))
}

// ---- decisions -------------------------------------------------------------------------------

/// The body of both decisions.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"reason": "Site called; repeat measurement booked for tomorrow."}))]
pub(super) struct DecisionRequest {
    /// Why (free text, not blank, at most 2,000 characters; tabs and line breaks allowed).
    #[schema(required = true, value_type = String, min_length = 1, max_length = 2000)]
    reason: Option<String>,
}

/// What a researcher decides about an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Someone is on it: stops escalation; the alert stays in the inbox.
    Acknowledge,
    /// Dealt with: the episode ends (a new breach of the rule raises a new alert).
    Resolve,
}

impl Decision {
    /// The alert's status afterwards, also the history kind.
    fn status(self) -> &'static str {
        match self {
            Decision::Acknowledge => "acknowledged",
            Decision::Resolve => "resolved",
        }
    }

    /// Takes the decision on an alert in a state that allows it; no row when it does not.
    fn update_sql(self, s: &SchemaName) -> String {
        // escalate_at is cleared by both: an acknowledged or resolved alert escalates no further.
        match self {
            Decision::Acknowledge => format!(
                "UPDATE {s}.alert
                 SET status = 'acknowledged', acknowledged_at = now(), acknowledged_by = $2,
                     ack_reason = $3, escalate_at = NULL, updated_at = now()
                 WHERE alert_id = $1 AND status = 'open'
                 RETURNING study_id, site_id, subject_id, acknowledged_at AS decided_at,
                           'open' AS previous_status"
            ),
            Decision::Resolve => format!(
                "UPDATE {s}.alert
                 SET status = 'resolved', resolved_at = now(), resolved_by = $2,
                     resolve_reason = $3, escalate_at = NULL, updated_at = now()
                 WHERE alert_id = $1 AND status IN ('open', 'acknowledged')
                 RETURNING study_id, site_id, subject_id, resolved_at AS decided_at,
                           CASE WHEN acknowledged_at IS NULL THEN 'open' ELSE 'acknowledged' END
                               AS previous_status"
            ),
        }
    }

    /// Why the decision cannot be taken on an alert in `status`.
    fn refusal(self, id: Uuid, status: &str) -> ApiError {
        match status {
            "resolved" => ApiError::conflict("already_resolved", format!("alert `{id}` is already resolved")),
            _ if self == Decision::Acknowledge => {
                ApiError::conflict("already_acknowledged", format!("alert `{id}` is already acknowledged"))
            }
            other => ApiError::conflict("invalid_status", format!("alert `{id}` is {other}")),
        }
    }

    /// The event announcing the decision, on the alerts topic under the alert id.
    fn event(
        self,
        envelope: Envelope,
        alert_id: Uuid,
        reason: String,
        topics: &TopicNames,
    ) -> Result<OutboxEvent, ApiError> {
        let key = alert_id.to_string();
        Ok(match self {
            Decision::Acknowledge => {
                let event = AlertAcknowledged { envelope, alert_id, reason };
                OutboxEvent::avro(&event, topics.of::<AlertAcknowledged>(), key)?
            }
            Decision::Resolve => {
                let event = AlertResolved { envelope, alert_id, reason };
                OutboxEvent::avro(&event, topics.of::<AlertResolved>(), key)?
            }
        })
    }

    fn event_type(self) -> &'static str {
        match self {
            Decision::Acknowledge => AlertAcknowledged::NAME,
            Decision::Resolve => AlertResolved::NAME,
        }
    }
}

/// The row a decision changed: what the event's envelope needs.
#[derive(Debug, sqlx::FromRow)]
struct Decided {
    study_id: String,
    site_id: Option<String>,
    subject_id: Option<String>,
    decided_at: Option<DateTime<Utc>>,
    /// The status before the decision (an acknowledged alert keeps its `acknowledged_at`).
    previous_status: String,
}

/// Acknowledge an alert: someone is on it
///
/// Stops its escalation; the alert stays in the inbox. Records the decision, its history entry
/// and the `AlertAcknowledged` event (topic `monitoring.alerts.v1`) in one transaction.
#[utoipa::path(
    post,
    path = "/v1/alerts/{alert_id}/acknowledge",
    tag = "alerts",
    params(openapi::AlertIdParam),
    request_body = DecisionRequest,
    responses(
        (status = 200, description = "The alert after the decision.", body = Alert),
        (status = 400, response = openapi::BadBody),
        (status = 401, response = openapi::Unauthenticated),
        (status = 403, response = openapi::Forbidden),
        (status = 404, response = openapi::NoSuchAlert),
        (status = 409, response = openapi::AckConflict),
        (status = 413, response = openapi::TooLarge),
        (status = 422, response = openapi::InvalidReason),
        (status = 500, response = openapi::Internal),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bearer" = []))
)]
pub(super) async fn acknowledge(
    State(api): State<AlertState>,
    Researcher(principal): Researcher,
    Path(raw_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Alert>, ApiError> {
    let body = body.map_err(|rejection| input::body_error(rejection, MAX_BODY_BYTES))?;
    decide(&api, &principal, &raw_id, &body, Decision::Acknowledge).await
}

/// Resolve an alert: dealt with
///
/// Ends the episode: a new breach of the rule raises a new alert. Records the decision, its
/// history entry and the `AlertResolved` event (topic `monitoring.alerts.v1`) in one transaction.
#[utoipa::path(
    post,
    path = "/v1/alerts/{alert_id}/resolve",
    tag = "alerts",
    params(openapi::AlertIdParam),
    request_body = DecisionRequest,
    responses(
        (status = 200, description = "The alert after the decision.", body = Alert),
        (status = 400, response = openapi::BadBody),
        (status = 401, response = openapi::Unauthenticated),
        (status = 403, response = openapi::Forbidden),
        (status = 404, response = openapi::NoSuchAlert),
        (status = 409, response = openapi::ResolveConflict),
        (status = 413, response = openapi::TooLarge),
        (status = 422, response = openapi::InvalidReason),
        (status = 500, response = openapi::Internal),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bearer" = []))
)]
pub(super) async fn resolve(
    State(api): State<AlertState>,
    Researcher(principal): Researcher,
    Path(raw_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Alert>, ApiError> {
    let body = body.map_err(|rejection| input::body_error(rejection, MAX_BODY_BYTES))?;
    decide(&api, &principal, &raw_id, &body, Decision::Resolve).await
}

/// Takes `decision` in ONE transaction: the alert row, its history entry (which wakes the
/// streams once committed) and the event in the monitoring outbox. A concurrent decision on the
/// same alert waits for the row lock and then finds the status changed: 409, never two events.
async fn decide(
    api: &AlertState,
    principal: &Principal,
    raw_id: &str,
    body: &[u8],
    decision: Decision,
) -> Result<Json<Alert>, ApiError> {
    let id = alert_id(raw_id)?;
    let request: DecisionRequest = input::parse_body(body, &DECISION_BODY)?;
    let reason = request.reason.ok_or_else(|| ApiError::validation("reason", "is required"))?;
    check_free_text("reason", &reason, MAX_REASON_CHARS)?;
    let reason = reason.trim().to_string();
    let s = &api.schema;

    let mut tx = api.pool.begin().await?;
    // Its study first: an alert of another study is neither changed nor described (its status).
    let study_id: Option<String> =
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT study_id FROM {s}.alert WHERE alert_id = $1")))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    in_scope(
        principal,
        id,
        study_id.as_deref().ok_or_else(|| ApiError::not_found(format!("no alert `{id}`")))?,
    )?;
    let decided: Option<Decided> = sqlx::query_as(AssertSqlSafe(decision.update_sql(s)))
        .bind(id)
        .bind(&principal.user)
        .bind(&reason)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(decided) = decided else {
        let status: Option<String> =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT status FROM {s}.alert WHERE alert_id = $1")))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        return Err(match status {
            None => ApiError::not_found(format!("no alert `{id}`")),
            Some(status) => decision.refusal(id, &status),
        });
    };
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.alert_history (alert_id, kind, actor, detail) VALUES ($1, $2, $3, $4)"
    )))
    .bind(id)
    .bind(decision.status())
    .bind(&principal.user)
    .bind(serde_json::json!({ "reason": reason }))
    .execute(&mut *tx)
    .await?;
    trialflow_outbox::audit::append(
        &mut tx,
        s,
        &[decision_audit(principal, id, decision, &decided, &reason)],
    )
    .await?;

    let occurred_at = decided.decided_at.map_or_else(Timestamp::now, Timestamp::from);
    let mut envelope = Envelope::new(decision.event_type(), &decided.study_id, SOURCE_SYSTEM, occurred_at);
    envelope.site_id = decided.site_id;
    envelope.subject_id = decided.subject_id;
    envelope.actor = Some(principal.user.clone());
    let event = decision.event(envelope, id, reason, &api.topics)?;
    api.outbox.enqueue(&mut tx, event).await?;

    let alert =
        fetch_alert(&mut tx, s, id).await?.ok_or_else(|| ApiError::not_found(format!("no alert `{id}`")))?;
    tx.commit().await?;
    tracing::info!(alert_id = %id, user = %principal.user, decision = decision.status(), "Decided on alert.");
    Ok(Json(alert))
}

/// The audit record of a decision: who, the status it changed, and the reason it requires.
fn decision_audit(
    principal: &Principal,
    id: Uuid,
    decision: Decision,
    decided: &Decided,
    reason: &str,
) -> AuditRecord {
    let verb = match decision {
        Decision::Acknowledge => "acknowledge",
        Decision::Resolve => "resolve",
    };
    AuditRecord::by_person(
        &principal.user,
        principal.role.as_str(),
        format!("alert.{}", decision.status()),
        "alert",
        id.to_string(),
    )
    .study(&decided.study_id)
    .site(decided.site_id.as_deref())
    .change("status", decided.previous_status.as_str(), decision.status())
    .reason(reason)
    .cause(format!("request:POST /v1/alerts/{id}/{verb}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_is_refused_with_the_reason_the_status_gives() {
        let id = Uuid::nil();
        assert_eq!(Decision::Acknowledge.refusal(id, "acknowledged").code, "already_acknowledged");
        assert_eq!(Decision::Acknowledge.refusal(id, "resolved").code, "already_resolved");
        assert_eq!(Decision::Resolve.refusal(id, "resolved").code, "already_resolved");
    }
}
