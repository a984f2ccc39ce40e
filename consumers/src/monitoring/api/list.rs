//! `GET /v1/alerts`: the alerts, newest first, a page at a time.
//!
//! **Answer.** `200 {"alerts": [<alert>, ...], "next_cursor": "<cursor>" | null}`: at most
//! `limit` alerts (default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]), each as
//! `GET /v1/alerts/{alert_id}` shows it without evidence and timeline. `next_cursor` is `null` on
//! the last page; otherwise the next page is the same request with `cursor=<next_cursor>`.
//!
//! **Parameters** ([`Param`]; all optional, each at most once): `study_id`, `site_id`,
//! `subject_id`, `rule_id` (exact match); `severity` and `status` (one value or several,
//! comma-separated, any case); `raised_from` (inclusive) and `raised_before` (exclusive), RFC 3339
//! date-times with an offset, compared with the instant the alert was raised; `limit`; `cursor`.
//!
//! **Order and paging.** Alerts are ordered by `(raised_at, alert_id)`, descending; a page is
//! the alerts after the cursor's key in that order (keyset paging, served by the index of
//! migration `0002_alert_paging`). An alert's key never changes, so a walk through all pages
//! returns every alert that matched when it began and still matches, exactly once, however many
//! alerts are raised meanwhile: a new alert sorts before the walk's position, where a fresh walk
//! (or the stream) shows it; it never shifts a page. The honest limit: `raised_at` is the raising
//! transaction's start, so an alert whose transaction commits only after a walk went past its
//! instant is missed by that walk (and shown by the stream). A cursor is bound to the filters of
//! the first page (see [`super::cursor`]); `limit` may change from page to page.
//!
//! **Refusals.** 400 with the parameter as `field`: `unknown_parameter`, `duplicate_parameter`,
//! `invalid_parameter` (a value that cannot match: not an id, not a severity, not an RFC 3339
//! date-time, `raised_before` not later than `raised_from`, `limit` not a number from 1 to
//! [`MAX_LIMIT`], a value that is not UTF-8 once percent-decoded) and `invalid_cursor`. Control
//! characters and values beyond 2,048 characters are refused before, as on every route of the
//! three HTTP services: 422 `invalid_characters` / `too_long` (see [`trialflow_http::input`]).

use std::collections::HashSet;
use std::fmt::Write as _;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use chrono::{DateTime, TimeDelta, Timelike, Utc};
use percent_encoding::percent_decode_str;
use serde::Serialize;
use serde_json::json;
use sqlx::{Postgres, QueryBuilder};
use trialflow_http::ApiError;
use trialflow_http::auth::Ids;
use trialflow_http::input::{self, MAX_CODE_CHARS, Problem, Text, check_id};
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn, ParameterStyle};
use utoipa::openapi::schema::{ArrayBuilder, KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{Required, Schema};

use super::alerts::{Alert, SEVERITIES, STATUSES, select_alerts};
use super::cursor::{self, CURSOR_CHARS, Position};
use super::openapi;
use super::{AlertState, Researcher};

/// Alerts a page holds unless `limit` says otherwise.
pub(super) const DEFAULT_LIMIT: u32 = 100;
/// The largest `limit`.
pub(super) const MAX_LIMIT: u32 = 500;

/// The parameters of the list. The parser takes exactly these names and the OpenAPI document
/// describes exactly these (it is built from [`Param::describe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Param {
    StudyId,
    SiteId,
    SubjectId,
    RuleId,
    Severity,
    Status,
    RaisedFrom,
    RaisedBefore,
    Limit,
    Cursor,
}

