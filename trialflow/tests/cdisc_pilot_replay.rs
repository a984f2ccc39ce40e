//! The CDISC pilot replay end to end on a slice of the study (four sites): the real data through
//! the site API, the EDC topics and the ePRO gateway, the relay, the broker over TCP and every
//! consumer, started in this process on private schemas and topics. The summary is checked against
//! expectations computed here from the same source rows, with rules written out independently of
//! the consumers' code; a second replay must change nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::NaiveDate;
use tokio_util::sync::CancellationToken;
use trialflow_pipeline::PipelineConfig;
use trialflow_simulation::cdisc_pilot::data::{self, Domains, Row};
use trialflow_simulation::cdisc_pilot::plan::{Action, Delivery, Plan};
use trialflow_simulation::replay::{self, DemoSummary, ReplayOptions};
use trialflow_testkit::{database_url, init_logs, kafka};

/// Small sites with screen failures, partial AE onset dates, serious AEs and hypertensive
/// readings between them.
const SITES: &[&str] = &["706", "707", "711", "718"];

fn data_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.data/cdisc-pilot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_of_the_pilot_replays_to_the_expected_outcome_and_a_second_replay_changes_nothing()
-> anyhow::Result<()> {
    init_logs();
    let sites: Vec<String> = SITES.iter().map(|s| s.to_string()).collect();
    let plan = replay::load_plan(&data_dir(), &sites)?;
    let sdtm = data::ensure(&data_dir())?;
    let source = Domains::read(&sdtm)?.only_sites(&sites);
    let expected = Expected::compute(&source, &plan);

    let shutdown = CancellationToken::new();
    let (pipeline, clock, config) = replay::start_pipeline(
        PipelineConfig::isolated("pilot", &database_url(), &kafka())?,
        &data_dir(),
        replay::first_instant(&plan),
        &shutdown,
    )
    .await?;
    let options = ReplayOptions {
        data_dir: data_dir(),
        sites: sites.clone(),
        days_per_second: 0.0,
        settle_timeout: Duration::from_secs(240),
        progress: false,
        summary_path: None,
    };
    let first = replay::replay(&plan, &pipeline, &config, &clock, &options, &shutdown).await?;
    eprintln!("{}\nexpected: {expected:?}", replay::render(&first));
    expected.check(&first)?;
    assert!(first.replay.site_api_created > 0 && first.replay.site_api_replayed == 0);
    assert!(first.latency_ms.enrollment.is_some() && first.latency_ms.epro_decision.is_some());
    assert_eq!(
        first.replay.new_events.get("SubjectEnrolled").copied().unwrap_or(0),
        expected.randomized.values().sum::<u64>()
    );
    assert_eq!(
        first.replay.new_events.get("SubjectWithdrawn").copied().unwrap_or(0),
        expected.withdrawn.values().sum::<u64>()
    );

    // Again: every command is answered as a replay, every record is one the consumers know.
    let second = replay::replay(&plan, &pipeline, &config, &clock, &options, &shutdown).await?;
    assert_eq!(second.replay.site_api_created, 0, "{:?}", second.replay);
    assert_eq!(second.replay.site_api_replayed, first.replay.site_api_commands);
    assert!(
        second.replay.new_events.is_empty(),
        "new events on the second replay: {:?}",
        second.replay.new_events
    );
    assert_eq!(second.study, first.study, "the second replay changed the outcome");
    assert_eq!(second.latency_ms.enrollment, None);
    pipeline.stop().await?;
    Ok(())
}

// ---- expectations, computed from the source rows ------------------------------------------------

fn text<'a>(r: &'a Row, column: &str) -> &'a str {
    r.text(column).unwrap_or_default()
}

