//! Batches of different partitions that take the same lock rows in different orders must not
//! deadlock: each consumer's `Handler::prepare` takes the rows its batch will need up front, in one
//! fixed order. Real stack (PostgreSQL, the broker over TCP, the relay); several partitions and two
//! instances per consumer so that batches run concurrently.
//!
//! A deadlock costs `deadlock_timeout` (1 s) and rolls a batch back; the runtime counts that as a
//! batch retry (`trialflow_consumer_batch_retries_total{consumer}`). This binary installs a recorder
//! that keeps that counter per consumer, and every test runs its consumer under a name of its own,
//! so the count is this test's alone (the database's deadlock counter is shared with every test).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use sqlx::AssertSqlSafe;
use trialflow_consumers::metrics::RETRIES_TOTAL;
use trialflow_outbox::OutboxEvent;
use trialflow_schemas::*;

mod common;

use common::Trial;

const STUDY: &str = "TF-LOCKS";
const ARMS: [&str; 3] = ["PBO", "XAN_LO", "XAN_HI"];
const KIT_TYPE: &str = "BOTTLE-30";
const AGE_GROUPS: [&str; 2] = ["<65", ">=65"];

/// Batch retries per `consumer` label, for the whole test binary.
#[derive(Debug, Default)]
struct RetryCounts(Mutex<BTreeMap<String, Arc<AtomicU64>>>);

impl RetryCounts {
    fn installed() -> &'static RetryCounts {
        static COUNTS: OnceLock<&'static RetryCounts> = OnceLock::new();
        COUNTS.get_or_init(|| {
            let counts: &'static RetryCounts = Box::leak(Box::default());
            metrics::set_global_recorder(counts).expect("no other recorder in this test binary");
            counts
        })
    }

    fn counter(&self, consumer: &str) -> Arc<AtomicU64> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counts.entry(consumer.to_string()).or_default().clone()
    }

    fn of(&self, consumer: &str) -> u64 {
        self.counter(consumer).load(Ordering::Relaxed)
    }
}

