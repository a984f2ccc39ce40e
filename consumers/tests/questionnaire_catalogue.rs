//! `docs/questionnaires.md`, the catalogue a client codes against, is rendered from exactly the
//! definitions the validator loads (`Catalogue::load(None)`, plus the schedule the CDISC pilot
//! replay installs). This test fails when the two drift apart; regenerate the document with
//! `TRIALFLOW_WRITE_DOCS=1 cargo test -p trialflow-consumers --test questionnaire_catalogue`.
//! It also checks that what the document shows is what the validator accepts, and that the event
//! schemas' docs point there instead of naming ids the validator does not know.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use trialflow_consumers::epro::catalogue::Catalogue;
use trialflow_consumers::epro::reference::{self, ExtraSchedule};
use trialflow_consumers::epro::schedule::Schedule;
use trialflow_consumers::epro::validate::{self, Subject};
use trialflow_schemas::{Answer, QuestionnaireResponseSubmitted, WindowStatus, current_schema_files};

/// The schedule the CDISC pilot replay installs (`trialflow_simulation::cdisc_pilot::plan::
/// EPRO_SCHEDULE_JSON`), read from its file: the simulation crate depends on the consumers, not the
/// other way round.
const EPRO_SCHEDULE_JSON: &str = include_str!("../../simulation/cdisc-pilot/epro-schedule.json");

fn document_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/questionnaires.md")
}

fn builtin() -> Catalogue {
    Catalogue::load(None).unwrap_or_else(|e| panic!("the built-in catalogue: {e}"))
}

fn pilot_schedule() -> Schedule {
    let schedule: Schedule =
        serde_json::from_str(EPRO_SCHEDULE_JSON).unwrap_or_else(|e| panic!("the pilot's schedule: {e}"));
    assert_eq!(schedule.validate(), Ok(()));
    schedule
}

const PILOT_ORIGIN: &str = "installed by the CDISC pilot replay, `make demo` / `trialflow replay cdisc-pilot`, \
     from `simulation/cdisc-pilot/epro-schedule.json`; it replaces the default for that study";

fn render() -> String {
    let pilot = pilot_schedule();
    reference::markdown(&builtin(), &[ExtraSchedule { origin: PILOT_ORIGIN, schedule: &pilot }])
}

/// The built-in catalogue plus the pilot's schedule, as the demo's validator loads it.
fn demo_catalogue() -> anyhow::Result<Catalogue> {
    let dir = std::env::temp_dir().join(format!("trialflow-epro-doc-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("cdiscpilot01.schedule.json"), EPRO_SCHEDULE_JSON)?;
    let catalogue = Catalogue::load(Some(&dir));
    std::fs::remove_dir_all(&dir)?;
    Ok(catalogue?)
}

fn writing() -> bool {
    std::env::var("TRIALFLOW_WRITE_DOCS").is_ok_and(|v| v == "1")
}

/// The document as committed (as being written, when regenerating: the tests run in parallel).
fn document() -> String {
    if writing() {
        return render();
    }
    std::fs::read_to_string(document_path()).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; generate it with TRIALFLOW_WRITE_DOCS=1 cargo test -p trialflow-consumers --test \
             questionnaire_catalogue",
            document_path().display()
        )
    })
}

#[test]
fn the_document_is_generated_from_the_definitions_the_validator_loads() {
    let rendered = render();
    if writing() {
        std::fs::write(document_path(), &rendered)
            .unwrap_or_else(|e| panic!("writing {}: {e}", document_path().display()));
        return;
    }
    let written = document();
    if written != rendered {
        let first = written.lines().zip(rendered.lines()).position(|(a, b)| a != b);
        panic!(
            "docs/questionnaires.md differs from the definitions (first difference at line {}); \
             regenerate it with TRIALFLOW_WRITE_DOCS=1 cargo test -p trialflow-consumers --test \
             questionnaire_catalogue",
            first.map_or_else(|| "the end".to_string(), |n| (n + 1).to_string())
        );
    }
    // Every questionnaire, item and occurrence the validator knows is in it.
    for q in builtin().questionnaires() {
        assert!(written.contains(&format!("## Questionnaire `{}` version `{}`", q.id, q.version)));
        for item in &q.items {
            assert!(written.contains(&format!("| `{}` |", item.link_id)), "{} {}", q.id, item.link_id);
        }
    }
    for s in builtin().schedules().chain([&pilot_schedule()]) {
        for o in &s.occurrences {
            assert!(written.contains(&format!("| `{}` | `{}` |", o.id, o.questionnaire)), "{}", o.id);
        }
    }
}

