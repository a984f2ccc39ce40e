-- The audit trail of one service schema (21 CFR 11.10(e), ICH E6(R3) ALCOA++): every change a
-- person or a system makes, appended in the same transaction as the change, never updated or
-- deleted. Records are hash-chained (`trialflow_outbox::audit` computes the hashes and
-- `trialflow audit verify` checks them); the database keeps the chain's shape: gapless seqs, each
-- record linked to the one before, the head moved only by appends.

CREATE TABLE audit_trail (
    -- 1, 2, 3, ... without gaps: assigned by the appending transaction under the head's lock.
    seq          bigint PRIMARY KEY CHECK (seq >= 1),
    -- Server time (UTC, microseconds), read under the head's lock: monotone with seq.
    recorded_at  timestamptz NOT NULL,
    -- Who: the person (user id) or the system (service name) that made the change, and its role
    -- (`system` for a service, `operator` for the command line).
    actor_user   text NOT NULL CHECK (actor_user <> ''),
    actor_role   text NOT NULL CHECK (actor_role <> ''),
    -- For a system's change: the person whose request it carried out, when the event says.
    on_behalf_of text,
    -- What: `subject.screened`, `kit.dispensed`, `alert.acknowledged`, ...
    action       text NOT NULL CHECK (action <> ''),
    entity_type  text NOT NULL CHECK (entity_type <> ''),
    entity_id    text NOT NULL,
    study_id     text,
    site_id      text,
    -- [{"field", "old", "new"}, ...]; a change whose values reveal treatment arms carries
    -- "unblinded": true, and blinded views leave it out.
    changes      jsonb NOT NULL CHECK (jsonb_typeof(changes) = 'array'),
    -- Any change of this record is unblinded (for filtering; the changes say which).
    unblinded    boolean NOT NULL,
    -- Why: required for corrections, acknowledgements, withdrawals, discards.
    reason       text,
    -- What caused it: `request:<Idempotency-Key>`, `event:<event id>`, ...
    cause        text,
    prev_hash    bytea NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash         bytea NOT NULL CHECK (octet_length(hash) = 32)
);

CREATE INDEX audit_trail_by_study ON audit_trail (study_id, seq);

-- The chain's head: the last record's seq and hash (0 and 32 zero bytes before the first). Every
-- append locks it (serializing the appends of one service) and moves it in the same transaction,
-- so `verify` can tell a deleted tail from an untouched chain.
CREATE TABLE audit_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_seq  bigint NOT NULL CHECK (last_seq >= 0),
    last_hash bytea NOT NULL CHECK (octet_length(last_hash) = 32)
);
INSERT INTO audit_head (last_seq, last_hash) VALUES (0, decode(repeat('00', 32), 'hex'));

CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.% is append-only: % refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Audit records are never changed or removed; record a correction as a new change.';
END
$$;

CREATE TRIGGER audit_trail_no_update BEFORE UPDATE OR DELETE ON audit_trail
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_trail_no_truncate BEFORE TRUNCATE ON audit_trail
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- The head moves only from inside `audit_trail_append` (a trigger of an INSERT into audit_trail,
-- hence trigger depth 2), never by a statement of its own.
CREATE FUNCTION audit_head_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION '%.audit_head moves only with an append to audit_trail', TG_TABLE_SCHEMA
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_head_guard BEFORE UPDATE ON audit_head
    FOR EACH ROW EXECUTE FUNCTION audit_head_guard();

-- Every INSERT statement must continue the chain: its records' seqs follow the head's without a
-- gap, each record's prev_hash is the hash before it; then the head moves to its last record.
-- The hashes themselves are computed and checked by the application (`verify`). The function
-- keeps the search_path of this migration (the service schema): writers name tables qualified.
CREATE FUNCTION audit_trail_append() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    head    audit_head%ROWTYPE;
    v_first bigint;
    v_last  bigint;
    v_count bigint;
    v_broken bigint;
BEGIN
    SELECT * INTO head FROM audit_head FOR UPDATE;
    SELECT min(seq), max(seq), count(*) INTO v_first, v_last, v_count FROM appended;
    IF v_count = 0 THEN
        RETURN NULL;
    END IF;
    IF v_first <> head.last_seq + 1 OR v_last - v_first + 1 <> v_count THEN
        RAISE EXCEPTION '%.audit_trail: records % to % do not follow the head (seq %)',
            TG_TABLE_SCHEMA, v_first, v_last, head.last_seq
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    SELECT a.seq INTO v_broken
    FROM appended a LEFT JOIN appended p ON p.seq = a.seq - 1
    WHERE a.prev_hash IS DISTINCT FROM CASE WHEN a.seq = v_first THEN head.last_hash ELSE p.hash END
    ORDER BY a.seq LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '%.audit_trail: record % does not link to the record before it', TG_TABLE_SCHEMA, v_broken
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    UPDATE audit_head SET last_seq = a.seq, last_hash = a.hash FROM appended a WHERE a.seq = v_last;
    RETURN NULL;
END
$$;
CREATE TRIGGER audit_trail_append AFTER INSERT ON audit_trail
    REFERENCING NEW TABLE AS appended FOR EACH STATEMENT EXECUTE FUNCTION audit_trail_append();
