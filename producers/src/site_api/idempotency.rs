//! Idempotent commands: a POST retried with the same `Idempotency-Key` gets the first answer back
//! and changes nothing.
//!
//! The key is claimed in the command's own transaction, and the response is stored in that same
//! transaction before it commits. So a key is remembered if and only if the command's rows and
//! events exist: a crash before the commit leaves neither, and the retry runs the command afresh.
//! A command that fails (4xx or 5xx) rolls back and leaves no key behind: the client may correct
//! the request and send it again under the same key.
//!
//! Keys are scoped to the caller (`principal` = the token's user), and tied to the request by the
//! sha256 of its method, path and body bytes: the same key with another request is refused (422
//! `idempotency_key_reused`) rather than silently answered with the other request's response.

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, Postgres, Transaction};
use trialflow_http::ApiError;
use trialflow_http::auth::Principal;
use trialflow_outbox::OutboxEvent;
use trialflow_schemas::Event;

use super::{Api, CommandRequest};

pub const HEADER: &str = "idempotency-key";
/// Set to `true` on a response that answers a retry from the stored first response.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Longest accepted key; UUIDs and ULIDs fit with room to spare.
pub const MAX_KEY_LEN: usize = 255;

/// How long a statement of the API waits for a lock: a retry for a concurrent request holding the
/// same key, a command for a subject another one holds. Then it answers 503 (retry later). A
/// startup parameter of the API's connections (no statement per request); the first request's
/// transaction holds the key only for the time of one command.
pub(crate) const LOCK_TIMEOUT: &str = "5s";

/// The `Idempotency-Key` of a command: 1 to 255 visible ASCII characters.
pub(crate) fn key(headers: &HeaderMap) -> Result<String, ApiError> {
    let required = |message: &str| {
        ApiError::new(StatusCode::BAD_REQUEST, "idempotency_key_required", message)
            .with_field("Idempotency-Key")
    };
    let value = headers.get(HEADER).ok_or_else(|| {
        required("send an `Idempotency-Key` header (e.g. a UUID) with every POST; reuse it when retrying")
    })?;
    let key = value.to_str().map(str::trim).unwrap_or_default();
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(required("`Idempotency-Key` must be 1 to 255 visible ASCII characters"));
    }
    Ok(key.to_string())
}

/// sha256 of what makes two requests the same command.
pub(crate) fn request_hash(method: &Method, path: &str, body: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(method.as_str().as_bytes());
    hash.update(b"\n");
    hash.update(path.as_bytes());
    hash.update(b"\n");
    hash.update(body);
    hex::encode(hash.finalize())
}

/// A command that holds its key: its transaction, to write rows in and queue events on
/// ([`Command::emit`]), then [`Command::finish`]. It keeps the [`Api`] so that neither needs it
/// passed again.
#[derive(Debug)]
pub(crate) struct Command<'a> {
    pub(crate) tx: Transaction<'static, Postgres>,
    api: &'a Api,
    principal: String,
    key: String,
}

/// What [`start`] found.
#[derive(Debug)]
enum Started<'a> {
    /// The key is new: run the command.
    Run(Command<'a>),
    /// The key was used before for this very request: answer with the stored response.
    Replay(StatusCode, serde_json::Value),
}

/// What [`Api::run_once_answer`] answers.
#[derive(Debug)]
pub(crate) enum Answer {
    /// The command ran now and committed: 201 with this body.
    Created(serde_json::Value),
    /// A retry of a committed command: its stored status and body.
    Replayed(StatusCode, serde_json::Value),
}

impl Answer {
    /// The body, to add what is never stored (the code break's treatment).
    pub(crate) fn body_mut(&mut self) -> &mut serde_json::Value {
        match self {
            Answer::Created(body) | Answer::Replayed(_, body) => body,
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self {
            Answer::Created(body) => (StatusCode::CREATED, axum::Json(body)).into_response(),
            Answer::Replayed(status, body) => {
                let mut response = (status, axum::Json(body)).into_response();
                response.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
                response
            }
        }
    }
}

/// Opens the command's transaction and claims `key` for `principal` in it.
async fn start<'a>(
    api: &'a Api,
    principal: &Principal,
    key: String,
    request_hash: String,
) -> Result<Started<'a>, ApiError> {
    let s = &api.schema;
    let mut tx = api.pool.begin().await?;
    // The primary key is the lock: while another transaction holds an uncommitted row with the
    // same (principal, key) — a concurrent retry of the same command — this INSERT waits for it.
    // If that transaction commits, ON CONFLICT DO NOTHING inserts nothing and the SELECT below
    // (a new snapshot, READ COMMITTED) sees its stored response, which we replay; if it rolls
    // back, this INSERT goes through and we run the command ourselves. Either way the command
    // runs once. A wait longer than LOCK_TIMEOUT fails with 55P03, answered 503 (retry later).
    let claimed = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.idempotency (principal, key, request_hash) VALUES ($1, $2, $3)
         ON CONFLICT (principal, key) DO NOTHING"
    )))
    .bind(&principal.user)
    .bind(&key)
    .bind(&request_hash)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if claimed {
        return Ok(Started::Run(Command { tx, api, principal: principal.user.clone(), key }));
    }

    let stored: Option<(String, Option<i32>, Option<serde_json::Value>)> = sqlx::query_as(AssertSqlSafe(
        format!("SELECT request_hash, status, body FROM {s}.idempotency WHERE principal = $1 AND key = $2"),
    ))
    .bind(&principal.user)
    .bind(&key)
    .fetch_optional(&mut *tx)
    .await?;
    // The transaction only read; dropping it rolls it back.
    drop(tx);
    let Some((stored_hash, status, body)) = stored else {
        // Deleted by retention between the two statements: the client's retry will claim it.
        return Err(ApiError::unavailable());
    };
    if stored_hash != request_hash {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was already used for a different request; use a new key for a new request",
        )
        .with_field("Idempotency-Key"));
    }
    let (Some(status), Some(body)) = (status, body) else {
        tracing::error!(user = %principal.user, key, "Committed idempotency key has no stored response.");
        return Err(ApiError::internal());
    };
    let status = u16::try_from(status).ok().and_then(|s| StatusCode::from_u16(s).ok()).ok_or_else(|| {
        tracing::error!(status, key, "Stored idempotent response has an invalid status.");
        ApiError::internal()
    })?;
    tracing::debug!(user = %principal.user, key, %status, "Replaying stored response.");
    Ok(Started::Replay(status, body))
}

