//! Alert episodes in the database: one open episode per (subject — or site —, rule); matching
//! inputs add evidence to it; escalation when nobody acknowledges in time.
//!
//! A batch reads and locks the episodes of its subjects once ([`Episodes::prefetch`]); a signal
//! finds its episode there (and a new episode is added for the signals after it), and is applied
//! with one statement (the episode or its new evidence, and its history row).

use std::collections::{BTreeMap, HashMap};

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

/// An episode as a batch knows it.
#[derive(Debug, Clone)]
struct Episode {
    alert_id: Uuid,
    /// The effective time of its first evidence and when it was resolved, if it was.
    resolved: Option<(DateTime<Utc>, DateTime<Utc>)>,
    raised_at: DateTime<Utc>,
}

/// A subject or site, as episodes are keyed: (study id, subject id or `site:<site id>`).
pub(crate) type EpisodeKey = (String, String);

/// The episodes of a batch's subjects, read and locked by `prepare`, in alert id order (a fixed
/// lock order between batches): every episode that is not resolved, and the resolved ones whose
/// time span meets the span of the batch's inputs of their subject. What is not covered is read
/// per signal, as before.
#[derive(Debug, Default)]
pub(crate) struct Episodes {
    by_rule: HashMap<(String, String, String), Vec<Episode>>,
    /// The keys read, each with the span of effective times its resolved episodes were read for.
    covered: HashMap<EpisodeKey, (DateTime<Utc>, DateTime<Utc>)>,
}

impl Episodes {
    /// Reads and locks the episodes of `keys`, each with the span of effective times of the
    /// batch's inputs about it.
    pub(crate) async fn prefetch(
        conn: &mut PgConnection,
        schema: &SchemaName,
        keys: &BTreeMap<EpisodeKey, (DateTime<Utc>, DateTime<Utc>)>,
    ) -> Result<Self, HandlerError> {
        let mut episodes = Self::default();
        if keys.is_empty() {
            return Ok(episodes);
        }
        let sql = format!(
            "SELECT a.alert_id, a.study_id, k.key, a.rule_id, a.status = 'resolved', a.effective_at,
                    a.resolved_at, a.raised_at
             FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[])
                  AS k(study_id, key, first_at, last_at)
             JOIN {schema}.alert a ON a.study_id = k.study_id
                  AND coalesce(a.subject_id, 'site:' || coalesce(a.site_id, '')) = k.key
             WHERE a.status <> 'resolved' OR (a.effective_at <= k.last_at AND a.resolved_at >= k.first_at)
             ORDER BY a.alert_id FOR UPDATE OF a"
        );
        let (studies, subjects): (Vec<&str>, Vec<&str>) =
            keys.keys().map(|(s, k)| (s.as_str(), k.as_str())).unzip();
        let (firsts, lasts): (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) = keys.values().copied().unzip();
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(studies)
            .bind(subjects)
            .bind(firsts)
            .bind(lasts)
            .fetch_all(&mut *conn)
            .await?;
        for row in rows {
            let resolved: bool = row.try_get(4)?;
            let resolved_at: Option<DateTime<Utc>> = row.try_get(6)?;
            let episode = Episode {
                alert_id: row.try_get(0)?,
                resolved: if resolved {
                    Some((row.try_get(5)?, resolved_at.unwrap_or_default()))
                } else {
                    None
                },
                raised_at: row.try_get(7)?,
            };
            let key = (row.try_get(1)?, row.try_get(2)?, row.try_get(3)?);
            episodes.by_rule.entry(key).or_default().push(episode);
        }
        episodes.covered = keys.iter().map(|(k, span)| (k.clone(), *span)).collect();
        Ok(episodes)
    }

    /// The episode a signal of `rule` about `key` at `at` belongs to, as the database's query
    /// would choose it: a resolved episode whose span holds `at` (the latest raised), else the
    /// open one. `None` when the batch did not read what decides it.
    fn find(&self, key: &EpisodeKey, rule_id: &str, at: DateTime<Utc>) -> Option<Option<Uuid>> {
        let (first, last) = self.covered.get(key)?;
        if at < *first || at > *last {
            return None;
        }
        let episodes = self.by_rule.get(&(key.0.clone(), key.1.clone(), rule_id.to_string()));
        let best = episodes
            .into_iter()
            .flatten()
            .filter(|e| e.resolved.is_none_or(|(from, to)| from <= at && at <= to))
            .max_by_key(|e| (e.resolved.is_some(), e.raised_at));
        Some(best.map(|e| e.alert_id))
    }

    fn opened(&mut self, key: &EpisodeKey, rule_id: &str, alert_id: Uuid) {
        let episode = Episode { alert_id, resolved: None, raised_at: Utc::now() };
        self.by_rule.entry((key.0.clone(), key.1.clone(), rule_id.to_string())).or_default().push(episode);
    }
}

