//! Study set-up (`POST /v1/studies`, `GET /v1/studies/{study_id}`) and sites
//! (`POST /v1/studies/{study_id}/sites`).
//!
//! A study is configured once (config version 1) and announced with StudyConfigured on the
//! restricted study-configuration topic, keyed by study id. Sites have no event: the catalogue has
//! none, and consumers learn a site from the events that name it (KitsReceived, SubjectScreened).

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection};
use trialflow_http::ApiError;
use trialflow_http::auth::{Principal, Role};
use trialflow_http::input::{
    MAX_CODE_CHARS, MAX_FREE_TEXT_CHARS, MAX_NAME_CHARS, check_free_text, check_id, check_text,
};
use trialflow_outbox::{AuditRecord, SchemaName};
use trialflow_schemas::{
    Envelope, Event, KitTypeSettings, RandomizationSettings, StratificationFactor, StudyArm, StudyConfigured,
};

use super::error::conflict_on;
use super::{
    Api, CommandRequest, MAX_TITLE_CHARS, PgQuery, SOURCE_SYSTEM, check_time_zone, json, occurred_at,
};

/// The configuration version a new study starts with.
pub const FIRST_CONFIG_VERSION: i32 = 1;
/// Criterion id of the age check derived from the study's age limits; reserved.
pub const AGE_CRITERION: &str = "AGE";

// ---- requests and views ------------------------------------------------------------------------

