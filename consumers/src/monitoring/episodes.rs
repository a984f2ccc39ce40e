//! Alert episodes in the database: one open episode per (subject — or site —, rule); matching
//! inputs add evidence to it; escalation when nobody acknowledges in time.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres, Row, Transaction};
use trialflow_outbox::{AuditRecord, Outbox, OutboxEvent, SchemaName};
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{
    AlertEscalated, AlertRaised, AlertSeverity, AlertUpdated, Envelope, Event, Evidence, Timestamp,
};
use uuid::Uuid;

use super::NAME;
use super::rules::Rule;
use crate::error::HandlerError;
use crate::handler::Context;

/// Escalations stop at this level.
pub const MAX_LEVEL: i32 = 3;

/// A rule that fired, with its evidence.
#[derive(Debug, Clone)]
pub(crate) struct Signal<'a> {
    pub(crate) rule: &'a Rule,
    pub(crate) cause: &'a Envelope,
    pub(crate) subject_id: Option<String>,
    pub(crate) site_id: Option<String>,
    pub(crate) effective_at: DateTime<Utc>,
    pub(crate) summary: String,
    pub(crate) evidence: Vec<Evidence>,
}

/// What a signal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Raised,
    Updated,
    Unchanged,
}

pub(crate) fn severity_code(s: AlertSeverity) -> &'static str {
    match s {
        AlertSeverity::Info => "INFO",
        AlertSeverity::Warning => "WARNING",
        AlertSeverity::High => "HIGH",
        AlertSeverity::Critical => "CRITICAL",
    }
}

fn severity_of(code: &str) -> AlertSeverity {
    match code {
        "CRITICAL" => AlertSeverity::Critical,
        "HIGH" => AlertSeverity::High,
        "WARNING" => AlertSeverity::Warning,
        _ => AlertSeverity::Info,
    }
}

/// Applies a signal: evidence for the open episode, or for a resolved episode whose time span the
/// input falls in (a late reading), or a new episode.
pub(crate) async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    schema: &SchemaName,
    ctx: &mut Context,
    topics: &TopicNames,
    signal: &Signal<'_>,
) -> Result<Outcome, HandlerError> {
    let key = signal
        .subject_id
        .clone()
        .unwrap_or_else(|| format!("site:{}", signal.site_id.as_deref().unwrap_or("")));
    let find = format!(
        "SELECT alert_id FROM {schema}.alert
         WHERE study_id = $1 AND coalesce(subject_id, 'site:' || coalesce(site_id, '')) = $2 AND rule_id = $3
           AND (status <> 'resolved' OR (effective_at <= $4 AND resolved_at >= $4))
         -- A resolved episode whose span holds the input's time claims it (a late input); else
         -- the open one.
         ORDER BY (status = 'resolved') DESC, raised_at DESC LIMIT 1 FOR UPDATE"
    );
    let existing: Option<Uuid> = sqlx::query_scalar(AssertSqlSafe(find))
        .bind(&signal.cause.study_id)
        .bind(&key)
        .bind(&signal.rule.rule_id)
        .bind(signal.effective_at)
        .fetch_optional(&mut **tx)
        .await?;
    if let Some(alert_id) = existing {
        let added = add_evidence(tx, schema, alert_id, &signal.evidence).await?;
        if added.is_empty() {
            return Ok(Outcome::Unchanged);
        }
        history(tx, schema, alert_id, "updated", NAME, serde_json::json!({"evidence": added.len()})).await?;
        let ids: Vec<String> = added.iter().map(|e| e.event_id.to_string()).collect();
        ctx.audit(alert_audit(signal, alert_id, "alert.evidence_added").change("evidence", Value::Null, ids));
        let event = AlertUpdated { envelope: envelope::<AlertUpdated>(signal), alert_id, evidence: added };
        enqueue(tx, &ctx.outbox, topics, &event, alert_id).await?;
        return Ok(Outcome::Updated);
    }
    let alert_id = Uuid::now_v7();
    let rule = signal.rule;
    let insert = format!(
        "INSERT INTO {schema}.alert (alert_id, study_id, site_id, subject_id, rule_id, rule_version, severity,
             source_label, summary, effective_at, escalation_secs, escalate_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, now() + make_interval(secs => $11))
         ON CONFLICT DO NOTHING"
    );
    let done = sqlx::query(AssertSqlSafe(insert))
        .bind(alert_id)
        .bind(&signal.cause.study_id)
        .bind(&signal.site_id)
        .bind(&signal.subject_id)
        .bind(&rule.rule_id)
        .bind(rule.version)
        .bind(severity_code(rule.severity))
        .bind(&rule.source_label)
        .bind(&signal.summary)
        .bind(signal.effective_at)
        .bind(i32::try_from(rule.escalation_seconds).unwrap_or(i32::MAX))
        .execute(&mut **tx)
        .await?;
    if done.rows_affected() == 0 {
        // Another worker opened this episode a moment ago: apply again as evidence.
        return Err(HandlerError::transient("episode opened concurrently"));
    }
    add_evidence(tx, schema, alert_id, &signal.evidence).await?;
    history(tx, schema, alert_id, "raised", NAME, serde_json::json!({"rule_id": rule.rule_id})).await?;
    ctx.audit(
        alert_audit(signal, alert_id, "alert.raised")
            .change("status", Value::Null, "open")
            .change("rule_id", Value::Null, rule.rule_id.as_str())
            .change("severity", Value::Null, severity_code(rule.severity))
            .change("summary", Value::Null, signal.summary.as_str())
            .change("subject_id", Value::Null, signal.subject_id.as_deref()),
    );
    let event = AlertRaised {
        envelope: envelope::<AlertRaised>(signal),
        alert_id,
        rule_id: rule.rule_id.clone(),
        rule_version: rule.version,
        severity: rule.severity,
        source_label: rule.source_label.clone(),
        summary: signal.summary.clone(),
        evidence: signal.evidence.clone(),
    };
    enqueue(tx, &ctx.outbox, topics, &event, alert_id).await?;
    Ok(Outcome::Raised)
}

