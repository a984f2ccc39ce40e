//! The `.avsc` files are the contract: every event has one, every schema has a Rust type, the
//! envelope is the same everywhere, and bad bytes give typed errors.

use std::collections::BTreeSet;

use apache_avro::Schema;
use serde_json::Value as Json;
use trialflow_schemas::codec::{MAGIC, fingerprint};
use trialflow_schemas::*;
use uuid::Uuid;

fn json(text: &str) -> Json {
    serde_json::from_str(text).unwrap_or(Json::Null)
}

fn event_files() -> Vec<(&'static str, &'static str)> {
    current_schema_files().iter().copied().filter(|(path, _)| !path.starts_with("avro/common/")).collect()
}

#[test]
fn every_schema_file_parses() {
    for (path, text) in current_schema_files().iter().chain(released_schema_files()) {
        assert!(
            Schema::parse_str(text).is_ok(),
            "{path} does not parse: {:?}",
            Schema::parse_str(text).err()
        );
    }
}

#[test]
fn every_event_has_a_schema_and_every_schema_an_event() {
    let files: BTreeSet<String> = event_files()
        .iter()
        .map(|(path, _)| path.rsplit('/').next().unwrap_or_default().trim_end_matches(".avsc").to_string())
        .collect();
    let types: BTreeSet<String> = AnyEvent::NAMES.iter().map(|n| n.to_string()).collect();
    assert_eq!(files, types);
    for (path, text) in event_files() {
        let name = json(text)["name"].as_str().unwrap_or_default().to_string();
        assert!(path.ends_with(&format!("/{name}.avsc")), "{path} defines {name}");
        assert_eq!(json(text)["namespace"], "org.trialflow.events", "{path}");
    }
}

#[test]
fn every_event_embeds_the_common_envelope_first() {
    let (_, envelope) = current_schema_files()
        .iter()
        .find(|(p, _)| *p == "avro/common/Envelope.avsc")
        .copied()
        .unwrap_or_default();
    let envelope = json(envelope);
    for (path, text) in event_files() {
        let first = &json(text)["fields"][0];
        assert_eq!(first["name"], "envelope", "{path}: the envelope must be the first field");
        assert_eq!(first["type"], envelope, "{path}: envelope differs from avro/common/Envelope.avsc");
    }
}

#[test]
fn every_event_names_its_topic_in_the_schema_doc() {
    let sample_topics = [
        (StudyConfigured::NAME, StudyConfigured::TOPIC),
        (RandomizationListLow::NAME, RandomizationListLow::TOPIC),
        (SubjectScreened::NAME, SubjectScreened::TOPIC),
        (TreatmentAssigned::NAME, TreatmentAssigned::TOPIC),
        (KitsReceived::NAME, KitsReceived::TOPIC),
        (KitAllocated::NAME, KitAllocated::TOPIC),
        (QuestionnaireResponseSubmitted::NAME, QuestionnaireResponseSubmitted::TOPIC),
        (VitalSignRecorded::NAME, VitalSignRecorded::TOPIC),
        (AdverseEventReported::NAME, AdverseEventReported::TOPIC),
        (AlertRaised::NAME, AlertRaised::TOPIC),
        (NotificationFailed::NAME, NotificationFailed::TOPIC),
    ];
    for (name, topic) in sample_topics {
        let (_, text) = event_files()
            .into_iter()
            .find(|(p, _)| p.ends_with(&format!("/{name}.avsc")))
            .unwrap_or_default();
        let doc = json(text)["doc"].as_str().unwrap_or_default().to_string();
        assert!(doc.contains(&format!("Topic: {topic}.")), "{name}: doc does not name topic {topic}");
    }
    for topic in topics::RESTRICTED {
        assert!(topics::ALL.contains(topic));
    }
}

#[test]
fn blinded_topics_never_carry_an_arm() {
    // ICH E6(R3) blinding: the arm travels only on restricted topics.
    for (path, text) in event_files() {
        let topic = json(text)["doc"]
            .as_str()
            .unwrap_or_default()
            .rsplit("Topic: ")
            .next()
            .unwrap_or_default()
            .trim_end_matches('.')
            .to_string();
        if topics::is_restricted(&topic) {
            continue;
        }
        assert!(
            !text.contains("\"arm_code\"") && !text.contains("\"arm\""),
            "{path} is on blinded topic {topic} but has an arm field"
        );
    }
}

