//! The researcher dashboard's data: a study's site risk table with its funnel plots, a site, and
//! a subject's vital signs with the thresholds and alerts that go with them. Read-only; the page
//! is `dashboard.html`.
//!
//! **Where it comes from.** The KRI table is the risk service's last evaluation (`study`,
//! `study_kri`, `site_kri` of `ALERT_API_RISK_SCHEMA`, read in one snapshot); the amber and red
//! limits are the KRI thresholds of the study (`RISK_CONFIG_DIR`, the risk service's folder; ±2
//! and ±3 by default). Subjects, readings and alerts are the monitoring schema's; a vital's
//! thresholds are the conditions on its LOINC code of the study's monitoring rules
//! (`MONITORING_RULES_DIR`, the monitoring consumer's folder).
//!
//! **Site risk score**: the sum of `|flag|` over the site's KRIs (amber 1, red 2, either side;
//! a KRI that did not score the site adds nothing): 0 for a site like the study, at most twice
//! the number of KRIs. Sites are listed by it, highest first, then by id.
//!
//! **Funnel limits** (Spiegelhalter 2005, with the risk service's over-dispersion factor `φ`),
//! for a site with denominator `n`, the study metric `μ` and a threshold `z`: a proportion
//! `μ ± z·√(φ·μ(1 − μ)/n)`, a rate `μ ± z·√(φ·μ/n)`, cut at 0 (and at 1 for a proportion). A
//! site's score is beyond `±z` exactly when its metric is beyond these limits. Without a factor
//! (nothing distinguishes the study's sites) there are no limits: `null`, and no curve.
//!
//! **Scope.** As everywhere in this API: a study outside the caller's token is 403
//! `out_of_scope`, whatever exists; a site outside its sites is 403 too. A subject is shown to a
//! caller limited to some sites only when its site is known and among them; otherwise 404, as for
//! a subject that does not exist, so nothing about it is revealed. The risk table lists only the
//! caller's sites.
//!
//! **Refusals.** Path ids follow the site API's rule (1 to 64 letters, digits, `.`, `_`, `-`;
//! 422 `validation_failed` naming the segment); the routes take no query parameters (400
//! `unknown_parameter`); 404 `not_found` for a study, site or subject of which neither service
//! knows anything.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{AssertSqlSafe, PgPool};
use trialflow_http::ApiError;
use trialflow_http::auth::{Ids, Principal};
use trialflow_http::input::{self, check_id};
use trialflow_outbox::SchemaName;
use trialflow_schemas::AlertSeverity;
use uuid::Uuid;

use super::alerts::{Alert, opt_rfc3339, rfc3339, select_alerts};
use super::{AlertState, Researcher, openapi};
use crate::monitoring::rules::{Aggregation, Op, RuleInput};
use crate::risk::kri::{self, Kri, Method, Thresholds};
use crate::risk::read::{self as risk_read, SiteKri, StudyKri};

/// Points of each KRI's funnel curves: enough for a smooth line at any plot size.
const FUNNEL_POINTS: usize = 48;
/// Site-level alerts a site page lists (newest first).
const SITE_ALERTS: i64 = 100;

// ---- answers ---------------------------------------------------------------------------------

/// A study's site risk table: its KRIs and every site's results.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct StudyRisk {
    study_id: String,
    /// The risk service's last evaluation of the study; `null` before the first (then `kris`
    /// and `sites` are empty).
    #[serde(serialize_with = "opt_rfc3339")]
    #[schema(required = true)]
    evaluated_at: Option<DateTime<Utc>>,
    /// The KRIs evaluated, in the catalogue's order.
    kris: Vec<StudyKriView>,
    /// The caller's sites with a result, by `risk_score` (highest first), then `site_id`.
    sites: Vec<SiteRisk>,
}

/// One KRI of a study: what it measures, the study's value and where sites turn amber and red.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(super) struct StudyKriView {
    /// The KRI's id (`AE_RATE`, `SAE_RATE`, `DISCONTINUATION`, `SCREEN_FAILURE`).
    kri_id: String,
    name: String,
    #[schema(schema_with = method_schema)]
    method: String,
    /// What the numerator counts.
    numerator_counts: String,
    /// What the denominator counts.
    denominator_counts: String,
    /// The study's metric `μ`: all sites' numerators over all their denominators.
    overall: f64,
    /// The over-dispersion factor `φ`; `null` when nothing distinguishes the sites (no limits).
    #[schema(required = true)]
    factor: Option<f64>,
    /// The score beyond which (either side) a site is amber.
    amber: f64,
    /// The score beyond which (either side) a site is red.
    red: f64,
    /// The denominator a site needs to be scored.
    min_denominator: f64,
    /// The funnel's four limit curves, sampled from the smallest to the largest denominator of
    /// the study's sites; empty without a factor.
    funnel: Vec<Limits>,
}

