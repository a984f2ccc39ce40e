//! The epro-validation consumer's SQL. Every function runs inside the handler's transaction.
//!
//! A batch reads what its submissions need with [`prefetch`] (one query per kind for the whole
//! batch) and writes its decisions with [`Decisions::write`] (one statement per table); the
//! per-submission reads remain for what the prefetch did not cover (a subject whose lifecycle
//! event came in the same batch, a submission whose strings could not be sent to the database).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgConnection, Row};
use trialflow_outbox::SchemaName;
use trialflow_schemas::ResponseStatus;
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
    let subject = subject(study_id, subject_id, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?);
    Ok(Known { earlier, subject })
}

/// The subject as the validator sees it: `None` until enrolled.
fn subject(
    study_id: &str,
    subject_id: &str,
    zone: Option<String>,
    enrolled_at: Option<DateTime<Utc>>,
    withdrawn_at: Option<DateTime<Utc>>,
) -> Option<Subject> {
    let enrolled_at = enrolled_at?;
    let zone = zone.as_deref().unwrap_or("UTC").parse::<Tz>().unwrap_or_else(|_| {
        tracing::warn!(study_id, subject_id, ?zone, "Subject time zone unknown; windows in UTC.");
        Tz::UTC
    });
    Some(Subject { zone, enrolled_at, withdrawn_at })
}

/// A subject: (study id, subject id).
pub(crate) type SubjectKey = (String, String);
/// An occurrence of a subject's questionnaire: (study id, subject id, questionnaire, occurrence).
pub(crate) type OccurrenceKey = (String, String, String, String);

/// What a batch's submissions need to be decided, read with one query per kind. A key that is
/// absent was not asked for (the caller asks the database then); a key that is present holds the
/// answer, `None`/`false` included.
#[derive(Debug, Default)]
pub(crate) struct Prefetched {
    /// The content hash of the submission recorded before with this id.
    pub(crate) earlier: HashMap<Uuid, Option<String>>,
    /// The subject, if enrolled.
    pub(crate) subjects: HashMap<SubjectKey, Option<Subject>>,
    /// Whether the occurrence has a completed response.
    pub(crate) completed: HashMap<OccurrenceKey, bool>,
}

/// Reads, for the submissions of a batch, the earlier submissions with their ids, their subjects
/// and the occurrences they complete. Every string given must be storable (see
/// [`super::validate::unstorable_text`]); submission ids always are.
pub(crate) async fn prefetch(
    conn: &mut PgConnection,
    schema: &SchemaName,
    submission_ids: &[Uuid],
    subjects: &[SubjectKey],
    occurrences: &[OccurrenceKey],
) -> Result<Prefetched, HandlerError> {
    let mut known = Prefetched::default();
    if !submission_ids.is_empty() {
        let sql = format!(
            "SELECT submission_id, content_hash FROM {schema}.submission WHERE submission_id = ANY($1)"
        );
        let rows: Vec<(Uuid, String)> =
            sqlx::query_as(AssertSqlSafe(sql)).bind(submission_ids).fetch_all(&mut *conn).await?;
        known.earlier = submission_ids.iter().map(|id| (*id, None)).collect();
        for (id, hash) in rows {
            known.earlier.insert(id, Some(hash));
        }
    }
    if !subjects.is_empty() {
        let sql = format!(
            "SELECT s.study_id, s.subject_id, s.time_zone, s.enrolled_at, s.withdrawn_at
             FROM unnest($1::text[], $2::text[]) AS k(study_id, subject_id)
             JOIN {schema}.subject s USING (study_id, subject_id)"
        );
        let (studies, ids): (Vec<&str>, Vec<&str>) =
            subjects.iter().map(|(study, subject)| (study.as_str(), subject.as_str())).unzip();
        let rows = sqlx::query(AssertSqlSafe(sql)).bind(studies).bind(ids).fetch_all(&mut *conn).await?;
        known.subjects = subjects.iter().map(|k| (k.clone(), None)).collect();
        for row in rows {
            let (study_id, subject_id): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            let found = subject(&study_id, &subject_id, row.try_get(2)?, row.try_get(3)?, row.try_get(4)?);
            known.subjects.insert((study_id, subject_id), found);
        }
    }
    if !occurrences.is_empty() {
        let sql = format!(
            "SELECT DISTINCT r.study_id, r.subject_id, r.questionnaire, r.scheduled_occurrence
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                  AS k(study_id, subject_id, questionnaire, scheduled_occurrence)
             JOIN {schema}.response r USING (study_id, subject_id, questionnaire, scheduled_occurrence)
             WHERE r.status = 'COMPLETED'"
        );
        let mut columns: [Vec<&str>; 4] = Default::default();
        for (study, subject, questionnaire, occurrence) in occurrences {
            columns[0].push(study);
            columns[1].push(subject);
            columns[2].push(questionnaire);
            columns[3].push(occurrence);
        }
        let [studies, ids, questionnaires, occurrence_ids] = columns;
        let rows: Vec<OccurrenceKey> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(studies)
            .bind(ids)
            .bind(questionnaires)
            .bind(occurrence_ids)
            .fetch_all(&mut *conn)
            .await?;
        known.completed = occurrences.iter().map(|k| (k.clone(), false)).collect();
        for key in rows {
            known.completed.insert(key, true);
        }
    }
    Ok(known)
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

fn window_code(w: WindowStatus) -> &'static str {
    match w {
        WindowStatus::InWindow => "IN_WINDOW",
        WindowStatus::Early => "EARLY",
        WindowStatus::Late => "LATE",
        WindowStatus::OutOfWindow => "OUT_OF_WINDOW",
        WindowStatus::Unscheduled => "UNSCHEDULED",
    }
}

