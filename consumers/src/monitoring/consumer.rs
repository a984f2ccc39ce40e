//! The monitoring consumer: inputs → rules → episodes; and the escalation timer beside it.
//!
//! Inputs are judged by their **effective** time (when the reading was taken, the AE began, the
//! questionnaire was authored), not by arrival: readings are kept (`observation`) so that a late
//! one joins the right visit mean or persistence run, and a late input whose time falls inside a
//! resolved episode adds evidence to that episode instead of opening a new one. A reading without
//! a visit is kept too (a persistence run is judged by time), but never makes or joins a visit
//! mean ([`judge`]). A subject-baseline rule judges a reading against the subject's readings
//! before it ([`baseline`]), as known when it is handled.
//!
//! Round trips per batch, not per reading ([`MonitoringBatch`]): `prepare` decodes the batch once,
//! reads the series of every (subject, code) of its readings that a rule judges, and reads and
//! locks the episodes of its subjects (one query each); a reading joins its series in the state
//! as it is handled (the next reading of the batch is judged with it), an episode opened joins
//! the state's episodes (the next signal of the batch adds evidence to it); `finish` stores the
//! batch's readings with one statement. A signal is applied with one statement.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use trialflow_outbox::{Outbox, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{
    AdverseEventReported, AnyEvent, CodeBroken, EnrollmentOnHold, Envelope, Evidence, KriFlagChanged,
    QtlStatusChanged, QuestionnaireResponseAccepted, SiteStockLow, Timestamp, VitalSignRecorded,
};

use super::NAME;
use super::baseline::{self, Baseline, Deviation};
use super::episodes::{self, EpisodeKey, Episodes, Outcome, Signal};
use super::rules::{Aggregation, Reading, Rule, RuleBook, RuleInput, judge};
use crate::config::{ConsumerConfig, ConsumerSpec};
use crate::error::{ConsumerError, HandlerError};
use crate::events::{decode, site_of, subject_of};
use crate::handler::{Context, Handler, Message};

const SIGNALS_TOTAL: &str = "trialflow_monitoring_signals_total";

/// What it consumes.
pub fn spec(schema: SchemaName, topics: &TopicNames) -> ConsumerSpec {
    ConsumerSpec {
        name: NAME.to_string(),
        schema,
        topics: topics.names(&[
            topics::CLINICAL_OBSERVATIONS,
            topics::ADVERSE_EVENTS,
            topics::EPRO_RESPONSES,
            topics::SUBJECT_LIFECYCLE,
            topics::KIT_INVENTORY,
            topics::KRI_FLAGS,
        ]),
    }
}

/// The handler.
#[derive(Debug, Clone)]
pub struct Monitoring {
    schema: SchemaName,
    topics: TopicNames,
    rules: Arc<RuleBook>,
}

/// Runs the consumer and the escalation timer until `shutdown`.
pub async fn run(
    spec: ConsumerSpec,
    config: ConsumerConfig,
    rules: RuleBook,
    topics: TopicNames,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    let handler = Monitoring::new(spec.schema.clone(), topics.clone(), rules);
    let pool = PgPool::connect_with(config.database.connect_options()?).await?;
    let outbox = Outbox::open(&pool, spec.schema.clone()).await?;
    let timer = tokio::spawn(escalation_timer(pool, spec.schema.clone(), outbox, topics, shutdown.clone()));
    let result = crate::runtime::run(spec, config, handler, shutdown.clone()).await;
    shutdown.cancel();
    let _ = timer.await;
    result
}

