//! What the front doors accept: one set of rules for every string, body and instant that reaches
//! the site API, the ePRO gateway and the researchers' alert API, and for the ePRO validation
//! consumer, which must refuse the same submissions when an app publishes them straight to Kafka.
//!
//! **Why.** What a front door lets in is stored and published: PostgreSQL `text` cannot hold NUL
//! (and `jsonb` not even the escape `\u0000`), a control character in an id ends up in Kafka keys,
//! logs and CSV exports, and an event beyond the broker's record size can never be published. A
//! request that would fail there is refused here, before anything is written or published, with a
//! machine-readable answer naming the field.
//!
//! * **Strings**, anywhere: JSON values and object keys of a body, path segments (percent-decoded)
//!   and query parameters. No control character (Unicode `Cc`: U+0000–U+001F, U+007F–U+009F),
//!   except tab, line feed and carriage return in free-text fields (a reason, a description, a
//!   free-text answer). Not longer than [`MAX_LINE_CHARS`] (single-line strings),
//!   [`MAX_FREE_TEXT_CHARS`] (free text), [`MAX_KEY_CHARS`] (object keys),
//!   [`MAX_PATH_PARAM_CHARS`] (path segments) or [`MAX_QUERY_CHARS`] (query values); the
//!   typed checks of each field are tighter still (ids [`MAX_ID_CHARS`], names [`MAX_NAME_CHARS`]).
//!   Answered 422 `invalid_characters` or `too_long` with the field's path (`arms[1].name`,
//!   `study_id` for a path segment, the parameter's name for a query value). A path segment that
//!   is not UTF-8 once percent-decoded is `invalid_characters` too.
//! * **Bodies** are parsed in two passes: [`parse_body`] first walks the whole document (strings
//!   as above; a key given twice in one object is 400 `duplicate_key`, because serde_json would
//!   silently keep the last one for maps), then reads it into the request type (400
//!   `invalid_json` naming the path of the value that does not fit: wrong types, numbers out of
//!   range such as `1e400` or `2^70` for an integer field, unknown fields). Invalid JSON, invalid
//!   UTF-8, lone surrogate escapes (`"\ud800"`), an empty body and nesting deeper than 128 levels
//!   (serde_json's recursion limit) are 400 `invalid_json`. Each service caps its body size (413
//!   `payload_too_large`, see [`body_error`]).
//! * **Instants** a request states (`occurred_at`, a consent's `signed_at`, a submission's
//!   `authored_at`) may lie at most a configured skew ([`DEFAULT_MAX_FUTURE_SKEW_SECS`]) ahead of
//!   the server's clock — the ePRO gateway's clock, which a replay drives: 422 `in_the_future`.
//!
//! Limits a URL meets before it reaches these checks: hyper refuses a request line or headers
//! beyond its buffer, and the `http` crate URIs longer than 64 KiB, with a bodiless 414 or 431.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use axum::extract::rejection::{BytesRejection, RawPathParamsRejection};
use axum::extract::{FromRequestParts, Query, RawPathParams, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::de::{DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use trialflow_schemas::{QuestionnaireResponseSubmitted, Timestamp};

use crate::ApiError;

// ---- limits ----------------------------------------------------------------------------------

/// Ids of studies, sites, subjects, shipments, kits, criteria, factors and arms.
pub const MAX_ID_CHARS: usize = 64;
/// Codes and short labels: reason codes, consent versions, lots, stratum values, questionnaire
/// versions, occurrences, item link ids, time zones.
pub const MAX_CODE_CHARS: usize = 64;
/// Names of arms and sites, a user or actor.
pub const MAX_NAME_CHARS: usize = 200;
/// Any single-line string (a study's title is the longest).
pub const MAX_LINE_CHARS: usize = 500;
/// Free text: eligibility criteria, reasons, free-text answers. Tab and line breaks allowed.
pub const MAX_FREE_TEXT_CHARS: usize = 2_000;
/// A questionnaire's canonical name (`PHQ-9`, `http://loinc.org/44249-1`).
pub const MAX_QUESTIONNAIRE_CHARS: usize = 256;
/// An object key anywhere in a body (criterion ids, factor names and field names are shorter).
pub const MAX_KEY_CHARS: usize = 128;
/// A path segment (ids, alert UUIDs).
pub const MAX_PATH_PARAM_CHARS: usize = 128;
/// A query parameter's value (filters, and the stream's `access_token`).
pub const MAX_QUERY_CHARS: usize = 2_048;
/// How far ahead of the server's clock a stated instant may lie by default: devices' clocks
/// drift, but not by more.
pub const DEFAULT_MAX_FUTURE_SKEW_SECS: u64 = 300;
/// The largest skew a service accepts in its configuration: a day. More would let through what
/// the check is there to stop.
pub const MAX_FUTURE_SKEW_SECS: u64 = 86_400;

// ---- strings -----------------------------------------------------------------------------------

/// Which control characters a string may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Text {
    /// Ids, codes, names: none.
    Line,
    /// Free text: tab, line feed and carriage return.
    FreeText,
}

impl Text {
    fn allows(self, c: char) -> bool {
        !c.is_control() || (self == Text::FreeText && matches!(c, '\t' | '\n' | '\r'))
    }
}

/// Why a string cannot be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// A control character (its code point and position in characters, counted from 0).
    ControlCharacter { code_point: u32, position: usize },
    /// Percent-decoded bytes that are not UTF-8.
    NotUtf8,
    /// More characters than the field takes.
    TooLong { chars: usize, max: usize },
}

