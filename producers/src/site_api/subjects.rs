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
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgConnection};
use trialflow_http::ApiError;
use trialflow_http::auth::{Principal, Role};
use trialflow_http::input::{MAX_CODE_CHARS, MAX_FREE_TEXT_CHARS, check_free_text, check_id, check_text};
use trialflow_outbox::{AuditRecord, SchemaName};
use trialflow_schemas::{
    ConsentSigned, CriterionResult, DateTimePrecision, EligibilityAssessed, EnrollmentRequested, Envelope,
    Event, PartialDateTime, StratumValue, SubjectScreened, SubjectWithdrawn, Timestamp,
};
use uuid::Uuid;

use super::error::unique_violation;
use super::studies::{AGE_CRITERION, Eligibility, Factor, StudySetup, no_site, site_time_zone};
use super::{Api, CommandRequest, MAX_SEX_CHARS, PgQuery, SOURCE_SYSTEM, check_time_zone, json};

/// Who may record what happens to a subject.
const SUBJECT_ROLES: &[Role] = &[Role::SiteStaff, Role::Investigator, Role::Admin];

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
    /// ISO 8601 date or date-time, possibly partial (`2014-01`, `2014-01-02T10:30`); empty when
    /// the source did not record the date (kept with precision `UNKNOWN`).
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
        check_text("sex", sex, MAX_SEX_CHARS)?;
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

/// The consent's signing date, after checking the consent version.
fn check_consent(req: &SignConsent) -> Result<PartialDateTime, ApiError> {
    check_text("consent_version", &req.consent_version, MAX_CODE_CHARS)?;
    let signed_at = PartialDateTime::parse(&req.signed_at);
    // An empty date says the source did not record it (the CDISC pilot's RFICDTC): kept as
    // unknown, never invented. Text that is not a date is a mistake.
    if signed_at.precision == DateTimePrecision::Unknown && !req.signed_at.is_empty() {
        return Err(ApiError::validation(
            "signed_at",
            format!(
                "`{}` is not an ISO 8601 date or date-time (e.g. `2014-01-02` or `2014-01`)",
                req.signed_at
            ),
        ));
    }
    Ok(signed_at)
}

fn check_withdrawal(req: &WithdrawSubject) -> Result<(), ApiError> {
    check_text("reason_code", &req.reason_code, MAX_CODE_CHARS)?;
    if let Some(reason) = &req.reason {
        check_free_text("reason", reason, MAX_FREE_TEXT_CHARS)?;
    }
    Ok(())
}

// ---- handlers ------------------------------------------------------------------------------------

