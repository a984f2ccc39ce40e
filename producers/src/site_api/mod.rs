//! The site API: the HTTP service site staff, pharmacists and EDC integrations use to set up studies
//! and sites, screen subjects, record consent, request enrollment, withdraw subjects and receive kit
//! shipments.
//!
//! Every command (a POST) writes its rows and its outbox events in ONE transaction, together with
//! its `Idempotency-Key` and the response (see [`idempotency`]), and answers 201 with the ids it
//! created. The API records what sites report; the consumers decide what follows (an enrollment
//! request with missing strata or without consent is recorded, and the enrollment consumer puts the
//! subject on hold with a reason).
//!
//! | route | roles | writes | events (topic, key) |
//! |-------|-------|--------|---------------------|
//! | `POST /v1/studies` | admin | study, arms, factors, criteria, kit types | StudyConfigured (`studies.configuration.v1`, study id) |
//! | `GET /v1/studies/{study_id}` | any | – | – |
//! | `POST /v1/studies/{study_id}/sites` | admin | site | none: there is no site event; consumers learn a site from the events that name it |
//! | `POST /v1/studies/{study_id}/sites/{site_id}/shipments` | pharmacist, admin | shipment, kits | KitsReceived (`supply.kit-inventory.v1`, site id) |
//! | `GET /v1/studies/{study_id}/sites/{site_id}/kits` | site_staff, pharmacist, admin | – | – |
//! | `POST /v1/studies/{study_id}/subjects` | site_staff, admin | subject, eligibility results | SubjectScreened, EligibilityAssessed (`enrollment.subject-lifecycle.v1`, subject id) |
//! | `POST .../subjects/{subject_id}/consent` | site_staff, admin | consent | ConsentSigned (same) |
//! | `POST .../subjects/{subject_id}/enrollment-requests` | site_staff, admin | enrollment request | EnrollmentRequested (same) |
//! | `POST .../subjects/{subject_id}/withdrawal` | site_staff, admin | subject | SubjectWithdrawn (same) |
//! | `POST .../subjects/{subject_id}/code-break` | investigator, signed in recently | – (its audit record) | CodeBroken (same; no treatment): see [`code_break`] |
//! | `GET /v1/audit` | any (blinded roles: the blinded view) | – | – |
//! | `GET /v1/queries?study_id=&site_id=&status=&limit=` | site_staff, investigator, admin (their sites' queries) | – | – |
//! | `POST /v1/queries/{query_id}/answer` | site_staff, investigator, admin | – (its audit record) | QueryAnswered (`risk.queries.v1`, query id): see [`queries`] |
//!
//! **Audit trail.** Every command also appends its audit record (who, what with old → new, why,
//! caused by its `Idempotency-Key`) to the schema's audit trail in its transaction (see
//! `trialflow_outbox::audit`); `GET /v1/audit` reads the trails ([`audit`]).
//!
//! `GET /healthz` (liveness, no auth) and `GET /readyz` (database reachable, no auth) are for probes.
//! `GET /openapi.json` (no auth) is the API's OpenAPI 3.1 document (see [`openapi`]).
//!
//! **Blinding.** Site staff and researchers are blinded: they never get arms, ratios or a kit's arm
//! (the keys are left out of the JSON, not nulled). The randomization seed is concealed from every
//! role; it leaves the service only in StudyConfigured on the restricted topic.
//!
//! **Time.** A command may carry `occurred_at` (RFC 3339), the envelope's `occurred_at`, so replays
//! can run on a virtual clock; it defaults to now. `recorded_at` is always the real clock.
//!
//! A stated `occurred_at` (and a consent's `signed_at`) may lie at most
//! `SITE_API_MAX_FUTURE_SKEW_SECS` (default 300) ahead of the server's clock.
//!
//! **What is refused before anything is written** (see [`trialflow_http::input`]): control characters in
//! any string of a body, path segment or query parameter (free text — a criterion's description,
//! a withdrawal's reason — may hold tabs and line breaks), strings beyond their limit, a key given
//! twice in one object, bodies beyond [`MAX_BODY_BYTES`], instants too far in the future.
//!
//! **Errors** are `{"error": {"code", "message", "field"?}}`, see [`ApiError`]: 400
//! `invalid_json` / `duplicate_key` / `invalid_body` / `idempotency_key_required`, 401
//! `unauthenticated`, 403 `forbidden`, 404 `not_found`, 409 conflicts, 413 `payload_too_large`
//! (a body beyond [`MAX_BODY_BYTES`], or events too large for the event log), 422
//! `validation_failed` / `invalid_characters` / `too_long` / `in_the_future` /
//! `idempotency_key_reused`, 429 `rate_limited` (with `Retry-After`), 503 `unavailable` (retry
//! with the same key) / `queries_unavailable` (no risk schema linked) / `timeout` (the request
//! took longer than `HTTP_REQUEST_TIMEOUT_MS` and was stopped, its transaction rolled back; retry
//! with the same key), 500 `internal`. The rate limits
//! and the timeout are [`trialflow_http::limits`]'s.

