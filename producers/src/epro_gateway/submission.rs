//! `POST /v1/submissions`: a questionnaire response in, an acknowledged Kafka record out.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use trialflow_http::ApiError;
use trialflow_http::input::{self, SUBMISSION_BODY};
use trialflow_schemas::{Answer, Event, QuestionnaireResponseSubmitted};
use uuid::Uuid;

use super::auth::App;
use super::{Gateway, MAX_BODY_BYTES};
use crate::site_api::check_time_zone;

/// The 202 body: the ids the app sent, and where the broker stored the event.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Accepted {
    submission_id: Uuid,
    event_id: Uuid,
    partition: i32,
    offset: i64,
}

pub(crate) async fn submit(
    State(gateway): State<Arc<Gateway>>,
    App(app): App,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let received_at = gateway.clock.now();
    let body = body.map_err(|rejection| input::body_error(rejection, MAX_BODY_BYTES))?;
    let submission: QuestionnaireResponseSubmitted = input::parse_body(&body, &SUBMISSION_BODY)?;
    let subject_id = check_shape(&submission)?;
    app.require_study(&submission.envelope.study_id)?;
    check_not_future(&submission, received_at, gateway.max_future_skew)?;
    let ack = gateway.publisher.publish(&submission, subject_id, received_at).await?;
    let accepted = Accepted {
        submission_id: submission.submission_id,
        event_id: submission.envelope.event_id,
        partition: ack.partition,
        offset: ack.offset,
    };
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// The checks that need no knowledge of the study: the submission can be keyed, routed, read and
/// stored (every string within [`input::submission_problems`]' rules, which the validation consumer
/// applies too). Returns the subject id, the record's key. Whether the questionnaire exists, the
/// answers are in range, the window is right or the submission is a duplicate is the validation
/// consumer's call.
pub(crate) fn check_shape(submission: &QuestionnaireResponseSubmitted) -> Result<&str, ApiError> {
    if let Some((field, problem)) = input::submission_problems(submission).into_iter().next() {
        return Err(input::refusal(&field, problem));
    }
    let envelope = &submission.envelope;
    if envelope.event_type != QuestionnaireResponseSubmitted::NAME {
        return Err(ApiError::validation(
            "envelope.event_type",
            format!(
                "is `{}`; this endpoint takes `{}`",
                envelope.event_type,
                QuestionnaireResponseSubmitted::NAME
            ),
        ));
    }
    not_blank("envelope.study_id", &envelope.study_id)?;
    let subject_id = envelope.subject_id.as_deref().ok_or_else(|| {
        ApiError::validation("envelope.subject_id", "is required: submissions are keyed by subject")
    })?;
    not_blank("envelope.subject_id", subject_id)?;
    not_blank("questionnaire", &submission.questionnaire)?;
    not_blank("questionnaire_version", &submission.questionnaire_version)?;
    check_time_zone("device_time_zone", &submission.device_time_zone)?;
    for (i, answer) in submission.items.iter().enumerate() {
        not_blank(&format!("items[{i}].link_id"), &answer.link_id)?;
        let values = value_count(answer);
        if values != 1 {
            return Err(ApiError::validation(
                format!("items[{i}]"),
                format!(
                    "has {values} values; an answer has exactly one of value_integer, value_decimal, \
                     value_string, value_boolean"
                ),
            ));
        }
    }
    Ok(subject_id)
}

/// The instants the app states may lead the gateway's clock (a replay's virtual clock, when one
/// drives it) by the skew at most: what the validation consumer would reject as authored in the
/// future is refused here, where the app is still listening.
fn check_not_future(
    s: &QuestionnaireResponseSubmitted,
    now: DateTime<Utc>,
    max_skew: chrono::Duration,
) -> Result<(), ApiError> {
    for (field, at) in [
        ("authored_at", s.authored_at),
        ("envelope.occurred_at", s.envelope.occurred_at),
        ("envelope.recorded_at", s.envelope.recorded_at),
    ] {
        input::check_timestamp_not_future(field, at, now, max_skew)?;
    }
    Ok(())
}

fn not_blank(field: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() { Err(ApiError::validation(field, "must not be empty")) } else { Ok(()) }
}

fn value_count(answer: &Answer) -> usize {
    [
        answer.value_integer.is_some(),
        answer.value_decimal.is_some(),
        answer.value_string.is_some(),
        answer.value_boolean.is_some(),
    ]
    .into_iter()
    .filter(|set| *set)
    .count()
}

#[cfg(test)]
mod tests {
    use trialflow_schemas::{Envelope, ResponseStatus, Timestamp};

    use super::*;

    fn submission() -> QuestionnaireResponseSubmitted {
        let mut envelope =
            Envelope::new(QuestionnaireResponseSubmitted::NAME, "CDISCPILOT01", "epro-app", Timestamp(0));
        envelope.subject_id = Some("01-701-1015".to_string());
        QuestionnaireResponseSubmitted {
            envelope,
            submission_id: Uuid::new_v4(),
            questionnaire: "http://loinc.org/44249-1".to_string(),
            questionnaire_version: "1.0".to_string(),
            scheduled_occurrence: Some("DAY-28".to_string()),
            status: ResponseStatus::Completed,
            authored_at: Timestamp(1_700_000_000_000_000),
            device_time_zone: "Europe/Berlin".to_string(),
            items: vec![Answer::integer("q1", 2), Answer::integer("q2", 0)],
        }
    }

    fn field_of(s: &QuestionnaireResponseSubmitted) -> Option<String> {
        check_shape(s).err().filter(|e| e.status == StatusCode::UNPROCESSABLE_ENTITY).and_then(|e| e.field)
    }

    #[test]
    fn free_text_answers_may_break_lines() {
        let mut s = submission();
        s.items[0].value_integer = None;
        s.items[0].value_string = Some("line one\r\nline two\tend".into());
        assert!(check_shape(&s).is_ok());
    }

    #[test]
    fn stated_instants_may_lead_the_clock_by_the_skew_only() {
        let mut s = submission();
        s.envelope.recorded_at = s.authored_at;
        let authored = s.authored_at.to_datetime().unwrap_or_default();
        let skew = chrono::Duration::minutes(5);
        assert!(check_not_future(&s, authored - skew, skew).is_ok());
        let err = check_not_future(&s, authored - skew - chrono::Duration::seconds(1), skew).err();
        assert_eq!(err.and_then(|e| e.field).as_deref(), Some("authored_at"));
        let mut late = s.clone();
        late.envelope.recorded_at = Timestamp(late.authored_at.0 + 3_600_000_000);
        let err = check_not_future(&late, authored, skew).err();
        assert_eq!(err.and_then(|e| e.field).as_deref(), Some("envelope.recorded_at"));
    }

    #[test]
    fn a_well_formed_submission_is_keyed_by_its_subject() {
        let s = submission();
        assert_eq!(check_shape(&s).ok(), Some("01-701-1015"));
        let s = QuestionnaireResponseSubmitted { items: vec![], ..submission() };
        assert!(check_shape(&s).is_ok(), "an empty response is the consumer's call");
    }

    #[test]
    fn each_shape_check_names_its_field() {
        type Break = fn(&mut QuestionnaireResponseSubmitted);
        let cases: [(&str, Break); 15] = [
            ("envelope.event_type", |s| s.envelope.event_type = "SubjectScreened".into()),
            ("envelope.study_id", |s| s.envelope.study_id = " ".into()),
            ("envelope.subject_id", |s| s.envelope.subject_id = None),
            ("envelope.subject_id", |s| s.envelope.subject_id = Some(String::new())),
            ("questionnaire", |s| s.questionnaire = String::new()),
            ("questionnaire_version", |s| s.questionnaire_version = String::new()),
            ("device_time_zone", |s| s.device_time_zone = "Mars/Olympus".into()),
            ("items[1].link_id", |s| s.items[1].link_id = String::new()),
            ("items[1]", |s| s.items[1].value_integer = None),
            ("items[0]", |s| s.items[0].value_boolean = Some(true)),
            ("envelope.subject_id", |s| s.envelope.subject_id = Some("01\u{0}701".into())),
            ("envelope.study_id", |s| s.envelope.study_id = "S".repeat(65)),
            ("questionnaire", |s| s.questionnaire = "PHQ-9\n".into()),
            ("items[1].link_id", |s| s.items[1].link_id = "q\u{7f}".into()),
            ("items[0].value_string", |s| {
                s.items[0].value_integer = None;
                s.items[0].value_string = Some("fine\tbut \u{1b}[31m not this".into());
            }),
        ];
        for (field, break_it) in cases {
            let mut s = submission();
            break_it(&mut s);
            assert_eq!(field_of(&s).as_deref(), Some(field));
        }
    }
}
