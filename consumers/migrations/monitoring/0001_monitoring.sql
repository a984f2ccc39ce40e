-- The monitoring service's tables: the monitoring consumer (rules → alert episodes, escalation
-- timers) and the alert API (researchers list, acknowledge and resolve) share this schema.
-- Applied with the schema first on the search_path.

-- Readings kept for aggregations that look beyond one event (mean of a visit, persistence).
CREATE TABLE observation (
    event_id     uuid PRIMARY KEY,
    study_id     text NOT NULL,
    subject_id   text NOT NULL,
    code         text NOT NULL,          -- LOINC
    value        double precision NOT NULL,
    unit         text NOT NULL,
    effective_at timestamptz NOT NULL,
    visit        text
);
CREATE INDEX observation_series ON observation (study_id, subject_id, code, effective_at);

-- One row per episode. At most one episode per (study, subject — or site, for site-level rules —,
-- rule) is not resolved.
CREATE TABLE alert (
    alert_id        uuid PRIMARY KEY,
    study_id        text NOT NULL,
    site_id         text,
    subject_id      text,
    rule_id         text NOT NULL,
    rule_version    integer NOT NULL,
    severity        text NOT NULL CHECK (severity IN ('INFO', 'WARNING', 'HIGH', 'CRITICAL')),
    source_label    text NOT NULL,
    summary         text NOT NULL,
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'acknowledged', 'resolved')),
    level           integer NOT NULL DEFAULT 0,      -- escalation level reached
    effective_at    timestamptz NOT NULL,            -- effective time of the first evidence
    raised_at       timestamptz NOT NULL DEFAULT now(),
    escalate_at     timestamptz,                     -- next escalation due while open and unacknowledged
    escalation_secs integer NOT NULL DEFAULT 3600,   -- the rule's escalation time, per level
    acknowledged_at timestamptz,
    acknowledged_by text,
    ack_reason      text,
    resolved_at     timestamptz,
    resolved_by     text,
    resolve_reason  text,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX alert_one_open_episode
    ON alert (study_id, (coalesce(subject_id, 'site:' || site_id)), rule_id) WHERE status <> 'resolved';
CREATE INDEX alert_due ON alert (escalate_at) WHERE status = 'open' AND escalate_at IS NOT NULL;
CREATE INDEX alert_listing ON alert (study_id, status, severity, raised_at DESC);

CREATE TABLE alert_evidence (
    alert_id    uuid NOT NULL REFERENCES alert,
    event_id    uuid NOT NULL,
    observed_at timestamptz NOT NULL,
    description text NOT NULL,
    value       double precision,
    unit        text,
    added_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (alert_id, event_id)
);

-- The timeline of each alert, in order (raised, updated, escalated, acknowledged, resolved):
-- the audit trail (who, when, why) and what the alert API's stream announces.
CREATE TABLE alert_history (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id uuid NOT NULL REFERENCES alert,
    kind     text NOT NULL CHECK (kind IN ('raised', 'updated', 'escalated', 'acknowledged', 'resolved')),
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text NOT NULL,
    detail   jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX alert_history_by_alert ON alert_history (alert_id, id);

-- Every change wakes the alert API's server-sent-events streams (any process on this database);
-- the payload is `<schema>:<history id>`.
CREATE FUNCTION alert_history_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('trialflow_alerts', TG_TABLE_SCHEMA || ':' || NEW.id);
    RETURN NULL;
END $$;
CREATE TRIGGER alert_history_notify AFTER INSERT ON alert_history
    FOR EACH ROW EXECUTE FUNCTION alert_history_notify();
