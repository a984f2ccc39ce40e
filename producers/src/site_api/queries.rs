//! Data queries at the sites: `GET /v1/queries` and `POST /v1/queries/{query_id}/answer`.
//!
//! The risk service's edit checks open queries (its `query` table, in its schema, which the site
//! API reads: [`super::Links::queries`]); site staff and investigators answer them here, and a
//! researcher closes them through the alert API. The site API never writes the risk service's
//! table: an answer is a `QueryAnswered` event (topic `risk.queries.v1`, keyed by query id) in
//! the site API's outbox, with its audit record (`query.answered`, the answer as the reason) and
//! its `Idempotency-Key`, in ONE transaction; the risk consumer applies it (open → answered).
//!
//! **Who sees what.** Site staff, investigators and admins; a token limited to some studies or
//! sites sees their queries only. A query outside the caller's scope is answered 404 like one that
//! does not exist: nothing is revealed about other sites' subjects.
//!
//! **One answer per query.** 409 `query_not_open` when the query is answered or closed, and also
//! while an answer given here has not been applied yet (it is in this service's audit trail): a
//! query goes open → answered → closed and never back, so a second answer could only be refused
//! by the risk consumer. Answers to one query are serialized by a transaction lock on its id.
//!
//! **List.** Parameters (each at most once): `study_id`, `site_id`, `status` (`open`, `answered`
//! or `closed`), `limit` (1 to [`MAX_LIMIT`], default [`DEFAULT_LIMIT`]). Oldest first (by
//! `opened_at`, then id); no paging beyond `limit`: narrow the filters (an open query is what a
//! site works on, and a site has few at a time).
//!
//! Without the risk service's schema (a site API started alone) both routes answer 503
//! `queries_unavailable`.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection, Postgres, QueryBuilder};
use trialflow_http::ApiError;
use trialflow_http::auth::{Principal, Role};
use trialflow_http::input::{self, MAX_FREE_TEXT_CHARS, check_free_text, check_id};
use trialflow_outbox::SchemaName;
use trialflow_schemas::{Envelope, Event, QueryAnswered, Timestamp};
use uuid::Uuid;

use super::{Api, CommandRequest, SOURCE_SYSTEM};

/// Who may see and answer a site's queries.
pub const ROLES: &[Role] = &[Role::SiteStaff, Role::Investigator, Role::Admin];
/// Queries a list holds unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 100;
/// The largest `limit`.
pub const MAX_LIMIT: i64 = 500;
/// A query's states, in the order it goes through them (the risk schema's check).
pub const STATUSES: [&str; 3] = ["open", "answered", "closed"];

/// `POST /v1/queries/{query_id}/answer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerQuery {
    /// The site's answer (free text, 1 to 2,000 characters; tabs and line breaks allowed).
    pub answer: String,
}

/// A query as the site API shows it: every column of the risk service's `query` row.
#[derive(Debug, Clone, sqlx::FromRow)]
struct QueryRow {
    query_id: Uuid,
    study_id: String,
    site_id: Option<String>,
    subject_id: String,
    check_id: String,
    check_kind: String,
    item: String,
    data_event_ids: Vec<Uuid>,
    value: Option<String>,
    message: String,
    status: String,
    opened_at: DateTime<Utc>,
    answered_at: Option<DateTime<Utc>>,
    answered_by: Option<String>,
    answer: Option<String>,
    closed_at: Option<DateTime<Utc>>,
    closed_by: Option<String>,
    close_reason: Option<String>,
}

fn time(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| Value::String(t.to_rfc3339_opts(SecondsFormat::Micros, true)))
}

impl QueryRow {
    fn view(&self) -> Value {
        serde_json::json!({
            "query_id": self.query_id,
            "study_id": self.study_id,
            "site_id": self.site_id,
            "subject_id": self.subject_id,
            "check_id": self.check_id,
            "check_kind": self.check_kind,
            "item": self.item,
            "data_event_ids": self.data_event_ids,
            "value": self.value,
            "message": self.message,
            "status": self.status,
            "opened_at": time(Some(self.opened_at)),
            "answered_at": time(self.answered_at),
            "answered_by": self.answered_by,
            "answer": self.answer,
            "closed_at": time(self.closed_at),
            "closed_by": self.closed_by,
            "close_reason": self.close_reason,
        })
    }
}

const COLUMNS: &str = "query_id, study_id, site_id, subject_id, check_id, check_kind, item, data_event_ids,
     value, message, status, opened_at, answered_at, answered_by, answer, closed_at, closed_by,
     close_reason";

