//! The subject lifecycle as sites record it: screening (with the eligibility assessment), consent,
//! enrollment requests and withdrawal. Every event goes to the subject-lifecycle topic keyed by
//! subject id, so one subject's events stay in order; commands on one subject are serialized by a
//! lock on its row.
//!
//! The API records, the enrollment consumer decides: an enrollment request without consent or with
//! strata missing is accepted here and put on hold there, with a reason. What the API refuses is
//! what can never become right: unknown factors or values, and anything for a withdrawn subject.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgConnection};
use trialflow_outbox::{OutboxEvent, SchemaName};
use trialflow_schemas::{
    ConsentSigned, CriterionResult, DateTimePrecision, EligibilityAssessed, EnrollmentRequested, Envelope,
    Event, PartialDateTime, StratumValue, SubjectScreened, SubjectWithdrawn, Timestamp,
};
use uuid::Uuid;

use super::auth::{Principal, Role};
use super::error::{ApiError, unique_violation};
use super::idempotency::{self, Started};
use super::studies::{AGE_CRITERION, Eligibility, Factor, StudySetup};
use super::{Api, CommandRequest, SOURCE_SYSTEM, check_id, check_text, check_time_zone, occurred_at};

/// Who may record what happens to a subject.
const SUBJECT_ROLES: &[Role] = &[Role::SiteStaff, Role::Admin];

// ---- requests ------------------------------------------------------------------------------------

/// `POST /v1/studies/{study_id}/subjects`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScreenSubject {
    pub site_id: String,
    pub screening_number: String,
    /// The subject id from the EDC (`01-701-1015`); generated (`<site_id>-<12 hex>`) when absent.
    #[serde(default)]
    pub subject_id: Option<String>,
    #[serde(default)]
    pub age_years: Option<i32>,
    #[serde(default)]
    pub sex: Option<String>,
    /// IANA zone; the site's when absent.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Answer to every criterion of the study (true = met). `AGE` is derived, not answered.
    #[serde(default)]
    pub criteria: BTreeMap<String, bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
}

/// `POST /v1/studies/{study_id}/subjects/{subject_id}/consent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignConsent {
    pub consent_version: String,
    /// ISO 8601 date or date-time, possibly partial (`2014-01`, `2014-01-02T10:30`).
    pub signed_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
}

/// `POST /v1/studies/{study_id}/subjects/{subject_id}/enrollment-requests`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestEnrollment {
    /// Factor → value. Factors left out are allowed (the enrollment consumer holds the subject).
    #[serde(default)]
    pub strata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
}

/// `POST /v1/studies/{study_id}/subjects/{subject_id}/withdrawal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WithdrawSubject {
    /// E.g. CDISC DSDECOD `WITHDRAWAL BY SUBJECT`, `ADVERSE EVENT`.
    pub reason_code: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
}

// ---- rules (pure) --------------------------------------------------------------------------------

/// Checks the parts of a screening that need no study.
pub fn validate_screening(req: &ScreenSubject) -> Result<(), ApiError> {
    check_id("site_id", &req.site_id)?;
    check_id("screening_number", &req.screening_number)?;
    if let Some(id) = &req.subject_id {
        check_id("subject_id", id)?;
    }
    if req.age_years.is_some_and(|a| !(0..=150).contains(&a)) {
        return Err(ApiError::validation("age_years", "must be between 0 and 150"));
    }
    if let Some(sex) = &req.sex {
        check_text("sex", sex, 32)?;
    }
    if let Some(zone) = &req.time_zone {
        check_time_zone("time_zone", zone)?;
    }
    Ok(())
}

