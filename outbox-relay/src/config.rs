//! Typed configuration. Every field has a local default and an environment variable, so pointing
//! at a real cluster means setting `DATABASE_URL` / `KAFKA_BOOTSTRAP_SERVERS` and nothing else.
//!
//! The idiom of every component's configuration: a clap [`Args`] struct whose fields each have a
//! doc comment, a flag, an environment variable and (unless unset means something) a default,
//! written once, in the `#[arg]`. The helpers below build such a struct without a command line:
//! [`defaults`] (the `local()` constructors), [`from_env`] and [`from_env_lenient`]; [`setting`]
//! is the value parser of settings whose refusal must name their variable.

use std::any::type_name;
use std::ffi::OsStr;
use std::str::FromStr;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::error::ErrorKind;
use clap::{Arg, Args, Command, FromArgMatches};
use rdkafka::ClientConfig;
use sqlx::postgres::PgConnectOptions;

use crate::error::Result;
use crate::schema::SchemaName;

/// The database of the local stack (`make up`).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:55432/trialflow";
/// The broker of the local stack (`make up`).
pub const DEFAULT_KAFKA_BOOTSTRAP_SERVERS: &str = "127.0.0.1:19092";

/// Where the PostgreSQL database is, and the limits every session the project opens runs with
/// (see [`DatabaseConfig::connect_options`]): so that no client — hung, dead, or waiting on
/// something else with a transaction open — holds locks, or the xmin every relay waits behind,
/// for long.
#[derive(Debug, Clone, Args)]
pub struct DatabaseConfig {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,

    /// `statement_timeout` of every session, in milliseconds (0: the server's setting). A
    /// statement running longer is cancelled (SQLSTATE 57014), which its caller treats as
    /// transient. Migrations connect with the plain URL, without it: they may take longer.
    #[arg(long, env = "DATABASE_STATEMENT_TIMEOUT_MS", default_value_t = 30_000)]
    pub statement_timeout_ms: u64,

    /// `idle_in_transaction_session_timeout` of every session, in milliseconds (0: the server's
    /// setting). The server ends a session that sits this long in an open transaction without a
    /// statement running (a client that hung or died mid-transaction), which releases its locks
    /// and the xmin that holds every relay back. No component keeps a transaction open while it
    /// waits for anything else than the database.
    #[arg(long, env = "DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_in_transaction_timeout_ms: u64,

    /// TCP keepalive of every session, seconds of silence before the server's first probe (0:
    /// the server's setting); after 6 unanswered probes 10 s apart the server ends the session.
    /// A client whose host vanished is so noticed in about this plus a minute, even while its
    /// session waits for it. These are PostgreSQL's `tcp_keepalives_idle|interval|count`: sqlx
    /// sets no keepalive on its own sockets, so the server's side does the probing.
    #[arg(long, env = "DATABASE_TCP_KEEPALIVE_SECS", default_value_t = 60)]
    pub tcp_keepalive_secs: u64,
}

/// Probes of the server-side TCP keepalive, and the seconds between them.
const TCP_KEEPALIVE_COUNT: u32 = 6;
const TCP_KEEPALIVE_INTERVAL_SECS: u32 = 10;

/// The defaults of every field (the local stack's database).
impl Default for DatabaseConfig {
    fn default() -> Self {
        defaults()
    }
}

impl DatabaseConfig {
    /// `database_url` with the default session limits.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self { database_url: database_url.into(), ..defaults() }
    }

    /// `database_url` with the session limits of the environment (`DATABASE_STATEMENT_TIMEOUT_MS`,
    /// ...; their defaults when unset): for the services whose configuration holds only a URL.
    pub fn from_env_with_url(database_url: &str) -> sqlx::Result<Self> {
        let database: Self = from_env().map_err(|e| sqlx::Error::Configuration(e.into()))?;
        Ok(Self { database_url: database_url.to_string(), ..database })
    }

    /// The connect options of [`connect_options`](Self::connect_options) for `database_url`, with
    /// the session limits of the environment (see [`from_env_with_url`](Self::from_env_with_url)).
    pub fn connect_options_for(database_url: &str) -> sqlx::Result<PgConnectOptions> {
        Self::from_env_with_url(database_url)?.connect_options()
    }

    /// What every pool and connection of the project connects with: the URL, plus the session
    /// limits as startup parameters (`options=-c ...`, applied by the server before the first
    /// statement, and again on every reconnect of a pool).
    pub fn connect_options(&self) -> sqlx::Result<PgConnectOptions> {
        let mut settings: Vec<(&str, String)> = Vec::new();
        if self.statement_timeout_ms > 0 {
            settings.push(("statement_timeout", self.statement_timeout_ms.to_string()));
        }
        if self.idle_in_transaction_timeout_ms > 0 {
            settings.push((
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction_timeout_ms.to_string(),
            ));
        }
        if self.tcp_keepalive_secs > 0 {
            settings.push(("tcp_keepalives_idle", self.tcp_keepalive_secs.to_string()));
            settings.push(("tcp_keepalives_interval", TCP_KEEPALIVE_INTERVAL_SECS.to_string()));
            settings.push(("tcp_keepalives_count", TCP_KEEPALIVE_COUNT.to_string()));
        }
        let options = PgConnectOptions::from_str(&self.database_url)?;
        // An empty list would still send an empty `options` parameter.
        Ok(if settings.is_empty() { options } else { options.options(settings) })
    }
}