/// What `GET /v1/queries` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ListRequest {
    study_id: Option<String>,
    site_id: Option<String>,
    status: Option<&'static str>,
    limit: i64,
}

fn refused(code: &'static str, field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message).with_field(field)
}

impl ListRequest {
    fn parse(params: &[(String, String)]) -> Result<Self, ApiError> {
        let mut request = Self { limit: DEFAULT_LIMIT, ..Self::default() };
        let mut seen = HashSet::new();
        for (name, value) in params {
            let shown = input::printable(name);
            if !seen.insert(name.as_str()) {
                return Err(refused("duplicate_parameter", &shown, "is given twice; give it once"));
            }
            match name.as_str() {
                "study_id" => {
                    check_id("study_id", value)?;
                    request.study_id = Some(value.clone());
                }
                "site_id" => {
                    check_id("site_id", value)?;
                    request.site_id = Some(value.clone());
                }
                "status" => {
                    let status = STATUSES.iter().find(|s| **s == value.as_str()).ok_or_else(|| {
                        refused(
                            "invalid_parameter",
                            "status",
                            format!("`{}` is not one of {}", input::printable(value), STATUSES.join(", ")),
                        )
                    })?;
                    request.status = Some(status);
                }
                "limit" => {
                    request.limit = value
                        .parse::<i64>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n) && !value.starts_with('+'))
                        .ok_or_else(|| {
                            refused(
                                "invalid_parameter",
                                "limit",
                                format!(
                                    "`{}` is not a number from 1 to {MAX_LIMIT}",
                                    input::printable(value)
                                ),
                            )
                        })?;
                }
                _ => {
                    return Err(refused(
                        "unknown_parameter",
                        &shown,
                        "is not a parameter of this route; use study_id, site_id, status or limit",
                    ));
                }
            }
        }
        Ok(request)
    }
}

impl Api {
    /// The risk service's schema, where the queries are (503 when this API was not given it).
    fn queries_schema(&self) -> Result<&SchemaName, ApiError> {
        self.queries.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queries_unavailable",
                "this site API is not connected to the risk service's queries",
            )
        })
    }
}

pub(crate) async fn list_queries(
    State(api): State<Arc<Api>>,
    principal: Principal,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    principal.require(ROLES)?;
    let Query(params) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let request = ListRequest::parse(&params)?;
    if let Some(study_id) = &request.study_id {
        principal.require_study(study_id)?;
    }
    if let Some(site_id) = &request.site_id
        && !principal.scope.sites.contains(site_id)
    {
        return Err(ApiError::out_of_scope(format!("site `{site_id}` is not among the sites of your token")));
    }
    let s = api.queries_schema()?;
    let mut sql = QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS} FROM {s}.query WHERE true"));
    if let Some(studies) = principal.scope.studies.listed() {
        sql.push(" AND study_id = ANY(").push_bind(studies).push(")");
    }
    if let Some(sites) = principal.scope.sites.listed() {
        sql.push(" AND site_id = ANY(").push_bind(sites).push(")");
    }
    for (column, value) in [("study_id", &request.study_id), ("site_id", &request.site_id)] {
        if let Some(value) = value {
            sql.push(format_args!(" AND {column} = ")).push_bind(value.clone());
        }
    }
    if let Some(status) = request.status {
        sql.push(" AND status = ").push_bind(status);
    }
    sql.push(" ORDER BY opened_at, query_id LIMIT ").push_bind(request.limit);
    let rows: Vec<QueryRow> = sql.build_query_as().fetch_all(&api.pool).await?;
    Ok(Json(serde_json::json!({"queries": rows.iter().map(QueryRow::view).collect::<Vec<_>>()})))
}

/// The query `raw_id` names, if the caller may see it; 404 otherwise (unknown, not a UUID, or of
/// a study or site outside the caller's scope: the same answer).
async fn visible_query(
    conn: &mut PgConnection,
    s: &SchemaName,
    principal: &Principal,
    raw_id: &str,
) -> Result<QueryRow, ApiError> {
    let not_found = || ApiError::not_found(format!("no query `{}`", input::printable(raw_id)));
    let id = Uuid::parse_str(raw_id).map_err(|_| not_found())?;
    let row: Option<QueryRow> =
        sqlx::query_as(AssertSqlSafe(format!("SELECT {COLUMNS} FROM {s}.query WHERE query_id = $1")))
            .bind(id)
            .fetch_optional(conn)
            .await?;
    row.filter(|q| {
        principal.scope.studies.contains(&q.study_id)
            && (principal.all_sites()
                || q.site_id.as_ref().is_some_and(|site| principal.scope.sites.contains(site)))
    })
    .ok_or_else(not_found)
}

