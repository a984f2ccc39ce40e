//! The audit trail of a service schema: who changed what, when, why and on what cause, appended
//! in the same transaction as the change and hash-chained so that an edited, inserted or deleted
//! record is found (21 CFR 11.10(e): secure, computer-generated, time-stamped audit trails that do
//! not obscure previous values; ICH E6(R3) ALCOA++).
//!
//! **Writing.** A service builds [`AuditRecord`]s while it changes its rows and calls [`append`]
//! once, as late as possible in its transaction (the consumer runtime does it for a whole batch,
//! just before the commit). A schema's trail is [`CHAINS`] chains, each with its head
//! (`audit_head`, one row per chain). `append` locks the lowest head no other transaction holds
//! (waiting for one only when all are held) and continues that chain, so up to [`CHAINS`]
//! transactions of a service append and commit side by side; the lock is held only for the end
//! of a transaction, never while its rows are being worked out. A quiet service writes chain 0
//! only. Records get the chain's next seqs (1, 2, 3, ... without gaps: a rolled-back transaction
//! takes its seqs with it), the server's time (`clock_timestamp()`, UTC, read under the lock, so
//! it grows with seq within a chain) and
//!
//! ```text
//! hash = SHA-256(prev_hash ‖ "trialflow-audit-v1" ‖ seq ‖ recorded_at (µs) ‖ every field)
//! ```
//!
//! every field length-prefixed (NULL distinct from empty), `changes` in PostgreSQL's own text of
//! the stored jsonb (so what is hashed is exactly what is stored and read back), and `prev_hash`
//! the hash of the record before in its chain (32 zero bytes before the first). The chain number
//! is not hashed: a record moved to another chain leaves a gap in its own and does not link in
//! the other.
//!
//! **What the database refuses** (migrations `0004_audit.sql`, `0005_audit_chains.sql`): UPDATE,
//! DELETE and TRUNCATE of `audit_trail`; INSERT, DELETE and TRUNCATE of `audit_head`, and an
//! UPDATE of it outside an append; an INSERT whose records do not continue one chain (seq after
//! its head's, `prev_hash` = the hash before). Only a superuser who disables the triggers
//! (`session_replication_role = replica`, `ALTER TABLE ... DISABLE TRIGGER`) gets past them, and
//! that is what [`verify`] is for.
//!
//! **What [`verify`] finds**, chain by chain, naming the first broken record: an edited record (its content does
//! not match its hash), a record inserted or replaced before another (the next one's `prev_hash`
//! no longer links), deleted records (a gap in the seqs), a deleted tail (the trail ends before
//! the head), records appended with the triggers bypassed (after the head), a head that does not
//! match its record.
//!
//! **What it cannot find.** The hash is keyless and its recipe public: someone who can bypass the
//! triggers and rewrites a record, recomputes every hash after it and moves the head along, or
//! deletes the tail and moves the head back, leaves a consistent chain. Catching that needs a
//! copy of the heads kept outside the database (`trialflow audit verify` prints each head; compare
//! it with an earlier print), or a key the database's administrators do not hold.
//!
//! **Blinding.** A change whose values reveal treatment arms (a randomization's arm, a kit's arm)
//! is marked `unblinded`; [`StoredRecord::view`] leaves such changes out of the blinded view
//! entirely (not nulled), so nothing of them reaches a blinded user.

use chrono::{DateTime, SecondsFormat, Utc};
use futures::TryStreamExt;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};

use crate::error::{OutboxError, Result};
use crate::schema::SchemaName;

/// `actor_role` of a change a service made on its own.
pub const SYSTEM_ROLE: &str = "system";
/// `actor_role` of a change an operator made with the command line.
pub const OPERATOR_ROLE: &str = "operator";
/// The hash before the first record of a chain.
pub const GENESIS: [u8; 32] = [0; 32];
/// The chains of a schema's trail (`0005_audit_chains.sql` creates their heads): how many
/// transactions of one service can append side by side.
pub const CHAINS: i16 = 8;
/// Separates this recipe's hashes from any other's; a new recipe gets a new tag.
const RECIPE: &[u8] = b"trialflow-audit-v1";

