//! The kit-allocation consumer (RTSM/IRT dispensing), an unblinded service.
//!
//! * `StudyConfigured` → kit types, expiry buffers, low-stock thresholds, arms.
//! * `KitsReceived` (per site, in order) → the site's inventory; subjects waiting at that site are
//!   allocated a kit from the new stock, longest waiting first.
//! * `TreatmentAssigned` → the dispensable kit of the subject's arm with the lowest sequence number
//!   ([`rules::choose`]) becomes `KitAllocated` (kit number only: the event is blinded), or, with
//!   none, the subject waits and `KitAllocationFailed` tells the enrollment saga.
//! * `SubjectWithdrawn` → a waiting subject stops waiting.
//!
//! "Today" for the expiry buffers (Do-Not-Dispense, Do-Not-Count) is [`rules::judging_day`]: the
//! later of the day (UTC) the event being applied took effect and the day of the consumer's
//! clock. A kit is never dispensed that is expired or inside its buffer by either: not for an
//! assignment that arrives late (parked, redelivered, replayed from a dead letter), nor for one
//! stamped ahead of the server. The clock is the system clock unless the pipeline sets another
//! ([`KitAllocation::with_clock`]: a replay of a past study on a virtual clock judges its kits
//! on the replayed timeline).
//!
//! Lock order: every change to a site's inventory (a shipment, an assignment) holds the site's
//! row of `site_inventory` until its transaction ends. A batch (one partition's messages, one
//! transaction) takes the rows of all the sites its `KitsReceived` and `TreatmentAssigned` name
//! before applying any message, ordered by (study, site) ([`Handler::prepare`]); otherwise a
//! batch taking site A then B and another taking B then A deadlock, and PostgreSQL breaks the tie
//! only after `deadlock_timeout` (1 s) by rolling one back. A site's first row is created there
//! too (a row being inserted is as exclusive as a locked one), for the sites of configured
//! studies; only a study configured by another batch between `prepare` and the message leaves
//! its sites' first rows to the messages, outside that order: at worst a retried batch, once, at
//! study set-up. The runtime's parking loop calls `prepare` too, on each slice of parked
//! messages it retries.

pub mod read;
pub mod rules;
mod store;

