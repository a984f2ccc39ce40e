//! Schema evolution rules, enforced here so CI fails on an incompatible change:
//! every current schema must be readable by the previous release's readers (forward) and must
//! read what the previous release wrote (backward). Released versions live in
//! `schemas/released/vN/`, one folder per release, mirroring `schemas/avro/`.

use apache_avro::Schema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use serde_json::{Value as Json, json};
use trialflow_schemas::*;

/// Both directions: old readers read new data, new readers read old data.
fn compatible(released: &str, current: &str) -> Result<(), String> {
    let old = Schema::parse_str(released).map_err(|e| e.to_string())?;
    let new = Schema::parse_str(current).map_err(|e| e.to_string())?;
    SchemaCompatibility::can_read(&old, &new)
        .map_err(|e| format!("new readers cannot read old data: {e}"))?;
    SchemaCompatibility::can_read(&new, &old)
        .map_err(|e| format!("old readers cannot read new data: {e}"))?;
    Ok(())
}

/// The release number and text of the latest released version of the schema at `avro/<rel>`.
fn latest_release(rel: &str) -> Option<(u32, &'static str)> {
    released_schema_files()
        .iter()
        .filter_map(|(path, text)| {
            let rest = path.strip_prefix("released/v")?;
            let (version, file) = rest.split_once('/')?;
            (file == rel).then(|| Some((version.parse::<u32>().ok()?, *text)))?
        })
        .max_by_key(|(version, _)| *version)
}

fn current(name: &str) -> &'static str {
    current_schema_files()
        .iter()
        .find(|(p, _)| p.ends_with(&format!("/{name}.avsc")))
        .map(|(_, t)| *t)
        .unwrap_or("")
}

#[test]
fn current_schemas_stay_compatible_with_their_latest_release() {
    let mut checked = 0;
    for (path, text) in current_schema_files() {
        let rel = path.strip_prefix("avro/").unwrap_or(path);
        if let Some((version, released)) = latest_release(rel) {
            if let Err(e) = compatible(released, text) {
                panic!("{path} is incompatible with released/v{version}/{rel}: {e}");
            }
            checked += 1;
        }
    }
    assert!(checked >= AnyEvent::NAMES.len(), "every event has a released version; checked {checked}");
}

fn with_field(schema: &str, field: Json) -> String {
    let mut s: Json = serde_json::from_str(schema).unwrap_or(Json::Null);
    if let Some(fields) = s["fields"].as_array_mut() {
        fields.push(field);
    }
    s.to_string()
}

#[test]
fn the_rule_rejects_incompatible_changes() {
    let v1 = current("VitalSignRecorded");
    // A new required field: old data has no value for it.
    let required = with_field(v1, json!({"name": "device_id", "type": "string"}));
    assert!(compatible(v1, &required).is_err());
    // A changed type.
    let mut retyped: Json = serde_json::from_str(v1).unwrap_or(Json::Null);
    if let Some(fields) = retyped["fields"].as_array_mut() {
        fields.iter_mut().filter(|f| f["name"] == "value").for_each(|f| f["type"] = json!("string"));
    }
    assert!(compatible(v1, &retyped.to_string()).is_err());
    // A removed field without default: old readers cannot fill it.
    let mut removed: Json = serde_json::from_str(v1).unwrap_or(Json::Null);
    if let Some(fields) = removed["fields"].as_array_mut() {
        fields.retain(|f| f["name"] != "loinc_code");
    }
    assert!(compatible(v1, &removed.to_string()).is_err());
    // An optional field with a default is fine.
    let optional = with_field(v1, json!({"name": "device_id", "type": ["null", "string"], "default": null}));
    assert_eq!(compatible(v1, &optional), Ok(()));
}

fn sample() -> VitalSignRecorded {
    VitalSignRecorded {
        envelope: Envelope {
            event_id: uuid::Uuid::now_v7(),
            event_type: "VitalSignRecorded".to_string(),
            schema_version: 1,
            study_id: "CDISCPILOT01".to_string(),
            site_id: Some("701".to_string()),
            subject_id: Some("01-701-1015".to_string()),
            occurred_at: Timestamp::now(),
            recorded_at: Timestamp::now(),
            source_system: "edc".to_string(),
            actor: None,
            correlation_id: None,
            causation_id: None,
        },
        observation_id: "VS-1".to_string(),
        loinc_code: "8480-6".to_string(),
        value: 182.0,
        unit: "mm[Hg]".to_string(),
        position: Some("SITTING".to_string()),
        effective: PartialDateTime::parse("2014-01-02"),
        visit: Some("WEEK 2".to_string()),
        visit_day: Some(15),
    }
}

/// A consumer built with a newer schema (v2 adds an optional field) reads what a producer of the
/// previous version wrote, and a consumer of the previous version reads what v2 writes, once it
/// knows the v2 writer schema (see INTEROP.md: schemas ship to consumers before producers use them).
#[test]
fn consumers_read_events_of_the_neighbouring_version() {
    let v1 = current("VitalSignRecorded");
    let v2 = with_field(v1, json!({"name": "device_id", "type": ["null", "string"], "default": null}));
    let v1_registry = Registry::new(&[("v1", v1)], &[("v2", v2.as_str())]).unwrap_or_else(|e| panic!("{e}"));
    let v2_registry = Registry::new(&[("v2", v2.as_str())], &[("v1", v1)]).unwrap_or_else(|e| panic!("{e}"));
    let event = sample();

    let written_by_v1 = v1_registry.encode(&event).unwrap_or_default();
    assert_eq!(v2_registry.decode::<VitalSignRecorded>(&written_by_v1), Ok(event.clone()), "backward");

    let written_by_v2 = v2_registry.encode(&event).unwrap_or_default();
    assert_ne!(written_by_v1[2..10], written_by_v2[2..10], "different fingerprints");
    assert_eq!(v1_registry.decode::<VitalSignRecorded>(&written_by_v2), Ok(event), "forward");
}

#[test]
fn the_builtin_registry_reads_every_released_writer() {
    // Every released schema is a known writer, so data written by any release still decodes.
    let registry = Registry::builtin();
    for (path, text) in released_schema_files() {
        let Ok(schema) = Schema::parse_str(text) else { panic!("{path}") };
        if path.contains("/common/") {
            continue;
        }
        let fp = codec::fingerprint(&schema);
        assert!(registry.writers().any(|w| w.fingerprint == fp), "{path} is not a known writer");
    }
}