pub(crate) async fn screen_subject(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path(study_id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(SUBJECT_ROLES)?;
    let (key, req): (_, ScreenSubject) = request.parse()?;
    principal.require_site(&study_id, &req.site_id)?;
    validate_screening(&req)?;
    let occurred_at = api.occurred_at(req.occurred_at.as_deref())?;
    api.run_once(&principal, key, &request, async |command| {
        let s = &api.schema;
        let setup = StudySetup::require(&mut command.tx, s, &study_id).await?;
        let site_zone = site_time_zone(&mut command.tx, s, &study_id, &req.site_id)
            .await?
            .ok_or_else(|| no_site(&study_id, &req.site_id).with_field("site_id"))?;
        let rules = Eligibility {
            min_age_years: setup.min_age_years,
            max_age_years: setup.max_age_years,
            criteria: setup.criteria,
        };
        let assessment = assess_eligibility(&rules, req.age_years, &req.criteria)?;
        let subject_id = req.subject_id.clone().unwrap_or_else(|| generated_subject_id(&req.site_id));
        let time_zone = req.time_zone.clone().unwrap_or(site_zone);
        let ids = ScreeningIds {
            study_id: &study_id,
            subject_id: &subject_id,
            screening_number: &req.screening_number,
        };
        ids.refuse_taken(&mut command.tx, s).await?;

        let (screened, assessed) =
            screening_events(&ids, &req, time_zone, &principal, occurred_at, assessment);
        insert_subject(&mut command.tx, s, &screened, assessed.eligible)
            .await
            .map_err(|e| ids.on_insert_error(e))?;
        insert_eligibility_results(&mut command.tx, s, &assessed).await?;
        api.audit(
            &mut command.tx,
            screening_audit(
                request.audit(&principal, "subject.screened", "subject", &subject_id),
                &screened,
                &assessed,
            ),
        )
        .await?;
        command
            .emit_all(&[api.outbox_event(&screened, &subject_id)?, api.outbox_event(&assessed, &subject_id)?])
            .await?;
        let (site_id, eligible) = (&req.site_id, assessed.eligible);
        tracing::info!(study_id, site_id, subject_id, eligible, user = %principal.user, "Screened subject.");
        Ok(serde_json::json!({
            "subject_id": subject_id,
            "eligible": eligible,
            "event_ids": [screened.envelope.event_id, assessed.envelope.event_id],
        }))
    })
    .await
}

pub(crate) async fn sign_consent(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path((study_id, subject_id)): Path<(String, String)>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(SUBJECT_ROLES)?;
    let (key, req): (_, SignConsent) = request.parse()?;
    let signed_at = check_consent(&req)?;
    if let Some(earliest) = signed_at.earliest {
        api.not_in_future("signed_at", earliest)?;
    }
    let occurred_at = api.occurred_at(req.occurred_at.as_deref())?;
    on_active_subject(&api, &principal, key, &request, (&study_id, &subject_id), async |tx, subject| {
        let envelope = subject.envelope(ConsentSigned::NAME, &principal, occurred_at);
        let event = ConsentSigned { envelope, consent_version: req.consent_version.clone(), signed_at };
        insert_consent(tx, &api.schema, &event).await?;
        api.audit(
            tx,
            consent_audit(
                request.audit(&principal, "subject.consent_signed", "subject", &subject_id),
                &event,
            ),
        )
        .await?;
        tracing::info!(study_id, subject_id, consent_version = %req.consent_version, "Recorded consent.");
        Ok(event)
    })
    .await
}

pub(crate) async fn request_enrollment(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path((study_id, subject_id)): Path<(String, String)>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(SUBJECT_ROLES)?;
    let (key, req): (_, RequestEnrollment) = request.parse()?;
    let occurred_at = api.occurred_at(req.occurred_at.as_deref())?;
    on_active_subject(&api, &principal, key, &request, (&study_id, &subject_id), async |tx, subject| {
        let s = &api.schema;
        let setup = StudySetup::require(tx, s, &study_id).await?;
        let strata = strata_in_factor_order(&setup.factors, &req.strata)?;
        let envelope = subject.envelope(EnrollmentRequested::NAME, &principal, occurred_at);
        let event = EnrollmentRequested { envelope, strata };
        insert_enrollment_request(tx, s, &event).await?;
        api.audit(
            tx,
            enrollment_request_audit(
                request.audit(&principal, "enrollment.requested", "subject", &subject_id),
                &event,
            ),
        )
        .await?;
        let missing: Vec<&str> = setup
            .factors
            .iter()
            .filter(|f| !req.strata.contains_key(&f.factor))
            .map(|f| f.factor.as_str())
            .collect();
        tracing::info!(study_id, subject_id, ?missing, "Recorded enrollment request.");
        Ok(event)
    })
    .await
}

pub(crate) async fn withdraw_subject(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path((study_id, subject_id)): Path<(String, String)>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(SUBJECT_ROLES)?;
    let (key, req): (_, WithdrawSubject) = request.parse()?;
    check_withdrawal(&req)?;
    let occurred_at = api.occurred_at(req.occurred_at.as_deref())?;
    on_active_subject(&api, &principal, key, &request, (&study_id, &subject_id), async |tx, subject| {
        let envelope = subject.envelope(SubjectWithdrawn::NAME, &principal, occurred_at);
        let event =
            SubjectWithdrawn { envelope, reason_code: req.reason_code.clone(), reason: req.reason.clone() };
        record_withdrawal(tx, &api.schema, &event).await?;
        api.audit(
            tx,
            withdrawal_audit(request.audit(&principal, "subject.withdrawn", "subject", &subject_id), &event),
        )
        .await?;
        tracing::info!(study_id, subject_id, reason_code = %req.reason_code, "Withdrew subject.");
        Ok(event)
    })
    .await
}

/// The frame of consent, enrollment requests and withdrawal: commands on a screened subject that
/// is still in the study. Locks the subject (404 without one, 409 once withdrawn), lets `record`
/// check what needs the database, write its row and return its event, queues the event on the
/// subject's key and answers with the subject and the event id.
async fn on_active_subject<E: Event>(
    api: &Api,
    principal: &Principal,
    key: String,
    request: &CommandRequest,
    (study_id, subject_id): (&str, &str),
    record: impl AsyncFnOnce(&mut PgConnection, &Subject) -> Result<E, ApiError>,
) -> Result<Response, ApiError> {
    principal.require_study(study_id)?;
    api.run_once(principal, key, request, async |command| {
        let subject =
            Subject::lock_active(&mut command.tx, &api.schema, principal, study_id, subject_id).await?;
        let event = record(&mut command.tx, &subject).await?;
        command.emit(&event, subject_id).await?;
        Ok(serde_json::json!({"subject_id": subject_id, "event_ids": [event.envelope().event_id]}))
    })
    .await
}

// ---- screening -----------------------------------------------------------------------------------

/// What a screening must not reuse within its study: the subject id and the screening number.
#[derive(Debug)]
struct ScreeningIds<'a> {
    study_id: &'a str,
    subject_id: &'a str,
    screening_number: &'a str,
}