/// Checks for due escalations every 500 ms (at most that late; the due time is in the database).
async fn escalation_timer(
    pool: PgPool,
    schema: SchemaName,
    outbox: Outbox,
    topics: TopicNames,
    shutdown: CancellationToken,
) {
    loop {
        match episodes::escalate_due(&pool, &schema, &outbox, &topics).await {
            Ok(0) => {}
            Ok(n) => info!(escalated = n, "Alerts escalated."),
            Err(error) => warn!(%error, "Escalation check failed; retrying."),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

fn effective(envelope: &Envelope, partial: Option<Timestamp>) -> Result<DateTime<Utc>, HandlerError> {
    partial.or(Some(envelope.occurred_at)).and_then(Timestamp::to_datetime).ok_or_else(|| {
        HandlerError::permanent(format!("{}: effective time out of range", envelope.event_type))
    })
}

impl Monitoring {
    pub fn new(schema: SchemaName, topics: TopicNames, rules: RuleBook) -> Self {
        metrics::describe_counter!(SIGNALS_TOTAL, metrics::Unit::Count, "Rule matches, by outcome.");
        Self { schema, topics, rules: Arc::new(rules) }
    }

    async fn signal(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        batch: &mut MonitoringBatch,
        signal: Signal<'_>,
    ) -> Result<(), HandlerError> {
        let outcome =
            episodes::apply(tx, &self.schema, ctx, &self.topics, &mut batch.episodes, &signal).await?;
        let label = match outcome {
            Outcome::Raised => "raised",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
        };
        metrics::counter!(SIGNALS_TOTAL, "outcome" => label).increment(1);
        Ok(())
    }

    async fn vital(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        batch: &mut MonitoringBatch,
        e: &VitalSignRecorded,
    ) -> Result<(), HandlerError> {
        let subject_id = subject_of(&e.envelope)?.to_string();
        let study_id = &e.envelope.study_id;
        let current = reading_of(e, effective(&e.envelope, e.effective.earliest)?);
        let series_key = (study_id.clone(), subject_id.clone(), current.code.clone());
        if !self.judged_codes(study_id).contains(current.code.as_str()) {
            // Kept all the same (a rule set may judge it tomorrow), but no series to read.
            batch.observations.push((series_key.0, series_key.1, current));
            return Ok(());
        }
        if !batch.series.contains_key(&series_key) {
            let mut wanted = BTreeMap::new();
            wanted.insert(series_key.clone(), vec![current.clone()]);
            let mut read = self.all_series(tx, &wanted).await?;
            batch.series.insert(series_key.clone(), read.remove(&series_key).unwrap_or_default());
        }
        batch.observe(series_key.clone(), &current);
        let series = batch.series.remove(&series_key).unwrap_or_default();
        let judged = self.judge_vital(tx, ctx, batch, e, &subject_id, &current, &series).await;
        batch.series.insert(series_key, series);
        judged
    }

    /// Judges a reading with every rule of its study, against its series (itself included).
    #[allow(clippy::too_many_arguments)]
    async fn judge_vital(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        batch: &mut MonitoringBatch,
        e: &VitalSignRecorded,
        subject_id: &str,
        current: &Reading,
        series: &[Reading],
    ) -> Result<(), HandlerError> {
        let study_id = &e.envelope.study_id;
        for rule in self.rules.rules(study_id) {
            if let RuleInput::VitalBaseline(baseline) = &rule.input
                && baseline.code == current.code
            {
                if baseline.unit != current.unit {
                    warn!(rule = %rule.rule_id, unit = %current.unit, expected = %baseline.unit, "Reading in another unit; rule not applied.");
                    continue;
                }
                let Some(deviation) = baseline::judge(baseline, current, series) else {
                    continue;
                };
                let signal = baseline_signal(rule, baseline, &e.envelope, subject_id, current, &deviation);
                self.signal(tx, ctx, batch, signal).await?;
                continue;
            }
            let RuleInput::Vital { any, aggregation } = &rule.input else { continue };
            for condition in any.iter().filter(|c| c.code == current.code) {
                if condition.unit != current.unit {
                    warn!(rule = %rule.rule_id, unit = %current.unit, expected = %condition.unit, "Reading in another unit; rule not applied.");
                    continue;
                }
                let Some(readings) = judge(condition, *aggregation, current, series) else {
                    continue;
                };
                let evidence: Vec<Evidence> =
                    readings.iter().map(|r| reading_evidence(r, &condition.name)).collect();
                let summary = vital_summary(rule, &condition.name, &readings, *aggregation);
                let signal = Signal {
                    rule,
                    cause: &e.envelope,
                    subject_id: Some(subject_id.to_string()),
                    site_id: e.envelope.site_id.clone(),
                    effective_at: readings
                        .iter()
                        .map(|r| r.effective_at)
                        .min()
                        .unwrap_or(current.effective_at),
                    summary,
                    evidence,
                };
                self.signal(tx, ctx, batch, signal).await?;
                break; // one signal per rule and reading
            }
        }
        Ok(())
    }

    async fn adverse_event(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        batch: &mut MonitoringBatch,
        e: &AdverseEventReported,
    ) -> Result<(), HandlerError> {
        subject_of(&e.envelope)?; // a subject-level input must name its subject
        let at = effective(&e.envelope, e.onset.earliest)?;
        for rule in self.rules.rules(&e.envelope.study_id) {
            let RuleInput::AdverseEvent { serious, min_grade } = &rule.input else { continue };
            let fires = serious.is_some_and(|s| s && e.serious)
                || min_grade.is_some_and(|g| e.ctcae_grade.is_some_and(|grade| grade >= g));
            if !fires {
                continue;
            }
            let grade = e.ctcae_grade.map_or(String::new(), |g| format!(", grade {g}"));
            let serious = if e.serious {
                format!(", serious ({})", e.seriousness_criteria.join(", "))
            } else {
                String::new()
            };
            let description = format!("AE {} {}{grade}{serious}, onset {}", e.ae_id, e.term, e.onset.raw);
            let signal = event_signal(rule, &e.envelope, at, description, e.ctcae_grade.map(f64::from));
            self.signal(tx, ctx, batch, signal).await?;
        }
        Ok(())
    }

    async fn epro(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        batch: &mut MonitoringBatch,
        e: &QuestionnaireResponseAccepted,
    ) -> Result<(), HandlerError> {
        subject_of(&e.envelope)?;
        let at = effective(&e.envelope, Some(e.authored_at))?;
        for rule in self.rules.rules(&e.envelope.study_id) {
            let RuleInput::Epro { questionnaire, flag, min_total } = &rule.input else { continue };
            if *questionnaire != e.questionnaire {
                continue;
            }
            let flagged = flag.as_ref().is_some_and(|f| e.flagged_items.contains(f));
            let high = min_total.is_some_and(|m| e.total_score.is_some_and(|t| t >= m));
            if !flagged && !high {
                continue;
            }
            let description = format!(
                "{} submission {} total {} ({}){}",
                e.questionnaire,
                e.submission_id,
                e.total_score.map_or("-".to_string(), |t| t.to_string()),
                e.severity_band.as_deref().unwrap_or("-"),
                if flagged {
                    format!(", item {} above 0", flag.as_deref().unwrap_or_default())
                } else {
                    String::new()
                }
            );
            let signal = event_signal(rule, &e.envelope, at, description, e.total_score.map(f64::from));
            self.signal(tx, ctx, batch, signal).await?;
        }
        Ok(())
    }

    async fn hold(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        batch: &mut MonitoringBatch,
        e: &EnrollmentOnHold,
    ) -> Result<(), HandlerError> {
        let subject_id = subject_of(&e.envelope)?.to_string();
        let at = effective(&e.envelope, None)?;
        for rule in self.rules.rules(&e.envelope.study_id) {
            let RuleInput::EnrollmentHold { reason_code } = &rule.input else { continue };
            if !e.reason_code.split(',').any(|c| c == reason_code) {
                continue;
            }
            let description = format!("subject {subject_id} on hold ({}): {}", e.reason_code, e.reason);
            let signal = event_signal(rule, &e.envelope, at, description, None);
            self.signal(tx, ctx, batch, signal).await?;
        }
        Ok(())
    }

    /// Site stock is read from the restricted inventory topic; the alert never names the arm.
    async fn stock_low(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        batch: &mut MonitoringBatch,
        e: &SiteStockLow,
    ) -> Result<(), HandlerError> {
        let site_id = site_of(&e.envelope)?.to_string();
        let at = effective(&e.envelope, None)?;
        for rule in self.rules.rules(&e.envelope.study_id) {
            let RuleInput::SiteStockLow = &rule.input else { continue };
            let description =
                format!("site {site_id}: {} kits of one treatment below the resupply threshold", e.kit_type);
            let signal = event_signal(rule, &e.envelope, at, description, None);
            self.signal(tx, ctx, batch, signal).await?;
        }
        Ok(())
    }

    /// An emergency unblinding: the study team learns that, who and why — the event carries no
    /// treatment, and neither does the alert.
    async fn code_broken(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        batch: &mut MonitoringBatch,
        e: &CodeBroken,
    ) -> Result<(), HandlerError> {
        let subject_id = subject_of(&e.envelope)?.to_string();
        let at = effective(&e.envelope, None)?;
        let by = e.envelope.actor.as_deref().unwrap_or("unknown user");
        for rule in self.rules.rules(&e.envelope.study_id) {
            let RuleInput::CodeBreak = &rule.input else { continue };
            let description =
                format!("subject {subject_id}: code broken by {by} ({}), reason: {}", e.actor_role, e.reason);
            let signal = event_signal(rule, &e.envelope, at, description, None);
            self.signal(tx, ctx, batch, signal).await?;
        }
        Ok(())
    }
}

impl Monitoring {
    /// A site's key risk indicator flagged by the risk service: a site-level alert when it reaches
    /// the rule's level (a flag going back down raises nothing; the episode stays for review).
    async fn kri_flag(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        batch: &mut MonitoringBatch,
        e: &KriFlagChanged,
    ) -> Result<(), HandlerError> {
        let site_id = site_of(&e.envelope)?.to_string();
        let at = effective(&e.envelope, None)?;
        let level = e.flag.map_or(0, i32::unsigned_abs);
        let previous = e.previous_flag.map_or(0, i32::unsigned_abs);
        for rule in self.rules.rules(&e.envelope.study_id) {
            let RuleInput::KriFlag { min_level } = &rule.input else { continue };
            let min = u32::from(*min_level);
            if level < min || previous >= min {
                continue;
            }
            let side = if e.flag.unwrap_or(0) > 0 { "above" } else { "below" };
            let colour = if level >= 2 { "red" } else { "amber" };
            let description = format!(
                "site {site_id}: {} {colour}, {side} the study ({:.4} against {:.4}; {} / {}), score {}",
                e.kri_name,
                e.metric,
                e.study_metric,
                e.numerator,
                e.denominator,
                e.score.map_or("–".to_string(), |z| format!("{z:.2}")),
            );
            let signal = event_signal(rule, &e.envelope, at, description, e.score);
            self.signal(tx, ctx, batch, signal).await?;
        }
        Ok(())
    }
}

impl Monitoring {
    /// A study's quality tolerance limit breached: a study-level alert (the limit no longer
    /// breached raises nothing; the episode stays for its evaluation).
    async fn qtl(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ctx: &mut Context,
        batch: &mut MonitoringBatch,
        e: &QtlStatusChanged,
    ) -> Result<(), HandlerError> {
        if !e.breached {
            return Ok(());
        }
        let at = effective(&e.envelope, None)?;
        for rule in self.rules.rules(&e.envelope.study_id) {
            let RuleInput::Qtl = &rule.input else { continue };
            let description = format!(
                "study {}: {} {:.4} ({} / {}) above its limit {:.4} (expected {:.4})",
                e.envelope.study_id, e.qtl_name, e.observed, e.numerator, e.denominator, e.limit, e.expected
            );
            let mut signal = event_signal(rule, &e.envelope, at, description, Some(e.observed));
            // Study level: whatever the event's envelope says, no site and no subject.
            signal.site_id = None;
            signal.subject_id = None;
            self.signal(tx, ctx, batch, signal).await?;
        }
        Ok(())
    }
}

/// A signal whose evidence is the input event itself, at `at`.
fn event_signal<'a>(
    rule: &'a Rule,
    cause: &'a Envelope,
    at: DateTime<Utc>,
    description: String,
    value: Option<f64>,
) -> Signal<'a> {
    Signal {
        rule,
        cause,
        subject_id: cause.subject_id.clone(),
        site_id: cause.site_id.clone(),
        effective_at: at,
        summary: format!("{}: {description}", rule.title),
        evidence: vec![Evidence {
            event_id: cause.event_id,
            observed_at: Timestamp::from(at),
            description,
            value,
            unit: None,
        }],
    }
}

/// A reading far from its subject's baseline, explained: the summary gives the numbers (value,
/// median, MAD, z, how many readings), the evidence is the reading itself followed by the history
/// it was judged against (their event ids). The episode's time is the reading's, not its history's.
fn baseline_signal<'a>(
    rule: &'a Rule,
    baseline: &Baseline,
    cause: &'a Envelope,
    subject_id: &str,
    current: &Reading,
    d: &Deviation,
) -> Signal<'a> {
    let unit = &current.unit;
    let numbers = format!(
        "{} {unit} against the median {:.1} {unit} of the subject's last {} readings (MAD {:.1}, {}; change {:+.1} {unit}, floor {} {unit}, limit |z| {})",
        current.value,
        d.median,
        d.history.len(),
        d.mad,
        d.z_text(),
        d.change(),
        baseline.min_abs_change,
        baseline.max_abs_z,
    );
    let mut judged = reading_evidence(current, &baseline.name);
    judged.description = format!("{}: {numbers}", judged.description);
    let history = d.history.iter().map(|r| {
        let mut e = reading_evidence(r, &baseline.name);
        e.description = format!("{} (baseline history)", e.description);
        e
    });
    Signal {
        rule,
        cause,
        subject_id: Some(subject_id.to_string()),
        site_id: cause.site_id.clone(),
        effective_at: current.effective_at,
        summary: format!("{}: {} {numbers}", rule.title, baseline.name),
        evidence: std::iter::once(judged).chain(history).collect(),
    }
}

