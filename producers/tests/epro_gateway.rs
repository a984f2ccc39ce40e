//! The ePRO gateway over HTTP against the local broker (`make up`): each test binds the gateway on
//! a free port with its own token and topic prefix, posts submissions, and reads back what reached
//! the topic.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_http::clock::Clock;
use trialflow_http::limits::{Limits, Rate};
use trialflow_outbox::KafkaConfig;
use trialflow_outbox::kafka::{ReadMessage, TopicReader};
use trialflow_producers::epro_gateway::{EproGateway, EproGatewayConfig, EproGatewayError};
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{
    Answer, CONTENT_TYPE, Envelope, Event, QuestionnaireResponseSubmitted, ResponseStatus, Timestamp,
};
use trialflow_testkit::{init_logs, kafka, unique};
use uuid::Uuid;

const SUBJECT: &str = "01-701-1015";

struct TestGateway {
    base: String,
    kafka: KafkaConfig,
    topic: String,
    token: String,
    /// Another app's token.
    other_token: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), EproGatewayError>>,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn error(&self) -> (&str, Option<&str>) {
        let error = &self.body["error"];
        (error["code"].as_str().unwrap_or_default(), error["field"].as_str())
    }
}

impl TestGateway {
    /// A gateway on the local broker, its topic created.
    async fn start() -> anyhow::Result<Self> {
        Self::start_on(Clock::System).await
    }

    /// A gateway on the local broker whose `received_at` and "now" come from `clock`.
    async fn start_on(clock: Clock) -> anyhow::Result<Self> {
        let kafka = kafka();
        let gateway = Self::start_with(kafka.clone(), 10_000, clock).await?;
        trialflow_outbox::kafka::ensure_topics(&kafka, &[(&gateway.topic, 3)])
            .await
            .context("creating the test topic (is `make up` running?)")?;
        Ok(gateway)
    }

    async fn start_with(kafka: KafkaConfig, ack_timeout_ms: u64, clock: Clock) -> anyhow::Result<Self> {
        Self::start_limited(kafka, ack_timeout_ms, clock, Limits::unthrottled()).await
    }

    async fn start_limited(
        kafka: KafkaConfig,
        ack_timeout_ms: u64,
        clock: Clock,
        limits: Limits,
    ) -> anyhow::Result<Self> {
        init_logs();
        let topics = TopicNames::new(format!("{}.", unique("gw").replace('_', "-")));
        let (token, other_token) = (unique("app"), unique("other-app"));
        let config = EproGatewayConfig {
            listen: "127.0.0.1:0".parse()?,
            kafka: kafka.clone(),
            topics: topics.clone(),
            tokens: vec![other_token.clone(), token.clone()],
            oidc: None,
            ack_timeout_ms,
            clock,
            max_future_skew_secs: trialflow_http::input::DEFAULT_MAX_FUTURE_SKEW_SECS,
            limits,
        };
        let gateway = EproGateway::bind(config).await?;
        let base = format!("http://{}", gateway.local_addr());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(gateway.run(shutdown.clone()));
        Ok(Self {
            base,
            kafka,
            topic: topics.of::<QuestionnaireResponseSubmitted>(),
            token,
            other_token,
            http: reqwest::Client::new(),
            shutdown,
            server,
        })
    }

