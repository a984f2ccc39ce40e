//! The enrollment consumer's SQL. Every function runs inside the handler's transaction.

use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgConnection, Row};
use trialflow_outbox::SchemaName;
use trialflow_schemas::{StratificationFactor, StudyConfigured};

use super::gates::{self, Stratum, SubjectFacts};
use super::randomization::{self, Arm, ListSpec};
use crate::error::HandlerError;

/// What the consumer keeps of a study's configuration.
#[derive(Debug, Clone)]
pub(crate) struct StudySettings {
    pub(crate) factors: Vec<StratificationFactor>,
    pub(crate) warn_slots_left: u32,
}

/// The saga state of a subject.
#[derive(Debug, Clone)]
pub(crate) struct SubjectRow {
    pub(crate) status: String,
    pub(crate) facts: SubjectFacts,
    pub(crate) randomization_number: Option<String>,
}

/// A slot just taken.
#[derive(Debug, Clone)]
pub(crate) struct TakenSlot {
    pub(crate) list_id: String,
    pub(crate) randomization_number: String,
    pub(crate) arm_code: String,
    /// Slots after this one in list order (slots are taken in that order, but for ones in flight).
    pub(crate) slots_left: u32,
    pub(crate) slots_total: u32,
}

fn list_spec(e: &StudyConfigured) -> Result<ListSpec, HandlerError> {
    let positive = |v: i32, what: &str| {
        u32::try_from(v).map_err(|_| HandlerError::permanent(format!("{what} is negative: {v}")))
    };
    let arms = e
        .arms
        .iter()
        .map(|a| Ok(Arm { code: a.arm_code.clone(), ratio: positive(a.ratio, "arm ratio")? }))
        .collect::<Result<Vec<_>, HandlerError>>()?;
    let block_multiples = e
        .randomization
        .block_multiples
        .iter()
        .map(|m| positive(*m, "block multiple"))
        .collect::<Result<Vec<_>, _>>()?;
    let spec = ListSpec {
        seed: e.randomization.seed as u64,
        arms,
        block_multiples,
        slots_per_stratum: positive(e.randomization.slots_per_stratum, "slots_per_stratum")?,
    };
    spec.validate()
        .map_err(|err| HandlerError::permanent(format!("study {}: {err}", e.envelope.study_id)))?;
    Ok(spec)
}

