//! ePRO validation over the real stack: patient apps (a raw producer here) publish to the
//! ingestion topic with duplicates, conflicting duplicates, late syncs, invalid answers, garbage
//! bytes and submissions ahead of their subject's enrollment; the validation consumer runs with
//! the relay publishing its outbox. Every submission must end in exactly one outcome.

use std::collections::{BTreeMap, HashSet};

use anyhow::Context as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::ConsumerConfig;
use trialflow_consumers::epro::{self, EproValidation, catalogue::Catalogue};
use trialflow_outbox::kafka::TopicReader;
use trialflow_outbox::{Outbox, OutboxEvent, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::*;
use trialflow_testkit::{RunningRelay, database_url, init_logs, kafka, relay_config, unique, wait_until};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);
const STUDY: &str = "EPRO-IT";
const PHQ9: [&str; 9] =
    ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8"];

fn phq9(scores: [i32; 9]) -> Vec<Answer> {
    let mut items: Vec<Answer> = PHQ9.iter().zip(scores).map(|(l, s)| Answer::integer(*l, s)).collect();
    if scores.iter().any(|s| *s > 0) {
        items.push(Answer::integer("69722-7", 1));
    }
    items
}

fn envelope<E: Event>(subject: &str, at: DateTime<Utc>) -> Envelope {
    let mut e = Envelope::new(E::NAME, STUDY, "test", Timestamp::from(at));
    e.subject_id = Some(subject.into());
    e.site_id = Some("701".into());
    e
}

/// One message as an app sends it.
struct Sent {
    submission: QuestionnaireResponseSubmitted,
    received_at: DateTime<Utc>,
    with_event_id_header: bool,
}

/// What the test expects of each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Accepted { late_sync: bool },
    Rejected(&'static str),
    Duplicate,
}

async fn produce(producer: &FutureProducer, topic: &str, sent: &Sent) -> anyhow::Result<()> {
    let s = &sent.submission;
    let payload = encode(s)?;
    let key = s.envelope.subject_id.clone().unwrap_or_default();
    let received = sent.received_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let event_id = s.envelope.event_id.to_string();
    let mut headers =
        OwnedHeaders::new().insert(Header { key: "received_at", value: Some(received.as_str()) });
    if sent.with_event_id_header {
        headers = headers.insert(Header { key: "event_id", value: Some(event_id.as_str()) });
    }
    let record = FutureRecord::to(topic).key(&key).payload(&payload).headers(headers);
    producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    Ok(())
}

