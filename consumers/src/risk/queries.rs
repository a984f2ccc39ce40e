//! Data queries: the inputs the edit checks judge, the checks' runs, and each query's life.
//!
//! * The consumer stores every vital-sign reading and adverse-event report and, in the same
//!   statement, marks each new one due for checking ([`store_inputs`]); a consent or a withdrawal
//!   marks its whole subject due ([`mark_subjects`]).
//! * The evaluator takes the due subjects of a study, runs the study's edit checks on each
//!   subject's data ([`super::checks::run`]) and opens a query per finding: a `query` row, an audit
//!   record and a `QueryOpened` on `risk.queries.v1`, in its transaction ([`open_queries`]).
//!   Query ids derive from the study, the check and the data, so a finding made again (a replay,
//!   another run after more data) opens nothing.
//! * Site staff answer a query through the site API (`QueryAnswered`), researchers close it
//!   through the alert API (`QueryClosed`); the consumer applies both ([`apply`]):
//!   open → answered → closed. An answer to a query closed meanwhile, or a closing of a query no
//!   one answered, is kept in `query_history` as not applied.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Row, Transaction};
use trialflow_outbox::audit::{self, AuditRecord};
use trialflow_outbox::{Outbox, OutboxEvent, SchemaName};
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{
    AdverseEventReported, DateTimePrecision, Envelope, Event, PartialDateTime, QueryAnswered, QueryClosed,
    QueryOpened, Timestamp, VitalSignRecorded,
};
use uuid::Uuid;

use super::checks::{self, AeReport, EditCheck, Finding, Reach, Reading, SourceDate, SubjectData};
use crate::error::HandlerError;

/// A partial date as the checks see it.
pub fn source_date(date: &PartialDateTime) -> SourceDate {
    use DateTimePrecision as P;
    SourceDate {
        earliest: date.earliest.and_then(|t| t.to_datetime()),
        to_the_day: matches!(date.precision, P::Day | P::Hour | P::Minute | P::Second),
    }
}

fn instant(t: Timestamp, what: &str) -> Result<DateTime<Utc>, HandlerError> {
    t.to_datetime().ok_or_else(|| HandlerError::permanent(format!("{what} out of range")))
}

/// The batch's inputs, stored in one statement per kind (a duplicate changes nothing).
#[derive(Debug, Default)]
pub(crate) struct Inputs<'a> {
    pub readings: Vec<&'a VitalSignRecorded>,
    pub adverse_events: Vec<&'a AdverseEventReported>,
}

/// What follows a statement that stored inputs (`new`: study, subject, event, clinical day,
/// recording time): a mark per new input, due for the edit checks (appended, never in conflict
/// with another mark, so a batch never waits for the evaluator, see `0004_append_only_marks.sql`),
/// and the inputs counted in `input_count`, keys in order; returns a study per row counted.
fn mark_and_count_new(schema: &SchemaName) -> String {
    format!(
        "marked AS (
             INSERT INTO {schema}.check_due (study_id, subject_id, event_id)
             SELECT study_id, subject_id, event_id FROM new
         )
         INSERT INTO {schema}.input_count AS t (study_id, subject_id, dated, lag, n)
         SELECT study_id, subject_id, on_day IS NOT NULL,
                coalesce((recorded_at AT TIME ZONE 'UTC')::date - on_day, 0), count(*)
         FROM new GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
         ON CONFLICT (study_id, subject_id, dated, lag) DO UPDATE SET n = t.n + excluded.n
         RETURNING study_id"
    )
}