pub mod audit;
pub mod code_break;
pub mod config;
pub mod error;
pub mod idempotency;
pub mod kits;
pub mod openapi;
pub mod queries;
pub mod read;
pub mod studies;
pub mod subjects;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use trialflow_http::ApiError;
use trialflow_http::auth::{Authenticator, HasAuth};
use trialflow_http::input::{self, BodyRules};
use trialflow_http::limits::{self, Limiter};
use trialflow_outbox::{AuditRecord, Outbox, SchemaName};
use trialflow_schemas::Timestamp;
use trialflow_schemas::topics::TopicNames;

pub use config::{SiteApiArgs, SiteApiConfig};
pub use error::SiteApiError;

/// The service's name in the registry of services.
pub const NAME: &str = "site-api";
/// The default service schema (and outbox source) of the site API.
pub const SCHEMA: &str = "site_api";
/// `source_system` of every event the API writes.
pub const SOURCE_SYSTEM: &str = NAME;

/// Requests answered, by route template and status.
pub const REQUESTS_TOTAL: &str = "trialflow_site_api_requests_total";
/// Time to answer a request, by route template.
pub const REQUEST_DURATION_SECONDS: &str = "trialflow_site_api_request_duration_seconds";

/// A statement with some of its parameters bound, for helpers that bind the shared ones.
pub(crate) type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// How long a request waits for a database connection before answering 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest body a command takes (413 beyond): a shipment of
/// [`kits::MAX_KITS_PER_SHIPMENT`] kits fits.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// Longest study title.
pub const MAX_TITLE_CHARS: usize = input::MAX_LINE_CHARS;
/// Longest sex as the source codes it (`F`, `M`, `UNDIFFERENTIATED`).
pub const MAX_SEX_CHARS: usize = 32;
/// The free-text fields of the bodies; every other string is single-line.
pub const BODY_RULES: BodyRules =
    BodyRules { free_text: &["eligibility.criteria[].description", "reason", "answer"] };

/// Every route the router serves (method, template): the router is built from this table (see
/// `endpoint`), the OpenAPI test checks the document against it, the hostile-HTTP test attacks
/// each.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/studies"),
    ("GET", "/v1/studies/{study_id}"),
    ("POST", "/v1/studies/{study_id}/sites"),
    ("POST", "/v1/studies/{study_id}/sites/{site_id}/shipments"),
    ("GET", "/v1/studies/{study_id}/sites/{site_id}/kits"),
    ("POST", "/v1/studies/{study_id}/subjects"),
    ("POST", "/v1/studies/{study_id}/subjects/{subject_id}/consent"),
    ("POST", "/v1/studies/{study_id}/subjects/{subject_id}/enrollment-requests"),
    ("POST", "/v1/studies/{study_id}/subjects/{subject_id}/withdrawal"),
    ("POST", "/v1/studies/{study_id}/subjects/{subject_id}/code-break"),
    ("GET", "/v1/audit"),
    ("GET", "/v1/queries"),
    ("POST", "/v1/queries/{query_id}/answer"),
];

pub fn schema() -> SchemaName {
    SchemaName::new(SCHEMA).unwrap_or_else(|_| unreachable!("`site_api` is a valid schema name"))
}

