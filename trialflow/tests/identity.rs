//! Identities on the three front doors — the site API, the ePRO gateway and the alert API — with
//! an identity provider's JWTs (`testkit::idp`: keys made with openssl, the JWKS served over HTTP
//! and written to a file) on the local stack (`make up`):
//!
//! * the refusal matrix: every forged, stale or misaddressed token is a 401 naming its reason, on
//!   each service, and a valid token right after still works;
//! * key rotation: a token signed with a key the provider published after the service started is
//!   accepted (the JWKS is re-read on an unknown `kid`, at most once per interval);
//! * scope: site staff, investigators and pharmacists act only on their token's studies and sites
//!   (403 `out_of_scope`, the same answer for another site's subject and for none, nothing
//!   written); researchers see, decide and stream only their studies' alerts; patient apps submit
//!   only to their studies.

use std::time::Duration;

use anyhow::{Context, ensure};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::monitoring::{self, api::AlertApi, api::AlertApiConfig};
use trialflow_http::input::DEFAULT_MAX_FUTURE_SKEW_SECS;
use trialflow_http::oidc::OidcSettings;
use trialflow_outbox::SchemaName;
use trialflow_producers::epro_gateway::{EproGateway, EproGatewayConfig};
use trialflow_producers::site_api::{self, SiteApi, SiteApiConfig};
use trialflow_schemas::QuestionnaireResponseSubmitted;
use trialflow_schemas::topics::TopicNames;
use trialflow_testkit::idp::{TestIdp, base64url, now};
use trialflow_testkit::{database_url, init_logs, kafka, unique};
use uuid::Uuid;

mod common;
use common::study;

const WAIT: Duration = Duration::from_secs(20);

struct Fixture {
    idp: TestIdp,
    http: Client,
    site: String,
    gateway: String,
    alerts: String,
    site_schema: SchemaName,
    alert_schema: SchemaName,
    pool: PgPool,
    shutdown: CancellationToken,
    servers: Vec<JoinHandle<anyhow::Result<()>>>,
}

struct Reply {
    status: StatusCode,
    body: Value,
    challenge: String,
}

impl Fixture {
    /// The three services trusting one provider and no static token; studies S1 (sites 701, 702)
    /// and S2 (site 801) set up by an admin of every study.
    async fn start() -> anyhow::Result<Self> {
        init_logs();
        let idp = TestIdp::start().await?;
        let url = database_url();
        let topics = TopicNames::new(format!("{}.", unique("identity").replace('_', "-")));
        let by_url = OidcSettings::new(&idp.issuer, &idp.audience, &idp.jwks_url);
        let by_file = OidcSettings::new(&idp.issuer, &idp.audience, &idp.jwks_file.to_string_lossy());
        let shutdown = CancellationToken::new();
        let mut servers: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();

        let site_schema = SchemaName::new(unique("sa"))?;
        site_api::migrate(&url, &site_schema).await.context("migrating (is `make up` running?)")?;
        let site = SiteApi::bind(SiteApiConfig {
            listen: "127.0.0.1:0".parse()?,
            database_url: url.clone(),
            schema: site_schema.clone(),
            tokens: vec![],
            oidc: Some(by_file),
            limits: trialflow_http::limits::Limits::unthrottled(),
            topics: topics.clone(),
            max_connections: 4,
            max_future_skew_secs: DEFAULT_MAX_FUTURE_SKEW_SECS,
            code_break_max_auth_age_secs: site_api::code_break::DEFAULT_MAX_AUTH_AGE_SECS,
        })
        .await?;
        let site_base = format!("http://{}", site.local_addr());
        let stop = shutdown.clone();
        servers.push(tokio::spawn(async move { Ok(site.run(stop).await?) }));

        let topic = topics.of::<QuestionnaireResponseSubmitted>();
        trialflow_outbox::kafka::ensure_topics(&kafka(), &[(&topic, 1)]).await?;
        let gateway = EproGateway::bind(EproGatewayConfig {
            listen: "127.0.0.1:0".parse()?,
            kafka: kafka(),
            topics: topics.clone(),
            tokens: vec![],
            oidc: Some(by_url.clone()),
            limits: trialflow_http::limits::Limits::unthrottled(),
            ack_timeout_ms: 10_000,
            clock: Default::default(),
            max_future_skew_secs: DEFAULT_MAX_FUTURE_SKEW_SECS,
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
            risk_schema: trialflow_consumers::risk::schema(),
            tokens: vec![],
            oidc: Some(by_url),
            limits: trialflow_http::limits::Limits::unthrottled(),
            topics,
        })
        .await?;
        let alerts_base = format!("http://{}", alerts.local_addr());
        let stop = shutdown.clone();
        servers.push(tokio::spawn(async move { Ok(alerts.run(stop).await?) }));

        let fixture = Self {
            idp,
            http: Client::new(),
            site: site_base,
            gateway: gateway_base,
            alerts: alerts_base,
            site_schema,
            alert_schema,
            pool: PgPool::connect(&url).await?,
            shutdown,
            servers,
        };
        let admin = fixture.token("ada", "admin", &["*"], &["*"])?;
        for (study_id, sites) in [("S1", &["701", "702"][..]), ("S2", &["801"][..])] {
            fixture.expect(201, &admin, Method::POST, "/v1/studies", Some(study(study_id))).await?;
            for site_id in sites {
                let site = json!({"site_id": site_id, "name": "Site", "time_zone": "America/New_York"});
                let path = format!("/v1/studies/{study_id}/sites");
                fixture.expect(201, &admin, Method::POST, &path, Some(site)).await?;
            }
        }
        Ok(fixture)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for server in self.servers {
            tokio::time::timeout(WAIT, server).await.context("server did not stop")???;
        }
        Ok(())
    }

