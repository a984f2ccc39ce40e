//! Data queries for researchers: `GET /v1/queries` and `POST /v1/queries/{query_id}/close`.
//!
//! The risk service's edit checks open queries (its `query` table, read here in the schema
//! `ALERT_API_RISK_SCHEMA`); site staff answer them through the site API; a researcher of the
//! study closes an answered one here. The alert API never writes the risk service's table: a
//! closing is a `QueryClosed` event (topic `risk.queries.v1`, keyed by query id) in the
//! monitoring outbox, with its audit record (`query.closed`, the reason required), in ONE
//! transaction; the risk consumer applies it (answered → closed).
//!
//! **Scope.** A query of a study outside the caller's token is answered 404, like an unknown one.
//! **One closing per query.** 409 `query_not_answered` unless the query is answered, and also
//! once a closing given here awaits the risk consumer (it is in the monitoring schema's audit
//! trail): closings of one query are serialized by a transaction lock on its id.
//!
//! **List.** `study_id`, `status` (`open`, `answered`, `closed`), `limit` (1 to [`MAX_LIMIT`],
//! default [`DEFAULT_LIMIT`]); each at most once. Oldest first (by `opened_at`, then id), no
//! paging beyond `limit`: narrow the filters.

use std::collections::HashSet;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize, Serializer};
use sqlx::{AssertSqlSafe, PgConnection, Postgres, QueryBuilder};
use trialflow_http::ApiError;
use trialflow_http::auth::Principal;
use trialflow_http::input::{self, BodyRules, MAX_FREE_TEXT_CHARS, check_free_text, check_id};
use trialflow_outbox::{AuditRecord, OutboxEvent, SchemaName};
use trialflow_schemas::{Envelope, Event, QueryClosed, Timestamp};
use uuid::Uuid;

use super::alerts::format_time;
use super::{AlertState, MAX_BODY_BYTES, Researcher, SOURCE_SYSTEM, openapi};

/// The query id of the document's example (`POST /v1/queries/{query_id}/close`).
pub const EXAMPLE_QUERY_ID: &str = "0190f3c2-7a4e-7c1d-9b2a-5e8f4d3c2b2b";
/// Queries a list holds unless `limit` says otherwise.
pub(super) const DEFAULT_LIMIT: i64 = 100;
/// The largest `limit`.
pub(super) const MAX_LIMIT: i64 = 500;
/// A query's states, in the order it goes through them (the risk schema's check).
const STATUSES: [&str; 3] = ["open", "answered", "closed"];
/// The closing's body: its reason is free text.
const CLOSE_BODY: BodyRules = BodyRules { free_text: &["reason"] };

/// A data query, as the risk service keeps it: opened by an edit check, answered by the site,
/// closed by a researcher. Every field is always present (`null` where it does not apply yet).
#[derive(Debug, Clone, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub(super) struct DataQuery {
    query_id: Uuid,
    study_id: String,
    #[schema(required = true)]
    site_id: Option<String>,
    subject_id: String,
    /// The edit check that opened it (e.g. `SYSBP_RANGE`).
    check_id: String,
    /// The check's kind (e.g. `range`).
    check_kind: String,
    /// What was checked (e.g. `VitalSignRecorded/8480-6`).
    item: String,
    /// The events whose data the check found wrong.
    data_event_ids: Vec<Uuid>,
    /// The value found, as text.
    #[schema(required = true)]
    value: Option<String>,
    /// What is wrong, for the site.
    message: String,
    #[schema(schema_with = status_schema)]
    status: String,
    #[serde(serialize_with = "rfc3339")]
    opened_at: DateTime<Utc>,
    #[serde(serialize_with = "opt_rfc3339")]
    #[schema(required = true)]
    answered_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    answered_by: Option<String>,
    #[schema(required = true)]
    answer: Option<String>,
    #[serde(serialize_with = "opt_rfc3339")]
    #[schema(required = true)]
    closed_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    closed_by: Option<String>,
    #[schema(required = true)]
    close_reason: Option<String>,
}