/// How to reach Kafka, and the librdkafka settings of each kind of client. Which settings reach
/// which client is decided here, and only here ([`client`](Self::client),
/// [`producer`](Self::producer), [`consumer`](Self::consumer)):
///
/// | client | `KAFKA_CONFIG` | `KAFKA_PRODUCER_CONFIG` | `KAFKA_CONSUMER_CONFIG` |
/// |---|---|---|---|
/// | producers (relay, ePRO gateway, EDC simulator, `dlq replay`) | yes | yes | – |
/// | group consumers (the consumer runtime) | yes | – | yes |
/// | admin clients, readers (`dlq list`, settle, tests' topic readers) | yes | – | – |
///
/// A component's own settings come first and the user's last, so the user's win. Every setting is
/// checked when the command starts (its key and value must be ones librdkafka accepts), and a
/// refusal names the variable.
#[derive(Clone, Args)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers (comma-separated host:port).
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = DEFAULT_KAFKA_BOOTSTRAP_SERVERS)]
    pub bootstrap_servers: String,

    /// How long the producer waits to fill a batch (librdkafka `linger.ms`).
    #[arg(long, env = "KAFKA_LINGER_MS", default_value_t = 5)]
    pub linger_ms: u64,

    /// librdkafka `message.timeout.ms`. 0 (the default) means the producer retries a transient
    /// failure until it succeeds: a message given up on while later ones succeed would break
    /// per-key order, so the relay prefers waiting (visible in the oldest-row-age gauge).
    #[arg(long, env = "KAFKA_DELIVERY_TIMEOUT_MS", default_value_t = 0)]
    pub delivery_timeout_ms: u64,

    /// librdkafka settings of every client (producers, consumers, admin clients, readers),
    /// `key=value` pairs separated by commas: the connection's security
    /// (`security.protocol=SASL_SSL,sasl.mechanism=SCRAM-SHA-512,sasl.username=...,
    /// sasl.password=...,ssl.ca.location=...`), `client.rack`, ... A value cannot hold a comma.
    #[arg(
        long = "kafka-config",
        env = "KAFKA_CONFIG",
        value_delimiter = ',',
        hide_env_values = true,
        value_parser = setting(parse_client_setting).blank_refused()
    )]
    pub client_settings: Vec<(String, String)>,

    /// librdkafka settings of the producers only (relay, ePRO gateway, EDC simulator, `trialflow
    /// dlq replay`), `key=value,...`, after `KAFKA_CONFIG`: e.g. `compression.type=lz4`. Before
    /// `KAFKA_CONSUMER_CONFIG` existed consumers got these too; they no longer do.
    #[arg(
        long = "producer-config",
        env = "KAFKA_PRODUCER_CONFIG",
        value_delimiter = ',',
        hide_env_values = true,
        value_parser = setting(parse_client_setting).blank_refused()
    )]
    pub producer_settings: Vec<(String, String)>,

    /// librdkafka settings of the group consumers only (`trialflow consume`, the consumers of
    /// `run`, `demo` and `replay`), `key=value,...`, after `KAFKA_CONFIG`: e.g.
    /// `max.poll.interval.ms=600000`.
    #[arg(
        long = "consumer-config",
        env = "KAFKA_CONSUMER_CONFIG",
        value_delimiter = ',',
        hide_env_values = true,
        value_parser = setting(parse_client_setting).blank_refused()
    )]
    pub consumer_settings: Vec<(String, String)>,
}

/// The defaults of every field (the local stack's broker).
impl Default for KafkaConfig {
    fn default() -> Self {
        defaults()
    }
}

