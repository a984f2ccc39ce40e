-- Tables of the test handler: every application is logged (no unique constraint: a double
-- application must be visible), and a configuration table a message can depend on.
CREATE TABLE applied (
    event_id   uuid NOT NULL,
    partition  integer NOT NULL,
    "offset"   bigint NOT NULL,
    payload    text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE config (name text PRIMARY KEY);
