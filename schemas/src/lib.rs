//! Event contracts of trialflow.
//!
//! The hand-written Avro schemas under `schemas/avro/` are the source of truth (upstream systems
//! in other languages code against them); this crate embeds them, mirrors every event as a Rust
//! type, and encodes/decodes Avro single-object encoding with schema resolution. See
//! `schemas/README.md` (topics) and `schemas/INTEROP.md` (producing from other languages).

pub mod canonical;
pub mod codec;
pub mod events;
pub mod topics;
pub mod types;

mod schema_files {
    include!(concat!(env!("OUT_DIR"), "/schema_files.rs"));
}

#[cfg(test)]
mod testing;

pub use codec::{CONTENT_TYPE, CodecError, Registry, decode, decode_any, encode};
pub use events::*;
pub use types::{Date, DateTimePrecision, Envelope, PartialDateTime, Timestamp};

/// `(path, json)` of every current schema file (events and shared types), for tools and tests.
pub fn current_schema_files() -> &'static [(&'static str, &'static str)] {
    schema_files::CURRENT
}

/// `(path, json)` of every released schema file.
pub fn released_schema_files() -> &'static [(&'static str, &'static str)] {
    schema_files::RELEASED
}