/// One field a change set: its value before (`null` for a new entity) and after.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub field: String,
    pub old: Value,
    pub new: Value,
    /// The values reveal treatment arms: left out of blinded views.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unblinded: bool,
}

/// A change to record, built with its methods:
///
/// ```
/// # use trialflow_outbox::audit::AuditRecord;
/// let record = AuditRecord::by_person("alice", "site_staff", "subject.withdrawn", "subject", "701-1015")
///     .study("CDISCPILOT01")
///     .site(Some("701"))
///     .change("status", "screened", "withdrawn")
///     .reason("WITHDRAWAL BY SUBJECT")
///     .cause("request:4c1f0b52");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub actor_user: String,
    pub actor_role: String,
    pub on_behalf_of: Option<String>,
    pub action: String,
    pub entity_type: String,
    pub entity_id: String,
    pub study_id: Option<String>,
    pub site_id: Option<String>,
    pub changes: Vec<Change>,
    pub reason: Option<String>,
    pub cause: Option<String>,
}

impl AuditRecord {
    /// A change a person made (`user` with `role`), through a service.
    pub fn by_person(
        user: impl Into<String>,
        role: impl Into<String>,
        action: impl Into<String>,
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
    ) -> Self {
        Self {
            actor_user: user.into(),
            actor_role: role.into(),
            on_behalf_of: None,
            action: action.into(),
            entity_type: entity_type.into(),
            entity_id: entity_id.into(),
            study_id: None,
            site_id: None,
            changes: Vec::new(),
            reason: None,
            cause: None,
        }
    }

    /// A change service `system` made on its own (a consumer's decision, a timer).
    pub fn by_system(
        system: impl Into<String>,
        action: impl Into<String>,
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
    ) -> Self {
        Self::by_person(system, SYSTEM_ROLE, action, entity_type, entity_id)
    }

    /// A change an operator made with the command line.
    pub fn by_operator(
        user: impl Into<String>,
        action: impl Into<String>,
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
    ) -> Self {
        Self::by_person(user, OPERATOR_ROLE, action, entity_type, entity_id)
    }

    /// The person whose request a system's change carried out (none when `None` or blank).
    pub fn on_behalf_of(mut self, user: Option<impl Into<String>>) -> Self {
        self.on_behalf_of = user.map(Into::into).filter(|u: &String| !u.trim().is_empty());
        self
    }

    pub fn study(mut self, study_id: impl Into<String>) -> Self {
        self.study_id = Some(study_id.into());
        self
    }

    /// The site, when there is one.
    pub fn site(mut self, site_id: Option<impl Into<String>>) -> Self {
        self.site_id = site_id.map(Into::into);
        self
    }

    /// `field` went from `old` to `new` (`Value::Null` / `None` for none).
    pub fn change(mut self, field: impl Into<String>, old: impl Into<Value>, new: impl Into<Value>) -> Self {
        let (field, old, new) = (field.into(), old.into(), new.into());
        self.changes.push(Change { field, old, new, unblinded: false });
        self
    }

    /// A change whose values reveal treatment arms: blinded views leave it out.
    pub fn unblinded_change(
        mut self,
        field: impl Into<String>,
        old: impl Into<Value>,
        new: impl Into<Value>,
    ) -> Self {
        let (field, old, new) = (field.into(), old.into(), new.into());
        self.changes.push(Change { field, old, new, unblinded: true });
        self
    }

