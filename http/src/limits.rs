//! Limits a public endpoint needs: how many requests one caller may send, and how long one request
//! may take. One middleware, [`enforce`], on every route of the three HTTP services, with one set
//! of settings, [`LimitsArgs`].
//!
//! **Rate limits**: token buckets (GCRA, the `governor` crate), each a sustained rate per second
//! and a burst (how many requests may come at once before the rate applies).
//!
//! * **Per principal**, keyed by the sha256 of the bearer token
//!   ([`bearer_digest`](crate::auth::bearer_digest)), whether the token is valid or not:
//!   authentication happens later, in the handlers, and a flood with one wrong token is a flood
//!   too. A request without a bearer token has no principal (the alert stream's `?access_token=`
//!   is not read here): only the address limit applies to it.
//! * **Per address**, keyed by the IP address of the TCP peer: a client that rotates tokens, or
//!   sends none, is still one address. Behind a proxy every client is the proxy: put the limit at
//!   the proxy, or raise this one.
//!
//! A request is checked against its address first, then its principal, so random tokens from a
//! spent address are refused before they make principal state. The probes ([`PROBES`]) are
//! exempt: an orchestrator must never restart a service because it is busy. A refusal is 429
//! `rate_limited` with `Retry-After`, the whole seconds (rounded up, at least 1) until the bucket
//! holds a token again, and counts in [`RATE_LIMITED_TOTAL`] (`limit` = `principal` | `address`).
//!
//! **Bounded state.** A limiter keeps a small cell per key it has seen. Every [`SWEEP_INTERVAL`]
//! the keys whose bucket is full again (callers quiet for a burst's worth of time) are dropped, so
//! the state holds about the callers of the last interval, however many came before.
//!
//! **Request timeout.** A request whose handler has not produced its answer within the timeout is
//! cut: its future is dropped — a database transaction in it rolls back, a lock wait is abandoned
//! — and it is answered 503 `timeout` with `Retry-After: 1`, counted in
//! [`REQUEST_TIMEOUTS_TOTAL`]. Dropped rather than left to finish in the background: the client
//! is told the request failed, so its work must not be kept, and work nobody waits for is the load
//! that made it late. (A command cut while its `COMMIT` is on the wire may still have committed;
//! retried with the same `Idempotency-Key`, the site API answers what it did.) The timeout covers
//! the handler up to the answer's head: a body streamed after it — the alert API's server-sent
//! events — is not cut, so a stream stays open as long as its client listens.

