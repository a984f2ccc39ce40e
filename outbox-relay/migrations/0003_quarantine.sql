-- Quarantine: a row the broker refuses for good (topic not authorized, topic missing, record too
-- large, ...) is moved here by the relay, whole, so it stops only itself and the later rows of its
-- key, never its shard. Operators list it, put it back (`trialflow outbox quarantine retry`) or
-- discard it (`... discard`, audited below).

-- The outbox row as it was, with its original `seq` and `tx_id`: `retry` puts it back under both,
-- so it keeps its place in commit order before the later rows of its key that waited.
CREATE TABLE outbox_quarantine (
    seq               bigint PRIMARY KEY,
    tx_id             xid8 NOT NULL,
    shard             integer NOT NULL,
    topic             text NOT NULL,
    key               text NOT NULL,
    event_id          uuid NOT NULL,
    event_type        text NOT NULL,
    content_type      text NOT NULL,
    payload           bytea NOT NULL,
    headers           jsonb NOT NULL,
    traceparent       text,
    created_at        timestamptz NOT NULL,
    key_bytes         bytea,
    raw_header_names  bytea[],
    raw_header_values bytea[],
    -- Why the broker refused it, as the relay saw it.
    error             text NOT NULL,
    quarantined_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The relay's read skips rows that come after a quarantined row of their key: an anti-join on
-- this index, empty (and free) while nothing is quarantined. A hash index, because a dead
-- letter's key is whatever a producer sent (a B-tree refuses index rows over ~2.7 kB, and a
-- quarantine that cannot take a row would block the relay again).
CREATE INDEX outbox_quarantine_key ON outbox_quarantine USING hash (key);

-- Rows an operator discarded: the content, who, why and when. Nothing leaves the outbox silently.
CREATE TABLE outbox_quarantine_discarded (
    seq               bigint PRIMARY KEY,
    tx_id             xid8 NOT NULL,
    shard             integer NOT NULL,
    topic             text NOT NULL,
    key               text NOT NULL,
    event_id          uuid NOT NULL,
    event_type        text NOT NULL,
    content_type      text NOT NULL,
    payload           bytea NOT NULL,
    headers           jsonb NOT NULL,
    traceparent       text,
    created_at        timestamptz NOT NULL,
    key_bytes         bytea,
    raw_header_names  bytea[],
    raw_header_values bytea[],
    error             text NOT NULL,
    quarantined_at    timestamptz NOT NULL,
    discarded_by      text NOT NULL CHECK (discarded_by <> ''),
    reason            text NOT NULL CHECK (reason <> ''),
    discarded_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Bumped by every `retry` and `discard`, in their transaction. Rows of a blocked key lie behind the
-- relay's `(tx_id, seq)` cursor; when a quarantined row leaves, the relay sees the new version and
-- reads from the head again, so those rows (and a retried row, back under its old `tx_id`) are
-- read. The relay's own quarantining only adds blocks and leaves the version alone.
ALTER TABLE outbox_settings ADD COLUMN quarantine_version bigint NOT NULL DEFAULT 0;
