//! The site API over HTTP against the local PostgreSQL (`make up`): each test migrates its own
//! schema, binds the API on a free port with its own tokens and topic prefix, and checks the
//! responses and the outbox rows the commands wrote (the relay is tested elsewhere).

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_http::auth::{Role, TokenGrant};
use trialflow_http::limits::{Limits, Rate};
use trialflow_outbox::SchemaName;
use trialflow_producers::site_api::{self, SiteApi, SiteApiConfig, SiteApiError};
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{
    ConsentSigned, DateTimePrecision, EligibilityAssessed, EnrollmentRequested, Event, KitsReceived,
    StudyConfigured, SubjectScreened, SubjectWithdrawn, Timestamp,
};
use trialflow_testkit::{database_url, init_logs, unique, wait_until};

/// A seed no other number in a response is likely to equal, to show it never leaks.
const SEED: i64 = 918_273_645_546;

struct TestApi {
    base: String,
    schema: SchemaName,
    pool: PgPool,
    topics: TopicNames,
    http: reqwest::Client,
    admin: String,
    site: String,
    pharmacist: String,
    researcher: String,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), SiteApiError>>,
}

/// One outbox row, as the relay would publish it.
#[derive(Debug)]
struct Row {
    topic: String,
    key: String,
    event_type: String,
    payload: Vec<u8>,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    text: String,
}

impl TestApi {
    async fn start() -> anyhow::Result<Self> {
        Self::start_with(Limits::unthrottled()).await
    }

    async fn start_with(limits: Limits) -> anyhow::Result<Self> {
        init_logs();
        let schema = SchemaName::new(unique("sa"))?;
        let url = database_url();
        site_api::migrate(&url, &schema)
            .await
            .context("migrating the test schema (is `make up` running?)")?;
        let topics = TopicNames::new(unique("t") + ".");
        let token = |role: Role, user: &str| TokenGrant { token: unique(user), role, user: user.to_string() };
        let tokens = vec![
            token(Role::Admin, "ada"),
            token(Role::SiteStaff, "sam"),
            token(Role::Pharmacist, "phil"),
            token(Role::Researcher, "rita"),
        ];
        let config = SiteApiConfig {
            listen: "127.0.0.1:0".parse()?,
            database_url: url.clone(),
            schema: schema.clone(),
            tokens: tokens.clone(),
            oidc: None,
            topics: topics.clone(),
            max_connections: 8,
            max_future_skew_secs: trialflow_http::input::DEFAULT_MAX_FUTURE_SKEW_SECS,
            code_break_max_auth_age_secs:
                trialflow_producers::site_api::code_break::DEFAULT_MAX_AUTH_AGE_SECS,
            limits,
        };
        let api = SiteApi::bind(config).await?;
        let base = format!("http://{}", api.local_addr());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(api.run(shutdown.clone()));
        let pool = PgPoolOptions::new().max_connections(2).connect(&url).await?;
        let [admin, site, pharmacist, researcher] = [0, 1, 2, 3].map(|i| tokens[i].token.clone());
        Ok(Self {
            base,
            schema,
            pool,
            topics,
            http: reqwest::Client::new(),
            admin,
            site,
            pharmacist,
            researcher,
            shutdown,
            server,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.server.await??;
        Ok(())
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Answer> {
        let response = request.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Answer { status, headers, body, text })
    }

    /// POSTs raw `body` with `token` and `key` (either may be left out).
    async fn post_raw(
        &self,
        token: Option<&str>,
        path: &str,
        key: Option<&str>,
        body: &str,
    ) -> anyhow::Result<Answer> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        self.send(request).await
    }

    /// POSTs `body` with a fresh idempotency key.
    async fn post(&self, token: &str, path: &str, body: &Value) -> anyhow::Result<Answer> {
        self.post_raw(Some(token), path, Some(&unique("key")), &body.to_string()).await
    }

    /// POSTs `body` and insists on 201.
    async fn created(&self, token: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
        let answer = self.post(token, path, body).await?;
        if answer.status != StatusCode::CREATED {
            bail!("POST {path} answered {}: {}", answer.status, answer.text);
        }
        Ok(answer.body)
    }

    async fn get(&self, token: &str, path: &str) -> anyhow::Result<Answer> {
        self.send(self.http.get(format!("{}{path}", self.base)).bearer_auth(token)).await
    }

    async fn outbox(&self) -> anyhow::Result<Vec<Row>> {
        let rows: Vec<(String, String, String, Vec<u8>)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT topic, key, event_type, payload FROM {}.outbox ORDER BY tx_id, seq",
            self.schema
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(topic, key, event_type, payload)| Row { topic, key, event_type, payload })
            .collect())
    }

    async fn count(&self, table: &str) -> anyhow::Result<i64> {
        let sql = format!("SELECT count(*) FROM {}.{table}", self.schema);
        Ok(sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&self.pool).await?)
    }

    /// The one outbox row of event `E`, decoded, after checking its topic and key.
    fn decode<E: Event>(&self, rows: &[Row], key: &str) -> anyhow::Result<E> {
        let matching: Vec<&Row> = rows.iter().filter(|r| r.event_type == E::NAME).collect();
        let [row] = matching.as_slice() else {
            bail!("expected one {} row, found {}", E::NAME, matching.len())
        };
        assert_eq!(row.topic, self.topics.of::<E>(), "topic of {}", E::NAME);
        assert_eq!(row.key, key, "key of {}", E::NAME);
        Ok(trialflow_schemas::decode::<E>(&row.payload)?)
    }

    /// A study `study_id` with one site `701`, set up by the admin.
    async fn study_with_site(&self, study_id: &str) -> anyhow::Result<()> {
        self.created(&self.admin, "/v1/studies", &study(study_id)).await?;
        self.created(
            &self.admin,
            &format!("/v1/studies/{study_id}/sites"),
            &json!({"site_id": "701", "name": "Site 701", "country": "USA", "time_zone": "America/New_York"}),
        )
        .await?;
        Ok(())
    }
}