fn method_schema() -> utoipa::openapi::Object {
    openapi::one_of(
        &["binary", "rate"],
        "`binary`: a proportion of subjects; `rate`: events per exposure day.",
    )
}

/// The funnel limits at one denominator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
pub(super) struct Limits {
    denominator: f64,
    /// `μ − red·sd`, at least 0.
    lower_red: f64,
    /// `μ − amber·sd`, at least 0.
    lower_amber: f64,
    /// `μ + amber·sd` (a proportion: at most 1).
    upper_amber: f64,
    /// `μ + red·sd` (a proportion: at most 1).
    upper_red: f64,
}

/// One site's line of the risk table.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(super) struct SiteRisk {
    site_id: String,
    /// Sum of `|flag|` over the site's KRIs: amber 1, red 2.
    risk_score: u32,
    /// By KRI, in the catalogue's order.
    kris: Vec<SiteKriView>,
}

/// One site's result for one KRI.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(super) struct SiteKriView {
    kri_id: String,
    numerator: f64,
    denominator: f64,
    /// numerator / denominator.
    metric: f64,
    /// The over-dispersion-adjusted z-score; `null` below the minimum denominator or without a
    /// factor.
    #[schema(required = true)]
    score: Option<f64>,
    /// −2 (red, low) … 2 (red, high); `null` without a score.
    #[schema(required = true, minimum = -2, maximum = 2)]
    flag: Option<i16>,
    /// The funnel limits at this site's denominator; `null` without a factor.
    #[schema(required = true)]
    limits: Option<Limits>,
    /// When the flag took its present value.
    #[serde(serialize_with = "rfc3339")]
    flag_changed_at: DateTime<Utc>,
}

/// A site: its KRIs, its subjects and its site-level alerts.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct SitePage {
    study_id: String,
    site_id: String,
    /// Sum of `|flag|` over the site's KRIs (0 without any).
    risk_score: u32,
    /// The site's KRIs, each with the study's value and thresholds, in the catalogue's order.
    kris: Vec<SiteKriDetail>,
    /// The site's subjects: those the risk service places at the site and those of the site's
    /// alerts, by id.
    subjects: Vec<SiteSubject>,
    /// Alerts about the site itself (e.g. a KRI turning red), newest first, at most 100.
    alerts: Vec<Alert>,
}

/// A site's KRI with what it is judged against.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct SiteKriDetail {
    #[serde(flatten)]
    site: SiteKriView,
    name: String,
    #[schema(schema_with = method_schema)]
    method: String,
    /// The study's metric.
    overall: f64,
    /// The over-dispersion factor; `null` when nothing distinguishes the sites.
    #[schema(required = true)]
    factor: Option<f64>,
    amber: f64,
    red: f64,
    min_denominator: f64,
}

/// A subject of a site and what the monitoring service holds of it.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(super) struct SiteSubject {
    subject_id: String,
    /// Vital-sign readings kept.
    readings: i64,
    /// Effective time of the latest reading.
    #[serde(serialize_with = "opt_rfc3339")]
    #[schema(required = true)]
    last_reading_at: Option<DateTime<Utc>>,
    /// Alerts of the subject, in any state.
    alerts: i64,
    /// Alerts nobody acknowledged or resolved yet.
    open_alerts: i64,
    /// Alerts acknowledged, not yet resolved.
    acknowledged_alerts: i64,
}

/// A subject's vital signs, the thresholds they are judged by, and the subject's alerts.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct SubjectVitals {
    study_id: String,
    subject_id: String,
    /// The subject's site, when known.
    #[schema(required = true)]
    site_id: Option<String>,
    /// One series per LOINC code, by code.
    vitals: Vec<VitalSeries>,
    /// The subject's alerts (every state), newest first, each with its evidence.
    alerts: Vec<SubjectAlert>,
}