use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, ParseIntError};
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::header::{AUTHORIZATION, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use clap::Args;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use trialflow_outbox::config::setting;

use crate::ApiError;
use crate::auth::bearer_digest;

/// Requests per second one principal may send, sustained, by default (burst: twice as many).
pub const DEFAULT_PER_PRINCIPAL: u32 = 50;
/// Requests per second one address may send, sustained, by default (burst: twice as many): room
/// for a few principals behind one NAT.
pub const DEFAULT_PER_ADDRESS: u32 = 200;
/// How long a request may take by default.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// The largest rate or burst a setting takes: beyond, a limit limits nothing (0 turns it off).
pub const MAX_RATE: u32 = 1_000_000;
/// The longest request timeout a setting takes: an hour.
pub const MAX_REQUEST_TIMEOUT_MS: u64 = 3_600_000;
/// Routes no rate limit applies to.
pub const PROBES: &[&str] = &["/healthz", "/readyz"];
/// How often the state of callers whose bucket is full again is dropped.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Requests refused by a rate limit, by service and limit (`principal` | `address`).
pub const RATE_LIMITED_TOTAL: &str = "trialflow_http_rate_limited_total";
/// Requests cut at the request timeout, by service.
pub const REQUEST_TIMEOUTS_TOTAL: &str = "trialflow_http_request_timeouts_total";

/// The limits' settings, shared by the three services: each standalone service's settings
/// (`trialflow site-api`, `epro-gateway`, `alert-api`) flatten them, and `trialflow run`,
/// `replay` and `demo` once for the three services they run in one process. An unset setting
/// takes its production default in a standalone service ([`LimitsArgs::limits`]); the in-process
/// pipeline leaves unset rate limits off ([`LimitsArgs::local_limits`]).
#[derive(Debug, Clone, Default, Args)]
pub struct LimitsArgs {
    /// Requests per second one principal (bearer token) may send, sustained; 0 turns the limit
    /// off; at most 1000000. Default 50 (the in-process pipeline of run, demo, replay: off).
    #[arg(long, env = "HTTP_RATE_LIMIT_PER_PRINCIPAL", value_name = "PER_SEC", value_parser = setting(parse_rate))]
    pub rate_limit_per_principal: Option<u32>,

    /// Requests one principal may send at once before its sustained rate applies; 1 to 1000000.
    /// Default: twice the rate (100).
    #[arg(long, env = "HTTP_RATE_LIMIT_PER_PRINCIPAL_BURST", value_name = "REQUESTS", value_parser = setting(parse_burst))]
    pub rate_limit_per_principal_burst: Option<u32>,

    /// Requests per second one client IP address may send, sustained, whatever its tokens; 0
    /// turns the limit off; at most 1000000. Default 200 (the in-process pipeline: off).
    #[arg(long, env = "HTTP_RATE_LIMIT_PER_ADDRESS", value_name = "PER_SEC", value_parser = setting(parse_rate))]
    pub rate_limit_per_address: Option<u32>,

    /// Requests one address may send at once before its sustained rate applies; 1 to 1000000.
    /// Default: twice the rate (400).
    #[arg(long, env = "HTTP_RATE_LIMIT_PER_ADDRESS_BURST", value_name = "REQUESTS", value_parser = setting(parse_burst))]
    pub rate_limit_per_address_burst: Option<u32>,

    /// How long (milliseconds) a request may take before it is cut and answered 503 `timeout`;
    /// 1 to 3600000. Default 30000.
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT_MS", value_name = "MS", value_parser = setting(parse_request_timeout_ms))]
    pub request_timeout_ms: Option<u64>,
}

impl LimitsArgs {
    /// The limits of a standalone service: an unset setting takes its production default.
    pub fn limits(&self) -> Limits {
        self.resolve(Some(DEFAULT_PER_PRINCIPAL), Some(DEFAULT_PER_ADDRESS))
    }

    /// The limits of the in-process pipeline (`trialflow run`, `demo`, `replay`, the load tests and
    /// benchmarks): rate limits off unless set, since one client drives all the load there.
    pub fn local_limits(&self) -> Limits {
        self.resolve(None, None)
    }

    fn resolve(&self, per_principal: Option<u32>, per_address: Option<u32>) -> Limits {
        Limits {
            per_principal: Rate::of(
                self.rate_limit_per_principal.or(per_principal),
                self.rate_limit_per_principal_burst,
            ),
            per_address: Rate::of(
                self.rate_limit_per_address.or(per_address),
                self.rate_limit_per_address_burst,
            ),
            request_timeout: Duration::from_millis(
                self.request_timeout_ms.unwrap_or(DEFAULT_REQUEST_TIMEOUT_MS),
            ),
        }
    }
}

fn parse_rate(text: &str) -> Result<u32, String> {
    let rate: u32 = text.trim().parse().map_err(|e: ParseIntError| e.to_string())?;
    if rate > MAX_RATE {
        return Err(format!("must be at most {MAX_RATE} (0 turns the limit off)"));
    }
    Ok(rate)
}

fn parse_burst(text: &str) -> Result<u32, String> {
    match parse_rate(text)? {
        0 => Err("must be at least 1 (turn the limit off with its rate: 0)".to_string()),
        burst => Ok(burst),
    }
}

fn parse_request_timeout_ms(text: &str) -> Result<u64, String> {
    let ms: u64 = text.trim().parse().map_err(|e: ParseIntError| e.to_string())?;
    if ms == 0 {
        return Err("must be at least 1".to_string());
    }
    if ms > MAX_REQUEST_TIMEOUT_MS {
        return Err(format!("must be at most {MAX_REQUEST_TIMEOUT_MS} (an hour)"));
    }
    Ok(ms)
}

/// A token bucket: `per_second` requests a second, sustained, and `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Rate {
    /// `None` (no limit) when either is 0.
    pub fn new(per_second: u32, burst: u32) -> Option<Self> {
        Some(Self { per_second: NonZeroU32::new(per_second)?, burst: NonZeroU32::new(burst)? })
    }

    /// `per_second` (unset or 0: no limit), with `burst`, by default twice the rate.
    fn of(per_second: Option<u32>, burst: Option<u32>) -> Option<Self> {
        let per_second = NonZeroU32::new(per_second?)?;
        let burst = burst.and_then(NonZeroU32::new);
        let burst = burst
            .unwrap_or_else(|| NonZeroU32::new(per_second.get().saturating_mul(2)).unwrap_or(per_second));
        Some(Self { per_second, burst })
    }
}

