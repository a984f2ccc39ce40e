//! Metric names of the relay. Labels are bounded: `source` is a service schema.

pub const PUBLISHED_TOTAL: &str = "trialflow_outbox_published_total";
pub const BATCH_DURATION_SECONDS: &str = "trialflow_outbox_batch_duration_seconds";
pub const COMMIT_TO_ACK_SECONDS: &str = "trialflow_outbox_commit_to_ack_seconds";
pub const BACKLOG_ROWS: &str = "trialflow_outbox_backlog_rows";
pub const OLDEST_ROW_AGE_SECONDS: &str = "trialflow_outbox_oldest_row_age_seconds";
pub const OWNED_SHARDS: &str = "trialflow_outbox_owned_shards";
pub const ERRORS_TOTAL: &str = "trialflow_outbox_errors_total";
pub const QUARANTINED_ROWS: &str = "trialflow_outbox_quarantined_rows";
pub const QUARANTINED_TOTAL: &str = "trialflow_outbox_quarantined_total";

/// Registers descriptions with whatever recorder is installed.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(PUBLISHED_TOTAL, Unit::Count, "Outbox rows acknowledged by the broker and deleted.");
    describe_histogram!(
        BATCH_DURATION_SECONDS,
        Unit::Seconds,
        "Time from reading a batch to its acknowledgement and deletion."
    );
    describe_histogram!(
        COMMIT_TO_ACK_SECONDS,
        Unit::Seconds,
        "Time from a row's insert (in its committing transaction) to its broker acknowledgement."
    );
    describe_gauge!(BACKLOG_ROWS, Unit::Count, "Unpublished rows in the outbox (all shards).");
    describe_gauge!(OLDEST_ROW_AGE_SECONDS, Unit::Seconds, "Age of the oldest unpublished row.");
    describe_gauge!(OWNED_SHARDS, Unit::Count, "Shards this relay instance currently owns.");
    describe_counter!(ERRORS_TOTAL, Unit::Count, "Relay failures, by kind; each is retried.");
    describe_gauge!(
        QUARANTINED_ROWS,
        Unit::Count,
        "Rows in the quarantine: refused by the broker for good, waiting for an operator (retry or discard)."
    );
    describe_counter!(
        QUARANTINED_TOTAL,
        Unit::Count,
        "Rows moved to the quarantine because the broker refused them for good."
    );
}