/// Values of settings that may be secrets are left out (`sasl.password`, `ssl.key.password`, ...):
/// a configuration is logged and shown in errors.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |settings: &[(String, String)]| -> Vec<String> {
            settings
                .iter()
                .map(|(k, v)| if is_secret(k) { format!("{k}=<redacted>") } else { format!("{k}={v}") })
                .collect()
        };
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("linger_ms", &self.linger_ms)
            .field("delivery_timeout_ms", &self.delivery_timeout_ms)
            .field("client_settings", &redacted(&self.client_settings))
            .field("producer_settings", &redacted(&self.producer_settings))
            .field("consumer_settings", &redacted(&self.consumer_settings))
            .finish()
    }
}

/// Whether the value of librdkafka setting `key` may be a secret.
fn is_secret(key: &str) -> bool {
    ["password", "secret", "ssl.key.pem", "ssl.keystore", "sasl.oauthbearer.config", "sasl.jaas"]
        .iter()
        .any(|part| key.contains(part))
}

impl KafkaConfig {
    /// An admin client or a reader (a consumer that assigns itself partitions and commits
    /// nothing): `bootstrap.servers`, `client.id`, the component's `own` settings, then
    /// `KAFKA_CONFIG`.
    pub fn client(&self, client_id: &str, own: impl FnOnce(&mut ClientConfig)) -> ClientConfig {
        self.build(client_id, own, &[])
    }

    /// A producer: as [`client`](Self::client), then `KAFKA_PRODUCER_CONFIG`.
    pub fn producer(&self, client_id: &str, own: impl FnOnce(&mut ClientConfig)) -> ClientConfig {
        self.build(client_id, own, &self.producer_settings)
    }

    /// A group consumer: as [`client`](Self::client), then `KAFKA_CONSUMER_CONFIG`.
    pub fn consumer(&self, client_id: &str, own: impl FnOnce(&mut ClientConfig)) -> ClientConfig {
        self.build(client_id, own, &self.consumer_settings)
    }

    /// Whether the user set `key` for a producer (`KAFKA_CONFIG` or `KAFKA_PRODUCER_CONFIG`).
    pub fn producer_sets(&self, key: &str) -> bool {
        self.client_settings.iter().chain(&self.producer_settings).any(|(k, _)| k == key)
    }

    fn build(
        &self,
        client_id: &str,
        own: impl FnOnce(&mut ClientConfig),
        role: &[(String, String)],
    ) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers).set("client.id", client_id);
        own(&mut config);
        for (key, value) in self.client_settings.iter().chain(role) {
            config.set(key, value);
        }
        config
    }
}

/// One `key=value` librdkafka setting of `KAFKA_CONFIG`, `KAFKA_PRODUCER_CONFIG` or
/// `KAFKA_CONSUMER_CONFIG` (blanks around key and value ignored). Refused: no `=`, an empty key,
/// a control character anywhere (a NUL would cut the setting short inside librdkafka), and a key
/// or value librdkafka does not accept (an unknown property, `acks=sometimes`, a protocol this
/// build lacks): at start, not as a warning once the client runs.
fn parse_client_setting(s: &str) -> Result<(String, String), String> {
    if s.chars().any(char::is_control) {
        return Err("a control character is not allowed in a setting".to_string());
    }
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| "expected key=value (settings are separated by commas)".to_string())?;
    let (key, value) = (key.trim(), value.trim());
    if key.is_empty() {
        return Err("the key before `=` is empty".to_string());
    }
    let mut probe = ClientConfig::new();
    probe.set(key, value);
    probe.create_native_config().map_err(|e| {
        // librdkafka's reason quotes the value: never a secret in a message.
        let reason = e.to_string();
        if is_secret(key) { format!("librdkafka refuses the setting `{key}`") } else { reason }
    })?;
    Ok((key.to_string(), value.to_string()))
}

