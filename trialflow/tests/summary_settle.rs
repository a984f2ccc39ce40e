//! The outcome of a run, read back. A small study is driven the way the demo drives one: sites
//! through the site API, patient apps through the ePRO gateway, an EDC publishing vital signs
//! straight to the clinical topic, and one app publishing garbage; `settle::wait_settled` waits
//! for the pipeline (started in this process on private schemas and topics) to finish, and
//! `summary::collect` must report exactly what this scenario implies.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use trialflow_pipeline::{ConsumerGroup, Pipeline, PipelineConfig, Schemas, consumer_groups};
use trialflow_schemas::topics;
use trialflow_schemas::{
    Answer, Envelope, Event, PartialDateTime, QuestionnaireResponseSubmitted, ResponseStatus, Timestamp,
    VitalSignRecorded,
};
use trialflow_simulation::settle::{self, Backlog};
use trialflow_simulation::summary::{
    self, AlertSummary, ArmSubjects, DeadLetters, EproSummary, HoldReason, KitSummary, ReasonCount,
    RuleAlerts, SiteKits, SiteSubjects, StudySummary, SubjectSummary, WindowCount, WithdrawalReason,
};
use trialflow_testkit::{SiteApi, database_url, init_logs, kafka, unique};

const WAIT: Duration = Duration::from_secs(120);
const STUDY: &str = "SUM";
const PHQ9_ITEMS: [&str; 9] =
    ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8"];
const PHQ9_DIFFICULTY: &str = "69722-7";

/// The HTTP side of the scenario: sites and patient apps.
struct Clients {
    site_api: SiteApi,
    gateway: String,
}

impl Clients {
    /// POSTs `body` to the site API as `token` with a fresh idempotency key; expects 201.
    async fn post(&self, token: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.site_api.post(token, path, body).await
    }

    /// Screens a subject (criterion INC01 met), and records its consent; the subject id.
    async fn screen(&self, site: &str, number: u32, age: i32) -> anyhow::Result<String> {
        let subject = format!("{site}-{number:04}");
        let screening = json!({"site_id": site, "screening_number": format!("SCR-{subject}"),
                               "subject_id": subject, "age_years": age, "sex": "F",
                               "criteria": {"INC01": true}});
        self.post("site-token", &format!("/{STUDY}/subjects"), &screening).await?;
        let consent = json!({"consent_version": "v1", "signed_at": Utc::now().date_naive().to_string()});
        self.post("site-token", &format!("/{STUDY}/subjects/{subject}/consent"), &consent).await?;
        Ok(subject)
    }

    async fn request_enrollment(&self, subject: &str, strata: Value) -> anyhow::Result<()> {
        let path = format!("/{STUDY}/subjects/{subject}/enrollment-requests");
        self.post("site-token", &path, &json!({ "strata": strata })).await.map(drop)
    }

    async fn withdraw(&self, subject: &str) -> anyhow::Result<()> {
        let path = format!("/{STUDY}/subjects/{subject}/withdrawal");
        self.post("site-token", &path, &json!({"reason_code": "WITHDRAWAL BY SUBJECT"})).await.map(drop)
    }

    async fn ship(&self, site: &str, kits: &[(&str, &str, &str)]) -> anyhow::Result<()> {
        let kits: Vec<Value> = kits
            .iter()
            .enumerate()
            .map(|(i, (number, arm, expiry))| {
                json!({"kit_number": number, "sequence_number": i + 1, "kit_type": "BOX", "lot": "L1",
                       "expiry_date": expiry, "arm_code": arm})
            })
            .collect();
        let shipment = json!({"shipment_id": format!("SH-{site}"), "kits": kits});
        self.post("pharmacist-token", &format!("/{STUDY}/sites/{site}/shipments"), &shipment).await.map(drop)
    }

    /// What a patient app does: POST to the gateway, 202 once the broker has it.
    async fn submit(&self, submission: &QuestionnaireResponseSubmitted) -> anyhow::Result<()> {
        let response = self
            .site_api
            .http
            .post(format!("{}/v1/submissions", self.gateway))
            .bearer_auth("app-token")
            .json(&serde_json::to_value(submission)?)
            .send()
            .await?;
        let status = response.status();
        anyhow::ensure!(status == StatusCode::ACCEPTED, "submission: {status} {}", response.text().await?);
        Ok(())
    }
}