fn reading_evidence(r: &Reading, name: &str) -> Evidence {
    let visit = r.visit.as_deref().map_or(String::new(), |v| format!(" at {v}"));
    Evidence {
        event_id: r.event_id,
        observed_at: Timestamp::from(r.effective_at),
        description: format!("{name} {} {}{visit}", r.value, r.unit),
        value: Some(r.value),
        unit: Some(r.unit.clone()),
    }
}

fn vital_summary(
    rule: &Rule,
    name: &str,
    readings: &[Reading],
    aggregation: super::rules::Aggregation,
) -> String {
    use super::rules::Aggregation;
    let unit = readings.first().map_or("", |r| r.unit.as_str());
    match aggregation {
        Aggregation::VisitMean { .. } => {
            let mean = readings.iter().map(|r| r.value).sum::<f64>() / readings.len().max(1) as f64;
            let visit = readings.first().and_then(|r| r.visit.as_deref()).unwrap_or("-");
            format!(
                "{}: {name} mean {mean:.1} {unit} over {} readings at {visit}",
                rule.title,
                readings.len()
            )
        }
        Aggregation::Persistence { minutes, .. } => {
            format!("{}: {name} for more than {} h ({} readings)", rule.title, minutes / 60, readings.len())
        }
        Aggregation::Single => {
            format!("{}: {name} {} {unit}", rule.title, readings.first().map_or(0.0, |r| r.value))
        }
    }
}

