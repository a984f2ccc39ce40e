//! Services that accept commands and data from upstream systems and write domain rows plus outbox
//! events in one transaction.
//!
//! For now this holds [`workload`], a synthetic service that exercises the outbox end to end; the
//! site API and the ingestion gateway come with their issues.

pub mod workload;
