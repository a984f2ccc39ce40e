//! The enrollment saga end to end, driven the way a site drives it: HTTP calls to the site API,
//! then the relay, the broker over TCP, and the enrollment and kit-allocation consumers, all
//! started in this process by `trialflow_pipeline` on private schemas and topics. Then an enrolled
//! subject's app submits a questionnaire through the ePRO gateway and it is validated.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::{enrollment, epro};
use trialflow_outbox::SchemaName;
use trialflow_pipeline::{Pipeline, PipelineConfig};
use trialflow_testkit::{SiteApi, database_url, init_logs, kafka, wait_until};

const WAIT: Duration = Duration::from_secs(120);

struct Site {
    api: SiteApi,
    study: String,
}

impl Site {
    /// POSTs `body` as `token` with a fresh idempotency key; the created resource.
    async fn post(&self, token: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.api.post(token, path, body).await
    }

    async fn shipment(&self, site: &str, per_arm: usize, first_sequence: usize) -> anyhow::Result<Value> {
        let kits: Vec<Value> = ["PBO", "XAN_LO", "XAN_HI"]
            .iter()
            .enumerate()
            .flat_map(|(a, arm)| {
                (0..per_arm).map(move |i| {
                    let sequence = first_sequence + a * per_arm + i;
                    json!({"kit_number": format!("K{site}-{sequence:04}"), "sequence_number": sequence,
                           "kit_type": "TTS", "lot": "L1", "expiry_date": "2030-12-31", "arm_code": arm})
                })
            })
            .collect();
        let shipment = json!({"shipment_id": format!("SH-{site}-{first_sequence}"), "kits": kits});
        self.post("pharmacist-token", &format!("/{}/sites/{site}/shipments", self.study), &shipment).await
    }

    /// Screens, consents and requests enrollment; the subject id.
    async fn enroll(&self, site: &str, number: usize, age: i32, strata: Value) -> anyhow::Result<String> {
        let subject = format!("{site}-{number:04}");
        let screening = json!({"site_id": site, "screening_number": format!("SCR-{subject}"),
                               "subject_id": subject, "age_years": age, "sex": "M",
                               "criteria": {"INC01": true}});
        self.post("site-token", &format!("/{}/subjects", self.study), &screening).await?;
        let path = format!("/{}/subjects/{subject}", self.study);
        let consent = json!({"consent_version": "v1", "signed_at": "2026-11-20"});
        self.post("site-token", &format!("{path}/consent"), &consent).await?;
        self.post("site-token", &format!("{path}/enrollment-requests"), &json!({ "strata": strata })).await?;
        Ok(subject)
    }
}

