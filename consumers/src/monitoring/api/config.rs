//! Configuration of the alert API: local defaults, every field overridable by environment variable
//! (the conventions and token format of the site API's configuration).

use std::net::SocketAddr;
use std::str::FromStr;

use trialflow_http::auth::{TokenGrant, parse_tokens};
use trialflow_outbox::SchemaName;
use trialflow_outbox::config::DEFAULT_DATABASE_URL;
use trialflow_schemas::topics::TopicNames;

use super::AlertApiError;

/// Where the API listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8083";
/// The token of the local demo. Never use it beyond a local machine.
pub const DEMO_TOKENS: &str = "researcher-token=researcher:researcher";

#[derive(Debug, Clone)]
pub struct AlertApiConfig {
    /// Listen address (`ALERT_API_LISTEN`, default `127.0.0.1:8083`; port 0 picks a free port).
    pub listen: SocketAddr,
    /// PostgreSQL connection URL (`DATABASE_URL`).
    pub database_url: String,
    /// The monitoring service's schema: its alert tables and the outbox the API's events go to
    /// (`ALERT_API_SCHEMA`, default `monitoring`).
    pub schema: SchemaName,
    /// Accepted bearer tokens, in the format of `SITE_API_TOKENS`
    /// (`ALERT_API_TOKENS="tok1=researcher:rita,tok2=admin:ada"`); researchers and admins may use
    /// the API, other roles get 403. Locally: [`DEMO_TOKENS`].
    pub tokens: Vec<TokenGrant>,
    /// Deployed topic names (`TOPIC_PREFIX`).
    pub topics: TopicNames,
}

impl AlertApiConfig {
    /// Local defaults (the demo token included) with the environment variables that are set and
    /// valid applied. An invalid value is logged and its default kept, except for
    /// `ALERT_API_TOKENS`: a token list that does not parse leaves NO token accepted rather than
    /// the demo token. Use [`AlertApiConfig::from_env`] to refuse invalid values instead.
    pub fn local() -> Self {
        let mut config = Self::defaults();
        let warn = |var: &str, e: String| tracing::warn!(var, error = %e, "Ignoring invalid setting.");
        if let Some(v) = env("ALERT_API_LISTEN") {
            match parse_listen(&v) {
                Ok(listen) => config.listen = listen,
                Err(e) => warn("ALERT_API_LISTEN", e),
            }
        }
        if let Some(v) = env("DATABASE_URL") {
            config.database_url = v;
        }
        if let Some(v) = env("ALERT_API_SCHEMA") {
            match SchemaName::new(v) {
                Ok(schema) => config.schema = schema,
                Err(e) => warn("ALERT_API_SCHEMA", e.to_string()),
            }
        }
        if let Some(v) = env("ALERT_API_TOKENS") {
            config.tokens = parse_tokens(&v).unwrap_or_else(|e| {
                warn("ALERT_API_TOKENS", e);
                Vec::new()
            });
        }
        config
    }

    /// Like [`AlertApiConfig::local`], but an invalid environment variable is an error, and
    /// without `ALERT_API_TOKENS` no token is accepted (no demo token outside local use).
    pub fn from_env() -> Result<Self, AlertApiError> {
        let mut config = Self::defaults();
        config.tokens = Vec::new();
        if let Some(v) = env("ALERT_API_LISTEN") {
            config.listen = parse_listen(&v).map_err(AlertApiError::Config)?;
        }
        if let Some(v) = env("DATABASE_URL") {
            config.database_url = v;
        }
        if let Some(v) = env("ALERT_API_SCHEMA") {
            config.schema =
                SchemaName::new(v).map_err(|e| AlertApiError::Config(format!("ALERT_API_SCHEMA: {e}")))?;
        }
        if let Some(v) = env("ALERT_API_TOKENS") {
            config.tokens =
                parse_tokens(&v).map_err(|e| AlertApiError::Config(format!("ALERT_API_TOKENS: {e}")))?;
        }
        Ok(config)
    }

    fn defaults() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8083)),
            database_url: DEFAULT_DATABASE_URL.to_string(),
            schema: crate::monitoring::schema(),
            tokens: parse_tokens(DEMO_TOKENS).unwrap_or_default(),
            topics: TopicNames::from_env(),
        }
    }
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    SocketAddr::from_str(value.trim()).map_err(|e| format!("ALERT_API_LISTEN=`{value}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trialflow_http::auth::Role;

    #[test]
    fn local_defaults_offer_the_demo_researcher() {
        let config = AlertApiConfig::defaults();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.schema.as_str(), crate::monitoring::SCHEMA);
        let tokens: Vec<_> =
            config.tokens.iter().map(|g| (g.token.as_str(), g.role, g.user.as_str())).collect();
        assert_eq!(tokens, [("researcher-token", Role::Researcher, "researcher")]);
    }

    #[test]
    fn listen_addresses_must_parse() {
        assert_eq!(parse_listen(" 0.0.0.0:9000 ").map(|a| a.port()), Ok(9000));
        assert!(parse_listen("localhost").is_err());
    }
}
