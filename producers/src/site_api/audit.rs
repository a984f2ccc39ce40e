//! `GET /v1/audit`: the audit trails (see `trialflow_outbox::audit`) of the site API and of the
//! other services whose schemas it was given ([`super::SiteApi::bind_linked`]; the
//! pipeline and `trialflow site-api` give every service of the registry), one page at a time.
//!
//! Roles: every role. Unblinded roles (admin, pharmacist) get the full records, unblinded changes
//! included and marked, with the hashes; blinded roles (site staff, researchers) get the blinded
//! view: every change whose values reveal a treatment arm is left out (the key is absent, not
//! null; `values_withheld` says that something was), so no arm reaches them (ICH E6(R3): what
//! could jeopardise the blind stays out of audit views available to blinded users).
//!
//! Query: `study_id` (only that study's records), `limit` (1 to [`MAX_LIMIT`], default
//! [`DEFAULT_LIMIT`]), `cursor` (the `next_cursor` of the page before). Records come by source
//! (the order of the sources), then in time order across the source's chains (time, chain,
//! seq): a keyset, so a page never shifts when records are appended. A record's time is read
//! before its transaction commits, so on a live trail a record can appear after a page with later
//! times was read (by milliseconds; see `trialflow_outbox::audit::read`). Anything else in the
//! query is refused: 400 naming the parameter, 422 for a study id that is no id.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde_json::Value;
use trialflow_http::ApiError;
use trialflow_http::auth::{Principal, Role};
use trialflow_http::input::{self, check_id};
use trialflow_outbox::SchemaName;
use trialflow_outbox::audit::Position;

use super::Api;

/// Records a page holds unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 100;
/// The largest `limit`.
pub const MAX_LIMIT: i64 = 500;

/// One trail `GET /v1/audit` reads: the service's name (each record's `source`) and its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSource {
    pub service: String,
    pub schema: SchemaName,
}

/// A page of `GET /v1/audit`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PageRequest {
    study_id: Option<String>,
    limit: i64,
    /// After this record of this source (from the source's first when none).
    after: (usize, Option<Position>),
}

fn refused(code: &'static str, field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message).with_field(field)
}

impl PageRequest {
    fn parse(params: &[(String, String)], sources: usize) -> Result<Self, ApiError> {
        let mut request = Self { study_id: None, limit: DEFAULT_LIMIT, after: (0, None) };
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
                "cursor" => request.after = cursor(value, sources)?,
                _ => {
                    return Err(refused(
                        "unknown_parameter",
                        &shown,
                        "is not a parameter of this route; use study_id, limit or cursor",
                    ));
                }
            }
        }
        Ok(request)
    }
}

/// `<source index>.<recorded_at in µs since 1970>.<chain>.<seq>`, as `next_cursor` gives it.
fn cursor(value: &str, sources: usize) -> Result<(usize, Option<Position>), ApiError> {
    let parsed = || -> Option<(usize, Option<Position>)> {
        let digits = |s: &str| !s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit());
        let parts: Vec<&str> = value.split('.').collect();
        let [source, micros, chain, seq] = parts.as_slice() else { return None };
        if !parts.iter().all(|p| digits(p)) {
            return None;
        }
        let source = source.parse::<usize>().ok().filter(|s| *s < sources)?;
        let recorded_at = chrono::DateTime::from_timestamp_micros(micros.parse().ok()?)?;
        let (chain, seq) = (chain.parse::<i16>().ok()?, seq.parse::<i64>().ok()?);
        Some((source, Some(Position { recorded_at, chain, seq })))
    };
    parsed().ok_or_else(|| {
        refused(
            "invalid_cursor",
            "cursor",
            format!(
                "`{}` is not a cursor of this list; use the next_cursor of a page",
                input::printable(value)
            ),
        )
    })
}

/// The cursor that continues after `position` of source `index`.
fn cursor_after(index: usize, position: &Position) -> String {
    format!("{index}.{}.{}.{}", position.recorded_at.timestamp_micros(), position.chain, position.seq)
}