impl Problem {
    /// The answer's `code`.
    pub fn code(self) -> &'static str {
        match self {
            Problem::ControlCharacter { .. } | Problem::NotUtf8 => "invalid_characters",
            Problem::TooLong { .. } => "too_long",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::ControlCharacter { code_point, position } => write!(
                f,
                "contains the control character U+{code_point:04X} at character {position}; \
                 control characters are not accepted (free text may hold tabs and line breaks)"
            ),
            Problem::NotUtf8 => f.write_str("is not UTF-8 once percent-decoded"),
            Problem::TooLong { chars, max } => {
                write!(f, "is {chars} characters long; at most {max} are accepted")
            }
        }
    }
}

/// The first reason `value` cannot be taken as `text` of at most `max` characters, if any.
pub fn problem(value: &str, text: Text, max: usize) -> Option<Problem> {
    let mut chars = 0;
    for c in value.chars() {
        if !text.allows(c) {
            return Some(Problem::ControlCharacter { code_point: u32::from(c), position: chars });
        }
        chars += 1;
    }
    (chars > max).then_some(Problem::TooLong { chars, max })
}

/// 422 naming `field` when `value` cannot be taken as `text` of at most `max` characters.
pub fn check(field: &str, value: &str, text: Text, max: usize) -> Result<(), ApiError> {
    problem(value, text, max).map_or(Ok(()), |p| Err(refusal(field, p)))
}

/// The 422 answer to `problem` in `field`.
pub fn refusal(field: &str, problem: Problem) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, problem.code(), problem.to_string()).with_field(field)
}

/// `value` made storable: control characters it may not hold replaced by U+FFFD, cut to `max`
/// characters. For records that must be kept although they were refused (a rejected submission).
pub fn storable(value: &str, text: Text, max: usize) -> String {
    value.chars().take(max).map(|c| if text.allows(c) { c } else { char::REPLACEMENT_CHARACTER }).collect()
}

/// A name from the request (a key, a parameter) fit to be echoed in an answer or a log: control
/// characters escaped, at most 64 characters.
pub fn printable(name: &str) -> String {
    const MAX: usize = 64;
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if i == MAX {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

// ---- ids and required values ------------------------------------------------------------------

/// Ids of studies, sites, subjects, shipments and kits: `^[A-Za-z0-9._-]{1,64}$`, so they are
/// safe in paths, Kafka keys and logs.
pub fn check_id(field: &str, value: &str) -> Result<(), ApiError> {
    check(field, value, Text::Line, MAX_ID_CHARS)?;
    let valid = (1..=MAX_ID_CHARS).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::validation(
            field,
            format!("`{value}` is not a valid id: use 1 to 64 letters, digits, `.`, `_` or `-`"),
        ))
    }
}