/// One vital sign of a subject over time.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct VitalSeries {
    /// LOINC code.
    code: String,
    /// Its name in the study's rules (the code when no rule names it).
    name: String,
    /// UCUM unit of the latest reading.
    unit: String,
    /// By effective time.
    readings: Vec<VitalReading>,
    /// The conditions on this code of the study's monitoring rules.
    thresholds: Vec<VitalThreshold>,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(super) struct VitalReading {
    /// The event of the reading (an alert's evidence names it).
    event_id: Uuid,
    #[serde(skip)]
    #[schema(ignore)]
    code: String,
    /// When it was measured (clinical time).
    #[serde(serialize_with = "rfc3339")]
    effective_at: DateTime<Utc>,
    value: f64,
    unit: String,
    #[schema(required = true)]
    visit: Option<String>,
}

/// A rule's condition on one vital sign: readings `op value` (and at most `max`) match.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct VitalThreshold {
    rule_id: String,
    title: String,
    #[schema(schema_with = severity_schema)]
    severity: &'static str,
    source_label: String,
    #[schema(schema_with = op_schema)]
    op: &'static str,
    value: f64,
    /// Inclusive upper bound of a range (e.g. fever grade 1), else `null`.
    #[schema(required = true)]
    max: Option<f64>,
    /// UCUM unit of `value`; readings in another unit never match.
    unit: String,
    #[schema(schema_with = aggregation_schema)]
    aggregation: &'static str,
}

fn severity_schema() -> utoipa::openapi::Object {
    openapi::one_of(&super::alerts::SEVERITIES, "The severity of the rule's alerts.")
}

fn op_schema() -> utoipa::openapi::Object {
    openapi::one_of(&["gt", "ge", "lt", "le"], "How a reading compares with `value` to match.")
}

fn aggregation_schema() -> utoipa::openapi::Object {
    openapi::one_of(
        &["single", "visit_mean", "persistence"],
        "What is compared: each reading, the mean of a visit, or readings persisting over time.",
    )
}

/// An alert of a subject with its evidence.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct SubjectAlert {
    #[serde(flatten)]
    alert: Alert,
    /// In the order observed.
    evidence: Vec<SubjectEvidence>,
}

/// A reading or event supporting an alert.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(super) struct SubjectEvidence {
    #[serde(skip)]
    #[schema(ignore)]
    alert_id: Uuid,
    event_id: Uuid,
    /// Clinical time: when it was observed.
    #[serde(serialize_with = "rfc3339")]
    observed_at: DateTime<Utc>,
    #[schema(required = true)]
    value: Option<f64>,
    #[schema(required = true)]
    unit: Option<String>,
    /// The LOINC code of the reading, when the evidence is a kept vital-sign reading.
    #[schema(required = true)]
    code: Option<String>,
}

// ---- pure parts ------------------------------------------------------------------------------

/// The funnel limits at denominator `n` of a KRI of `method` whose study metric is `overall`,
/// with factor `factor`; `None` when they do not exist (no factor, or nothing to divide by).
pub(super) fn limits(
    method: Method,
    overall: f64,
    factor: Option<f64>,
    t: &Thresholds,
    n: f64,
) -> Option<Limits> {
    let phi = factor.filter(|phi| *phi > 0.0 && phi.is_finite())?;
    if n <= 0.0 || !n.is_finite() {
        return None;
    }
    let variance = match method {
        Method::Binary => overall * (1.0 - overall),
        Method::Rate => overall,
    };
    let sd = (phi * variance / n).sqrt();
    let ceiling = match method {
        Method::Binary => 1.0,
        Method::Rate => f64::INFINITY,
    };
    let at = |z: f64| (overall + z * sd).clamp(0.0, ceiling);
    Some(Limits {
        denominator: n,
        lower_red: at(-t.red),
        lower_amber: at(-t.amber),
        upper_amber: at(t.amber),
        upper_red: at(t.red),
    })
}

/// [`FUNNEL_POINTS`] denominators spread evenly on a log scale from `low` to `high` (funnels
/// narrow fastest at small denominators), or the one denominator when they are equal.
fn funnel_denominators(low: f64, high: f64) -> Vec<f64> {
    if !(low > 0.0 && high >= low && high.is_finite()) {
        return Vec::new();
    }
    if high == low {
        return vec![low];
    }
    let step = (high / low).ln() / (FUNNEL_POINTS - 1) as f64;
    (0..FUNNEL_POINTS)
        .map(|i| if i + 1 == FUNNEL_POINTS { high } else { low * (step * i as f64).exp() })
        .collect()
}

fn method_name(method: Method) -> &'static str {
    match method {
        Method::Binary => "binary",
        Method::Rate => "rate",
    }
}

