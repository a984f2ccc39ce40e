//! Emergency unblinding — the code break:
//! `POST /v1/studies/{study_id}/subjects/{subject_id}/code-break`.
//!
//! An investigator whose patient needs it for a safety decision (ICH E6(R3) 2.4; the protocol's
//! unblinding procedure) is shown the subject's treatment — arm, randomization number, kit — and
//! nobody else is:
//!
//! * **who**: role `investigator`, of the subject's study and site (the token's scope), signed in
//!   at the identity provider at most `SITE_API_CODE_BREAK_MAX_AUTH_AGE_SECS` ago (the token's
//!   `auth_time`; else 401 `authentication_too_old` with an RFC 9470 step-up challenge). Static
//!   tokens carry no `auth_time`, so the code break needs an identity provider;
//! * **why**: a reason, mandatory, free text;
//! * **what is written**, in one transaction: an audit record (who, when, why; the arm and the
//!   kit as *unblinded* changes, left out of every blinded view of `GET /v1/audit`), and
//!   `CodeBroken` on the subject's lifecycle topic — who, role and why, never what was shown —
//!   from which monitoring raises the `CODE-BREAK` alert to the study team;
//! * **what is answered**: the treatment, to this caller only (`Cache-Control: no-store`). It is
//!   read from the randomization records (the enrollment service's tables, see
//!   [`TreatmentRecords`]) and never stored with the idempotency key: a retry with the same key,
//!   by the same user, gets the same record and event ids and the treatment read again, and
//!   nothing new is written (the same disclosure to the same person). A new key is a new code
//!   break, recorded and alerted again.
//!
//! 409 `not_randomized` when the subject has no treatment yet; a withdrawn subject's code can be
//! broken (safety follow-up continues after withdrawal). Logs never name the treatment.

use std::fmt::Debug;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection};
use trialflow_http::ApiError;
use trialflow_http::auth::{Principal, Role};
use trialflow_http::input::{MAX_FREE_TEXT_CHARS, check_free_text};
use trialflow_schemas::{CodeBroken, Event};

use super::subjects::{Subject, about, to_datetime};
use super::{Api, CommandRequest};

/// Who may break the code.
pub const ROLES: &[Role] = &[Role::Investigator];
/// How old a sign-in may be for a code break by default (seconds).
pub const DEFAULT_MAX_AUTH_AGE_SECS: u64 = 300;
/// The longest `SITE_API_CODE_BREAK_MAX_AUTH_AGE_SECS` accepted: an hour.
pub const MAX_MAX_AUTH_AGE_SECS: u64 = 3_600;

/// `SITE_API_CODE_BREAK_MAX_AUTH_AGE_SECS`: 1 to [`MAX_MAX_AUTH_AGE_SECS`].
pub fn parse_max_auth_age(value: &str) -> Result<u64, String> {
    let secs: u64 = value.trim().parse().map_err(|e: std::num::ParseIntError| e.to_string())?;
    if !(1..=MAX_MAX_AUTH_AGE_SECS).contains(&secs) {
        return Err(format!("must be between 1 and {MAX_MAX_AUTH_AGE_SECS} (an hour)"));
    }
    Ok(secs)
}

/// `POST .../code-break`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakCode {
    /// Why the treatment must be known (mandatory).
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
}

/// UNBLINDED: what a subject was randomized to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Treatment {
    pub arm_code: String,
    pub randomization_number: String,
    /// The kit dispensed at enrollment, once one is.
    pub kit_number: Option<String>,
}

/// Where the code break reads a subject's treatment: the randomization service's records, in
/// the same database, read in the code break's transaction. The pipeline wires the enrollment
/// service's (the site API knows no arm assignment of its own).
pub trait TreatmentRecords: Send + Sync + Debug {
    /// The treatment of `subject_id` of `study_id`; `None` before randomization.
    fn treatment<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        study_id: &'c str,
        subject_id: &'c str,
    ) -> BoxFuture<'c, sqlx::Result<Option<Treatment>>>;
}