    /// Why (free text; blank is none).
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into()).filter(|r| !r.trim().is_empty());
        self
    }

    /// What caused it: `request:<Idempotency-Key>`, `event:<event id>`, ...
    pub fn cause(mut self, cause: impl Into<String>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    /// The cause, unless one is set already.
    pub fn or_cause(mut self, cause: impl FnOnce() -> String) -> Self {
        if self.cause.is_none() {
            self.cause = Some(cause());
        }
        self
    }

    pub fn is_unblinded(&self) -> bool {
        self.changes.iter().any(|c| c.unblinded)
    }

    fn check(&self) -> Result<()> {
        for (name, value) in [
            ("actor_user", &self.actor_user),
            ("actor_role", &self.actor_role),
            ("action", &self.action),
            ("entity_type", &self.entity_type),
        ] {
            if value.trim().is_empty() {
                return Err(OutboxError::AuditRecord(format!(
                    "`{name}` is empty (action `{}` on {} `{}`)",
                    self.action, self.entity_type, self.entity_id
                )));
            }
        }
        Ok(())
    }
}

/// The fields of a record as they are stored and hashed.
#[derive(Debug, Clone, Copy)]
struct Hashed<'a> {
    seq: i64,
    recorded_at: DateTime<Utc>,
    actor_user: &'a str,
    actor_role: &'a str,
    on_behalf_of: Option<&'a str>,
    action: &'a str,
    entity_type: &'a str,
    entity_id: &'a str,
    study_id: Option<&'a str>,
    site_id: Option<&'a str>,
    /// PostgreSQL's text of the stored jsonb.
    changes: &'a str,
    unblinded: bool,
    reason: Option<&'a str>,
    cause: Option<&'a str>,
}

impl Hashed<'_> {
    /// SHA-256 of `prev_hash` and the unambiguous encoding of every field.
    fn hash(&self, prev_hash: &[u8]) -> [u8; 32] {
        fn text(h: &mut Sha256, value: Option<&str>) {
            match value {
                None => h.update([0u8]),
                Some(v) => {
                    h.update([1u8]);
                    h.update((v.len() as u64).to_be_bytes());
                    h.update(v.as_bytes());
                }
            }
        }
        let mut h = Sha256::new();
        h.update(prev_hash);
        h.update(RECIPE);
        h.update(self.seq.to_be_bytes());
        h.update(self.recorded_at.timestamp_micros().to_be_bytes());
        for value in [self.actor_user, self.actor_role] {
            text(&mut h, Some(value));
        }
        text(&mut h, self.on_behalf_of);
        for value in [self.action, self.entity_type, self.entity_id] {
            text(&mut h, Some(value));
        }
        text(&mut h, self.study_id);
        text(&mut h, self.site_id);
        text(&mut h, Some(self.changes));
        h.update([u8::from(self.unblinded)]);
        text(&mut h, self.reason);
        text(&mut h, self.cause);
        h.finalize().into()
    }
}

