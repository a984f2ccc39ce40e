//! The epro-validation consumer: decides on every questionnaire submission patient apps publish to
//! the ingestion topic (producers we do not control: duplicates, late offline syncs, wrong
//! versions, missing answers, garbage bytes).
//!
//! ```text
//! epro.submissions.v1 ─▶ same submission id seen? ── same content ─▶ acknowledged, nothing new
//!                              │                    └─ other content ─▶ Rejected CONFLICTING_DUPLICATE
//!                              ▼
//!                        strings storable? ── no ─▶ Rejected INVALID_CHARACTERS / TEXT_TOO_LONG
//!                              ▼
//!                        subject enrolled? ── not yet ─▶ parked until SubjectEnrolled
//!                              ▼
//!                        rules (validate.rs) ─▶ QuestionnaireResponseAccepted (score, band, flags,
//!                                               window in the subject's zone, late-sync flag)
//!                                            └▶ QuestionnaireResponseRejected (every reason, coded)
//! enrollment.subject-lifecycle.v1 ─▶ subject's zone, enrollment time, withdrawal time
//! ```
//!
//! A submission whose strings the database cannot hold or the rules refuse (NUL and other control
//! characters, strings beyond the gateway's limits; apps may publish without the gateway) is
//! checked before any of its strings reaches a statement: it is rejected, and recorded and
//! announced with its strings made storable (control characters replaced by U+FFFD, cut to
//! length), so it neither fails the batch's transaction nor holds up the submissions behind it.
//!
//! Bytes that are not an event go to the dead-letter topic (consumer runtime). Accepted responses
//! are stored with their answers and score (`response`), every decision by submission id
//! (`submission`), and rejected resubmissions with other content by event id
//! (`conflicting_submission`).
//!
//! Round trips per batch, not per submission ([`EproBatch`]): `prepare` decodes the batch once and
//! reads the earlier submissions with the batch's ids, its subjects and the occurrences its
//! completed responses fill (one query each); each submission is decided from that state, which
//! it updates (a second submission with the same id in the batch is a duplicate of the first,
//! a second completed response for one occurrence a `DUPLICATE_OCCURRENCE`); `finish` writes the
//! batch's decisions with one statement per table, and the runtime its events with one more.

