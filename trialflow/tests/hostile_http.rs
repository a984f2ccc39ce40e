//! Hostile HTTP against every route of the three front doors — the site API, the ePRO gateway and
//! the researchers' alert API — on the real local stack (`make up`). The routes come from each
//! service's `ROUTES`; a route without a case here fails the test. For each route: NUL and other
//! control characters in a body string, a path segment and a query parameter, a 1 MB string,
//! 10,000 nested arrays, wrong types, `1e400` and `2^70`, a key given twice, invalid UTF-8, a lone
//! surrogate escape and an empty body must each be a 4xx whose JSON body names the code (and the
//! field where one is to blame); nothing may be written or published meanwhile; and a valid
//! request right after must still succeed.
//!
//! Bodies are sent to the routes that read one (the POSTs); a GET ignores its body, so GETs get the
//! path and query cases only.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::monitoring::{self, api::AlertApi, api::AlertApiConfig};
use trialflow_consumers::{enrollment, risk};
use trialflow_http::auth::{Role, TokenGrant};
use trialflow_http::input::DEFAULT_MAX_FUTURE_SKEW_SECS;
use trialflow_outbox::SchemaName;
use trialflow_outbox::kafka::TopicReader;
use trialflow_producers::epro_gateway::{self, EproGateway, EproGatewayConfig};
use trialflow_producers::site_api;
use trialflow_schemas::QuestionnaireResponseSubmitted;
use trialflow_schemas::topics::TopicNames;
use trialflow_testkit::idp::TestIdp;
use trialflow_testkit::{database_url, init_logs, kafka, unique};

mod common;
use common::{study, submission};
use uuid::Uuid;

const MARK: &str = "@@hostile@@";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Site,
    Gateway,
    Alerts,
}

/// One route under test.
struct Route {
    service: Service,
    method: &'static str,
    template: &'static str,
    /// A string field of the valid body: its JSON pointer and its path in answers.
    text: Option<(&'static str, &'static str)>,
}

/// A request the test expects to be refused: `(status, code, field)`, the field when one is named.
type Refusal = (StatusCode, &'static [&'static str], Option<String>);

