//! The risk service: key risk indicators per study and site, kept continuously from the events
//! the pipeline carries, scored as {gsm} scores them ([`kri`]), for central monitoring (ICH E6(R3)
//! risk-based quality management).
//!
//! What it counts, per subject (merged so that arrival order does not matter, see [`store`]):
//! * `SubjectScreened` → the subject and its site;
//! * `EligibilityAssessed` → assessed, and whether eligible (the latest assessment wins);
//! * `SubjectEnrolled` → enrolled on that date; `SubjectWithdrawn` → withdrawn on that date;
//! * `ConsentSigned` → the consent date (the edit checks compare inputs with it);
//! * `AdverseEventReported` → one adverse event per `ae_id`, serious once reported serious, and
//!   each report as an input of the edit checks and of the data-entry lag;
//! * `VitalSignRecorded` → each reading, as such an input;
//! * every event of the subject → the last date it was seen, which ends the exposure of a subject
//!   still on study;
//! * each reading and adverse-event report → due for the edit checks, with what they compare it
//!   with; a consent or a withdrawal → all of the subject's data due again ([`queries`]);
//! * `QueryAnswered`, `QueryClosed` (`risk.queries.v1`) → a query's status;
//! * `QuestionnaireResponseAccepted` with a `scheduled_occurrence` → the occurrence completed
//!   (ePRO compliance, [`epro`]; not a sighting: a diary does not extend the exposure).
//!
//! The KRIs, their numerators and denominators are in [`kri::CATALOGUE`] and the README. Scores,
//! edit checks and quality tolerance limits are computed by the evaluator ([`evaluate`]), beside
//! the consumer, for the studies whose data changed; the results are in `site_kri`, `study_kri`,
//! `query` and `study_qtl` ([`read`]).

pub mod checks;
pub mod config;
pub mod epro;
pub mod evaluate;
pub mod kri;
pub mod queries;
pub mod read;
mod store;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use trialflow_outbox::{Outbox, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{AdverseEventReported, AnyEvent, Envelope, VitalSignRecorded};

pub use self::config::RiskConfig;
pub use self::store::SiteCounts;
use self::store::{Fact, Lifecycle};
use crate::config::{ConsumerConfig, ConsumerSpec};
use crate::error::{ConsumerError, HandlerError};
use crate::events::{decode, subject_of};
use crate::handler::{Context, Handler, Message};

/// Consumer name (inbox key, default group id, metric label).
pub const NAME: &str = "risk";
/// Its default service schema.
pub const SCHEMA: &str = "risk";

pub fn schema() -> SchemaName {
    SchemaName::new(SCHEMA).unwrap_or_else(|_| unreachable!("`{SCHEMA}` is a valid schema name"))
}

/// Creates the consumer's schema: outbox, inbox, parked and its own tables.
pub async fn migrate(database_url: &str, schema: &SchemaName) -> trialflow_outbox::Result<()> {
    crate::migrate(database_url, schema, Some(sqlx::migrate!("./migrations/risk"))).await
}

/// What it consumes.
pub fn spec(schema: SchemaName, topics: &TopicNames) -> ConsumerSpec {
    ConsumerSpec {
        name: NAME.to_string(),
        schema,
        topics: topics.names(&[
            topics::SUBJECT_LIFECYCLE,
            topics::ADVERSE_EVENTS,
            topics::CLINICAL_OBSERVATIONS,
            topics::EPRO_RESPONSES,
            topics::QUERIES,
        ]),
    }
}

/// Runs the consumer and the evaluator until `shutdown`.
pub async fn run(
    spec: ConsumerSpec,
    config: ConsumerConfig,
    topics: TopicNames,
    thresholds: RiskConfig,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    let pool = PgPool::connect_with(config.database.connect_options()?).await?;
    let outbox = Outbox::open(&pool, spec.schema.clone()).await?;
    let stop = shutdown.child_token();
    let evaluator = tokio::spawn(evaluate::run(pool, outbox, topics, thresholds, stop.clone()));
    let handler = Risk::new(spec.schema.clone());
    let result = crate::runtime::run(spec, config, handler, shutdown).await;
    stop.cancel();
    let _ = evaluator.await;
    result
}

/// The handler: counts.
#[derive(Debug, Clone)]
pub struct Risk {
    schema: SchemaName,
}

impl Risk {
    pub fn new(schema: SchemaName) -> Self {
        Self { schema }
    }

    /// Applies a lifecycle fact (after the batch's sightings, see [`Handler::prepare`]).
    async fn lifecycle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        envelope: &Envelope,
        what: Lifecycle<'_>,
    ) -> Result<(), HandlerError> {
        let fact = fact(envelope)?;
        if store::lifecycle(tx, &self.schema, fact, what).await? {
            store::mark(tx, &self.schema, fact.study_id).await?;
        }
        Ok(())
    }
}

/// Who an event is about and when, or why it can never count (a permanent error: dead letter).
fn fact(envelope: &Envelope) -> Result<Fact<'_>, HandlerError> {
    Ok(Fact {
        study_id: &envelope.study_id,
        subject_id: subject_of(envelope)?,
        site_id: envelope.site_id.as_deref(),
        at: occurred(envelope)?,
    })
}

