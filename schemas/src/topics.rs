//! Topic names (`<domain>.<name>.v1`). Keys, producers, consumers and retention: `schemas/README.md`.

/// RESTRICTED (concealed seed, arms): study set-up, keyed by study id.
pub const STUDY_CONFIGURATION: &str = "studies.configuration.v1";
/// Subject lifecycle, keyed by subject id (one subject's events in order).
pub const SUBJECT_LIFECYCLE: &str = "enrollment.subject-lifecycle.v1";
/// Randomization list warnings (slots running out), keyed by list id.
pub const RANDOMIZATION_LISTS: &str = "enrollment.randomization-lists.v1";
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
pub const RESTRICTED: &[&str] = &[STUDY_CONFIGURATION, TREATMENT_ASSIGNMENTS, KIT_INVENTORY];

/// Every topic.
pub const ALL: &[&str] = &[
    STUDY_CONFIGURATION,
    SUBJECT_LIFECYCLE,
    RANDOMIZATION_LISTS,
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

/// Topic names as deployed: the catalogue names above behind an optional prefix (`TOPIC_PREFIX`), so
/// several environments or test runs can share one cluster without seeing each other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicNames {
    prefix: String,
}

impl TopicNames {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    /// From `TOPIC_PREFIX` (empty when unset).
    pub fn from_env() -> Self {
        Self::new(std::env::var("TOPIC_PREFIX").unwrap_or_default())
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The deployed name of catalogue topic `topic`.
    pub fn name(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    /// The deployed name of the topic `E` is published to.
    pub fn of<E: crate::Event>(&self) -> String {
        self.name(E::TOPIC)
    }

    /// The deployed names of catalogue topics `topics`.
    pub fn names(&self, topics: &[&str]) -> Vec<String> {
        topics.iter().map(|t| self.name(t)).collect()
    }

    /// Every deployed topic name.
    pub fn all(&self) -> Vec<String> {
        self.names(ALL)
    }
}
