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

/// A study's last evaluation as a whole: when, the study's metric and factor per KRI, and every
/// site's result, read in one snapshot (the evaluator replaces them in one transaction, so two
/// separate reads could mix two evaluations).
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// `None`: never evaluated (then both lists are empty).
    pub evaluated_at: Option<DateTime<Utc>>,
    /// By KRI.
    pub study: Vec<StudyKri>,
    /// By site, then KRI.
    pub sites: Vec<SiteKri>,
}

/// The last evaluation of `study_id`, in one snapshot.
pub async fn evaluation(
    pool: &PgPool,
    schema: &SchemaName,
    study_id: &str,
) -> Result<Evaluation, sqlx::Error> {
    let mut tx = pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    let evaluated_at = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT evaluated_at FROM {schema}.study WHERE study_id = $1"
    )))
    .bind(study_id)
    .fetch_optional(&mut *tx)
    .await?;
    let study = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT kri, overall, factor FROM {schema}.study_kri WHERE study_id = $1 ORDER BY kri"
    )))
    .bind(study_id)
    .fetch_all(&mut *tx)
    .await?;
    let sites = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT site_id, kri, numerator, denominator, metric, score, flag, flag_changed_at
         FROM {schema}.site_kri WHERE study_id = $1 ORDER BY site_id, kri"
    )))
    .bind(study_id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Evaluation { evaluated_at, study, sites })
}

/// The subjects the risk service has heard of at `site_id` of `study_id` (their site is the one
/// of the first event naming it), by id.
pub async fn site_subjects(
    pool: &PgPool,
    schema: &SchemaName,
    study_id: &str,
    site_id: &str,
) -> Result<Vec<String>, sqlx::Error> {
    let sql = format!(
        "SELECT subject_id FROM {schema}.subject WHERE study_id = $1 AND site_id = $2 ORDER BY subject_id"
    );
    sqlx::query_scalar(AssertSqlSafe(sql)).bind(study_id).bind(site_id).fetch_all(pool).await
}

/// The site of a subject of `study_id`: `None` when the risk service never heard of the subject,
/// `Some(None)` when no event of it named a site.
pub async fn subject_site(
    pool: &PgPool,
    schema: &SchemaName,
    study_id: &str,
    subject_id: &str,
) -> Result<Option<Option<String>>, sqlx::Error> {
    let sql = format!("SELECT site_id FROM {schema}.subject WHERE study_id = $1 AND subject_id = $2");
    sqlx::query_scalar(AssertSqlSafe(sql)).bind(study_id).bind(subject_id).fetch_optional(pool).await
}
