//! Services that accept commands and data from upstream systems and write domain rows plus outbox
//! events in one transaction.
//!
//! * [`site_api`]: the HTTP API of sites and EDC integrations (study and site set-up, subject
//!   screening, consent, enrollment requests, withdrawal, kit shipments).
//! * [`epro_gateway`]: the HTTP gateway patient apps submit questionnaire responses to; it
//!   publishes each straight to Kafka and answers once the broker acknowledged (no database, no
//!   outbox: the broker's acknowledgement is the commit).
//! * [`edc`]: an upstream EDC publishing clinical records straight to their topics.
//! * [`cdisc_pilot`]: the CDISC pilot study's data and its replay plan.
//! * [`input`]: what the HTTP services accept (strings, bodies, instants), shared with the ePRO
//!   validation consumer.
//! * [`workload`]: a synthetic service that exercises the outbox end to end (demo, benchmarks).

pub mod cdisc_pilot;
pub mod edc;
pub mod epro_gateway;
pub mod input;
pub mod site_api;
pub mod workload;