/// A required single-line value (a name, a code): not blank, no control character, at most
/// `max` characters.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    check_required(field, value, Text::Line, max)
}

/// A required free-text value (a reason, a description): not blank, no control character but
/// tabs and line breaks, at most `max` characters.
pub fn check_free_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    check_required(field, value, Text::FreeText, max)
}

fn check_required(field: &str, value: &str, text: Text, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::validation(field, "must not be empty"));
    }
    check(field, value, text, max)
}

// ---- instants ------------------------------------------------------------------------------------

/// 422 `in_the_future` naming `field` when `at` is more than `max_skew` ahead of `now`.
pub fn check_not_future(
    field: &str,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
    max_skew: chrono::Duration,
) -> Result<(), ApiError> {
    if at > now + max_skew {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "in_the_future",
            format!(
                "{} is more than {} s ahead of the server's clock ({})",
                at.to_rfc3339(),
                max_skew.num_seconds(),
                now.to_rfc3339()
            ),
        )
        .with_field(field));
    }
    Ok(())
}

/// [`check_not_future`] for a timestamp in microseconds since the epoch; one out of range is 422.
pub fn check_timestamp_not_future(
    field: &str,
    at: Timestamp,
    now: DateTime<Utc>,
    max_skew: chrono::Duration,
) -> Result<(), ApiError> {
    let at = at.to_datetime().ok_or_else(|| ApiError::validation(field, "is out of range"))?;
    check_not_future(field, at, now, max_skew)
}

/// The value of a service's future-skew setting: seconds, at most [`MAX_FUTURE_SKEW_SECS`]
/// (blanks around it ignored). The error says why, not which setting: its caller names that
/// (`trialflow_outbox::config::setting`).
pub fn parse_future_skew(value: &str) -> Result<u64, String> {
    let secs: u64 = value.trim().parse().map_err(|e: std::num::ParseIntError| e.to_string())?;
    if secs > MAX_FUTURE_SKEW_SECS {
        return Err(format!("must be at most {MAX_FUTURE_SKEW_SECS} (a day)"));
    }
    Ok(secs)
}

// ---- path and query --------------------------------------------------------------------------

/// Middleware of every route (`Router::layer`, so the route's path parameters are known): refuses
/// a request whose path segments or query parameters break the string rules, before any handler
/// (or its extractors, whose own rejections are plain text) sees it.
pub async fn guard_request(request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    if let Err(refused) = check_path_and_query(&mut parts).await {
        return refused.into_response();
    }
    next.run(Request::from_parts(parts, body)).await
}

async fn check_path_and_query(parts: &mut Parts) -> Result<(), ApiError> {
    match RawPathParams::from_request_parts(parts, &()).await {
        Ok(params) => {
            for (name, value) in &params {
                check(name, value, Text::Line, MAX_PATH_PARAM_CHARS)?;
            }
        }
        Err(RawPathParamsRejection::InvalidUtf8InPathParam(e)) => {
            // The rejection names the parameter only in its text: "Invalid UTF-8 in `name`".
            let text = e.body_text();
            let name = text.split('`').nth(1).unwrap_or("path");
            return Err(refusal(name, Problem::NotUtf8));
        }
        // No parameters (a route without any, or the fallback).
        Err(_) => {}
    }
    if parts.uri.query().is_some() {
        // Form decoding replaces bytes that are not UTF-8 by U+FFFD (storable); what is left to
        // refuse are control characters and length.
        let Query(params) = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|e| ApiError::validation("query", e.body_text()))?;
        for (name, value) in &params {
            let shown = printable(name);
            check(&shown, name, Text::Line, MAX_KEY_CHARS)?;
            check(&shown, value, Text::Line, MAX_QUERY_CHARS)?;
        }
    }
    Ok(())
}

// ---- bodies ------------------------------------------------------------------------------------