/// The risk table of one evaluation: the KRIs of the catalogue that were evaluated, and the sites
/// `sites` lets through, by risk score.
fn risk_table(
    study_id: &str,
    study: &[StudyKri],
    site_rows: &[SiteKri],
    thresholds: impl Fn(&Kri) -> Thresholds,
    sites: &Ids,
) -> (Vec<StudyKriView>, Vec<SiteRisk>) {
    let evaluated: BTreeMap<&str, &StudyKri> = study.iter().map(|k| (k.kri.as_str(), k)).collect();
    let mut kris = Vec::new();
    let mut by_kri: BTreeMap<&str, (Kri, Thresholds, &StudyKri)> = BTreeMap::new();
    for kri in kri::CATALOGUE {
        let Some(row) = evaluated.get(kri.id) else { continue };
        let t = thresholds(kri);
        let rows = site_rows.iter().filter(|s| s.kri == kri.id && s.denominator > 0.0);
        let low = rows.clone().map(|s| s.denominator).fold(f64::INFINITY, f64::min);
        let high = rows.map(|s| s.denominator).fold(0.0, f64::max);
        let funnel = funnel_denominators(low, high)
            .into_iter()
            .filter_map(|n| limits(kri.method, row.overall, row.factor, &t, n))
            .collect();
        kris.push(StudyKriView {
            kri_id: kri.id.to_string(),
            name: kri.name.to_string(),
            method: method_name(kri.method).to_string(),
            numerator_counts: kri.numerator.to_string(),
            denominator_counts: kri.denominator.to_string(),
            overall: row.overall,
            factor: row.factor,
            amber: t.amber,
            red: t.red,
            min_denominator: t.min_denominator,
            funnel,
        });
        by_kri.insert(kri.id, (*kri, t, row));
    }
    let mut per_site: BTreeMap<&str, Vec<SiteKriView>> = BTreeMap::new();
    for row in site_rows.iter().filter(|r| sites.contains(&r.site_id)) {
        let Some((kri, t, study_row)) = by_kri.get(row.kri.as_str()) else {
            tracing::debug!(%study_id, kri = %row.kri, "A site KRI outside the catalogue or the study's; not shown.");
            continue;
        };
        per_site.entry(row.site_id.as_str()).or_default().push(SiteKriView {
            kri_id: row.kri.clone(),
            numerator: row.numerator,
            denominator: row.denominator,
            metric: row.metric,
            score: row.score,
            flag: row.flag,
            limits: limits(kri.method, study_row.overall, study_row.factor, t, row.denominator),
            flag_changed_at: row.flag_changed_at,
        });
    }
    let order: Vec<&str> = kri::CATALOGUE.iter().map(|k| k.id).collect();
    let mut table: Vec<SiteRisk> = per_site
        .into_iter()
        .map(|(site_id, mut kris)| {
            kris.sort_by_key(|k| order.iter().position(|id| *id == k.kri_id));
            let risk_score = risk_score(&kris);
            SiteRisk { site_id: site_id.to_string(), risk_score, kris }
        })
        .collect();
    table.sort_by(|a, b| b.risk_score.cmp(&a.risk_score).then_with(|| a.site_id.cmp(&b.site_id)));
    (kris, table)
}

/// Sum of `|flag|` over a site's KRIs.
fn risk_score(kris: &[SiteKriView]) -> u32 {
    kri::site_risk_score(kris.iter().map(|k| k.flag.and_then(|f| i8::try_from(f).ok())))
}

fn severity_name(severity: AlertSeverity) -> &'static str {
    match severity {
        AlertSeverity::Info => "INFO",
        AlertSeverity::Warning => "WARNING",
        AlertSeverity::High => "HIGH",
        AlertSeverity::Critical => "CRITICAL",
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Gt => "gt",
        Op::Ge => "ge",
        Op::Lt => "lt",
        Op::Le => "le",
    }
}

fn aggregation_name(aggregation: Aggregation) -> &'static str {
    match aggregation {
        Aggregation::Single => "single",
        Aggregation::VisitMean { .. } => "visit_mean",
        Aggregation::Persistence { .. } => "persistence",
    }
}

// ---- requests --------------------------------------------------------------------------------

