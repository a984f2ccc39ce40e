//! What a domain consumer implements, and what it is given.

use std::future::Future;
use std::sync::Arc;

use sqlx::{Postgres, Transaction};
use trialflow_outbox::writer::MAX_EVENT_BYTES;
use trialflow_outbox::{AuditRecord, Outbox, OutboxEvent};
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
    /// [`Context::enqueue`] is the cheaper way (one statement per batch).
    pub outbox: Arc<Outbox>,
    pub(crate) resolved: Vec<String>,
    pub(crate) audit: Vec<AuditRecord>,
    pub(crate) events: Vec<(OutboxEvent, Option<String>)>,
}

impl Context {
    /// A context for one message. The runtime makes one per message; a test or a tool that
    /// drives a handler's batch itself makes its own.
    pub fn new(outbox: Arc<Outbox>) -> Self {
        Self { outbox, resolved: Vec::new(), audit: Vec::new(), events: Vec::new() }
    }

    /// The events queued with [`Context::enqueue`] so far, in order.
    pub fn enqueued(&self) -> impl Iterator<Item = &OutboxEvent> {
        self.events.iter().map(|(event, _)| event)
    }

    /// Queues `event` in this transaction's outbox: the runtime inserts the events of the whole
    /// batch with one statement after the last message (in the order they were queued, so per-key
    /// order holds), each with the `traceparent` of the message's span, and only those of messages
    /// that applied. An event too large to publish is refused here, a permanent error of the
    /// message (dead letter), not a failure of the batch.
    pub fn enqueue(&mut self, event: OutboxEvent) -> Result<(), HandlerError> {
        if event.size() > MAX_EVENT_BYTES {
            return Err(HandlerError::permanent(format!(
                "{} event of {} bytes for {} is larger than the outbox takes ({MAX_EVENT_BYTES} bytes)",
                event.event_type,
                event.size(),
                event.topic
            )));
        }
        let traceparent = trialflow_outbox::trace::current_traceparent();
        self.events.push((event, traceparent));
        Ok(())
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

/// A domain consumer's logic. The runtime applies a batch of one partition's messages in one
/// transaction that also records them in the inbox; everything the handler writes (its rows, its
/// outbox events) commits with it or not at all:
///
/// ```text
/// BEGIN
///   state = prepare(batch)            once, every message of the batch
///   inbox rows of the batch           duplicates are skipped from here on
///   handle(message, &mut state)       each new message, in offset order
///   finish(state)                     once
///   outbox events, wake-ups, audit    one statement each
/// COMMIT
/// ```
///
/// **Batch state.** What `prepare` returns ([`Handler::Batch`]) lives for this one transaction
/// and is handed to every `handle` and then to `finish`: a handler reads in `prepare`, with one
/// query per kind for the whole batch, what its messages need (their subjects, earlier
/// submissions, open episodes …) instead of one query per message, and may gather its writes to
/// make them set-based in `finish`. Handlers without a use for it say `type Batch = ();`.
///
/// The state must answer, at each message, what the database would: a batch decides its messages
/// exactly as they would be decided one transaction each. The handler's part and the runtime's:
/// * `handle` updates it with each effect a later message of the batch can depend on (a second
///   submission of one subject sees the first; a reading that opens an episode, then one that
///   adds to it), as the per-message queries of the database would have seen it;
/// * a message that fails (dead letter, parked, transient error) rolls the whole transaction
///   back, and the batch runs again without it, or is retried: `prepare` runs again in the new
///   transaction, so no state outlives its transaction, and none of the failed message's
///   effects stays in it;
/// * duplicates (in the inbox, or twice in the batch) never reach `handle`, so they are in
///   `prepare`'s batch but change nothing;
/// * a parked message retried later runs alone: `prepare` with that one message, `handle`,
///   `finish`, in a savepoint of the retry's transaction.
///
/// Errors of `prepare` and `finish` cannot be blamed on one message: the batch is rolled back
/// and retried, and a batch that keeps failing is applied one message at a time by the poison
/// fence, which then dead-letters the message that fails alone. A write deferred to `finish`
/// keeps its dead-letter semantics that way; checks that can decide a message permanently bad
/// belong in `handle`, which dead-letters it at once.
pub trait Handler: Send + Sync + 'static {
    /// What [`Handler::prepare`] learns about a batch, read and updated by each
    /// [`Handler::handle`] and consumed by [`Handler::finish`]; `()` when nothing is.
    type Batch: Default + Send;

    /// The event id the inbox deduplicates on. Default: the `event_id` header (set by the relay).
    fn event_id(&self, message: &Message) -> Result<Uuid, HandlerError> {
        let text = message
            .header_str("event_id")
            .ok_or_else(|| HandlerError::permanent("missing event_id header"))?;
        Uuid::parse_str(text)
            .map_err(|e| HandlerError::permanent(format!("event_id header `{text}` is not a uuid: {e}")))
    }

    /// Runs once per batch transaction, before the inbox rows and before any [`Handler::handle`],
    /// with every message of the batch (duplicates and set-aside ones included), and returns the
    /// batch's state. It is where a handler reads what the batch needs (set-based), and where it
    /// takes, in one fixed order, the row locks its messages will take one by one: two batches of
    /// different partitions that need the same rows then queue instead of deadlocking
    /// (PostgreSQL needs `deadlock_timeout` to notice and rolls one batch back). A row lock held
    /// by the transaction is taken again by `handle` without waiting.
    ///
    /// It must ignore messages it cannot decode (`handle` dead-letters them), must not commit or
    /// roll back `tx`, and an error rolls the batch back and retries it, as a transient failure.
    /// Default: the default state, nothing read.
    fn prepare<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Postgres>,
        batch: &'a [Message],
    ) -> impl Future<Output = Result<Self::Batch, HandlerError>> + Send + 'a {
        let _ = (tx, batch);
        async { Ok(Self::Batch::default()) }
    }

    /// Applies one message, with the batch's state. Must not commit or roll back `tx`.
    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Postgres>,
        message: &'a Message,
        ctx: &'a mut Context,
        batch: &'a mut Self::Batch,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a;

    /// Runs once per batch transaction after the last [`Handler::handle`] (also when every
    /// message was a duplicate or set aside): writes what the handlers gathered in the state, and
    /// may emit events and audit records of the batch as a whole through `ctx` (they commit with
    /// the batch; an audit record made here names its cause itself). Must not commit or roll back
    /// `tx`; an error rolls the batch back and retries it (see the trait's doc). Default: nothing.
    fn finish<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Postgres>,
        batch: Self::Batch,
        ctx: &'a mut Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a {
        let _ = (tx, batch, ctx);
        async { Ok(()) }
    }
}
