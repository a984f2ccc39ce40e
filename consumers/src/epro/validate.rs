//! The decision on one submission (pure, no IO): accepted with its score, window status and
//! late-sync flag, or rejected with every reason. Duplicates need the store and are decided by
//! the consumer before this runs.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use sha2::{Digest, Sha256};
use trialflow_schemas::{
    Answer, QuestionnaireResponseSubmitted, RejectionReason, ResponseStatus, Timestamp, WindowStatus,
};

use trialflow_http::input::{self, Problem};

use super::catalogue::{Catalogue, Unknown};
use super::questionnaire::Scored;
use super::schedule::window_status;

pub const UNKNOWN_QUESTIONNAIRE: &str = "UNKNOWN_QUESTIONNAIRE";
pub const UNKNOWN_VERSION: &str = "UNKNOWN_VERSION";
pub const INVALID_STATUS: &str = "INVALID_STATUS";
pub const INVALID_TIMESTAMP: &str = "INVALID_TIMESTAMP";
pub const AUTHORED_IN_FUTURE: &str = "AUTHORED_IN_FUTURE";
pub const SUBJECT_WITHDRAWN: &str = "SUBJECT_WITHDRAWN";
pub const UNKNOWN_OCCURRENCE: &str = "UNKNOWN_OCCURRENCE";
/// Same submission id as an earlier submission, different content.
pub const CONFLICTING_DUPLICATE: &str = "CONFLICTING_DUPLICATE";
/// Another completed response for an occurrence that already has one (amendments are accepted).
pub const DUPLICATE_OCCURRENCE: &str = "DUPLICATE_OCCURRENCE";
/// A string holds a control character (only a free-text answer may hold tabs and line breaks).
pub const INVALID_CHARACTERS: &str = "INVALID_CHARACTERS";
/// A string is longer than its field takes.
pub const TEXT_TOO_LONG: &str = "TEXT_TOO_LONG";

/// Every code a `QuestionnaireResponseRejected` reason carries, with what it tells the app that
/// sent the submission (`docs/questionnaires.md` lists them; a test checks that the schema's doc
/// names each one). A new code belongs here.
pub const CODES: &[(&str, &str)] = &[
    (UNKNOWN_QUESTIONNAIRE, "`questionnaire` is not the id of a questionnaire the validator knows"),
    (UNKNOWN_VERSION, "the questionnaire is known but has no version `questionnaire_version`"),
    (INVALID_STATUS, "`status` is neither `COMPLETED` nor `AMENDED`"),
    (INVALID_TIMESTAMP, "`authored_at` is not a representable instant"),
    (
        AUTHORED_IN_FUTURE,
        "`authored_at` is later than the submission's arrival plus the schedule's tolerance",
    ),
    (SUBJECT_WITHDRAWN, "`authored_at` is at or after the subject's withdrawal"),
    (
        UNKNOWN_OCCURRENCE,
        "`scheduled_occurrence` is not in the study's schedule, or belongs to another questionnaire",
    ),
    (DUPLICATE_OCCURRENCE, "the occurrence already has a `COMPLETED` response; send `AMENDED` to correct it"),
    (
        CONFLICTING_DUPLICATE,
        "this `submission_id` arrived before with other content; the first submission stands",
    ),
    (super::questionnaire::UNKNOWN_ITEM, "`link_id` names no item of the questionnaire"),
    (super::questionnaire::DUPLICATE_ITEM, "the item is answered more than once"),
    (super::questionnaire::REQUIRED_ITEM_MISSING, "a required item that is asked has no answer"),
    (super::questionnaire::ITEM_NOT_ENABLED, "an item is answered that its skip logic says is not asked"),
    (
        super::questionnaire::ANSWER_WRONG_TYPE,
        "the answer does not have exactly one value, of the field the item's type takes",
    ),
    (
        super::questionnaire::ANSWER_OUT_OF_RANGE,
        "the value is not one of the item's options, or outside its range",
    ),
    (
        INVALID_CHARACTERS,
        "a string holds a control character (a free-text answer may hold tabs and line breaks)",
    ),
    (TEXT_TOO_LONG, "a string is longer than its field takes"),
];