/// `POST /v1/studies`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateStudy {
    pub study_id: String,
    pub title: String,
    /// UNBLINDED.
    pub arms: Vec<Arm>,
    #[serde(default)]
    pub stratification_factors: Vec<Factor>,
    #[serde(default)]
    pub eligibility: Eligibility,
    pub randomization: Randomization,
    pub kit_types: Vec<KitType>,
    /// The kit type dispensed at enrollment; one of `kit_types`.
    pub enrollment_kit_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    pub arm_code: String,
    pub name: String,
    /// Allocation ratio (e.g. 2 and 1 for 2:1).
    pub ratio: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Factor {
    pub factor: String,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Eligibility {
    #[serde(default)]
    pub min_age_years: Option<i32>,
    #[serde(default)]
    pub max_age_years: Option<i32>,
    /// Inclusion/exclusion criteria the site answers at screening (true = met).
    #[serde(default)]
    pub criteria: Vec<Criterion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criterion {
    pub criterion_id: String,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Randomization {
    /// CONCEALED: stored and published on the restricted topic, never returned by the API.
    pub seed: i64,
    /// Block sizes as multiples of the sum of the ratios.
    pub block_multiples: Vec<i32>,
    pub slots_per_stratum: i32,
    pub warn_slots_left: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KitType {
    pub kit_type: String,
    pub do_not_dispense_days: i32,
    pub do_not_count_days: i32,
    pub low_stock_threshold: i32,
}

/// `POST /v1/studies/{study_id}/sites`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSite {
    pub site_id: String,
    pub name: String,
    /// ISO 3166-1 alpha-2 or alpha-3 code.
    #[serde(default)]
    pub country: Option<String>,
    /// IANA time zone, the default of the site's subjects.
    pub time_zone: String,
    /// Accepted like on every command; a site has no event, so it is only checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
}

/// `GET /v1/studies/{study_id}`. Blinded roles get neither `arms` nor `randomization` (block
/// sizes are concealed from investigators too, ICH E9 §2.3.1); nobody gets the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyView {
    pub study_id: String,
    pub title: String,
    pub config_version: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arms: Option<Vec<Arm>>,
    pub stratification_factors: Vec<Factor>,
    pub eligibility: Eligibility,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub randomization: Option<RandomizationView>,
    pub kit_types: Vec<KitType>,
    pub enrollment_kit_type: String,
    pub sites: Vec<SiteView>,
}

/// The randomization settings without the seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RandomizationView {
    pub block_multiples: Vec<i32>,
    pub slots_per_stratum: i32,
    pub warn_slots_left: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteView {
    pub site_id: String,
    pub name: String,
    pub country: Option<String>,
    pub time_zone: String,
}

// ---- validation (pure) -------------------------------------------------------------------------

/// Checks a study set-up; the error names the first offending field.
pub fn validate_study(study: &CreateStudy) -> Result<(), ApiError> {
    check_id("study_id", &study.study_id)?;
    check_text("title", &study.title, MAX_TITLE_CHARS)?;

    if study.arms.len() < 2 {
        return Err(ApiError::validation("arms", "a randomized study needs at least 2 arms"));
    }
    let mut codes = HashSet::new();
    for (i, arm) in study.arms.iter().enumerate() {
        check_id(&format!("arms[{i}].arm_code"), &arm.arm_code)?;
        if !codes.insert(arm.arm_code.as_str()) {
            return Err(ApiError::validation(
                format!("arms[{i}].arm_code"),
                format!("arm code `{}` is given twice", arm.arm_code),
            ));
        }
        check_text(&format!("arms[{i}].name"), &arm.name, MAX_NAME_CHARS)?;
        if arm.ratio < 1 {
            return Err(ApiError::validation(format!("arms[{i}].ratio"), "must be at least 1"));
        }
    }

    let mut factors = HashSet::new();
    for (i, f) in study.stratification_factors.iter().enumerate() {
        let field = format!("stratification_factors[{i}]");
        check_id(&format!("{field}.factor"), &f.factor)?;
        if !factors.insert(f.factor.as_str()) {
            return Err(ApiError::validation(
                format!("{field}.factor"),
                format!("factor `{}` is given twice", f.factor),
            ));
        }
        if f.values.is_empty() {
            return Err(ApiError::validation(format!("{field}.values"), "a factor needs at least one value"));
        }
        let mut values = HashSet::new();
        for (j, v) in f.values.iter().enumerate() {
            check_text(&format!("{field}.values[{j}]"), v, MAX_CODE_CHARS)?;
            if !values.insert(v.as_str()) {
                return Err(ApiError::validation(
                    format!("{field}.values[{j}]"),
                    format!("value `{v}` is given twice"),
                ));
            }
        }
    }

    let e = &study.eligibility;
    for (field, age) in
        [("eligibility.min_age_years", e.min_age_years), ("eligibility.max_age_years", e.max_age_years)]
    {
        if age.is_some_and(|a| !(0..=150).contains(&a)) {
            return Err(ApiError::validation(field, "must be between 0 and 150"));
        }
    }
    if let (Some(min), Some(max)) = (e.min_age_years, e.max_age_years)
        && min > max
    {
        return Err(ApiError::validation(
            "eligibility.min_age_years",
            format!("the minimum age {min} is above the maximum age {max}"),
        ));
    }
    let mut criteria = HashSet::new();
    for (i, c) in e.criteria.iter().enumerate() {
        let field = format!("eligibility.criteria[{i}].criterion_id");
        check_id(&field, &c.criterion_id)?;
        if c.criterion_id == AGE_CRITERION {
            return Err(ApiError::validation(
                field,
                "`AGE` is reserved: it is derived from min_age_years and max_age_years",
            ));
        }
        if !criteria.insert(c.criterion_id.as_str()) {
            return Err(ApiError::validation(
                field,
                format!("criterion `{}` is given twice", c.criterion_id),
            ));
        }
        check_free_text(
            &format!("eligibility.criteria[{i}].description"),
            &c.description,
            MAX_FREE_TEXT_CHARS,
        )?;
    }

    let r = &study.randomization;
    if r.block_multiples.is_empty() {
        return Err(ApiError::validation(
            "randomization.block_multiples",
            "give at least one block multiple",
        ));
    }
    if let Some(i) = r.block_multiples.iter().position(|m| *m < 1) {
        return Err(ApiError::validation(
            format!("randomization.block_multiples[{i}]"),
            "must be at least 1",
        ));
    }
    if r.slots_per_stratum < 1 {
        return Err(ApiError::validation("randomization.slots_per_stratum", "must be at least 1"));
    }
    if r.warn_slots_left < 0 {
        return Err(ApiError::validation("randomization.warn_slots_left", "must not be negative"));
    }

    if study.kit_types.is_empty() {
        return Err(ApiError::validation("kit_types", "give at least one kit type"));
    }
    let mut kit_types = HashSet::new();
    for (i, k) in study.kit_types.iter().enumerate() {
        let field = format!("kit_types[{i}]");
        check_id(&format!("{field}.kit_type"), &k.kit_type)?;
        if !kit_types.insert(k.kit_type.as_str()) {
            return Err(ApiError::validation(
                format!("{field}.kit_type"),
                format!("kit type `{}` is given twice", k.kit_type),
            ));
        }
        for (name, value) in [
            ("do_not_dispense_days", k.do_not_dispense_days),
            ("do_not_count_days", k.do_not_count_days),
            ("low_stock_threshold", k.low_stock_threshold),
        ] {
            if value < 0 {
                return Err(ApiError::validation(format!("{field}.{name}"), "must not be negative"));
            }
        }
    }
    if !kit_types.contains(study.enrollment_kit_type.as_str()) {
        return Err(ApiError::validation(
            "enrollment_kit_type",
            format!("`{}` is not one of the study's kit_types", study.enrollment_kit_type),
        ));
    }
    if let Some(at) = &study.occurred_at {
        occurred_at(Some(at))?;
    }
    Ok(())
}

/// Checks a site; the error names the first offending field.
pub fn validate_site(site: &CreateSite) -> Result<(), ApiError> {
    check_id("site_id", &site.site_id)?;
    check_text("name", &site.name, MAX_NAME_CHARS)?;
    if let Some(country) = &site.country
        && !((2..=3).contains(&country.len()) && country.bytes().all(|b| b.is_ascii_uppercase()))
    {
        return Err(ApiError::validation(
            "country",
            format!("`{country}` is not an ISO 3166-1 code (e.g. `DE` or `USA`)"),
        ));
    }
    check_time_zone("time_zone", &site.time_zone)?;
    if let Some(at) = &site.occurred_at {
        occurred_at(Some(at))?;
    }
    Ok(())
}

// ---- handlers ----------------------------------------------------------------------------------

/// Who may read a study's set-up (blinded roles get the blinded view): everyone but patient apps.
const STUDY_READERS: &[Role] =
    &[Role::Admin, Role::SiteStaff, Role::Investigator, Role::Pharmacist, Role::Researcher];

pub(crate) async fn create_study(
    State(api): State<Arc<Api>>,
    principal: Principal,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(&[Role::Admin])?;
    let (key, study): (_, CreateStudy) = request.parse()?;
    principal.require_study(&study.study_id)?;
    validate_study(&study)?;
    let occurred_at = api.occurred_at(study.occurred_at.as_deref())?;
    api.run_once(&principal, key, &request, async |command| {
        let s = &api.schema;
        let already_exists = || {
            ApiError::conflict("study_exists", format!("study `{}` already exists", study.study_id))
                .with_field("study_id")
        };
        if study_exists(&mut command.tx, s, &study.study_id).await? {
            return Err(already_exists());
        }
        // A concurrent request for the same study may have committed first.
        insert_study(&mut command.tx, s, &study, &principal.user)
            .await
            .map_err(conflict_on("study_pk", already_exists))?;
        insert_study_setup(&mut command.tx, s, &study).await?;
        api.audit(
            &mut command.tx,
            study_audit(request.audit(&principal, "study.configured", "study", &study.study_id), &study),
        )
        .await?;
        let event = study_configured(&study, &principal, occurred_at);
        let event_id = event.envelope.event_id;
        command.emit(&event, &study.study_id).await?;
        tracing::info!(study_id = %study.study_id, user = %principal.user, %event_id, "Configured study.");
        Ok(serde_json::json!({
            "study_id": study.study_id,
            "config_version": FIRST_CONFIG_VERSION,
            "event_ids": [event_id],
        }))
    })
    .await
}

pub(crate) async fn create_site(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path(study_id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(&[Role::Admin])?;
    let (key, site): (_, CreateSite) = request.parse()?;
    principal.require_site(&study_id, &site.site_id)?;
    validate_site(&site)?;
    api.occurred_at(site.occurred_at.as_deref())?;
    api.run_once(&principal, key, &request, async |command| {
        let s = &api.schema;
        let site_exists = || {
            ApiError::conflict(
                "site_exists",
                format!("site `{}` already exists in study `{study_id}`", site.site_id),
            )
            .with_field("site_id")
        };
        require_study(&mut command.tx, s, &study_id).await?;
        if site_time_zone(&mut command.tx, s, &study_id, &site.site_id).await?.is_some() {
            return Err(site_exists());
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.site (study_id, site_id, name, country, time_zone, created_by)
             VALUES ($1, $2, $3, $4, $5, $6)"
        )))
        .bind(&study_id)
        .bind(&site.site_id)
        .bind(&site.name)
        .bind(&site.country)
        .bind(&site.time_zone)
        .bind(&principal.user)
        .execute(&mut *command.tx)
        .await
        // A concurrent request for the same site may have committed first.
        .map_err(conflict_on("site_pk", site_exists))?;
        api.audit(
            &mut command.tx,
            site_audit(request.audit(&principal, "site.created", "site", &site.site_id), &study_id, &site),
        )
        .await?;
        tracing::info!(study_id, site_id = %site.site_id, user = %principal.user, "Added site.");
        Ok(serde_json::json!({"study_id": study_id, "site_id": site.site_id}))
    })
    .await
}

pub(crate) async fn get_study(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path(study_id): Path<String>,
) -> Result<axum::Json<StudyView>, ApiError> {
    principal.require(STUDY_READERS)?;
    principal.require_study(&study_id)?;
    let s = &api.schema;
    let mut conn = api.pool.acquire().await?;
    let setup = StudySetup::require(&mut conn, s, &study_id).await?;
    let (title, config_version, block_multiples, slots_per_stratum, warn_slots_left): (
        String,
        i32,
        Vec<i32>,
        i32,
        i32,
    ) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT title, config_version, block_multiples, slots_per_stratum, warn_slots_left
         FROM {s}.study WHERE study_id = $1"
    )))
    .bind(&study_id)
    .fetch_one(&mut *conn)
    .await?;
    let sites: Vec<(String, String, Option<String>, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT site_id, name, country, time_zone FROM {s}.site WHERE study_id = $1 ORDER BY site_id"
    )))
    .bind(&study_id)
    .fetch_all(&mut *conn)
    .await?;
    let unblinded = principal.role.is_unblinded();
    Ok(axum::Json(StudyView {
        study_id: setup.study_id,
        title,
        config_version,
        arms: unblinded.then_some(setup.arms),
        stratification_factors: setup.factors,
        eligibility: Eligibility {
            min_age_years: setup.min_age_years,
            max_age_years: setup.max_age_years,
            criteria: setup.criteria,
        },
        randomization: unblinded.then_some(RandomizationView {
            block_multiples,
            slots_per_stratum,
            warn_slots_left,
        }),
        kit_types: setup.kit_types,
        enrollment_kit_type: setup.enrollment_kit_type,
        sites: sites
            .into_iter()
            .map(|(site_id, name, country, time_zone)| SiteView { site_id, name, country, time_zone })
            .collect(),
    }))
}