/// Bodies announced (`Content-Length`) up to this size are read and discarded before the 413.
const DRAIN_CAP_BYTES: usize = 8 << 20;
/// How long reading a refused body may take.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Answers 413 `payload_too_large` to a request whose `Content-Length` is beyond `max_bytes`, after
/// reading its body (up to 8 MiB, 10 s): a client that writes its whole body before it reads the
/// answer (most do) then gets the answer, instead of a broken pipe when the server closes on an
/// unread body. Bodies without a length are cut off at `max_bytes` by the body limit.
pub async fn refuse_oversized(request: Request, next: Next, max_bytes: usize) -> Response {
    let announced = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n > max_bytes as u64 => {
            if n <= DRAIN_CAP_BYTES as u64 {
                let drain = axum::body::to_bytes(request.into_body(), DRAIN_CAP_BYTES);
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
            }
            too_large(max_bytes).into_response()
        }
        _ => next.run(request).await,
    }
}

fn too_large(max_bytes: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("a request body is at most {} KiB here", max_bytes / 1024),
    )
}

/// The body's answer when it could not be read: 413 `payload_too_large` beyond `max_bytes`, 400
/// `invalid_body` otherwise (e.g. the client stopped sending).
pub fn body_error(rejection: BytesRejection, max_bytes: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(max_bytes)
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", rejection.body_text())
    }
}

/// Which strings of a body are free text: their paths, with `[]` for any index
/// (`eligibility.criteria[].description`). Every other string is single-line.
#[derive(Debug, Clone, Copy)]
pub struct BodyRules {
    pub free_text: &'static [&'static str],
}

/// Reads a JSON body as `T`: [`BodyRules`] for every string and no key twice in one object, then
/// the type (400 `invalid_json` naming the path of the first value that does not fit).
pub fn parse_body<T: DeserializeOwned>(body: &[u8], rules: &BodyRules) -> Result<T, ApiError> {
    let syntax = match scan(body, rules) {
        Ok(()) => None,
        Err(Scanned::Refused(e)) => return Err(e),
        Err(Scanned::Syntax(e)) => Some(e),
    };
    // On a syntax error, the typed read fails too and names the path up to where it broke.
    let value = parse_typed(body)?;
    match syntax {
        None => Ok(value),
        Some(e) => Err(ApiError::invalid_json(None, e.to_string())),
    }
}

fn parse_typed<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| ApiError::invalid_json(field_path(e.path()), e.inner().to_string()))?;
    de.end().map_err(|e| ApiError::invalid_json(None, e.to_string()))?;
    Ok(value)
}

/// `arms[1].ratio` from a deserializer path, up to the first segment it could not name (the
/// syntax error cases); `None` for the document itself.
fn field_path(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment as S;
    let mut segments = Vec::new();
    for segment in path.iter() {
        match segment {
            S::Seq { index } => segments.push(Segment::Index(*index)),
            S::Map { key } | S::Enum { variant: key } => segments.push(Segment::Key(key.clone())),
            S::Unknown => break,
        }
    }
    (!segments.is_empty()).then(|| render(&segments, false))
}

#[derive(Debug, Clone)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `items[2].value_string`; with `pattern`, indices as `[]` (to match [`BodyRules`]).
fn render(path: &[Segment], pattern: bool) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Index(_) if pattern => out.push_str("[]"),
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
            Segment::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&printable(key));
            }
        }
    }
    out
}

enum Scanned {
    Refused(ApiError),
    Syntax(serde_json::Error),
}

/// Walks the whole document once, checking every key and string against `rules`.
fn scan(body: &[u8], rules: &BodyRules) -> Result<(), Scanned> {
    let state = ScanState { rules, path: RefCell::new(Vec::new()), refused: RefCell::new(None) };
    let mut de = serde_json::Deserializer::from_slice(body);
    let walked = Scan(&state).deserialize(&mut de).and_then(|()| de.end());
    match (walked, state.refused.into_inner()) {
        (_, Some(refused)) => Err(Scanned::Refused(refused)),
        (Err(e), None) => Err(Scanned::Syntax(e)),
        (Ok(()), None) => Ok(()),
    }
}

struct ScanState<'a> {
    rules: &'a BodyRules,
    path: RefCell<Vec<Segment>>,
    /// The refusal that stopped the walk (serde errors carry only text).
    refused: RefCell<Option<ApiError>>,
}

