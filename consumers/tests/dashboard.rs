//! The researcher dashboard over the real stack: a study of thirteen sites is screened, assessed,
//! enrolled and partly withdrawn, and one subject's vital signs are recorded, every event
//! published through an outbox and the relay to Kafka, where the real risk and monitoring
//! consumers (private schemas and topics) turn them into the KRI table and an alert. Then the
//! alert API's dashboard routes must show numbers equal to what this test computes on its own
//! from the risk service's tables (funnel limits, site risk scores, the order of sites) and from
//! the facts it published (readings, thresholds of the default rules, the alert's evidence); keep
//! other studies' and other sites' researchers out without telling them anything; refuse hostile
//! input; and the page, in headless Chromium, must draw the same (risk table, funnel circles and
//! limit curves, a site's subjects, a subject's series, threshold lines and alert marker). The
//! screenshots it takes are kept under the target directory (paths printed).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use chrono::{DateTime, Days, TimeZone, Utc};
use fantoccini::{Client, Locator};
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::monitoring::api::{AlertApi, AlertApiConfig};
use trialflow_consumers::monitoring::rules::{RuleBook, RuleInput};
use trialflow_consumers::risk::kri::{self, Method};
use trialflow_consumers::risk::read::{SiteKri, StudyKri};
use trialflow_consumers::{ConsumerConfig, ConsumerError, monitoring, risk};
use trialflow_http::auth::{Role, TokenGrant};
use trialflow_http::oidc::OidcSettings;
use trialflow_outbox::{Outbox, OutboxEvent, SchemaName};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::*;
use trialflow_testkit::idp::TestIdp;
use trialflow_testkit::{RunningRelay, database_url, init_logs, kafka, relay_config, unique, wait_until};
use uuid::Uuid;

mod common;

use common::browser::{Driver, headless_chromium, tools};

const STUDY: &str = "DASHTEST";
/// How long the pipeline may take to turn the events into tables.
const WAIT: Duration = Duration::from_secs(180);
/// How long the page may take to show something.
const PAGE: Duration = Duration::from_secs(15);

/// The study's sites: (site, subjects screened, of them not eligible, of the enrolled withdrawn).
/// D12 fails most of its screenings (red on SCREEN_FAILURE); D13 has too few subjects to be
/// scored. No adverse events: the two AE rates cannot tell sites apart (no factor, no limits).
const SITES: &[(&str, u32, u32, u32)] = &[
    ("D01", 10, 2, 1),
    ("D02", 10, 2, 0),
    ("D03", 10, 3, 1),
    ("D04", 10, 2, 2),
    ("D05", 10, 1, 1),
    ("D06", 10, 2, 0),
    ("D07", 10, 2, 1),
    ("D08", 10, 3, 0),
    ("D09", 10, 2, 1),
    ("D10", 10, 2, 2),
    ("D11", 10, 1, 0),
    ("D12", 10, 8, 1),
    ("D13", 2, 0, 0),
];
/// The subject whose vital signs are recorded: systolic blood pressure (one reading ≥ 160 mmHg,
/// which the default rule CTCAE-HTN-G3 alerts on) and heart rate, on these study days.
const WATCHED: &str = "D01-005";
const SYSTOLIC: &[(u64, f64)] = &[(2, 122.0), (9, 138.0), (16, 168.0), (23, 148.0)];
const HEART_RATE: &[(u64, f64)] = &[(2, 72.0), (9, 80.0), (16, 76.0), (23, 70.0)];

fn day(d: u64) -> DateTime<Utc> {
    let start = Utc.with_ymd_and_hms(2026, 1, 5, 9, 30, 0).single().unwrap_or_default();
    start.checked_add_days(Days::new(d)).unwrap_or(start)
}

fn envelope(event_type: &str, site: &str, subject: &str, at: DateTime<Utc>) -> Envelope {
    let mut e = Envelope::new(event_type, STUDY, "test", Timestamp::from(at));
    e.subject_id = Some(subject.to_string());
    e.site_id = Some(site.to_string());
    e
}

/// Subject `i` of `site`: the first `failures` are not eligible, the first `withdrawn` of the
/// others withdraw on day 20.
fn events(names: &TopicNames) -> anyhow::Result<Vec<OutboxEvent>> {
    let mut out = Vec::new();
    for &(site, screened, failures, withdrawn) in SITES {
        for i in 0..screened {
            let subject = format!("{site}-{i:03}");
            let key = subject.clone();
            let screening = SubjectScreened {
                envelope: envelope("SubjectScreened", site, &subject, day(0)),
                screening_number: subject.clone(),
                time_zone: "UTC".into(),
                age_years: Some(60),
                sex: None,
            };
            out.push(OutboxEvent::avro(&screening, names.of::<SubjectScreened>(), key.clone())?);
            let eligible = i >= failures;
            let assessed = EligibilityAssessed {
                envelope: envelope("EligibilityAssessed", site, &subject, day(0)),
                eligible,
                criteria: vec![CriterionResult { criterion_id: "IC1".into(), met: eligible, detail: None }],
            };
            out.push(OutboxEvent::avro(&assessed, names.of::<EligibilityAssessed>(), key.clone())?);
            if !eligible {
                continue;
            }
            let enrolled = SubjectEnrolled {
                envelope: envelope("SubjectEnrolled", site, &subject, day(1)),
                randomization_number: format!("R{subject}"),
                kit_number: format!("K{subject}"),
            };
            out.push(OutboxEvent::avro(&enrolled, names.of::<SubjectEnrolled>(), key.clone())?);
            if i - failures < withdrawn {
                let withdrawal = SubjectWithdrawn {
                    envelope: envelope("SubjectWithdrawn", site, &subject, day(20)),
                    reason_code: "WITHDRAWAL BY SUBJECT".into(),
                    reason: None,
                };
                out.push(OutboxEvent::avro(&withdrawal, names.of::<SubjectWithdrawn>(), key.clone())?);
            }
        }
    }
    for (code, unit, readings) in [("8480-6", "mm[Hg]", SYSTOLIC), ("8867-4", "/min", HEART_RATE)] {
        for &(d, value) in readings {
            let vital = VitalSignRecorded {
                envelope: envelope("VitalSignRecorded", "D01", WATCHED, day(d)),
                observation_id: Uuid::new_v4().to_string(),
                loinc_code: code.into(),
                value,
                unit: unit.into(),
                position: Some("SITTING".into()),
                effective: PartialDateTime::parse(&day(d).format("%Y-%m-%dT%H:%M:%S").to_string()),
                visit: Some(format!("DAY {d}")),
                visit_day: None,
            };
            out.push(OutboxEvent::avro(&vital, names.of::<VitalSignRecorded>(), WATCHED.to_string())?);
        }
    }
    Ok(out)
}