pub(crate) async fn answer_query(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path(raw_id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(ROLES)?;
    let (key, req): (_, AnswerQuery) = request.parse()?;
    check_free_text("answer", &req.answer, MAX_FREE_TEXT_CHARS)?;
    let s = api.queries_schema()?.clone();
    api.run_once(&principal, key, &request, async |command| {
        let query = visible_query(&mut command.tx, &s, &principal, &raw_id).await?;
        let id = query.query_id.to_string();
        // Answers to one query, one after the other: the second sees the first's audit record.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("query-answer:{id}"))
            .execute(&mut *command.tx)
            .await?;
        if query.status != "open" || answer_pending(&mut command.tx, &api.schema, &id).await? {
            let status = if query.status == "open" { "answered (not yet applied)" } else { &query.status };
            return Err(ApiError::conflict(
                "query_not_open",
                format!("query `{id}` is {status}: only an open query can be answered"),
            ));
        }
        let mut envelope =
            Envelope::new(QueryAnswered::NAME, &query.study_id, SOURCE_SYSTEM, Timestamp::now());
        envelope.site_id = query.site_id.clone();
        envelope.subject_id = Some(query.subject_id.clone());
        envelope.actor = Some(principal.user.clone());
        let event = QueryAnswered { envelope, query_id: query.query_id, answer: req.answer.clone() };
        let record = request
            .audit(&principal, "query.answered", "query", &id)
            .study(&query.study_id)
            .site(query.site_id.as_deref())
            .change("event_id", Value::Null, event.envelope.event_id.to_string())
            .change("status", "open", "answered")
            .change("answer", Value::Null, req.answer.as_str())
            .reason(req.answer.as_str());
        api.audit(&mut command.tx, record).await?;
        command.emit(&event, &id).await?;
        tracing::info!(query_id = %id, study_id = %query.study_id, user = %principal.user, "Answered query.");
        Ok(serde_json::json!({"query_id": id, "event_ids": [event.envelope.event_id]}))
    })
    .await
}

/// Whether this service already recorded an answer to query `id` (which the risk consumer may
/// not have applied yet).
async fn answer_pending(conn: &mut PgConnection, s: &SchemaName, id: &str) -> Result<bool, ApiError> {
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {s}.audit_trail
                        WHERE action = 'query.answered' AND entity_type = 'query' AND entity_id = $1)"
    );
    Ok(sqlx::query_scalar(AssertSqlSafe(sql)).bind(id).fetch_one(conn).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &[(&str, &str)]) -> Result<ListRequest, (StatusCode, &'static str, Option<String>)> {
        let params: Vec<(String, String)> =
            query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ListRequest::parse(&params).map_err(|e| (e.status, e.code, e.field))
    }

    #[test]
    fn list_parameters_parse_and_hostile_ones_are_refused_naming_the_parameter() {
        let ok = parse(&[("study_id", "S1"), ("site_id", "701"), ("status", "open"), ("limit", "5")]);
        assert_eq!(
            ok,
            Ok(ListRequest {
                study_id: Some("S1".into()),
                site_id: Some("701".into()),
                status: Some("open"),
                limit: 5
            })
        );
        assert_eq!(parse(&[]).map(|r| r.limit), Ok(DEFAULT_LIMIT));
        let bad = StatusCode::BAD_REQUEST;
        for (query, code, field) in [
            (vec![("status", "OPEN ")], "invalid_parameter", "status"),
            (vec![("status", "pending")], "invalid_parameter", "status"),
            (vec![("limit", "0")], "invalid_parameter", "limit"),
            (vec![("limit", "501")], "invalid_parameter", "limit"),
            (vec![("limit", "+5")], "invalid_parameter", "limit"),
            (vec![("status", "open"), ("status", "open")], "duplicate_parameter", "status"),
            (vec![("arm", "PBO")], "unknown_parameter", "arm"),
        ] {
            assert_eq!(parse(&query), Err((bad, code, Some(field.to_string()))), "{query:?}");
        }
        let bad_id = parse(&[("site_id", "7 01")]);
        assert_eq!(
            bad_id.map_err(|e| (e.0, e.2)),
            Err((StatusCode::UNPROCESSABLE_ENTITY, Some("site_id".into())))
        );
    }
}
