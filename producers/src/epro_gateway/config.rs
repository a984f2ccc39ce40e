//! Configuration of the ePRO gateway: local defaults, every field overridable by environment variable.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use trialflow_http::clock::Clock;
use trialflow_http::input::{DEFAULT_MAX_FUTURE_SKEW_SECS, parse_future_skew};
use trialflow_outbox::KafkaConfig;
use trialflow_schemas::topics::TopicNames;

use super::error::EproGatewayError;

/// Where the gateway listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8082";
/// How long a submission waits for the broker's acknowledgement by default.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 10_000;
const SKEW_VAR: &str = "EPRO_GATEWAY_MAX_FUTURE_SKEW_SECS";
/// The app token of the local demo. Never use it beyond a local machine.
pub const DEMO_TOKEN: &str = "app-token";

#[derive(Clone)]
pub struct EproGatewayConfig {
    /// Listen address (`EPRO_GATEWAY_LISTEN`, default `127.0.0.1:8082`; port 0 picks a free port).
    pub listen: SocketAddr,
    /// The broker and producer settings (`KAFKA_BOOTSTRAP_SERVERS`, `KAFKA_LINGER_MS`,
    /// `KAFKA_PRODUCER_CONFIG`; `KAFKA_DELIVERY_TIMEOUT_MS` is not used: the ack timeout is).
    pub kafka: KafkaConfig,
    /// Deployed topic names (`TOPIC_PREFIX`).
    pub topics: TopicNames,
    /// Accepted app tokens (`EPRO_GATEWAY_TOKENS`, comma-separated). Locally: [`DEMO_TOKEN`].
    pub tokens: Vec<String>,
    /// How long a submission waits for the broker's acknowledgement before it is answered 503
    /// (`EPRO_GATEWAY_ACK_TIMEOUT_MS`, default 10000; librdkafka `message.timeout.ms`).
    pub ack_timeout_ms: u64,
    /// Where `received_at` comes from: the system clock, or a replay's virtual clock (set in
    /// code only, by an in-process replay; never from the environment).
    pub clock: Clock,
    /// How far a submission's `authored_at`, `occurred_at` or `recorded_at` may lie ahead of
    /// `clock` before it is refused (`EPRO_GATEWAY_MAX_FUTURE_SKEW_SECS`, default 300, at most a
    /// day).
    pub max_future_skew_secs: u64,
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
            .finish()
    }
}

impl EproGatewayConfig {
    /// Local defaults (the demo token included) with the environment variables that are set and
    /// valid applied. An invalid value is logged and its default kept, except for
    /// `EPRO_GATEWAY_TOKENS`: when it is set, its tokens replace the demo token. Use
    /// [`EproGatewayConfig::from_env`] to refuse invalid values instead.
    pub fn local() -> Self {
        let mut config = Self::defaults();
        let warn = |var: &str, e: String| tracing::warn!(var, error = %e, "Ignoring invalid setting.");
        if let Some(v) = env("EPRO_GATEWAY_LISTEN") {
            match parse::<SocketAddr>("EPRO_GATEWAY_LISTEN", &v) {
                Ok(listen) => config.listen = listen,
                Err(e) => warn("EPRO_GATEWAY_LISTEN", e),
            }
        }
        match kafka_from_env() {
            Ok(kafka) => config.kafka = kafka,
            Err(e) => warn("KAFKA_*", e),
        }
        if let Some(v) = env("EPRO_GATEWAY_TOKENS") {
            config.tokens = parse_tokens(&v);
        }
        if let Some(v) = env("EPRO_GATEWAY_ACK_TIMEOUT_MS") {
            match parse_ack_timeout(&v) {
                Ok(ms) => config.ack_timeout_ms = ms,
                Err(e) => warn("EPRO_GATEWAY_ACK_TIMEOUT_MS", e),
            }
        }
        if let Some(v) = env(SKEW_VAR) {
            match parse_future_skew(SKEW_VAR, &v) {
                Ok(secs) => config.max_future_skew_secs = secs,
                Err(e) => warn(SKEW_VAR, e),
            }
        }
        config
    }

