//! Configuration of the alert API: [`AlertApiArgs`], the settings (each a flag and an environment
//! variable, with its default; the conventions and token format of the site API's), make an
//! [`AlertApiConfig`], what the service runs with.

use std::net::SocketAddr;

use clap::Args;
use trialflow_http::auth::{TokenGrant, accepted_tokens, parse_tokens};
use trialflow_http::limits::{Limits, LimitsArgs};
use trialflow_http::oidc::{OidcArgs, OidcSettings};
use trialflow_outbox::SchemaName;
use trialflow_outbox::config::{self, DEFAULT_DATABASE_URL, setting, trimmed};
use trialflow_schemas::topics::TopicNames;

use super::AlertApiError;

/// Where the API listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8083";
const TOKENS_VAR: &str = "ALERT_API_TOKENS";
/// The token of the local demo. Never use it beyond a local machine.
pub const DEMO_TOKENS: &str = "researcher-token=researcher:researcher";

/// The alert API's settings (`trialflow alert-api`, and [`AlertApiConfig::local`]).
#[derive(Debug, Clone, Args)]
pub struct AlertApiArgs {
    /// Listen address (port 0 picks a free port).
    #[arg(long, env = "ALERT_API_LISTEN", value_name = "ADDR", default_value = DEFAULT_LISTEN, value_parser = setting(trimmed::<SocketAddr>))]
    pub listen: SocketAddr,

    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, value_parser = setting(|url| Ok(url.to_string())))]
    pub database_url: String,

    /// The monitoring service's schema: its alert tables and the outbox the API's events go to.
    #[arg(long, env = "ALERT_API_SCHEMA", default_value = crate::monitoring::SCHEMA, value_parser = setting(|name| SchemaName::new(name).map_err(|e| e.to_string())))]
    pub schema: SchemaName,

    /// The risk service's schema: the KRI table the dashboard's study and site pages show.
    #[arg(long, env = "ALERT_API_RISK_SCHEMA", default_value = crate::risk::SCHEMA, value_parser = setting(|name| SchemaName::new(name).map_err(|e| e.to_string())))]
    pub risk_schema: SchemaName,

    /// Accepted bearer tokens, in the format of SITE_API_TOKENS (`token=role:user,...`);
    /// researchers and admins may use the API, other roles get 403. None when unset (see
    /// --demo-tokens). Prefer the variable: a flag shows in the process list.
    // A qualified `Vec`: the whole list is one value (clap would parse each item of a `Vec` alone).
    #[arg(long, env = TOKENS_VAR, hide_env_values = true, value_name = "TOKEN=ROLE:USER,...", value_parser = setting(parse_tokens))]
    pub tokens: Option<::std::vec::Vec<TokenGrant>>,

    /// Accept the local demo token (`researcher-token`) when ALERT_API_TOKENS gives none. Never
    /// in a shared environment.
    #[arg(long, env = "ALERT_API_DEMO_TOKENS")]
    pub demo_tokens: bool,

    /// Prefix of every topic name, e.g. `staging.` (several environments on one cluster).
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    #[command(flatten)]
    pub oidc: OidcArgs,
    /// Rate limits per token and per client address, and the request timeout (not of a stream's
    /// events: a stream stays open).
    #[command(flatten)]
    pub limits: LimitsArgs,
}

impl AlertApiArgs {
    /// The configuration of these settings: the tokens of ALERT_API_TOKENS, or, when it gives
    /// none, the demo token if `--demo-tokens`; else an error (no researcher could be
    /// authenticated).
    pub fn into_config(self) -> Result<AlertApiConfig, AlertApiError> {
        let oidc = self.oidc.settings().map_err(AlertApiError::Config)?;
        let tokens = accepted_tokens(self.tokens.clone(), self.demo_tokens, demo_tokens, oidc.is_some())
            .ok_or_else(|| {
                AlertApiError::Config(
                    "no researcher can be authenticated: configure an identity provider \
                     (OIDC_ISSUER, OIDC_AUDIENCE, OIDC_JWKS), set ALERT_API_TOKENS \
                     (token=role:user,...) or pass --demo-tokens"
                        .to_string(),
                )
            })?;
        Ok(self.with_tokens(tokens, oidc))
    }

