//! The world around the pipeline, simulated. Nothing here runs in a deployment: these play the
//! parts of the systems and people the pipeline serves, so that the demo, the end-to-end tests and
//! the benchmarks can drive it the way its clients do.
//!
//! * [`edc`]: an upstream EDC publishing clinical records straight to their topics.
//! * [`cdisc_pilot`]: the CDISC pilot study's data and its replay plan.

pub mod cdisc_pilot;
pub mod edc;
