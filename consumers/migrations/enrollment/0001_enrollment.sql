-- The enrollment consumer's tables. Applied with the consumer's schema first on the search_path.
-- The randomization lists are concealed: nothing outside this service reads them.

-- Study settings from StudyConfigured (latest version wins).
CREATE TABLE study (
    study_id          text PRIMARY KEY,
    config_version    integer NOT NULL,
    arms              jsonb NOT NULL,
    factors           jsonb NOT NULL,
    seed              bigint NOT NULL,
    block_multiples   integer[] NOT NULL,
    slots_per_stratum integer NOT NULL CHECK (slots_per_stratum > 0),
    warn_slots_left   integer NOT NULL CHECK (warn_slots_left >= 0)
);

-- One list per stratum. Taking a slot is `UPDATE ... SET slots_used = slots_used + 1`: the row
-- lock makes exactly one writer per list at a time, and numbers are handed out densely in list
-- order.
CREATE TABLE randomization_list (
    study_id    text NOT NULL REFERENCES study,
    stratum     text NOT NULL,
    list_id     text NOT NULL UNIQUE,
    ordinal     integer NOT NULL,
    slots_total integer NOT NULL,
    slots_used  integer NOT NULL DEFAULT 0 CHECK (slots_used BETWEEN 0 AND slots_total),
    PRIMARY KEY (study_id, stratum),
    UNIQUE (study_id, ordinal)
);

-- A subject is randomized at most once per study and a number is never given twice: both are
-- unique constraints, not only code paths. A used slot stays used, even if the subject withdraws.
CREATE TABLE randomization_slot (
    study_id             text NOT NULL,
    stratum              text NOT NULL,
    sequence             integer NOT NULL,
    block                integer NOT NULL,
    arm_code             text NOT NULL,
    randomization_number text NOT NULL,
    subject_id           text,
    used_at              timestamptz,
    PRIMARY KEY (study_id, stratum, sequence),
    UNIQUE (study_id, randomization_number),
    UNIQUE (study_id, subject_id),
    FOREIGN KEY (study_id, stratum) REFERENCES randomization_list
);

-- The subject as the saga sees it.
CREATE TABLE subject (
    study_id             text NOT NULL,
    subject_id           text NOT NULL,
    site_id              text,
    status               text NOT NULL
        CHECK (status IN ('screened', 'ineligible', 'on_hold', 'randomized', 'enrolled', 'withdrawn')),
    consent_version      text,
    eligible             boolean,
    eligibility_detail   text,
    stratum              text,
    randomization_number text,
    kit_number           text,
    hold_reason_code     text,
    hold_reason          text,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (study_id, subject_id)
);