type Running = (CancellationToken, Vec<JoinHandle<Result<(), ConsumerError>>>, RunningRelay);

/// The study, through Kafka and the real consumers, until the KRI table holds every site's final
/// counts and the watched subject's alert is raised; then the consumers are stopped, so the
/// tables hold still while the test reads them.
struct Seeded {
    pool: PgPool,
    monitoring: SchemaName,
    risk: SchemaName,
}

async fn seed() -> anyhow::Result<Seeded> {
    init_logs();
    let names = TopicNames::new(format!("{}.", unique("dash").replace('_', "-")));
    trialflow_outbox::kafka::ensure_catalogue_topics(&kafka(), &names, 1, topics::DLQ_SUFFIX).await?;
    let url = database_url();
    let source = SchemaName::new(unique("src"))?;
    let risk_schema = SchemaName::new(unique("risk"))?;
    let monitoring_schema = SchemaName::new(unique("mon"))?;
    trialflow_outbox::migrate(&url, &source).await.context("migrating (is `make up` running?)")?;
    risk::migrate(&url, &risk_schema).await?;
    monitoring::migrate(&url, &monitoring_schema).await?;
    let pool = PgPool::connect(&url).await?;
    let outbox = Outbox::open(&pool, source.clone()).await?;
    let relay = RunningRelay::start(relay_config(
        &kafka(),
        vec![source, risk_schema.clone(), monitoring_schema.clone()],
    ));
    let mut config = ConsumerConfig::local();
    config.database.database_url = url;
    config.kafka = kafka();
    config.max_backoff_ms = 500;
    let stop = CancellationToken::new();
    let risk_config = ConsumerConfig { group_id: Some(format!("risk-{risk_schema}")), ..config.clone() };
    let monitoring_config = ConsumerConfig { group_id: Some(format!("mon-{monitoring_schema}")), ..config };
    let handles = vec![
        tokio::spawn(risk::run(
            risk::spec(risk_schema.clone(), &names),
            risk_config,
            names.clone(),
            risk::RiskConfig::default(),
            stop.clone(),
        )),
        tokio::spawn(monitoring::run(
            monitoring::spec(monitoring_schema.clone(), &names),
            monitoring_config,
            RuleBook::load(None).map_err(anyhow::Error::msg)?,
            names.clone(),
            stop.clone(),
        )),
    ];
    let running: Running = (stop, handles, relay);

    let mut tx = pool.begin().await?;
    outbox.enqueue_all(&mut tx, &events(&names)?).await?;
    tx.commit().await?;

    let seeded = Seeded { pool, monitoring: monitoring_schema, risk: risk_schema };
    let settled = seeded.settle().await;
    let (stop, handles, relay) = running;
    stop.cancel();
    for handle in handles {
        handle.await??;
    }
    relay.stop().await?;
    settled?;
    Ok(seeded)
}

impl Seeded {
    /// Waits for the final KRI table, the readings, the subject's alert and the site-level alert
    /// of the red site.
    async fn settle(&self) -> anyhow::Result<()> {
        let (r, m) = (&self.risk, &self.monitoring);
        let counts = format!(
            "SELECT site_id, kri, numerator, denominator FROM {r}.site_kri
             WHERE study_id = $1 AND kri IN ('SCREEN_FAILURE', 'DISCONTINUATION') ORDER BY site_id, kri"
        );
        let mut want = Vec::new();
        for &(site, screened, failures, withdrawn) in SITES {
            want.push((
                site.to_string(),
                "DISCONTINUATION".to_string(),
                f64::from(withdrawn),
                f64::from(screened - failures),
            ));
            want.push((
                site.to_string(),
                "SCREEN_FAILURE".to_string(),
                f64::from(failures),
                f64::from(screened),
            ));
        }
        wait_until("the KRI table holds every site's final counts", WAIT, || async {
            let kept: Vec<(String, String, f64, f64)> =
                sqlx::query_as(AssertSqlSafe(counts.as_str())).bind(STUDY).fetch_all(&self.pool).await?;
            Ok(kept == want)
        })
        .await?;
        let readings = (SYSTOLIC.len() + HEART_RATE.len()) as i64;
        let settled = format!(
            "SELECT (SELECT count(*) FROM {m}.observation WHERE study_id = $1) = $2
                AND EXISTS (SELECT 1 FROM {m}.alert WHERE study_id = $1 AND subject_id = $3
                            AND rule_id = 'CTCAE-HTN-G3')
                AND EXISTS (SELECT 1 FROM {m}.alert WHERE study_id = $1 AND site_id = 'D12'
                            AND subject_id IS NULL)"
        );
        wait_until("the readings, the subject's alert and the red site's alert are kept", WAIT, || async {
            Ok(sqlx::query_scalar(AssertSqlSafe(settled.as_str()))
                .bind(STUDY)
                .bind(readings)
                .bind(WATCHED)
                .fetch_one(&self.pool)
                .await?)
        })
        .await
    }