impl ScreeningIds<'_> {
    fn subject_exists(&self) -> ApiError {
        let (study_id, subject_id) = (self.study_id, self.subject_id);
        ApiError::conflict(
            "subject_exists",
            format!("subject `{subject_id}` already exists in study `{study_id}`"),
        )
        .with_field("subject_id")
    }

    fn screening_number_exists(&self) -> ApiError {
        let (study_id, number) = (self.study_id, self.screening_number);
        ApiError::conflict(
            "screening_number_exists",
            format!("screening number `{number}` is already used in study `{study_id}`"),
        )
        .with_field("screening_number")
    }

    /// Refuses (409) ids the study already has, the subject id first.
    async fn refuse_taken(&self, conn: &mut PgConnection, s: &SchemaName) -> Result<(), ApiError> {
        let taken: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT subject_id, screening_number FROM {s}.subject
             WHERE study_id = $1 AND (subject_id = $2 OR screening_number = $3)"
        )))
        .bind(self.study_id)
        .bind(self.subject_id)
        .bind(self.screening_number)
        .fetch_all(conn)
        .await?;
        if taken.iter().any(|(id, _)| id == self.subject_id) {
            return Err(self.subject_exists());
        }
        if !taken.is_empty() {
            return Err(self.screening_number_exists());
        }
        Ok(())
    }

    /// The same answers when a concurrent screening committed first and the insert hit its key.
    fn on_insert_error(&self, e: sqlx::Error) -> ApiError {
        match unique_violation(&e) {
            Some("subject_pk") => self.subject_exists(),
            Some("subject_screening_number_unique") => self.screening_number_exists(),
            _ => e.into(),
        }
    }
}

/// The events of a screening: SubjectScreened, which starts the subject's flow (its event id is
/// the correlation id of every later event of the subject), and EligibilityAssessed, caused by it.
fn screening_events(
    ids: &ScreeningIds<'_>,
    req: &ScreenSubject,
    time_zone: String,
    principal: &Principal,
    occurred_at: Timestamp,
    (eligible, criteria): (bool, Vec<CriterionResult>),
) -> (SubjectScreened, EligibilityAssessed) {
    let envelope = |event_type, correlation_id| {
        subject_envelope(
            event_type,
            ids.study_id,
            &req.site_id,
            ids.subject_id,
            principal,
            occurred_at,
            correlation_id,
        )
    };
    let mut screening = envelope(SubjectScreened::NAME, None);
    screening.correlation_id = Some(screening.event_id);
    let screened = SubjectScreened {
        envelope: screening,
        screening_number: req.screening_number.clone(),
        time_zone,
        age_years: req.age_years,
        sex: req.sex.clone(),
    };
    let cause = screened.envelope.event_id;
    let mut assessment = envelope(EligibilityAssessed::NAME, Some(cause));
    assessment.causation_id = Some(cause);
    (screened, EligibilityAssessed { envelope: assessment, eligible, criteria })
}

// ---- rows, written from the events they record ------------------------------------------------

/// A statement that records a subject's event: `$1` to `$5` are bound from its envelope (event
/// id, study, subject, actor, time), so that every row says what its event says; the caller binds
/// the rest, from `$6`.
fn subject_event_query(sql: String, e: &Envelope) -> PgQuery<'_> {
    sqlx::query(AssertSqlSafe(sql))
        .bind(e.event_id)
        .bind(&e.study_id)
        .bind(&e.subject_id)
        .bind(&e.actor)
        .bind(to_datetime(e.occurred_at))
}