fn study(study_id: &str) -> Value {
    json!({
        "study_id": study_id,
        "title": "Safety and efficacy of xanomeline TTS in mild to moderate Alzheimer's disease",
        "arms": [
            {"arm_code": "PBO", "name": "Placebo", "ratio": 1},
            {"arm_code": "XAN_HI", "name": "Xanomeline high dose", "ratio": 2}
        ],
        "stratification_factors": [{"factor": "AGEGR", "values": ["<65", "65-80", ">80"]}],
        "eligibility": {
            "min_age_years": 50,
            "max_age_years": 89,
            "criteria": [
                {"criterion_id": "INC01", "description": "Probable Alzheimer's disease (NINCDS)"},
                {"criterion_id": "EXC01", "description": "No prior xanomeline"}
            ]
        },
        "randomization": {
            "seed": SEED, "block_multiples": [1, 2], "slots_per_stratum": 60, "warn_slots_left": 6
        },
        "kit_types": [{
            "kit_type": "TTS", "do_not_dispense_days": 14, "do_not_count_days": 7, "low_stock_threshold": 2
        }],
        "enrollment_kit_type": "TTS",
        "occurred_at": "2014-01-02T09:00:00Z"
    })
}

fn shipment(shipment_id: &str, kit_numbers: &[&str]) -> Value {
    let kits: Vec<Value> = kit_numbers
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({"kit_number": n, "sequence_number": i + 1, "kit_type": "TTS", "lot": "L-2027-01",
                   "expiry_date": "2027-03-31", "arm_code": if i % 3 == 0 { "PBO" } else { "XAN_HI" }})
        })
        .collect();
    json!({"shipment_id": shipment_id, "kits": kits})
}

fn screening(subject_id: &str, screening_number: &str, age: i32) -> Value {
    json!({
        "site_id": "701",
        "screening_number": screening_number,
        "subject_id": subject_id,
        "age_years": age,
        "sex": "F",
        "criteria": {"INC01": true, "EXC01": true},
        "occurred_at": "2014-01-03T14:00:00-05:00"
    })
}