pub mod catalogue;
pub mod questionnaire;
pub mod read;
pub mod reference;
pub mod schedule;
mod store;
pub mod validate;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Postgres, Transaction};
use tracing::debug;
use trialflow_outbox::{AuditRecord, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{
    AnyEvent, Envelope, Event, QuestionnaireResponseAccepted, QuestionnaireResponseRejected,
    QuestionnaireResponseSubmitted, RejectionReason,
};
use uuid::Uuid;

use self::catalogue::Catalogue;
use self::store::{Decisions, OccurrenceKey, Prefetched, SubjectFact, SubjectKey};
use self::validate::{Accepted, CONFLICTING_DUPLICATE, DUPLICATE_OCCURRENCE, reason};
use crate::config::ConsumerSpec;
use crate::error::HandlerError;
use crate::events::{decode, emit, subject_of};
use crate::handler::{Context, Handler, Message};

/// Consumer name (inbox key, default group id, metric label) and `source_system` of its events.
pub const NAME: &str = "epro-validation";
/// Its default service schema.
pub const SCHEMA: &str = "epro";
/// Kafka header the ingestion gateway sets: when the submission reached us (RFC 3339).
pub const RECEIVED_AT_HEADER: &str = "received_at";

const OUTCOMES_TOTAL: &str = "trialflow_epro_submissions_total";
const REJECTION_REASONS_TOTAL: &str = "trialflow_epro_rejection_reasons_total";

pub fn schema() -> SchemaName {
    SchemaName::new(SCHEMA).unwrap_or_else(|_| unreachable!("`{SCHEMA}` is a valid schema name"))
}

/// Creates the consumer's schema: outbox, inbox, parked and its own tables.
pub async fn migrate(database_url: &str, schema: &SchemaName) -> trialflow_outbox::Result<()> {
    crate::migrate(database_url, schema, Some(sqlx::migrate!("./migrations/epro"))).await
}

/// What it consumes.
pub fn spec(schema: SchemaName, topics: &TopicNames) -> ConsumerSpec {
    ConsumerSpec {
        name: NAME.to_string(),
        schema,
        topics: topics.names(&[topics::EPRO_SUBMISSIONS, topics::SUBJECT_LIFECYCLE]),
    }
}

fn enrolled_dependency(study_id: &str, subject_id: &str) -> String {
    format!("enrolled:{study_id}/{subject_id}")
}

/// The handler.
#[derive(Debug, Clone)]
pub struct EproValidation {
    schema: SchemaName,
    topics: TopicNames,
    catalogue: Arc<Catalogue>,
}

impl EproValidation {
    pub fn new(schema: SchemaName, topics: TopicNames, catalogue: Catalogue) -> Self {
        use metrics::{Unit, describe_counter};
        describe_counter!(
            OUTCOMES_TOTAL,
            Unit::Count,
            "Submissions by outcome (accepted, rejected, duplicate)."
        );
        describe_counter!(REJECTION_REASONS_TOTAL, Unit::Count, "Rejection reasons by code.");
        Self { schema, topics, catalogue: Arc::new(catalogue) }
    }

    async fn lifecycle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: AnyEvent,
        ctx: &mut Context,
        batch: &mut EproBatch,
    ) -> Result<(), HandlerError> {
        let envelope = event.envelope().clone();
        let at = || instant(&envelope);
        let fact = match &event {
            AnyEvent::SubjectScreened(e) => SubjectFact::Screened { time_zone: &e.time_zone },
            AnyEvent::SubjectEnrolled(_) => SubjectFact::Enrolled { at: at()? },
            AnyEvent::SubjectWithdrawn(_) => SubjectFact::Withdrawn { at: at()? },
            _ => return Ok(()),
        };
        let subject_id = subject_of(&envelope)?;
        store::record_subject(tx, &self.schema, &envelope.study_id, subject_id, fact).await?;
        // A submission of this subject later in the batch reads it again.
        batch.known.subjects.remove(&(envelope.study_id.clone(), subject_id.to_string()));
        if matches!(fact, SubjectFact::Enrolled { .. }) {
            ctx.resolve(enrolled_dependency(&envelope.study_id, subject_id));
        }
        Ok(())
    }

    async fn submission(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &Message,
        s: &QuestionnaireResponseSubmitted,
        ctx: &mut Context,
        batch: &mut EproBatch,
    ) -> Result<(), HandlerError> {
        // The hash is of the submission as sent, so its exact resend is still a duplicate.
        let hash = validate::content_hash(s);
        let unstorable = validate::unstorable_text(s);
        let cleaned;
        let s = if unstorable.is_empty() {
            s
        } else {
            cleaned = validate::storable(s);
            &cleaned
        };
        let subject_id = subject_of(&s.envelope)?;
        let study_id = &s.envelope.study_id;
        let (earlier, subject) = batch.known(tx, &self.schema, s, subject_id).await?;
        if let Some(earlier) = earlier {
            if earlier == hash {
                metrics::counter!(OUTCOMES_TOTAL, "outcome" => "duplicate").increment(1);
                debug!(submission_id = %s.submission_id, "Exact duplicate acknowledged.");
                return Ok(());
            }
            let conflict = reason(
                CONFLICTING_DUPLICATE,
                None,
                format!(
                    "submission {} was received before with other content; the first one stands",
                    s.submission_id
                ),
            );
            let reasons = vec![conflict];
            batch.decisions.conflict(s, subject_id, &hash, &reasons);
            return self.reject(ctx, s, subject_id, reasons);
        }
        if !unstorable.is_empty() {
            // Decided at once, enrolled or not: no later fact makes these strings acceptable.
            batch.rejected(s, subject_id, &hash, &unstorable);
            return self.reject(ctx, s, subject_id, unstorable);
        }
        let Some(subject) = subject else {
            return Err(HandlerError::not_yet(
                enrolled_dependency(study_id, subject_id),
                format!("subject {subject_id} of study {study_id} is not enrolled (yet)"),
            ));
        };
        let received_at = received_at(message, &s.envelope)?;
        let mut decision = validate::decide(&self.catalogue, s, &subject, received_at);
        if decision.is_ok()
            && s.status == trialflow_schemas::ResponseStatus::Completed
            && batch.occurrence_completed(tx, &self.schema, s, subject_id).await?
        {
            let detail = format!(
                "{} already has a completed response for {}; send status AMENDED to correct it",
                s.questionnaire,
                s.scheduled_occurrence.as_deref().unwrap_or_default()
            );
            decision = Err(vec![reason(DUPLICATE_OCCURRENCE, None, detail)]);
        }
        match decision {
            Ok(accepted) => {
                batch.accepted(s, subject_id, &hash, received_at, &accepted)?;
                self.accept(ctx, s, subject_id, accepted)
            }
            Err(reasons) => {
                batch.rejected(s, subject_id, &hash, &reasons);
                self.reject(ctx, s, subject_id, reasons)
            }
        }
    }

    /// Announces an accepted submission (its rows are in the batch's decisions).
    fn accept(
        &self,
        ctx: &mut Context,
        s: &QuestionnaireResponseSubmitted,
        subject_id: &str,
        accepted: Accepted,
    ) -> Result<(), HandlerError> {
        ctx.audit(
            decision_audit(s, subject_id, "epro.accepted")
                .change("total_score", Value::Null, accepted.scored.total)
                .change("severity_band", Value::Null, accepted.scored.band.as_deref())
                .change("flagged_items", Value::Null, accepted.scored.flagged.clone())
                .change("window_status", Value::Null, json(&accepted.window))
                .change("late_sync", Value::Null, accepted.late_sync),
        );
        let event = QuestionnaireResponseAccepted {
            envelope: Envelope::caused_by(&s.envelope, QuestionnaireResponseAccepted::NAME, NAME),
            submission_id: s.submission_id,
            questionnaire: s.questionnaire.clone(),
            questionnaire_version: s.questionnaire_version.clone(),
            scheduled_occurrence: s.scheduled_occurrence.clone(),
            authored_at: s.authored_at,
            total_score: accepted.scored.total,
            severity_band: accepted.scored.band,
            flagged_items: accepted.scored.flagged,
            window_status: accepted.window,
            late_sync: accepted.late_sync,
        };
        emit(ctx, &self.topics, &event, subject_id)?;
        metrics::counter!(OUTCOMES_TOTAL, "outcome" => "accepted").increment(1);
        Ok(())
    }

    /// Announces the rejection (its row is in the batch's decisions: the submission's, or for a
    /// conflicting duplicate, whose id belongs to the first submission, the resubmission's).
    fn reject(
        &self,
        ctx: &mut Context,
        s: &QuestionnaireResponseSubmitted,
        subject_id: &str,
        reasons: Vec<RejectionReason>,
    ) -> Result<(), HandlerError> {
        for r in &reasons {
            metrics::counter!(REJECTION_REASONS_TOTAL, "code" => r.code.clone()).increment(1);
        }
        let codes: Vec<&str> = reasons.iter().map(|r| r.code.as_str()).collect();
        ctx.audit(decision_audit(s, subject_id, "epro.rejected").change("reason_codes", Value::Null, codes));
        let event = QuestionnaireResponseRejected {
            envelope: Envelope::caused_by(&s.envelope, QuestionnaireResponseRejected::NAME, NAME),
            submission_id: s.submission_id,
            questionnaire: s.questionnaire.clone(),
            questionnaire_version: s.questionnaire_version.clone(),
            reasons,
        };
        emit(ctx, &self.topics, &event, subject_id)?;
        metrics::counter!(OUTCOMES_TOTAL, "outcome" => "rejected").increment(1);
        Ok(())
    }
}

