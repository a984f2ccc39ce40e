//! What the site API's tables say about a study, for reports (the demo's summary): read here,
//! next to the migrations that define the tables, so that changing a table breaks this crate's
//! tests, not a report at run time.

use sqlx::{AssertSqlSafe, PgPool};
use trialflow_outbox::SchemaName;

/// One site's screening outcomes.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct SiteScreening {
    pub site_id: String,
    /// Subjects screened.
    pub screened: i64,
    /// Of them, found not eligible.
    pub screen_failed: i64,
    /// Of them, withdrawn.
    pub withdrawn: i64,
}

/// The sites of study `study_id`, in no particular order.
pub async fn sites(pool: &PgPool, schema: &SchemaName, study_id: &str) -> sqlx::Result<Vec<String>> {
    let sql = format!("SELECT site_id FROM {schema}.site WHERE study_id = $1");
    sqlx::query_scalar(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await
}

/// Screening outcomes per site of study `study_id` (sites without subjects are left out).
pub async fn screening_by_site(
    pool: &PgPool,
    schema: &SchemaName,
    study_id: &str,
) -> sqlx::Result<Vec<SiteScreening>> {
    let sql = format!(
        "SELECT site_id, count(*) AS screened, count(*) FILTER (WHERE NOT eligible) AS screen_failed,
                count(*) FILTER (WHERE withdrawn_at IS NOT NULL) AS withdrawn
         FROM {schema}.subject WHERE study_id = $1 GROUP BY site_id"
    );
    sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await
}

/// Withdrawn subjects per withdrawal reason code of study `study_id` (e.g. CDISC DSDECOD
/// `ADVERSE EVENT`), in no particular order.
pub async fn withdrawn_by_reason(
    pool: &PgPool,
    schema: &SchemaName,
    study_id: &str,
) -> sqlx::Result<Vec<(String, i64)>> {
    let sql = format!(
        "SELECT coalesce(withdrawal_reason_code, ''), count(*) FROM {schema}.subject
         WHERE study_id = $1 AND withdrawn_at IS NOT NULL GROUP BY 1"
    );
    sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await
}
