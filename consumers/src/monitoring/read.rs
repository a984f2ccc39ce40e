//! What the monitoring service's tables say about a study, for reports (the demo's summary): read
//! here, next to the migrations that define the tables, so that changing a table breaks this
//! crate's tests, not a report at run time.

use sqlx::{AssertSqlSafe, PgPool};
use trialflow_outbox::SchemaName;

/// The alert episodes of one rule and severity.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct RuleAlerts {
    pub rule_id: String,
    pub severity: String,
    pub episodes: i64,
    /// Readings recorded as evidence of those episodes.
    pub triggering_readings: i64,
    pub open: i64,
    pub acknowledged: i64,
    pub resolved: i64,
    /// Episodes escalated at least once.
    pub escalated: i64,
}

/// Alert episodes per rule and severity of study `study_id`.
pub async fn alerts_by_rule(
    pool: &PgPool,
    schema: &SchemaName,
    study_id: &str,
) -> sqlx::Result<Vec<RuleAlerts>> {
    let sql = format!(
        "SELECT a.rule_id, a.severity, count(*) AS episodes,
                coalesce(sum(e.n), 0)::bigint AS triggering_readings,
                count(*) FILTER (WHERE a.status = 'open') AS open,
                count(*) FILTER (WHERE a.status = 'acknowledged') AS acknowledged,
                count(*) FILTER (WHERE a.status = 'resolved') AS resolved,
                count(*) FILTER (WHERE a.level > 0) AS escalated
         FROM {schema}.alert a
         LEFT JOIN (SELECT alert_id, count(*) AS n FROM {schema}.alert_evidence GROUP BY alert_id) e
           USING (alert_id)
         WHERE a.study_id = $1 GROUP BY a.rule_id, a.severity"
    );
    sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await
}