/// Stores the batch's readings and adverse-event reports, marks and counts the new ones (a
/// duplicate changes nothing); the studies with new inputs (their input KRIs changed). Inputs whose times
/// are out of range or lack a subject are left out (`handle` dead-letters them).
pub(crate) async fn store_inputs(
    conn: &mut PgConnection,
    schema: &SchemaName,
    inputs: &Inputs<'_>,
) -> Result<BTreeSet<String>, HandlerError> {
    let mut changed = BTreeSet::new();
    if !inputs.readings.is_empty() {
        let mut rows: Vec<(&VitalSignRecorded, DateTime<Utc>, DateTime<Utc>, SourceDate)> = Vec::new();
        for r in &inputs.readings {
            let (Ok(occurred), Ok(recorded)) = (
                instant(r.envelope.occurred_at, "occurred_at"),
                instant(r.envelope.recorded_at, "recorded_at"),
            ) else {
                continue;
            };
            if r.envelope.subject_id.is_some() {
                rows.push((r, occurred, recorded, source_date(&r.effective)));
            }
        }
        rows.sort_by_key(|(r, ..)| {
            (r.envelope.study_id.clone(), r.envelope.subject_id.clone(), r.envelope.event_id)
        });
        let sql = format!(
            "WITH new AS (
                 INSERT INTO {schema}.reading (study_id, subject_id, event_id, site_id, code, name, value, unit,
                     position, visit, effective_at, effective_on, occurred_at, recorded_at)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                     $7::float8[], $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::date[],
                     $13::timestamptz[], $14::timestamptz[])
                 ON CONFLICT DO NOTHING
                 RETURNING study_id, subject_id, event_id, effective_on AS on_day, recorded_at
             ), {}",
            mark_and_count_new(schema)
        );
        let col = |f: fn(&VitalSignRecorded) -> Option<String>| -> Vec<Option<String>> {
            rows.iter().map(|(r, ..)| f(r)).collect()
        };
        let studies: Vec<String> = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(col(|r| Some(r.envelope.study_id.clone())))
            .bind(col(|r| r.envelope.subject_id.clone()))
            .bind(rows.iter().map(|(r, ..)| r.envelope.event_id).collect::<Vec<Uuid>>())
            .bind(col(|r| r.envelope.site_id.clone()))
            .bind(col(|r| Some(r.loinc_code.clone())))
            .bind(col(|r| Some(vital_name(&r.loinc_code).to_string())))
            .bind(rows.iter().map(|(r, ..)| r.value).collect::<Vec<f64>>())
            .bind(col(|r| Some(r.unit.clone())))
            .bind(col(|r| r.position.clone()))
            .bind(col(|r| r.visit.clone()))
            .bind(rows.iter().map(|(.., d)| d.earliest).collect::<Vec<_>>())
            .bind(rows.iter().map(|(.., d)| day_of(d)).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, o, ..)| *o).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, _, r, _)| *r).collect::<Vec<_>>())
            .fetch_all(&mut *conn)
            .await?;
        changed.extend(studies);
    }
    if !inputs.adverse_events.is_empty() {
        let mut rows: Vec<(&AdverseEventReported, DateTime<Utc>, DateTime<Utc>, SourceDate)> = Vec::new();
        for a in &inputs.adverse_events {
            let (Ok(occurred), Ok(recorded)) = (
                instant(a.envelope.occurred_at, "occurred_at"),
                instant(a.envelope.recorded_at, "recorded_at"),
            ) else {
                continue;
            };
            if a.envelope.subject_id.is_some() {
                rows.push((a, occurred, recorded, source_date(&a.onset)));
            }
        }
        rows.sort_by_key(|(a, ..)| {
            (a.envelope.study_id.clone(), a.envelope.subject_id.clone(), a.envelope.event_id)
        });
        let sql = format!(
            "WITH new AS (
                 INSERT INTO {schema}.ae_report (study_id, subject_id, event_id, site_id, ae_id, term, onset_at,
                     onset_on, occurred_at, recorded_at)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                     $7::timestamptz[], $8::date[], $9::timestamptz[], $10::timestamptz[])
                 ON CONFLICT DO NOTHING
                 RETURNING study_id, subject_id, event_id, onset_on AS on_day, recorded_at
             ), {}",
            mark_and_count_new(schema)
        );
        let col = |f: fn(&AdverseEventReported) -> Option<String>| -> Vec<Option<String>> {
            rows.iter().map(|(a, ..)| f(a)).collect()
        };
        let studies: Vec<String> = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(col(|a| Some(a.envelope.study_id.clone())))
            .bind(col(|a| a.envelope.subject_id.clone()))
            .bind(rows.iter().map(|(a, ..)| a.envelope.event_id).collect::<Vec<Uuid>>())
            .bind(col(|a| a.envelope.site_id.clone()))
            .bind(col(|a| Some(a.ae_id.clone())))
            .bind(col(|a| Some(a.term.clone())))
            .bind(rows.iter().map(|(.., d)| d.earliest).collect::<Vec<_>>())
            .bind(rows.iter().map(|(.., d)| day_of(d)).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, o, ..)| *o).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, _, r, _)| *r).collect::<Vec<_>>())
            .fetch_all(&mut *conn)
            .await?;
        changed.extend(studies);
    }
    Ok(changed)
}

