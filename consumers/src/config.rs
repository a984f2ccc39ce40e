use std::time::Duration;

use clap::Args;
use trialflow_outbox::{DatabaseConfig, KafkaConfig, SchemaName};

/// What a domain consumer is: fixed in code, not configuration.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// The consumer's name: inbox key, default group id, metric label.
    pub name: String,
    /// Its service schema (inbox, parked, outbox and its own tables).
    pub schema: SchemaName,
    /// The topics it consumes.
    pub topics: Vec<String>,
}

/// How a consumer runs. Every field has a local default and an environment variable.
#[derive(Debug, Clone, Args)]
pub struct ConsumerConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,

    #[command(flatten)]
    pub kafka: KafkaConfig,

    /// Consumer group id; default: the consumer's name.
    #[arg(long, env = "CONSUMER_GROUP_ID")]
    pub group_id: Option<String>,

    /// Most messages of one partition applied in one transaction.
    #[arg(long, env = "CONSUMER_MAX_BATCH", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_batch: u32,

    /// Longest pause between retries of a failing batch (milliseconds); from 100 ms, with jitter.
    #[arg(long, env = "CONSUMER_MAX_BACKOFF_MS", default_value_t = 30_000)]
    pub max_backoff_ms: u64,

    /// How often parked messages are retried when no dependency wakes them (milliseconds).
    #[arg(long, env = "CONSUMER_PARK_RETRY_MS", default_value_t = 5_000)]
    pub park_retry_ms: u64,

    /// Parked longer than this (seconds), a message goes to the dead-letter topic.
    #[arg(long, env = "CONSUMER_PARK_MAX_AGE_SECS", default_value_t = 86_400)]
    pub park_max_age_secs: u64,

    /// Inbox rows older than this (hours) are deleted. Must exceed the longest time a message can
    /// be redelivered (topic retention of uncommitted offsets), or a late redelivery would apply twice.
    #[arg(long, env = "CONSUMER_INBOX_RETENTION_HOURS", default_value_t = 24 * 30)]
    pub inbox_retention_hours: u64,

    /// Kafka session timeout (milliseconds): how fast a dead member's partitions move.
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 6_000)]
    pub session_timeout_ms: u64,

    /// Kafka heartbeat interval (milliseconds).
    #[arg(long, env = "KAFKA_HEARTBEAT_INTERVAL_MS", default_value_t = 500)]
    pub heartbeat_interval_ms: u64,

    /// Longest time the broker may hold a fetch when there is nothing new (librdkafka
    /// `fetch.wait.max.ms`): an upper bound on the delivery delay of a broker that answers fetches
    /// only at this deadline instead of as soon as data arrives.
    #[arg(long, env = "CONSUMER_FETCH_WAIT_MS", default_value_t = 50)]
    pub fetch_wait_ms: u64,

    /// Suffix of dead-letter topics: `<topic><suffix>`.
    #[arg(long, env = "CONSUMER_DLQ_SUFFIX", default_value = trialflow_schemas::topics::DLQ_SUFFIX)]
    pub dlq_suffix: String,

    /// Failed attempts of a batch before its messages are retried one at a time (the poison
    /// fence), and failed attempts of one message alone before it is judged: dead-lettered as
    /// `retries_exhausted` when another message of its partition applies meanwhile, retried on
    /// (an outage) when none does.
    #[arg(long, env = "CONSUMER_POISON_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub poison_attempts: u32,

    /// How long a revocation waits for the workers of revoked partitions to finish their batch
    /// (ms). A batch that takes longer is abandoned (rolled back); the partition's next worker
    /// starts only after it has ended.
    #[arg(long, env = "CONSUMER_REVOKE_WAIT_MS", default_value_t = 10_000)]
    pub revoke_wait_ms: u64,

    /// On shutdown, how long a batch in progress may still take to commit (ms) before it is
    /// cancelled and rolled back; retry backoffs are cancelled at once.
    #[arg(long, env = "CONSUMER_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
}

impl ConsumerConfig {
    /// The defaults of every field, for in-process use (tests, demo, benchmarks): no environment
    /// variable is read.
    pub fn local() -> Self {
        trialflow_outbox::config::defaults()
    }

    pub(crate) fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms.max(100))
    }

    pub(crate) fn revoke_wait(&self) -> Duration {
        Duration::from_millis(self.revoke_wait_ms)
    }

    pub(crate) fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub(crate) fn park_retry(&self) -> Duration {
        Duration::from_millis(self.park_retry_ms.max(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_is_the_declared_defaults() {
        let config = ConsumerConfig::local();
        assert_eq!(config.group_id, None);
        assert_eq!((config.max_batch, config.poison_attempts, config.shutdown_grace_ms), (500, 5, 10_000));
        assert_eq!((config.park_max_age_secs, config.inbox_retention_hours), (86_400, 720));
        assert_eq!(config.dlq_suffix, trialflow_schemas::topics::DLQ_SUFFIX);
        assert_eq!(config.kafka.linger_ms, 5);
    }
}
