//! The enrollment consumer: gates, randomization, and the enrollment saga with kit allocation.
//!
//! ```text
//! SubjectScreened, ConsentSigned, EligibilityAssessed ─▶ subject facts
//! EnrollmentRequested ─▶ gates ──fail──▶ EnrollmentOnHold (every failed gate, coded)
//!                              └─pass──▶ slot of the stratum's list ─▶ SubjectRandomized (blinded)
//!                                                                    └▶ TreatmentAssigned (restricted)
//! KitAllocated        ─▶ SubjectEnrolled
//! KitAllocationFailed ─▶ EnrollmentOnHold (NO_KIT_AVAILABLE); kit-allocation retries on the next
//!                        shipment to the site and its KitAllocated enrolls the subject
//! ```
//!
//! A subject is randomized at most once (a repeated request changes nothing, and the database
//! refuses a second slot for one subject); a number, once taken, stays taken even if the subject
//! is put on hold or withdraws. Lists are generated from the study's seed when the study is
//! configured ([`randomization::generate`]) and never leave this service's schema.
//!
//! Concurrency: a randomization locks only the slot it takes, and passes over slots other
//! randomizations are taking (`FOR UPDATE SKIP LOCKED`, [`store::take_slot`]): one writer per
//! slot, a number never given twice, and batches of different partitions randomize in the same
//! stratum side by side. `RandomizationListLow` is emitted by whoever takes the slot that leaves
//! `warn_slots_left` slots after it in list order (and the last slot): each slot is taken once,
//! so each warning is emitted once.

pub mod gates;
pub mod randomization;
pub mod read;
mod store;

