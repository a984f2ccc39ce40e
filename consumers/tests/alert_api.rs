//! The researchers' alert API over HTTP against the local PostgreSQL (`make up`): each test
//! migrates its own monitoring schema, plays the monitoring consumer by inserting alerts with SQL
//! ([`raise`]), and checks the answers, the rows and the outbox events of the decisions, the
//! event stream, and (in headless Chromium) the inbox page.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, TimeDelta, Utc};
use fantoccini::{Client, Locator};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::monitoring::{self, api::AlertApi, api::AlertApiConfig, api::AlertApiError};
use trialflow_http::auth::{Role, TokenGrant};
use trialflow_http::limits::{Limits, Rate};
use trialflow_outbox::SchemaName;
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{AlertAcknowledged, AlertResolved, Event};
use trialflow_testkit::{database_url, init_logs, unique, wait_until};
use uuid::Uuid;

mod common;

use common::browser::{Driver, headless_chromium, tools};

/// How long a change may take to reach a stream or the page.
const LIVE: Duration = Duration::from_secs(10);

/// An alert as the monitoring consumer would raise it.
#[derive(Debug, Clone)]
struct Alert<'a> {
    study_id: &'a str,
    site_id: Option<&'a str>,
    subject_id: Option<&'a str>,
    rule_id: &'a str,
    severity: &'a str,
    summary: &'a str,
    /// Readings, as minutes before now they were observed (in insertion order).
    evidence_minutes_ago: &'a [i64],
    /// When it was raised; now (the transaction's start) when `None`.
    raised_at: Option<DateTime<Utc>>,
    /// Its id; a fresh UUIDv7 (as the consumer makes) when `None`.
    alert_id: Option<Uuid>,
}

impl Default for Alert<'_> {
    fn default() -> Self {
        Self {
            study_id: "CDISCPILOT01",
            site_id: Some("701"),
            subject_id: Some("01-701-1015"),
            rule_id: "vs.sysbp.high",
            severity: "HIGH",
            summary: "Systolic blood pressure 182 mmHg",
            evidence_minutes_ago: &[30],
            raised_at: None,
            alert_id: None,
        }
    }
}

/// Inserts an alert, its evidence and its `raised` history row in one transaction, as the
/// monitoring consumer does; the history trigger notifies the API.
async fn raise(pool: &PgPool, s: &SchemaName, alert: &Alert<'_>) -> anyhow::Result<Uuid> {
    let alert_id = alert.alert_id.unwrap_or_else(Uuid::now_v7);
    let mut tx = pool.begin().await?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.alert (alert_id, study_id, site_id, subject_id, rule_id, rule_version, severity,
                                source_label, summary, effective_at, escalate_at, raised_at)
         VALUES ($1, $2, $3, $4, $5, 3, $6, 'Vital signs', $7, now() - interval '1 hour',
                 now() + interval '1 hour', coalesce($8, now()))"
    )))
    .bind(alert_id)
    .bind(alert.study_id)
    .bind(alert.site_id)
    .bind(alert.subject_id)
    .bind(alert.rule_id)
    .bind(alert.severity)
    .bind(alert.summary)
    .bind(alert.raised_at)
    .execute(&mut *tx)
    .await?;
    for (i, minutes) in alert.evidence_minutes_ago.iter().enumerate() {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.alert_evidence (alert_id, event_id, observed_at, description, value, unit)
             VALUES ($1, $2, now() - make_interval(mins => $3::int), $4, $5, 'mm[Hg]')"
        )))
        .bind(alert_id)
        .bind(Uuid::new_v4())
        .bind(*minutes as i32)
        .bind(format!("reading {i}"))
        .bind(180.0 + i as f64)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.alert_history (alert_id, kind, actor, detail) VALUES ($1, 'raised', 'monitoring', $2)"
    )))
    .bind(alert_id)
    .bind(json!({"rule_version": 3}))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(alert_id)
}

struct TestApi {
    base: String,
    schema: SchemaName,
    pool: PgPool,
    topics: TopicNames,
    http: reqwest::Client,
    researcher: String,
    admin: String,
    site_staff: String,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), AlertApiError>>,
}

/// A page of `GET /v1/alerts`.
#[derive(Debug)]
struct Page {
    ids: Vec<Uuid>,
    /// `(raised_at, alert_id)` of each alert: the list's order, descending.
    keys: Vec<(DateTime<Utc>, Uuid)>,
    next_cursor: Option<String>,
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    text: String,
}

impl Answer {
    /// `(status, error code, field)`, for error answers.
    fn error(&self) -> (StatusCode, &str, Option<&str>) {
        let error = &self.body["error"];
        (self.status, error["code"].as_str().unwrap_or(""), error["field"].as_str())
    }
}

/// One outbox row, as the relay would publish it.
#[derive(Debug)]
struct Row {
    topic: String,
    key: String,
    event_type: String,
    payload: Vec<u8>,
}

impl TestApi {
    async fn start() -> anyhow::Result<Self> {
        Self::start_with(Limits::unthrottled()).await
    }

    async fn start_with(limits: Limits) -> anyhow::Result<Self> {
        init_logs();
        let schema = SchemaName::new(unique("alerts"))?;
        let url = database_url();
        monitoring::migrate(&url, &schema)
            .await
            .context("migrating the test schema (is `make up` running?)")?;
        let topics = TopicNames::new(unique("t") + ".");
        let token = |role: Role, user: &str| TokenGrant { token: unique(user), role, user: user.to_string() };
        let tokens =
            vec![token(Role::Researcher, "rita"), token(Role::Admin, "ada"), token(Role::SiteStaff, "sam")];
        let config = AlertApiConfig {
            listen: "127.0.0.1:0".parse()?,
            database_url: url.clone(),
            schema: schema.clone(),
            risk_schema: trialflow_consumers::risk::schema(),
            rules: Default::default(),
            thresholds: Default::default(),
            tokens: tokens.clone(),
            oidc: None,
            topics: topics.clone(),
            limits,
        };
        let api = AlertApi::bind(config).await?;
        let base = format!("http://{}", api.local_addr());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(api.run(shutdown.clone()));
        let pool = PgPoolOptions::new().max_connections(2).connect(&url).await?;
        let [researcher, admin, site_staff] = [0, 1, 2].map(|i| tokens[i].token.clone());
        Ok(Self {
            base,
            schema,
            pool,
            topics,
            http: reqwest::Client::new(),
            researcher,
            admin,
            site_staff,
            shutdown,
            server,
        })
    }