fn day_of(date: &SourceDate) -> Option<NaiveDate> {
    date.earliest.filter(|_| date.to_the_day).map(|t| t.date_naive())
}

/// The name of a vital sign for query messages (its LOINC code when unknown).
fn vital_name(code: &str) -> &str {
    match code {
        "8480-6" => "Systolic blood pressure",
        "8462-4" => "Diastolic blood pressure",
        "8867-4" => "Heart rate",
        "8310-5" => "Body temperature",
        "29463-7" => "Body weight",
        "9279-1" => "Respiratory rate",
        "59408-5" => "Oxygen saturation",
        other => other,
    }
}

/// Marks whole subjects (study, subject) due for the edit checks: a consent or a withdrawal changed
/// the dates the checks compare all of their data with. Appended like the marks of new inputs.
pub(crate) async fn mark_subjects(
    conn: &mut PgConnection,
    schema: &SchemaName,
    subjects: &BTreeSet<(String, String)>,
) -> Result<(), HandlerError> {
    if subjects.is_empty() {
        return Ok(());
    }
    let studies: Vec<&str> = subjects.iter().map(|m| m.0.as_str()).collect();
    let ids: Vec<&str> = subjects.iter().map(|m| m.1.as_str()).collect();
    let sql = format!(
        "INSERT INTO {schema}.check_due (study_id, subject_id) SELECT * FROM unnest($1::text[], $2::text[])"
    );
    sqlx::query(AssertSqlSafe(sql)).bind(studies).bind(ids).execute(&mut *conn).await?;
    Ok(())
}

/// What is due of one subject: its new data points, or all of its data.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Due {
    pub whole: bool,
    pub events: BTreeSet<Uuid>,
}

/// Takes the committed marks (a mark committed later is taken at the next pass, and the data
/// it stands for committed with it): by study, what is due of each subject.
pub(crate) async fn take_due(
    conn: &mut PgConnection,
    schema: &SchemaName,
) -> Result<BTreeMap<String, BTreeMap<String, Due>>, sqlx::Error> {
    let sql = format!("DELETE FROM {schema}.check_due RETURNING study_id, subject_id, event_id");
    let rows: Vec<(String, String, Option<Uuid>)> =
        sqlx::query_as(AssertSqlSafe(sql)).fetch_all(&mut *conn).await?;
    let mut due: BTreeMap<String, BTreeMap<String, Due>> = BTreeMap::new();
    for (study, subject, event) in rows {
        let d = due.entry(study).or_default().entry(subject).or_default();
        match event {
            Some(id) => {
                d.events.insert(id);
            }
            None => d.whole = true,
        }
    }
    Ok(due)
}

/// A query opened at an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenedQuery {
    pub query_id: Uuid,
    pub study_id: String,
    pub site_id: Option<String>,
    pub subject_id: String,
    pub finding: Finding,
}

impl OpenedQuery {
    pub fn event(&self) -> QueryOpened {
        let mut envelope = Envelope::new(QueryOpened::NAME, &self.study_id, super::NAME, Timestamp::now());
        envelope.site_id = self.site_id.clone();
        envelope.subject_id = Some(self.subject_id.clone());
        envelope.actor = Some(super::NAME.to_string());
        envelope.causation_id = self.finding.data_event_ids.first().copied();
        QueryOpened {
            envelope,
            query_id: self.query_id,
            check_id: self.finding.check_id.clone(),
            check_kind: self.finding.check_kind.to_string(),
            item: self.finding.item.clone(),
            data_event_ids: self.finding.data_event_ids.iter().map(Uuid::to_string).collect(),
            value: self.finding.value.clone(),
            message: self.finding.message.clone(),
        }
    }
}