use serde_json::Value;
use sqlx::{Postgres, Transaction};
use tracing::{debug, info, warn};
use trialflow_outbox::{AuditRecord, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{
    AnyEvent, ConsentSigned, EligibilityAssessed, EnrollmentOnHold, EnrollmentRequested, Envelope, Event,
    KitAllocated, KitAllocationFailed, RandomizationListLow, StudyConfigured, SubjectEnrolled,
    SubjectRandomized, TreatmentAssigned,
};

use self::gates::GateFailure;
use self::store::TakenSlot;
use crate::config::ConsumerSpec;
use crate::error::HandlerError;
use crate::events::{decode, emit, requested_by, study_dependency, subject_of};
use crate::handler::{Context, Handler, Message};

/// Consumer name (inbox key, default group id, metric label) and `source_system` of its events.
pub const NAME: &str = "enrollment";
/// Its default service schema.
pub const SCHEMA: &str = "enrollment";
/// `EnrollmentOnHold.reason_code` when kit allocation found no kit for the subject.
pub const NO_KIT_AVAILABLE: &str = "NO_KIT_AVAILABLE";

const SLOTS_LEFT: &str = "trialflow_randomization_slots_left";
const RANDOMIZED_TOTAL: &str = "trialflow_subjects_randomized_total";
const ENROLLED_TOTAL: &str = "trialflow_subjects_enrolled_total";
const HOLDS_TOTAL: &str = "trialflow_enrollment_holds_total";

pub fn schema() -> SchemaName {
    SchemaName::new(SCHEMA).unwrap_or_else(|_| unreachable!("`{SCHEMA}` is a valid schema name"))
}

/// Creates the consumer's schema: outbox, inbox, parked and its own tables.
pub async fn migrate(database_url: &str, schema: &SchemaName) -> trialflow_outbox::Result<()> {
    crate::migrate(database_url, schema, Some(sqlx::migrate!("./migrations/enrollment"))).await
}

/// What it consumes.
pub fn spec(schema: SchemaName, topics: &TopicNames) -> ConsumerSpec {
    ConsumerSpec {
        name: NAME.to_string(),
        schema,
        topics: topics.names(&[
            topics::STUDY_CONFIGURATION,
            topics::SUBJECT_LIFECYCLE,
            topics::KIT_ALLOCATIONS,
        ]),
    }
}

fn subject_dependency(study_id: &str, subject_id: &str) -> String {
    format!("subject:{study_id}/{subject_id}")
}

/// The handler.
#[derive(Debug, Clone)]
pub struct Enrollment {
    schema: SchemaName,
    topics: TopicNames,
}

impl Enrollment {
    pub fn new(schema: SchemaName, topics: TopicNames) -> Self {
        use metrics::{Unit, describe_counter, describe_gauge};
        describe_gauge!(SLOTS_LEFT, Unit::Count, "Free slots of each stratum's randomization list.");
        describe_counter!(RANDOMIZED_TOTAL, Unit::Count, "Subjects randomized.");
        describe_counter!(ENROLLED_TOTAL, Unit::Count, "Subjects enrolled (kit allocated).");
        describe_counter!(HOLDS_TOTAL, Unit::Count, "Enrollments put on hold, by first reason code.");
        Self { schema, topics }
    }

    async fn study_configured(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        e: &StudyConfigured,
        ctx: &mut Context,
    ) -> Result<(), HandlerError> {
        let study_id = &e.envelope.study_id;
        match store::configure_study(tx, &self.schema, e).await? {
            Some(lists) => {
                info!(study_id, version = e.config_version, lists = lists.len(), "Study configured.")
            }
            None => debug!(study_id, version = e.config_version, "Older study configuration ignored."),
        }
        for (stratum, left) in store::slots_left(tx, &self.schema, study_id).await? {
            metrics::gauge!(SLOTS_LEFT, "study" => study_id.clone(), "stratum" => stratum).set(left as f64);
        }
        ctx.resolve(study_dependency(study_id));
        Ok(())
    }

    /// The subject, or "not yet" (its screening may come from another producer, later).
    async fn subject(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        envelope: &Envelope,
    ) -> Result<(String, store::SubjectRow), HandlerError> {
        let subject_id = subject_of(envelope)?.to_string();
        let study_id = &envelope.study_id;
        match store::subject(tx, &self.schema, study_id, &subject_id).await? {
            Some(row) => Ok((subject_id, row)),
            None => Err(HandlerError::not_yet(
                subject_dependency(study_id, &subject_id),
                format!("subject {subject_id} not screened yet"),
            )),
        }
    }

    async fn consent_signed(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        e: &ConsentSigned,
    ) -> Result<(), HandlerError> {
        let (subject_id, _) = self.subject(tx, &e.envelope).await?;
        let set = "consent_version = $3";
        store::update_subject(
            tx,
            &self.schema,
            &e.envelope.study_id,
            &subject_id,
            set,
            &[Some(&e.consent_version)],
        )
        .await
    }

    async fn eligibility_assessed(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        e: &EligibilityAssessed,
    ) -> Result<(), HandlerError> {
        let (subject_id, _) = self.subject(tx, &e.envelope).await?;
        let unmet: Vec<String> = e
            .criteria
            .iter()
            .filter(|c| !c.met)
            .map(|c| match &c.detail {
                Some(d) => format!("{} ({d})", c.criterion_id),
                None => c.criterion_id.clone(),
            })
            .collect();
        let detail = (!unmet.is_empty()).then(|| format!("criteria not met: {}", unmet.join(", ")));
        store::set_eligibility(
            tx,
            &self.schema,
            &e.envelope.study_id,
            &subject_id,
            e.eligible,
            detail.as_deref(),
        )
        .await
    }

    async fn enrollment_requested(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        e: &EnrollmentRequested,
        ctx: &mut Context,
    ) -> Result<(), HandlerError> {
        let study_id = &e.envelope.study_id;
        let study = store::study(tx, &self.schema, study_id).await?.ok_or_else(|| {
            HandlerError::not_yet(study_dependency(study_id), format!("study {study_id} not configured yet"))
        })?;
        let (subject_id, subject) = self.subject(tx, &e.envelope).await?;
        if let Some(number) = &subject.randomization_number {
            // Randomize at most once per subject (REDCap C.3.30.1400): a repeated request is a no-op.
            info!(subject_id, randomization = %number, "Subject already randomized; request ignored.");
            return Ok(());
        }
        let stratum = match gates::check(&subject.facts, &study.factors, &e.strata) {
            Ok(stratum) => stratum,
            Err(failures) => {
                return self
                    .hold(tx, ctx, &e.envelope, (&subject_id, &subject.status), &failures, None)
                    .await;
            }
        };
        let Some(slot) = store::take_slot(tx, &self.schema, study_id, &stratum.key, &subject_id).await?
        else {
            let exhausted = GateFailure {
                code: gates::LIST_EXHAUSTED,
                detail: format!("the randomization list of stratum {} has no free slot", stratum.key),
            };
            return self.hold(tx, ctx, &e.envelope, (&subject_id, &subject.status), &[exhausted], None).await;
        };
        let set = "status = 'randomized', stratum = $3, randomization_number = $4, \
                   hold_reason_code = NULL, hold_reason = NULL";
        store::update_subject(
            tx,
            &self.schema,
            study_id,
            &subject_id,
            set,
            &[Some(&stratum.key), Some(&slot.randomization_number)],
        )
        .await?;
        ctx.audit(randomization_audit(&e.envelope, &subject_id, &subject.status, &stratum.key, &slot));
        self.publish_randomization(tx, ctx, &e.envelope, &subject_id, &stratum.key, &slot).await
    }

    async fn publish_randomization(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        cause: &Envelope,
        subject_id: &str,
        stratum: &str,
        slot: &TakenSlot,
    ) -> Result<(), HandlerError> {
        let randomized = SubjectRandomized {
            envelope: Envelope::caused_by(cause, SubjectRandomized::NAME, NAME),
            randomization_number: slot.randomization_number.clone(),
            randomization_list_id: slot.list_id.clone(),
            stratum: stratum.to_string(),
        };
        emit(ctx, &self.topics, &randomized, subject_id)?;
        let assigned = TreatmentAssigned {
            envelope: Envelope::caused_by(cause, TreatmentAssigned::NAME, NAME),
            randomization_number: slot.randomization_number.clone(),
            randomization_list_id: slot.list_id.clone(),
            arm_code: slot.arm_code.clone(),
        };
        emit(ctx, &self.topics, &assigned, subject_id)?;
        let study_id = &cause.study_id;
        metrics::counter!(RANDOMIZED_TOTAL).increment(1);
        metrics::gauge!(SLOTS_LEFT, "study" => study_id.clone(), "stratum" => stratum.to_string())
            .set(f64::from(slot.slots_left));
        info!(subject_id, randomization = %slot.randomization_number, "Subject randomized.");
        let warn_at = store::study(tx, &self.schema, study_id).await?.map_or(0, |s| s.warn_slots_left);
        if slot.slots_left == warn_at || slot.slots_left == 0 {
            let mut envelope = Envelope::caused_by(cause, RandomizationListLow::NAME, NAME);
            envelope.subject_id = None;
            envelope.site_id = None;
            let low = RandomizationListLow {
                envelope,
                randomization_list_id: slot.list_id.clone(),
                stratum: stratum.to_string(),
                slots_left: slot.slots_left as i32,
                slots_total: slot.slots_total as i32,
            };
            emit(ctx, &self.topics, &low, &slot.list_id)?;
            warn!(list = %slot.list_id, slots_left = slot.slots_left, "Randomization list running out.");
        }
        Ok(())
    }

    /// Puts the subject (its id and status) on hold (or records the screen failure) with every
    /// reason.
    async fn hold(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        cause: &Envelope,
        (subject_id, status): (&str, &str),
        failures: &[GateFailure],
        randomization_number: Option<&str>,
    ) -> Result<(), HandlerError> {
        let (code, reason) = gates::hold_reason(failures);
        ctx.audit(hold_audit(cause, subject_id, status, &code, &reason));
        // A screen failure or a withdrawal keeps its status; everything else waits on hold.
        let set = "status = CASE WHEN status IN ('ineligible', 'withdrawn') THEN status ELSE 'on_hold' END, \
                   hold_reason_code = $3, hold_reason = $4";
        store::update_subject(
            tx,
            &self.schema,
            &cause.study_id,
            subject_id,
            set,
            &[Some(&code), Some(&reason)],
        )
        .await?;
        let held = EnrollmentOnHold {
            envelope: Envelope::caused_by(cause, EnrollmentOnHold::NAME, NAME),
            reason_code: code.clone(),
            reason,
            randomization_number: randomization_number.map(str::to_string),
        };
        emit(ctx, &self.topics, &held, subject_id)?;
        let first = failures.first().map_or("UNKNOWN", |f| f.code);
        metrics::counter!(HOLDS_TOTAL, "reason" => first).increment(1);
        info!(subject_id, reason_code = %code, "Enrollment on hold.");
        Ok(())
    }

    async fn kit_allocated(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        e: &KitAllocated,
        ctx: &mut Context,
    ) -> Result<(), HandlerError> {
        let (subject_id, subject) = self.subject(tx, &e.envelope).await?;
        if !matches!(subject.status.as_str(), "randomized" | "on_hold") {
            // Already enrolled (a repeated allocation) or withdrawn meanwhile: nothing to do.
            info!(subject_id, status = %subject.status, kit = %e.kit_number, "Kit allocation ignored.");
            return Ok(());
        }
        let set = "status = 'enrolled', kit_number = $3, hold_reason_code = NULL, hold_reason = NULL";
        store::update_subject(
            tx,
            &self.schema,
            &e.envelope.study_id,
            &subject_id,
            set,
            &[Some(&e.kit_number)],
        )
        .await?;
        ctx.audit(
            AuditRecord::by_system(NAME, "subject.enrolled", "subject", &subject_id)
                .study(&e.envelope.study_id)
                .site(e.envelope.site_id.as_deref())
                .change("status", subject.status.as_str(), "enrolled")
                .change("kit_number", Value::Null, e.kit_number.as_str()),
        );
        let enrolled = SubjectEnrolled {
            envelope: Envelope::caused_by(&e.envelope, SubjectEnrolled::NAME, NAME),
            randomization_number: e.randomization_number.clone(),
            kit_number: e.kit_number.clone(),
        };
        emit(ctx, &self.topics, &enrolled, &subject_id)?;
        metrics::counter!(ENROLLED_TOTAL).increment(1);
        info!(subject_id, "Subject enrolled.");
        Ok(())
    }

    async fn kit_allocation_failed(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        e: &KitAllocationFailed,
        ctx: &mut Context,
    ) -> Result<(), HandlerError> {
        let (subject_id, subject) = self.subject(tx, &e.envelope).await?;
        if subject.status != "randomized" {
            return Ok(());
        }
        let failure =
            GateFailure { code: NO_KIT_AVAILABLE, detail: format!("{}: {}", e.reason_code, e.reason) };
        let subject = (subject_id.as_str(), subject.status.as_str());
        self.hold(tx, ctx, &e.envelope, subject, &[failure], Some(&e.randomization_number)).await
    }

    async fn subject_withdrawn(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        envelope: &Envelope,
        reason_code: &str,
    ) -> Result<(), HandlerError> {
        let (subject_id, _) = self.subject(tx, envelope).await?;
        store::update_subject(tx, &self.schema, &envelope.study_id, &subject_id, "status = 'withdrawn'", &[])
            .await?;
        info!(subject_id, reason_code, "Subject withdrawn.");
        Ok(())
    }
}

/// The audit record of a randomization: the subject's new status, stratum and number, and its
/// arm (unblinded: left out of blinded views), on behalf of whoever requested the enrollment.
fn randomization_audit(
    cause: &Envelope,
    subject_id: &str,
    status: &str,
    stratum: &str,
    slot: &TakenSlot,
) -> AuditRecord {
    AuditRecord::by_system(NAME, "subject.randomized", "subject", subject_id)
        .on_behalf_of(requested_by(cause))
        .study(&cause.study_id)
        .site(cause.site_id.as_deref())
        .change("status", status, "randomized")
        .change("stratum", Value::Null, stratum)
        .change("randomization_number", Value::Null, slot.randomization_number.as_str())
        .change("randomization_list_id", Value::Null, slot.list_id.as_str())
        .unblinded_change("arm_code", Value::Null, slot.arm_code.as_str())
}

/// The audit record of a hold: the status it leaves (a screen failure or a withdrawal keeps
/// theirs, as the update does) and the coded reason, also the record's why.
fn hold_audit(cause: &Envelope, subject_id: &str, status: &str, code: &str, reason: &str) -> AuditRecord {
    let new_status = if matches!(status, "ineligible" | "withdrawn") { status } else { "on_hold" };
    AuditRecord::by_system(NAME, "enrollment.on_hold", "subject", subject_id)
        .on_behalf_of(requested_by(cause))
        .study(&cause.study_id)
        .site(cause.site_id.as_deref())
        .change("status", status, new_status)
        .change("hold_reason_code", Value::Null, code)
        .reason(reason)
}

impl Handler for Enrollment {
    type Batch = ();

    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &Message,
        ctx: &mut Context,
        _batch: &mut (),
    ) -> Result<(), HandlerError> {
        match decode(message)? {
            AnyEvent::StudyConfigured(e) => self.study_configured(tx, &e, ctx).await,
            AnyEvent::SubjectScreened(e) => {
                let subject_id = subject_of(&e.envelope)?;
                let study_id = &e.envelope.study_id;
                store::add_subject(tx, &self.schema, study_id, subject_id, e.envelope.site_id.as_deref())
                    .await?;
                ctx.resolve(subject_dependency(study_id, subject_id));
                Ok(())
            }
            AnyEvent::ConsentSigned(e) => self.consent_signed(tx, &e).await,
            AnyEvent::EligibilityAssessed(e) => self.eligibility_assessed(tx, &e).await,
            AnyEvent::EnrollmentRequested(e) => self.enrollment_requested(tx, &e, ctx).await,
            AnyEvent::KitAllocated(e) => self.kit_allocated(tx, &e, ctx).await,
            AnyEvent::KitAllocationFailed(e) => self.kit_allocation_failed(tx, &e, ctx).await,
            AnyEvent::SubjectWithdrawn(e) => self.subject_withdrawn(tx, &e.envelope, &e.reason_code).await,
            // Our own events on the lifecycle topic, and anything else, are not inputs.
            _ => Ok(()),
        }
    }
}
