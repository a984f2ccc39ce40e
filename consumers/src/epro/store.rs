//! The epro-validation consumer's SQL. Every function runs inside the handler's transaction.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgConnection, Row};
use trialflow_outbox::SchemaName;
use trialflow_schemas::{QuestionnaireResponseSubmitted, RejectionReason, WindowStatus};
use uuid::Uuid;

use super::validate::{Accepted, Subject};
use crate::error::HandlerError;

/// What changed about a subject.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SubjectFact<'a> {
    Screened { time_zone: &'a str },
    Enrolled { at: DateTime<Utc> },
    Withdrawn { at: DateTime<Utc> },
}

pub(crate) async fn record_subject(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    subject_id: &str,
    fact: SubjectFact<'_>,
) -> Result<(), HandlerError> {
    let (column, sql_value) = match fact {
        SubjectFact::Screened { .. } => ("time_zone", "$3::text"),
        SubjectFact::Enrolled { .. } => ("enrolled_at", "$3::timestamptz"),
        SubjectFact::Withdrawn { .. } => ("withdrawn_at", "$3::timestamptz"),
    };
    let sql = format!(
        "INSERT INTO {schema}.subject (study_id, subject_id, {column}) VALUES ($1, $2, {sql_value})
         ON CONFLICT (study_id, subject_id) DO UPDATE SET {column} = excluded.{column}"
    );
    let query = sqlx::query(AssertSqlSafe(sql)).bind(study_id).bind(subject_id);
    let query = match fact {
        SubjectFact::Screened { time_zone } => query.bind(time_zone.to_string()),
        SubjectFact::Enrolled { at } | SubjectFact::Withdrawn { at } => query.bind(at.to_rfc3339()),
    };
    query.execute(&mut *conn).await?;
    Ok(())
}

/// What the validator needs before deciding, in one round trip: the content hash of an earlier
/// submission with this id, and the subject if enrolled.
#[derive(Debug)]
pub(crate) struct Known {
    pub(crate) earlier: Option<String>,
    pub(crate) subject: Option<Subject>,
}

pub(crate) async fn known(
    conn: &mut PgConnection,
    schema: &SchemaName,
    submission_id: Uuid,
    study_id: &str,
    subject_id: &str,
) -> Result<Known, HandlerError> {
    let sql = format!(
        "SELECT (SELECT content_hash FROM {schema}.submission WHERE submission_id = $1),
                s.time_zone, s.enrolled_at, s.withdrawn_at
         FROM (SELECT 1) AS one
         LEFT JOIN {schema}.subject s ON s.study_id = $2 AND s.subject_id = $3 AND s.enrolled_at IS NOT NULL"
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(submission_id)
        .bind(study_id)
        .bind(subject_id)
        .fetch_one(&mut *conn)
        .await?;
    let earlier: Option<String> = row.try_get(0)?;
    let enrolled_at: Option<DateTime<Utc>> = row.try_get(2)?;
    let subject = match enrolled_at {
        None => None,
        Some(enrolled_at) => {
            let zone: Option<String> = row.try_get(1)?;
            let zone = zone.as_deref().unwrap_or("UTC").parse::<Tz>().unwrap_or_else(|_| {
                tracing::warn!(study_id, subject_id, ?zone, "Subject time zone unknown; windows in UTC.");
                Tz::UTC
            });
            Some(Subject { zone, enrolled_at, withdrawn_at: row.try_get(3)? })
        }
    };
    Ok(Known { earlier, subject })
}

/// Whether the occurrence already has a completed response.
pub(crate) async fn occurrence_completed(
    conn: &mut PgConnection,
    schema: &SchemaName,
    s: &QuestionnaireResponseSubmitted,
    subject_id: &str,
) -> Result<bool, HandlerError> {
    let Some(occurrence) = &s.scheduled_occurrence else { return Ok(false) };
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {schema}.response WHERE study_id = $1 AND subject_id = $2
                        AND questionnaire = $3 AND scheduled_occurrence = $4 AND status = 'COMPLETED')"
    );
    Ok(sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(&s.envelope.study_id)
        .bind(subject_id)
        .bind(&s.questionnaire)
        .bind(occurrence)
        .fetch_one(&mut *conn)
        .await?)
}

