//! A data query's life over the real stack (`make up`): an EDC's systolic blood pressure of
//! 400 mm[Hg] reaches the risk service through an outbox and the relay; its edit check opens a
//! query; site staff of the subject's site answer it through the site API (`QueryAnswered`), a
//! researcher closes it through the alert API (`QueryClosed`); each event reaches the risk
//! consumer through the relay, and the query ends `closed`.
//!
//! On the way: a token of another site sees none of it (an empty list, 404 on the answer), a
//! researcher of another study neither; the second answer and the second closing are 409 (while
//! the first awaits the risk consumer, and after it applied it); a closing before the answer is
//! 409; hostile bodies are refused with a 4xx naming the field and write nothing.

use std::time::Duration;

use anyhow::{Context, ensure};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::monitoring::{self, api::AlertApi, api::AlertApiConfig};
use trialflow_consumers::{ConsumerConfig, ConsumerError, risk};
use trialflow_http::auth::{Role, TokenGrant};
use trialflow_http::oidc::OidcSettings;
use trialflow_outbox::{Outbox, OutboxEvent, SchemaName};
use trialflow_producers::site_api;
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{Envelope, Event, PartialDateTime, Timestamp, VitalSignRecorded};
use trialflow_testkit::idp::TestIdp;
use trialflow_testkit::{RunningRelay, database_url, init_logs, kafka, relay_config, unique};
use uuid::Uuid;

mod common;

const WAIT: Duration = Duration::from_secs(120);
const STUDY: &str = "QUERYTEST";
const SUBJECT: &str = "701-0001";

/// The stack of one test: its schemas, the relay, the risk consumer and the two APIs.
struct Stack {
    http: Client,
    pool: PgPool,
    risk: SchemaName,
    site: SchemaName,
    monitoring: SchemaName,
    site_base: String,
    alerts_base: String,
    stop: CancellationToken,
    servers: Vec<JoinHandle<anyhow::Result<()>>>,
    consumer: JoinHandle<Result<(), ConsumerError>>,
    relay: RunningRelay,
}

impl Stack {
    async fn start(idp: &TestIdp, grants: Vec<TokenGrant>, names: &TopicNames) -> anyhow::Result<Self> {
        let url = database_url();
        trialflow_outbox::kafka::ensure_catalogue_topics(&kafka(), names, 1, topics::DLQ_SUFFIX).await?;
        let source = SchemaName::new(unique("edc"))?;
        trialflow_outbox::migrate(&url, &source).await.context("migrating (is `make up` running?)")?;
        let risk_schema = SchemaName::new(unique("risk"))?;
        risk::migrate(&url, &risk_schema).await?;
        let site_schema = SchemaName::new(unique("sa"))?;
        site_api::migrate(&url, &site_schema).await?;
        let monitoring_schema = SchemaName::new(unique("mon"))?;
        monitoring::migrate(&url, &monitoring_schema).await?;
        let pool = PgPool::connect(&url).await?;
        let relay = RunningRelay::start(relay_config(
            &kafka(),
            vec![source.clone(), risk_schema.clone(), site_schema.clone(), monitoring_schema.clone()],
        ));

        let mut config = ConsumerConfig::local();
        config.database.database_url = url.clone();
        config.kafka = kafka();
        config.group_id = Some(format!("risk-{risk_schema}"));
        config.max_backoff_ms = 500;
        let stop = CancellationToken::new();
        let consumer = tokio::spawn(risk::run(
            risk::spec(risk_schema.clone(), names),
            config,
            names.clone(),
            risk::RiskConfig::default(),
            stop.clone(),
        ));

        let mut servers: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();
        // The code break is not used here: the enrollment schema need not exist.
        let enrollment = SchemaName::new(unique("enr"))?;
        let site = common::site_api(
            &url,
            site_schema.clone(),
            enrollment,
            risk_schema.clone(),
            grants.clone(),
            idp,
            names,
        )
        .await?;
        let site_base = format!("http://{}", site.local_addr());
        let s = stop.clone();
        servers.push(tokio::spawn(async move { Ok(site.run(s).await?) }));
        let alerts = AlertApi::bind(AlertApiConfig {
            listen: "127.0.0.1:0".parse()?,
            database_url: url.clone(),
            schema: monitoring_schema.clone(),
            risk_schema: risk_schema.clone(),
            tokens: grants,
            oidc: Some(OidcSettings::new(&idp.issuer, &idp.audience, &idp.jwks_url)),
            topics: names.clone(),
            limits: trialflow_http::limits::Limits::unthrottled(),
            rules: Default::default(),
            thresholds: Default::default(),
        })
        .await?;
        let alerts_base = format!("http://{}", alerts.local_addr());
        let s = stop.clone();
        servers.push(tokio::spawn(async move { Ok(alerts.run(s).await?) }));

        // The EDC's reading, through an outbox of its own and the relay.
        let mut envelope = Envelope::new(VitalSignRecorded::NAME, STUDY, "edc", Timestamp::now());
        envelope.site_id = Some("701".into());
        envelope.subject_id = Some(SUBJECT.into());
        let reading = VitalSignRecorded {
            envelope,
            observation_id: "VS-1".into(),
            loinc_code: "8480-6".into(),
            value: 400.0,
            unit: "mm[Hg]".into(),
            position: Some("SITTING".into()),
            effective: PartialDateTime::parse("2026-01-05T10:00"),
            visit: Some("WEEK 2".into()),
            visit_day: Some(14),
        };
        let outbox = Outbox::open(&pool, source).await?;
        let mut tx = pool.begin().await?;
        let row = OutboxEvent::avro(&reading, names.of::<VitalSignRecorded>(), SUBJECT.to_string())?;
        outbox.enqueue(&mut tx, row).await?;
        tx.commit().await?;

        Ok(Self {
            http: Client::new(),
            pool,
            risk: risk_schema,
            site: site_schema,
            monitoring: monitoring_schema,
            site_base,
            alerts_base,
            stop,
            servers,
            consumer,
            relay,
        })
    }

