//! Services that accept commands and data from upstream systems and write domain rows plus outbox
//! events in one transaction.
//!
//! * [`site_api`]: the HTTP API of sites and EDC integrations (study and site set-up, subject
//!   screening, consent, enrollment requests, withdrawal, kit shipments).
//! * [`workload`]: a synthetic service that exercises the outbox end to end (demo, benchmarks).
//!
//! The ingestion gateway comes with its issue.

pub mod site_api;
pub mod workload;