#[derive(Debug, Default)]
struct Expected {
    screened: BTreeMap<String, u64>,
    screen_failed: BTreeMap<String, u64>,
    randomized: BTreeMap<String, u64>,
    /// Randomized subjects with an early termination in DS, per site and per reason (`DSDECOD`).
    withdrawn: BTreeMap<String, u64>,
    withdrawn_by_reason: BTreeMap<String, u64>,
    kits_received: u64,
    accepted: u64,
    accepted_late_sync: u64,
    rejected_conflicting: u64,
    by_window: BTreeMap<String, u64>,
    /// Rule → (episodes, triggering readings).
    alerts: BTreeMap<String, (u64, u64)>,
    /// Edit checks: (check id, site) → queries opened.
    queries: BTreeMap<(String, String), u64>,
    /// Per site: inputs dated to the day, those recorded more than 10 days late, data points.
    inputs: BTreeMap<String, (u64, u64, u64)>,
    /// Per site: PHQ-9 occurrences due by the slice's last day (before a withdrawal), and those
    /// without an accepted response.
    epro_compliance: BTreeMap<String, (u64, u64)>,
}

/// Readings of one rule: subjects with at least one, and how many.
#[derive(Debug, Default)]
struct Triggers {
    subjects: BTreeSet<String>,
    readings: BTreeSet<String>,
}

impl Triggers {
    fn add(&mut self, subject: &str, reading: String) {
        self.subjects.insert(subject.to_string());
        self.readings.insert(reading);
    }
}