    async fn study_kris(&self) -> anyhow::Result<Vec<StudyKri>> {
        Ok(risk::read::study_kris(&self.pool, &self.risk, STUDY).await?)
    }

    async fn site_kris(&self) -> anyhow::Result<Vec<SiteKri>> {
        Ok(risk::read::site_kris(&self.pool, &self.risk, STUDY).await?)
    }
}

/// The alert API on the seeded schemas: a static researcher and admin token, a site staff token,
/// and an identity provider for researchers limited to some studies and sites.
struct Api {
    base: String,
    http: reqwest::Client,
    researcher: String,
    site_staff: String,
    idp: TestIdp,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), trialflow_consumers::monitoring::api::AlertApiError>>,
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    body: Value,
    text: String,
}

impl Answer {
    fn error(&self) -> (StatusCode, &str, Option<&str>) {
        let error = &self.body["error"];
        (self.status, error["code"].as_str().unwrap_or(""), error["field"].as_str())
    }
}

impl Api {
    async fn start(seeded: &Seeded) -> anyhow::Result<Self> {
        let idp = TestIdp::start().await?;
        let grant = |role: Role, user: &str| TokenGrant { token: unique(user), role, user: user.to_string() };
        let tokens = vec![grant(Role::Researcher, "rita"), grant(Role::SiteStaff, "sam")];
        let api = AlertApi::bind(AlertApiConfig {
            listen: "127.0.0.1:0".parse()?,
            database_url: database_url(),
            schema: seeded.monitoring.clone(),
            risk_schema: seeded.risk.clone(),
            rules: RuleBook::load(None).map_err(anyhow::Error::msg)?,
            thresholds: risk::RiskConfig::default(),
            tokens: tokens.clone(),
            oidc: Some(OidcSettings::new(&idp.issuer, &idp.audience, &idp.jwks_url)),
            topics: TopicNames::new(unique("t") + "."),
            limits: trialflow_http::limits::Limits::unthrottled(),
        })
        .await?;
        let base = format!("http://{}", api.local_addr());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(api.run(shutdown.clone()));
        Ok(Self {
            base,
            http: reqwest::Client::new(),
            researcher: tokens[0].token.clone(),
            site_staff: tokens[1].token.clone(),
            idp,
            shutdown,
            server,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server).await.context("API did not stop")???;
        Ok(())
    }

    /// A researcher's token of the identity provider, limited to `studies` and `sites`.
    fn scoped(&self, studies: &[&str], sites: &[&str]) -> anyhow::Result<String> {
        self.idp.token(&self.idp.claims("rosa", "researcher", studies, sites))
    }

    async fn get(&self, token: Option<&str>, path: &str) -> anyhow::Result<Answer> {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Answer { status, body, text })
    }

    /// The answer of a route that must succeed, as JSON.
    async fn ok(&self, path: &str) -> anyhow::Result<Value> {
        let answer = self.get(Some(&self.researcher), path).await?;
        ensure!(answer.status == StatusCode::OK, "GET {path} answered {}: {}", answer.status, answer.text);
        Ok(answer.body)
    }
}

// ---- the numbers ---------------------------------------------------------------------------------

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

fn number(v: &Value) -> anyhow::Result<f64> {
    v.as_f64().with_context(|| format!("not a number: {v}"))
}

/// The funnel limits at denominator `n`, written out here: `μ ± z·√(φ·v/n)` with `v = μ(1 − μ)`
/// for a proportion and `μ` for a rate, cut at 0 (and 1 for a proportion).
fn expected_limits(method: Method, mu: f64, phi: f64, n: f64) -> [f64; 4] {
    let v = if method == Method::Binary { mu * (1.0 - mu) } else { mu };
    let sd = (phi * v / n).sqrt();
    let top = if method == Method::Binary { 1.0 } else { f64::INFINITY };
    [-3.0, -2.0, 2.0, 3.0].map(|z: f64| (mu + z * sd).clamp(0.0, top))
}

fn limits_match(json: &Value, want: [f64; 4]) -> anyhow::Result<bool> {
    let got = ["lower_red", "lower_amber", "upper_amber", "upper_red"].map(|k| number(&json[k]));
    Ok(got.into_iter().zip(want).all(|(g, w)| g.is_ok_and(|g| close(g, w))))
}