/// A batch of the monitoring consumer (see [`Handler`]): its events decoded once, the series its
/// readings are judged against and the episodes its signals go to (read by `prepare`, updated by
/// each message), and the readings to store at its end.
#[derive(Debug, Default)]
pub struct MonitoringBatch {
    /// The batch's events by (partition, offset), decoded by `prepare`; `handle` takes its own.
    events: HashMap<(i32, i64), AnyEvent>,
    /// Readings by (study, subject, code), by effective time: the stored ones and this batch's.
    series: HashMap<SeriesKey, Vec<Reading>>,
    episodes: Episodes,
    /// This batch's readings, to store: (study, subject, reading).
    observations: Vec<(String, String, Reading)>,
}

/// A subject's readings of one code: (study id, subject id, LOINC code).
type SeriesKey = (String, String, String);

impl MonitoringBatch {
    /// Adds a reading to its series (by effective time, after the readings of the same time, as
    /// the stored series would order it) and to the readings to store, unless it is there
    /// already (stored by an earlier delivery: a reading counts once).
    fn observe(&mut self, key: SeriesKey, reading: &Reading) {
        let (study_id, subject_id) = (key.0.clone(), key.1.clone());
        let series = self.series.entry(key).or_default();
        if series.iter().any(|r| r.event_id == reading.event_id) {
            return;
        }
        let at = series.partition_point(|r| r.effective_at <= reading.effective_at);
        series.insert(at, reading.clone());
        self.observations.push((study_id, subject_id, reading.clone()));
    }
}

