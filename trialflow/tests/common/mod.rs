//! Request bodies the HTTP tests of the three front doors share.

use serde_json::{Value, json};
use trialflow_schemas::{Answer, Envelope, Event, QuestionnaireResponseSubmitted, ResponseStatus, Timestamp};
use uuid::Uuid;

/// A valid `POST /v1/studies` body: two arms, one stratification factor, one criterion, one kit type.
pub(crate) fn study(study_id: &str) -> Value {
    json!({
        "study_id": study_id,
        "title": "Front-door test",
        "arms": [{"arm_code": "PBO", "name": "Placebo", "ratio": 1}, {"arm_code": "ACT", "name": "Active", "ratio": 1}],
        "stratification_factors": [{"factor": "AGEGR", "values": ["<65", ">=65"]}],
        "eligibility": {"criteria": [{"criterion_id": "INC01", "description": "Adult"}]},
        "randomization": {"seed": 7, "block_multiples": [1], "slots_per_stratum": 50, "warn_slots_left": 5},
        "kit_types": [{"kit_type": "TTS", "do_not_dispense_days": 0, "do_not_count_days": 0, "low_stock_threshold": 1}],
        "enrollment_kit_type": "TTS"
    })
}

/// A valid PHQ-9 submission of subject 701-0001 in `study_id`, with fresh ids.
pub(crate) fn submission(study_id: &str) -> QuestionnaireResponseSubmitted {
    let now = Timestamp::now();
    let mut envelope = Envelope::new(QuestionnaireResponseSubmitted::NAME, study_id, "epro-app", now);
    envelope.subject_id = Some("701-0001".into());
    QuestionnaireResponseSubmitted {
        envelope,
        submission_id: Uuid::new_v4(),
        questionnaire: "PHQ-9".into(),
        questionnaire_version: "1.0".into(),
        scheduled_occurrence: None,
        status: ResponseStatus::Completed,
        authored_at: now,
        device_time_zone: "America/New_York".into(),
        items: vec![Answer::integer("44250-9", 1), Answer::integer("44255-8", 0)],
    }
}
