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
//! Concurrency: allocations at one site run side by side. An assignment locks the kit it takes
//! (`FOR UPDATE SKIP LOCKED`, [`store::next_kit`]): two subjects never get one kit, and one never
//! waits for another's transaction; "lowest sequence" is then the lowest of the kits nobody is
//! allocating at that instant. The site's row of `site_inventory` is locked only where a subject
//! and a shipment could miss each other: by a shipment (it stores kits and serves the waiting
//! subjects under it), and by an assignment that found no free kit before it decides the subject
//! waits (under the lock it waits for kits other allocations hold, and sees every committed
//! shipment). A batch takes the rows of the sites its shipments name, and of the sites where its
//! assignments ask for more kits than the shelf has ([`store::short_sites`]), before applying any
//! message, ordered by (study, site) ([`Handler::prepare`]); a site's first row is created there
//! too for the sites of configured studies. A stock-out that estimate missed (the shelf emptied
//! by concurrent allocations) takes its site's row in the middle of the batch, out of that order:
//! two such batches at two sites in opposite orders can deadlock, and PostgreSQL rolls one back
//! after `deadlock_timeout` (a batch retry, at an unforeseen stock-out only).
//!
//! Low stock (`SiteStockLow` once per crossing) is judged once per batch, in
//! [`Handler::finish`]: it locks the `stock_level` rows of every (site, kit type, arm) the batch
//! changed, in key order, then re-counts their stock. Every allocation of a key re-counts under
//! that lock just before its commit, so counts are taken one after another over a stock that
//! only shrinks between shipments, and the crossing is seen once. The rows are held from there to
//! the commit only. The runtime's parking loop calls `prepare` (and `finish`, per message) too.

pub mod read;
pub mod rules;
mod store;

use std::collections::{BTreeMap, BTreeSet};

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

