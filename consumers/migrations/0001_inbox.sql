-- The consumer runtime's tables in a consumer's own schema, applied by `trialflow migrate` with that
-- schema first on the search_path (beside the schema's outbox).

-- Events this consumer has taken: the insert happens in the same transaction as the handler's
-- effects, so a redelivered event conflicts here and is skipped (exactly-once effects).
CREATE TABLE inbox (
    consumer     text NOT NULL,
    event_id     uuid NOT NULL,
    outcome      text NOT NULL CHECK (outcome IN ('applied', 'parked')),
    topic        text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset bigint NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
-- BRIN: rows arrive in processed_at order, so a block-range index serves the retention delete at
-- a fraction of a B-tree's cost on every insert.
CREATE INDEX inbox_processed_at ON inbox USING brin (processed_at);

-- Messages whose handler said "not yet" (a dependency not seen yet). Retried when the dependency
-- is resolved or at next_attempt_at; dead-lettered once older than the maximum parking age.
CREATE TABLE parked (
    consumer        text NOT NULL,
    event_id        uuid NOT NULL,
    dependency      text NOT NULL,
    reason          text NOT NULL,
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    key             bytea,
    payload         bytea,
    headers         jsonb NOT NULL DEFAULT '{}'::jsonb,
    attempts        integer NOT NULL DEFAULT 1,
    parked_at       timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX parked_due ON parked (consumer, next_attempt_at);
CREATE INDEX parked_dependency ON parked (consumer, dependency);