    async fn post_with(
        &self,
        authorization: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> anyhow::Result<Reply> {
        let mut request = self
            .http
            .post(format!("{}/v1/submissions", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await?;
        let (status, headers) = (response.status(), response.headers().clone());
        let text = response.text().await?;
        let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).context(text)? };
        Ok(Reply { status, headers, body })
    }

    async fn post(&self, body: &Value) -> anyhow::Result<Reply> {
        self.post_with(Some(&format!("Bearer {}", self.token)), body.to_string()).await
    }

    /// Everything on the topic, read from the beginning until nothing new came for `idle`.
    async fn published(&self, idle: Duration) -> anyhow::Result<Vec<ReadMessage>> {
        let reader = TopicReader::new(&self.kafka, &self.topic, true)?;
        Ok(reader.read_until_idle(idle, Duration::from_secs(20)).await?)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.server.await??;
        Ok(())
    }
}

fn submission() -> QuestionnaireResponseSubmitted {
    let mut envelope = Envelope::new(
        QuestionnaireResponseSubmitted::NAME,
        "CDISCPILOT01",
        "epro-app",
        Timestamp(1_767_000_000_123_456),
    );
    envelope.site_id = Some("701".to_string());
    envelope.subject_id = Some(SUBJECT.to_string());
    QuestionnaireResponseSubmitted {
        envelope,
        submission_id: Uuid::new_v4(),
        questionnaire: "http://loinc.org/44249-1".to_string(),
        questionnaire_version: "2.1".to_string(),
        scheduled_occurrence: Some("DAY-28".to_string()),
        status: ResponseStatus::Completed,
        authored_at: Timestamp(1_767_000_000_123_456),
        device_time_zone: "America/New_York".to_string(),
        items: vec![
            Answer::integer("phq9-1", 2),
            Answer::decimal("pain-nrs", 7.5),
            Answer::text("phq9-10", "LA6568-5"),
            Answer::boolean("selfharm", false),
        ],
    }
}

fn json_of(s: &QuestionnaireResponseSubmitted) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(s)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_submission_is_on_the_topic_as_posted() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let posted = submission();
    let body = json_of(&posted)?;
    assert_eq!(body["authored_at"], json!(1_767_000_000_123_456_i64), "timestamps are micros");
    assert_eq!(body["status"], json!("COMPLETED"));

    let before = chrono::Utc::now();
    let reply = gw.post(&body).await?;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(reply.body["submission_id"], json!(posted.submission_id.to_string()));
    assert_eq!(reply.body["event_id"], json!(posted.envelope.event_id.to_string()));
    let (Some(partition), Some(offset)) = (reply.body["partition"].as_i64(), reply.body["offset"].as_i64())
    else {
        bail!("no partition and offset in {}", reply.body);
    };

    let messages = gw.published(Duration::from_secs(1)).await?;
    let [message] = messages.as_slice() else { bail!("expected one message, read {}", messages.len()) };
    assert_eq!((i64::from(message.partition), message.offset), (partition, offset));
    assert_eq!(message.key, SUBJECT);
    let event_id = posted.envelope.event_id.to_string();
    assert_eq!(message.header("event_id"), Some(event_id.as_str()));
    assert_eq!(message.header("event_type"), Some("QuestionnaireResponseSubmitted"));
    assert_eq!(message.header("content-type"), Some(CONTENT_TYPE));
    let received_at = message.header("received_at").context("no received_at header")?;
    let parsed = chrono::DateTime::parse_from_rfc3339(received_at)?.to_utc();
    assert!(
        received_at.ends_with('Z') && received_at.len() == "2026-01-01T00:00:00.000000Z".len(),
        "{received_at}"
    );
    assert!(parsed >= before - chrono::Duration::seconds(1) && parsed <= chrono::Utc::now(), "{received_at}");
    assert_eq!(message.header("traceparent"), None, "no trace exporter in tests");
    let decoded = trialflow_schemas::decode::<QuestionnaireResponseSubmitted>(&message.payload)?;
    assert_eq!(decoded, posted);

    let health = gw.http.get(format!("{}/healthz", gw.base)).send().await?;
    assert_eq!(health.status(), StatusCode::OK);
    gw.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_do_not_fit_the_type_are_400_naming_the_path() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let auth = format!("Bearer {}", gw.token);
    for text in ["{", "not json", "", "[]"] {
        let reply = gw.post_with(Some(&auth), text).await?;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{text:?}: {}", reply.body);
        assert_eq!(reply.error().0, "invalid_json", "{text:?}");
    }