/// Runs `checks` on what is due of the subjects of `study_id` and opens a query per new finding
/// (rows, audit records and events in `tx`). A subject due for its new data points is judged on
/// them and on what the checks compare them with ([`Reach`]), not on its whole history: a
/// finding among older data was found when that data was new, or when a consent or a withdrawal
/// had the whole subject checked again.
pub(crate) async fn open_queries(
    tx: &mut Transaction<'static, Postgres>,
    outbox: &Outbox,
    topics: &TopicNames,
    study_id: &str,
    due: &BTreeMap<String, Due>,
    checks: &[EditCheck],
) -> Result<Checked, super::evaluate::EvaluateError> {
    let schema = outbox.schema();
    let conn: &mut PgConnection = tx;
    if due.is_empty() || checks.is_empty() {
        return Ok(Checked::default());
    }
    let (subjects, inputs_read) = load(conn, schema, study_id, due, &Reach::of(checks)).await?;
    let mut opened = Vec::new();
    for (subject_id, (site_id, data)) in &subjects {
        for finding in checks::run(checks, data) {
            opened.push(OpenedQuery {
                query_id: finding.query_id(study_id),
                study_id: study_id.to_string(),
                site_id: site_id.clone(),
                subject_id: subject_id.clone(),
                finding,
            });
        }
    }
    if opened.is_empty() {
        return Ok(Checked { opened, inputs_read });
    }
    let sql = format!(
        "INSERT INTO {schema}.query (query_id, study_id, site_id, subject_id, check_id, check_kind, item,
             data_event_ids, value, message, opened_at)
         SELECT q.*, now() FROM jsonb_to_recordset($1) AS q(query_id uuid, study_id text, site_id text,
             subject_id text, check_id text, check_kind text, item text, data_event_ids uuid[], value text,
             message text)
         ON CONFLICT (query_id) DO NOTHING
         RETURNING query_id"
    );
    let rows: Vec<Value> = opened
        .iter()
        .map(|q| {
            serde_json::json!({
                "query_id": q.query_id, "study_id": q.study_id, "site_id": q.site_id, "subject_id": q.subject_id,
                "check_id": q.finding.check_id, "check_kind": q.finding.check_kind, "item": q.finding.item,
                "data_event_ids": q.finding.data_event_ids, "value": q.finding.value, "message": q.finding.message,
            })
        })
        .collect();
    let new: std::collections::BTreeSet<Uuid> = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(Value::Array(rows))
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    opened.retain(|q| new.contains(&q.query_id));
    let mut records = Vec::with_capacity(opened.len());
    for q in &opened {
        let row = OutboxEvent::avro(&q.event(), topics.of::<QueryOpened>(), q.query_id.to_string())?;
        outbox.enqueue(tx, row).await?;
        records.push(
            AuditRecord::by_system(super::NAME, "query.opened", "query", q.query_id.to_string())
                .study(study_id)
                .site(q.site_id.clone())
                .change("status", Value::Null, "open")
                .change("check", Value::Null, q.finding.check_id.clone())
                .change("message", Value::Null, q.finding.message.clone())
                .cause(format!("event:{}", q.finding.data_event_ids.first().copied().unwrap_or_default())),
        );
    }
    audit::append(tx, schema, &records).await?;
    Ok(Checked { opened, inputs_read })
}

/// What one run of a study's edit checks did.
#[derive(Debug, Default)]
pub(crate) struct Checked {
    /// The queries it opened.
    pub opened: Vec<OpenedQuery>,
    /// How many readings and adverse-event reports it read.
    pub inputs_read: usize,
}

/// Read by every statement of [`load`] (the reading as `r`), in the order [`reading_of`] takes.
const READING: &str = "r.subject_id, r.site_id, r.event_id, r.code, r.name, r.value, r.unit, r.position,
    r.visit, r.effective_at, r.effective_on, r.recorded_at";

fn reading_of(r: &PgRow) -> Result<(String, Option<String>, Reading), sqlx::Error> {
    let on: Option<NaiveDate> = r.try_get(10)?;
    let reading = Reading {
        event_id: r.try_get(2)?,
        code: r.try_get(3)?,
        name: r.try_get(4)?,
        value: r.try_get(5)?,
        unit: r.try_get(6)?,
        position: r.try_get(7)?,
        visit: r.try_get(8)?,
        effective: SourceDate { earliest: r.try_get(9)?, to_the_day: on.is_some() },
        recorded_at: r.try_get(11)?,
    };
    Ok((r.try_get(0)?, r.try_get(1)?, reading))
}

/// As [`READING`] for an adverse-event report (as `a`), in the order [`report_of`] takes.
const REPORT: &str =
    "a.subject_id, a.site_id, a.event_id, a.ae_id, a.term, a.onset_at, a.onset_on, a.recorded_at";