impl Expected {
    fn compute(source: &Domains, plan: &Plan) -> Self {
        let mut e = Expected::default();
        let mut started: HashMap<String, NaiveDate> = HashMap::new();
        for r in &source.dm {
            let site = text(r, "SITEID").to_string();
            *e.screened.entry(site.clone()).or_default() += 1;
            if text(r, "ARMCD") == "Scrnfail" {
                *e.screen_failed.entry(site).or_default() += 1;
            } else {
                *e.randomized.entry(site.clone()).or_default() += 1;
                started.insert(text(r, "USUBJID").to_string(), date(text(r, "RFSTDTC")));
                // The plan ships, per arm of 3, the site's randomized subjects + threshold (2) + 1.
            }
        }
        e.kits_received = e.randomized.values().map(|n| (n + 3) * 3).sum();

        // Withdrawals: a randomized subject's disposition event that is not a completion, on its
        // date at noon in New York. Nothing the subject fills in may be authored from then on.
        let mut withdrawn_at: HashMap<String, chrono::DateTime<chrono::Utc>> = HashMap::new();
        for r in &source.ds {
            let subject = text(r, "USUBJID");
            let reason = text(r, "DSDECOD");
            if text(r, "DSCAT") != "DISPOSITION EVENT"
                || reason == "COMPLETED"
                || !started.contains_key(subject)
            {
                continue;
            }
            assert_ne!(reason, "SCREEN FAILURE", "{subject} was randomized");
            assert!(
                !withdrawn_at.contains_key(subject),
                "{subject}: one disposition event each in the pilot"
            );
            let site = &subject[3..6];
            *e.withdrawn.entry(site.to_string()).or_default() += 1;
            *e.withdrawn_by_reason.entry(reason.to_string()).or_default() += 1;
            let noon = date(text(r, "DSSTDTC")).and_hms_opt(12, 0, 0).unwrap_or_default();
            let instant =
                noon.and_local_timezone(chrono_tz::America::New_York).earliest().map(|t| t.to_utc());
            withdrawn_at.insert(subject.to_string(), instant.unwrap_or_default());
        }

        // Vital signs and adverse events after a withdrawal are sent and judged like any other
        // (safety follow-up): the rules below take every row, and the slice has such rows.
        let after_withdrawal = |subject: &str, day: &str| {
            withdrawn_at.get(subject).is_some_and(|w| day.len() >= 10 && date(day) > w.date_naive())
        };
        assert!(source.vs.iter().any(|r| after_withdrawal(text(r, "USUBJID"), text(r, "VSDTC"))));
        assert!(source.ae.iter().any(|r| after_withdrawal(text(r, "USUBJID"), text(r, "AEDTC"))));
        let mut rules: BTreeMap<&str, Triggers> = BTreeMap::new();
        vitals(source, &mut rules);
        for r in &source.ae {
            if text(r, "AESER") == "Y" {
                rules
                    .entry("SAE")
                    .or_default()
                    .add(text(r, "USUBJID"), format!("{}/AE{}", text(r, "USUBJID"), text_num(r, "AESEQ")));
            }
        }
        // ePRO: the plan's submissions are the input (synthetic answers, delivery kinds).
        let schedule: HashMap<&str, i64> = [
            ("PHQ-9/W2", 14),
            ("PHQ-9/W4", 28),
            ("PHQ-9/W6", 42),
            ("PHQ-9/W8", 56),
            ("PHQ-9/W12", 84),
            ("PHQ-9/W16", 112),
            ("PHQ-9/W20", 140),
            ("PHQ-9/W24", 168),
            ("PHQ-9/W26", 182),
        ]
        .into();
        let mut completed: BTreeSet<(String, String)> = BTreeSet::new();
        for step in &plan.steps {
            let Action::Submit { submission: s, delivery, resend } = &step.action else { continue };
            if *resend {
                if *delivery == Delivery::Conflicting {
                    e.rejected_conflicting += 1;
                }
                continue;
            }
            e.accepted += 1;
            e.accepted_late_sync += u64::from(*delivery == Delivery::LateSync);
            let subject = s.envelope.subject_id.clone().unwrap_or_default();
            completed.insert((subject.clone(), s.scheduled_occurrence.clone().unwrap_or_default()));
            // None authored after a withdrawal: the validator would reject it (SUBJECT_WITHDRAWN).
            if let (Some(withdrawn), Some(authored)) =
                (withdrawn_at.get(&subject), s.authored_at.to_datetime())
            {
                assert!(authored < *withdrawn, "{subject}'s PHQ-9 of {authored} follows the withdrawal");
            }
            let zone = chrono_tz::America::New_York;
            let authored = s.authored_at.to_datetime().map(|t| t.with_timezone(&zone).date_naive());
            let due = started[&subject]
                + chrono::Duration::days(schedule[s.scheduled_occurrence.as_deref().unwrap_or_default()] - 1);
            let offset = (authored.unwrap_or(due) - due).num_days();
            let window = match offset {
                -2..=2 => "IN_WINDOW",
                -5..=-3 => "EARLY",
                3..=5 => "LATE",
                _ => "OUT_OF_WINDOW",
            };
            *e.by_window.entry(window.to_string()).or_default() += 1;
            let values: Vec<i32> = s.items.iter().take(9).map(|a| a.value_integer.unwrap_or(0)).collect();
            let id = s.submission_id.to_string();
            if values[8] > 0 {
                rules.entry("PHQ9-ITEM9").or_default().add(&subject, id.clone());
            }
            if values.iter().sum::<i32>() >= 20 {
                rules.entry("PHQ9-SEVERE").or_default().add(&subject, id);
            }
        }
        // ePRO compliance, by the study's clock: the last day any of its inputs happened.
        let as_of = plan
            .steps
            .iter()
            .filter_map(|step| match &step.action {
                Action::Vital(v) => v.envelope.occurred_at.to_datetime(),
                Action::AdverseEvent(a) => a.envelope.occurred_at.to_datetime(),
                Action::Submit { submission, .. } => submission.envelope.occurred_at.to_datetime(),
                _ => None,
            })
            .map(|t| t.date_naive())
            .max()
            .unwrap_or_default();
        for (subject, enrolled) in &started {
            let counts = e.epro_compliance.entry(subject[3..6].to_string()).or_default();
            for (occurrence, study_day) in &schedule {
                let due = *enrolled + chrono::Duration::days(study_day - 1);
                // Accepted until the window's end (2 days) and the grace days (3) have passed.
                let passed = due + chrono::Duration::days(2 + 3) < as_of;
                let before_withdrawal = withdrawn_at.get(subject).is_none_or(|w| due < w.date_naive());
                if passed && before_withdrawal {
                    counts.0 += 1;
                    counts.1 += u64::from(!completed.contains(&(subject.clone(), occurrence.to_string())));
                }
            }
        }
        e.alerts = rules
            .into_iter()
            .map(|(rule, t)| (rule.to_string(), (t.subjects.len() as u64, t.readings.len() as u64)))
            .collect();
        let mut withdrawals: HashMap<String, (NaiveDate, String)> = HashMap::new();
        for r in &source.ds {
            let subject = text(r, "USUBJID");
            // The disposition event the withdrawal above came from (DS has other rows too).
            if withdrawn_at.contains_key(subject)
                && text(r, "DSCAT") == "DISPOSITION EVENT"
                && text(r, "DSDECOD") != "COMPLETED"
            {
                withdrawals
                    .insert(subject.to_string(), (date(text(r, "DSSTDTC")), text(r, "DSDECOD").to_string()));
            }
        }
        (e.queries, e.inputs) = edit_checks(plan, &withdrawals);
        e
    }