struct Fixture {
    http: Client,
    site: String,
    gateway: String,
    alerts: String,
    site_schema: SchemaName,
    alert_schema: SchemaName,
    /// The randomization records the code break reads (seeded by [`Fixture::randomize`]).
    enrollment_schema: SchemaName,
    /// The data queries the site API answers and the alert API closes (seeded by [`Fixture::query`]).
    risk_schema: SchemaName,
    /// Investigators' tokens (the code break needs a recent sign-in, which static tokens lack).
    idp: TestIdp,
    pool: PgPool,
    topic: String,
    admin: String,
    staff: String,
    pharmacist: String,
    researcher: String,
    app: String,
    /// Fresh names for the valid requests.
    counter: std::sync::atomic::AtomicUsize,
    valid_submissions: std::sync::Mutex<BTreeSet<Uuid>>,
    shutdown: CancellationToken,
    servers: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Fixture {
    async fn start() -> anyhow::Result<Self> {
        init_logs();
        let url = database_url();
        let topics = TopicNames::new(format!("{}.", unique("hostile").replace('_', "-")));
        let token = |role: Role, user: &str| TokenGrant { token: unique(user), role, user: user.to_string() };
        let grants = vec![
            token(Role::Admin, "ada"),
            token(Role::SiteStaff, "sam"),
            token(Role::Pharmacist, "phil"),
            token(Role::Researcher, "rita"),
        ];
        let shutdown = CancellationToken::new();
        let mut servers: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();

        let site_schema = SchemaName::new(unique("sa"))?;
        site_api::migrate(&url, &site_schema).await.context("migrating (is `make up` running?)")?;
        let enrollment_schema = SchemaName::new(unique("enr"))?;
        enrollment::migrate(&url, &enrollment_schema).await?;
        let risk_schema = SchemaName::new(unique("risk"))?;
        risk::migrate(&url, &risk_schema).await?;
        let idp = TestIdp::start().await?;
        let site = common::site_api(
            &url,
            site_schema.clone(),
            enrollment_schema.clone(),
            risk_schema.clone(),
            grants.clone(),
            &idp,
            &topics,
        )
        .await?;
        let site_base = format!("http://{}", site.local_addr());
        let stop = shutdown.clone();
        servers.push(tokio::spawn(async move { Ok(site.run(stop).await?) }));

        let app = unique("app");
        let topic = topics.of::<QuestionnaireResponseSubmitted>();
        trialflow_outbox::kafka::ensure_topics(&kafka(), &[(&topic, 1)]).await?;
        let gateway = EproGateway::bind(EproGatewayConfig {
            listen: "127.0.0.1:0".parse()?,
            kafka: kafka(),
            topics: topics.clone(),
            tokens: vec![app.clone()],
            oidc: None,
            ack_timeout_ms: 10_000,
            clock: Default::default(),
            max_future_skew_secs: DEFAULT_MAX_FUTURE_SKEW_SECS,
            limits: trialflow_http::limits::Limits::unthrottled(),
        })
        .await?;
        let gateway_base = format!("http://{}", gateway.local_addr());
        let stop = shutdown.clone();
        servers.push(tokio::spawn(async move { Ok(gateway.run(stop).await?) }));

        let alert_schema = SchemaName::new(unique("alerts"))?;
        monitoring::migrate(&url, &alert_schema).await?;
        let alerts = AlertApi::bind(AlertApiConfig {
            listen: "127.0.0.1:0".parse()?,
            database_url: url.clone(),
            schema: alert_schema.clone(),
            risk_schema: risk_schema.clone(),
            rules: Default::default(),
            thresholds: Default::default(),
            tokens: grants.clone(),
            oidc: None,
            topics,
            limits: trialflow_http::limits::Limits::unthrottled(),
        })
        .await?;
        let alerts_base = format!("http://{}", alerts.local_addr());
        let stop = shutdown.clone();
        servers.push(tokio::spawn(async move { Ok(alerts.run(stop).await?) }));

        let [admin, staff, pharmacist, researcher] = [0, 1, 2, 3].map(|i| grants[i].token.clone());
        let fixture = Self {
            http: Client::new(),
            site: site_base,
            gateway: gateway_base,
            alerts: alerts_base,
            site_schema,
            alert_schema,
            enrollment_schema,
            risk_schema,
            idp,
            pool: PgPool::connect(&url).await?,
            topic,
            admin,
            staff,
            pharmacist,
            researcher,
            app,
            counter: Default::default(),
            valid_submissions: Default::default(),
            shutdown,
            servers,
        };
        fixture.expect_2xx(Method::POST, "/v1/studies", Some(study("S1"))).await?;
        let site = json!({"site_id": "701", "name": "Site 701", "time_zone": "America/New_York"});
        fixture.expect_2xx(Method::POST, "/v1/studies/S1/sites", Some(site)).await?;
        Ok(fixture)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for server in self.servers {
            tokio::time::timeout(Duration::from_secs(15), server)
                .await
                .context("server did not stop")???;
        }
        Ok(())
    }

    fn next(&self) -> usize {
        self.counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn base(&self, service: Service) -> &str {
        match service {
            Service::Site => &self.site,
            Service::Gateway => &self.gateway,
            Service::Alerts => &self.alerts,
        }
    }

    /// Who may use `path` of `service`.
    fn token(&self, service: Service, path: &str) -> anyhow::Result<String> {
        Ok(match service {
            Service::Gateway => self.app.clone(),
            Service::Alerts => self.researcher.clone(),
            // An investigator of site 701 who signed in just now.
            Service::Site if path.ends_with("/code-break") => {
                self.idp.token(&self.idp.claims("ian", "investigator", &["S1"], &["701"]))?
            }
            Service::Site if path.contains("/subjects") || path.starts_with("/v1/queries") => {
                self.staff.clone()
            }
            Service::Site if path.ends_with("/shipments") => self.pharmacist.clone(),
            Service::Site => self.admin.clone(),
        })
    }

    /// Gives subject `subject_id` of S1 a treatment, as the enrollment service would.
    async fn randomize(&self, subject_id: &str, n: usize) -> anyhow::Result<()> {
        common::randomize(&self.pool, &self.enrollment_schema, ("S1", subject_id), i32::try_from(n)?).await
    }

    fn request(
        &self,
        service: Service,
        method: &Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base(service)))
            .bearer_auth(self.token(service, path).unwrap_or_default())
            .header("Idempotency-Key", Uuid::new_v4().to_string());
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body);
        }
        request
    }

    /// A request that must succeed, on the site API unless the path says otherwise.
    async fn expect_2xx(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<()> {
        self.send_valid(Service::Site, method, path, body).await
    }

    async fn send_valid(
        &self,
        service: Service,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<()> {
        let body = body.map(|b| b.to_string().into_bytes());
        let response = self.request(service, &method, path, body).send().await?;
        let status = response.status();
        // A stream never ends: its status is all there is to check.
        if status.is_success() && path.ends_with("/stream") {
            return Ok(());
        }
        let text = response.text().await?;
        ensure!(status.is_success(), "{method} {path}: {status} {text}");
        Ok(())
    }

    /// A fresh valid request for `route`: its path and body (the resources it needs created).
    async fn valid(&self, route: &Route) -> anyhow::Result<(String, Option<Value>)> {
        let n = self.next();
        let subject = || format!("701-{n:04}");
        if route.template.contains("{subject_id}") {
            let screening = json!({"site_id": "701", "screening_number": format!("SCR-{n}"),
                                   "subject_id": subject(), "age_years": 60, "criteria": {"INC01": true}});
            self.expect_2xx(Method::POST, "/v1/studies/S1/subjects", Some(screening)).await?;
        }
        let alert = if route.template.contains("{alert_id}") { Some(self.raise().await?) } else { None };
        if route.service == Service::Alerts && route.template.starts_with("/v1/studies") {
            // The dashboard's routes answer 404 for a study, site or subject nobody knows.
            self.observe(&subject()).await?;
        }
        // A query the site can answer, or one it answered that a researcher can close.
        let query = match route.service {
            _ if !route.template.contains("{query_id}") => None,
            Service::Alerts => Some(self.query("answered").await?),
            _ => Some(self.query("open").await?),
        };
        let path = route
            .template
            .replace("{study_id}", "S1")
            .replace("{site_id}", "701")
            .replace("{subject_id}", &subject())
            .replace("{alert_id}", &alert.map(|a| a.to_string()).unwrap_or_default())
            .replace("{query_id}", &query.map(|q| q.to_string()).unwrap_or_default());
        let body = match (route.service, route.template.rsplit('/').next().unwrap_or_default()) {
            (Service::Site, "studies") => Some(study(&format!("S-{n}"))),
            (Service::Site, "sites") => {
                Some(json!({"site_id": format!("7{n:03}"), "name": "Site", "time_zone": "Europe/Berlin"}))
            }
            (Service::Site, "shipments") => Some(json!({"shipment_id": format!("SH-{n}"), "kits": [
                {"kit_number": format!("K-{n}"), "sequence_number": n, "kit_type": "TTS", "lot": "L1",
                 "expiry_date": "2030-12-31", "arm_code": "PBO"}]})),
            (Service::Site, "subjects") => {
                Some(json!({"site_id": "701", "screening_number": format!("SCR-{n}"),
                                                        "age_years": 60, "criteria": {"INC01": true}}))
            }
            (Service::Site, "consent") => Some(json!({"consent_version": "v1", "signed_at": "2014-01-02"})),
            (Service::Site, "enrollment-requests") => Some(json!({"strata": {"AGEGR": "<65"}})),
            (Service::Site, "withdrawal") => Some(json!({"reason_code": "WITHDRAWAL BY SUBJECT"})),
            (Service::Site, "code-break") => {
                self.randomize(&subject(), n).await?;
                Some(json!({"reason": "SAE: the emergency physician needs the treatment."}))
            }
            (Service::Gateway, "submissions") => {
                let s = submission("S1");
                self.valid_submissions
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .insert(s.submission_id);
                Some(serde_json::to_value(&s)?)
            }
            (Service::Alerts, "acknowledge" | "resolve") => Some(json!({"reason": "Called the site."})),
            (Service::Site, "answer") => Some(json!({"answer": "Transcription error; corrected."})),
            (Service::Alerts, "close") => Some(json!({"reason": "Answer accepted."})),
            _ => None,
        };
        Ok((path, body))
    }

    /// An open alert, inserted as the monitoring consumer would.
    async fn raise(&self) -> anyhow::Result<Uuid> {
        let (id, s) = (Uuid::now_v7(), &self.alert_schema);
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.alert (alert_id, study_id, site_id, subject_id, rule_id, rule_version, severity,
                                    source_label, summary, effective_at, escalate_at)
             VALUES ($1, 'S1', '701', $2, 'vs.sysbp.high', 1, 'HIGH', 'Vital signs', 'SBP 182',
                     now(), now() + interval '1 hour')"
        )))
        .bind(id)
        // One open episode per subject and rule.
        .bind(format!("701-A{}", self.next()))
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// A vital-sign reading of `subject_id` of S1, kept as the monitoring consumer keeps one, and an
    /// alert of it at site 701.
    async fn observe(&self, subject_id: &str) -> anyhow::Result<()> {
        let s = &self.alert_schema;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.observation (event_id, study_id, subject_id, code, value, unit, effective_at)
             VALUES ($1, 'S1', $2, '8480-6', 182, 'mm[Hg]', now())"
        )))
        .bind(Uuid::now_v7())
        .bind(subject_id)
        .execute(&self.pool)
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.alert (alert_id, study_id, site_id, subject_id, rule_id, rule_version, severity,
                                    source_label, summary, effective_at)
             VALUES ($1, 'S1', '701', $2, 'vs.sysbp.high', 1, 'HIGH', 'Vital signs', 'SBP 182', now())"
        )))
        .bind(Uuid::now_v7())
        .bind(subject_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A data query of a subject of site 701 in `status`, as the risk service keeps it.
    async fn query(&self, status: &str) -> anyhow::Result<Uuid> {
        let id = Uuid::now_v7();
        let subject = format!("701-Q{}", self.next());
        common::seed_query(&self.pool, &self.risk_schema, id, ("S1", "701", &subject), status).await?;
        Ok(id)
    }

    /// What a refused request must leave as it was: the rows and events of all three services
    /// (the gateway's topic is read once, at the end).
    async fn written(&self) -> anyhow::Result<Vec<i64>> {
        let (site, alerts) = (&self.site_schema, &self.alert_schema);
        let mut counts = Vec::new();
        for sql in [
            format!("SELECT count(*) FROM {site}.outbox"),
            format!("SELECT count(*) FROM {site}.idempotency"),
            format!("SELECT count(*) FROM {alerts}.outbox"),
            format!("SELECT count(*) FROM {alerts}.alert_history"),
            format!("SELECT count(*) FROM {alerts}.alert WHERE status <> 'open'"),
            format!("SELECT count(*) FROM {site}.audit_trail"),
            format!("SELECT count(*) FROM {alerts}.audit_trail"),
        ] {
            counts.push(sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&self.pool).await?);
        }
        Ok(counts)
    }
}

