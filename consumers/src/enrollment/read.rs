//! What the enrollment service's tables say about a study, for reports (the demo's summary): read
//! here, next to the migrations that define the tables, so that changing a table breaks this
//! crate's tests, not a report at run time.

use sqlx::{AssertSqlSafe, PgPool};
use trialflow_outbox::SchemaName;

/// Subjects of one group (a site or an arm). A randomization number and a kit number stay with
/// the subject through a later hold or withdrawal; only `on_hold` is the current state.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Randomized {
    /// The site id or the arm code ("" for subjects without a site).
    pub group: String,
    /// Subjects given a randomization number.
    pub randomized: i64,
    /// Of them, dispensed a kit (enrolled).
    pub enrolled: i64,
    /// Subjects on hold now.
    pub on_hold: i64,
}

/// Subjects per site of study `study_id`.
pub async fn by_site(pool: &PgPool, schema: &SchemaName, study_id: &str) -> sqlx::Result<Vec<Randomized>> {
    let sql = format!(
        "SELECT coalesce(site_id, '') AS group, count(randomization_number) AS randomized,
                count(kit_number) AS enrolled, count(*) FILTER (WHERE status = 'on_hold') AS on_hold
         FROM {schema}.subject WHERE study_id = $1 GROUP BY 1"
    );
    sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await
}

/// The arm codes of study `study_id`'s configuration.
pub async fn arms(pool: &PgPool, schema: &SchemaName, study_id: &str) -> sqlx::Result<Vec<String>> {
    let sql = format!(
        "SELECT arm->>0 FROM {schema}.study, jsonb_array_elements(arms) AS arm
         WHERE study_id = $1 AND arm->>0 IS NOT NULL"
    );
    sqlx::query_scalar(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await
}

/// Randomized subjects per arm of study `study_id` (unblinded: for reports of unblinded roles).
pub async fn by_arm(pool: &PgPool, schema: &SchemaName, study_id: &str) -> sqlx::Result<Vec<Randomized>> {
    let sql = format!(
        "SELECT slot.arm_code AS group, count(*) AS randomized, count(s.kit_number) AS enrolled,
                count(*) FILTER (WHERE s.status = 'on_hold') AS on_hold
         FROM {schema}.subject s
         JOIN {schema}.randomization_slot slot
           ON slot.study_id = s.study_id AND slot.randomization_number = s.randomization_number
         WHERE s.study_id = $1 GROUP BY slot.arm_code"
    );
    sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await
}

/// Subjects on hold now per hold reason code of study `study_id` (a subject held for several
/// reasons counts under each).
pub async fn on_hold_by_reason(
    pool: &PgPool,
    schema: &SchemaName,
    study_id: &str,
) -> sqlx::Result<Vec<(String, i64)>> {
    let sql = format!(
        "SELECT code, count(DISTINCT subject_id)
         FROM {schema}.subject, unnest(string_to_array(hold_reason_code, ',')) AS code
         WHERE study_id = $1 AND status = 'on_hold' GROUP BY code"
    );
    sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await
}

/// UNBLINDED: what a subject was randomized to — for the emergency code break only.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Treatment {
    pub arm_code: String,
    pub randomization_number: String,
    /// The kit dispensed at enrollment, once one is.
    pub kit_number: Option<String>,
}

/// The treatment of subject `subject_id` of study `study_id`, if randomized. Reads in `conn`
/// (the code break's transaction, in the same database).
pub async fn treatment(
    conn: &mut sqlx::PgConnection,
    schema: &SchemaName,
    study_id: &str,
    subject_id: &str,
) -> sqlx::Result<Option<Treatment>> {
    let sql = format!(
        "SELECT slot.arm_code, slot.randomization_number, s.kit_number
         FROM {schema}.randomization_slot slot
         LEFT JOIN {schema}.subject s ON s.study_id = slot.study_id AND s.subject_id = slot.subject_id
         WHERE slot.study_id = $1 AND slot.subject_id = $2"
    );
    sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).bind(subject_id).fetch_optional(conn).await
}
