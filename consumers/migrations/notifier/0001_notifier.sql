-- The notifier's tables. Applied with the consumer's schema first on the search_path.

-- Alerts seen on the alerts topic: what an escalation page repeats (summary, evidence), and whether
-- the alert still wants escalation pages.
CREATE TABLE alert (
    alert_id     uuid PRIMARY KEY,
    study_id     text NOT NULL,
    -- The AlertRaised event (JSON form); AlertUpdated appends to its evidence.
    raised       jsonb NOT NULL,
    -- Acknowledged or resolved: no further escalation pages.
    closed_at    timestamptz,
    closed_by    text
);

-- One notification to one recipient on one channel for one escalation level of one alert. The
-- unique key is the domain rule "at most once per (alert, recipient, channel, level)": a redelivered
-- event, a second raise of the same alert or a restart finds the row and adds nothing.
CREATE TABLE delivery (
    delivery_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id         uuid NOT NULL,
    recipient_id     text NOT NULL,
    channel          text NOT NULL,
    escalation_level integer NOT NULL CHECK (escalation_level >= 0),
    url              text NOT NULL,
    -- The event that called for it (AlertRaised or AlertEscalated, JSON form): the cause of the
    -- NotificationDelivered/Failed event.
    cause_type       text NOT NULL,
    cause            jsonb NOT NULL,
    -- When the cause was recorded by monitoring: start of the latency histogram.
    triggered_at     timestamptz NOT NULL,
    -- The exact bytes POSTed, fixed at creation: every attempt sends the same body and signature.
    body             text NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- A worker's claim: while `lease_until` is in the future nobody else attempts it; a crashed
    -- worker's claim simply expires.
    lease_until      timestamptz,
    claim_id         uuid,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (alert_id, recipient_id, channel, escalation_level)
);

CREATE INDEX delivery_due ON delivery (next_attempt_at) WHERE status = 'pending';

-- Wakes delivery workers (in any process) when deliveries are created: notifications are sent at
-- commit, once per transaction and payload. Workers also poll, so a lost one only costs latency.
CREATE FUNCTION delivery_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('trialflow_notifier', TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

CREATE TRIGGER delivery_notify AFTER INSERT ON delivery
    FOR EACH STATEMENT EXECUTE FUNCTION delivery_notify();