/// The ```json blocks of `doc`, each with the `## ` heading it is under.
fn json_blocks(doc: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut heading = String::new();
    let mut block: Option<String> = None;
    for line in doc.lines() {
        match &mut block {
            Some(text) if line == "```" => {
                blocks.push((heading.clone(), std::mem::take(text)));
                block = None;
            }
            Some(text) => {
                text.push_str(line);
                text.push('\n');
            }
            None if line == "```json" => block = Some(String::new()),
            None if line.starts_with("## ") => heading = line.to_string(),
            None => {}
        }
    }
    blocks
}

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339).map(|t| t.to_utc()).unwrap_or_default()
}

/// Enrolled 2026-01-01 in New York: the example's `PHQ-9/W2`, authored 2026-01-15, is in its
/// window in the default schedule (day 15) and in the pilot's (day 14).
fn subject() -> Subject {
    Subject {
        enrolled_at: at("2026-01-01T15:00:00Z"),
        zone: chrono_tz::America::New_York,
        withdrawn_at: None,
    }
}

fn decide(
    catalogue: &Catalogue,
    s: &QuestionnaireResponseSubmitted,
) -> Result<validate::Accepted, Vec<String>> {
    let authored = s.authored_at.to_datetime().unwrap_or_default();
    let received = authored + chrono::Duration::minutes(10);
    validate::decide(catalogue, s, &subject(), received)
        .map_err(|reasons| reasons.into_iter().map(|r| r.code).collect())
}

#[test]
fn a_phq9_built_exactly_as_the_document_says_is_accepted() -> anyhow::Result<()> {
    let doc = document();
    let blocks = json_blocks(&doc);
    let (_, body) = blocks
        .iter()
        .find(|(heading, _)| heading == "## Example submission")
        .ok_or_else(|| anyhow::anyhow!("the document has no example submission"))?;
    let s: QuestionnaireResponseSubmitted = serde_json::from_str(body)?;
    assert_eq!(
        (s.questionnaire.as_str(), s.questionnaire_version.as_str(), s.scheduled_occurrence.as_deref()),
        ("PHQ-9", "1.0", Some("PHQ-9/W2"))
    );
    assert_eq!(s.envelope.study_id, "CDISCPILOT01");
    for catalogue in [builtin(), demo_catalogue()?] {
        let accepted = decide(&catalogue, &s);
        let accepted =
            accepted.unwrap_or_else(|codes| panic!("the document's example is rejected: {codes:?}"));
        assert_eq!(accepted.scored.total, Some(8));
        assert_eq!(accepted.scored.band.as_deref(), Some("mild"));
        assert!(accepted.scored.flagged.is_empty());
        assert_eq!(accepted.window, WindowStatus::InWindow);
        assert!(!accepted.late_sync);
    }
    Ok(())
}

#[test]
fn every_example_items_block_of_the_document_is_accepted_for_its_questionnaire() -> anyhow::Result<()> {
    let doc = document();
    let Some((_, body)) = json_blocks(&doc).into_iter().find(|(h, _)| h == "## Example submission") else {
        anyhow::bail!("the document has no example submission");
    };
    let template: QuestionnaireResponseSubmitted = serde_json::from_str(&body)?;
    let mut checked = Vec::new();
    for (heading, items) in json_blocks(&doc) {
        let Some(rest) = heading.strip_prefix("## Questionnaire ") else { continue };
        let ticks: Vec<&str> = rest.split('`').collect();
        let (id, version) = (ticks[1], ticks[3]);
        let items: Vec<Answer> = serde_json::from_str(&items)?;
        let s = QuestionnaireResponseSubmitted {
            questionnaire: id.to_string(),
            questionnaire_version: version.to_string(),
            scheduled_occurrence: None,
            items,
            ..template.clone()
        };
        let accepted = decide(&builtin(), &s).unwrap_or_else(|codes| panic!("{id} {version}: {codes:?}"));
        assert_eq!(accepted.window, WindowStatus::Unscheduled);
        checked.push(format!("{id} {version}"));
    }
    assert_eq!(checked, builtin().versions(), "one example per questionnaire");
    Ok(())
}