async fn count(pool: &PgPool, schema: &SchemaName, condition: &str) -> anyhow::Result<i64> {
    let sql = format!("SELECT count(*) FROM {schema}.subject WHERE {condition}");
    Ok(sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(pool).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_enroll_subjects_through_the_api_and_a_shipment_releases_the_held_ones() -> anyhow::Result<()> {
    init_logs();
    let config = PipelineConfig::isolated("e2e", &database_url(), &kafka())?;
    let enrollment = config.schemas[enrollment::NAME].clone();
    let epro_schema = config.schemas[epro::NAME].clone();
    let shutdown = CancellationToken::new();
    let pipeline = Pipeline::start(config, &shutdown).await?;
    let site = Site { api: SiteApi::new(pipeline.site_api_addr()), study: "E2E".into() };

    let study = json!({
        "study_id": "E2E", "title": "End-to-end",
        "arms": [{"arm_code": "PBO", "name": "Placebo", "ratio": 1},
                 {"arm_code": "XAN_LO", "name": "Low dose", "ratio": 1},
                 {"arm_code": "XAN_HI", "name": "High dose", "ratio": 1}],
        "stratification_factors": [{"factor": "AGEGR", "values": ["<65", ">=65"]}],
        "eligibility": {"min_age_years": 50, "max_age_years": 89,
                        "criteria": [{"criterion_id": "INC01", "description": "Probable Alzheimer's disease"}]},
        "randomization": {"seed": 42, "block_multiples": [1, 2], "slots_per_stratum": 30, "warn_slots_left": 3},
        "kit_types": [{"kit_type": "TTS", "do_not_dispense_days": 14, "do_not_count_days": 7,
                       "low_stock_threshold": 1}],
        "enrollment_kit_type": "TTS"
    });
    site.post("admin-token", "", &study).await?;
    for id in ["701", "702"] {
        let body = json!({"site_id": id, "name": format!("Site {id}"), "time_zone": "America/New_York"});
        site.post("admin-token", "/E2E/sites", &body).await?;
    }
    site.shipment("701", 4, 1).await?;
    // Site 701 has stock, 702 has none yet; one subject too old, one without strata.
    for i in 0..12 {
        let (id, age) = if i % 2 == 0 { ("701", 60) } else { ("702", 70) };
        let group = if age < 65 { "<65" } else { ">=65" };
        site.enroll(id, i, age, json!({ "AGEGR": group })).await?;
    }
    site.enroll("701", 100, 95, json!({"AGEGR": ">=65"})).await?;
    site.enroll("701", 101, 60, json!({})).await?;

    let pool = PgPool::connect(&database_url()).await?;
    // Every subject decided (subjects are handled on several partitions, in any order).
    wait_until("701 enrolled, 702 on hold, 100 ineligible, 101 without strata", WAIT, || async {
        Ok(count(&pool, &enrollment, "status = 'enrolled'").await? == 6
            && count(&pool, &enrollment, "hold_reason_code = 'NO_KIT_AVAILABLE'").await? == 6
            && count(&pool, &enrollment, "subject_id = '701-0100' AND status = 'ineligible'").await? == 1
            && count(&pool, &enrollment, "hold_reason_code = 'STRATUM_MISSING'").await? == 1)
    })
    .await?;
    assert_eq!(count(&pool, &enrollment, "subject_id = '701-0100' AND status = 'ineligible'").await?, 1);
    assert_eq!(
        count(&pool, &enrollment, "subject_id = '701-0101' AND hold_reason_code = 'STRATUM_MISSING'").await?,
        1
    );

    site.shipment("702", 4, 100).await?;
    wait_until("every eligible subject enrolled", WAIT, || async {
        Ok(count(&pool, &enrollment, "status = 'enrolled'").await? == 12)
    })
    .await?;
    let numbers = count(&pool, &enrollment, "randomization_number IS NOT NULL").await?;
    assert_eq!(numbers, 12, "held subjects kept their randomization; nobody else was randomized");

    // A blinded caller sees the kits of a site without their treatment.
    let kits: Value = site
        .api
        .http
        .get(format!("{}/v1/studies/E2E/sites/702/kits", site.api.base))
        .bearer_auth("site-token")
        .send()
        .await?
        .json()
        .await?;
    assert!(!kits.to_string().contains("arm_code"), "{kits}");

    // The audit trails of every service, through the site API: the pipeline gave it the other
    // services' schemas. Unblinded, the randomizations carry their arms; blinded, no arm at all.
    let audit = |token: &'static str, query: String| {
        let http = site.api.http.clone();
        let url = format!("{}/v1/audit?study_id=E2E&limit=500{query}", site.api.base);
        async move { anyhow::Ok(http.get(url).bearer_auth(token).send().await?.text().await?) }
    };
    let full = audit("admin-token", String::new()).await?;
    let page: Value = serde_json::from_str(&full)?;
    let records = page["records"].as_array().cloned().unwrap_or_default();
    let by = |source: &str, action: &str| {
        records.iter().filter(|r| r["source"] == source && r["action"] == action).count()
    };
    assert_eq!(
        (by("enrollment", "subject.randomized"), by("kit-allocation", "kit.dispensed")),
        (12, 12),
        "{full}"
    );
    assert_eq!(by("site-api", "subject.screened"), 14);
    assert!(full.contains("XAN_HI") || full.contains("XAN_LO"), "{full}");
    let mut blinded = String::new();
    let mut cursor = String::new();
    loop {
        let text = audit("researcher-token", cursor.clone()).await?;
        let page: Value = serde_json::from_str(&text)?;
        blinded.push_str(&text);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    for arm in ["PBO", "XAN_LO", "XAN_HI", "Placebo", "arm_code"] {
        assert!(!blinded.contains(arm), "{arm} reached a blinded role");
    }
    assert!(blinded.contains("subject.randomized") && blinded.contains("randomization_number"));

    // An enrolled subject's app sends a PHQ-9 through the ingestion gateway; it is validated.
    let submission = phq9_submission("701-0000");
    let response = site
        .api
        .http
        .post(format!("http://{}/v1/submissions", pipeline.epro_gateway_addr()))
        .bearer_auth("app-token")
        .json(&serde_json::to_value(&submission)?)
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::ACCEPTED, "{}", response.text().await?);
    let accepted = format!(
        "SELECT count(*) FROM {}.response WHERE submission_id = '{}' AND total_score = 9",
        epro_schema, submission.submission_id
    );
    wait_until("the submission accepted", WAIT, || async {
        Ok(sqlx::query_scalar::<_, i64>(AssertSqlSafe(accepted.as_str())).fetch_one(&pool).await? == 1)
    })
    .await?;
    shutdown.cancel();
    pipeline.wait().await
}

fn phq9_submission(subject: &str) -> trialflow_schemas::QuestionnaireResponseSubmitted {
    use trialflow_schemas::{Answer, Envelope, QuestionnaireResponseSubmitted, ResponseStatus, Timestamp};
    let items =
        ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8"];
    let answer = |link_id: &str| Answer::integer(link_id, 1);
    let mut answers: Vec<Answer> = items.iter().map(|l| answer(l)).collect();
    answers.push(answer("69722-7"));
    let authored = Timestamp::now();
    let mut envelope = Envelope::new("QuestionnaireResponseSubmitted", "E2E", "epro-app", authored);
    envelope.subject_id = Some(subject.into());
    QuestionnaireResponseSubmitted {
        envelope,
        submission_id: uuid::Uuid::new_v4(),
        questionnaire: "PHQ-9".into(),
        questionnaire_version: "1.0".into(),
        scheduled_occurrence: None,
        status: ResponseStatus::Completed,
        authored_at: authored,
        device_time_zone: "America/New_York".into(),
        items: answers,
    }
}