fn at(rfc3339: &str) -> anyhow::Result<Timestamp> {
    Ok(Timestamp::from(chrono::DateTime::parse_from_rfc3339(rfc3339)?.to_utc()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_goes_from_study_set_up_to_withdrawal() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    let health = api.send(api.http.get(format!("{}/healthz", api.base))).await?;
    assert_eq!(health.status, StatusCode::OK);

    let created = api.created(&api.admin, "/v1/studies", &study("CDISCPILOT01")).await?;
    assert_eq!(created["study_id"], "CDISCPILOT01");
    let site = api
        .created(
            &api.admin,
            "/v1/studies/CDISCPILOT01/sites",
            &json!({"site_id": "701", "name": "Site 701", "country": "USA", "time_zone": "America/New_York"}),
        )
        .await?;
    assert_eq!(site, json!({"study_id": "CDISCPILOT01", "site_id": "701"}));
    let received = api
        .created(
            &api.pharmacist,
            "/v1/studies/CDISCPILOT01/sites/701/shipments",
            &shipment("SHP-1", &["K0001", "K0002", "K0003"]),
        )
        .await?;
    assert_eq!(received["kit_numbers"], json!(["K0001", "K0002", "K0003"]));

    let screened = api
        .created(&api.site, "/v1/studies/CDISCPILOT01/subjects", &screening("01-701-1015", "S-0001", 63))
        .await?;
    assert_eq!(screened["subject_id"], "01-701-1015");
    assert_eq!(screened["eligible"], true);
    let subject = "/v1/studies/CDISCPILOT01/subjects/01-701-1015";
    api.created(
        &api.site,
        &format!("{subject}/consent"),
        &json!({"consent_version": "v2.1", "signed_at": "2014-01-02"}),
    )
    .await?;
    api.created(&api.site, &format!("{subject}/enrollment-requests"), &json!({"strata": {"AGEGR": "<65"}}))
        .await?;
    api.created(
        &api.site,
        &format!("{subject}/withdrawal"),
        &json!({"reason_code": "WITHDRAWAL BY SUBJECT", "reason": "moved away"}),
    )
    .await?;

    let rows = api.outbox().await?;
    let types: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "StudyConfigured",
            "KitsReceived",
            "SubjectScreened",
            "EligibilityAssessed",
            "ConsentSigned",
            "EnrollmentRequested",
            "SubjectWithdrawn"
        ]
    );
    assert!(rows.iter().all(|r| r.topic.starts_with(api.topics.prefix())));

    let configured: StudyConfigured = api.decode(&rows, "CDISCPILOT01")?;
    assert_eq!(configured.config_version, 1);
    assert_eq!(configured.randomization.seed, SEED);
    assert_eq!(configured.arms.iter().map(|a| a.ratio).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(configured.envelope.source_system, "site-api");
    assert_eq!(configured.envelope.actor.as_deref(), Some("ada"));
    assert_eq!(configured.envelope.occurred_at, at("2014-01-02T09:00:00Z")?);
    assert_eq!(created["event_ids"], json!([configured.envelope.event_id]));

    let kits: KitsReceived = api.decode(&rows, "701")?;
    assert_eq!(kits.envelope.site_id.as_deref(), Some("701"));
    assert_eq!(
        kits.kits.iter().map(|k| k.arm_code.as_str()).collect::<Vec<_>>(),
        ["PBO", "XAN_HI", "XAN_HI"]
    );
    assert_eq!(kits.kits[0].expiry_date.to_naive(), chrono::NaiveDate::from_ymd_opt(2027, 3, 31));

    let screened_event: SubjectScreened = api.decode(&rows, "01-701-1015")?;
    assert_eq!(screened_event.envelope.subject_id.as_deref(), Some("01-701-1015"));
    assert_eq!(screened_event.envelope.site_id.as_deref(), Some("701"));
    assert_eq!(screened_event.envelope.actor.as_deref(), Some("sam"));
    assert_eq!(screened_event.envelope.occurred_at, at("2014-01-03T19:00:00Z")?);
    assert_eq!(screened_event.time_zone, "America/New_York", "defaults to the site's zone");
    let flow = Some(screened_event.envelope.event_id);
    let assessed: EligibilityAssessed = api.decode(&rows, "01-701-1015")?;
    assert!(assessed.eligible);
    assert_eq!(
        assessed.criteria.iter().map(|c| c.criterion_id.as_str()).collect::<Vec<_>>(),
        ["AGE", "INC01", "EXC01"]
    );
    assert_eq!(screened["event_ids"], json!([screened_event.envelope.event_id, assessed.envelope.event_id]));
    let consent: ConsentSigned = api.decode(&rows, "01-701-1015")?;
    assert_eq!(
        (consent.signed_at.raw.as_str(), consent.signed_at.precision),
        ("2014-01-02", DateTimePrecision::Day)
    );
    let request: EnrollmentRequested = api.decode(&rows, "01-701-1015")?;
    assert_eq!(
        request.strata.iter().map(|s| (s.factor.as_str(), s.value.as_str())).collect::<Vec<_>>(),
        [("AGEGR", "<65")]
    );
    let withdrawn: SubjectWithdrawn = api.decode(&rows, "01-701-1015")?;
    assert_eq!(withdrawn.reason_code, "WITHDRAWAL BY SUBJECT");
    let reasons = site_api::read::withdrawn_by_reason(&api.pool, &api.schema, "CDISCPILOT01").await?;
    assert_eq!(reasons, [("WITHDRAWAL BY SUBJECT".to_string(), 1)], "the summary's withdrawals by reason");
    for correlation in
        [assessed.envelope.correlation_id, consent.envelope.correlation_id, withdrawn.envelope.correlation_id]
    {
        assert_eq!(correlation, flow, "one flow per subject");
    }

    // A withdrawn subject can be neither enrolled nor withdrawn again.
    let again =
        api.post(&api.site, &format!("{subject}/enrollment-requests"), &json!({"strata": {}})).await?;
    assert_eq!(
        (again.status, again.body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("subject_withdrawn"))
    );
    let again =
        api.post(&api.site, &format!("{subject}/withdrawal"), &json!({"reason_code": "OTHER"})).await?;
    assert_eq!(again.status, StatusCode::CONFLICT);
    // Set-up conflicts.
    let again = api.post(&api.admin, "/v1/studies", &study("CDISCPILOT01")).await?;
    assert_eq!(
        (again.status, again.body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("study_exists"))
    );
    let again = api
        .post(&api.pharmacist, "/v1/studies/CDISCPILOT01/sites/701/shipments", &shipment("SHP-2", &["K0003"]))
        .await?;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.body["error"]["code"], "kit_number_exists");
    assert_eq!(again.body["error"]["field"], "kits[0].kit_number");
    let again = api
        .post(&api.site, "/v1/studies/CDISCPILOT01/subjects", &screening("01-701-1016", "S-0001", 70))
        .await?;
    assert_eq!(again.body["error"]["field"], "screening_number");
    let unknown =
        api.post(&api.site, "/v1/studies/NOPE/subjects", &screening("01-701-1017", "S-0002", 70)).await?;
    assert_eq!(
        (unknown.status, unknown.body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    assert_eq!(api.outbox().await?.len(), 7, "refused commands wrote no event");
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_command_is_answered_from_the_first_and_changes_nothing() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    api.study_with_site("RETRY").await?;
    let body = screening("01-701-2001", "S-2001", 60).to_string();
    let first = api.post_raw(Some(&api.site), "/v1/studies/RETRY/subjects", Some("key-1"), &body).await?;
    let retry = api.post_raw(Some(&api.site), "/v1/studies/RETRY/subjects", Some("key-1"), &body).await?;
    assert_eq!((first.status, retry.status), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(retry.body, first.body);
    assert!(first.headers.get("idempotent-replayed").is_none());
    assert_eq!(retry.headers.get("idempotent-replayed").and_then(|v| v.to_str().ok()), Some("true"));
    assert_eq!(api.count("subject").await?, 1);
    let rows = api.outbox().await?;
    assert_eq!(rows.iter().filter(|r| r.event_type == SubjectScreened::NAME).count(), 1);
    assert_eq!(rows.iter().filter(|r| r.event_type == EligibilityAssessed::NAME).count(), 1);

    // The same key for another request is refused, and creates nothing.
    let other = screening("01-701-2002", "S-2002", 60).to_string();
    let reused = api.post_raw(Some(&api.site), "/v1/studies/RETRY/subjects", Some("key-1"), &other).await?;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.body["error"]["code"], "idempotency_key_reused");
    // Keys belong to their caller: the admin's "key-1" is another key.
    let admins = api.post_raw(Some(&api.admin), "/v1/studies/RETRY/subjects", Some("key-1"), &other).await?;
    assert_eq!(admins.status, StatusCode::CREATED);
    assert_eq!(api.count("subject").await?, 2);

    // Two concurrent requests with one key: the second waits for the first, then replays it.
    let shipment = shipment("SHP-C", &["C1", "C2"]).to_string();
    let path = "/v1/studies/RETRY/sites/701/shipments";
    let (a, b) = tokio::join!(
        api.post_raw(Some(&api.pharmacist), path, Some("ship-key"), &shipment),
        api.post_raw(Some(&api.pharmacist), path, Some("ship-key"), &shipment),
    );
    let (a, b) = (a?, b?);
    assert_eq!((a.status, b.status), (StatusCode::CREATED, StatusCode::CREATED), "{} / {}", a.text, b.text);
    assert_eq!(a.body, b.body);
    let replayed = [&a, &b].iter().filter(|r| r.headers.get("idempotent-replayed").is_some()).count();
    assert_eq!(replayed, 1);
    assert_eq!(api.count("shipment").await?, 1);
    assert_eq!(api.count("kit").await?, 2);
    let rows = api.outbox().await?;
    assert_eq!(rows.iter().filter(|r| r.event_type == KitsReceived::NAME).count(), 1);
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_the_reason_and_the_field() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    let mut bad = study("BAD");
    bad["arms"][1]["ratio"] = json!(0);
    let answer = api.post(&api.admin, "/v1/studies", &bad).await?;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer.body["error"]["code"], "validation_failed");
    assert_eq!(answer.body["error"]["field"], "arms[1].ratio");

    bad["arms"][1]["ratio"] = json!("two");
    let answer = api.post(&api.admin, "/v1/studies", &bad).await?;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.body["error"]["code"], "invalid_json");
    assert_eq!(answer.body["error"]["field"], "arms[1].ratio");
    let answer = api.post_raw(Some(&api.admin), "/v1/studies", Some("k"), "{\"study_id\": ").await?;
    assert_eq!(
        (answer.status, answer.body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );
    let mut unknown_field = study("BAD");
    unknown_field["colour"] = json!("blue");
    let answer = api.post(&api.admin, "/v1/studies", &unknown_field).await?;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);

    let body = study("OK").to_string();
    let answer = api.post_raw(Some(&api.admin), "/v1/studies", None, &body).await?;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.body["error"]["code"], "idempotency_key_required");

    let answer = api.post_raw(None, "/v1/studies", Some("k"), &body).await?;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.body["error"]["code"], "unauthenticated");
    assert_eq!(answer.headers.get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Bearer"));
    let answer = api.post_raw(Some("not-a-token"), "/v1/studies", Some("k"), &body).await?;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = api.post_raw(Some(&api.site), "/v1/studies", Some("k"), &body).await?;
    assert_eq!(
        (answer.status, answer.body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );

    api.study_with_site("OK").await?;
    let answer =
        api.post(&api.site, "/v1/studies/OK/sites/701/shipments", &shipment("SHP-X", &["X1"])).await?;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    let mut wrong_arm = shipment("SHP-X", &["X1"]);
    wrong_arm["kits"][0]["arm_code"] = json!("XAN_LO");
    let answer = api.post(&api.pharmacist, "/v1/studies/OK/sites/701/shipments", &wrong_arm).await?;
    assert_eq!(answer.body["error"]["field"], "kits[0].arm_code");

    let mut missing = screening("01-701-3001", "S-3001", 60);
    missing["criteria"] = json!({"INC01": true});
    let answer = api.post(&api.site, "/v1/studies/OK/subjects", &missing).await?;
    assert_eq!(
        (answer.status, answer.body["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("criteria.EXC01"))
    );
    let mut bad_zone = screening("01-701-3001", "S-3001", 60);
    bad_zone["time_zone"] = json!("Atlantis/Capital");
    let answer = api.post(&api.site, "/v1/studies/OK/subjects", &bad_zone).await?;
    assert_eq!(answer.body["error"]["field"], "time_zone");
    let mut unknown_site = screening("01-701-3001", "S-3001", 60);
    unknown_site["site_id"] = json!("999");
    let answer = api.post(&api.site, "/v1/studies/OK/subjects", &unknown_site).await?;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);

    api.created(&api.site, "/v1/studies/OK/subjects", &screening("01-701-3001", "S-3001", 60)).await?;
    let subject = "/v1/studies/OK/subjects/01-701-3001";
    let answer = api
        .post(&api.site, &format!("{subject}/enrollment-requests"), &json!({"strata": {"AGEGR": "90+"}}))
        .await?;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer.body["error"]["field"], "strata.AGEGR");
    let answer = api
        .post(&api.site, &format!("{subject}/enrollment-requests"), &json!({"strata": {"REGION": "EU"}}))
        .await?;
    assert_eq!(answer.body["error"]["field"], "strata.REGION");
    let answer = api
        .post(
            &api.site,
            &format!("{subject}/consent"),
            &json!({"consent_version": "v1", "signed_at": "last week"}),
        )
        .await?;
    assert_eq!(
        (answer.status, answer.body["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("signed_at"))
    );
    // Missing strata are the enrollment consumer's business, not the API's.
    api.created(&api.site, &format!("{subject}/enrollment-requests"), &json!({"strata": {}})).await?;

    let answer = api
        .post(
            &api.site,
            "/v1/studies/OK/subjects/nobody/consent",
            &json!({"consent_version": "v1", "signed_at": "2014"}),
        )
        .await?;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let rows = api.outbox().await?;
    let types: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
    assert_eq!(types, ["StudyConfigured", "SubjectScreened", "EligibilityAssessed", "EnrollmentRequested"]);
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blinded_roles_never_see_arms_and_nobody_sees_the_seed() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    api.study_with_site("BLIND").await?;
    api.created(&api.pharmacist, "/v1/studies/BLIND/sites/701/shipments", &shipment("SHP-B", &["B1", "B2"]))
        .await?;

    let kits = "/v1/studies/BLIND/sites/701/kits";
    let blinded = api.get(&api.site, kits).await?;
    assert_eq!(blinded.status, StatusCode::OK);
    assert_eq!(blinded.body["kits"].as_array().map(Vec::len), Some(2));
    assert!(!blinded.text.contains("arm_code") && !blinded.text.contains("PBO"), "{}", blinded.text);
    let unblinded = api.get(&api.pharmacist, kits).await?;
    assert_eq!(unblinded.body["kits"][0]["arm_code"], "PBO");
    assert_eq!(unblinded.body["kits"][1]["arm_code"], "XAN_HI");
    assert_eq!(api.get(&api.researcher, kits).await?.status, StatusCode::FORBIDDEN);

    for (token, sees_arms) in
        [(&api.admin, true), (&api.pharmacist, true), (&api.site, false), (&api.researcher, false)]
    {
        let answer = api.get(token, "/v1/studies/BLIND").await?;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(!answer.text.contains("seed") && !answer.text.contains(&SEED.to_string()), "{}", answer.text);
        assert_eq!(answer.body.get("arms").is_some(), sees_arms, "{}", answer.text);
        assert_eq!(answer.text.contains("ratio"), sees_arms, "{}", answer.text);
        assert_eq!(answer.body["sites"][0]["site_id"], "701");
        assert_eq!(answer.body["eligibility"]["min_age_years"], 50);
    }
    assert_eq!(api.get(&api.site, "/v1/studies/NOPE").await?.status, StatusCode::NOT_FOUND);
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_outside_the_age_limits_is_screened_ineligible() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    api.study_with_site("AGE").await?;
    let mut young = screening("01-701-4001", "S-4001", 49);
    young["time_zone"] = json!("Europe/Berlin");
    let answer = api.created(&api.site, "/v1/studies/AGE/subjects", &young).await?;
    assert_eq!(answer["eligible"], false);
    // Without a subject id the API makes one from the site.
    let mut anonymous = screening("", "S-4002", 50);
    if let Some(fields) = anonymous.as_object_mut() {
        fields.remove("subject_id");
    }
    let generated = api.created(&api.site, "/v1/studies/AGE/subjects", &anonymous).await?;
    let generated_id = generated["subject_id"].as_str().unwrap_or_default();
    assert!(generated_id.starts_with("701-"), "{generated}");
    assert_eq!(generated["eligible"], true, "50 is the inclusive minimum");

    let rows = api.outbox().await?;
    let young_rows: Vec<Row> = rows.into_iter().filter(|r| r.key == "01-701-4001").collect();
    let screened: SubjectScreened = api.decode(&young_rows, "01-701-4001")?;
    assert_eq!(screened.time_zone, "Europe/Berlin");
    let assessed: EligibilityAssessed = api.decode(&young_rows, "01-701-4001")?;
    assert!(!assessed.eligible);
    let age = assessed.criteria.iter().find(|c| c.criterion_id == "AGE").context("no AGE criterion")?;
    assert!(!age.met);
    assert_eq!(age.detail.as_deref(), Some("age 49 is below the minimum of 50"));
    assert!(assessed.criteria.iter().filter(|c| c.criterion_id != "AGE").all(|c| c.met));

    // The service's report reads (the demo's summary): one site, two screened, one failed.
    assert_eq!(site_api::read::sites(&api.pool, &api.schema, "AGE").await?, ["701"]);
    let screening = site_api::read::screening_by_site(&api.pool, &api.schema, "AGE").await?;
    let want =
        site_api::read::SiteScreening { site_id: "701".into(), screened: 2, screen_failed: 1, withdrawn: 0 };
    assert_eq!(screening, [want]);
    assert!(site_api::read::sites(&api.pool, &api.schema, "NO-SUCH-STUDY").await?.is_empty());
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stuck_behind_its_key_answers_503_and_can_be_retried() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    api.study_with_site("STUCK").await?;
    // Another transaction holds the caller's key and does not finish (a hung first attempt).
    let mut holder = api.pool.begin().await?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {}.idempotency (principal, key, request_hash) VALUES ('sam', 'stuck-key', 'x')",
        api.schema
    )))
    .execute(&mut *holder)
    .await?;
    let body = screening("01-701-5001", "S-5001", 60).to_string();
    let path = "/v1/studies/STUCK/subjects";
    let answer = api.post_raw(Some(&api.site), path, Some("stuck-key"), &body).await?;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{}", answer.text);
    assert_eq!(answer.body["error"]["code"], "unavailable");
    assert!(answer.headers.get("retry-after").is_some());
    // The first attempt gives up: the retry with the same key now runs the command.
    holder.rollback().await?;
    let answer = api.post_raw(Some(&api.site), path, Some("stuck-key"), &body).await?;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text);
    assert_eq!(api.count("subject").await?, 1);
    api.stop().await
}

