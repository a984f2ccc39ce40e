//! The typed events. Each struct mirrors its `.avsc` file field by field (same names, same
//! order); `tests/contracts.rs` checks every one against its schema.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::topics;
use crate::types::{Date, Envelope, PartialDateTime, Timestamp};

/// An event with its contract: Avro record name, topic, and the envelope every event carries.
pub trait Event: Serialize + serde::de::DeserializeOwned + Clone + std::fmt::Debug + PartialEq {
    /// Full Avro name of the record, e.g. `org.trialflow.events.SubjectScreened`.
    const FULL_NAME: &'static str;
    /// Short name, also the `event_type` header and envelope field.
    const NAME: &'static str;
    /// The topic it is published to.
    const TOPIC: &'static str;

    fn envelope(&self) -> &Envelope;
}

macro_rules! events {
    ($($name:ident => $topic:expr),+ $(,)?) => {
        $(
            impl Event for $name {
                const FULL_NAME: &'static str = concat!("org.trialflow.events.", stringify!($name));
                const NAME: &'static str = stringify!($name);
                const TOPIC: &'static str = $topic;

                fn envelope(&self) -> &Envelope {
                    &self.envelope
                }
            }
        )+

        /// Any event of the catalogue, for consumers of topics that carry several types.
        #[derive(Debug, Clone, PartialEq)]
        #[allow(clippy::large_enum_variant)]
        pub enum AnyEvent {
            $($name($name),)+
        }

        impl AnyEvent {
            /// Short names of every event, in catalogue order.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name)),+];

            pub fn name(&self) -> &'static str {
                match self { $(AnyEvent::$name(_) => $name::NAME,)+ }
            }

            pub fn topic(&self) -> &'static str {
                match self { $(AnyEvent::$name(_) => $name::TOPIC,)+ }
            }

            pub fn envelope(&self) -> &Envelope {
                match self { $(AnyEvent::$name(e) => &e.envelope,)+ }
            }

            /// Decodes the Avro value of the event named `full_name`.
            pub(crate) fn from_value(
                full_name: &str,
                value: &apache_avro::types::Value,
            ) -> Option<Result<Self, apache_avro::Error>> {
                match full_name {
                    $(n if n == $name::FULL_NAME => Some(apache_avro::from_value::<$name>(value).map(AnyEvent::$name)),)+
                    _ => None,
                }
            }

            /// Encodes with the registry's current schema of the event.
            pub(crate) fn encode_with(&self, registry: &crate::Registry) -> Result<Vec<u8>, crate::CodecError> {
                match self { $(AnyEvent::$name(e) => registry.encode(e),)+ }
            }

            /// The event from its JSON form (field names as in the schema), for test vectors and tools.
            pub fn from_json(name: &str, json: serde_json::Value) -> Result<Self, serde_json::Error> {
                match name {
                    $(stringify!($name) => serde_json::from_value::<$name>(json).map(AnyEvent::$name),)+
                    other => Err(serde::de::Error::custom(format!("unknown event `{other}`"))),
                }
            }

            pub fn to_json(&self) -> serde_json::Value {
                match self { $(AnyEvent::$name(e) => serde_json::to_value(e).unwrap_or_default(),)+ }
            }
        }

        $(
            impl From<$name> for AnyEvent {
                fn from(e: $name) -> Self {
                    AnyEvent::$name(e)
                }
            }
        )+
    };
}

