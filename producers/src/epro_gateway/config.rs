//! Configuration of the ePRO gateway: [`EproGatewayArgs`], the settings (each a flag and an
//! environment variable, with its default), make an [`EproGatewayConfig`], what the gateway runs
//! with.

use std::fmt;
use std::net::SocketAddr;

use clap::Args;
use trialflow_http::auth::accepted_tokens;
use trialflow_http::clock::Clock;
use trialflow_http::input::{DEFAULT_MAX_FUTURE_SKEW_SECS, parse_future_skew};
use trialflow_http::limits::{Limits, LimitsArgs};
use trialflow_http::oidc::{OidcArgs, OidcSettings};
use trialflow_outbox::KafkaConfig;
use trialflow_outbox::config::{self, at_least_one, setting, trimmed};
use trialflow_schemas::topics::TopicNames;

use super::error::EproGatewayError;

/// Where the gateway listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8082";
/// How long a submission waits for the broker's acknowledgement by default.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 10_000;
/// The app token of the local demo. Never use it beyond a local machine.
pub const DEMO_TOKEN: &str = "app-token";

/// The ePRO gateway's settings (`trialflow epro-gateway`, and [`EproGatewayConfig::local`]).
#[derive(Clone, Args)]
pub struct EproGatewayArgs {
    /// Listen address (port 0 picks a free port).
    #[arg(long, env = "EPRO_GATEWAY_LISTEN", value_name = "ADDR", default_value = DEFAULT_LISTEN, value_parser = setting(trimmed::<SocketAddr>))]
    pub listen: SocketAddr,

    /// The broker and producer settings (`KAFKA_DELIVERY_TIMEOUT_MS` is not used: the ack
    /// timeout is).
    #[command(flatten)]
    pub kafka: KafkaConfig,

    /// Accepted static app tokens, separated by commas (blanks around them ignored); every study.
    /// Production uses an identity provider (OIDC_*, role `patient_app`). None when unset (see
    /// --demo-tokens). Prefer the variable: a flag shows in the process list.
    // A qualified `Vec`: the whole list is one value (clap would parse each item of a `Vec` alone).
    #[arg(long, env = "EPRO_GATEWAY_TOKENS", hide_env_values = true, value_name = "TOKEN,...", value_parser = setting(parse_tokens))]
    pub tokens: Option<::std::vec::Vec<String>>,

    /// Accept the local demo app token (`app-token`) when EPRO_GATEWAY_TOKENS gives none. Never in
    /// a shared environment.
    #[arg(long, env = "EPRO_GATEWAY_DEMO_TOKENS")]
    pub demo_tokens: bool,

    /// Prefix of every topic name, e.g. `staging.` (several environments on one cluster).
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// How long (milliseconds, at least 1) a submission waits for the broker's acknowledgement
    /// before it is answered 503 (librdkafka `message.timeout.ms`, where 0 would mean forever).
    #[arg(long, env = "EPRO_GATEWAY_ACK_TIMEOUT_MS", value_name = "MS", default_value_t = DEFAULT_ACK_TIMEOUT_MS, value_parser = setting(at_least_one::<u64>))]
    pub ack_timeout_ms: u64,

    /// How far (seconds) a submission's `authored_at`, `occurred_at` or `recorded_at` may lie
    /// ahead of the gateway's clock before it is refused; at most 86400 (a day).
    #[arg(long, env = "EPRO_GATEWAY_MAX_FUTURE_SKEW_SECS", value_name = "SECS", default_value_t = DEFAULT_MAX_FUTURE_SKEW_SECS, value_parser = setting(parse_future_skew))]
    pub max_future_skew_secs: u64,

    #[command(flatten)]
    pub oidc: OidcArgs,
    /// Rate limits per token and per client address, and the request timeout.
    #[command(flatten)]
    pub limits: LimitsArgs,
}

/// `Debug` never shows the tokens.
impl fmt::Debug for EproGatewayArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EproGatewayArgs")
            .field("listen", &self.listen)
            .field("kafka", &self.kafka)
            .field("tokens", &self.tokens.as_ref().map(|t| format!("<{} redacted>", t.len())))
            .field("demo_tokens", &self.demo_tokens)
            .field("topic_prefix", &self.topic_prefix)
            .field("ack_timeout_ms", &self.ack_timeout_ms)
            .field("max_future_skew_secs", &self.max_future_skew_secs)
            .field("oidc", &self.oidc)
            .field("limits", &self.limits)
            .finish()
    }
}

impl EproGatewayArgs {
    /// The configuration of these settings, on the system clock: the tokens of
    /// EPRO_GATEWAY_TOKENS, or, when it gives none, the demo token if `--demo-tokens`; else an
    /// error (no app could be authenticated).
    pub fn into_config(self) -> Result<EproGatewayConfig, EproGatewayError> {
        let oidc = self.oidc.settings().map_err(EproGatewayError::Config)?;
        let demo = || vec![DEMO_TOKEN.to_string()];
        let tokens = accepted_tokens(self.tokens.clone(), self.demo_tokens, demo, oidc.is_some())
            .ok_or_else(|| {
                EproGatewayError::Config(
                    "no app can be authenticated: configure an identity provider (OIDC_ISSUER, \
                     OIDC_AUDIENCE, OIDC_JWKS), set EPRO_GATEWAY_TOKENS (comma-separated) or pass \
                     --demo-tokens"
                        .to_string(),
                )
            })?;
        Ok(self.with_tokens(tokens, oidc))
    }