/// The eligibility of a screened subject: `AGE` from the study's age limits (inclusive; not met
/// when the age is missing or outside them; only when the study has a limit), then every criterion
/// of the study in its order, each of which must be answered. Returns (eligible, results);
/// eligible = every criterion met.
pub fn assess_eligibility(
    rules: &Eligibility,
    age_years: Option<i32>,
    answers: &BTreeMap<String, bool>,
) -> Result<(bool, Vec<CriterionResult>), ApiError> {
    if let Some(unknown) = answers.keys().find(|id| !rules.criteria.iter().any(|c| &c.criterion_id == *id)) {
        let hint = if unknown == AGE_CRITERION { "; AGE is derived from age_years" } else { "" };
        return Err(ApiError::validation(
            format!("criteria.{unknown}"),
            format!("`{unknown}` is not a criterion of this study{hint}"),
        ));
    }
    let mut results = Vec::with_capacity(rules.criteria.len() + 1);
    if rules.min_age_years.is_some() || rules.max_age_years.is_some() {
        results.push(age_result(rules.min_age_years, rules.max_age_years, age_years));
    }
    for c in &rules.criteria {
        let Some(&met) = answers.get(&c.criterion_id) else {
            return Err(ApiError::validation(
                format!("criteria.{}", c.criterion_id),
                format!("criterion `{}` ({}) is not answered", c.criterion_id, c.description),
            ));
        };
        results.push(CriterionResult { criterion_id: c.criterion_id.clone(), met, detail: None });
    }
    Ok((results.iter().all(|r| r.met), results))
}

fn age_result(min: Option<i32>, max: Option<i32>, age: Option<i32>) -> CriterionResult {
    let (met, detail) = match age {
        None => (false, "age not given".to_string()),
        Some(age) if min.is_some_and(|min| age < min) => {
            (false, format!("age {age} is below the minimum of {}", min.unwrap_or_default()))
        }
        Some(age) if max.is_some_and(|max| age > max) => {
            (false, format!("age {age} is above the maximum of {}", max.unwrap_or_default()))
        }
        Some(age) => {
            let range = match (min, max) {
                (Some(min), Some(max)) => format!("{min} to {max}"),
                (Some(min), None) => format!("at least {min}"),
                (None, Some(max)) => format!("at most {max}"),
                (None, None) => "any age".to_string(),
            };
            (true, format!("age {age} is within {range}"))
        }
    };
    CriterionResult { criterion_id: AGE_CRITERION.to_string(), met, detail: Some(detail) }
}

/// The given strata in the study's factor order. A factor the study does not have, or a value not
/// among its factor's values, is refused; factors left out are allowed.
pub fn strata_in_factor_order(
    factors: &[Factor],
    given: &BTreeMap<String, String>,
) -> Result<Vec<StratumValue>, ApiError> {
    if let Some(unknown) = given.keys().find(|name| !factors.iter().any(|f| &f.factor == *name)) {
        return Err(ApiError::validation(
            format!("strata.{unknown}"),
            format!("`{unknown}` is not a stratification factor of this study"),
        ));
    }
    let mut strata = Vec::with_capacity(given.len());
    for f in factors {
        let Some(value) = given.get(&f.factor) else { continue };
        if !f.values.contains(value) {
            return Err(ApiError::validation(
                format!("strata.{}", f.factor),
                format!("`{value}` is not a value of `{}`; use one of: {}", f.factor, f.values.join(", ")),
            ));
        }
        strata.push(StratumValue { factor: f.factor.clone(), value: value.clone() });
    }
    Ok(strata)
}

/// A subject id for a subject the site did not number: the site, then the last 12 hex digits of
/// a v7 uuid (its random part; the leading digits are the millisecond clock, shared by subjects
/// screened together).
fn generated_subject_id(site_id: &str) -> String {
    let id = Uuid::now_v7().simple().to_string();
    format!("{site_id}-{}", &id[id.len() - 12..])
}

// ---- handlers ------------------------------------------------------------------------------------

