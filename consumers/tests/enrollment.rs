//! The enrollment saga over the real stack: the enrollment and kit-allocation consumers, the relay
//! publishing their outboxes, PostgreSQL and the broker over TCP. A plain outbox stands in for
//! the site API (its own tests live with it), so each test states exactly which events arrive.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::AssertSqlSafe;
use trialflow_consumers::{enrollment, kit_allocation};
use trialflow_outbox::OutboxEvent;
use trialflow_outbox::audit;
use trialflow_outbox::kafka::TopicReader;
use trialflow_schemas::topics::{self};
use trialflow_schemas::*;
use trialflow_testkit::kafka;

mod common;

use common::{Trial, WAIT};

const STUDY: &str = "TF-PILOT";
const ARMS: [&str; 3] = ["PBO", "XAN_LO", "XAN_HI"];
const KIT_TYPE: &str = "BOTTLE-30";

fn envelope<E: Event>(site: Option<&str>, subject: Option<&str>) -> Envelope {
    let mut e = Envelope::new(E::NAME, STUDY, "test-site-api", Timestamp::now());
    e.site_id = site.map(str::to_string);
    e.subject_id = subject.map(str::to_string);
    e
}

fn study(slots_per_stratum: i32, low_stock_threshold: i32) -> StudyConfigured {
    StudyConfigured {
        envelope: envelope::<StudyConfigured>(None, None),
        config_version: 1,
        arms: ARMS
            .iter()
            .map(|a| StudyArm { arm_code: a.to_string(), name: a.to_string(), ratio: 1 })
            .collect(),
        stratification_factors: vec![StratificationFactor {
            factor: "AGEGRP".into(),
            values: vec!["<65".into(), ">=65".into()],
        }],
        randomization: RandomizationSettings {
            seed: 20_261_122,
            block_multiples: vec![1, 2],
            slots_per_stratum,
            warn_slots_left: 3,
        },
        kit_types: vec![KitTypeSettings {
            kit_type: KIT_TYPE.into(),
            do_not_dispense_days: 30,
            do_not_count_days: 15,
            low_stock_threshold,
        }],
        enrollment_kit_type: KIT_TYPE.into(),
    }
}

/// `per_arm` kits of every arm, sequence numbers from `first_sequence`, expiring in two years.
/// `n` treatment assignments at site 701, subjects `<prefix>-000`…, arms in turn.
fn assignments_at_701(trial: &Trial, prefix: &str, n: usize) -> anyhow::Result<Vec<OutboxEvent>> {
    (0..n)
        .map(|i| {
            let subject = format!("{prefix}-{i:03}");
            let assigned = TreatmentAssigned {
                envelope: envelope::<TreatmentAssigned>(Some("701"), Some(&subject)),
                randomization_number: format!("R-{i:03}"),
                randomization_list_id: "test".into(),
                arm_code: ARMS[i % 3].into(),
            };
            trial.event(&assigned, &subject)
        })
        .collect()
}

fn shipment(site: &str, shipment_id: &str, per_arm: i64, first_sequence: i64) -> KitsReceived {
    KitsReceived {
        envelope: envelope::<KitsReceived>(Some(site), None),
        shipment_id: shipment_id.into(),
        kits: common::kits(site, &ARMS, KIT_TYPE, per_arm, first_sequence),
    }
}

/// A subject's screening, consent, eligibility and enrollment request, in lifecycle order.
fn subject_flow(
    trial: &Trial,
    site: &str,
    subject: &str,
    age_group: &str,
) -> anyhow::Result<Vec<OutboxEvent>> {
    let s = Some(subject);
    Ok(vec![
        trial.event(
            &SubjectScreened {
                envelope: envelope::<SubjectScreened>(Some(site), s),
                screening_number: format!("SCR-{subject}"),
                time_zone: "Europe/Berlin".into(),
                age_years: Some(if age_group == "<65" { 50 } else { 70 }),
                sex: Some("F".into()),
            },
            subject,
        )?,
        trial.event(
            &ConsentSigned {
                envelope: envelope::<ConsentSigned>(Some(site), s),
                consent_version: "v1.0".into(),
                signed_at: PartialDateTime::parse("2026-11-20"),
            },
            subject,
        )?,
        trial.event(
            &EligibilityAssessed {
                envelope: envelope::<EligibilityAssessed>(Some(site), s),
                eligible: true,
                criteria: vec![CriterionResult { criterion_id: "AGE".into(), met: true, detail: None }],
            },
            subject,
        )?,
        enrollment_request(trial, site, subject, age_group)?,
    ])
}

