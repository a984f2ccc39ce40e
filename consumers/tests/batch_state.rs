//! The batch state of the epro-validation and monitoring handlers (`Handler::Batch`): a batch
//! decides every message exactly as the messages would be decided one transaction each — a
//! message sees the effects of the earlier ones of its batch — and a batch that fails and runs
//! again has its effects once. The handlers are driven here the way the runtime drives them
//! (`prepare`, `handle` per message, `finish`, the queued events, commit), without the broker;
//! `epro.rs` and `runtime.rs` run the whole runtime.

mod common;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, PgPool};
use trialflow_consumers::epro::{self, EproValidation, catalogue::Catalogue};
use trialflow_consumers::monitoring::{self, Monitoring, rules::RuleBook};
use trialflow_consumers::{Context, Handler, HandlerError, Message};
use trialflow_outbox::{Outbox, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::*;
use trialflow_testkit::{database_url, init_logs, unique};
use uuid::Uuid;

use common::drive::{apply, message};

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339).map(|t| t.to_utc()).unwrap_or_default()
}

/// Applies each message of `batch` in a transaction of its own.
async fn apply_alone<H: Handler>(
    handler: &H,
    pool: &PgPool,
    outbox: &Arc<Outbox>,
    batch: &[Message],
) -> anyhow::Result<Vec<Vec<String>>> {
    let mut outcomes = Vec::new();
    for msg in batch {
        let one = apply(handler, pool, outbox, std::slice::from_ref(msg)).await?;
        outcomes.extend(one.map_err(|e| anyhow::anyhow!("applying offset {} alone: {e}", msg.offset))?);
    }
    Ok(outcomes)
}

async fn scalar(pool: &PgPool, schema: &SchemaName, sql: &str) -> anyhow::Result<i64> {
    let sql = sql.replace("{s}", schema.as_str());
    Ok(sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(pool).await?)
}

async fn strings(pool: &PgPool, schema: &SchemaName, sql: &str) -> anyhow::Result<Vec<String>> {
    let sql = sql.replace("{s}", schema.as_str());
    Ok(sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(pool).await?)
}

const STUDY: &str = "BATCH-IT";
const PHQ9: [&str; 9] =
    ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8"];

/// A PHQ-9 week-2 submission of subject 701-001 (enrolled 2026-06-01 in New York), all items
/// `score` (at least 1: the difficulty item it answers is only asked then).
fn submission(score: i32, status: ResponseStatus) -> QuestionnaireResponseSubmitted {
    let mut envelope = Envelope::new(
        QuestionnaireResponseSubmitted::NAME,
        STUDY,
        "epro-app",
        Timestamp::from(at("2026-06-15T16:00:00Z")),
    );
    envelope.subject_id = Some("701-001".into());
    let mut items: Vec<Answer> = PHQ9.iter().map(|l| Answer::integer(*l, score)).collect();
    items.push(Answer::integer("69722-7", 1));
    QuestionnaireResponseSubmitted {
        envelope,
        submission_id: Uuid::new_v4(),
        questionnaire: "PHQ-9".into(),
        questionnaire_version: "1.0".into(),
        scheduled_occurrence: Some("PHQ-9/W2".into()),
        status,
        authored_at: Timestamp::from(at("2026-06-15T16:00:00Z")),
        device_time_zone: "America/New_York".into(),
        items,
    }
}

/// A fresh epro schema with subject 701-001 enrolled, and its handler (on topics `names`).
async fn epro_schema(
    pool: &PgPool,
    names: &TopicNames,
) -> anyhow::Result<(SchemaName, EproValidation, Arc<Outbox>)> {
    let schema = SchemaName::new(unique("epro_batch"))?;
    epro::migrate(&database_url(), &schema).await?;
    let seed = format!(
        "INSERT INTO {schema}.subject (study_id, subject_id, time_zone, enrolled_at)
         VALUES ($1, '701-001', 'America/New_York', '2026-06-01T14:00:00Z')"
    );
    sqlx::query(AssertSqlSafe(seed)).bind(STUDY).execute(pool).await?;
    let handler = EproValidation::new(schema.clone(), names.clone(), Catalogue::load(None)?);
    let outbox = Arc::new(Outbox::open(pool, schema.clone()).await?);
    Ok((schema, handler, outbox))
}