impl Param {
    pub(super) const ALL: [Param; 10] = [
        Param::StudyId,
        Param::SiteId,
        Param::SubjectId,
        Param::RuleId,
        Param::Severity,
        Param::Status,
        Param::RaisedFrom,
        Param::RaisedBefore,
        Param::Limit,
        Param::Cursor,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Param::StudyId => "study_id",
            Param::SiteId => "site_id",
            Param::SubjectId => "subject_id",
            Param::RuleId => "rule_id",
            Param::Severity => "severity",
            Param::Status => "status",
            Param::RaisedFrom => "raised_from",
            Param::RaisedBefore => "raised_before",
            Param::Limit => "limit",
            Param::Cursor => "cursor",
        }
    }

    fn named(name: &str) -> Option<Param> {
        Param::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The parameter's description, schema and example in the OpenAPI document.
    fn describe(self) -> (String, Schema, Option<serde_json::Value>) {
        let string = || ObjectBuilder::new().schema_type(Type::String);
        let date_time = || string().format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))).into();
        let id = |what: &str| {
            (
                format!("Only alerts of this {what} (exact match)."),
                string().min_length(Some(1)).max_length(Some(64)).pattern(Some("^[A-Za-z0-9._-]+$")).into(),
            )
        };
        // Comma-separated lists: OpenAPI's `form` style without `explode`.
        let list = |allowed: &[&str]| {
            ArrayBuilder::new()
                .items(string().enum_values(Some(allowed.iter().copied())))
                .min_items(Some(1))
                .into()
        };
        let (description, schema) = match self {
            Param::StudyId => id("study"),
            Param::SiteId => id("site"),
            Param::SubjectId => id("subject"),
            Param::RuleId => (
                "Only alerts raised by this monitoring rule (exact match).".to_string(),
                string().min_length(Some(1)).max_length(Some(MAX_CODE_CHARS)).into(),
            ),
            Param::Severity => (
                format!(
                    "Only alerts of these severities: one of {} or several, comma-separated \
                     (`HIGH,CRITICAL`); any case.",
                    SEVERITIES.join(", ")
                ),
                list(&SEVERITIES),
            ),
            Param::Status => (
                format!(
                    "Only alerts in these states: one of {} or several, comma-separated \
                     (`open,acknowledged`); any case.",
                    STATUSES.join(", ")
                ),
                list(&STATUSES),
            ),
            Param::RaisedFrom => (
                "Only alerts raised at or after this instant (RFC 3339 with an offset, e.g. \
                 `2026-03-01T08:00:00Z`; finer than microseconds rounds up)."
                    .to_string(),
                date_time(),
            ),
            Param::RaisedBefore => (
                "Only alerts raised before this instant (exclusive; RFC 3339 with an offset). Must \
                 be later than `raised_from`."
                    .to_string(),
                date_time(),
            ),
            Param::Limit => (
                format!("Alerts per page, 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})."),
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1))
                    .maximum(Some(MAX_LIMIT))
                    .default(Some(json!(DEFAULT_LIMIT)))
                    .into(),
            ),
            Param::Cursor => (
                "The `next_cursor` of the previous page, as it was given: the page after it. Only \
                 valid with the filters of the first page (`limit` may change); anything else is \
                 400 `invalid_cursor`."
                    .to_string(),
                string().min_length(Some(CURSOR_CHARS)).max_length(Some(CURSOR_CHARS)).into(),
            ),
        };
        let example = match self {
            Param::StudyId => json!("CDISCPILOT01"),
            Param::SiteId => json!("701"),
            Param::SubjectId => json!("01-701-1015"),
            Param::RuleId => json!("PROTOCOL-HTN-SEVERE"),
            Param::Severity => json!(["HIGH", "CRITICAL"]),
            Param::Status => json!(["open", "acknowledged"]),
            Param::RaisedFrom => json!("2026-03-01T08:00:00Z"),
            Param::RaisedBefore => json!("2026-03-08T08:00:00+01:00"),
            Param::Limit => json!(50),
            // Only ever one the API gave out.
            Param::Cursor => return (description, schema, None),
        };
        (description, schema, Some(example))
    }
}

/// The list's query parameters in the OpenAPI document, from [`Param`].
impl utoipa::IntoParams for Param {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        Param::ALL
            .into_iter()
            .map(|param| {
                let (description, schema, example) = param.describe();
                let parameter = ParameterBuilder::new()
                    .name(param.name())
                    .parameter_in(ParameterIn::Query)
                    .required(Required::False)
                    .description(Some(description))
                    .schema(Some(schema))
                    .example(example);
                match param {
                    Param::Severity | Param::Status => {
                        parameter.style(Some(ParameterStyle::Form)).explode(Some(false)).build()
                    }
                    _ => parameter.build(),
                }
            })
            .collect()
    }
}

