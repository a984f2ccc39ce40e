//! Configuration of the site API: [`SiteApiArgs`], the settings (each a flag and an environment
//! variable, with its default), make a [`SiteApiConfig`], what the service runs with.

use std::net::SocketAddr;

use clap::Args;
use trialflow_http::auth::{TokenGrant, accepted_tokens, parse_tokens};
use trialflow_http::input::{DEFAULT_MAX_FUTURE_SKEW_SECS, parse_future_skew};
use trialflow_http::limits::{Limits, LimitsArgs};
use trialflow_http::oidc::{OidcArgs, OidcSettings};
use trialflow_outbox::SchemaName;
use trialflow_outbox::config::{self, DEFAULT_DATABASE_URL, at_least_one, setting, trimmed};
use trialflow_schemas::topics::TopicNames;

use super::error::SiteApiError;

/// Where the API listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";
/// Database connections of one API process by default.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;
const TOKENS_VAR: &str = "SITE_API_TOKENS";
/// Tokens of the local demo, one per role. Never use them beyond a local machine.
pub const DEMO_TOKENS: &str = "admin-token=admin:admin,site-token=site_staff:site-staff,\
                               pharmacist-token=pharmacist:pharmacist,researcher-token=researcher:researcher";

/// The site API's settings (`trialflow site-api`, and [`SiteApiConfig::local`]).
#[derive(Debug, Clone, Args)]
pub struct SiteApiArgs {
    /// Listen address (port 0 picks a free port).
    #[arg(long, env = "SITE_API_LISTEN", value_name = "ADDR", default_value = DEFAULT_LISTEN, value_parser = setting(trimmed::<SocketAddr>))]
    pub listen: SocketAddr,

    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, value_parser = setting(|url| Ok(url.to_string())))]
    pub database_url: String,

    /// The service schema holding the API's tables and its outbox (the relay must list it in
    /// OUTBOX_SOURCES).
    #[arg(long, env = "SITE_API_SCHEMA", default_value = super::SCHEMA, value_parser = setting(|name| SchemaName::new(name).map_err(|e| e.to_string())))]
    pub schema: SchemaName,

    /// Accepted static bearer tokens, `token=role:user` separated by commas; roles admin,
    /// site_staff, investigator, pharmacist, researcher; every study and site. For tests and
    /// trials: production uses an identity provider (OIDC_*). None when unset (see
    /// --demo-tokens). Prefer the variable: a flag shows in the process list.
    // A qualified `Vec`: the whole list is one value (clap would parse each item of a `Vec` alone).
    #[arg(long, env = TOKENS_VAR, hide_env_values = true, value_name = "TOKEN=ROLE:USER,...", value_parser = setting(parse_tokens))]
    pub tokens: Option<::std::vec::Vec<TokenGrant>>,

    /// Accept the local demo tokens (admin-token, site-token, pharmacist-token, researcher-token)
    /// when SITE_API_TOKENS gives none. Never in a shared environment.
    #[arg(long, env = "SITE_API_DEMO_TOKENS")]
    pub demo_tokens: bool,

    /// Prefix of every topic name, e.g. `staging.` (several environments on one cluster).
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// Size of the database pool (at least 1).
    #[arg(long, env = "SITE_API_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = setting(at_least_one::<u32>))]
    pub max_connections: u32,

    /// How far (seconds) a stated `occurred_at` or `signed_at` may lie ahead of the server's clock
    /// before the command is refused; at most 86400 (a day).
    #[arg(long, env = "SITE_API_MAX_FUTURE_SKEW_SECS", value_name = "SECS", default_value_t = DEFAULT_MAX_FUTURE_SKEW_SECS, value_parser = setting(parse_future_skew))]
    pub max_future_skew_secs: u64,

    /// How long ago (seconds) an investigator must have signed in at the identity provider (the
    /// token's `auth_time`) to break a treatment code; 1 to 3600.
    #[arg(long, env = "SITE_API_CODE_BREAK_MAX_AUTH_AGE_SECS", value_name = "SECS", default_value_t = super::code_break::DEFAULT_MAX_AUTH_AGE_SECS, value_parser = setting(super::code_break::parse_max_auth_age))]
    pub code_break_max_auth_age_secs: u64,

    #[command(flatten)]
    pub oidc: OidcArgs,
    /// Rate limits per token and per client address, and the request timeout.
    #[command(flatten)]
    pub limits: LimitsArgs,
}

