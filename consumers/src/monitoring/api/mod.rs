//! The researchers' alert API and inbox page: the HTTP side of the monitoring service. It reads
//! the alert episodes the monitoring consumer writes to the monitoring schema and records the two
//! decisions researchers take on them.
//!
//! | route | roles | writes | events (topic, key) |
//! |-------|-------|--------|---------------------|
//! | `GET /v1/alerts?study_id=&site_id=&subject_id=&rule_id=&severity=&status=&raised_from=&raised_before=&limit=&cursor=` (pages, see [`list`]) | researcher, admin | – | – |
//! | `GET /v1/alerts/{alert_id}` (with `evidence` and `timeline`) | researcher, admin | – | – |
//! | `POST /v1/alerts/{alert_id}/acknowledge` `{"reason"}` | researcher, admin | alert, alert_history | AlertAcknowledged (`monitoring.alerts.v1`, alert id) |
//! | `POST /v1/alerts/{alert_id}/resolve` `{"reason"}` | researcher, admin | alert, alert_history | AlertResolved (same) |
//! | `GET /v1/alerts/stream` (server-sent events) | researcher, admin | – | – |
//! | `GET /v1/studies/{study_id}/risk`: the site risk table, KRIs' funnel limits (see [`dashboard`]) | researcher, admin | – | – |
//! | `GET /v1/studies/{study_id}/sites/{site_id}`: a site's KRIs, subjects, site-level alerts | researcher, admin | – | – |
//! | `GET /v1/studies/{study_id}/subjects/{subject_id}/vitals`: vital signs, thresholds, alerts | researcher, admin | – | – |
//! | `GET /v1/queries?study_id=&status=` (the risk service's data queries, see [`queries`]) | researcher, admin | – | – |
//! | `POST /v1/queries/{query_id}/close` `{"reason"}` | researcher, admin | – (its audit record) | QueryClosed (`risk.queries.v1`, query id) |
//! | `GET /` and `GET /inbox`: the inbox page (no data, no auth) | – | – | – |
//! | `GET /dashboard`: the researcher dashboard (no data, no auth; `#/study/{id}[/site/{id}\|/subject/{id}]`) | – | – | – |
//!
//! `GET /healthz` (liveness) and `GET /readyz` (database reachable) are for probes, without auth;
//! `GET /openapi.json` is the API's OpenAPI 3.1 document, generated from the handlers (see
//! [`openapi`]), without auth.
//!
//! **Dashboard.** The `/v1/studies` routes read the risk service's KRI table
//! (`ALERT_API_RISK_SCHEMA`) beside the monitoring schema, and draw thresholds from the KRI
//! configuration (`RISK_CONFIG_DIR`) and the monitoring rules (`MONITORING_RULES_DIR`) the two
//! services use; the site risk score is the sum of `|flag|` over a site's KRIs (see [`dashboard`]
//! for the limits and the scope rules).
//!
//! A decision writes the alert row, its `alert_history` entry and its event in ONE transaction:
//! the event is published if and only if the decision is recorded. The monitoring consumer sees
//! the new status the next time it touches the episode (no escalation of an acknowledged alert, a
//! new episode after a resolved one).
//!
//! **Stream.** `alert_history` has a trigger that notifies channel `trialflow_alerts` with
//! `<schema>:<history id>` on every insert, whoever inserts. One listener per API process turns
//! the notifications of its schema into stream events (see [`stream`]).
//!
//! **Refused before anything is read or written** (the rules of
//! [`trialflow_http::input`], shared with the site API and the ePRO gateway): control
//! characters in a path segment, a query parameter or any string of a body (the reason may hold
//! tabs and line breaks), strings beyond their limit (a reason 2,000 characters, a query value
//! 2,048), a key given twice, bodies beyond [`MAX_BODY_BYTES`].
//!
//! **Errors** are the site API's: `{"error": {"code", "message", "field"?}}` (see
//! [`ApiError`]): 400 `invalid_json` / `duplicate_key` / `invalid_body` (a decision's body) and
//! `unknown_parameter` / `duplicate_parameter` / `invalid_parameter` / `invalid_cursor` (the
//! list's query), 401 `unauthenticated`, 403 `forbidden`, 404 `not_found`, 409
//! `already_acknowledged` / `already_resolved` / `query_not_answered`, 413 `payload_too_large`,
//! 422 `validation_failed` (the reason, `Last-Event-ID`, a dashboard route's path id) /
//! `invalid_characters` / `too_long`, 429 `rate_limited` (with
//! `Retry-After`), 503 `unavailable` / `timeout` (the request took longer than
//! `HTTP_REQUEST_TIMEOUT_MS` and was stopped, a decision's transaction rolled back), 500
//! `internal`. The rate limits and the timeout are [`trialflow_http::limits`]'s; the timeout
//! bounds a stream's opening, not its events: a stream stays open.