pub(crate) async fn break_code(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path((study_id, subject_id)): Path<(String, String)>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(ROLES)?;
    principal.require_study(&study_id)?;
    principal
        .require_fresh_authentication(api.code_break_max_auth_age_secs, chrono::Utc::now().timestamp())?;
    let (key, req): (_, BreakCode) = request.parse()?;
    check_free_text("reason", &req.reason, MAX_FREE_TEXT_CHARS)?;
    let occurred_at = api.occurred_at(req.occurred_at.as_deref())?;
    let Some(records) = api.treatments.clone() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "code_break_unavailable",
            "this site API is not connected to the randomization records; use the study's \
             emergency unblinding procedure",
        ));
    };
    let ids = (study_id.as_str(), subject_id.as_str());
    let mut shown = None;
    let mut answer = api
        .run_once_answer(&principal, key, &request, async |command| {
            let subject = Subject::lock(&mut command.tx, &api.schema, &principal, ids.0, ids.1).await?;
            let treatment = read_treatment(&api, records.as_ref(), &mut command.tx, &subject).await?;
            let envelope = subject.envelope(CodeBroken::NAME, &principal, occurred_at);
            let event = CodeBroken {
                envelope,
                actor_role: principal.role.as_str().to_string(),
                reason: req.reason.clone(),
            };
            let record = request.audit(&principal, "subject.code_broken", "subject", ids.1);
            api.audit(&mut command.tx, audit(record, &event, &treatment)).await?;
            command.emit(&event, ids.1).await?;
            tracing::warn!(
                study_id = ids.0,
                subject_id = ids.1,
                user = %principal.user,
                event_id = %event.envelope.event_id,
                "Treatment code broken (emergency unblinding)."
            );
            shown = Some(treatment);
            Ok(serde_json::json!({"subject_id": ids.1, "event_ids": [event.envelope.event_id]}))
        })
        .await?;
    let treatment = match shown {
        Some(treatment) => treatment,
        // A retry of a code break this user made: the treatment is read again (never stored).
        None => {
            let mut tx = api.pool.begin().await?;
            let subject = Subject::lock(&mut tx, &api.schema, &principal, ids.0, ids.1).await?;
            read_treatment(&api, records.as_ref(), &mut tx, &subject).await?
        }
    };
    answer.body_mut()["treatment"] = serde_json::to_value(TreatmentView::from(treatment)).unwrap_or_default();
    let mut response = answer.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// The subject's treatment with its arm's name: 409 `not_randomized` before randomization.
async fn read_treatment(
    api: &Api,
    records: &dyn TreatmentRecords,
    conn: &mut PgConnection,
    subject: &Subject,
) -> Result<(Treatment, String), ApiError> {
    let (study_id, subject_id) = (subject.study_id.as_str(), subject.subject_id.as_str());
    let Some(treatment) = records.treatment(&mut *conn, study_id, subject_id).await? else {
        return Err(ApiError::conflict(
            "not_randomized",
            format!("subject `{subject_id}` has not been randomized: there is no code to break"),
        ));
    };
    let s = &api.schema;
    let name: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT name FROM {s}.study_arm WHERE study_id = $1 AND arm_code = $2"
    )))
    .bind(study_id)
    .bind(&treatment.arm_code)
    .fetch_optional(conn)
    .await?;
    Ok((treatment, name.unwrap_or_default()))
}

/// The treatment as the caller sees it.
#[derive(Debug, Serialize)]
struct TreatmentView {
    arm_code: String,
    arm_name: String,
    randomization_number: String,
    kit_number: Option<String>,
}

impl From<(Treatment, String)> for TreatmentView {
    fn from((t, arm_name): (Treatment, String)) -> Self {
        Self {
            arm_code: t.arm_code,
            arm_name,
            randomization_number: t.randomization_number,
            kit_number: t.kit_number,
        }
    }
}

/// The code break's audit record: when and why; what was shown as unblinded changes.
fn audit(
    record: trialflow_outbox::AuditRecord,
    event: &CodeBroken,
    (treatment, arm_name): &(Treatment, String),
) -> trialflow_outbox::AuditRecord {
    let at = to_datetime(event.envelope.occurred_at).to_rfc3339();
    about(record, &event.envelope)
        .change("code_broken_at", Value::Null, at)
        .change("randomization_number", Value::Null, treatment.randomization_number.as_str())
        .unblinded_change("arm_code", Value::Null, treatment.arm_code.as_str())
        .unblinded_change("arm_name", Value::Null, arm_name.as_str())
        .unblinded_change("kit_number", Value::Null, treatment.kit_number.as_deref())
        .reason(event.reason.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sign_in_age_is_bounded() {
        assert_eq!(parse_max_auth_age(" 300 "), Ok(300));
        assert_eq!(parse_max_auth_age("3600"), Ok(3600));
        for bad in ["0", "3601", "-1", "five", "", "1e3"] {
            assert!(parse_max_auth_age(bad).is_err(), "{bad:?}");
        }
    }
}