#[test]
fn dead_letters_of_restricted_topics_are_restricted() {
    // A dead letter is the original message (payload and headers): the arm or the seed goes with
    // it, so `<restricted>.dlq` is as restricted as its topic, under any deployed prefix.
    for topic in topics::ALL {
        let dlq = format!("{topic}{}", topics::DLQ_SUFFIX);
        let restricted = topics::RESTRICTED.contains(topic);
        assert_eq!(topics::is_restricted(topic), restricted, "{topic}");
        assert_eq!(topics::is_restricted(&dlq), restricted, "{dlq}");
        assert_eq!(topics::RESTRICTED_DLQ.contains(&dlq.as_str()), restricted, "{dlq} in RESTRICTED_DLQ");
        assert_eq!(topics::is_restricted(&format!("{dlq}{}", topics::DLQ_SUFFIX)), restricted, "{dlq}.dlq");
        assert_eq!(topics::is_restricted_with(&format!("{topic}-dead"), "-dead"), restricted, "other suffix");
    }
    assert_eq!(topics::RESTRICTED_DLQ.len(), topics::RESTRICTED.len());
    assert!(!topics::is_restricted("supply.kit-inventory.v1.dlq.x"), "only a suffix marks a dead letter");
    assert!(!topics::is_restricted_with(topics::KIT_ALLOCATIONS, ""), "an empty suffix strips nothing");

    let names = topics::TopicNames::new("env-a.");
    let restricted = names.restricted(".dlq");
    assert_eq!(restricted.len(), 2 * topics::RESTRICTED.len());
    assert!(restricted.contains(&"env-a.supply.kit-inventory.v1.dlq".to_string()));
    for deployed in names.all() {
        let dlq = names.dead_letter(deployed.trim_start_matches("env-a."), ".dlq");
        assert_eq!(dlq, format!("{deployed}.dlq"));
        let expected = restricted.contains(&deployed);
        assert_eq!(names.is_restricted(&deployed, ".dlq"), expected, "{deployed}");
        assert_eq!(names.is_restricted(&dlq, ".dlq"), expected, "{dlq}");
        assert_eq!(restricted.contains(&dlq), expected, "{dlq} in the restricted ACL list");
    }
}

#[test]
fn only_named_consumers_read_restricted_topics_and_none_their_dead_letters() {
    for topic in topics::RESTRICTED {
        let readers = topics::restricted_readers(topic, topics::DLQ_SUFFIX).unwrap_or_default();
        assert!(!readers.is_empty(), "{topic}: a restricted topic names its readers");
        let dlq = format!("{topic}{}", topics::DLQ_SUFFIX);
        assert_eq!(topics::restricted_readers(&dlq, topics::DLQ_SUFFIX), Some(&[][..]), "{dlq}: no consumer");
    }
    for topic in topics::ALL.iter().filter(|t| !topics::RESTRICTED.contains(t)) {
        assert_eq!(topics::restricted_readers(topic, topics::DLQ_SUFFIX), None, "{topic} is blinded");
    }
    assert!(topics::RESTRICTED_READERS.iter().all(|(t, _)| topics::RESTRICTED.contains(t)));
}

fn vital_sign() -> VitalSignRecorded {
    VitalSignRecorded {
        envelope: Envelope {
            event_id: Uuid::parse_str("0190f5a2-7c3e-7d4b-9a1e-5c2b8f6d4e21").unwrap_or_default(),
            event_type: "VitalSignRecorded".to_string(),
            schema_version: 1,
            study_id: "CDISCPILOT01".to_string(),
            site_id: Some("701".to_string()),
            subject_id: Some("01-701-1015".to_string()),
            occurred_at: Timestamp(1_388_620_800_000_000),
            recorded_at: Timestamp(1_388_624_400_000_000),
            source_system: "edc".to_string(),
            actor: None,
            correlation_id: None,
            causation_id: None,
        },
        observation_id: "VS-01-701-1015-7".to_string(),
        loinc_code: "8480-6".to_string(),
        value: 164.0,
        unit: "mm[Hg]".to_string(),
        position: Some("STANDING".to_string()),
        effective: PartialDateTime::parse("2014-01-02"),
        visit: Some("WEEK 2".to_string()),
        visit_day: Some(15),
    }
}