/// The PHQ-9 of the test vector before issue 14, built from the old schema doc.
fn as_formerly_documented() -> QuestionnaireResponseSubmitted {
    let items = (1..=9).map(|i| Answer::integer(format!("phq9-{i}"), if i == 9 { 0 } else { 1 })).collect();
    let mut s = reference::example_submission(
        builtin().questionnaire("PHQ-9", "1.0").unwrap_or_else(|_| panic!("PHQ-9 1.0 is built in")),
        Some("DAY-28"),
        reference::example_authored_at(),
    );
    s.questionnaire = "http://loinc.org/44249-1".to_string();
    s.questionnaire_version = "1.0.0".to_string();
    s.items = items;
    s
}

#[test]
fn a_phq9_built_with_the_formerly_documented_ids_is_rejected_and_each_id_is_named() {
    let catalogue = builtin();
    let s = as_formerly_documented();
    assert_eq!(
        decide(&catalogue, &s),
        Err(vec!["UNKNOWN_QUESTIONNAIRE".into(), "UNKNOWN_OCCURRENCE".into()])
    );

    // Each wrong id on its own, the others as documented now.
    let with = |f: &dyn Fn(&mut QuestionnaireResponseSubmitted)| {
        let mut s = reference::example_submission(
            catalogue.questionnaire("PHQ-9", "1.0").unwrap_or_else(|_| panic!("PHQ-9 1.0 is built in")),
            Some("PHQ-9/W2"),
            reference::example_authored_at(),
        );
        f(&mut s);
        decide(&catalogue, &s)
    };
    assert!(with(&|_| {}).is_ok());
    // The occurrence is PHQ-9's, so it does not match an unknown questionnaire either.
    assert_eq!(
        with(&|s| s.questionnaire = "http://loinc.org/44249-1".into()),
        Err(vec!["UNKNOWN_QUESTIONNAIRE".into(), "UNKNOWN_OCCURRENCE".into()])
    );
    assert_eq!(with(&|s| s.questionnaire_version = "1.0.0".into()), Err(vec!["UNKNOWN_VERSION".into()]));
    assert_eq!(
        with(&|s| s.scheduled_occurrence = Some("DAY-28".into())),
        Err(vec!["UNKNOWN_OCCURRENCE".into()])
    );
    let positions = with(&|s| s.items = as_formerly_documented().items).err().unwrap_or_default();
    assert_eq!(positions.iter().filter(|c| *c == "UNKNOWN_ITEM").count(), 9, "{positions:?}");
    assert_eq!(positions.iter().filter(|c| *c == "REQUIRED_ITEM_MISSING").count(), 9, "{positions:?}");
}

