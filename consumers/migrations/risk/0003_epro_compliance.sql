-- ePRO compliance: the subject's time zone (SubjectScreened) and enrollment instant place its
-- schedule in local days; every scheduled occurrence with an accepted response.
ALTER TABLE subject ADD COLUMN time_zone text;
ALTER TABLE subject ADD COLUMN enrolled_at timestamptz;

CREATE TABLE epro_completed (
    study_id   text NOT NULL,
    subject_id text NOT NULL,
    occurrence text NOT NULL,
    PRIMARY KEY (study_id, subject_id, occurrence)
);