impl SiteApiArgs {
    /// The configuration of these settings: the identity provider of OIDC_*, and the tokens of
    /// SITE_API_TOKENS, or, when it gives none, the demo tokens if `--demo-tokens`; an error when
    /// no caller could be authenticated.
    pub fn into_config(self) -> Result<SiteApiConfig, SiteApiError> {
        let oidc = self.oidc.settings().map_err(SiteApiError::Config)?;
        let tokens = accepted_tokens(self.tokens.clone(), self.demo_tokens, demo_tokens, oidc.is_some())
            .ok_or_else(|| {
                SiteApiError::Config(
                    "no caller can be authenticated: configure an identity provider (OIDC_ISSUER, \
                     OIDC_AUDIENCE, OIDC_JWKS), set SITE_API_TOKENS (token=role:user,...) or pass \
                     --demo-tokens"
                        .to_string(),
                )
            })?;
        Ok(self.with_tokens(tokens, oidc))
    }

    fn with_tokens(self, tokens: Vec<TokenGrant>, oidc: Option<OidcSettings>) -> SiteApiConfig {
        SiteApiConfig {
            oidc,
            listen: self.listen,
            database_url: self.database_url,
            schema: self.schema,
            tokens,
            topics: TopicNames::new(self.topic_prefix),
            max_connections: self.max_connections,
            max_future_skew_secs: self.max_future_skew_secs,
            code_break_max_auth_age_secs: self.code_break_max_auth_age_secs,
            limits: self.limits.limits(),
        }
    }
}

/// What the site API runs with (see [`SiteApiArgs`] for each setting).
#[derive(Debug, Clone)]
pub struct SiteApiConfig {
    /// Listen address (`SITE_API_LISTEN`; port 0 picks a free port).
    pub listen: SocketAddr,
    /// PostgreSQL connection URL (`DATABASE_URL`).
    pub database_url: String,
    /// The service schema holding the API's tables and its outbox (`SITE_API_SCHEMA`; the relay
    /// must list it in `OUTBOX_SOURCES`).
    pub schema: SchemaName,
    /// Accepted static bearer tokens (`SITE_API_TOKENS="tok1=admin:alice,tok2=site_staff:bob"`).
    /// Locally: [`DEMO_TOKENS`].
    pub tokens: Vec<TokenGrant>,
    /// The identity provider whose JWTs are accepted (`OIDC_*`), if any.
    pub oidc: Option<OidcSettings>,
    /// Deployed topic names (`TOPIC_PREFIX`).
    pub topics: TopicNames,
    /// Size of the database pool (`SITE_API_MAX_CONNECTIONS`).
    pub max_connections: u32,
    /// How far (seconds) a stated `occurred_at` or `signed_at` may lie ahead of the server's
    /// clock before the command is refused (`SITE_API_MAX_FUTURE_SKEW_SECS`, at most a day).
    pub max_future_skew_secs: u64,
    /// How long ago (seconds) an investigator must have signed in to break a treatment code
    /// (`SITE_API_CODE_BREAK_MAX_AUTH_AGE_SECS`, 1 to 3600).
    pub code_break_max_auth_age_secs: u64,
    /// Rate limits and the request timeout (`HTTP_RATE_LIMIT_*`, `HTTP_REQUEST_TIMEOUT_MS`).
    pub limits: Limits,
}