    /// Stops the API; it must stop promptly also with streams open.
    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server).await.context("API did not stop")???;
        Ok(())
    }

    async fn raise(&self, alert: &Alert<'_>) -> anyhow::Result<Uuid> {
        raise(&self.pool, &self.schema, alert).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Answer> {
        let response = request.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Answer { status, headers, body, text })
    }

    async fn get(&self, token: &str, path: &str) -> anyhow::Result<Answer> {
        self.send(self.http.get(format!("{}{path}", self.base)).bearer_auth(token)).await
    }

    async fn post(&self, token: &str, path: &str, body: &Value) -> anyhow::Result<Answer> {
        let request = self.http.post(format!("{}{path}", self.base)).bearer_auth(token).json(body);
        self.send(request).await
    }

    /// The alert ids a list answers, in order (one page; it must be the only one).
    async fn list(&self, query: &str) -> anyhow::Result<Vec<String>> {
        let page = self.page(query).await?;
        ensure!(page.next_cursor.is_none(), "GET /v1/alerts{query} has more pages");
        Ok(page.ids.iter().map(Uuid::to_string).collect())
    }

    /// One page of the list.
    async fn page(&self, query: &str) -> anyhow::Result<Page> {
        let answer = self.get(&self.researcher, &format!("/v1/alerts{query}")).await?;
        ensure!(
            answer.status == StatusCode::OK,
            "GET /v1/alerts{query} answered {}: {}",
            answer.status,
            answer.text
        );
        let fields: Vec<&String> = answer.body.as_object().context("not an object")?.keys().collect();
        ensure!(fields == ["alerts", "next_cursor"], "fields of a page: {fields:?}");
        let alerts = answer.body["alerts"].as_array().context("no `alerts` array")?;
        let mut ids = Vec::new();
        let mut keys = Vec::new();
        for alert in alerts {
            let id: Uuid = alert["alert_id"].as_str().context("alert_id")?.parse()?;
            let raised_at = alert["raised_at"].as_str().context("raised_at")?;
            keys.push((DateTime::parse_from_rfc3339(raised_at)?.to_utc(), id));
            ids.push(id);
        }
        let next_cursor = match &answer.body["next_cursor"] {
            Value::Null => None,
            Value::String(cursor) => Some(cursor.clone()),
            other => bail!("next_cursor is {other}"),
        };
        Ok(Page { ids, keys, next_cursor })
    }

    async fn detail(&self, id: Uuid) -> anyhow::Result<Value> {
        let answer = self.get(&self.researcher, &format!("/v1/alerts/{id}")).await?;
        ensure!(answer.status == StatusCode::OK, "GET alert answered {}: {}", answer.status, answer.text);
        Ok(answer.body)
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

    /// The one outbox event `E` keyed `key`, decoded, after checking its topic.
    async fn event<E: Event>(&self, key: Uuid) -> anyhow::Result<E> {
        let rows = self.outbox().await?;
        let matching: Vec<&Row> =
            rows.iter().filter(|r| r.event_type == E::NAME && r.key == key.to_string()).collect();
        let [row] = matching.as_slice() else { bail!("expected one {} for {key}, got {rows:?}", E::NAME) };
        ensure!(row.topic == self.topics.of::<E>(), "{} went to {}", E::NAME, row.topic);
        Ok(trialflow_schemas::decode::<E>(&row.payload)?)
    }

    async fn open_stream(&self, last_event_id: Option<&str>) -> anyhow::Result<SseReader> {
        let mut request =
            self.http.get(format!("{}/v1/alerts/stream", self.base)).bearer_auth(&self.researcher);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await?;
        ensure!(response.status() == StatusCode::OK, "stream answered {}", response.status());
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok());
        ensure!(content_type == Some("text/event-stream"), "stream content type {content_type:?}");
        Ok(SseReader { response, buffer: String::new() })
    }
}

// ---- list, detail ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_alerts_newest_first_with_filters() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    let first = api
        .raise(&Alert { severity: "WARNING", evidence_minutes_ago: &[20, 10], ..Alert::default() })
        .await?;
    let second = api
        .raise(&Alert {
            site_id: Some("702"),
            subject_id: Some("01-702-1001"),
            severity: "CRITICAL",
            ..Alert::default()
        })
        .await?;
    let third = api.raise(&Alert { study_id: "OTHER01", severity: "INFO", ..Alert::default() }).await?;
    let [first, second, third] = [first, second, third].map(|id| id.to_string());
    let [first, second, third] = [first.as_str(), second.as_str(), third.as_str()];

    assert_eq!(api.list("").await?, [third, second, first]);
    assert_eq!(api.list("?study_id=CDISCPILOT01").await?, [second, first]);
    assert_eq!(api.list("?study_id=CDISCPILOT01&site_id=701").await?, [first]);
    assert_eq!(api.list("?severity=critical,warning").await?, [second, first]);
    let newest = api.page("?status=open&limit=1").await?;
    assert_eq!(newest.ids.iter().map(Uuid::to_string).collect::<Vec<_>>(), [third]);
    assert!(newest.next_cursor.is_some(), "two more pages");
    assert!(api.list("?status=acknowledged,resolved").await?.is_empty());

    let answer = api.get(&api.researcher, "/v1/alerts?site_id=701&study_id=CDISCPILOT01").await?;
    let alert = &answer.body["alerts"][0];
    assert_eq!(alert["evidence_count"], 2, "{alert}");
    for (field, value) in [
        ("study_id", json!("CDISCPILOT01")),
        ("site_id", json!("701")),
        ("subject_id", json!("01-701-1015")),
        ("rule_id", json!("vs.sysbp.high")),
        ("rule_version", json!(3)),
        ("severity", json!("WARNING")),
        ("source_label", json!("Vital signs")),
        ("status", json!("open")),
        ("level", json!(0)),
        ("acknowledged_at", Value::Null),
        ("acknowledged_by", Value::Null),
        ("resolved_at", Value::Null),
        ("resolved_by", Value::Null),
    ] {
        assert_eq!(alert[field], value, "{field} of {alert}");
    }
    for field in ["effective_at", "raised_at"] {
        let text = alert[field].as_str().unwrap_or_default();
        assert!(chrono::DateTime::parse_from_rfc3339(text).is_ok(), "{field} = {text:?}");
    }

    for (query, code, field) in [
        ("severity=SEVERE", "invalid_parameter", "severity"),
        ("status=closed", "invalid_parameter", "status"),
        ("limit=0", "invalid_parameter", "limit"),
        ("limit=many", "invalid_parameter", "limit"),
        ("study_id=a%20b", "invalid_parameter", "study_id"),
        ("colour=red", "unknown_parameter", "colour"),
    ] {
        let answer = api.get(&api.researcher, &format!("/v1/alerts?{query}")).await?;
        assert_eq!(answer.error(), (StatusCode::BAD_REQUEST, code, Some(field)), "{query}");
    }
    api.stop().await
}