    fn token(&self, user: &str, role: &str, studies: &[&str], sites: &[&str]) -> anyhow::Result<String> {
        self.idp.token(&self.idp.claims(user, role, studies, sites))
    }

    /// `method path` on the service the path belongs to, with `token` (none when `None`).
    async fn call(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Reply> {
        let base = if path.starts_with("/v1/alerts") {
            &self.alerts
        } else if path.starts_with("/v1/submissions") {
            &self.gateway
        } else {
            &self.site
        };
        let mut request = self.http.request(method, format!("{base}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.header("Idempotency-Key", Uuid::new_v4().to_string()).json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply { status, body, challenge })
    }

    async fn expect(
        &self,
        status: u16,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let reply = self.call(Some(token), method.clone(), path, body).await?;
        ensure!(reply.status.as_u16() == status, "{method} {path}: {} {}", reply.status, reply.body);
        Ok(reply.body)
    }

    /// 403 `out_of_scope`; returns the message.
    async fn out_of_scope(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<String> {
        let body = self.expect(403, token, method.clone(), path, body).await?;
        ensure!(body["error"]["code"] == "out_of_scope", "{method} {path}: {body}");
        Ok(body["error"]["message"].as_str().unwrap_or_default().to_string())
    }

    async fn site_rows(&self) -> anyhow::Result<i64> {
        let s = &self.site_schema;
        let sql = format!("SELECT (SELECT count(*) FROM {s}.outbox) + (SELECT count(*) FROM {s}.subject)");
        Ok(sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&self.pool).await?)
    }

    /// An open alert of `study_id`, inserted as the monitoring consumer would.
    async fn raise(&self, study_id: &str) -> anyhow::Result<Uuid> {
        let (id, s) = (Uuid::now_v7(), &self.alert_schema);
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.alert (alert_id, study_id, site_id, subject_id, rule_id, rule_version, severity,
                                    source_label, summary, effective_at, escalate_at)
             VALUES ($1, $2, '701', $3, 'vs.sysbp.high', 1, 'HIGH', 'Vital signs', 'SBP 182',
                     now(), now() + interval '1 hour')"
        )))
        .bind(id)
        .bind(study_id)
        .bind(format!("S-{}", Uuid::new_v4().simple()))
        .execute(&self.pool)
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.alert_history (alert_id, kind, actor, detail) VALUES ($1, 'raised', 'monitoring', '{{}}')"
        )))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(id)
    }
}