/// Which alerts a list shows, normalised: one filter has one form however it was spelled.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Filter {
    study_id: Option<String>,
    site_id: Option<String>,
    subject_id: Option<String>,
    rule_id: Option<String>,
    /// In the order of [`SEVERITIES`], each once; empty: any.
    severities: Vec<&'static str>,
    /// In the order of [`STATUSES`], each once; empty: any.
    statuses: Vec<&'static str>,
    raised_from: Option<DateTime<Utc>>,
    raised_before: Option<DateTime<Utc>>,
}

impl Filter {
    /// The filter as text, what a cursor is bound to: equal for equal filters.
    pub(super) fn canonical(&self) -> String {
        let mut out = String::new();
        let mut line = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                // Values hold no control characters (checked), so lines cannot run together.
                let _ = writeln!(out, "{name}={value}");
            }
        };
        line("study_id", self.study_id.clone());
        line("site_id", self.site_id.clone());
        line("subject_id", self.subject_id.clone());
        line("rule_id", self.rule_id.clone());
        line("severity", (!self.severities.is_empty()).then(|| self.severities.join(",")));
        line("status", (!self.statuses.is_empty()).then(|| self.statuses.join(",")));
        line("raised_from", self.raised_from.map(|t| t.timestamp_micros().to_string()));
        line("raised_before", self.raised_before.map(|t| t.timestamp_micros().to_string()));
        out
    }
}

/// One request of the list: which alerts, how many, from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ListRequest {
    filter: Filter,
    limit: u32,
    /// The page starts after this key; the first page when `None`.
    after: Option<Position>,
}

impl ListRequest {
    /// Reads the raw query string (400 naming the parameter that cannot be taken).
    pub(super) fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut filter = Filter::default();
        let mut limit = DEFAULT_LIMIT;
        let mut cursor = None;
        let mut seen = HashSet::new();
        for (name, value) in pairs(query.unwrap_or_default())? {
            let param = Param::named(&name).ok_or_else(|| unknown(&name))?;
            let field = param.name();
            if !seen.insert(param) {
                return Err(refused(
                    "duplicate_parameter",
                    field,
                    "is given twice; give each parameter once (several severities or statuses go in \
                     one value, comma-separated)",
                ));
            }
            match param {
                Param::StudyId => filter.study_id = Some(id(field, value)?),
                Param::SiteId => filter.site_id = Some(id(field, value)?),
                Param::SubjectId => filter.subject_id = Some(id(field, value)?),
                Param::RuleId => filter.rule_id = Some(code(field, value)?),
                Param::Severity => filter.severities = one_of(field, &value, &SEVERITIES)?,
                Param::Status => filter.statuses = one_of(field, &value, &STATUSES)?,
                Param::RaisedFrom => filter.raised_from = Some(instant(field, &value)?),
                Param::RaisedBefore => filter.raised_before = Some(instant(field, &value)?),
                Param::Limit => limit = page_size(&value)?,
                Param::Cursor => cursor = Some(value),
            }
        }
        if let (Some(from), Some(before)) = (filter.raised_from, filter.raised_before)
            && before <= from
        {
            return Err(invalid(
                Param::RaisedBefore.name(),
                format!(
                    "must be later than raised_from ({} is not after {}): the range would be empty",
                    before.to_rfc3339(),
                    from.to_rfc3339()
                ),
            ));
        }
        let after = match cursor {
            None => None,
            Some(text) => Some(cursor::decode(&text, &filter.canonical()).map_err(|reason| {
                refused(
                    "invalid_cursor",
                    Param::Cursor.name(),
                    format!("`{}` {reason}", input::printable(&text)),
                )
            })?),
        };
        Ok(Self { filter, limit, after })
    }
}

fn refused(code: &'static str, field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message).with_field(field)
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    refused("invalid_parameter", field, message)
}

fn unknown(name: &str) -> ApiError {
    let known: Vec<&str> = Param::ALL.iter().map(|p| p.name()).collect();
    refused(
        "unknown_parameter",
        &input::printable(name),
        format!("is not a parameter of this list; use {}", known.join(", ")),
    )
}