/// The relay: which outboxes it drains and how.
#[derive(Debug, Clone, Args)]
pub struct RelayConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,

    #[command(flatten)]
    pub kafka: KafkaConfig,

    /// Outbox sources: the service schemas whose outboxes this relay publishes (comma-separated).
    #[arg(
        long = "sources",
        env = "OUTBOX_SOURCES",
        value_delimiter = ',',
        default_value = "site_api,enrollment,kit_allocation,epro,monitoring,risk,notifier"
    )]
    pub sources: Vec<SchemaName>,

    /// Most rows read and published per batch.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Most batches awaiting broker acknowledgement at once, per source (bounds memory).
    #[arg(long, env = "OUTBOX_MAX_IN_FLIGHT_BATCHES", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_in_flight_batches: u32,

    /// Fallback poll interval in milliseconds, for notifications that never arrive.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL_MS", default_value_t = 1000)]
    pub poll_interval_ms: u64,

    /// How often each relay checks its share of the shards (milliseconds); also how quickly a
    /// survivor takes over the shards of a relay that died.
    #[arg(long, env = "OUTBOX_REBALANCE_INTERVAL_MS", default_value_t = 2000)]
    pub rebalance_interval_ms: u64,

    /// How often backlog gauges are refreshed (milliseconds).
    #[arg(long, env = "OUTBOX_STATS_INTERVAL_MS", default_value_t = 5000)]
    pub stats_interval_ms: u64,

    /// On shutdown, how long to wait for in-flight acknowledgements (milliseconds). Rows not
    /// acknowledged by then stay in the outbox and are published again by the next relay.
    #[arg(long, env = "OUTBOX_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,

    /// Longest pause between retries after a failure (milliseconds); retries back off
    /// exponentially from 100 ms with jitter.
    #[arg(long, env = "OUTBOX_MAX_BACKOFF_MS", default_value_t = 30_000)]
    pub max_backoff_ms: u64,

    /// How long a relay's lease session may stay silent (milliseconds) before PostgreSQL ends it
    /// (`idle_session_timeout`) and its shards go to the other relays: a relay that is paused,
    /// frozen or cut off stops holding shards after this long. At least 3 × the poll and the
    /// rebalance intervals; 0 = never (a paused relay keeps its shards until it resumes).
    #[arg(long, env = "OUTBOX_LEASE_TIMEOUT_MS", default_value_t = 30_000)]
    pub lease_timeout_ms: u64,

    /// Exactly-once publication: each shard's rows go out in Kafka transactions whose
    /// transactional id belongs to the shard, so a relay that takes a shard over fences its
    /// previous owner; `read_committed` readers see every row once. Needs a broker with
    /// transactions and the state topic (`OUTBOX_STATE_TOPIC`). See the README.
    #[arg(long, env = "OUTBOX_EXACTLY_ONCE", default_value_t = false, action = clap::ArgAction::Set)]
    pub exactly_once: bool,

    /// Exactly-once mode: transactional id of a shard = this prefix + `<source>.<shard>`. Every
    /// deployment sharing a Kafka cluster needs its own (two with the same one fence each other).
    #[arg(long, env = "OUTBOX_TRANSACTIONAL_ID_PREFIX", default_value = "trialflow-relay.", value_parser = transactional_id_prefix)]
    pub transactional_id_prefix: String,

    /// Exactly-once mode: the compacted topic where each transaction also records which rows it
    /// published, so the next owner of a shard deletes rows committed but not yet deleted.
    #[arg(long, env = "OUTBOX_STATE_TOPIC", default_value = DEFAULT_STATE_TOPIC, value_parser = transactional_id_prefix)]
    pub state_topic: String,
}

/// The exactly-once relay's state topic unless `OUTBOX_STATE_TOPIC` names another.
pub const DEFAULT_STATE_TOPIC: &str = "trialflow.relay-state";

/// A transactional id prefix or a topic name: letters, digits, `.`, `_`, `-`, at most 200
/// characters (Kafka's topic name limit is 249).
fn transactional_id_prefix(value: &str) -> Result<String, String> {
    if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{bad:?} is not allowed (letters, digits, `.`, `_`, `-`)"));
    }
    if value.is_empty() || value.len() > 200 {
        return Err(format!("{} characters; 1 to 200", value.len()));
    }
    Ok(value.to_string())
}

impl RelayConfig {
    /// The defaults of every field but `sources`, for in-process use (tests, demo, benchmarks):
    /// no environment variable is read.
    pub fn local(sources: Vec<SchemaName>) -> Self {
        Self { sources, ..defaults() }
    }

    pub(crate) fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.max(1))
    }

    pub(crate) fn rebalance_interval(&self) -> Duration {
        Duration::from_millis(self.rebalance_interval_ms.max(10))
    }

    pub(crate) fn stats_interval(&self) -> Duration {
        Duration::from_millis(self.stats_interval_ms.max(100))
    }

    pub(crate) fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub(crate) fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms.max(100))
    }

    /// The lease timeout, or an error when a healthy relay could not keep its lease (it touches
    /// its lease session at least every poll and rebalance interval).
    pub fn lease_timeout(&self) -> Result<Option<Duration>, String> {
        if self.lease_timeout_ms == 0 {
            return Ok(None);
        }
        let busiest = 3 * self.poll_interval_ms.max(self.rebalance_interval_ms);
        if self.lease_timeout_ms < busiest {
            return Err(format!(
                "OUTBOX_LEASE_TIMEOUT_MS={} is below 3 × the longer of OUTBOX_POLL_INTERVAL_MS and \
                 OUTBOX_REBALANCE_INTERVAL_MS ({busiest}): healthy relays would lose their shards",
                self.lease_timeout_ms
            ));
        }
        Ok(Some(Duration::from_millis(self.lease_timeout_ms)))
    }
}

