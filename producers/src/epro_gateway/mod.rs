//! The ePRO ingestion gateway: how patient apps, which cannot speak Kafka, put questionnaire
//! responses on the event log.
//!
//! | route | auth | answers |
//! |-------|------|---------|
//! | `POST /v1/submissions` | `Authorization: Bearer <app token>` | 202 once the broker acknowledged |
//! | `GET /healthz` | none | 200 (liveness; the broker is not probed) |
//! | `GET /openapi.json` | none | 200, the gateway's OpenAPI 3.1 document ([`OPENAPI_DOCUMENT`]) |
//!
//! **The contract.** The body is the JSON form of `QuestionnaireResponseSubmitted`
//! (`schemas/avro/epro/QuestionnaireResponseSubmitted.avsc`): the schema's field names, the
//! `envelope` included; timestamps as Avro `timestamp-micros` integers (microseconds since the Unix
//! epoch, UTC); `status` as one of the schema's symbols (`COMPLETED`, ...); ids as hyphenated
//! UUIDs. `submission_id` and `envelope.event_id` are the app's: a resubmission carries the same
//! ones. At most [`MAX_BODY_BYTES`] (256 KiB). The event is published, Avro single-object encoded,
//! to `epro.submissions.v1` (behind `TOPIC_PREFIX`), keyed by `envelope.subject_id`, with the
//! headers `event_id`, `event_type`, `content-type`, [`RECEIVED_AT_HEADER`] (when the gateway
//! received it, RFC 3339 UTC with microseconds: the validation consumer compares it with
//! `authored_at` to recognise late offline syncs) and `traceparent` when the request is traced.
//! The answer is `202 {"submission_id", "event_id", "partition", "offset"}`.
//!
//! **What is checked here, and what is not.** The gateway checks shape only, what it needs to key,
//! route, encode and store the event: the JSON fits the type (400 `invalid_json` naming the field
//! path; a key given twice is 400 `duplicate_key`); every string passes
//! [`trialflow_http::input::submission_problems`] (422 `invalid_characters`: no control character, except
//! tabs and line breaks in `items[i].value_string`; 422 `too_long`: ids 64 characters, the
//! questionnaire 256, codes and link ids 64, a free-text answer 2,000 — the validation consumer
//! rejects what breaks them with `INVALID_CHARACTERS` / `TEXT_TOO_LONG` when an app publishes
//! directly); `authored_at`, `envelope.occurred_at` and `envelope.recorded_at` lie at most
//! `EPRO_GATEWAY_MAX_FUTURE_SKEW_SECS` (default 300) ahead of the gateway's clock — a replay's
//! virtual clock when one drives it (422 `in_the_future`); and (422 `validation_failed` naming
//! the field) `envelope.event_type` is
//! `QuestionnaireResponseSubmitted`; `envelope.study_id`, `envelope.subject_id` (the key),
//! `questionnaire` and `questionnaire_version` are not empty; `device_time_zone` is an IANA zone;
//! every `items[i].link_id` is not empty and every answer has exactly one `value_*`. It does NOT
//! check that the study, subject or questionnaire exist, that answers are in range, that the
//! response is within its window or that it is not a duplicate: those need the study's state and
//! are the ePRO validation consumer's, which accepts or rejects each submission with a reason
//! (`QuestionnaireResponseAccepted` / `Rejected`). A 202 means "safely on the log", not "valid".
//!
//! **Why 202 only after the acknowledgement.** An app may delete its local copy once it has a
//! 202. Answering before the broker acknowledged (`acks=all`, idempotent producer) would lose the
//! response if the gateway then crashed, so the gateway keeps nothing: no queue, no disk, no
//! database. When the broker does not acknowledge within the ack timeout the answer is 503, and
//! retrying is safe even if the record did land: the validation consumer treats a resubmission
//! with the same ids as an exact duplicate. A full local producer queue is also 503, at once: the
//! gateway sheds load rather than buffer without bound.
//!
//! **Errors** are the site API's body, `{"error": {"code", "message", "field"?}}` (see
//! [`ApiError`]): 400 `invalid_json` / `duplicate_key` / `invalid_body`, 401 `unauthenticated`,
//! 404 `not_found`, 413 `payload_too_large`, 422 `validation_failed` / `invalid_characters` /
//! `too_long` / `in_the_future`, 429 `rate_limited` (with `Retry-After`), 503 `unavailable` (with
//! `Retry-After`; retry the same submission) / `timeout` (the request took longer than
//! `HTTP_REQUEST_TIMEOUT_MS`: retry the same submission; one cut after the producer took it may
//! still be published, and the retry is then an exact duplicate), 500 `internal`. The rate limits
//! and the timeout are [`trialflow_http::limits`]'s; keep the timeout above
//! `EPRO_GATEWAY_ACK_TIMEOUT_MS`, so that an unacknowledged submission is answered `unavailable`.

