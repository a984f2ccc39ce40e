//! The consumer runtime shared by every domain consumer, and (with their issues) the consumers.
//!
//! A domain consumer implements [`Handler`]; [`runtime::run`] gives it exactly-once effects over
//! at-least-once delivery (inbox row in the same transaction as the effects, offsets committed
//! after), per-partition order with partitions in parallel, retries with backoff for transient
//! failures, a dead-letter topic for permanent ones, and parking for "not yet".

pub mod config;
pub mod dlq;
pub mod enrollment;
pub mod epro;
pub mod error;
pub mod events;
mod failure;
pub mod handler;
pub mod kit_allocation;
pub mod metrics;
pub mod monitoring;
pub mod notifier;
mod parking;
mod rebalance;
pub mod risk;
pub mod runtime;
mod shared;
mod span;
pub mod store;

pub use config::{ConsumerConfig, ConsumerSpec};
pub use error::{ConsumerError, HandlerError};
pub use handler::{Context, Handler, Message};

/// Creates a consumer's schema: its outbox (for the events it emits and its dead letters), the
/// runtime's inbox and parked tables, then the consumer's own `migrator`.
pub async fn migrate(
    database_url: &str,
    schema: &trialflow_outbox::SchemaName,
    migrator: Option<sqlx::migrate::Migrator>,
) -> trialflow_outbox::Result<()> {
    trialflow_outbox::migrate(database_url, schema).await?;
    trialflow_outbox::migrate::run_in_schema(
        database_url,
        schema,
        sqlx::migrate!("./migrations"),
        "_consumer_migrations",
    )
    .await?;
    if let Some(migrator) = migrator {
        trialflow_outbox::migrate::run_in_schema(database_url, schema, migrator, "_sqlx_migrations").await?;
    }
    Ok(())
}