// ---- building an `Args` struct without a command line ----------------------------------------

/// The [`Args`] struct `T` from the command line `args` (environment variables apply as usual):
/// for tests of a configuration's parsing without a `Parser` wrapper of their own.
pub fn from_args<T: Args + FromArgMatches>(args: &[&str]) -> Result<T, clap::Error> {
    let mut command = T::augment_args(Command::new("args"));
    command
        .try_get_matches_from_mut(std::iter::once("args").chain(args.iter().copied()))
        .and_then(|m| T::from_arg_matches(&m))
}

/// The defaults of the [`Args`] struct `T`: what an empty command line parses to when no
/// environment variable is read (each argument's `env` is dropped). The `local()` constructors
/// are made of it, so a default is written once, in its `#[arg(default_value...)]`; an argument
/// without a default is `None` (or empty).
///
/// # Panics
///
/// When a default does not parse or an argument is required: a bug of `T` (its unit tests call
/// this).
pub fn defaults<T: Args + FromArgMatches>() -> T {
    let command = T::augment_args(Command::new("defaults")).mut_args(|arg| arg.env(None));
    parse(command).unwrap_or_else(|e| panic!("the defaults of {} do not parse: {e}", type_name::<T>()))
}

/// `T` from the environment alone (an empty command line): every variable set applies, an
/// invalid one is the error (one line, naming the argument).
pub fn from_env<T: Args + FromArgMatches>() -> Result<T, String> {
    parse(T::augment_args(Command::new("env")))
}

/// `T` from the environment alone, leniently, for in-process use (the services' `local()`, which
/// `trialflow run` and the demo start): a blank variable counts as unset, and one that does not
/// parse is logged (warning) and left out, so its default applies. Also returns the variables
/// left out, for a setting whose default must not replace an invalid value (a token list).
pub fn from_env_lenient<T: Args + FromArgMatches>() -> (T, Vec<String>) {
    let blank = |arg: &Arg| {
        arg.get_env().and_then(std::env::var_os).is_none_or(|value| value.to_string_lossy().trim().is_empty())
    };
    let command =
        T::augment_args(Command::new("local")).mut_args(|arg| if blank(&arg) { arg.env(None) } else { arg });
    if let Ok(parsed) = parse(command.clone()) {
        return (parsed, Vec::new());
    }
    // Each variable tried alone: the invalid ones are those that fail so.
    let (mut refused, mut vars) = (Vec::new(), Vec::new());
    for arg in command.get_arguments() {
        let Some(var) = arg.get_env().map(|var| var.to_string_lossy().into_owned()) else { continue };
        let alone = command.clone().mut_args(|a| if a.get_id() == arg.get_id() { a } else { a.env(None) });
        if let Err(error) = parse::<T>(alone) {
            tracing::warn!(var, %error, "Ignoring invalid setting.");
            refused.push(arg.get_id().clone());
            vars.push(var);
        }
    }
    let command = command.mut_args(|arg| if refused.contains(arg.get_id()) { arg.env(None) } else { arg });
    match parse(command) {
        Ok(parsed) => (parsed, vars),
        // Only variables valid alone are left: they can fail together only if `T` makes them
        // conflict. Then none applies.
        Err(error) => {
            tracing::warn!(%error, "Ignoring the settings of the environment.");
            (defaults(), vars)
        }
    }
}

/// Parses an empty command line with `command` into `T`; the error is clap's message, one line.
fn parse<T: FromArgMatches>(mut command: Command) -> Result<T, String> {
    let name = command.get_name().to_string();
    command
        .try_get_matches_from_mut([name])
        .and_then(|matches| T::from_arg_matches(&matches))
        .map_err(|e| one_line(&e))
}

/// A clap error's message without the `error: ` prefix and the hints below it.
fn one_line(error: &clap::Error) -> String {
    let text = error.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).trim().to_string()
}

// ---- settings: values refused naming their variable -------------------------------------------

