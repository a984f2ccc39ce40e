//! After a replay the pipeline keeps serving (`make demo`), and the ePRO gateway's clock, which
//! the replay drove along the study's 2014 timeline, follows real time again: a PHQ-9 authored
//! now, built as `docs/questionnaires.md` says, for a subject the replay enrolled, is taken by the
//! gateway (not 422 `in_the_future`) and accepted by the validation consumer (not rejected
//! `AUTHORED_IN_FUTURE`), judged on the real arrival time.
//!
//! The replay is a slice of one site, cut after its first subject's first questionnaire, on
//! private schemas and topics, as in `cdisc_pilot_replay.rs`.

use std::time::Duration;

use chrono::Utc;
use sqlx::Row;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::epro;
use trialflow_consumers::epro::catalogue::Catalogue;
use trialflow_consumers::epro::reference;
use trialflow_outbox::kafka::TopicReader;
use trialflow_pipeline::PipelineConfig;
use trialflow_schemas::{AnyEvent, Timestamp, WindowStatus, topics};
use trialflow_simulation::cdisc_pilot::plan::{self as pilot, Action, Plan};
use trialflow_simulation::replay::{self, ReplayOptions};
use trialflow_testkit::{database_url, init_logs, kafka, wait_until};
use uuid::Uuid;

const SITE: &str = "707";
const APP_TOKEN: &str = "app-token";

fn data_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.data/cdisc-pilot")
}

/// The plan up to and including the first questionnaire submission, and that submission's subject
/// (enrolled by then: the replay waits for the validator to know the enrollment before it submits).
fn first_subject_slice(mut plan: Plan) -> anyhow::Result<(Plan, String)> {
    let Some(cut) = plan.steps.iter().position(|s| matches!(s.action, Action::Submit { .. })) else {
        anyhow::bail!("site {SITE} has no questionnaire submission in the plan");
    };
    plan.steps.truncate(cut + 1);
    let Action::Submit { submission, .. } = &plan.steps[cut].action else { unreachable!("matched above") };
    let subject = submission.envelope.subject_id.clone().unwrap_or_default();
    Ok((plan, subject))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_replay_a_phq9_authored_now_is_accepted_on_the_real_clock() -> anyhow::Result<()> {
    init_logs();
    let (plan, subject) = first_subject_slice(replay::load_plan(&data_dir(), &[SITE.to_string()])?)?;
    let replayed_until = plan.steps.last().map(|s| s.at).unwrap_or_default();

    let shutdown = CancellationToken::new();
    let (pipeline, clock, config) = replay::start_pipeline(
        PipelineConfig::isolated("live", &database_url(), &kafka())?,
        &data_dir(),
        replay::first_instant(&plan),
        &shutdown,
    )
    .await?;
    let options = ReplayOptions {
        data_dir: data_dir(),
        sites: vec![SITE.to_string()],
        days_per_second: 0.0,
        settle_timeout: Duration::from_secs(120),
        progress: false,
        summary_path: None,
    };
    let summary = replay::replay(&plan, &pipeline, &config, &clock, &options, &shutdown).await?;
    assert_eq!(summary.study.epro.accepted, 1, "the replayed submission, judged on the timeline");
    assert!(summary.study.subjects.enrolled >= 1);
    assert!(clock.is_real_time(), "the replay left the gateway's clock at {}", clock.now());

    // A PHQ-9 built as docs/questionnaires.md says, authored now, outside the schedule.
    let catalogue = Catalogue::load(None)?;
    let phq9 = catalogue.questionnaire("PHQ-9", "1.0").map_err(|e| anyhow::anyhow!("PHQ-9 1.0: {e:?}"))?;
    let now = Utc::now();
    assert!(now - replayed_until > chrono::Duration::days(365), "the replay's timeline lies years back");
    let mut s = reference::example_submission(phq9, None, now);
    s.envelope.event_id = Uuid::now_v7();
    s.envelope.study_id = pilot::STUDY_ID.to_string();
    s.envelope.site_id = Some(SITE.to_string());
    s.envelope.subject_id = Some(subject.clone());
    s.envelope.recorded_at = Timestamp::from(now);
    s.submission_id = Uuid::new_v4();

    let responses = TopicReader::new(&config.relay.kafka, &config.topics.name(topics::EPRO_RESPONSES), true)?;
    let sent = Utc::now();
    let reply = reqwest::Client::new()
        .post(format!("http://{}/v1/submissions", pipeline.epro_gateway_addr()))
        .bearer_auth(APP_TOKEN)
        .json(&s)
        .send()
        .await?;
    let status = reply.status();
    let body = reply.text().await?;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "the gateway refused a live submission: {body}");

    // The validator's decision, as stored and as announced.
    let pool = sqlx::PgPool::connect(&database_url()).await?;
    let decided = format!(
        "SELECT outcome, reasons::text FROM {}.submission WHERE submission_id = $1",
        config.schemas[epro::NAME]
    );
    let id = s.submission_id;
    wait_until("the live submission is decided", Duration::from_secs(60), || {
        let (pool, decided) = (pool.clone(), decided.clone());
        async move {
            let row = sqlx::query(sqlx::AssertSqlSafe(decided)).bind(id).fetch_optional(&pool).await?;
            Ok(row.is_some())
        }
    })
    .await?;
    let row = sqlx::query(sqlx::AssertSqlSafe(decided)).bind(id).fetch_one(&pool).await?;
    let (outcome, reasons): (String, String) = (row.try_get(0)?, row.try_get(1)?);
    assert_eq!(outcome, "accepted", "rejected: {reasons}");

    let response = format!(
        "SELECT received_at, late_sync, window_status, total_score, severity_band FROM {}.response \
         WHERE submission_id = $1",
        config.schemas[epro::NAME]
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(response)).bind(id).fetch_one(&pool).await?;
    let received_at: chrono::DateTime<Utc> = row.try_get(0)?;
    assert!(
        sent - chrono::Duration::seconds(1) <= received_at && received_at <= Utc::now(),
        "received_at {received_at} is the real arrival (sent {sent})"
    );
    assert!(!row.try_get::<bool, _>(1)?, "not a late sync");
    assert_eq!(row.try_get::<String, _>(2)?, "UNSCHEDULED");
    assert_eq!(row.try_get::<Option<i32>, _>(3)?, Some(8));
    assert_eq!(row.try_get::<Option<String>, _>(4)?.as_deref(), Some("mild"));

    let announced = responses
        .read_until(Duration::from_secs(60), move |read| {
            read.iter().any(|m| match trialflow_schemas::decode_any(&m.payload) {
                Ok(AnyEvent::QuestionnaireResponseAccepted(a)) => a.submission_id == id,
                _ => false,
            })
        })
        .await?;
    let accepted = announced
        .iter()
        .find_map(|m| match trialflow_schemas::decode_any(&m.payload) {
            Ok(AnyEvent::QuestionnaireResponseAccepted(a)) if a.submission_id == id => Some(a),
            _ => None,
        })
        .ok_or_else(|| anyhow::anyhow!("no QuestionnaireResponseAccepted for {id} on the responses topic"))?;
    assert_eq!((accepted.questionnaire.as_str(), accepted.questionnaire_version.as_str()), ("PHQ-9", "1.0"));
    assert_eq!(accepted.window_status, WindowStatus::Unscheduled);
    assert!(!accepted.late_sync);
    assert_eq!(accepted.envelope.subject_id.as_deref(), Some(subject.as_str()));

    pipeline.stop().await?;
    Ok(())
}