    /// Like [`EproGatewayConfig::local`], but an invalid environment variable is an error, and
    /// without `EPRO_GATEWAY_TOKENS` no token is accepted (no demo token outside local use).
    pub fn from_env() -> Result<Self, EproGatewayError> {
        let mut config = Self::defaults();
        config.tokens = Vec::new();
        if let Some(v) = env("EPRO_GATEWAY_LISTEN") {
            config.listen = parse("EPRO_GATEWAY_LISTEN", &v).map_err(EproGatewayError::Config)?;
        }
        config.kafka = kafka_from_env().map_err(EproGatewayError::Config)?;
        if let Some(v) = env("EPRO_GATEWAY_TOKENS") {
            config.tokens = parse_tokens(&v);
        }
        if let Some(v) = env("EPRO_GATEWAY_ACK_TIMEOUT_MS") {
            config.ack_timeout_ms = parse_ack_timeout(&v).map_err(EproGatewayError::Config)?;
        }
        if let Some(v) = env(SKEW_VAR) {
            config.max_future_skew_secs =
                parse_future_skew(SKEW_VAR, &v).map_err(EproGatewayError::Config)?;
        }
        Ok(config)
    }

    fn defaults() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8082)),
            kafka: KafkaConfig::default(),
            topics: TopicNames::from_env(),
            tokens: vec![DEMO_TOKEN.to_string()],
            ack_timeout_ms: DEFAULT_ACK_TIMEOUT_MS,
            clock: Clock::System,
            max_future_skew_secs: DEFAULT_MAX_FUTURE_SKEW_SECS,
        }
    }
}

/// The Kafka settings from the same environment variables, with the same parsing, as every other
/// trialflow component (they are declared once, on [`KafkaConfig`]).
fn kafka_from_env() -> Result<KafkaConfig, String> {
    #[derive(clap::Parser)]
    struct FromEnv {
        #[command(flatten)]
        kafka: KafkaConfig,
    }
    <FromEnv as clap::Parser>::try_parse_from(["epro-gateway"])
        .map(|parsed| parsed.kafka)
        .map_err(|e| e.to_string().trim().to_string())
}

/// Tokens separated by commas; blanks around items are ignored, an empty string is no tokens.
fn parse_tokens(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_string).collect()
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

fn parse<T: FromStr>(var: &str, value: &str) -> Result<T, String>
where
    T::Err: fmt::Display,
{
    value.trim().parse().map_err(|e| format!("{var}=`{value}`: {e}"))
}

/// librdkafka reads a `message.timeout.ms` of 0 as "never": a request would then wait forever.
fn parse_ack_timeout(value: &str) -> Result<u64, String> {
    match parse::<u64>("EPRO_GATEWAY_ACK_TIMEOUT_MS", value)? {
        0 => Err("EPRO_GATEWAY_ACK_TIMEOUT_MS must be at least 1".to_string()),
        ms => Ok(ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_defaults_accept_the_demo_token() {
        let config = EproGatewayConfig::defaults();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.tokens, [DEMO_TOKEN]);
        assert_eq!(config.ack_timeout_ms, DEFAULT_ACK_TIMEOUT_MS);
    }

    #[test]
    fn tokens_are_comma_separated() {
        assert_eq!(parse_tokens(" a, b ,,c"), ["a", "b", "c"]);
        assert!(parse_tokens(" , ").is_empty());
    }

    #[test]
    fn the_future_skew_defaults_to_five_minutes() {
        assert_eq!(EproGatewayConfig::defaults().max_future_skew_secs, 300);
    }

    #[test]
    fn ack_timeouts_must_be_positive() {
        assert_eq!(parse_ack_timeout(" 1500 "), Ok(1500));
        assert!(parse_ack_timeout("0").is_err());
        assert!(parse_ack_timeout("soon").is_err());
    }

    #[test]
    fn kafka_settings_come_from_the_shared_variables() {
        let kafka = kafka_from_env();
        let expected = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
            .unwrap_or_else(|_| trialflow_outbox::config::DEFAULT_KAFKA_BOOTSTRAP_SERVERS.to_string());
        assert_eq!(kafka.map(|k| k.bootstrap_servers), Ok(expected));
    }

    #[test]
    fn debug_output_hides_the_tokens() {
        let config = EproGatewayConfig { tokens: vec!["s3cr3t".into()], ..EproGatewayConfig::defaults() };
        assert!(!format!("{config:?}").contains("s3cr3t"));
    }
}
