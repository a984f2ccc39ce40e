//! Emergency unblinding (issue 17, item 4) through the whole pipeline on the local stack: the
//! site API trusting an identity provider (`testkit::idp`), the relay, the broker over TCP, the
//! enrollment, kit-allocation, monitoring and notifier consumers and the alert API, in this
//! process, with a webhook receiver of the study team.
//!
//! An investigator of the subject's site, freshly signed in, breaks the code with a reason and
//! is shown the treatment the randomization records hold; the retry of the same request shows
//! it again and writes nothing; the study team gets a CODE-BREAK alert (alert API and webhook)
//! that says who and why. And the blinding contract, by content: the study's arm codes and
//! names appear in no message of any blinded topic, in no alert or webhook body and in no
//! blinded audit view — only in the investigator's answer and the unblinded audit view.
//! Refused: a stale sign-in, a token without `auth_time`, other roles, another site, no reason,
//! a subject not yet randomized.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::enrollment;
use trialflow_consumers::notifier::config::parse_subscriptions;
use trialflow_http::oidc::OidcSettings;
use trialflow_outbox::KafkaConfig;
use trialflow_pipeline::{Pipeline, PipelineConfig};
use trialflow_producers::site_api;
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_testkit::idp::{TestIdp, now};
use trialflow_testkit::{database_url, init_logs, kafka, wait_until};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);
const STUDY: &str = "CB";
/// What must never appear where blinded users look: the arms' codes and names.
const ARM_SECRETS: &[&str] = &["CBARM1", "CBARM2", "Cobaltamine", "Indigomab"];

type Received = Arc<Mutex<Vec<String>>>;

/// A webhook endpoint of the study team: every body it receives.
async fn webhook(stop: CancellationToken) -> anyhow::Result<(String, Received)> {
    let received: Received = Arc::default();
    let seen = received.clone();
    let url = trialflow_testkit::webhook::receiver(stop, move |_, body| {
        seen.lock().unwrap_or_else(|e| e.into_inner()).push(String::from_utf8_lossy(body).into_owned());
    })
    .await?;
    Ok((url, received))
}

struct Reply {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
    text: String,
}

struct Api {
    http: Client,
    base: String,
}

impl Api {
    async fn call(&self, token: &str, path: &str, body: Option<(&str, Value)>) -> anyhow::Result<Reply> {
        let url = format!("{}{path}", self.base);
        let request = match body {
            Some((key, body)) => self.http.post(url).header("Idempotency-Key", key).json(&body),
            None => self.http.get(url),
        };
        let response = request.bearer_auth(token).send().await?;
        let (status, headers) = (response.status(), response.headers().clone());
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Reply { status, headers, body, text })
    }

    /// POSTs `body` with a fresh key and expects 201.
    async fn created(&self, token: &str, path: &str, body: Value) -> anyhow::Result<Value> {
        let key = Uuid::new_v4().to_string();
        let reply = self.call(token, path, Some((&key, body))).await?;
        ensure!(reply.status == StatusCode::CREATED, "POST {path}: {} {}", reply.status, reply.text);
        Ok(reply.body)
    }
}

/// Every message of every blinded catalogue topic (and its dead letters) of `names`, read from
/// the beginning to the end each partition has now.
fn blinded_messages(kafka: &KafkaConfig, names: &TopicNames) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", format!("code-break-check-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    let mut ends = Vec::new();
    let mut assignment = TopicPartitionList::new();
    for topic in metadata.topics() {
        let Some(catalogue) = topic.name().strip_prefix(names.prefix()) else { continue };
        if topics::is_restricted(catalogue) {
            continue;
        }
        for partition in topic.partitions() {
            let (low, high) =
                consumer.fetch_watermarks(topic.name(), partition.id(), Duration::from_secs(10))?;
            if high > low {
                assignment.add_partition_offset(topic.name(), partition.id(), Offset::Beginning)?;
                ends.push((topic.name().to_string(), partition.id(), high));
            }
        }
    }
    ensure!(!ends.is_empty(), "no blinded topic of {} holds a message", names.prefix());
    consumer.assign(&assignment)?;
    let mut messages = Vec::new();
    let mut left: usize = ends.len();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while left > 0 {
        ensure!(std::time::Instant::now() < deadline, "blinded topics not read to their end in 60 s");
        let Some(message) = consumer.poll(Duration::from_millis(500)) else { continue };
        let message = message?;
        let topic = message.topic().to_string();
        let key = message.key().unwrap_or_default().to_vec();
        let mut bytes = message.payload().unwrap_or_default().to_vec();
        bytes.extend(key);
        if let Some(headers) = rdkafka::message::Message::headers(&message) {
            use rdkafka::message::Headers;
            for header in headers.iter() {
                bytes.extend(header.key.as_bytes());
                bytes.extend(header.value.unwrap_or_default());
            }
        }
        if let Some(end) = ends.iter().position(|(t, p, high)| {
            *t == topic && *p == message.partition() && message.offset() + 1 >= *high
        }) {
            ends.remove(end);
            left -= 1;
        }
        messages.push((topic, bytes));
    }
    Ok(messages)
}