/// The validation consumer on private topics (`partitions` each, dead-letter topics 1) and
/// schemas, with the relay publishing its outbox and a source outbox for the lifecycle events a
/// test feeds it.
struct Stack {
    names: TopicNames,
    schema: SchemaName,
    pool: PgPool,
    outbox: Outbox,
    relay: RunningRelay,
    shutdown: CancellationToken,
    consumer: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Stack {
    async fn start(partitions: i32) -> anyhow::Result<Self> {
        init_logs();
        let names = TopicNames::new(format!("{}.", unique("epro").replace('_', "-")));
        trialflow_outbox::kafka::ensure_catalogue_topics(&kafka(), &names, partitions, topics::DLQ_SUFFIX)
            .await?;
        let url = database_url();
        let (source, schema) = (SchemaName::new(unique("src"))?, SchemaName::new(unique("epro"))?);
        trialflow_outbox::migrate(&url, &source).await?;
        epro::migrate(&url, &schema).await?;
        let pool = PgPool::connect(&url).await?;
        let outbox = Outbox::open(&pool, source.clone()).await?;
        let relay = RunningRelay::start(relay_config(&kafka(), vec![source.clone(), schema.clone()]));
        let shutdown = CancellationToken::new();
        let mut config = ConsumerConfig::local();
        config.database.database_url = url.clone();
        config.kafka = kafka();
        config.group_id = Some(format!("epro-{schema}"));
        config.park_retry_ms = 200;
        config.max_backoff_ms = 500;
        let run = trialflow_consumers::runtime::run(
            epro::spec(schema.clone(), &names),
            config,
            EproValidation::new(schema.clone(), names.clone(), Catalogue::load(None)?),
            shutdown.clone(),
        );
        let consumer = tokio::spawn(async move { Ok(run.await?) });
        Ok(Self { names, schema, pool, outbox, relay, shutdown, consumer })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.consumer.await??;
        self.relay.stop().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_submissions_each_end_in_exactly_one_outcome() -> anyhow::Result<()> {
    let stack = Stack::start(4).await?;
    let (names, schema, outbox, pool) = (&stack.names, &stack.schema, &stack.outbox, stack.pool.clone());

    // 50 subjects enrolled 30 days ago in New York; 10 of them are announced only at the end.
    let now = Utc::now();
    let enrolled_at = now - chrono::Duration::days(30);
    let subjects: Vec<String> = (0..50).map(|i| format!("701-{i:03}")).collect();
    let lifecycle = |subject: &str| -> anyhow::Result<Vec<OutboxEvent>> {
        let screened = SubjectScreened {
            envelope: envelope::<SubjectScreened>(subject, enrolled_at - chrono::Duration::days(3)),
            screening_number: format!("SCR-{subject}"),
            time_zone: "America/New_York".into(),
            age_years: Some(60),
            sex: None,
        };
        let enrolled = SubjectEnrolled {
            envelope: envelope::<SubjectEnrolled>(subject, enrolled_at),
            randomization_number: "R001-0001".into(),
            kit_number: "K1".into(),
        };
        Ok(vec![
            OutboxEvent::avro(&screened, names.of::<SubjectScreened>(), subject)?,
            OutboxEvent::avro(&enrolled, names.of::<SubjectEnrolled>(), subject)?,
        ])
    };
    let mut tx = pool.begin().await?;
    for subject in &subjects[..40] {
        outbox.enqueue_all(&mut tx, &lifecycle(subject)?).await?;
    }
    tx.commit().await?;

    // The submissions: 920 valid, 50 late syncs, 30 invalid (six kinds); then 50 exact and 20
    // conflicting duplicates of earlier valid ones; and 7 garbage messages.
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut messages: Vec<(Sent, Expect)> = Vec::new();
    for i in 0..1000usize {
        let subject = &subjects[i % subjects.len()];
        let authored = enrolled_at + chrono::Duration::hours(1 + i as i64 / 2);
        let mut s = QuestionnaireResponseSubmitted {
            envelope: envelope::<QuestionnaireResponseSubmitted>(subject, authored),
            submission_id: Uuid::new_v4(),
            questionnaire: "PHQ-9".into(),
            questionnaire_version: "1.0".into(),
            scheduled_occurrence: None,
            status: ResponseStatus::Completed,
            authored_at: Timestamp::from(authored),
            device_time_zone: "America/New_York".into(),
            items: phq9(std::array::from_fn(|_| rng.random_range(0..=3))),
        };
        let mut received_at = authored + chrono::Duration::minutes(10);
        let expect = match i {
            0..30 => match i % 6 {
                0 => {
                    s.questionnaire = "EQ-5D".into();
                    Expect::Rejected("UNKNOWN_QUESTIONNAIRE")
                }
                1 => {
                    s.questionnaire_version = "0.9".into();
                    Expect::Rejected("UNKNOWN_VERSION")
                }
                2 => {
                    s.items.retain(|a| a.link_id != "44260-8");
                    Expect::Rejected("REQUIRED_ITEM_MISSING")
                }
                3 => {
                    s.items[0].value_integer = Some(9);
                    Expect::Rejected("ANSWER_OUT_OF_RANGE")
                }
                4 => {
                    received_at = authored - chrono::Duration::hours(2);
                    Expect::Rejected("AUTHORED_IN_FUTURE")
                }
                _ => {
                    s.status = ResponseStatus::InProgress;
                    Expect::Rejected("INVALID_STATUS")
                }
            },
            30..80 => {
                received_at = authored + chrono::Duration::days(3);
                Expect::Accepted { late_sync: true }
            }
            _ => Expect::Accepted { late_sync: false },
        };
        messages.push((Sent { submission: s, received_at, with_event_id_header: i % 10 != 0 }, expect));
    }
    let valid: Vec<usize> = (80..1000).collect();
    let picked: Vec<usize> = valid.choose_multiple(&mut rng, 70).copied().collect();
    for (n, &i) in picked.iter().enumerate() {
        let mut again = messages[i].0.submission.clone();
        again.envelope.event_id = Uuid::new_v4(); // an app retry: new message, same submission
        let expect = if n < 50 {
            Expect::Duplicate
        } else {
            again.items[0].value_integer = Some((again.items[0].value_integer.unwrap_or(0) + 1) % 4);
            Expect::Rejected("CONFLICTING_DUPLICATE")
        };
        let received_at = messages[i].0.received_at + chrono::Duration::minutes(1);
        messages.push((Sent { submission: again, received_at, with_event_id_header: true }, expect));
    }

    // One completed response per scheduled occurrence; an amendment may follow.
    for subject in &subjects[..5] {
        let authored = enrolled_at + chrono::Duration::days(14);
        let scheduled = |status| QuestionnaireResponseSubmitted {
            envelope: envelope::<QuestionnaireResponseSubmitted>(subject, authored),
            submission_id: Uuid::new_v4(),
            questionnaire: "PHQ-9".into(),
            questionnaire_version: "1.0".into(),
            scheduled_occurrence: Some("PHQ-9/W2".into()),
            status,
            authored_at: Timestamp::from(authored),
            device_time_zone: "America/New_York".into(),
            items: phq9([1; 9]),
        };
        let received_at = authored + chrono::Duration::minutes(5);
        for (status, expect) in [
            (ResponseStatus::Completed, Expect::Accepted { late_sync: false }),
            (ResponseStatus::Completed, Expect::Rejected("DUPLICATE_OCCURRENCE")),
            (ResponseStatus::Amended, Expect::Accepted { late_sync: false }),
        ] {
            messages.push((
                Sent { submission: scheduled(status), received_at, with_event_id_header: true },
                expect,
            ));
        }
    }

    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(&kafka(), "test-app").create()?;
    let ingestion = names.name(topics::EPRO_SUBMISSIONS);
    for (sent, _) in &messages {
        produce(&producer, &ingestion, sent).await?;
    }
    for garbage in 0..7u8 {
        let bytes: Vec<u8> = (0..40).map(|b| b ^ garbage.wrapping_mul(31)).collect();
        let key = format!("701-{garbage:03}");
        producer
            .send(FutureRecord::to(&ingestion).key(&key).payload(&bytes), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
    }

    // The first 40 subjects' submissions are decided; the last 10 wait for their enrollment.
    let decided = format!("SELECT count(*) FROM {schema}.submission");
    let waiting = format!("SELECT count(*) FROM {schema}.parked");
    let early = messages
        .iter()
        .filter(|(s, _)| subject_index(&s.submission) < 40)
        .map(|(s, _)| s.submission.submission_id)
        .collect::<HashSet<_>>()
        .len() as i64;
    wait_until("enrolled subjects' submissions decided, the others parked", WAIT, || async {
        let parked: i64 = sqlx::query_scalar(AssertSqlSafe(waiting.as_str())).fetch_one(&pool).await?;
        let done: i64 = sqlx::query_scalar(AssertSqlSafe(decided.as_str())).fetch_one(&pool).await?;
        Ok(parked > 0 && done == early)
    })
    .await?;
    let mut tx = pool.begin().await?;
    for subject in &subjects[40..] {
        outbox.enqueue_all(&mut tx, &lifecycle(subject)?).await?;
    }
    tx.commit().await?;
    let distinct =
        messages.iter().map(|(s, _)| s.submission.submission_id).collect::<HashSet<_>>().len() as i64;
    wait_until("every submission decided", WAIT, || async {
        let done: i64 = sqlx::query_scalar(AssertSqlSafe(decided.as_str())).fetch_one(&pool).await?;
        Ok(done == distinct)
    })
    .await?;

    // Outcomes on the responses topic: exactly one per message, except exact duplicates (none).
    let expected_events = messages.iter().filter(|(_, e)| *e != Expect::Duplicate).count();
    let reader = TopicReader::new(&kafka(), &names.name(topics::EPRO_RESPONSES), true)?;
    let read = reader.read_until(WAIT, move |m| m.len() >= expected_events).await?;
    let extra = TopicReader::new(&kafka(), &names.name(topics::EPRO_RESPONSES), true)?
        .read_until_idle(Duration::from_secs(2), WAIT)
        .await?;
    assert_eq!(extra.len().max(read.len()), expected_events, "no outcome twice, none missing");
    let mut accepted: BTreeMap<Uuid, QuestionnaireResponseAccepted> = BTreeMap::new();
    let mut rejected: Vec<QuestionnaireResponseRejected> = Vec::new();
    for m in &read {
        match decode_any(&m.payload)? {
            AnyEvent::QuestionnaireResponseAccepted(a) => {
                assert!(accepted.insert(a.submission_id, a).is_none(), "accepted once");
            }
            AnyEvent::QuestionnaireResponseRejected(r) => rejected.push(r),
            other => anyhow::bail!("unexpected {}", other.name()),
        }
    }
    let mut expected_rejections: BTreeMap<&str, usize> = BTreeMap::new();
    for (sent, expect) in &messages {
        let id = sent.submission.submission_id;
        match expect {
            Expect::Accepted { late_sync } => {
                let a = accepted.get(&id).ok_or_else(|| anyhow::anyhow!("{id} not accepted"))?;
                assert_eq!(a.late_sync, *late_sync, "{id}");
                let window = if a.scheduled_occurrence.is_some() {
                    WindowStatus::InWindow
                } else {
                    WindowStatus::Unscheduled
                };
                assert_eq!(a.window_status, window);
            }
            Expect::Rejected(code) => *expected_rejections.entry(code).or_default() += 1,
            Expect::Duplicate => assert!(accepted.contains_key(&id), "the original of a duplicate stands"),
        }
    }
    let mut got_rejections: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &rejected {
        assert_eq!(r.reasons.len(), 1, "{r:?}");
        *got_rejections.entry(r.reasons[0].code.as_str()).or_default() += 1;
    }
    assert_eq!(got_rejections, expected_rejections);
    let expected_accepted = messages.iter().filter(|(_, e)| matches!(e, Expect::Accepted { .. })).count();
    assert_eq!(accepted.len(), expected_accepted);

    // Accepted responses are stored with their score; item-9 flags follow the answers.
    let stored = format!("SELECT count(*) FROM {schema}.response WHERE total_score IS NOT NULL");
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(stored)).fetch_one(&pool).await?;
    assert_eq!(n, expected_accepted as i64);
    // Every rejected resubmission with other content has its row (the first submission stands).
    let conflicts = format!("SELECT count(*) FROM {schema}.conflicting_submission");
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(conflicts)).fetch_one(&pool).await?;
    assert_eq!(n, expected_rejections.get("CONFLICTING_DUPLICATE").copied().unwrap_or(0) as i64);

    // The service's report reads (the demo's summary) agree with the outcomes it published.
    let decisions = epro::read::decisions(&pool, schema, STUDY).await?;
    let late = accepted.values().filter(|a| a.late_sync).count();
    assert_eq!(
        (decisions.accepted, decisions.accepted_late_sync, decisions.rejected),
        (expected_accepted as i64, late as i64, rejected.len() as i64)
    );
    let reasons: BTreeMap<String, i64> =
        epro::read::rejected_by_reason(&pool, schema, STUDY).await?.into_iter().collect();
    let published: BTreeMap<String, i64> =
        got_rejections.iter().map(|(code, n)| (code.to_string(), *n as i64)).collect();
    assert_eq!(reasons, published);
    let windows = epro::read::accepted_by_window(&pool, schema, STUDY).await?;
    assert_eq!(windows.iter().map(|(_, n)| n).sum::<i64>(), expected_accepted as i64, "{windows:?}");
    assert!(epro::read::decisions(&pool, schema, "ANOTHER-STUDY").await?.accepted == 0);

    // One audit record per decision (none for an exact duplicate), caused by its submission's
    // event, in one unbroken chain written by six partitions' batches.
    let records =
        trialflow_outbox::audit::read(&mut *pool.acquire().await?, schema, Some(STUDY), None, 5000).await?;
    let count = |action: &str| records.iter().filter(|r| r.action == action).count();
    assert_eq!((count("epro.accepted"), count("epro.rejected")), (expected_accepted, rejected.len()));
    assert!(
        records.iter().all(
            |r| r.actor_user == epro::NAME && r.cause.as_deref().is_some_and(|c| c.starts_with("event:"))
        )
    );
    assert!(trialflow_outbox::audit::verify(&pool, schema).await?.is_intact());

    // Only the garbage reached the dead-letter topic.
    let dlq = TopicReader::new(&kafka(), &format!("{ingestion}{}", topics::DLQ_SUFFIX), true)?
        .read_until_idle(Duration::from_secs(3), WAIT)
        .await?;
    assert_eq!(dlq.len(), 7, "{:?}", dlq.iter().map(|m| m.header("dlq.reason")).collect::<Vec<_>>());
    let keys: HashSet<&str> = dlq.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(keys.len(), 7);

    stack.stop().await
}

fn subject_index(s: &QuestionnaireResponseSubmitted) -> usize {
    s.envelope
        .subject_id
        .as_deref()
        .and_then(|id| id.strip_prefix("701-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_strings_are_rejected_and_the_submission_behind_them_is_accepted() -> anyhow::Result<()> {
    // One partition: everything below is in one order, behind the submissions it must not block.
    let stack = Stack::start(1).await?;
    let (names, schema, outbox, pool) = (&stack.names, &stack.schema, &stack.outbox, stack.pool.clone());

    let subject = "701-001";
    let enrolled_at = Utc::now() - chrono::Duration::days(30);
    let enrolled = SubjectEnrolled {
        envelope: envelope::<SubjectEnrolled>(subject, enrolled_at),
        randomization_number: "R001-0001".into(),
        kit_number: "K1".into(),
    };
    let mut tx = pool.begin().await?;
    outbox.enqueue(&mut tx, OutboxEvent::avro(&enrolled, names.of::<SubjectEnrolled>(), subject)?).await?;
    tx.commit().await?;

    let authored = enrolled_at + chrono::Duration::days(1);
    let submission = |tweak: fn(&mut QuestionnaireResponseSubmitted)| {
        let mut s = QuestionnaireResponseSubmitted {
            envelope: envelope::<QuestionnaireResponseSubmitted>(subject, authored),
            submission_id: Uuid::new_v4(),
            questionnaire: "PHQ-9".into(),
            questionnaire_version: "1.0".into(),
            scheduled_occurrence: None,
            status: ResponseStatus::Completed,
            authored_at: Timestamp::from(authored),
            device_time_zone: "America/New_York".into(),
            items: phq9([1; 9]),
        };
        tweak(&mut s);
        s
    };
    let nul_subject = submission(|s| s.envelope.subject_id = Some("701-\u{0}001".into()));
    let cases = [
        (nul_subject.clone(), vec!["INVALID_CHARACTERS"]),
        (
            submission(|s| {
                s.questionnaire_version = "1.0\u{0}".into();
                s.envelope.study_id = format!("{STUDY}\u{1b}");
            }),
            vec!["INVALID_CHARACTERS", "INVALID_CHARACTERS"],
        ),
        (submission(|s| s.items[0].link_id = "4".repeat(10_000)), vec!["TEXT_TOO_LONG"]),
    ];
    let valid = submission(|_| {});
    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(&kafka(), "test-app").create()?;
    let ingestion = names.name(topics::EPRO_SUBMISSIONS);
    let received_at = authored + chrono::Duration::minutes(5);
    let mut resend = nul_subject.clone();
    resend.envelope.event_id = Uuid::new_v4(); // the app retries: an exact duplicate
    for s in cases.iter().map(|(s, _)| s).chain([&valid, &resend]) {
        let sent = Sent { submission: s.clone(), received_at, with_event_id_header: true };
        produce(&producer, &ingestion, &sent).await?;
    }

    let reader = TopicReader::new(&kafka(), &names.name(topics::EPRO_RESPONSES), true)?;
    let expected = cases.len() + 1;
    let read = reader.read_until(WAIT, move |m| m.len() >= expected).await?;
    let mut rejected = BTreeMap::new();
    let mut accepted = Vec::new();
    for m in &read {
        match decode_any(&m.payload)? {
            AnyEvent::QuestionnaireResponseRejected(r) => {
                let codes: Vec<String> = r.reasons.iter().map(|r| r.code.clone()).collect();
                rejected.insert(r.submission_id, (m.key.clone(), r.envelope.subject_id.clone(), codes));
            }
            AnyEvent::QuestionnaireResponseAccepted(a) => accepted.push(a.submission_id),
            other => anyhow::bail!("unexpected {}", other.name()),
        }
    }
    assert_eq!(accepted, [valid.submission_id], "the valid submission behind them is accepted");
    for (s, codes) in &cases {
        let (_, _, got) = rejected.get(&s.submission_id).context("not rejected")?;
        assert_eq!(got, codes, "{:?}", s.envelope.subject_id);
    }
    // The rejection names the subject as far as it can be stored: the NUL replaced.
    let (key, subject_id, _) = &rejected[&nul_subject.submission_id];
    assert_eq!((key.as_str(), subject_id.as_deref()), ("701-\u{fffd}001", Some("701-\u{fffd}001")));

    let decided = format!("SELECT count(*) FROM {schema}.submission");
    wait_until("every submission decided", WAIT, || async {
        Ok(sqlx::query_scalar::<_, i64>(AssertSqlSafe(decided.as_str())).fetch_one(&pool).await? == 4)
    })
    .await?;
    let outcomes: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT subject_id, outcome FROM {schema}.submission ORDER BY outcome, subject_id"
    )))
    .fetch_all(&pool)
    .await?;
    assert_eq!(outcomes[0], (subject.to_string(), "accepted".to_string()));
    assert_eq!(outcomes.iter().filter(|(_, o)| o == "rejected").count(), 3, "{outcomes:?}");
    // The exact resend adds no outcome; nothing was dead-lettered.
    let again = TopicReader::new(&kafka(), &names.name(topics::EPRO_RESPONSES), true)?
        .read_until_idle(Duration::from_secs(2), WAIT)
        .await?;
    assert_eq!(again.len(), cases.len() + 1);
    let dlq = TopicReader::new(&kafka(), &format!("{ingestion}{}", topics::DLQ_SUFFIX), true)?
        .read_until_idle(Duration::from_secs(1), WAIT)
        .await?;
    assert!(dlq.is_empty(), "{:?}", dlq.iter().map(|m| m.header("dlq.reason")).collect::<Vec<_>>());

    stack.stop().await
}