    fn check(&self, s: &DemoSummary) -> anyhow::Result<()> {
        let sum = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
        let subjects = &s.study.subjects;
        assert_eq!(subjects.screened, sum(&self.screened));
        assert_eq!(subjects.screen_failed, sum(&self.screen_failed));
        assert_eq!(subjects.randomized, sum(&self.randomized));
        assert_eq!(subjects.enrolled, sum(&self.randomized), "every randomized subject enrolled");
        assert_eq!(subjects.on_hold, 0);
        assert_eq!(subjects.withdrawn, sum(&self.withdrawn), "early terminations in DS");
        assert!(subjects.withdrawn > 0, "the slice has early terminations");
        let by_reason: BTreeMap<String, u64> =
            subjects.withdrawn_by_reason.iter().map(|r| (r.reason_code.clone(), r.subjects)).collect();
        assert_eq!(by_reason, self.withdrawn_by_reason);
        for site in &subjects.by_site {
            let of = |m: &BTreeMap<String, u64>| m.get(&site.site_id).copied().unwrap_or(0);
            assert_eq!(
                (
                    site.screened,
                    site.screen_failed,
                    site.randomized,
                    site.enrolled,
                    site.on_hold,
                    site.withdrawn
                ),
                (
                    of(&self.screened),
                    of(&self.screen_failed),
                    of(&self.randomized),
                    of(&self.randomized),
                    0,
                    of(&self.withdrawn)
                ),
                "site {}",
                site.site_id
            );
        }
        assert_eq!(subjects.by_site.len(), self.screened.len());
        assert_eq!(subjects.by_arm.iter().map(|a| a.enrolled).sum::<u64>(), sum(&self.randomized));
        assert_eq!(s.study.kits.received, self.kits_received);
        assert_eq!(s.study.kits.allocated, sum(&self.randomized));

        let epro = &s.study.epro;
        assert_eq!(epro.accepted, self.accepted);
        assert_eq!(epro.accepted_late_sync, self.accepted_late_sync);
        assert_eq!(epro.rejected, self.rejected_conflicting);
        let reasons: BTreeMap<String, u64> =
            epro.rejected_by_reason.iter().map(|r| (r.code.clone(), r.submissions)).collect();
        let expected_reasons: BTreeMap<String, u64> = if self.rejected_conflicting > 0 {
            [("CONFLICTING_DUPLICATE".to_string(), self.rejected_conflicting)].into()
        } else {
            BTreeMap::new()
        };
        assert_eq!(reasons, expected_reasons);
        let windows: BTreeMap<String, u64> =
            epro.accepted_by_window.iter().map(|w| (w.status.clone(), w.submissions)).collect();
        assert_eq!(windows, self.by_window);

        let alerts: BTreeMap<String, (u64, u64)> = s
            .study
            .alerts
            .by_rule
            .iter()
            .filter(|r| r.episodes > 0)
            // Site KRI flags and study QTLs move while the replay runs (their final state is
            // checked below): their episodes depend on the order data arrived in.
            .filter(|r| !r.rule_id.starts_with("KRI-") && !r.rule_id.starts_with("QTL-"))
            .map(|r| (r.rule_id.clone(), (r.episodes, r.triggering_readings)))
            .collect();
        assert_eq!(alerts, self.alerts, "alerts by rule: (episodes, triggering readings)");
        assert!(s.study.dead_letters.iter().all(|d| d.messages == 0), "{:?}", s.study.dead_letters);
        self.check_kris(s);
        self.check_queries_and_qtls(s);
        Ok(())
    }

