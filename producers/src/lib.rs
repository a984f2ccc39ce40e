//! Services that accept commands and data from upstream systems and write domain rows plus outbox
//! events in one transaction.
//!
//! * [`site_api`]: the HTTP API of sites and EDC integrations (study and site set-up, subject
//!   screening, consent, enrollment requests, withdrawal, kit shipments).
//! * [`epro_gateway`]: the HTTP gateway patient apps submit questionnaire responses to; it
//!   publishes each straight to Kafka and answers once the broker acknowledged (no database, no
//!   outbox: the broker's acknowledgement is the commit).
//!
//! What the HTTP services share with the alert API (identity, the error body, the input rules) is
//! in `trialflow-http`.

pub mod epro_gateway;
pub mod site_api;
