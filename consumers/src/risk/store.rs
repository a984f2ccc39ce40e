//! The risk service's rows: what each event changes, merged so that the order of arrival does
//! not matter (see the migration).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use trialflow_outbox::SchemaName;

use crate::error::HandlerError;

/// Who an event is about and when it happened.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fact<'a> {
    pub study_id: &'a str,
    pub subject_id: &'a str,
    pub site_id: Option<&'a str>,
    pub at: DateTime<Utc>,
}

impl Fact<'_> {
    fn on(&self) -> NaiveDate {
        self.at.date_naive()
    }
}

/// Notes that each subject exists (at its site) and was seen on its date: one statement for a
/// batch, keys in order. The studies where anything the KRIs count changed: a new subject, its
/// site learnt, a later day seen.
pub(crate) async fn sightings(
    conn: &mut PgConnection,
    schema: &SchemaName,
    seen: &BTreeMap<(String, String), (Option<String>, NaiveDate)>,
) -> Result<BTreeSet<String>, HandlerError> {
    if seen.is_empty() {
        return Ok(BTreeSet::new());
    }
    let sql = format!(
        "INSERT INTO {schema}.subject AS t (study_id, subject_id, site_id, last_seen_on)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::date[])
         ON CONFLICT (study_id, subject_id) DO UPDATE
           SET site_id = coalesce(t.site_id, excluded.site_id),
               last_seen_on = greatest(t.last_seen_on, excluded.last_seen_on)
           WHERE t.last_seen_on < excluded.last_seen_on OR (t.site_id IS NULL AND excluded.site_id IS NOT NULL)
         RETURNING study_id"
    );
    let studies: Vec<&str> = seen.keys().map(|(study, _)| study.as_str()).collect();
    let subjects: Vec<&str> = seen.keys().map(|(_, subject)| subject.as_str()).collect();
    let sites: Vec<Option<&str>> = seen.values().map(|(site, _)| site.as_deref()).collect();
    let days: Vec<NaiveDate> = seen.values().map(|(_, day)| *day).collect();
    let changed: Vec<String> = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(studies)
        .bind(subjects)
        .bind(sites)
        .bind(days)
        .fetch_all(&mut *conn)
        .await?;
    Ok(changed.into_iter().collect())
}

/// Which lifecycle fact changes the subject's row.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lifecycle<'a> {
    /// Screened, living in that time zone (the first one given wins).
    Screened {
        time_zone: &'a str,
    },
    Assessed {
        eligible: bool,
    },
    /// Consent signed on that day (`None`: the source gave no day-precise date).
    Consented {
        on: Option<NaiveDate>,
    },
    Enrolled,
    Withdrawn {
        reason_code: &'a str,
    },
}

