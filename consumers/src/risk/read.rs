//! What the risk service shows: every site's KRIs of a study at the last evaluation.

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, PgPool};
use trialflow_outbox::SchemaName;

/// One site's result for one KRI.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SiteKri {
    pub site_id: String,
    pub kri: String,
    pub numerator: f64,
    pub denominator: f64,
    pub metric: f64,
    /// Over-dispersion-adjusted z-score; `None` below the KRI's minimum denominator or when the
    /// study's sites cannot be told apart.
    pub score: Option<f64>,
    /// −2 (red, low) … 2 (red, high); `None` without a score.
    pub flag: Option<i16>,
    pub flag_changed_at: DateTime<Utc>,
}

/// One KRI of the study as a whole.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StudyKri {
    pub kri: String,
    /// The study's metric.
    pub overall: f64,
    /// The over-dispersion factor φ.
    pub factor: Option<f64>,
}

/// Every site's KRIs of `study_id`, by site then KRI.
pub async fn site_kris(
    pool: &PgPool,
    schema: &SchemaName,
    study_id: &str,
) -> Result<Vec<SiteKri>, sqlx::Error> {
    let sql = format!(
        "SELECT site_id, kri, numerator, denominator, metric, score, flag, flag_changed_at
         FROM {schema}.site_kri WHERE study_id = $1 ORDER BY site_id, kri"
    );
    sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await
}

/// The study's metric and over-dispersion factor per KRI.
pub async fn study_kris(
    pool: &PgPool,
    schema: &SchemaName,
    study_id: &str,
) -> Result<Vec<StudyKri>, sqlx::Error> {
    let sql = format!("SELECT kri, overall, factor FROM {schema}.study_kri WHERE study_id = $1 ORDER BY kri");
    sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await
}