/// The query's `name=value` pairs, percent-decoded (`+` is a space) strictly: bytes that are not
/// UTF-8 are refused, where form decoding would replace them and filter on something else.
fn pairs(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    fn decode(text: &str) -> Option<String> {
        String::from_utf8(percent_decode_str(&text.replace('+', " ")).collect()).ok()
    }
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode(name)
                .ok_or_else(|| invalid("query", format!("a parameter name {}", Problem::NotUtf8)))?;
            let value = decode(value)
                .ok_or_else(|| invalid(&input::printable(&name), Problem::NotUtf8.to_string()))?;
            Ok((name, value))
        })
        .collect()
}

/// A study, site or subject id (the site API's rule: 1 to 64 letters, digits, `.`, `_`, `-`).
fn id(field: &str, value: String) -> Result<String, ApiError> {
    check_id(field, &value).map_err(|e| invalid(field, e.message))?;
    Ok(value)
}

/// A rule id: any single-line text (rule files choose them), not blank.
fn code(field: &str, value: String) -> Result<String, ApiError> {
    if value.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    input::check(field, &value, Text::Line, MAX_CODE_CHARS).map_err(|e| invalid(field, e.message))?;
    Ok(value)
}

/// The comma-separated `value` as a subset of `allowed`, in `allowed`'s order; any case.
fn one_of(field: &str, value: &str, allowed: &[&'static str]) -> Result<Vec<&'static str>, ApiError> {
    let mut chosen = HashSet::new();
    for item in value.split(',') {
        let item = item.trim();
        let known = allowed.iter().find(|a| a.eq_ignore_ascii_case(item)).ok_or_else(|| {
            invalid(
                field,
                format!(
                    "`{}` is not one of {} (or several, comma-separated)",
                    input::printable(item),
                    allowed.join(", ")
                ),
            )
        })?;
        chosen.insert(*known);
    }
    Ok(allowed.iter().copied().filter(|a| chosen.contains(a)).collect())
}

/// An RFC 3339 date-time, rounded up to the microsecond PostgreSQL keeps: `raised_at >= t` and
/// `raised_at < t` mean the same on the rounded instant.
fn instant(field: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    let t = DateTime::parse_from_rfc3339(value).map(|t| t.to_utc()).map_err(|e| {
        invalid(
            field,
            format!(
                "`{}` is not an RFC 3339 date-time with an offset, e.g. 2026-03-01T08:00:00Z ({e})",
                input::printable(value)
            ),
        )
    })?;
    let below = t.nanosecond() % 1_000;
    Ok(if below == 0 { t } else { t + TimeDelta::nanoseconds(i64::from(1_000 - below)) })
}

fn page_size(value: &str) -> Result<u32, ApiError> {
    let digits = !value.is_empty() && value.len() <= 3 && value.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| value.parse::<u32>().ok()).flatten().filter(|n| (1..=MAX_LIMIT).contains(n)).ok_or_else(
        || {
            invalid(
                Param::Limit.name(),
                format!(
                    "`{}` is not a whole number from 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})",
                    input::printable(value)
                ),
            )
        },
    )
}

/// A page of the list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct AlertPage {
    /// The alerts, newest first: by `raised_at`, then `alert_id`, descending.
    alerts: Vec<Alert>,
    /// Where the next page starts: send it as `cursor`, with the same filters. `null` on the
    /// last page.
    #[schema(required = true)]
    next_cursor: Option<String>,
}

