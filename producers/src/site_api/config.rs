//! Configuration of the site API: local defaults, every field overridable by environment variable.

use std::net::SocketAddr;
use std::str::FromStr;

use trialflow_http::auth::{TokenGrant, parse_tokens};
use trialflow_http::input::{DEFAULT_MAX_FUTURE_SKEW_SECS, parse_future_skew};
use trialflow_outbox::SchemaName;
use trialflow_outbox::config::DEFAULT_DATABASE_URL;
use trialflow_schemas::topics::TopicNames;

use super::error::SiteApiError;

/// Where the API listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";
/// Database connections of one API process by default.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;
const SKEW_VAR: &str = "SITE_API_MAX_FUTURE_SKEW_SECS";
/// Tokens of the local demo, one per role. Never use them beyond a local machine.
pub const DEMO_TOKENS: &str = "admin-token=admin:admin,site-token=site_staff:site-staff,\
                               pharmacist-token=pharmacist:pharmacist,researcher-token=researcher:researcher";

#[derive(Debug, Clone)]
pub struct SiteApiConfig {
    /// Listen address (`SITE_API_LISTEN`, default `127.0.0.1:8081`; port 0 picks a free port).
    pub listen: SocketAddr,
    /// PostgreSQL connection URL (`DATABASE_URL`).
    pub database_url: String,
    /// The service schema holding the API's tables and its outbox (`SITE_API_SCHEMA`, default
    /// `site_api`; the relay must list it in `OUTBOX_SOURCES`).
    pub schema: SchemaName,
    /// Accepted bearer tokens (`SITE_API_TOKENS="tok1=admin:alice,tok2=site_staff:bob"`; roles
    /// admin, site_staff, pharmacist, researcher). Locally: [`DEMO_TOKENS`].
    pub tokens: Vec<TokenGrant>,
    /// Deployed topic names (`TOPIC_PREFIX`).
    pub topics: TopicNames,
    /// Size of the database pool (`SITE_API_MAX_CONNECTIONS`, default 10).
    pub max_connections: u32,
    /// How far a stated `occurred_at` or `signed_at` may lie ahead of the server's clock before
    /// the command is refused (`SITE_API_MAX_FUTURE_SKEW_SECS`, default 300, at most a day).
    pub max_future_skew_secs: u64,
}

impl SiteApiConfig {
    /// Local defaults (demo tokens included) with the environment variables that are set and
    /// valid applied. An invalid value is logged and its default kept, except for
    /// `SITE_API_TOKENS`: a token list that does not parse leaves NO token accepted rather than
    /// the demo tokens. Use [`SiteApiConfig::from_env`] to refuse invalid values instead.
    pub fn local() -> Self {
        let mut config = Self::defaults();
        let warn = |var: &str, e: String| tracing::warn!(var, error = %e, "Ignoring invalid setting.");
        if let Some(v) = env("SITE_API_LISTEN") {
            match parse::<SocketAddr>("SITE_API_LISTEN", &v) {
                Ok(listen) => config.listen = listen,
                Err(e) => warn("SITE_API_LISTEN", e),
            }
        }
        if let Some(v) = env("DATABASE_URL") {
            config.database_url = v;
        }
        if let Some(v) = env("SITE_API_SCHEMA") {
            match SchemaName::new(v) {
                Ok(schema) => config.schema = schema,
                Err(e) => warn("SITE_API_SCHEMA", e.to_string()),
            }
        }
        if let Some(v) = env("SITE_API_TOKENS") {
            config.tokens = parse_tokens(&v).unwrap_or_else(|e| {
                warn("SITE_API_TOKENS", e);
                Vec::new()
            });
        }
        if let Some(v) = env("SITE_API_MAX_CONNECTIONS") {
            match parse_connections(&v) {
                Ok(n) => config.max_connections = n,
                Err(e) => warn("SITE_API_MAX_CONNECTIONS", e),
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

    /// Like [`SiteApiConfig::local`], but an invalid environment variable is an error, and
    /// without `SITE_API_TOKENS` no token is accepted (no demo tokens outside local use).
    pub fn from_env() -> Result<Self, SiteApiError> {
        let mut config = Self::defaults();
        config.tokens = Vec::new();
        if let Some(v) = env("SITE_API_LISTEN") {
            config.listen = parse("SITE_API_LISTEN", &v).map_err(SiteApiError::Config)?;
        }
        if let Some(v) = env("DATABASE_URL") {
            config.database_url = v;
        }
        if let Some(v) = env("SITE_API_SCHEMA") {
            config.schema =
                SchemaName::new(v).map_err(|e| SiteApiError::Config(format!("SITE_API_SCHEMA: {e}")))?;
        }
        if let Some(v) = env("SITE_API_TOKENS") {
            config.tokens =
                parse_tokens(&v).map_err(|e| SiteApiError::Config(format!("SITE_API_TOKENS: {e}")))?;
        }
        if let Some(v) = env("SITE_API_MAX_CONNECTIONS") {
            config.max_connections = parse_connections(&v).map_err(SiteApiError::Config)?;
        }
        if let Some(v) = env(SKEW_VAR) {
            config.max_future_skew_secs = parse_future_skew(SKEW_VAR, &v).map_err(SiteApiError::Config)?;
        }
        Ok(config)
    }

    fn defaults() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            database_url: DEFAULT_DATABASE_URL.to_string(),
            schema: super::schema(),
            tokens: parse_tokens(DEMO_TOKENS).unwrap_or_default(),
            topics: TopicNames::from_env(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_future_skew_secs: DEFAULT_MAX_FUTURE_SKEW_SECS,
        }
    }
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

fn parse<T: FromStr>(var: &str, value: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    value.trim().parse().map_err(|e| format!("{var}=`{value}`: {e}"))
}

fn parse_connections(value: &str) -> Result<u32, String> {
    match parse::<u32>("SITE_API_MAX_CONNECTIONS", value)? {
        0 => Err("SITE_API_MAX_CONNECTIONS must be at least 1".to_string()),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trialflow_http::auth::Role;

    #[test]
    fn local_defaults_offer_one_demo_token_per_role() {
        let config = SiteApiConfig::defaults();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.schema.as_str(), crate::site_api::SCHEMA);
        let roles: Vec<_> = config.tokens.iter().map(|g| (g.token.as_str(), g.role)).collect();
        assert_eq!(
            roles,
            [
                ("admin-token", Role::Admin),
                ("site-token", Role::SiteStaff),
                ("pharmacist-token", Role::Pharmacist),
                ("researcher-token", Role::Researcher),
            ]
        );
    }

    #[test]
    fn the_future_skew_defaults_to_five_minutes() {
        assert_eq!(SiteApiConfig::defaults().max_future_skew_secs, 300);
    }

    #[test]
    fn connection_counts_must_be_positive() {
        assert_eq!(parse_connections(" 4 "), Ok(4));
        assert!(parse_connections("0").is_err());
        assert!(parse_connections("many").is_err());
    }
}