fn screening(site_id: &str, subject_id: &str) -> Value {
    json!({"site_id": site_id, "screening_number": format!("SCR-{subject_id}"), "subject_id": subject_id,
           "age_years": 60, "criteria": {"INC01": true}})
}

fn submission(study_id: &str) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(common::submission(study_id))?)
}

#[tokio::test]
async fn forged_stale_and_misaddressed_tokens_are_refused_with_their_reason() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let idp = &f.idp;
    let stranger = idp.new_key("k1")?; // the provider's kid, a key it never published
    let unpublished = idp.new_key("k9")?;
    // One route of each service, with the role that may call it.
    let doors: [(&str, Method, &str, Option<Value>); 3] = [
        ("site_staff", Method::GET, "/v1/studies/S1", None),
        ("patient_app", Method::POST, "/v1/submissions", Some(submission("S1")?)),
        ("researcher", Method::GET, "/v1/alerts", None),
    ];
    for (role, method, path, body) in doors {
        let claims = || idp.claims("u1", role, &["S1"], &["701"]);
        let with = |change: &dyn Fn(&mut Value)| {
            let mut c = claims();
            change(&mut c);
            c
        };
        let valid = idp.token(&claims())?;
        let mut tampered: Vec<String> = valid.split('.').map(str::to_string).collect();
        tampered[1] = base64url(with(&|c| c["trialflow_studies"] = json!(["*"])).to_string());
        // A fresh submission each time: the gateway takes a resubmission too, but fresh is plainer.
        let body_of = || if path == "/v1/submissions" { submission("S1").ok() } else { body.clone() };
        let cases: Vec<(String, &str)> = vec![
            (idp.token(&with(&|c| c["exp"] = json!(now() - 3600)))?, "token_expired"),
            (idp.token(&with(&|c| c["nbf"] = json!(now() + 3600)))?, "token_not_yet_valid"),
            (idp.token(&with(&|c| c["aud"] = json!("another-app")))?, "wrong_audience"),
            (idp.token(&with(&|c| c["iss"] = json!("https://evil.example")))?, "wrong_issuer"),
            (stranger.sign(&claims())?, "bad_signature"),
            (tampered.join("."), "bad_signature"),
            (idp.unsigned(&claims()), "alg_none"),
            (idp.hmac_with_public_key(&claims())?, "algorithm_not_allowed"),
            (unpublished.sign(&claims())?, "unknown_kid"),
            (
                idp.token(&with(&|c| c.as_object_mut().map_or((), |o| drop(o.remove("exp")))))?,
                "missing_claim",
            ),
            (
                idp.token(&with(&|c| c.as_object_mut().map_or((), |o| drop(o.remove("trialflow_role")))))?,
                "missing_claim",
            ),
            (idp.token(&with(&|c| c["trialflow_role"] = json!("root")))?, "no_role"),
            (idp.token(&with(&|c| c["trialflow_role"] = json!(["admin", role])))?, "no_role"),
            (idp.token(&with(&|c| c["trialflow_studies"] = json!({"S1": true})))?, "invalid_claim"),
            (idp.token(&with(&|c| c["sub"] = json!(42)))?, "invalid_claim"),
            ("not.a.jwt".to_string(), "malformed_token"),
            ("a.b".to_string(), "malformed_token"),
            (format!("{valid}{}", "A".repeat(20_000)), "malformed_token"),
            (base64url("\u{0}\u{1}garbage"), "malformed_token"),
        ];
        for (token, reason) in &cases {
            let reply = f.call(Some(token), method.clone(), path, body_of()).await?;
            ensure!(
                reply.status == StatusCode::UNAUTHORIZED
                    && reply.body["error"]["code"] == "unauthenticated"
                    && reply.body["error"]["reason"] == *reason
                    && reply.challenge.contains("invalid_token"),
                "{path} expected {reason}: {} {} [{}]",
                reply.status,
                reply.body,
                reply.challenge
            );
        }
        let none = f.call(None, method.clone(), path, body_of()).await?;
        ensure!(
            none.status == StatusCode::UNAUTHORIZED && none.challenge == "Bearer",
            "{path}: {}",
            none.body
        );
        // Within the documented skew, and signed with the provider's EC key: accepted.
        let ok = if path == "/v1/submissions" { 202 } else { 200 };
        let late = idp.token(&with(&|c| c["exp"] = json!(now() - 20)))?;
        for token in [valid, late, idp.ec_key.sign(&claims())?] {
            f.expect(ok, &token, method.clone(), path, body_of()).await?;
        }
    }
    f.stop().await
}

