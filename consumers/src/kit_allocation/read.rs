//! What the kit-allocation service's tables say about a study, for reports (the demo's summary)
//! and the replay's pacing: read here, next to the migrations that define the tables, so that
//! changing a table breaks this crate's tests, not a report at run time.

use sqlx::{AssertSqlSafe, PgPool};
use trialflow_outbox::SchemaName;

/// One site's kits.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct SiteKits {
    pub site_id: String,
    /// Kits received (shipped to the site).
    pub received: i64,
    /// Of them, dispensed to a subject.
    pub allocated: i64,
    /// Of them, on the shelf.
    pub available: i64,
}

/// Kits per site of study `study_id` (sites without kits are left out).
pub async fn by_site(pool: &PgPool, schema: &SchemaName, study_id: &str) -> sqlx::Result<Vec<SiteKits>> {
    let sql = format!(
        "SELECT site_id, count(*) AS received, count(*) FILTER (WHERE status = 'allocated') AS allocated,
                count(*) FILTER (WHERE status = 'available') AS available
         FROM {schema}.kit WHERE study_id = $1 GROUP BY site_id"
    );
    sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await
}

/// Kits of study `study_id` the service knows, whatever their state.
pub async fn known(pool: &PgPool, schema: &SchemaName, study_id: &str) -> sqlx::Result<i64> {
    let sql = format!("SELECT count(*) FROM {schema}.kit WHERE study_id = $1");
    sqlx::query_scalar(AssertSqlSafe(sql)).bind(study_id).fetch_one(pool).await
}
