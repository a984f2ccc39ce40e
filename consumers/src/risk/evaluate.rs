//! The evaluator: scores the KRIs of every study whose counts changed, beside the consumer.
//!
//! Messages only update counts and mark their study (cheap, no contention between partitions);
//! every [`EVALUATE_INTERVAL`] the evaluator takes the marks, and per study, holding its `study`
//! row (one evaluator per study at a time, whatever the number of instances), computes every
//! site's counts, scores each KRI ([`kri::analyze`]) and stores the result. A flag that changes
//! level (an unscored site counts as 0) is a `KriFlagChanged` event on `risk.kri-flags.v1`,
//! enqueued in the same transaction: the monitoring service turns it into a site-level alert.
//!
//! Before the KRIs, the evaluator runs the study's edit checks on its subjects due for them and
//! opens their queries ([`super::queries`]), so the query KRIs count them at once. After the
//! KRIs, it judges the study's quality tolerance limits ([`Qtl`]): a limit that becomes breached
//! (or no longer is) is a `QtlStatusChanged` on `risk.kri-flags.v1`, keyed by study, which the
//! monitoring service turns into a study-level alert that needs an evaluation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use trialflow_outbox::{Outbox, OutboxEvent, SchemaName};
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{Envelope, Event, KriFlagChanged, QtlStatusChanged, Timestamp};

use super::config::{Qtl, RiskConfig};
use super::kri::{self, Analysis, Kri, SiteCounts};
use super::queries::{self, OpenedQuery};
use super::store;

/// How often marked studies are evaluated: the most an adverse event waits for its site's score.
pub const EVALUATE_INTERVAL: Duration = Duration::from_millis(250);

/// A site's flag that changed at an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagChange {
    pub study_id: String,
    pub kri: &'static Kri,
    pub from: Option<i8>,
    pub to: Option<i8>,
    /// The site's result now.
    pub site: kri::SiteScore,
    /// The study's metric.
    pub study_metric: f64,
}

impl FlagChange {
    /// The change as the event the monitoring service alerts on.
    pub fn event(&self) -> KriFlagChanged {
        let mut envelope = Envelope::new(KriFlagChanged::NAME, &self.study_id, super::NAME, Timestamp::now());
        envelope.site_id = Some(self.site.site.clone());
        KriFlagChanged {
            envelope,
            kri_id: self.kri.id.to_string(),
            kri_name: self.kri.name.to_string(),
            previous_flag: self.from.map(i32::from),
            flag: self.to.map(i32::from),
            score: self.site.score,
            numerator: self.site.numerator,
            denominator: self.site.denominator,
            metric: self.site.metric,
            study_metric: self.study_metric,
        }
    }

    /// The event's key: one site's changes in order.
    pub fn key(&self) -> String {
        format!("{}/{}", self.study_id, self.site.site)
    }
}

/// What one evaluation changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    pub flags: Vec<FlagChange>,
    pub queries: Vec<OpenedQuery>,
    pub qtls: Vec<QtlChange>,
    /// How many readings and adverse-event reports the edit checks read.
    pub inputs_read: usize,
}

/// A quality tolerance limit that became breached, or no longer is.
#[derive(Debug, Clone, PartialEq)]
pub struct QtlChange {
    pub study_id: String,
    pub qtl: Qtl,
    pub status: QtlStatus,
}

/// A quality tolerance limit of a study at an evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QtlStatus {
    pub numerator: f64,
    pub denominator: f64,
    pub observed: f64,
    pub expected: f64,
    pub limit: f64,
    pub breached: bool,
}

impl QtlStatus {
    /// The limit's status for the study's totals of its KRI: judged from `min_denominator` on.
    pub fn of(qtl: &Qtl, numerator: f64, denominator: f64) -> Self {
        let observed = if denominator > 0.0 { numerator / denominator } else { 0.0 };
        let limit = if denominator > 0.0 { qtl.limit(denominator) } else { 1.0 };
        Self {
            numerator,
            denominator,
            observed,
            expected: qtl.expected,
            limit,
            breached: denominator >= qtl.min_denominator && observed > limit,
        }
    }
}