/// The event's envelope and what it tells the risk service; `None` for events it does not count.
fn what(event: &AnyEvent) -> Option<(&Envelope, What<'_>)> {
    Some(match event {
        AnyEvent::SubjectScreened(e) => {
            (&e.envelope, What::Lifecycle(Lifecycle::Screened { time_zone: &e.time_zone }))
        }
        AnyEvent::EligibilityAssessed(e) => {
            (&e.envelope, What::Lifecycle(Lifecycle::Assessed { eligible: e.eligible }))
        }
        AnyEvent::ConsentSigned(e) => {
            let on = queries::source_date(&e.signed_at);
            let on = on.earliest.filter(|_| on.to_the_day).map(|t| t.date_naive());
            (&e.envelope, What::Lifecycle(Lifecycle::Consented { on }))
        }
        AnyEvent::SubjectEnrolled(e) => (&e.envelope, What::Lifecycle(Lifecycle::Enrolled)),
        AnyEvent::SubjectWithdrawn(e) => {
            (&e.envelope, What::Lifecycle(Lifecycle::Withdrawn { reason_code: &e.reason_code }))
        }
        AnyEvent::AdverseEventReported(e) => (&e.envelope, What::AdverseEvent(e)),
        AnyEvent::VitalSignRecorded(e) => (&e.envelope, What::Reading(e)),
        // Enrollment requests, randomization, code breaks: nothing a KRI or a check counts.
        _ => return None,
    })
}

/// What an event tells the risk service.
enum What<'a> {
    Lifecycle(Lifecycle<'a>),
    AdverseEvent(&'a AdverseEventReported),
    Reading(&'a VitalSignRecorded),
}

fn occurred(envelope: &Envelope) -> Result<DateTime<Utc>, HandlerError> {
    envelope
        .occurred_at
        .to_datetime()
        .ok_or_else(|| HandlerError::permanent(format!("{}: occurred_at out of range", envelope.event_type)))
}

impl Handler for Risk {
    type Batch = ();

    /// The batch's sightings (every counted event: its subject, site and date) and adverse events
    /// in two set-based statements, keys sorted (a fixed lock order between batches of the three
    /// topics' partitions), and one mark per changed study. Both merges are idempotent, so the
    /// duplicates the inbox will skip change nothing; messages that cannot count are left to
    /// `handle`, which dead-letters them.
    async fn prepare(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &[Message],
    ) -> Result<(), HandlerError> {
        let mut sightings: BTreeMap<(String, String), (Option<String>, NaiveDate)> = BTreeMap::new();
        let mut adverse_events: BTreeMap<(String, String, String), bool> = BTreeMap::new();
        let events: Vec<AnyEvent> = batch.iter().filter_map(|m| decode(m).ok()).collect();
        let mut inputs = queries::Inputs::default();
        // Subjects whose data are all due for the edit checks again (each new input is marked as
        // it is stored).
        let mut whole: BTreeSet<(String, String)> = BTreeSet::new();
        for event in &events {
            let Some((envelope, what)) = what(event) else { continue };
            let Ok(fact) = fact(envelope) else { continue };
            let key = (fact.study_id.to_string(), fact.subject_id.to_string());
            // A consent or a withdrawal changes the dates the checks compare the data with.
            if let What::Lifecycle(Lifecycle::Consented { .. } | Lifecycle::Withdrawn { .. }) = what {
                whole.insert(key.clone());
            }
            let day = fact.at.date_naive();
            let seen = sightings.entry(key).or_insert((None, day));
            seen.0 = seen.0.take().or_else(|| fact.site_id.map(str::to_string));
            seen.1 = seen.1.max(day);
            match what {
                What::AdverseEvent(e) => {
                    let key = (fact.study_id.to_string(), fact.subject_id.to_string(), e.ae_id.clone());
                    *adverse_events.entry(key).or_default() |= e.serious;
                    inputs.adverse_events.push(e);
                }
                What::Reading(e) => inputs.readings.push(e),
                What::Lifecycle(_) => {}
            }
        }
        let mut changed = store::sightings(tx, &self.schema, &sightings).await?;
        changed.extend(store::adverse_events(tx, &self.schema, &adverse_events).await?);
        changed.extend(queries::store_inputs(tx, &self.schema, &inputs).await?);
        // The lifecycle facts follow in `handle`, in this transaction, before the evaluator can
        // take the marks.
        queries::mark_subjects(tx, &self.schema, &whole).await?;
        for study_id in &changed {
            store::mark(tx, &self.schema, study_id).await?;
        }
        Ok(())
    }

    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &Message,
        ctx: &mut Context,
        _batch: &mut (),
    ) -> Result<(), HandlerError> {
        let event = decode(message)?;
        let decision = match &event {
            AnyEvent::QueryAnswered(e) => Some(queries::Decision::Answer(e)),
            AnyEvent::QueryClosed(e) => Some(queries::Decision::Close(e)),
            _ => None,
        };
        if let Some(decision) = decision {
            if let Some(record) = queries::apply(tx, &self.schema, decision).await? {
                ctx.audit(record);
            }
            return Ok(());
        }
        if let AnyEvent::QuestionnaireResponseAccepted(e) = &event {
            let Some(occurrence) = e.scheduled_occurrence.as_deref() else { return Ok(()) };
            let fact = fact(&e.envelope)?;
            if store::epro_completed(tx, &self.schema, fact, occurrence).await? {
                store::mark(tx, &self.schema, fact.study_id).await?;
            }
            return Ok(());
        }
        let Some((envelope, what)) = what(&event) else { return Ok(()) };
        // Checked again: an event `prepare` could not count is a dead letter.
        fact(envelope)?;
        match what {
            What::Lifecycle(l) => self.lifecycle(tx, envelope, l).await,
            // Counted with the batch in `prepare`.
            What::AdverseEvent(_) | What::Reading(_) => Ok(()),
        }
    }
}