/// Creates the site API's schema: its outbox and its tables. Idempotent.
pub async fn migrate(database_url: &str, schema: &SchemaName) -> trialflow_outbox::Result<()> {
    trialflow_outbox::migrate_service(database_url, schema, sqlx::migrate!("./migrations/site_api")).await
}

/// Registers the API's metric descriptions with the installed recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(REQUESTS_TOTAL, "Requests answered by the site API, by route and status.");
    metrics::describe_histogram!(
        REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time the site API took to answer a request, by route."
    );
}

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct Api {
    pub(crate) pool: PgPool,
    pub(crate) outbox: Outbox,
    pub(crate) schema: SchemaName,
    pub(crate) topics: TopicNames,
    pub(crate) auth: Authenticator,
    /// How far a stated instant may lead the server's clock.
    pub(crate) max_future_skew: chrono::Duration,
    /// The audit trails `GET /v1/audit` reads: this schema's first.
    pub(crate) audit_sources: Vec<audit::AuditSource>,
    /// Where the code break reads treatments (none: the code break answers 503).
    pub(crate) treatments: Option<Arc<dyn code_break::TreatmentRecords>>,
    /// The oldest sign-in a code break accepts, seconds.
    pub(crate) code_break_max_auth_age_secs: u64,
    /// The risk service's schema, whose data queries `/v1/queries` reads (none: 503).
    pub(crate) queries: Option<SchemaName>,
}

impl HasAuth for Api {
    fn auth(&self) -> &Authenticator {
        &self.auth
    }
}

impl Api {
    /// The envelope's `occurred_at`: the request's (RFC 3339, at most the skew ahead of now), or
    /// now.
    pub(crate) fn occurred_at(&self, given: Option<&str>) -> Result<Timestamp, ApiError> {
        let at = occurred_at(given)?;
        if given.is_some() {
            self.not_in_future("occurred_at", at)?;
        }
        Ok(at)
    }

    /// 422 `in_the_future` when `at` leads the server's clock by more than the skew.
    pub(crate) fn not_in_future(&self, field: &str, at: Timestamp) -> Result<(), ApiError> {
        input::check_timestamp_not_future(field, at, chrono::Utc::now(), self.max_future_skew)
    }
}

/// The site API, bound to its address and connected to its database; [`SiteApi::run`] serves it.
#[derive(Debug)]
pub struct SiteApi {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
    pool: PgPool,
}

impl SiteApi {
    /// Binds the listener (port 0 picks a free one) and connects the database pool. Fails when
    /// the schema is not migrated. `GET /v1/audit` reads the API's own audit trail only, and the
    /// code break and the data queries are unavailable (503).
    pub async fn bind(config: SiteApiConfig) -> Result<Self, SiteApiError> {
        Self::bind_linked(config, Links::default()).await
    }