impl Monitoring {
    /// The codes the rules of `study_id` judge readings of.
    fn judged_codes(&self, study_id: &str) -> BTreeSet<&str> {
        let mut codes = BTreeSet::new();
        for rule in self.rules.rules(study_id) {
            match &rule.input {
                RuleInput::Vital { any, .. } => codes.extend(any.iter().map(|c| c.code.as_str())),
                RuleInput::VitalBaseline(baseline) => {
                    codes.insert(baseline.code.as_str());
                }
                _ => {}
            }
        }
        codes
    }

    /// How far from a reading of `code` the rules of `study_id` look ([`Reach`]).
    fn reach(&self, study_id: &str, code: &str) -> Reach {
        let mut reach = Reach::default();
        for rule in self.rules.rules(study_id) {
            match &rule.input {
                RuleInput::VitalBaseline(baseline) if baseline.code == code => reach.whole = true,
                RuleInput::Vital { any, aggregation } if any.iter().any(|c| c.code == code) => {
                    match aggregation {
                        Aggregation::Single => {}
                        Aggregation::VisitMean { .. } => reach.visit = true,
                        Aggregation::Persistence { minutes, max_gap_minutes } => {
                            let span = chrono::Duration::minutes(
                                i64::from(*minutes) + i64::from(*max_gap_minutes) + 1,
                            );
                            reach.around = Some(reach.around.map_or(span, |a| a.max(span)));
                        }
                    }
                }
                _ => {}
            }
        }
        reach
    }

