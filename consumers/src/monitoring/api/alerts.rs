//! Reading alerts (list, detail) and the two decisions a researcher takes on one: acknowledge and
//! resolve.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use sqlx::{AssertSqlSafe, PgConnection};
use trialflow_outbox::{OutboxEvent, SchemaName};
use trialflow_producers::input::{self, BodyRules, MAX_FREE_TEXT_CHARS};
use trialflow_producers::site_api::auth::Principal;
use trialflow_producers::site_api::{ApiError, check_free_text, check_id};
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{AlertAcknowledged, AlertResolved, Envelope, Event, Timestamp};
use uuid::Uuid;

use super::{AlertState, MAX_BODY_BYTES, Researcher, SOURCE_SYSTEM};

/// Alerts a list answers by default, and at most.
const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 500;
/// Longest reason a decision may carry (free text: tabs and line breaks allowed).
const MAX_REASON_CHARS: usize = MAX_FREE_TEXT_CHARS;
/// The decisions' body: its reason is free text.
const DECISION_BODY: BodyRules = BodyRules { free_text: &["reason"] };

const SEVERITIES: [&str; 4] = ["INFO", "WARNING", "HIGH", "CRITICAL"];
const STATUSES: [&str; 3] = ["open", "acknowledged", "resolved"];

/// An alert as the API shows it (list, detail, decisions and the stream's data).
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub(super) struct Alert {
    pub(super) alert_id: Uuid,
    pub(super) study_id: String,
    pub(super) site_id: Option<String>,
    pub(super) subject_id: Option<String>,
    pub(super) rule_id: String,
    pub(super) rule_version: i32,
    pub(super) severity: String,
    pub(super) source_label: String,
    pub(super) summary: String,
    pub(super) status: String,
    pub(super) level: i32,
    #[serde(serialize_with = "rfc3339")]
    pub(super) effective_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub(super) raised_at: DateTime<Utc>,
    #[serde(serialize_with = "opt_rfc3339")]
    pub(super) acknowledged_at: Option<DateTime<Utc>>,
    pub(super) acknowledged_by: Option<String>,
    pub(super) ack_reason: Option<String>,
    #[serde(serialize_with = "opt_rfc3339")]
    pub(super) resolved_at: Option<DateTime<Utc>>,
    pub(super) resolved_by: Option<String>,
    pub(super) resolve_reason: Option<String>,
    pub(super) evidence_count: i64,
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

#[derive(Debug, sqlx::FromRow, Serialize)]
struct EvidenceItem {
    event_id: Uuid,
    #[serde(serialize_with = "rfc3339")]
    observed_at: DateTime<Utc>,
    description: String,
    value: Option<f64>,
    unit: Option<String>,
}

#[derive(Debug, sqlx::FromRow, Serialize)]
struct TimelineEntry {
    id: i64,
    kind: String,
    #[serde(serialize_with = "rfc3339")]
    at: DateTime<Utc>,
    actor: String,
    detail: serde_json::Value,
}

#[derive(Debug, Serialize)]
struct AlertDetail {
    #[serde(flatten)]
    alert: Alert,
    evidence: Vec<EvidenceItem>,
    timeline: Vec<TimelineEntry>,
}

/// RFC 3339 in UTC with microseconds, the precision PostgreSQL keeps.
pub(super) fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

fn opt_rfc3339<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

// ---- list ------------------------------------------------------------------------------------

/// The filters of `GET /v1/alerts`. Severity and status take one value or several separated by
/// commas (`status=open,acknowledged`).
#[derive(Debug, Default, PartialEq, Eq)]
struct Filter {
    study_id: Option<String>,
    site_id: Option<String>,
    severities: Vec<String>,
    statuses: Vec<String>,
    limit: i64,
}

impl Filter {
    /// 422 naming the parameter that is unknown or has a value that cannot match.
    fn parse(params: &HashMap<String, String>) -> Result<Self, ApiError> {
        let mut filter = Filter { limit: DEFAULT_LIMIT, ..Filter::default() };
        for (name, value) in params {
            match name.as_str() {
                "study_id" => {
                    check_id(name, value)?;
                    filter.study_id = Some(value.clone());
                }
                "site_id" => {
                    check_id(name, value)?;
                    filter.site_id = Some(value.clone());
                }
                "severity" => filter.severities = one_of(name, value, &SEVERITIES, str::to_ascii_uppercase)?,
                "status" => filter.statuses = one_of(name, value, &STATUSES, str::to_ascii_lowercase)?,
                "limit" => {
                    filter.limit =
                        value.trim().parse::<i64>().ok().filter(|n| (1..=MAX_LIMIT).contains(n)).ok_or_else(
                            || {
                                ApiError::validation(
                                    "limit",
                                    format!("`{value}` is not a number from 1 to {MAX_LIMIT}"),
                                )
                            },
                        )?;
                }
                other => {
                    return Err(ApiError::validation(
                        other,
                        format!("unknown filter `{other}`; use study_id, site_id, severity, status or limit"),
                    ));
                }
            }
        }
        Ok(filter)
    }
}

/// The comma-separated `value`, each item normalised by `case` and one of `allowed`.
fn one_of(
    field: &str,
    value: &str,
    allowed: &[&str],
    case: fn(&str) -> String,
) -> Result<Vec<String>, ApiError> {
    value
        .split(',')
        .map(|item| {
            let item = case(item.trim());
            if allowed.contains(&item.as_str()) {
                Ok(item)
            } else {
                Err(ApiError::validation(
                    field,
                    format!("`{value}` is not one of {} (or several, comma-separated)", allowed.join(", ")),
                ))
            }
        })
        .collect()
}

pub(super) async fn list_alerts(
    State(api): State<AlertState>,
    Researcher(_): Researcher,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::validation("query", e.body_text()))?;
    let filter = Filter::parse(&params)?;
    let sql = format!(
        "{} WHERE ($1::text IS NULL OR a.study_id = $1)
             AND ($2::text IS NULL OR a.site_id = $2)
             AND (cardinality($3::text[]) = 0 OR a.severity = ANY($3))
             AND (cardinality($4::text[]) = 0 OR a.status = ANY($4))
         ORDER BY a.raised_at DESC, a.alert_id DESC
         LIMIT $5",
        select_alerts(&api.schema)
    );
    let alerts: Vec<Alert> = sqlx::query_as(AssertSqlSafe(sql))
        .bind(&filter.study_id)
        .bind(&filter.site_id)
        .bind(&filter.severities)
        .bind(&filter.statuses)
        .bind(filter.limit)
        .fetch_all(&api.pool)
        .await?;
    Ok(Json(serde_json::json!({ "alerts": alerts })))
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

pub(super) async fn get_alert(
    State(api): State<AlertState>,
    Researcher(_): Researcher,
    Path(raw_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = alert_id(&raw_id)?;
    let s = &api.schema;
    // One snapshot for the three reads, so the counts, evidence and timeline agree.
    let mut tx = api.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    let alert =
        fetch_alert(&mut tx, s, id).await?.ok_or_else(|| ApiError::not_found(format!("no alert `{id}`")))?;
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

// ---- decisions -------------------------------------------------------------------------------

/// The body of both decisions.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionRequest {
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
                 RETURNING study_id, site_id, subject_id, acknowledged_at AS decided_at"
            ),
            Decision::Resolve => format!(
                "UPDATE {s}.alert
                 SET status = 'resolved', resolved_at = now(), resolved_by = $2,
                     resolve_reason = $3, escalate_at = NULL, updated_at = now()
                 WHERE alert_id = $1 AND status IN ('open', 'acknowledged')
                 RETURNING study_id, site_id, subject_id, resolved_at AS decided_at"
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
}

pub(super) async fn acknowledge(
    State(api): State<AlertState>,
    Researcher(principal): Researcher,
    Path(raw_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Alert>, ApiError> {
    let body = body.map_err(|rejection| input::body_error(rejection, MAX_BODY_BYTES))?;
    decide(&api, &principal, &raw_id, &body, Decision::Acknowledge).await
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn field_of(result: Result<Filter, ApiError>) -> Option<String> {
        result.err().and_then(|e| (e.status.as_u16() == 422).then_some(e.field).flatten())
    }

    #[test]
    fn filters_are_normalised() {
        let filter = Filter::parse(&params(&[
            ("study_id", "CDISCPILOT01"),
            ("severity", "high, Critical"),
            ("status", "OPEN,acknowledged"),
            ("limit", "20"),
        ]));
        let Ok(filter) = filter else { panic!("valid filters were rejected: {filter:?}") };
        assert_eq!(filter.study_id.as_deref(), Some("CDISCPILOT01"));
        assert_eq!(filter.severities, ["HIGH", "CRITICAL"]);
        assert_eq!(filter.statuses, ["open", "acknowledged"]);
        assert_eq!(filter.limit, 20);
        assert_eq!(Filter::parse(&params(&[])).map(|f| f.limit).ok(), Some(DEFAULT_LIMIT));
    }

    #[test]
    fn bad_filters_name_their_field() {
        for (name, value) in [
            ("severity", "SEVERE"),
            ("severity", "HIGH,"),
            ("status", "closed"),
            ("limit", "0"),
            ("limit", "501"),
            ("limit", "ten"),
            ("study_id", "a b"),
            ("site_id", ""),
            ("colour", "red"),
        ] {
            assert_eq!(field_of(Filter::parse(&params(&[(name, value)]))).as_deref(), Some(name), "{value}");
        }
    }

    #[test]
    fn a_decision_is_refused_with_the_reason_the_status_gives() {
        let id = Uuid::nil();
        assert_eq!(Decision::Acknowledge.refusal(id, "acknowledged").code, "already_acknowledged");
        assert_eq!(Decision::Acknowledge.refusal(id, "resolved").code, "already_resolved");
        assert_eq!(Decision::Resolve.refusal(id, "resolved").code, "already_resolved");
    }
}