    fn with_tokens(self, tokens: Vec<TokenGrant>, oidc: Option<OidcSettings>) -> AlertApiConfig {
        AlertApiConfig {
            oidc,
            listen: self.listen,
            database_url: self.database_url,
            schema: self.schema,
            risk_schema: self.risk_schema,
            tokens,
            topics: TopicNames::new(self.topic_prefix),
            limits: self.limits.limits(),
        }
    }
}

/// What the alert API runs with (see [`AlertApiArgs`] for each setting).
#[derive(Debug, Clone)]
pub struct AlertApiConfig {
    /// Listen address (`ALERT_API_LISTEN`; port 0 picks a free port).
    pub listen: SocketAddr,
    /// PostgreSQL connection URL (`DATABASE_URL`).
    pub database_url: String,
    /// The monitoring service's schema: its alert tables and the outbox the API's events go to
    /// (`ALERT_API_SCHEMA`).
    pub schema: SchemaName,
    /// The risk service's schema: the KRI table of the dashboard (`ALERT_API_RISK_SCHEMA`).
    pub risk_schema: SchemaName,
    /// Accepted bearer tokens, in the format of `SITE_API_TOKENS`
    /// (`ALERT_API_TOKENS="tok1=researcher:rita,tok2=admin:ada"`); researchers and admins may use
    /// the API, other roles get 403. Locally: [`DEMO_TOKENS`].
    pub tokens: Vec<TokenGrant>,
    /// The identity provider whose JWTs are accepted (`OIDC_*`), if any.
    pub oidc: Option<OidcSettings>,
    /// Deployed topic names (`TOPIC_PREFIX`).
    pub topics: TopicNames,
    /// Rate limits and the request timeout (`HTTP_RATE_LIMIT_*`, `HTTP_REQUEST_TIMEOUT_MS`).
    pub limits: Limits,
}

impl AlertApiConfig {
    /// For in-process use (`trialflow run`, the demo, tests): the defaults with the environment
    /// variables of [`AlertApiArgs`] that are set and valid applied (see
    /// [`config::from_env_lenient`]: an invalid one is logged and its default kept), and the
    /// demo token when `ALERT_API_TOKENS` is unset, and the identity provider when `OIDC_*`
    /// configure one. An `ALERT_API_TOKENS` or an OIDC setting that does not parse leaves NO
    /// token accepted rather than the demo token.
    /// Rate limits are off unless set ([`LimitsArgs::local_limits`]).
    pub fn local() -> Self {
        let (args, refused) = config::from_env_lenient::<AlertApiArgs>();
        let oidc = trialflow_http::oidc::local_settings(&args.oidc, &refused);
        let tokens = match &args.tokens {
            _ if refused.iter().any(|var| var == TOKENS_VAR) || oidc.is_err() => Vec::new(),
            Some(tokens) => tokens.clone(),
            None => demo_tokens(),
        };
        Self { limits: args.limits.local_limits(), ..args.with_tokens(tokens, oidc.unwrap_or(None)) }
    }
}