/// A PHQ-9 of `subject` with `scores` per item (`None`: not answered) and, when an item is above
/// 0, the difficulty item (only asked then).
fn phq9(subject: &str, scores: [Option<i32>; 9], authored: DateTime<Utc>) -> QuestionnaireResponseSubmitted {
    let answer = |link_id: &str, value: i32| Answer::integer(link_id, value);
    let mut items: Vec<Answer> =
        PHQ9_ITEMS.iter().zip(scores).filter_map(|(l, s)| s.map(|s| answer(l, s))).collect();
    if scores.iter().flatten().any(|s| *s > 0) {
        items.push(answer(PHQ9_DIFFICULTY, 1));
    }
    let mut envelope =
        Envelope::new(QuestionnaireResponseSubmitted::NAME, STUDY, "epro-app", Timestamp::from(authored));
    envelope.subject_id = Some(subject.into());
    QuestionnaireResponseSubmitted {
        envelope,
        submission_id: uuid::Uuid::new_v4(),
        questionnaire: "PHQ-9".into(),
        questionnaire_version: "1.0".into(),
        scheduled_occurrence: None,
        status: ResponseStatus::Completed,
        authored_at: Timestamp::from(authored),
        device_time_zone: "Europe/Berlin".into(),
        items,
    }
}

/// An EDC publishing one reading straight to the clinical topic, with the relay's headers.
async fn publish_vital(
    producer: &FutureProducer,
    topic: &str,
    subject: &str,
    (loinc, value, unit): (&str, f64, &str),
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let mut envelope = Envelope::new(VitalSignRecorded::NAME, STUDY, "edc", Timestamp::from(at));
    envelope.subject_id = Some(subject.into());
    envelope.site_id = subject.split('-').next().map(str::to_string);
    let event_id = envelope.event_id.to_string();
    let reading = VitalSignRecorded {
        envelope,
        observation_id: uuid::Uuid::new_v4().to_string(),
        loinc_code: loinc.into(),
        value,
        unit: unit.into(),
        position: None,
        effective: PartialDateTime::parse(&at.format("%Y-%m-%dT%H:%M:%S").to_string()),
        visit: None,
        visit_day: None,
    };
    let payload = trialflow_schemas::encode(&reading)?;
    let headers = OwnedHeaders::new()
        .insert(Header { key: "event_id", value: Some(event_id.as_str()) })
        .insert(Header { key: "event_type", value: Some(VitalSignRecorded::NAME) })
        .insert(Header { key: "content-type", value: Some(trialflow_schemas::CONTENT_TYPE) });
    let record = FutureRecord::to(topic).key(subject).payload(&payload).headers(headers);
    producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    Ok(())
}