#[test]
fn bad_bytes_give_typed_errors() {
    let good = encode(&vital_sign()).unwrap_or_default();
    assert_eq!(decode::<VitalSignRecorded>(&good), Ok(vital_sign()));

    assert_eq!(decode_any(&[]), Err(CodecError::TooShort(0)));
    assert_eq!(decode_any(&good[..9]), Err(CodecError::TooShort(9)));
    let mut bad_magic = good.clone();
    bad_magic[0] = b'{';
    assert_eq!(decode_any(&bad_magic), Err(CodecError::BadMagic(b'{', 0x01)));
    let mut unknown = good.clone();
    unknown[2..10].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    assert_eq!(decode_any(&unknown), Err(CodecError::UnknownFingerprint(0x0123_4567_89ab_cdef)));
    assert!(matches!(decode_any(&good[..good.len() - 1]), Err(CodecError::Corrupt { .. })));
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(matches!(decode_any(&trailing), Err(CodecError::Corrupt { .. })));
    assert!(matches!(
        decode::<AdverseEventReported>(&good),
        Err(CodecError::WrongEventType { expected: "AdverseEventReported", .. })
    ));
    let json_payload = br#"{"event_id":"0190f5a2-7c3e-7d4b-9a1e-5c2b8f6d4e21"}"#;
    assert!(matches!(decode_any(json_payload), Err(CodecError::BadMagic(b'{', b'"'))));
    assert_eq!(&good[..2], &MAGIC);
}

#[test]
fn error_messages_name_what_was_wrong() {
    let unknown = CodecError::UnknownFingerprint(0xdead_beef);
    assert!(unknown.to_string().contains("00000000deadbeef"));
    let wrong = CodecError::WrongEventType {
        expected: "KitAllocated",
        found: "org.trialflow.events.AlertRaised".into(),
    };
    assert!(wrong.to_string().contains("KitAllocated") && wrong.to_string().contains("AlertRaised"));
}

#[test]
fn fingerprint_is_the_rabin_of_the_canonical_form() {
    // Parsing Canonical Form drops docs, defaults and logical types: comments never change it.
    let (_, text) =
        event_files().into_iter().find(|(p, _)| p.ends_with("/AlertResolved.avsc")).unwrap_or_default();
    let schema = Schema::parse_str(text).ok();
    let mut undocumented = json(text);
    undocumented["doc"] = Json::String("different words".into());
    let undocumented = Schema::parse_str(&undocumented.to_string()).ok();
    assert_eq!(schema.as_ref().map(fingerprint), undocumented.as_ref().map(fingerprint));
    let form = canonical::parsing_canonical_form(text).unwrap_or_default();
    assert!(form.starts_with(concat!(
        r#"{"name":"org.trialflow.events.AlertResolved","type":"record","fields":[{"name":"envelope","#,
        r#""type":{"name":"org.trialflow.common.Envelope","type":"record","fields":[{"name":"event_id","type":"string"}"#
    )));
    assert_eq!(schema.as_ref().map(fingerprint), Some(canonical::rabin_fingerprint(&form)));
}

#[test]
fn every_schema_has_one_fingerprint_from_its_text_or_its_parsed_form() {
    // The codec fingerprints the file's text; `codec::fingerprint` a parsed schema. Both must agree
    // for every current and released schema, and differ from the legacy fingerprint only where a
    // logical type is involved (every event has the envelope's uuid and timestamps).
    for (path, text) in current_schema_files().iter().chain(released_schema_files()) {
        let schema = Schema::parse_str(text).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(Ok(fingerprint(&schema)), canonical::fingerprint_of_json(text), "{path}");
        if text.contains("logicalType") {
            assert_ne!(fingerprint(&schema), codec::legacy_fingerprint(&schema), "{path}");
        }
    }
}

#[test]
fn messages_with_the_legacy_fingerprint_still_decode() {
    // Written by a build before the spec-exact fingerprints: same datum, the old fingerprint.
    let registry = Registry::builtin();
    let mut checked = 0;
    for writer in registry.writers() {
        assert_eq!(registry.writer(writer.legacy_fingerprint).map(|w| &w.path), Some(&writer.path));
        assert_eq!(registry.writer(writer.fingerprint).map(|w| &w.path), Some(&writer.path));
        checked += 1;
    }
    assert!(checked >= AnyEvent::NAMES.len());
    let event = vital_sign();
    let bytes = registry.encode(&event).unwrap_or_default();
    let current =
        registry.current(VitalSignRecorded::FULL_NAME).map(|w| (w.fingerprint, w.legacy_fingerprint));
    let Some((fp, legacy)) = current else { panic!("VitalSignRecorded has a current schema") };
    assert_eq!(bytes[2..10], fp.to_le_bytes(), "encoders write the spec-exact fingerprint");
    let mut old = bytes.clone();
    old[2..10].copy_from_slice(&legacy.to_le_bytes());
    assert_eq!(registry.decode::<VitalSignRecorded>(&old).ok(), Some(event));
}
