//! Typed configuration. Every field has a local default and an environment variable, so pointing
//! at a real cluster means setting `DATABASE_URL` / `KAFKA_BOOTSTRAP_SERVERS` and nothing else.

use std::time::Duration;

use clap::Args;

use crate::error::Result;
use crate::schema::SchemaName;

/// The database of the local stack (`make up`).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:55432/trialflow";
/// The broker of the local stack (`make up`).
pub const DEFAULT_KAFKA_BOOTSTRAP_SERVERS: &str = "127.0.0.1:19092";

/// Where the PostgreSQL database is.
#[derive(Debug, Clone, Args)]
pub struct DatabaseConfig {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
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

    /// Outbox sources: the service schemas whose outboxes this relay publishes (comma-separated).
    #[arg(
        long = "sources",
        env = "OUTBOX_SOURCES",
        value_delimiter = ',',
        default_value = "site_api,enrollment,kit_allocation,epro,monitoring,notifier,workload"
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
}

impl RelayConfig {
    /// The defaults of every field, for in-process use (tests, demo, benchmarks).
    pub fn local(sources: Vec<SchemaName>) -> Self {
        Self {
            database: DatabaseConfig { database_url: DEFAULT_DATABASE_URL.to_string() },
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
