//! What a request that did not succeed gets back: [`ApiError`], the body every trialflow HTTP
//! service answers with, and how database, outbox and codec failures map to it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A request that did not succeed, answered as
/// `{"error": {"code": "...", "message": "...", "field": "..."}}` (`field` only when one input is
/// to blame). Codes are stable and machine-readable; messages are for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Path of the offending input, e.g. `arms[1].ratio` or `criteria.INC01`.
    pub field: Option<String>,
    /// Why a token was refused (401 only), e.g. `token_expired`.
    pub reason: Option<&'static str>,
    /// A 401 that asks for a fresh sign-in at the identity provider: the most seconds since it
    /// that the request accepts (RFC 9470 step-up, `max_age` of the challenge).
    pub max_auth_age: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None, reason: None, max_auth_age: None }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// 422: the request is well-formed but breaks a business rule.
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", message).with_field(field)
    }

    /// 400: the body is not JSON of the expected shape.
    pub fn invalid_json(field: Option<String>, message: impl Into<String>) -> Self {
        Self { field, ..Self::new(StatusCode::BAD_REQUEST, "invalid_json", message) }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send a valid token as `Authorization: Bearer <token>`",
        )
    }

    /// 401 with the reason a bearer token was refused (`token_expired`, `wrong_audience`, ...).
    pub fn unauthenticated_because(reason: &'static str, message: impl Into<String>) -> Self {
        Self { reason: Some(reason), ..Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message) }
    }

    /// 401 `authentication_too_old`: the request needs a sign-in at the identity provider at most
    /// `max_age_secs` ago (the token's `auth_time`). The challenge is RFC 9470's
    /// `error="insufficient_user_authentication"` with `max_age`, which a client passes on to the
    /// provider's authorization request to get such a token.
    pub fn authentication_too_old(max_age_secs: u64, message: impl Into<String>) -> Self {
        Self {
            max_auth_age: Some(max_age_secs),
            ..Self::unauthenticated_because("authentication_too_old", message)
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 403: a study, site or subject outside the caller's token's scope.
    pub fn out_of_scope(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "out_of_scope", message)
    }

    /// 503: try again later (the database is unreachable, busy, or a lock wait timed out).
    pub fn unavailable() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the service is unavailable; retry later")
    }

    /// 429: the caller sent more requests than its limit allows (see [`crate::limits`], which
    /// adds `Retry-After`).
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
    }

    /// 503: the request took longer than the request timeout and was stopped (see
    /// [`crate::limits`]).
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", message)
    }

    /// 500. The cause is logged, never sent.
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
                reason: self.reason,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match self.status {
            // RFC 6750: a token was sent and refused, or none was sent.
            StatusCode::UNAUTHORIZED => {
                let challenge = match (self.reason, self.max_auth_age) {
                    (Some(reason), Some(max_age)) => HeaderValue::from_str(&format!(
                        "Bearer error=\"insufficient_user_authentication\", \
                         error_description=\"{reason}\", max_age=\"{max_age}\""
                    ))
                    .unwrap_or(HeaderValue::from_static("Bearer error=\"insufficient_user_authentication\"")),
                    (Some(reason), None) => HeaderValue::from_str(&format!(
                        "Bearer error=\"invalid_token\", error_description=\"{reason}\""
                    ))
                    .unwrap_or(HeaderValue::from_static("Bearer error=\"invalid_token\"")),
                    (None, _) => HeaderValue::from_static("Bearer"),
                };
                headers.insert(header::WWW_AUTHENTICATE, challenge);
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// PostgreSQL error classes that pass on retry: connection exceptions (08), serialization
/// failures and deadlocks (40001, 40P01), a lock wait that timed out (55P03), insufficient
/// resources (53), and the server shutting down or restarting (57P01-57P03).
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03")
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        let transient = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::BeginFailed => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|c| transient_sqlstate(&c)),
            _ => false,
        };
        if transient {
            tracing::warn!(error = %e, "Database unavailable; answering 503.");
            Self::unavailable()
        } else {
            tracing::error!(error = %e, "Database error; answering 500.");
            Self::internal()
        }
    }
}

impl From<trialflow_outbox::OutboxError> for ApiError {
    fn from(e: trialflow_outbox::OutboxError) -> Self {
        match e {
            trialflow_outbox::OutboxError::Database(e) => e.into(),
            // Nothing was written: the command's transaction rolls back with this answer.
            trialflow_outbox::OutboxError::TooLarge { event_type, bytes, limit, .. } => {
                tracing::warn!(event_type, bytes, limit, "Event too large for the event log; answering 413.");
                Self::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "event_too_large",
                    format!(
                        "the {event_type} event this request makes would be {bytes} bytes; the event log \
                         takes at most {limit}: send less in one request (e.g. split a shipment)"
                    ),
                )
            }
            other => {
                tracing::error!(error = %other, "Outbox error; answering 500.");
                Self::internal()
            }
        }
    }
}

impl From<trialflow_schemas::CodecError> for ApiError {
    fn from(e: trialflow_schemas::CodecError) -> Self {
        tracing::error!(error = %e, "Event does not encode with its schema; answering 500.");
        Self::internal()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_and_contention_errors_are_retryable() {
        for code in ["08006", "08001", "40001", "40P01", "55P03", "57P01", "53300"] {
            assert!(transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "22P02"] {
            assert!(!transient_sqlstate(code), "{code}");
        }
        assert_eq!(ApiError::from(sqlx::Error::PoolTimedOut).status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ApiError::from(sqlx::Error::RowNotFound).code, "internal");
    }

    #[test]
    fn an_event_too_large_for_the_log_is_413() {
        let e = trialflow_outbox::OutboxError::TooLarge {
            topic: "supply.kit-inventory.v1".into(),
            event_type: "KitsReceived".into(),
            bytes: 2_000_000,
            limit: 921_600,
        };
        let answer = ApiError::from(e);
        assert_eq!((answer.status, answer.code), (StatusCode::PAYLOAD_TOO_LARGE, "event_too_large"));
        assert!(answer.message.contains("2000000"), "{}", answer.message);
    }
}