/// The risk route against the risk service's tables: per KRI the study's metric and factor, the
/// thresholds and the limit curves; per site the counts, the flag, the limits at its denominator
/// and the risk score (Σ|flag|); the sites by score, then id.
async fn risk_table_equals_the_tables(api: &Api, seeded: &Seeded) -> anyhow::Result<Value> {
    let risk = api.ok(&format!("/v1/studies/{STUDY}/risk")).await?;
    let study = seeded.study_kris().await?;
    let sites = seeded.site_kris().await?;
    let kris = risk["kris"].as_array().context("kris")?;
    let ids: Vec<&str> = kris.iter().filter_map(|k| k["kri_id"].as_str()).collect();
    assert_eq!(ids, kri::CATALOGUE.iter().map(|k| k.id).collect::<Vec<_>>(), "every KRI, catalogue order");
    for k in kris {
        let id = k["kri_id"].as_str().context("kri_id")?;
        let row = study.iter().find(|s| s.kri == id).context("a KRI the table lacks")?;
        let meta = kri::kri(id).context("a KRI outside the catalogue")?;
        assert_eq!(k["method"], if meta.method == Method::Binary { "binary" } else { "rate" }, "{id}");
        assert!(close(number(&k["overall"])?, row.overall), "{id}: {k}");
        assert_eq!((number(&k["amber"])?, number(&k["red"])?), (2.0, 3.0), "default thresholds");
        assert_eq!(number(&k["min_denominator"])?, meta.min_denominator);
        let funnel = k["funnel"].as_array().context("funnel")?;
        match row.factor {
            None => {
                assert!(k["factor"].is_null() && funnel.is_empty(), "no factor, no limits: {k}");
            }
            Some(phi) => {
                assert!(close(number(&k["factor"])?, phi), "{id}");
                let ns: Vec<f64> = sites
                    .iter()
                    .filter(|s| s.kri == id && s.denominator > 0.0)
                    .map(|s| s.denominator)
                    .collect();
                let (low, high) = (
                    ns.iter().copied().fold(f64::INFINITY, f64::min),
                    ns.iter().copied().fold(0.0, f64::max),
                );
                assert!(funnel.len() >= 2, "{id}: a curve needs points");
                let first = number(&funnel[0]["denominator"])?;
                let last = number(&funnel[funnel.len() - 1]["denominator"])?;
                assert!(
                    close(first, low) && close(last, high),
                    "{id}: the curve spans the sites ({first}–{last})"
                );
                for point in funnel {
                    let n = number(&point["denominator"])?;
                    assert!(
                        limits_match(point, expected_limits(meta.method, row.overall, phi, n))?,
                        "{id} at {n}: {point}"
                    );
                }
            }
        }
    }
    // Per site, from the table: Σ|flag| and every KRI's numbers.
    let mut by_site: BTreeMap<&str, Vec<&SiteKri>> = BTreeMap::new();
    for s in &sites {
        by_site.entry(s.site_id.as_str()).or_default().push(s);
    }
    let mut order: Vec<(u32, &str)> = by_site
        .iter()
        .map(|(site, rows)| {
            (rows.iter().filter_map(|r| r.flag).map(|f| u32::from(f.unsigned_abs())).sum(), *site)
        })
        .collect();
    order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let shown: Vec<(u32, &str)> = risk["sites"]
        .as_array()
        .context("sites")?
        .iter()
        .map(|s| {
            Ok((
                u32::try_from(s["risk_score"].as_u64().context("risk_score")?)?,
                s["site_id"].as_str().context("site_id")?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(shown, order, "sites by risk score, then id");
    assert_eq!(shown.first(), Some(&(2, "D12")), "the red site first");
    for site in risk["sites"].as_array().context("sites")? {
        let id = site["site_id"].as_str().context("site_id")?;
        for k in site["kris"].as_array().context("site kris")? {
            let kri_id = k["kri_id"].as_str().context("kri_id")?;
            let row = by_site[id].iter().find(|r| r.kri == kri_id).context("a site KRI the table lacks")?;
            assert_eq!(
                (number(&k["numerator"])?, number(&k["denominator"])?),
                (row.numerator, row.denominator)
            );
            assert!(close(number(&k["metric"])?, row.metric));
            assert_eq!(k["flag"].as_i64(), row.flag.map(i64::from), "{id} {kri_id}");
            assert_eq!(k["score"].as_f64().is_some(), row.score.is_some(), "{id} {kri_id}");
            let study_row = study.iter().find(|s| s.kri == kri_id).context("study KRI")?;
            let meta = kri::kri(kri_id).context("catalogue")?;
            match study_row.factor {
                None => assert!(k["limits"].is_null(), "{id} {kri_id}: no factor, no limits"),
                Some(phi) => {
                    let want = expected_limits(meta.method, study_row.overall, phi, row.denominator);
                    assert!(limits_match(&k["limits"], want)?, "{id} {kri_id}: {}", k["limits"]);
                    // The funnel's promise: a site is flagged exactly when it lies beyond the
                    // amber limits at its denominator.
                    if let Some(flag) = row.flag {
                        let beyond = row.metric > want[2] || row.metric < want[1];
                        assert_eq!(flag != 0, beyond, "{id} {kri_id}: metric {} limits {want:?}", row.metric);
                    }
                }
            }
        }
    }
    Ok(risk)
}

/// The site route: the site's KRIs as in the risk table, its subjects with their readings and
/// alert counts, and its site-level alerts.
async fn site_pages_show_the_sites(api: &Api, risk: &Value) -> anyhow::Result<()> {
    let red = api.ok(&format!("/v1/studies/{STUDY}/sites/D12")).await?;
    let row =
        risk["sites"].as_array().and_then(|s| s.iter().find(|s| s["site_id"] == "D12")).context("D12")?;
    assert_eq!(red["risk_score"], row["risk_score"]);
    let kri_ids: Vec<&Value> = red["kris"].as_array().context("kris")?.iter().map(|k| &k["kri_id"]).collect();
    let table_ids: Vec<&Value> =
        row["kris"].as_array().context("kris")?.iter().map(|k| &k["kri_id"]).collect();
    assert_eq!(kri_ids, table_ids);
    let failures = red["kris"]
        .as_array()
        .and_then(|k| k.iter().find(|k| k["kri_id"] == "SCREEN_FAILURE"))
        .context("SF")?;
    assert_eq!(
        (failures["numerator"].as_f64(), failures["flag"].as_i64(), failures["red"].as_f64()),
        (Some(8.0), Some(2), Some(3.0))
    );
    let subjects: Vec<&str> = red["subjects"]
        .as_array()
        .context("subjects")?
        .iter()
        .filter_map(|s| s["subject_id"].as_str())
        .collect();
    assert_eq!(subjects, (0..10).map(|i| format!("D12-{i:03}")).collect::<Vec<_>>());
    let alerts = red["alerts"].as_array().context("alerts")?;
    assert!(alerts.iter().any(|a| a["subject_id"].is_null() && a["rule_id"].as_str().is_some_and(|r| r.starts_with("KRI"))), "{alerts:?}");

    // Each KRI of the site once, its fields once each (what a JSON parser would hide).
    let raw = api.get(Some(&api.researcher), &format!("/v1/studies/{STUDY}/sites/D12")).await?.text;
    assert_eq!(raw.matches("\"kri_id\"").count(), kri_ids.len(), "{raw}");

    let d01 = api.ok(&format!("/v1/studies/{STUDY}/sites/D01")).await?;
    let watched = d01["subjects"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["subject_id"] == WATCHED))
        .context("watched")?;
    assert_eq!(watched["readings"].as_i64(), Some((SYSTOLIC.len() + HEART_RATE.len()) as i64));
    assert_eq!((watched["alerts"].as_i64(), watched["open_alerts"].as_i64()), (Some(1), Some(1)));
    assert_eq!(
        watched["last_reading_at"].as_str().map(|t| t.parse::<DateTime<Utc>>()).transpose()?,
        Some(day(23))
    );
    Ok(())
}

/// The vitals route: the readings as published, the default rules' thresholds of each code, the
/// alert with its evidence at the reading's clinical time.
async fn subject_page_shows_the_readings(api: &Api) -> anyhow::Result<Value> {
    let vitals = api.ok(&format!("/v1/studies/{STUDY}/subjects/{WATCHED}/vitals")).await?;
    assert_eq!(vitals["site_id"], "D01");
    let rules = RuleBook::load(None).map_err(anyhow::Error::msg)?;
    let series = vitals["vitals"].as_array().context("vitals")?;
    let codes: Vec<&str> = series.iter().filter_map(|v| v["code"].as_str()).collect();
    assert_eq!(codes, ["8480-6", "8867-4"]);
    for (vital, published) in series.iter().zip([SYSTOLIC, HEART_RATE]) {
        let code = vital["code"].as_str().context("code")?;
        let readings: Vec<(DateTime<Utc>, f64)> = vital["readings"]
            .as_array()
            .context("readings")?
            .iter()
            .map(|r| Ok((r["effective_at"].as_str().context("effective_at")?.parse()?, number(&r["value"])?)))
            .collect::<anyhow::Result<_>>()?;
        let want: Vec<(DateTime<Utc>, f64)> = published.iter().map(|(d, v)| (day(*d), *v)).collect();
        assert_eq!(readings, want, "{code}");
        let mut expected = Vec::new();
        for rule in rules.rules(STUDY) {
            let RuleInput::Vital { any, .. } = &rule.input else { continue };
            expected.extend(any.iter().filter(|c| c.code == code).map(|c| (rule.rule_id.clone(), c.value)));
        }
        let shown: Vec<(String, f64)> = vital["thresholds"]
            .as_array()
            .context("thresholds")?
            .iter()
            .map(|t| Ok((t["rule_id"].as_str().context("rule_id")?.to_string(), number(&t["value"])?)))
            .collect::<anyhow::Result<_>>()?;
        assert_eq!(shown, expected, "{code}: the study's rules");
        assert!(!shown.is_empty(), "{code}: the default rules judge it");
    }
    let alerts = vitals["alerts"].as_array().context("alerts")?;
    let [alert] = alerts.as_slice() else { anyhow::bail!("one alert expected: {alerts:?}") };
    assert_eq!(
        (&alert["rule_id"], &alert["severity"], &alert["status"]),
        (&Value::from("CTCAE-HTN-G3"), &Value::from("HIGH"), &Value::from("open"))
    );
    let clinical: DateTime<Utc> = alert["effective_at"].as_str().context("effective_at")?.parse()?;
    assert_eq!(clinical, day(16), "the clinical time of the evidence, not the time raised");
    let evidence = alert["evidence"].as_array().context("evidence")?;
    assert_eq!(evidence.len(), 1, "{evidence:?}");
    assert_eq!((&evidence[0]["code"], evidence[0]["value"].as_f64()), (&Value::from("8480-6"), Some(168.0)));
    Ok(vitals)
}

// ---- the tests ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_risk_tables_and_vital_signs_in_json_and_in_the_browser() -> anyhow::Result<()>
{
    let seeded = seed().await?;
    let api = Api::start(&seeded).await?;
    let risk = risk_table_equals_the_tables(&api, &seeded).await?;
    site_pages_show_the_sites(&api, &risk).await?;
    let vitals = subject_page_shows_the_readings(&api).await?;
    scope_keeps_others_out_and_tells_them_nothing(&api).await?;
    hostile_input_is_refused(&api).await?;
    seed_queries(&seeded).await?;
    in_the_browser(&api, &risk, &vitals).await?;
    api.stop().await
}

/// Two queries waiting (one open, one answered) and a closed one, as the risk consumer keeps them
/// (their life through the events is `trialflow/tests/queries.rs`'s): the study page lists the
/// two waiting ones.
async fn seed_queries(seeded: &Seeded) -> anyhow::Result<()> {
    let s = &seeded.risk;
    for (n, status) in ["open", "answered", "closed"].into_iter().enumerate() {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.query (query_id, study_id, site_id, subject_id, check_id, check_kind, item,
                                    data_event_ids, value, message, status, opened_at, answered_at,
                                    answered_by, answer, closed_at, closed_by, close_reason)
             VALUES ($1, $2, 'D01', $3, 'SYSBP_RANGE', 'range', 'VitalSignRecorded/8480-6',
                     ARRAY[gen_random_uuid()], '400 mm[Hg]', 'Systolic blood pressure 400 mm[Hg] is outside 60 to 250 mm[Hg]',
                     $4, now() - make_interval(days => $5),
                     CASE WHEN $4 <> 'open' THEN now() END, CASE WHEN $4 <> 'open' THEN 'sam' END,
                     CASE WHEN $4 <> 'open' THEN 'Transcription error.' END,
                     CASE WHEN $4 = 'closed' THEN now() END, CASE WHEN $4 = 'closed' THEN 'rita' END,
                     CASE WHEN $4 = 'closed' THEN 'Corrected at the site.' END)"
        )))
        .bind(Uuid::now_v7())
        .bind(STUDY)
        .bind(WATCHED)
        .bind(status)
        .bind(3 - n as i32)
        .execute(&seeded.pool)
        .await?;
    }
    Ok(())
}