#[tokio::test]
async fn a_rotated_key_is_fetched_once_and_made_up_kids_do_not_hammer_the_provider() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let idp = &f.idp;
    let rotated = idp.new_key("k3")?;
    idp.publish(&[&idp.key, &idp.ec_key, &rotated])?;
    let before = idp.fetches();
    let token = rotated.sign(&idp.claims("rita", "researcher", &["S1"], &["*"]))?;
    f.expect(200, &token, Method::GET, "/v1/alerts", None).await?;
    ensure!(idp.fetches() == before + 1, "one re-read for the new kid: {} -> {}", before, idp.fetches());
    // Known now: no further fetch. Made-up kids: at most one re-read per interval (taken above).
    f.expect(200, &token, Method::GET, "/v1/alerts", None).await?;
    let forged = idp.new_key("k-made-up")?;
    for _ in 0..20 {
        let reply = f
            .call(
                Some(&forged.sign(&idp.claims("x", "researcher", &["*"], &["*"]))?),
                Method::GET,
                "/v1/alerts",
                None,
            )
            .await?;
        ensure!(reply.body["error"]["reason"] == "unknown_kid", "{}", reply.body);
    }
    ensure!(idp.fetches() == before + 1, "made-up kids re-read the JWKS: {} -> {}", before, idp.fetches());
    f.stop().await
}