// ---- the new study's event and rows ------------------------------------------------------------

/// The StudyConfigured event of a new study.
fn study_configured(
    study: &CreateStudy,
    principal: &Principal,
    occurred_at: trialflow_schemas::Timestamp,
) -> StudyConfigured {
    let mut envelope = Envelope::new(StudyConfigured::NAME, &study.study_id, SOURCE_SYSTEM, occurred_at);
    envelope.actor = Some(principal.user.clone());
    StudyConfigured {
        envelope,
        config_version: FIRST_CONFIG_VERSION,
        arms: study
            .arms
            .iter()
            .map(|a| StudyArm { arm_code: a.arm_code.clone(), name: a.name.clone(), ratio: a.ratio })
            .collect(),
        stratification_factors: study
            .stratification_factors
            .iter()
            .map(|f| StratificationFactor { factor: f.factor.clone(), values: f.values.clone() })
            .collect(),
        randomization: RandomizationSettings {
            seed: study.randomization.seed,
            block_multiples: study.randomization.block_multiples.clone(),
            slots_per_stratum: study.randomization.slots_per_stratum,
            warn_slots_left: study.randomization.warn_slots_left,
        },
        kit_types: study
            .kit_types
            .iter()
            .map(|k| KitTypeSettings {
                kit_type: k.kit_type.clone(),
                do_not_dispense_days: k.do_not_dispense_days,
                do_not_count_days: k.do_not_count_days,
                low_stock_threshold: k.low_stock_threshold,
            })
            .collect(),
        enrollment_kit_type: study.enrollment_kit_type.clone(),
    }
}