/// A researcher of another study is refused every route of this one, exactly as for a study that
/// does not exist; one limited to a site sees that site's line only, is refused other sites, and
/// finds other sites' subjects "not found" exactly as subjects that do not exist.
async fn scope_keeps_others_out_and_tells_them_nothing(api: &Api) -> anyhow::Result<()> {
    let other = api.scoped(&["OTHERSTUDY"], &["*"])?;
    for path in [
        format!("/v1/studies/{STUDY}/risk"),
        format!("/v1/studies/{STUDY}/sites/D12"),
        format!("/v1/studies/{STUDY}/subjects/{WATCHED}/vitals"),
    ] {
        let existing = api.get(Some(&other), &path).await?;
        let unknown = api.get(Some(&other), &path.replace(STUDY, "NOSUCHSTUDY")).await?;
        assert_eq!(
            existing.error(),
            (StatusCode::FORBIDDEN, "out_of_scope", None),
            "{path}: {}",
            existing.text
        );
        assert_eq!(
            unknown.error(),
            existing.error(),
            "{path}: the same answer whether the study exists or not"
        );
        assert!(!existing.text.contains("D12") && !existing.text.contains(WATCHED), "{}", existing.text);
    }
    let d02 = api.scoped(&[STUDY], &["D02"])?;
    let risk = api.get(Some(&d02), &format!("/v1/studies/{STUDY}/risk")).await?;
    assert_eq!(risk.status, StatusCode::OK, "{}", risk.text);
    let sites: Vec<&str> = risk.body["sites"]
        .as_array()
        .context("sites")?
        .iter()
        .filter_map(|s| s["site_id"].as_str())
        .collect();
    assert_eq!(sites, ["D02"], "only the token's site");
    let site = api.get(Some(&d02), &format!("/v1/studies/{STUDY}/sites/D12")).await?;
    assert_eq!(site.error(), (StatusCode::FORBIDDEN, "out_of_scope", None), "{}", site.text);
    assert_eq!(api.get(Some(&d02), &format!("/v1/studies/{STUDY}/sites/D02")).await?.status, StatusCode::OK);
    let hidden = api.get(Some(&d02), &format!("/v1/studies/{STUDY}/subjects/{WATCHED}/vitals")).await?;
    let absent = api.get(Some(&d02), &format!("/v1/studies/{STUDY}/subjects/D01-999/vitals")).await?;
    assert_eq!(hidden.error(), (StatusCode::NOT_FOUND, "not_found", None), "{}", hidden.text);
    assert_eq!(absent.error(), hidden.error());
    assert_eq!(hidden.text.replace(WATCHED, "D01-999"), absent.text, "nothing tells them apart");
    // Without a token, or with a role that may not use the API.
    let path = format!("/v1/studies/{STUDY}/risk");
    assert_eq!(api.get(None, &path).await?.error().1, "unauthenticated");
    assert_eq!(
        api.get(Some(&api.site_staff), &path).await?.error(),
        (StatusCode::FORBIDDEN, "forbidden", None)
    );
    Ok(())
}

