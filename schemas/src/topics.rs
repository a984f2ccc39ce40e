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
/// Key risk indicator flags of sites (key `<study>/<site>`) and quality tolerance limits of
/// studies (key `<study>`): risk service → monitoring.
pub const KRI_FLAGS: &str = "risk.kri-flags.v1";
/// Data queries (opened by edit checks, answered by sites, closed by researchers); key: query id.
pub const QUERIES: &str = "risk.queries.v1";

/// Topics that carry unblinded data: only unblinded roles and services may read them.
pub const RESTRICTED: &[&str] = &[STUDY_CONFIGURATION, TREATMENT_ASSIGNMENTS, KIT_INVENTORY];

/// Suffix of a dead-letter topic, `<topic>.dlq` (the consumer runtime's default `CONSUMER_DLQ_SUFFIX`).
pub const DLQ_SUFFIX: &str = ".dlq";

/// The dead-letter topics of [`RESTRICTED`] (default suffix). A dead letter is the original
/// message, payload and headers, so it carries the arm or the seed exactly as its topic did: it is
/// restricted like its topic. Provision their read ACLs with the restricted topics'.
pub const RESTRICTED_DLQ: &[&str] = &[
    "studies.configuration.v1.dlq",
    "enrollment.treatment-assignments.v1.dlq",
    "supply.kit-inventory.v1.dlq",
];

/// Who may read each restricted topic (its read ACL): the consumers (by consumer name) that need the
/// unblinded data. Every other consumer and service reads blinded topics only. Nothing consumes a
/// restricted topic's dead letters; operators of unblinded roles inspect them (`trialflow dlq`).
pub const RESTRICTED_READERS: &[(&str, &[&str])] = &[
    (STUDY_CONFIGURATION, &["enrollment", "kit-allocation"]),
    (TREATMENT_ASSIGNMENTS, &["kit-allocation"]),
    // Monitoring raises the blinded SITE-LOW-STOCK alert from `SiteStockLow`; the alert never
    // names the arm.
    (KIT_INVENTORY, &["kit-allocation", "monitoring"]),
];

/// Whether catalogue topic `topic` carries unblinded data: a restricted topic or a dead-letter
/// topic (default suffix, at any depth) of one.
pub fn is_restricted(topic: &str) -> bool {
    is_restricted_with(topic, DLQ_SUFFIX)
}

/// [`is_restricted`] with dead-letter suffix `dlq_suffix` (the consumers' `CONSUMER_DLQ_SUFFIX`).
pub fn is_restricted_with(topic: &str, dlq_suffix: &str) -> bool {
    RESTRICTED.contains(&dead_lettered(topic, dlq_suffix))
}

/// The topic whose dead letters `topic` holds (`topic` itself if it is not a dead-letter topic).
pub fn dead_lettered<'a>(topic: &'a str, dlq_suffix: &str) -> &'a str {
    let mut original = topic;
    if !dlq_suffix.is_empty() {
        while let Some(shorter) = original.strip_suffix(dlq_suffix) {
            original = shorter;
        }
    }
    original
}

/// The consumers allowed to read catalogue topic `topic`: `None` when it is blinded (anyone may),
/// an empty list for a restricted topic's dead letters (operators only, no consumer).
pub fn restricted_readers(topic: &str, dlq_suffix: &str) -> Option<&'static [&'static str]> {
    if !is_restricted_with(topic, dlq_suffix) {
        return None;
    }
    if dead_lettered(topic, dlq_suffix) != topic {
        return Some(&[]);
    }
    RESTRICTED_READERS.iter().find(|(t, _)| *t == topic).map(|(_, readers)| *readers).or(Some(&[]))
}

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
    KRI_FLAGS,
    QUERIES,
];

/// How long a topic keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Kept for ever (a compacted topic keeps the latest message of each key).
    Forever,
    /// Deleted after this many days.
    Days(u32),
}