pub(crate) async fn screen_subject(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path(study_id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(SUBJECT_ROLES)?;
    let key = request.key()?;
    let req: ScreenSubject = request.json()?;
    validate_screening(&req)?;
    let occurred_at = occurred_at(req.occurred_at.as_deref())?;
    let mut command = match idempotency::start(&api, &principal, key, request.hash()).await? {
        Started::Run(command) => command,
        Started::Replay(response) => return Ok(response),
    };
    let tx = &mut command.tx;
    let s = &api.schema;

    let Some(setup) = StudySetup::load(tx, s, &study_id).await? else {
        return Err(ApiError::not_found(format!("no study `{study_id}`")));
    };
    let site_zone: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT time_zone FROM {s}.site WHERE study_id = $1 AND site_id = $2"
    )))
    .bind(&study_id)
    .bind(&req.site_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(site_zone) = site_zone else {
        return Err(ApiError::not_found(format!("no site `{}` in study `{study_id}`", req.site_id))
            .with_field("site_id"));
    };
    let rules = Eligibility {
        min_age_years: setup.min_age_years,
        max_age_years: setup.max_age_years,
        criteria: setup.criteria,
    };
    let (eligible, results) = assess_eligibility(&rules, req.age_years, &req.criteria)?;
    let subject_id = req.subject_id.clone().unwrap_or_else(|| generated_subject_id(&req.site_id));
    let time_zone = req.time_zone.clone().unwrap_or(site_zone);

    let subject_exists = || {
        ApiError::conflict(
            "subject_exists",
            format!("subject `{subject_id}` already exists in study `{study_id}`"),
        )
        .with_field("subject_id")
    };
    let screening_number_exists = || {
        ApiError::conflict(
            "screening_number_exists",
            format!("screening number `{}` is already used in study `{study_id}`", req.screening_number),
        )
        .with_field("screening_number")
    };
    let taken: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT subject_id, screening_number FROM {s}.subject
         WHERE study_id = $1 AND (subject_id = $2 OR screening_number = $3)"
    )))
    .bind(&study_id)
    .bind(&subject_id)
    .bind(&req.screening_number)
    .fetch_all(&mut **tx)
    .await?;
    if taken.iter().any(|(id, _)| *id == subject_id) {
        return Err(subject_exists());
    }
    if !taken.is_empty() {
        return Err(screening_number_exists());
    }

    let mut envelope = subject_envelope(
        SubjectScreened::NAME,
        &study_id,
        &req.site_id,
        &subject_id,
        &principal,
        occurred_at,
        None,
    );
    // The screening starts the subject's flow: every later event of the subject carries its id.
    envelope.correlation_id = Some(envelope.event_id);
    let screened = SubjectScreened {
        envelope,
        screening_number: req.screening_number.clone(),
        time_zone: time_zone.clone(),
        age_years: req.age_years,
        sex: req.sex.clone(),
    };
    let screening_event_id = screened.envelope.event_id;
    let mut envelope = subject_envelope(
        EligibilityAssessed::NAME,
        &study_id,
        &req.site_id,
        &subject_id,
        &principal,
        occurred_at,
        Some(screening_event_id),
    );
    envelope.causation_id = Some(screening_event_id);
    let assessed = EligibilityAssessed { envelope, eligible, criteria: results };

    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.subject (study_id, subject_id, site_id, screening_number, age_years, sex, time_zone,
                                 eligible, screened_by, screened_at, screening_event_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    )))
    .bind(&study_id)
    .bind(&subject_id)
    .bind(&req.site_id)
    .bind(&req.screening_number)
    .bind(req.age_years)
    .bind(&req.sex)
    .bind(&time_zone)
    .bind(eligible)
    .bind(&principal.user)
    .bind(to_datetime(occurred_at))
    .bind(screening_event_id)
    .execute(&mut **tx)
    .await
    // A concurrent screening committed first.
    .map_err(|e| match unique_violation(&e) {
        Some("subject_pk") => subject_exists(),
        Some("subject_screening_number_unique") => screening_number_exists(),
        _ => e.into(),
    })?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.eligibility_result (study_id, subject_id, criterion_id, met, detail, position)
         SELECT $1, $2, c, m, d, (o - 1)::int
         FROM unnest($3::text[], $4::boolean[], $5::text[]) WITH ORDINALITY AS u(c, m, d, o)"
    )))
    .bind(&study_id)
    .bind(&subject_id)
    .bind(assessed.criteria.iter().map(|c| c.criterion_id.as_str()).collect::<Vec<_>>())
    .bind(assessed.criteria.iter().map(|c| c.met).collect::<Vec<_>>())
    .bind(assessed.criteria.iter().map(|c| c.detail.as_deref()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;

    let topic = api.topics.of::<SubjectScreened>();
    let events = [
        OutboxEvent::avro(&screened, topic.clone(), subject_id.clone())?,
        OutboxEvent::avro(&assessed, topic, subject_id.clone())?,
    ];
    api.outbox.enqueue_all(tx, &events).await?;
    let site_id = &req.site_id;
    tracing::info!(study_id, site_id, subject_id, eligible, user = %principal.user, "Screened subject.");
    let body = serde_json::json!({
        "subject_id": subject_id,
        "eligible": eligible,
        "event_ids": [screening_event_id, assessed.envelope.event_id],
    });
    command.finish(&api, StatusCode::CREATED, body).await
}

pub(crate) async fn sign_consent(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path((study_id, subject_id)): Path<(String, String)>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(SUBJECT_ROLES)?;
    let key = request.key()?;
    let req: SignConsent = request.json()?;
    check_text("consent_version", &req.consent_version, 64)?;
    let signed_at = PartialDateTime::parse(&req.signed_at);
    if signed_at.precision == DateTimePrecision::Unknown {
        return Err(ApiError::validation(
            "signed_at",
            format!(
                "`{}` is not an ISO 8601 date or date-time (e.g. `2014-01-02` or `2014-01`)",
                req.signed_at
            ),
        ));
    }
    let occurred_at = occurred_at(req.occurred_at.as_deref())?;
    let mut command = match idempotency::start(&api, &principal, key, request.hash()).await? {
        Started::Run(command) => command,
        Started::Replay(response) => return Ok(response),
    };
    let tx = &mut command.tx;
    let s = &api.schema;
    let subject = Subject::lock(tx, s, &study_id, &subject_id).await?;
    subject.refuse_if_withdrawn()?;

    let envelope = subject.envelope(ConsentSigned::NAME, &study_id, &subject_id, &principal, occurred_at);
    let event = ConsentSigned {
        envelope,
        consent_version: req.consent_version.clone(),
        signed_at: signed_at.clone(),
    };
    let event_id = event.envelope.event_id;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.consent (event_id, study_id, subject_id, consent_version, signed_at_raw, signed_at,
                                 recorded_by, recorded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
    )))
    .bind(event_id)
    .bind(&study_id)
    .bind(&subject_id)
    .bind(&req.consent_version)
    .bind(&signed_at.raw)
    .bind(signed_at.earliest.and_then(Timestamp::to_datetime))
    .bind(&principal.user)
    .bind(to_datetime(occurred_at))
    .execute(&mut **tx)
    .await?;
    api.outbox
        .enqueue(tx, OutboxEvent::avro(&event, api.topics.of::<ConsentSigned>(), subject_id.clone())?)
        .await?;
    tracing::info!(study_id, subject_id, consent_version = %req.consent_version, "Recorded consent.");
    let body = serde_json::json!({"subject_id": subject_id, "event_ids": [event_id]});
    command.finish(&api, StatusCode::CREATED, body).await
}