/// Appends `records` to one chain of `schema`'s audit trail in the caller's transaction (one
/// statement for all of them, in order), and returns the chain and their seqs. Call it last
/// before the commit: from here to the end of the transaction, the chain's head is held (see the
/// module docs).
pub async fn append(
    conn: &mut PgConnection,
    schema: &SchemaName,
    records: &[AuditRecord],
) -> Result<(i16, Vec<i64>)> {
    if records.is_empty() {
        return Ok((0, Vec::new()));
    }
    for record in records {
        record.check()?;
    }
    let changes: Vec<String> = records
        .iter()
        .map(|r| serde_json::to_string(&r.changes))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| OutboxError::AuditRecord(format!("changes do not serialize: {e}")))?;
    // A head's lock serializes the appends of its chain; the time is read under it, so it grows
    // with seq. The lowest head nobody holds (one this transaction holds already is free to it);
    // when every head is held, this connection's own, waited for.
    let select = |which: &str| {
        format!(
            "SELECT h.chain, h.last_seq, h.last_hash, clock_timestamp() AS now,
                    ARRAY(SELECT c::jsonb::text FROM unnest($1::text[]) WITH ORDINALITY AS u(c, o) ORDER BY o)
             FROM {schema}.audit_head h {which}"
        )
    };
    let mut head = sqlx::query(AssertSqlSafe(select("ORDER BY h.chain LIMIT 1 FOR UPDATE SKIP LOCKED")))
        .bind(&changes)
        .fetch_optional(&mut *conn)
        .await?;
    if head.is_none() {
        let which = format!(
            "WHERE h.chain = pg_backend_pid() % (SELECT count(*) FROM {schema}.audit_head) FOR UPDATE"
        );
        head = sqlx::query(AssertSqlSafe(select(&which))).bind(&changes).fetch_optional(&mut *conn).await?;
    }
    let head = head.ok_or_else(|| OutboxError::NotMigrated(schema.to_string()))?;
    let chain: i16 = head.try_get(0)?;
    let last_seq: i64 = head.try_get(1)?;
    let mut prev: Vec<u8> = head.try_get(2)?;
    let recorded_at: DateTime<Utc> = head.try_get(3)?;
    let stored_changes: Vec<String> = head.try_get(4)?;

    let n = records.len();
    let seqs: Vec<i64> = (1..=n as i64).map(|i| last_seq + i).collect();
    let (mut prev_hashes, mut hashes) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for ((record, &seq), changes) in records.iter().zip(&seqs).zip(&stored_changes) {
        let hash = Hashed {
            seq,
            recorded_at,
            actor_user: &record.actor_user,
            actor_role: &record.actor_role,
            on_behalf_of: record.on_behalf_of.as_deref(),
            action: &record.action,
            entity_type: &record.entity_type,
            entity_id: &record.entity_id,
            study_id: record.study_id.as_deref(),
            site_id: record.site_id.as_deref(),
            changes,
            unblinded: record.is_unblinded(),
            reason: record.reason.as_deref(),
            cause: record.cause.as_deref(),
        }
        .hash(&prev);
        prev_hashes.push(std::mem::replace(&mut prev, hash.to_vec()));
        hashes.push(hash.to_vec());
    }
    let column = |get: fn(&AuditRecord) -> Option<&str>| records.iter().map(get).collect::<Vec<_>>();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {schema}.audit_trail (chain, seq, recorded_at, actor_user, actor_role, on_behalf_of, action,
             entity_type, entity_id, study_id, site_id, changes, unblinded, reason, cause, prev_hash, hash)
         SELECT $17, seq, $2, au, ar, ob, ac, et, ei, st, si, ch::jsonb, ub, re, ca, ph, h
         FROM unnest($1::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                     $9::text[], $10::text[], $11::text[], $12::boolean[], $13::text[], $14::text[],
                     $15::bytea[], $16::bytea[])
              AS u(seq, au, ar, ob, ac, et, ei, st, si, ch, ub, re, ca, ph, h)"
    )))
    .bind(&seqs)
    .bind(recorded_at)
    .bind(column(|r| Some(&r.actor_user)))
    .bind(column(|r| Some(&r.actor_role)))
    .bind(column(|r| r.on_behalf_of.as_deref()))
    .bind(column(|r| Some(&r.action)))
    .bind(column(|r| Some(&r.entity_type)))
    .bind(column(|r| Some(&r.entity_id)))
    .bind(column(|r| r.study_id.as_deref()))
    .bind(column(|r| r.site_id.as_deref()))
    .bind(&stored_changes)
    .bind(records.iter().map(AuditRecord::is_unblinded).collect::<Vec<_>>())
    .bind(column(|r| r.reason.as_deref()))
    .bind(column(|r| r.cause.as_deref()))
    .bind(&prev_hashes)
    .bind(&hashes)
    .bind(chain)
    .execute(&mut *conn)
    .await?;
    Ok((chain, seqs))
}