impl QtlChange {
    pub fn event(&self) -> QtlStatusChanged {
        let envelope = Envelope::new(QtlStatusChanged::NAME, &self.study_id, super::NAME, Timestamp::now());
        QtlStatusChanged {
            envelope,
            qtl_id: self.qtl.id.clone(),
            qtl_name: self.qtl.name.clone(),
            breached: self.status.breached,
            numerator: self.status.numerator,
            denominator: self.status.denominator,
            observed: self.status.observed,
            expected: self.status.expected,
            limit: self.status.limit,
        }
    }
}

/// Evaluates marked studies until `shutdown`.
pub(crate) async fn run(
    pool: PgPool,
    outbox: Outbox,
    topics: TopicNames,
    config: RiskConfig,
    shutdown: CancellationToken,
) {
    loop {
        match evaluate_marked(&pool, &outbox, &topics, &config).await {
            Ok(evaluation) => {
                for c in evaluation.flags {
                    info!(study_id = %c.study_id, site_id = %c.site.site, kri = c.kri.id, from = ?c.from,
                        to = ?c.to, score = ?c.site.score, "KRI flag changed.");
                }
                if !evaluation.queries.is_empty() {
                    info!(queries = evaluation.queries.len(), "Edit checks opened queries.");
                }
                for c in evaluation.qtls {
                    info!(study_id = %c.study_id, qtl = %c.qtl.id, breached = c.status.breached,
                        observed = c.status.observed, limit = c.status.limit, "Quality tolerance limit changed.");
                }
            }
            Err(error) => warn!(%error, "KRI evaluation failed; retrying."),
        }
        tokio::select! {
            _ = tokio::time::sleep(EVALUATE_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Takes the marks and evaluates their studies in one transaction (edit checks, KRIs, QTLs),
/// with the events of what changed; returns those.
pub async fn evaluate_marked(
    pool: &PgPool,
    outbox: &Outbox,
    topics: &TopicNames,
    config: &RiskConfig,
) -> Result<Evaluation, EvaluateError> {
    let schema = outbox.schema();
    let mut tx = pool.begin().await?;
    // The committed marks. A batch that commits its changes and marks after this read is taken
    // at the next pass; the study's row (locked in `evaluate`) keeps two evaluators apart.
    let due = queries::take_due(&mut tx, schema).await?;
    let sql = format!("DELETE FROM {schema}.dirty RETURNING study_id");
    let mut marked: BTreeSet<String> =
        sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(&mut *tx).await?.into_iter().collect();
    let mut evaluation = Evaluation::default();
    for (study_id, subjects) in &due {
        let checks = config.edit_checks(study_id);
        let checked = queries::open_queries(&mut tx, outbox, topics, study_id, subjects, checks).await?;
        if !checked.opened.is_empty() {
            marked.insert(study_id.clone());
        }
        evaluation.queries.extend(checked.opened);
        evaluation.inputs_read += checked.inputs_read;
    }
    for study_id in &marked {
        evaluation.flags.extend(evaluate(&mut tx, schema, study_id, config).await?);
        evaluation.qtls.extend(judge_qtls(&mut tx, schema, study_id, config.qtls(study_id)).await?);
    }
    for change in &evaluation.flags {
        let row = OutboxEvent::avro(&change.event(), topics.of::<KriFlagChanged>(), change.key())?;
        outbox.enqueue(&mut tx, row).await?;
    }
    for change in &evaluation.qtls {
        let row =
            OutboxEvent::avro(&change.event(), topics.of::<QtlStatusChanged>(), change.study_id.clone())?;
        outbox.enqueue(&mut tx, row).await?;
    }
    tx.commit().await?;
    Ok(evaluation)
}

/// Judges the study's QTLs on the study totals of their KRIs (as stored by [`evaluate`]) and
/// stores them; the ones whose breach status changed (a first evaluation that is not breached is
/// no change).
async fn judge_qtls(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    qtls: &[Qtl],
) -> Result<Vec<QtlChange>, sqlx::Error> {
    let mut changes = Vec::new();
    for qtl in qtls {
        let sql = format!(
            "SELECT coalesce(sum(numerator), 0), coalesce(sum(denominator), 0) FROM {schema}.site_kri
             WHERE study_id = $1 AND kri = $2"
        );
        let (x, n): (f64, f64) =
            sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).bind(&qtl.kri).fetch_one(&mut *conn).await?;
        let status = QtlStatus::of(qtl, x, n);
        let sql = format!(
            "WITH before AS (
                 SELECT breached FROM {schema}.study_qtl WHERE study_id = $1 AND qtl = $2
             ), saved AS (
                 INSERT INTO {schema}.study_qtl AS t
                     (study_id, qtl, numerator, denominator, observed, expected, qtl_limit, breached, changed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
                 ON CONFLICT (study_id, qtl) DO UPDATE SET
                     numerator = excluded.numerator, denominator = excluded.denominator,
                     observed = excluded.observed, expected = excluded.expected, qtl_limit = excluded.qtl_limit,
                     breached = excluded.breached,
                     changed_at = CASE WHEN t.breached = excluded.breached THEN t.changed_at ELSE now() END
             )
             SELECT (SELECT breached FROM before)"
        );
        let before: Option<bool> = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(study_id)
            .bind(&qtl.id)
            .bind(status.numerator)
            .bind(status.denominator)
            .bind(status.observed)
            .bind(status.expected)
            .bind(status.limit)
            .bind(status.breached)
            .fetch_one(&mut *conn)
            .await?;
        if before.unwrap_or(false) != status.breached {
            changes.push(QtlChange { study_id: study_id.to_string(), qtl: qtl.clone(), status });
        }
    }
    Ok(changes)
}

/// Why an evaluation failed (it is retried at the next interval).
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("outbox: {0}")]
    Outbox(#[from] trialflow_outbox::OutboxError),
    #[error("encoding an event: {0}")]
    Encoding(#[from] trialflow_schemas::CodecError),
}

/// The counts of `kri` at each site.
fn counts_of(kri: &Kri, sites: &[store::SiteCounts]) -> Vec<SiteCounts> {
    sites
        .iter()
        .map(|s| {
            let (numerator, denominator) = match kri.id {
                "AE_RATE" => (s.adverse_events, s.exposure_days),
                "SAE_RATE" => (s.serious_adverse_events, s.exposure_days),
                "DISCONTINUATION" => (s.withdrawn, s.enrolled),
                "SCREEN_FAILURE" => (s.screen_failed, s.assessed),
                "DATA_ENTRY_LAG" => (s.lagging_inputs, s.dated_inputs),
                "QUERY_RATE" => (s.queries, s.data_points),
                "QUERY_AGE" => (s.outstanding_queries, s.queries),
                "EPRO_COMPLIANCE" => (s.epro_missed, s.epro_due),
                other => unreachable!("KRI {other} has no counts"),
            };
            SiteCounts {
                site: s.site_id.clone(),
                numerator: numerator as f64,
                denominator: denominator as f64,
            }
        })
        .collect()
}

/// Scores every KRI of `study_id` and stores the result (holding the study's row); the flags that
/// changed.
pub async fn evaluate(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    thresholds: &RiskConfig,
) -> Result<Vec<FlagChange>, sqlx::Error> {
    let sql = format!(
        "INSERT INTO {schema}.study (study_id, evaluated_at) VALUES ($1, now())
         ON CONFLICT (study_id) DO UPDATE SET evaluated_at = now()"
    );
    sqlx::query(AssertSqlSafe(sql)).bind(study_id).execute(&mut *conn).await?;
    let mut sites =
        store::site_counts(conn, schema, study_id, thresholds.data_entry_lag_days(study_id)).await?;
    let epro = store::epro_counts(conn, schema, study_id, thresholds.schedule(study_id)).await?;
    for site in &mut sites {
        (site.epro_due, site.epro_missed) = epro.get(&site.site_id).copied().unwrap_or_default();
    }
    let mut changes = Vec::new();
    for kri in kri::CATALOGUE {
        let analysis =
            kri::analyze(kri.method, &counts_of(kri, &sites), &thresholds.thresholds(study_id, kri));
        changes.extend(save(conn, schema, study_id, kri, &analysis).await?);
    }
    Ok(changes)
}

/// Stores one KRI of a study, every scored site with it, in one statement; the flags that changed.
async fn save(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    kri: &'static Kri,
    analysis: &Analysis,
) -> Result<Vec<FlagChange>, sqlx::Error> {
    // Every sub-statement sees the rows as they were before it: `before` holds the old flags.
    // flag_changed_at moves only with the flag. Sites in order (the study's row is held anyway).
    let sql = format!(
        "WITH study AS (
             INSERT INTO {schema}.study_kri (study_id, kri, overall, factor) VALUES ($1, $2, $3, $4)
             ON CONFLICT (study_id, kri) DO UPDATE SET overall = excluded.overall, factor = excluded.factor
         ), site AS (
             SELECT * FROM unnest($5::text[], $6::float8[], $7::float8[], $8::float8[], $9::float8[], $10::int2[])
                 AS s (site_id, numerator, denominator, metric, score, flag)
         ), before AS (
             SELECT site_id, flag FROM {schema}.site_kri WHERE study_id = $1 AND kri = $2
         ), saved AS (
             INSERT INTO {schema}.site_kri AS t
                 (study_id, site_id, kri, numerator, denominator, metric, score, flag, flag_changed_at)
             SELECT $1, site_id, $2, numerator, denominator, metric, score, flag, now() FROM site
             ORDER BY site_id
             ON CONFLICT (study_id, site_id, kri) DO UPDATE SET
                 numerator = excluded.numerator, denominator = excluded.denominator,
                 metric = excluded.metric, score = excluded.score, flag = excluded.flag,
                 flag_changed_at = CASE WHEN t.flag IS NOT DISTINCT FROM excluded.flag
                                        THEN t.flag_changed_at ELSE excluded.flag_changed_at END
         )
         SELECT site.site_id, before.flag FROM site LEFT JOIN before USING (site_id)"
    );
    let sites = &analysis.sites;
    let rows: Vec<(String, Option<i16>)> = sqlx::query_as(AssertSqlSafe(sql))
        .bind(study_id)
        .bind(kri.id)
        .bind(analysis.overall)
        .bind(analysis.factor)
        .bind(sites.iter().map(|s| s.site.as_str()).collect::<Vec<_>>())
        .bind(sites.iter().map(|s| s.numerator).collect::<Vec<_>>())
        .bind(sites.iter().map(|s| s.denominator).collect::<Vec<_>>())
        .bind(sites.iter().map(|s| s.metric).collect::<Vec<_>>())
        .bind(sites.iter().map(|s| s.score).collect::<Vec<_>>())
        .bind(sites.iter().map(|s| s.flag.map(i16::from)).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await?;
    let before: BTreeMap<String, Option<i16>> = rows.into_iter().collect();
    let mut changes = Vec::new();
    for site in sites {
        let from = before.get(&site.site).copied().flatten().and_then(|f| i8::try_from(f).ok());
        // An unscored site counts as 0: becoming scored at 0 (or unscored from 0) is no change.
        if from.unwrap_or(0) != site.flag.unwrap_or(0) {
            changes.push(FlagChange {
                study_id: study_id.to_string(),
                kri,
                from,
                to: site.flag,
                site: site.clone(),
                study_metric: analysis.overall,
            });
        }
    }
    Ok(changes)
}

/// A quality tolerance limit of a study at the last evaluation.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredQtl {
    pub qtl: String,
    pub numerator: f64,
    pub denominator: f64,
    pub observed: f64,
    pub expected: f64,
    pub limit: f64,
    pub breached: bool,
}

/// The quality tolerance limits of `study_id` at the last evaluation, by id.
pub async fn qtls(pool: &PgPool, schema: &SchemaName, study_id: &str) -> Result<Vec<StoredQtl>, sqlx::Error> {
    let sql = format!(
        "SELECT qtl, numerator, denominator, observed, expected, qtl_limit, breached FROM {schema}.study_qtl
         WHERE study_id = $1 ORDER BY qtl"
    );
    let rows: Vec<(String, f64, f64, f64, f64, f64, bool)> =
        sqlx::query_as(AssertSqlSafe(sql)).bind(study_id).fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .map(|(qtl, numerator, denominator, observed, expected, limit, breached)| StoredQtl {
            qtl,
            numerator,
            denominator,
            observed,
            expected,
            limit,
            breached,
        })
        .collect())
}
