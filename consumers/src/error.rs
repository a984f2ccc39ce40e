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

/// A database error is the message's fault, and so permanent, when PostgreSQL refused the data
/// itself: data exceptions (class 22: NUL or invalid text, out-of-range values, bad formats),
/// program limits (class 54: an index row or a string too large), integrity violations (class 23).
/// It is the environment's, and so transient, for everything else: connection loss (08), rollbacks
/// (40001 serialization, 40P01 deadlock), shutdowns (57P01–57P03), lock and statement timeouts
/// (55P03, 57014), resources (53), I/O (58), and errors with no SQLSTATE (pool timeouts, I/O,
/// protocol). Class 42 (undefined table, syntax) is a deployment fault that every message hits:
/// transient, so it never turns into dead letters; the poison fence tells a lone bad message apart.
pub fn is_transient_sqlx(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code();
            let class = code.as_deref().map_or("", |c| c.get(..2).unwrap_or(c));
            !matches!(class, "22" | "23" | "54")
        }
        sqlx::Error::Encode(_) | sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => false,
        _ => true,
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        let code = match &e {
            sqlx::Error::Database(db) => db.code().map(|c| format!(" (SQLSTATE {c})")).unwrap_or_default(),
            _ => String::new(),
        };
        if is_transient_sqlx(&e) {
            Self::Transient(format!("{e}{code}"))
        } else {
            Self::Permanent(format!("{e}{code}"))
        }
    }
}

impl From<trialflow_outbox::OutboxError> for HandlerError {
    fn from(e: trialflow_outbox::OutboxError) -> Self {
        match e {
            trialflow_outbox::OutboxError::Database(e) => e.into(),
            e if e.is_transient() => Self::Transient(e.to_string()),
            e => Self::Permanent(e.to_string()),
        }
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
    /// A partition worker ended abnormally; the consumer stops rather than leave a partition idle.
    #[error("partition worker died: {0}")]
    WorkerDied(String),
}