    /// ePRO compliance per site as counted in [`Expected::compute`]; the queries by check against
    /// the checks written out in [`edit_checks`]; the data-entry lag
    /// and query-rate KRIs from the same counts; the QTLs against p₀ + 3·√(p₀(1−p₀)/N), p₀ = 0.3.
    fn check_queries_and_qtls(&self, s: &DemoSummary) {
        let r = &s.study.risk;
        let mut by_check: BTreeMap<String, u64> = BTreeMap::new();
        let mut by_site: BTreeMap<String, u64> = BTreeMap::new();
        for ((check, site), n) in &self.queries {
            *by_check.entry(check.clone()).or_default() += n;
            *by_site.entry(site.clone()).or_default() += n;
        }
        let kept: BTreeMap<String, u64> =
            r.queries_by_check.iter().map(|q| (q.check_id.clone(), q.opened as u64)).collect();
        assert_eq!(kept, by_check, "queries by edit check");
        assert!(r.queries_by_check.iter().all(|q| q.open == q.opened), "nobody answered: {r:?}");
        assert!(!by_check.is_empty(), "the slice has data the checks query");
        let kri = |id: &str, site: &str| r.kris.iter().find(|k| k.kri == id && k.site_id == site);
        for (site, (due, missed)) in &self.epro_compliance {
            let kept = kri("EPRO_COMPLIANCE", site).map(|k| (k.numerator, k.denominator));
            assert_eq!(kept, Some((*missed as f64, *due as f64)), "EPRO_COMPLIANCE of {site}");
        }
        assert!(self.epro_compliance.values().any(|(_, missed)| *missed > 0), "the slice misses some");
        for (site, (dated, late, points)) in &self.inputs {
            let lag = kri("DATA_ENTRY_LAG", site);
            assert_eq!(
                lag.map(|k| (k.numerator, k.denominator)),
                Some((*late as f64, *dated as f64)),
                "{site}"
            );
            let rate = kri("QUERY_RATE", site);
            let queries = by_site.get(site).copied().unwrap_or(0) as f64;
            assert_eq!(rate.map(|k| (k.numerator, k.denominator)), Some((queries, *points as f64)), "{site}");
        }
        let sum = |m: &BTreeMap<String, u64>| m.values().sum::<u64>() as f64;
        let qtls: BTreeMap<&str, (f64, f64, f64, bool)> = r
            .qtls
            .iter()
            .map(|q| (q.qtl.as_str(), (q.numerator, q.denominator, q.limit, q.breached)))
            .collect();
        for (id, x, n) in [
            ("QTL_DISCONTINUATION", sum(&self.withdrawn), sum(&self.randomized)),
            ("QTL_SCREEN_FAILURE", sum(&self.screen_failed), sum(&self.screened)),
        ] {
            let limit = 0.3 + 3.0 * (0.3f64 * 0.7 / n).sqrt();
            let Some((kx, kn, klimit, breached)) = qtls.get(id) else { panic!("no {id}: {r:?}") };
            assert_eq!((*kx, *kn), (x, n), "{id}");
            assert!((klimit - limit).abs() < 1e-9, "{id}: limit {klimit} against {limit}");
            assert_eq!(*breached, n >= 10.0 && x / n > limit, "{id}");
        }
        let breach_alerts =
            s.study.alerts.by_rule.iter().find(|a| a.rule_id == "QTL-BREACH").map_or(0, |a| a.episodes);
        if qtls.values().any(|q| q.3) {
            assert!(breach_alerts >= 1, "a QTL is breached without a QTL-BREACH alert");
        }
    }