    type Break = fn(&mut Value);
    let cases: [(&str, Break); 7] = [
        ("authored_at", |b| b["authored_at"] = json!("2026-01-01T00:00:00Z")),
        ("status", |b| b["status"] = json!("DONE")),
        ("items[2].value_integer", |b| b["items"][2]["value_integer"] = json!("three")),
        ("items[1].link_id", |b| b["items"][1]["link_id"] = json!(7)),
        ("envelope.event_id", |b| b["envelope"]["event_id"] = json!("not-a-uuid")),
        ("envelope.occurred_at", |b| b["envelope"]["occurred_at"] = json!(1.5)),
        ("submission_id", |b| b["submission_id"] = Value::Null),
    ];
    for (field, break_it) in cases {
        let mut body = json_of(&submission())?;
        break_it(&mut body);
        let reply = gw.post(&body).await?;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{field}: {}", reply.body);
        assert_eq!(reply.error(), ("invalid_json", Some(field)), "{}", reply.body);
    }

    // A missing field is named in the message, at the record that lacks it.
    let mut body = json_of(&submission())?;
    if let Some(envelope) = body["envelope"].as_object_mut() {
        envelope.remove("study_id");
    }
    let reply = gw.post(&body).await?;
    assert_eq!(reply.error(), ("invalid_json", Some("envelope")), "{}", reply.body);
    assert!(
        reply.body["error"]["message"].as_str().is_some_and(|m| m.contains("study_id")),
        "{}",
        reply.body
    );