impl Api {
    /// Runs a command once per `Idempotency-Key`: claims the key (or answers a retry with the
    /// stored response), lets `run` write rows and events in the command's transaction, and
    /// answers 201 with the body `run` returns, stored under the key in the same commit. An error
    /// from `run` rolls everything back, the key included, so the client may retry.
    pub(crate) async fn run_once(
        &self,
        principal: &Principal,
        key: String,
        request: &CommandRequest,
        run: impl AsyncFnOnce(&mut Command<'_>) -> Result<serde_json::Value, ApiError>,
    ) -> Result<Response, ApiError> {
        Ok(self.run_once_answer(principal, key, request, run).await?.into_response())
    }

    /// [`Api::run_once`], answering before the response is made, so that the caller may add to
    /// the body what must not be stored with the key.
    pub(crate) async fn run_once_answer(
        &self,
        principal: &Principal,
        key: String,
        request: &CommandRequest,
        run: impl AsyncFnOnce(&mut Command<'_>) -> Result<serde_json::Value, ApiError>,
    ) -> Result<Answer, ApiError> {
        let mut command = match start(self, principal, key, request.hash()).await? {
            Started::Run(command) => command,
            Started::Replay(status, body) => return Ok(Answer::Replayed(status, body)),
        };
        let body = run(&mut command).await?;
        command.finish(StatusCode::CREATED, &body).await?;
        Ok(Answer::Created(body))
    }

    /// `event` as an outbox row: encoded with its schema, to the deployed topic of its type.
    pub(crate) fn outbox_event<E: Event>(&self, event: &E, key: &str) -> Result<OutboxEvent, ApiError> {
        Ok(OutboxEvent::avro(event, self.topics.of::<E>(), key)?)
    }
}

impl Command<'_> {
    /// Queues `event` (on its type's topic, under `key`) in the command's transaction, so it is
    /// published if and only if the command commits.
    pub(crate) async fn emit<E: Event>(&mut self, event: &E, key: &str) -> Result<(), ApiError> {
        let event = self.api.outbox_event(event, key)?;
        self.emit_all(std::slice::from_ref(&event)).await
    }

    /// Queues several events, in order, with one statement (see [`Command::emit`]).
    pub(crate) async fn emit_all(&mut self, events: &[OutboxEvent]) -> Result<(), ApiError> {
        self.api.outbox.enqueue_all(&mut self.tx, events).await?;
        Ok(())
    }

    /// Stores the response under the key and commits: rows, events and the key all at once.
    async fn finish(mut self, status: StatusCode, body: &serde_json::Value) -> Result<(), ApiError> {
        let s = &self.api.schema;
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {s}.idempotency SET status = $3, body = $4 WHERE principal = $1 AND key = $2"
        )))
        .bind(&self.principal)
        .bind(&self.key)
        .bind(i32::from(status.as_u16()))
        .bind(body)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_required_and_bounded() {
        let mut headers = HeaderMap::new();
        assert_eq!(key(&headers).map_err(|e| e.code), Err("idempotency_key_required"));
        headers.insert(HEADER, HeaderValue::from_static(" 0b9e-retry-1 "));
        assert_eq!(key(&headers), Ok("0b9e-retry-1".to_string()));
        for bad in ["", "has space", &"k".repeat(MAX_KEY_LEN + 1)] {
            headers.insert(HEADER, HeaderValue::from_str(bad).unwrap_or(HeaderValue::from_static("")));
            assert!(key(&headers).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_hash_covers_method_path_and_body() {
        let h = request_hash(&Method::POST, "/v1/studies", b"{}");
        assert_eq!(h.len(), 64);
        assert_eq!(h, request_hash(&Method::POST, "/v1/studies", b"{}"));
        assert_ne!(h, request_hash(&Method::PUT, "/v1/studies", b"{}"));
        assert_ne!(h, request_hash(&Method::POST, "/v1/studies/x/sites", b"{}"));
        assert_ne!(h, request_hash(&Method::POST, "/v1/studies", b"{ }"));
    }
}