/// Applies a lifecycle fact (after [`touch`]). Whether the row changed.
pub(crate) async fn lifecycle(
    conn: &mut PgConnection,
    schema: &SchemaName,
    fact: Fact<'_>,
    what: Lifecycle<'_>,
) -> Result<bool, HandlerError> {
    let key = "t.study_id = $1 AND t.subject_id = $2";
    let query = match what {
        // The latest assessment wins, by when it happened.
        Lifecycle::Assessed { eligible } => {
            let sql = format!(
                "UPDATE {schema}.subject AS t SET eligible = $4, assessed_at = $3
                 WHERE {key} AND (t.assessed_at IS NULL OR t.assessed_at < $3)"
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(fact.study_id)
                .bind(fact.subject_id)
                .bind(fact.at)
                .bind(eligible)
        }
        // The first consent: the edit checks compare inputs with it.
        Lifecycle::Consented { on } => {
            let sql = format!(
                "UPDATE {schema}.subject AS t SET consented_on = $3
                 WHERE {key} AND $3 IS NOT NULL AND (t.consented_on IS NULL OR t.consented_on > $3)"
            );
            sqlx::query(AssertSqlSafe(sql)).bind(fact.study_id).bind(fact.subject_id).bind(on)
        }
        Lifecycle::Screened { time_zone } => {
            let sql = format!(
                "UPDATE {schema}.subject AS t SET time_zone = $3 WHERE {key} AND t.time_zone IS NULL"
            );
            sqlx::query(AssertSqlSafe(sql)).bind(fact.study_id).bind(fact.subject_id).bind(time_zone)
        }
        // The first enrollment: a resend never moves it later.
        Lifecycle::Enrolled => {
            let sql = format!(
                "UPDATE {schema}.subject AS t SET enrolled_on = $3, enrolled_at = $4
                 WHERE {key} AND (t.enrolled_at IS NULL OR t.enrolled_at > $4)"
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(fact.study_id)
                .bind(fact.subject_id)
                .bind(fact.on())
                .bind(fact.at)
        }
        // The first withdrawal, with its reason.
        Lifecycle::Withdrawn { reason_code } => {
            let sql = format!(
                "UPDATE {schema}.subject AS t SET withdrawn_on = $3, withdrawal_reason = $4
                 WHERE {key} AND (t.withdrawn_on IS NULL OR t.withdrawn_on > $3)"
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(fact.study_id)
                .bind(fact.subject_id)
                .bind(fact.on())
                .bind(reason_code)
        }
    };
    Ok(query.execute(&mut *conn).await?.rows_affected() > 0)
}

/// Records the batch's adverse events (one per `ae_id`; serious once reported serious), keys in
/// order. The studies with a new or newly serious one.
pub(crate) async fn adverse_events(
    conn: &mut PgConnection,
    schema: &SchemaName,
    events: &BTreeMap<(String, String, String), bool>,
) -> Result<BTreeSet<String>, HandlerError> {
    if events.is_empty() {
        return Ok(BTreeSet::new());
    }
    let sql = format!(
        "INSERT INTO {schema}.adverse_event AS t (study_id, subject_id, ae_id, serious)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[])
         ON CONFLICT (study_id, subject_id, ae_id) DO UPDATE SET serious = true
           WHERE excluded.serious AND NOT t.serious
         RETURNING study_id"
    );
    let column = |i: usize| -> Vec<&str> {
        events.keys().map(|k| [k.0.as_str(), k.1.as_str(), k.2.as_str()][i]).collect()
    };
    let serious: Vec<bool> = events.values().copied().collect();
    let changed: Vec<String> = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(column(0))
        .bind(column(1))
        .bind(column(2))
        .bind(serious)
        .fetch_all(&mut *conn)
        .await?;
    Ok(changed.into_iter().collect())
}

/// Marks the study for evaluation: appended, like the edit checks' marks (see
/// `0004_append_only_marks.sql`).
pub(crate) async fn mark(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
) -> Result<(), HandlerError> {
    let sql = format!("INSERT INTO {schema}.dirty (study_id) VALUES ($1)");
    sqlx::query(AssertSqlSafe(sql)).bind(study_id).execute(&mut *conn).await?;
    Ok(())
}

/// A site's counts for every KRI of the catalogue.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteCounts {
    pub site_id: String,
    /// Subjects whose eligibility was assessed, and those found not eligible.
    pub assessed: i64,
    pub screen_failed: i64,
    /// Subjects enrolled, and those of them withdrawn.
    pub enrolled: i64,
    pub withdrawn: i64,
    /// Exposure days of the enrolled subjects.
    pub exposure_days: i64,
    /// Adverse events and serious ones of the enrolled subjects.
    pub adverse_events: i64,
    pub serious_adverse_events: i64,
    /// Inputs dated to the day, and those recorded late.
    pub dated_inputs: i64,
    pub lagging_inputs: i64,
    /// Data points (readings and adverse-event reports).
    pub data_points: i64,
    /// Queries opened, and those outstanding for more than [`super::kri::QUERY_AGE_DAYS`].
    pub queries: i64,
    pub outstanding_queries: i64,
    /// Scheduled ePRO occurrences due, and those missed (see [`super::epro`]).
    pub epro_due: i64,
    pub epro_missed: i64,
}

/// Every site's counts in `study_id`, by site id. A subject's exposure is the days from its
/// enrollment date to its withdrawal date, or else to the last date it was seen, both included.
/// An input lags when its UTC recording day is more than `lag_days` after its clinical day (the
/// inputs are counted by subject and lag as they are stored, `input_count`).
pub(crate) async fn site_counts(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    lag_days: u32,
) -> Result<Vec<SiteCounts>, sqlx::Error> {
    let sql = format!(
        "WITH s AS (
             SELECT subject_id, site_id, eligible, assessed_at, enrolled_on, withdrawn_on,
                    CASE WHEN enrolled_on IS NULL THEN 0
                         ELSE greatest(coalesce(withdrawn_on, last_seen_on), enrolled_on) - enrolled_on + 1
                    END AS exposure
             FROM {schema}.subject WHERE study_id = $1 AND site_id IS NOT NULL
         ), ae AS (
             SELECT s.site_id, count(*) AS aes, count(*) FILTER (WHERE a.serious) AS saes
             FROM {schema}.adverse_event a JOIN s USING (subject_id)
             WHERE a.study_id = $1 AND s.enrolled_on IS NOT NULL
             GROUP BY s.site_id
         ), inputs AS (
             SELECT s.site_id, sum(c.n)::bigint AS points,
                    coalesce(sum(c.n) FILTER (WHERE c.dated), 0)::bigint AS dated,
                    coalesce(sum(c.n) FILTER (WHERE c.dated AND c.lag > $2), 0)::bigint AS lagging
             FROM {schema}.input_count c JOIN s USING (subject_id)
             WHERE c.study_id = $1
             GROUP BY s.site_id
         ), q AS (
             SELECT s.site_id, count(*) AS queries,
                    count(*) FILTER (WHERE q.status <> 'closed'
                                       AND q.opened_at < now() - make_interval(days => $3)) AS outstanding
             FROM {schema}.query q JOIN s USING (subject_id)
             WHERE q.study_id = $1
             GROUP BY s.site_id
         )
         SELECT s.site_id,
                count(*) FILTER (WHERE s.assessed_at IS NOT NULL),
                count(*) FILTER (WHERE s.assessed_at IS NOT NULL AND NOT s.eligible),
                count(*) FILTER (WHERE s.enrolled_on IS NOT NULL),
                count(*) FILTER (WHERE s.enrolled_on IS NOT NULL AND s.withdrawn_on IS NOT NULL),
                coalesce(sum(s.exposure), 0)::bigint,
                coalesce(max(ae.aes), 0),
                coalesce(max(ae.saes), 0),
                coalesce(max(inputs.dated), 0),
                coalesce(max(inputs.lagging), 0),
                coalesce(max(inputs.points), 0),
                coalesce(max(q.queries), 0),
                coalesce(max(q.outstanding), 0)
         FROM s LEFT JOIN ae USING (site_id) LEFT JOIN inputs USING (site_id) LEFT JOIN q USING (site_id)
         GROUP BY s.site_id ORDER BY s.site_id"
    );
    let lag_days = i32::try_from(lag_days).unwrap_or(i32::MAX);
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(study_id)
        .bind(lag_days)
        .bind(super::kri::QUERY_AGE_DAYS)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(SiteCounts {
                site_id: r.try_get(0)?,
                assessed: r.try_get(1)?,
                screen_failed: r.try_get(2)?,
                enrolled: r.try_get(3)?,
                withdrawn: r.try_get(4)?,
                exposure_days: r.try_get(5)?,
                adverse_events: r.try_get(6)?,
                serious_adverse_events: r.try_get(7)?,
                dated_inputs: r.try_get(8)?,
                lagging_inputs: r.try_get(9)?,
                data_points: r.try_get(10)?,
                queries: r.try_get(11)?,
                outstanding_queries: r.try_get(12)?,
                epro_due: 0,
                epro_missed: 0,
            })
        })
        .collect()
}