/// A record as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub chain: i16,
    pub seq: i64,
    pub recorded_at: DateTime<Utc>,
    pub actor_user: String,
    pub actor_role: String,
    pub on_behalf_of: Option<String>,
    pub action: String,
    pub entity_type: String,
    pub entity_id: String,
    pub study_id: Option<String>,
    pub site_id: Option<String>,
    /// PostgreSQL's text of the stored jsonb (what the hash covers).
    pub changes: String,
    pub unblinded: bool,
    pub reason: Option<String>,
    pub cause: Option<String>,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// The columns of a [`StoredRecord`], in its order.
const COLUMNS: &str =
    "chain, seq, recorded_at, actor_user, actor_role, on_behalf_of, action, entity_type, entity_id,
                       study_id, site_id, changes::text, unblinded, reason, cause, prev_hash, hash";

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for StoredRecord {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> sqlx::Result<Self> {
        Ok(Self {
            chain: row.try_get(0)?,
            seq: row.try_get(1)?,
            recorded_at: row.try_get(2)?,
            actor_user: row.try_get(3)?,
            actor_role: row.try_get(4)?,
            on_behalf_of: row.try_get(5)?,
            action: row.try_get(6)?,
            entity_type: row.try_get(7)?,
            entity_id: row.try_get(8)?,
            study_id: row.try_get(9)?,
            site_id: row.try_get(10)?,
            changes: row.try_get(11)?,
            unblinded: row.try_get(12)?,
            reason: row.try_get(13)?,
            cause: row.try_get(14)?,
            prev_hash: row.try_get(15)?,
            hash: row.try_get(16)?,
        })
    }
}

impl StoredRecord {
    /// Where it stands in a list of records in time order (see [`read`]).
    pub fn position(&self) -> Position {
        Position { recorded_at: self.recorded_at, chain: self.chain, seq: self.seq }
    }

    /// The hash its content and `prev_hash` give (what [`verify`] compares with `hash`).
    pub fn expected_hash(&self) -> [u8; 32] {
        self.hashed().hash(&self.prev_hash)
    }

    fn hashed(&self) -> Hashed<'_> {
        Hashed {
            seq: self.seq,
            recorded_at: self.recorded_at,
            actor_user: &self.actor_user,
            actor_role: &self.actor_role,
            on_behalf_of: self.on_behalf_of.as_deref(),
            action: &self.action,
            entity_type: &self.entity_type,
            entity_id: &self.entity_id,
            study_id: self.study_id.as_deref(),
            site_id: self.site_id.as_deref(),
            changes: &self.changes,
            unblinded: self.unblinded,
            reason: self.reason.as_deref(),
            cause: self.cause.as_deref(),
        }
    }

    /// The record as JSON, from `source` (the service or schema whose trail it is). The blinded
    /// view leaves every unblinded change out (the key `values_withheld` says that some were);
    /// the full view keeps them, marked, and adds the hashes.
    pub fn view(&self, source: &str, blinded: bool) -> Value {
        let changes: Vec<Value> = serde_json::from_str(&self.changes).unwrap_or_default();
        let withheld = blinded && changes.iter().any(|c| c.get("unblinded") == Some(&Value::Bool(true)));
        let changes: Vec<Value> = changes
            .into_iter()
            .filter(|c| !(blinded && c.get("unblinded") == Some(&Value::Bool(true))))
            .collect();
        let mut view = serde_json::json!({
            "source": source,
            "chain": self.chain,
            "seq": self.seq,
            "recorded_at": self.recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            "actor": {"user": self.actor_user, "role": self.actor_role, "on_behalf_of": self.on_behalf_of},
            "action": self.action,
            "entity": {"type": self.entity_type, "id": self.entity_id},
            "study_id": self.study_id,
            "site_id": self.site_id,
            "changes": changes,
            "reason": self.reason,
            "cause": self.cause,
        });
        if let Some(object) = view.as_object_mut() {
            if withheld {
                object.insert("values_withheld".into(), Value::Bool(true));
            }
            if !blinded {
                object.insert("prev_hash".into(), Value::String(hex(&self.prev_hash)));
                object.insert("hash".into(), Value::String(hex(&self.hash)));
            }
        }
        view
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A record's place in the time order of a trail: its time, then its chain and seq (a record's
/// time is read under its chain's head, before its commit; see [`read`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub recorded_at: DateTime<Utc>,
    pub chain: i16,
    pub seq: i64,
}