impl Retention {
    /// Kafka's `retention.ms` for it (`-1`: for ever).
    pub fn retention_ms(self) -> i64 {
        match self {
            Retention::Forever => -1,
            Retention::Days(days) => i64::from(days) * 24 * 60 * 60 * 1000,
        }
    }
}

/// A catalogue topic's retention and clean-up: its row of the topic table in schemas/README.md
/// (checked against it by a test). Dead-letter topics keep their messages at least a year and
/// are never compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicPolicy {
    pub topic: &'static str,
    pub retention: Retention,
    /// `cleanup.policy=compact` (the latest message of each key stays), else `delete`.
    pub compacted: bool,
}

const YEAR: Retention = Retention::Days(365);

/// The policy of every catalogue topic, in [`ALL`]'s order.
pub const POLICIES: &[TopicPolicy] = &[
    TopicPolicy { topic: STUDY_CONFIGURATION, retention: Retention::Forever, compacted: true },
    TopicPolicy { topic: SUBJECT_LIFECYCLE, retention: YEAR, compacted: false },
    TopicPolicy { topic: RANDOMIZATION_LISTS, retention: YEAR, compacted: false },
    TopicPolicy { topic: TREATMENT_ASSIGNMENTS, retention: YEAR, compacted: false },
    TopicPolicy { topic: KIT_INVENTORY, retention: YEAR, compacted: false },
    TopicPolicy { topic: KIT_ALLOCATIONS, retention: YEAR, compacted: false },
    TopicPolicy { topic: EPRO_SUBMISSIONS, retention: Retention::Days(30), compacted: false },
    TopicPolicy { topic: EPRO_RESPONSES, retention: YEAR, compacted: false },
    TopicPolicy { topic: CLINICAL_OBSERVATIONS, retention: YEAR, compacted: false },
    TopicPolicy { topic: ADVERSE_EVENTS, retention: YEAR, compacted: false },
    TopicPolicy { topic: ALERTS, retention: YEAR, compacted: false },
    TopicPolicy { topic: NOTIFICATIONS, retention: Retention::Days(90), compacted: false },
    TopicPolicy { topic: KRI_FLAGS, retention: YEAR, compacted: false },
    TopicPolicy { topic: QUERIES, retention: YEAR, compacted: false },
];

/// The policy of catalogue topic `topic`; `None` for a name outside the catalogue.
pub fn policy(topic: &str) -> Option<&'static TopicPolicy> {
    POLICIES.iter().find(|p| p.topic == topic)
}

/// The policy of the dead-letter topic of `policy`'s topic: at least a year, never compacted (a
/// dead letter's key is the original's, and two letters of one key must both stay).
pub fn dead_letter_policy(policy: &TopicPolicy) -> TopicPolicy {
    let retention = match policy.retention {
        Retention::Days(days) if days >= 365 => Retention::Days(days),
        Retention::Days(_) => YEAR,
        Retention::Forever => Retention::Forever,
    };
    TopicPolicy { topic: policy.topic, retention, compacted: false }
}

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

    /// The deployed name of the dead-letter topic of catalogue topic `topic`.
    pub fn dead_letter(&self, topic: &str, dlq_suffix: &str) -> String {
        format!("{}{topic}{dlq_suffix}", self.prefix)
    }

    /// The deployed names of every restricted topic and of its dead-letter topic: what the read
    /// ACLs of unblinded roles cover, and nobody else's.
    pub fn restricted(&self, dlq_suffix: &str) -> Vec<String> {
        RESTRICTED.iter().flat_map(|t| [self.name(t), self.dead_letter(t, dlq_suffix)]).collect()
    }

    /// Whether deployed topic `deployed` (of this prefix) is restricted, its dead-letter topics
    /// included. A name without this prefix is not one of ours and is judged as a catalogue name.
    pub fn is_restricted(&self, deployed: &str, dlq_suffix: &str) -> bool {
        is_restricted_with(deployed.strip_prefix(self.prefix.as_str()).unwrap_or(deployed), dlq_suffix)
    }
}