/// Stores a study's settings and generates the list of every stratum that has none yet (a list
/// in use is never regenerated). Returns the lists created, or `None` if a newer version is stored.
pub(crate) async fn configure_study(
    conn: &mut PgConnection,
    schema: &SchemaName,
    e: &StudyConfigured,
) -> Result<Option<Vec<(Stratum, u32)>>, HandlerError> {
    let spec = list_spec(e)?;
    let study_id = &e.envelope.study_id;
    let r = &e.randomization;
    let sql = format!(
        "INSERT INTO {schema}.study (study_id, config_version, arms, factors, seed, block_multiples,
                                     slots_per_stratum, warn_slots_left)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (study_id) DO UPDATE SET config_version = excluded.config_version,
             arms = excluded.arms, factors = excluded.factors, seed = excluded.seed,
             block_multiples = excluded.block_multiples, slots_per_stratum = excluded.slots_per_stratum,
             warn_slots_left = excluded.warn_slots_left
         WHERE study.config_version < excluded.config_version"
    );
    let factors: Vec<(String, Vec<String>)> =
        e.stratification_factors.iter().map(|f| (f.factor.clone(), f.values.clone())).collect();
    let arms: Vec<(String, i32)> = e.arms.iter().map(|a| (a.arm_code.clone(), a.ratio)).collect();
    let done = sqlx::query(AssertSqlSafe(sql))
        .bind(study_id)
        .bind(e.config_version)
        .bind(Json(&arms))
        .bind(Json(&factors))
        .bind(r.seed)
        .bind(&r.block_multiples)
        .bind(r.slots_per_stratum)
        .bind(r.warn_slots_left.max(0))
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 0 {
        return Ok(None);
    }
    let mut created = Vec::new();
    for stratum in gates::all_strata(&e.stratification_factors) {
        let slots = randomization::generate(&spec, &stratum.key)
            .map_err(|err| HandlerError::permanent(format!("study {study_id}: {err}")))?;
        let sql = format!(
            "INSERT INTO {schema}.randomization_list (study_id, stratum, list_id, ordinal, slots_total)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING"
        );
        let list = sqlx::query(AssertSqlSafe(sql))
            .bind(study_id)
            .bind(&stratum.key)
            .bind(format!("{study_id}/{}", stratum.key))
            .bind(stratum.ordinal as i32)
            .bind(slots.len() as i32)
            .execute(&mut *conn)
            .await?;
        if list.rows_affected() == 0 {
            continue;
        }
        let sql = format!(
            "INSERT INTO {schema}.randomization_slot
                 (study_id, stratum, sequence, block, arm_code, randomization_number)
             SELECT $1, $2, s.sequence, s.block, s.arm_code, s.number
             FROM unnest($3::int[], $4::int[], $5::text[], $6::text[]) AS s(sequence, block, arm_code, number)"
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(study_id)
            .bind(&stratum.key)
            .bind(slots.iter().map(|s| s.sequence as i32).collect::<Vec<_>>())
            .bind(slots.iter().map(|s| s.block as i32).collect::<Vec<_>>())
            .bind(slots.iter().map(|s| s.arm.as_str()).collect::<Vec<_>>())
            .bind(
                slots
                    .iter()
                    .map(|s| gates::randomization_number(stratum.ordinal, s.sequence))
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *conn)
            .await?;
        let total = slots.len() as u32;
        created.push((stratum, total));
    }
    Ok(Some(created))
}

pub(crate) async fn study(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
) -> Result<Option<StudySettings>, HandlerError> {
    let sql = format!("SELECT factors, warn_slots_left FROM {schema}.study WHERE study_id = $1");
    let Some(row) = sqlx::query(AssertSqlSafe(sql)).bind(study_id).fetch_optional(&mut *conn).await? else {
        return Ok(None);
    };
    let Json(factors): Json<Vec<(String, Vec<String>)>> = row.try_get(0)?;
    let warn: i32 = row.try_get(1)?;
    Ok(Some(StudySettings {
        factors: factors
            .into_iter()
            .map(|(factor, values)| StratificationFactor { factor, values })
            .collect(),
        warn_slots_left: warn.max(0) as u32,
    }))
}

/// A screened subject enters the saga (a repeated screening event changes nothing).
pub(crate) async fn add_subject(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    subject_id: &str,
    site_id: Option<&str>,
) -> Result<(), HandlerError> {
    let sql = format!(
        "INSERT INTO {schema}.subject (study_id, subject_id, site_id, status) VALUES ($1, $2, $3, 'screened')
         ON CONFLICT DO NOTHING"
    );
    sqlx::query(AssertSqlSafe(sql)).bind(study_id).bind(subject_id).bind(site_id).execute(&mut *conn).await?;
    Ok(())
}

/// The subject, locked until the transaction ends.
pub(crate) async fn subject(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    subject_id: &str,
) -> Result<Option<SubjectRow>, HandlerError> {
    let sql = format!(
        "SELECT status, consent_version, eligible, eligibility_detail, randomization_number
         FROM {schema}.subject WHERE study_id = $1 AND subject_id = $2 FOR UPDATE"
    );
    let Some(row) =
        sqlx::query(AssertSqlSafe(sql)).bind(study_id).bind(subject_id).fetch_optional(&mut *conn).await?
    else {
        return Ok(None);
    };
    let status: String = row.try_get(0)?;
    Ok(Some(SubjectRow {
        facts: SubjectFacts {
            consent_version: row.try_get(1)?,
            eligible: row.try_get(2)?,
            eligibility_detail: row.try_get(3)?,
            withdrawn: status == "withdrawn",
        },
        status,
        randomization_number: row.try_get(4)?,
    }))
}

