//! Avro single-object encoding: `C3 01`, the 8-byte little-endian CRC-64-AVRO (Rabin)
//! fingerprint of the writer schema's Parsing Canonical Form (as the Avro specification defines
//! it: [`crate::canonical`]), then the Avro binary datum.
//! Decoding looks the fingerprint up among every known writer schema (current and released) and
//! resolves the datum into the reader's current schema, so consumers read older versions.
//!
//! Builds before the spec-exact fingerprints wrote the fingerprint of apache-avro's canonical form,
//! which keeps logical-typed fields in object form (`{"type":"long"}`). Decoding still accepts
//! those *legacy fingerprints*, so messages already on topics stay readable; nothing writes them.

use std::collections::HashMap;
use std::sync::LazyLock;

use apache_avro::Schema;
use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use thiserror::Error;

use crate::events::{AnyEvent, Event};

/// Kafka `content-type` header value of single-object-encoded Avro.
pub const CONTENT_TYPE: &str = "application/vnd.apache.avro+single-object";

/// The two marker bytes that start every single-object encoded message.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

/// Why bytes could not be decoded (all permanent: dead-letter them) or an event not encoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("message of {0} bytes is shorter than the 10-byte single-object header")]
    TooShort(usize),
    #[error("message does not start with the single-object marker C3 01 (found {0:02X} {1:02X})")]
    BadMagic(u8, u8),
    #[error(
        "unknown schema fingerprint {0:016x}: not a trialflow event, or written by a newer schema this build does not know"
    )]
    UnknownFingerprint(u64),
    #[error("expected a {expected} event, found {found}")]
    WrongEventType { expected: &'static str, found: String },
    #[error("corrupt {event} datum: {reason}")]
    Corrupt { event: String, reason: String },
    #[error("{event} does not match its schema: {reason}")]
    Encode { event: &'static str, reason: String },
    #[error("schema {path} is invalid: {reason}")]
    Schema { path: String, reason: String },
}

/// A known writer schema.
#[derive(Debug)]
pub struct WriterSchema {
    pub full_name: String,
    /// Where it came from, e.g. `avro/clinical/VitalSignRecorded.avsc` or `released/v1/...`.
    pub path: String,
    pub schema: Schema,
    /// Its Parsing Canonical Form, as the Avro specification defines it.
    pub canonical_form: String,
    /// CRC-64-AVRO of `canonical_form`: what encoding writes.
    pub fingerprint: u64,
    /// The fingerprint builds before the spec-exact one wrote: decoding accepts it too.
    pub legacy_fingerprint: u64,
}

/// The schemas a process knows: the current one of each event (what it writes, and what it
/// reads into) and every writer schema it can decode (current and released versions).
#[derive(Debug)]
pub struct Registry {
    /// Every known writer schema; `current` and `by_fingerprint` index into it.
    schemas: Vec<WriterSchema>,
    current: HashMap<String, usize>,
    /// Spec-exact and legacy fingerprints alike.
    by_fingerprint: HashMap<u64, usize>,
}

/// Fingerprint of a schema: CRC-64-AVRO of its Parsing Canonical Form as the Avro specification
/// defines it, as a little-endian u64.
pub fn fingerprint(schema: &Schema) -> u64 {
    // apache-avro serialises a parsed schema back to JSON with its logical types, so the spec's
    // form can be taken from it.
    let json = serde_json::to_string(schema).unwrap_or_default();
    crate::canonical::fingerprint_of_json(&json).unwrap_or_else(|_| legacy_fingerprint(schema))
}

/// The fingerprint of apache-avro's canonical form, which keeps logical-typed fields in object
/// form: what builds before the spec-exact fingerprint wrote. Decoding only.
pub fn legacy_fingerprint(schema: &Schema) -> u64 {
    let fp = schema.fingerprint::<Rabin>();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&fp.bytes[..8]);
    u64::from_le_bytes(bytes)
}

fn full_name(schema: &Schema) -> String {
    match schema {
        Schema::Record(r) => r.name.fullname(None),
        other => format!("{other:?}"),
    }
}

fn parse(path: &str, json: &str) -> Result<WriterSchema, CodecError> {
    let invalid = |reason: String| CodecError::Schema { path: path.to_string(), reason };
    let schema = Schema::parse_str(json).map_err(|e| invalid(e.to_string()))?;
    let canonical_form =
        crate::canonical::parsing_canonical_form(json).map_err(|e| invalid(e.to_string()))?;
    Ok(WriterSchema {
        full_name: full_name(&schema),
        path: path.to_string(),
        fingerprint: crate::canonical::rabin_fingerprint(&canonical_form),
        legacy_fingerprint: legacy_fingerprint(&schema),
        canonical_form,
        schema,
    })
}

static BUILTIN: LazyLock<Registry> = LazyLock::new(|| {
    Registry::new(crate::schema_files::CURRENT, crate::schema_files::RELEASED)
        .unwrap_or_else(|e| panic!("the embedded schemas are checked by the tests: {e}"))
});

