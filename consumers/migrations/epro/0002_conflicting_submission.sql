-- Resubmissions of a decided submission id with other content: each is rejected
-- (CONFLICTING_DUPLICATE; the first submission stands) and kept here, so every decision the
-- validator published has its row.
CREATE TABLE conflicting_submission (
    event_id      uuid PRIMARY KEY,
    submission_id uuid NOT NULL REFERENCES submission,
    study_id      text NOT NULL,
    subject_id    text NOT NULL,
    content_hash  text NOT NULL,
    reasons       jsonb NOT NULL,
    decided_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conflicting_submission_by_study ON conflicting_submission (study_id);