/// The decisions of a batch, written at its end with one statement per table.
#[derive(Debug, Default)]
pub(crate) struct Decisions {
    submissions: Vec<Decided>,
    responses: Vec<Response>,
    conflicts: Vec<Conflict>,
}

/// A row of `submission`.
#[derive(Debug)]
struct Decided {
    submission_id: Uuid,
    study_id: String,
    subject_id: String,
    hash: String,
    outcome: &'static str,
    reasons: Vec<RejectionReason>,
}

/// A row of `response`.
#[derive(Debug)]
struct Response {
    submission_id: Uuid,
    study_id: String,
    subject_id: String,
    questionnaire: String,
    questionnaire_version: String,
    scheduled_occurrence: Option<String>,
    status: String,
    authored_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    device_time_zone: String,
    answers: Vec<trialflow_schemas::Answer>,
    total_score: Option<i32>,
    severity_band: Option<String>,
    flagged_items: Vec<String>,
    window_status: &'static str,
    late_sync: bool,
}

/// A row of `conflicting_submission`.
#[derive(Debug)]
struct Conflict {
    event_id: Uuid,
    submission_id: Uuid,
    study_id: String,
    subject_id: String,
    hash: String,
    reasons: Vec<RejectionReason>,
}

/// The `status` column's text of a response status.
pub(crate) fn status_code(status: ResponseStatus) -> String {
    serde_json::to_value(status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

impl Decisions {
    /// A rejected submission.
    pub(crate) fn rejected(
        &mut self,
        s: &QuestionnaireResponseSubmitted,
        subject_id: &str,
        hash: &str,
        reasons: &[RejectionReason],
    ) {
        self.submissions.push(Decided {
            submission_id: s.submission_id,
            study_id: s.envelope.study_id.clone(),
            subject_id: subject_id.to_string(),
            hash: hash.to_string(),
            outcome: "rejected",
            reasons: reasons.to_vec(),
        });
    }

    /// A resubmission of `s.submission_id` with other content (rejected; the first stands), once
    /// per event.
    pub(crate) fn conflict(
        &mut self,
        s: &QuestionnaireResponseSubmitted,
        subject_id: &str,
        hash: &str,
        reasons: &[RejectionReason],
    ) {
        self.conflicts.push(Conflict {
            event_id: s.envelope.event_id,
            submission_id: s.submission_id,
            study_id: s.envelope.study_id.clone(),
            subject_id: subject_id.to_string(),
            hash: hash.to_string(),
            reasons: reasons.to_vec(),
        });
    }

    /// An accepted submission and its response (answers and computed score).
    pub(crate) fn accepted(
        &mut self,
        s: &QuestionnaireResponseSubmitted,
        subject_id: &str,
        hash: &str,
        received_at: DateTime<Utc>,
        accepted: &Accepted,
    ) -> Result<(), HandlerError> {
        let authored =
            s.authored_at.to_datetime().ok_or_else(|| HandlerError::permanent("authored_at out of range"))?;
        self.submissions.push(Decided {
            submission_id: s.submission_id,
            study_id: s.envelope.study_id.clone(),
            subject_id: subject_id.to_string(),
            hash: hash.to_string(),
            outcome: "accepted",
            reasons: Vec::new(),
        });
        self.responses.push(Response {
            submission_id: s.submission_id,
            study_id: s.envelope.study_id.clone(),
            subject_id: subject_id.to_string(),
            questionnaire: s.questionnaire.clone(),
            questionnaire_version: s.questionnaire_version.clone(),
            scheduled_occurrence: s.scheduled_occurrence.clone(),
            status: status_code(s.status),
            authored_at: authored,
            received_at,
            device_time_zone: s.device_time_zone.clone(),
            answers: s.items.clone(),
            total_score: accepted.scored.total,
            severity_band: accepted.scored.band.clone(),
            flagged_items: accepted.scored.flagged.clone(),
            window_status: window_code(accepted.window),
            late_sync: accepted.late_sync,
        });
        Ok(())
    }

    /// Writes the batch's decisions: submissions first (a response and a conflicting
    /// resubmission refer to theirs), in submission id order (two batches that decide the same
    /// ids wait for each other instead of deadlocking). A submission id recorded meanwhile by
    /// another transaction (another partition got there first) is a transient error: the batch
    /// runs again and then sees it as a duplicate.
    pub(crate) async fn write(
        mut self,
        conn: &mut PgConnection,
        schema: &SchemaName,
    ) -> Result<(), HandlerError> {
        if !self.submissions.is_empty() {
            self.submissions.sort_by_key(|d| d.submission_id);
            let sql = format!(
                "WITH decided AS (
                     INSERT INTO {schema}.submission
                         (submission_id, study_id, subject_id, content_hash, outcome, reasons)
                     SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[])
                     ON CONFLICT (submission_id) DO NOTHING RETURNING 1)
                 SELECT count(*) FROM decided"
            );
            let d = &self.submissions;
            let inserted: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(d.iter().map(|d| d.submission_id).collect::<Vec<_>>())
                .bind(d.iter().map(|d| d.study_id.as_str()).collect::<Vec<_>>())
                .bind(d.iter().map(|d| d.subject_id.as_str()).collect::<Vec<_>>())
                .bind(d.iter().map(|d| d.hash.as_str()).collect::<Vec<_>>())
                .bind(d.iter().map(|d| d.outcome).collect::<Vec<_>>())
                .bind(d.iter().map(|d| Json(&d.reasons)).collect::<Vec<_>>())
                .fetch_one(&mut *conn)
                .await?;
            if inserted != d.len() as i64 {
                return Err(HandlerError::transient(format!(
                    "{} of {} submissions recorded concurrently; deciding again",
                    d.len() as i64 - inserted,
                    d.len()
                )));
            }
        }
        if !self.responses.is_empty() {
            let sql = format!(
                "INSERT INTO {schema}.response (submission_id, study_id, subject_id, questionnaire,
                     questionnaire_version, scheduled_occurrence, status, authored_at, received_at,
                     device_time_zone, answers, total_score, severity_band, flagged_items, window_status,
                     late_sync)
                 SELECT r.submission_id, r.study_id, r.subject_id, r.questionnaire, r.questionnaire_version,
                     r.scheduled_occurrence, r.status, r.authored_at, r.received_at, r.device_time_zone,
                     r.answers, r.total_score, r.severity_band,
                     ARRAY(SELECT jsonb_array_elements_text(r.flagged_items)), r.window_status, r.late_sync
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                             $7::text[], $8::timestamptz[], $9::timestamptz[], $10::text[], $11::jsonb[],
                             $12::int[], $13::text[], $14::jsonb[], $15::text[], $16::bool[])
                      AS r(submission_id, study_id, subject_id, questionnaire, questionnaire_version,
                           scheduled_occurrence, status, authored_at, received_at, device_time_zone, answers,
                           total_score, severity_band, flagged_items, window_status, late_sync)"
            );
            let r = &self.responses;
            sqlx::query(AssertSqlSafe(sql))
                .bind(r.iter().map(|r| r.submission_id).collect::<Vec<_>>())
                .bind(r.iter().map(|r| r.study_id.as_str()).collect::<Vec<_>>())
                .bind(r.iter().map(|r| r.subject_id.as_str()).collect::<Vec<_>>())
                .bind(r.iter().map(|r| r.questionnaire.as_str()).collect::<Vec<_>>())
                .bind(r.iter().map(|r| r.questionnaire_version.as_str()).collect::<Vec<_>>())
                .bind(r.iter().map(|r| r.scheduled_occurrence.as_deref()).collect::<Vec<_>>())
                .bind(r.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
                .bind(r.iter().map(|r| r.authored_at).collect::<Vec<_>>())
                .bind(r.iter().map(|r| r.received_at).collect::<Vec<_>>())
                .bind(r.iter().map(|r| r.device_time_zone.as_str()).collect::<Vec<_>>())
                .bind(r.iter().map(|r| Json(&r.answers)).collect::<Vec<_>>())
                .bind(r.iter().map(|r| r.total_score).collect::<Vec<_>>())
                .bind(r.iter().map(|r| r.severity_band.as_deref()).collect::<Vec<_>>())
                .bind(r.iter().map(|r| Json(&r.flagged_items)).collect::<Vec<_>>())
                .bind(r.iter().map(|r| r.window_status).collect::<Vec<_>>())
                .bind(r.iter().map(|r| r.late_sync).collect::<Vec<_>>())
                .execute(&mut *conn)
                .await?;
        }
        if !self.conflicts.is_empty() {
            let sql = format!(
                "INSERT INTO {schema}.conflicting_submission (event_id, submission_id, study_id, subject_id,
                                                             content_hash, reasons)
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::jsonb[])
                 ON CONFLICT (event_id) DO NOTHING"
            );
            let c = &self.conflicts;
            sqlx::query(AssertSqlSafe(sql))
                .bind(c.iter().map(|c| c.event_id).collect::<Vec<_>>())
                .bind(c.iter().map(|c| c.submission_id).collect::<Vec<_>>())
                .bind(c.iter().map(|c| c.study_id.as_str()).collect::<Vec<_>>())
                .bind(c.iter().map(|c| c.subject_id.as_str()).collect::<Vec<_>>())
                .bind(c.iter().map(|c| c.hash.as_str()).collect::<Vec<_>>())
                .bind(c.iter().map(|c| Json(&c.reasons)).collect::<Vec<_>>())
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}