pub(crate) async fn request_enrollment(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path((study_id, subject_id)): Path<(String, String)>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(SUBJECT_ROLES)?;
    let key = request.key()?;
    let req: RequestEnrollment = request.json()?;
    let occurred_at = occurred_at(req.occurred_at.as_deref())?;
    let mut command = match idempotency::start(&api, &principal, key, request.hash()).await? {
        Started::Run(command) => command,
        Started::Replay(response) => return Ok(response),
    };
    let tx = &mut command.tx;
    let s = &api.schema;
    let subject = Subject::lock(tx, s, &study_id, &subject_id).await?;
    subject.refuse_if_withdrawn()?;
    let Some(setup) = StudySetup::load(tx, s, &study_id).await? else {
        return Err(ApiError::not_found(format!("no study `{study_id}`")));
    };
    let strata = strata_in_factor_order(&setup.factors, &req.strata)?;

    let envelope =
        subject.envelope(EnrollmentRequested::NAME, &study_id, &subject_id, &principal, occurred_at);
    let event = EnrollmentRequested { envelope, strata };
    let event_id = event.envelope.event_id;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.enrollment_request
             (event_id, study_id, subject_id, strata, requested_by, requested_at)
         VALUES ($1, $2, $3, $4, $5, $6)"
    )))
    .bind(event_id)
    .bind(&study_id)
    .bind(&subject_id)
    .bind(Json(&event.strata))
    .bind(&principal.user)
    .bind(to_datetime(occurred_at))
    .execute(&mut **tx)
    .await?;
    let missing: Vec<&str> = setup
        .factors
        .iter()
        .filter(|f| !req.strata.contains_key(&f.factor))
        .map(|f| f.factor.as_str())
        .collect();
    api.outbox
        .enqueue(tx, OutboxEvent::avro(&event, api.topics.of::<EnrollmentRequested>(), subject_id.clone())?)
        .await?;
    tracing::info!(study_id, subject_id, ?missing, "Recorded enrollment request.");
    let body = serde_json::json!({"subject_id": subject_id, "event_ids": [event_id]});
    command.finish(&api, StatusCode::CREATED, body).await
}