use std::collections::BTreeSet;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;
use sqlx::{PgConnection, Postgres, Transaction};
use tracing::{debug, info};
use trialflow_http::clock::Clock;
use trialflow_outbox::{AuditRecord, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{
    AnyEvent, Envelope, Event, KitAllocated, KitAllocationFailed, KitsReceived, SiteStockLow,
    StudyConfigured, SubjectWithdrawn, TreatmentAssigned,
};

use self::store::{Request, StudySettings};
use crate::config::ConsumerSpec;
use crate::error::HandlerError;
use crate::events::{decode, emit, site_of, study_dependency, subject_of};
use crate::handler::{Context, Handler, Message};

/// Consumer name (inbox key, default group id, metric label) and `source_system` of its events.
pub const NAME: &str = "kit-allocation";
/// Its default service schema.
pub const SCHEMA: &str = "kit_allocation";
/// `KitAllocationFailed.reason_code` when no kit of the subject's arm can be dispensed at the site.
pub const NO_DISPENSABLE_KIT: &str = "NO_DISPENSABLE_KIT";

const ALLOCATED_TOTAL: &str = "trialflow_kits_allocated_total";
const FAILED_TOTAL: &str = "trialflow_kit_allocation_failures_total";
const STOCK_LOW_TOTAL: &str = "trialflow_site_stock_low_total";

pub fn schema() -> SchemaName {
    SchemaName::new(SCHEMA).unwrap_or_else(|_| unreachable!("`{SCHEMA}` is a valid schema name"))
}

/// Creates the consumer's schema: outbox, inbox, parked and its own tables.
pub async fn migrate(database_url: &str, schema: &SchemaName) -> trialflow_outbox::Result<()> {
    crate::migrate(database_url, schema, Some(sqlx::migrate!("./migrations/kit_allocation"))).await
}

/// What it consumes.
pub fn spec(schema: SchemaName, topics: &TopicNames) -> ConsumerSpec {
    ConsumerSpec {
        name: NAME.to_string(),
        schema,
        topics: topics.names(&[
            topics::STUDY_CONFIGURATION,
            topics::KIT_INVENTORY,
            topics::TREATMENT_ASSIGNMENTS,
            topics::SUBJECT_LIFECYCLE,
        ]),
    }
}

/// The handler.
#[derive(Debug, Clone)]
pub struct KitAllocation {
    schema: SchemaName,
    topics: TopicNames,
    clock: Clock,
}

impl KitAllocation {
    pub fn new(schema: SchemaName, topics: TopicNames) -> Self {
        metrics::describe_counter!(ALLOCATED_TOTAL, metrics::Unit::Count, "Kits allocated to subjects.");
        metrics::describe_counter!(
            FAILED_TOTAL,
            metrics::Unit::Count,
            "Randomized subjects for whom no dispensable kit was at their site."
        );
        metrics::describe_counter!(STOCK_LOW_TOTAL, metrics::Unit::Count, "SiteStockLow signals.");
        Self { schema, topics, clock: Clock::System }
    }

    /// The clock whose day, with the event's, judges kit expiry (the system clock by default).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// "Today" for the expiry buffers when applying the event of `envelope`.
    fn today(&self, envelope: &Envelope) -> Result<NaiveDate, HandlerError> {
        Ok(rules::judging_day(instant(envelope)?, self.clock.now()))
    }

    async fn study(&self, conn: &mut PgConnection, study_id: &str) -> Result<StudySettings, HandlerError> {
        store::study(conn, &self.schema, study_id).await?.ok_or_else(|| {
            HandlerError::not_yet(study_dependency(study_id), format!("study {study_id} not configured yet"))
        })
    }

    async fn study_configured(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        e: &StudyConfigured,
        ctx: &mut Context,
    ) -> Result<(), HandlerError> {
        if store::save_study(tx, &self.schema, e).await? {
            info!(study_id = %e.envelope.study_id, version = e.config_version, "Study configured.");
        }
        ctx.resolve(study_dependency(&e.envelope.study_id));
        Ok(())
    }

    async fn treatment_assigned(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        e: &TreatmentAssigned,
        ctx: &mut Context,
    ) -> Result<(), HandlerError> {
        let (site_id, subject_id) = (site_of(&e.envelope)?, subject_of(&e.envelope)?);
        let study_id = &e.envelope.study_id;
        let study = self.study(tx, study_id).await?;
        if store::known_request(tx, &self.schema, study_id, &e.randomization_number).await? {
            debug!(subject_id, randomization = %e.randomization_number, "Kit already allocated or awaited.");
            return Ok(());
        }
        store::lock_site(tx, &self.schema, study_id, site_id).await?;
        let request = Request {
            study_id: study_id.clone(),
            site_id: site_id.to_string(),
            subject_id: subject_id.to_string(),
            randomization_number: e.randomization_number.clone(),
            arm_code: e.arm_code.clone(),
            kit_type: study.enrollment_kit_type.clone(),
            correlation_id: e.envelope.correlation_id,
        };
        let today = self.today(&e.envelope)?;
        if self.try_allocate(tx, ctx, &study, &request, &e.envelope, today).await? {
            // Allocated: done.
        } else {
            store::add_pending(tx, &self.schema, &request, instant(&e.envelope)?).await?;
            let failed = KitAllocationFailed {
                envelope: Envelope::caused_by(&e.envelope, KitAllocationFailed::NAME, NAME),
                randomization_number: e.randomization_number.clone(),
                reason_code: NO_DISPENSABLE_KIT.to_string(),
                // Blinded topic: never name the arm.
                reason: format!(
                    "no dispensable {} kit of the subject's treatment at site {site_id}; \
                     allocation is retried when a shipment is received",
                    request.kit_type
                ),
            };
            emit(ctx, &self.topics, &failed, subject_id)?;
            metrics::counter!(FAILED_TOTAL).increment(1);
            info!(subject_id, site_id, "No dispensable kit; subject waits for a shipment.");
        }
        self.check_stock(tx, ctx, &study, &e.envelope, site_id, &[&request.kit_type], &[&request.arm_code])
            .await
    }

    async fn kits_received(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        e: &KitsReceived,
        ctx: &mut Context,
    ) -> Result<(), HandlerError> {
        let site_id = site_of(&e.envelope)?.to_string();
        let study_id = &e.envelope.study_id;
        let study = self.study(tx, study_id).await?;
        store::lock_site(tx, &self.schema, study_id, &site_id).await?;
        let new = store::receive_kits(tx, &self.schema, e, &site_id, instant(&e.envelope)?).await?;
        info!(%site_id, shipment_id = %e.shipment_id, kits = e.kits.len(), new, "Kits received.");
        let today = self.today(&e.envelope)?;
        for waiting in store::pending_at(tx, &self.schema, study_id, &site_id).await? {
            if self.try_allocate(tx, ctx, &study, &waiting, &e.envelope, today).await? {
                store::remove_pending(tx, &self.schema, study_id, &waiting.randomization_number).await?;
            }
        }
        let kit_types: Vec<&str> = study.kit_types.iter().map(|k| k.kit_type.as_str()).collect();
        let arms: Vec<&str> = study.arm_codes.iter().map(String::as_str).collect();
        self.check_stock(tx, ctx, &study, &e.envelope, &site_id, &kit_types, &arms).await
    }

    /// Allocates the kit the rules choose, if any, and emits `KitAllocated`. The site lock is held.
    async fn try_allocate(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        study: &StudySettings,
        request: &Request,
        cause: &Envelope,
        today: NaiveDate,
    ) -> Result<bool, HandlerError> {
        let settings = study.kit_type(&request.kit_type)?;
        let kits = store::available_kits(
            tx,
            &self.schema,
            &request.study_id,
            &request.site_id,
            &request.kit_type,
            &request.arm_code,
        )
        .await?;
        let Some(kit) =
            rules::choose(&kits, &request.arm_code, &request.kit_type, today, settings.do_not_dispense_days)
        else {
            return Ok(false);
        };
        store::allocate(tx, &self.schema, kit, request, today, cause.event_id).await?;
        ctx.audit(dispensing_audit(kit, request, today));
        let mut envelope = Envelope::caused_by(cause, KitAllocated::NAME, NAME);
        // A retry is caused by the shipment but belongs to the subject's enrollment flow.
        envelope.subject_id = Some(request.subject_id.clone());
        envelope.site_id = Some(request.site_id.clone());
        envelope.correlation_id = request.correlation_id.or(envelope.correlation_id);
        let allocated = KitAllocated {
            envelope,
            randomization_number: request.randomization_number.clone(),
            kit_number: kit.kit_number.clone(),
            kit_type: kit.kit_type.clone(),
        };
        emit(ctx, &self.topics, &allocated, &request.subject_id)?;
        metrics::counter!(ALLOCATED_TOTAL).increment(1);
        debug!(subject_id = %request.subject_id, kit = %kit.kit_number, "Kit allocated.");
        Ok(true)
    }

    /// Re-counts stock of each (kit type, arm) at the site and signals resupply on the crossing.
    #[allow(clippy::too_many_arguments)]
    async fn check_stock(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        study: &StudySettings,
        cause: &Envelope,
        site_id: &str,
        kit_types: &[&str],
        arms: &[&str],
    ) -> Result<(), HandlerError> {
        let study_id = &cause.study_id;
        let today = self.today(cause)?;
        for kit_type in kit_types {
            let settings = study.kit_type(kit_type)?;
            for arm in arms {
                let kits = store::available_kits(tx, &self.schema, study_id, site_id, kit_type, arm).await?;
                let countable =
                    rules::countable_stock(&kits, arm, kit_type, today, settings.do_not_count_days);
                let low = rules::is_low(countable, settings.low_stock_threshold);
                let key = (study_id.as_str(), site_id, *kit_type, *arm);
                let was_low = store::record_stock(tx, &self.schema, key, countable, low).await?;
                if !rules::signal_low_stock(was_low, countable, settings.low_stock_threshold) {
                    continue;
                }
                let mut envelope = Envelope::caused_by(cause, SiteStockLow::NAME, NAME);
                envelope.subject_id = None;
                envelope.site_id = Some(site_id.to_string());
                let signal = SiteStockLow {
                    envelope,
                    kit_type: kit_type.to_string(),
                    arm_code: arm.to_string(),
                    countable: i32::try_from(countable).unwrap_or(i32::MAX),
                    threshold: i32::try_from(settings.low_stock_threshold).unwrap_or(i32::MAX),
                };
                emit(ctx, &self.topics, &signal, site_id)?;
                metrics::counter!(STOCK_LOW_TOTAL).increment(1);
                info!(site_id, kit_type, countable, "Site stock low.");
            }
        }
        Ok(())
    }

    async fn subject_withdrawn(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        e: &SubjectWithdrawn,
    ) -> Result<(), HandlerError> {
        let subject_id = subject_of(&e.envelope)?;
        if store::withdraw(tx, &self.schema, &e.envelope.study_id, subject_id).await? {
            info!(subject_id, "Withdrawn subject no longer waits for a kit.");
        }
        Ok(())
    }
}

/// The audit record of a kit dispensed to a subject: the kit's status, subject and number, and
/// its arm (unblinded: left out of blinded views; the kit number itself is blinded).
fn dispensing_audit(kit: &rules::Kit, request: &Request, today: NaiveDate) -> AuditRecord {
    AuditRecord::by_system(NAME, "kit.dispensed", "kit", &kit.kit_number)
        .study(&request.study_id)
        .site(Some(&request.site_id))
        .change("status", "available", "allocated")
        .change("subject_id", Value::Null, request.subject_id.as_str())
        .change("randomization_number", Value::Null, request.randomization_number.as_str())
        .change("allocated_on", Value::Null, today.to_string())
        .unblinded_change("arm_code", Value::Null, kit.arm_code.as_str())
}

impl Handler for KitAllocation {
    type Batch = ();

    /// Locks the inventory of every site a shipment or an assignment of the batch is for (see the
    /// module documentation). Undecodable messages and messages without a site are skipped here;
    /// `handle` dead-letters them.
    async fn prepare(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &[Message],
    ) -> Result<(), HandlerError> {
        let envelopes: Vec<Envelope> = batch
            .iter()
            .filter_map(|message| match decode(message) {
                Ok(AnyEvent::KitsReceived(e)) => Some(e.envelope),
                Ok(AnyEvent::TreatmentAssigned(e)) => Some(e.envelope),
                _ => None,
            })
            .collect();
        let sites: BTreeSet<(&str, &str)> =
            envelopes.iter().filter_map(|e| Some((e.study_id.as_str(), e.site_id.as_deref()?))).collect();
        if sites.is_empty() {
            return Ok(());
        }
        store::lock_sites(tx, &self.schema, &sites).await
    }

    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &Message,
        ctx: &mut Context,
        _batch: &mut (),
    ) -> Result<(), HandlerError> {
        match decode(message)? {
            AnyEvent::StudyConfigured(e) => self.study_configured(tx, &e, ctx).await,
            AnyEvent::TreatmentAssigned(e) => self.treatment_assigned(tx, &e, ctx).await,
            AnyEvent::KitsReceived(e) => self.kits_received(tx, &e, ctx).await,
            AnyEvent::SubjectWithdrawn(e) => self.subject_withdrawn(tx, &e).await,
            // Other events on these topics (the lifecycle, our own SiteStockLow) are not ours.
            _ => Ok(()),
        }
    }
}

/// The instant an event took effect.
fn instant(envelope: &Envelope) -> Result<DateTime<Utc>, HandlerError> {
    envelope
        .occurred_at
        .to_datetime()
        .ok_or_else(|| HandlerError::permanent(format!("{}: occurred_at out of range", envelope.event_type)))
}
