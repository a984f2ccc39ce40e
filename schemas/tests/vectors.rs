//! Test vectors for encoders in other languages (`schemas/test-vectors/single-object.json`):
//! for each upstream event, the schema's canonical form, its fingerprint, the field values and the
//! exact single-object bytes. This test checks the file against this codec; regenerate it after
//! a schema change with `TRIALFLOW_WRITE_TEST_VECTORS=1 cargo test -p trialflow-schemas --test vectors`.

use serde_json::{Value as Json, json};
use trialflow_schemas::*;

const FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/test-vectors/single-object.json");

fn envelope(event_type: &str, subject: &str, source: &str) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::parse_str("0190f5a2-7c3e-7d4b-9a1e-5c2b8f6d4e21").unwrap_or_default(),
        event_type: event_type.to_string(),
        schema_version: 1,
        study_id: "CDISCPILOT01".to_string(),
        site_id: Some("701".to_string()),
        subject_id: Some(subject.to_string()),
        occurred_at: Timestamp(1_388_656_800_000_000), // 2014-01-02T10:00:00Z
        recorded_at: Timestamp(1_388_660_400_000_000), // 2014-01-02T11:00:00Z
        source_system: source.to_string(),
        actor: None,
        correlation_id: None,
        causation_id: None,
    }
}

/// PHQ-9's nine item codes and its difficulty item (LOINC), in the questionnaire's order.
const PHQ9_ITEMS: [&str; 10] = [
    "44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8",
    "69722-7",
];

fn samples() -> Vec<AnyEvent> {
    vec![
        VitalSignRecorded {
            envelope: envelope("VitalSignRecorded", "01-701-1015", "edc"),
            observation_id: "VS-01-701-1015-42".to_string(),
            loinc_code: "8480-6".to_string(),
            value: 164.0,
            unit: "mm[Hg]".to_string(),
            position: Some("STANDING".to_string()),
            effective: PartialDateTime::parse("2014-01-02"),
            visit: Some("WEEK 2".to_string()),
            visit_day: Some(15),
        }
        .into(),
        AdverseEventReported {
            envelope: envelope("AdverseEventReported", "01-701-1023", "edc"),
            ae_id: "AE-01-701-1023-3".to_string(),
            term: "ERYTHEMA".to_string(),
            meddra_code: None,
            severity: Some("MODERATE".to_string()),
            ctcae_grade: None,
            serious: false,
            seriousness_criteria: vec![],
            onset: PartialDateTime::parse("2012-08"),
            sponsor_received_at: Timestamp(1_388_660_400_000_000),
        }
        .into(),
        QuestionnaireResponseSubmitted {
            envelope: envelope("QuestionnaireResponseSubmitted", "01-701-1015", "epro-app"),
            submission_id: uuid::Uuid::parse_str("5b0d3c1e-2f4a-4e7b-8c9d-0a1b2c3d4e5f").unwrap_or_default(),
            // As the validator's catalogue defines PHQ-9 (docs/questionnaires.md): id, version,
            // the nine LOINC item codes, then the difficulty item, asked when any answer is above 0.
            questionnaire: "PHQ-9".to_string(),
            questionnaire_version: "1.0".to_string(),
            scheduled_occurrence: Some("PHQ-9/W4".to_string()),
            status: ResponseStatus::Completed,
            authored_at: Timestamp(1_388_656_800_000_000),
            device_time_zone: "America/New_York".to_string(),
            items: PHQ9_ITEMS
                .iter()
                .enumerate()
                .map(|(i, link_id)| Answer::integer(link_id.to_string(), if i == 8 { 0 } else { 1 }))
                .collect(),
        }
        .into(),
    ]
}

fn schema_of(name: &str) -> &'static codec::WriterSchema {
    Registry::builtin()
        .current(&format!("org.trialflow.events.{name}"))
        .unwrap_or_else(|| panic!("no current schema for {name}"))
}

fn vector(event: &AnyEvent) -> Json {
    let schema = schema_of(event.name());
    let bytes = Registry::builtin().encode_any(event).unwrap_or_default();
    json!({
        "event": event.name(),
        "schema": format!("schemas/{}", schema.path),
        "canonical_form": schema.canonical_form,
        "fingerprint_u64_hex": format!("{:016x}", schema.fingerprint),
        "fingerprint_le_bytes_hex": hex::encode(schema.fingerprint.to_le_bytes()),
        "fields": event.to_json(),
        "single_object_hex": hex::encode(&bytes),
    })
}

/// Every current event schema: its Parsing Canonical Form and fingerprint (what encoders write),
/// and the legacy fingerprint earlier builds wrote (decoders accept it; nothing writes it).
fn fingerprints() -> Json {
    let mut table = serde_json::Map::new();
    for name in AnyEvent::NAMES {
        let schema = schema_of(name);
        table.insert(
            name.to_string(),
            json!({
                "schema": format!("schemas/{}", schema.path),
                "canonical_form": schema.canonical_form,
                "fingerprint_le_bytes_hex": hex::encode(schema.fingerprint.to_le_bytes()),
                "legacy_fingerprint_le_bytes_hex": hex::encode(schema.legacy_fingerprint.to_le_bytes()),
            }),
        );
    }
    Json::Object(table)
}

#[test]
fn test_vectors_match_this_codec() {
    let expected: Vec<Json> = samples().iter().map(vector).collect();
    if std::env::var_os("TRIALFLOW_WRITE_TEST_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(
            &json!({ "content_type": CONTENT_TYPE, "fingerprints": fingerprints(), "vectors": expected }),
        )
        .unwrap_or_default();
        std::fs::write(FILE, text + "\n").unwrap_or_else(|e| panic!("writing {FILE}: {e}"));
    }
    let file: Json = serde_json::from_str(&std::fs::read_to_string(FILE).unwrap_or_default())
        .unwrap_or_else(|e| panic!("{FILE} is not JSON: {e}"));
    assert_eq!(file["content_type"], CONTENT_TYPE);
    assert_eq!(file["fingerprints"], fingerprints(), "fingerprint table out of date; regenerate");
    let vectors = file["vectors"].as_array().cloned().unwrap_or_default();
    assert_eq!(vectors.len(), expected.len());
    for (stored, computed) in vectors.iter().zip(&expected) {
        // Decoding the stored bytes gives the stored fields, and encoding them gives the bytes.
        let name = stored["event"].as_str().unwrap_or_default();
        let bytes = hex::decode(stored["single_object_hex"].as_str().unwrap_or_default()).unwrap_or_default();
        let decoded = decode_any(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(decoded.to_json(), stored["fields"], "{name}: decoded fields");
        let from_fields =
            AnyEvent::from_json(name, stored["fields"].clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(Registry::builtin().encode_any(&from_fields).ok(), Some(bytes), "{name}: encoding");
        assert_eq!(stored, computed, "{name}: vector out of date; regenerate (see the module docs)");
    }
}