pub(crate) async fn list_audit(
    State(api): State<Arc<Api>>,
    principal: Principal,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    principal.require(&[
        Role::Admin,
        Role::Pharmacist,
        Role::SiteStaff,
        Role::Investigator,
        Role::Researcher,
    ])?;
    let Query(params) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let sources = &api.audit_sources;
    let request = PageRequest::parse(&params, sources.len())?;
    // A token limited to some studies names one of them; one limited to some sites sees the
    // records of those sites and the study-level ones (nothing of other sites' subjects).
    if principal.scope.studies.listed().is_some() {
        let study_id = request.study_id.as_deref().ok_or_else(|| {
            ApiError::validation("study_id", "is required for a token limited to some studies")
        })?;
        principal.require_study(study_id)?;
    }
    let blinded = !principal.role.is_unblinded();
    let mut conn = api.pool.acquire().await?;
    let mut records = Vec::new();
    let mut next_cursor = None;
    let (first, mut after) = request.after;
    'sources: for (index, source) in sources.iter().enumerate().skip(first) {
        loop {
            let want = request.limit + 1 - records.len() as i64;
            let page = trialflow_outbox::audit::read(
                &mut conn,
                &source.schema,
                request.study_id.as_deref(),
                after.as_ref(),
                want,
            )
            .await?;
            let full = page.len() as i64 == want;
            for record in page {
                if records.len() as i64 == request.limit {
                    // One more exists: the page ends at the record before it.
                    next_cursor =
                        records.last().map(|(i, at, _): &(usize, Position, Value)| cursor_after(*i, at));
                    break 'sources;
                }
                // Read on from here, whether it is shown or left out.
                after = Some(record.position());
                if record.site_id.as_ref().is_some_and(|site| !principal.scope.sites.contains(site)) {
                    continue;
                }
                records.push((index, record.position(), record.view(&source.service, blinded)));
            }
            if !full {
                break;
            }
        }
        after = None;
    }
    let records: Vec<Value> = records.into_iter().map(|(_, _, view)| view).collect();
    Ok(Json(serde_json::json!({"records": records, "next_cursor": next_cursor})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &[(&str, &str)]) -> Result<PageRequest, (StatusCode, &'static str, Option<String>)> {
        let params: Vec<(String, String)> =
            query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        PageRequest::parse(&params, 3).map_err(|e| (e.status, e.code, e.field))
    }

    #[test]
    fn queries_parse_and_hostile_values_are_refused_naming_the_parameter() {
        let at = Position {
            recorded_at: chrono::DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap_or_default(),
            chain: 3,
            seq: 41,
        };
        let cursor = cursor_after(2, &at);
        assert_eq!(cursor, "2.1764000000123456.3.41");
        let ok = parse(&[("study_id", "CDISCPILOT01"), ("limit", "20"), ("cursor", &cursor)]);
        assert_eq!(
            ok,
            Ok(PageRequest { study_id: Some("CDISCPILOT01".into()), limit: 20, after: (2, Some(at)) })
        );
        assert_eq!(parse(&[]).map(|r| (r.limit, r.after)), Ok((DEFAULT_LIMIT, (0, None))));
        let bad = StatusCode::BAD_REQUEST;
        for (query, code, field) in [
            (vec![("limit", "0")], "invalid_parameter", "limit"),
            (vec![("limit", "501")], "invalid_parameter", "limit"),
            (vec![("limit", "+5")], "invalid_parameter", "limit"),
            (vec![("limit", "1e3")], "invalid_parameter", "limit"),
            (vec![("limit", "99999999999999999999999")], "invalid_parameter", "limit"),
            (vec![("cursor", "3.1764000000123456.0.1")], "invalid_cursor", "cursor"),
            (vec![("cursor", "1.1764000000123456.0.-1")], "invalid_cursor", "cursor"),
            (vec![("cursor", "1.1764000000123456.40000.1")], "invalid_cursor", "cursor"),
            (vec![("cursor", "1.-5.0.1")], "invalid_cursor", "cursor"),
            (vec![("cursor", "1.2.41")], "invalid_cursor", "cursor"),
            (vec![("cursor", "1.1764000000123456.0.1.")], "invalid_cursor", "cursor"),
            (vec![("cursor", "1")], "invalid_cursor", "cursor"),
            (vec![("cursor", "1.99999999999999999999")], "invalid_cursor", "cursor"),
            (vec![("cursor", "'; DROP TABLE x")], "invalid_cursor", "cursor"),
            (vec![("limit", "5"), ("limit", "5")], "duplicate_parameter", "limit"),
            (vec![("arm", "PBO")], "unknown_parameter", "arm"),
        ] {
            assert_eq!(parse(&query), Err((bad, code, Some(field.to_string()))), "{query:?}");
        }
        let bad_id = parse(&[("study_id", "no spaces allowed")]);
        assert_eq!(
            bad_id.map_err(|e| (e.0, e.2)),
            Err((StatusCode::UNPROCESSABLE_ENTITY, Some("study_id".into())))
        );
    }
}