    let too_big = "x".repeat(256 * 1024 + 1);
    let reply = gw.post_with(Some(&auth), too_big).await?;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.error().0, "payload_too_large");

    assert!(gw.published(Duration::from_millis(500)).await?.is_empty(), "nothing may be published");
    gw.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shape_check_is_422_naming_its_field() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    type Break = fn(&mut QuestionnaireResponseSubmitted);
    let cases: [(&str, Break); 11] = [
        ("envelope.event_type", |s| s.envelope.event_type = "QuestionnaireResponseAccepted".into()),
        ("envelope.study_id", |s| s.envelope.study_id = String::new()),
        ("envelope.subject_id", |s| s.envelope.subject_id = None),
        ("envelope.subject_id", |s| s.envelope.subject_id = Some(" ".into())),
        ("questionnaire", |s| s.questionnaire = String::new()),
        ("questionnaire_version", |s| s.questionnaire_version = String::new()),
        ("device_time_zone", |s| s.device_time_zone = "EST5EDT-ish".into()),
        ("items[3].link_id", |s| s.items[3].link_id = String::new()),
        ("items[0]", |s| s.items[0].value_integer = None),
        ("items[1]", |s| s.items[1].value_string = Some("also".into())),
        ("items[2]", |s| s.items[2].value_boolean = Some(true)),
    ];
    for (field, break_it) in cases {
        let mut s = submission();
        break_it(&mut s);
        let reply = gw.post(&json_of(&s)?).await?;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {}", reply.body);
        assert_eq!(reply.error(), ("validation_failed", Some(field)), "{}", reply.body);
    }
    assert!(gw.published(Duration::from_millis(500)).await?.is_empty(), "nothing may be published");
    gw.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_need_an_app_token() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let body = json_of(&submission())?.to_string();
    let token = gw.token.clone();
    for authorization in
        [None, Some("Bearer nope".to_string()), Some(token.clone()), Some(format!("Basic {token}"))]
    {
        let reply = gw.post_with(authorization.as_deref(), body.clone()).await?;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{authorization:?}");
        assert_eq!(reply.error().0, "unauthenticated");
        // RFC 6750: a refused token is `invalid_token` with the reason; no token is a bare challenge.
        let challenge =
            reply.headers.get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default();
        if authorization.as_deref() == Some("Bearer nope") {
            assert_eq!(reply.body["error"]["reason"], "unknown_token", "{}", reply.body);
            assert!(challenge.starts_with("Bearer error=\"invalid_token\""), "{challenge}");
        } else {
            assert_eq!(challenge, "Bearer");
        }
    }
    // The token is checked before the body is looked at.
    let reply = gw.post_with(None, "{").await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(gw.published(Duration::from_millis(500)).await?.is_empty(), "nothing may be published");
    gw.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_503_with_retry_after_in_bounded_time() -> anyhow::Result<()> {
    let unreachable = KafkaConfig { bootstrap_servers: "127.0.0.1:1".to_string(), ..KafkaConfig::default() };
    let gw = TestGateway::start_with(unreachable, 1_500, Clock::System).await?;
    let started = Instant::now();
    let reply = gw.post(&json_of(&submission())?).await?;
    let took = started.elapsed();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.body);
    assert_eq!(reply.error().0, "unavailable");
    assert!(reply.headers.contains_key("retry-after"));
    assert!(took >= Duration::from_millis(1_400) && took < Duration::from_secs(5), "answered after {took:?}");

    let stopping = Instant::now();
    gw.stop().await?;
    assert!(stopping.elapsed() < Duration::from_secs(5), "stop took {:?}", stopping.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_that_cannot_be_stored_and_future_instants_are_422_and_nothing_is_published()
-> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let in_an_hour = Timestamp::from(chrono::Utc::now() + chrono::Duration::hours(1));
    type Break = fn(&mut QuestionnaireResponseSubmitted);
    let cases: [(&str, &str, Break); 9] = [
        ("invalid_characters", "envelope.subject_id", |s| s.envelope.subject_id = Some("01-701\u{0}".into())),
        ("invalid_characters", "envelope.study_id", |s| s.envelope.study_id = "CDISC\u{85}PILOT01".into()),
        ("invalid_characters", "items[0].link_id", |s| s.items[0].link_id = "phq9\t1".into()),
        ("invalid_characters", "items[2].value_string", |s| {
            s.items[2].value_string = Some("bell\u{7}".into())
        }),
        ("too_long", "questionnaire", |s| s.questionnaire = format!("http://loinc.org/{}", "9".repeat(300))),
        ("too_long", "envelope.subject_id", |s| s.envelope.subject_id = Some("1".repeat(65))),
        ("too_long", "items[2].value_string", |s| s.items[2].value_string = Some("w".repeat(2_001))),
        ("in_the_future", "authored_at", |s| {
            s.authored_at = Timestamp(s.authored_at.0 + 400_000_000_000_000)
        }),
        ("in_the_future", "envelope.recorded_at", |s| s.envelope.recorded_at = Timestamp(i64::MAX / 2)),
    ];
    for (code, field, break_it) in cases {
        let mut s = submission();
        break_it(&mut s);
        let reply = gw.post(&json_of(&s)?).await?;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {}", reply.body);
        assert_eq!(reply.error(), (code, Some(field)), "{}", reply.body);
    }
    let mut future = submission();
    future.authored_at = in_an_hour;
    future.envelope.occurred_at = in_an_hour;
    let reply = gw.post(&json_of(&future)?).await?;
    assert_eq!(reply.error(), ("in_the_future", Some("authored_at")), "{}", reply.body);

    let auth = format!("Bearer {}", gw.token);
    let body = json_of(&submission())?.to_string();
    let twice = body.replacen("{", r#"{"questionnaire":"GAD-7","#, 1);
    let reply = gw.post_with(Some(&auth), twice).await?;
    assert_eq!(
        (reply.status, reply.error()),
        (StatusCode::BAD_REQUEST, ("duplicate_key", Some("questionnaire")))
    );
    let query = gw
        .http
        .post(format!("{}/v1/submissions?app=%00", gw.base))
        .header("authorization", &auth)
        .body(body)
        .send()
        .await?;
    assert_eq!(query.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(query.json::<Value>().await?["error"]["code"], "invalid_characters");
    assert!(gw.published(Duration::from_millis(500)).await?.is_empty(), "nothing may be published");

    // A free-text answer may break lines; an instant within the skew is fine.
    let mut fine = submission();
    fine.items[2].value_string = Some("slept badly\r\n\tmost nights".into());
    fine.authored_at = Timestamp::from(chrono::Utc::now() + chrono::Duration::minutes(2));
    let reply = gw.post(&json_of(&fine)?).await?;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    let published = gw.published(Duration::from_secs(1)).await?;
    let [message] = published.as_slice() else { bail!("expected one message, read {}", published.len()) };
    assert_eq!(trialflow_schemas::decode::<QuestionnaireResponseSubmitted>(&message.payload)?, fine);
    gw.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replays_virtual_clock_judges_the_future() -> anyhow::Result<()> {
    let at = |rfc3339: &str| chrono::DateTime::parse_from_rfc3339(rfc3339).map(|t| t.to_utc());
    let clock = Clock::virtual_at(at("2014-01-02T18:00:00Z")?);
    let gw = TestGateway::start_on(clock.clone()).await?;
    let authored = |rfc3339: &str| -> anyhow::Result<QuestionnaireResponseSubmitted> {
        let mut s = submission();
        s.authored_at = Timestamp::from(at(rfc3339)?);
        s.envelope.occurred_at = s.authored_at;
        s.envelope.recorded_at = s.authored_at;
        Ok(s)
    };
    // Long past on the wall clock, but ahead of the replay's: refused, as live.
    let early = authored("2014-01-02T18:10:00Z")?;
    let reply = gw.post(&json_of(&early)?).await?;
    assert_eq!(reply.error(), ("in_the_future", Some("authored_at")), "{}", reply.body);
    let reply = gw.post(&json_of(&authored("2014-01-02T18:04:00Z")?)?).await?;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "within the skew: {}", reply.body);
    clock.set(at("2014-01-02T18:10:00Z")?);
    let reply = gw.post(&json_of(&early)?).await?;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "once the replay got there: {}", reply.body);
    gw.stop().await
}

/// The example the README gives patient-app teams (`docs/examples/epro-gateway-submission.json`).
fn documented_example() -> anyhow::Result<Value> {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/epro-gateway-submission.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(file)?)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_example_is_accepted_and_published_as_written() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let example = documented_example()?;
    let reply = gw.post(&example).await?;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(reply.body["submission_id"], example["submission_id"]);
    assert_eq!(reply.body["event_id"], example["envelope"]["event_id"], "the app's event id is kept");

    let messages = gw.published(Duration::from_secs(1)).await?;
    let [message] = messages.as_slice() else { bail!("expected one message, read {}", messages.len()) };
    assert_eq!(Some(message.key.as_str()), example["envelope"]["subject_id"].as_str(), "keyed by subject");
    let decoded = trialflow_schemas::decode::<QuestionnaireResponseSubmitted>(&message.payload)?;
    assert_eq!(serde_json::to_value(&decoded)?, example, "published exactly as posted");
    gw.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_json_unions_and_a_missing_event_id_are_refused_naming_the_path() -> anyhow::Result<()> {
    // The body is plain JSON values, not Avro's JSON encoding, and the ids are the app's to assign.
    let gw = TestGateway::start().await?;
    let mut union = documented_example()?;
    union["envelope"]["site_id"] = json!({"string": "701"});
    let mut no_id = documented_example()?;
    if let Some(envelope) = no_id["envelope"].as_object_mut() {
        envelope.remove("event_id");
    }
    for (body, path, named) in [(union, "envelope.site_id", "string"), (no_id, "envelope", "event_id")] {
        let reply = gw.post(&body).await?;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
        assert_eq!(reply.error(), ("invalid_json", Some(path)), "{}", reply.body);
        let message = reply.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(named), "{named} named in {message}");
    }
    assert!(gw.published(Duration::from_millis(500)).await?.is_empty(), "nothing published");
    gw.stop().await
}