impl SiteApiConfig {
    /// For in-process use (`trialflow run`, the demo, tests): the defaults with the environment
    /// variables of [`SiteApiArgs`] that are set and valid applied (see
    /// [`config::from_env_lenient`]: an invalid one is logged and its default kept), and the
    /// demo tokens when `SITE_API_TOKENS` is unset, and the identity provider when `OIDC_*`
    /// configure one. A `SITE_API_TOKENS` or an OIDC setting that does not parse leaves NO token
    /// accepted rather than the demo tokens.
    /// Rate limits are off unless set ([`LimitsArgs::local_limits`]).
    pub fn local() -> Self {
        let (args, refused) = config::from_env_lenient::<SiteApiArgs>();
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
    fn configured(args: &[&str]) -> Result<SiteApiConfig, String> {
        let args = config::from_args::<SiteApiArgs>(args).map_err(|e| e.to_string())?;
        args.into_config().map_err(|e| e.to_string())
    }

    fn refusal(args: &[&str]) -> String {
        configured(args).err().unwrap_or_else(|| panic!("{args:?} was accepted"))
    }

    #[test]
    fn defaults_listen_locally_and_offer_one_demo_token_per_role_only_when_asked() {
        let args = config::defaults::<SiteApiArgs>();
        assert_eq!(args.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(args.schema.as_str(), crate::site_api::SCHEMA);
        assert_eq!(args.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(args.topic_prefix, "");
        assert_eq!((args.max_connections, args.max_future_skew_secs), (10, 300));
        assert_eq!(args.limits.limits(), trialflow_http::limits::Limits::default(), "production limits");
        assert!(args.tokens.is_none() && !args.demo_tokens);
        let Ok(config) = SiteApiArgs { demo_tokens: true, ..args }.into_config() else {
            panic!("the demo tokens were refused")
        };
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
    fn settings_parse_with_blanks_around_and_a_blank_is_the_default() {
        let parsed = configured(&[
            "--listen",
            " 0.0.0.0:9000 ",
            "--tokens",
            " t1=admin:ada , t2=researcher:rita ",
            "--max-connections",
            " 4 ",
            "--max-future-skew-secs",
            "86400",
            "--schema",
            "",
            "--topic-prefix",
            "staging.",
        ]);
        let Ok(config) = parsed else { panic!("{parsed:?}") };
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.tokens.iter().map(|g| g.user.as_str()).collect::<Vec<_>>(), ["ada", "rita"]);
        assert_eq!((config.max_connections, config.max_future_skew_secs), (4, 86_400));
        assert_eq!(config.schema.as_str(), crate::site_api::SCHEMA);
        assert_eq!(config.topics.prefix(), "staging.");
    }

    #[test]
    fn without_tokens_no_caller_is_accepted_unless_the_demo_tokens_are_asked_for() {
        for tokens in [&[][..], &["--tokens", ""], &["--tokens", " , "]] {
            let refused = refusal(tokens);
            assert!(
                refused.contains("set SITE_API_TOKENS") && refused.contains("--demo-tokens"),
                "{refused}"
            );
            let mut demo = tokens.to_vec();
            demo.push("--demo-tokens");
            assert_eq!(configured(&demo).map(|c| c.tokens.len()).ok(), Some(4), "{demo:?}");
        }
        let given = configured(&["--tokens", "t=admin:ada", "--demo-tokens"]);
        assert_eq!(given.map(|c| c.tokens.len()).ok(), Some(1), "given tokens replace the demo ones");
    }

    /// Set in the child process of [`local_reads_the_environment_leniently`].
    const CHILD: &str = "TRIALFLOW_SITE_API_LOCAL_CHILD";

    /// `local()` with the environment `vars` (and no other variable of [`SiteApiArgs`]), in a
    /// child process (this test binary, running only this test): the environment of this process
    /// stays untouched.
    #[test]
    fn local_reads_the_environment_leniently() {
        if std::env::var_os(CHILD).is_some() {
            let c = SiteApiConfig::local();
            let tokens: Vec<_> = c.tokens.iter().map(|g| g.user.as_str()).collect();
            let prefix = c.topics.prefix();
            let rate = |rate: Option<trialflow_http::limits::Rate>| rate.map_or(0, |r| r.per_second.get());
            println!(
                "local() = {} {} {} {} {prefix} [{}] {}/{} {:?}",
                c.listen,
                c.schema,
                c.max_connections,
                c.max_future_skew_secs,
                tokens.join(","),
                rate(c.limits.per_principal),
                rate(c.limits.per_address),
                c.limits.request_timeout,
            );
            return;
        }
        let demo = "admin,site-staff,pharmacist,researcher";
        let cases: &[(&[(&str, &str)], String)] = &[
            (&[], format!("127.0.0.1:8081 site_api 10 300  [{demo}] 0/0 30s")),
            (
                &[
                    ("SITE_API_LISTEN", " 127.0.0.1:9 "),
                    ("TOPIC_PREFIX", "staging."),
                    ("SITE_API_MAX_FUTURE_SKEW_SECS", "60"),
                ],
                format!("127.0.0.1:9 site_api 10 60 staging. [{demo}] 0/0 30s"),
            ),
            (
                &[
                    ("SITE_API_MAX_CONNECTIONS", "0"),
                    ("SITE_API_SCHEMA", "Bad-Name"),
                    ("SITE_API_LISTEN", "127.0.0.1:9"),
                ],
                format!("127.0.0.1:9 site_api 10 300  [{demo}] 0/0 30s"),
            ),
            (
                &[("SITE_API_SCHEMA", " "), ("SITE_API_TOKENS", "")],
                format!("127.0.0.1:8081 site_api 10 300  [{demo}] 0/0 30s"),
            ),
            (
                &[("SITE_API_TOKENS", "t=admin:ada")],
                "127.0.0.1:8081 site_api 10 300  [ada] 0/0 30s".to_string(),
            ),
            (&[("SITE_API_TOKENS", "not-a-grant")], "127.0.0.1:8081 site_api 10 300  [] 0/0 30s".to_string()),
            (&[("SITE_API_TOKENS", " , ")], "127.0.0.1:8081 site_api 10 300  [] 0/0 30s".to_string()),
            (
                &[("HTTP_RATE_LIMIT_PER_PRINCIPAL", "5"), ("HTTP_REQUEST_TIMEOUT_MS", "0")],
                format!("127.0.0.1:8081 site_api 10 300  [{demo}] 5/0 30s"),
            ),
        ];
        let test = format!(
            "{}::local_reads_the_environment_leniently",
            module_path!().split_once("::").map_or("", |(_, p)| p)
        );
        for (vars, expected) in cases {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap_or_default());
            child.args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"]).env(CHILD, "1");
            for var in SiteApiArgs::augment_args(clap::Command::new("site-api"))
                .get_arguments()
                .filter_map(|a| a.get_env())
            {
                child.env_remove(var);
            }
            child.envs(vars.iter().copied());
            let output = child.output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let seen = output
                .as_deref()
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.split_once("local() = ").map(|(_, seen)| seen))
                .map(str::to_string);
            assert_eq!(seen.as_ref(), Some(expected), "{vars:?}: {output:?}");
        }
    }

    #[test]
    fn hostile_settings_are_refused_naming_the_variable() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&["--listen", "127.0.0.1:80\0"], "SITE_API_LISTEN (--listen)", "invalid socket address"),
            (&["--listen", "localhost:8081"], "SITE_API_LISTEN (--listen)", "invalid socket address"),
            (&["--listen", "127.0.0.1:99999"], "SITE_API_LISTEN (--listen)", "invalid socket address"),
            (&["--schema", "site\u{7}api"], "SITE_API_SCHEMA (--schema)", "schema name"),
            (&["--schema", "Robert'); DROP TABLE"], "SITE_API_SCHEMA (--schema)", "schema name"),
            (&["--max-connections", "0"], "SITE_API_MAX_CONNECTIONS (--max-connections)", "at least 1"),
            (&["--max-connections=-1"], "SITE_API_MAX_CONNECTIONS (--max-connections)", "invalid digit"),
            (
                &["--max-connections", "4294967296"],
                "SITE_API_MAX_CONNECTIONS (--max-connections)",
                "too large",
            ),
            (
                &["--max-future-skew-secs", "86401"],
                "SITE_API_MAX_FUTURE_SKEW_SECS (--max-future-skew-secs)",
                "at most 86400",
            ),
            (
                &["--max-future-skew-secs", "1e9"],
                "SITE_API_MAX_FUTURE_SKEW_SECS (--max-future-skew-secs)",
                "invalid digit",
            ),
            (&["--tokens", "s3cr3t"], "SITE_API_TOKENS (--tokens)", "token #1 is not `token=role:user`"),
            (&["--tokens", "s3cr3t=boss:ada"], "SITE_API_TOKENS (--tokens)", "unknown role `boss`"),
            (&["--tokens", "s3cr3t=admin: "], "SITE_API_TOKENS (--tokens)", "empty token or user"),
            (&["--tokens", "s3cr3t=admin:a,s3cr3t=admin:b"], "SITE_API_TOKENS (--tokens)", "given twice"),
            (
                &["--rate-limit-per-principal=-1"],
                "HTTP_RATE_LIMIT_PER_PRINCIPAL (--rate-limit-per-principal)",
                "invalid digit",
            ),
            (
                &["--rate-limit-per-address-burst", "0"],
                "HTTP_RATE_LIMIT_PER_ADDRESS_BURST (--rate-limit-per-address-burst)",
                "at least 1",
            ),
            (&["--request-timeout-ms", "0"], "HTTP_REQUEST_TIMEOUT_MS (--request-timeout-ms)", "at least 1"),
            (
                &["--request-timeout-ms", "99999999999999999999"],
                "HTTP_REQUEST_TIMEOUT_MS (--request-timeout-ms)",
                "too large",
            ),
            (
                &["--request-timeout-ms", "1\0"],
                "HTTP_REQUEST_TIMEOUT_MS (--request-timeout-ms)",
                "invalid digit",
            ),
            (
                &["--oidc-issuer", "https://idp\0"],
                "OIDC_ISSUER (--oidc-issuer)",
                "without control characters",
            ),
            (&["--oidc-jwks", &"x".repeat(3000)], "OIDC_JWKS (--oidc-jwks)", "1 to 2048 characters"),
            (&["--oidc-leeway-secs", "301"], "OIDC_LEEWAY_SECS (--oidc-leeway-secs)", "0 to 300"),
            (&["--oidc-leeway-secs=-1"], "OIDC_LEEWAY_SECS (--oidc-leeway-secs)", "0 to 300"),
            (
                &["--oidc-jwks-refresh-secs", "1"],
                "OIDC_JWKS_REFRESH_SECS (--oidc-jwks-refresh-secs)",
                "10 to 86400",
            ),
            (&["--oidc-role-claim", "roles[0]"], "OIDC_ROLE_CLAIM (--oidc-role-claim)", "claim name"),
            (&["--oidc-sites-claim", "a..b"], "OIDC_SITES_CLAIM (--oidc-sites-claim)", "claim name"),
            (&["--oidc-issuer", "https://idp"], "OIDC_AUDIENCE", "set OIDC_AUDIENCE too"),
            (&["--oidc-issuer", "https://idp", "--oidc-audience", "a"], "OIDC_JWKS", "set OIDC_JWKS"),
            (&["--oidc-audience", "a", "--demo-tokens"], "OIDC_ISSUER", "without OIDC_ISSUER"),
        ];
        for (args, var, reason) in cases {
            let refused = refusal(args);
            assert!(refused.contains(var) && refused.contains(reason), "{args:?}: {refused}");
            assert!(
                !refused.contains('\0') && !refused.contains('\u{7}'),
                "control characters escaped: {refused}"
            );
            assert!(!refused.contains("s3cr3t"), "a token is never shown: {refused}");
        }
    }
}