/// A batch of the epro-validation consumer (see [`Handler`]): its events decoded once, what its
/// submissions need to be decided (read by `prepare`, updated by each decision), and the
/// decisions to write at its end.
#[derive(Debug, Default)]
pub struct EproBatch {
    /// The batch's events by (partition, offset), decoded by `prepare`; `handle` takes its own.
    events: HashMap<(i32, i64), AnyEvent>,
    known: Prefetched,
    decisions: Decisions,
}

impl EproBatch {
    /// The earlier submission with `s`'s id (its content hash) and `s`'s subject if enrolled: from
    /// the batch's state, else from the database.
    async fn known(
        &mut self,
        tx: &mut Transaction<'static, Postgres>,
        schema: &SchemaName,
        s: &QuestionnaireResponseSubmitted,
        subject_id: &str,
    ) -> Result<(Option<String>, Option<validate::Subject>), HandlerError> {
        let study_id = &s.envelope.study_id;
        let key: SubjectKey = (study_id.clone(), subject_id.to_string());
        if let (Some(earlier), Some(subject)) =
            (self.known.earlier.get(&s.submission_id), self.known.subjects.get(&key))
        {
            return Ok((earlier.clone(), subject.clone()));
        }
        let known = store::known(tx, schema, s.submission_id, study_id, subject_id).await?;
        // Decided earlier in this batch (not written yet) wins over the database.
        let earlier = match self.known.earlier.get(&s.submission_id) {
            Some(Some(hash)) => Some(hash.clone()),
            _ => known.earlier,
        };
        self.known.subjects.insert(key, known.subject.clone());
        Ok((earlier, known.subject))
    }