// ---- rate limits and the request timeout ---------------------------------------------------------

/// The `Retry-After` (seconds) of a 429 `rate_limited` answer.
fn retry_after(reply: &Reply) -> anyhow::Result<u64> {
    ensure!(reply.status == StatusCode::TOO_MANY_REQUESTS, "answered {}: {}", reply.status, reply.body);
    ensure!(reply.error().0 == "rate_limited", "{}", reply.body);
    let secs: u64 = reply.headers.get("retry-after").context("no Retry-After")?.to_str()?.parse()?;
    ensure!(secs >= 1, "Retry-After: {secs}");
    Ok(secs)
}

/// Posts the body `{` with `authorization` until it is refused with 429 (at most `max` times); the
/// statuses before the refusal (each `served`) and the refusal.
async fn until_refused(
    gw: &TestGateway,
    max: usize,
    served: StatusCode,
    mut authorization: impl FnMut() -> String,
) -> anyhow::Result<(usize, Reply)> {
    for before in 0..max {
        let reply = gw.post_with(Some(&authorization()), "{").await?;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            return Ok((before, reply));
        }
        ensure!(reply.status == served, "answered {}: {}", reply.status, reply.body);
    }
    bail!("{max} requests and none was refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_beyond_its_rate_is_told_when_to_retry_while_other_apps_are_served() -> anyhow::Result<()> {
    let limits = Limits { per_principal: Rate::new(1, 3), ..Limits::unthrottled() };
    let gw = TestGateway::start_limited(kafka(), 10_000, Clock::System, limits).await?;
    let app = format!("Bearer {}", gw.token);
    // The burst is served (400: the body is not JSON; nothing is published), then the rate refuses.
    let (served, refused) = until_refused(&gw, 10, StatusCode::BAD_REQUEST, || app.clone()).await?;
    assert!(served >= 3, "the burst of 3 is served: {served}");
    let wait = retry_after(&refused)?;
    let other = gw.post_with(Some(&format!("Bearer {}", gw.other_token)), "{").await?;
    assert_eq!(other.status, StatusCode::BAD_REQUEST, "another app is served: {}", other.body);
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(
        gw.post_with(Some(&app), "{").await?.status,
        StatusCode::BAD_REQUEST,
        "served after Retry-After"
    );
    gw.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_beyond_its_rate_is_refused_whatever_tokens_it_sends() -> anyhow::Result<()> {
    let limits = Limits { per_address: Rate::new(1, 5), ..Limits::unthrottled() };
    let gw = TestGateway::start_limited(kafka(), 10_000, Clock::System, limits).await?;
    let forged = || format!("Bearer {}", unique("forged"));
    let (served, refused) = until_refused(&gw, 20, StatusCode::UNAUTHORIZED, forged).await?;
    assert!(served >= 5, "the burst of 5 is served: {served}");
    retry_after(&refused)?;
    let health = gw.http.get(format!("{}/healthz", gw.base)).send().await?;
    assert_eq!(health.status(), StatusCode::OK, "the probe is exempt");
    gw.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_beyond_the_request_timeout_is_503_timeout_and_the_probe_answers() -> anyhow::Result<()>
{
    // The broker never acknowledges (nothing listens there) and the ack timeout is longer than
    // the request timeout: the request timeout cuts the wait.
    let unreachable = KafkaConfig { bootstrap_servers: "127.0.0.1:1".to_string(), ..KafkaConfig::default() };
    let timeout = Duration::from_millis(500);
    let limits = Limits { request_timeout: timeout, ..Limits::unthrottled() };
    // (3 s rather than the default 10 s: stopping the gateway waits that long for the record.)
    let gw = TestGateway::start_limited(unreachable, 3_000, Clock::System, limits).await?;
    let body = json_of(&submission())?;
    let started = Instant::now();
    let (reply, health) = tokio::join!(gw.post(&body), async {
        gw.http.get(format!("{}/healthz", gw.base)).send().await.map(|r| r.status())
    });
    let (reply, took) = (reply?, started.elapsed());
    assert_eq!(health?, StatusCode::OK, "the probe answers while a submission waits");
    assert_eq!(
        (reply.status, reply.error().0),
        (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
        "{}",
        reply.body
    );
    assert_eq!(reply.headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    assert!(took >= timeout && took < timeout + Duration::from_secs(3), "answered after {took:?}");
    gw.stop().await
}
