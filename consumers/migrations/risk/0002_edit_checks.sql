-- Edit checks and the queries they open; data-entry lag and quality tolerance limits.

-- What the edit checks compare with: the consent date (day precision or finer, else NULL) and
-- why the subject was withdrawn (the first withdrawal's reason code).
ALTER TABLE subject ADD COLUMN consented_on date;
ALTER TABLE subject ADD COLUMN withdrawal_reason text;

-- Every vital-sign reading (one row per event), as the edit checks judge it. effective_at is the
-- earliest instant of the source's (maybe partial) date, NULL when it has none; effective_on its
-- UTC day when the source gave the date at least to the day (NULL for a year or a month alone).
CREATE TABLE reading (
    study_id            text NOT NULL,
    subject_id          text NOT NULL,
    event_id            uuid NOT NULL,
    site_id             text,
    code                text NOT NULL,
    name                text NOT NULL,
    value               double precision NOT NULL,
    unit                text NOT NULL,
    position            text,
    visit               text,
    effective_at        timestamptz,
    effective_on        date,
    occurred_at         timestamptz NOT NULL,
    recorded_at         timestamptz NOT NULL,
    PRIMARY KEY (study_id, subject_id, event_id)
);

-- Every adverse-event report (one row per event: an update of an AE is a report of its own);
-- onset_at and onset_on as a reading's effective_at and effective_on.
CREATE TABLE ae_report (
    study_id        text NOT NULL,
    subject_id      text NOT NULL,
    event_id        uuid NOT NULL,
    site_id         text,
    ae_id           text NOT NULL,
    term            text NOT NULL,
    onset_at        timestamptz,
    onset_on        date,
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL,
    PRIMARY KEY (study_id, subject_id, event_id)
);

-- Subjects whose data changed since the edit checks last ran on them (the evaluator takes them).
CREATE TABLE check_due (
    study_id   text NOT NULL,
    subject_id text NOT NULL,
    PRIMARY KEY (study_id, subject_id)
);

-- One row per query. query_id is derived from the study, the check and the data point, so a
-- check failing again on the same data (a replay) finds its query and opens nothing.
-- open → answered (site) → closed (researcher).
CREATE TABLE query (
    query_id       uuid PRIMARY KEY,
    study_id       text NOT NULL,
    site_id        text,
    subject_id     text NOT NULL,
    check_id       text NOT NULL,
    check_kind     text NOT NULL,
    item           text NOT NULL,
    data_event_ids uuid[] NOT NULL,
    value          text,
    message        text NOT NULL,
    status         text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'answered', 'closed')),
    opened_at      timestamptz NOT NULL,
    answered_at    timestamptz,
    answered_by    text,
    answer         text,
    closed_at      timestamptz,
    closed_by      text,
    close_reason   text
);
CREATE INDEX query_study_site ON query (study_id, site_id, status);

-- Every answer and closing the service applied or refused (a second answer to a query answered
-- meanwhile, a closing of an open query), with the event that carried it.
CREATE TABLE query_history (
    event_id    uuid PRIMARY KEY,
    query_id    uuid NOT NULL REFERENCES query,
    action      text NOT NULL CHECK (action IN ('answered', 'closed')),
    actor       text,
    at          timestamptz NOT NULL,
    text        text NOT NULL,
    applied     boolean NOT NULL
);

-- Each quality tolerance limit of a study at the last evaluation.
CREATE TABLE study_qtl (
    study_id    text NOT NULL REFERENCES study,
    qtl         text NOT NULL,
    numerator   double precision NOT NULL,
    denominator double precision NOT NULL,
    observed    double precision NOT NULL,
    expected    double precision NOT NULL,
    qtl_limit   double precision NOT NULL,
    breached    boolean NOT NULL,
    changed_at  timestamptz NOT NULL,
    PRIMARY KEY (study_id, qtl)
);
