//! What the ePRO validation service's tables say about a study, for reports (the demo's summary)
//! and the replay's pacing: read here, next to the migrations that define the tables, so that
//! changing a table breaks this crate's tests, not a report at run time.

use sqlx::{AssertSqlSafe, PgPool};
use trialflow_outbox::SchemaName;

/// The decisions on a study's submissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Decisions {
    pub accepted: i64,
    /// Of the accepted, those synchronised late (authored long before they arrived).
    pub accepted_late_sync: i64,
    /// Rejected, conflicting resubmissions included.
    pub rejected: i64,
}

/// The decisions on study `study_id`'s submissions.
pub async fn decisions(pool: &PgPool, schema: &SchemaName, study_id: &str) -> sqlx::Result<Decisions> {
    let sql = format!(
        "SELECT (SELECT count(*) FROM {schema}.submission WHERE study_id = $1 AND outcome = 'accepted') AS accepted,
                (SELECT count(*) FROM {schema}.response WHERE study_id = $1 AND late_sync) AS accepted_late_sync,
                (SELECT count(*) FROM {schema}.submission WHERE study_id = $1 AND outcome = 'rejected')
                  + (SELECT count(*) FROM {schema}.conflicting_submission WHERE study_id = $1) AS rejected"
    );
    sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_one(pool).await
}

/// Rejections per reason code of study `study_id`: a decision with several reasons counts once
/// under each of its codes.
pub async fn rejected_by_reason(
    pool: &PgPool,
    schema: &SchemaName,
    study_id: &str,
) -> sqlx::Result<Vec<(String, i64)>> {
    let sql = format!(
        "SELECT code, count(*) FROM (
             SELECT DISTINCT submission_id::text AS decision, coalesce(reason->>'code', '?') AS code
             FROM {schema}.submission, jsonb_array_elements(reasons) AS reason
             WHERE study_id = $1 AND outcome = 'rejected'
             UNION ALL
             SELECT DISTINCT event_id::text, coalesce(reason->>'code', '?')
             FROM {schema}.conflicting_submission, jsonb_array_elements(reasons) AS reason
             WHERE study_id = $1) AS decisions
         GROUP BY code"
    );
    sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await
}

/// Accepted responses per schedule window status of study `study_id`.
pub async fn accepted_by_window(
    pool: &PgPool,
    schema: &SchemaName,
    study_id: &str,
) -> sqlx::Result<Vec<(String, i64)>> {
    let sql = format!(
        "SELECT window_status, count(*) FROM {schema}.response WHERE study_id = $1 GROUP BY window_status"
    );
    sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await
}

/// Whether the service knows subject `subject_id` of study `study_id` as enrolled (its schedule
/// starts then).
pub async fn knows_enrolled(
    pool: &PgPool,
    schema: &SchemaName,
    study_id: &str,
    subject_id: &str,
) -> sqlx::Result<bool> {
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {schema}.subject
                        WHERE study_id = $1 AND subject_id = $2 AND enrolled_at IS NOT NULL)"
    );
    sqlx::query_scalar(AssertSqlSafe(sql)).bind(study_id).bind(subject_id).fetch_one(pool).await
}
