-- The audit trail in several chains. With one chain, every append of a service locked the one
-- head until its transaction committed, so the service's commits (each a WAL flush) went one at
-- a time: under load, most of the site API's time went to waiting for that head. Now a schema
-- has CHAINS heads; an append takes a head no other transaction holds (the lowest free one, so a
-- quiet service writes chain 0 only) and continues that chain. Each chain keeps the guarantees of
-- 0004: gapless seqs, every record linked to the one before it in its chain, a head moved only
-- by appends, no UPDATE, DELETE or TRUNCATE. The chain is not hashed: a record moved to another
-- chain leaves a gap in its own and does not link in the other. Existing records are chain 0.

ALTER TABLE audit_trail ADD COLUMN chain smallint NOT NULL DEFAULT 0 CHECK (chain >= 0);
ALTER TABLE audit_trail ALTER COLUMN chain DROP DEFAULT;
ALTER TABLE audit_trail DROP CONSTRAINT audit_trail_pkey;
ALTER TABLE audit_trail ADD PRIMARY KEY (chain, seq);
-- Readers list records in time order across the chains (the time is read under the head's
-- lock, so it grows with seq within a chain).
DROP INDEX audit_trail_by_study;
CREATE INDEX audit_trail_by_time ON audit_trail (recorded_at, chain, seq);
CREATE INDEX audit_trail_by_study ON audit_trail (study_id, recorded_at, chain, seq);

ALTER TABLE audit_head ADD COLUMN chain smallint NOT NULL DEFAULT 0 CHECK (chain >= 0);
ALTER TABLE audit_head ALTER COLUMN chain DROP DEFAULT;
ALTER TABLE audit_head DROP CONSTRAINT audit_head_pkey;
ALTER TABLE audit_head DROP COLUMN singleton;
ALTER TABLE audit_head ADD PRIMARY KEY (chain);
-- CHAINS = 8: chains 1 to 7 start at the genesis.
INSERT INTO audit_head (chain, last_seq, last_hash)
SELECT c, 0, decode(repeat('00', 32), 'hex') FROM generate_series(1, 7) AS c;

-- The set of chains is fixed here: a head inserted later would start a chain nobody can tell
-- from a genuine one. (A later migration that adds chains drops this trigger for its insert.)
CREATE TRIGGER audit_head_no_insert BEFORE INSERT ON audit_head
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- Every INSERT statement continues one chain: its records are all of that chain, their seqs
-- follow the chain's head without a gap, each record's prev_hash is the hash before it in the
-- chain; then the chain's head moves to its last record.
CREATE OR REPLACE FUNCTION audit_trail_append() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    head     audit_head%ROWTYPE;
    v_chain  smallint;
    v_chains bigint;
    v_first  bigint;
    v_last   bigint;
    v_count  bigint;
    v_broken bigint;
BEGIN
    SELECT min(chain), count(DISTINCT chain), min(seq), max(seq), count(*)
    INTO v_chain, v_chains, v_first, v_last, v_count FROM appended;
    IF v_count = 0 THEN
        RETURN NULL;
    END IF;
    IF v_chains <> 1 THEN
        RAISE EXCEPTION '%.audit_trail: one statement appends to one chain, not %', TG_TABLE_SCHEMA, v_chains
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    SELECT * INTO head FROM audit_head WHERE chain = v_chain FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION '%.audit_trail: chain % has no head', TG_TABLE_SCHEMA, v_chain
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF v_first <> head.last_seq + 1 OR v_last - v_first + 1 <> v_count THEN
        RAISE EXCEPTION '%.audit_trail: records % to % of chain % do not follow its head (seq %)',
            TG_TABLE_SCHEMA, v_first, v_last, v_chain, head.last_seq
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    SELECT a.seq INTO v_broken
    FROM appended a LEFT JOIN appended p ON p.seq = a.seq - 1
    WHERE a.prev_hash IS DISTINCT FROM CASE WHEN a.seq = v_first THEN head.last_hash ELSE p.hash END
    ORDER BY a.seq LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '%.audit_trail: record % of chain % does not link to the record before it',
            TG_TABLE_SCHEMA, v_broken, v_chain
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    UPDATE audit_head SET last_seq = a.seq, last_hash = a.hash
    FROM appended a WHERE a.seq = v_last AND audit_head.chain = v_chain;
    RETURN NULL;
END
$$;
