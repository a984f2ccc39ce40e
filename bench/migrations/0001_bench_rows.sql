-- The table of the consumer benchmark's trivial handler (one row per event).
CREATE TABLE bench_rows (
    event_id   uuid NOT NULL,
    partition  integer NOT NULL,
    "offset"   bigint NOT NULL
);