    /// Whether `s`'s occurrence already has a completed response, in the database or decided
    /// earlier in this batch.
    async fn occurrence_completed(
        &mut self,
        tx: &mut Transaction<'static, Postgres>,
        schema: &SchemaName,
        s: &QuestionnaireResponseSubmitted,
        subject_id: &str,
    ) -> Result<bool, HandlerError> {
        let Some(key) = occurrence_key(s, subject_id) else { return Ok(false) };
        if let Some(done) = self.known.completed.get(&key) {
            return Ok(*done);
        }
        let done = store::occurrence_completed(tx, schema, s, subject_id).await?;
        self.known.completed.insert(key, done);
        Ok(done)
    }

    fn rejected(
        &mut self,
        s: &QuestionnaireResponseSubmitted,
        subject_id: &str,
        hash: &str,
        reasons: &[RejectionReason],
    ) {
        self.decisions.rejected(s, subject_id, hash, reasons);
        self.known.earlier.insert(s.submission_id, Some(hash.to_string()));
    }

    fn accepted(
        &mut self,
        s: &QuestionnaireResponseSubmitted,
        subject_id: &str,
        hash: &str,
        received_at: DateTime<Utc>,
        accepted: &Accepted,
    ) -> Result<(), HandlerError> {
        self.decisions.accepted(s, subject_id, hash, received_at, accepted)?;
        self.known.earlier.insert(s.submission_id, Some(hash.to_string()));
        if s.status == trialflow_schemas::ResponseStatus::Completed
            && let Some(key) = occurrence_key(s, subject_id)
        {
            self.known.completed.insert(key, true);
        }
        Ok(())
    }
}

/// The occurrence a submission answers, if scheduled.
fn occurrence_key(s: &QuestionnaireResponseSubmitted, subject_id: &str) -> Option<OccurrenceKey> {
    let occurrence = s.scheduled_occurrence.as_ref()?;
    Some((s.envelope.study_id.clone(), subject_id.to_string(), s.questionnaire.clone(), occurrence.clone()))
}

/// The audit record of a decision on a submission (the service's own, on the app's data).
fn decision_audit(s: &QuestionnaireResponseSubmitted, subject_id: &str, action: &str) -> AuditRecord {
    let decision = action.trim_start_matches("epro.");
    AuditRecord::by_system(NAME, action, "submission", s.submission_id.to_string())
        .study(&s.envelope.study_id)
        .site(s.envelope.site_id.as_deref())
        .change("decision", Value::Null, decision)
        .change("subject_id", Value::Null, subject_id)
        .change("questionnaire", Value::Null, format!("{} {}", s.questionnaire, s.questionnaire_version))
}