/// The clap value parser of a setting: `parse` reads the value, and a refusal names the
/// environment variable and the flag, and shows the value (escaped) unless the argument hides its
/// environment values (a secret: [`Arg::hide_env_values`]). A blank value means the argument's
/// default, as an unset variable does; [`Setting::blank_refused`] to refuse it instead.
pub fn setting<T>(parse: fn(&str) -> Result<T, String>) -> Setting<T> {
    Setting { parse, blank_is_default: true }
}

/// See [`setting`].
#[derive(Debug, Clone)]
pub struct Setting<T> {
    parse: fn(&str) -> Result<T, String>,
    blank_is_default: bool,
}

impl<T> Setting<T> {
    /// A blank value goes to `parse` like any other (which may refuse it).
    pub fn blank_refused(self) -> Self {
        Self { blank_is_default: false, ..self }
    }
}

impl<T: Clone + Send + Sync + 'static> TypedValueParser for Setting<T> {
    type Value = T;

    fn parse_ref(&self, cmd: &Command, arg: Option<&Arg>, value: &OsStr) -> Result<T, clap::Error> {
        let refuse = |reason: String| {
            let secret = arg.is_some_and(Arg::is_hide_env_values_set);
            let shown = if secret { String::new() } else { format!(" {value:?}") };
            // A reason may quote the value: never a raw control character to the terminal.
            let reason: String = reason
                .chars()
                .map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() })
                .collect();
            let message = format!("invalid value{shown} for {}: {reason}\n", setting_name(arg));
            clap::Error::raw(ErrorKind::ValueValidation, message).with_cmd(cmd)
        };
        let text = value.to_str().ok_or_else(|| refuse("not UTF-8".to_string()))?;
        let default = arg.and_then(|a| a.get_default_values().first()).and_then(|d| d.to_str());
        let text = match default {
            Some(default) if self.blank_is_default && text.trim().is_empty() => default,
            _ => text,
        };
        (self.parse)(text).map_err(refuse)
    }
}

/// `VAR (--flag)`, or whichever of the two the argument has.
fn setting_name(arg: Option<&Arg>) -> String {
    let var = arg.and_then(Arg::get_env).map(|var| var.to_string_lossy().into_owned());
    let flag = arg.and_then(Arg::get_long).map(|long| format!("--{long}"));
    match (var, flag) {
        (Some(var), Some(flag)) => format!("{var} ({flag})"),
        (Some(name), None) | (None, Some(name)) => name,
        (None, None) => arg.map_or_else(|| "a setting".to_string(), |a| a.get_id().to_string()),
    }
}

/// A value of `T` written with blanks around it, which are ignored (`" 4 "` is 4).
pub fn trimmed<T: FromStr<Err: std::fmt::Display>>(text: &str) -> Result<T, String> {
    text.trim().parse().map_err(|e: T::Err| e.to_string())
}