/// What the validator knows about the subject.
#[derive(Debug, Clone)]
pub struct Subject {
    pub enrolled_at: DateTime<Utc>,
    /// The subject's zone: windows are evaluated there, not in the device's zone.
    pub zone: Tz,
    pub withdrawn_at: Option<DateTime<Utc>>,
}

/// The outcome of an accepted submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub scored: Scored,
    pub window: WindowStatus,
    pub late_sync: bool,
}

pub fn reason(code: &str, link_id: Option<&str>, detail: impl Into<String>) -> RejectionReason {
    RejectionReason { code: code.to_string(), link_id: link_id.map(str::to_string), detail: detail.into() }
}

fn instant(t: Timestamp) -> Option<DateTime<Utc>> {
    t.to_datetime()
}

/// What makes `s` impossible to store or announce as it is: every string that breaks the rules
/// the ePRO gateway applies ([`input::submission_problems`]), one reason each. Apps that publish
/// to the ingestion topic directly are not checked by the gateway; such a submission is rejected
/// (and recorded, made [`storable`]) instead of failing the database write over and over.
pub fn unstorable_text(s: &QuestionnaireResponseSubmitted) -> Vec<RejectionReason> {
    input::submission_problems(s)
        .into_iter()
        .map(|(field, problem)| {
            let code = match problem {
                Problem::TooLong { .. } => TEXT_TOO_LONG,
                Problem::ControlCharacter { .. } | Problem::NotUtf8 => INVALID_CHARACTERS,
            };
            reason(code, None, format!("{field} {problem}"))
        })
        .collect()
}

/// `s` with every string made storable (control characters replaced by U+FFFD, cut to length),
/// to record and announce its rejection; the ids then no longer match anyone's, which is right
/// for a submission that names nobody we can store.
pub fn storable(s: &QuestionnaireResponseSubmitted) -> QuestionnaireResponseSubmitted {
    input::storable_submission(s).unwrap_or_else(|| {
        // Cannot happen (the JSON form reads back); without it, keep only what is known to be
        // safe.
        let mut safe = s.clone();
        safe.items.clear();
        safe
    })
}

/// Decides on `s`, which reached us at `received_at`.
pub fn decide(
    catalogue: &Catalogue,
    s: &QuestionnaireResponseSubmitted,
    subject: &Subject,
    received_at: DateTime<Utc>,
) -> Result<Accepted, Vec<RejectionReason>> {
    let mut problems = Vec::new();
    let schedule = catalogue.schedule(&s.envelope.study_id);
    let questionnaire = match catalogue.questionnaire(&s.questionnaire, &s.questionnaire_version) {
        Ok(q) => Some(q),
        Err(Unknown::Questionnaire) => {
            problems.push(reason(
                UNKNOWN_QUESTIONNAIRE,
                None,
                format!("no questionnaire {}", s.questionnaire),
            ));
            None
        }
        Err(Unknown::Version) => {
            let detail = format!("{} has no version {}", s.questionnaire, s.questionnaire_version);
            problems.push(reason(UNKNOWN_VERSION, None, detail));
            None
        }
    };
    if !matches!(s.status, ResponseStatus::Completed | ResponseStatus::Amended) {
        problems.push(reason(
            INVALID_STATUS,
            None,
            format!("status {:?}: only completed or amended responses count", s.status),
        ));
    }
    let authored = instant(s.authored_at);
    match authored {
        None => problems.push(reason(INVALID_TIMESTAMP, None, "authored_at out of range")),
        Some(at) => {
            let tolerance = chrono::Duration::minutes(i64::from(schedule.future_tolerance_minutes));
            if at > received_at + tolerance {
                problems.push(reason(
                    AUTHORED_IN_FUTURE,
                    None,
                    format!("authored {at} is after its arrival {received_at} (tolerance {tolerance})"),
                ));
            }
            if let Some(withdrawn) = subject.withdrawn_at.filter(|w| at >= *w) {
                problems.push(reason(
                    SUBJECT_WITHDRAWN,
                    None,
                    format!("authored {at}, subject withdrew {withdrawn}"),
                ));
            }
        }
    }
    let occurrence = match s.scheduled_occurrence.as_deref() {
        None => None,
        Some(id) => match schedule.occurrence(id) {
            Some(o) if o.questionnaire == s.questionnaire => Some(o),
            Some(o) => {
                let detail = format!("occurrence {id} is for {}, not {}", o.questionnaire, s.questionnaire);
                problems.push(reason(UNKNOWN_OCCURRENCE, None, detail));
                None
            }
            None => {
                let detail =
                    format!("no occurrence {id} in schedule {} v{}", schedule.study_id, schedule.version);
                problems.push(reason(UNKNOWN_OCCURRENCE, None, detail));
                None
            }
        },
    };
    let scored = questionnaire.map(|q| q.check(&s.items));
    let scored = match scored {
        Some(Err(more)) => {
            problems.extend(more);
            None
        }
        Some(Ok(scored)) => Some(scored),
        None => None,
    };
    match (scored, authored) {
        (Some(scored), Some(authored)) if problems.is_empty() => {
            let window = occurrence.map_or(WindowStatus::Unscheduled, |o| {
                window_status(o, subject.enrolled_at, authored, subject.zone)
            });
            let late_sync =
                received_at - authored > chrono::Duration::hours(i64::from(schedule.late_sync_hours));
            Ok(Accepted { scored, window, late_sync })
        }
        _ => Err(problems),
    }
}