mod alerts;
mod config;
mod cursor;
mod dashboard;
mod list;
mod openapi;
mod queries;
mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Request, State};
use axum::http::header::{self, AUTHORIZATION, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use trialflow_http::ApiError;
use trialflow_http::auth::{Authenticator, Principal, Role};
use trialflow_http::input;
use trialflow_http::limits::{self, Limiter};
use trialflow_outbox::{Outbox, SchemaName};
use trialflow_schemas::topics::TopicNames;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::monitoring::rules::RuleBook;
use crate::risk::RiskConfig;

pub use config::{AlertApiArgs, AlertApiConfig, DEFAULT_LISTEN, DEMO_TOKENS};
pub use openapi::{EXAMPLE_ALERT_ID, document as openapi_document};
pub use queries::EXAMPLE_QUERY_ID;

/// The service's name (the `service` label of the limits' metrics).
pub const NAME: &str = "alert-api";
/// `source_system` of the events the API writes.
pub const SOURCE_SYSTEM: &str = "alert-api";
/// Requests answered, by route template and status.
pub const REQUESTS_TOTAL: &str = "trialflow_alert_api_requests_total";
/// The largest body a decision takes (413 beyond): a reason of 2,000 characters, escaped, fits.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Every route the router serves (method, template), for documentation and the hostile-HTTP test.
/// The router itself is built by `routes`; the OpenAPI test checks that this list, the router
/// and the document agree.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/inbox"),
    ("GET", "/dashboard"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/alerts"),
    ("GET", "/v1/alerts/stream"),
    ("GET", "/v1/alerts/{alert_id}"),
    ("POST", "/v1/alerts/{alert_id}/acknowledge"),
    ("POST", "/v1/alerts/{alert_id}/resolve"),
    ("GET", "/v1/studies/{study_id}/risk"),
    ("GET", "/v1/studies/{study_id}/sites/{site_id}"),
    ("GET", "/v1/studies/{study_id}/subjects/{subject_id}/vitals"),
    ("GET", "/v1/queries"),
    ("POST", "/v1/queries/{query_id}/close"),
];

/// Who may use the API. Researchers are blinded; nothing here shows an arm.
const ROLES: &[Role] = &[Role::Researcher, Role::Admin];
/// Database connections of one API process (streams hold none between their reads).
const MAX_CONNECTIONS: u32 = 10;
/// How long a request waits for a database connection before answering 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// The inbox page: static, no build step, all data rendered as text by its script.
const INBOX_HTML: &str = include_str!("inbox.html");
/// The researcher dashboard: static like the inbox, its data from the `/v1/studies` routes.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// Why the alert API could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AlertApiError {
    /// A setting that cannot be used (environment variable or config field).
    #[error("invalid alert API configuration: {0}")]
    Config(String),

    /// The listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// The database could not be reached when starting.
    #[error("cannot connect to the alert API database: {0}")]
    Database(#[from] sqlx::Error),

    /// The outbox could not be opened (e.g. schema not migrated: run `trialflow migrate`).
    #[error(transparent)]
    Outbox(#[from] trialflow_outbox::OutboxError),

    /// The HTTP server failed while running.
    #[error("alert API server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Registers the API's metric descriptions with the installed recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(REQUESTS_TOTAL, "Requests answered by the alert API, by route and status.");
}

/// What every handler shares.
#[derive(Debug, Clone)]
struct AlertState(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    pool: PgPool,
    outbox: Outbox,
    schema: SchemaName,
    /// The risk service's schema (the dashboard's KRI table).
    risk_schema: SchemaName,
    /// The monitoring rules: the vital-sign thresholds of the subject page.
    rules: RuleBook,
    /// The KRI thresholds: the amber and red limits of the funnel plots.
    thresholds: RiskConfig,
    topics: TopicNames,
    auth: Authenticator,
    /// Changes of this schema's alerts, from the one listener to every stream.
    changes: broadcast::Sender<stream::Signal>,
    /// Cancelled on shutdown: ends the streams, which would otherwise keep the server open.
    stop: CancellationToken,
}

impl std::ops::Deref for AlertState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// A caller allowed to use the API: a researcher or an admin (401 without a valid bearer token,
/// 403 for other roles).
#[derive(Debug)]
struct Researcher(Principal);

impl FromRequestParts<AlertState> for Researcher {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &AlertState) -> Result<Self, ApiError> {
        let authorization = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        api.authorize(authorization).await.map(Researcher)
    }
}

impl Shared {
    /// The caller of an `Authorization` header value, if it may use the API.
    async fn authorize(&self, authorization: Option<&str>) -> Result<Principal, ApiError> {
        let principal = self.auth.authenticate(authorization).await?;
        principal.require(ROLES)?;
        Ok(principal)
    }
}

/// The alert API, bound to its address, connected to its database and listening for alert
/// changes; [`AlertApi::run`] serves it.
#[derive(Debug)]
pub struct AlertApi {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
    state: AlertState,
    notifications: PgListener,
    database_url: String,
}

impl AlertApi {
    /// Binds the listener (port 0 picks a free one), connects the database pool and starts
    /// listening on `trialflow_alerts`, so a stream opened once this returns misses no change.
    /// Fails when the schema is not migrated.
    pub async fn bind(config: AlertApiConfig) -> Result<Self, AlertApiError> {
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = config.tokens.iter().find(|g| !seen.insert(g.token.as_str())) {
            return Err(AlertApiError::Config(format!("a token of `{}` is given twice", dup.user)));
        }
        let auth = Authenticator::start(&config.tokens, config.oidc.as_ref())
            .await
            .map_err(AlertApiError::Config)?;
        if !auth.accepts_anyone() {
            tracing::warn!(
                "No alert API tokens and no identity provider configured: every request except the probes will get 401."
            );
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| AlertApiError::Bind { addr: config.listen, source })?;
        let local_addr =
            listener.local_addr().map_err(|source| AlertApiError::Bind { addr: config.listen, source })?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(trialflow_outbox::DatabaseConfig::connect_options_for(&config.database_url)?)
            .await?;
        let outbox = Outbox::open(&pool, config.schema.clone()).await?;
        let notifications = stream::listen(&config.database_url).await?;
        describe_metrics();
        let (changes, _) = broadcast::channel(stream::BROADCAST_CAPACITY);
        let state = AlertState(Arc::new(Shared {
            pool,
            outbox,
            schema: config.schema,
            risk_schema: config.risk_schema,
            rules: config.rules,
            thresholds: config.thresholds,
            topics: config.topics,
            auth,
            changes,
            stop: CancellationToken::new(),
        }));
        Ok(Self {
            listener,
            local_addr,
            router: router(state.clone(), Limiter::new(NAME, &config.limits)),
            state,
            notifications,
            database_url: config.database_url,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled, then ends the streams, lets requests in flight
    /// finish and closes the pool. A decision cut off by a crash rolls back as a whole.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AlertApiError> {
        tracing::info!(addr = %self.local_addr, schema = %self.state.schema, "Alert API listening.");
        let stop = self.state.stop.clone();
        let forwarder =
            tokio::spawn(stream::forward(self.notifications, self.database_url, self.state.clone()));
        // With the peer's address: the per-address rate limit is keyed by it.
        let served =
            axum::serve(self.listener, self.router.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(async move {
                    shutdown.cancelled().await;
                    stop.cancel();
                })
                .await;
        // Also when serving failed: the forwarder and the streams end with `stop`.
        self.state.stop.cancel();
        if let Err(e) = forwarder.await {
            tracing::error!(error = %e, "Alert change forwarder panicked.");
        }
        self.state.pool.close().await;
        served.map_err(AlertApiError::Serve)?;
        tracing::info!("Alert API stopped.");
        Ok(())
    }
}

/// Every route, each with its OpenAPI operation: the router and the document come from here
/// only, so they cannot disagree. Add a route here, never on the router.
fn routes() -> OpenApiRouter<AlertState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(inbox_root))
        .routes(routes!(inbox_page))
        .routes(routes!(dashboard_page))
        .routes(routes!(healthz))
        .routes(routes!(ready))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(list::list_alerts))
        .routes(routes!(stream::stream))
        .routes(routes!(alerts::get_alert))
        .routes(routes!(alerts::acknowledge))
        .routes(routes!(alerts::resolve))
        .routes(routes!(dashboard::study_risk))
        .routes(routes!(dashboard::site))
        .routes(routes!(dashboard::subject_vitals))
        .routes(routes!(queries::list_queries))
        .routes(routes!(queries::close_query))
}

fn router(state: AlertState, limiter: Arc<Limiter>) -> Router {
    let (router, _) = routes().split_for_parts();
    router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(middleware::from_fn(input::guard_request))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(|request: Request, next: Next| {
            input::refuse_oversized(request, next, MAX_BODY_BYTES)
        }))
        .layer(middleware::from_fn_with_state(limiter, limits::enforce))
        .layer(middleware::from_fn(track))
        .with_state(state)
}