/// The audit record of a study set-up: every setting, old values none (a new study). Arms and
/// the block settings are unblinded (blinded views leave them out); the seed is not recorded at
/// all, as it is concealed from every role.
fn study_audit(record: AuditRecord, study: &CreateStudy) -> AuditRecord {
    let r = &study.randomization;
    record
        .study(&study.study_id)
        .change("title", Value::Null, study.title.as_str())
        .change("config_version", Value::Null, FIRST_CONFIG_VERSION)
        .change("stratification_factors", Value::Null, json(&study.stratification_factors))
        .change("eligibility", Value::Null, json(&study.eligibility))
        .change("kit_types", Value::Null, json(&study.kit_types))
        .change("enrollment_kit_type", Value::Null, study.enrollment_kit_type.as_str())
        .unblinded_change("arms", Value::Null, json(&study.arms))
        .unblinded_change(
            "randomization",
            Value::Null,
            serde_json::json!({
                "block_multiples": r.block_multiples,
                "slots_per_stratum": r.slots_per_stratum,
                "warn_slots_left": r.warn_slots_left,
            }),
        )
}

fn site_audit(record: AuditRecord, study_id: &str, site: &CreateSite) -> AuditRecord {
    record
        .study(study_id)
        .site(Some(&site.site_id))
        .change("name", Value::Null, site.name.as_str())
        .change("country", Value::Null, site.country.as_deref())
        .change("time_zone", Value::Null, site.time_zone.as_str())
}