pub(crate) async fn withdraw_subject(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path((study_id, subject_id)): Path<(String, String)>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(SUBJECT_ROLES)?;
    let key = request.key()?;
    let req: WithdrawSubject = request.json()?;
    check_text("reason_code", &req.reason_code, 64)?;
    if let Some(reason) = &req.reason {
        check_text("reason", reason, 2000)?;
    }
    let occurred_at = occurred_at(req.occurred_at.as_deref())?;
    let mut command = match idempotency::start(&api, &principal, key, request.hash()).await? {
        Started::Run(command) => command,
        Started::Replay(response) => return Ok(response),
    };
    let tx = &mut command.tx;
    let s = &api.schema;
    let subject = Subject::lock(tx, s, &study_id, &subject_id).await?;
    subject.refuse_if_withdrawn()?;

    let envelope = subject.envelope(SubjectWithdrawn::NAME, &study_id, &subject_id, &principal, occurred_at);
    let event =
        SubjectWithdrawn { envelope, reason_code: req.reason_code.clone(), reason: req.reason.clone() };
    let event_id = event.envelope.event_id;
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {s}.subject SET withdrawn_at = $3, withdrawal_reason_code = $4, withdrawal_reason = $5
         WHERE study_id = $1 AND subject_id = $2"
    )))
    .bind(&study_id)
    .bind(&subject_id)
    .bind(to_datetime(occurred_at))
    .bind(&req.reason_code)
    .bind(&req.reason)
    .execute(&mut **tx)
    .await?;
    api.outbox
        .enqueue(tx, OutboxEvent::avro(&event, api.topics.of::<SubjectWithdrawn>(), subject_id.clone())?)
        .await?;
    tracing::info!(study_id, subject_id, reason_code = %req.reason_code, "Withdrew subject.");
    let body = serde_json::json!({"subject_id": subject_id, "event_ids": [event_id]});
    command.finish(&api, StatusCode::CREATED, body).await
}

// ---- the stored subject --------------------------------------------------------------------------

/// A subject as later commands need it, its row locked until the command ends.
#[derive(Debug)]
struct Subject {
    site_id: String,
    screening_event_id: Uuid,
    withdrawn: bool,
}