impl ScanState<'_> {
    fn refuse<E: serde::de::Error>(&self, refusal: ApiError) -> E {
        let message = refusal.message.clone();
        *self.refused.borrow_mut() = Some(refusal);
        E::custom(message)
    }

    fn string<E: serde::de::Error>(&self, value: &str) -> Result<(), E> {
        let (field, pattern) = {
            let path = self.path.borrow();
            (render(&path, false), render(&path, true))
        };
        let (text, max) = if self.rules.free_text.contains(&pattern.as_str()) {
            (Text::FreeText, MAX_FREE_TEXT_CHARS)
        } else {
            (Text::Line, MAX_LINE_CHARS)
        };
        match problem(value, text, max) {
            None => Ok(()),
            Some(p) => Err(self.refuse(refusal(&field, p))),
        }
    }
}

#[derive(Clone, Copy)]
struct Scan<'s, 'a>(&'s ScanState<'a>);

impl<'de> DeserializeSeed<'de> for Scan<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Scan<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<(), E> {
        self.0.string(value)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for index in 0.. {
            self.0.path.borrow_mut().push(Segment::Index(index));
            let more = seq.next_element_seed(self)?.is_some();
            self.0.path.borrow_mut().pop();
            if !more {
                break;
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            self.0.path.borrow_mut().push(Segment::Key(key.clone()));
            let field = render(&self.0.path.borrow(), false);
            if let Some(p) = problem(&key, Text::Line, MAX_KEY_CHARS) {
                return Err(self.0.refuse(refusal(&field, p)));
            }
            if !seen.insert(key) {
                let duplicate = ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "duplicate_key",
                    "this key is given twice in one object; give each key once",
                )
                .with_field(field);
                return Err(self.0.refuse(duplicate));
            }
            map.next_value_seed(self)?;
            self.0.path.borrow_mut().pop();
        }
        Ok(())
    }
}

// ---- ePRO submissions ----------------------------------------------------------------------------

/// How the gateway reads a submission's body: its only free text is a free-text answer.
pub const SUBMISSION_BODY: BodyRules = BodyRules { free_text: &["items[].value_string"] };

/// Every string of a questionnaire submission that breaks its field's rule, in field order: the
/// gateway answers the first with 422, the validation consumer rejects the submission with all
/// of them (apps may publish to Kafka directly). The limits are the ones above.
pub fn submission_problems(s: &QuestionnaireResponseSubmitted) -> Vec<(String, Problem)> {
    let e = &s.envelope;
    let mut fields: Vec<(String, Option<&str>, Text, usize)> = vec![
        ("envelope.event_type".into(), Some(&e.event_type), Text::Line, MAX_CODE_CHARS),
        ("envelope.study_id".into(), Some(&e.study_id), Text::Line, MAX_ID_CHARS),
        ("envelope.site_id".into(), e.site_id.as_deref(), Text::Line, MAX_ID_CHARS),
        ("envelope.subject_id".into(), e.subject_id.as_deref(), Text::Line, MAX_ID_CHARS),
        ("envelope.source_system".into(), Some(&e.source_system), Text::Line, MAX_CODE_CHARS),
        ("envelope.actor".into(), e.actor.as_deref(), Text::Line, MAX_NAME_CHARS),
        ("questionnaire".into(), Some(&s.questionnaire), Text::Line, MAX_QUESTIONNAIRE_CHARS),
        ("questionnaire_version".into(), Some(&s.questionnaire_version), Text::Line, MAX_CODE_CHARS),
        ("scheduled_occurrence".into(), s.scheduled_occurrence.as_deref(), Text::Line, MAX_CODE_CHARS),
        ("device_time_zone".into(), Some(&s.device_time_zone), Text::Line, MAX_CODE_CHARS),
    ];
    for (i, item) in s.items.iter().enumerate() {
        fields.push((format!("items[{i}].link_id"), Some(&item.link_id), Text::Line, MAX_CODE_CHARS));
        let answer = item.value_string.as_deref();
        fields.push((format!("items[{i}].value_string"), answer, Text::FreeText, MAX_FREE_TEXT_CHARS));
    }
    fields
        .into_iter()
        .filter_map(|(field, value, text, max)| Some((field, problem(value?, text, max)?)))
        .collect()
}