/// One subject's submissions in one batch: a completed week-2 response, its exact resend, a
/// resend of its id with other answers, a second completed response for week 2 and an amendment.
fn epro_batch(topic: &str) -> Vec<Message> {
    let first = submission(1, ResponseStatus::Completed);
    let mut resent = first.clone();
    resent.envelope.event_id = Uuid::new_v4();
    let mut changed = submission(2, ResponseStatus::Completed);
    changed.submission_id = first.submission_id;
    let second = submission(3, ResponseStatus::Completed);
    let amended = submission(1, ResponseStatus::Amended);
    let received = Some(at("2026-06-15T16:05:00Z"));
    [first, resent, changed, second, amended]
        .iter()
        .zip(0..)
        .map(|(s, offset)| message(topic, offset, s, received))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_of_one_subject_in_one_batch_see_each_other() -> anyhow::Result<()> {
    init_logs();
    let pool = PgPool::connect(&database_url()).await?;
    let names = TopicNames::new(format!("{}.", unique("epro-batch")));
    let (schema, handler, outbox) = epro_schema(&pool, &names).await?;
    let batch = epro_batch(&names.name(topics::EPRO_SUBMISSIONS));
    let outcomes = apply(&handler, &pool, &outbox, &batch).await?.map_err(anyhow::Error::msg)?;
    let accepted = || vec![QuestionnaireResponseAccepted::NAME.to_string()];
    let rejected = || vec![QuestionnaireResponseRejected::NAME.to_string()];
    assert_eq!(
        outcomes,
        vec![accepted(), vec![], rejected(), rejected(), accepted()],
        "accepted; exact resend acknowledged; other content and second completion rejected; amendment accepted"
    );
    let decided = strings(
        &pool,
        &schema,
        "SELECT outcome || ':' || (SELECT coalesce(string_agg(r->>'code', ','), '') FROM jsonb_array_elements(reasons) r)
         FROM {s}.submission ORDER BY 1",
    )
    .await?;
    assert_eq!(decided, ["accepted:", "accepted:", "rejected:DUPLICATE_OCCURRENCE"]);
    assert_eq!(scalar(&pool, &schema, "SELECT count(*) FROM {s}.response").await?, 2);
    let conflicts = strings(
        &pool,
        &schema,
        "SELECT r->>'code' FROM {s}.conflicting_submission, jsonb_array_elements(reasons) r",
    )
    .await?;
    assert_eq!(conflicts, ["CONFLICTING_DUPLICATE"]);
    assert_eq!(scalar(&pool, &schema, "SELECT count(*) FROM {s}.outbox").await?, 4);

    // The same messages one transaction each: the same decisions.
    let (alone_schema, handler, outbox) = epro_schema(&pool, &names).await?;
    let alone = apply_alone(&handler, &pool, &outbox, &batch).await?;
    assert_eq!(alone, outcomes);
    for schema in [schema, alone_schema] {
        sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_loses_a_race_fails_whole_and_decides_again_once() -> anyhow::Result<()> {
    init_logs();
    let pool = PgPool::connect(&database_url()).await?;
    let names = TopicNames::new(format!("{}.", unique("epro-batch")));
    let (schema, handler, outbox) = epro_schema(&pool, &names).await?;
    let batch = epro_batch(&names.name(topics::EPRO_SUBMISSIONS));
    let mut tx = pool.begin().await?;
    let mut state = handler.prepare(&mut tx, &batch).await?;
    // Another partition decides the first submission's id after this batch read it (not there).
    let other = format!(
        "INSERT INTO {schema}.submission (submission_id, study_id, subject_id, content_hash, outcome)
         VALUES ($1, $2, '701-001', 'another', 'rejected')"
    );
    let Some(Ok(AnyEvent::QuestionnaireResponseSubmitted(first))) =
        batch[0].payload.as_deref().map(decode_any)
    else {
        anyhow::bail!("the first message is a submission");
    };
    sqlx::query(AssertSqlSafe(other)).bind(first.submission_id).bind(STUDY).execute(&pool).await?;
    for msg in &batch {
        let mut ctx = Context::new(outbox.clone());
        handler.handle(&mut tx, msg, &mut ctx, &mut state).await?;
    }
    let failed = handler.finish(&mut tx, state, &mut Context::new(outbox.clone())).await;
    assert!(matches!(failed, Err(HandlerError::Transient(_))), "{failed:?}");
    tx.rollback().await?;
    assert_eq!(
        scalar(&pool, &schema, "SELECT count(*) FROM {s}.submission").await?,
        1,
        "nothing of the batch"
    );

    // Run again (the runtime's retry): the first one is now a conflicting resubmission, and so
    // are its resends; every effect once.
    let outcomes = apply(&handler, &pool, &outbox, &batch).await?.map_err(anyhow::Error::msg)?;
    let rejected = || vec![QuestionnaireResponseRejected::NAME.to_string()];
    let accepted = || vec![QuestionnaireResponseAccepted::NAME.to_string()];
    assert_eq!(outcomes, vec![rejected(), rejected(), rejected(), accepted(), accepted()]);
    assert_eq!(scalar(&pool, &schema, "SELECT count(*) FROM {s}.submission").await?, 3);
    assert_eq!(scalar(&pool, &schema, "SELECT count(*) FROM {s}.conflicting_submission").await?, 3);
    assert_eq!(scalar(&pool, &schema, "SELECT count(*) FROM {s}.outbox").await?, 5);
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await?;
    Ok(())
}

/// A reading of subject 801-001 at `minutes` past 2026-06-15 08:00 UTC.
fn reading(code: &str, value: f64, unit: &str, minutes: i64, visit: &str) -> VitalSignRecorded {
    let when = at("2026-06-15T08:00:00Z") + chrono::Duration::minutes(minutes);
    let mut envelope = Envelope::new(VitalSignRecorded::NAME, STUDY, "edc", Timestamp::from(when));
    envelope.subject_id = Some("801-001".into());
    envelope.site_id = Some("801".into());
    VitalSignRecorded {
        envelope,
        observation_id: Uuid::new_v4().to_string(),
        loinc_code: code.into(),
        value,
        unit: unit.into(),
        position: None,
        effective: PartialDateTime::parse(&when.format("%Y-%m-%dT%H:%M:%S").to_string()),
        visit: Some(visit.into()),
        visit_day: None,
    }
}

async fn monitoring_schema(pool: &PgPool) -> anyhow::Result<(SchemaName, Monitoring, Arc<Outbox>)> {
    let schema = SchemaName::new(unique("mon_batch"))?;
    monitoring::migrate(&database_url(), &schema).await?;
    let names = TopicNames::new(format!("{}.", unique("mon-batch")));
    let handler = Monitoring::new(schema.clone(), names, RuleBook::load(None).map_err(anyhow::Error::msg)?);
    let outbox = Arc::new(Outbox::open(pool, schema.clone()).await?);
    Ok((schema, handler, outbox))
}

/// Episodes by rule with their evidence count.
async fn episodes(pool: &PgPool, schema: &SchemaName) -> anyhow::Result<Vec<String>> {
    strings(
        pool,
        schema,
        "SELECT a.rule_id || ':' || count(e.event_id) FROM {s}.alert a JOIN {s}.alert_evidence e USING (alert_id)
         GROUP BY a.alert_id, a.rule_id ORDER BY a.rule_id",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_of_one_subject_in_one_batch_open_one_episode_then_add_to_it() -> anyhow::Result<()> {
    init_logs();
    let pool = PgPool::connect(&database_url()).await?;
    let (schema, handler, outbox) = monitoring_schema(&pool).await?;
    let topic = TopicNames::new("").name(topics::CLINICAL_OBSERVATIONS);
    let readings = [
        // Two high heart rates: one episode, then evidence for it.
        reading("8867-4", 140.0, "/min", 0, "DAY 1"),
        reading("8867-4", 150.0, "/min", 5, "DAY 1"),
        // A visit's three systolic readings: the mean of three needs the two before it.
        reading("8480-6", 185.0, "mm[Hg]", 10, "DAY 1"),
        reading("8480-6", 186.0, "mm[Hg]", 11, "DAY 1"),
        reading("8480-6", 190.0, "mm[Hg]", 12, "DAY 1"),
        // Weights at three visits, then one far from them: judged against the three before it.
        reading("29463-7", 70.0, "kg", 20, "DAY 2"),
        reading("29463-7", 70.5, "kg", 1460, "DAY 3"),
        reading("29463-7", 70.0, "kg", 2900, "DAY 4"),
        reading("29463-7", 80.0, "kg", 4340, "DAY 5"),
    ];
    let batch: Vec<Message> = readings.iter().zip(0..).map(|(r, i)| message(&topic, i, r, None)).collect();
    let outcomes = apply(&handler, &pool, &outbox, &batch).await?.map_err(anyhow::Error::msg)?;
    assert_eq!(outcomes[0], [AlertRaised::NAME]);
    assert_eq!(outcomes[1], [AlertUpdated::NAME], "the second reading adds to the episode the first opened");
    assert_eq!(outcomes[4].iter().filter(|e| *e == AlertRaised::NAME).count(), 1, "the visit mean of three");
    assert_eq!(outcomes[8], [AlertRaised::NAME], "the weight far from the three before it");
    let found = episodes(&pool, &schema).await?;
    assert_eq!(
        found,
        ["BASELINE-WEIGHT:4", "CTCAE-HTN-G3:3", "PROTOCOL-HR-HIGH:2", "PROTOCOL-HTN-SEVERE:3"],
        "one episode per rule, with every reading as evidence"
    );
    assert_eq!(scalar(&pool, &schema, "SELECT count(*) FROM {s}.observation").await?, 9);

    // One transaction each: the same signals and episodes.
    let (alone_schema, handler, outbox) = monitoring_schema(&pool).await?;
    let alone = apply_alone(&handler, &pool, &outbox, &batch).await?;
    assert_eq!(alone, outcomes);
    assert_eq!(episodes(&pool, &alone_schema).await?, found);

    // The batch again (a redelivery whose inbox rows expired): nothing new.
    let again = apply(&handler, &pool, &outbox, &batch).await?.map_err(anyhow::Error::msg)?;
    assert!(again.iter().all(Vec::is_empty), "{again:?}");
    assert_eq!(episodes(&pool, &alone_schema).await?, found);
    assert_eq!(scalar(&pool, &alone_schema, "SELECT count(*) FROM {s}.observation").await?, 9);
    for schema in [schema, alone_schema] {
        sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await?;
    }
    Ok(())
}

/// A reading delivered again (its inbox row expired) counts once in its series, in a batch beside
/// a new reading: two systolic readings of a visit are stored, then one of them comes again. Were
/// it counted twice, the visit would have a mean of three readings at or above 180 mm[Hg].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_reading_counts_once_in_its_series() -> anyhow::Result<()> {
    init_logs();
    let pool = PgPool::connect(&database_url()).await?;
    let (schema, handler, outbox) = monitoring_schema(&pool).await?;
    let topic = TopicNames::new("").name(topics::CLINICAL_OBSERVATIONS);
    let low = reading("8480-6", 175.0, "mm[Hg]", 10, "DAY 1");
    let high = reading("8480-6", 190.0, "mm[Hg]", 11, "DAY 1");
    let stored = [message(&topic, 0, &low, None), message(&topic, 1, &high, None)];
    apply(&handler, &pool, &outbox, &stored).await?.map_err(anyhow::Error::msg)?;
    let before = episodes(&pool, &schema).await?;
    assert_eq!(before, ["CTCAE-HTN-G3:2"], "each reading at or above 160, no visit mean of two");

    let heart_rate = reading("8867-4", 130.0, "/min", 12, "DAY 1");
    let again = [message(&topic, 2, &high, None), message(&topic, 3, &heart_rate, None)];
    let outcomes = apply(&handler, &pool, &outbox, &again).await?.map_err(anyhow::Error::msg)?;
    assert_eq!(outcomes[0], Vec::<String>::new(), "the reading delivered again changes nothing");
    assert_eq!(outcomes[1], [AlertRaised::NAME], "the new reading beside it is judged");
    assert_eq!(episodes(&pool, &schema).await?, ["CTCAE-HTN-G3:2", "PROTOCOL-HR-HIGH:1"]);
    assert_eq!(scalar(&pool, &schema, "SELECT count(*) FROM {s}.observation").await?, 3);

    // A third reading of the visit does make a mean of three (≥ 180): the rule was in reach.
    let third = reading("8480-6", 185.0, "mm[Hg]", 13, "DAY 1");
    let outcomes = apply(&handler, &pool, &outbox, &[message(&topic, 4, &third, None)])
        .await?
        .map_err(anyhow::Error::msg)?;
    assert!(outcomes[0].iter().any(|e| e == AlertRaised::NAME), "{outcomes:?}");
    assert_eq!(
        episodes(&pool, &schema).await?,
        ["CTCAE-HTN-G3:3", "PROTOCOL-HR-HIGH:1", "PROTOCOL-HTN-SEVERE:3"]
    );
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await?;
    Ok(())
}

/// Through the runtime and the broker: one partition's backlog of submissions (so one batch, or
/// few) with undecodable bytes in the middle and a redelivered event; the first attempt to write
/// the batch's decisions fails (a serialization failure injected once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_in_a_batch_is_dead_lettered_and_a_failed_batch_applies_once() -> anyhow::Result<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use tokio_util::sync::CancellationToken;
    use trialflow_consumers::ConsumerConfig;
    use trialflow_testkit::{kafka, wait_until};

    init_logs();
    let pool = PgPool::connect(&database_url()).await?;
    let names = TopicNames::new(format!("{}.", unique("epro-poison").replace('_', "-")));
    trialflow_outbox::kafka::ensure_catalogue_topics(&kafka(), &names, 1, topics::DLQ_SUFFIX).await?;
    let (schema, handler, _) = epro_schema(&pool, &names).await?;
    for sql in [
        "CREATE SEQUENCE {s}.injected",
        "CREATE FUNCTION {s}.fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF nextval('{s}.injected') = 1 THEN
                 RAISE EXCEPTION 'injected failure' USING ERRCODE = '40001';
             END IF;
             RETURN NULL;
         END $$",
        "CREATE TRIGGER fail_once BEFORE INSERT ON {s}.submission
         FOR EACH STATEMENT EXECUTE FUNCTION {s}.fail_once()",
    ] {
        sqlx::query(AssertSqlSafe(sql.replace("{s}", schema.as_str()))).execute(&pool).await?;
    }

    let topic = names.name(topics::EPRO_SUBMISSIONS);
    let good: Vec<Message> = [1, 2, 3]
        .map(|score| {
            let mut s = submission(score, ResponseStatus::Amended);
            s.scheduled_occurrence = None;
            message(&topic, 0, &s, Some(at("2026-06-15T16:05:00Z")))
        })
        .into_iter()
        .collect();
    let garbage = Message {
        payload: Some(b"\x00 not avro".to_vec()),
        headers: vec![("event_id".to_string(), Uuid::new_v4().to_string().into_bytes())],
        ..good[0].clone()
    };
    let backlog = [&good[0], &good[1], &garbage, &good[2], &good[0]];
    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(&kafka(), "batch-it").create()?;
    for m in backlog {
        let mut headers = OwnedHeaders::new();
        for (name, value) in &m.headers {
            headers = headers.insert(Header { key: name, value: Some(value.as_slice()) });
        }
        let payload = m.payload.clone().unwrap_or_default();
        let key = m.key.clone().unwrap_or_default();
        let record = FutureRecord::to(&topic).key(&key).payload(&payload).headers(headers);
        producer.send(record, std::time::Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    }

    let mut config = ConsumerConfig::local();
    config.kafka = kafka();
    config.database.database_url = database_url();
    config.group_id = Some(format!("batch-it-{schema}"));
    config.max_backoff_ms = 200;
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(trialflow_consumers::runtime::run(
        epro::spec(schema.clone(), &names),
        config,
        handler,
        stop.clone(),
    ));
    let outbox_rows = "SELECT count(*) FROM {s}.outbox";
    let settled =
        wait_until("three decisions and a dead letter", std::time::Duration::from_secs(120), || async {
            Ok(scalar(&pool, &schema, outbox_rows).await? >= 4)
        })
        .await;
    stop.cancel();
    consumer.await??;
    settled?;
    let decisions = "SELECT count(*) FROM {s}.outbox WHERE event_type = 'QuestionnaireResponseAccepted'";
    assert_eq!(scalar(&pool, &schema, decisions).await?, 3, "each submission decided once");
    let dlq = format!("SELECT count(*) FROM {{s}}.outbox WHERE topic = '{topic}{}'", topics::DLQ_SUFFIX);
    assert_eq!(scalar(&pool, &schema, &dlq).await?, 1, "the undecodable message dead-lettered");
    assert_eq!(scalar(&pool, &schema, outbox_rows).await?, 4);
    assert_eq!(scalar(&pool, &schema, "SELECT count(*) FROM {s}.submission").await?, 3);
    assert!(
        scalar(&pool, &schema, "SELECT last_value FROM {s}.injected").await? >= 2,
        "the injected failure happened, and the batch ran again"
    );
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await?;
    Ok(())
}