impl Subject {
    /// Locks the subject's row (commands on one subject run one after the other, so a withdrawal
    /// and an enrollment request cannot both pass the withdrawn check), 404 when there is none.
    async fn lock(
        conn: &mut PgConnection,
        s: &SchemaName,
        study_id: &str,
        subject_id: &str,
    ) -> Result<Self, ApiError> {
        let row: Option<(String, Uuid, bool)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT site_id, screening_event_id, withdrawn_at IS NOT NULL FROM {s}.subject
             WHERE study_id = $1 AND subject_id = $2 FOR UPDATE"
        )))
        .bind(study_id)
        .bind(subject_id)
        .fetch_optional(&mut *conn)
        .await?;
        let (site_id, screening_event_id, withdrawn) = row
            .ok_or_else(|| ApiError::not_found(format!("no subject `{subject_id}` in study `{study_id}`")))?;
        Ok(Self { site_id, screening_event_id, withdrawn })
    }

    fn refuse_if_withdrawn(&self) -> Result<(), ApiError> {
        if self.withdrawn {
            return Err(ApiError::conflict(
                "subject_withdrawn",
                "the subject has been withdrawn from the study",
            ));
        }
        Ok(())
    }

    fn envelope(
        &self,
        event_type: &str,
        study_id: &str,
        subject_id: &str,
        principal: &Principal,
        occurred_at: Timestamp,
    ) -> Envelope {
        subject_envelope(
            event_type,
            study_id,
            &self.site_id,
            subject_id,
            principal,
            occurred_at,
            Some(self.screening_event_id),
        )
    }
}

fn subject_envelope(
    event_type: &str,
    study_id: &str,
    site_id: &str,
    subject_id: &str,
    principal: &Principal,
    occurred_at: Timestamp,
    correlation_id: Option<Uuid>,
) -> Envelope {
    let mut envelope = Envelope::new(event_type, study_id, SOURCE_SYSTEM, occurred_at);
    envelope.site_id = Some(site_id.to_string());
    envelope.subject_id = Some(subject_id.to_string());
    envelope.actor = Some(principal.user.clone());
    envelope.correlation_id = correlation_id;
    envelope
}