/// Waits for the pipeline to settle; the backlog and how many checks it took.
async fn settled(
    pool: &PgPool,
    groups: &[ConsumerGroup],
    schemas: &Schemas,
) -> anyhow::Result<(Backlog, usize)> {
    let mut checks = 0;
    let backlog =
        settle::wait_settled(pool, groups, &schemas.sources(), &kafka(), WAIT, |_| checks += 1).await?;
    Ok((backlog, checks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_after_settling_counts_exactly_what_the_scenario_sent() -> anyhow::Result<()> {
    init_logs();
    let config = PipelineConfig::isolated("sum", &database_url(), &kafka())?;
    let groups = consumer_groups(&config);
    let (schemas, names, dlq_suffix) =
        (config.schemas.clone(), config.topics.clone(), config.consumer.dlq_suffix.clone());
    let shutdown = CancellationToken::new();
    let pipeline = Pipeline::start(config, &shutdown).await?;
    let pool = PgPool::connect(&database_url()).await?;
    let clients = Clients {
        site_api: SiteApi::new(pipeline.site_api_addr()),
        gateway: format!("http://{}", pipeline.epro_gateway_addr()),
    };

    // The groups are exactly the pipeline's consumers, with the topics each one reads.
    let group_names: Vec<&str> = groups.iter().map(|g| g.group_id.as_str()).collect();
    let expected_names: Vec<String> =
        ["enrollment", "kit-allocation", "epro-validation", "monitoring", "risk", "notifier"]
            .iter()
            .map(|n| format!("{}{n}", names.prefix()))
            .collect();
    assert_eq!(group_names, expected_names);
    assert_eq!(groups[5].topics, vec![names.name(topics::ALERTS)]);

    // Set-up: two sites; 101 gets two kits per arm, 102 two kits too close to expiry to dispense
    // (today < expiry - 30 days fails), so every subject randomized at 102 waits for a kit.
    // Low-stock threshold 0: no SiteStockLow, whatever the arms' split.
    let study = json!({
        "study_id": STUDY, "title": "Summary",
        "arms": [{"arm_code": "PBO", "name": "Placebo", "ratio": 1},
                 {"arm_code": "ACT", "name": "Active", "ratio": 1}],
        "stratification_factors": [{"factor": "AGEGR", "values": ["<65", ">=65"]}],
        "eligibility": {"min_age_years": 18, "max_age_years": 85,
                        "criteria": [{"criterion_id": "INC01", "description": "Diagnosis confirmed"}]},
        // Blocks of 2 (1 × the ratio sum): the first two subjects of a stratum get one arm each,
        // in whichever order their partitions take the slots.
        "randomization": {"seed": 11, "block_multiples": [1], "slots_per_stratum": 10, "warn_slots_left": 2},
        "kit_types": [{"kit_type": "BOX", "do_not_dispense_days": 30, "do_not_count_days": 14,
                       "low_stock_threshold": 0}],
        "enrollment_kit_type": "BOX"
    });
    clients.post("admin-token", "", &study).await?;
    for site in ["101", "102"] {
        let body = json!({"site_id": site, "name": format!("Site {site}"), "time_zone": "Europe/Berlin"});
        clients.post("admin-token", &format!("/{STUDY}/sites"), &body).await?;
    }
    let far = "2030-12-31";
    let soon = (Utc::now().date_naive() + chrono::Days::new(10)).to_string();
    let kits_101 =
        [("K101-1", "PBO", far), ("K101-2", "PBO", far), ("K101-3", "ACT", far), ("K101-4", "ACT", far)];
    clients.ship("101", &kits_101).await?;
    clients.ship("102", &[("K102-1", "PBO", soon.as_str()), ("K102-2", "ACT", soon.as_str())]).await?;
    // Kits in place before anyone is randomized: otherwise a 101 subject could be held for a kit
    // (and raise an alert) before the shipment is applied.
    assert_eq!(settled(&pool, &groups, &schemas).await?.0, Backlog::default());

    // Subjects: two enrolled at 101 (stratum <65), a screen failure (too old) whose request is
    // recorded but changes nothing, one held for a missing stratum, two randomized at 102
    // (stratum >=65) and held for want of a dispensable kit, one withdrawn before any request.
    let s101_1 = clients.screen("101", 1, 60).await?;
    let s101_2 = clients.screen("101", 2, 61).await?;
    let s101_3 = clients.screen("101", 3, 95).await?;
    let s101_4 = clients.screen("101", 4, 70).await?;
    let s102_1 = clients.screen("102", 1, 70).await?;
    let s102_2 = clients.screen("102", 2, 72).await?;
    let s102_3 = clients.screen("102", 3, 66).await?;
    for subject in [&s101_1, &s101_2] {
        clients.request_enrollment(subject, json!({"AGEGR": "<65"})).await?;
    }
    clients.request_enrollment(&s101_3, json!({"AGEGR": ">=65"})).await?;
    clients.request_enrollment(&s101_4, json!({})).await?;
    for subject in [&s102_1, &s102_2] {
        clients.request_enrollment(subject, json!({"AGEGR": ">=65"})).await?;
    }
    clients.withdraw(&s102_3).await?;
    assert_eq!(settled(&pool, &groups, &schemas).await?.0, Backlog::default());

    // 101-0002 withdraws after its enrollment: still counted as randomized and enrolled.
    clients.withdraw(&s101_2).await?;

    // ePRO: an in-window response (and its exact resend), a late sync with item 9 above 0 (an
    // alert), three rejections (unknown version; two answers out of range; in progress with a
    // required item missing), and one for a subject never enrolled, which stays parked.
    let now = Utc::now();
    let mut in_window =
        phq9(&s101_1, [Some(1), Some(0), Some(0), Some(0), Some(0), Some(0), Some(0), Some(0), Some(0)], now);
    in_window.scheduled_occurrence = Some("PHQ-9/D1".into());
    clients.submit(&in_window).await?;
    clients.submit(&in_window).await?;
    let late = phq9(&s101_2, [Some(1); 9], now - chrono::Duration::days(3));
    clients.submit(&late).await?;
    let mut unknown_version = phq9(&s101_1, [Some(0); 9], now);
    unknown_version.questionnaire_version = "9.9".into();
    clients.submit(&unknown_version).await?;
    let out_of_range =
        phq9(&s101_1, [Some(7), Some(5), Some(0), Some(0), Some(0), Some(0), Some(0), Some(0), Some(0)], now);
    clients.submit(&out_of_range).await?;
    let mut in_progress =
        phq9(&s101_1, [Some(0), Some(0), None, Some(0), Some(0), Some(0), Some(0), Some(0), Some(0)], now);
    in_progress.status = ResponseStatus::InProgress;
    clients.submit(&in_progress).await?;
    clients.submit(&phq9(&s102_1, [Some(0); 9], now)).await?;

    // Vitals: two systolic readings of 101-0001 at or above 160 mmHg (one grade 3 hypertension
    // episode with two readings) and normal ones; then bytes that are no event at all.
    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(&kafka(), "summary-test").create()?;
    let clinical = names.name(topics::CLINICAL_OBSERVATIONS);
    let minutes_ago = |m: i64| now - chrono::Duration::minutes(m);
    publish_vital(&producer, &clinical, &s101_1, ("8480-6", 165.0, "mm[Hg]"), minutes_ago(30)).await?;
    publish_vital(&producer, &clinical, &s101_1, ("8462-4", 85.0, "mm[Hg]"), minutes_ago(30)).await?;
    publish_vital(&producer, &clinical, &s101_1, ("8480-6", 172.0, "mm[Hg]"), minutes_ago(20)).await?;
    publish_vital(&producer, &clinical, &s101_2, ("8480-6", 128.0, "mm[Hg]"), minutes_ago(25)).await?;
    publish_vital(&producer, &clinical, &s101_2, ("8867-4", 72.0, "/min"), minutes_ago(25)).await?;
    let submissions = names.name(topics::EPRO_SUBMISSIONS);
    let garbage = FutureRecord::to(&submissions).key(&s101_1).payload(b"not an event".as_slice());
    producer.send(garbage, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;

    let (backlog, checks) = settled(&pool, &groups, &schemas).await?;
    let parked = Backlog { outbox_rows: 0, consumer_lag: 0, parked: 1, pending_evaluations: 0 };
    assert_eq!(backlog, parked, "only the unenrolled subject's submission is left, parked");
    assert!(checks >= 2, "settled means two quiet checks, each reported");

    // A group that never read its topic is never caught up: the error names it.
    let idle = ConsumerGroup { group_id: unique("idle"), topics: vec![clinical.clone()] };
    let mut reported = Vec::new();
    let timeout = settle::wait_settled(
        &pool,
        std::slice::from_ref(&idle),
        &[],
        &kafka(),
        Duration::from_secs(1),
        |b| reported.push(*b),
    )
    .await;
    let error = format!("{:#}", timeout.err().ok_or_else(|| anyhow::anyhow!("an idle group settled"))?);
    assert!(error.contains(&idle.group_id) && error.contains(&clinical), "{error}");
    assert!(reported.iter().all(|b| b.consumer_lag == 5), "five readings unread: {reported:?}");
    assert!(!reported.is_empty());

    // A topic that does not exist has no partitions (and so no dead letters); it is not created.
    let missing = unique("missing").replace('_', "-");
    assert!(settle::true_end_offsets(&kafka(), std::slice::from_ref(&missing)).await?.is_empty());
    assert!(settle::true_end_offsets(&kafka(), &[missing]).await?.is_empty());

    let summary = summary::collect(&pool, &schemas, STUDY, &kafka(), &names, &dlq_suffix).await?;
    let site_subjects =
        |site_id: &str, [screened, screen_failed, randomized, enrolled, on_hold, withdrawn]: [u64; 6]| {
            SiteSubjects {
                site_id: site_id.into(),
                screened,
                screen_failed,
                randomized,
                enrolled,
                on_hold,
                withdrawn,
            }
        };
    let arm =
        |arm_code: &str| ArmSubjects { arm_code: arm_code.into(), randomized: 2, enrolled: 1, on_hold: 1 };
    let site_kits = |site_id: &str, [received, allocated, available]: [u64; 3]| SiteKits {
        site_id: site_id.into(),
        received,
        allocated,
        available,
    };
    let rule = |rule_id: &str, severity: &str, episodes: u64, readings: u64| RuleAlerts {
        rule_id: rule_id.into(),
        severity: severity.into(),
        episodes,
        triggering_readings: readings,
        open: episodes,
        acknowledged: 0,
        resolved: 0,
        escalated: 0,
    };
    let mut dead_letters: Vec<DeadLetters> = names
        .all()
        .iter()
        .map(|t| DeadLetters { topic: format!("{t}{dlq_suffix}"), messages: u64::from(*t == submissions) })
        .collect();
    dead_letters.sort_by(|a, b| a.topic.cmp(&b.topic));
    let expected = StudySummary {
        study_id: STUDY.into(),
        subjects: SubjectSummary {
            screened: 7,
            screen_failed: 1,
            randomized: 4,
            enrolled: 2,
            on_hold: 3,
            withdrawn: 2,
            by_site: vec![site_subjects("101", [4, 1, 2, 2, 1, 1]), site_subjects("102", [3, 0, 2, 0, 2, 1])],
            by_arm: vec![arm("ACT"), arm("PBO")],
            on_hold_by_reason: vec![
                HoldReason { reason_code: "NO_KIT_AVAILABLE".into(), subjects: 2 },
                HoldReason { reason_code: "STRATUM_MISSING".into(), subjects: 1 },
            ],
            withdrawn_by_reason: vec![WithdrawalReason {
                reason_code: "WITHDRAWAL BY SUBJECT".into(),
                subjects: 2,
            }],
        },
        kits: KitSummary {
            received: 6,
            allocated: 2,
            available: 4,
            by_site: vec![site_kits("101", [4, 2, 2]), site_kits("102", [2, 0, 2])],
        },
        epro: EproSummary {
            decided: 5,
            accepted: 2,
            accepted_late_sync: 1,
            rejected: 3,
            rejected_by_reason: [
                "ANSWER_OUT_OF_RANGE",
                "INVALID_STATUS",
                "REQUIRED_ITEM_MISSING",
                "UNKNOWN_VERSION",
            ]
            .iter()
            .map(|code| ReasonCount { code: (*code).into(), submissions: 1 })
            .collect(),
            accepted_by_window: vec![
                WindowCount { status: "IN_WINDOW".into(), submissions: 1 },
                WindowCount { status: "UNSCHEDULED".into(), submissions: 1 },
            ],
        },
        alerts: AlertSummary {
            episodes: 4,
            triggering_readings: 5,
            by_rule: vec![
                rule("CTCAE-HTN-G3", "HIGH", 1, 2),
                rule("HOLD-NO-KIT", "WARNING", 2, 2),
                rule("PHQ9-ITEM9", "CRITICAL", 1, 1),
            ],
        },
        // Checked below on its own: the exposure days behind the AE rates depend on the clock.
        risk: summary.risk.clone(),
        dead_letters,
    };
    assert_eq!(summary, expected);

    // Screen failure, from the site API's screenings: 101 one of four, 102 none of three. The
    // study's p = 1/7; z₀ = (pᵢ − p)/√(p(1−p)/nᵢ), φ = mean z₀², z = z₀/√φ: no flag with two
    // sites this close.
    let p: f64 = 1.0 / 7.0;
    let z0 = [(0.25 - p) / (p * (1.0 - p) / 4.0).sqrt(), (0.0 - p) / (p * (1.0 - p) / 3.0).sqrt()];
    let phi = (z0[0].powi(2) + z0[1].powi(2)) / 2.0;
    let screen_failure: Vec<_> = summary
        .risk
        .kris
        .iter()
        .filter(|k| k.kri == "SCREEN_FAILURE")
        .map(|k| (k.site_id.as_str(), k.numerator, k.denominator, k.score, k.flag))
        .collect();
    assert_eq!(screen_failure.len(), 2, "{:?}", summary.risk);
    for ((site, x, n, score, flag), (want_site, want_x, want_n, z0)) in
        screen_failure.into_iter().zip([("101", 1.0, 4.0, z0[0]), ("102", 0.0, 3.0, z0[1])])
    {
        assert_eq!((site, x, n, flag), (want_site, want_x, want_n, Some(0)));
        assert!((score.unwrap_or(f64::NAN) - z0 / phi.sqrt()).abs() < 1e-9, "{site}: {score:?}");
    }

    // The JSON contract round-trips, and the text report is the same numbers, aligned.
    let json = serde_json::to_value(&summary)?;
    assert_eq!(json["subjects"]["by_site"][1]["on_hold"], 2);
    assert_eq!(serde_json::from_value::<StudySummary>(json)?, summary);
    let text = summary.render();
    for line in [
        "Subjects: 7 screened, 1 screen failed, 4 randomized, 2 enrolled, 3 on hold, 2 withdrawn",
        "  site  screened  screen failed  randomized  enrolled  on hold  withdrawn",
        "  101          4              1           2         2        1          1",
        "  NO_KIT_AVAILABLE         2",
        "  withdrawn for          subjects",
        "  WITHDRAWAL BY SUBJECT         2",
        "Kits: 6 received, 2 allocated, 4 available",
        "ePRO: 5 decided, 2 accepted (1 late sync), 3 rejected",
        "Alerts: 4 episodes, 5 triggering readings",
        "  CTCAE-HTN-G3  HIGH             1         2     1             0         0          0",
        "Dead-letter messages: 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
    }

    shutdown.cancel();
    pipeline.wait().await
}
