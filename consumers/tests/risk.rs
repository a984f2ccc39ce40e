//! The risk service over the real stack: a study of six sites whose subjects are screened,
//! assessed, enrolled, withdrawn, seen at visits and report adverse events (some reported twice,
//! one turned serious by an update), every event published in a shuffled order across its three
//! topics and a fifth of them twice. The KRI table it keeps must equal the one this test computes
//! on its own from the same facts, with the {gsm} formulas written out here: counts exactly,
//! scores to 1e-9, flags by the ±2/±3 thresholds and the minimum denominators. Every flag change
//! is a `KriFlagChanged` and the monitoring service raises the site-level alerts of the default
//! rules. Hostile bytes on its topics are dead-lettered and the rest flows on.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Days, TimeZone, Utc};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::monitoring::{self, rules::RuleBook};
use trialflow_consumers::risk::{self, read::SiteKri};
use trialflow_consumers::{ConsumerConfig, ConsumerError};
use trialflow_outbox::kafka::TopicReader;
use trialflow_outbox::{Outbox, OutboxEvent, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::*;
use trialflow_testkit::{RunningRelay, database_url, init_logs, kafka, relay_config, unique};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);
const STUDY: &str = "RISKTEST";

/// One subject's facts, as the test draws them.
#[derive(Debug, Clone)]
struct Subject {
    id: String,
    site: String,
    eligible: bool,
    /// Days after the study start (enrollment, withdrawal, visits).
    enrolled: Option<u64>,
    withdrawn: Option<u64>,
    visits: Vec<u64>,
    /// (ae_id, day, serious at first report, serious in a later update)
    adverse_events: Vec<(String, u64, bool, bool)>,
}

fn day(d: u64) -> DateTime<Utc> {
    let start = Utc.with_ymd_and_hms(2026, 1, 5, 12, 0, 0).single().unwrap_or_default();
    start.checked_add_days(Days::new(d)).unwrap_or(start)
}

/// Six sites of different sizes and habits; site 706 loses many subjects, 703 reports many AEs,
/// 705 too few subjects to be scored on proportions.
fn draw() -> Vec<Subject> {
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    let sites = [
        ("701", 14, 0.03, 0.1),
        ("702", 12, 0.03, 0.1),
        ("703", 12, 0.12, 0.1),
        ("704", 16, 0.02, 0.05),
        ("705", 2, 0.03, 0.0),
        ("706", 12, 0.03, 0.6),
    ];
    let mut out = Vec::new();
    for (site, n, ae_per_day, withdraw) in sites {
        for i in 0..n {
            let eligible = rng.random_bool(0.8);
            let enrolled = eligible.then(|| rng.random_range(0..20));
            let withdrawn =
                enrolled.filter(|_| rng.random_bool(withdraw)).map(|e| e + rng.random_range(5..60));
            let end = withdrawn.unwrap_or(90);
            let visits = enrolled.map(|e| (e..=end + 10).step_by(14).collect()).unwrap_or_default();
            let mut adverse_events = Vec::new();
            if let Some(e) = enrolled {
                for d in e..=end {
                    if rng.random_bool(ae_per_day) {
                        let serious = rng.random_bool(0.15);
                        let upgraded = !serious && rng.random_bool(0.1);
                        adverse_events.push((format!("AE-{site}-{i}-{d}"), d, serious, upgraded));
                    }
                }
            }
            out.push(Subject {
                id: format!("{site}-{i:03}"),
                site: site.to_string(),
                eligible,
                enrolled,
                withdrawn,
                visits,
                adverse_events,
            });
        }
    }
    out
}

fn envelope(event_type: &str, s: &Subject, at: DateTime<Utc>) -> Envelope {
    let mut e = Envelope::new(event_type, STUDY, "test", Timestamp::from(at));
    e.subject_id = Some(s.id.clone());
    e.site_id = Some(s.site.clone());
    e
}

