//! Typed configuration. Every field has a local default and an environment variable, so pointing
//! at a real cluster means setting `DATABASE_URL` / `KAFKA_BOOTSTRAP_SERVERS` and nothing else.

use std::str::FromStr;
use std::time::Duration;

use clap::Args;
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

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self::new(DEFAULT_DATABASE_URL)
    }
}

impl DatabaseConfig {
    /// `database_url` with the default session limits.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            statement_timeout_ms: 30_000,
            idle_in_transaction_timeout_ms: 60_000,
            tcp_keepalive_secs: 60,
        }
    }

    /// `database_url` with the session limits of the environment (`DATABASE_STATEMENT_TIMEOUT_MS`,
    /// ...; their defaults when unset): for the services whose configuration holds only a URL.
    pub fn from_env_with_url(database_url: &str) -> sqlx::Result<Self> {
        #[derive(clap::Parser)]
        struct FromEnv {
            #[command(flatten)]
            database: DatabaseConfig,
        }
        let parsed = <FromEnv as clap::Parser>::try_parse_from(["trialflow"])
            .map_err(|e| sqlx::Error::Configuration(e.to_string().into()))?;
        Ok(Self { database_url: database_url.to_string(), ..parsed.database })
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

/// How to reach and produce to Kafka.
#[derive(Debug, Clone, Args)]
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

    /// Extra librdkafka settings, `key=value` pairs separated by commas (e.g.
    /// `security.protocol=SASL_SSL,sasl.mechanism=PLAIN,...`).
    #[arg(long, env = "KAFKA_PRODUCER_CONFIG", value_delimiter = ',', value_parser = parse_key_value)]
    pub producer_config: Vec<(String, String)>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: DEFAULT_KAFKA_BOOTSTRAP_SERVERS.to_string(),
            linger_ms: 5,
            delivery_timeout_ms: 0,
            producer_config: Vec::new(),
        }
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected key=value, got `{s}`"))?;
    Ok((k.trim().to_string(), v.trim().to_string()))
}

/// The relay: which outboxes it drains and how.
#[derive(Debug, Clone, Args)]
pub struct RelayConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,

    #[command(flatten)]
    pub kafka: KafkaConfig,

    /// Outbox sources: the service schemas whose outboxes this relay publishes (comma-separated);
    /// unset, every service's schema (`trialflow services` lists them).
    #[arg(long = "sources", env = "OUTBOX_SOURCES", value_delimiter = ',')]
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
}

impl RelayConfig {
    /// The defaults of every field, for in-process use (tests, demo, benchmarks).
    pub fn local(sources: Vec<SchemaName>) -> Self {
        Self {
            database: DatabaseConfig::default(),
            kafka: KafkaConfig::default(),
            sources,
            batch_size: 1000,
            max_in_flight_batches: 8,
            poll_interval_ms: 1000,
            rebalance_interval_ms: 2000,
            stats_interval_ms: 5000,
            shutdown_grace_ms: 10_000,
            max_backoff_ms: 30_000,
        }
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
    fn producer_settings_parse_as_key_value_pairs() {
        assert_eq!(parse_key_value(" acks = all "), Ok(("acks".to_string(), "all".to_string())));
        assert_eq!(
            parse_key_value("sasl.password=a=b"),
            Ok(("sasl.password".to_string(), "a=b".to_string()))
        );
        assert!(parse_key_value("no-equals-sign").is_err());
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
