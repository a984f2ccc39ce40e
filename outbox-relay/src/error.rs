use thiserror::Error;

/// Errors of the outbox writer and relay, each classified so callers know whether to retry.
#[derive(Debug, Error)]
pub enum OutboxError {
    /// The database could not be reached or the statement failed for a reason that may pass
    /// (connection lost, serialization failure, server shutting down).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// Applying the outbox migrations failed.
    #[error("migrating outbox schema `{schema}` failed: {source}")]
    Migrate {
        schema: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },

    /// A schema name that is not a plain lower-case SQL identifier.
    #[error(
        "invalid outbox source `{0}`: use a lower-case schema name (letters, digits, `_`, at most 63 bytes, not starting with a digit)"
    )]
    InvalidSchemaName(String),

    /// The schema has no outbox (migrations not applied).
    #[error("schema `{0}` has no outbox; run `trialflow migrate` first")]
    NotMigrated(String),

    /// A shard count outside 1..=1024, or a change attempted while rows are pending.
    #[error("invalid shard count for `{schema}`: {reason}")]
    ShardCount { schema: String, reason: String },

    /// The Kafka client could not be created (bad configuration).
    #[error("kafka client configuration: {0}")]
    KafkaConfig(rdkafka::error::KafkaError),

    /// The cluster refused the connection for good: SASL authentication, the TLS handshake, or a
    /// security protocol the listener does not speak (librdkafka's reason).
    #[error(
        "Kafka at {servers} refused the connection: {reason} (check KAFKA_CONFIG: security.protocol, sasl.*, ssl.*)"
    )]
    KafkaRefused { servers: String, reason: String },

    /// Topics just created still have partitions without a leader after the wait.
    #[error("topics not ready: {0}")]
    TopicsNotReady(String),

    /// An event larger than the outbox accepts: the broker would refuse it for good, so it is
    /// refused here, in the caller's transaction, instead of blocking the relay.
    #[error("event `{event_type}` for `{topic}` is {bytes} bytes; the limit is {limit} bytes")]
    TooLarge { topic: String, event_type: String, bytes: usize, limit: usize },

    /// The broker did not acknowledge a message.
    #[error("delivery of outbox row {seq} to `{topic}` failed: {source}")]
    Delivery {
        seq: i64,
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },

    /// `trialflow outbox quarantine` was given a schema without an outbox quarantine.
    #[error(
        "no outbox source `{0}`: the schema has no outbox quarantine (a typo, or not migrated: run `trialflow migrate`)"
    )]
    UnknownSource(String),

    /// `retry` or `discard` of a seq that is not in the quarantine.
    #[error(
        "no quarantined row {seq} in `{schema}`; `trialflow outbox quarantine list --source {schema}` shows them"
    )]
    NotQuarantined { schema: String, seq: i64 },

    /// A Kafka transaction of the exactly-once relay failed: fenced by a relay that took the
    /// shard over, timed out, or aborted. Its rows stay in the outbox.
    #[error("kafka transaction of outbox shard {shard} failed: {source}")]
    Transaction {
        shard: i32,
        #[source]
        source: rdkafka::error::KafkaError,
    },

    /// Relay settings that contradict each other.
    #[error("invalid relay setting: {0}")]
    Setting(String),

    /// A discard without a name or a reason: discarding an event is audited.
    #[error("discarding row {seq} needs who (--by) and why (--reason), both non-empty")]
    DiscardUnaccounted { seq: i64 },

    /// An audit record that cannot be recorded (a programming error of the writing service).
    #[error("invalid audit record: {0}")]
    AuditRecord(String),
}

impl OutboxError {
    /// Whether retrying the same operation later can succeed. Permanent errors are configuration
    /// or programming errors that need a person.
    pub fn is_transient(&self) -> bool {
        match self {
            OutboxError::Database(e) => !matches!(
                e,
                sqlx::Error::Configuration(_)
                    | sqlx::Error::ColumnNotFound(_)
                    | sqlx::Error::ColumnDecode { .. }
                    | sqlx::Error::Decode(_)
                    | sqlx::Error::TypeNotFound { .. }
            ),
            OutboxError::Delivery { .. }
            | OutboxError::TopicsNotReady(_)
            | OutboxError::Transaction { .. } => true,
            OutboxError::Migrate { .. }
            | OutboxError::TooLarge { .. }
            | OutboxError::InvalidSchemaName(_)
            | OutboxError::NotMigrated(_)
            | OutboxError::ShardCount { .. }
            | OutboxError::KafkaConfig(_)
            | OutboxError::Setting(_)
            | OutboxError::KafkaRefused { .. }
            | OutboxError::UnknownSource(_)
            | OutboxError::NotQuarantined { .. }
            | OutboxError::DiscardUnaccounted { .. }
            | OutboxError::AuditRecord(_) => false,
        }
    }
}

pub type Result<T, E = OutboxError> = std::result::Result<T, E>;