fn json(value: &impl serde::Serialize) -> Value {
    serde_json::to_value(value).unwrap_or_default()
}

impl Handler for EproValidation {
    type Batch = EproBatch;

    /// Apps may publish without an `event_id` header: then the envelope's event id is used.
    fn event_id(&self, message: &Message) -> Result<Uuid, HandlerError> {
        if let Some(id) = message.header_str("event_id").and_then(|h| Uuid::parse_str(h).ok()) {
            return Ok(id);
        }
        Ok(decode(message)?.envelope().event_id)
    }

    /// Decodes the batch and reads what its submissions need (see [`EproBatch`]). Submissions
    /// whose strings the database cannot take are left out of the reads (`handle` rejects them
    /// with their strings made storable, asking the database itself).
    async fn prepare(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &[Message],
    ) -> Result<EproBatch, HandlerError> {
        let ingestion = self.topics.name(topics::EPRO_SUBMISSIONS);
        let mut state = EproBatch::default();
        let (mut ids, mut subjects, mut occurrences) = (Vec::new(), Vec::new(), Vec::new());
        for message in batch {
            let Ok(event) = decode(message) else { continue };
            if message.topic == ingestion
                && let AnyEvent::QuestionnaireResponseSubmitted(s) = &event
            {
                ids.push(s.submission_id);
                if let Some(subject_id) = s.envelope.subject_id.as_deref()
                    && validate::unstorable_text(s).is_empty()
                {
                    subjects.push((s.envelope.study_id.clone(), subject_id.to_string()));
                    if s.status == trialflow_schemas::ResponseStatus::Completed {
                        occurrences.extend(occurrence_key(s, subject_id));
                    }
                }
            }
            state.events.insert((message.partition, message.offset), event);
        }
        subjects.sort();
        subjects.dedup();
        occurrences.sort();
        occurrences.dedup();
        ids.sort();
        ids.dedup();
        state.known = store::prefetch(tx, &self.schema, &ids, &subjects, &occurrences).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &Message,
        ctx: &mut Context,
        batch: &mut EproBatch,
    ) -> Result<(), HandlerError> {
        let event = match batch.events.remove(&(message.partition, message.offset)) {
            Some(event) => event,
            None => decode(message)?,
        };
        if message.topic == self.topics.name(topics::EPRO_SUBMISSIONS) {
            let AnyEvent::QuestionnaireResponseSubmitted(s) = event else {
                return Err(HandlerError::permanent(format!(
                    "{} on the ingestion topic; only QuestionnaireResponseSubmitted belongs there",
                    event.name()
                )));
            };
            return self.submission(tx, message, &s, ctx, batch).await;
        }
        self.lifecycle(tx, event, ctx, batch).await
    }

    /// Writes the batch's decisions, one statement per table.
    async fn finish(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: EproBatch,
        _ctx: &mut Context,
    ) -> Result<(), HandlerError> {
        batch.decisions.write(tx, &self.schema).await
    }
}

fn instant(envelope: &Envelope) -> Result<DateTime<Utc>, HandlerError> {
    envelope
        .occurred_at
        .to_datetime()
        .ok_or_else(|| HandlerError::permanent(format!("{}: occurred_at out of range", envelope.event_type)))
}

/// When the submission reached us: the gateway's `received_at` header, else the app's
/// `recorded_at` (when it sent it).
fn received_at(message: &Message, envelope: &Envelope) -> Result<DateTime<Utc>, HandlerError> {
    if let Some(at) =
        message.header_str(RECEIVED_AT_HEADER).and_then(|h| DateTime::parse_from_rfc3339(h).ok())
    {
        return Ok(at.to_utc());
    }
    envelope.recorded_at.to_datetime().ok_or_else(|| HandlerError::permanent("recorded_at out of range"))
}