    /// The query's status, and who answered and closed it, once `done` holds (or fails).
    async fn wait_query(
        &self,
        id: Uuid,
        done: impl Fn(&str) -> bool,
    ) -> anyhow::Result<(String, Option<String>, Option<String>)> {
        let s = &self.risk;
        let sql = format!("SELECT status, answered_by, closed_by FROM {s}.query WHERE query_id = $1");
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let row: (String, Option<String>, Option<String>) =
                sqlx::query_as(AssertSqlSafe(sql.clone())).bind(id).fetch_one(&self.pool).await?;
            if done(&row.0) {
                return Ok(row);
            }
            ensure!(std::time::Instant::now() < deadline, "query {id} stays {row:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What the two APIs wrote: their audit trails (each event is written with its record; the
    /// relay empties the outboxes) and the site API's idempotency keys.
    async fn written(&self) -> anyhow::Result<Vec<i64>> {
        let (site, mon) = (&self.site, &self.monitoring);
        let mut counts = Vec::new();
        for sql in [
            format!("SELECT count(*) FROM {site}.audit_trail"),
            format!("SELECT count(*) FROM {site}.idempotency"),
            format!("SELECT count(*) FROM {mon}.audit_trail"),
        ] {
            counts.push(sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&self.pool).await?);
        }
        Ok(counts)
    }

    /// `POST` of raw `body` bytes; the status and the JSON answer.
    async fn post(&self, url: &str, token: &str, body: Vec<u8>) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .post(url)
            .bearer_auth(token)
            .header("Idempotency-Key", Uuid::new_v4().to_string())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).with_context(|| format!("{status}: not JSON: {text}"))?))
    }

    async fn get(&self, url: &str, token: &str) -> anyhow::Result<(StatusCode, Value)> {
        let response = self.http.get(url).bearer_auth(token).send().await?;
        Ok((response.status(), response.json().await?))
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        for server in self.servers {
            tokio::time::timeout(Duration::from_secs(15), server)
                .await
                .context("server did not stop")???;
        }
        self.consumer.await??;
        self.relay.stop().await
    }
}

/// The error code of an answer.
fn code(answer: &Value) -> &str {
    answer["error"]["code"].as_str().unwrap_or_default()
}