/// Sites whose enrolled subjects answer their first diary (PHQ-9/D1); nobody answers another.
fn completes_diaries(site: &str) -> bool {
    ["701", "702", "703"].contains(&site)
}

/// How many days after its clinical day an input is recorded: site 704 enters every other
/// reading late, every fifth day's adverse events are reported late (first reports only).
fn entry_lag(site: &str, reading: bool, day: u64) -> u64 {
    match (reading, site) {
        (true, "704") if day.is_multiple_of(28) => 15,
        (true, _) => 1,
        (false, _) if day.is_multiple_of(5) => 12,
        (false, _) => 2,
    }
}

fn recorded(mut e: Envelope, site: &str, reading: bool, day_: u64) -> Envelope {
    e.recorded_at = Timestamp::from(day(day_ + entry_lag(site, reading, day_)));
    e
}

/// Every event of the subjects, each once.
fn events(subjects: &[Subject], names: &TopicNames) -> anyhow::Result<Vec<OutboxEvent>> {
    let mut out = Vec::new();
    for s in subjects {
        let key = s.id.clone();
        let screened = SubjectScreened {
            envelope: envelope("SubjectScreened", s, day(0)),
            screening_number: s.id.clone(),
            time_zone: "UTC".into(),
            age_years: Some(60),
            sex: None,
        };
        out.push(OutboxEvent::avro(&screened, names.of::<SubjectScreened>(), key.clone())?);
        let assessed = EligibilityAssessed {
            envelope: envelope("EligibilityAssessed", s, day(0)),
            eligible: s.eligible,
            criteria: vec![CriterionResult { criterion_id: "IC1".into(), met: s.eligible, detail: None }],
        };
        out.push(OutboxEvent::avro(&assessed, names.of::<EligibilityAssessed>(), key.clone())?);
        if let Some(e) = s.enrolled {
            let enrolled = SubjectEnrolled {
                envelope: envelope("SubjectEnrolled", s, day(e)),
                randomization_number: format!("R{}", s.id),
                kit_number: format!("K{}", s.id),
            };
            out.push(OutboxEvent::avro(&enrolled, names.of::<SubjectEnrolled>(), key.clone())?);
        }
        if let Some(w) = s.withdrawn {
            let withdrawn = SubjectWithdrawn {
                envelope: envelope("SubjectWithdrawn", s, day(w)),
                reason_code: "WITHDRAWAL BY SUBJECT".into(),
                reason: None,
            };
            out.push(OutboxEvent::avro(&withdrawn, names.of::<SubjectWithdrawn>(), key.clone())?);
        }
        for v in &s.visits {
            let vital = VitalSignRecorded {
                envelope: recorded(envelope("VitalSignRecorded", s, day(*v)), &s.site, true, *v),
                observation_id: Uuid::new_v4().to_string(),
                loinc_code: "8867-4".into(),
                value: 70.0,
                unit: "/min".into(),
                position: None,
                effective: PartialDateTime::parse(&day(*v).format("%Y-%m-%dT%H:%M:%S").to_string()),
                visit: Some(format!("DAY {v}")),
                visit_day: None,
            };
            out.push(OutboxEvent::avro(&vital, names.of::<VitalSignRecorded>(), key.clone())?);
        }
        if s.enrolled.is_some() && completes_diaries(&s.site) {
            let accepted = QuestionnaireResponseAccepted {
                envelope: envelope("QuestionnaireResponseAccepted", s, day(s.enrolled.unwrap_or_default())),
                submission_id: Uuid::new_v4(),
                questionnaire: "PHQ-9".into(),
                questionnaire_version: "1".into(),
                scheduled_occurrence: Some("PHQ-9/D1".into()),
                authored_at: Timestamp::from(day(s.enrolled.unwrap_or_default())),
                total_score: Some(2),
                severity_band: Some("minimal".into()),
                flagged_items: Vec::new(),
                window_status: WindowStatus::InWindow,
                late_sync: false,
            };
            out.push(OutboxEvent::avro(&accepted, names.of::<QuestionnaireResponseAccepted>(), key.clone())?);
        }
        for (ae_id, d, serious, upgraded) in &s.adverse_events {
            let report = |serious: bool| AdverseEventReported {
                envelope: recorded(envelope("AdverseEventReported", s, day(*d)), &s.site, false, *d),
                ae_id: ae_id.clone(),
                term: "Headache".into(),
                meddra_code: None,
                severity: Some("MILD".into()),
                ctcae_grade: None,
                serious,
                seriousness_criteria: if serious { vec!["HOSPITALIZATION".into()] } else { Vec::new() },
                onset: PartialDateTime::parse(&day(*d).format("%Y-%m-%d").to_string()),
                sponsor_received_at: Timestamp::from(day(*d)),
            };
            out.push(OutboxEvent::avro(&report(*serious), names.of::<AdverseEventReported>(), key.clone())?);
            // A follow-up report of the same AE: one AE all the same, serious if either says so.
            out.push(OutboxEvent::avro(
                &report(*upgraded || *serious),
                names.of::<AdverseEventReported>(),
                key.clone(),
            )?);
        }
    }
    Ok(out)
}