    fn with_tokens(self, tokens: Vec<String>, oidc: Option<OidcSettings>) -> EproGatewayConfig {
        EproGatewayConfig {
            oidc,
            listen: self.listen,
            kafka: self.kafka,
            topics: TopicNames::new(self.topic_prefix),
            tokens,
            ack_timeout_ms: self.ack_timeout_ms,
            clock: Clock::System,
            max_future_skew_secs: self.max_future_skew_secs,
            limits: self.limits.limits(),
        }
    }
}

/// What the gateway runs with (see [`EproGatewayArgs`] for each setting).
#[derive(Clone)]
pub struct EproGatewayConfig {
    /// Listen address (`EPRO_GATEWAY_LISTEN`; port 0 picks a free port).
    pub listen: SocketAddr,
    /// The broker and producer settings (`KAFKA_BOOTSTRAP_SERVERS`, `KAFKA_LINGER_MS`,
    /// `KAFKA_CONFIG`, `KAFKA_PRODUCER_CONFIG`; `KAFKA_DELIVERY_TIMEOUT_MS` is not used: the ack
    /// timeout is).
    pub kafka: KafkaConfig,
    /// Deployed topic names (`TOPIC_PREFIX`).
    pub topics: TopicNames,
    /// Accepted static app tokens (`EPRO_GATEWAY_TOKENS`, comma-separated). Locally:
    /// [`DEMO_TOKEN`].
    pub tokens: Vec<String>,
    /// The identity provider whose JWTs (role `patient_app`) are accepted (`OIDC_*`), if any.
    pub oidc: Option<OidcSettings>,
    /// How long (milliseconds) a submission waits for the broker's acknowledgement before it is
    /// answered 503 (`EPRO_GATEWAY_ACK_TIMEOUT_MS`; librdkafka `message.timeout.ms`).
    pub ack_timeout_ms: u64,
    /// Where `received_at` comes from: the system clock, or a replay's virtual clock (set in
    /// code only, by an in-process replay; never from the environment).
    pub clock: Clock,
    /// How far (seconds) a submission's `authored_at`, `occurred_at` or `recorded_at` may lie
    /// ahead of `clock` before it is refused (`EPRO_GATEWAY_MAX_FUTURE_SKEW_SECS`, at most a
    /// day).
    pub max_future_skew_secs: u64,
    /// Rate limits and the request timeout (`HTTP_RATE_LIMIT_*`, `HTTP_REQUEST_TIMEOUT_MS`).
    pub limits: Limits,
}

/// `Debug` never shows the tokens.
impl fmt::Debug for EproGatewayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EproGatewayConfig")
            .field("listen", &self.listen)
            .field("kafka", &self.kafka)
            .field("topics", &self.topics)
            .field("tokens", &format_args!("<{} redacted>", self.tokens.len()))
            .field("ack_timeout_ms", &self.ack_timeout_ms)
            .field("clock", &self.clock)
            .field("max_future_skew_secs", &self.max_future_skew_secs)
            .field("oidc", &self.oidc)
            .field("limits", &self.limits)
            .finish()
    }
}

impl EproGatewayConfig {
    /// For in-process use (`trialflow run`, the demo, tests): the defaults with the environment
    /// variables of [`EproGatewayArgs`] (the `KAFKA_*` ones included) that are set and valid
    /// applied (see [`config::from_env_lenient`]: an invalid one is logged and its default kept),
    /// the demo token when `EPRO_GATEWAY_TOKENS` gives none, and the identity provider when
    /// `OIDC_*` configure one (an OIDC setting that does not parse leaves no token accepted).
    /// Rate limits are off unless set ([`LimitsArgs::local_limits`]).
    pub fn local() -> Self {
        let (args, refused) = config::from_env_lenient::<EproGatewayArgs>();
        let oidc = trialflow_http::oidc::local_settings(&args.oidc, &refused);
        let tokens = match &args.tokens {
            _ if oidc.is_err() => Vec::new(),
            Some(tokens) => tokens.clone(),
            None => vec![DEMO_TOKEN.to_string()],
        };
        Self { limits: args.limits.local_limits(), ..args.with_tokens(tokens, oidc.unwrap_or(None)) }
    }
}

/// Tokens separated by commas; blanks around items are ignored, an empty string is no tokens.
fn parse_tokens(s: &str) -> Result<Vec<String>, String> {
    Ok(s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_string).collect())
}

#[cfg(test)]
mod tests {

    use super::*;

