-- The relay tests' synthetic stand-in service (testkit::workload): it records vital-sign readings
-- and publishes one event per reading through its outbox.
CREATE TABLE vital_sign (
    id           uuid PRIMARY KEY,
    subject_id   text NOT NULL,
    subject_seq  bigint NOT NULL,
    loinc        text NOT NULL,
    value        double precision NOT NULL,
    unit         text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (subject_id, subject_seq)
);