/// `(status, code, field)` of an answer, to compare in one line.
fn refusal(answer: &Answer) -> (StatusCode, String, String) {
    let error = &answer.body["error"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (answer.status, text(&error["code"]), text(&error["field"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_that_cannot_be_stored_and_future_instants_are_refused_writing_nothing() -> anyhow::Result<()>
{
    let api = TestApi::start().await?;
    api.study_with_site("OK").await?;
    api.created(&api.site, "/v1/studies/OK/subjects", &screening("01-701-4001", "S-4001", 60)).await?;
    let subject = "/v1/studies/OK/subjects/01-701-4001";
    let (rows, keys) = (api.outbox().await?.len(), api.count("idempotency").await?);
    let soon = |minutes: i64| (chrono::Utc::now() + chrono::Duration::minutes(minutes)).to_rfc3339();
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;

    type Edit = fn(&mut Value);
    let edits: [(Edit, &str, &str); 6] = [
        (|s| s["title"] = json!("Xanomeline\u{0}TTS"), "invalid_characters", "title"),
        (|s| s["title"] = json!("two\nlines"), "invalid_characters", "title"),
        (|s| s["arms"][0]["name"] = json!("Placebo\u{7f}"), "invalid_characters", "arms[0].name"),
        (
            |s| s["eligibility"]["criteria"][1]["description"] = json!("a\u{1b}[2J"),
            "invalid_characters",
            "eligibility.criteria[1].description",
        ),
        (
            |s| s["eligibility"]["criteria"][0]["description"] = json!("d".repeat(2_001)),
            "too_long",
            "eligibility.criteria[0].description",
        ),
        (
            |s| s["stratification_factors"][0]["values"][0] = json!("x".repeat(100_000)),
            "too_long",
            "stratification_factors[0].values[0]",
        ),
    ];
    for (edit, code, field) in edits {
        let mut body = study("NEW");
        edit(&mut body);
        let answer = api.post(&api.admin, "/v1/studies", &body).await?;
        assert_eq!(refusal(&answer), (unprocessable, code.into(), field.into()), "{}", answer.text);
    }

    let mut criterion_key = screening("01-701-4002", "S-4002", 60);
    criterion_key["criteria"] = json!({"INC01\u{1}": true, "EXC01": true});
    let mut future = screening("01-701-4002", "S-4002", 60);
    future["occurred_at"] = json!(soon(60));
    let cases: Vec<(String, Value, (StatusCode, &str, &str))> = vec![
        (
            "/v1/studies/OK/subjects".into(),
            criterion_key,
            (unprocessable, "invalid_characters", "criteria.INC01\\u{1}"),
        ),
        ("/v1/studies/OK/subjects".into(), future, (unprocessable, "in_the_future", "occurred_at")),
        (
            format!("{subject}/consent"),
            json!({"consent_version": "v1", "signed_at": (chrono::Utc::now() + chrono::Duration::days(2)).format("%Y-%m-%d").to_string()}),
            (unprocessable, "in_the_future", "signed_at"),
        ),
        (
            format!("{subject}/consent"),
            json!({"consent_version": "v1\u{0}", "signed_at": "2014-01-02"}),
            (unprocessable, "invalid_characters", "consent_version"),
        ),
        (
            format!("{subject}/withdrawal"),
            json!({"reason_code": "ADVERSE EVENT", "reason": "r".repeat(2_001)}),
            (unprocessable, "too_long", "reason"),
        ),
        (
            format!("{subject}/withdrawal"),
            json!({"reason_code": "ADVERSE\tEVENT"}),
            (unprocessable, "invalid_characters", "reason_code"),
        ),
        (
            "/v1/studies/%00K/sites".into(),
            json!({"site_id": "702", "name": "Site 702", "time_zone": "Europe/Berlin"}),
            (unprocessable, "invalid_characters", "study_id"),
        ),
        (
            format!("/v1/studies/OK/subjects/{}/consent", "9".repeat(200)),
            json!({"consent_version": "v1", "signed_at": "2014-01-02"}),
            (unprocessable, "too_long", "subject_id"),
        ),
        (
            "/v1/studies/OK/subjects/01-701-%FF%FE/consent".into(),
            json!({"consent_version": "v1", "signed_at": "2014-01-02"}),
            (unprocessable, "invalid_characters", "subject_id"),
        ),
    ];
    for (path, body, (status, code, field)) in cases {
        let answer = api.post(&api.site, &path, &body).await?;
        assert_eq!(refusal(&answer), (status, code.into(), field.into()), "{path}: {}", answer.text);
    }
    // Keys given twice would silently keep the last one.
    let body = r#"{"strata": {"AGEGR": "<65", "AGEGR": ">80"}}"#;
    let path = format!("{subject}/enrollment-requests");
    let answer = api.post_raw(Some(&api.site), &path, Some(&unique("key")), body).await?;
    assert_eq!(refusal(&answer), (StatusCode::BAD_REQUEST, "duplicate_key".into(), "strata.AGEGR".into()));
    let answer = api.post_raw(Some(&api.admin), "/v1/studies", Some("k"), &"x".repeat(3 << 20)).await?;
    assert_eq!(refusal(&answer).0, StatusCode::PAYLOAD_TOO_LARGE, "{}", answer.text);
    assert_eq!(answer.body["error"]["code"], "payload_too_large");
    for path in ["/v1/studies/O%01K", "/v1/studies/OK/sites/701/kits?colour=%00"] {
        let answer = api.get(&api.admin, path).await?;
        assert_eq!(
            (answer.status, answer.body["error"]["code"].as_str()),
            (unprocessable, Some("invalid_characters")),
            "{path}"
        );
    }
    assert_eq!((api.outbox().await?.len(), api.count("idempotency").await?), (rows, keys), "nothing written");

    // What is allowed: line breaks and tabs in free text, a clock a little behind the caller's.
    let mut multiline = study("LINES");
    multiline["eligibility"]["criteria"][0]["description"] =
        json!("Probable AD:\n\t* NINCDS\r\n\t* MMSE 10-23");
    multiline["occurred_at"] = json!(soon(2));
    api.created(&api.admin, "/v1/studies", &multiline).await?;
    let withdrawal = json!({"reason_code": "ADVERSE EVENT", "reason": "Rash.\nSee the AE form."});
    api.created(&api.site, &format!("{subject}/withdrawal"), &withdrawal).await?;
    let study = api.get(&api.admin, "/v1/studies/LINES").await?;
    assert_eq!(
        study.body["eligibility"]["criteria"][0]["description"],
        "Probable AD:\n\t* NINCDS\r\n\t* MMSE 10-23"
    );
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_event_the_log_cannot_take_is_413_and_writes_nothing() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    // Longest ids everywhere: 5,000 kits fit in a body but not in one event.
    let (kit_type, arms) = ("K".repeat(64), ["A".repeat(64), "B".repeat(64)]);
    let mut big = study("BIG");
    big["arms"] = json!([{"arm_code": arms[0], "name": "A", "ratio": 1}, {"arm_code": arms[1], "name": "B", "ratio": 1}]);
    big["kit_types"][0]["kit_type"] = json!(kit_type);
    big["enrollment_kit_type"] = json!(kit_type);
    api.created(&api.admin, "/v1/studies", &big).await?;
    let site = json!({"site_id": "701", "name": "Site 701", "time_zone": "America/New_York"});
    api.created(&api.admin, "/v1/studies/BIG/sites", &site).await?;
    let kits: Vec<Value> = (0..5_000)
        .map(|i| {
            json!({"kit_number": format!("{i:0>64}"), "sequence_number": i, "kit_type": kit_type,
                   "lot": "L".repeat(64), "expiry_date": "2030-01-31", "arm_code": arms[i % 2]})
        })
        .collect();
    let body = json!({"shipment_id": "SHP-BIG", "kits": kits});
    assert!(body.to_string().len() < site_api::MAX_BODY_BYTES, "the body itself is accepted");
    let rows = api.outbox().await?.len();
    let answer = api.post(&api.pharmacist, "/v1/studies/BIG/sites/701/shipments", &body).await?;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", answer.text);
    assert_eq!(answer.body["error"]["code"], "event_too_large");
    assert_eq!((api.outbox().await?.len(), api.count("kit").await?), (rows, 0), "nothing written");
    assert_eq!(api.count("audit_trail").await?, 2, "the shipment's audit record rolled back with it");
    assert!(trialflow_outbox::audit::verify(&api.pool, &api.schema).await?.is_intact());
    api.stop().await
}

/// Every command appends its audit record in its own transaction: who (user, role), what (action,
/// entity, old → new), why, and the request that caused it; a retry under the same key adds none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_leaves_one_audit_record_in_its_transaction() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    api.study_with_site("AUD").await?;
    api.created(&api.pharmacist, "/v1/studies/AUD/sites/701/shipments", &shipment("SHP-1", &["K1", "K2"]))
        .await?;
    api.created(&api.site, "/v1/studies/AUD/subjects", &screening("701-1", "S-1", 63)).await?;
    let subject = "/v1/studies/AUD/subjects/701-1";
    api.created(
        &api.site,
        &format!("{subject}/consent"),
        &json!({"consent_version": "v2", "signed_at": "2014-01"}),
    )
    .await?;
    api.created(&api.site, &format!("{subject}/enrollment-requests"), &json!({"strata": {"AGEGR": "<65"}}))
        .await?;
    let withdrawal = json!({"reason_code": "ADVERSE EVENT", "reason": "rash"});
    let first = api
        .post_raw(Some(&api.site), &format!("{subject}/withdrawal"), Some("w-1"), &withdrawal.to_string())
        .await?;
    let again = api
        .post_raw(Some(&api.site), &format!("{subject}/withdrawal"), Some("w-1"), &withdrawal.to_string())
        .await?;
    assert_eq!((first.status, again.status), (StatusCode::CREATED, StatusCode::CREATED));
    // Refused commands (here 409: withdrawn) write nothing.
    let refused = api
        .post(&api.site, &format!("{subject}/consent"), &json!({"consent_version": "v3", "signed_at": ""}))
        .await?;
    assert_eq!(refused.status, StatusCode::CONFLICT);

    let mut conn = api.pool.acquire().await?;
    let records = trialflow_outbox::audit::read(&mut conn, &api.schema, Some("AUD"), None, 100).await?;
    let actions: Vec<(&str, &str, &str, &str)> = records
        .iter()
        .map(|r| (r.action.as_str(), r.actor_user.as_str(), r.actor_role.as_str(), r.entity_id.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("study.configured", "ada", "admin", "AUD"),
            ("site.created", "ada", "admin", "701"),
            ("kits.received", "phil", "pharmacist", "SHP-1"),
            ("subject.screened", "sam", "site_staff", "701-1"),
            ("subject.consent_signed", "sam", "site_staff", "701-1"),
            ("enrollment.requested", "sam", "site_staff", "701-1"),
            ("subject.withdrawn", "sam", "site_staff", "701-1"),
        ]
    );
    let withdrawn = &records[6];
    assert_eq!(withdrawn.reason.as_deref(), Some("ADVERSE EVENT: rash"));
    assert_eq!(withdrawn.cause.as_deref(), Some("request:w-1"));
    assert_eq!(withdrawn.site_id.as_deref(), Some("701"));
    let changes: Value = serde_json::from_str(&withdrawn.changes)?;
    assert!(
        changes.as_array().is_some_and(|c| c.iter().any(|c| c["field"] == "withdrawal_reason_code"
            && c["old"].is_null()
            && c["new"] == "ADVERSE EVENT")),
        "{changes}"
    );
    // Arms and a kit's arm are unblinded changes; the seed is nowhere.
    assert!(records[0].unblinded && records[2].unblinded && !records[3].unblinded);
    assert!(records.iter().all(|r| !r.changes.contains(&SEED.to_string())));
    let blinded = records[2].view("site-api", true).to_string();
    assert!(blinded.contains("K1") && !blinded.contains("PBO") && !blinded.contains("XAN_HI"), "{blinded}");
    assert!(records.iter().all(|r| r.recorded_at <= chrono::Utc::now()));
    assert!(trialflow_outbox::audit::verify(&api.pool, &api.schema).await?.is_intact());
    api.stop().await
}

/// `GET /v1/audit`: unblinded roles get every change; blinded roles never an arm (checked on the
/// raw body); pages follow their cursors without overlap; hostile query values are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_list_keeps_arms_from_blinded_roles_and_pages_with_a_cursor() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    api.study_with_site("AUDL").await?;
    api.created(
        &api.pharmacist,
        "/v1/studies/AUDL/sites/701/shipments",
        &shipment("SHP-1", &["K1", "K2", "K3"]),
    )
    .await?;
    for i in 0..3 {
        api.created(
            &api.site,
            "/v1/studies/AUDL/subjects",
            &screening(&format!("701-{i}"), &format!("S-{i}"), 60),
        )
        .await?;
    }
    api.study_with_site("OTHER").await?;

    let full = api.get(&api.admin, "/v1/audit?study_id=AUDL").await?;
    assert_eq!(full.status, StatusCode::OK, "{}", full.text);
    let records = full.body["records"].as_array().cloned().unwrap_or_default();
    assert_eq!(records.len(), 6, "{}", full.text);
    assert!(records.iter().all(|r| r["study_id"] == "AUDL" && r["source"] == "site-api"));
    assert!(full.text.contains("XAN_HI") && full.text.contains("PBO") && full.text.contains("\"hash\""));
    assert_eq!(full.body["next_cursor"], Value::Null);
    for token in [&api.site, &api.researcher] {
        let blinded = api.get(token, "/v1/audit?study_id=AUDL").await?;
        assert_eq!(blinded.status, StatusCode::OK, "{}", blinded.text);
        for arm in ["PBO", "XAN_HI", "Placebo", "kit_arms", "\"arms\"", "\"hash\""] {
            assert!(!blinded.text.contains(arm), "{arm} reached a blinded role: {}", blinded.text);
        }
        assert_eq!(blinded.body["records"].as_array().map(Vec::len), Some(6));
        assert!(blinded.text.contains("K1") && blinded.text.contains("values_withheld"), "{}", blinded.text);
    }

    // Pages of 2, each from the cursor of the one before: the same 6 records, in order.
    let mut seqs = Vec::new();
    let mut query = "/v1/audit?study_id=AUDL&limit=2".to_string();
    loop {
        let page = api.get(&api.researcher, &query).await?;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text);
        seqs.extend(
            page.body["records"].as_array().into_iter().flatten().map(|r| r["seq"].as_i64().unwrap_or(0)),
        );
        match page.body["next_cursor"].as_str() {
            Some(cursor) => query = format!("/v1/audit?study_id=AUDL&limit=2&cursor={cursor}"),
            None => break,
        }
    }
    let all: Vec<i64> = records.iter().map(|r| r["seq"].as_i64().unwrap_or(0)).collect();
    assert_eq!(seqs, all);
    let everything = api.get(&api.admin, "/v1/audit").await?;
    assert_eq!(everything.body["records"].as_array().map(Vec::len), Some(8), "both studies");

    for (query, status, code, field) in [
        ("limit=0", StatusCode::BAD_REQUEST, "invalid_parameter", "limit"),
        ("limit=ten", StatusCode::BAD_REQUEST, "invalid_parameter", "limit"),
        ("cursor=0.1%00", StatusCode::UNPROCESSABLE_ENTITY, "invalid_characters", "cursor"),
        ("cursor=7.1", StatusCode::BAD_REQUEST, "invalid_cursor", "cursor"),
        ("cursor=abc", StatusCode::BAD_REQUEST, "invalid_cursor", "cursor"),
        ("study_id=a%20b", StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", "study_id"),
        ("study_id=%1B[31m", StatusCode::UNPROCESSABLE_ENTITY, "invalid_characters", "study_id"),
        ("study_id=A&study_id=B", StatusCode::BAD_REQUEST, "duplicate_parameter", "study_id"),
        ("arm=PBO", StatusCode::BAD_REQUEST, "unknown_parameter", "arm"),
    ] {
        let answer = api.get(&api.admin, &format!("/v1/audit?{query}")).await?;
        assert_eq!(
            (answer.status, answer.body["error"]["code"].as_str(), answer.body["error"]["field"].as_str()),
            (status, Some(code), Some(field)),
            "{query}: {}",
            answer.text
        );
    }
    let anonymous = api.send(api.http.get(format!("{}/v1/audit", api.base))).await?;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    api.stop().await
}

// ---- rate limits and the request timeout ---------------------------------------------------------

/// The `Retry-After` (seconds) of a 429 `rate_limited` answer.
fn retry_after(answer: &Answer) -> anyhow::Result<u64> {
    ensure!(answer.status == StatusCode::TOO_MANY_REQUESTS, "answered {}: {}", answer.status, answer.text);
    ensure!(answer.body["error"]["code"] == "rate_limited", "{}", answer.text);
    let secs: u64 = answer.headers.get("retry-after").context("no Retry-After")?.to_str()?.parse()?;
    ensure!(secs >= 1, "Retry-After: {secs}");
    Ok(secs)
}

/// Sends `request` until it is refused with 429 (at most `max` times); the answers, the refusal
/// last. Every answer before it must be `served`.
async fn until_refused<F, Fut>(max: usize, served: StatusCode, mut request: F) -> anyhow::Result<Vec<Answer>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Answer>>,
{
    let mut answers = Vec::new();
    for _ in 0..max {
        let answer = request().await?;
        let refused = answer.status == StatusCode::TOO_MANY_REQUESTS;
        ensure!(refused || answer.status == served, "answered {}: {}", answer.status, answer.text);
        answers.push(answer);
        if refused {
            return Ok(answers);
        }
    }
    bail!("{max} requests and none was refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_beyond_its_rate_is_told_when_to_retry_while_others_are_served() -> anyhow::Result<()> {
    let api = TestApi::start_with(Limits { per_principal: Rate::new(1, 3), ..Limits::unthrottled() }).await?;
    const PATH: &str = "/v1/studies/NO-SUCH-STUDY";
    // The burst is served (404: no such study), then the rate refuses.
    let answers = until_refused(10, StatusCode::NOT_FOUND, || api.get(&api.admin, PATH)).await?;
    assert!(answers.len() > 3, "the burst of 3 is served: {} answers", answers.len());
    let wait = retry_after(answers.last().context("an answer")?)?;
    assert_eq!(api.get(&api.site, PATH).await?.status, StatusCode::NOT_FOUND, "another principal is served");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(api.get(&api.admin, PATH).await?.status, StatusCode::NOT_FOUND, "served after Retry-After");
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_beyond_its_rate_is_refused_whatever_tokens_it_sends() -> anyhow::Result<()> {
    let api = TestApi::start_with(Limits { per_address: Rate::new(1, 5), ..Limits::unthrottled() }).await?;
    let shared = &api;
    let forged = || {
        let token = unique("forged");
        async move { shared.get_raw(Some(&token), "/v1/studies/NO-SUCH-STUDY").await }
    };
    let answers = until_refused(20, StatusCode::UNAUTHORIZED, forged).await?;
    assert!(answers.len() > 5, "the burst of 5 is served: {} answers", answers.len());
    retry_after(answers.last().context("an answer")?)?;
    // Without a token too (the bucket refills one a second meanwhile).
    let anonymous = until_refused(5, StatusCode::UNAUTHORIZED, || api.get_raw(None, "/v1/studies/X")).await?;
    retry_after(anonymous.last().context("an answer")?)?;
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(api.get_raw(None, probe).await?.status, StatusCode::OK, "{probe} is exempt");
    }
    api.stop().await
}

impl TestApi {
    /// GETs `path` with `token`, if any.
    async fn get_raw(&self, token: Option<&str>, path: &str) -> anyhow::Result<Answer> {
        let request = self.http.get(format!("{}{path}", self.base));
        self.send(match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        })
        .await
    }

    /// Whether some session waits for a lock on `table` of the API's schema.
    async fn waiting_for(&self, table: &str) -> anyhow::Result<bool> {
        let sql = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = to_regclass($1) AND NOT granted)";
        Ok(sqlx::query_scalar(sql).bind(format!("{}.{table}", self.schema)).fetch_one(&self.pool).await?)
    }

    /// Whether any session holds or waits for a lock on `table` of the API's schema.
    async fn locked(&self, table: &str) -> anyhow::Result<bool> {
        let sql = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = to_regclass($1))";
        Ok(sqlx::query_scalar(sql).bind(format!("{}.{table}", self.schema)).fetch_one(&self.pool).await?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_beyond_the_request_timeout_is_cut_rolled_back_and_503() -> anyhow::Result<()> {
    let timeout = Duration::from_millis(500);
    let api = TestApi::start_with(Limits { request_timeout: timeout, ..Limits::unthrottled() }).await?;
    let mut locker = api.pool.begin().await?;
    let lock = format!("LOCK TABLE {}.study IN ACCESS EXCLUSIVE MODE", api.schema);
    sqlx::query(AssertSqlSafe(lock)).execute(&mut *locker).await?;
    let body = study("SLOW").to_string();
    let started = Instant::now();
    let (answer, probes) =
        tokio::join!(api.post_raw(Some(&api.admin), "/v1/studies", Some("slow-key"), &body), async {
            wait_until("the command waits for the study table", Duration::from_secs(5), || {
                api.waiting_for("study")
            })
            .await?;
            anyhow::Ok([
                api.get_raw(None, "/healthz").await?.status,
                api.get_raw(None, "/readyz").await?.status,
            ])
        });
    let (answer, took) = (answer?, started.elapsed());
    assert_eq!(probes?, [StatusCode::OK; 2], "the probes answer while a command hangs");
    assert_eq!(refusal(&answer), (StatusCode::SERVICE_UNAVAILABLE, "timeout".into(), String::new()));
    assert_eq!(answer.headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    assert!(took >= timeout && took < timeout + Duration::from_secs(3), "answered after {took:?}");

    // Once the lock is released, the cut command's transaction ends without committing.
    locker.rollback().await?;
    wait_until("the cut command's transaction ends", Duration::from_secs(10), || async {
        Ok(!api.locked("study").await?)
    })
    .await?;
    assert_eq!((api.count("study").await?, api.count("idempotency").await?), (0, 0));
    assert!(api.outbox().await?.is_empty(), "no event of a command cut off");
    let retried = api.post_raw(Some(&api.admin), "/v1/studies", Some("slow-key"), &body).await?;
    assert_eq!(retried.status, StatusCode::CREATED, "the retry with the same key runs: {}", retried.text);
    assert_eq!(api.count("study").await?, 1);
    api.stop().await
}