/// A whole number of at least 1, blanks around it ignored.
pub fn at_least_one<T: FromStr<Err: std::fmt::Display> + PartialOrd + From<u8>>(
    text: &str,
) -> Result<T, String> {
    let n: T = trimmed(text)?;
    if n < T::from(1) {
        return Err("must be at least 1".to_string());
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        relay: RelayConfig,
    }

    /// Arguments read from a variable every environment has (`PATH`).
    #[derive(Debug, Parser)]
    struct FromPath {
        /// `PATH` is no number: invalid.
        #[arg(long, env = "PATH", default_value_t = 7)]
        number: u32,
        /// `PATH` as text: valid.
        #[arg(long, env = "PATH")]
        text: Option<String>,
    }

    /// Settings of variables no environment has.
    #[derive(Debug, Parser)]
    struct Settings {
        #[arg(long, env = "TRIALFLOW_PROBE_POSITIVE", default_value_t = 3, value_parser = setting(at_least_one::<u32>))]
        positive: u32,
        #[arg(long, env = "TRIALFLOW_PROBE_STRICT", default_value_t = 2, value_parser = setting(trimmed::<u32>).blank_refused())]
        strict: u32,
        #[arg(long, env = "TRIALFLOW_PROBE_SECRET", hide_env_values = true, value_parser = setting(trimmed::<u32>))]
        secret: Option<u32>,
    }

    #[test]
    fn defaults_are_the_declared_ones_whatever_the_environment() {
        let from_path: FromPath = defaults();
        assert_eq!((from_path.number, from_path.text), (7, None));
        let relay = RelayConfig::local(Vec::new());
        assert!(relay.sources.is_empty());
        assert_eq!(
            (relay.batch_size, relay.max_in_flight_batches, relay.shutdown_grace_ms),
            (1000, 8, 10_000)
        );
        assert_eq!(relay.database.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(DatabaseConfig::new("postgres://elsewhere/db").statement_timeout_ms, 30_000);
        assert_eq!(KafkaConfig::default().bootstrap_servers, DEFAULT_KAFKA_BOOTSTRAP_SERVERS);
        assert_eq!(KafkaConfig::default().linger_ms, 5);
    }

    #[test]
    fn the_lenient_environment_leaves_out_only_what_does_not_parse() {
        let Some(path) = std::env::var("PATH").ok().filter(|p| !p.trim().is_empty()) else {
            return; // An environment without PATH has nothing to probe with.
        };
        let (from_path, refused) = from_env_lenient::<FromPath>();
        assert_eq!(refused, ["PATH"]);
        assert_eq!(from_path.number, 7, "the refused variable's default applies");
        assert_eq!(from_path.text, Some(path), "the valid variable applies");
        let strict = from_env::<FromPath>().err().unwrap_or_default();
        assert!(strict.contains("--number"), "{strict}");
    }

    #[test]
    fn a_refused_setting_names_its_variable_and_flag_and_never_shows_a_secret() {
        let refusal = |args: &[&str]| {
            let args = std::iter::once("probe").chain(args.iter().copied());
            Settings::try_parse_from(args).err().map(|e| e.to_string()).unwrap_or_default()
        };
        let zero = refusal(&["--positive", "0"]);
        assert!(
            zero.contains(
                r#"invalid value "0" for TRIALFLOW_PROBE_POSITIVE (--positive): must be at least 1"#
            ),
            "{zero}"
        );
        let hostile = refusal(&["--positive", "1\0\u{1b}[2J"]);
        assert!(hostile.contains(r#""1\0\u{1b}[2J""#), "control characters are escaped: {hostile}");
        let huge = refusal(&["--positive", "99999999999"]);
        assert!(huge.contains("number too large"), "{huge}");
        let secret = refusal(&["--secret", "s3cr3t"]);
        assert!(
            secret.contains("TRIALFLOW_PROBE_SECRET (--secret)") && !secret.contains("s3cr3t"),
            "{secret}"
        );
        let strict = refusal(&["--strict", " "]);
        assert!(strict.contains("TRIALFLOW_PROBE_STRICT (--strict)"), "{strict}");

        let parsed = Settings::try_parse_from(["probe", "--positive", "  ", "--secret", " 5 "]);
        let Ok(settings) = parsed else { panic!("{parsed:?}") };
        assert_eq!(
            (settings.positive, settings.secret),
            (3, Some(5)),
            "blank is the default; blanks around are ignored"
        );
    }

    #[test]
    fn every_session_limit_is_a_startup_option_and_zero_leaves_the_server_setting() {
        let database = DatabaseConfig::new(DEFAULT_DATABASE_URL);
        let Ok(options) = database.connect_options() else { panic!("the default URL parses") };
        assert_eq!(
            options.get_options(),
            Some(
                "-c statement_timeout=30000 -c idle_in_transaction_session_timeout=60000 \
                 -c tcp_keepalives_idle=60 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=6"
            )
        );
        let none = DatabaseConfig {
            statement_timeout_ms: 0,
            idle_in_transaction_timeout_ms: 0,
            tcp_keepalive_secs: 0,
            ..database
        };
        assert_eq!(none.connect_options().map(|o| o.get_options().map(str::to_string)).ok(), Some(None));
    }

    #[test]
    fn client_settings_parse_as_key_value_pairs() {
        let pair = |k: &str, v: &str| Ok((k.to_string(), v.to_string()));
        assert_eq!(parse_client_setting(" acks = all "), pair("acks", "all"));
        assert_eq!(parse_client_setting("sasl.password=a=b"), pair("sasl.password", "a=b"));
        assert_eq!(parse_client_setting("client.rack="), pair("client.rack", ""));
        assert!(parse_client_setting("no-equals-sign").is_err());
    }

    /// The variables of the Kafka client settings, and hostile values of each.
    #[test]
    fn hostile_client_settings_are_refused_naming_their_variable() {
        #[derive(Debug, Parser)]
        struct Kafka {
            #[command(flatten)]
            kafka: KafkaConfig,
        }
        let refusal = |flag: &str, value: &str| {
            Kafka::try_parse_from(["kafka", flag, value]).err().map(|e| e.to_string()).unwrap_or_default()
        };
        for (flag, var) in [
            ("--kafka-config", "KAFKA_CONFIG"),
            ("--producer-config", "KAFKA_PRODUCER_CONFIG"),
            ("--consumer-config", "KAFKA_CONSUMER_CONFIG"),
        ] {
            let named = format!("for {var} ({flag})");
            let cases = [
                ("acks", "expected key=value"),
                ("=all", "the key before `=` is empty"),
                (" =all", "the key before `=` is empty"),
                ("client.id=a\0b", "control character"),
                ("client.id=a\u{1b}[2Jb", "control character"),
                ("linger.ms=5,,acks=all", "expected key=value"),
                ("no.such.property=1", "No such configuration property"),
                ("security.protocol=CARRIER_PIGEON", "Invalid value"),
            ];
            for (value, reason) in cases {
                let message = refusal(flag, value);
                assert!(message.contains(&named), "{value:?}: {message}");
                assert!(message.contains(reason), "{value:?}: {message}");
            }
            let blank = refusal(flag, " ");
            assert!(blank.contains(&named), "a blank value is refused too: {blank}");
            // A secret is never shown, neither by clap nor in librdkafka's reason.
            let secret = refusal(flag, "sasl.password=hunter2\u{7}");
            assert!(secret.contains(&named) && !secret.contains("hunter2"), "{secret}");
        }
        let parsed = Kafka::try_parse_from([
            "kafka",
            "--kafka-config",
            "security.protocol=SASL_PLAINTEXT,sasl.mechanism=SCRAM-SHA-512",
            "--producer-config",
            "compression.type=lz4",
            "--consumer-config",
            "max.poll.interval.ms=600000",
        ]);
        let Ok(Kafka { kafka }) = parsed else { panic!("{parsed:?}") };
        assert_eq!(kafka.client_settings.len(), 2);
        assert_eq!(kafka.producer_settings, [("compression.type".to_string(), "lz4".to_string())]);
        assert_eq!(kafka.consumer_settings.len(), 1);
    }

    #[test]
    fn each_client_gets_its_settings_and_the_users_come_last() {
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        let kafka = KafkaConfig {
            client_settings: vec![pair("client.rack", "eu-1"), pair("sasl.password", "hunter2")],
            producer_settings: vec![pair("linger.ms", "50"), pair("compression.type", "lz4")],
            consumer_settings: vec![pair("max.poll.interval.ms", "600000")],
            ..KafkaConfig::default()
        };
        let producer = kafka.producer("p", |c| {
            c.set("linger.ms", "5").set("acks", "all");
        });
        assert_eq!(producer.get("client.rack"), Some("eu-1"));
        assert_eq!(producer.get("linger.ms"), Some("50"), "the user's setting wins over the component's");
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("max.poll.interval.ms"), None, "no consumer setting in a producer");
        let consumer = kafka.consumer("c", |c| {
            c.set("group.id", "g");
        });
        assert_eq!(consumer.get("max.poll.interval.ms"), Some("600000"));
        assert_eq!(consumer.get("linger.ms"), None, "no producer setting in a consumer");
        assert_eq!(consumer.get("compression.type"), None);
        let admin = kafka.client("a", |_| {});
        assert_eq!(admin.get("client.rack"), Some("eu-1"));
        assert_eq!((admin.get("linger.ms"), admin.get("max.poll.interval.ms")), (None, None));
        assert_eq!(admin.get("bootstrap.servers"), Some(DEFAULT_KAFKA_BOOTSTRAP_SERVERS));
        assert_eq!(admin.get("client.id"), Some("a"));
        for client in [&producer, &consumer, &admin] {
            assert!(client.create_native_config().is_ok(), "{client:?}");
        }
        let shown = format!("{kafka:?}");
        assert!(!shown.contains("hunter2") && shown.contains("sasl.password=<redacted>"), "{shown}");
        assert!(kafka.producer_sets("client.rack") && kafka.producer_sets("linger.ms"));
        assert!(!kafka.producer_sets("max.poll.interval.ms"));
    }

    #[test]
    fn flags_override_defaults_and_reject_bad_values() {
        let cli =
            Cli::try_parse_from(["relay", "--sources", "enrollment,kit_allocation", "--batch-size", "50"])
                .map_err(|e| e.to_string());
        let relay = cli.map(|c| c.relay);
        let Ok(relay) = relay else { panic!("valid flags were rejected: {relay:?}") };
        assert_eq!(relay.batch_size, 50);
        assert_eq!(
            relay.sources.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            ["enrollment", "kit_allocation"]
        );

        for bad in [["relay", "--sources", "Bad-Name"], ["relay", "--batch-size", "0"]] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