/// The study's own row (config version 1); the error is left raw so the caller can tell a
/// concurrent duplicate (`study_pk`) from other failures.
async fn insert_study(
    conn: &mut PgConnection,
    s: &SchemaName,
    study: &CreateStudy,
    user: &str,
) -> Result<(), sqlx::Error> {
    let e = &study.eligibility;
    let r = &study.randomization;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.study (study_id, title, config_version, min_age_years, max_age_years, seed,
                               block_multiples, slots_per_stratum, warn_slots_left, enrollment_kit_type,
                               created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    )))
    .bind(&study.study_id)
    .bind(&study.title)
    .bind(FIRST_CONFIG_VERSION)
    .bind(e.min_age_years)
    .bind(e.max_age_years)
    .bind(r.seed)
    .bind(&r.block_multiples)
    .bind(r.slots_per_stratum)
    .bind(r.warn_slots_left)
    .bind(&study.enrollment_kit_type)
    .bind(user)
    .execute(conn)
    .await?;
    Ok(())
}

/// The study's arms, factors, criteria and kit types, each kept in the order the request gave.
async fn insert_study_setup(
    conn: &mut PgConnection,
    s: &SchemaName,
    study: &CreateStudy,
) -> Result<(), ApiError> {
    let id = study.study_id.as_str();
    let sql = format!(
        "INSERT INTO {s}.study_arm (study_id, arm_code, name, ratio, position) VALUES ($1, $2, $3, $4, $5)"
    );
    insert_in_order(conn, &sql, id, &study.arms, |q, a| q.bind(&a.arm_code).bind(&a.name).bind(a.ratio))
        .await?;
    let sql = format!(
        "INSERT INTO {s}.stratification_factor (study_id, factor, factor_values, position) VALUES ($1, $2, $3, $4)"
    );
    insert_in_order(conn, &sql, id, &study.stratification_factors, |q, f| q.bind(&f.factor).bind(&f.values))
        .await?;
    let sql = format!(
        "INSERT INTO {s}.eligibility_criterion (study_id, criterion_id, description, position)
         VALUES ($1, $2, $3, $4)"
    );
    let criteria = &study.eligibility.criteria;
    insert_in_order(conn, &sql, id, criteria, |q, c| q.bind(&c.criterion_id).bind(&c.description)).await?;
    let sql = format!(
        "INSERT INTO {s}.kit_type (study_id, kit_type, do_not_dispense_days, do_not_count_days,
                                  low_stock_threshold, position)
         VALUES ($1, $2, $3, $4, $5, $6)"
    );
    insert_in_order(conn, &sql, id, &study.kit_types, |q, k| {
        q.bind(&k.kit_type).bind(k.do_not_dispense_days).bind(k.do_not_count_days).bind(k.low_stock_threshold)
    })
    .await
}