/// A whole number of microseconds, as PostgreSQL keeps instants.
fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// `t` in the query: RFC 3339 with its `+` percent-encoded.
fn query_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339().replace('+', "%2B")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walking_all_pages_misses_and_repeats_nothing_while_alerts_are_raised() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    let subjects: Vec<String> = (0..40).map(|i| format!("P-{i:03}")).collect();
    let subject = |i: usize| Some(subjects[i].as_str());
    let t0 = micros(Utc::now() - TimeDelta::hours(1));
    let minutes = TimeDelta::minutes;

    // 16 alerts a minute apart, and 8 raised in one instant between them (a batch of the
    // monitoring consumer raises several in one transaction): pages end inside the tie.
    let mut expected = std::collections::BTreeSet::new();
    for i in 0..16 {
        let raised_at = Some(t0 - minutes(i as i64));
        expected.insert(api.raise(&Alert { subject_id: subject(i), raised_at, ..Alert::default() }).await?);
    }
    let tie = t0 - minutes(7) - TimeDelta::seconds(30);
    for i in 16..24 {
        expected.insert(
            api.raise(&Alert { subject_id: subject(i), raised_at: Some(tie), ..Alert::default() }).await?,
        );
    }

    let mut walked: Vec<(DateTime<Utc>, Uuid)> = Vec::new();
    let mut not_expected = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        // `limit` may change from page to page.
        let limit = if pages < 3 { 5 } else { 7 };
        let query = match &cursor {
            None => format!("?limit={limit}"),
            Some(c) => format!("?limit={limit}&cursor={c}"),
        };
        let page = api.page(&query).await?;
        pages += 1;
        if page.next_cursor.is_some() {
            assert_eq!(page.ids.len(), limit, "page {pages} is not full but has a next one");
        }
        walked.extend(&page.keys);
        let Some(next) = page.next_cursor else { break };
        cursor = Some(next);
        let position = *walked.last().context("a page with a cursor has alerts")?;
        match pages {
            // Raised now: newer than the walk's position, so for the next walk (or the stream).
            1 => {
                for i in 24..27 {
                    not_expected
                        .push(api.raise(&Alert { subject_id: subject(i), ..Alert::default() }).await?);
                }
            }
            // Raised (back-dated) where the walk has not been yet: it must come.
            2 => {
                for i in 27..29 {
                    let raised_at = Some(t0 - TimeDelta::days(2));
                    expected.insert(
                        api.raise(&Alert { subject_id: subject(i), raised_at, ..Alert::default() }).await?,
                    );
                }
            }
            // At the position's very instant: the alert id decides on which side it falls.
            3 => {
                assert_eq!(position.0, tie, "the third page ends inside the tie");
                let at = Some(position.0);
                let after = Alert {
                    subject_id: subject(29),
                    raised_at: at,
                    alert_id: Some(Uuid::nil()),
                    ..Alert::default()
                };
                expected.insert(api.raise(&after).await?);
                let before = Alert {
                    subject_id: subject(30),
                    raised_at: at,
                    alert_id: Some(Uuid::max()),
                    ..Alert::default()
                };
                not_expected.push(api.raise(&before).await?);
                let passed = Alert { subject_id: subject(31), raised_at: Some(t0), ..Alert::default() };
                not_expected.push(api.raise(&passed).await?);
            }
            _ => {}
        }
    }

    let ids: Vec<Uuid> = walked.iter().map(|(_, id)| *id).collect();
    let unique: std::collections::BTreeSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an alert came twice: {ids:?}");
    assert_eq!(unique, expected, "the walk missed or added alerts");
    assert!(walked.windows(2).all(|w| w[0] > w[1]), "not newest first: {walked:?}");
    assert!(pages >= 5, "{pages} pages");

    // A fresh walk has everything, the alerts raised behind the first walk's back included.
    let all = api.page("?limit=500").await?;
    assert_eq!(all.ids.len(), expected.len() + not_expected.len());
    assert!(not_expected.iter().all(|id| all.ids.contains(id)));
    assert!(all.keys.windows(2).all(|w| w[0] > w[1]));
    assert_eq!(all.next_cursor, None);
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_filter_narrows_the_list_and_pages_keep_their_filters() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    let t0 = micros(Utc::now() - TimeDelta::hours(1));
    let at = |minutes: i64| Some(t0 - TimeDelta::minutes(minutes));
    let one = Alert {
        study_id: "S1",
        site_id: Some("701"),
        subject_id: Some("A"),
        rule_id: "R1",
        severity: "INFO",
        raised_at: at(1),
        ..Alert::default()
    };
    let two =
        Alert { subject_id: Some("B"), rule_id: "R2", severity: "WARNING", raised_at: at(2), ..one.clone() };
    let three = Alert {
        site_id: Some("702"),
        subject_id: Some("C"),
        severity: "HIGH",
        raised_at: at(3),
        ..one.clone()
    };
    let four = Alert {
        study_id: "S2",
        site_id: Some("801"),
        subject_id: Some("D"),
        rule_id: "R3",
        severity: "CRITICAL",
        raised_at: at(4),
        ..one.clone()
    };
    // A site-level alert: no subject.
    let five = Alert {
        subject_id: None,
        rule_id: "SUPPLY-LOW",
        severity: "WARNING",
        raised_at: at(5),
        ..one.clone()
    };
    let mut ids = Vec::new();
    for alert in [&one, &two, &three, &four, &five] {
        ids.push(api.raise(alert).await?.to_string());
    }
    let [a1, a2, a3, a4, a5] = [0, 1, 2, 3, 4].map(|i| ids[i].as_str());
    for (id, decision) in [(a2, "acknowledge"), (a3, "resolve")] {
        let answer = api
            .post(&api.researcher, &format!("/v1/alerts/{id}/{decision}"), &json!({"reason": "x"}))
            .await?;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    }

    let t = |minutes: i64| query_time(t0 - TimeDelta::minutes(minutes));
    let in_berlin = (t0 - TimeDelta::minutes(3))
        .with_timezone(&chrono_tz::Europe::Berlin)
        .to_rfc3339()
        .replace('+', "%2B");
    for (query, expected) in [
        (String::new(), vec![a1, a2, a3, a4, a5]),
        ("study_id=S1".to_string(), vec![a1, a2, a3, a5]),
        ("site_id=701".to_string(), vec![a1, a2, a5]),
        ("subject_id=B".to_string(), vec![a2]),
        ("subject_id=Z".to_string(), vec![]),
        ("rule_id=R1".to_string(), vec![a1, a3]),
        ("rule_id=SUPPLY-LOW".to_string(), vec![a5]),
        ("severity=warning,CRITICAL".to_string(), vec![a2, a4, a5]),
        ("severity=INFO".to_string(), vec![a1]),
        ("status=open".to_string(), vec![a1, a4, a5]),
        ("status=acknowledged,resolved".to_string(), vec![a2, a3]),
        (format!("raised_from={}", t(3)), vec![a1, a2, a3]),
        (format!("raised_from={in_berlin}"), vec![a1, a2, a3]),
        (format!("raised_before={}", t(3)), vec![a4, a5]),
        (format!("raised_from={}&raised_before={}", t(4), t(2)), vec![a3, a4]),
        ("study_id=S1&status=open&severity=INFO,WARNING".to_string(), vec![a1, a5]),
        ("study_id=S2&site_id=701".to_string(), vec![]),
    ] {
        assert_eq!(api.list(&format!("?{query}")).await?, expected, "{query}");
    }

    // Paging within a filter; the cursor belongs to that filter.
    let first = api.page("?study_id=S1&limit=2").await?;
    assert_eq!(first.ids.iter().map(Uuid::to_string).collect::<Vec<_>>(), [a1, a2]);
    let cursor = first.next_cursor.context("a second page")?;
    let second = api.page(&format!("?limit=2&study_id=S1&cursor={cursor}")).await?;
    assert_eq!(second.ids.iter().map(Uuid::to_string).collect::<Vec<_>>(), [a3, a5]);
    assert_eq!(second.next_cursor, None, "the last page");
    for other in ["study_id=S2", "", "study_id=S1&status=open"] {
        let answer = api.get(&api.researcher, &format!("/v1/alerts?{other}&cursor={cursor}")).await?;
        assert_eq!(answer.error(), (StatusCode::BAD_REQUEST, "invalid_cursor", Some("cursor")), "{other}");
    }
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_list_queries_are_refused_with_a_reason_and_the_list_still_serves() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    let mut ids = Vec::new();
    for subject in ["A", "B", "C"] {
        ids.push(api.raise(&Alert { subject_id: Some(subject), ..Alert::default() }).await?);
    }
    let cursor = api.page("?limit=1").await?.next_cursor.context("a cursor")?;
    // The same cursor with one character changed, and cut short.
    let flipped = {
        let mut bytes = cursor.clone().into_bytes();
        bytes[20] = if bytes[20] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes)?
    };
    let bad = StatusCode::BAD_REQUEST;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let long_id = "7".repeat(100);
    let beyond_query_limit = "7".repeat(3_000);
    type Refusal = (StatusCode, &'static str, Option<&'static str>);
    let cases: Vec<(String, Refusal)> = vec![
        ("cursor=garbage".into(), (bad, "invalid_cursor", Some("cursor"))),
        (format!("cursor={flipped}"), (bad, "invalid_cursor", Some("cursor"))),
        (format!("cursor={}", &cursor[..30]), (bad, "invalid_cursor", Some("cursor"))),
        (format!("cursor={cursor}%00"), (unprocessable, "invalid_characters", Some("cursor"))),
        (format!("cursor={}", "A".repeat(2_048)), (bad, "invalid_cursor", Some("cursor"))),
        (format!("cursor={beyond_query_limit}"), (unprocessable, "too_long", Some("cursor"))),
        ("subject_id=01-701%00".into(), (unprocessable, "invalid_characters", Some("subject_id"))),
        ("status=open%0A".into(), (unprocessable, "invalid_characters", Some("status"))),
        ("subject_id=%FF%FE".into(), (bad, "invalid_parameter", Some("subject_id"))),
        ("severity=HIGH%C3".into(), (bad, "invalid_parameter", Some("severity"))),
        ("%FF=1".into(), (bad, "invalid_parameter", Some("query"))),
        (format!("subject_id={long_id}"), (bad, "invalid_parameter", Some("subject_id"))),
        (format!("site_id={beyond_query_limit}"), (unprocessable, "too_long", Some("site_id"))),
        ("limit=99999999999999999999999999".into(), (bad, "invalid_parameter", Some("limit"))),
        ("limit=501".into(), (bad, "invalid_parameter", Some("limit"))),
        ("limit=-1".into(), (bad, "invalid_parameter", Some("limit"))),
        ("limit=1.5".into(), (bad, "invalid_parameter", Some("limit"))),
        ("limit=".into(), (bad, "invalid_parameter", Some("limit"))),
        ("limit=1&limit=2".into(), (bad, "duplicate_parameter", Some("limit"))),
        ("subject_id=A&subject_id=A".into(), (bad, "duplicate_parameter", Some("subject_id"))),
        (format!("cursor={cursor}&cursor={cursor}"), (bad, "duplicate_parameter", Some("cursor"))),
        ("severity=HIGH,,CRITICAL".into(), (bad, "invalid_parameter", Some("severity"))),
        ("severity=SEVERE".into(), (bad, "invalid_parameter", Some("severity"))),
        ("status=".into(), (bad, "invalid_parameter", Some("status"))),
        ("raised_from=yesterday".into(), (bad, "invalid_parameter", Some("raised_from"))),
        ("raised_from=10000-01-01T00:00:00Z".into(), (bad, "invalid_parameter", Some("raised_from"))),
        ("raised_before=2026-13-01T00:00:00Z".into(), (bad, "invalid_parameter", Some("raised_before"))),
        (
            "raised_from=2026-03-02T00:00:00Z&raised_before=2026-03-01T00:00:00Z".into(),
            (bad, "invalid_parameter", Some("raised_before")),
        ),
        ("colour=red".into(), (bad, "unknown_parameter", Some("colour"))),
        ("STATUS=open".into(), (bad, "unknown_parameter", Some("STATUS"))),
        ("access_token=x".into(), (bad, "unknown_parameter", Some("access_token"))),
    ];
    for (query, expected) in &cases {
        let answer = api.get(&api.researcher, &format!("/v1/alerts?{query}")).await?;
        let shown = &query[..query.len().min(80)];
        assert_eq!(answer.error(), *expected, "{shown}: {}", answer.text);
        let message = answer.body["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{shown}: no message");
        let content_type = answer.headers.get("content-type").and_then(|v| v.to_str().ok());
        assert_eq!(content_type, Some("application/json"), "{shown}");
    }

    // Bytes that are not UTF-8, unencoded, in the request line: refused before any handler.
    let mut raw = tokio::net::TcpStream::connect(api.base.trim_start_matches("http://")).await?;
    let mut bytes = b"GET /v1/alerts?subject_id=".to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    let rest = format!(
        " HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        api.researcher
    );
    bytes.extend_from_slice(rest.as_bytes());
    tokio::io::AsyncWriteExt::write_all(&mut raw, &bytes).await?;
    let mut answer = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut answer).await?;
    let status_line = String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_string();
    assert!(status_line.starts_with("HTTP/1.1 400"), "{status_line}");

    // Still serving, and nothing was changed.
    let all = api.page("").await?;
    assert_eq!(all.ids.len(), 3);
    assert!(ids.iter().all(|id| all.ids.contains(id)));
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detail_shows_evidence_in_time_order_and_the_timeline() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    let id = api.raise(&Alert { evidence_minutes_ago: &[10, 30, 20], ..Alert::default() }).await?;

    let detail = api.detail(id).await?;
    assert_eq!(detail["alert_id"], id.to_string());
    assert_eq!(detail["evidence_count"], 3);
    let evidence = detail["evidence"].as_array().context("no evidence")?;
    let descriptions: Vec<&str> = evidence.iter().map(|e| e["description"].as_str().unwrap_or("")).collect();
    assert_eq!(descriptions, ["reading 1", "reading 2", "reading 0"], "ordered by observed_at");
    assert_eq!(evidence[0]["value"], 181.0);
    assert_eq!(evidence[0]["unit"], "mm[Hg]");
    let timeline = detail["timeline"].as_array().context("no timeline")?;
    assert_eq!(timeline.len(), 1, "{timeline:?}");
    assert_eq!((&timeline[0]["kind"], &timeline[0]["actor"]), (&json!("raised"), &json!("monitoring")));
    assert_eq!(timeline[0]["detail"], json!({"rule_version": 3}));
    assert!(timeline[0]["at"].is_string());

    for path in [format!("/v1/alerts/{}", Uuid::new_v4()), "/v1/alerts/not-an-id".to_string()] {
        let answer = api.get(&api.researcher, &path).await?;
        assert_eq!(answer.error(), (StatusCode::NOT_FOUND, "not_found", None), "{path}");
    }
    api.stop().await
}