/// Applies a signal: evidence for the open episode, or for a resolved episode whose time span the
/// input falls in (a late reading), or a new episode.
pub(crate) async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    schema: &SchemaName,
    ctx: &mut Context,
    topics: &TopicNames,
    episodes: &mut Episodes,
    signal: &Signal<'_>,
) -> Result<Outcome, HandlerError> {
    let key: EpisodeKey = (
        signal.cause.study_id.clone(),
        signal
            .subject_id
            .clone()
            .unwrap_or_else(|| format!("site:{}", signal.site_id.as_deref().unwrap_or(""))),
    );
    let existing = match episodes.find(&key, &signal.rule.rule_id, signal.effective_at) {
        Some(found) => found,
        None => find(tx, schema, &key, signal).await?,
    };
    if let Some(alert_id) = existing {
        let added = add_evidence(tx, schema, alert_id, &signal.evidence).await?;
        if added.is_empty() {
            return Ok(Outcome::Unchanged);
        }
        let ids: Vec<String> = added.iter().map(|e| e.event_id.to_string()).collect();
        ctx.audit(alert_audit(signal, alert_id, "alert.evidence_added").change("evidence", Value::Null, ids));
        let event = AlertUpdated { envelope: envelope::<AlertUpdated>(signal), alert_id, evidence: added };
        enqueue(ctx, topics, &event, alert_id)?;
        return Ok(Outcome::Updated);
    }
    let alert_id = Uuid::now_v7();
    let rule = signal.rule;
    // The episode, its evidence and its history row in one statement.
    let insert = format!(
        "WITH raised AS (
             INSERT INTO {schema}.alert (alert_id, study_id, site_id, subject_id, rule_id, rule_version,
                 severity, source_label, summary, effective_at, escalation_secs, escalate_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, now() + make_interval(secs => $11))
             ON CONFLICT DO NOTHING RETURNING alert_id),
         evidence AS (
             INSERT INTO {schema}.alert_evidence (alert_id, event_id, observed_at, description, value, unit)
             SELECT raised.alert_id, e.* FROM raised,
                 unnest($12::uuid[], $13::timestamptz[], $14::text[], $15::float8[], $16::text[]) AS e
             ON CONFLICT DO NOTHING),
         history AS (
             INSERT INTO {schema}.alert_history (alert_id, kind, actor, detail)
             SELECT alert_id, 'raised', $17, $18 FROM raised)
         SELECT count(*) FROM raised"
    );
    let evidence = EvidenceColumns::of(&signal.evidence);
    let raised: i64 = sqlx::query_scalar(AssertSqlSafe(insert))
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
        .bind(evidence.event_ids)
        .bind(evidence.observed)
        .bind(evidence.descriptions)
        .bind(evidence.values)
        .bind(evidence.units)
        .bind(NAME)
        .bind(serde_json::json!({"rule_id": rule.rule_id}))
        .fetch_one(&mut **tx)
        .await?;
    if raised == 0 {
        // Another worker opened this episode a moment ago: apply again as evidence.
        return Err(HandlerError::transient("episode opened concurrently"));
    }
    episodes.opened(&key, &rule.rule_id, alert_id);
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
    enqueue(ctx, topics, &event, alert_id)?;
    Ok(Outcome::Raised)
}