/// Records a rejected submission. Returns false if a submission with this id was recorded meanwhile
/// (another partition got there first): the caller retries and then sees it as a duplicate.
pub(crate) async fn record_decision(
    conn: &mut PgConnection,
    schema: &SchemaName,
    s: &QuestionnaireResponseSubmitted,
    subject_id: &str,
    hash: &str,
    reasons: &[RejectionReason],
) -> Result<bool, HandlerError> {
    let sql = format!(
        "INSERT INTO {schema}.submission (submission_id, study_id, subject_id, content_hash, outcome, reasons)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (submission_id) DO NOTHING"
    );
    let outcome = "rejected";
    let done = sqlx::query(AssertSqlSafe(sql))
        .bind(s.submission_id)
        .bind(&s.envelope.study_id)
        .bind(subject_id)
        .bind(hash)
        .bind(outcome)
        .bind(Json(reasons))
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Records a resubmission of `s.submission_id` with other content (rejected; the first stands),
/// once per event.
pub(crate) async fn record_conflict(
    conn: &mut PgConnection,
    schema: &SchemaName,
    s: &QuestionnaireResponseSubmitted,
    subject_id: &str,
    hash: &str,
    reasons: &[RejectionReason],
) -> Result<(), HandlerError> {
    let sql = format!(
        "INSERT INTO {schema}.conflicting_submission (event_id, submission_id, study_id, subject_id,
                                                     content_hash, reasons)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(s.envelope.event_id)
        .bind(s.submission_id)
        .bind(&s.envelope.study_id)
        .bind(subject_id)
        .bind(hash)
        .bind(Json(reasons))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn window_code(w: WindowStatus) -> &'static str {
    match w {
        WindowStatus::InWindow => "IN_WINDOW",
        WindowStatus::Early => "EARLY",
        WindowStatus::Late => "LATE",
        WindowStatus::OutOfWindow => "OUT_OF_WINDOW",
        WindowStatus::Unscheduled => "UNSCHEDULED",
    }
}

/// Records an accepted submission and stores its response (answers and computed score) in one
/// statement. Returns false if a submission with this id was recorded meanwhile.
pub(crate) async fn record_accepted(
    conn: &mut PgConnection,
    schema: &SchemaName,
    s: &QuestionnaireResponseSubmitted,
    subject_id: &str,
    hash: &str,
    received_at: DateTime<Utc>,
    accepted: &Accepted,
) -> Result<bool, HandlerError> {
    let sql = format!(
        "WITH decided AS (
             INSERT INTO {schema}.submission (submission_id, study_id, subject_id, content_hash, outcome)
             VALUES ($1, $2, $3, $17, 'accepted') ON CONFLICT (submission_id) DO NOTHING
             RETURNING submission_id)
         INSERT INTO {schema}.response (submission_id, study_id, subject_id, questionnaire, questionnaire_version,
             scheduled_occurrence, status, authored_at, received_at, device_time_zone, answers, total_score,
             severity_band, flagged_items, window_status, late_sync)
         SELECT submission_id, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16 FROM decided"
    );
    let status =
        serde_json::to_value(s.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    let authored =
        s.authored_at.to_datetime().ok_or_else(|| HandlerError::permanent("authored_at out of range"))?;
    let done = sqlx::query(AssertSqlSafe(sql))
        .bind(s.submission_id)
        .bind(&s.envelope.study_id)
        .bind(subject_id)
        .bind(&s.questionnaire)
        .bind(&s.questionnaire_version)
        .bind(&s.scheduled_occurrence)
        .bind(status)
        .bind(authored)
        .bind(received_at)
        .bind(&s.device_time_zone)
        .bind(Json(&s.items))
        .bind(accepted.scored.total)
        .bind(&accepted.scored.band)
        .bind(&accepted.scored.flagged)
        .bind(window_code(accepted.window))
        .bind(accepted.late_sync)
        .bind(hash)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}