fn demo_tokens() -> Vec<TokenGrant> {
    parse_tokens(DEMO_TOKENS).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use trialflow_http::auth::Role;

    use super::*;

    /// The configuration of the flags `args`.
    fn configured(args: &[&str]) -> Result<AlertApiConfig, String> {
        let args = config::from_args::<AlertApiArgs>(args).map_err(|e| e.to_string())?;
        args.into_config().map_err(|e| e.to_string())
    }

    fn refusal(args: &[&str]) -> String {
        configured(args).err().unwrap_or_else(|| panic!("{args:?} was accepted"))
    }

    #[test]
    fn defaults_listen_locally_and_offer_the_demo_researcher_only_when_asked() {
        let args = config::defaults::<AlertApiArgs>();
        assert_eq!(args.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(args.schema.as_str(), crate::monitoring::SCHEMA);
        assert_eq!(args.risk_schema.as_str(), crate::risk::SCHEMA);
        assert_eq!(args.database_url, DEFAULT_DATABASE_URL);
        assert!(args.tokens.is_none() && !args.demo_tokens);
        assert_eq!(args.limits.limits(), Limits::default(), "production limits");
        let Ok(config) = AlertApiArgs { demo_tokens: true, ..args }.into_config() else {
            panic!("the demo token was refused")
        };
        let tokens: Vec<_> =
            config.tokens.iter().map(|g| (g.token.as_str(), g.role, g.user.as_str())).collect();
        assert_eq!(tokens, [("researcher-token", Role::Researcher, "researcher")]);
    }

    #[test]
    fn settings_parse_with_blanks_around_and_a_blank_is_the_default() {
        let parsed = configured(&["--listen", " 0.0.0.0:9000 ", "--tokens", "t=admin:ada", "--schema", " "]);
        let Ok(config) = parsed else { panic!("{parsed:?}") };
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.schema.as_str(), crate::monitoring::SCHEMA);
        assert_eq!(config.tokens.len(), 1);
    }

    #[test]
    fn without_tokens_no_researcher_is_accepted_unless_the_demo_token_is_asked_for() {
        for tokens in [&[][..], &["--tokens", ""], &["--tokens", ","]] {
            let refused = refusal(tokens);
            assert!(
                refused.contains("set ALERT_API_TOKENS") && refused.contains("--demo-tokens"),
                "{refused}"
            );
            let mut demo = tokens.to_vec();
            demo.push("--demo-tokens");
            assert_eq!(configured(&demo).map(|c| c.tokens.len()).ok(), Some(1), "{demo:?}");
        }
    }

    #[test]
    fn hostile_settings_are_refused_naming_the_variable() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&["--listen", "localhost"], "ALERT_API_LISTEN (--listen)", "invalid socket address"),
            (&["--listen", "127.0.0.1:8083\0"], "ALERT_API_LISTEN (--listen)", "invalid socket address"),
            (&["--schema", "monitoring\n"], "ALERT_API_SCHEMA (--schema)", "schema name"),
            (&["--schema", &"m".repeat(64)], "ALERT_API_SCHEMA (--schema)", "schema name"),
            (&["--tokens", "s3cr3t"], "ALERT_API_TOKENS (--tokens)", "token #1 is not `token=role:user`"),
            (
                &["--tokens", "a=researcher:rita,s3cr3t=chief:x"],
                "ALERT_API_TOKENS (--tokens)",
                "unknown role",
            ),
            (
                &["--tokens", "s3cr3t=researcher:a,s3cr3t=admin:b"],
                "ALERT_API_TOKENS (--tokens)",
                "given twice",
            ),
            (
                &["--rate-limit-per-address=-200"],
                "HTTP_RATE_LIMIT_PER_ADDRESS (--rate-limit-per-address)",
                "invalid digit",
            ),
            (
                &["--rate-limit-per-address-burst", "4294967296"],
                "HTTP_RATE_LIMIT_PER_ADDRESS_BURST (--rate-limit-per-address-burst)",
                "too large",
            ),
            (
                &["--request-timeout-ms", "3600001"],
                "HTTP_REQUEST_TIMEOUT_MS (--request-timeout-ms)",
                "at most 3600000",
            ),
            (
                &["--request-timeout-ms", "5\0"],
                "HTTP_REQUEST_TIMEOUT_MS (--request-timeout-ms)",
                "invalid digit",
            ),
        ];
        for (args, var, reason) in cases {
            let refused = refusal(args);
            assert!(refused.contains(var) && refused.contains(reason), "{args:?}: {refused}");
            assert!(!refused.contains('\0'), "control characters escaped: {refused}");
            assert!(!refused.contains("s3cr3t"), "a token is never shown: {refused}");
        }
    }
}
