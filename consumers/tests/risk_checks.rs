//! The edit checks judge what is new: each pass of the evaluator reads a subject's new readings
//! and reports, and only what the checks compare them with (the other readings of a time point,
//! the days around a new weight), or all of its data when a consent or a withdrawal changed the
//! dates they are compared with. Here four subjects' data arrive in small batches in a shuffled
//! order (a fifth of them twice), with passes in between; the queries opened must be exactly
//! those that running the built-in checks on all the data known at each pass would find (the
//! evaluator's earlier, whole-history form, computed here with [`checks::run`]). A pass after one
//! more reading of a subject with a long history reads a handful of rows, not the history.
//!
//! The risk handler is driven as the runtime drives it, without the broker (`common::drive`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Days, Duration, TimeZone, Utc};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sqlx::{AssertSqlSafe, PgPool};
use trialflow_consumers::Message;
use trialflow_consumers::risk::checks::{self, AeReport, Reading, SubjectData};
use trialflow_consumers::risk::evaluate::{Evaluation, evaluate_marked};
use trialflow_consumers::risk::{self, Risk, RiskConfig, queries::source_date};
use trialflow_outbox::{Outbox, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::*;
use trialflow_testkit::{database_url, init_logs, unique};
use uuid::Uuid;

use common::drive::{apply, message};

const STUDY: &str = "CHECKS-IT";
const SYSBP: &str = "8480-6";
const DIABP: &str = "8462-4";
const WEIGHT: &str = "29463-7";
const TEMP: &str = "8310-5";

fn day(d: u64) -> DateTime<Utc> {
    let start = Utc.with_ymd_and_hms(2026, 1, 5, 0, 0, 0).single().unwrap_or_default();
    start.checked_add_days(Days::new(d)).unwrap_or(start)
}

fn envelope(event_type: &str, subject: &str, occurred: DateTime<Utc>, recorded: DateTime<Utc>) -> Envelope {
    let mut e = Envelope::new(event_type, STUDY, "edc", Timestamp::from(occurred));
    e.site_id = Some("701".into());
    e.subject_id = Some(subject.into());
    e.recorded_at = Timestamp::from(recorded);
    e
}

/// One input as the test sends it, and as the checks see it once stored.
enum Input {
    Reading(VitalSignRecorded),
    Report(AdverseEventReported),
    Consent(ConsentSigned),
    Withdrawal(SubjectWithdrawn),
}

impl Input {
    fn subject(&self) -> String {
        let e = match self {
            Self::Reading(e) => &e.envelope,
            Self::Report(e) => &e.envelope,
            Self::Consent(e) => &e.envelope,
            Self::Withdrawal(e) => &e.envelope,
        };
        e.subject_id.clone().unwrap_or_default()
    }

    fn message(&self, names: &TopicNames, offset: i64) -> Message {
        match self {
            Self::Reading(e) => message(&names.name(topics::CLINICAL_OBSERVATIONS), offset, e, None),
            Self::Report(e) => message(&names.name(topics::ADVERSE_EVENTS), offset, e, None),
            Self::Consent(e) => message(&names.name(topics::SUBJECT_LIFECYCLE), offset, e, None),
            Self::Withdrawal(e) => message(&names.name(topics::SUBJECT_LIFECYCLE), offset, e, None),
        }
    }

    /// Adds what the input tells the checks to `data` (each subject has one consent and at most
    /// one withdrawal).
    fn known(&self, data: &mut SubjectData) {
        match self {
            Self::Reading(e) => data.readings.push(Reading {
                event_id: e.envelope.event_id,
                code: e.loinc_code.clone(),
                name: e.loinc_code.clone(),
                value: e.value,
                unit: e.unit.clone(),
                position: e.position.clone(),
                visit: e.visit.clone(),
                effective: source_date(&e.effective),
                recorded_at: e.envelope.recorded_at.to_datetime().unwrap_or_default(),
            }),
            Self::Report(e) => data.adverse_events.push(AeReport {
                event_id: e.envelope.event_id,
                ae_id: e.ae_id.clone(),
                term: e.term.clone(),
                onset: source_date(&e.onset),
                recorded_at: e.envelope.recorded_at.to_datetime().unwrap_or_default(),
            }),
            Self::Consent(e) => {
                data.consented_on = source_date(&e.signed_at).earliest.map(|t| t.date_naive())
            }
            Self::Withdrawal(e) => {
                data.withdrawn_on = e.envelope.occurred_at.to_datetime().map(|t| t.date_naive());
                data.withdrawal_reason = Some(e.reason_code.clone());
            }
        }
    }
}

fn reading(
    subject: &str,
    code: &str,
    value: f64,
    unit: &str,
    effective: &str,
    recorded: DateTime<Utc>,
) -> Input {
    let parsed = PartialDateTime::parse(effective);
    let occurred = parsed.earliest.and_then(|t| t.to_datetime()).unwrap_or(recorded);
    Input::Reading(VitalSignRecorded {
        envelope: envelope("VitalSignRecorded", subject, occurred.min(recorded), recorded),
        observation_id: Uuid::new_v4().to_string(),
        loinc_code: code.into(),
        value,
        unit: unit.into(),
        position: Some("SITTING".into()),
        effective: parsed,
        visit: Some("WEEK 2".into()),
        visit_day: None,
    })
}

/// A subject's data over 45 days: blood pressures at 30 time points (some diastolics not below
/// their systolic, some out of range), weights on 20 days (some twice a day, some jumps of more
/// than 10 %), temperatures (some dated by the month alone, some undated, some in the future),
/// adverse events (some before the consent); consent on day 3; subjects 1 and 2 withdrawn on day
/// 40 (2 by death).
fn draw(rng: &mut ChaCha8Rng, subject: &str, n: u64) -> Vec<Input> {
    let mut out = Vec::new();
    let signed = PartialDateTime::parse(&day(3).format("%Y-%m-%d").to_string());
    out.push(Input::Consent(ConsentSigned {
        envelope: envelope("ConsentSigned", subject, day(3), day(3)),
        consent_version: "1.0".into(),
        signed_at: signed,
    }));
    if n < 3 {
        let reason = if n == 2 { "DEATH" } else { "ADVERSE EVENT" };
        out.push(Input::Withdrawal(SubjectWithdrawn {
            envelope: envelope("SubjectWithdrawn", subject, day(40), day(40)),
            reason_code: reason.into(),
            reason: None,
        }));
    }
    for _ in 0..30 {
        let at = day(rng.random_range(0..45)) + Duration::minutes(rng.random_range(0..24 * 60));
        let recorded = at + Duration::hours(rng.random_range(1..72));
        let effective = at.format("%Y-%m-%dT%H:%M").to_string();
        let sys: f64 = if rng.random_bool(0.05) { 270.0 } else { rng.random_range(90..160) as f64 };
        let dia: f64 = if rng.random_bool(0.1) { sys + 5.0 } else { rng.random_range(50..90) as f64 };
        out.push(reading(subject, SYSBP, sys, "mm[Hg]", &effective, recorded));
        out.push(reading(subject, DIABP, dia, "mm[Hg]", &effective, recorded));
    }
    let mut weight: f64 = 80.0;
    for _ in 0..20 {
        let at = day(rng.random_range(0..45)) + Duration::hours(rng.random_range(6..20));
        weight *= if rng.random_bool(0.15) { 1.15 } else { rng.random_range(0.97..1.03) };
        let effective = at.format("%Y-%m-%dT%H:%M").to_string();
        out.push(reading(subject, WEIGHT, weight.round(), "kg", &effective, at + Duration::hours(2)));
    }
    for i in 0..10 {
        let at = day(rng.random_range(0..45)) + Duration::hours(8);
        let effective = match i % 5 {
            0 => at.format("%Y-%m").to_string(),
            1 => String::new(),
            _ => at.format("%Y-%m-%dT%H:%M").to_string(),
        };
        // Some recorded three days before their date: a date in the future.
        let recorded = if i % 4 == 3 { at - Duration::days(3) } else { at + Duration::hours(1) };
        out.push(reading(subject, TEMP, rng.random_range(36.0..38.0), "Cel", &effective, recorded));
    }
    for i in 0..5 {
        let onset = day(rng.random_range(0..45));
        out.push(Input::Report(AdverseEventReported {
            envelope: envelope("AdverseEventReported", subject, onset, onset + Duration::days(1)),
            ae_id: format!("{subject}-AE{i}"),
            term: "Headache".into(),
            meddra_code: None,
            severity: None,
            ctcae_grade: None,
            serious: false,
            seriousness_criteria: Vec::new(),
            onset: PartialDateTime::parse(&onset.format("%Y-%m-%d").to_string()),
            sponsor_received_at: Timestamp::from(onset + Duration::days(1)),
        }));
    }
    out
}

/// A finding as the query's identity: check and data.
type Found = (String, Vec<Uuid>);

struct Fixture {
    pool: PgPool,
    schema: SchemaName,
    names: TopicNames,
    outbox: Arc<Outbox>,
    handler: Risk,
    config: RiskConfig,
    offset: i64,
}

impl Fixture {
    async fn start() -> anyhow::Result<Self> {
        init_logs();
        let pool = PgPool::connect(&database_url()).await?;
        let schema = SchemaName::new(unique("risk_checks"))?;
        risk::migrate(&database_url(), &schema).await?;
        let outbox = Arc::new(Outbox::open(&pool, schema.clone()).await?);
        let names = TopicNames::new(format!("{}.", unique("risk-checks")));
        let handler = Risk::new(schema.clone());
        Ok(Self { pool, schema, names, outbox, handler, config: RiskConfig::default(), offset: 0 })
    }

    async fn send(&mut self, inputs: &[&Input]) -> anyhow::Result<()> {
        let batch: Vec<Message> = inputs
            .iter()
            .map(|i| {
                self.offset += 1;
                i.message(&self.names, self.offset)
            })
            .collect();
        apply(&self.handler, &self.pool, &self.outbox, &batch).await?.map_err(anyhow::Error::msg)?;
        Ok(())
    }

    async fn pass(&self) -> anyhow::Result<Evaluation> {
        Ok(evaluate_marked(&self.pool, &self.outbox, &self.names, &self.config).await?)
    }

    async fn opened(&self) -> anyhow::Result<BTreeSet<Found>> {
        let sql = format!("SELECT check_id, data_event_ids FROM {}.query", self.schema);
        let rows: Vec<(String, Vec<Uuid>)> = sqlx::query_as(AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().collect())
    }

    async fn drop(self) -> anyhow::Result<()> {
        let sql = format!("DROP SCHEMA {} CASCADE", self.schema);
        sqlx::query(AssertSqlSafe(sql)).execute(&self.pool).await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_data_is_judged_with_what_the_checks_compare_it_with_and_finds_what_a_whole_run_finds()
-> anyhow::Result<()> {
    let mut fx = Fixture::start().await?;
    let checks = fx.config.edit_checks(STUDY).to_vec();
    let mut rng = ChaCha8Rng::seed_from_u64(20);
    let mut inputs: Vec<Input> = Vec::new();
    for n in 1..=4 {
        inputs.extend(draw(&mut rng, &format!("701-{n:03}"), n));
    }
    // Shuffled (a reading may come before its subject's consent, a diastolic before its
    // systolic, a weight between two days already judged), a fifth of them twice.
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.extend((0..inputs.len()).filter(|_| rng.random_bool(0.2)));
    order.shuffle(&mut rng);

    let mut known: BTreeMap<String, SubjectData> = BTreeMap::new();
    let mut expected: BTreeSet<Found> = BTreeSet::new();
    let mut reported: BTreeSet<Found> = BTreeSet::new();
    let (mut passes, mut rest) = (0, order.as_slice());
    while !rest.is_empty() {
        let (batch, after) = rest.split_at(rng.random_range(1..=8).min(rest.len()));
        rest = after;
        let batch: Vec<&Input> = batch.iter().map(|i| &inputs[*i]).collect();
        fx.send(&batch).await?;
        for input in batch {
            let data = known.entry(input.subject()).or_default();
            if !reads_again(input, data) {
                input.known(data);
            }
        }
        if rest.is_empty() || rng.random_bool(0.5) {
            passes += 1;
            let evaluation = fx.pass().await?;
            reported.extend(
                evaluation
                    .queries
                    .iter()
                    .map(|q| (q.finding.check_id.clone(), q.finding.data_event_ids.clone())),
            );
            for data in known.values() {
                expected
                    .extend(checks::run(&checks, data).into_iter().map(|f| (f.check_id, f.data_event_ids)));
            }
        }
    }
    let kinds: BTreeSet<&str> = expected.iter().map(|f| f.0.as_str()).collect();
    for kind in [
        "DIABP_GE_SYSBP",
        "WEIGHT_CHANGE",
        "BEFORE_CONSENT",
        "AFTER_WITHDRAWAL",
        "AFTER_DEATH",
        "SYSBP_RANGE",
        "FUTURE_DATE",
        "DATE_REQUIRED",
    ] {
        assert!(kinds.contains(kind), "the draw exercises {kind}: {kinds:?}");
    }
    let opened = fx.opened().await?;
    let missing: Vec<&Found> = expected.difference(&opened).collect();
    let extra: Vec<&Found> = opened.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{passes} passes; missing {missing:?}; not expected {extra:?}"
    );
    assert_eq!(reported, opened, "every query reported once by the pass that opened it");

    // More data of a subject with 130 readings: a pass reads the new reading and what the checks
    // compare it with, not the history.
    let late = day(44) + Duration::hours(23);
    let effective = late.format("%Y-%m-%dT%H:%M").to_string();
    fx.send(&[&reading("701-004", SYSBP, 120.0, "mm[Hg]", &effective, late)]).await?;
    let evaluation = fx.pass().await?;
    assert_eq!(evaluation.inputs_read, 2, "the reading, then its time point: itself alone");
    fx.send(&[&reading("701-004", DIABP, 125.0, "mm[Hg]", &effective, late)]).await?;
    let evaluation = fx.pass().await?;
    assert_eq!(evaluation.inputs_read, 3, "the reading, then its time point: it and its systolic");
    let found: Vec<&str> = evaluation.queries.iter().map(|q| q.finding.check_id.as_str()).collect();
    assert_eq!(found, ["DIABP_GE_SYSBP"]);
    let weight_days = known["701-004"].readings.iter().filter(|r| r.code == WEIGHT).count();
    let later = day(50) + Duration::hours(9);
    let effective = later.format("%Y-%m-%dT%H:%M").to_string();
    fx.send(&[&reading("701-004", WEIGHT, 200.0, "kg", &effective, later)]).await?;
    let evaluation = fx.pass().await?;
    // Itself, then its stretch: the last day of data before it (one or two readings) and itself.
    assert!((3..=4).contains(&evaluation.inputs_read), "{} of {weight_days} weights", evaluation.inputs_read);
    let found: Vec<&str> = evaluation.queries.iter().map(|q| q.finding.check_id.as_str()).collect();
    assert_eq!(found, ["WEIGHT_CHANGE"], "a jump from the last weight");

    // An input that changes nothing but the input counts (a day already seen, no finding): the
    // KRIs that count inputs are evaluated again.
    let noon = day(44) + Duration::hours(12);
    let effective = noon.format("%Y-%m-%dT%H:%M").to_string();
    fx.send(&[&reading("701-004", TEMP, 37.0, "Cel", &effective, noon)]).await?;
    fx.pass().await?;
    let sql = format!(
        "SELECT numerator::bigint, denominator::bigint,
                (SELECT count(*) FROM {s}.query), (SELECT count(*) FROM {s}.reading) + (SELECT count(*) FROM {s}.ae_report)
         FROM {s}.site_kri WHERE kri = 'QUERY_RATE' AND site_id = '701'",
        s = fx.schema
    );
    let (queries, inputs, opened, stored): (i64, i64, i64, i64) =
        sqlx::query_as(AssertSqlSafe(sql)).fetch_one(&fx.pool).await?;
    assert_eq!((queries, inputs), (opened, stored), "QUERY_RATE counts every query and every input");
    fx.drop().await
}

/// Whether `input` is a data point already known (a duplicate delivery changes nothing).
fn reads_again(input: &Input, data: &SubjectData) -> bool {
    match input {
        Input::Reading(e) => data.readings.iter().any(|r| r.event_id == e.envelope.event_id),
        Input::Report(e) => data.adverse_events.iter().any(|a| a.event_id == e.envelope.event_id),
        _ => false,
    }
}