fn schema_json(name: &str) -> serde_json::Value {
    let (_, text) = current_schema_files()
        .iter()
        .find(|(path, _)| path.ends_with(&format!("/epro/{name}.avsc")))
        .copied()
        .unwrap_or_default();
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn field_doc(schema: &serde_json::Value, field: &str) -> String {
    schema["fields"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["name"] == field)
        .and_then(|f| f["doc"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_epro_schemas_document_what_the_validator_knows_and_point_to_the_catalogue() {
    let catalogue = builtin();
    let submitted = schema_json("QuestionnaireResponseSubmitted");
    assert!(submitted["doc"].as_str().unwrap_or_default().contains("docs/questionnaires.md"));
    let questionnaire = field_doc(&submitted, "questionnaire");
    assert!(!questionnaire.contains("loinc.org"), "the validator knows no canonical URL: {questionnaire}");
    for q in catalogue.questionnaires() {
        assert!(questionnaire.contains(&q.id), "the questionnaire doc names {}: {questionnaire}", q.id);
    }
    let version = field_doc(&submitted, "questionnaire_version");
    assert!(version.contains("1.0") && version.contains("schema_version"), "{version}");
    let occurrence = field_doc(&submitted, "scheduled_occurrence");
    let example = occurrence.split_whitespace().find(|w| w.starts_with("PHQ-9/")).unwrap_or_default();
    let example = example.trim_end_matches(|c: char| !c.is_alphanumeric());
    assert!(
        catalogue.schedule("*").occurrence(example).is_some(),
        "the scheduled_occurrence doc's example `{example}` is an occurrence of the default schedule: {occurrence}"
    );

    let accepted = schema_json("QuestionnaireResponseAccepted");
    let band = field_doc(&accepted, "severity_band");
    let labels: Vec<String> = catalogue
        .questionnaires()
        .filter_map(|q| q.scoring.as_ref())
        .flat_map(|s| s.bands.iter().map(|b| b.label.clone()))
        .collect();
    assert!(labels.iter().any(|l| band.contains(l.as_str())), "{band}");
    for label in &labels {
        assert!(!band.contains(&label.to_uppercase()), "bands are sent as written ({label}): {band}");
    }

    let rejected = schema_json("QuestionnaireResponseRejected");
    let reasons =
        &rejected["fields"].as_array().into_iter().flatten().find(|f| f["name"] == "reasons").cloned();
    let code = reasons
        .as_ref()
        .and_then(|r| r["type"]["items"]["fields"].as_array().cloned())
        .into_iter()
        .flatten()
        .find(|f| f["name"] == "code")
        .and_then(|f| f["doc"].as_str().map(str::to_string))
        .unwrap_or_default();
    for (c, _) in validate::CODES {
        assert!(code.contains(c), "the reason code doc names {c}: {code}");
    }
}

/// The PHQ-9 of `schemas/test-vectors/single-object.json` (written by `schemas/tests/vectors.rs`)
/// with the catalogue's ids: what that vector's fields must be for the validator to accept it.
#[test]
fn the_test_vectors_phq9_with_the_catalogues_ids_is_accepted() -> anyhow::Result<()> {
    let link_ids = [
        "44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8",
        "69722-7",
    ];
    let values = [1, 1, 1, 1, 1, 1, 1, 1, 0, 1];
    let vector = serde_json::json!({
        "envelope": {
            "event_id": "0190f5a2-7c3e-7d4b-9a1e-5c2b8f6d4e21",
            "event_type": "QuestionnaireResponseSubmitted",
            "schema_version": 1,
            "study_id": "CDISCPILOT01",
            "site_id": "701",
            "subject_id": "01-701-1015",
            "occurred_at": 1_388_656_800_000_000_i64,
            "recorded_at": 1_388_660_400_000_000_i64,
            "source_system": "epro-app",
            "actor": null,
            "correlation_id": null,
            "causation_id": null
        },
        "submission_id": "5b0d3c1e-2f4a-4e7b-8c9d-0a1b2c3d4e5f",
        "questionnaire": "PHQ-9",
        "questionnaire_version": "1.0",
        "scheduled_occurrence": "PHQ-9/W4",
        "status": "COMPLETED",
        "authored_at": 1_388_656_800_000_000_i64,
        "device_time_zone": "America/New_York",
        "items": link_ids.iter().zip(values).map(|(l, v)| serde_json::json!({
            "link_id": l, "value_integer": v, "value_decimal": null, "value_string": null, "value_boolean": null
        })).collect::<Vec<_>>()
    });
    let s: QuestionnaireResponseSubmitted = serde_json::from_value(vector)?;
    // Subject 01-701-1015 starts on 2014-01-02 in the pilot; published without the gateway, the
    // submission's arrival is its `recorded_at` (an hour after it was authored).
    let subject = Subject {
        enrolled_at: at("2014-01-02T15:00:00Z"),
        zone: chrono_tz::America::New_York,
        withdrawn_at: None,
    };
    let received = s.envelope.recorded_at.to_datetime().unwrap_or_default();
    for catalogue in [builtin(), demo_catalogue()?] {
        let accepted = validate::decide(&catalogue, &s, &subject, received)
            .unwrap_or_else(|reasons| panic!("{:?}", reasons.iter().map(|r| &r.code).collect::<Vec<_>>()));
        assert_eq!((accepted.scored.total, accepted.scored.band.as_deref()), (Some(8), Some("mild")));
        assert!(accepted.scored.flagged.is_empty() && !accepted.late_sync);
        // Authored on study day 1, answering the week-4 slot: out of its window, still accepted.
        assert_eq!(accepted.window, WindowStatus::OutOfWindow);
    }
    Ok(())
}