/// Runs `sql` once per item: `$1` is the study id, then what `bind` binds of the item, last its
/// position, which reads order by so they list items as the request gave them.
async fn insert_in_order<'q, T>(
    conn: &mut PgConnection,
    sql: &str,
    study_id: &'q str,
    items: &'q [T],
    bind: impl Fn(PgQuery<'q>, &'q T) -> PgQuery<'q>,
) -> Result<(), ApiError> {
    for (position, item) in items.iter().enumerate() {
        let query = sqlx::query(AssertSqlSafe(sql.to_string())).bind(study_id);
        bind(query, item).bind(position as i32).execute(&mut *conn).await?;
    }
    Ok(())
}

// ---- lookups ----------------------------------------------------------------------------------

/// 404 for a study id that names no study: every route below `/v1/studies/{study_id}` answers
/// it alike.
fn no_study(study_id: &str) -> ApiError {
    ApiError::not_found(format!("no study `{study_id}`"))
}

/// 404 for a site its study does not have.
pub(crate) fn no_site(study_id: &str, site_id: &str) -> ApiError {
    ApiError::not_found(format!("no site `{site_id}` in study `{study_id}`"))
}

/// That `study_id` names a study (404 otherwise), for commands that need no more of it.
pub(crate) async fn require_study(
    conn: &mut PgConnection,
    s: &SchemaName,
    study_id: &str,
) -> Result<(), ApiError> {
    if study_exists(conn, s, study_id).await? { Ok(()) } else { Err(no_study(study_id)) }
}

/// The time zone of site `site_id` of the study, `None` when the study has no such site.
pub(crate) async fn site_time_zone(
    conn: &mut PgConnection,
    s: &SchemaName,
    study_id: &str,
    site_id: &str,
) -> Result<Option<String>, ApiError> {
    Ok(sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT time_zone FROM {s}.site WHERE study_id = $1 AND site_id = $2"
    )))
    .bind(study_id)
    .bind(site_id)
    .fetch_optional(conn)
    .await?)
}

/// That the study has site `site_id` (404 otherwise), for routes that name the site in the path.
pub(crate) async fn require_site(
    conn: &mut PgConnection,
    s: &SchemaName,
    study_id: &str,
    site_id: &str,
) -> Result<(), ApiError> {
    match site_time_zone(conn, s, study_id, site_id).await? {
        Some(_) => Ok(()),
        None => Err(no_site(study_id, site_id)),
    }
}

async fn study_exists(conn: &mut PgConnection, s: &SchemaName, study_id: &str) -> Result<bool, ApiError> {
    let found: Option<i32> =
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT 1 FROM {s}.study WHERE study_id = $1")))
            .bind(study_id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(found.is_some())
}

// ---- the stored set-up ---------------------------------------------------------------------------

/// What commands check requests against: a study's arms, factors (in order), criteria (in order),
/// age limits and kit types. Never the seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StudySetup {
    pub(crate) study_id: String,
    pub(crate) min_age_years: Option<i32>,
    pub(crate) max_age_years: Option<i32>,
    pub(crate) arms: Vec<Arm>,
    pub(crate) factors: Vec<Factor>,
    pub(crate) criteria: Vec<Criterion>,
    pub(crate) kit_types: Vec<KitType>,
    pub(crate) enrollment_kit_type: String,
}