    /// The proportion KRIs of the risk service against the same formulas written out here, from
    /// the DM and DS rows: screen failure (screen failed / screened) and discontinuation (early
    /// terminations / randomized), per site; scores to 1e-6.
    fn check_kris(&self, s: &DemoSummary) {
        let kept: BTreeMap<_, _> = s
            .study
            .risk
            .kris
            .iter()
            .map(|k| ((k.kri.clone(), k.site_id.clone()), (k.numerator, k.denominator, k.score, k.flag)))
            .collect();
        for (kri, numerators, denominators) in [
            ("SCREEN_FAILURE", &self.screen_failed, &self.screened),
            ("DISCONTINUATION", &self.withdrawn, &self.randomized),
        ] {
            let rows: Vec<(&String, f64, f64)> = denominators
                .iter()
                .map(|(site, n)| (site, numerators.get(site).copied().unwrap_or(0) as f64, *n as f64))
                .filter(|(_, _, n)| *n > 0.0)
                .collect();
            let p = rows.iter().map(|r| r.1).sum::<f64>() / rows.iter().map(|r| r.2).sum::<f64>();
            let z0: Vec<f64> =
                rows.iter().map(|(_, x, n)| (x / n - p) / (p * (1.0 - p) / n).sqrt()).collect();
            let phi = z0.iter().map(|z| z * z).sum::<f64>() / z0.len() as f64;
            for ((site, x, n), z0) in rows.iter().zip(&z0) {
                let key = (kri.to_string(), (*site).clone());
                let Some((kx, kn, score, flag)) = kept.get(&key) else {
                    panic!("no {kri} for site {site}: {:?}", s.study.risk);
                };
                assert_eq!((*kx, *kn), (*x, *n), "{key:?}");
                let want = (*n >= 3.0 && phi > 0.0 && p > 0.0 && p < 1.0).then(|| z0 / phi.sqrt());
                match (score, want) {
                    (Some(a), Some(b)) => assert!((a - b).abs() < 1e-6, "{key:?}: {a} against {b}"),
                    (a, b) => assert_eq!(*a, b, "{key:?}"),
                }
                let want_flag = want.map(|z| match z {
                    z if z < -3.0 => -2,
                    z if z < -2.0 => -1,
                    z if z < 2.0 => 0,
                    z if z < 3.0 => 1,
                    _ => 2,
                });
                assert_eq!(*flag, want_flag, "{key:?}");
            }
        }
    }
}