/// The subject's row; the error is left raw for [`ScreeningIds::on_insert_error`].
async fn insert_subject(
    conn: &mut PgConnection,
    s: &SchemaName,
    screened: &SubjectScreened,
    eligible: bool,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO {s}.subject (screening_event_id, study_id, subject_id, screened_by, screened_at,
                                 site_id, screening_number, age_years, sex, time_zone, eligible)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    );
    subject_event_query(sql, &screened.envelope)
        .bind(&screened.envelope.site_id)
        .bind(&screened.screening_number)
        .bind(screened.age_years)
        .bind(&screened.sex)
        .bind(&screened.time_zone)
        .bind(eligible)
        .execute(conn)
        .await?;
    Ok(())
}

/// One row per criterion, in the assessment's order, with one statement.
async fn insert_eligibility_results(
    conn: &mut PgConnection,
    s: &SchemaName,
    assessed: &EligibilityAssessed,
) -> Result<(), ApiError> {
    let criteria = &assessed.criteria;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.eligibility_result (study_id, subject_id, criterion_id, met, detail, position)
         SELECT $1, $2, c, m, d, (o - 1)::int
         FROM unnest($3::text[], $4::boolean[], $5::text[]) WITH ORDINALITY AS u(c, m, d, o)"
    )))
    .bind(&assessed.envelope.study_id)
    .bind(&assessed.envelope.subject_id)
    .bind(criteria.iter().map(|c| c.criterion_id.as_str()).collect::<Vec<_>>())
    .bind(criteria.iter().map(|c| c.met).collect::<Vec<_>>())
    .bind(criteria.iter().map(|c| c.detail.as_deref()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_consent(
    conn: &mut PgConnection,
    s: &SchemaName,
    event: &ConsentSigned,
) -> Result<(), ApiError> {
    let sql = format!(
        "INSERT INTO {s}.consent (event_id, study_id, subject_id, recorded_by, recorded_at,
                                 consent_version, signed_at_raw, signed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
    );
    subject_event_query(sql, &event.envelope)
        .bind(&event.consent_version)
        .bind(&event.signed_at.raw)
        .bind(event.signed_at.earliest.and_then(Timestamp::to_datetime))
        .execute(conn)
        .await?;
    Ok(())
}

async fn insert_enrollment_request(
    conn: &mut PgConnection,
    s: &SchemaName,
    event: &EnrollmentRequested,
) -> Result<(), ApiError> {
    let sql = format!(
        "INSERT INTO {s}.enrollment_request (event_id, study_id, subject_id, requested_by, requested_at, strata)
         VALUES ($1, $2, $3, $4, $5, $6)"
    );
    subject_event_query(sql, &event.envelope).bind(Json(&event.strata)).execute(conn).await?;
    Ok(())
}

async fn record_withdrawal(
    conn: &mut PgConnection,
    s: &SchemaName,
    event: &SubjectWithdrawn,
) -> Result<(), ApiError> {
    let e = &event.envelope;
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {s}.subject SET withdrawn_at = $3, withdrawal_reason_code = $4, withdrawal_reason = $5
         WHERE study_id = $1 AND subject_id = $2"
    )))
    .bind(&e.study_id)
    .bind(&e.subject_id)
    .bind(to_datetime(e.occurred_at))
    .bind(&event.reason_code)
    .bind(&event.reason)
    .execute(conn)
    .await?;
    Ok(())
}

// ---- audit records, written from the events they record -------------------------------------------

/// `record` about the subject of `e`: study, site, and the event the change announces.
pub(crate) fn about(record: AuditRecord, e: &Envelope) -> AuditRecord {
    record.study(&e.study_id).site(e.site_id.as_deref()).change(
        "event_id",
        Value::Null,
        e.event_id.to_string(),
    )
}

fn screening_audit(
    record: AuditRecord,
    screened: &SubjectScreened,
    assessed: &EligibilityAssessed,
) -> AuditRecord {
    about(record, &screened.envelope)
        .change("screening_number", Value::Null, screened.screening_number.as_str())
        .change("age_years", Value::Null, screened.age_years)
        .change("sex", Value::Null, screened.sex.as_deref())
        .change("time_zone", Value::Null, screened.time_zone.as_str())
        .change("eligible", Value::Null, assessed.eligible)
        .change("eligibility", Value::Null, json(&assessed.criteria))
}

fn consent_audit(record: AuditRecord, event: &ConsentSigned) -> AuditRecord {
    about(record, &event.envelope)
        .change("consent_version", Value::Null, event.consent_version.as_str())
        .change("consent_signed_at", Value::Null, event.signed_at.raw.as_str())
}