/// What makes two submissions with one submission id the same submission: everything the patient
/// answered and when, not the transport (event id, recorded_at, correlation).
pub fn content_hash(s: &QuestionnaireResponseSubmitted) -> String {
    #[derive(Serialize)]
    struct Content<'a> {
        study_id: &'a str,
        subject_id: Option<&'a str>,
        questionnaire: &'a str,
        version: &'a str,
        occurrence: Option<&'a str>,
        status: ResponseStatus,
        authored_at: i64,
        items: Vec<&'a Answer>,
    }
    let mut items: Vec<&Answer> = s.items.iter().collect();
    items.sort_by(|a, b| a.link_id.cmp(&b.link_id));
    let content = Content {
        study_id: &s.envelope.study_id,
        subject_id: s.envelope.subject_id.as_deref(),
        questionnaire: &s.questionnaire,
        version: &s.questionnaire_version,
        occurrence: s.scheduled_occurrence.as_deref(),
        status: s.status,
        authored_at: s.authored_at.0,
        items,
    };
    let json = serde_json::to_vec(&content).unwrap_or_default();
    hex::encode(Sha256::digest(json))
}

#[cfg(test)]
pub(crate) mod tests {
    use trialflow_schemas::Envelope;

    use super::*;
    use crate::epro::questionnaire::{self as q};