/// A copy of `s` whose every string is [`storable`] under [`SUBMISSION_BODY`]'s rules (cut to the
/// generic limits), for keeping and announcing a submission refused for its strings. `None` only
/// if the submission does not survive its own JSON form (it always does).
pub fn storable_submission(s: &QuestionnaireResponseSubmitted) -> Option<QuestionnaireResponseSubmitted> {
    fn clean(value: &mut serde_json::Value, path: &mut Vec<Segment>) {
        match value {
            serde_json::Value::String(text) => {
                let free = SUBMISSION_BODY.free_text.contains(&render(path, true).as_str());
                let (kind, max) =
                    if free { (Text::FreeText, MAX_FREE_TEXT_CHARS) } else { (Text::Line, MAX_LINE_CHARS) };
                *text = storable(text, kind, max);
            }
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    path.push(Segment::Index(i));
                    clean(item, path);
                    path.pop();
                }
            }
            serde_json::Value::Object(fields) => {
                for (key, field) in fields.iter_mut() {
                    path.push(Segment::Key(key.clone()));
                    clean(field, path);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    let mut value = serde_json::to_value(s).ok()?;
    clean(&mut value, &mut Vec::new());
    serde_json::from_value(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        items: Vec<Inner>,
        #[serde(default)]
        notes: std::collections::BTreeMap<String, String>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        ratio: i32,
        #[serde(default)]
        comment: Option<String>,
    }

    const RULES: BodyRules = BodyRules { free_text: &["items[].comment"] };

    fn refused(body: &[u8]) -> Option<(u16, &'static str, Option<String>)> {
        parse_body::<Outer>(body, &RULES).err().map(|e| (e.status.as_u16(), e.code, e.field))
    }

    #[test]
    fn json_errors_name_the_field() {
        let err = refused(br#"{"items":[{"ratio":1},{"ratio":"x"}]}"#);
        assert_eq!(err, Some((400, "invalid_json", Some("items[1].ratio".to_string()))));
        assert_eq!(refused(br#"{"items":[], "extra": 1}"#).map(|e| e.0), Some(400));
        assert_eq!(refused(b"{"), Some((400, "invalid_json", None)));
        let err = refused(br#"{"items":[{"ratio":1},{"rat"#);
        assert_eq!(err.and_then(|e| e.2), Some("items[1]".to_string()));
        assert!(refused(br#"{"items":[]} trailing"#).is_some());
        assert!(parse_body::<Outer>(br#"{"items":[{"ratio":1}]}"#, &RULES).is_ok());
    }

    #[test]
    fn hostile_bodies_are_4xx_naming_what_they_can() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let long = format!(r#"{{"items":[],"notes":{{"a":"{}"}}}}"#, "x".repeat(1 << 20));
        type Expected = (u16, &'static str, Option<&'static str>);
        let cases: Vec<(Vec<u8>, Expected)> = vec![
            (
                br#"{"items":[],"notes":{"a":"x\u0000y"}}"#.to_vec(),
                (422, "invalid_characters", Some("notes.a")),
            ),
            (
                br#"{"items":[{"ratio":1,"comment":"a\u007f"}]}"#.to_vec(),
                (422, "invalid_characters", Some("items[0].comment")),
            ),
            (
                br#"{"items":[],"notes":{"a\u0001":"x"}}"#.to_vec(),
                (422, "invalid_characters", Some("notes.a\\u{1}")),
            ),
            (
                br#"{"items":[],"notes":{"a":"line\nbreak"}}"#.to_vec(),
                (422, "invalid_characters", Some("notes.a")),
            ),
            (long.into_bytes(), (422, "too_long", Some("notes.a"))),
            (br#"{"items":[],"notes":{"a":"1","a":"2"}}"#.to_vec(), (400, "duplicate_key", Some("notes.a"))),
            (br#"{"items":[],"items":[]}"#.to_vec(), (400, "duplicate_key", Some("items"))),
            (deep.into_bytes(), (400, "invalid_json", None)),
            (br#"{"items":[{"ratio":1e400}]}"#.to_vec(), (400, "invalid_json", None)),
            (
                br#"{"items":[{"ratio":1180591620717411303424}]}"#.to_vec(),
                (400, "invalid_json", Some("items[0].ratio")),
            ),
            (br#"{"items":[],"notes":{"a":"\ud800"}}"#.to_vec(), (400, "invalid_json", None)),
            (b"{\"items\":[],\"notes\":{\"a\":\"\xff\xfe\"}}".to_vec(), (400, "invalid_json", None)),
            (b"".to_vec(), (400, "invalid_json", None)),
            (br#"{"items":{"ratio":1}}"#.to_vec(), (400, "invalid_json", Some("items"))),
        ];
        for (body, (status, code, field)) in cases {
            let got = refused(&body);
            let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).to_string();
            let Some(got) = got else { panic!("{shown} was accepted") };
            assert_eq!((got.0, got.1), (status, code), "{shown}");
            if field.is_some() {
                assert_eq!(got.2.as_deref(), field, "{shown}");
            }
        }
        // Free text may hold tabs and line breaks, nothing else.
        let ok = br#"{"items":[{"ratio":1,"comment":"two\r\nlines\tand a tab"}]}"#;
        assert!(parse_body::<Outer>(ok, &RULES).is_ok());
    }

    #[test]
    fn strings_are_checked_made_storable_and_printable() {
        assert_eq!(problem("01-701-1015", Text::Line, MAX_ID_CHARS), None);
        assert_eq!(
            problem("ab\u{0}", Text::Line, 64),
            Some(Problem::ControlCharacter { code_point: 0, position: 2 })
        );
        assert_eq!(problem("a\u{85}", Text::FreeText, 64).map(Problem::code), Some("invalid_characters"));
        assert_eq!(problem("a\tb", Text::Line, 64).map(Problem::code), Some("invalid_characters"));
        assert_eq!(problem("a\tb\n", Text::FreeText, 64), None);
        assert_eq!(problem("éé", Text::Line, 1), Some(Problem::TooLong { chars: 2, max: 1 }));
        assert_eq!(storable("a\u{0}b\nc", Text::Line, 4), "a\u{fffd}b\u{fffd}");
        assert_eq!(storable("a\u{0}b\nc", Text::FreeText, 10), "a\u{fffd}b\nc");
        assert_eq!(printable("a\u{0}b"), "a\\u{0}b");
        assert_eq!(printable(&"k".repeat(100)).chars().count(), 65);
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("subject_id", "01-701-1015").is_ok());
        assert!(check_id("study_id", "CDISCPILOT01").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(65)] {
            assert_eq!(check_id("study_id", bad).err().and_then(|e| e.field).as_deref(), Some("study_id"));
        }
    }

    #[test]
    fn instants_may_lead_the_clock_by_the_skew_only() {
        let now = Utc::now();
        let skew = chrono::Duration::minutes(5);
        assert!(check_not_future("occurred_at", now + skew, now, skew).is_ok());
        let err = check_not_future("occurred_at", now + skew + chrono::Duration::seconds(1), now, skew).err();
        assert_eq!(err.map(|e| (e.code, e.field)), Some(("in_the_future", Some("occurred_at".to_string()))));
        let err = check_timestamp_not_future("authored_at", Timestamp(i64::MAX), now, skew).err();
        assert_eq!(err.and_then(|e| e.field).as_deref(), Some("authored_at"));
    }

    #[test]
    fn future_skew_settings_are_bounded() {
        assert_eq!(parse_future_skew(" 0 "), Ok(0));
        assert_eq!(parse_future_skew("86400"), Ok(86_400));
        assert_eq!(parse_future_skew("86401"), Err("must be at most 86400 (a day)".to_string()));
        for bad in ["-1", "soon", "", "99999999999999999999"] {
            assert!(parse_future_skew(bad).is_err(), "{bad}");
        }
    }
}