/// Sets one column group of the subject. `set` is a fixed SQL fragment with parameters from $3.
pub(crate) async fn update_subject(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    subject_id: &str,
    set: &'static str,
    values: &[Option<&str>],
) -> Result<(), HandlerError> {
    let sql = format!(
        "UPDATE {schema}.subject SET {set}, updated_at = now() WHERE study_id = $1 AND subject_id = $2"
    );
    let mut query = sqlx::query(AssertSqlSafe(sql)).bind(study_id).bind(subject_id);
    for v in values {
        query = query.bind(*v);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

pub(crate) async fn set_eligibility(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    subject_id: &str,
    eligible: bool,
    detail: Option<&str>,
) -> Result<(), HandlerError> {
    let sql = format!(
        "UPDATE {schema}.subject SET eligible = $3, eligibility_detail = $4,
             status = CASE WHEN status IN ('screened', 'ineligible')
                           THEN CASE WHEN $3 THEN 'screened' ELSE 'ineligible' END ELSE status END,
             updated_at = now()
         WHERE study_id = $1 AND subject_id = $2"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(study_id)
        .bind(subject_id)
        .bind(eligible)
        .bind(detail)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Takes the free slot of the stratum's list with the lowest sequence for the subject, or `None`
/// when the list is used up.
///
/// The slot's row lock is the only lock: a slot being taken by a concurrent randomization is
/// passed over (`SKIP LOCKED`), so randomizations in one stratum never wait for each other and a
/// number is never given twice (the row is taken by one transaction; `subject_id IS NULL` is
/// checked again on the locked row). A rolled-back transaction gives its slot back, and the next
/// randomization takes it: slots are used densely, in list order up to the ones in flight.
pub(crate) async fn take_slot(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    stratum: &str,
    subject_id: &str,
) -> Result<Option<TakenSlot>, HandlerError> {
    let sql = format!(
        "UPDATE {schema}.randomization_slot s SET subject_id = $3, used_at = now()
         FROM {schema}.randomization_list l
         WHERE (s.study_id, s.stratum, s.sequence) = (
                   SELECT study_id, stratum, sequence FROM {schema}.randomization_slot
                   WHERE study_id = $1 AND stratum = $2 AND subject_id IS NULL
                   ORDER BY sequence LIMIT 1 FOR UPDATE SKIP LOCKED)
           AND (l.study_id, l.stratum) = (s.study_id, s.stratum)
         RETURNING l.list_id, s.sequence, l.slots_total, s.randomization_number, s.arm_code"
    );
    let Some(row) = sqlx::query(AssertSqlSafe(sql))
        .bind(study_id)
        .bind(stratum)
        .bind(subject_id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let (sequence, total): (i32, i32) = (row.try_get(1)?, row.try_get(2)?);
    Ok(Some(TakenSlot {
        list_id: row.try_get(0)?,
        randomization_number: row.try_get(3)?,
        arm_code: row.try_get(4)?,
        slots_left: (total - sequence).max(0) as u32,
        slots_total: total.max(0) as u32,
    }))
}

/// Free slots per stratum of a study, for the gauge.
pub(crate) async fn slots_left(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
) -> Result<Vec<(String, i64)>, HandlerError> {
    let sql = format!(
        "SELECT l.stratum, count(s.sequence) FROM {schema}.randomization_list l
         LEFT JOIN {schema}.randomization_slot s
                ON (s.study_id, s.stratum) = (l.study_id, l.stratum) AND s.subject_id IS NULL
         WHERE l.study_id = $1 GROUP BY l.stratum, l.ordinal ORDER BY l.ordinal"
    );
    Ok(sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(&mut *conn).await?)
}