/// These routes take no query parameters: any is refused, so a misspelt filter is not ignored.
fn no_parameters(query: Option<&str>) -> Result<(), ApiError> {
    let Some(first) = query.into_iter().flat_map(|q| q.split('&')).find(|pair| !pair.is_empty()) else {
        return Ok(());
    };
    let name = first.split_once('=').map_or(first, |(name, _)| name);
    let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    Err(ApiError::new(StatusCode::BAD_REQUEST, "unknown_parameter", "this route takes no query parameters")
        .with_field(input::printable(&name)))
}

/// A study id of a path, which the caller may see (403 otherwise, whatever exists).
fn study_in_scope(principal: &Principal, study_id: &str) -> Result<(), ApiError> {
    check_id("study_id", study_id)?;
    principal.require_study(study_id)
}

/// Whether the monitoring service holds anything of the study (an alert or a reading).
async fn monitored(pool: &PgPool, s: &SchemaName, study_id: &str) -> Result<bool, ApiError> {
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {s}.alert WHERE study_id = $1)
             OR EXISTS (SELECT 1 FROM {s}.observation WHERE study_id = $1)"
    );
    Ok(sqlx::query_scalar(AssertSqlSafe(sql)).bind(study_id).fetch_one(pool).await?)
}

/// A study's site risk table and its KRIs' funnel limits
///
/// The risk service's last evaluation of the study: per KRI the study's metric, the
/// over-dispersion factor, the amber and red thresholds and the funnel's limit curves; per site
/// (of the caller's sites) every KRI's numerator, denominator, metric, score, flag and limits at
/// its denominator, and the site risk score (the sum of `|flag|` over its KRIs: amber 1, red 2).
/// Sites by risk score, highest first, then by id.
#[utoipa::path(
    get,
    path = "/v1/studies/{study_id}/risk",
    tag = "dashboard",
    params(("study_id" = String, Path, description = "The study.", example = "CDISCPILOT01")),
    responses(
        (status = 200, description = "The study's risk table.", body = StudyRisk),
        (status = 400, description = "`unknown_parameter`: the route takes no query parameters.", body = openapi::ErrorBody),
        (status = 401, response = openapi::Unauthenticated),
        (status = 403, response = openapi::Forbidden),
        (status = 404, response = openapi::NotKnown),
        (status = 422, response = openapi::InvalidId),
        (status = 500, response = openapi::Internal),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bearer" = []))
)]
pub(super) async fn study_risk(
    State(api): State<AlertState>,
    Researcher(principal): Researcher,
    Path(study_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<StudyRisk>, ApiError> {
    study_in_scope(&principal, &study_id)?;
    no_parameters(query.as_deref())?;
    let evaluation = risk_read::evaluation(&api.pool, &api.risk_schema, &study_id).await?;
    if evaluation.evaluated_at.is_none() && !monitored(&api.pool, &api.schema, &study_id).await? {
        return Err(ApiError::not_found(format!("no study `{study_id}`")));
    }
    let (kris, sites) = risk_table(
        &study_id,
        &evaluation.study,
        &evaluation.sites,
        |kri| api.thresholds.thresholds(&study_id, kri),
        &principal.scope.sites,
    );
    Ok(Json(StudyRisk { study_id, evaluated_at: evaluation.evaluated_at, kris, sites }))
}

/// A site: its KRIs, subjects and site-level alerts
///
/// The site's result for every KRI (with the study's value and thresholds), its risk score, its
/// subjects with their readings and alert counts (the subjects the risk service places at the
/// site and those of the site's alerts), and the alerts about the site itself.
#[utoipa::path(
    get,
    path = "/v1/studies/{study_id}/sites/{site_id}",
    tag = "dashboard",
    params(
        ("study_id" = String, Path, description = "The study.", example = "CDISCPILOT01"),
        ("site_id" = String, Path, description = "The site.", example = "701"),
    ),
    responses(
        (status = 200, description = "The site.", body = SitePage),
        (status = 400, description = "`unknown_parameter`: the route takes no query parameters.", body = openapi::ErrorBody),
        (status = 401, response = openapi::Unauthenticated),
        (status = 403, response = openapi::Forbidden),
        (status = 404, response = openapi::NotKnown),
        (status = 422, response = openapi::InvalidId),
        (status = 500, response = openapi::Internal),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bearer" = []))
)]
pub(super) async fn site(
    State(api): State<AlertState>,
    Researcher(principal): Researcher,
    Path((study_id, site_id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Json<SitePage>, ApiError> {
    study_in_scope(&principal, &study_id)?;
    check_id("site_id", &site_id)?;
    principal.require_site(&study_id, &site_id)?;
    no_parameters(query.as_deref())?;
    let s = &api.schema;
    let evaluation = risk_read::evaluation(&api.pool, &api.risk_schema, &study_id).await?;
    let (study_kris, sites) = risk_table(
        &study_id,
        &evaluation.study,
        &evaluation.sites,
        |kri| api.thresholds.thresholds(&study_id, kri),
        &Ids::Only(BTreeSet::from([site_id.clone()])),
    );
    let site_kris = sites.into_iter().next().map(|s| s.kris).unwrap_or_default();
    let risk_score = risk_score(&site_kris);
    let kris: Vec<SiteKriDetail> = site_kris
        .into_iter()
        .filter_map(|site| {
            let kri = study_kris.iter().find(|k| k.kri_id == site.kri_id)?;
            Some(SiteKriDetail {
                name: kri.name.clone(),
                method: kri.method.clone(),
                overall: kri.overall,
                factor: kri.factor,
                amber: kri.amber,
                red: kri.red,
                min_denominator: kri.min_denominator,
                site,
            })
        })
        .collect();

    let mut subject_ids: BTreeSet<String> =
        risk_read::site_subjects(&api.pool, &api.risk_schema, &study_id, &site_id)
            .await?
            .into_iter()
            .collect();
    // One snapshot of the monitoring schema for the subjects, their counts and the site's alerts.
    let mut tx = api.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    let alerting: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT DISTINCT subject_id FROM {s}.alert
         WHERE study_id = $1 AND site_id = $2 AND subject_id IS NOT NULL"
    )))
    .bind(&study_id)
    .bind(&site_id)
    .fetch_all(&mut *tx)
    .await?;
    subject_ids.extend(alerting);
    let listed: Vec<String> = subject_ids.into_iter().collect();
    let subjects: Vec<SiteSubject> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT ids.subject_id,
                (SELECT count(*) FROM {s}.observation o
                 WHERE o.study_id = $1 AND o.subject_id = ids.subject_id) AS readings,
                (SELECT max(effective_at) FROM {s}.observation o
                 WHERE o.study_id = $1 AND o.subject_id = ids.subject_id) AS last_reading_at,
                count(a.alert_id) AS alerts,
                count(a.alert_id) FILTER (WHERE a.status = 'open') AS open_alerts,
                count(a.alert_id) FILTER (WHERE a.status = 'acknowledged') AS acknowledged_alerts
         FROM unnest($2::text[]) AS ids (subject_id)
         LEFT JOIN {s}.alert a ON a.study_id = $1 AND a.subject_id = ids.subject_id
         GROUP BY ids.subject_id
         ORDER BY ids.subject_id"
    )))
    .bind(&study_id)
    .bind(&listed)
    .fetch_all(&mut *tx)
    .await?;
    let alerts: Vec<Alert> = sqlx::query_as(AssertSqlSafe(format!(
        "{} WHERE a.study_id = $1 AND a.site_id = $2 AND a.subject_id IS NULL
         ORDER BY a.raised_at DESC, a.alert_id DESC LIMIT $3",
        select_alerts(s)
    )))
    .bind(&study_id)
    .bind(&site_id)
    .bind(SITE_ALERTS)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    if kris.is_empty() && subjects.is_empty() && alerts.is_empty() {
        return Err(ApiError::not_found(format!("no site `{site_id}` in study `{study_id}`")));
    }
    Ok(Json(SitePage { study_id, site_id, risk_score, kris, subjects, alerts }))
}