/// Up to `limit` records of `schema` after `after` (from the first when `None`), in time order
/// across the chains (time, chain, seq); only those of `study_id` when given.
///
/// A record's time is read before its transaction commits, so a record can become visible after
/// one with a later time (by the time a commit takes, milliseconds): a reader that follows a live
/// trail page by page starts each read a few seconds back, or reads a settled one.
pub async fn read(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: Option<&str>,
    after: Option<&Position>,
    limit: i64,
) -> Result<Vec<StoredRecord>> {
    Ok(sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM {schema}.audit_trail
         WHERE ($1::timestamptz IS NULL OR (recorded_at, chain, seq) > ($1, $2, $3))
           AND ($4::text IS NULL OR study_id = $4)
         ORDER BY recorded_at, chain, seq LIMIT $5"
    )))
    .bind(after.map(|p| p.recorded_at))
    .bind(after.map_or(0, |p| p.chain))
    .bind(after.map_or(0, |p| p.seq))
    .bind(study_id)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?)
}

/// How a chain is broken: the first break [`verify`] met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Break {
    /// The record's content does not match its hash: edited, or forged without the recipe.
    Edited { seq: i64 },
    /// The record does not link to the one before (its `prev_hash` differs from that one's hash):
    /// the record before it was replaced, or this one inserted.
    Unlinked { seq: i64 },
    /// Records `from..=to` are missing: deleted.
    Deleted { from: i64, to: i64 },
    /// The trail ends at `last` but the head says `head`: records `last+1..=head` deleted.
    TailDeleted { last: i64, head: i64 },
    /// Record `seq` lies beyond the head: written with the triggers bypassed.
    BeyondHead { seq: i64, head: i64 },
    /// The head's hash is not the hash of its record `seq`.
    HeadMismatch { seq: i64 },
}

impl Break {
    /// The seq the break is named by.
    pub fn seq(&self) -> i64 {
        match *self {
            Break::Edited { seq }
            | Break::Unlinked { seq }
            | Break::BeyondHead { seq, .. }
            | Break::HeadMismatch { seq } => seq,
            Break::Deleted { from, .. } => from,
            Break::TailDeleted { last, .. } => last + 1,
        }
    }

    /// A short machine-readable name of the kind of break.
    pub fn kind(&self) -> &'static str {
        match self {
            Break::Edited { .. } => "edited",
            Break::Unlinked { .. } => "unlinked",
            Break::Deleted { .. } | Break::TailDeleted { .. } => "deleted",
            Break::BeyondHead { .. } => "inserted",
            Break::HeadMismatch { .. } => "head_mismatch",
        }
    }
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Break::Edited { seq } => {
                write!(f, "record {seq} was edited: its content does not match its hash")
            }
            Break::Unlinked { seq } => write!(
                f,
                "record {seq} does not link to record {}: a record was inserted or replaced before it",
                seq - 1
            ),
            Break::Deleted { from, to } if from == to => write!(f, "record {from} was deleted"),
            Break::Deleted { from, to } => write!(f, "records {from} to {to} were deleted"),
            Break::TailDeleted { last, head } => write!(
                f,
                "records {} to {head} were deleted: the trail ends at {last}, the head says {head}",
                last + 1
            ),
            Break::BeyondHead { seq, head } => write!(
                f,
                "record {seq} was inserted behind the chain's back: it lies beyond the head ({head})"
            ),
            Break::HeadMismatch { seq } => {
                write!(f, "the head does not match record {seq}: the head or the record was replaced")
            }
        }
    }
}