fn status_schema() -> utoipa::openapi::Object {
    openapi::one_of(&STATUSES, "`open` until the site answers, `answered` until a researcher closes it.")
}

fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

fn opt_rfc3339<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

const COLUMNS: &str = "query_id, study_id, site_id, subject_id, check_id, check_kind, item, data_event_ids,
     value, message, status, opened_at, answered_at, answered_by, answer, closed_at, closed_by,
     close_reason";

/// The list's query parameters, for the document (the parser is [`ListRequest::parse`]).
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code, reason = "documents the parameters; the handler parses the raw query")]
pub(super) struct ListParams {
    /// Only queries of this study (exact match).
    #[param(example = "CDISCPILOT01", pattern = "^[A-Za-z0-9._-]+$", min_length = 1, max_length = 64)]
    study_id: Option<String>,
    /// Only queries in this state: `open`, `answered` or `closed`.
    #[param(example = "answered")]
    status: Option<String>,
    /// Queries at most, 1 to 500 (default 100).
    #[param(minimum = 1, maximum = 500, example = 50)]
    limit: Option<i64>,
}

/// What `GET /v1/queries` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ListRequest {
    study_id: Option<String>,
    status: Option<&'static str>,
    limit: i64,
}

fn refused(code: &'static str, field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message).with_field(field)
}

impl ListRequest {
    /// Reads the raw query string, strictly: not UTF-8 once percent-decoded, unknown, repeated
    /// or invalid parameters are 400 naming the parameter.
    fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut request = Self { limit: DEFAULT_LIMIT, ..Self::default() };
        let mut seen = HashSet::new();
        let decode =
            |text: &str| String::from_utf8(percent_decode_str(&text.replace('+', " ")).collect()).ok();
        for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode(name)
                .ok_or_else(|| refused("invalid_parameter", "query", "a parameter name is not UTF-8"))?;
            let shown = input::printable(&name);
            let value = decode(value).ok_or_else(|| refused("invalid_parameter", &shown, "is not UTF-8"))?;
            if !seen.insert(name.clone()) {
                return Err(refused("duplicate_parameter", &shown, "is given twice; give it once"));
            }
            match name.as_str() {
                "study_id" => {
                    check_id("study_id", &value)
                        .map_err(|e| refused("invalid_parameter", "study_id", e.message))?;
                    request.study_id = Some(value);
                }
                "status" => {
                    let status = STATUSES.iter().find(|s| **s == value.as_str()).ok_or_else(|| {
                        refused(
                            "invalid_parameter",
                            "status",
                            format!("`{}` is not one of {}", input::printable(&value), STATUSES.join(", ")),
                        )
                    })?;
                    request.status = Some(status);
                }
                "limit" => {
                    let digits =
                        !value.is_empty() && value.len() <= 3 && value.bytes().all(|b| b.is_ascii_digit());
                    request.limit = digits
                        .then(|| value.parse::<i64>().ok())
                        .flatten()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            refused(
                                "invalid_parameter",
                                "limit",
                                format!(
                                    "`{}` is not a number from 1 to {MAX_LIMIT}",
                                    input::printable(&value)
                                ),
                            )
                        })?;
                }
                _ => {
                    return Err(refused(
                        "unknown_parameter",
                        &shown,
                        "is not a parameter of this list; use study_id, status or limit",
                    ));
                }
            }
        }
        Ok(request)
    }
}

/// The queries of a list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct QueryList {
    /// Oldest first: by `opened_at`, then `query_id`.
    queries: Vec<DataQuery>,
}