fn secrets_in(text: &[u8]) -> Vec<&'static str> {
    ARM_SECRETS.iter().copied().filter(|s| text.windows(s.len()).any(|w| w == s.as_bytes())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_investigator_breaks_a_code_the_study_team_learns_that_and_no_blinded_place_shows_the_arm()
-> anyhow::Result<()> {
    init_logs();
    let idp = TestIdp::start().await?;
    let stop = CancellationToken::new();
    let (hook, received) = webhook(stop.clone()).await?;
    let mut config = PipelineConfig::isolated("codebreak", &database_url(), &kafka())?;
    // The demo's static tokens for set-up; the identity provider for the investigators.
    config.site_api.oidc = Some(OidcSettings::new(&idp.issuer, &idp.audience, &idp.jwks_url));
    config.settings.notifier.subscriptions = parse_subscriptions(
        &format!(
            r#"[{{"recipient_id": "study-team", "study_id": "{STUDY}", "min_severity": "INFO",
                 "channel": "webhook", "url": "{hook}", "secret": "code-break-test-secret"}}]"#
        ),
        "test",
    )?;
    let names = config.topics.clone();
    let enrollment_schema = config.schemas[enrollment::NAME].clone();
    let site_schema = config.schemas[site_api::NAME].clone();
    let pipeline = Pipeline::start(config, &stop).await?;
    let pool = PgPool::connect(&database_url()).await?;
    let http = Client::new();
    let site = Api { http: http.clone(), base: format!("http://{}/v1", pipeline.site_api_addr()) };
    let alerts = Api { http, base: format!("http://{}/v1", pipeline.alert_api_addr()) };

    let study = json!({
        "study_id": STUDY, "title": "Code break",
        "arms": [{"arm_code": "CBARM1", "name": "Cobaltamine", "ratio": 1},
                 {"arm_code": "CBARM2", "name": "Indigomab", "ratio": 1}],
        "stratification_factors": [{"factor": "AGEGR", "values": ["<65", ">=65"]}],
        "eligibility": {"criteria": [{"criterion_id": "INC01", "description": "Adult"}]},
        "randomization": {"seed": 11, "block_multiples": [1], "slots_per_stratum": 20, "warn_slots_left": 2},
        "kit_types": [{"kit_type": "TTS", "do_not_dispense_days": 0, "do_not_count_days": 0, "low_stock_threshold": 1}],
        "enrollment_kit_type": "TTS"
    });
    site.created("admin-token", "/studies", study).await?;
    for site_id in ["701", "702"] {
        let body = json!({"site_id": site_id, "name": "Site", "time_zone": "America/New_York"});
        site.created("admin-token", &format!("/studies/{STUDY}/sites"), body).await?;
    }
    let kits: Vec<Value> = ["CBARM1", "CBARM2"]
        .iter()
        .enumerate()
        .flat_map(|(a, arm)| {
            (0..3).map(move |i| {
                json!({"kit_number": format!("K701-{a}{i}"), "sequence_number": a * 3 + i, "kit_type": "TTS",
                       "lot": "L1", "expiry_date": "2030-12-31", "arm_code": arm})
            })
        })
        .collect();
    let shipment = json!({"shipment_id": "SH-701", "kits": kits});
    site.created("pharmacist-token", &format!("/studies/{STUDY}/sites/701/shipments"), shipment).await?;
    for (subject, request) in [("701-0001", true), ("701-0002", false)] {
        let screening = json!({"site_id": "701", "screening_number": format!("SCR-{subject}"),
                               "subject_id": subject, "age_years": 50, "sex": "F", "criteria": {"INC01": true}});
        site.created("site-token", &format!("/studies/{STUDY}/subjects"), screening).await?;
        let path = format!("/studies/{STUDY}/subjects/{subject}");
        let consent = json!({"consent_version": "v1", "signed_at": "2026-11-20"});
        site.created("site-token", &format!("{path}/consent"), consent).await?;
        if request {
            let strata = json!({"strata": {"AGEGR": "<65"}});
            site.created("site-token", &format!("{path}/enrollment-requests"), strata).await?;
        }
    }
    let enrolled = format!(
        "SELECT slot.arm_code FROM {enrollment_schema}.subject s JOIN {enrollment_schema}.randomization_slot slot
           ON slot.study_id = s.study_id AND slot.subject_id = s.subject_id
         WHERE s.study_id = '{STUDY}' AND s.subject_id = '701-0001' AND s.status = 'enrolled'"
    );
    wait_until("subject 701-0001 enrolled", WAIT, || {
        let (pool, sql) = (pool.clone(), enrolled.clone());
        async move {
            let arm: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql)).fetch_optional(&pool).await?;
            Ok(arm.is_some())
        }
    })
    .await?;
    let arm: String = sqlx::query_scalar(AssertSqlSafe(enrolled)).fetch_one(&pool).await?;

    let path = format!("/studies/{STUDY}/subjects/701-0001/code-break");
    let reason = "SAE: anaphylaxis on day 12; the emergency physician needs the treatment.";
    let ian = |auth_time: Option<i64>, sites: &[&str]| -> anyhow::Result<String> {
        let mut claims = idp.claims("ian", "investigator", &[STUDY], sites);
        if let Some(claims) = claims.as_object_mut() {
            match auth_time {
                Some(at) => claims.insert("auth_time".into(), json!(at)),
                None => claims.remove("auth_time"),
            };
        }
        idp.token(&claims)
    };
    let fresh = ian(Some(now() - 10), &["701"])?;

    // Refusals first: nothing of them may be written.
    let refusals: Vec<(String, Value, StatusCode, &str)> = vec![
        (
            ian(Some(now() - 301), &["701"])?,
            json!({"reason": reason}),
            StatusCode::UNAUTHORIZED,
            "authentication_too_old",
        ),
        (ian(None, &["701"])?, json!({"reason": reason}), StatusCode::UNAUTHORIZED, "authentication_too_old"),
        ("site-token".into(), json!({"reason": reason}), StatusCode::FORBIDDEN, "forbidden"),
        ("admin-token".into(), json!({"reason": reason}), StatusCode::FORBIDDEN, "forbidden"),
        ("pharmacist-token".into(), json!({"reason": reason}), StatusCode::FORBIDDEN, "forbidden"),
        (ian(Some(now()), &["702"])?, json!({"reason": reason}), StatusCode::FORBIDDEN, "out_of_scope"),
        (fresh.clone(), json!({}), StatusCode::BAD_REQUEST, "invalid_json"),
        (fresh.clone(), json!({"reason": " \n "}), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        (
            fresh.clone(),
            json!({"reason": "ok", "arm_code": "CBARM1"}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (fresh.clone(), json!({"reason": "a\u{0}b"}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_characters"),
    ];
    for (token, body, status, code) in refusals {
        let key = Uuid::new_v4().to_string();
        let reply = site.call(&token, &path, Some((&key, body.clone()))).await?;
        ensure!(
            reply.status == status
                && (reply.body["error"]["code"] == code || reply.body["error"]["reason"] == code),
            "{body}: expected {status} {code}, got {} {}",
            reply.status,
            reply.text
        );
        ensure!(secrets_in(reply.text.as_bytes()).is_empty(), "a refusal shows the arm: {}", reply.text);
        if code == "authentication_too_old" {
            let challenge =
                reply.headers.get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default();
            ensure!(
                challenge.contains("insufficient_user_authentication")
                    && challenge.contains("max_age=\"300\""),
                "RFC 9470 step-up challenge: {challenge}"
            );
        }
    }
    let other = format!("/studies/{STUDY}/subjects/701-0002/code-break");
    let reply = site.call(&fresh, &other, Some(("not-randomized", json!({"reason": reason})))).await?;
    ensure!(
        reply.status == StatusCode::CONFLICT && reply.body["error"]["code"] == "not_randomized",
        "{}",
        reply.text
    );

    // The code break, and its retry.
    let key = Uuid::new_v4().to_string();
    let first = site.call(&fresh, &path, Some((&key, json!({"reason": reason})))).await?;
    ensure!(first.status == StatusCode::CREATED, "{} {}", first.status, first.text);
    ensure!(
        first.body["treatment"]["arm_code"] == arm.as_str(),
        "shown {} but randomized to {arm}",
        first.text
    );
    let name = if arm == "CBARM1" { "Cobaltamine" } else { "Indigomab" };
    ensure!(first.body["treatment"]["arm_name"] == name, "{}", first.text);
    ensure!(
        first.body["treatment"]["kit_number"].as_str().is_some_and(|k| k.starts_with("K701-")),
        "{}",
        first.text
    );
    ensure!(first.headers.get("cache-control").is_some_and(|v| v == "no-store"), "{:?}", first.headers);
    let again = site.call(&fresh, &path, Some((&key, json!({"reason": reason})))).await?;
    ensure!(again.status == StatusCode::CREATED, "{}", again.text);
    ensure!(again.headers.get("idempotent-replayed").is_some_and(|v| v == "true"), "{:?}", again.headers);
    ensure!(
        (&again.body["event_ids"], &again.body["treatment"])
            == (&first.body["event_ids"], &first.body["treatment"])
    );
    // Another user cannot take the answer with the key.
    let other_user = idp.token(&idp.claims("ivy", "investigator", &[STUDY], &["701"]))?;
    let stolen = site.call(&other_user, &path, Some((&key, json!({"reason": "x"})))).await?;
    ensure!(
        stolen.status == StatusCode::CREATED && stolen.body["event_ids"] != first.body["event_ids"],
        "{}",
        stolen.text
    );
    let records: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {site_schema}.audit_trail WHERE action = 'subject.code_broken'"
    )))
    .fetch_one(&pool)
    .await?;
    ensure!(records == 2, "one audit record per code break (ian once, ivy once), got {records}");

    // The study team learns that, who and why: the alert API and the webhook.
    wait_until("the CODE-BREAK webhook", WAIT, || {
        let received = received.clone();
        async move {
            Ok(received.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|b| b.contains("CODE-BREAK")))
        }
    })
    .await?;
    let hooks = received.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let hook = hooks.iter().find(|b| b.contains("CODE-BREAK")).context("webhook")?;
    let hook: Value = serde_json::from_str(hook)?;
    ensure!(hook["subject_id"] == "701-0001" && hook["severity"] == "HIGH", "{hook}");
    ensure!(
        hook["summary"]
            .as_str()
            .is_some_and(|s| s.contains("code broken by ian") && s.contains("anaphylaxis")),
        "{hook}"
    );
    for body in &hooks {
        ensure!(secrets_in(body.as_bytes()).is_empty(), "a webhook shows the arm: {body}");
    }
    let listed = alerts.call("researcher-token", &format!("/alerts?study_id={STUDY}"), None).await?;
    ensure!(listed.status == StatusCode::OK && listed.text.contains("CODE-BREAK"), "{}", listed.text);
    ensure!(secrets_in(listed.text.as_bytes()).is_empty(), "the alert API shows the arm: {}", listed.text);

    // The audit trail: blinded views leave the treatment out; the unblinded one has it.
    for token in ["site-token", "researcher-token"] {
        let view = site.call(token, &format!("/audit?study_id={STUDY}"), None).await?;
        ensure!(
            view.status == StatusCode::OK && view.text.contains("subject.code_broken"),
            "{token}: {}",
            view.text
        );
        ensure!(view.text.contains(reason), "{token}: the reason is in the record");
        ensure!(
            secrets_in(view.text.as_bytes()).is_empty(),
            "{token}'s blinded audit view shows the arm: {}",
            view.text
        );
    }
    let unblinded = site.call("pharmacist-token", &format!("/audit?study_id={STUDY}"), None).await?;
    ensure!(unblinded.status == StatusCode::OK && unblinded.text.contains(&arm), "{}", unblinded.text);

    // Every blinded topic, byte by byte: CodeBroken is there, the arm nowhere.
    let (kafka, names) = (kafka(), names.clone());
    let messages = tokio::task::spawn_blocking(move || blinded_messages(&kafka, &names)).await??;
    let code_broken = |(topic, bytes): &&(String, Vec<u8>)| {
        topic.ends_with(topics::SUBJECT_LIFECYCLE) && bytes.windows(10).any(|w| w == b"CodeBroken")
    };
    ensure!(
        messages.iter().filter(code_broken).count() == 2,
        "one CodeBroken per code break on the lifecycle topic"
    );
    for (topic, bytes) in &messages {
        let found = secrets_in(bytes);
        ensure!(found.is_empty(), "blinded topic {topic} carries {found:?}");
    }
    ensure!(messages.len() >= 12, "the check read the pipeline's messages: {}", messages.len());

    stop.cancel();
    pipeline.wait().await
}