events! {
    StudyConfigured => topics::STUDY_CONFIGURATION,
    RandomizationListLow => topics::RANDOMIZATION_LISTS,
    SubjectScreened => topics::SUBJECT_LIFECYCLE,
    ConsentSigned => topics::SUBJECT_LIFECYCLE,
    EligibilityAssessed => topics::SUBJECT_LIFECYCLE,
    EnrollmentRequested => topics::SUBJECT_LIFECYCLE,
    SubjectRandomized => topics::SUBJECT_LIFECYCLE,
    SubjectEnrolled => topics::SUBJECT_LIFECYCLE,
    EnrollmentOnHold => topics::SUBJECT_LIFECYCLE,
    SubjectWithdrawn => topics::SUBJECT_LIFECYCLE,
    CodeBroken => topics::SUBJECT_LIFECYCLE,
    TreatmentAssigned => topics::TREATMENT_ASSIGNMENTS,
    KitsReceived => topics::KIT_INVENTORY,
    SiteStockLow => topics::KIT_INVENTORY,
    KitAllocated => topics::KIT_ALLOCATIONS,
    KitAllocationFailed => topics::KIT_ALLOCATIONS,
    QuestionnaireResponseSubmitted => topics::EPRO_SUBMISSIONS,
    QuestionnaireResponseAccepted => topics::EPRO_RESPONSES,
    QuestionnaireResponseRejected => topics::EPRO_RESPONSES,
    VitalSignRecorded => topics::CLINICAL_OBSERVATIONS,
    AdverseEventReported => topics::ADVERSE_EVENTS,
    AlertRaised => topics::ALERTS,
    AlertUpdated => topics::ALERTS,
    AlertEscalated => topics::ALERTS,
    AlertAcknowledged => topics::ALERTS,
    AlertResolved => topics::ALERTS,
    NotificationDelivered => topics::NOTIFICATIONS,
    NotificationFailed => topics::NOTIFICATIONS,
    KriFlagChanged => topics::KRI_FLAGS,
    QtlStatusChanged => topics::KRI_FLAGS,
    QueryOpened => topics::QUERIES,
    QueryAnswered => topics::QUERIES,
    QueryClosed => topics::QUERIES,
}

