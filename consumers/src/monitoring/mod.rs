//! The monitoring service: the monitoring consumer (per-study rules over vital signs, adverse
//! events, accepted ePRO responses and supply/enrollment problems → alert episodes with escalation)
//! and, sharing its schema, the researchers' alert API (`api`).

pub mod api;
pub mod baseline;
mod consumer;
mod episodes;
pub mod read;
pub mod rules;

pub use consumer::{Monitoring, run, spec};
pub use episodes::MAX_LEVEL;

use trialflow_outbox::SchemaName;

/// Consumer name (inbox key, default group id, metric label) and `source_system` of its events.
pub const NAME: &str = "monitoring";
/// Its default service schema (shared with the alert API).
pub const SCHEMA: &str = "monitoring";

pub fn schema() -> SchemaName {
    SchemaName::new(SCHEMA).unwrap_or_else(|_| unreachable!("`{SCHEMA}` is a valid schema name"))
}

/// Creates the service's schema: outbox, inbox, parked and its own tables (alerts, evidence,
/// history, observations).
pub async fn migrate(database_url: &str, schema: &SchemaName) -> trialflow_outbox::Result<()> {
    crate::migrate(database_url, schema, Some(sqlx::migrate!("./migrations/monitoring"))).await
}