/// Hostile paths and queries on each route: control characters, huge values, ids that are no
/// ids, unknown parameters; and 404 for what nobody knows. Every refusal names its field.
async fn hostile_input_is_refused(api: &Api) -> anyhow::Result<()> {
    let huge = "X".repeat(10_000);
    let long_id = "A".repeat(65);
    let routes = [
        ("/v1/studies/{study}/risk", None),
        ("/v1/studies/{study}/sites/{id}", Some("site_id")),
        ("/v1/studies/{study}/subjects/{id}/vitals", Some("subject_id")),
    ];
    for (template, id_field) in routes {
        let path = |study: &str, id: &str| template.replace("{study}", study).replace("{id}", id);
        let valid = path(STUDY, if id_field == Some("site_id") { "D01" } else { WATCHED });
        let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
        let bad = StatusCode::BAD_REQUEST;
        let mut cases = vec![
            (path("DASH%00TEST", "D01"), (unprocessable, "invalid_characters", Some("study_id"))),
            (path("%1BDASHTEST", "D01"), (unprocessable, "invalid_characters", Some("study_id"))),
            (path(&huge, "D01"), (unprocessable, "too_long", Some("study_id"))),
            (path("DASH%20TEST", "D01"), (unprocessable, "validation_failed", Some("study_id"))),
            (path(&long_id, "D01"), (unprocessable, "too_long", Some("study_id"))),
            (format!("{valid}?colour=red"), (bad, "unknown_parameter", Some("colour"))),
            (format!("{valid}?limit=5&limit=6"), (bad, "unknown_parameter", Some("limit"))),
            (format!("{valid}?colour=%00"), (unprocessable, "invalid_characters", Some("colour"))),
            (format!("{valid}?colour={huge}"), (unprocessable, "too_long", Some("colour"))),
            (path("NOSUCHSTUDY", "D01"), (StatusCode::NOT_FOUND, "not_found", None)),
        ];
        if let Some(field) = id_field {
            cases.extend([
                (path(STUDY, "D01%00"), (unprocessable, "invalid_characters", Some(field))),
                (path(STUDY, "%7F"), (unprocessable, "invalid_characters", Some(field))),
                (path(STUDY, "%FF%FE"), (unprocessable, "invalid_characters", Some(field))),
                (path(STUDY, &huge), (unprocessable, "too_long", Some(field))),
                (path(STUDY, &long_id), (unprocessable, "too_long", Some(field))),
                (path(STUDY, "..%2F..%2Fetc"), (unprocessable, "validation_failed", Some(field))),
                (path(STUDY, "D99"), (StatusCode::NOT_FOUND, "not_found", None)),
            ]);
        }
        for (url, want) in cases {
            let answer = api.get(Some(&api.researcher), &url).await?;
            let got = answer.error();
            assert_eq!(
                got,
                want,
                "GET {}: {}",
                &url[..url.len().min(120)],
                &answer.text[..answer.text.len().min(300)]
            );
            assert!(
                answer.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
                "a reason is given"
            );
        }
        assert_eq!(
            api.get(Some(&api.researcher), &valid).await?.status,
            StatusCode::OK,
            "{valid} still serves"
        );
    }
    Ok(())
}