    /// The stored readings the rules need to judge `readings` (by series, with one query): a
    /// series' whole history only where a subject-baseline rule judges its code; else the
    /// readings of the same visits (visit means) and those within a persistence rule's reach of
    /// each reading, both only where such a rule judges the code ([`Reach`]). A redelivered
    /// reading needs no read of its own: every rule that looks beyond a reading reaches it, and a
    /// reading is added to its series (and stored) only if not there already
    /// ([`MonitoringBatch::observe`]; the insert ignores a reading stored before). Bounded, so
    /// that memory and work per reading do not grow with a subject's history.
    async fn all_series(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        readings: &BTreeMap<SeriesKey, Vec<Reading>>,
    ) -> Result<HashMap<SeriesKey, Vec<Reading>>, HandlerError> {
        let mut all: HashMap<SeriesKey, Vec<Reading>> =
            readings.keys().map(|k| (k.clone(), Vec::new())).collect();
        if readings.is_empty() {
            return Ok(all);
        }
        let sql = format!(
            "WITH k AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[], $5::timestamptz[],
                                      $6::timestamptz[]) WITH ORDINALITY
                     AS k(study_id, subject_id, code, whole, after, until, i)),
             m AS (SELECT * FROM unnest($7::bigint[], $8::text[]) AS m(i, visit))
             SELECT o.study_id, o.subject_id, o.code, o.event_id, o.value, o.unit, o.effective_at, o.visit
             FROM k JOIN {schema}.observation o USING (study_id, subject_id, code) WHERE k.whole
             UNION
             SELECT o.study_id, o.subject_id, o.code, o.event_id, o.value, o.unit, o.effective_at, o.visit
             FROM k JOIN {schema}.observation o USING (study_id, subject_id, code)
             WHERE NOT k.whole AND o.effective_at BETWEEN k.after AND k.until
             UNION
             SELECT o.study_id, o.subject_id, o.code, o.event_id, o.value, o.unit, o.effective_at, o.visit
             FROM m JOIN k USING (i) JOIN {schema}.observation o USING (study_id, subject_id, code)
             WHERE m.visit IS NOT NULL AND btrim(o.visit) = m.visit
             ORDER BY 1, 2, 3, 7",
            schema = self.schema
        );
        let mut keys: [Vec<&str>; 3] = Default::default();
        let (mut whole, mut after, mut until) = (Vec::new(), Vec::new(), Vec::new());
        let (mut of, mut visits) = (Vec::new(), Vec::new());
        for (i, ((study, subject, code), batch)) in readings.iter().enumerate() {
            let reach = self.reach(study, code);
            keys[0].push(study);
            keys[1].push(subject);
            keys[2].push(code);
            whole.push(reach.whole);
            let first = batch.iter().map(|r| r.effective_at).min();
            let last = batch.iter().map(|r| r.effective_at).max();
            after.push(reach.around.zip(first).map(|(span, t)| t - span));
            until.push(reach.around.zip(last).map(|(span, t)| t + span));
            for reading in batch {
                of.push(i as i64 + 1);
                visits.push(reading.visit().filter(|_| reach.visit));
            }
        }
        let [studies, subjects, codes] = keys;
        // Planned for each batch (not prepared): a prepared statement falls back after five runs
        // to a generic plan, which guesses 10 rows per unnest.
        let rows = sqlx::query(AssertSqlSafe(sql))
            .persistent(false)
            .bind(studies)
            .bind(subjects)
            .bind(codes)
            .bind(whole)
            .bind(after)
            .bind(until)
            .bind(of)
            .bind(visits)
            .fetch_all(&mut **tx)
            .await?;
        for r in rows {
            let key: SeriesKey = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            let reading = Reading {
                event_id: r.try_get(3)?,
                code: key.2.clone(),
                value: r.try_get(4)?,
                unit: r.try_get(5)?,
                effective_at: r.try_get(6)?,
                visit: r.try_get(7)?,
            };
            all.entry(key).or_default().push(reading);
        }
        Ok(all)
    }
}

