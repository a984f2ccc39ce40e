//! The `trialflow` binary: one subcommand per component, so any component runs alone (in its own
//! container) or all together for local runs.

pub mod audit;
pub mod cli;
pub mod config_check;
pub mod demo;
pub mod dlq;
pub mod quarantine;
pub mod services;
pub mod telemetry;
pub mod topics;