#[tokio::test]
async fn site_roles_act_only_on_their_sites_and_learn_nothing_of_others() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let admin = f.token("ada", "admin", &["*"], &["*"])?;
    let sam = f.token("sam", "site_staff", &["S1"], &["701"])?;
    let ivy = f.token("ivy", "investigator", &["S1"], &["701"])?;
    let phil = f.token("phil", "pharmacist", &["S1"], &["701"])?;
    let nobody = f.token("nils", "site_staff", &[], &[])?;
    let app = f.token("app", "patient_app", &["*"], &["*"])?;
    let subjects = "/v1/studies/S1/subjects";

    f.expect(201, &sam, Method::POST, subjects, Some(screening("701", "701-0001"))).await?;
    f.expect(201, &ivy, Method::POST, subjects, Some(screening("701", "701-0002"))).await?;
    f.expect(201, &admin, Method::POST, subjects, Some(screening("702", "702-0001"))).await?;
    f.expect(200, &sam, Method::GET, "/v1/studies/S1", None).await?;
    f.expect(200, &phil, Method::GET, "/v1/studies/S1/sites/701/kits", None).await?;
    let shipment = json!({"shipment_id": "SH-1", "kits": [{"kit_number": "K-1", "sequence_number": 1,
        "kit_type": "TTS", "lot": "L1", "expiry_date": "2030-12-31", "arm_code": "PBO"}]});
    f.expect(201, &phil, Method::POST, "/v1/studies/S1/sites/701/shipments", Some(shipment.clone())).await?;

    let written = f.site_rows().await?;
    f.out_of_scope(&sam, Method::POST, subjects, Some(screening("702", "702-0002"))).await?;
    f.out_of_scope(&sam, Method::POST, "/v1/studies/S2/subjects", Some(screening("801", "801-0001"))).await?;
    f.out_of_scope(&nobody, Method::POST, subjects, Some(screening("701", "701-0009"))).await?;
    f.out_of_scope(&sam, Method::GET, "/v1/studies/S2", None).await?;
    f.out_of_scope(&sam, Method::GET, "/v1/studies/S1/sites/702/kits", None).await?;
    f.out_of_scope(&phil, Method::POST, "/v1/studies/S1/sites/702/shipments", Some(shipment)).await?;
    let scoped_admin = f.token("adam", "admin", &["S1"], &["*"])?;
    f.out_of_scope(&scoped_admin, Method::POST, "/v1/studies", Some(study("S3"))).await?;
    // Another site's subject and a subject that does not exist: the same answer.
    let consent = json!({"consent_version": "v1", "signed_at": "2014-01-02"});
    for action in ["consent", "enrollment-requests", "withdrawal"] {
        let body = match action {
            "consent" => consent.clone(),
            "enrollment-requests" => json!({"strata": {"AGEGR": "<65"}}),
            _ => json!({"reason_code": "WITHDRAWAL BY SUBJECT"}),
        };
        let other = f
            .out_of_scope(&sam, Method::POST, &format!("{subjects}/702-0001/{action}"), Some(body.clone()))
            .await?;
        let none =
            f.out_of_scope(&sam, Method::POST, &format!("{subjects}/702-0404/{action}"), Some(body)).await?;
        ensure!(other.replace("702-0001", "X") == none.replace("702-0404", "X"), "{other} / {none}");
    }
    ensure!(f.site_rows().await? == written, "a refused command wrote something");
    // Roles still apply within scope: a patient app reads no study set-up.
    let reply = f.call(Some(&app), Method::GET, "/v1/studies/S1", None).await?;
    ensure!(
        reply.status == StatusCode::FORBIDDEN && reply.body["error"]["code"] == "forbidden",
        "{}",
        reply.body
    );
    // The audit trail: a token limited to some studies names one of its own, and sees only its
    // sites' records (and study-level ones).
    let reply = f.call(Some(&sam), Method::GET, "/v1/audit", None).await?;
    ensure!(reply.status == StatusCode::UNPROCESSABLE_ENTITY, "{}", reply.body);
    f.out_of_scope(&sam, Method::GET, "/v1/audit?study_id=S2", None).await?;
    let trail = f.expect(200, &sam, Method::GET, "/v1/audit?study_id=S1&limit=500", None).await?;
    let sites: Vec<&str> = trail["records"]
        .as_array()
        .map_or(vec![], |r| r.iter().filter_map(|r| r["site_id"].as_str()).collect());
    ensure!(sites.contains(&"701") && sites.iter().all(|s| *s == "701"), "{trail}");
    let everything = f.expect(200, &admin, Method::GET, "/v1/audit?study_id=S1&limit=500", None).await?;
    ensure!(everything.to_string().contains("\"702\""), "the admin sees site 702's records: {everything}");
    // Within scope the same commands pass; an admin of every site sees a missing subject as 404.
    f.expect(201, &ivy, Method::POST, &format!("{subjects}/701-0001/consent"), Some(consent.clone())).await?;
    f.expect(404, &admin, Method::POST, &format!("{subjects}/702-0404/consent"), Some(consent)).await?;
    f.stop().await
}

#[tokio::test]
async fn patient_apps_submit_only_to_their_studies() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let app = f.token("app-1", "patient_app", &["S1"], &["*"])?;
    f.expect(202, &app, Method::POST, "/v1/submissions", Some(submission("S1")?)).await?;
    f.out_of_scope(&app, Method::POST, "/v1/submissions", Some(submission("S2")?)).await?;
    let staff = f.token("sam", "site_staff", &["S1"], &["701"])?;
    let reply = f.call(Some(&staff), Method::POST, "/v1/submissions", Some(submission("S1")?)).await?;
    ensure!(reply.status == StatusCode::FORBIDDEN, "{}", reply.body);
    f.stop().await
}

