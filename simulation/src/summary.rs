//! What a study looks like after a run, read from the services' own tables (and the dead-letter
//! topics), not from what a driver believes it sent. Read it once the pipeline has settled
//! ([`crate::settle::wait_settled`]); before that the services disagree with each other.
//!
//! Every count is scoped to one study. It is an unblinded operator view: arms come from the
//! enrollment service's randomization lists. Which service answers what:
//!
//! | part | read from |
//! |------|-----------|
//! | `subjects.screened`, `screen_failed`, `withdrawn`, `withdrawn_by_reason` | the site API (`subject`: what the sites recorded) |
//! | `subjects.randomized`, `enrolled`, `on_hold`, `by_arm`, `on_hold_by_reason` | the enrollment consumer (`subject`, `randomization_slot`, `study`) |
//! | `kits` | the kit-allocation consumer (`kit`) |
//! | `epro` | the epro-validation consumer (`submission`, `response`, `conflicting_submission`) |
//! | `alerts` | the monitoring service (`alert`, `alert_evidence`) |
//! | `risk` | the risk service (`site_kri`, at its last evaluation) |
//! | `dead_letters` | the broker: messages on `<topic><dlq suffix>` |
//!
//! # JSON (field names are a stable contract; every list is sorted by its first field)
//!
//! ```text
//! study_id
//! subjects: screened, screen_failed, randomized, enrolled, on_hold, withdrawn,
//!           by_site: [{site_id, screened, screen_failed, randomized, enrolled, on_hold, withdrawn}],
//!           by_arm: [{arm_code, randomized, enrolled, on_hold}],
//!           on_hold_by_reason: [{reason_code, subjects}],
//!           withdrawn_by_reason: [{reason_code, subjects}]
//! kits: received, allocated, available, by_site: [{site_id, received, allocated, available}]
//! epro: decided, accepted, accepted_late_sync, rejected,
//!       rejected_by_reason: [{code, submissions}], accepted_by_window: [{status, submissions}]
//! alerts: episodes, triggering_readings,
//!         by_rule: [{rule_id, severity, episodes, triggering_readings, open, acknowledged, resolved, escalated}]
//! risk: kris: [{site_id, kri, numerator, denominator, metric, score, flag}],
//!       flagged_sites: [{site_id, risk_score, kris}],
//!       queries_by_check: [{check_id, opened, open, answered, closed}],
//!       qtls: [{qtl, numerator, denominator, observed, expected, limit, breached}]
//! dead_letters: [{topic, messages}]
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use trialflow_consumers::{enrollment, epro, kit_allocation, monitoring, risk};
use trialflow_outbox::{KafkaConfig, SchemaName};
use trialflow_pipeline::Schemas;
use trialflow_producers::site_api;
use trialflow_schemas::topics::TopicNames;

/// A study after a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StudySummary {
    pub study_id: String,
    pub subjects: SubjectSummary,
    pub kits: KitSummary,
    pub epro: EproSummary,
    pub alerts: AlertSummary,
    pub risk: RiskSummary,
    /// Every dead-letter topic of the pipeline's topics, also the empty ones.
    pub dead_letters: Vec<DeadLetters>,
}

