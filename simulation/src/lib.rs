//! The world around the pipeline, simulated. Nothing here runs in a deployment: these play the
//! parts of the systems and people the pipeline serves, so that the demo, the end-to-end tests and
//! the benchmarks can drive it the way its clients do.
//!
//! * [`edc`]: an upstream EDC publishing clinical records straight to their topics.
//! * [`cdisc_pilot`]: the CDISC pilot study's data and its replay plan.
//! * [`replay`]: the driver that replays the pilot through a pipeline started in this process
//!   (`trialflow replay cdisc-pilot`, `trialflow demo`) and reports what came of it.
//! * [`load`]: the synthetic load generator (`trialflow load`, the `load` benchmark).
//! * [`settle`]: waiting until the pipeline has nothing left in flight.
//! * [`summary`]: what a study looks like after a run, read from the services' tables.
//! * [`stats`]: nearest-rank quantiles, as every report and benchmark gives them.
//!
//! The commands themselves (their arguments, starting the local stack, serving on after the
//! summary) live in the `trialflow` binary; the in-process pipeline in `trialflow-pipeline`.

pub mod cdisc_pilot;
pub mod edc;
pub mod load;
pub mod replay;
pub mod settle;
pub mod stats;
pub mod summary;
