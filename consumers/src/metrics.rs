//! Metric names of the consumer runtime; label `consumer` (bounded: one per domain consumer).

/// Messages by `outcome`: applied, duplicate, parked, unparked, dead_lettered.
pub const MESSAGES_TOTAL: &str = "trialflow_consumer_messages_total";
pub const RETRIES_TOTAL: &str = "trialflow_consumer_batch_retries_total";
pub const PROCESSING_SECONDS: &str = "trialflow_consumer_processing_seconds";
pub const BATCH_SECONDS: &str = "trialflow_consumer_batch_seconds";
pub const BATCH_SIZE: &str = "trialflow_consumer_batch_size";
pub const LAG_MESSAGES: &str = "trialflow_consumer_lag_messages";

pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        MESSAGES_TOTAL,
        Unit::Count,
        "Messages taken, by outcome (applied, duplicate, parked, unparked, dead_lettered)."
    );
    describe_counter!(
        RETRIES_TOTAL,
        Unit::Count,
        "Batches rolled back after a transient failure and retried."
    );
    describe_histogram!(PROCESSING_SECONDS, Unit::Seconds, "Handler time per message.");
    describe_histogram!(BATCH_SECONDS, Unit::Seconds, "Time to apply and commit one batch.");
    describe_gauge!(
        LAG_MESSAGES,
        Unit::Count,
        "Messages between the committed position and the end of the assigned partitions."
    );
}