/// The alerts of `request`, and the cursor of the page after them if there is one.
async fn page(api: &AlertState, request: &ListRequest, studies: &Ids) -> Result<AlertPage, sqlx::Error> {
    let f = &request.filter;
    let mut sql = QueryBuilder::<Postgres>::new(select_alerts(&api.schema));
    // Only the conditions given: each combination gets a plan of its own (one statement with
    // `$n IS NULL OR ...` for all would get a generic plan that serves none of them well).
    sql.push(" WHERE true");
    if let Some(studies) = studies.listed() {
        sql.push(" AND a.study_id = ANY(").push_bind(studies).push(")");
    }
    for (column, value) in [
        ("study_id", &f.study_id),
        ("site_id", &f.site_id),
        ("subject_id", &f.subject_id),
        ("rule_id", &f.rule_id),
    ] {
        if let Some(value) = value {
            sql.push(format_args!(" AND a.{column} = ")).push_bind(value.clone());
        }
    }
    if !f.severities.is_empty() {
        sql.push(" AND a.severity = ANY(").push_bind(f.severities.clone()).push(")");
    }
    if !f.statuses.is_empty() {
        sql.push(" AND a.status = ANY(").push_bind(f.statuses.clone()).push(")");
    }
    if let Some(from) = f.raised_from {
        sql.push(" AND a.raised_at >= ").push_bind(from);
    }
    if let Some(before) = f.raised_before {
        sql.push(" AND a.raised_at < ").push_bind(before);
    }
    if let Some(after) = request.after {
        sql.push(" AND (a.raised_at, a.alert_id) < (")
            .push_bind(after.raised_at)
            .push(", ")
            .push_bind(after.alert_id)
            .push(")");
    }
    // One more than the page: whether a next page exists, without asking again.
    sql.push(" ORDER BY a.raised_at DESC, a.alert_id DESC LIMIT ").push_bind(i64::from(request.limit) + 1);
    let mut alerts: Vec<Alert> = sql.build_query_as().fetch_all(&api.pool).await?;
    let next_cursor = if alerts.len() > request.limit as usize {
        alerts.truncate(request.limit as usize);
        alerts.last().map(|last| {
            let position = Position { raised_at: last.raised_at, alert_id: last.alert_id };
            cursor::encode(position, &f.canonical())
        })
    } else {
        None
    };
    Ok(AlertPage { alerts, next_cursor })
}

