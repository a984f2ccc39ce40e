-- The kit-allocation consumer's tables (an unblinded service: it knows every kit's treatment).
-- Applied with the consumer's schema first on the search_path.

-- Study settings it needs, from StudyConfigured (latest version wins).
CREATE TABLE study (
    study_id            text PRIMARY KEY,
    config_version      integer NOT NULL,
    enrollment_kit_type text NOT NULL,
    arm_codes           text[] NOT NULL
);

CREATE TABLE kit_type (
    study_id             text NOT NULL REFERENCES study,
    kit_type             text NOT NULL,
    do_not_dispense_days integer NOT NULL CHECK (do_not_dispense_days >= 0),
    do_not_count_days    integer NOT NULL CHECK (do_not_count_days >= 0),
    low_stock_threshold  integer NOT NULL CHECK (low_stock_threshold >= 0),
    PRIMARY KEY (study_id, kit_type)
);

-- One row per site that has inventory or waiting subjects. Every change to a site's inventory
-- first locks this row: one writer per site at a time, so two subjects randomized at the same
-- site in parallel partitions never pick the same kit, and a shipment never misses a subject who
-- started waiting for it in the same instant.
CREATE TABLE site_inventory (
    study_id text NOT NULL REFERENCES study,
    site_id  text NOT NULL,
    PRIMARY KEY (study_id, site_id)
);

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
    status          text NOT NULL DEFAULT 'available'
        CHECK (status IN ('available', 'allocated', 'quarantined', 'damaged', 'lost', 'expired')),
    received_at     timestamptz NOT NULL,
    PRIMARY KEY (study_id, kit_number),
    FOREIGN KEY (study_id, site_id) REFERENCES site_inventory
);
CREATE INDEX kit_dispensable ON kit (study_id, site_id, kit_type, arm_code, sequence_number)
    WHERE status = 'available';

-- A kit is allocated at most once (primary key), and a randomization gets one enrollment kit
-- (unique): enforced by the database, not only by the code that chooses.
CREATE TABLE allocation (
    study_id             text NOT NULL,
    kit_number           text NOT NULL,
    randomization_number text NOT NULL,
    subject_id           text NOT NULL,
    site_id              text NOT NULL,
    allocated_on         date NOT NULL,
    caused_by            uuid NOT NULL,
    allocated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (study_id, kit_number),
    UNIQUE (study_id, randomization_number),
    FOREIGN KEY (study_id, kit_number) REFERENCES kit
);

-- Randomized subjects with no dispensable kit yet: retried when a shipment reaches their site.
CREATE TABLE pending_allocation (
    study_id             text NOT NULL,
    randomization_number text NOT NULL,
    subject_id           text NOT NULL,
    site_id              text NOT NULL,
    arm_code             text NOT NULL,
    kit_type             text NOT NULL,
    correlation_id       uuid,
    waiting_since        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (study_id, randomization_number),
    FOREIGN KEY (study_id, site_id) REFERENCES site_inventory
);
CREATE INDEX pending_by_site ON pending_allocation (study_id, site_id, waiting_since);

-- Whether a site's countable stock of (kit type, arm) is below threshold: SiteStockLow fires on
-- the transition into "low", once per crossing.
CREATE TABLE stock_level (
    study_id  text NOT NULL,
    site_id   text NOT NULL,
    kit_type  text NOT NULL,
    arm_code  text NOT NULL,
    countable integer NOT NULL,
    low       boolean NOT NULL,
    PRIMARY KEY (study_id, site_id, kit_type, arm_code)
);