    /// [`SiteApi::bind`], reading the other services' records `links` names.
    pub async fn bind_linked(config: SiteApiConfig, links: Links) -> Result<Self, SiteApiError> {
        let Links { audit_sources: others, treatments, queries } = links;
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = config.tokens.iter().find(|g| !seen.insert(g.token.as_str())) {
            return Err(SiteApiError::Config(format!("a token of `{}` is given twice", dup.user)));
        }
        let auth =
            Authenticator::start(&config.tokens, config.oidc.as_ref()).await.map_err(SiteApiError::Config)?;
        if !auth.accepts_anyone() {
            tracing::warn!(
                "No API tokens and no identity provider configured: every request except the probes will get 401."
            );
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| SiteApiError::Bind { addr: config.listen, source })?;
        let local_addr =
            listener.local_addr().map_err(|source| SiteApiError::Bind { addr: config.listen, source })?;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(
                trialflow_outbox::DatabaseConfig::connect_options_for(&config.database_url)?
                    .options([("lock_timeout", idempotency::LOCK_TIMEOUT)]),
            )
            .await?;
        let outbox = Outbox::open(&pool, config.schema.clone()).await?;
        describe_metrics();
        let audit_sources = audit_sources(&config.schema, others);
        let api = Arc::new(Api {
            pool: pool.clone(),
            outbox,
            schema: config.schema,
            topics: config.topics,
            auth,
            max_future_skew: chrono::Duration::seconds(
                i64::try_from(config.max_future_skew_secs).unwrap_or(i64::MAX / 1_000_000),
            ),
            audit_sources,
            treatments,
            code_break_max_auth_age_secs: config.code_break_max_auth_age_secs,
            queries,
        });
        let limiter = Limiter::new(NAME, &config.limits);
        Ok(Self { listener, local_addr, router: router(api, limiter), pool })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled, then lets requests in flight finish and closes the
    /// pool. A request cut off by a crash instead rolls back: nothing half-written remains.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SiteApiError> {
        tracing::info!(addr = %self.local_addr, "Site API listening.");
        // With the peer's address: the per-address rate limit is keyed by it.
        axum::serve(self.listener, self.router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(SiteApiError::Serve)?;
        self.pool.close().await;
        tracing::info!("Site API stopped.");
        Ok(())
    }
}

/// What the site API reads of other services' records (in the same database).
#[derive(Debug, Default)]
pub struct Links {
    /// The trails `GET /v1/audit` reads too (the other services' schemas, from the registry of
    /// services), after the API's own.
    pub audit_sources: Vec<audit::AuditSource>,
    /// The randomization records the code break reads treatments from.
    pub treatments: Option<Arc<dyn code_break::TreatmentRecords>>,
    /// The risk service's schema: the data queries sites see and answer (`/v1/queries`).
    pub queries: Option<SchemaName>,
}

/// The API's own trail first, then each other one once.
fn audit_sources(own: &SchemaName, others: Vec<audit::AuditSource>) -> Vec<audit::AuditSource> {
    let mut sources = vec![audit::AuditSource { service: NAME.to_string(), schema: own.clone() }];
    for source in others {
        if !sources.iter().any(|s| s.schema == source.schema) {
            sources.push(source);
        }
    }
    sources
}

fn router(api: Arc<Api>, limiter: Arc<Limiter>) -> Router {
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
        .layer(middleware::from_fn(track))
        .with_state(api)
}

/// The handler of each route of [`ROUTES`]. The router is built from that table, so a route is
/// served only if it is listed (and, through the OpenAPI test, documented).
fn endpoint(method: &str, path: &str) -> MethodRouter<Arc<Api>> {
    match (method, path) {
        ("GET", "/healthz") => get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        ("GET", "/readyz") => get(ready),
        ("GET", "/openapi.json") => get(|| async { openapi::serve(openapi::DOCUMENT) }),
        ("POST", "/v1/studies") => post(studies::create_study),
        ("GET", "/v1/studies/{study_id}") => get(studies::get_study),
        ("POST", "/v1/studies/{study_id}/sites") => post(studies::create_site),
        ("POST", "/v1/studies/{study_id}/sites/{site_id}/shipments") => post(kits::receive_shipment),
        ("GET", "/v1/studies/{study_id}/sites/{site_id}/kits") => get(kits::list_kits),
        ("POST", "/v1/studies/{study_id}/subjects") => post(subjects::screen_subject),
        ("POST", "/v1/studies/{study_id}/subjects/{subject_id}/consent") => post(subjects::sign_consent),
        ("POST", "/v1/studies/{study_id}/subjects/{subject_id}/enrollment-requests") => {
            post(subjects::request_enrollment)
        }
        ("POST", "/v1/studies/{study_id}/subjects/{subject_id}/withdrawal") => {
            post(subjects::withdraw_subject)
        }
        ("POST", "/v1/studies/{study_id}/subjects/{subject_id}/code-break") => post(code_break::break_code),
        ("GET", "/v1/audit") => get(audit::list_audit),
        ("GET", "/v1/queries") => get(queries::list_queries),
        ("POST", "/v1/queries/{query_id}/answer") => post(queries::answer_query),
        _ => unreachable!("{method} {path} is listed in ROUTES without a handler"),
    }
}

async fn ready(State(api): State<Arc<Api>>) -> Result<StatusCode, ApiError> {
    sqlx::query("SELECT 1").execute(&api.pool).await?;
    Ok(StatusCode::OK)
}

/// Request metrics and the request span (whose trace context the outbox rows carry).
async fn track(request: Request, next: Next) -> Response {
    // The route template, not the path: bounded label values, never a subject id.
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let span = tracing::info_span!("site_api_request", method = %request.method(), route);
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    metrics::counter!(REQUESTS_TOTAL, "route" => route.clone(), "status" => status.to_string()).increment(1);
    metrics::histogram!(REQUEST_DURATION_SECONDS, "route" => route).record(started.elapsed().as_secs_f64());
    span.in_scope(|| tracing::debug!(status, "Answered request."));
    response
}

/// The raw parts of a command: its headers (caller, key), method and path, and the body bytes,
/// kept as sent because the idempotency hash covers them.
#[derive(Debug)]
pub(crate) struct CommandRequest {
    headers: HeaderMap,
    method: Method,
    path: String,
    body: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for CommandRequest {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Response> {
        let headers = request.headers().clone();
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| input::body_error(rejection, MAX_BODY_BYTES).into_response())?;
        Ok(Self { headers, method, path, body })
    }
}

impl CommandRequest {
    /// The `Idempotency-Key` (400 without one).
    pub(crate) fn key(&self) -> Result<String, ApiError> {
        idempotency::key(&self.headers)
    }