/// The data queries of the caller's studies
///
/// The risk service's edit checks open them; sites answer them through the site API; a
/// researcher closes an answered one (`POST /v1/queries/{query_id}/close`).
#[utoipa::path(
    get,
    path = "/v1/queries",
    tag = "queries",
    params(ListParams),
    responses(
        (status = 200, description = "The queries, oldest first.", body = QueryList),
        (status = 400, description = "A parameter that cannot be taken: `unknown_parameter`, \
            `duplicate_parameter` or `invalid_parameter`, with the parameter as `field`.", body = openapi::ErrorBody),
        (status = 401, response = openapi::Unauthenticated),
        (status = 403, response = openapi::Forbidden),
        (status = 422, response = openapi::InvalidText),
        (status = 500, response = openapi::Internal),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bearer" = []))
)]
pub(super) async fn list_queries(
    State(api): State<AlertState>,
    Researcher(principal): Researcher,
    RawQuery(query): RawQuery,
) -> Result<Json<QueryList>, ApiError> {
    let request = ListRequest::parse(query.as_deref())?;
    if let Some(study_id) = &request.study_id {
        principal.require_study(study_id)?;
    }
    let s = &api.risk_schema;
    let mut sql = QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS} FROM {s}.query WHERE true"));
    if let Some(studies) = principal.scope.studies.listed() {
        sql.push(" AND study_id = ANY(").push_bind(studies).push(")");
    }
    if let Some(study_id) = &request.study_id {
        sql.push(" AND study_id = ").push_bind(study_id.clone());
    }
    if let Some(status) = request.status {
        sql.push(" AND status = ").push_bind(status);
    }
    sql.push(" ORDER BY opened_at, query_id LIMIT ").push_bind(request.limit);
    let queries: Vec<DataQuery> = sql.build_query_as().fetch_all(&api.pool).await?;
    Ok(Json(QueryList { queries }))
}

/// `POST /v1/queries/{query_id}/close`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"reason": "Answer accepted: the reading was mistyped and has been corrected."}))]
pub(super) struct CloseRequest {
    /// Why the query can be closed (free text, not blank, at most 2,000 characters; tabs and line
    /// breaks allowed).
    #[schema(required = true, value_type = String, min_length = 1, max_length = 2000)]
    reason: Option<String>,
}

/// What a closing answers: the event the risk consumer will apply.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Closing {
    query_id: Uuid,
    /// The `QueryClosed` event's id.
    event_id: Uuid,
}

/// The `{query_id}` path parameter.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code, reason = "documents the parameter; the handler takes the raw segment")]
pub(super) struct QueryIdParam {
    /// The query's id.
    #[param(example = "0190f3c2-7a4e-7c1d-9b2a-5e8f4d3c2b2b", format = Uuid)]
    query_id: String,
}

