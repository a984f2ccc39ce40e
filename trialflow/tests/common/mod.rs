//! What several test binaries share: request bodies of the three front doors, a real process.

#[allow(dead_code, reason = "not every test binary runs the binary")]
pub(crate) mod process;

use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, PgPool};
use trialflow_outbox::SchemaName;
use trialflow_schemas::{Answer, Envelope, Event, QuestionnaireResponseSubmitted, ResponseStatus, Timestamp};
use uuid::Uuid;

/// A valid `POST /v1/studies` body: two arms, one stratification factor, one criterion, one kit type.
#[allow(dead_code, reason = "not every test binary sets up a study this way")]
pub(crate) fn study(study_id: &str) -> Value {
    json!({
        "study_id": study_id,
        "title": "Front-door test",
        "arms": [{"arm_code": "PBO", "name": "Placebo", "ratio": 1}, {"arm_code": "ACT", "name": "Active", "ratio": 1}],
        "stratification_factors": [{"factor": "AGEGR", "values": ["<65", ">=65"]}],
        "eligibility": {"criteria": [{"criterion_id": "INC01", "description": "Adult"}]},
        "randomization": {"seed": 7, "block_multiples": [1], "slots_per_stratum": 50, "warn_slots_left": 5},
        "kit_types": [{"kit_type": "TTS", "do_not_dispense_days": 0, "do_not_count_days": 0, "low_stock_threshold": 1}],
        "enrollment_kit_type": "TTS"
    })
}

/// A valid PHQ-9 submission of subject 701-0001 in `study_id`, with fresh ids.
#[allow(dead_code, reason = "not every test binary submits")]
pub(crate) fn submission(study_id: &str) -> QuestionnaireResponseSubmitted {
    let now = Timestamp::now();
    let mut envelope = Envelope::new(QuestionnaireResponseSubmitted::NAME, study_id, "epro-app", now);
    envelope.subject_id = Some("701-0001".into());
    QuestionnaireResponseSubmitted {
        envelope,
        submission_id: Uuid::new_v4(),
        questionnaire: "PHQ-9".into(),
        questionnaire_version: "1.0".into(),
        scheduled_occurrence: None,
        status: ResponseStatus::Completed,
        authored_at: now,
        device_time_zone: "America/New_York".into(),
        items: vec![Answer::integer("44250-9", 1), Answer::integer("44255-8", 0)],
    }
}

/// Gives subject `subject_id` of `study_id` treatment `ACT` with randomization number `R<number>`
/// in the enrollment records of `schema`, as the enrollment service would — for the code break,
/// which reads them, where no enrollment consumer runs.
#[allow(dead_code, reason = "not every test binary breaks a code")]
pub(crate) async fn randomize(
    pool: &PgPool,
    schema: &SchemaName,
    (study_id, subject_id): (&str, &str),
    number: i32,
) -> anyhow::Result<()> {
    let s = schema;
    let study = format!(
        "INSERT INTO {s}.study (study_id, config_version, arms, factors, seed, block_multiples,
                                slots_per_stratum, warn_slots_left)
         VALUES ($1, 1, '[[\"PBO\", 1], [\"ACT\", 1]]', '[]', 7, '{{1}}', 100000, 5)
         ON CONFLICT DO NOTHING"
    );
    let list = format!(
        "INSERT INTO {s}.randomization_list (study_id, stratum, list_id, ordinal, slots_total)
         VALUES ($1, '', $1 || '-L1', 1, 100000) ON CONFLICT DO NOTHING"
    );
    for sql in [study, list] {
        sqlx::query(AssertSqlSafe(sql)).bind(study_id).execute(pool).await?;
    }
    let slot = format!(
        "INSERT INTO {s}.randomization_slot (study_id, stratum, sequence, block, arm_code,
                                            randomization_number, subject_id, used_at)
         VALUES ($1, '', $2, 1, 'ACT', $3, $4, now())"
    );
    sqlx::query(AssertSqlSafe(slot))
        .bind(study_id)
        .bind(number)
        .bind(format!("R{number:05}"))
        .bind(subject_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// A site API on a free port for the HTTP tests: static `tokens` and `idp`'s tokens, its code
/// break reading the randomization records of `enrollment_schema`, its data queries those of the
/// risk schema `risk_schema`, no rate limits.
#[allow(dead_code, reason = "not every test binary serves the site API")]
pub(crate) async fn site_api(
    database_url: &str,
    schema: SchemaName,
    enrollment_schema: SchemaName,
    risk_schema: SchemaName,
    tokens: Vec<trialflow_http::auth::TokenGrant>,
    idp: &trialflow_testkit::idp::TestIdp,
    topics: &trialflow_schemas::topics::TopicNames,
) -> anyhow::Result<trialflow_producers::site_api::SiteApi> {
    use trialflow_producers::site_api::{self, SiteApi, SiteApiConfig};
    let links = site_api::Links {
        audit_sources: Vec::new(),
        treatments: Some(std::sync::Arc::new(trialflow_pipeline::services::EnrollmentTreatments(
            enrollment_schema,
        ))),
        queries: Some(risk_schema),
    };
    let config = SiteApiConfig {
        listen: "127.0.0.1:0".parse()?,
        database_url: database_url.to_string(),
        schema,
        tokens,
        oidc: Some(trialflow_http::oidc::OidcSettings::new(&idp.issuer, &idp.audience, &idp.jwks_url)),
        topics: topics.clone(),
        max_connections: 4,
        max_future_skew_secs: trialflow_http::input::DEFAULT_MAX_FUTURE_SKEW_SECS,
        code_break_max_auth_age_secs: site_api::code_break::DEFAULT_MAX_AUTH_AGE_SECS,
        limits: trialflow_http::limits::Limits::unthrottled(),
    };
    Ok(SiteApi::bind_linked(config, links).await?)
}

/// A data query of subject `subject` (`(study, site, subject)`) in `status` (`open` or
/// `answered`), as the risk service's edit checks open it and its consumer applies an answer.
#[allow(dead_code, reason = "not every test binary answers queries")]
pub(crate) async fn seed_query(
    pool: &PgPool,
    risk_schema: &SchemaName,
    query_id: uuid::Uuid,
    (study_id, site_id, subject_id): (&str, &str, &str),
    status: &str,
) -> anyhow::Result<()> {
    let s = risk_schema;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.query (query_id, study_id, site_id, subject_id, check_id, check_kind, item,
                                data_event_ids, value, message, status, opened_at, answered_at,
                                answered_by, answer)
         VALUES ($1, $2, $3, $4, 'SYSBP_RANGE', 'range', 'VitalSignRecorded/8480-6', ARRAY[gen_random_uuid()],
                 '400 mm[Hg]', 'Systolic blood pressure 400 mm[Hg] is outside 60 to 250 mm[Hg]', $5, now(),
                 CASE WHEN $5 = 'answered' THEN now() END, CASE WHEN $5 = 'answered' THEN 'sam' END,
                 CASE WHEN $5 = 'answered' THEN 'Transcription error; corrected.' END)"
    )))
    .bind(query_id)
    .bind(study_id)
    .bind(site_id)
    .bind(subject_id)
    .bind(status)
    .execute(pool)
    .await?;
    Ok(())
}