    /// The body as `T` (see [`input::parse_body`]: 422 for a string that cannot be taken, 400
    /// naming the field that does not fit).
    pub(crate) fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        input::parse_body(&self.body, &BODY_RULES)
    }

    /// The key, then the body as `T`: in this order, so a request that lacks a key is told so
    /// whatever its body.
    pub(crate) fn parse<T: DeserializeOwned>(&self) -> Result<(String, T), ApiError> {
        let key = self.key()?;
        Ok((key, self.json()?))
    }

    pub(crate) fn hash(&self) -> String {
        idempotency::request_hash(&self.method, &self.path, &self.body)
    }

    /// An audit record of this command by `principal` (who, through the site API), caused by its
    /// `Idempotency-Key`; the handler adds what changed and why.
    pub(crate) fn audit(
        &self,
        principal: &trialflow_http::auth::Principal,
        action: &str,
        entity_type: &str,
        entity_id: &str,
    ) -> AuditRecord {
        let record =
            AuditRecord::by_person(&principal.user, principal.role.as_str(), action, entity_type, entity_id);
        match self.key() {
            Ok(key) => record.cause(format!("request:{key}")),
            Err(_) => record,
        }
    }
}

impl Api {
    /// Appends `record` to the service's audit trail in the command's transaction: it exists if
    /// and only if the change does.
    pub(crate) async fn audit(
        &self,
        conn: &mut sqlx::PgConnection,
        record: AuditRecord,
    ) -> Result<(), ApiError> {
        trialflow_outbox::audit::append(conn, &self.schema, &[record]).await?;
        Ok(())
    }
}

/// `value` as an audit record's JSON value.
pub(crate) fn json(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

/// The envelope's `occurred_at`: the request's (RFC 3339), or now.
pub(crate) fn occurred_at(given: Option<&str>) -> Result<Timestamp, ApiError> {
    match given {
        None => Ok(Timestamp::now()),
        Some(text) => {
            chrono::DateTime::parse_from_rfc3339(text).map(|t| Timestamp::from(t.to_utc())).map_err(|e| {
                ApiError::validation("occurred_at", format!("`{text}` is not an RFC 3339 date-time: {e}"))
            })
        }
    }
}

/// An IANA time zone name (`Europe/Berlin`).
pub(crate) fn check_time_zone(field: &str, value: &str) -> Result<(), ApiError> {
    value.parse::<chrono_tz::Tz>().map(|_| ()).map_err(|_| {
        ApiError::validation(field, format!("`{value}` is not an IANA time zone (e.g. `Europe/Berlin`)"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_and_times_are_checked() {
        assert!(check_time_zone("time_zone", "America/New_York").is_ok());
        assert!(check_time_zone("time_zone", "Mars/Olympus").is_err());
        assert_eq!(
            occurred_at(Some("2014-01-02T10:30:00+01:00"))
                .ok()
                .and_then(|t| t.to_datetime())
                .map(|t| t.to_rfc3339()),
            Some("2014-01-02T09:30:00+00:00".to_string())
        );
        assert!(occurred_at(Some("2014-01-02")).is_err());
    }
}