    pub(crate) fn at(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339).map(|t| t.to_utc()).unwrap_or_default()
    }

    /// A PHQ-9 week-2 submission authored at 2026-06-15 12:00 New York time, all items 1.
    pub(crate) fn submission() -> QuestionnaireResponseSubmitted {
        let items = [
            "44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8",
        ];
        let mut answers: Vec<Answer> = items.iter().map(|l| Answer::integer(*l, 1)).collect();
        answers.push(Answer::integer("69722-7", 1));
        let mut envelope = Envelope::new(
            "QuestionnaireResponseSubmitted",
            "S1",
            "epro-app",
            Timestamp::from(at("2026-06-15T16:00:00Z")),
        );
        envelope.subject_id = Some("701-001".into());
        QuestionnaireResponseSubmitted {
            envelope,
            submission_id: uuid::Uuid::new_v4(),
            questionnaire: "PHQ-9".into(),
            questionnaire_version: "1.0".into(),
            scheduled_occurrence: Some("PHQ-9/W2".into()),
            status: ResponseStatus::Completed,
            authored_at: Timestamp::from(at("2026-06-15T16:00:00Z")),
            device_time_zone: "America/New_York".into(),
            items: answers,
        }
    }

    pub(crate) fn subject() -> Subject {
        // Enrolled 2026-06-01 (New York): week 2 (day 15) is due 06-15.
        Subject {
            enrolled_at: at("2026-06-01T14:00:00Z"),
            zone: chrono_tz::America::New_York,
            withdrawn_at: None,
        }
    }

    fn catalogue() -> Catalogue {
        Catalogue::load(None).unwrap_or_default()
    }

    fn codes(r: Result<Accepted, Vec<RejectionReason>>) -> Vec<String> {
        r.err().unwrap_or_default().into_iter().map(|r| r.code).collect()
    }

    const ARRIVED: &str = "2026-06-15T16:05:00Z";

    #[test]
    fn a_good_submission_is_accepted_with_score_window_and_flags() {
        let r = decide(&catalogue(), &submission(), &subject(), at(ARRIVED));
        let expected = Accepted {
            scored: q::Scored { total: Some(9), band: Some("mild".into()), flagged: vec!["44260-8".into()] },
            window: WindowStatus::InWindow,
            late_sync: false,
        };
        assert_eq!(r, Ok(expected));
    }

    #[test]
    fn unknown_questionnaire_and_version() {
        let mut s = submission();
        s.questionnaire = "EQ-5D".into();
        s.scheduled_occurrence = None;
        assert_eq!(codes(decide(&catalogue(), &s, &subject(), at(ARRIVED))), vec![UNKNOWN_QUESTIONNAIRE]);
        let mut s = submission();
        s.questionnaire_version = "2.0".into();
        assert_eq!(codes(decide(&catalogue(), &s, &subject(), at(ARRIVED))), vec![UNKNOWN_VERSION]);
    }

    #[test]
    fn only_completed_or_amended_responses_count() {
        for (status, ok) in [
            (ResponseStatus::Completed, true),
            (ResponseStatus::Amended, true),
            (ResponseStatus::InProgress, false),
            (ResponseStatus::Unknown, false),
        ] {
            let s = QuestionnaireResponseSubmitted { status, ..submission() };
            let r = decide(&catalogue(), &s, &subject(), at(ARRIVED));
            assert_eq!(r.is_ok(), ok, "{status:?}");
            if !ok {
                assert_eq!(codes(r), vec![INVALID_STATUS]);
            }
        }
    }

    #[test]
    fn authored_in_the_future_beyond_the_clock_tolerance() {
        // Tolerance 5 minutes: authored 16:00, arriving 15:55 is fine, 15:54:59 is not.
        assert!(decide(&catalogue(), &submission(), &subject(), at("2026-06-15T15:55:00Z")).is_ok());
        let r = decide(&catalogue(), &submission(), &subject(), at("2026-06-15T15:54:59Z"));
        assert_eq!(codes(r), vec![AUTHORED_IN_FUTURE]);
    }

    #[test]
    fn an_authored_time_out_of_range_is_refused() {
        let s = QuestionnaireResponseSubmitted { authored_at: Timestamp(i64::MAX), ..submission() };
        assert_eq!(codes(decide(&catalogue(), &s, &subject(), at(ARRIVED))), vec![INVALID_TIMESTAMP]);
    }

    #[test]
    fn withdrawn_subjects_only_for_responses_authored_after_withdrawal() {
        let before = Subject { withdrawn_at: Some(at("2026-06-15T16:00:01Z")), ..subject() };
        assert!(decide(&catalogue(), &submission(), &before, at(ARRIVED)).is_ok(), "authored while on study");
        let after = Subject { withdrawn_at: Some(at("2026-06-15T16:00:00Z")), ..subject() };
        assert_eq!(codes(decide(&catalogue(), &submission(), &after, at(ARRIVED))), vec![SUBJECT_WITHDRAWN]);
    }

    #[test]
    fn occurrences_must_exist_and_match_the_questionnaire() {
        let mut s = submission();
        s.scheduled_occurrence = Some("PHQ-9/W3".into());
        assert_eq!(codes(decide(&catalogue(), &s, &subject(), at(ARRIVED))), vec![UNKNOWN_OCCURRENCE]);
        s.scheduled_occurrence = Some("GAD-7/W4".into());
        assert_eq!(codes(decide(&catalogue(), &s, &subject(), at(ARRIVED))), vec![UNKNOWN_OCCURRENCE]);
        s.scheduled_occurrence = None;
        let r = decide(&catalogue(), &s, &subject(), at(ARRIVED));
        assert_eq!(r.map(|a| a.window), Ok(WindowStatus::Unscheduled));
    }

    #[test]
    fn answer_problems_reject_with_the_item() {
        let mut s = submission();
        s.items.retain(|a| a.link_id != "44252-5");
        s.items[0].value_integer = Some(7);
        let reasons = decide(&catalogue(), &s, &subject(), at(ARRIVED)).err().unwrap_or_default();
        let got: Vec<(String, Option<String>)> = reasons.into_iter().map(|r| (r.code, r.link_id)).collect();
        assert_eq!(
            got,
            vec![
                (q::ANSWER_OUT_OF_RANGE.to_string(), Some("44250-9".to_string())),
                (q::REQUIRED_ITEM_MISSING.to_string(), Some("44252-5".to_string())),
            ]
        );
    }

    #[test]
    fn late_syncs_are_accepted_and_flagged() {
        // Late-sync threshold 24 h: exactly 24 h is not late, a second more is.
        let on_time = decide(&catalogue(), &submission(), &subject(), at("2026-06-16T16:00:00Z"));
        assert_eq!(on_time.map(|a| a.late_sync), Ok(false));
        let late = decide(&catalogue(), &submission(), &subject(), at("2026-06-16T16:00:01Z"));
        assert_eq!(
            late.map(|a| (a.late_sync, a.window)),
            Ok((true, WindowStatus::InWindow)),
            "window by authored time"
        );
    }

    #[test]
    fn unstorable_strings_are_named_and_made_storable() {
        assert!(unstorable_text(&submission()).is_empty());
        let mut s = submission();
        s.envelope.subject_id = Some("701\u{0}001".into());
        s.questionnaire_version = "1".repeat(65);
        s.items[0].value_integer = None;
        s.items[0].value_string = Some("ok\n\tthen\u{7}".into());
        let reasons = unstorable_text(&s);
        let got: Vec<(&str, &str)> = reasons
            .iter()
            .map(|r| (r.code.as_str(), r.detail.split(' ').next().unwrap_or_default()))
            .collect();
        assert_eq!(
            got,
            [
                (INVALID_CHARACTERS, "envelope.subject_id"),
                (TEXT_TOO_LONG, "questionnaire_version"),
                (INVALID_CHARACTERS, "items[0].value_string"),
            ]
        );
        let clean = storable(&s);
        assert_eq!(clean.envelope.subject_id.as_deref(), Some("701\u{fffd}001"));
        assert_eq!(clean.items[0].value_string.as_deref(), Some("ok\n\tthen\u{fffd}"));
        assert_eq!(clean.submission_id, s.submission_id);
        let still: Vec<String> = unstorable_text(&clean).into_iter().map(|r| r.code).collect();
        assert_eq!(still, [TEXT_TOO_LONG], "only the length rule, which storing cuts to the generic limit");
    }

    #[test]
    fn the_content_hash_ignores_transport_and_answer_order() {
        let s = submission();
        let mut resent = s.clone();
        resent.envelope.event_id = uuid::Uuid::new_v4();
        resent.envelope.recorded_at = Timestamp(0);
        resent.items.reverse();
        assert_eq!(content_hash(&s), content_hash(&resent));
        let mut changed = s.clone();
        changed.items[0].value_integer = Some(2);
        assert_ne!(content_hash(&s), content_hash(&changed));
    }
}