    /// The configuration of the flags `args`.
    fn configured(args: &[&str]) -> Result<EproGatewayConfig, String> {
        let args = config::from_args::<EproGatewayArgs>(args).map_err(|e| e.to_string())?;
        args.into_config().map_err(|e| e.to_string())
    }

    fn refusal(args: &[&str]) -> String {
        configured(args).err().unwrap_or_else(|| panic!("{args:?} was accepted"))
    }

    #[test]
    fn defaults_listen_locally_and_accept_the_demo_token_only_when_asked() {
        let args = config::defaults::<EproGatewayArgs>();
        assert_eq!(args.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!((args.ack_timeout_ms, args.max_future_skew_secs), (DEFAULT_ACK_TIMEOUT_MS, 300));
        assert_eq!(args.limits.limits(), Limits::default(), "production limits");
        assert_eq!(args.kafka.bootstrap_servers, trialflow_outbox::config::DEFAULT_KAFKA_BOOTSTRAP_SERVERS);
        assert!(args.tokens.is_none() && !args.demo_tokens);
        let config = EproGatewayArgs { demo_tokens: true, ..args }.into_config().map(|c| c.tokens);
        assert_eq!(config.ok(), Some(vec![DEMO_TOKEN.to_string()]));
    }

    #[test]
    fn tokens_are_comma_separated_and_replace_the_demo_token() {
        let config = configured(&["--tokens", " a, b ,,c", "--demo-tokens", "--ack-timeout-ms", " 1500 "]);
        let Ok(config) = config else { panic!("{config:?}") };
        assert_eq!(config.tokens, ["a", "b", "c"]);
        assert_eq!(config.ack_timeout_ms, 1500);
    }

    #[test]
    fn without_tokens_no_app_is_accepted_unless_the_demo_token_is_asked_for() {
        for tokens in [&[][..], &["--tokens", ""], &["--tokens", " , ,"]] {
            let refused = refusal(tokens);
            assert!(
                refused.contains("set EPRO_GATEWAY_TOKENS") && refused.contains("--demo-tokens"),
                "{refused}"
            );
            let mut demo = tokens.to_vec();
            demo.push("--demo-tokens");
            assert_eq!(configured(&demo).map(|c| c.tokens).ok(), Some(vec![DEMO_TOKEN.to_string()]));
        }
    }

    #[test]
    fn hostile_settings_are_refused_naming_the_variable() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&["--listen", "0.0.0.0:80\0"], "EPRO_GATEWAY_LISTEN (--listen)", "invalid socket address"),
            (&["--listen", "\u{1b}[31m"], "EPRO_GATEWAY_LISTEN (--listen)", "invalid socket address"),
            (&["--ack-timeout-ms", "0"], "EPRO_GATEWAY_ACK_TIMEOUT_MS (--ack-timeout-ms)", "at least 1"),
            (
                &["--ack-timeout-ms", "soon"],
                "EPRO_GATEWAY_ACK_TIMEOUT_MS (--ack-timeout-ms)",
                "invalid digit",
            ),
            (
                &["--ack-timeout-ms", "18446744073709551616"],
                "EPRO_GATEWAY_ACK_TIMEOUT_MS (--ack-timeout-ms)",
                "too large",
            ),
            (
                &["--max-future-skew-secs", "86401"],
                "EPRO_GATEWAY_MAX_FUTURE_SKEW_SECS (--max-future-skew-secs)",
                "at most 86400",
            ),
            (&["--linger-ms=-5"], "--linger-ms", "invalid"),
            (&["--producer-config", "no-equals-sign"], "--producer-config", "expected key=value"),
            (
                &["--rate-limit-per-principal", "1000001"],
                "HTTP_RATE_LIMIT_PER_PRINCIPAL (--rate-limit-per-principal)",
                "at most 1000000",
            ),
            (
                &["--rate-limit-per-address", "\u{1b}[31m"],
                "HTTP_RATE_LIMIT_PER_ADDRESS (--rate-limit-per-address)",
                "invalid digit",
            ),
            (
                &["--rate-limit-per-principal-burst", ""],
                "HTTP_RATE_LIMIT_PER_PRINCIPAL_BURST (--rate-limit-per-principal-burst)",
                "empty",
            ),
            (
                &["--request-timeout-ms", "soon"],
                "HTTP_REQUEST_TIMEOUT_MS (--request-timeout-ms)",
                "invalid digit",
            ),
        ];
        for (args, name, reason) in cases {
            let refused = refusal(args);
            assert!(refused.contains(name) && refused.contains(reason), "{args:?}: {refused}");
            assert!(
                !refused.contains('\0') && !refused.contains('\u{1b}'),
                "control characters escaped: {refused}"
            );
        }
    }

    #[test]
    fn debug_output_hides_the_tokens() {
        let args = EproGatewayArgs { tokens: Some(vec!["s3cr3t".into()]), ..config::defaults() };
        assert!(!format!("{args:?}").contains("s3cr3t"));
        let config = args.with_tokens(vec!["s3cr3t".into()], None);
        assert!(!format!("{config:?}").contains("s3cr3t"));
    }
}