// ---- study set-up ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct StudyArm {
    pub arm_code: String,
    pub name: String,
    pub ratio: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct StratificationFactor {
    pub factor: String,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RandomizationSettings {
    /// CONCEALED.
    pub seed: i64,
    pub block_multiples: Vec<i32>,
    pub slots_per_stratum: i32,
    pub warn_slots_left: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct KitTypeSettings {
    pub kit_type: String,
    pub do_not_dispense_days: i32,
    pub do_not_count_days: i32,
    pub low_stock_threshold: i32,
}

/// RESTRICTED (seed, arms): restricted study-configuration topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct StudyConfigured {
    pub envelope: Envelope,
    pub config_version: i32,
    pub arms: Vec<StudyArm>,
    pub stratification_factors: Vec<StratificationFactor>,
    pub randomization: RandomizationSettings,
    pub kit_types: Vec<KitTypeSettings>,
    pub enrollment_kit_type: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RandomizationListLow {
    pub envelope: Envelope,
    pub randomization_list_id: String,
    pub stratum: String,
    pub slots_left: i32,
    pub slots_total: i32,
}

// ---- subject lifecycle -------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct SubjectScreened {
    pub envelope: Envelope,
    pub screening_number: String,
    pub time_zone: String,
    pub age_years: Option<i32>,
    pub sex: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ConsentSigned {
    pub envelope: Envelope,
    pub consent_version: String,
    pub signed_at: PartialDateTime,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CriterionResult {
    pub criterion_id: String,
    pub met: bool,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct EligibilityAssessed {
    pub envelope: Envelope,
    pub eligible: bool,
    pub criteria: Vec<CriterionResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct StratumValue {
    pub factor: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct EnrollmentRequested {
    pub envelope: Envelope,
    pub strata: Vec<StratumValue>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct SubjectRandomized {
    pub envelope: Envelope,
    pub randomization_number: String,
    pub randomization_list_id: String,
    pub stratum: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct SubjectEnrolled {
    pub envelope: Envelope,
    pub randomization_number: String,
    pub kit_number: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct EnrollmentOnHold {
    pub envelope: Envelope,
    pub reason_code: String,
    pub reason: String,
    pub randomization_number: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct SubjectWithdrawn {
    pub envelope: Envelope,
    pub reason_code: String,
    pub reason: Option<String>,
}

/// Emergency unblinding: an authorised user (the envelope's `actor`) was shown the subject's
/// treatment. Blinded: it says that it happened, who did it and why, never what was shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CodeBroken {
    pub envelope: Envelope,
    pub actor_role: String,
    pub reason: String,
}

// ---- unblinded -----------------------------------------------------------------------------

/// UNBLINDED: only on the restricted treatment-assignments topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TreatmentAssigned {
    pub envelope: Envelope,
    pub randomization_number: String,
    pub randomization_list_id: String,
    pub arm_code: String,
}

// ---- supply --------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ReceivedKit {
    pub kit_number: String,
    pub sequence_number: i64,
    pub kit_type: String,
    pub lot: String,
    pub expiry_date: Date,
    /// UNBLINDED.
    pub arm_code: String,
}

/// UNBLINDED (kit treatments): restricted kit-inventory topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct KitsReceived {
    pub envelope: Envelope,
    pub shipment_id: String,
    pub kits: Vec<ReceivedKit>,
}

/// UNBLINDED (names the arm): restricted kit-inventory topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct SiteStockLow {
    pub envelope: Envelope,
    pub kit_type: String,
    pub arm_code: String,
    pub countable: i32,
    pub threshold: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct KitAllocated {
    pub envelope: Envelope,
    pub randomization_number: String,
    pub kit_number: String,
    pub kit_type: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct KitAllocationFailed {
    pub envelope: Envelope,
    pub randomization_number: String,
    pub reason_code: String,
    pub reason: String,
}

// ---- ePRO ----------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ResponseStatus {
    Completed,
    Amended,
    InProgress,
    Unknown,
}

/// One answer; exactly one `value_*` is set for an answered item (FHIR `value[x]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Answer {
    pub link_id: String,
    pub value_integer: Option<i32>,
    #[cfg_attr(test, proptest(strategy = "crate::testing::opt_finite()"))]
    pub value_decimal: Option<f64>,
    pub value_string: Option<String>,
    pub value_boolean: Option<bool>,
}

impl Answer {
    /// An item with no value (what an app sends for a question it skipped).
    pub fn empty(link_id: impl Into<String>) -> Self {
        Self {
            link_id: link_id.into(),
            value_integer: None,
            value_decimal: None,
            value_string: None,
            value_boolean: None,
        }
    }

    /// An integer answer (a choice's value, a score).
    pub fn integer(link_id: impl Into<String>, value: i32) -> Self {
        Self { value_integer: Some(value), ..Self::empty(link_id) }
    }

    /// A decimal answer (a numeric rating).
    pub fn decimal(link_id: impl Into<String>, value: f64) -> Self {
        Self { value_decimal: Some(value), ..Self::empty(link_id) }
    }

    /// A text answer (free text, or a coded answer's code).
    pub fn text(link_id: impl Into<String>, value: impl Into<String>) -> Self {
        Self { value_string: Some(value.into()), ..Self::empty(link_id) }
    }

    /// A yes/no answer.
    pub fn boolean(link_id: impl Into<String>, value: bool) -> Self {
        Self { value_boolean: Some(value), ..Self::empty(link_id) }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct QuestionnaireResponseSubmitted {
    pub envelope: Envelope,
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub submission_id: Uuid,
    pub questionnaire: String,
    pub questionnaire_version: String,
    pub scheduled_occurrence: Option<String>,
    pub status: ResponseStatus,
    pub authored_at: Timestamp,
    pub device_time_zone: String,
    pub items: Vec<Answer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WindowStatus {
    InWindow,
    Early,
    Late,
    OutOfWindow,
    Unscheduled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct QuestionnaireResponseAccepted {
    pub envelope: Envelope,
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub submission_id: Uuid,
    pub questionnaire: String,
    pub questionnaire_version: String,
    pub scheduled_occurrence: Option<String>,
    pub authored_at: Timestamp,
    pub total_score: Option<i32>,
    pub severity_band: Option<String>,
    pub flagged_items: Vec<String>,
    pub window_status: WindowStatus,
    pub late_sync: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RejectionReason {
    pub code: String,
    pub link_id: Option<String>,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct QuestionnaireResponseRejected {
    pub envelope: Envelope,
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub submission_id: Uuid,
    pub questionnaire: String,
    pub questionnaire_version: String,
    pub reasons: Vec<RejectionReason>,
}

// ---- clinical ------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct VitalSignRecorded {
    pub envelope: Envelope,
    pub observation_id: String,
    pub loinc_code: String,
    #[cfg_attr(test, proptest(strategy = "crate::testing::finite()"))]
    pub value: f64,
    pub unit: String,
    pub position: Option<String>,
    pub effective: PartialDateTime,
    pub visit: Option<String>,
    pub visit_day: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AdverseEventReported {
    pub envelope: Envelope,
    pub ae_id: String,
    pub term: String,
    pub meddra_code: Option<String>,
    pub severity: Option<String>,
    pub ctcae_grade: Option<i32>,
    pub serious: bool,
    pub seriousness_criteria: Vec<String>,
    pub onset: PartialDateTime,
    pub sponsor_received_at: Timestamp,
}

// ---- monitoring ----------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AlertSeverity {
    Info,
    Warning,
    High,
    Critical,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Evidence {
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub event_id: Uuid,
    pub observed_at: Timestamp,
    pub description: String,
    #[cfg_attr(test, proptest(strategy = "crate::testing::opt_finite()"))]
    pub value: Option<f64>,
    pub unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AlertRaised {
    pub envelope: Envelope,
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub alert_id: Uuid,
    pub rule_id: String,
    pub rule_version: i32,
    pub severity: AlertSeverity,
    pub source_label: String,
    pub summary: String,
    pub evidence: Vec<Evidence>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AlertUpdated {
    pub envelope: Envelope,
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub alert_id: Uuid,
    pub evidence: Vec<Evidence>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AlertEscalated {
    pub envelope: Envelope,
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub alert_id: Uuid,
    pub level: i32,
    pub severity: AlertSeverity,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AlertAcknowledged {
    pub envelope: Envelope,
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub alert_id: Uuid,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AlertResolved {
    pub envelope: Envelope,
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub alert_id: Uuid,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NotificationChannel {
    Webhook,
    Inbox,
    Email,
    Other,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct NotificationDelivered {
    pub envelope: Envelope,
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub alert_id: Uuid,
    pub recipient_id: String,
    pub channel: NotificationChannel,
    pub escalation_level: i32,
    pub attempts: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct NotificationFailed {
    pub envelope: Envelope,
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub alert_id: Uuid,
    pub recipient_id: String,
    pub channel: NotificationChannel,
    pub escalation_level: i32,
    pub attempts: i32,
    pub last_error: String,
}

// ---- central monitoring ------------------------------------------------------------------------

/// A site's flag for one key risk indicator changed (risk service); blinded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct KriFlagChanged {
    pub envelope: Envelope,
    pub kri_id: String,
    pub kri_name: String,
    pub previous_flag: Option<i32>,
    pub flag: Option<i32>,
    #[cfg_attr(test, proptest(strategy = "crate::testing::opt_finite()"))]
    pub score: Option<f64>,
    #[cfg_attr(test, proptest(strategy = "crate::testing::finite()"))]
    pub numerator: f64,
    #[cfg_attr(test, proptest(strategy = "crate::testing::finite()"))]
    pub denominator: f64,
    #[cfg_attr(test, proptest(strategy = "crate::testing::finite()"))]
    pub metric: f64,
    #[cfg_attr(test, proptest(strategy = "crate::testing::finite()"))]
    pub study_metric: f64,
}

/// A study-level quality tolerance limit was breached, or no longer is (risk service); blinded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct QtlStatusChanged {
    pub envelope: Envelope,
    pub qtl_id: String,
    pub qtl_name: String,
    pub breached: bool,
    #[cfg_attr(test, proptest(strategy = "crate::testing::finite()"))]
    pub numerator: f64,
    #[cfg_attr(test, proptest(strategy = "crate::testing::finite()"))]
    pub denominator: f64,
    #[cfg_attr(test, proptest(strategy = "crate::testing::finite()"))]
    pub observed: f64,
    #[cfg_attr(test, proptest(strategy = "crate::testing::finite()"))]
    pub expected: f64,
    #[cfg_attr(test, proptest(strategy = "crate::testing::finite()"))]
    pub limit: f64,
}

// ---- data queries --------------------------------------------------------------------------

/// An edit check failed on a data point and opened a query to its site (risk service).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct QueryOpened {
    pub envelope: Envelope,
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub query_id: Uuid,
    pub check_id: String,
    pub check_kind: String,
    pub item: String,
    pub data_event_ids: Vec<String>,
    pub value: Option<String>,
    pub message: String,
}

/// Site staff answered an open query (site API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct QueryAnswered {
    pub envelope: Envelope,
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub query_id: Uuid,
    pub answer: String,
}

/// A researcher closed an answered query (alert API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct QueryClosed {
    pub envelope: Envelope,
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub query_id: Uuid,
    pub reason: String,
}