impl StudySetup {
    /// The set-up of `study_id`, 404 when there is no such study.
    pub(crate) async fn require(
        conn: &mut PgConnection,
        s: &SchemaName,
        study_id: &str,
    ) -> Result<Self, ApiError> {
        Self::load(conn, s, study_id).await?.ok_or_else(|| no_study(study_id))
    }

    /// The set-up of `study_id`, or `None` when there is no such study.
    async fn load(conn: &mut PgConnection, s: &SchemaName, study_id: &str) -> Result<Option<Self>, ApiError> {
        let study: Option<(Option<i32>, Option<i32>, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT min_age_years, max_age_years, enrollment_kit_type FROM {s}.study WHERE study_id = $1"
        )))
        .bind(study_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((min_age_years, max_age_years, enrollment_kit_type)) = study else {
            return Ok(None);
        };
        let arms: Vec<(String, String, i32)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT arm_code, name, ratio FROM {s}.study_arm WHERE study_id = $1 ORDER BY position"
        )))
        .bind(study_id)
        .fetch_all(&mut *conn)
        .await?;
        let factors: Vec<(String, Vec<String>)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT factor, factor_values FROM {s}.stratification_factor
             WHERE study_id = $1 ORDER BY position"
        )))
        .bind(study_id)
        .fetch_all(&mut *conn)
        .await?;
        let criteria: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT criterion_id, description FROM {s}.eligibility_criterion
             WHERE study_id = $1 ORDER BY position"
        )))
        .bind(study_id)
        .fetch_all(&mut *conn)
        .await?;
        let kit_types: Vec<(String, i32, i32, i32)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT kit_type, do_not_dispense_days, do_not_count_days, low_stock_threshold
             FROM {s}.kit_type WHERE study_id = $1 ORDER BY position"
        )))
        .bind(study_id)
        .fetch_all(&mut *conn)
        .await?;
        Ok(Some(Self {
            study_id: study_id.to_string(),
            min_age_years,
            max_age_years,
            arms: arms.into_iter().map(|(arm_code, name, ratio)| Arm { arm_code, name, ratio }).collect(),
            factors: factors.into_iter().map(|(factor, values)| Factor { factor, values }).collect(),
            criteria: criteria
                .into_iter()
                .map(|(criterion_id, description)| Criterion { criterion_id, description })
                .collect(),
            kit_types: kit_types
                .into_iter()
                .map(|(kit_type, do_not_dispense_days, do_not_count_days, low_stock_threshold)| KitType {
                    kit_type,
                    do_not_dispense_days,
                    do_not_count_days,
                    low_stock_threshold,
                })
                .collect(),
            enrollment_kit_type,
        }))
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    pub(crate) fn study() -> CreateStudy {
        CreateStudy {
            study_id: "CDISCPILOT01".into(),
            title: "Xanomeline in Alzheimer's disease".into(),
            arms: vec![
                Arm { arm_code: "PBO".into(), name: "Placebo".into(), ratio: 1 },
                Arm { arm_code: "XAN_HI".into(), name: "Xanomeline high dose".into(), ratio: 1 },
            ],
            stratification_factors: vec![Factor {
                factor: "AGEGR".into(),
                values: vec!["<65".into(), ">=65".into()],
            }],
            eligibility: Eligibility {
                min_age_years: Some(50),
                max_age_years: Some(89),
                criteria: vec![Criterion { criterion_id: "INC01".into(), description: "MMSE 10-23".into() }],
            },
            randomization: Randomization {
                seed: 42,
                block_multiples: vec![1, 2],
                slots_per_stratum: 100,
                warn_slots_left: 10,
            },
            kit_types: vec![KitType {
                kit_type: "TTS".into(),
                do_not_dispense_days: 14,
                do_not_count_days: 7,
                low_stock_threshold: 2,
            }],
            enrollment_kit_type: "TTS".into(),
            occurred_at: None,
        }
    }

    fn field_of(study: &CreateStudy) -> Option<String> {
        validate_study(study).err().map(|e| {
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
            e.field.unwrap_or_default()
        })
    }

    #[test]
    fn a_sound_study_passes() {
        assert_eq!(validate_study(&study()), Ok(()));
    }

    #[test]
    fn study_errors_name_the_field() {
        type Edit = fn(&mut CreateStudy);
        let cases: &[(Edit, &str)] = &[
            (|s| s.study_id = "bad id".into(), "study_id"),
            (|s| s.study_id = "x".repeat(65), "study_id"),
            (|s| s.title = " ".into(), "title"),
            (|s| s.arms.truncate(1), "arms"),
            (|s| s.arms[1].arm_code = "PBO".into(), "arms[1].arm_code"),
            (|s| s.arms[1].ratio = 0, "arms[1].ratio"),
            (|s| s.arms[0].name = String::new(), "arms[0].name"),
            (
                |s| s.stratification_factors.push(s.stratification_factors[0].clone()),
                "stratification_factors[1].factor",
            ),
            (|s| s.stratification_factors[0].values.clear(), "stratification_factors[0].values"),
            (|s| s.stratification_factors[0].values[1] = "<65".into(), "stratification_factors[0].values[1]"),
            (|s| s.eligibility.min_age_years = Some(90), "eligibility.min_age_years"),
            (|s| s.eligibility.max_age_years = Some(-1), "eligibility.max_age_years"),
            (
                |s| s.eligibility.criteria[0].criterion_id = "AGE".into(),
                "eligibility.criteria[0].criterion_id",
            ),
            (
                |s| s.eligibility.criteria.push(s.eligibility.criteria[0].clone()),
                "eligibility.criteria[1].criterion_id",
            ),
            (|s| s.randomization.block_multiples.clear(), "randomization.block_multiples"),
            (|s| s.randomization.block_multiples[1] = 0, "randomization.block_multiples[1]"),
            (|s| s.randomization.slots_per_stratum = 0, "randomization.slots_per_stratum"),
            (|s| s.randomization.warn_slots_left = -1, "randomization.warn_slots_left"),
            (|s| s.kit_types.clear(), "kit_types"),
            (|s| s.kit_types[0].do_not_dispense_days = -1, "kit_types[0].do_not_dispense_days"),
            (|s| s.kit_types[0].do_not_count_days = -1, "kit_types[0].do_not_count_days"),
            (|s| s.kit_types[0].low_stock_threshold = -1, "kit_types[0].low_stock_threshold"),
            (|s| s.kit_types.push(s.kit_types[0].clone()), "kit_types[1].kit_type"),
            (|s| s.enrollment_kit_type = "PILL".into(), "enrollment_kit_type"),
            (|s| s.occurred_at = Some("yesterday".into()), "occurred_at"),
        ];
        for (edit, field) in cases {
            let mut s = study();
            edit(&mut s);
            assert_eq!(field_of(&s).as_deref(), Some(*field));
        }
    }

    #[test]
    fn equal_age_limits_and_no_factors_are_fine() {
        let mut s = study();
        s.eligibility.min_age_years = Some(65);
        s.eligibility.max_age_years = Some(65);
        s.stratification_factors.clear();
        assert_eq!(validate_study(&s), Ok(()));
    }

    #[test]
    fn sites_need_a_real_time_zone() {
        let site = CreateSite {
            site_id: "701".into(),
            name: "Site 701".into(),
            country: Some("USA".into()),
            time_zone: "America/New_York".into(),
            occurred_at: None,
        };
        assert_eq!(validate_site(&site), Ok(()));
        let bad = CreateSite { time_zone: "EST5EDT7".into(), ..site.clone() };
        assert_eq!(validate_site(&bad).err().and_then(|e| e.field).as_deref(), Some("time_zone"));
        let bad = CreateSite { country: Some("usa".into()), ..site };
        assert_eq!(validate_site(&bad).err().and_then(|e| e.field).as_deref(), Some("country"));
    }
}