// ---- decisions ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledging_records_the_decision_and_its_event_once() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    let id = api.raise(&Alert::default()).await?;
    let path = format!("/v1/alerts/{id}/acknowledge");

    for (body, expected) in [
        (json!({}), (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", Some("reason"))),
        (json!({"reason": "  "}), (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", Some("reason"))),
        (json!({"reason": 7}), (StatusCode::BAD_REQUEST, "invalid_json", Some("reason"))),
        (json!({"reason": "x", "extra": 1}), (StatusCode::BAD_REQUEST, "invalid_json", Some("extra"))),
    ] {
        let answer = api.post(&api.researcher, &path, &body).await?;
        assert_eq!(answer.error(), expected, "{body}");
    }
    assert!(api.outbox().await?.is_empty(), "a refused decision wrote an event");

    let answer =
        api.post(&api.researcher, &path, &json!({"reason": "Called the site; repeat reading"})).await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.body["status"], "acknowledged");
    assert_eq!(answer.body["acknowledged_by"], "rita");
    assert_eq!(answer.body["ack_reason"], "Called the site; repeat reading");
    assert!(answer.body["acknowledged_at"].is_string());

    let (status, escalate_at): (String, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
        AssertSqlSafe(format!("SELECT status, escalate_at FROM {}.alert WHERE alert_id = $1", api.schema)),
    )
    .bind(id)
    .fetch_one(&api.pool)
    .await?;
    assert_eq!((status.as_str(), escalate_at), ("acknowledged", None), "escalation stops");

    let timeline = api.detail(id).await?["timeline"].clone();
    assert_eq!(timeline[1]["kind"], "acknowledged");
    assert_eq!(timeline[1]["actor"], "rita");
    assert_eq!(timeline[1]["detail"], json!({"reason": "Called the site; repeat reading"}));

    let event: AlertAcknowledged = api.event(id).await?;
    assert_eq!(event.alert_id, id);
    assert_eq!(event.reason, "Called the site; repeat reading");
    let envelope = &event.envelope;
    assert_eq!(envelope.event_type, AlertAcknowledged::NAME);
    assert_eq!(envelope.study_id, "CDISCPILOT01");
    assert_eq!(envelope.site_id.as_deref(), Some("701"));
    assert_eq!(envelope.subject_id.as_deref(), Some("01-701-1015"));
    assert_eq!(envelope.actor.as_deref(), Some("rita"));
    assert_eq!(envelope.source_system, "alert-api");

    let again = api.post(&api.admin, &path, &json!({"reason": "me too"})).await?;
    assert_eq!(again.error(), (StatusCode::CONFLICT, "already_acknowledged", None));
    assert_eq!(api.outbox().await?.len(), 1, "a refused decision wrote an event");

    // One audit record, of the decision taken (not of the refused ones): who, old → new, why.
    let mut conn = api.pool.acquire().await?;
    let records = trialflow_outbox::audit::read(&mut conn, &api.schema, None, None, 10).await?;
    let [record] = records.as_slice() else { panic!("{records:?}") };
    assert_eq!(
        (record.action.as_str(), record.actor_user.as_str(), record.actor_role.as_str()),
        ("alert.acknowledged", "rita", "researcher")
    );
    assert_eq!((record.entity_type.as_str(), record.entity_id.clone()), ("alert", id.to_string()));
    assert_eq!(record.reason.as_deref(), Some("Called the site; repeat reading"));
    assert_eq!(record.changes, r#"[{"new": "acknowledged", "old": "open", "field": "status"}]"#);
    assert_eq!(record.study_id.as_deref(), Some("CDISCPILOT01"));
    drop(conn);

    let unknown = api
        .post(&api.researcher, &format!("/v1/alerts/{}/acknowledge", Uuid::new_v4()), &json!({"reason": "x"}))
        .await?;
    assert_eq!(unknown.error(), (StatusCode::NOT_FOUND, "not_found", None));
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_works_from_open_and_acknowledged_once() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    let open = api.raise(&Alert::default()).await?;
    let acknowledged = api.raise(&Alert { subject_id: Some("01-701-1028"), ..Alert::default() }).await?;
    let answer = api
        .post(&api.researcher, &format!("/v1/alerts/{acknowledged}/acknowledge"), &json!({"reason": "on it"}))
        .await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);

    for id in [open, acknowledged] {
        let path = format!("/v1/alerts/{id}/resolve");
        let answer = api.post(&api.admin, &path, &json!({"reason": "Repeat reading normal"})).await?;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        assert_eq!(answer.body["status"], "resolved");
        assert_eq!(answer.body["resolved_by"], "ada");
        assert_eq!(answer.body["resolve_reason"], "Repeat reading normal");

        let event: AlertResolved = api.event(id).await?;
        assert_eq!((event.alert_id, event.reason.as_str()), (id, "Repeat reading normal"));
        assert_eq!(event.envelope.actor.as_deref(), Some("ada"));

        let again = api.post(&api.researcher, &path, &json!({"reason": "again"})).await?;
        assert_eq!(again.error(), (StatusCode::CONFLICT, "already_resolved", None));
        let ack = api
            .post(&api.researcher, &format!("/v1/alerts/{id}/acknowledge"), &json!({"reason": "late"}))
            .await?;
        assert_eq!(ack.error(), (StatusCode::CONFLICT, "already_resolved", None));
    }
    let kinds: Vec<Value> = api.detail(acknowledged).await?["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["kind"].clone())
        .collect();
    assert_eq!(kinds, [json!("raised"), json!("acknowledged"), json!("resolved")]);
    assert_eq!(api.outbox().await?.len(), 3);
    let mut conn = api.pool.acquire().await?;
    let records = trialflow_outbox::audit::read(&mut conn, &api.schema, None, None, 10).await?;
    let resolved: Vec<(String, &str)> = records
        .iter()
        .filter(|r| r.action == "alert.resolved")
        .map(|r| (r.entity_id.clone(), r.changes.as_str()))
        .collect();
    assert_eq!(
        resolved,
        [
            (open.to_string(), r#"[{"new": "resolved", "old": "open", "field": "status"}]"#),
            (acknowledged.to_string(), r#"[{"new": "resolved", "old": "acknowledged", "field": "status"}]"#),
        ]
    );
    assert!(trialflow_outbox::audit::verify(&api.pool, &api.schema).await?.is_intact());
    drop(conn);
    assert_eq!(api.list("?status=resolved").await?.len(), 2);
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_naming_the_field_and_decides_nothing() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    let id = api.raise(&Alert::default()).await?;
    let acknowledge = format!("/v1/alerts/{id}/acknowledge");
    let raw = |path: &str, body: &'static [u8]| {
        api.http.post(format!("{}{path}", api.base)).bearer_auth(&api.researcher).body(body)
    };
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    type Refusal = (StatusCode, &'static str, Option<&'static str>);
    let cases: Vec<(reqwest::RequestBuilder, Refusal)> = vec![
        (
            raw(&acknowledge, br#"{"reason": "on it\u0000"}"#),
            (unprocessable, "invalid_characters", Some("reason")),
        ),
        (
            raw(&acknowledge, br#"{"reason": "on it\u001b[31m"}"#),
            (unprocessable, "invalid_characters", Some("reason")),
        ),
        (
            raw(&acknowledge, br#"{"reason": "a", "reason": "b"}"#),
            (StatusCode::BAD_REQUEST, "duplicate_key", Some("reason")),
        ),
        (
            raw(&acknowledge, br#"{"reason": "\ud800"}"#),
            (StatusCode::BAD_REQUEST, "invalid_json", Some("reason")),
        ),
        (
            raw(&acknowledge, b"{\"reason\": \"\xff\"}"),
            (StatusCode::BAD_REQUEST, "invalid_json", Some("reason")),
        ),
        (
            raw(&acknowledge, br#"{"reason": 1e400}"#),
            (StatusCode::BAD_REQUEST, "invalid_json", Some("reason")),
        ),
        (raw(&acknowledge, b""), (StatusCode::BAD_REQUEST, "invalid_json", None)),
        (
            raw("/v1/alerts/%00/acknowledge", br#"{"reason": "x"}"#),
            (unprocessable, "invalid_characters", Some("alert_id")),
        ),
        (
            raw("/v1/alerts/%C3%28/resolve", br#"{"reason": "x"}"#),
            (unprocessable, "invalid_characters", Some("alert_id")),
        ),
        (
            api.http.get(format!("{}/v1/alerts?study_id=CDISC%00", api.base)).bearer_auth(&api.researcher),
            (unprocessable, "invalid_characters", Some("study_id")),
        ),
        (
            api.http
                .get(format!("{}/v1/alerts?site_id={}", api.base, "7".repeat(3_000)))
                .bearer_auth(&api.researcher),
            (unprocessable, "too_long", Some("site_id")),
        ),
        (
            api.http.get(format!("{}/v1/alerts/{id}%07", api.base)).bearer_auth(&api.researcher),
            (unprocessable, "invalid_characters", Some("alert_id")),
        ),
    ];
    for (request, expected) in cases {
        let answer = api.send(request).await?;
        assert_eq!(answer.error(), expected, "{}", answer.text);
    }
    let long = json!({ "reason": "r".repeat(2_001) });
    assert_eq!(
        api.post(&api.researcher, &acknowledge, &long).await?.error(),
        (unprocessable, "too_long", Some("reason"))
    );
    let huge = api.send(raw(&acknowledge, &[b' '; 100 * 1024])).await?;
    assert_eq!(huge.error(), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None), "{}", huge.text);
    assert!(api.outbox().await?.is_empty(), "no decision was recorded");
    assert_eq!(api.detail(id).await?["status"], "open");

    // A reason may run over several lines.
    let reason = "Called the site.\r\n\tBP re-measured: 150/95.";
    let answer = api.post(&api.researcher, &acknowledge, &json!({ "reason": reason })).await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(api.event::<AlertAcknowledged>(id).await?.reason, reason);
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_researchers_and_admins_get_in() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    let id = api.raise(&Alert::default()).await?;

    let anonymous = api.send(api.http.get(format!("{}/v1/alerts", api.base))).await?;
    assert_eq!(anonymous.error(), (StatusCode::UNAUTHORIZED, "unauthenticated", None));
    assert_eq!(anonymous.headers.get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Bearer"));
    assert_eq!(api.get("not-a-token", "/v1/alerts").await?.status, StatusCode::UNAUTHORIZED);
    let post =
        api.post(&api.site_staff, &format!("/v1/alerts/{id}/acknowledge"), &json!({"reason": "x"})).await?;
    assert_eq!(post.error(), (StatusCode::FORBIDDEN, "forbidden", None));
    assert_eq!(api.get(&api.site_staff, &format!("/v1/alerts/{id}")).await?.status, StatusCode::FORBIDDEN);
    assert_eq!(api.get(&api.admin, "/v1/alerts").await?.status, StatusCode::OK);

    // The query token is for EventSource, on the stream only.
    let query_token = format!("{}/v1/alerts?access_token={}", api.base, api.researcher);
    assert_eq!(api.send(api.http.get(query_token)).await?.status, StatusCode::UNAUTHORIZED);
    let stream =
        api.http.get(format!("{}/v1/alerts/stream?access_token={}", api.base, api.researcher)).send().await?;
    assert_eq!(stream.status(), StatusCode::OK);
    drop(stream);
    let stream =
        api.http.get(format!("{}/v1/alerts/stream?access_token={}", api.base, api.site_staff)).send().await?;
    assert_eq!(stream.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        api.send(api.http.get(format!("{}/v1/alerts/stream", api.base))).await?.status,
        StatusCode::UNAUTHORIZED
    );

    // The page itself carries no data.
    let page = api.send(api.http.get(format!("{}/", api.base))).await?;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("id=\"alert-rows\""));
    api.stop().await
}

// ---- stream ---------------------------------------------------------------------------------------

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
struct Sse {
    id: Option<String>,
    event: String,
    data: Value,
}

/// Reads server-sent events off a response, skipping comments (keep-alives).
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn next(&mut self, timeout: Duration) -> anyhow::Result<Sse> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, "message".to_string(), String::new());
                for line in block.lines() {
                    let (name, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match name {
                        "id" => id = Some(value.to_string()),
                        "event" => event = value.to_string(),
                        "data" => data.push_str(value),
                        _ => {}
                    }
                }
                if !data.is_empty() {
                    return Ok(Sse { id, event, data: serde_json::from_str(&data)? });
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.response.chunk())
                .await
                .with_context(|| format!("no event within {timeout:?}"))??
                .context("the stream ended")?;
            self.buffer.push_str(std::str::from_utf8(&chunk)?);
        }
    }

    /// The events before `ready`, and the id `ready` carries (the end of the catch-up).
    async fn until_ready(&mut self) -> anyhow::Result<(Vec<Sse>, i64)> {
        let mut events = Vec::new();
        loop {
            let event = self.next(LIVE).await?;
            if event.event == "ready" {
                let id = event.id.as_deref().and_then(|id| id.parse().ok()).context("`ready` has an id")?;
                return Ok((events, id));
            }
            events.push(event);
        }
    }

    /// The next event with an id above `floor`. A change committed just before the stream
    /// started may come once more after the catch-up (at least once, never lost).
    async fn next_after(&mut self, floor: i64) -> anyhow::Result<Sse> {
        loop {
            let event = self.next(LIVE).await?;
            let id: i64 = event.id.as_deref().and_then(|id| id.parse().ok()).context("events carry ids")?;
            if id > floor {
                return Ok(event);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_sends_changes_live_and_resumes_after_last_event_id() -> anyhow::Result<()> {
    let api = TestApi::start().await?;
    let before = api.raise(&Alert::default()).await?;
    let resolved = api.raise(&Alert { subject_id: Some("01-701-1033"), ..Alert::default() }).await?;
    let answer =
        api.post(&api.researcher, &format!("/v1/alerts/{resolved}/resolve"), &json!({"reason": "x"})).await?;
    assert_eq!(answer.status, StatusCode::OK);

    // A new client gets the alerts still to act on, not the history.
    let mut stream = api.open_stream(None).await?;
    let (snapshot, caught_up) = stream.until_ready().await?;
    let ids: Vec<&Value> = snapshot.iter().map(|e| &e.data["alert_id"]).collect();
    assert_eq!(ids, [&json!(before.to_string())], "{snapshot:?}");
    assert_eq!(snapshot[0].event, "raised");

    let started = Instant::now();
    let live = api
        .raise(&Alert { subject_id: Some("01-701-1047"), severity: "CRITICAL", ..Alert::default() })
        .await?;
    let raised = stream.next_after(caught_up).await?;
    assert_eq!((raised.event.as_str(), &raised.data["alert_id"]), ("raised", &json!(live.to_string())));
    assert_eq!(raised.data["severity"], "CRITICAL");
    assert_eq!(raised.data["evidence_count"], 1);
    eprintln!("raised alert reached the stream in {:?}", started.elapsed());

    let answer = api
        .post(&api.researcher, &format!("/v1/alerts/{before}/acknowledge"), &json!({"reason": "on it"}))
        .await?;
    assert_eq!(answer.status, StatusCode::OK);
    let acknowledged = stream.next(LIVE).await?;
    assert_eq!(acknowledged.event, "acknowledged");
    assert_eq!(acknowledged.data["alert_id"], before.to_string());
    assert_eq!(acknowledged.data["acknowledged_by"], "rita");
    drop(stream);

    // Reconnecting after the `raised` event: only what followed it, then live again.
    let last_seen = raised.id.clone().context("events carry ids")?;
    let mut resumed = api.open_stream(Some(&last_seen)).await?;
    let (missed, _) = resumed.until_ready().await?;
    assert_eq!(missed, std::slice::from_ref(&acknowledged), "only the events after Last-Event-ID");
    let later = api.raise(&Alert { subject_id: Some("01-701-1061"), ..Alert::default() }).await?;
    let event = resumed.next(LIVE).await?;
    assert_eq!((event.event.as_str(), &event.data["alert_id"]), ("raised", &json!(later.to_string())));

    let bad = api.http.get(format!("{}/v1/alerts/stream", api.base)).bearer_auth(&api.researcher);
    let bad = api.send(bad.header("Last-Event-ID", "yesterday")).await?;
    assert_eq!(bad.error(), (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", Some("Last-Event-ID")));
    // Open streams do not keep the API from stopping.
    api.stop().await
}

// ---- the inbox page in a browser ------------------------------------------------------------------

/// The page's row of `id`.
fn row(id: Uuid) -> String {
    format!("tr[data-alert-id=\"{id}\"]")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_page_shows_new_alerts_live_and_acknowledges_them() -> anyhow::Result<()> {
    let (chromium, chromedriver) = tools("the inbox's browser test")?;
    let started = Instant::now();
    let api = TestApi::start().await?;
    let driver = Driver::start(&chromedriver).await?;
    let browser = match headless_chromium(&driver, &chromium).await {
        Ok(browser) => browser,
        Err(e) => {
            driver.stop().await;
            return Err(e);
        }
    };
    let outcome = acknowledge_in_the_browser(&api, &browser).await;
    // Close the browser whatever happened, so no Chromium outlives the test.
    let closed = browser.close().await;
    driver.stop().await;
    outcome?;
    closed?;
    api.stop().await?;
    eprintln!("browser test took {:?}", started.elapsed());
    Ok(())
}

async fn acknowledge_in_the_browser(api: &TestApi, browser: &Client) -> anyhow::Result<()> {
    browser.goto(&format!("{}/inbox?token={}", api.base, api.researcher)).await?;
    browser
        .wait()
        .at_most(LIVE)
        .for_element(Locator::Css("#connection[data-state=\"live\"]"))
        .await
        .context("the page did not connect its stream")?;
    let url = browser.current_url().await?;
    assert!(!url.as_str().contains("token="), "the token stays out of the address bar: {url}");

    // A heart rate of 140/min from the EDC, through the monitoring consumer, while the page is
    // open: the alert it raises appears without a reload.
    let (stop, monitor) = monitoring_consumer(api).await?;
    let subject = "VS-0001";
    let found = format!("SELECT alert_id FROM {}.alert WHERE subject_id = '{subject}'", api.schema);
    // A new consumer group starts at the earliest offset: a reading produced before it joined
    // is still judged.
    produce_heart_rate(api, subject, 140.0).await?;
    wait_until("the vital sign raises an alert", Duration::from_secs(60), || async {
        Ok(sqlx::query_scalar::<_, Uuid>(AssertSqlSafe(found.as_str()))
            .fetch_optional(&api.pool)
            .await?
            .is_some())
    })
    .await?;
    let vital_alert: Uuid = sqlx::query_scalar(AssertSqlSafe(found.as_str())).fetch_one(&api.pool).await?;
    let vital_row = browser
        .wait()
        .at_most(LIVE)
        .for_element(Locator::Css(&row(vital_alert)))
        .await
        .context("the alert raised by the vital sign did not appear on the page")?;
    assert_eq!(vital_row.find(Locator::Css(".subject")).await?.text().await?, subject);
    assert!(vital_row.find(Locator::Css(".summary")).await?.text().await?.contains("Heart rate 140"));
    stop.cancel();
    monitor.await??;

    // Raised only now that the page is open: it must appear without a reload.
    let summary = "Systolic BP 182 mmHg <img src=x onerror=\"document.title='pwned'\">";
    let id = api.raise(&Alert { summary, evidence_minutes_ago: &[15, 5], ..Alert::default() }).await?;
    let tr = browser
        .wait()
        .at_most(LIVE)
        .for_element(Locator::Css(&row(id)))
        .await
        .context("the new alert did not appear on the page")?;
    assert_eq!(tr.find(Locator::Css(".summary")).await?.text().await?, summary, "shown as text");
    assert!(tr.find(Locator::Css(".summary img")).await.is_err(), "data must not become markup");
    assert_eq!(tr.find(Locator::Css(".status")).await?.text().await?, "open");
    assert_eq!(tr.find(Locator::Css(".evidence-count")).await?.text().await?, "2");
    assert_eq!(tr.find(Locator::Css(".subject")).await?.text().await?, "01-701-1015");
    assert!(tr.find(Locator::Css(".severity")).await?.text().await?.contains("HIGH"));

    let reason = "Site called, repeat measurement booked";
    tr.find(Locator::Css("input.reason")).await?.send_keys(reason).await?;
    tr.find(Locator::Css("button.ack")).await?.click().await?;

    wait_until("the API shows the alert acknowledged", LIVE, || async {
        Ok(api.detail(id).await?["status"] == "acknowledged")
    })
    .await?;
    let detail = api.detail(id).await?;
    assert_eq!(detail["acknowledged_by"], "rita");
    assert_eq!(detail["ack_reason"], reason);
    let last = detail["timeline"].as_array().and_then(|t| t.last()).cloned().unwrap_or_default();
    assert_eq!(
        (&last["kind"], &last["actor"], &last["detail"]["reason"]),
        (&json!("acknowledged"), &json!("rita"), &json!(reason))
    );

    let status = format!("{} .status", row(id));
    wait_until("the page shows the alert acknowledged", LIVE, || async {
        Ok(browser.find(Locator::Css(&status)).await?.text().await? == "acknowledged")
    })
    .await?;
    assert_ne!(browser.title().await?, "pwned");
    Ok(())
}

/// The monitoring consumer on the test's schema and topics (default rules).
async fn monitoring_consumer(
    api: &TestApi,
) -> anyhow::Result<(CancellationToken, JoinHandle<Result<(), trialflow_consumers::ConsumerError>>)> {
    let kafka = trialflow_testkit::kafka();
    trialflow_outbox::kafka::ensure_catalogue_topics(&kafka, &api.topics, 1, topics::DLQ_SUFFIX).await?;
    let mut config = trialflow_consumers::ConsumerConfig::local();
    config.database.database_url = database_url();
    config.kafka = kafka;
    config.group_id = Some(format!("mon-{}", api.schema));
    let rules = monitoring::rules::RuleBook::load(None).map_err(anyhow::Error::msg)?;
    let stop = CancellationToken::new();
    let spec = monitoring::spec(api.schema.clone(), &api.topics);
    let handle = tokio::spawn(monitoring::run(spec, config, rules, api.topics.clone(), stop.clone()));
    Ok((stop, handle))
}

/// A heart-rate reading as an EDC publishes it: straight to the clinical topic.
async fn produce_heart_rate(api: &TestApi, subject: &str, value: f64) -> anyhow::Result<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use trialflow_schemas::{Envelope, PartialDateTime, Timestamp, VitalSignRecorded};
    let now = chrono::Utc::now();
    let mut envelope = Envelope::new(VitalSignRecorded::NAME, "CDISCPILOT01", "edc", Timestamp::from(now));
    envelope.subject_id = Some(subject.into());
    envelope.site_id = Some("701".into());
    let event = VitalSignRecorded {
        envelope,
        observation_id: Uuid::new_v4().to_string(),
        loinc_code: "8867-4".into(),
        value,
        unit: "/min".into(),
        position: Some("SITTING".into()),
        effective: PartialDateTime::parse(&now.format("%Y-%m-%dT%H:%M:%S").to_string()),
        visit: Some("WEEK 2".into()),
        visit_day: Some(15),
    };
    let payload = trialflow_schemas::encode(&event)?;
    let id = event.envelope.event_id.to_string();
    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(&trialflow_testkit::kafka(), "test-edc").create()?;
    let topic = api.topics.of::<VitalSignRecorded>();
    let headers = OwnedHeaders::new().insert(Header { key: "event_id", value: Some(id.as_str()) });
    let record = FutureRecord::to(&topic).key(subject).payload(&payload).headers(headers);
    producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    Ok(())
}

// ---- rate limits and the request timeout ---------------------------------------------------------

/// The `Retry-After` (seconds) of a 429 `rate_limited` answer.
fn retry_after(answer: &Answer) -> anyhow::Result<u64> {
    ensure!(answer.error().0 == StatusCode::TOO_MANY_REQUESTS, "answered {}: {}", answer.status, answer.text);
    ensure!(answer.error().1 == "rate_limited", "{}", answer.text);
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

impl TestApi {
    async fn get_raw(&self, token: Option<&str>, path: &str) -> anyhow::Result<Answer> {
        let request = self.http.get(format!("{}{path}", self.base));
        self.send(match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        })
        .await
    }

    /// Whether any session holds (or, `waiting`, waits for) a lock on `table` of the API's schema.
    async fn locked(&self, table: &str, waiting: bool) -> anyhow::Result<bool> {
        let sql = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = to_regclass($1) AND NOT (granted AND $2))";
        let table = format!("{}.{table}", self.schema);
        Ok(sqlx::query_scalar(sql).bind(table).bind(waiting).fetch_one(&self.pool).await?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_beyond_its_rate_is_told_when_to_retry_while_others_are_served() -> anyhow::Result<()> {
    let api = TestApi::start_with(Limits { per_principal: Rate::new(1, 3), ..Limits::unthrottled() }).await?;
    let answers = until_refused(10, StatusCode::OK, || api.get(&api.researcher, "/v1/alerts")).await?;
    assert!(answers.len() > 3, "the burst of 3 is served: {} answers", answers.len());
    let wait = retry_after(answers.last().context("an answer")?)?;
    assert_eq!(
        api.get(&api.admin, "/v1/alerts").await?.status,
        StatusCode::OK,
        "another principal is served"
    );
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(
        api.get(&api.researcher, "/v1/alerts").await?.status,
        StatusCode::OK,
        "served after Retry-After"
    );
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_beyond_its_rate_is_refused_whatever_tokens_it_sends() -> anyhow::Result<()> {
    let api = TestApi::start_with(Limits { per_address: Rate::new(1, 5), ..Limits::unthrottled() }).await?;
    let shared = &api;
    let forged = || {
        let token = unique("forged");
        async move { shared.get_raw(Some(&token), "/v1/alerts").await }
    };
    let answers = until_refused(20, StatusCode::UNAUTHORIZED, forged).await?;
    assert!(answers.len() > 5, "the burst of 5 is served: {} answers", answers.len());
    retry_after(answers.last().context("an answer")?)?;
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(api.get_raw(None, probe).await?.status, StatusCode::OK, "{probe} is exempt");
    }
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_beyond_the_request_timeout_is_cut_and_rolled_back_while_a_stream_stays_open()
-> anyhow::Result<()> {
    let timeout = Duration::from_millis(500);
    let api = TestApi::start_with(Limits { request_timeout: timeout, ..Limits::unthrottled() }).await?;
    let id = api.raise(&Alert::default()).await?;
    let mut stream = api.open_stream(None).await?;
    let opened = Instant::now();
    let (_, caught_up) = stream.until_ready().await?;

    let mut locker = api.pool.begin().await?;
    let lock = format!("LOCK TABLE {}.alert IN ACCESS EXCLUSIVE MODE", api.schema);
    sqlx::query(AssertSqlSafe(lock)).execute(&mut *locker).await?;
    let (path, reason) = (format!("/v1/alerts/{id}/acknowledge"), json!({"reason": "on it"}));
    let started = Instant::now();
    let (answer, probe) = tokio::join!(api.post(&api.researcher, &path, &reason), async {
        wait_until("the decision waits for the alert table", Duration::from_secs(5), || {
            api.locked("alert", true)
        })
        .await?;
        anyhow::Ok(api.get_raw(None, "/healthz").await?.status)
    });
    let (answer, took) = (answer?, started.elapsed());
    assert_eq!(probe?, StatusCode::OK, "the probe answers while a decision hangs");
    assert_eq!(answer.error(), (StatusCode::SERVICE_UNAVAILABLE, "timeout", None), "{}", answer.text);
    assert_eq!(answer.headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    assert!(took >= timeout && took < timeout + Duration::from_secs(3), "answered after {took:?}");

    // Once the lock is released, the cut decision's transaction ends without committing.
    locker.rollback().await?;
    wait_until("the cut decision's transaction ends", Duration::from_secs(10), || async {
        Ok(!api.locked("alert", false).await? && !api.locked("alert_history", false).await?)
    })
    .await?;
    let sql = format!("SELECT status, (SELECT count(*) FROM {0}.alert_history) FROM {0}.alert", api.schema);
    let (status, history): (String, i64) = sqlx::query_as(AssertSqlSafe(sql)).fetch_one(&api.pool).await?;
    assert_eq!((status.as_str(), history), ("open", 1), "nothing of the cut decision is kept");
    assert!(api.outbox().await?.is_empty(), "no event of a decision cut off");

    // The stream, open since before the timeout, outlives it and carries the retried decision.
    let retried = api.post(&api.researcher, &path, &reason).await?;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.text);
    let event = stream.next_after(caught_up).await?;
    assert_eq!((event.event.as_str(), &event.data["alert_id"]), ("acknowledged", &json!(id.to_string())));
    assert!(opened.elapsed() > timeout, "the stream was open for {:?}", opened.elapsed());
    api.stop().await
}