use self::store::{Held, Request, StockKey, StudySettings};
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
        batch: &mut KitBatch,
    ) -> Result<(), HandlerError> {
        let (site_id, subject_id) = (site_of(&e.envelope)?, subject_of(&e.envelope)?);
        let study_id = &e.envelope.study_id;
        let study = self.study(tx, study_id).await?;
        if store::known_request(tx, &self.schema, study_id, &e.randomization_number).await? {
            debug!(subject_id, randomization = %e.randomization_number, "Kit already allocated or awaited.");
            return Ok(());
        }
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
        batch.changed(&request.study_id, site_id, &request.kit_type, &request.arm_code, &e.envelope);
        if self.try_allocate(tx, ctx, &study, &request, &e.envelope, today, Held::Skip).await? {
            return Ok(());
        }
        // No free kit: decide under the site's lock, after the kits others hold are settled.
        store::lock_site(tx, &self.schema, study_id, site_id).await?;
        if self.try_allocate(tx, ctx, &study, &request, &e.envelope, today, Held::Wait).await? {
            return Ok(());
        }
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
        Ok(())
    }

    async fn kits_received(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        e: &KitsReceived,
        ctx: &mut Context,
        batch: &mut KitBatch,
    ) -> Result<(), HandlerError> {
        let site_id = site_of(&e.envelope)?.to_string();
        let study_id = &e.envelope.study_id;
        let study = self.study(tx, study_id).await?;
        store::lock_site(tx, &self.schema, study_id, &site_id).await?;
        let new = store::receive_kits(tx, &self.schema, e, &site_id, instant(&e.envelope)?).await?;
        info!(%site_id, shipment_id = %e.shipment_id, kits = e.kits.len(), new, "Kits received.");
        let today = self.today(&e.envelope)?;
        for waiting in store::pending_at(tx, &self.schema, study_id, &site_id).await? {
            if self.try_allocate(tx, ctx, &study, &waiting, &e.envelope, today, Held::Wait).await? {
                store::remove_pending(tx, &self.schema, study_id, &waiting.randomization_number).await?;
            }
        }
        for kit_type in &study.kit_types {
            for arm in &study.arm_codes {
                batch.changed(study_id, &site_id, &kit_type.kit_type, arm, &e.envelope);
            }
        }
        Ok(())
    }

    /// Allocates the kit [`store::next_kit`] locks, if any, and emits `KitAllocated`.
    #[allow(clippy::too_many_arguments)]
    async fn try_allocate(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        study: &StudySettings,
        request: &Request,
        cause: &Envelope,
        today: NaiveDate,
        held: Held,
    ) -> Result<bool, HandlerError> {
        let settings = study.kit_type(&request.kit_type)?;
        let dnd = settings.do_not_dispense_days;
        let Some(kit) = store::next_kit(tx, &self.schema, request, today, dnd, held).await? else {
            return Ok(false);
        };
        if !rules::dispensable(&kit, today, dnd) {
            // The SQL and the rule disagree: a bug, never a kit dispensed against the rule.
            return Err(HandlerError::permanent(format!(
                "kit {} was selected but is not dispensable on {today}",
                kit.kit_number
            )));
        }
        store::allocate(tx, &self.schema, &kit, request, today, cause.event_id).await?;
        ctx.audit(dispensing_audit(&kit, request, today));
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

    /// Re-counts the stock of every key the batch changed, under the keys' `stock_level` locks
    /// (see the module documentation), and signals resupply where stock crossed into "low".
    async fn check_stock(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        changed: BTreeMap<StockKey, Envelope>,
    ) -> Result<(), HandlerError> {
        let keys: Vec<&StockKey> = changed.keys().collect();
        let was_low = store::lock_stock(tx, &self.schema, &keys).await?;
        let mut stock = vec![Vec::new(); keys.len()];
        for (i, expiry, n) in store::available_by_expiry(tx, &self.schema, &keys).await? {
            stock[i].push((expiry, n));
        }
        let mut settings: BTreeMap<&str, StudySettings> = BTreeMap::new();
        let mut levels = Vec::with_capacity(keys.len());
        for ((key, cause), (kits, was_low)) in changed.iter().zip(stock.iter().zip(was_low)) {
            let (study_id, site_id, kit_type, arm) = key;
            if !settings.contains_key(study_id.as_str()) {
                settings.insert(study_id, self.study(tx, study_id).await?);
            }
            let kit_settings = settings[study_id.as_str()].kit_type(kit_type)?;
            let today = self.today(cause)?;
            let countable = rules::countable_by_expiry(kits, today, kit_settings.do_not_count_days);
            let threshold = kit_settings.low_stock_threshold;
            levels.push((countable, rules::is_low(countable, threshold)));
            if !rules::signal_low_stock(was_low, countable, threshold) {
                continue;
            }
            let mut envelope = Envelope::caused_by(cause, SiteStockLow::NAME, NAME);
            envelope.subject_id = None;
            envelope.site_id = Some(site_id.clone());
            let signal = SiteStockLow {
                envelope,
                kit_type: kit_type.clone(),
                arm_code: arm.clone(),
                countable: i32::try_from(countable).unwrap_or(i32::MAX),
                threshold: i32::try_from(threshold).unwrap_or(i32::MAX),
            };
            emit(ctx, &self.topics, &signal, site_id)?;
            metrics::counter!(STOCK_LOW_TOTAL).increment(1);
            info!(site_id, kit_type, countable, "Site stock low.");
        }
        store::record_stock(tx, &self.schema, &keys, &levels).await
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

/// What a batch changed: the (study, site, kit type, arm) stocks to re-count in
/// [`Handler::finish`], each with the latest message that changed it (the cause of a signal, and
/// its day judges the buffers).
#[derive(Debug, Default)]
pub struct KitBatch {
    changed: BTreeMap<StockKey, Envelope>,
}

impl KitBatch {
    fn changed(&mut self, study_id: &str, site_id: &str, kit_type: &str, arm: &str, cause: &Envelope) {
        let key = (study_id.to_string(), site_id.to_string(), kit_type.to_string(), arm.to_string());
        self.changed.insert(key, cause.clone());
    }
}

impl Handler for KitAllocation {
    type Batch = KitBatch;

    /// Locks, in one order, the inventory of every site a shipment of the batch is for, and of
    /// every site where its assignments are likely to find no kit (see the module
    /// documentation). Undecodable messages and messages without a site are skipped here;
    /// `handle` dead-letters them.
    async fn prepare(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &[Message],
    ) -> Result<KitBatch, HandlerError> {
        let mut shipments = Vec::new();
        let mut assignments = Vec::new();
        for message in batch {
            match decode(message) {
                Ok(AnyEvent::KitsReceived(e)) => shipments.push(e.envelope),
                Ok(AnyEvent::TreatmentAssigned(e)) => assignments.push((e.envelope, e.arm_code)),
                _ => {}
            }
        }
        let mut demand: BTreeMap<(&str, &str, &str), i64> = BTreeMap::new();
        for (envelope, arm) in &assignments {
            if let Some(site) = envelope.site_id.as_deref() {
                *demand.entry((envelope.study_id.as_str(), site, arm.as_str())).or_default() += 1;
            }
        }
        let short = if demand.is_empty() {
            Vec::new()
        } else {
            store::short_sites(tx, &self.schema, &demand).await?
        };
        let mut sites: BTreeSet<(&str, &str)> =
            shipments.iter().filter_map(|e| Some((e.study_id.as_str(), e.site_id.as_deref()?))).collect();
        sites.extend(short.iter().map(|(study, site)| (study.as_str(), site.as_str())));
        if !sites.is_empty() {
            store::lock_sites(tx, &self.schema, &sites).await?;
        }
        Ok(KitBatch::default())
    }

    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &Message,
        ctx: &mut Context,
        batch: &mut KitBatch,
    ) -> Result<(), HandlerError> {
        match decode(message)? {
            AnyEvent::StudyConfigured(e) => self.study_configured(tx, &e, ctx).await,
            AnyEvent::TreatmentAssigned(e) => self.treatment_assigned(tx, &e, ctx, batch).await,
            AnyEvent::KitsReceived(e) => self.kits_received(tx, &e, ctx, batch).await,
            AnyEvent::SubjectWithdrawn(e) => self.subject_withdrawn(tx, &e).await,
            // Other events on these topics (the lifecycle, our own SiteStockLow) are not ours.
            _ => Ok(()),
        }
    }

    /// Re-counts the stocks the batch changed and signals those that crossed into "low".
    async fn finish(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: KitBatch,
        ctx: &mut Context,
    ) -> Result<(), HandlerError> {
        if batch.changed.is_empty() {
            return Ok(());
        }
        self.check_stock(tx, ctx, batch.changed).await
    }
}

/// The instant an event took effect.
fn instant(envelope: &Envelope) -> Result<DateTime<Utc>, HandlerError> {
    envelope
        .occurred_at
        .to_datetime()
        .ok_or_else(|| HandlerError::permanent(format!("{}: occurred_at out of range", envelope.event_type)))
}
