//! Topic names (`<domain>.<name>.v1`). Keys, producers, consumers and retention: `schemas/README.md`.

/// Subject lifecycle, keyed by subject id (one subject's events in order).
pub const SUBJECT_LIFECYCLE: &str = "enrollment.subject-lifecycle.v1";
/// RESTRICTED (unblinded): treatment arm per randomized subject, keyed by subject id.
pub const TREATMENT_ASSIGNMENTS: &str = "enrollment.treatment-assignments.v1";
/// RESTRICTED (unblinded): kit shipments and stock per arm, keyed by site id.
pub const KIT_INVENTORY: &str = "supply.kit-inventory.v1";
/// Kit allocation outcomes (blinded), keyed by subject id.
pub const KIT_ALLOCATIONS: &str = "supply.kit-allocations.v1";
/// Ingestion topic written by patient apps, keyed by subject id.
pub const EPRO_SUBMISSIONS: &str = "epro.submissions.v1";
/// Validation outcomes of ePRO submissions, keyed by subject id.
pub const EPRO_RESPONSES: &str = "epro.responses.v1";
/// Vital signs from EDC and sites, keyed by subject id.
pub const CLINICAL_OBSERVATIONS: &str = "clinical.observations.v1";
/// Adverse events, keyed by subject id.
pub const ADVERSE_EVENTS: &str = "safety.adverse-events.v1";
/// Alert lifecycle, keyed by alert id.
pub const ALERTS: &str = "monitoring.alerts.v1";
/// Notification outcomes, keyed by alert id.
pub const NOTIFICATIONS: &str = "monitoring.notifications.v1";

/// Topics that carry unblinded data: only unblinded roles and services may read them.
pub const RESTRICTED: &[&str] = &[TREATMENT_ASSIGNMENTS, KIT_INVENTORY];

/// Every topic with its partition count for a local or default setup.
pub const ALL: &[&str] = &[
    SUBJECT_LIFECYCLE,
    TREATMENT_ASSIGNMENTS,
    KIT_INVENTORY,
    KIT_ALLOCATIONS,
    EPRO_SUBMISSIONS,
    EPRO_RESPONSES,
    CLINICAL_OBSERVATIONS,
    ADVERSE_EVENTS,
    ALERTS,
    NOTIFICATIONS,
];