/// A subject's vital signs, their thresholds and the subject's alerts
///
/// Per LOINC code the subject's readings by effective (clinical) time, and the conditions on
/// that code of the study's monitoring rules; the subject's alerts in every state, newest first,
/// each with its evidence (observed time, value, and the code when it is a kept reading).
#[utoipa::path(
    get,
    path = "/v1/studies/{study_id}/subjects/{subject_id}/vitals",
    tag = "dashboard",
    params(
        ("study_id" = String, Path, description = "The study.", example = "CDISCPILOT01"),
        ("subject_id" = String, Path, description = "The subject.", example = "01-701-1015"),
    ),
    responses(
        (status = 200, description = "The subject's vital signs and alerts.", body = SubjectVitals),
        (status = 400, description = "`unknown_parameter`: the route takes no query parameters.", body = openapi::ErrorBody),
        (status = 401, response = openapi::Unauthenticated),
        (status = 403, response = openapi::Forbidden),
        (status = 404, response = openapi::NotKnown),
        (status = 422, response = openapi::InvalidId),
        (status = 500, response = openapi::Internal),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bearer" = []))
)]
pub(super) async fn subject_vitals(
    State(api): State<AlertState>,
    Researcher(principal): Researcher,
    Path((study_id, subject_id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Json<SubjectVitals>, ApiError> {
    study_in_scope(&principal, &study_id)?;
    check_id("subject_id", &subject_id)?;
    no_parameters(query.as_deref())?;
    let not_found = || ApiError::not_found(format!("no subject `{subject_id}` in study `{study_id}`"));
    let s = &api.schema;
    let placed = risk_read::subject_site(&api.pool, &api.risk_schema, &study_id, &subject_id).await?;

    let mut tx = api.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    let readings: Vec<VitalReading> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT event_id, code, effective_at, value, unit, visit FROM {s}.observation
         WHERE study_id = $1 AND subject_id = $2 ORDER BY code, effective_at, event_id"
    )))
    .bind(&study_id)
    .bind(&subject_id)
    .fetch_all(&mut *tx)
    .await?;
    let alerts: Vec<Alert> = sqlx::query_as(AssertSqlSafe(format!(
        "{} WHERE a.study_id = $1 AND a.subject_id = $2 ORDER BY a.raised_at DESC, a.alert_id DESC",
        select_alerts(s)
    )))
    .bind(&study_id)
    .bind(&subject_id)
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<Uuid> = alerts.iter().map(|a| a.alert_id).collect();
    let evidence: Vec<SubjectEvidence> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT e.alert_id, e.event_id, e.observed_at, e.value, e.unit, o.code
         FROM {s}.alert_evidence e LEFT JOIN {s}.observation o ON o.event_id = e.event_id
         WHERE e.alert_id = ANY($1) ORDER BY e.observed_at, e.event_id"
    )))
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    if placed.is_none() && readings.is_empty() && alerts.is_empty() {
        return Err(not_found());
    }
    let site_id = placed.flatten().or_else(|| alerts.iter().find_map(|a| a.site_id.clone()));
    // A caller limited to some sites sees a subject of one of them only; any other subject is
    // "not found", so its existence is not revealed.
    if !principal.all_sites() && !site_id.as_deref().is_some_and(|site| principal.scope.sites.contains(site))
    {
        return Err(not_found());
    }

    let mut by_alert: BTreeMap<Uuid, Vec<SubjectEvidence>> = BTreeMap::new();
    for item in evidence {
        by_alert.entry(item.alert_id).or_default().push(item);
    }
    let alerts = alerts
        .into_iter()
        .map(|alert| SubjectAlert { evidence: by_alert.remove(&alert.alert_id).unwrap_or_default(), alert })
        .collect();
    Ok(Json(SubjectVitals {
        vitals: series(readings, api.rules.rules(&study_id)),
        study_id,
        subject_id,
        site_id,
        alerts,
    }))
}