/// What a service runs with (see [`LimitsArgs`] for each setting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Per bearer token; `None`: no limit.
    pub per_principal: Option<Rate>,
    /// Per client IP address; `None`: no limit.
    pub per_address: Option<Rate>,
    /// How long a request may take before it is cut (503 `timeout`).
    pub request_timeout: Duration,
}

/// The production defaults ([`LimitsArgs::limits`] with nothing set).
impl Default for Limits {
    fn default() -> Self {
        LimitsArgs::default().limits()
    }
}

impl Limits {
    /// No rate limit, the default request timeout: the in-process pipeline's
    /// ([`LimitsArgs::local_limits`] with nothing set), and tests that are not about limits.
    pub fn unthrottled() -> Self {
        LimitsArgs::default().local_limits()
    }
}

/// Which limit refused a request: the `limit` label of [`RATE_LIMITED_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    Principal,
    Address,
}

impl Limit {
    fn label(self) -> &'static str {
        match self {
            Limit::Principal => "principal",
            Limit::Address => "address",
        }
    }
}

/// Why a request was refused: by which limit, of what rate, and how long until it would pass.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    limit: Limit,
    rate: Rate,
    wait: Duration,
}

/// The limits of one service, in force: its limiters and its timeout, the state of
/// [`enforce`].
#[derive(Debug)]
pub struct Limiter {
    /// The `service` label of the metrics.
    service: &'static str,
    per_principal: Option<(Rate, DefaultKeyedRateLimiter<[u8; 32]>)>,
    per_address: Option<(Rate, DefaultKeyedRateLimiter<IpAddr>)>,
    request_timeout: Duration,
}

impl Limiter {
    /// The limiter of `service` (the metrics' label). Call it within a Tokio runtime: it starts
    /// the sweep of its keyed state, which ends once the limiter is dropped.
    pub fn new(service: &'static str, limits: &Limits) -> Arc<Self> {
        describe_metrics();
        let quota = |rate: Rate| Quota::per_second(rate.per_second).allow_burst(rate.burst);
        let limiter = Arc::new(Self {
            service,
            per_principal: limits.per_principal.map(|rate| (rate, RateLimiter::keyed(quota(rate)))),
            per_address: limits.per_address.map(|rate| (rate, RateLimiter::keyed(quota(rate)))),
            request_timeout: limits.request_timeout,
        });
        if limiter.per_principal.is_some() || limiter.per_address.is_some() {
            tokio::spawn(sweep(Arc::downgrade(&limiter)));
        }
        limiter
    }

    /// `Err` when a limit refuses `request` (see [`Limiter::refuse`] for its answer).
    fn admit(&self, request: &Request) -> Result<(), Refusal> {
        if PROBES.contains(&request.uri().path()) {
            return Ok(());
        }
        if let Some((rate, limiter)) = &self.per_address
            && let Some(address) = address_key(request)
        {
            limiter.check_key(&address).map_err(|refused| Refusal {
                limit: Limit::Address,
                rate: *rate,
                wait: refused.wait_time_from(limiter.clock().now()),
            })?;
        }
        if let Some((rate, limiter)) = &self.per_principal
            && let Some(principal) = principal_key(request.headers())
        {
            limiter.check_key(&principal).map_err(|refused| Refusal {
                limit: Limit::Principal,
                rate: *rate,
                wait: refused.wait_time_from(limiter.clock().now()),
            })?;
        }
        Ok(())
    }

