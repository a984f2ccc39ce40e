//! What a domain consumer implements, and what it is given.

use std::future::Future;
use std::sync::Arc;

use sqlx::{Postgres, Transaction};
use trialflow_outbox::{AuditRecord, Outbox};
use uuid::Uuid;

use crate::error::HandlerError;

/// A Kafka message, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn key_str(&self) -> Option<&str> {
        self.key.as_deref().and_then(|k| std::str::from_utf8(k).ok())
    }
}

/// Given to a handler with each message.
#[derive(Debug)]
pub struct Context {
    /// The consumer's own outbox: events enqueued here commit with the handler's effects.
    pub outbox: Arc<Outbox>,
    pub(crate) resolved: Vec<String>,
    pub(crate) audit: Vec<AuditRecord>,
}

impl Context {
    pub(crate) fn new(outbox: Arc<Outbox>) -> Self {
        Self { outbox, resolved: Vec::new(), audit: Vec::new() }
    }

    /// Records a change in the service's audit trail, in this transaction: the runtime appends
    /// the records of the whole batch with one statement just before the commit (so the chain's
    /// lock is held for the commit only), caused by the message's event id unless the record
    /// names its cause.
    pub fn audit(&mut self, record: AuditRecord) {
        self.audit.push(record);
    }

    /// Says that `dependency` now exists: messages parked on it are retried right after this
    /// transaction commits.
    pub fn resolve(&mut self, dependency: impl Into<String>) {
        self.resolved.push(dependency.into());
    }
}

/// A domain consumer's logic. The runtime calls [`Handler::handle`] inside a transaction that also
/// records the event in the inbox; everything the handler writes (its rows, its outbox events)
/// commits with it or not at all.
pub trait Handler: Send + Sync + 'static {
    /// The event id the inbox deduplicates on. Default: the `event_id` header (set by the relay).
    fn event_id(&self, message: &Message) -> Result<Uuid, HandlerError> {
        let text = message
            .header_str("event_id")
            .ok_or_else(|| HandlerError::permanent("missing event_id header"))?;
        Uuid::parse_str(text)
            .map_err(|e| HandlerError::permanent(format!("event_id header `{text}` is not a uuid: {e}")))
    }

    /// Runs once per batch transaction, before the inbox rows and before any [`Handler::handle`],
    /// with every message of the batch (duplicates and set-aside ones included). It is where a
    /// handler takes, in one fixed order, the row locks its messages will take one by one: two
    /// batches of different partitions that need the same rows then queue instead of deadlocking
    /// (PostgreSQL needs `deadlock_timeout` to notice and rolls one batch back). A row lock held
    /// by the transaction is taken again by `handle` without waiting.
    ///
    /// It must ignore messages it cannot decode (`handle` dead-letters them), must not commit or
    /// roll back `tx`, and an error rolls the batch back and retries it, as a transient failure.
    /// Default: nothing.
    fn prepare<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Postgres>,
        batch: &'a [Message],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a {
        let _ = (tx, batch);
        async { Ok(()) }
    }

    /// Applies one message. Must not commit or roll back `tx`.
    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Postgres>,
        message: &'a Message,
        ctx: &'a mut Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a;
}