pub mod auth;
pub mod config;
pub mod error;
pub mod publish;
pub mod submission;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{MethodRouter, get, post};
use rdkafka::producer::{FutureProducer, Producer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use config::{EproGatewayArgs, EproGatewayConfig};
pub use error::EproGatewayError;
pub use publish::producer_config;

use trialflow_http::ApiError;
use trialflow_http::input;
use trialflow_http::limits::{self, Limiter};

/// The service's name.
pub const NAME: &str = "epro-gateway";

/// Every route the router serves (method, template): the router is built from this table (see
/// `endpoint`), the OpenAPI test checks the document against it, the hostile-HTTP test attacks
/// each.
pub const ROUTES: &[(&str, &str)] =
    &[("POST", "/v1/submissions"), ("GET", "/healthz"), ("GET", "/openapi.json")];

/// The gateway's OpenAPI 3.1 document, written by hand (`producers/openapi/epro-gateway.json`)
/// and checked by the OpenAPI test (`trialflow/tests/openapi.rs`) against [`ROUTES`] and the
/// gateway's answers.
pub const OPENAPI_DOCUMENT: &str = include_str!("../../openapi/epro-gateway.json");

/// The largest body `POST /v1/submissions` takes (413 beyond).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Kafka header with the instant the gateway received a submission (RFC 3339 UTC, microseconds).
pub const RECEIVED_AT_HEADER: &str = "received_at";

/// Submissions answered, by status.
pub const REQUESTS_TOTAL: &str = "trialflow_epro_gateway_requests_total";
/// Time from handing a submission to the producer to the broker's acknowledgement.
pub const ACK_SECONDS: &str = "trialflow_epro_gateway_ack_seconds";

/// Registers the gateway's metric descriptions with the installed recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(REQUESTS_TOTAL, "Submissions answered by the ePRO gateway, by status.");
    metrics::describe_histogram!(
        ACK_SECONDS,
        metrics::Unit::Seconds,
        "Time from producing a submission to the broker's acknowledgement (acknowledged ones only)."
    );
}

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct Gateway {
    pub(crate) auth: trialflow_http::auth::Authenticator,
    pub(crate) publisher: publish::Publisher,
    pub(crate) clock: trialflow_http::clock::Clock,
    /// How far a stated instant may lead `clock`.
    pub(crate) max_future_skew: chrono::Duration,
}

/// The gateway, bound to its address with its producer created; [`EproGateway::run`] serves it.
pub struct EproGateway {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
    producer: FutureProducer,
    ack_timeout: Duration,
}