/// A chain's head: its last record's seq (0 before the first) and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub chain: i16,
    pub seq: i64,
    pub hash: Vec<u8>,
}

impl Head {
    /// The hash in hex, to keep outside the database and compare later.
    pub fn hash_hex(&self) -> String {
        hex(&self.hash)
    }
}

/// The first break [`verify`] met, and in which chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub chain: i16,
    pub what: Break,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "chain {}: {}", self.chain, self.what)
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Records read.
    pub records: u64,
    /// Every chain's head, by chain.
    pub heads: Vec<Head>,
    /// The first break, if any.
    pub broken: Option<Broken>,
}

impl Verdict {
    pub fn is_intact(&self) -> bool {
        self.broken.is_none()
    }
}

/// Walks `schema`'s trail chain by chain in seq order, in one snapshot with the heads, checking
/// every record's hash and link, the seqs' continuity and each head; stops at the first break.
/// The records of a chain that has no head lie beyond a head at 0.
pub async fn verify(pool: &PgPool, schema: &SchemaName) -> Result<Verdict> {
    let mut tx = pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    let heads: Vec<(i16, i64, Vec<u8>)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT chain, last_seq, last_hash FROM {schema}.audit_head ORDER BY chain"
    )))
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42P01" | "42703")) => {
            OutboxError::NotMigrated(schema.to_string())
        }
        _ => OutboxError::Database(e),
    })?;
    if heads.is_empty() {
        return Err(OutboxError::NotMigrated(schema.to_string()));
    }
    let heads: Vec<Head> = heads.into_iter().map(|(chain, seq, hash)| Head { chain, seq, hash }).collect();
    let chains: Vec<i16> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT chain FROM {schema}.audit_head UNION SELECT DISTINCT chain FROM {schema}.audit_trail ORDER BY 1"
    )))
    .fetch_all(&mut *tx)
    .await?;
    let mut verdict = Verdict { records: 0, heads, broken: None };
    for chain in chains {
        let head = verdict.heads.iter().find(|h| h.chain == chain);
        let (head_seq, head_hash) = head.map_or((0, &GENESIS[..]), |h| (h.seq, h.hash.as_slice()));
        let (mut expected_seq, mut prev) = (1_i64, GENESIS.to_vec());
        let mut broken = None;
        {
            let sql = format!("SELECT {COLUMNS} FROM {schema}.audit_trail WHERE chain = $1 ORDER BY seq");
            let mut rows = sqlx::query_as::<_, StoredRecord>(AssertSqlSafe(sql)).bind(chain).fetch(&mut *tx);
            while let Some(record) = rows.try_next().await? {
                verdict.records += 1;
                broken = if record.seq > head_seq {
                    Some(Break::BeyondHead { seq: record.seq, head: head_seq })
                } else if record.seq != expected_seq {
                    Some(Break::Deleted { from: expected_seq, to: record.seq - 1 })
                } else if record.expected_hash().as_slice() != record.hash {
                    Some(Break::Edited { seq: record.seq })
                } else if record.prev_hash != prev {
                    Some(Break::Unlinked { seq: record.seq })
                } else if record.seq == head_seq && record.hash != head_hash {
                    Some(Break::HeadMismatch { seq: record.seq })
                } else {
                    None
                };
                if broken.is_some() {
                    break;
                }
                expected_seq = record.seq + 1;
                prev = record.hash;
            }
        }
        if broken.is_none() && expected_seq - 1 < head_seq {
            broken = Some(Break::TailDeleted { last: expected_seq - 1, head: head_seq });
        }
        if let Some(what) = broken {
            verdict.broken = Some(Broken { chain, what });
            break;
        }
    }
    tx.rollback().await?;
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(changes: &str) -> Hashed<'_> {
        Hashed {
            seq: 1,
            recorded_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap_or_default(),
            actor_user: "alice",
            actor_role: "site_staff",
            on_behalf_of: None,
            action: "subject.screened",
            entity_type: "subject",
            entity_id: "701-1015",
            study_id: Some("S1"),
            site_id: None,
            changes,
            unblinded: false,
            reason: None,
            cause: None,
        }
    }

    #[test]
    fn every_field_and_the_link_change_the_hash() {
        let base = fields("[]");
        let h = base.hash(&GENESIS);
        assert_eq!(h, base.hash(&GENESIS), "deterministic");
        assert_ne!(h, base.hash(&[1; 32]), "prev_hash");
        let variants = [
            Hashed { seq: 2, ..base },
            Hashed { recorded_at: base.recorded_at + chrono::Duration::microseconds(1), ..base },
            Hashed { actor_user: "alicE", ..base },
            Hashed { actor_role: "admin", ..base },
            Hashed { on_behalf_of: Some(""), ..base },
            Hashed { action: "subject.withdrawn", ..base },
            Hashed { entity_type: "kit", ..base },
            Hashed { entity_id: "701-1016", ..base },
            Hashed { study_id: None, ..base },
            Hashed { site_id: Some("701"), ..base },
            Hashed { changes: "[{}]", ..base },
            Hashed { unblinded: true, ..base },
            Hashed { reason: Some("x"), ..base },
            Hashed { cause: Some("x"), ..base },
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(v.hash(&GENESIS), h, "variant {i} hashes like the original");
        }
    }

    #[test]
    fn moving_text_between_adjacent_fields_changes_the_hash() {
        let a = Hashed { action: "ab", entity_type: "c", ..fields("[]") };
        let b = Hashed { action: "a", entity_type: "bc", ..fields("[]") };
        assert_ne!(a.hash(&GENESIS), b.hash(&GENESIS));
    }

    #[test]
    fn the_blinded_view_leaves_unblinded_changes_out() {
        let record = StoredRecord {
            chain: 0,
            seq: 3,
            recorded_at: Utc::now(),
            actor_user: "enrollment".into(),
            actor_role: SYSTEM_ROLE.into(),
            on_behalf_of: Some("alice".into()),
            action: "subject.randomized".into(),
            entity_type: "subject".into(),
            entity_id: "701-1015".into(),
            study_id: Some("S1".into()),
            site_id: None,
            changes: r#"[{"new": "0001", "old": null, "field": "randomization_number"}, {"new": "XAN_HI", "old": null, "field": "arm_code", "unblinded": true}]"#.into(),
            unblinded: true,
            reason: None,
            cause: Some("event:1".into()),
            prev_hash: vec![0; 32],
            hash: vec![1; 32],
        };
        let blinded = record.view("enrollment", true).to_string();
        assert!(!blinded.contains("XAN_HI") && !blinded.contains("arm_code"), "{blinded}");
        assert!(blinded.contains("0001") && blinded.contains("\"values_withheld\":true"), "{blinded}");
        assert!(!blinded.contains("hash"), "{blinded}");
        let full = record.view("enrollment", false).to_string();
        assert!(full.contains("XAN_HI") && full.contains("\"hash\""), "{full}");
        assert!(!full.contains("values_withheld"), "{full}");
    }

    #[test]
    fn records_build_and_blank_reasons_are_none() {
        let r = AuditRecord::by_system("enrollment", "subject.randomized", "subject", "1")
            .on_behalf_of(Some(" "))
            .reason("  ")
            .unblinded_change("arm_code", Value::Null, "A")
            .or_cause(|| "event:x".into())
            .or_cause(|| "event:y".into());
        assert_eq!((r.on_behalf_of, r.reason, r.cause.as_deref()), (None, None, Some("event:x")));
        assert!(r.changes[0].unblinded);
        assert_eq!(
            serde_json::to_string(&r.changes).ok().as_deref(),
            Some(r#"[{"field":"arm_code","old":null,"new":"A","unblinded":true}]"#)
        );
        assert!(AuditRecord::by_person("", "admin", "a", "b", "c").check().is_err());
    }
}