fn enrollment_request_audit(record: AuditRecord, event: &EnrollmentRequested) -> AuditRecord {
    about(record, &event.envelope).change("strata", Value::Null, json(&event.strata))
}

/// A withdrawal's why is its reason code, with the free text when given.
fn withdrawal_audit(record: AuditRecord, event: &SubjectWithdrawn) -> AuditRecord {
    let at = to_datetime(event.envelope.occurred_at).to_rfc3339();
    let why = match &event.reason {
        Some(text) if !text.trim().is_empty() => format!("{}: {text}", event.reason_code),
        _ => event.reason_code.clone(),
    };
    about(record, &event.envelope)
        .change("withdrawn_at", Value::Null, at)
        .change("withdrawal_reason_code", Value::Null, event.reason_code.as_str())
        .change("withdrawal_reason", Value::Null, event.reason.as_deref())
        .reason(why)
}

// ---- the stored subject --------------------------------------------------------------------------

/// A subject as later commands need it, its row locked until the command ends.
#[derive(Debug)]
pub(crate) struct Subject {
    pub(crate) study_id: String,
    pub(crate) subject_id: String,
    pub(crate) site_id: String,
    screening_event_id: Uuid,
    /// Whether the subject has been withdrawn from the study.
    pub(crate) withdrawn: bool,
}

impl Subject {
    /// Locks the subject's row (commands on one subject run one after the other, so a withdrawal
    /// and an enrollment request cannot both pass the withdrawn check): 404 when there is none,
    /// 409 when it has been withdrawn, as nothing more may be recorded for it. A caller limited
    /// to some sites gets 403 `out_of_scope` for a subject of another site AND for one that does
    /// not exist, with the same message: nothing is revealed about other sites' subjects.
    async fn lock_active(
        conn: &mut PgConnection,
        s: &SchemaName,
        principal: &Principal,
        study_id: &str,
        subject_id: &str,
    ) -> Result<Self, ApiError> {
        let subject = Self::lock(conn, s, principal, study_id, subject_id).await?;
        if subject.withdrawn {
            return Err(ApiError::conflict(
                "subject_withdrawn",
                "the subject has been withdrawn from the study",
            ));
        }
        Ok(subject)
    }

    /// [`Subject::lock_active`] for a subject in the study or withdrawn from it.
    pub(crate) async fn lock(
        conn: &mut PgConnection,
        s: &SchemaName,
        principal: &Principal,
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
        let out_of_scope =
            || ApiError::out_of_scope(format!("subject `{subject_id}` is not at a site of your token"));
        let Some((site_id, screening_event_id, withdrawn)) = row else {
            return Err(if principal.all_sites() {
                ApiError::not_found(format!("no subject `{subject_id}` in study `{study_id}`"))
            } else {
                out_of_scope()
            });
        };
        if !principal.scope.sites.contains(&site_id) {
            return Err(out_of_scope());
        }
        let (study_id, subject_id) = (study_id.to_string(), subject_id.to_string());
        Ok(Self { study_id, subject_id, site_id, screening_event_id, withdrawn })
    }

    /// The envelope of a later event of the subject, correlated with its screening.
    pub(crate) fn envelope(
        &self,
        event_type: &str,
        principal: &Principal,
        occurred_at: Timestamp,
    ) -> Envelope {
        subject_envelope(
            event_type,
            &self.study_id,
            &self.site_id,
            &self.subject_id,
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

pub(crate) fn to_datetime(t: Timestamp) -> chrono::DateTime<chrono::Utc> {
    t.to_datetime().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

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
    fn a_consent_date_is_partial_or_unrecorded_but_never_text_that_is_no_date() {
        let consent = |signed_at: &str| SignConsent {
            consent_version: "v1".into(),
            signed_at: signed_at.into(),
            occurred_at: None,
        };
        let unknown = check_consent(&consent("")).map(|d| (d.raw, d.precision, d.earliest));
        assert_eq!(unknown.ok(), Some((String::new(), DateTimePrecision::Unknown, None)));
        let month = check_consent(&consent("2014-01")).map(|d| d.precision);
        assert_eq!(month.ok(), Some(DateTimePrecision::Month));
        assert!(check_consent(&consent("last week")).is_err());
        assert!(check_consent(&consent(" ")).is_err(), "blank is not the same as not recorded");
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