/// Close an answered query
///
/// Records the `QueryClosed` event (topic `risk.queries.v1`, keyed by query id) and its audit
/// record in one transaction; the risk service applies it (the query's status becomes `closed`).
#[utoipa::path(
    post,
    path = "/v1/queries/{query_id}/close",
    tag = "queries",
    params(QueryIdParam),
    request_body = CloseRequest,
    responses(
        (status = 200, description = "The closing is recorded; the risk service applies it.", body = Closing),
        (status = 400, response = openapi::BadBody),
        (status = 401, response = openapi::Unauthenticated),
        (status = 403, response = openapi::Forbidden),
        (status = 404, description = "`not_found`: no query with this id among the studies of \
            the token (an id that is not a UUID names none either).", body = openapi::ErrorBody),
        (status = 409, description = "`query_not_answered`: the query is open (the site has not \
            answered) or closed, or a closing awaits the risk service.", body = openapi::ErrorBody),
        (status = 413, response = openapi::TooLarge),
        (status = 422, response = openapi::InvalidReason),
        (status = 500, response = openapi::Internal),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bearer" = []))
)]
pub(super) async fn close_query(
    State(api): State<AlertState>,
    Researcher(principal): Researcher,
    Path(raw_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Closing>, ApiError> {
    let body = body.map_err(|rejection| input::body_error(rejection, MAX_BODY_BYTES))?;
    let request: CloseRequest = input::parse_body(&body, &CLOSE_BODY)?;
    let reason = request.reason.ok_or_else(|| ApiError::validation("reason", "is required"))?;
    check_free_text("reason", &reason, MAX_FREE_TEXT_CHARS)?;
    let reason = reason.trim().to_string();
    let not_found = || ApiError::not_found(format!("no query `{}`", input::printable(&raw_id)));
    let id = Uuid::parse_str(&raw_id).map_err(|_| not_found())?;
    let (risk, own) = (&api.risk_schema, &api.schema);

    let mut tx = api.pool.begin().await?;
    let query: Option<DataQuery> =
        sqlx::query_as(AssertSqlSafe(format!("SELECT {COLUMNS} FROM {risk}.query WHERE query_id = $1")))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let query = query.filter(|q| principal.scope.studies.contains(&q.study_id)).ok_or_else(not_found)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("query-close:{id}"))
        .execute(&mut *tx)
        .await?;
    if query.status != "answered" || closing_pending(&mut tx, own, id).await? {
        let status = if query.status == "answered" { "being closed" } else { query.status.as_str() };
        return Err(ApiError::conflict(
            "query_not_answered",
            format!("query `{id}` is {status}: only an answered query can be closed"),
        ));
    }
    let mut envelope = Envelope::new(QueryClosed::NAME, &query.study_id, SOURCE_SYSTEM, Timestamp::now());
    envelope.site_id = query.site_id.clone();
    envelope.subject_id = Some(query.subject_id.clone());
    envelope.actor = Some(principal.user.clone());
    let event_id = envelope.event_id;
    let event = QueryClosed { envelope, query_id: id, reason: reason.clone() };
    trialflow_outbox::audit::append(&mut tx, own, &[close_audit(&principal, &query, event_id, &reason)])
        .await?;
    let outbox_event = OutboxEvent::avro(&event, api.topics.of::<QueryClosed>(), id.to_string())?;
    api.outbox.enqueue(&mut tx, outbox_event).await?;
    tx.commit().await?;
    tracing::info!(query_id = %id, study_id = %query.study_id, user = %principal.user, "Closed query.");
    Ok(Json(Closing { query_id: id, event_id }))
}

/// Whether this API already recorded a closing of query `id` (which the risk consumer may not
/// have applied yet).
async fn closing_pending(conn: &mut PgConnection, s: &SchemaName, id: Uuid) -> Result<bool, ApiError> {
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {s}.audit_trail
                        WHERE action = 'query.closed' AND entity_type = 'query' AND entity_id = $1)"
    );
    Ok(sqlx::query_scalar(AssertSqlSafe(sql)).bind(id.to_string()).fetch_one(conn).await?)
}

/// The audit record of a closing: who, the status it changes, and the reason it requires.
fn close_audit(principal: &Principal, query: &DataQuery, event_id: Uuid, reason: &str) -> AuditRecord {
    let id = query.query_id;
    AuditRecord::by_person(&principal.user, principal.role.as_str(), "query.closed", "query", id.to_string())
        .study(&query.study_id)
        .site(query.site_id.as_deref())
        .change("event_id", serde_json::Value::Null, event_id.to_string())
        .change("status", "answered", "closed")
        .reason(reason)
        .cause(format!("request:POST /v1/queries/{id}/close"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &str) -> Result<ListRequest, (StatusCode, &'static str, Option<String>)> {
        ListRequest::parse(Some(query)).map_err(|e| (e.status, e.code, e.field))
    }

    #[test]
    fn list_parameters_parse_and_hostile_ones_are_refused_naming_the_parameter() {
        assert_eq!(
            parse("study_id=S1&status=answered&limit=5"),
            Ok(ListRequest { study_id: Some("S1".into()), status: Some("answered"), limit: 5 })
        );
        assert_eq!(parse("").map(|r| r.limit), Ok(DEFAULT_LIMIT));
        let bad = StatusCode::BAD_REQUEST;
        for (query, code, field) in [
            ("status=pending", "invalid_parameter", "status"),
            ("limit=0", "invalid_parameter", "limit"),
            ("limit=501", "invalid_parameter", "limit"),
            ("limit=%2B5", "invalid_parameter", "limit"),
            ("study_id=a%20b", "invalid_parameter", "study_id"),
            ("study_id=%FF", "invalid_parameter", "study_id"),
            ("status=open&status=open", "duplicate_parameter", "status"),
            ("arm=PBO", "unknown_parameter", "arm"),
        ] {
            assert_eq!(parse(query), Err((bad, code, Some(field.to_string()))), "{query:?}");
        }
    }
}