/// Every route of the three services, with the string field its hostile bodies aim at.
fn routes() -> anyhow::Result<Vec<Route>> {
    let field = |service: Service, template: &str| -> Option<(&'static str, &'static str)> {
        Some(match (service, template.rsplit('/').next().unwrap_or_default()) {
            (Service::Site, "studies") => ("/title", "title"),
            (Service::Site, "sites") => ("/name", "name"),
            (Service::Site, "shipments") => ("/kits/0/lot", "kits[0].lot"),
            (Service::Site, "subjects") => ("/screening_number", "screening_number"),
            (Service::Site, "consent") => ("/consent_version", "consent_version"),
            (Service::Site, "enrollment-requests") => ("/strata/AGEGR", "strata.AGEGR"),
            (Service::Site, "withdrawal") => ("/reason_code", "reason_code"),
            (Service::Site, "code-break") => ("/reason", "reason"),
            (Service::Gateway, "submissions") => ("/envelope/subject_id", "envelope.subject_id"),
            (Service::Alerts, "acknowledge" | "resolve" | "close") => ("/reason", "reason"),
            (Service::Site, "answer") => ("/answer", "answer"),
            _ => return None,
        })
    };
    let mut routes = Vec::new();
    for (service, table) in [
        (Service::Site, site_api::ROUTES),
        (Service::Gateway, epro_gateway::ROUTES),
        (Service::Alerts, monitoring::api::ROUTES),
    ] {
        for &(method, template) in table {
            let text = field(service, template);
            if method == "POST" && text.is_none() {
                bail!("{method} {template} of {service:?} has no hostile-body case: add one here");
            }
            routes.push(Route { service, method, template, text });
        }
    }
    Ok(routes)
}