/// The built-in edit checks written out over the readings and adverse events the replay sends
/// (the plan's events): (check, site) → queries, and per site the inputs of the data-entry lag
/// (dated to the day, recorded more than 10 days late) and the data points.
#[allow(clippy::type_complexity, reason = "two plain tables")]
fn edit_checks(
    plan: &Plan,
    withdrawals: &HashMap<String, (NaiveDate, String)>,
) -> (BTreeMap<(String, String), u64>, BTreeMap<String, (u64, u64, u64)>) {
    use trialflow_schemas::{DateTimePrecision as P, PartialDateTime};
    let day_of = |d: &PartialDateTime| {
        matches!(d.precision, P::Day | P::Hour | P::Minute | P::Second)
            .then(|| d.earliest.and_then(|t| t.to_datetime()).map(|t| t.date_naive()))
            .flatten()
    };
    let mut queries: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut inputs: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut add =
        |check: &str, site: &str| *queries.entry((check.to_string(), site.to_string())).or_default() += 1;
    let mut input = |site: &str, day: Option<NaiveDate>, recorded: Option<chrono::DateTime<chrono::Utc>>| {
        let i = inputs.entry(site.to_string()).or_default();
        i.2 += 1;
        if let (Some(day), Some(recorded)) = (day, recorded) {
            i.0 += 1;
            i.1 += u64::from((recorded.date_naive() - day).num_days() > 10);
        }
    };
    let after = |subject: &str, day: Option<NaiveDate>| {
        let (on, reason) = withdrawals.get(subject)?;
        day.filter(|d| d > on).map(|_| if reason == "DEATH" { "AFTER_DEATH" } else { "AFTER_WITHDRAWAL" })
    };
    let ranges: HashMap<(&str, &str), (&str, f64, f64)> = [
        (("8480-6", "mm[Hg]"), ("SYSBP_RANGE", 60.0, 250.0)),
        (("8462-4", "mm[Hg]"), ("DIABP_RANGE", 30.0, 150.0)),
        (("8867-4", "/min"), ("PULSE_RANGE", 30.0, 200.0)),
        (("8310-5", "Cel"), ("TEMP_RANGE", 34.0, 42.0)),
        (("29463-7", "kg"), ("WEIGHT_RANGE", 30.0, 250.0)),
    ]
    .into();
    // Systolic readings by time point (subject, effective date-time as sent, position, visit).
    let mut systolic: HashMap<(String, String, Option<String>, Option<String>), Vec<f64>> = HashMap::new();
    let mut weights: BTreeMap<String, Vec<(chrono::DateTime<chrono::Utc>, uuid::Uuid, NaiveDate, f64)>> =
        BTreeMap::new();
    let vitals: Vec<&trialflow_schemas::VitalSignRecorded> = plan
        .steps
        .iter()
        .filter_map(|s| if let Action::Vital(v) = &s.action { Some(&**v) } else { None })
        .collect();
    for v in &vitals {
        let subject = v.envelope.subject_id.clone().unwrap_or_default();
        let site = v.envelope.site_id.clone().unwrap_or_default();
        let day = day_of(&v.effective);
        input(&site, day, v.envelope.recorded_at.to_datetime());
        if let Some((id, min, max)) = ranges.get(&(v.loinc_code.as_str(), v.unit.as_str()))
            && (v.value < *min || v.value > *max)
        {
            add(id, &site);
        }
        if let Some(check) = after(&subject, day) {
            add(check, &site);
        }
        let at = v.effective.earliest.and_then(|t| t.to_datetime());
        if let (Some(at), Some(recorded)) = (at, v.envelope.recorded_at.to_datetime())
            && at > recorded + chrono::Duration::hours(24)
        {
            add("FUTURE_DATE", &site);
        }
        if at.is_none() {
            add("DATE_REQUIRED", &site);
        }
        let key = (subject.clone(), v.effective.raw.clone(), v.position.clone(), v.visit.clone());
        if v.loinc_code == "8480-6" && at.is_some() {
            systolic.entry(key).or_default().push(v.value);
        }
        if let (Some(at), Some(day), true) =
            (at, day, (v.loinc_code.as_str(), v.unit.as_str()) == ("29463-7", "kg"))
        {
            weights.entry(subject).or_default().push((at, v.envelope.event_id, day, v.value));
        }
    }
    for v in &vitals {
        if v.loinc_code != "8462-4" {
            continue;
        }
        let subject = v.envelope.subject_id.clone().unwrap_or_default();
        let key = (subject, v.effective.raw.clone(), v.position.clone(), v.visit.clone());
        for sys in systolic.get(&key).into_iter().flatten() {
            if v.value >= *sys {
                add("DIABP_GE_SYSBP", v.envelope.site_id.as_deref().unwrap_or_default());
            }
        }
    }
    for (subject, mut series) in weights {
        let site = &subject[3..6];
        series.sort_by_key(|w| (w.0, w.1));
        let mut days: Vec<(NaiveDate, f64)> = Vec::new();
        for (_, _, day, value) in series {
            match days.last_mut() {
                Some(last) if last.0 == day => last.1 = value,
                _ => days.push((day, value)),
            }
        }
        for pair in days.windows(2) {
            if pair[0].1 > 0.0 && ((pair[1].1 - pair[0].1) / pair[0].1).abs() > 0.1 {
                add("WEIGHT_CHANGE", site);
            }
        }
    }
    for step in &plan.steps {
        let Action::AdverseEvent(a) = &step.action else { continue };
        let subject = a.envelope.subject_id.clone().unwrap_or_default();
        let site = a.envelope.site_id.clone().unwrap_or_default();
        let day = day_of(&a.onset);
        input(&site, day, a.envelope.recorded_at.to_datetime());
        let at = a.onset.earliest.and_then(|t| t.to_datetime());
        if at.is_none() {
            add("DATE_REQUIRED", &site);
        }
        if let (Some(at), Some(recorded)) = (at, a.envelope.recorded_at.to_datetime())
            && at > recorded + chrono::Duration::hours(24)
        {
            add("FUTURE_DATE", &site);
        }
        if let Some(check) = after(&subject, day) {
            add(check, &site);
        }
    }
    (queries, inputs)
}

