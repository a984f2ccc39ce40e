use thiserror::Error;

/// What a handler says about a message it could not apply. The runtime acts on the class.
#[derive(Debug, Error)]
pub enum HandlerError {
    /// May succeed later (database unavailable, serialization conflict): the batch is rolled back
    /// and retried with backoff; the partition waits, others do not.
    #[error("transient: {0}")]
    Transient(String),
    /// Can never succeed (undecodable bytes, unknown schema, business rule that cannot pass): the
    /// message goes to the dead-letter topic with this reason and the partition moves on.
    #[error("permanent: {0}")]
    Permanent(String),
    /// Depends on something not seen yet (e.g. the subject's enrollment event): the message is
    /// parked and retried when `dependency` is resolved or after a delay.
    #[error("not yet: waiting for {dependency}: {reason}")]
    NotYet { dependency: String, reason: String },
}

impl HandlerError {
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent(reason.into())
    }

    pub fn transient(reason: impl Into<String>) -> Self {
        Self::Transient(reason.into())
    }

    pub fn not_yet(dependency: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::NotYet { dependency: dependency.into(), reason: reason.into() }
    }

    /// The class as written in the `dlq.error_class` header.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Transient(_) => "transient",
            Self::Permanent(_) => "permanent",
            Self::NotYet { .. } => "not_yet",
        }
    }
}

/// Database errors are transient unless they are integrity violations (SQLSTATE class 23), which
/// repeat on every retry.
impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("23")) => {
                Self::Permanent(format!("integrity violation: {e}"))
            }
            _ => Self::Transient(e.to_string()),
        }
    }
}

impl From<trialflow_outbox::OutboxError> for HandlerError {
    fn from(e: trialflow_outbox::OutboxError) -> Self {
        if e.is_transient() { Self::Transient(e.to_string()) } else { Self::Permanent(e.to_string()) }
    }
}

/// Errors that stop a consumer (configuration, not messages).
#[derive(Debug, Error)]
pub enum ConsumerError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Outbox(#[from] trialflow_outbox::OutboxError),
}