impl Registry {
    /// The schemas embedded in this build (`schemas/avro/` and `schemas/released/`).
    pub fn builtin() -> &'static Registry {
        &BUILTIN
    }

    /// A registry from `(path, json)` pairs. Only event records (namespace
    /// `org.trialflow.events`) are registered; shared types such as the envelope are not events.
    pub fn new(current: &[(&str, &str)], known_writers: &[(&str, &str)]) -> Result<Self, CodecError> {
        let mut registry =
            Self { schemas: Vec::new(), current: HashMap::new(), by_fingerprint: HashMap::new() };
        for (is_current, files) in [(true, current), (false, known_writers)] {
            for (path, json) in files {
                let s = parse(path, json)?;
                if !s.full_name.starts_with("org.trialflow.events.") {
                    continue;
                }
                if registry.by_fingerprint.contains_key(&s.fingerprint) {
                    continue; // a released version identical to the current one (or another release)
                }
                let index = registry.schemas.len();
                if is_current {
                    registry.current.insert(s.full_name.clone(), index);
                }
                registry.by_fingerprint.insert(s.fingerprint, index);
                registry.by_fingerprint.entry(s.legacy_fingerprint).or_insert(index);
                registry.schemas.push(s);
            }
        }
        Ok(registry)
    }

    /// The current schema of an event.
    pub fn current(&self, full_name: &str) -> Option<&WriterSchema> {
        self.current.get(full_name).map(|&i| &self.schemas[i])
    }

    /// Every writer schema known (each once, whichever of its fingerprints a message carries).
    pub fn writers(&self) -> impl Iterator<Item = &WriterSchema> {
        self.schemas.iter()
    }

    /// The writer schema a fingerprint names, spec-exact or legacy.
    pub fn writer(&self, fingerprint: u64) -> Option<&WriterSchema> {
        self.by_fingerprint.get(&fingerprint).map(|&i| &self.schemas[i])
    }

    /// Encodes `event` with its current schema.
    pub fn encode<E: Event>(&self, event: &E) -> Result<Vec<u8>, CodecError> {
        let err = |reason: String| CodecError::Encode { event: E::NAME, reason };
        let current = self.current(E::FULL_NAME).ok_or_else(|| err("no schema in this build".to_string()))?;
        // Serialised against the schema directly: no intermediate `Value` to build, resolve and
        // validate (the test vectors pin the bytes).
        let datum = GenericDatumWriter::builder(&current.schema)
            .build()
            .and_then(|w| w.write_ser_to_vec(event))
            .map_err(|e| err(e.to_string()))?;
        let mut out = Vec::with_capacity(HEADER_LEN + datum.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&current.fingerprint.to_le_bytes());
        out.extend_from_slice(&datum);
        Ok(out)
    }

    /// Decodes into the writer's record resolved to the current schema of the same event.
    fn decode_value(&self, bytes: &[u8]) -> Result<(&WriterSchema, Value), CodecError> {
        if bytes.len() < HEADER_LEN {
            return Err(CodecError::TooShort(bytes.len()));
        }
        if bytes[..2] != MAGIC {
            return Err(CodecError::BadMagic(bytes[0], bytes[1]));
        }
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&bytes[2..HEADER_LEN]);
        let fp = u64::from_le_bytes(fp);
        let writer = self.writer(fp).ok_or(CodecError::UnknownFingerprint(fp))?;
        let reader = self.current(&writer.full_name).unwrap_or(writer);
        let corrupt = |reason: String| CodecError::Corrupt { event: writer.full_name.clone(), reason };
        let mut datum = EofTracking { rest: &bytes[HEADER_LEN..], hit_eof: false };
        // Written with the current schema (the usual case), the datum needs no resolution.
        let value = if std::ptr::eq(reader, writer) {
            GenericDatumReader::builder(&writer.schema).build()
        } else {
            GenericDatumReader::builder(&writer.schema).reader_schema(&reader.schema).build()
        }
        .and_then(|r| r.read_value(&mut datum))
        .map_err(|e| corrupt(e.to_string()))?;
        if datum.hit_eof {
            return Err(corrupt("the datum is truncated".to_string()));
        }
        if !datum.rest.is_empty() {
            return Err(corrupt(format!("{} bytes left after the datum", datum.rest.len())));
        }
        Ok((writer, value))
    }

    /// Decodes bytes that must hold an `E`.
    pub fn decode<E: Event>(&self, bytes: &[u8]) -> Result<E, CodecError> {
        let (writer, value) = self.decode_value(bytes)?;
        if writer.full_name != E::FULL_NAME {
            return Err(CodecError::WrongEventType { expected: E::NAME, found: writer.full_name.clone() });
        }
        apache_avro::from_value::<E>(&value)
            .map_err(|e| CodecError::Corrupt { event: writer.full_name.clone(), reason: e.to_string() })
    }

    /// Decodes any event of the catalogue.
    pub fn decode_any(&self, bytes: &[u8]) -> Result<AnyEvent, CodecError> {
        let (writer, value) = self.decode_value(bytes)?;
        let corrupt = |reason: String| CodecError::Corrupt { event: writer.full_name.clone(), reason };
        AnyEvent::from_value(&writer.full_name, &value)
            .ok_or_else(|| corrupt("no Rust type for this event in this build".to_string()))?
            .map_err(|e| corrupt(e.to_string()))
    }

    /// Encodes any event of the catalogue.
    pub fn encode_any(&self, event: &AnyEvent) -> Result<Vec<u8>, CodecError> {
        event.encode_with(self)
    }
}

