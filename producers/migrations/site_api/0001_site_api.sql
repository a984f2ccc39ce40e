-- The site API: study set-up, sites, subjects and kit shipments as sites record them. Applied with
-- the service schema first on the search_path (see `trialflow_outbox::migrate_service`), so every
-- name below lands in that schema. Events leave through the outbox in the same schema.

-- A study and its configuration (version 1; later versions arrive with their issue). The
-- randomization seed is CONCEALED: it leaves this table only in the StudyConfigured event on the
-- restricted study-configuration topic, never through the API.
CREATE TABLE study (
    study_id            text NOT NULL,
    title               text NOT NULL,
    config_version      integer NOT NULL CHECK (config_version >= 1),
    min_age_years       integer CHECK (min_age_years >= 0),
    max_age_years       integer CHECK (max_age_years >= 0),
    seed                bigint NOT NULL,
    block_multiples     integer[] NOT NULL,
    slots_per_stratum   integer NOT NULL CHECK (slots_per_stratum >= 1),
    warn_slots_left     integer NOT NULL CHECK (warn_slots_left >= 0),
    enrollment_kit_type text NOT NULL,
    created_by          text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT study_pk PRIMARY KEY (study_id),
    CHECK (min_age_years IS NULL OR max_age_years IS NULL OR min_age_years <= max_age_years)
);

-- UNBLINDED (arms and ratio): only unblinded roles read them through the API.
CREATE TABLE study_arm (
    study_id text NOT NULL REFERENCES study,
    arm_code text NOT NULL,
    name     text NOT NULL,
    ratio    integer NOT NULL CHECK (ratio >= 1),
    position integer NOT NULL,
    PRIMARY KEY (study_id, arm_code)
);

CREATE TABLE stratification_factor (
    study_id text NOT NULL REFERENCES study,
    factor   text NOT NULL,
    factor_values text[] NOT NULL CHECK (cardinality(factor_values) >= 1),
    -- The study's factor order: EnrollmentRequested lists strata in it.
    position integer NOT NULL,
    PRIMARY KEY (study_id, factor)
);

CREATE TABLE eligibility_criterion (
    study_id     text NOT NULL REFERENCES study,
    criterion_id text NOT NULL,
    description  text NOT NULL,
    position     integer NOT NULL,
    PRIMARY KEY (study_id, criterion_id)
);

CREATE TABLE kit_type (
    study_id             text NOT NULL REFERENCES study,
    kit_type             text NOT NULL,
    do_not_dispense_days integer NOT NULL CHECK (do_not_dispense_days >= 0),
    do_not_count_days    integer NOT NULL CHECK (do_not_count_days >= 0),
    low_stock_threshold  integer NOT NULL CHECK (low_stock_threshold >= 0),
    position             integer NOT NULL,
    PRIMARY KEY (study_id, kit_type)
);

-- Sites have no event of their own: consumers learn a site from the events that name it.
CREATE TABLE site (
    study_id   text NOT NULL REFERENCES study,
    site_id    text NOT NULL,
    name       text NOT NULL,
    country    text,
    -- IANA zone, the default time zone of the site's subjects.
    time_zone  text NOT NULL,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT site_pk PRIMARY KEY (study_id, site_id)
);

CREATE TABLE shipment (
    study_id    text NOT NULL,
    shipment_id text NOT NULL,
    site_id     text NOT NULL,
    received_by text NOT NULL,
    received_at timestamptz NOT NULL,
    event_id    uuid NOT NULL,
    CONSTRAINT shipment_pk PRIMARY KEY (study_id, shipment_id),
    FOREIGN KEY (study_id, site_id) REFERENCES site
);

-- UNBLINDED (arm_code): a kit's treatment, shown to unblinded roles only. A kit number is
-- received once per study, whichever site it went to.
CREATE TABLE kit (
    study_id        text NOT NULL,
    kit_number      text NOT NULL,
    site_id         text NOT NULL,
    shipment_id     text NOT NULL,
    sequence_number bigint NOT NULL,
    kit_type        text NOT NULL,
    lot             text NOT NULL,
    expiry_date     date NOT NULL,
    arm_code        text NOT NULL,
    CONSTRAINT kit_number_unique PRIMARY KEY (study_id, kit_number),
    FOREIGN KEY (study_id, shipment_id) REFERENCES shipment,
    FOREIGN KEY (study_id, site_id) REFERENCES site,
    FOREIGN KEY (study_id, kit_type) REFERENCES kit_type,
    FOREIGN KEY (study_id, arm_code) REFERENCES study_arm
);

CREATE INDEX kit_by_site ON kit (study_id, site_id, sequence_number);

CREATE TABLE subject (
    study_id                text NOT NULL,
    subject_id              text NOT NULL,
    site_id                 text NOT NULL,
    screening_number        text NOT NULL,
    age_years               integer,
    sex                     text,
    time_zone               text NOT NULL,
    eligible                boolean NOT NULL,
    screened_by             text NOT NULL,
    screened_at             timestamptz NOT NULL,
    -- The SubjectScreened event: every later event of the subject carries it as correlation id.
    screening_event_id      uuid NOT NULL,
    withdrawn_at            timestamptz,
    withdrawal_reason_code  text,
    withdrawal_reason       text,
    CONSTRAINT subject_pk PRIMARY KEY (study_id, subject_id),
    CONSTRAINT subject_screening_number_unique UNIQUE (study_id, screening_number),
    FOREIGN KEY (study_id, site_id) REFERENCES site
);

-- One row per eligibility criterion result, as assessed at screening.
CREATE TABLE eligibility_result (
    study_id     text NOT NULL,
    subject_id   text NOT NULL,
    criterion_id text NOT NULL,
    met          boolean NOT NULL,
    detail       text,
    position     integer NOT NULL,
    PRIMARY KEY (study_id, subject_id, criterion_id),
    FOREIGN KEY (study_id, subject_id) REFERENCES subject
);

-- Every consent signature (a subject re-consents when the form changes); id = the event id.
CREATE TABLE consent (
    event_id        uuid PRIMARY KEY,
    study_id        text NOT NULL,
    subject_id      text NOT NULL,
    consent_version text NOT NULL,
    -- As the site gave it (ISO 8601, possibly partial), never completed silently.
    signed_at_raw   text NOT NULL,
    signed_at       timestamptz,
    recorded_by     text NOT NULL,
    recorded_at     timestamptz NOT NULL,
    FOREIGN KEY (study_id, subject_id) REFERENCES subject
);

-- Every enrollment request; the enrollment consumer decides what becomes of it. id = the event id.
CREATE TABLE enrollment_request (
    event_id     uuid PRIMARY KEY,
    study_id     text NOT NULL,
    subject_id   text NOT NULL,
    -- [{factor, value}] in the study's factor order; missing factors are allowed here.
    strata       jsonb NOT NULL,
    requested_by text NOT NULL,
    requested_at timestamptz NOT NULL,
    FOREIGN KEY (study_id, subject_id) REFERENCES subject
);

-- Completed commands by caller and Idempotency-Key, written in the command's own transaction.
-- status and body are NULL only inside that transaction (it fills them before committing), so a
-- committed row always holds the response to replay.
CREATE TABLE idempotency (
    principal    text NOT NULL,
    key          text NOT NULL,
    -- sha256 of method, path and body: a key reused for another request is refused.
    request_hash text NOT NULL,
    status       integer,
    body         jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, key)
);

-- For a retention job deleting keys older than any client's retry horizon.
CREATE INDEX idempotency_created_at ON idempotency (created_at);