fn to_datetime(t: Timestamp) -> chrono::DateTime<chrono::Utc> {
    t.to_datetime().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site_api::studies::Criterion;

    fn rules(min: Option<i32>, max: Option<i32>) -> Eligibility {
        Eligibility {
            min_age_years: min,
            max_age_years: max,
            criteria: vec![
                Criterion { criterion_id: "INC01".into(), description: "MMSE 10-23".into() },
                Criterion { criterion_id: "EXC01".into(), description: "No prior xanomeline".into() },
            ],
        }
    }

    fn answers(inc: bool, exc: bool) -> BTreeMap<String, bool> {
        BTreeMap::from([("INC01".to_string(), inc), ("EXC01".to_string(), exc)])
    }

    fn age_met(min: Option<i32>, max: Option<i32>, age: Option<i32>) -> Option<bool> {
        let (_, results) = assess_eligibility(&rules(min, max), age, &answers(true, true)).ok()?;
        results.iter().find(|r| r.criterion_id == AGE_CRITERION).map(|r| r.met)
    }

    #[test]
    fn age_limits_are_inclusive() {
        assert_eq!(age_met(Some(50), Some(89), Some(50)), Some(true));
        assert_eq!(age_met(Some(50), Some(89), Some(89)), Some(true));
        assert_eq!(age_met(Some(50), Some(89), Some(49)), Some(false));
        assert_eq!(age_met(Some(50), Some(89), Some(90)), Some(false));
        assert_eq!(age_met(Some(18), None, Some(120)), Some(true));
        assert_eq!(age_met(None, Some(17), Some(17)), Some(true));
        assert_eq!(age_met(None, Some(17), Some(18)), Some(false));
    }

    #[test]
    fn missing_age_fails_the_age_criterion_and_says_why() {
        let result = assess_eligibility(&rules(Some(50), None), None, &answers(true, true));
        let Ok((eligible, results)) = result else { panic!("{result:?}") };
        assert!(!eligible);
        assert_eq!(results[0].criterion_id, "AGE");
        assert_eq!(results[0].detail.as_deref(), Some("age not given"));
        let result = assess_eligibility(&rules(Some(50), None), Some(40), &answers(true, true));
        let detail = result.ok().and_then(|(_, r)| r[0].detail.clone());
        assert_eq!(detail.as_deref(), Some("age 40 is below the minimum of 50"));
    }

    #[test]
    fn no_age_limit_means_no_age_criterion() {
        assert_eq!(age_met(None, None, None), None);
        let result = assess_eligibility(&rules(None, None), None, &answers(true, true));
        assert_eq!(result.map(|(eligible, r)| (eligible, r.len())), Ok((true, 2)));
    }

    #[test]
    fn every_criterion_must_be_met_and_answered() {
        let eligible =
            |inc, exc| assess_eligibility(&rules(Some(50), Some(89)), Some(60), &answers(inc, exc));
        assert_eq!(eligible(true, true).map(|(e, _)| e), Ok(true));
        assert_eq!(eligible(false, true).map(|(e, _)| e), Ok(false));
        assert_eq!(eligible(true, false).map(|(e, _)| e), Ok(false));
        let order =
            eligible(true, true).map(|(_, r)| r.into_iter().map(|r| r.criterion_id).collect::<Vec<_>>());
        assert_eq!(order, Ok(vec!["AGE".to_string(), "INC01".to_string(), "EXC01".to_string()]));

        let mut partial = answers(true, true);
        partial.remove("EXC01");
        let err = assess_eligibility(&rules(None, None), None, &partial).err();
        assert_eq!(err.and_then(|e| e.field).as_deref(), Some("criteria.EXC01"));
        let mut extra = answers(true, true);
        extra.insert("INC99".into(), true);
        let err = assess_eligibility(&rules(None, None), None, &extra).err();
        assert_eq!(err.and_then(|e| e.field).as_deref(), Some("criteria.INC99"));
        let mut age = answers(true, true);
        age.insert("AGE".into(), true);
        let err = assess_eligibility(&rules(Some(1), None), Some(5), &age).err();
        assert_eq!(err.map(|e| e.status), Some(StatusCode::UNPROCESSABLE_ENTITY));
    }

    #[test]
    fn strata_follow_the_factor_order_and_may_be_incomplete() {
        let factors = vec![
            Factor { factor: "SEX".into(), values: vec!["F".into(), "M".into()] },
            Factor { factor: "AGEGR".into(), values: vec!["<65".into(), ">=65".into()] },
        ];
        let given =
            BTreeMap::from([("AGEGR".to_string(), ">=65".to_string()), ("SEX".to_string(), "F".to_string())]);
        let strata = strata_in_factor_order(&factors, &given);
        let names = strata.map(|s| s.into_iter().map(|s| s.factor).collect::<Vec<_>>());
        assert_eq!(names, Ok(vec!["SEX".to_string(), "AGEGR".to_string()]));
        let partial = BTreeMap::from([("AGEGR".to_string(), "<65".to_string())]);
        assert_eq!(strata_in_factor_order(&factors, &partial).map(|s| s.len()), Ok(1));

        let bad_value = BTreeMap::from([("SEX".to_string(), "X".to_string())]);
        let err = strata_in_factor_order(&factors, &bad_value).err();
        assert_eq!(err.and_then(|e| e.field).as_deref(), Some("strata.SEX"));
        let bad_factor = BTreeMap::from([("REGION".to_string(), "EU".to_string())]);
        let err = strata_in_factor_order(&factors, &bad_factor).err();
        assert_eq!(err.and_then(|e| e.field).as_deref(), Some("strata.REGION"));
    }

    #[test]
    fn generated_ids_start_with_the_site_and_differ() {
        let (a, b) = (generated_subject_id("701"), generated_subject_id("701"));
        assert!(a.starts_with("701-") && a.len() == 16, "{a}");
        assert_ne!(a, b);
        assert!(check_id("subject_id", &a).is_ok());
    }
}