#[tokio::test]
async fn researchers_see_decide_and_stream_only_their_studies_alerts() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let rita = f.token("rita", "researcher", &["S1"], &["*"])?;
    let admin = f.token("ada", "admin", &["*"], &["*"])?;
    let (mine, theirs) = (f.raise("S1").await?, f.raise("S2").await?);

    let page = f.expect(200, &rita, Method::GET, "/v1/alerts", None).await?;
    let ids: Vec<&str> = page["alerts"]
        .as_array()
        .map_or(vec![], |a| a.iter().filter_map(|a| a["alert_id"].as_str()).collect());
    ensure!(ids == [mine.to_string()], "{page}");
    let all = f.expect(200, &admin, Method::GET, "/v1/alerts", None).await?;
    ensure!(all["alerts"].as_array().map_or(0, Vec::len) == 2, "{all}");
    f.out_of_scope(&rita, Method::GET, "/v1/alerts?study_id=S2", None).await?;
    f.out_of_scope(&rita, Method::GET, &format!("/v1/alerts/{theirs}"), None).await?;
    let reason = json!({"reason": "Called the site."});
    f.out_of_scope(&rita, Method::POST, &format!("/v1/alerts/{theirs}/acknowledge"), Some(reason.clone()))
        .await?;
    let status: String = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT status FROM {}.alert WHERE alert_id = $1",
        f.alert_schema
    )))
    .bind(theirs)
    .fetch_one(&f.pool)
    .await?;
    ensure!(status == "open", "an out-of-scope decision changed the alert: {status}");

    // The stream: the snapshot holds only S1's alert; then S2's change, then S1's: only S1's arrives.
    let mut response = f.http.get(format!("{}/v1/alerts/stream", f.alerts)).bearer_auth(&rita).send().await?;
    ensure!(response.status() == StatusCode::OK, "stream: {}", response.status());
    let mut seen = String::new();
    read_until(&mut response, &mut seen, "event: ready").await?;
    ensure!(seen.contains(&mine.to_string()) && !seen.contains(&theirs.to_string()), "snapshot: {seen}");
    f.expect(200, &admin, Method::POST, &format!("/v1/alerts/{theirs}/acknowledge"), Some(reason.clone()))
        .await?;
    f.expect(200, &rita, Method::POST, &format!("/v1/alerts/{mine}/acknowledge"), Some(reason)).await?;
    read_until(&mut response, &mut seen, "event: acknowledged").await?;
    ensure!(!seen.contains(&theirs.to_string()), "another study's change reached the stream: {seen}");
    f.stop().await
}

/// Reads the stream into `seen` until it holds `marker`.
async fn read_until(response: &mut reqwest::Response, seen: &mut String, marker: &str) -> anyhow::Result<()> {
    tokio::time::timeout(WAIT, async {
        while !seen.contains(marker) {
            let chunk = response.chunk().await?.context("stream ended")?;
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        Ok::<_, anyhow::Error>(())
    })
    .await
    .with_context(|| format!("waiting for {marker} on the stream"))?
}

/// A JWKS that is garbage, holds no usable signing key (only a shared secret), is too large or
/// cannot be fetched: the service does not start, and says why.
#[tokio::test]
async fn a_service_does_not_start_on_keys_it_cannot_use() -> anyhow::Result<()> {
    init_logs();
    let idp = TestIdp::start().await?;
    let url = database_url();
    let schema = SchemaName::new(unique("sa"))?;
    site_api::migrate(&url, &schema).await?;
    let file = idp.jwks_file.to_string_lossy().to_string();
    let cases: [(Vec<u8>, &str, &str); 5] = [
        (b"\x00\xffnot json".to_vec(), &file, "is not a JWK set"),
        (
            br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}"#.to_vec(),
            &file,
            "no usable signing key",
        ),
        (br#"{"keys": "all of them"}"#.to_vec(), &file, "is not a JWK set"),
        (vec![b' '; 2 * 1024 * 1024], &file, "larger than"),
        (vec![], "http://127.0.0.1:9/jwks", "cannot fetch the JWKS"),
    ];
    for (jwks, source, reason) in cases {
        std::fs::write(&idp.jwks_file, &jwks)?;
        let started = SiteApi::bind(SiteApiConfig {
            listen: "127.0.0.1:0".parse()?,
            database_url: url.clone(),
            schema: schema.clone(),
            tokens: vec![],
            oidc: Some(OidcSettings::new(&idp.issuer, &idp.audience, source)),
            limits: trialflow_http::limits::Limits::unthrottled(),
            topics: TopicNames::new(""),
            max_connections: 1,
            max_future_skew_secs: DEFAULT_MAX_FUTURE_SKEW_SECS,
            code_break_max_auth_age_secs: site_api::code_break::DEFAULT_MAX_AUTH_AGE_SECS,
        })
        .await;
        let error = started.err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(error.contains(reason), "{source}: expected `{reason}`, got `{error}`");
    }
    Ok(())
}