// ---- the page -------------------------------------------------------------------------------------

async fn in_the_browser(api: &Api, risk: &Value, vitals: &Value) -> anyhow::Result<()> {
    let (chromium, chromedriver) = tools("the dashboard's browser test")?;
    let driver = Driver::start(&chromedriver).await?;
    let browser = match headless_chromium(&driver, &chromium).await {
        Ok(browser) => browser,
        Err(e) => {
            driver.stop().await;
            return Err(e);
        }
    };
    let outcome = use_the_dashboard(api, &browser, risk, vitals).await;
    // Close the browser whatever happened, so no Chromium outlives the test.
    let closed = browser.close().await;
    driver.stop().await;
    outcome?;
    closed?;
    Ok(())
}

/// Waits until the page shows `page` (its data rendered).
async fn page_shown(browser: &Client, page: &str) -> anyhow::Result<()> {
    browser
        .wait()
        .at_most(PAGE)
        .for_element(Locator::Css(&format!("main[data-page=\"{page}\"]")))
        .await
        .with_context(|| format!("the {page} page was not shown"))?;
    Ok(())
}

async fn attr(element: &fantoccini::elements::Element, name: &str) -> anyhow::Result<String> {
    element.attr(name).await?.with_context(|| format!("no attribute {name}"))
}

/// Saves a screenshot of what the browser shows under the target directory; prints its path.
async fn screenshot(browser: &Client, name: &str) -> anyhow::Result<()> {
    let png = browser.screenshot().await?;
    ensure!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "the screenshot is no PNG");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, &png).with_context(|| format!("writing {}", path.display()))?;
    println!("dashboard screenshot: {}", path.display());
    Ok(())
}