/// The episode of a signal the batch did not read: the database's answer (locked).
async fn find(
    tx: &mut Transaction<'_, Postgres>,
    schema: &SchemaName,
    key: &EpisodeKey,
    signal: &Signal<'_>,
) -> Result<Option<Uuid>, HandlerError> {
    let find = format!(
        "SELECT alert_id FROM {schema}.alert
         WHERE study_id = $1 AND coalesce(subject_id, 'site:' || coalesce(site_id, '')) = $2 AND rule_id = $3
           AND (status <> 'resolved' OR (effective_at <= $4 AND resolved_at >= $4))
         -- A resolved episode whose span holds the input's time claims it (a late input); else
         -- the open one.
         ORDER BY (status = 'resolved') DESC, raised_at DESC LIMIT 1 FOR UPDATE"
    );
    Ok(sqlx::query_scalar(AssertSqlSafe(find))
        .bind(&key.0)
        .bind(&key.1)
        .bind(&signal.rule.rule_id)
        .bind(signal.effective_at)
        .fetch_optional(&mut **tx)
        .await?)
}

/// Evidence as the columns of an `unnest`.
#[derive(Debug, Default)]
struct EvidenceColumns<'a> {
    event_ids: Vec<Uuid>,
    observed: Vec<DateTime<Utc>>,
    descriptions: Vec<&'a str>,
    values: Vec<Option<f64>>,
    units: Vec<Option<&'a str>>,
}

impl<'a> EvidenceColumns<'a> {
    fn of(evidence: &'a [Evidence]) -> Self {
        let mut columns = Self::default();
        for e in evidence {
            columns.event_ids.push(e.event_id);
            columns.observed.push(e.observed_at.to_datetime().unwrap_or_default());
            columns.descriptions.push(&e.description);
            columns.values.push(e.value);
            columns.units.push(e.unit.as_deref());
        }
        columns
    }
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

/// Queues an alert event of a signal (keyed by its alert).
fn enqueue<E: Event>(
    ctx: &mut Context,
    topics: &TopicNames,
    event: &E,
    alert_id: Uuid,
) -> Result<(), HandlerError> {
    ctx.enqueue(outbox_event(topics, event, alert_id)?)
}

fn outbox_event<E: Event>(
    topics: &TopicNames,
    event: &E,
    alert_id: Uuid,
) -> Result<OutboxEvent, HandlerError> {
    OutboxEvent::avro(event, topics.of::<E>(), alert_id.to_string())
        .map_err(|e| HandlerError::permanent(format!("encoding {}: {e}", E::NAME)))
}

/// Adds the evidence not yet recorded to an episode, touches it and writes its history row, in
/// one statement; returns what was new.
async fn add_evidence(
    tx: &mut Transaction<'_, Postgres>,
    schema: &SchemaName,
    alert_id: Uuid,
    evidence: &[Evidence],
) -> Result<Vec<Evidence>, HandlerError> {
    let sql = format!(
        "WITH added AS (
             INSERT INTO {schema}.alert_evidence (alert_id, event_id, observed_at, description, value, unit)
             SELECT $1, e.* FROM unnest($2::uuid[], $3::timestamptz[], $4::text[], $5::float8[], $6::text[]) AS e
             ON CONFLICT DO NOTHING RETURNING event_id),
         touched AS (
             UPDATE {schema}.alert SET updated_at = now()
             WHERE alert_id = $1 AND EXISTS (SELECT 1 FROM added)),
         history AS (
             INSERT INTO {schema}.alert_history (alert_id, kind, actor, detail)
             SELECT $1, 'updated', $7, jsonb_build_object('evidence', count(*)) FROM added HAVING count(*) > 0)
         SELECT event_id FROM added"
    );
    let columns = EvidenceColumns::of(evidence);
    let added: std::collections::HashSet<Uuid> = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(alert_id)
        .bind(columns.event_ids)
        .bind(columns.observed)
        .bind(columns.descriptions)
        .bind(columns.values)
        .bind(columns.units)
        .bind(NAME)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect();
    Ok(evidence.iter().filter(|e| added.contains(&e.event_id)).cloned().collect())
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
        outbox.enqueue(&mut tx, outbox_event(topics, &event, alert_id)?).await?;
    }
    trialflow_outbox::audit::append(&mut tx, schema, &audit).await?;
    tx.commit().await?;
    Ok(rows.len())
}