impl Recorder for RetryCounts {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() != RETRIES_TOTAL {
            return Counter::noop();
        }
        match key.labels().find(|l| l.key() == "consumer") {
            Some(consumer) => Counter::from_arc(self.counter(consumer.value())),
            None => Counter::noop(),
        }
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn envelope<E: Event>(site: Option<&str>, subject: Option<&str>) -> Envelope {
    let mut e = Envelope::new(E::NAME, STUDY, "test-site-api", Timestamp::now());
    e.site_id = site.map(str::to_string);
    e.subject_id = subject.map(str::to_string);
    e
}

fn study(slots_per_stratum: i32) -> StudyConfigured {
    StudyConfigured {
        envelope: envelope::<StudyConfigured>(None, None),
        config_version: 1,
        arms: ARMS
            .iter()
            .map(|a| StudyArm { arm_code: a.to_string(), name: a.to_string(), ratio: 1 })
            .collect(),
        stratification_factors: vec![StratificationFactor {
            factor: "AGEGRP".into(),
            values: AGE_GROUPS.iter().map(|v| v.to_string()).collect(),
        }],
        randomization: RandomizationSettings {
            seed: 20_261_122,
            block_multiples: vec![1, 2],
            slots_per_stratum,
            warn_slots_left: 0,
        },
        kit_types: vec![KitTypeSettings {
            kit_type: KIT_TYPE.into(),
            do_not_dispense_days: 30,
            do_not_count_days: 15,
            low_stock_threshold: 0,
        }],
        enrollment_kit_type: KIT_TYPE.into(),
    }
}

/// `per_arm` kits of every arm, expiring in two years.
fn shipment(site: &str, per_arm: i64) -> KitsReceived {
    KitsReceived {
        envelope: envelope::<KitsReceived>(Some(site), None),
        shipment_id: format!("SH-{site}"),
        kits: common::kits(site, &ARMS, KIT_TYPE, per_arm, 1),
    }
}

/// A subject's screening, consent and eligibility: everything enrollment needs before a request.
fn screened_subject(trial: &Trial, subject: &str) -> anyhow::Result<Vec<OutboxEvent>> {
    let s = Some(subject);
    Ok(vec![
        trial.event(
            &SubjectScreened {
                envelope: envelope::<SubjectScreened>(Some("701"), s),
                screening_number: format!("SCR-{subject}"),
                time_zone: "Europe/Berlin".into(),
                age_years: None,
                sex: None,
            },
            subject,
        )?,
        trial.event(
            &ConsentSigned {
                envelope: envelope::<ConsentSigned>(Some("701"), s),
                consent_version: "v1.0".into(),
                signed_at: PartialDateTime::parse("2026-11-20"),
            },
            subject,
        )?,
        trial.event(
            &EligibilityAssessed {
                envelope: envelope::<EligibilityAssessed>(Some("701"), s),
                eligible: true,
                criteria: vec![CriterionResult { criterion_id: "AGE".into(), met: true, detail: None }],
            },
            subject,
        )?,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrollment_batches_alternating_strata_randomize_without_deadlock() -> anyhow::Result<()> {
    // Requests alternate between the two strata and are spread over 4 partitions and two
    // instances: without one lock order, two batches take the lists' rows as F then M and M then F.
    const SUBJECTS: usize = 240;
    RetryCounts::installed();
    let mut trial = Trial::new(4).await?;
    trial.start_enrollment();
    trial.start_enrollment();
    let mut setup = vec![trial.event(&study(SUBJECTS as i32), STUDY)?];
    for i in 0..SUBJECTS {
        setup.extend(screened_subject(&trial, &format!("D-{i:03}"))?);
    }
    trial.send(setup).await?;
    let ready = "SELECT count(*) FROM {enr}.subject WHERE eligible AND consent_version IS NOT NULL";
    trial.wait_count("every subject screened, consented and eligible", ready, SUBJECTS as i64).await?;

    let mut requests = Vec::new();
    for i in 0..SUBJECTS {
        let subject = format!("D-{i:03}");
        let request = EnrollmentRequested {
            envelope: envelope::<EnrollmentRequested>(Some("701"), Some(&subject)),
            strata: vec![StratumValue { factor: "AGEGRP".into(), value: AGE_GROUPS[i % 2].into() }],
        };
        requests.push(trial.event(&request, &subject)?);
    }
    let started = Instant::now();
    trial.send(requests).await?;
    let randomized = "SELECT count(*) FROM {enr}.subject WHERE status = 'randomized'";
    trial.wait_count("every subject randomized", randomized, SUBJECTS as i64).await?;
    let took = started.elapsed();

    // Dense and unique per stratum: 1..=120 in each list, one slot per subject.
    let sql = format!(
        "SELECT stratum, count(*), count(DISTINCT subject_id), min(sequence), max(sequence)
         FROM {}.randomization_slot WHERE subject_id IS NOT NULL GROUP BY stratum ORDER BY stratum",
        trial.enrollment
    );
    let per_stratum: Vec<(String, i64, i64, i32, i32)> =
        sqlx::query_as(AssertSqlSafe(sql)).fetch_all(&trial.pool).await?;
    let half = (SUBJECTS / 2) as i64;
    assert_eq!(per_stratum.len(), 2, "both strata used: {per_stratum:?}");
    for (stratum, used, subjects, first, last) in &per_stratum {
        assert_eq!((*used, *subjects), (half, half), "stratum {stratum}");
        assert_eq!((*first, *last as i64), (1, half), "stratum {stratum}: slots handed out densely");
    }
    let numbers = trial.count("SELECT count(DISTINCT randomization_number) FROM {enr}.subject").await?;
    assert_eq!(numbers, SUBJECTS as i64, "no randomization number shared");

    let retries = RetryCounts::installed().of(&trial.enrollment_name());
    assert_eq!(retries, 0, "no batch rolled back (a deadlock is one); all randomized in {took:?}");
    trial.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kit_allocation_batches_over_many_sites_allocate_without_deadlock() -> anyhow::Result<()> {
    // Assignments cycle through 8 sites (two of which never received a shipment and have no
    // inventory row yet), spread over 4 partitions and two instances.
    const SUBJECTS: usize = 240;
    const SITES: [&str; 8] = ["801", "802", "803", "804", "805", "806", "807", "808"];
    const STOCKED: usize = 6;
    const PER_ARM: i64 = 10;
    RetryCounts::installed();
    let mut trial = Trial::new(4).await?;
    trial.start_kit_allocation();
    trial.start_kit_allocation();
    let mut setup = vec![trial.event(&study(SUBJECTS as i32), STUDY)?];
    for site in &SITES[..STOCKED] {
        setup.push(trial.event(&shipment(site, PER_ARM), site)?);
    }
    trial.send(setup).await?;
    let stock = STOCKED as i64 * PER_ARM * ARMS.len() as i64;
    trial.wait_count("every shipment received", "SELECT count(*) FROM {kit}.kit", stock).await?;

    // Subject i: site i % 8, arm (i / 8) % 3, so every site gets 30 subjects, 10 of each arm: the
    // stocked sites dispense all their kits, the two others hold all their subjects.
    let mut assignments = Vec::new();
    for i in 0..SUBJECTS {
        let subject = format!("A-{i:03}");
        let assigned = TreatmentAssigned {
            envelope: envelope::<TreatmentAssigned>(Some(SITES[i % SITES.len()]), Some(&subject)),
            randomization_number: format!("R-{i:03}"),
            randomization_list_id: "test".into(),
            arm_code: ARMS[(i / SITES.len()) % ARMS.len()].into(),
        };
        assignments.push(trial.event(&assigned, &subject)?);
    }
    let started = Instant::now();
    trial.send(assignments).await?;
    let taken =
        "SELECT (SELECT count(*) FROM {kit}.allocation) + (SELECT count(*) FROM {kit}.pending_allocation)";
    trial.wait_count("every assignment allocated or waiting", taken, SUBJECTS as i64).await?;
    let took = started.elapsed();

    assert_eq!(trial.count("SELECT count(*) FROM {kit}.allocation").await?, stock);
    assert_eq!(trial.count("SELECT count(DISTINCT kit_number) FROM {kit}.allocation").await?, stock);
    assert_eq!(trial.count("SELECT count(*) FROM {kit}.kit WHERE status = 'available'").await?, 0);
    let misplaced = trial
        .count(
            "SELECT count(*) FROM {kit}.allocation a
             JOIN {kit}.kit k ON k.study_id = a.study_id AND k.kit_number = a.kit_number
             WHERE k.site_id <> a.site_id",
        )
        .await?;
    assert_eq!(misplaced, 0, "every kit dispensed at its own site");
    let waiting =
        trial.count("SELECT count(*) FROM {kit}.pending_allocation WHERE site_id IN ('807', '808')").await?;
    assert_eq!(waiting, (SUBJECTS - stock as usize) as i64, "only the unstocked sites' subjects wait");
    assert_eq!(trial.count("SELECT count(*) FROM {kit}.site_inventory").await?, SITES.len() as i64);

    let retries = RetryCounts::installed().of(&trial.kit_allocation_name());
    assert_eq!(retries, 0, "no batch rolled back (a deadlock is one); all taken in {took:?}");
    trial.stop().await
}