fn date(raw: &str) -> NaiveDate {
    NaiveDate::parse_from_str(&raw[..10], "%Y-%m-%d").unwrap_or_default()
}

fn text_num(r: &Row, column: &str) -> i64 {
    r.whole(column).unwrap_or(-1)
}

/// The default vital-sign rules, written out: single readings against thresholds; severe
/// hypertension on the mean of a visit's readings once there are three (judged again with each
/// later one, in the order the EDC sent them); fever grade 4 as more than 24 h above 40.0 °C.
fn vitals(source: &Domains, rules: &mut BTreeMap<&str, Triggers>) {
    let mut visits: BTreeMap<(String, String, String), Vec<(String, f64)>> = BTreeMap::new();
    for r in &source.vs {
        let (Some(value), Some(unit)) = (r.number("VSSTRESN"), r.text("VSSTRESU")) else { continue };
        let subject = text(r, "USUBJID");
        let id = format!("{subject}/VS{}", text_num(r, "VSSEQ"));
        let test = text(r, "VSTESTCD");
        let mut fires = |rule: &'static str| rules.entry(rule).or_default().add(subject, id.clone());
        match (test, unit) {
            ("SYSBP", "mmHg") if value >= 160.0 => fires("CTCAE-HTN-G3"),
            ("DIABP", "mmHg") if value >= 100.0 => fires("CTCAE-HTN-G3"),
            ("PULSE", "beats/min") if value > 120.0 => fires("PROTOCOL-HR-HIGH"),
            ("PULSE", "beats/min") if value < 40.0 => fires("PROTOCOL-HR-LOW"),
            ("TEMP", "C") if (38.0..=39.0).contains(&value) => fires("CTCAE-FEVER-G1"),
            ("TEMP", "C") if value > 39.0 && value <= 40.0 => fires("CTCAE-FEVER-G2"),
            ("TEMP", "C") if value > 40.0 => fires("CTCAE-FEVER-G3"),
            _ => {}
        }
        if matches!(test, "SYSBP" | "DIABP")
            && unit == "mmHg"
            && let Some(visit) = r.text("VISIT")
        {
            visits
                .entry((subject.to_string(), test.to_string(), visit.to_string()))
                .or_default()
                .push((id, value));
        }
    }
    for ((subject, test, _), readings) in visits {
        let limit = if test == "SYSBP" { 180.0 } else { 110.0 };
        for n in 3..=readings.len() {
            let mean = readings[..n].iter().map(|(_, v)| v).sum::<f64>() / n as f64;
            if mean >= limit {
                for (id, _) in &readings[..n] {
                    rules.entry("PROTOCOL-HTN-SEVERE").or_default().add(&subject, id.clone());
                }
            }
        }
    }
    // Grade 4 fever needs readings above 40.0 °C more than 24 h apart: the slice must have none
    // above 40 at all for this test to expect no episode.
    assert!(
        !rules.contains_key("CTCAE-FEVER-G3"),
        "the slice has readings above 40.0 °C: grade 4 expectations would need the persistence rule"
    );
}