/// The alerts, newest first, a page at a time
///
/// Filters combine with AND. A walk through all pages (following `next_cursor`) returns every
/// alert that matched when it began, exactly once, also while new alerts are raised: those sort
/// before the walk's position and show on a fresh walk or the stream.
#[utoipa::path(
    get,
    path = "/v1/alerts",
    tag = "alerts",
    params(Param),
    responses(
        (status = 200, description = "A page of alerts.", body = AlertPage),
        (status = 400, description = "A parameter that cannot be taken: `unknown_parameter`, \
            `duplicate_parameter`, `invalid_parameter` or `invalid_cursor`, with the parameter \
            as `field`.", body = openapi::ErrorBody),
        (status = 401, response = openapi::Unauthenticated),
        (status = 403, response = openapi::Forbidden),
        (status = 422, response = openapi::InvalidText),
        (status = 500, response = openapi::Internal),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bearer" = []))
)]
pub(super) async fn list_alerts(
    State(api): State<AlertState>,
    Researcher(principal): Researcher,
    RawQuery(query): RawQuery,
) -> Result<Json<AlertPage>, ApiError> {
    let request = ListRequest::parse(query.as_deref())?;
    if let Some(study_id) = &request.filter.study_id {
        principal.require_study(study_id)?;
    }
    Ok(Json(page(&api, &request, &principal.scope.studies).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &str) -> Result<ListRequest, (&'static str, Option<String>)> {
        ListRequest::parse(Some(query)).map_err(|e| {
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{query}: {e:?}");
            (e.code, e.field)
        })
    }

    fn filter_of(query: &str) -> Filter {
        match parse(query) {
            Ok(request) => request.filter,
            Err(e) => panic!("{query} was refused: {e:?}"),
        }
    }

    #[test]
    fn filters_are_normalised() {
        let Ok(request) = parse(
            "study_id=CDISCPILOT01&severity=critical,+High&status=OPEN,acknowledged,open&limit=20\
             &subject_id=01-701-1015&rule_id=CTCAE+HTN&raised_from=2026-03-01T09:00:00%2B01:00",
        ) else {
            panic!("valid filters were refused")
        };
        let f = &request.filter;
        assert_eq!(f.study_id.as_deref(), Some("CDISCPILOT01"));
        assert_eq!(f.subject_id.as_deref(), Some("01-701-1015"));
        assert_eq!(f.rule_id.as_deref(), Some("CTCAE HTN"));
        assert_eq!(f.severities, ["HIGH", "CRITICAL"]);
        assert_eq!(f.statuses, ["open", "acknowledged"]);
        assert_eq!(f.raised_from.map(|t| t.to_rfc3339()).as_deref(), Some("2026-03-01T08:00:00+00:00"));
        assert_eq!(request.limit, 20);
        assert_eq!(parse("").map(|r| r.limit), Ok(DEFAULT_LIMIT));
        assert_eq!(ListRequest::parse(None).map(|r| r.limit).ok(), Some(DEFAULT_LIMIT));
        // Empty pairs are no parameters.
        assert_eq!(parse("&&limit=5&").map(|r| r.limit), Ok(5));
    }

    #[test]
    fn one_filter_has_one_canonical_form() {
        let a = filter_of("severity=HIGH,critical&raised_from=2026-03-01T09:00:00%2B01:00");
        let b = filter_of("raised_from=2026-03-01T08:00:00Z&severity=Critical,high,HIGH");
        assert_eq!(a.canonical(), b.canonical());
        assert_ne!(filter_of("study_id=S1").canonical(), filter_of("site_id=S1").canonical());
        assert_eq!(filter_of("").canonical(), "");
    }

    #[test]
    fn instants_round_up_to_the_microsecond() {
        let f =
            filter_of("raised_from=2026-03-01T08:00:00.0000001Z&raised_before=2026-03-01T08:00:00.000002Z");
        assert_eq!(f.raised_from.map(|t| t.timestamp_micros() % 1_000_000), Some(1));
        assert_eq!(f.raised_before.map(|t| t.timestamp_micros() % 1_000_000), Some(2));
    }

    #[test]
    fn bad_parameters_are_400_naming_the_parameter() {
        let huge = "9".repeat(40);
        for (query, code, field) in [
            ("severity=SEVERE", "invalid_parameter", "severity"),
            ("severity=HIGH,", "invalid_parameter", "severity"),
            ("severity=", "invalid_parameter", "severity"),
            ("status=closed", "invalid_parameter", "status"),
            ("limit=0", "invalid_parameter", "limit"),
            ("limit=501", "invalid_parameter", "limit"),
            ("limit=-1", "invalid_parameter", "limit"),
            ("limit=+5", "invalid_parameter", "limit"),
            ("limit=ten", "invalid_parameter", "limit"),
            (&format!("limit={huge}"), "invalid_parameter", "limit"),
            ("study_id=a%20b", "invalid_parameter", "study_id"),
            ("site_id=", "invalid_parameter", "site_id"),
            ("subject_id=%C3%A9", "invalid_parameter", "subject_id"),
            ("subject_id=%FF", "invalid_parameter", "subject_id"),
            ("rule_id=+", "invalid_parameter", "rule_id"),
            ("raised_from=yesterday", "invalid_parameter", "raised_from"),
            ("raised_from=2026-03-01", "invalid_parameter", "raised_from"),
            ("raised_before=2026-03-01T08:00:00", "invalid_parameter", "raised_before"),
            ("raised_before=99999-01-01T00:00:00Z", "invalid_parameter", "raised_before"),
            (
                "raised_from=2026-03-01T08:00:00Z&raised_before=2026-03-01T08:00:00Z",
                "invalid_parameter",
                "raised_before",
            ),
            ("colour=red", "unknown_parameter", "colour"),
            ("Limit=5", "unknown_parameter", "Limit"),
            ("limit=5&limit=5", "duplicate_parameter", "limit"),
            ("status=open&severity=HIGH&status=resolved", "duplicate_parameter", "status"),
            ("cursor=", "invalid_cursor", "cursor"),
            ("cursor=garbage", "invalid_cursor", "cursor"),
            ("%FF=1", "invalid_parameter", "query"),
        ] {
            assert_eq!(parse(query).err(), Some((code, Some(field.to_string()))), "{query}");
        }
    }

    #[test]
    fn a_cursor_is_taken_with_the_filters_it_was_given_with_only() {
        let filter = filter_of("status=open&severity=HIGH");
        let position = Position { raised_at: Utc::now(), alert_id: uuid::Uuid::now_v7() };
        let mut rounded = position;
        rounded.raised_at =
            DateTime::from_timestamp_micros(position.raised_at.timestamp_micros()).unwrap_or_default();
        let next = cursor::encode(rounded, &filter.canonical());
        let same = format!("severity=high&status=OPEN&limit=7&cursor={next}");
        assert_eq!(parse(&same).map(|r| r.after), Ok(Some(rounded)));
        for other in
            ["status=open", "status=open&severity=HIGH,INFO", "status=open&severity=HIGH&site_id=701"]
        {
            assert_eq!(
                parse(&format!("{other}&cursor={next}")).err(),
                Some(("invalid_cursor", Some("cursor".to_string()))),
                "{other}"
            );
        }
    }
}