/// Notes an accepted response to a scheduled occurrence; whether it is new.
pub(crate) async fn epro_completed(
    conn: &mut PgConnection,
    schema: &SchemaName,
    fact: Fact<'_>,
    occurrence: &str,
) -> Result<bool, HandlerError> {
    let sql = format!(
        "INSERT INTO {schema}.epro_completed (study_id, subject_id, occurrence) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING"
    );
    let done = sqlx::query(AssertSqlSafe(sql))
        .bind(fact.study_id)
        .bind(fact.subject_id)
        .bind(occurrence)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Per site, the ePRO occurrences due and missed by the study's clock (the latest day any of its
/// subjects was seen) under `schedule`. Subjects without a known time zone are placed in UTC.
pub(crate) async fn epro_counts(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    schedule: &crate::epro::schedule::Schedule,
) -> Result<BTreeMap<String, (i64, i64)>, sqlx::Error> {
    let sql = format!(
        "SELECT s.site_id, s.enrolled_at, s.withdrawn_on, s.time_zone,
                coalesce(array_agg(e.occurrence) FILTER (WHERE e.occurrence IS NOT NULL), '{{}}'),
                (SELECT max(last_seen_on) FROM {schema}.subject WHERE study_id = $1)
         FROM {schema}.subject s
         LEFT JOIN {schema}.epro_completed e USING (study_id, subject_id)
         WHERE s.study_id = $1 AND s.site_id IS NOT NULL AND s.enrolled_at IS NOT NULL
         GROUP BY s.subject_id, s.site_id, s.enrolled_at, s.withdrawn_on, s.time_zone"
    );
    let rows = sqlx::query(AssertSqlSafe(sql)).bind(study_id).fetch_all(&mut *conn).await?;
    let mut out: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for r in rows {
        let site: String = r.try_get(0)?;
        let zone: Option<String> = r.try_get(3)?;
        let completed: Vec<String> = r.try_get(4)?;
        let Some(as_of): Option<NaiveDate> = r.try_get(5)? else { continue };
        let subject = super::epro::EnrolledSubject {
            enrolled_at: r.try_get(1)?,
            withdrawn_on: r.try_get(2)?,
            time_zone: zone.and_then(|z| z.parse().ok()).unwrap_or(chrono_tz::UTC),
            completed: completed.into_iter().collect(),
        };
        let (due, missed) = super::epro::compliance(schedule, &subject, as_of);
        let counts = out.entry(site).or_default();
        counts.0 += i64::from(due);
        counts.1 += i64::from(missed);
    }
    Ok(out)
}