/// A reader that remembers whether anyone tried to read past the end. apache-avro reads a
/// missing union index at the end of input as `null`, so a datum cut before trailing optional
/// fields would otherwise decode "successfully" with those fields silently dropped.
struct EofTracking<'a> {
    rest: &'a [u8],
    hit_eof: bool,
}

impl std::io::Read for EofTracking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !buf.is_empty() && self.rest.is_empty() {
            self.hit_eof = true;
        }
        self.rest.read(buf)
    }
}

/// Encodes with the built-in registry.
pub fn encode<E: Event>(event: &E) -> Result<Vec<u8>, CodecError> {
    Registry::builtin().encode(event)
}

/// Decodes with the built-in registry.
pub fn decode<E: Event>(bytes: &[u8]) -> Result<E, CodecError> {
    Registry::builtin().decode(bytes)
}

/// Decodes any event with the built-in registry.
pub fn decode_any(bytes: &[u8]) -> Result<AnyEvent, CodecError> {
    Registry::builtin().decode_any(bytes)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::events::*;

    fn any_event() -> impl Strategy<Value = AnyEvent> {
        prop_oneof![
            any::<StudyConfigured>().prop_map(AnyEvent::from),
            any::<RandomizationListLow>().prop_map(AnyEvent::from),
            any::<SubjectScreened>().prop_map(AnyEvent::from),
            any::<ConsentSigned>().prop_map(AnyEvent::from),
            any::<EligibilityAssessed>().prop_map(AnyEvent::from),
            any::<EnrollmentRequested>().prop_map(AnyEvent::from),
            any::<SubjectRandomized>().prop_map(AnyEvent::from),
            any::<SubjectEnrolled>().prop_map(AnyEvent::from),
            any::<EnrollmentOnHold>().prop_map(AnyEvent::from),
            any::<SubjectWithdrawn>().prop_map(AnyEvent::from),
            any::<CodeBroken>().prop_map(AnyEvent::from),
            any::<TreatmentAssigned>().prop_map(AnyEvent::from),
            any::<KitsReceived>().prop_map(AnyEvent::from),
            any::<SiteStockLow>().prop_map(AnyEvent::from),
            any::<KitAllocated>().prop_map(AnyEvent::from),
            any::<KitAllocationFailed>().prop_map(AnyEvent::from),
            any::<QuestionnaireResponseSubmitted>().prop_map(AnyEvent::from),
            any::<QuestionnaireResponseAccepted>().prop_map(AnyEvent::from),
            any::<QuestionnaireResponseRejected>().prop_map(AnyEvent::from),
            any::<VitalSignRecorded>().prop_map(AnyEvent::from),
            any::<AdverseEventReported>().prop_map(AnyEvent::from),
            any::<AlertRaised>().prop_map(AnyEvent::from),
            any::<AlertUpdated>().prop_map(AnyEvent::from),
            any::<AlertEscalated>().prop_map(AnyEvent::from),
            any::<AlertAcknowledged>().prop_map(AnyEvent::from),
            any::<AlertResolved>().prop_map(AnyEvent::from),
            any::<NotificationDelivered>().prop_map(AnyEvent::from),
            any::<NotificationFailed>().prop_map(AnyEvent::from),
        ]
    }

    #[test]
    fn the_strategy_covers_every_event() {
        // prop_oneof! above must list every variant; a new event without a strategy fails here.
        assert_eq!(AnyEvent::NAMES.len(), 33);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_event_round_trips(event in any_event()) {
            let registry = Registry::builtin();
            let bytes = registry.encode_any(&event).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&bytes[..2], &MAGIC[..]);
            let back = registry.decode_any(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, event);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_any(&bytes);
        }

        #[test]
        fn a_known_header_with_random_datum_never_panics(
            index in any::<prop::sample::Index>(),
            datum in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let writers: Vec<u64> = Registry::builtin().writers().map(|w| w.fingerprint).collect();
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&writers[index.index(writers.len())].to_le_bytes());
            bytes.extend_from_slice(&datum);
            let _ = decode_any(&bytes);
        }

        #[test]
        fn truncated_messages_are_errors_not_panics(event in any_event(), cut in any::<prop::sample::Index>()) {
            let bytes = Registry::builtin().encode_any(&event).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let cut = cut.index(bytes.len());
            prop_assert!(decode_any(&bytes[..cut]).is_err());
        }
    }
}