    /// The 429 answer to `refusal`, counted.
    fn refuse(&self, Refusal { limit, rate, wait }: Refusal) -> Response {
        let secs = retry_after_secs(wait);
        metrics::counter!(RATE_LIMITED_TOTAL, "service" => self.service, "limit" => limit.label())
            .increment(1);
        // Debug only: a flood must not become a flood of log lines.
        tracing::debug!(
            service = self.service,
            limit = limit.label(),
            retry_after_secs = secs,
            "Rate limited."
        );
        let from = match limit {
            Limit::Principal => "this token",
            Limit::Address => "this address",
        };
        let message = format!(
            "too many requests from {from}: at most {} a second (bursts of {}); retry in {secs} s",
            rate.per_second, rate.burst
        );
        let mut response = ApiError::rate_limited(message).into_response();
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
        response
    }

    /// Drops the keys whose bucket is full again: their state says nothing a fresh one would not.
    fn sweep(&self) {
        if let Some((_, limiter)) = &self.per_principal {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some((_, limiter)) = &self.per_address {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Keys held, principals and addresses.
    fn keys(&self) -> (usize, usize) {
        (
            self.per_principal.as_ref().map_or(0, |(_, l)| l.len()),
            self.per_address.as_ref().map_or(0, |(_, l)| l.len()),
        )
    }
}

/// Sweeps `limiter` every [`SWEEP_INTERVAL`] while it lives.
async fn sweep(limiter: Weak<Limiter>) {
    let mut interval = tokio::time::interval(SWEEP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        let Some(limiter) = limiter.upgrade() else { return };
        limiter.sweep();
        let (principals, addresses) = limiter.keys();
        tracing::trace!(service = limiter.service, principals, addresses, "Swept the rate limiters.");
    }
}

/// Middleware of every route (`Router::layer` with
/// `middleware::from_fn_with_state(Limiter::new(..), limits::enforce)`, outside the body and input
/// guards so it also bounds reading the body): the rate limits, then the request timeout. The
/// per-address limit needs the peer's address: serve the router with
/// `into_make_service_with_connect_info::<SocketAddr>()`.
pub async fn enforce(State(limiter): State<Arc<Limiter>>, request: Request, next: Next) -> Response {
    if let Err(refusal) = limiter.admit(&request) {
        return limiter.refuse(refusal);
    }
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    match tokio::time::timeout(limiter.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let timeout_ms = u64::try_from(limiter.request_timeout.as_millis()).unwrap_or(u64::MAX);
            metrics::counter!(REQUEST_TIMEOUTS_TOTAL, "service" => limiter.service).increment(1);
            tracing::warn!(
                service = limiter.service,
                route,
                timeout_ms,
                "Request cut at its timeout; answering 503."
            );
            ApiError::timeout(format!(
                "the request did not finish within {timeout_ms} ms and was stopped; retry later"
            ))
            .into_response()
        }
    }
}

/// The principal key of a request: the digest of its bearer token, valid or not.
fn principal_key(headers: &HeaderMap) -> Option<[u8; 32]> {
    bearer_digest(headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()))
}

/// The address key of a request: its TCP peer's IP (an IPv4 client of a dual-stack listener as
/// IPv4). `None` when the router is served without connect info.
fn address_key(request: &Request) -> Option<IpAddr> {
    request.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(peer)| peer.ip().to_canonical())
}