/// The query ids of a list answer.
fn ids(answer: &Value) -> Vec<String> {
    answer["queries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| q["query_id"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_is_answered_at_its_site_and_closed_by_a_researcher() -> anyhow::Result<()> {
    init_logs();
    let names = TopicNames::new(format!("{}.", unique("queries").replace('_', "-")));
    let idp = TestIdp::start().await?;
    let researcher = TokenGrant { token: unique("rita"), role: Role::Researcher, user: "rita".into() };
    let stack = Stack::start(&idp, vec![researcher.clone()], &names).await?;
    let site_staff = |user: &str, site: &str| idp.token(&idp.claims(user, "site_staff", &[STUDY], &[site]));
    let (sue, olga) = (site_staff("sue", "701")?, site_staff("olga", "702")?);
    let rob = idp.token(&idp.claims("rob", "researcher", &["OTHERSTUDY"], &["*"]))?;
    let rita = researcher.token.as_str();

    // The edit check SYSBP_RANGE (60 to 250 mm[Hg]) opens one query on the reading.
    let s = &stack.risk;
    let sql = format!("SELECT query_id FROM {s}.query WHERE study_id = $1 AND subject_id = $2");
    let deadline = std::time::Instant::now() + WAIT;
    let id: Uuid = loop {
        let found: Option<Uuid> = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
            .bind(STUDY)
            .bind(SUBJECT)
            .fetch_optional(&stack.pool)
            .await?;
        if let Some(id) = found {
            break id;
        }
        ensure!(std::time::Instant::now() < deadline, "no query opened on the 400 mm[Hg] reading");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The site sees it; another site does not, and cannot answer it.
    let list = format!("{}/v1/queries?study_id={STUDY}&status=open", stack.site_base);
    let (status, seen) = stack.get(&list, &sue).await?;
    assert_eq!((status, ids(&seen)), (StatusCode::OK, vec![id.to_string()]), "{seen}");
    assert_eq!(seen["queries"][0]["check_id"], "SYSBP_RANGE", "{seen}");
    let (status, seen) = stack.get(&list, &olga).await?;
    assert_eq!((status, ids(&seen)), (StatusCode::OK, Vec::<String>::new()), "{seen}");
    let answer_url = format!("{}/v1/queries/{id}/answer", stack.site_base);
    let answer = json!({"answer": "Transcription error:\tthe source says 140 mm[Hg]; corrected."});
    let (status, refused) = stack.post(&answer_url, &olga, answer.to_string().into_bytes()).await?;
    assert_eq!((status, code(&refused)), (StatusCode::NOT_FOUND, "not_found"), "{refused}");
    assert!(!refused.to_string().contains(SUBJECT), "nothing about the query is revealed: {refused}");

    // A closing before the answer is refused; so is a query of another study, or none.
    let close_url = format!("{}/v1/queries/{id}/close", stack.alerts_base);
    let close = json!({"reason": "Answer accepted."}).to_string().into_bytes();
    let (status, refused) = stack.post(&close_url, rita, close.clone()).await?;
    assert_eq!((status, code(&refused)), (StatusCode::CONFLICT, "query_not_answered"), "{refused}");
    let (status, _) = stack.post(&close_url, &rob, close.clone()).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for unknown in [Uuid::new_v4().to_string(), "not-a-query".to_string()] {
        let url = format!("{}/v1/queries/{unknown}/close", stack.alerts_base);
        let (status, refused) = stack.post(&url, rita, close.clone()).await?;
        assert_eq!((status, code(&refused)), (StatusCode::NOT_FOUND, "not_found"), "{refused}");
    }

    // Hostile answers: refused with a 4xx naming the field, nothing written.
    let before = stack.written().await?;
    let long = "x".repeat(3000);
    let (bad, unprocessable) = (StatusCode::BAD_REQUEST, StatusCode::UNPROCESSABLE_ENTITY);
    let hostile: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        ("NUL", br#"{"answer": "a\u0000b"}"#.to_vec(), unprocessable, "invalid_characters"),
        ("escape", br#"{"answer": "a\u001b[2J"}"#.to_vec(), unprocessable, "invalid_characters"),
        ("3000 characters", format!(r#"{{"answer": "{long}"}}"#).into_bytes(), unprocessable, "too_long"),
        ("blank", br#"{"answer": "  "}"#.to_vec(), unprocessable, "validation_failed"),
        ("duplicate key", br#"{"answer": "a", "answer": "b"}"#.to_vec(), bad, "duplicate_key"),
        ("wrong type", br#"{"answer": 42}"#.to_vec(), bad, "invalid_json"),
        ("missing", b"{}".to_vec(), bad, "invalid_json"),
        ("unknown field", br#"{"answer": "a", "status": "closed"}"#.to_vec(), bad, "invalid_json"),
        ("garbage", b"\xff\x00\x7fgarbage".to_vec(), bad, "invalid_json"),
    ];
    for (what, body, want_status, want_code) in hostile {
        let (status, refused) = stack.post(&answer_url, &sue, body).await?;
        assert_eq!((status, code(&refused)), (want_status, want_code), "{what}: {refused}");
    }
    let (status, refused) = stack.post(&close_url, rita, br#"{"reason": "a\u0007b"}"#.to_vec()).await?;
    assert_eq!((status, code(&refused)), (unprocessable, "invalid_characters"), "{refused}");
    assert_eq!(stack.written().await?, before, "a refused request wrote something");

    // The answer: QueryAnswered in the site API's outbox with its audit record; a second answer
    // is refused while the first awaits the risk consumer, and after it applied it.
    let (status, answered) = stack.post(&answer_url, &sue, answer.to_string().into_bytes()).await?;
    assert_eq!(status, StatusCode::CREATED, "{answered}");
    assert_eq!(answered["query_id"], id.to_string(), "{answered}");
    let again = json!({"answer": "Another answer."}).to_string().into_bytes();
    let (status, refused) = stack.post(&answer_url, &sue, again.clone()).await?;
    assert_eq!((status, code(&refused)), (StatusCode::CONFLICT, "query_not_open"), "{refused}");
    let site = &stack.site;
    let (action, reason): (String, Option<String>) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT action, reason FROM {site}.audit_trail WHERE entity_type = 'query' AND entity_id = $1"
    )))
    .bind(id.to_string())
    .fetch_one(&stack.pool)
    .await?;
    assert_eq!((action.as_str(), reason.as_deref()), ("query.answered", answer["answer"].as_str()));
    let (_, by, _) = stack.wait_query(id, |s| s == "answered").await?;
    assert_eq!(by.as_deref(), Some("sue"));
    let (status, refused) = stack.post(&answer_url, &sue, again).await?;
    assert_eq!((status, code(&refused)), (StatusCode::CONFLICT, "query_not_open"), "{refused}");

    // The researcher sees it answered, and closes it; once only.
    let list = format!("{}/v1/queries?study_id={STUDY}&status=answered", stack.alerts_base);
    let (status, seen) = stack.get(&list, rita).await?;
    assert_eq!((status, ids(&seen)), (StatusCode::OK, vec![id.to_string()]), "{seen}");
    let (status, _) = stack.get(&list, &rob).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "a study outside the token");
    let (status, closed) = stack.post(&close_url, rita, close.clone()).await?;
    assert_eq!(status, StatusCode::OK, "{closed}");
    let (status, refused) = stack.post(&close_url, rita, close.clone()).await?;
    assert_eq!((status, code(&refused)), (StatusCode::CONFLICT, "query_not_answered"), "{refused}");
    let (_, answered_by, closed_by) = stack.wait_query(id, |s| s == "closed").await?;
    assert_eq!((answered_by.as_deref(), closed_by.as_deref()), (Some("sue"), Some("rita")));
    let (status, refused) = stack.post(&close_url, rita, close).await?;
    assert_eq!((status, code(&refused)), (StatusCode::CONFLICT, "query_not_answered"), "{refused}");
    let mon = &stack.monitoring;
    let action: String = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT action FROM {mon}.audit_trail WHERE entity_type = 'query' AND entity_id = $1"
    )))
    .bind(id.to_string())
    .fetch_one(&stack.pool)
    .await?;
    assert_eq!(action, "query.closed");

    // The site sees it closed.
    let list = format!("{}/v1/queries?study_id={STUDY}&site_id=701&status=closed", stack.site_base);
    let (status, seen) = stack.get(&list, &sue).await?;
    assert_eq!((status, ids(&seen)), (StatusCode::OK, vec![id.to_string()]), "{seen}");
    assert_eq!(seen["queries"][0]["close_reason"], "Answer accepted.", "{seen}");
    let (status, refused) = stack.get(&list.replace("701", "702"), &sue).await?;
    assert_eq!((status, code(&refused)), (StatusCode::FORBIDDEN, "out_of_scope"), "{refused}");
    stack.stop().await
}