/// The valid body with the text field replaced by `raw` JSON text (bytes, so they may be
/// anything).
fn with_raw(body: &Value, pointer: &str, raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut marked = body.clone();
    *marked.pointer_mut(pointer).context("no such field")? = json!(MARK);
    let text = marked.to_string();
    let at = text.find(&format!("\"{MARK}\"")).context("marker")?;
    let mut out = text.as_bytes()[..at].to_vec();
    out.extend_from_slice(raw);
    out.extend_from_slice(&text.as_bytes()[at + MARK.len() + 2..]);
    Ok(out)
}

/// The hostile bodies of a route and what each must get.
fn hostile_bodies(
    body: &Value,
    (pointer, field): (&str, &str),
) -> anyhow::Result<Vec<(&'static str, Vec<u8>, Refusal)>> {
    let key = pointer.rsplit('/').next().unwrap_or_default();
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let bad = StatusCode::BAD_REQUEST;
    let named = Some(field.to_string());
    let invalid_json: &[&str] = &["invalid_json"];
    // A 1 MB string is 422 `too_long` where the body limit lets it in (site API), else 413.
    let cases: Vec<(&str, Vec<u8>, Refusal)> = vec![
        (
            "NUL",
            with_raw(body, pointer, br#""a\u0000b""#)?,
            (unprocessable, &["invalid_characters"], named.clone()),
        ),
        (
            "escape",
            with_raw(body, pointer, br#""a\u001b[2J""#)?,
            (unprocessable, &["invalid_characters"], named.clone()),
        ),
        (
            "DEL",
            with_raw(body, pointer, "\"a\u{7f}\"".as_bytes())?,
            (unprocessable, &["invalid_characters"], named.clone()),
        ),
        ("raw control byte", with_raw(body, pointer, b"\"a\x01b\"")?, (bad, invalid_json, None)),
        (
            "1 MB string",
            with_raw(body, pointer, format!("\"{}\"", "x".repeat(1 << 20)).as_bytes())?,
            (unprocessable, &["too_long", "payload_too_large"], named.clone()),
        ),
        (
            "wrong type",
            with_raw(body, pointer, br#"{"nested": [1, 2]}"#)?,
            (bad, invalid_json, named.clone()),
        ),
        ("1e400", with_raw(body, pointer, b"1e400")?, (bad, invalid_json, None)),
        ("2^70", with_raw(body, pointer, b"1180591620717411303424")?, (bad, invalid_json, named.clone())),
        (
            "duplicate key",
            with_raw(body, pointer, format!("\"a\",\"{key}\":\"b\"").as_bytes())?,
            (bad, &["duplicate_key"], named.clone()),
        ),
        ("invalid UTF-8", with_raw(body, pointer, b"\"a\xff\xfeb\"")?, (bad, invalid_json, None)),
        ("lone surrogate", with_raw(body, pointer, br#""\ud800""#)?, (bad, invalid_json, None)),
        (
            "deep nesting",
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
            (bad, invalid_json, None),
        ),
        ("empty", Vec::new(), (bad, invalid_json, None)),
        ("not JSON", b"{\"".to_vec(), (bad, invalid_json, None)),
        ("a number", b"42".to_vec(), (bad, invalid_json, None)),
    ];
    Ok(cases)
}

/// The hostile paths of a route (each path parameter in turn) and the hostile query.
fn hostile_urls(template: &str, path: &str) -> Vec<(String, String, Refusal)> {
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let mut cases = vec![(
        "query NUL".to_string(),
        format!("{path}?colour=%00red"),
        (unprocessable, &["invalid_characters"][..], Some("colour".to_string())),
    )];
    cases.push((
        "query 10 KB".to_string(),
        format!("{path}?colour={}", "r".repeat(10_000)),
        (unprocessable, &["too_long"][..], Some("colour".to_string())),
    ));
    let template: Vec<&str> = template.split('/').collect();
    let actual: Vec<&str> = path.split('/').collect();
    for (i, segment) in template.iter().enumerate() {
        let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) else { continue };
        for (what, value, code) in [
            ("NUL", format!("{}%00", actual[i]), "invalid_characters"),
            ("control", format!("%1B{}", actual[i]), "invalid_characters"),
            ("DEL", format!("{}%7F", actual[i]), "invalid_characters"),
            ("not UTF-8", format!("{}%FF%FE", actual[i]), "invalid_characters"),
            ("10 KB", "i".repeat(10_000), "too_long"),
        ] {
            let mut hostile = actual.clone();
            hostile[i] = &value;
            let codes: &'static [&'static str] =
                if code == "too_long" { &["too_long"] } else { &["invalid_characters"] };
            cases.push((
                format!("{name} {what}"),
                hostile.join("/"),
                (unprocessable, codes, Some(name.to_string())),
            ));
        }
    }
    cases
}

/// Checks one refusal: a 4xx with a JSON error body whose code (and field) are the expected ones.
async fn refused(
    response: reqwest::Response,
    (status, codes, field): &Refusal,
    what: &str,
) -> anyhow::Result<()> {
    let got = response.status();
    let content_type =
        response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let text = response.text().await?;
    ensure!(got.is_client_error(), "{what}: {got} {text}");
    ensure!(content_type.starts_with("application/json"), "{what}: content type {content_type:?}: {text}");
    let body: Value = serde_json::from_str(&text).with_context(|| format!("{what}: not JSON: {text}"))?;
    let code = body["error"]["code"].as_str().unwrap_or_default();
    ensure!(codes.contains(&code), "{what}: code {code:?}, expected one of {codes:?}: {text}");
    if code != "payload_too_large" {
        ensure!(got == *status, "{what}: {got}, expected {status}: {text}");
    }
    if let Some(field) = field
        && code != "payload_too_large"
    {
        ensure!(body["error"]["field"] == json!(field), "{what}: field, expected {field:?}: {text}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_hostile_input_writes_nothing_and_still_serves() -> anyhow::Result<()> {
    let fixture = Fixture::start().await?;
    let started = std::time::Instant::now();
    let routes = routes()?;
    let mut refusals = 0;
    for route in &routes {
        let method = Method::from_bytes(route.method.as_bytes())?;
        let (path, body) = fixture.valid(route).await?;
        let before = fixture.written().await?;
        let name = format!("{:?} {} {}", route.service, route.method, route.template);
        for (what, url, expected) in hostile_urls(route.template, &path) {
            let bytes = body.as_ref().map(|b| b.to_string().into_bytes());
            let response = fixture.request(route.service, &method, &url, bytes).send().await?;
            refused(response, &expected, &format!("{name}: {what}")).await?;
            refusals += 1;
        }
        if let (Some(text), Some(valid)) = (route.text, &body) {
            for (what, bytes, expected) in hostile_bodies(valid, text)? {
                let response = fixture.request(route.service, &method, &path, Some(bytes)).send().await?;
                refused(response, &expected, &format!("{name}: body {what}")).await?;
                refusals += 1;
            }
        }
        assert_eq!(fixture.written().await?, before, "{name}: a refused request wrote something");
        fixture.send_valid(route.service, method, &path, body).await.context(name)?;
    }

    // The gateway published exactly the valid submissions, one each.
    let valid = fixture.valid_submissions.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let published = TopicReader::new(&kafka(), &fixture.topic, true)?
        .read_until_idle(Duration::from_secs(1), Duration::from_secs(20))
        .await?;
    let ids: BTreeSet<Uuid> = published
        .iter()
        .map(|m| {
            trialflow_schemas::decode::<QuestionnaireResponseSubmitted>(&m.payload).map(|s| s.submission_id)
        })
        .collect::<Result<_, _>>()?;
    assert_eq!((published.len(), ids), (valid.len(), valid), "only the valid submissions were published");
    assert!(refusals > 250, "only {refusals} refusals checked");
    assert!(started.elapsed() < Duration::from_secs(45), "took {:?}", started.elapsed());
    fixture.stop().await
}