/// Subjects. Randomized and enrolled count what happened (a subject enrolled and later withdrawn
/// still counts as enrolled); on hold is the current state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectSummary {
    /// Screened at a site.
    pub screened: u64,
    /// Screened and assessed not eligible (screen failures).
    pub screen_failed: u64,
    /// Given a randomization number (enrolled, waiting for a kit, or withdrawn since).
    pub randomized: u64,
    /// Given a kit (withdrawn since or not).
    pub enrolled: u64,
    /// On hold now: an enrollment request that failed a gate, or randomized without a kit yet.
    /// Screen failures and withdrawn subjects keep their own state, whatever was requested for them.
    pub on_hold: u64,
    /// Withdrawn from the study.
    pub withdrawn: u64,
    /// Every site of the study, also those without subjects (subjects the enrollment service
    /// knows without a site would be under site id "").
    pub by_site: Vec<SiteSubjects>,
    /// Every arm of the study, also those nobody was randomized to.
    pub by_arm: Vec<ArmSubjects>,
    /// Subjects on hold by reason code; a subject held for several reasons counts under each.
    pub on_hold_by_reason: Vec<HoldReason>,
    /// Withdrawn subjects by the withdrawal's reason code (the replayed pilot's are CDISC DS
    /// `DSDECOD` terms: `ADVERSE EVENT`, `WITHDRAWAL BY SUBJECT`, ...); they add up to `withdrawn`.
    pub withdrawn_by_reason: Vec<WithdrawalReason>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteSubjects {
    pub site_id: String,
    pub screened: u64,
    pub screen_failed: u64,
    pub randomized: u64,
    pub enrolled: u64,
    pub on_hold: u64,
    pub withdrawn: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmSubjects {
    pub arm_code: String,
    pub randomized: u64,
    pub enrolled: u64,
    /// Randomized to this arm and waiting for a kit.
    pub on_hold: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WithdrawalReason {
    /// A `SubjectWithdrawn` reason code.
    pub reason_code: String,
    pub subjects: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReason {
    /// An `EnrollmentOnHold` reason code, e.g. `NO_KIT_AVAILABLE`.
    pub reason_code: String,
    pub subjects: u64,
}

/// Kits as the kit-allocation service holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KitSummary {
    pub received: u64,
    pub allocated: u64,
    /// Not allocated (nor quarantined, damaged, lost or expired); dispensable or not.
    pub available: u64,
    /// Every site of the study, also those without kits.
    pub by_site: Vec<SiteKits>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteKits {
    pub site_id: String,
    pub received: u64,
    pub allocated: u64,
    pub available: u64,
}

/// ePRO decisions: one per submission id, plus one per resubmission of a decided id with other
/// content (rejected `CONFLICTING_DUPLICATE`; the first stands). Exact duplicates are no decision;
/// submissions parked until their subject is enrolled are not decided yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EproSummary {
    pub decided: u64,
    pub accepted: u64,
    /// Accepted, arrived more than the schedule's late-sync hours after being authored.
    pub accepted_late_sync: u64,
    pub rejected: u64,
    /// Rejections by reason code; one with several reasons counts under each code once.
    pub rejected_by_reason: Vec<ReasonCount>,
    /// Accepted submissions by window status (`IN_WINDOW`, `EARLY`, `LATE`, `OUT_OF_WINDOW`, `UNSCHEDULED`).
    pub accepted_by_window: Vec<WindowCount>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    pub code: String,
    pub submissions: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowCount {
    pub status: String,
    pub submissions: u64,
}

/// Monitoring alert episodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertSummary {
    pub episodes: u64,
    /// Evidence rows: the readings (or events: a hold, an ePRO response) behind the episodes.
    pub triggering_readings: u64,
    pub by_rule: Vec<RuleAlerts>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleAlerts {
    pub rule_id: String,
    pub severity: String,
    pub episodes: u64,
    pub triggering_readings: u64,
    pub open: u64,
    pub acknowledged: u64,
    pub resolved: u64,
    /// Episodes escalated at least once (level above 0).
    pub escalated: u64,
}

/// Key risk indicators (risk service) at the last evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RiskSummary {
    /// Every site's result per KRI, by site then KRI.
    pub kris: Vec<SiteKriSummary>,
    /// Sites with an amber or red KRI: the site risk score (sum of |flag|) and `KRI:flag` each.
    pub flagged_sites: Vec<FlaggedSite>,
    /// The queries each edit check opened, by status.
    pub queries_by_check: Vec<risk::queries::CheckQueries>,
    /// The quality tolerance limits at the last evaluation.
    pub qtls: Vec<risk::evaluate::StoredQtl>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SiteKriSummary {
    pub site_id: String,
    pub kri: String,
    pub numerator: f64,
    pub denominator: f64,
    pub metric: f64,
    /// The over-dispersion-adjusted z-score; `null` when the site is not scored.
    pub score: Option<f64>,
    /// −2 … 2; `null` when the site is not scored.
    pub flag: Option<i16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlaggedSite {
    pub site_id: String,
    pub risk_score: u32,
    pub kris: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetters {
    /// The dead-letter topic (`<topic><dlq suffix>`).
    pub topic: String,
    /// Messages on it now; 0 when the topic does not exist.
    pub messages: u64,
}

/// Reads the summary of `study_id` from the pipeline's schemas, and counts the dead letters of
/// every topic of `topics` (dead-letter topic = topic + `dlq_suffix`).
pub async fn collect(
    pool: &PgPool,
    schemas: &Schemas,
    study_id: &str,
    kafka: &KafkaConfig,
    topics: &TopicNames,
    dlq_suffix: &str,
) -> anyhow::Result<StudySummary> {
    let sites = study_sites(pool, &schemas[site_api::NAME], study_id).await?;
    Ok(StudySummary {
        study_id: study_id.to_string(),
        subjects: subjects(pool, schemas, study_id, &sites).await?,
        kits: kits(pool, &schemas[kit_allocation::NAME], study_id, &sites).await?,
        epro: epro(pool, &schemas[epro::NAME], study_id).await?,
        alerts: alerts(pool, &schemas[monitoring::NAME], study_id).await?,
        risk: risk_summary(pool, &schemas[risk::NAME], study_id).await?,
        dead_letters: dead_letters(kafka, topics, dlq_suffix).await?,
    })
}

async fn risk_summary(pool: &PgPool, schema: &SchemaName, study_id: &str) -> anyhow::Result<RiskSummary> {
    let rows = risk::read::site_kris(pool, schema, study_id)
        .await
        .with_context(|| format!("reading the key risk indicators of study {study_id}"))?;
    let kris: Vec<SiteKriSummary> = rows
        .into_iter()
        .map(|r| SiteKriSummary {
            site_id: r.site_id,
            kri: r.kri,
            numerator: r.numerator,
            denominator: r.denominator,
            metric: r.metric,
            score: r.score,
            flag: r.flag,
        })
        .collect();
    let mut flagged: BTreeMap<&str, FlaggedSite> = BTreeMap::new();
    for k in kris.iter().filter(|k| k.flag.is_some_and(|f| f != 0)) {
        let site = flagged
            .entry(&k.site_id)
            .or_insert_with(|| FlaggedSite { site_id: k.site_id.clone(), ..FlaggedSite::default() });
        let flag = k.flag.unwrap_or_default();
        site.risk_score += u32::from(flag.unsigned_abs());
        site.kris.push(format!("{}:{flag:+}", k.kri));
    }
    let flagged_sites = flagged.into_values().collect();
    let queries_by_check = risk::queries::counts_by_check(pool, schema, study_id)
        .await
        .with_context(|| format!("reading the queries of study {study_id}"))?;
    let qtls = risk::evaluate::qtls(pool, schema, study_id)
        .await
        .with_context(|| format!("reading the quality tolerance limits of study {study_id}"))?;
    Ok(RiskSummary { kris, flagged_sites, queries_by_check, qtls })
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or_default()
}

async fn study_sites(pool: &PgPool, site_api: &SchemaName, study_id: &str) -> anyhow::Result<Vec<String>> {
    site_api::read::sites(pool, site_api, study_id)
        .await
        .with_context(|| format!("reading the sites of study {study_id}"))
}

async fn subjects(
    pool: &PgPool,
    schemas: &Schemas,
    study_id: &str,
    sites: &[String],
) -> anyhow::Result<SubjectSummary> {
    let (site_api, enrollment) = (&schemas[site_api::NAME], &schemas[enrollment::NAME]);
    let reading = |what: &str| format!("reading {what} of study {study_id}");
    let mut by_site: BTreeMap<String, SiteSubjects> = sites
        .iter()
        .map(|s| (s.clone(), SiteSubjects { site_id: s.clone(), ..SiteSubjects::default() }))
        .collect();

    let screening = site_api::read::screening_by_site(pool, site_api, study_id)
        .await
        .with_context(|| reading("the screenings"))?;
    for site in screening {
        let row = site_row(&mut by_site, site.site_id);
        row.screened = count(site.screened);
        row.screen_failed = count(site.screen_failed);
        row.withdrawn = count(site.withdrawn);
    }
    let enrolled = enrollment::read::by_site(pool, enrollment, study_id)
        .await
        .with_context(|| reading("the enrollments"))?;
    for site in enrolled {
        let row = site_row(&mut by_site, site.group);
        row.randomized = count(site.randomized);
        row.enrolled = count(site.enrolled);
        row.on_hold = count(site.on_hold);
    }

    let arms =
        enrollment::read::arms(pool, enrollment, study_id).await.with_context(|| reading("the arms"))?;
    let mut by_arm: BTreeMap<String, ArmSubjects> = arms
        .into_iter()
        .map(|a| (a.clone(), ArmSubjects { arm_code: a, ..ArmSubjects::default() }))
        .collect();
    let per_arm = enrollment::read::by_arm(pool, enrollment, study_id)
        .await
        .with_context(|| reading("the arms' subjects"))?;
    for arm in per_arm {
        let arm_code = arm.group;
        let row = by_arm
            .entry(arm_code.clone())
            .or_insert_with(|| ArmSubjects { arm_code, ..ArmSubjects::default() });
        row.randomized = count(arm.randomized);
        row.enrolled = count(arm.enrolled);
        row.on_hold = count(arm.on_hold);
    }

    let reasons = enrollment::read::on_hold_by_reason(pool, enrollment, study_id)
        .await
        .with_context(|| reading("the hold reasons"))?;
    let mut on_hold_by_reason: Vec<HoldReason> =
        reasons.into_iter().map(|(reason_code, n)| HoldReason { reason_code, subjects: count(n) }).collect();
    on_hold_by_reason.sort_by(|a, b| a.reason_code.cmp(&b.reason_code));
    let withdrawals = site_api::read::withdrawn_by_reason(pool, site_api, study_id)
        .await
        .with_context(|| reading("the withdrawal reasons"))?;
    let mut withdrawn_by_reason: Vec<WithdrawalReason> = withdrawals
        .into_iter()
        .map(|(reason_code, n)| WithdrawalReason { reason_code, subjects: count(n) })
        .collect();
    withdrawn_by_reason.sort_by(|a, b| a.reason_code.cmp(&b.reason_code));

    let by_site: Vec<SiteSubjects> = by_site.into_values().collect();
    let sum = |f: fn(&SiteSubjects) -> u64| by_site.iter().map(f).sum::<u64>();
    Ok(SubjectSummary {
        screened: sum(|s| s.screened),
        screen_failed: sum(|s| s.screen_failed),
        randomized: sum(|s| s.randomized),
        enrolled: sum(|s| s.enrolled),
        on_hold: sum(|s| s.on_hold),
        withdrawn: sum(|s| s.withdrawn),
        by_arm: by_arm.into_values().collect(),
        on_hold_by_reason,
        withdrawn_by_reason,
        by_site,
    })
}

fn site_row(by_site: &mut BTreeMap<String, SiteSubjects>, site_id: String) -> &mut SiteSubjects {
    by_site.entry(site_id.clone()).or_insert_with(|| SiteSubjects { site_id, ..SiteSubjects::default() })
}

async fn kits(
    pool: &PgPool,
    kit_allocation: &SchemaName,
    study_id: &str,
    sites: &[String],
) -> anyhow::Result<KitSummary> {
    let mut by_site: BTreeMap<String, SiteKits> =
        sites.iter().map(|s| (s.clone(), SiteKits { site_id: s.clone(), ..SiteKits::default() })).collect();
    let per_site = kit_allocation::read::by_site(pool, kit_allocation, study_id)
        .await
        .with_context(|| format!("reading the kits of study {study_id}"))?;
    for site in per_site {
        let site_id = site.site_id;
        let row =
            by_site.entry(site_id.clone()).or_insert_with(|| SiteKits { site_id, ..SiteKits::default() });
        row.received = count(site.received);
        row.allocated = count(site.allocated);
        row.available = count(site.available);
    }
    let by_site: Vec<SiteKits> = by_site.into_values().collect();
    Ok(KitSummary {
        received: by_site.iter().map(|s| s.received).sum(),
        allocated: by_site.iter().map(|s| s.allocated).sum(),
        available: by_site.iter().map(|s| s.available).sum(),
        by_site,
    })
}

async fn epro(pool: &PgPool, epro: &SchemaName, study_id: &str) -> anyhow::Result<EproSummary> {
    let reading = |what: &str| format!("reading {what} of study {study_id}");
    let decisions =
        epro::read::decisions(pool, epro, study_id).await.with_context(|| reading("the ePRO decisions"))?;
    let reasons = epro::read::rejected_by_reason(pool, epro, study_id)
        .await
        .with_context(|| reading("the ePRO rejection reasons"))?;
    let mut rejected_by_reason: Vec<ReasonCount> =
        reasons.into_iter().map(|(code, n)| ReasonCount { code, submissions: count(n) }).collect();
    rejected_by_reason.sort_by(|a, b| a.code.cmp(&b.code));
    let windows = epro::read::accepted_by_window(pool, epro, study_id)
        .await
        .with_context(|| reading("the ePRO windows"))?;
    let mut accepted_by_window: Vec<WindowCount> =
        windows.into_iter().map(|(status, n)| WindowCount { status, submissions: count(n) }).collect();
    accepted_by_window.sort_by(|a, b| a.status.cmp(&b.status));
    let (accepted, rejected) = (count(decisions.accepted), count(decisions.rejected));
    Ok(EproSummary {
        decided: accepted + rejected,
        accepted,
        accepted_late_sync: count(decisions.accepted_late_sync),
        rejected,
        rejected_by_reason,
        accepted_by_window,
    })
}

async fn alerts(pool: &PgPool, monitoring: &SchemaName, study_id: &str) -> anyhow::Result<AlertSummary> {
    let per_rule = monitoring::read::alerts_by_rule(pool, monitoring, study_id)
        .await
        .with_context(|| format!("reading the alerts of study {study_id}"))?;
    let mut by_rule: Vec<RuleAlerts> = per_rule
        .into_iter()
        .map(|r| RuleAlerts {
            rule_id: r.rule_id,
            severity: r.severity,
            episodes: count(r.episodes),
            triggering_readings: count(r.triggering_readings),
            open: count(r.open),
            acknowledged: count(r.acknowledged),
            resolved: count(r.resolved),
            escalated: count(r.escalated),
        })
        .collect();
    by_rule.sort_by(|a, b| (&a.rule_id, &a.severity).cmp(&(&b.rule_id, &b.severity)));
    Ok(AlertSummary {
        episodes: by_rule.iter().map(|r| r.episodes).sum(),
        triggering_readings: by_rule.iter().map(|r| r.triggering_readings).sum(),
        by_rule,
    })
}

/// Messages on each dead-letter topic: first to end offset of every partition
/// ([`crate::settle::true_end_offsets`]).
async fn dead_letters(
    kafka: &KafkaConfig,
    topics: &TopicNames,
    dlq_suffix: &str,
) -> anyhow::Result<Vec<DeadLetters>> {
    let mut names: Vec<String> = topics.all().iter().map(|t| format!("{t}{dlq_suffix}")).collect();
    names.sort();
    let offsets = crate::settle::true_end_offsets(kafka, &names).await.context("counting dead letters")?;
    Ok(names
        .into_iter()
        .map(|topic| {
            let messages = offsets
                .iter()
                .filter(|((t, _), _)| *t == topic)
                .map(|(_, (low, end))| count(end - low))
                .sum();
            DeadLetters { topic, messages }
        })
        .collect())
}

impl StudySummary {
    /// A compact text report: totals per part, then aligned tables (per site, arm, reason, window,
    /// rule; dead-letter topics that hold messages).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let s = &self.subjects;
        let _ = writeln!(out, "Study {}", self.study_id);
        let _ = writeln!(
            out,
            "Subjects: {} screened, {} screen failed, {} randomized, {} enrolled, {} on hold, {} withdrawn",
            s.screened, s.screen_failed, s.randomized, s.enrolled, s.on_hold, s.withdrawn
        );
        table(
            &mut out,
            &["site", "screened", "screen failed", "randomized", "enrolled", "on hold", "withdrawn"],
            s.by_site.iter().map(|r| {
                let n = [r.screened, r.screen_failed, r.randomized, r.enrolled, r.on_hold, r.withdrawn];
                row(&r.site_id, &n)
            }),
        );
        table(
            &mut out,
            &["arm", "randomized", "enrolled", "on hold"],
            s.by_arm.iter().map(|r| row(&r.arm_code, &[r.randomized, r.enrolled, r.on_hold])),
        );
        table(
            &mut out,
            &["on hold for", "subjects"],
            s.on_hold_by_reason.iter().map(|r| row(&r.reason_code, &[r.subjects])),
        );
        table(
            &mut out,
            &["withdrawn for", "subjects"],
            s.withdrawn_by_reason.iter().map(|r| row(&r.reason_code, &[r.subjects])),
        );

        let k = &self.kits;
        let _ = writeln!(
            out,
            "Kits: {} received, {} allocated, {} available",
            k.received, k.allocated, k.available
        );
        table(
            &mut out,
            &["site", "received", "allocated", "available"],
            k.by_site.iter().map(|r| row(&r.site_id, &[r.received, r.allocated, r.available])),
        );

        let e = &self.epro;
        let _ = writeln!(
            out,
            "ePRO: {} decided, {} accepted ({} late sync), {} rejected",
            e.decided, e.accepted, e.accepted_late_sync, e.rejected
        );
        table(
            &mut out,
            &["accepted in window", "submissions"],
            e.accepted_by_window.iter().map(|r| row(&r.status, &[r.submissions])),
        );
        table(
            &mut out,
            &["rejected for", "submissions"],
            e.rejected_by_reason.iter().map(|r| row(&r.code, &[r.submissions])),
        );

        let a = &self.alerts;
        let _ =
            writeln!(out, "Alerts: {} episodes, {} triggering readings", a.episodes, a.triggering_readings);
        table(
            &mut out,
            &["rule", "severity", "episodes", "readings", "open", "acknowledged", "resolved", "escalated"],
            a.by_rule.iter().map(|r| {
                let mut cells = vec![r.rule_id.clone(), r.severity.clone()];
                let n = [r.episodes, r.triggering_readings, r.open, r.acknowledged, r.resolved, r.escalated];
                cells.extend(n.iter().map(u64::to_string));
                cells
            }),
        );

        let r = &self.risk;
        let _ = writeln!(out, "Key risk indicators: {} sites flagged amber or red", r.flagged_sites.len());
        table(
            &mut out,
            &["site", "KRI", "numerator", "denominator", "metric", "score", "flag"],
            r.kris.iter().map(|k| {
                vec![
                    k.site_id.clone(),
                    k.kri.clone(),
                    format!("{}", k.numerator),
                    format!("{}", k.denominator),
                    format!("{:.4}", k.metric),
                    k.score.map_or("–".to_string(), |z| format!("{z:+.2}")),
                    k.flag.map_or("–".to_string(), |f| format!("{f:+}")),
                ]
            }),
        );

        let opened: i64 = r.queries_by_check.iter().map(|q| q.opened).sum();
        let _ = writeln!(out, "Queries opened by edit checks: {opened}");
        table(
            &mut out,
            &["check", "opened", "open", "answered", "closed"],
            r.queries_by_check.iter().map(|q| {
                let n = [q.opened, q.open, q.answered, q.closed];
                std::iter::once(q.check_id.clone()).chain(n.iter().map(i64::to_string)).collect()
            }),
        );
        let breached = r.qtls.iter().filter(|q| q.breached).count();
        let _ = writeln!(out, "Quality tolerance limits: {breached} of {} breached", r.qtls.len());
        table(
            &mut out,
            &["QTL", "observed", "expected", "limit", "N", "breached"],
            r.qtls.iter().map(|q| {
                vec![
                    q.qtl.clone(),
                    format!("{:.4}", q.observed),
                    format!("{:.4}", q.expected),
                    format!("{:.4}", q.limit),
                    format!("{}", q.denominator),
                    if q.breached { "yes".to_string() } else { "no".to_string() },
                ]
            }),
        );

        let letters: u64 = self.dead_letters.iter().map(|d| d.messages).sum();
        let _ = writeln!(out, "Dead-letter messages: {letters}");
        table(
            &mut out,
            &["topic", "messages"],
            self.dead_letters.iter().filter(|d| d.messages > 0).map(|d| row(&d.topic, &[d.messages])),
        );
        out
    }
}

fn row(name: &str, counts: &[u64]) -> Vec<String> {
    std::iter::once(name.to_string()).chain(counts.iter().map(u64::to_string)).collect()
}

/// Appends an indented table: the first column left-aligned, numbers right-aligned under their
/// headers. Nothing when there are no rows.
fn table(out: &mut String, header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    if rows.is_empty() {
        return;
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Names (the first column, and any column that is not all counts) left, counts right.
    let text: Vec<bool> = (0..widths.len())
        .map(|i| i == 0 || rows.iter().any(|r| r.get(i).is_some_and(|c| c.parse::<u64>().is_err())))
        .collect();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for r in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for ((cell, w), text) in r.iter().zip(&widths).zip(&text) {
            if *text {
                let _ = write!(line, "  {cell:<w$}");
            } else {
                let _ = write!(line, "  {cell:>w$}");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON field names are a contract (the demo's summary file): renaming one is a breaking
    /// change and must be deliberate.
    #[test]
    fn json_field_names_are_the_documented_ones() -> Result<(), serde_json::Error> {
        let summary = StudySummary {
            subjects: SubjectSummary {
                by_site: vec![SiteSubjects::default()],
                by_arm: vec![ArmSubjects::default()],
                on_hold_by_reason: vec![HoldReason::default()],
                withdrawn_by_reason: vec![WithdrawalReason::default()],
                ..SubjectSummary::default()
            },
            kits: KitSummary { by_site: vec![SiteKits::default()], ..KitSummary::default() },
            epro: EproSummary {
                rejected_by_reason: vec![ReasonCount::default()],
                accepted_by_window: vec![WindowCount::default()],
                ..EproSummary::default()
            },
            alerts: AlertSummary { by_rule: vec![RuleAlerts::default()], ..AlertSummary::default() },
            risk: RiskSummary {
                kris: vec![SiteKriSummary::default()],
                flagged_sites: vec![FlaggedSite::default()],
                queries_by_check: vec![risk::queries::CheckQueries::default()],
                qtls: vec![risk::evaluate::StoredQtl::default()],
            },
            dead_letters: vec![DeadLetters::default()],
            ..StudySummary::default()
        };
        fn keys(path: &str, value: &serde_json::Value, out: &mut Vec<String>) {
            match value {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        let path = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                        out.push(path.clone());
                        keys(&path, v, out);
                    }
                }
                serde_json::Value::Array(items) => {
                    items.iter().for_each(|v| keys(&format!("{path}[]"), v, out))
                }
                _ => {}
            }
        }
        let mut found = Vec::new();
        keys("", &serde_json::to_value(&summary)?, &mut found);
        found.sort();
        let mut documented: Vec<String> = [
            "study_id",
            "subjects",
            "subjects.screened",
            "subjects.screen_failed",
            "subjects.randomized",
            "subjects.enrolled",
            "subjects.on_hold",
            "subjects.withdrawn",
            "subjects.by_site",
            "subjects.by_site[].site_id",
            "subjects.by_site[].screened",
            "subjects.by_site[].screen_failed",
            "subjects.by_site[].randomized",
            "subjects.by_site[].enrolled",
            "subjects.by_site[].on_hold",
            "subjects.by_site[].withdrawn",
            "subjects.by_arm",
            "subjects.by_arm[].arm_code",
            "subjects.by_arm[].randomized",
            "subjects.by_arm[].enrolled",
            "subjects.by_arm[].on_hold",
            "subjects.on_hold_by_reason",
            "subjects.on_hold_by_reason[].reason_code",
            "subjects.on_hold_by_reason[].subjects",
            "subjects.withdrawn_by_reason",
            "subjects.withdrawn_by_reason[].reason_code",
            "subjects.withdrawn_by_reason[].subjects",
            "kits",
            "kits.received",
            "kits.allocated",
            "kits.available",
            "kits.by_site",
            "kits.by_site[].site_id",
            "kits.by_site[].received",
            "kits.by_site[].allocated",
            "kits.by_site[].available",
            "epro",
            "epro.decided",
            "epro.accepted",
            "epro.accepted_late_sync",
            "epro.rejected",
            "epro.rejected_by_reason",
            "epro.rejected_by_reason[].code",
            "epro.rejected_by_reason[].submissions",
            "epro.accepted_by_window",
            "epro.accepted_by_window[].status",
            "epro.accepted_by_window[].submissions",
            "alerts",
            "alerts.episodes",
            "alerts.triggering_readings",
            "alerts.by_rule",
            "alerts.by_rule[].rule_id",
            "alerts.by_rule[].severity",
            "alerts.by_rule[].episodes",
            "alerts.by_rule[].triggering_readings",
            "alerts.by_rule[].open",
            "alerts.by_rule[].acknowledged",
            "alerts.by_rule[].resolved",
            "alerts.by_rule[].escalated",
            "risk",
            "risk.kris",
            "risk.kris[].site_id",
            "risk.kris[].kri",
            "risk.kris[].numerator",
            "risk.kris[].denominator",
            "risk.kris[].metric",
            "risk.kris[].score",
            "risk.kris[].flag",
            "risk.flagged_sites",
            "risk.flagged_sites[].site_id",
            "risk.flagged_sites[].risk_score",
            "risk.flagged_sites[].kris",
            "risk.queries_by_check",
            "risk.queries_by_check[].check_id",
            "risk.queries_by_check[].opened",
            "risk.queries_by_check[].open",
            "risk.queries_by_check[].answered",
            "risk.queries_by_check[].closed",
            "risk.qtls",
            "risk.qtls[].qtl",
            "risk.qtls[].numerator",
            "risk.qtls[].denominator",
            "risk.qtls[].observed",
            "risk.qtls[].expected",
            "risk.qtls[].limit",
            "risk.qtls[].breached",
            "dead_letters",
            "dead_letters[].topic",
            "dead_letters[].messages",
        ]
        .iter()
        .map(|k| k.to_string())
        .collect();
        documented.sort();
        assert_eq!(found, documented);
        Ok(())
    }

    #[test]
    fn the_report_aligns_names_left_and_counts_right() {
        let mut out = String::new();
        let rows = [row("101", &[4, 12]), row("1021", &[3, 0])];
        table(&mut out, &["site", "screened", "x"], rows.into_iter());
        assert_eq!(out, "  site  screened   x\n  101          4  12\n  1021         3   0\n");
        let mut empty = String::new();
        table(&mut empty, &["site"], std::iter::empty());
        assert_eq!(empty, "");
    }
}