fn report_of(r: &PgRow) -> Result<(String, Option<String>, AeReport), sqlx::Error> {
    let on: Option<NaiveDate> = r.try_get(6)?;
    let report = AeReport {
        event_id: r.try_get(2)?,
        ae_id: r.try_get(3)?,
        term: r.try_get(4)?,
        onset: SourceDate { earliest: r.try_get(5)?, to_the_day: on.is_some() },
        recorded_at: r.try_get(7)?,
    };
    Ok((r.try_get(0)?, r.try_get(1)?, report))
}

/// The data the checks judge of the due subjects of `study_id` (site and data, each data point
/// once, in event id order), and how many rows it read:
/// * a subject due as a whole: every reading and report;
/// * else its new readings and reports, the readings of the time points of new readings whose
///   code `reach` compares at a time point, and then (over both) the stretch of days around the
///   new readings of each day-to-day series.
async fn load(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    due: &BTreeMap<String, Due>,
    reach: &Reach,
) -> Result<(BTreeMap<String, (Option<String>, SubjectData)>, usize), sqlx::Error> {
    #[derive(Default)]
    struct Read {
        site: Option<String>,
        readings: BTreeMap<Uuid, Reading>,
        reports: BTreeMap<Uuid, AeReport>,
    }
    fn keep_readings(rows: &[PgRow], read: &mut BTreeMap<String, Read>) -> Result<usize, sqlx::Error> {
        for row in rows {
            let (subject, site, reading) = reading_of(row)?;
            let entry = read.entry(subject).or_default();
            entry.site = entry.site.take().or(site);
            entry.readings.insert(reading.event_id, reading);
        }
        Ok(rows.len())
    }
    let mut read: BTreeMap<String, Read> = BTreeMap::new();
    let whole: Vec<&str> = due.iter().filter(|(_, d)| d.whole).map(|(s, _)| s.as_str()).collect();
    let (subjects, events): (Vec<&str>, Vec<Uuid>) = due
        .iter()
        .filter(|(_, d)| !d.whole)
        .flat_map(|(s, d)| d.events.iter().map(move |e| (s.as_str(), *e)))
        .unzip();
    // Every row of the subjects due as a whole, and the new rows of the others.
    let due_rows = |table: &str, alias: &str, columns: &str| {
        format!(
            "SELECT {columns} FROM {schema}.{table} {alias} WHERE {alias}.study_id = $1 AND {alias}.subject_id = ANY($2)
             UNION ALL
             SELECT {columns} FROM {schema}.{table} {alias}
             JOIN unnest($3::text[], $4::uuid[]) AS k(subject_id, event_id)
               ON {alias}.subject_id = k.subject_id AND {alias}.event_id = k.event_id
             WHERE {alias}.study_id = $1"
        )
    };
    let mut rows_read = 0;
    let mut fetch = async |sql: String| {
        sqlx::query(AssertSqlSafe(sql))
            .bind(study_id)
            .bind(&whole)
            .bind(&subjects)
            .bind(&events)
            .fetch_all(&mut *conn)
            .await
    };
    let rows = fetch(due_rows("reading", "r", READING)).await?;
    rows_read += keep_readings(&rows, &mut read)?;
    let rows = fetch(due_rows("ae_report", "a", REPORT)).await?;
    rows_read += rows.len();
    for row in &rows {
        let (subject, site, report) = report_of(row)?;
        let entry = read.entry(subject).or_default();
        entry.site = entry.site.take().or(site);
        entry.reports.insert(report.event_id, report);
    }

    // What the new readings are compared with (subjects due as a whole have it all).
    let partial = |read: &BTreeMap<String, Read>| -> Vec<(String, Reading)> {
        read.iter()
            .filter(|(s, _)| due.get(*s).is_some_and(|d| !d.whole))
            .flat_map(|(s, r)| r.readings.values().map(move |r| (s.clone(), r.clone())))
            .collect()
    };
    let time_points: BTreeSet<(String, DateTime<Utc>)> = partial(&read)
        .into_iter()
        .filter(|(_, r)| reach.at_time_point(r))
        .filter_map(|(s, r)| r.effective.earliest.map(|at| (s, at)))
        .collect();
    if !time_points.is_empty() {
        let sql = format!(
            "SELECT {READING} FROM {schema}.reading r
             JOIN unnest($2::text[], $3::timestamptz[]) AS k(subject_id, at)
               ON r.subject_id = k.subject_id AND r.effective_at = k.at
             WHERE r.study_id = $1 AND r.code = ANY($4::text[])"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(study_id)
            .bind(time_points.iter().map(|k| k.0.as_str()).collect::<Vec<_>>())
            .bind(time_points.iter().map(|k| k.1).collect::<Vec<_>>())
            .bind(reach.time_point.iter().collect::<Vec<_>>())
            .fetch_all(&mut *conn)
            .await?;
        rows_read += keep_readings(&rows, &mut read)?;
    }
    let mut stretches: BTreeMap<(String, String, String), (NaiveDate, NaiveDate)> = BTreeMap::new();
    for (subject, r) in partial(&read) {
        if let Some(day) = reach.day_in_series(&r) {
            let stretch = stretches.entry((subject, r.code, r.unit)).or_insert((day, day));
            *stretch = (stretch.0.min(day), stretch.1.max(day));
        }
    }
    if !stretches.is_empty() {
        // From the data day before the first new day to the data day after the last one, by the
        // effective time (`effective_on` is its UTC day) so that one index serves both reads.
        let sql = format!(
            "SELECT {READING}
             FROM unnest($2::text[], $3::text[], $4::text[], $5::date[], $6::date[])
                  AS k(subject_id, code, unit, first_day, last_day)
             CROSS JOIN LATERAL (
                 SELECT coalesce((SELECT p.effective_on FROM {schema}.reading p
                                  WHERE p.study_id = $1 AND p.subject_id = k.subject_id AND p.code = k.code
                                    AND p.effective_at < k.first_day::timestamp AT TIME ZONE 'UTC'
                                    AND p.unit = k.unit AND p.effective_on IS NOT NULL
                                  ORDER BY p.effective_at DESC LIMIT 1), k.first_day) AS lo,
                        coalesce((SELECT p.effective_on FROM {schema}.reading p
                                  WHERE p.study_id = $1 AND p.subject_id = k.subject_id AND p.code = k.code
                                    AND p.effective_at >= (k.last_day + 1)::timestamp AT TIME ZONE 'UTC'
                                    AND p.unit = k.unit AND p.effective_on IS NOT NULL
                                  ORDER BY p.effective_at LIMIT 1), k.last_day) AS hi
             ) b
             JOIN {schema}.reading r
               ON r.study_id = $1 AND r.subject_id = k.subject_id AND r.code = k.code
              AND r.effective_at >= b.lo::timestamp AT TIME ZONE 'UTC'
              AND r.effective_at < (b.hi + 1)::timestamp AT TIME ZONE 'UTC'
             WHERE r.unit = k.unit AND r.effective_on IS NOT NULL"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(study_id)
            .bind(stretches.keys().map(|k| k.0.as_str()).collect::<Vec<_>>())
            .bind(stretches.keys().map(|k| k.1.as_str()).collect::<Vec<_>>())
            .bind(stretches.keys().map(|k| k.2.as_str()).collect::<Vec<_>>())
            .bind(stretches.values().map(|d| d.0).collect::<Vec<_>>())
            .bind(stretches.values().map(|d| d.1).collect::<Vec<_>>())
            .fetch_all(&mut *conn)
            .await?;
        rows_read += keep_readings(&rows, &mut read)?;
    }

    let sql = format!(
        "SELECT subject_id, site_id, consented_on, withdrawn_on, withdrawal_reason FROM {schema}.subject
         WHERE study_id = $1 AND subject_id = ANY($2)"
    );
    let all: Vec<&str> = due.keys().map(String::as_str).collect();
    let mut out: BTreeMap<String, (Option<String>, SubjectData)> = BTreeMap::new();
    for r in sqlx::query(AssertSqlSafe(sql)).bind(study_id).bind(&all).fetch_all(&mut *conn).await? {
        let data = SubjectData {
            consented_on: r.try_get(2)?,
            withdrawn_on: r.try_get(3)?,
            withdrawal_reason: r.try_get(4)?,
            ..SubjectData::default()
        };
        out.insert(r.try_get(0)?, (r.try_get(1)?, data));
    }
    for (subject, r) in read {
        let entry = out.entry(subject).or_insert_with(|| (None, SubjectData::default()));
        entry.0 = entry.0.take().or(r.site);
        entry.1.readings = r.readings.into_values().collect();
        entry.1.adverse_events = r.reports.into_values().collect();
    }
    Ok((out, rows_read))
}

/// What a query event asks.
pub(crate) enum Decision<'a> {
    Answer(&'a QueryAnswered),
    Close(&'a QueryClosed),
}

/// Applies an answer or a closing: the status moves open → answered → closed, and the event is
/// kept in `query_history` either way (applied or not). An unknown query is a permanent error
/// (dead letter); a redelivered event changes nothing. The audit record of an applied decision.
pub(crate) async fn apply(
    conn: &mut PgConnection,
    schema: &SchemaName,
    decision: Decision<'_>,
) -> Result<Option<AuditRecord>, HandlerError> {
    let (envelope, query_id, action, text, from, to) = match decision {
        Decision::Answer(e) => (&e.envelope, e.query_id, "answered", e.answer.as_str(), "open", "answered"),
        Decision::Close(e) => (&e.envelope, e.query_id, "closed", e.reason.as_str(), "answered", "closed"),
    };
    let sql = format!("SELECT study_id, site_id, status FROM {schema}.query WHERE query_id = $1 FOR UPDATE");
    let Some(row) = sqlx::query(AssertSqlSafe(sql)).bind(query_id).fetch_optional(&mut *conn).await? else {
        return Err(HandlerError::permanent(format!("{}: unknown query {query_id}", envelope.event_type)));
    };
    let (study_id, site_id, status): (String, Option<String>, String) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    if study_id != envelope.study_id {
        return Err(HandlerError::permanent(format!(
            "{}: query {query_id} belongs to another study",
            envelope.event_type
        )));
    }
    let applied = status == from;
    let at = instant(envelope.occurred_at, "occurred_at")?;
    let actor = envelope.actor.clone();
    let sql = format!(
        "INSERT INTO {schema}.query_history (event_id, query_id, action, actor, at, text, applied)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING"
    );
    let inserted = sqlx::query(AssertSqlSafe(sql))
        .bind(envelope.event_id)
        .bind(query_id)
        .bind(action)
        .bind(&actor)
        .bind(at)
        .bind(text)
        .bind(applied)
        .execute(&mut *conn)
        .await?
        .rows_affected()
        > 0;
    if !inserted || !applied {
        return Ok(None);
    }
    let sql = match to {
        "answered" => format!(
            "UPDATE {schema}.query SET status = 'answered', answered_at = $2, answered_by = $3, answer = $4
             WHERE query_id = $1"
        ),
        _ => format!(
            "UPDATE {schema}.query SET status = 'closed', closed_at = $2, closed_by = $3, close_reason = $4
             WHERE query_id = $1"
        ),
    };
    sqlx::query(AssertSqlSafe(sql))
        .bind(query_id)
        .bind(at)
        .bind(&actor)
        .bind(text)
        .execute(&mut *conn)
        .await?;
    let record =
        AuditRecord::by_system(super::NAME, format!("query.{action}"), "query", query_id.to_string())
            .on_behalf_of(actor)
            .study(study_id)
            .site(site_id)
            .change("status", from, to)
            .reason(text)
            .cause(format!("event:{}", envelope.event_id));
    Ok(Some(record))
}

/// How many queries each edit check opened in a study, by status.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckQueries {
    pub check_id: String,
    pub opened: i64,
    pub open: i64,
    pub answered: i64,
    pub closed: i64,
}

/// The queries of `study_id` per check, by check id.
pub async fn counts_by_check(
    pool: &sqlx::PgPool,
    schema: &SchemaName,
    study_id: &str,
) -> Result<Vec<CheckQueries>, sqlx::Error> {
    let sql = format!(
        "SELECT check_id, count(*), count(*) FILTER (WHERE status = 'open'),
                count(*) FILTER (WHERE status = 'answered'), count(*) FILTER (WHERE status = 'closed')
         FROM {schema}.query WHERE study_id = $1 GROUP BY check_id ORDER BY check_id"
    );
    let rows: Vec<(String, i64, i64, i64, i64)> =
        sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .map(|(check_id, opened, open, answered, closed)| CheckQueries {
            check_id,
            opened,
            open,
            answered,
            closed,
        })
        .collect())
}