/// What the risk service must show per site and KRI, computed here from the facts:
/// (numerator, denominator, score, flag).
type Expected = BTreeMap<(String, String), (f64, f64, Option<f64>, Option<i16>)>;

fn expected(subjects: &[Subject]) -> Expected {
    // Per site: assessed, failed, enrolled, withdrawn, exposure days, AEs, SAEs, inputs (readings
    // and AE reports, all dated to the day), inputs recorded more than 10 days late, queries (the
    // default AFTER_WITHDRAWAL check: visits after the withdrawal day), outstanding queries (none
    // is 30 days old), ePRO occurrences missed and due (below).
    let mut sites: BTreeMap<String, [f64; 13]> = BTreeMap::new();
    for s in subjects {
        let c = sites.entry(s.site.clone()).or_default();
        c[0] += 1.0;
        c[1] += f64::from(u8::from(!s.eligible));
        if let Some(e) = s.enrolled {
            c[2] += 1.0;
            c[3] += f64::from(u8::from(s.withdrawn.is_some()));
            let last_seen = s
                .visits
                .iter()
                .chain(s.adverse_events.iter().map(|a| &a.1))
                .copied()
                .max()
                .unwrap_or(e)
                .max(e);
            let end = s.withdrawn.unwrap_or(last_seen).max(e);
            c[4] += (end - e + 1) as f64;
            c[5] += s.adverse_events.len() as f64;
            c[6] += s.adverse_events.iter().filter(|a| a.2 || a.3).count() as f64;
        }
        // Each AE has two reports; each report is an input.
        let days = s
            .visits
            .iter()
            .map(|v| (true, *v))
            .chain(s.adverse_events.iter().flat_map(|a| [(false, a.1); 2]));
        for (reading, d) in days {
            c[7] += 1.0;
            c[8] += f64::from(u8::from(entry_lag(&s.site, reading, d) > 10));
        }
        if let Some(w) = s.withdrawn {
            c[9] += s.visits.iter().filter(|v| **v > w).count() as f64;
        }
    }
    // (KRI, numerator index, denominator index, binary?, minimum denominator)
    let kris = [
        ("AE_RATE", 5, 4, false, 30.0),
        ("SAE_RATE", 6, 4, false, 30.0),
        ("DISCONTINUATION", 3, 2, true, 3.0),
        ("SCREEN_FAILURE", 1, 0, true, 3.0),
        ("DATA_ENTRY_LAG", 8, 7, true, 30.0),
        ("QUERY_RATE", 9, 7, false, 30.0),
        ("QUERY_AGE", 10, 9, true, 3.0),
    ];
    // ePRO compliance: the default schedule's occurrences whose last accepted day (due + after +
    // grace) is before the study's last day seen, and that fell due before a withdrawal.
    let schedule = trialflow_consumers::epro::catalogue::Catalogue::load(None)
        .map(|c| c.schedule(STUDY).occurrences.clone())
        .unwrap_or_default();
    assert!(!schedule.is_empty());
    let as_of = subjects
        .iter()
        .flat_map(|s| {
            s.visits
                .iter()
                .chain(s.adverse_events.iter().map(|a| &a.1))
                .chain(s.withdrawn.iter())
                .chain(s.enrolled.iter())
        })
        .copied()
        .max()
        .unwrap_or_default();
    let mut epro: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for s in subjects {
        let Some(e) = s.enrolled else { continue };
        for o in &schedule {
            let due = e + u64::from(o.study_day) - 1;
            let last = due + u64::from(o.window_after_days + o.grace_days);
            if last < as_of && s.withdrawn.is_none_or(|w| due < w) {
                let c = epro.entry(s.site.clone()).or_default();
                c.1 += 1.0;
                c.0 += f64::from(u8::from(!(o.id == "PHQ-9/D1" && completes_diaries(&s.site))));
            }
        }
    }
    for (site, (missed, due)) in epro {
        let c = sites.entry(site).or_default();
        (c[11], c[12]) = (missed, due);
    }
    let kris = [kris.as_slice(), &[("EPRO_COMPLIANCE", 11, 12, true, 10.0)]].concat();
    let mut out = Expected::new();
    for (kri, x, n, binary, min) in kris {
        let rows: Vec<(&String, f64, f64)> =
            sites.iter().map(|(site, c)| (site, c[x], c[n])).filter(|r| r.2 > 0.0).collect();
        let mu = rows.iter().map(|r| r.1).sum::<f64>() / rows.iter().map(|r| r.2).sum::<f64>();
        let sd = |n: f64| if binary { (mu * (1.0 - mu) / n).sqrt() } else { (mu / n).sqrt() };
        let z0: Vec<f64> = rows.iter().map(|r| (r.1 / r.2 - mu) / sd(r.2)).collect();
        let phi = z0.iter().map(|z| z.powi(2)).sum::<f64>() / z0.len() as f64;
        for (r, z0) in rows.iter().zip(&z0) {
            let score =
                (r.2 >= min && phi > 0.0 && mu > 0.0 && (!binary || mu < 1.0)).then(|| z0 / phi.sqrt());
            let flag = score.map(|z| match z {
                z if z < -3.0 => -2,
                z if z < -2.0 => -1,
                z if z < 2.0 => 0,
                z if z < 3.0 => 1,
                _ => 2,
            });
            out.insert((r.0.clone(), kri.to_string()), (r.1, r.2, score, flag));
        }
    }
    out
}

