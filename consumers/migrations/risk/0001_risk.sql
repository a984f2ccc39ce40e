-- The risk service's tables: per subject what the key risk indicators count, and the last
-- evaluation of every KRI per study and site. Applied with the consumer's schema first on the
-- search_path.

-- One row per subject heard of. Every column is merged so that the result does not depend on the
-- order the events arrive in (their topics are read in parallel): dates keep the event's own
-- date, the latest eligibility assessment wins by its occurrence time.
CREATE TABLE subject (
    study_id       text NOT NULL,
    subject_id     text NOT NULL,
    -- From the first event naming it (lifecycle events always do).
    site_id        text,
    -- The latest EligibilityAssessed (by occurred_at): whether the subject was found eligible.
    eligible       boolean,
    assessed_at    timestamptz,
    -- UTC dates of SubjectEnrolled and SubjectWithdrawn.
    enrolled_on    date,
    withdrawn_on   date,
    -- The latest UTC date of any of its events (lifecycle, vital signs, adverse events).
    last_seen_on   date NOT NULL,
    PRIMARY KEY (study_id, subject_id)
);

-- One row per adverse event (its source id; updates of the same AE are one AE). Serious once
-- reported serious.
CREATE TABLE adverse_event (
    study_id   text NOT NULL,
    subject_id text NOT NULL,
    ae_id      text NOT NULL,
    serious    boolean NOT NULL,
    PRIMARY KEY (study_id, subject_id, ae_id)
);

-- Studies with changes not evaluated yet, marked per partition of the message that changed them:
-- workers of different partitions never wait on each other's mark; the evaluator deletes the
-- marks it takes.
CREATE TABLE dirty (
    study_id  text NOT NULL,
    partition text NOT NULL,
    PRIMARY KEY (study_id, partition)
);

-- One row per evaluated study: locked by the evaluator for the evaluation (one at a time).
CREATE TABLE study (
    study_id     text PRIMARY KEY,
    evaluated_at timestamptz NOT NULL
);

-- The study's metric and over-dispersion factor per KRI at the last evaluation.
CREATE TABLE study_kri (
    study_id text NOT NULL REFERENCES study,
    kri      text NOT NULL,
    overall  double precision NOT NULL,
    factor   double precision,
    PRIMARY KEY (study_id, kri)
);

-- Each site's counts, score and flag per KRI at the last evaluation (score and flag NULL below the
-- minimum denominator or when nothing distinguishes sites); flag_changed_at is when the flag last
-- took its present value.
CREATE TABLE site_kri (
    study_id        text NOT NULL REFERENCES study,
    site_id         text NOT NULL,
    kri             text NOT NULL,
    numerator       double precision NOT NULL,
    denominator     double precision NOT NULL,
    metric          double precision NOT NULL,
    score           double precision,
    flag            smallint CHECK (flag BETWEEN -2 AND 2),
    flag_changed_at timestamptz NOT NULL,
    PRIMARY KEY (study_id, site_id, kri)
);