async fn use_the_dashboard(api: &Api, browser: &Client, risk: &Value, vitals: &Value) -> anyhow::Result<()> {
    browser.goto(&format!("{}/dashboard?token={}#/study/{STUDY}", api.base, api.researcher)).await?;
    page_shown(browser, "study").await?;
    let url = browser.current_url().await?;
    assert!(!url.as_str().contains("token="), "the token stays out of the address bar: {url}");

    // The risk table: a row per site, in the API's order, with its risk score and metrics.
    let sites = risk["sites"].as_array().context("sites")?;
    let rows = browser.find_all(Locator::Css("#risk-table tbody tr")).await?;
    assert_eq!(rows.len(), sites.len());
    for (tr, site) in rows.iter().zip(sites) {
        assert_eq!(attr(tr, "data-site-id").await?, site["site_id"].as_str().context("site_id")?);
        let score = tr.find(Locator::Css(".risk-score")).await?.text().await?;
        assert_eq!(score, site["risk_score"].to_string());
        for k in site["kris"].as_array().context("kris")? {
            let kri_id = k["kri_id"].as_str().context("kri_id")?;
            let td = tr.find(Locator::Css(&format!("td[data-kri=\"{kri_id}\"]"))).await?;
            let metric: f64 = attr(&td, "data-metric").await?.parse()?;
            assert!(close(metric, number(&k["metric"])?), "{kri_id}: {metric}");
        }
    }

    // The data queries waiting: the open one, then the answered one (oldest first); not the closed.
    let queries = api.ok(&format!("/v1/queries?study_id={STUDY}&limit=500")).await?;
    let waiting: Vec<(String, String)> = queries["queries"]
        .as_array()
        .context("queries")?
        .iter()
        .filter(|q| q["status"] != "closed")
        .map(|q| {
            let text = |key: &str| q[key].as_str().unwrap_or_default().to_string();
            (text("query_id"), text("status"))
        })
        .collect();
    assert_eq!(waiting.len(), 2, "{queries}");
    browser.wait().at_most(PAGE).for_element(Locator::Css("#queries[aria-busy=\"false\"]")).await?;
    let mut shown = Vec::new();
    for tr in browser.find_all(Locator::Css("#queries-table tbody tr")).await? {
        shown.push((attr(&tr, "data-query-id").await?, attr(&tr, "data-status").await?));
    }
    assert_eq!(shown, waiting);

    // One funnel plot per KRI: a circle per site with a denominator, the scored ones marked,
    // four limit curves where the KRI has a factor, none where it has not.
    for kri in risk["kris"].as_array().context("kris")? {
        let id = kri["kri_id"].as_str().context("kri_id")?;
        let plot = format!("svg.funnel[data-kri=\"{id}\"]");
        let of_kri = |s: &&Value| s["kris"].as_array().is_some_and(|k| k.iter().any(|k| k["kri_id"] == id));
        let with_denominator = sites.iter().filter(of_kri).count();
        let scored = sites
            .iter()
            .filter(|s| {
                s["kris"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k["kri_id"] == id && !k["score"].is_null()))
            })
            .count();
        let circles = browser.find_all(Locator::Css(&format!("{plot} circle.site"))).await?;
        let scored_circles =
            browser.find_all(Locator::Css(&format!("{plot} circle.site[data-scored=\"true\"]"))).await?;
        assert_eq!((circles.len(), scored_circles.len()), (with_denominator, scored), "{id}");
        let limits = browser.find_all(Locator::Css(&format!("{plot} path.limit"))).await?;
        let expected = if kri["factor"].is_null() { 0 } else { 4 };
        assert_eq!(limits.len(), expected, "{id}: limit curves");
        for path in &limits {
            let d = attr(path, "d").await?;
            assert!(
                d.starts_with('M')
                    && d.matches('L').count() + 1 == kri["funnel"].as_array().map_or(0, Vec::len),
                "{id}: {d}"
            );
        }
    }
    // Tall enough for the table and the four plots in one picture.
    browser.set_window_size(1280, 1500).await?;
    screenshot(browser, "dashboard-study.png").await?;
    browser.set_window_size(1280, 900).await?;

    // Clicking the red site's point opens its page.
    browser
        .find(Locator::Css("svg.funnel[data-kri=\"SCREEN_FAILURE\"] circle.site[data-site-id=\"D12\"]"))
        .await?
        .click()
        .await?;
    page_shown(browser, "site").await?;
    assert!(browser.current_url().await?.as_str().ends_with(&format!("#/study/{STUDY}/site/D12")));
    assert_eq!(browser.find(Locator::Css("#site-risk-score")).await?.text().await?, "Risk score 2");
    assert_eq!(browser.find_all(Locator::Css("#site-subjects tbody tr")).await?.len(), 10);
    let flag = browser.find(Locator::Css("#site-kris tr[data-kri=\"SCREEN_FAILURE\"] .flag")).await?;
    assert_eq!(attr(&flag, "data-flag").await?, "2");

    // The watched subject's site, then the subject from its list.
    browser.goto(&format!("{}/dashboard#/study/{STUDY}/site/D01", api.base)).await?;
    // Only D01's page has this row (the page was a site's already).
    let subject_row = format!("#site-subjects tr[data-subject-id=\"{WATCHED}\"]");
    browser.wait().at_most(PAGE).for_element(Locator::Css(&subject_row)).await.context("D01's page")?;
    let open = browser.find(Locator::Css(&format!("{subject_row} .open-alerts"))).await?.text().await?;
    assert_eq!(open, "1");
    browser.find(Locator::Css(&format!("{subject_row} a"))).await?.click().await?;
    page_shown(browser, "subject").await?;

    // Each vital sign's series: its readings, the rules' threshold lines, the alert's marker.
    for (vital, published) in
        vitals["vitals"].as_array().context("vitals")?.iter().zip([SYSTOLIC, HEART_RATE])
    {
        let code = vital["code"].as_str().context("code")?;
        let chart = format!("section.vital[data-code=\"{code}\"] svg.vital-chart");
        let mut values = Vec::new();
        for circle in browser.find_all(Locator::Css(&format!("{chart} circle.reading"))).await? {
            values.push(attr(&circle, "data-value").await?.parse::<f64>()?);
        }
        assert_eq!(values, published.iter().map(|r| r.1).collect::<Vec<_>>(), "{code}");
        assert_eq!(browser.find_all(Locator::Css(&format!("{chart} path.series"))).await?.len(), 1);
        let mut rules = Vec::new();
        for line in browser.find_all(Locator::Css(&format!("{chart} line.threshold"))).await? {
            rules.push(attr(&line, "data-rule-id").await?);
        }
        let thresholds = vital["thresholds"].as_array().context("thresholds")?;
        let same_unit = thresholds.iter().filter(|t| t["unit"] == vital["unit"]).count();
        assert!(same_unit > 0 && rules.len() >= same_unit, "{code}: {rules:?} for {thresholds:?}");
    }
    let alert = &vitals["alerts"][0];
    let id = alert["alert_id"].as_str().context("alert_id")?;
    let marker = browser
        .find(Locator::Css(&format!(
            "section.vital[data-code=\"8480-6\"] path.alert-marker[data-alert-id=\"{id}\"]"
        )))
        .await
        .context("the alert is marked on the systolic series")?;
    assert_eq!(attr(&marker, "data-value").await?, "168");
    assert!(
        browser.find(Locator::Css("section.vital[data-code=\"8867-4\"] path.alert-marker")).await.is_err(),
        "not on heart rate"
    );
    let clinical =
        browser.find(Locator::Css(&format!("#subject-alerts tr[data-alert-id=\"{id}\"] .clinical"))).await?;
    assert_eq!(attr(&clinical, "title").await?, alert["effective_at"].as_str().context("effective_at")?);
    screenshot(browser, "dashboard-subject.png").await?;

    // The inbox, beside it: the clinical time next to the time raised, filters, the way back.
    browser.goto(&format!("{}/inbox", api.base)).await?;
    let row = format!("tr[data-alert-id=\"{id}\"]");
    let tr = browser
        .wait()
        .at_most(PAGE)
        .for_element(Locator::Css(&row))
        .await
        .context("the inbox shows the alert")?;
    assert_eq!(
        attr(&tr.find(Locator::Css(".clinical")).await?, "title").await?,
        format!(
            "clinical time of the first evidence: {}",
            alert["effective_at"].as_str().unwrap_or_default()
        )
    );
    browser.find(Locator::Css("#filter-severity")).await?.select_by_value("CRITICAL").await?;
    wait_until("the severity filter hides the HIGH alert", PAGE, || async {
        Ok(browser.find(Locator::Css(&row)).await.is_err())
    })
    .await?;
    browser.find(Locator::Css("#filter-severity")).await?.select_by_value("HIGH").await?;
    browser.wait().at_most(PAGE).for_element(Locator::Css(&row)).await.context("shown again")?;
    browser.find(Locator::Css(&format!("{row} .subject a"))).await?.click().await?;
    page_shown(browser, "subject").await.context("the inbox links to the subject's page")?;
    Ok(())
}