fn matches(kept: &[SiteKri], expected: &Expected) -> bool {
    kept.len() == expected.len()
        && kept.iter().all(|k| {
            expected.get(&(k.site_id.clone(), k.kri.clone())).is_some_and(|(x, n, score, flag)| {
                k.numerator == *x
                    && k.denominator == *n
                    && k.flag == *flag
                    && match (k.score, score) {
                        (Some(a), Some(b)) => (a - b).abs() < 1e-9,
                        (None, None) => true,
                        _ => false,
                    }
            })
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kri_table_equals_an_independent_computation_whatever_the_order_and_duplicates()
-> anyhow::Result<()> {
    init_logs();
    let names = TopicNames::new(format!("{}.", unique("risk").replace('_', "-")));
    trialflow_outbox::kafka::ensure_catalogue_topics(&kafka(), &names, 3, topics::DLQ_SUFFIX).await?;
    let url = database_url();
    let (source, schema) = (SchemaName::new(unique("src"))?, SchemaName::new(unique("risk"))?);
    trialflow_outbox::migrate(&url, &source).await?;
    risk::migrate(&url, &schema).await?;
    let monitoring_schema = SchemaName::new(unique("mon"))?;
    monitoring::migrate(&url, &monitoring_schema).await?;
    let pool = sqlx::PgPool::connect(&url).await?;
    let outbox = Outbox::open(&pool, source.clone()).await?;
    let relay =
        RunningRelay::start(relay_config(&kafka(), vec![source, schema.clone(), monitoring_schema.clone()]));
    let mut config = ConsumerConfig::local();
    config.database.database_url = url;
    config.kafka = kafka();
    config.group_id = Some(format!("risk-{schema}"));
    config.max_backoff_ms = 500;
    let stop = CancellationToken::new();
    let mut monitoring_config = config.clone();
    monitoring_config.group_id = Some(format!("mon-{monitoring_schema}"));
    let alerts: JoinHandle<Result<(), ConsumerError>> = tokio::spawn(monitoring::run(
        monitoring::spec(monitoring_schema.clone(), &names),
        monitoring_config,
        RuleBook::load(None).map_err(anyhow::Error::msg)?,
        names.clone(),
        stop.clone(),
    ));
    let consumer: JoinHandle<Result<(), ConsumerError>> = tokio::spawn(risk::run(
        risk::spec(schema.clone(), &names),
        config,
        names.clone(),
        qtl_config()?,
        stop.clone(),
    ));

    let subjects = draw();
    let mut all = events(&subjects, &names)?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let again: Vec<OutboxEvent> = all.iter().filter(|_| rng.random_bool(0.2)).cloned().collect();
    all.extend(again);
    all.shuffle(&mut rng);
    // Hostile bytes on each topic it reads: dead letters, and everything behind them applies.
    for topic in [
        topics::SUBJECT_LIFECYCLE,
        topics::ADVERSE_EVENTS,
        topics::CLINICAL_OBSERVATIONS,
        topics::EPRO_RESPONSES,
        topics::QUERIES,
    ] {
        let garbage = OutboxEvent {
            topic: names.name(topic),
            key: "701-000".into(),
            event_type: "Garbage".into(),
            event_id: Uuid::new_v4(),
            content_type: "application/octet-stream".into(),
            payload: b"\x00\xffnot avro\x07".to_vec(),
            headers: Default::default(),
        };
        all.insert(all.len() / 2, garbage);
    }
    let mut tx = pool.begin().await?;
    outbox.enqueue_all(&mut tx, &all).await?;
    tx.commit().await?;

    let want = expected(&subjects);
    assert!(want.values().any(|v| v.3.is_some_and(|f| f != 0)), "the draw flags some site: {want:?}");
    assert!(want.values().any(|v| v.2.is_none()), "the draw leaves some site unscored: {want:?}");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let kept = risk::read::site_kris(&pool, &schema, STUDY).await?;
        if matches(&kept, &want) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "kept {kept:#?}\nexpected {want:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let study = risk::read::study_kris(&pool, &schema, STUDY).await?;
    assert_eq!(study.len(), 8, "{study:?}");

    // Every flag change is a KriFlagChanged on its site's key, in order, each from the flag the one
    // before ended with: the last one of each site and KRI says the flag the table ends with, and
    // every site flagged now had one.
    let flags = TopicReader::new(&kafka(), &names.name(topics::KRI_FLAGS), true)?
        .read_until_idle(Duration::from_secs(2), WAIT)
        .await?;
    let mut last: BTreeMap<(String, String), Option<i16>> = BTreeMap::new();
    for m in &flags {
        let e = match decode_any(&m.payload) {
            Ok(AnyEvent::KriFlagChanged(e)) => e,
            // The study's QTLs share the topic (keyed by study): checked below.
            Ok(AnyEvent::QtlStatusChanged(e)) => {
                assert_eq!(m.key, STUDY);
                assert!(e.breached && e.qtl_id == "QTL_DISCONTINUATION", "{e:?}");
                continue;
            }
            other => panic!("neither a KriFlagChanged nor a QtlStatusChanged: {other:?}"),
        };
        assert_eq!(m.key, format!("{STUDY}/{}", e.envelope.site_id.clone().unwrap_or_default()));
        let flag = e.flag.and_then(|f| i16::try_from(f).ok());
        let previous = e.previous_flag.and_then(|f| i16::try_from(f).ok());
        let key = (e.envelope.site_id.unwrap_or_default(), e.kri_id);
        // A chain of changes: each starts from the flag the one before ended with, and changes it.
        let before = last.get(&key).copied().flatten();
        assert_eq!(
            previous.unwrap_or(0),
            before.unwrap_or(0),
            "{key:?}: {flags:?}",
            flags = (previous, flag)
        );
        assert_ne!(previous.unwrap_or(0), flag.unwrap_or(0), "{key:?} changed nothing");
        last.insert(key, flag);
    }
    for (key, (_, _, _, flag)) in &want {
        match last.get(key) {
            Some(seen) => assert_eq!(seen.unwrap_or(0), flag.unwrap_or(0), "{key:?}"),
            None => assert_eq!(flag.unwrap_or(0), 0, "{key:?} flagged without an event"),
        }
    }

    // The monitoring service turned them into site-level alerts: KRI-RED for every site with a
    // red flag at the end, KRI-AMBER (or red, which passed amber) for every amber one.
    for ((site, kri), (_, _, _, flag)) in &want {
        let rule = match flag.map(i16::unsigned_abs) {
            Some(2) => "KRI-RED",
            Some(1) => "KRI-AMBER",
            _ => continue,
        };
        let sql = format!(
            "SELECT count(*) FROM {monitoring_schema}.alert
             WHERE study_id = $1 AND site_id = $2 AND rule_id = $3 AND subject_id IS NULL"
        );
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                .bind(STUDY)
                .bind(site)
                .bind(rule)
                .fetch_one(&pool)
                .await?;
            if n > 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no {rule} alert for site {site} ({kri})");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Scoring the same counts again changes no flag (each site's flag before is read back).
    let mut conn = pool.acquire().await?;
    let again = risk::evaluate::evaluate(&mut conn, &schema, STUDY, &qtl_config()?).await?;
    assert!(again.is_empty(), "an evaluation of unchanged counts changed flags: {again:?}");
    drop(conn);

    let mut letters = 0;
    for topic in [topics::SUBJECT_LIFECYCLE, topics::ADVERSE_EVENTS, topics::CLINICAL_OBSERVATIONS] {
        let dlq = format!("{}{}", names.name(topic), topics::DLQ_SUFFIX);
        letters += TopicReader::new(&kafka(), &dlq, true)?.read_until(WAIT, |m| !m.is_empty()).await?.len();
    }
    assert_eq!(letters, 3, "one dead letter per garbage record");

    queries_are_opened_once_and_answered_then_closed(&pool, &schema, &outbox, &names, &subjects).await?;
    a_breached_qtl_is_a_study_level_alert(&pool, &schema, &monitoring_schema, &subjects).await?;

    stop.cancel();
    consumer.await??;
    alerts.await??;
    relay.stop().await?;
    Ok(())
}

/// The queries the edit checks opened: one per visit after a withdrawal (deterministic ids, so
/// the duplicated events opened nothing twice), each a `QueryOpened`; then the life of one: an
/// answer (delivered twice), a closing; a closing of a query never answered is kept as not
/// applied; an answer to an unknown query is a dead letter and the topic flows on.
async fn queries_are_opened_once_and_answered_then_closed(
    pool: &sqlx::PgPool,
    schema: &SchemaName,
    outbox: &Outbox,
    names: &TopicNames,
    subjects: &[Subject],
) -> anyhow::Result<()> {
    let want: usize = subjects
        .iter()
        .filter_map(|s| s.withdrawn.map(|w| s.visits.iter().filter(|v| **v > w).count()))
        .sum();
    assert!(want > 0, "the draw has visits after a withdrawal");
    let sql = format!("SELECT query_id, subject_id, check_id, status FROM {schema}.query ORDER BY query_id");
    let rows: Vec<(Uuid, String, String, String)> =
        sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).fetch_all(pool).await?;
    assert_eq!(rows.len(), want, "{rows:?}");
    assert!(rows.iter().all(|r| r.2 == "AFTER_WITHDRAWAL" && r.3 == "open"), "{rows:?}");
    let opened = TopicReader::new(&kafka(), &names.name(topics::QUERIES), true)?
        .read_until(WAIT, move |read| {
            read.iter().filter(|m| matches!(decode_any(&m.payload), Ok(AnyEvent::QueryOpened(_)))).count()
                >= want
        })
        .await?;
    let mut ids: Vec<Uuid> = opened
        .iter()
        .filter_map(|m| match decode_any(&m.payload) {
            Ok(AnyEvent::QueryOpened(e)) => Some(e.query_id),
            _ => None,
        })
        .collect();
    ids.sort();
    assert_eq!(ids, rows.iter().map(|r| r.0).collect::<Vec<_>>(), "one QueryOpened per query");

    let (answered, unanswered) = (rows[0].0, rows[rows.len() - 1].0);
    let subject = subjects.iter().find(|s| s.id == rows[0].1).context("the query's subject")?;
    let decision = |event_type: &str| {
        let mut e = envelope(event_type, subject, Utc::now());
        e.actor = Some("site-user-1".into());
        e
    };
    let answer = QueryAnswered {
        envelope: decision("QueryAnswered"),
        query_id: answered,
        answer: "Visit done after the withdrawal for safety follow-up.".into(),
    };
    let close = QueryClosed {
        envelope: decision("QueryClosed"),
        query_id: answered,
        reason: "Answer accepted.".into(),
    };
    let early_close = QueryClosed {
        envelope: decision("QueryClosed"),
        query_id: unanswered,
        reason: "Closed unanswered.".into(),
    };
    let unknown =
        QueryAnswered { envelope: decision("QueryAnswered"), query_id: Uuid::new_v4(), answer: "?".into() };
    let topic = names.name(topics::QUERIES);
    let rows_out = vec![
        OutboxEvent::avro(&unknown, topic.clone(), unknown.query_id.to_string())?,
        OutboxEvent::avro(&answer, topic.clone(), answered.to_string())?,
        OutboxEvent::avro(&answer, topic.clone(), answered.to_string())?,
        OutboxEvent::avro(&close, topic.clone(), answered.to_string())?,
        OutboxEvent::avro(&early_close, topic.clone(), unanswered.to_string())?,
    ];
    let mut tx = pool.begin().await?;
    outbox.enqueue_all(&mut tx, &rows_out).await?;
    tx.commit().await?;

    let status = format!("SELECT status, answer, closed_by FROM {schema}.query WHERE query_id = $1");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (s, answer, by): (String, Option<String>, Option<String>) =
            sqlx::query_as(sqlx::AssertSqlSafe(status.clone())).bind(answered).fetch_one(pool).await?;
        let history =
            format!("SELECT count(*) FROM {schema}.query_history WHERE query_id = $1 AND NOT applied");
        let refused: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(history)).bind(unanswered).fetch_one(pool).await?;
        if s == "closed" && refused == 1 {
            assert_eq!(answer.as_deref(), Some("Visit done after the withdrawal for safety follow-up."));
            assert_eq!(by.as_deref(), Some("site-user-1"));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "query {answered}: {s}; refused closings {refused}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (s, _, _): (String, Option<String>, Option<String>) =
        sqlx::query_as(sqlx::AssertSqlSafe(status)).bind(unanswered).fetch_one(pool).await?;
    assert_eq!(s, "open", "a closing without an answer changes nothing");
    let audit =
        format!("SELECT count(*) FROM {schema}.audit_trail WHERE entity_id = $1 AND action LIKE 'query.%'");
    let records: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(audit)).bind(answered.to_string()).fetch_one(pool).await?;
    assert_eq!(records, 3, "opened, answered, closed: one audit record each");
    let dlq = format!("{topic}{}", topics::DLQ_SUFFIX);
    let letters = TopicReader::new(&kafka(), &dlq, true)?.read_until(WAIT, |m| m.len() >= 2).await?;
    let reasons: Vec<&str> = letters.iter().filter_map(|m| m.header("dlq.reason")).collect();
    assert!(reasons.iter().any(|r| r.contains("unknown query")), "{reasons:?}");
    Ok(())
}

/// The built-in configuration with this study's QTLs: discontinuation expected at 2 % (the draw
/// loses far more: breached), screen failure at 50 % (far fewer: not breached).
fn qtl_config() -> anyhow::Result<risk::RiskConfig> {
    let dir = std::env::temp_dir().join(unique("risk-config"));
    std::fs::create_dir_all(&dir)?;
    let file = serde_json::json!({
        "study_id": STUDY,
        "qtls": [
            {"id": "QTL_DISCONTINUATION", "name": "Study discontinuation", "kri": "DISCONTINUATION", "expected": 0.02},
            {"id": "QTL_SCREEN_FAILURE", "name": "Screen failure", "kri": "SCREEN_FAILURE", "expected": 0.5, "k": 2.5},
        ],
    });
    std::fs::write(dir.join("study.json"), file.to_string())?;
    let config = risk::RiskConfig::load(Some(&dir)).map_err(anyhow::Error::msg);
    std::fs::remove_dir_all(&dir)?;
    config
}

/// The QTLs equal p₀ + k·√(p₀(1−p₀)/N) on the study's totals, computed here; the breached one is
/// a study-level QTL-BREACH alert (no site, no subject).
async fn a_breached_qtl_is_a_study_level_alert(
    pool: &sqlx::PgPool,
    schema: &SchemaName,
    monitoring_schema: &SchemaName,
    subjects: &[Subject],
) -> anyhow::Result<()> {
    let enrolled = subjects.iter().filter(|s| s.enrolled.is_some()).count() as f64;
    let withdrawn = subjects.iter().filter(|s| s.enrolled.is_some() && s.withdrawn.is_some()).count() as f64;
    let assessed = subjects.len() as f64;
    let failed = subjects.iter().filter(|s| !s.eligible).count() as f64;
    let want = [
        ("QTL_DISCONTINUATION", withdrawn, enrolled, 0.02 + 3.0 * (0.02f64 * 0.98 / enrolled).sqrt()),
        ("QTL_SCREEN_FAILURE", failed, assessed, 0.5 + 2.5 * (0.25 / assessed).sqrt()),
    ];
    let qtls = risk::evaluate::qtls(pool, schema, STUDY).await?;
    assert_eq!(qtls.len(), 2, "{qtls:?}");
    for (q, (id, x, n, limit)) in qtls.iter().zip(want) {
        assert_eq!((q.qtl.as_str(), q.numerator, q.denominator), (id, x, n), "{q:?}");
        assert!((q.limit - limit).abs() < 1e-12, "{q:?} limit {limit}");
        assert_eq!(q.breached, x / n > limit, "{q:?}");
    }
    assert!(qtls[0].breached && !qtls[1].breached, "the draw breaches discontinuation only: {qtls:?}");
    let sql = format!(
        "SELECT count(*) FROM {monitoring_schema}.alert
         WHERE study_id = $1 AND rule_id = 'QTL-BREACH' AND site_id IS NULL AND subject_id IS NULL"
    );
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone())).bind(STUDY).fetch_one(pool).await?;
        if n == 1 {
            return Ok(());
        }
        assert!(n == 0 && std::time::Instant::now() < deadline, "{n} QTL-BREACH alerts");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