/// `Retry-After` of a wait: whole seconds, rounded up, at least 1 (a client told 0 would retry at
/// once, and be refused again).
fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// Registers the limits' metric descriptions with the installed recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(
        RATE_LIMITED_TOTAL,
        "Requests refused with 429 by a rate limit, by service and limit (principal, address)."
    );
    metrics::describe_counter!(
        REQUEST_TIMEOUTS_TOTAL,
        "Requests cut at the request timeout (503), by service."
    );
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::StatusCode;

    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        let ms = Duration::from_millis;
        for (wait, secs) in [
            (Duration::ZERO, 1),
            (Duration::from_nanos(1), 1),
            (ms(999), 1),
            (ms(1_000), 1),
            (ms(1_001), 2),
            (ms(19_999), 20),
            (Duration::from_secs(3_600), 3_600),
        ] {
            assert_eq!(retry_after_secs(wait), secs, "{wait:?}");
        }
    }

    fn request(authorization: Option<&str>, peer: Option<&str>) -> Request {
        let mut builder = Request::builder().uri("/v1/studies");
        if let Some(value) = authorization {
            builder = builder.header(AUTHORIZATION, value);
        }
        let mut request = builder.body(Body::empty()).unwrap_or_default();
        if let Some(peer) = peer.and_then(|p| p.parse::<SocketAddr>().ok()) {
            request.extensions_mut().insert(ConnectInfo(peer));
        }
        request
    }

    #[test]
    fn the_principal_is_the_bearer_tokens_digest_and_nothing_else() {
        let key = |authorization| principal_key(request(authorization, None).headers());
        assert_eq!(key(Some("Bearer tok")), Some(crate::auth::digest("tok")));
        assert_eq!(key(Some("bearer  tok ")), key(Some("Bearer tok")), "as authentication reads it");
        assert_ne!(key(Some("Bearer tok")), key(Some("Bearer tok2")));
        for none in [None, Some("tok"), Some("Basic dG9rOg=="), Some("Bearer")] {
            assert_eq!(key(none), None, "{none:?}");
        }
    }

    #[test]
    fn the_address_is_the_peers_ip_whatever_its_port() {
        let key = |peer| address_key(&request(None, peer));
        assert_eq!(key(Some("192.0.2.7:5000")), "192.0.2.7".parse().ok());
        assert_eq!(key(Some("192.0.2.7:5001")), key(Some("192.0.2.7:5000")));
        assert_eq!(key(Some("[::ffff:192.0.2.7]:80")), "192.0.2.7".parse().ok(), "IPv4-mapped is IPv4");
        assert_eq!(key(Some("[2001:db8::1]:80")), "2001:db8::1".parse().ok());
        assert_eq!(key(None), None);
    }

    #[test]
    fn defaults_and_settings_resolve_to_rates() {
        let rate = |per_second, burst| Rate::new(per_second, burst);
        let production = Limits::default();
        assert_eq!(production.per_principal, rate(50, 100));
        assert_eq!(production.per_address, rate(200, 400));
        assert_eq!(production.request_timeout, Duration::from_secs(30));
        let local = Limits::unthrottled();
        assert_eq!((local.per_principal, local.per_address), (None, None));
        assert_eq!(local.request_timeout, Duration::from_secs(30));

        let set = LimitsArgs {
            rate_limit_per_principal: Some(5),
            rate_limit_per_address: Some(0),
            rate_limit_per_address_burst: Some(9),
            request_timeout_ms: Some(250),
            ..LimitsArgs::default()
        };
        for limits in [set.limits(), set.local_limits()] {
            assert_eq!(limits.per_principal, rate(5, 10), "burst: twice the rate");
            assert_eq!(limits.per_address, None, "0 turns the limit off");
            assert_eq!(limits.request_timeout, Duration::from_millis(250));
        }
        let burst_only = LimitsArgs { rate_limit_per_principal_burst: Some(3), ..LimitsArgs::default() };
        assert_eq!(burst_only.limits().per_principal, rate(50, 3));
        assert_eq!(burst_only.local_limits().per_principal, None, "a burst without a rate limits nothing");
        assert_eq!(Rate::of(Some(MAX_RATE), None), rate(MAX_RATE, 2 * MAX_RATE));
    }

    #[test]
    fn hostile_settings_are_refused_naming_the_variable() {
        let refusal = |args: &[&str]| {
            trialflow_outbox::config::from_args::<LimitsArgs>(args).err().map(|e| e.to_string())
        };
        let cases: &[(&[&str], &str, &str)] = &[
            (&["--rate-limit-per-principal=-1"], "HTTP_RATE_LIMIT_PER_PRINCIPAL", "invalid digit"),
            (&["--rate-limit-per-principal", "fast"], "HTTP_RATE_LIMIT_PER_PRINCIPAL", "invalid digit"),
            (&["--rate-limit-per-principal", "1000001"], "HTTP_RATE_LIMIT_PER_PRINCIPAL", "at most 1000000"),
            (&["--rate-limit-per-principal", "4294967296"], "HTTP_RATE_LIMIT_PER_PRINCIPAL", "too large"),
            (&["--rate-limit-per-principal", "5\0"], "HTTP_RATE_LIMIT_PER_PRINCIPAL", "invalid digit"),
            (&["--rate-limit-per-principal", ""], "HTTP_RATE_LIMIT_PER_PRINCIPAL", "empty"),
            (&["--rate-limit-per-principal-burst", "0"], "HTTP_RATE_LIMIT_PER_PRINCIPAL_BURST", "at least 1"),
            (&["--rate-limit-per-address", "2.5"], "HTTP_RATE_LIMIT_PER_ADDRESS", "invalid digit"),
            (&["--rate-limit-per-address", " "], "HTTP_RATE_LIMIT_PER_ADDRESS", "empty"),
            (&["--rate-limit-per-address-burst", "0"], "HTTP_RATE_LIMIT_PER_ADDRESS_BURST", "at least 1"),
            (
                &["--rate-limit-per-address-burst", "1e9"],
                "HTTP_RATE_LIMIT_PER_ADDRESS_BURST",
                "invalid digit",
            ),
            (&["--request-timeout-ms", "0"], "HTTP_REQUEST_TIMEOUT_MS", "at least 1"),
            (&["--request-timeout-ms", "3600001"], "HTTP_REQUEST_TIMEOUT_MS", "at most 3600000"),
            (&["--request-timeout-ms", "18446744073709551616"], "HTTP_REQUEST_TIMEOUT_MS", "too large"),
            (&["--request-timeout-ms", "\u{1b}[2J"], "HTTP_REQUEST_TIMEOUT_MS", "invalid digit"),
        ];
        for (args, var, reason) in cases {
            let refused = refusal(args).unwrap_or_else(|| panic!("{args:?} was accepted"));
            assert!(refused.contains(var) && refused.contains(reason), "{args:?}: {refused}");
            assert!(
                !refused.contains('\0') && !refused.contains('\u{1b}'),
                "control characters escaped: {refused}"
            );
        }
        let parsed = trialflow_outbox::config::from_args::<LimitsArgs>(&[
            "--rate-limit-per-principal",
            " 0 ",
            "--rate-limit-per-address",
            "1000000",
            "--request-timeout-ms",
            "3600000",
        ]);
        let Ok(args) = parsed else { panic!("{parsed:?}") };
        assert_eq!(args.limits().per_principal, None);
        assert_eq!(args.limits().per_address, Rate::new(MAX_RATE, 2 * MAX_RATE));
        assert_eq!(args.limits().request_timeout, Duration::from_secs(3_600));
    }

    #[tokio::test]
    async fn a_spent_bucket_refuses_with_429_and_only_its_own_key() {
        let limits = Limits { per_principal: Rate::new(1, 2), ..Limits::unthrottled() };
        let limiter = Limiter::new("test", &limits);
        let status = |authorization| match limiter.admit(&request(Some(authorization), Some("192.0.2.7:1"))) {
            Ok(()) => StatusCode::OK,
            Err(refusal) => limiter.refuse(refusal).status(),
        };
        assert_eq!([status("Bearer a"), status("Bearer a")], [StatusCode::OK; 2], "the burst");
        assert_eq!(status("Bearer a"), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(status("Bearer b"), StatusCode::OK, "another principal is served");
        let Err(refusal) = limiter.admit(&request(Some("Bearer a"), None)) else { panic!("admitted") };
        let refused = limiter.refuse(refusal);
        assert_eq!(refused.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("1"));
        let body = axum::body::to_bytes(refused.into_body(), 4096).await.unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        let probe = Request::builder().uri("/healthz").header(AUTHORIZATION, "Bearer a").body(Body::empty());
        assert!(limiter.admit(&probe.unwrap_or_default()).is_ok(), "probes are exempt");
    }

    #[tokio::test]
    async fn the_keys_of_callers_whose_bucket_is_full_again_are_dropped() {
        // A bucket that refills within 2 ms.
        let limits = Limits {
            per_principal: Rate::new(MAX_RATE, 1),
            per_address: Rate::new(MAX_RATE, 1),
            ..Limits::unthrottled()
        };
        let limiter = Limiter::new("test", &limits);
        for i in 0..1_000 {
            let authorization = format!("Bearer {i}");
            let _ = limiter
                .admit(&request(Some(&authorization), Some(&format!("10.0.{}.{}:1", i / 256, i % 256))));
        }
        assert_eq!(limiter.keys(), (1_000, 1_000));
        // The refill time of one token, stated by the rate (1 µs), with room.
        tokio::time::sleep(Duration::from_millis(2)).await;
        limiter.sweep();
        assert_eq!(limiter.keys(), (0, 0));
    }
}