/// An audit record of the monitoring service about an alert of `signal`.
fn alert_audit(signal: &Signal<'_>, alert_id: Uuid, action: &str) -> AuditRecord {
    AuditRecord::by_system(NAME, action, "alert", alert_id.to_string())
        .study(&signal.cause.study_id)
        .site(signal.site_id.as_deref())
}

fn envelope<E: Event>(signal: &Signal<'_>) -> Envelope {
    let mut envelope = Envelope::caused_by(signal.cause, E::NAME, NAME);
    envelope.subject_id = signal.subject_id.clone();
    envelope.site_id = signal.site_id.clone();
    envelope.occurred_at = Timestamp::from(signal.effective_at);
    envelope
}

async fn enqueue<E: Event>(
    tx: &mut Transaction<'_, Postgres>,
    outbox: &Outbox,
    topics: &TopicNames,
    event: &E,
    alert_id: Uuid,
) -> Result<(), HandlerError> {
    let row = OutboxEvent::avro(event, topics.of::<E>(), alert_id.to_string())
        .map_err(|e| HandlerError::permanent(format!("encoding {}: {e}", E::NAME)))?;
    outbox.enqueue(tx, row).await?;
    Ok(())
}

/// Adds the evidence not yet recorded; returns what was new.
async fn add_evidence(
    conn: &mut PgConnection,
    schema: &SchemaName,
    alert_id: Uuid,
    evidence: &[Evidence],
) -> Result<Vec<Evidence>, HandlerError> {
    let sql = format!(
        "INSERT INTO {schema}.alert_evidence (alert_id, event_id, observed_at, description, value, unit)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
    );
    let mut added = Vec::new();
    for e in evidence {
        let observed = e.observed_at.to_datetime().unwrap_or_default();
        let done = sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(alert_id)
            .bind(e.event_id)
            .bind(observed)
            .bind(&e.description)
            .bind(e.value)
            .bind(&e.unit)
            .execute(&mut *conn)
            .await?;
        if done.rows_affected() == 1 {
            added.push(e.clone());
        }
    }
    if !added.is_empty() {
        let touch = format!("UPDATE {schema}.alert SET updated_at = now() WHERE alert_id = $1");
        sqlx::query(AssertSqlSafe(touch)).bind(alert_id).execute(&mut *conn).await?;
    }
    Ok(added)
}

async fn history(
    conn: &mut PgConnection,
    schema: &SchemaName,
    alert_id: Uuid,
    kind: &str,
    actor: &str,
    detail: serde_json::Value,
) -> Result<(), HandlerError> {
    let sql =
        format!("INSERT INTO {schema}.alert_history (alert_id, kind, actor, detail) VALUES ($1, $2, $3, $4)");
    sqlx::query(AssertSqlSafe(sql))
        .bind(alert_id)
        .bind(kind)
        .bind(actor)
        .bind(detail)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Escalates every open, unacknowledged alert whose time is up (one level, then again after the
/// rule's escalation time, up to [`MAX_LEVEL`]). The due time is in the database, so the timer
/// survives restarts; `SKIP LOCKED` lets several instances share the work. Returns how many.
pub(crate) async fn escalate_due(
    pool: &PgPool,
    schema: &SchemaName,
    outbox: &Outbox,
    topics: &TopicNames,
) -> Result<usize, HandlerError> {
    let mut tx = pool.begin().await?;
    let sql = format!(
        "UPDATE {schema}.alert a SET level = a.level + 1, updated_at = now(),
             escalate_at = CASE WHEN a.level + 1 < $1 THEN now() + make_interval(secs => a.escalation_secs) END
         WHERE a.alert_id IN (SELECT alert_id FROM {schema}.alert
                              WHERE status = 'open' AND escalate_at <= now()
                              ORDER BY escalate_at LIMIT 100 FOR UPDATE SKIP LOCKED)
         RETURNING a.alert_id, a.study_id, a.site_id, a.subject_id, a.level, a.severity"
    );
    let rows = sqlx::query(AssertSqlSafe(sql)).bind(MAX_LEVEL).fetch_all(&mut *tx).await?;
    let mut audit = Vec::with_capacity(rows.len());
    for row in &rows {
        let alert_id: Uuid = row.try_get(0)?;
        let study_id: String = row.try_get(1)?;
        let level: i32 = row.try_get(4)?;
        let severity: String = row.try_get(5)?;
        history(&mut tx, schema, alert_id, "escalated", NAME, serde_json::json!({"level": level})).await?;
        let mut envelope = Envelope::new(AlertEscalated::NAME, &study_id, NAME, Timestamp::now());
        envelope.site_id = row.try_get(2)?;
        envelope.subject_id = row.try_get(3)?;
        envelope.actor = Some(NAME.to_string());
        audit.push(
            AuditRecord::by_system(NAME, "alert.escalated", "alert", alert_id.to_string())
                .study(&study_id)
                .site(envelope.site_id.as_deref())
                .change("level", level - 1, level)
                .reason("not acknowledged within the rule's escalation time")
                .cause("timer:escalation"),
        );
        let event = AlertEscalated { envelope, alert_id, level, severity: severity_of(&severity) };
        enqueue(&mut tx, outbox, topics, &event, alert_id).await?;
    }
    trialflow_outbox::audit::append(&mut tx, schema, &audit).await?;
    tx.commit().await?;
    Ok(rows.len())
}