/// How much of a series the rules judging its code need around a reading.
#[derive(Debug, Default, Clone, Copy)]
struct Reach {
    /// The whole history (a subject-baseline rule: the last readings of other visits, however old).
    whole: bool,
    /// The readings of the reading's visit (a visit mean).
    visit: bool,
    /// The readings this close in time (a persistence rule: its span plus one gap and a minute, so
    /// that a chain reaching beyond it is known to span more than the rule asks).
    around: Option<chrono::Duration>,
}

/// A vital sign as the rules judge it, taking effect at `effective_at`.
fn reading_of(e: &VitalSignRecorded, effective_at: DateTime<Utc>) -> Reading {
    Reading {
        event_id: e.envelope.event_id,
        code: e.loinc_code.clone(),
        value: e.value,
        unit: e.unit.clone(),
        effective_at,
        visit: e.visit.clone(),
    }
}

/// The subject an event is about and its effective time, for the episodes `prepare` reads; `None`
/// for events about no subject (their signals read their episode themselves).
fn subject_input(event: &AnyEvent) -> Option<(&Envelope, Option<Timestamp>)> {
    let (envelope, at) = match event {
        AnyEvent::VitalSignRecorded(e) => (&e.envelope, e.effective.earliest),
        AnyEvent::AdverseEventReported(e) => (&e.envelope, e.onset.earliest),
        AnyEvent::QuestionnaireResponseAccepted(e) => (&e.envelope, Some(e.authored_at)),
        AnyEvent::EnrollmentOnHold(e) => (&e.envelope, None),
        AnyEvent::CodeBroken(e) => (&e.envelope, None),
        _ => return None,
    };
    envelope.subject_id.as_ref()?;
    Some((envelope, at))
}

impl Handler for Monitoring {
    type Batch = MonitoringBatch;

