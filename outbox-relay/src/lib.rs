//! The transactional outbox of trialflow.
//!
//! * [`Outbox`] — the writer every service uses: `outbox.enqueue(&mut tx, event)` inside the
//!   service's own transaction, so domain rows and outgoing events commit together or not at all.
//! * [`relay::run`] — the relay that publishes outbox rows to Kafka in commit-safe order, with
//!   shard ownership so several relays can run at once; rows the broker refuses for good go to
//!   the [`quarantine`].
//! * [`audit`] — the service's hash-chained, append-only audit trail, written in the same
//!   transaction as the change it records.
//! * [`migrate()`] — creates a service schema's outbox and audit trail.

pub mod audit;
pub mod config;
pub mod error;
pub mod exactly_once;
pub mod health;
pub mod kafka;
pub mod metrics;
pub mod migrate;
pub mod publisher;
pub mod quarantine;
pub mod relay;
pub mod retry;
pub mod schema;
pub mod shard;
pub mod store;
pub mod topics;
pub mod trace;
pub mod writer;

pub use audit::AuditRecord;
pub use config::{DatabaseConfig, KafkaConfig, RelayConfig};
pub use error::{OutboxError, Result};
pub use migrate::{migrate, migrate_service, set_shard_count};
pub use schema::SchemaName;
pub use writer::{Outbox, OutboxEvent, RawRecord};