fn enrollment_request(
    trial: &Trial,
    site: &str,
    subject: &str,
    age_group: &str,
) -> anyhow::Result<OutboxEvent> {
    let mut requested = envelope::<EnrollmentRequested>(Some(site), Some(subject));
    requested.actor = Some("site-user".into());
    trial.event(
        &EnrollmentRequested {
            envelope: requested,
            strata: vec![StratumValue { factor: "AGEGRP".into(), value: age_group.into() }],
        },
        subject,
    )
}

/// (subject, stratum, sequence, arm) of every used slot, from the concealed lists.
async fn used_slots(trial: &Trial) -> anyhow::Result<Vec<(String, String, i32, String)>> {
    let sql = format!(
        "SELECT subject_id, stratum, sequence, arm_code FROM {}.randomization_slot
         WHERE subject_id IS NOT NULL ORDER BY stratum, sequence",
        trial.enrollment
    );
    Ok(sqlx::query_as(AssertSqlSafe(sql)).fetch_all(&trial.pool).await?)
}

/// Every stratum's used slots are exactly 1..=n: no number twice, none skipped.
fn assert_dense(slots: &[(String, String, i32, String)]) {
    let mut by_stratum: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (_, stratum, sequence, _) in slots {
        by_stratum.entry(stratum).or_default().push(*sequence);
    }
    for (stratum, sequences) in by_stratum {
        assert_eq!(sequences, (1..=sequences.len() as i32).collect::<Vec<_>>(), "stratum {stratum}");
    }
    let subjects: BTreeSet<&str> = slots.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(subjects.len(), slots.len(), "one slot per subject");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_with_two_sites_and_40_subjects_enrolls_fully() -> anyhow::Result<()> {
    let mut trial = Trial::new(3).await?;
    trial.start_enrollment();
    trial.start_kit_allocation();
    let mut events = vec![trial.event(&study(30, 2), STUDY)?];
    // 20 kits per arm and site: which arm a site's 20 subjects get depends on the order in which
    // parallel partitions take slots, so a site may need up to 20 kits of one arm.
    for site in ["701", "702"] {
        events.push(trial.event(&shipment(site, &format!("SH-{site}"), 20, 1), site)?);
    }
    trial.send(events).await?;
    for i in 0..40 {
        let site = if i % 2 == 0 { "701" } else { "702" };
        let age = if i % 3 == 0 { ">=65" } else { "<65" };
        trial.send(subject_flow(&trial, site, &format!("S-{i:03}"), age)?).await?;
    }
    trial
        .wait_count(
            "40 subjects enrolled",
            "SELECT count(*) FROM {enr}.subject WHERE status = 'enrolled'",
            40,
        )
        .await?;

    let slots = used_slots(&trial).await?;
    assert_eq!(slots.len(), 40);
    assert_dense(&slots);
    // Every subject got a kit of its own arm, at its own site, and no kit went twice.
    let mismatched = trial
        .count(
            "SELECT count(*) FROM {enr}.randomization_slot s
             JOIN {enr}.subject j ON j.study_id = s.study_id AND j.subject_id = s.subject_id
             JOIN {kit}.allocation a ON a.study_id = s.study_id AND a.randomization_number = s.randomization_number
             JOIN {kit}.kit k ON k.study_id = a.study_id AND k.kit_number = a.kit_number
             WHERE k.arm_code <> s.arm_code OR k.site_id <> j.site_id OR j.kit_number <> k.kit_number",
        )
        .await?;
    assert_eq!(mismatched, 0, "kit arm, site and number match the randomization");
    assert_eq!(trial.count("SELECT count(DISTINCT kit_number) FROM {kit}.allocation").await?, 40);
    // The services' report reads (the demo's summary) say the same.
    let (pool, enr, kit) = (&trial.pool, &trial.enrollment, &trial.kits);
    let by_site = enrollment::read::by_site(pool, enr, STUDY).await?;
    let sites: BTreeMap<&str, (i64, i64, i64)> =
        by_site.iter().map(|r| (r.group.as_str(), (r.randomized, r.enrolled, r.on_hold))).collect();
    assert_eq!(sites, BTreeMap::from([("701", (20, 20, 0)), ("702", (20, 20, 0))]));
    let arms: BTreeSet<String> = enrollment::read::arms(pool, enr, STUDY).await?.into_iter().collect();
    assert_eq!(arms, ARMS.iter().map(|a| a.to_string()).collect());
    let by_arm = enrollment::read::by_arm(pool, enr, STUDY).await?;
    assert_eq!(
        by_arm.iter().map(|r| (r.randomized, r.enrolled)).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
        (40, 40)
    );
    let kits = kit_allocation::read::by_site(pool, kit, STUDY).await?;
    let kits: BTreeMap<&str, (i64, i64, i64)> =
        kits.iter().map(|r| (r.site_id.as_str(), (r.received, r.allocated, r.available))).collect();
    assert_eq!(kits, BTreeMap::from([("701", (60, 20, 40)), ("702", (60, 20, 40))]));
    assert_eq!(kit_allocation::read::known(pool, kit, STUDY).await?, 120);

    // Read until every subject's SubjectEnrolled is in (how many other events there are depends on
    // whether some assignments reached kit allocation before the shipments: a hold, then a retry).
    let reader = TopicReader::new(&kafka(), &trial.topics.name(topics::SUBJECT_LIFECYCLE), true)?;
    let messages = reader
        .read_until(WAIT, |m| {
            m.iter().filter(|m| m.header("event_type") == Some(SubjectEnrolled::NAME)).count() >= 40
        })
        .await?;
    let mut enrolled: BTreeMap<String, usize> = BTreeMap::new();
    for m in &messages {
        if let AnyEvent::SubjectEnrolled(e) = decode_any(&m.payload)? {
            *enrolled.entry(e.envelope.subject_id.unwrap_or_default()).or_default() += 1;
        }
    }
    assert_eq!(enrolled.len(), 40, "every subject enrolled on the blinded topic");
    assert!(enrolled.values().all(|n| *n == 1), "once each: {enrolled:?}");
    // Batches of three partitions, in parallel, appended to the chains of each service.
    for (schema, action) in [(enr, "subject.randomized"), (enr, "subject.enrolled"), (kit, "kit.dispensed")] {
        let records = audit::read(&mut *pool.acquire().await?, schema, Some(STUDY), None, 1000).await?;
        assert_eq!(records.iter().filter(|r| r.action == action).count(), 40, "{action}");
        let verdict = audit::verify(pool, schema).await?;
        assert!(verdict.is_intact(), "{schema}: {verdict:?}");
    }
    trial.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_without_stock_holds_subjects_and_enrolls_them_after_a_shipment() -> anyhow::Result<()> {
    let mut trial = Trial::new(2).await?;
    trial.start_enrollment();
    trial.start_kit_allocation();
    trial.send(vec![trial.event(&study(30, 3), STUDY)?]).await?;
    for i in 0..4 {
        trial.send(subject_flow(&trial, "703", &format!("H-{i}"), "<65")?).await?;
    }
    trial
        .wait_count(
            "4 subjects on hold without a kit",
            "SELECT count(*) FROM {enr}.subject WHERE status = 'on_hold' AND hold_reason_code = 'NO_KIT_AVAILABLE'",
            4,
        )
        .await?;
    let numbers_before =
        trial.count("SELECT count(DISTINCT randomization_number) FROM {enr}.subject").await?;
    assert_eq!(numbers_before, 4, "the randomization stays while on hold");
    let held = enrollment::read::on_hold_by_reason(&trial.pool, &trial.enrollment, STUDY).await?;
    assert_eq!(held, [("NO_KIT_AVAILABLE".to_string(), 4)]);
    let held_arms: BTreeSet<String> = used_slots(&trial).await?.into_iter().map(|s| s.3).collect();

    trial.send(vec![trial.event(&shipment("703", "SH-703", 4, 100), "703")?]).await?;
    trial
        .wait_count("4 subjects enrolled", "SELECT count(*) FROM {enr}.subject WHERE status = 'enrolled'", 4)
        .await?;
    let slots = used_slots(&trial).await?;
    assert_eq!(slots.len(), 4, "no new randomization: the same numbers are kept");
    assert_dense(&slots);

    let holds = trial.published(topics::SUBJECT_LIFECYCLE, 4 * 4 + 4 * 3).await?;
    let on_hold = holds
        .iter()
        .filter(|e| matches!(e, AnyEvent::EnrollmentOnHold(h) if h.randomization_number.is_some()))
        .count();
    assert_eq!(on_hold, 4, "each subject held once, with its randomization number");
    // Low stock fires once per arm that went under the threshold, not per allocation.
    let inventory = trial.published(topics::KIT_INVENTORY, 1 + held_arms.len()).await?;
    let low: Vec<&SiteStockLow> = inventory
        .iter()
        .filter_map(|e| match e {
            AnyEvent::SiteStockLow(l) => Some(l),
            _ => None,
        })
        .collect();
    assert_eq!(low.iter().map(|l| l.arm_code.clone()).collect::<BTreeSet<_>>(), held_arms);
    assert_eq!(low.len(), held_arms.len(), "one signal per crossing");

    // The audit trails: who decided what, on whose behalf, caused by which event; the arms only
    // in unblinded changes.
    let mut conn = trial.pool.acquire().await?;
    let records = audit::read(&mut conn, &trial.enrollment, Some(STUDY), None, 100).await?;
    let of = |action: &str| records.iter().filter(|r| r.action == action).collect::<Vec<_>>();
    let (randomized, held, enrolled) =
        (of("subject.randomized"), of("enrollment.on_hold"), of("subject.enrolled"));
    assert_eq!((randomized.len(), held.len(), enrolled.len()), (4, 4, 4));
    for r in &randomized {
        assert_eq!((r.actor_user.as_str(), r.actor_role.as_str()), (enrollment::NAME, "system"));
        assert_eq!(r.on_behalf_of.as_deref(), Some("site-user"));
        assert!(r.cause.as_deref().is_some_and(|c| c.starts_with("event:")), "{:?}", r.cause);
        assert!(r.unblinded && r.changes.contains("\"arm_code\""), "{}", r.changes);
        let blinded = r.view("enrollment", true).to_string();
        assert!(ARMS.iter().all(|arm| !blinded.contains(&format!("\"{arm}\""))), "{blinded}");
        assert!(blinded.contains("randomization_number"), "{blinded}");
    }
    assert!(held.iter().all(|r| r.reason.as_deref().is_some_and(|w| w.contains("NO_KIT_AVAILABLE"))));
    assert!(
        held.iter()
            .all(|r| r.changes.contains(r#"{"new": "on_hold", "old": "randomized", "field": "status"}"#))
    );
    assert!(enrolled.iter().all(|r| r.changes.contains(r#""old": "on_hold""#)), "held, then enrolled");
    let dispensed = audit::read(&mut conn, &trial.kits, Some(STUDY), None, 100).await?;
    assert_eq!(dispensed.iter().filter(|r| r.action == "kit.dispensed" && r.unblinded).count(), 4);
    assert!(audit::verify(&trial.pool, &trial.enrollment).await?.is_intact());
    assert!(audit::verify(&trial.pool, &trial.kits).await?.is_intact());
    drop(conn);
    trial.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_enrollment_request_twice_randomizes_once() -> anyhow::Result<()> {
    let mut trial = Trial::new(2).await?;
    trial.start_enrollment();
    trial.start_kit_allocation();
    trial
        .send(vec![trial.event(&study(30, 0), STUDY)?, trial.event(&shipment("701", "SH", 5, 1), "701")?])
        .await?;
    let flow = subject_flow(&trial, "701", "D-1", "<65")?;
    let request = flow[3].clone();
    trial.send(flow).await?;
    // Redelivery of the same event, and a second request (new event id) from an impatient user.
    trial.send(vec![request.clone(), enrollment_request(&trial, "701", "D-1", "<65")?]).await?;
    trial.send(vec![request]).await?;
    // A marker on the same key (same partition), a consent of a new version: once it is applied,
    // so is everything sent before it. (Counting inbox rows instead would depend on whether the
    // shipment reached kit allocation before the assignment — a hold and a retry are both fine.)
    let marker = ConsentSigned {
        envelope: envelope::<ConsentSigned>(Some("701"), Some("D-1")),
        consent_version: "v2.0-marker".into(),
        signed_at: PartialDateTime::parse("2026-11-21"),
    };
    trial.send(vec![trial.event(&marker, "D-1")?]).await?;
    let marked = "SELECT count(*) FROM {enr}.subject WHERE consent_version = 'v2.0-marker'";
    trial.wait_count("every message before the marker taken", marked, 1).await?;
    trial
        .wait_count("subject enrolled", "SELECT count(*) FROM {enr}.subject WHERE status = 'enrolled'", 1)
        .await?;
    assert_eq!(used_slots(&trial).await?.len(), 1);
    assert_eq!(trial.count("SELECT count(subject_id) FROM {enr}.randomization_slot").await?, 1);
    assert_eq!(trial.count("SELECT count(*) FROM {kit}.allocation").await?, 1);
    trial.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_one_stratum_never_share_a_number() -> anyhow::Result<()> {
    // Subjects on 4 partitions, two enrollment instances: requests in one stratum race for its list.
    let mut trial = Trial::new(4).await?;
    trial.start_enrollment();
    trial.start_enrollment();
    trial.start_kit_allocation();
    trial
        .send(vec![trial.event(&study(60, 0), STUDY)?, trial.event(&shipment("701", "SH", 30, 1), "701")?])
        .await?;
    let mut all = Vec::new();
    for i in 0..60 {
        all.extend(subject_flow(&trial, "701", &format!("C-{i:03}"), "<65")?);
    }
    trial.send(all).await?;
    trial
        .wait_count(
            "60 subjects enrolled",
            "SELECT count(*) FROM {enr}.subject WHERE status = 'enrolled'",
            60,
        )
        .await?;
    let slots = used_slots(&trial).await?;
    assert_eq!(slots.len(), 60);
    assert_dense(&slots);
    let numbers = trial.count("SELECT count(DISTINCT randomization_number) FROM {enr}.subject").await?;
    assert_eq!(numbers, 60, "no randomization number shared");
    trial.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kits_are_never_allocated_twice_under_concurrency() -> anyhow::Result<()> {
    // 80 treatment assignments at one site over 4 partitions and two instances, 20 kits per arm.
    let mut trial = Trial::new(4).await?;
    trial.start_kit_allocation();
    trial.start_kit_allocation();
    trial
        .send(vec![trial.event(&study(100, 0), STUDY)?, trial.event(&shipment("701", "SH", 20, 1), "701")?])
        .await?;
    trial.send(assignments_at_701(&trial, "A", 80)?).await?;
    let taken =
        "SELECT (SELECT count(*) FROM {kit}.allocation) + (SELECT count(*) FROM {kit}.pending_allocation)";
    trial.wait_count("every assignment allocated or waiting", taken, 80).await?;
    // The shipment (another topic) may be applied after the assignments: they wait, and it then
    // allocates to them.
    // 27/27/26 subjects per arm for 20 kits each: every kit goes, once, to a subject of its arm.
    trial.wait_count("every kit allocated", "SELECT count(*) FROM {kit}.allocation", 60).await?;
    assert_eq!(trial.count("SELECT count(DISTINCT kit_number) FROM {kit}.allocation").await?, 60);
    assert_eq!(trial.count("SELECT count(*) FROM {kit}.kit WHERE status = 'available'").await?, 0);
    assert_eq!(trial.count("SELECT count(*) FROM {kit}.pending_allocation").await?, 20);

    // The database, not only the code, refuses a second allocation of a kit.
    let sql = format!(
        "INSERT INTO {kit}.allocation (study_id, kit_number, randomization_number, subject_id, site_id,
                                       allocated_on, caused_by)
         SELECT study_id, kit_number, 'R-NEW', 'X', site_id, allocated_on, caused_by FROM {kit}.allocation LIMIT 1",
        kit = trial.kits
    );
    let err = sqlx::query(AssertSqlSafe(sql)).execute(&trial.pool).await.err();
    let code = err.as_ref().and_then(|e| e.as_database_error()).and_then(|e| e.code()).map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("23505"), "unique violation: {err:?}");
    trial.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn low_stock_is_signalled_once_per_arm_while_allocations_run_side_by_side() -> anyhow::Result<()> {
    // 20 kits per arm at one site, threshold 5, then 60 assignments (20 per arm) over 4
    // partitions and two instances: allocations lock kits, not the site, so the stock counts of
    // concurrent batches must still see the crossing exactly once per arm.
    const THRESHOLD: i32 = 5;
    let mut trial = Trial::new(4).await?;
    trial.start_kit_allocation();
    trial.start_kit_allocation();
    trial
        .send(vec![
            trial.event(&study(100, THRESHOLD), STUDY)?,
            trial.event(&shipment("701", "SH", 20, 1), "701")?,
        ])
        .await?;
    trial.wait_count("the shipment received", "SELECT count(*) FROM {kit}.kit", 60).await?;
    trial.send(assignments_at_701(&trial, "L", 60)?).await?;
    trial.wait_count("every kit allocated", "SELECT count(*) FROM {kit}.allocation", 60).await?;
    assert_eq!(trial.count("SELECT count(*) FROM {kit}.pending_allocation").await?, 0, "nobody waits");
    assert_eq!(trial.count("SELECT count(DISTINCT kit_number) FROM {kit}.allocation").await?, 60);
    let levels = trial
        .count("SELECT count(*) FROM {kit}.stock_level WHERE site_id = '701' AND countable = 0 AND low")
        .await?;
    assert_eq!(levels, 3, "every arm's recorded stock is the final count, 0, and low");

    // Everything the kit-allocation service wrote is on the topic once its outbox is empty.
    trial.wait_count("the outbox published", "SELECT count(*) FROM {kit}.outbox", 0).await?;
    let reader = TopicReader::new(&kafka(), &trial.topics.name(topics::KIT_INVENTORY), true)?;
    let messages = reader.read_until_idle(std::time::Duration::from_secs(2), WAIT).await?;
    let mut low: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for m in &messages {
        if let AnyEvent::SiteStockLow(l) = decode_any(&m.payload)? {
            low.entry(l.arm_code.clone()).or_default().push(l.countable);
        }
    }
    assert_eq!(low.keys().map(String::as_str).collect::<BTreeSet<_>>(), ARMS.into_iter().collect());
    for (arm, counts) in &low {
        assert_eq!(counts.len(), 1, "{arm}: one signal per crossing, got {counts:?}");
        assert!(counts[0] < THRESHOLD, "{arm}: signalled below the threshold, at {}", counts[0]);
    }
    trial.stop().await
}