/// The readings (by code, then time) as one series per code, each with the conditions on its
/// code of `rules`.
fn series(readings: Vec<VitalReading>, rules: &[crate::monitoring::rules::Rule]) -> Vec<VitalSeries> {
    let mut out: Vec<VitalSeries> = Vec::new();
    for reading in readings {
        match out.last_mut() {
            Some(last) if last.code == reading.code => {
                last.unit = reading.unit.clone();
                last.readings.push(reading);
            }
            _ => out.push(VitalSeries {
                code: reading.code.clone(),
                name: reading.code.clone(),
                unit: reading.unit.clone(),
                readings: vec![reading],
                thresholds: Vec::new(),
            }),
        }
    }
    for vital in &mut out {
        for rule in rules {
            let RuleInput::Vital { any, aggregation } = &rule.input else { continue };
            for condition in any.iter().filter(|c| c.code == vital.code) {
                vital.name.clone_from(&condition.name);
                vital.thresholds.push(VitalThreshold {
                    rule_id: rule.rule_id.clone(),
                    title: rule.title.clone(),
                    severity: severity_name(rule.severity),
                    source_label: rule.source_label.clone(),
                    op: op_name(condition.op),
                    value: condition.value,
                    max: condition.max,
                    unit: condition.unit.clone(),
                    aggregation: aggregation_name(*aggregation),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn funnel_limits_are_the_normal_approximation_with_the_factor_cut_to_the_metric_range() {
        let t = Thresholds { amber: 2.0, red: 3.0, min_denominator: 0.0 };
        let Some(l) = limits(Method::Binary, 0.2, Some(2.0), &t, 50.0) else { panic!("no limits") };
        let sd = (2.0f64 * 0.2 * 0.8 / 50.0).sqrt();
        assert!(close(l.upper_amber, 0.2 + 2.0 * sd) && close(l.upper_red, 0.2 + 3.0 * sd), "{l:?}");
        assert!(close(l.lower_amber, 0.2 - 2.0 * sd) && close(l.lower_red, 0.0), "cut at 0: {l:?}");
        let Some(r) = limits(Method::Rate, 0.02, Some(1.5), &t, 400.0) else { panic!("no limits") };
        assert!(close(r.upper_red, 0.02 + 3.0 * (1.5f64 * 0.02 / 400.0).sqrt()), "{r:?}");
        let Some(top) = limits(Method::Binary, 0.9, Some(4.0), &t, 3.0) else { panic!("no limits") };
        assert!(close(top.upper_amber, 1.0) && close(top.upper_red, 1.0), "cut at 1: {top:?}");
        assert_eq!(limits(Method::Rate, 0.02, None, &t, 400.0), None, "no factor, no limits");
        assert_eq!(limits(Method::Rate, 0.02, Some(0.0), &t, 400.0), None);
        assert_eq!(limits(Method::Rate, 0.02, Some(1.0), &t, 0.0), None);
    }

    #[test]
    fn the_funnel_is_sampled_from_the_smallest_to_the_largest_denominator() {
        let points = funnel_denominators(3.0, 300.0);
        assert_eq!(points.len(), FUNNEL_POINTS);
        assert_eq!((points[0], points[FUNNEL_POINTS - 1]), (3.0, 300.0));
        assert!(points.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(funnel_denominators(5.0, 5.0), vec![5.0]);
        assert!(funnel_denominators(f64::INFINITY, 0.0).is_empty(), "no site with a denominator");
    }

    fn row(site: &str, kri: &str, flag: Option<i16>) -> SiteKri {
        SiteKri {
            site_id: site.into(),
            kri: kri.into(),
            numerator: 1.0,
            denominator: 10.0,
            metric: 0.1,
            score: flag.map(f64::from),
            flag,
            flag_changed_at: DateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn sites_are_ranked_by_the_sum_of_their_absolute_flags_then_by_id() {
        let study = [
            StudyKri { kri: "AE_RATE".into(), overall: 0.1, factor: Some(1.0) },
            StudyKri { kri: "DISCONTINUATION".into(), overall: 0.1, factor: None },
        ];
        let rows = [
            row("701", "AE_RATE", Some(1)),
            row("701", "DISCONTINUATION", Some(-1)),
            row("702", "AE_RATE", Some(-2)),
            row("702", "DISCONTINUATION", None),
            row("703", "AE_RATE", Some(0)),
            row("704", "AE_RATE", Some(2)),
            row("704", "UNKNOWN_KRI", Some(2)),
        ];
        let (kris, sites) = risk_table("S", &study, &rows, Thresholds::default_for, &Ids::All);
        let ids: Vec<&str> = kris.iter().map(|k| k.kri_id.as_str()).collect();
        assert_eq!(ids, ["AE_RATE", "DISCONTINUATION"], "catalogue order");
        assert!(kris[1].funnel.is_empty(), "no factor, no curve");
        let ranked: Vec<(&str, u32)> = sites.iter().map(|s| (s.site_id.as_str(), s.risk_score)).collect();
        assert_eq!(ranked, [("701", 2), ("702", 2), ("704", 2), ("703", 0)]);
        assert!(sites[0].kris[0].limits.is_some() && sites[0].kris[1].limits.is_none());
        let only = Ids::Only(BTreeSet::from(["703".to_string()]));
        let (_, mine) = risk_table("S", &study, &rows, Thresholds::default_for, &only);
        assert_eq!(mine.iter().map(|s| s.site_id.as_str()).collect::<Vec<_>>(), ["703"]);
    }

    #[test]
    fn only_an_absent_or_empty_query_is_taken() {
        assert!(
            no_parameters(None).is_ok()
                && no_parameters(Some("")).is_ok()
                && no_parameters(Some("&")).is_ok()
        );
        let refused = no_parameters(Some("&site%5Fid=701")).err().map(|e| (e.code, e.field));
        assert_eq!(refused, Some(("unknown_parameter", Some("site_id".to_string()))));
    }
}
