-- The epro-validation consumer's tables. Applied with the consumer's schema first on the search_path.

-- What the validator knows of each subject, from the subject-lifecycle topic.
CREATE TABLE subject (
    study_id     text NOT NULL,
    subject_id   text NOT NULL,
    time_zone    text,
    enrolled_at  timestamptz,
    withdrawn_at timestamptz,
    PRIMARY KEY (study_id, subject_id)
);

-- Every submission decided, by its client submission id (the idempotency key): a resubmission with
-- the same content is an exact duplicate, with other content a conflicting one.
CREATE TABLE submission (
    submission_id uuid PRIMARY KEY,
    study_id      text NOT NULL,
    subject_id    text NOT NULL,
    content_hash  text NOT NULL,
    outcome       text NOT NULL CHECK (outcome IN ('accepted', 'rejected')),
    reasons       jsonb NOT NULL DEFAULT '[]',
    decided_at    timestamptz NOT NULL DEFAULT now()
);

-- Accepted responses with their answers and computed score: for the monitoring rules and audit.
CREATE TABLE response (
    submission_id         uuid PRIMARY KEY REFERENCES submission,
    study_id              text NOT NULL,
    subject_id            text NOT NULL,
    questionnaire         text NOT NULL,
    questionnaire_version text NOT NULL,
    scheduled_occurrence  text,
    status                text NOT NULL,
    authored_at           timestamptz NOT NULL,
    received_at           timestamptz NOT NULL,
    device_time_zone      text NOT NULL,
    answers               jsonb NOT NULL,
    total_score           integer,
    severity_band         text,
    flagged_items         text[] NOT NULL,
    window_status         text NOT NULL,
    late_sync             boolean NOT NULL
);
-- One completed response per scheduled occurrence (amendments may follow): the second idempotency
-- key of the domain rules, (study, subject, questionnaire, occurrence), held by the database.
CREATE UNIQUE INDEX response_one_completed_per_occurrence
    ON response (study_id, subject_id, questionnaire, scheduled_occurrence)
    WHERE status = 'COMPLETED' AND scheduled_occurrence IS NOT NULL;
CREATE INDEX response_by_subject ON response (study_id, subject_id, authored_at);