    /// Decodes the batch; reads the series of its readings' (subject, code) that a rule judges and
    /// the episodes of its subjects (locked, in alert id order: batches of the four subject-keyed
    /// topics that share subjects queue instead of deadlocking).
    async fn prepare(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &[Message],
    ) -> Result<MonitoringBatch, HandlerError> {
        let mut state = MonitoringBatch::default();
        let mut series: BTreeMap<SeriesKey, Vec<Reading>> = BTreeMap::new();
        let mut subjects: BTreeMap<EpisodeKey, (DateTime<Utc>, DateTime<Utc>)> = BTreeMap::new();
        for message in batch {
            let Ok(event) = decode(message) else { continue };
            if let Some((envelope, at)) = subject_input(&event)
                && let (Some(subject_id), Ok(at)) = (envelope.subject_id.as_ref(), effective(envelope, at))
            {
                let span =
                    subjects.entry((envelope.study_id.clone(), subject_id.clone())).or_insert((at, at));
                *span = (span.0.min(at), span.1.max(at));
                if let AnyEvent::VitalSignRecorded(e) = &event
                    && self.judged_codes(&envelope.study_id).contains(e.loinc_code.as_str())
                {
                    let key = (envelope.study_id.clone(), subject_id.clone(), e.loinc_code.clone());
                    series.entry(key).or_default().push(reading_of(e, at));
                }
            }
            state.events.insert((message.partition, message.offset), event);
        }
        state.series = self.all_series(tx, &series).await?;
        state.episodes = Episodes::prefetch(tx, &self.schema, &subjects).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &Message,
        ctx: &mut Context,
        batch: &mut MonitoringBatch,
    ) -> Result<(), HandlerError> {
        let event = match batch.events.remove(&(message.partition, message.offset)) {
            Some(event) => event,
            None => decode(message)?,
        };
        match event {
            AnyEvent::VitalSignRecorded(e) => self.vital(tx, ctx, batch, &e).await,
            AnyEvent::AdverseEventReported(e) => self.adverse_event(tx, ctx, batch, &e).await,
            AnyEvent::QuestionnaireResponseAccepted(e) => self.epro(tx, ctx, batch, &e).await,
            AnyEvent::EnrollmentOnHold(e) => self.hold(tx, ctx, batch, &e).await,
            AnyEvent::SiteStockLow(e) => self.stock_low(tx, ctx, batch, &e).await,
            AnyEvent::CodeBroken(e) => self.code_broken(tx, ctx, batch, &e).await,
            AnyEvent::KriFlagChanged(e) => self.kri_flag(tx, ctx, batch, &e).await,
            AnyEvent::QtlStatusChanged(e) => self.qtl(tx, ctx, batch, &e).await,
            _ => Ok(()),
        }
    }

    /// Stores the batch's readings with one statement.
    async fn finish(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: MonitoringBatch,
        _ctx: &mut Context,
    ) -> Result<(), HandlerError> {
        if batch.observations.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO {}.observation (event_id, study_id, subject_id, code, value, unit, effective_at, visit)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::text[],
                                  $7::timestamptz[], $8::text[])
             ON CONFLICT DO NOTHING",
            self.schema
        );
        let o = &batch.observations;
        sqlx::query(AssertSqlSafe(sql))
            .bind(o.iter().map(|(_, _, r)| r.event_id).collect::<Vec<_>>())
            .bind(o.iter().map(|(study, _, _)| study.as_str()).collect::<Vec<_>>())
            .bind(o.iter().map(|(_, subject, _)| subject.as_str()).collect::<Vec<_>>())
            .bind(o.iter().map(|(_, _, r)| r.code.as_str()).collect::<Vec<_>>())
            .bind(o.iter().map(|(_, _, r)| r.value).collect::<Vec<_>>())
            .bind(o.iter().map(|(_, _, r)| r.unit.as_str()).collect::<Vec<_>>())
            .bind(o.iter().map(|(_, _, r)| r.effective_at).collect::<Vec<_>>())
            .bind(o.iter().map(|(_, _, r)| r.visit.as_deref()).collect::<Vec<_>>())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