impl std::fmt::Debug for EproGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EproGateway").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl EproGateway {
    /// Binds the listener (port 0 picks a free one) and creates the producer. A cluster that
    /// refuses the connection for good (SASL authentication, TLS, a security protocol its listener
    /// does not speak) is an error ([`trialflow_outbox::kafka::check_connection`]); a gateway
    /// whose broker is away starts, and answers 503.
    pub async fn bind(config: EproGatewayConfig) -> Result<Self, EproGatewayError> {
        if config.ack_timeout_ms == 0 {
            return Err(EproGatewayError::Config("ack_timeout_ms must be at least 1".to_string()));
        }
        let auth = trialflow_http::auth::Authenticator::start(
            &auth::app_grants(&config.tokens),
            config.oidc.as_ref(),
        )
        .await
        .map_err(EproGatewayError::Config)?;
        if !auth.accepts_anyone() {
            tracing::warn!(
                "No app tokens and no identity provider configured: every submission will get 401."
            );
        }
        let producer: FutureProducer =
            producer_config(&config).create().map_err(EproGatewayError::Producer)?;
        trialflow_outbox::kafka::check_connection(
            &config.kafka,
            trialflow_outbox::kafka::ClientKind::Producer,
        )
        .await
        .map_err(EproGatewayError::Kafka)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| EproGatewayError::Bind { addr: config.listen, source })?;
        let local_addr =
            listener.local_addr().map_err(|source| EproGatewayError::Bind { addr: config.listen, source })?;
        describe_metrics();
        let gateway = Arc::new(Gateway {
            auth,
            publisher: publish::Publisher::new(producer.clone(), &config),
            clock: config.clock.clone(),
            max_future_skew: chrono::Duration::seconds(
                i64::try_from(config.max_future_skew_secs).unwrap_or(i64::MAX / 1_000_000),
            ),
        });
        Ok(Self {
            listener,
            local_addr,
            router: router(gateway, Limiter::new(NAME, &config.limits)),
            producer,
            ack_timeout: Duration::from_millis(config.ack_timeout_ms),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled, then lets requests in flight finish (each waits at
    /// most the ack timeout) and flushes what the producer still holds, the records of requests
    /// whose client hung up.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), EproGatewayError> {
        tracing::info!(addr = %self.local_addr, "ePRO gateway listening.");
        // With the peer's address: the per-address rate limit is keyed by it.
        axum::serve(self.listener, self.router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(EproGatewayError::Serve)?;
        let (producer, timeout) = (self.producer, self.ack_timeout);
        match tokio::task::spawn_blocking(move || producer.flush(timeout)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "Records left unacknowledged at shutdown."),
            Err(error) => tracing::warn!(%error, "Producer flush did not finish."),
        }
        tracing::info!("ePRO gateway stopped.");
        Ok(())
    }
}

fn router(gateway: Arc<Gateway>, limiter: Arc<Limiter>) -> Router {
    ROUTES
        .iter()
        .fold(Router::new(), |router, &(method, path)| router.route(path, endpoint(method, path)))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(middleware::from_fn(input::guard_request))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(|request: Request, next: Next| {
            input::refuse_oversized(request, next, MAX_BODY_BYTES)
        }))
        .layer(middleware::from_fn_with_state(limiter, limits::enforce))
        .with_state(gateway)
}

/// The handler of each route of [`ROUTES`]. The router is built from that table, so a route is
/// served only if it is listed (and, through the OpenAPI test, documented).
fn endpoint(method: &str, path: &str) -> MethodRouter<Arc<Gateway>> {
    match (method, path) {
        // Only submissions are counted: probes would swamp the figures.
        ("POST", "/v1/submissions") => post(submission::submit).route_layer(middleware::from_fn(track)),
        ("GET", "/healthz") => get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        ("GET", "/openapi.json") => get(|| async { crate::site_api::openapi::serve(OPENAPI_DOCUMENT) }),
        _ => unreachable!("{method} {path} is listed in ROUTES without a handler"),
    }
}

/// Request metrics and the request span (whose trace context the published record carries).
async fn track(request: Request, next: Next) -> Response {
    let span = tracing::info_span!("epro_gateway_request", method = %request.method());
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    metrics::counter!(REQUESTS_TOTAL, "status" => status.to_string()).increment(1);
    span.in_scope(|| tracing::debug!(status, "Answered submission."));
    response
}
