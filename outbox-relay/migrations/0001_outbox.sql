-- The transactional outbox of one service schema. Applied by `trialflow migrate` with the service's
-- schema first on the search_path, so every name below lands in that schema.

-- How many shards the keys of this outbox hash into. Writers and relays both read it from here,
-- so they cannot disagree; change it only while the outbox is empty (`trialflow migrate
-- --outbox-shards`), or per-key order across the change is lost.
CREATE TABLE outbox_settings (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    shard_count integer NOT NULL CHECK (shard_count BETWEEN 1 AND 1024)
);
INSERT INTO outbox_settings (shard_count) VALUES (16);

CREATE TABLE outbox (
    -- Order of rows inside one transaction.
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction. The relay only reads rows whose tx_id is below the xmin of its
    -- snapshot (every such transaction has ended), so a transaction that commits late can never
    -- be overtaken and skipped.
    tx_id        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    shard        integer NOT NULL CHECK (shard >= 0),
    topic        text NOT NULL CHECK (topic <> ''),
    key          text NOT NULL,
    event_id     uuid NOT NULL,
    event_type   text NOT NULL CHECK (event_type <> ''),
    content_type text NOT NULL,
    payload      bytea NOT NULL,
    headers      jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(headers) = 'object'),
    traceparent  text,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX outbox_commit_order ON outbox (tx_id, seq);

-- Wakes relays at commit time (notifications are delivered on commit, once per transaction and
-- payload). Relays also poll, so a lost notification only costs latency.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('trialflow_outbox', TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