/// Liveness: the process serves
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "service",
    responses((status = 200, description = "Serving.", body = Object, example = json!({"status": "ok"}))),
)]
async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: the database answers
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "service",
    responses(
        (status = 200, description = "Ready (no body)."),
        (status = 500, response = openapi::Internal),
        (status = 503, response = openapi::Unavailable),
    ),
)]
async fn ready(State(api): State<AlertState>) -> Result<StatusCode, ApiError> {
    sqlx::query("SELECT 1").execute(&api.pool).await?;
    Ok(StatusCode::OK)
}

/// The inbox page (same as `/inbox`)
#[utoipa::path(
    get,
    path = "/",
    tag = "pages",
    responses((status = 200, description = "The inbox page.", content_type = "text/html", body = String)),
)]
async fn inbox_root() -> Response {
    inbox()
}

/// The inbox page
///
/// Static HTML without data: it asks for the researcher's token and then talks to this API.
/// `?token=` signs in directly (the page removes it from the address bar).
#[utoipa::path(
    get,
    path = "/inbox",
    tag = "pages",
    responses((status = 200, description = "The inbox page.", content_type = "text/html", body = String)),
)]
async fn inbox_page() -> Response {
    inbox()
}

/// The researcher dashboard
///
/// Static HTML without data, signed in like the inbox (the same token, kept for the browser
/// tab): a study's site risk table and one funnel plot per KRI, a site's KRIs and subjects, a
/// subject's vital signs against the thresholds of the study's rules with its alerts marked.
/// Pages are addressed by the fragment: `#/study/{study_id}`, `#/study/{study_id}/site/{site_id}`,
/// `#/study/{study_id}/subject/{subject_id}`.
#[utoipa::path(
    get,
    path = "/dashboard",
    tag = "pages",
    responses((status = 200, description = "The dashboard page.", content_type = "text/html", body = String)),
)]
async fn dashboard_page() -> Response {
    page(DASHBOARD_HTML)
}

/// The inbox page. It carries no data: it asks the API with the token the researcher gives it.
fn inbox() -> Response {
    page(INBOX_HTML)
}

/// A static page of this API, `html`, with the headers that keep it to itself.
fn page(html: &'static str) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Only its own inline script and style, only this origin to talk to. The token may be in the
    // page's URL, so no referrer leaves the page.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(HeaderName::from_static("x-content-type-options"), HeaderValue::from_static("nosniff"));
    (headers, html).into_response()
}

/// Request metrics and the request span.
async fn track(request: Request, next: Next) -> Response {
    // The route template, not the path: bounded label values, never an alert id. The query
    // (which may carry a stream's token) is never logged.
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let span = tracing::info_span!("alert_api_request", method = %request.method(), route);
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    metrics::counter!(REQUESTS_TOTAL, "route" => route, "status" => status.to_string()).increment(1);
    span.in_scope(|| tracing::debug!(status, "Answered request."));
    response
}
