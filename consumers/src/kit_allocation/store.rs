//! The kit-allocation consumer's SQL. Every function runs inside the handler's transaction.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use trialflow_outbox::SchemaName;
use trialflow_schemas::{KitsReceived, StudyConfigured};
use uuid::Uuid;

use super::rules::{Kit, KitStatus};
use crate::error::HandlerError;

/// What the consumer keeps of a study's configuration.
#[derive(Debug, Clone)]
pub(crate) struct StudySettings {
    pub(crate) enrollment_kit_type: String,
    pub(crate) arm_codes: Vec<String>,
    pub(crate) kit_types: Vec<KitTypeSettings>,
}

#[derive(Debug, Clone)]
pub(crate) struct KitTypeSettings {
    pub(crate) kit_type: String,
    pub(crate) do_not_dispense_days: u32,
    pub(crate) do_not_count_days: u32,
    pub(crate) low_stock_threshold: usize,
}

impl StudySettings {
    pub(crate) fn kit_type(&self, kit_type: &str) -> Result<&KitTypeSettings, HandlerError> {
        self.kit_types
            .iter()
            .find(|k| k.kit_type == kit_type)
            .ok_or_else(|| HandlerError::permanent(format!("kit type `{kit_type}` is not configured")))
    }
}

/// A subject waiting for a kit (or being allocated one now).
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) study_id: String,
    pub(crate) site_id: String,
    pub(crate) subject_id: String,
    pub(crate) randomization_number: String,
    pub(crate) arm_code: String,
    pub(crate) kit_type: String,
    pub(crate) correlation_id: Option<Uuid>,
}

fn non_negative(value: i32, what: &str) -> Result<u32, HandlerError> {
    u32::try_from(value).map_err(|_| HandlerError::permanent(format!("{what} is negative: {value}")))
}

/// Stores a study's settings unless a newer version is already stored. Returns whether it did.
pub(crate) async fn save_study(
    conn: &mut PgConnection,
    schema: &SchemaName,
    e: &StudyConfigured,
) -> Result<bool, HandlerError> {
    let study_id = &e.envelope.study_id;
    let arms: Vec<&str> = e.arms.iter().map(|a| a.arm_code.as_str()).collect();
    let sql = format!(
        "INSERT INTO {schema}.study (study_id, config_version, enrollment_kit_type, arm_codes)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (study_id) DO UPDATE SET config_version = excluded.config_version,
             enrollment_kit_type = excluded.enrollment_kit_type, arm_codes = excluded.arm_codes
         WHERE study.config_version < excluded.config_version"
    );
    let done = sqlx::query(AssertSqlSafe(sql))
        .bind(study_id)
        .bind(e.config_version)
        .bind(&e.enrollment_kit_type)
        .bind(&arms)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    let sql = format!(
        "INSERT INTO {schema}.kit_type
             (study_id, kit_type, do_not_dispense_days, do_not_count_days, low_stock_threshold)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (study_id, kit_type) DO UPDATE SET
             do_not_dispense_days = excluded.do_not_dispense_days,
             do_not_count_days = excluded.do_not_count_days,
             low_stock_threshold = excluded.low_stock_threshold"
    );
    for k in &e.kit_types {
        non_negative(k.do_not_dispense_days, "do_not_dispense_days")?;
        non_negative(k.do_not_count_days, "do_not_count_days")?;
        non_negative(k.low_stock_threshold, "low_stock_threshold")?;
        sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(study_id)
            .bind(&k.kit_type)
            .bind(k.do_not_dispense_days)
            .bind(k.do_not_count_days)
            .bind(k.low_stock_threshold)
            .execute(&mut *conn)
            .await?;
    }
    Ok(true)
}

pub(crate) async fn study(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
) -> Result<Option<StudySettings>, HandlerError> {
    let sql = format!("SELECT enrollment_kit_type, arm_codes FROM {schema}.study WHERE study_id = $1");
    let Some(row) = sqlx::query(AssertSqlSafe(sql)).bind(study_id).fetch_optional(&mut *conn).await? else {
        return Ok(None);
    };
    let sql = format!(
        "SELECT kit_type, do_not_dispense_days, do_not_count_days, low_stock_threshold
         FROM {schema}.kit_type WHERE study_id = $1 ORDER BY kit_type"
    );
    let kit_types = sqlx::query(AssertSqlSafe(sql))
        .bind(study_id)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| {
            Ok(KitTypeSettings {
                kit_type: r.try_get(0)?,
                do_not_dispense_days: non_negative(r.try_get(1)?, "do_not_dispense_days")?,
                do_not_count_days: non_negative(r.try_get(2)?, "do_not_count_days")?,
                low_stock_threshold: non_negative(r.try_get(3)?, "low_stock_threshold")? as usize,
            })
        })
        .collect::<Result<Vec<_>, HandlerError>>()?;
    Ok(Some(StudySettings { enrollment_kit_type: row.try_get(0)?, arm_codes: row.try_get(1)?, kit_types }))
}

/// Takes the site's inventory lock (creating the site's row on first use) until the transaction
/// ends: one writer per site at a time.
pub(crate) async fn lock_site(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    site_id: &str,
) -> Result<(), HandlerError> {
    let sql = format!(
        "INSERT INTO {schema}.site_inventory (study_id, site_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
    );
    sqlx::query(AssertSqlSafe(sql)).bind(study_id).bind(site_id).execute(&mut *conn).await?;
    let sql =
        format!("SELECT 1 FROM {schema}.site_inventory WHERE study_id = $1 AND site_id = $2 FOR UPDATE");
    sqlx::query(AssertSqlSafe(sql)).bind(study_id).bind(site_id).fetch_one(&mut *conn).await?;
    Ok(())
}

/// Takes the inventory locks of several sites at once (creating the rows of configured studies'
/// sites on first use), in one order, (study, site), for every caller: the batch-wide form of
/// [`lock_site`], after which `lock_site` waits for nothing.
///
/// Two statements, each in that order: first the missing rows are inserted, then all rows are
/// locked. A row one transaction inserts and another needs makes the second wait in its insert
/// (before it locks anything), and inserts go in ascending order too, so no two transactions ever
/// wait for each other in opposite orders. Sites of studies not configured yet are skipped: their
/// messages park (and the foreign key to `study` would refuse the row).
pub(crate) async fn lock_sites(
    conn: &mut PgConnection,
    schema: &SchemaName,
    sites: &BTreeSet<(&str, &str)>,
) -> Result<(), HandlerError> {
    let (study_ids, site_ids): (Vec<&str>, Vec<&str>) = sites.iter().copied().unzip();
    let sql = format!(
        "INSERT INTO {schema}.site_inventory (study_id, site_id)
         SELECT w.study_id, w.site_id FROM unnest($1::text[], $2::text[]) AS w(study_id, site_id)
         JOIN {schema}.study USING (study_id)
         ORDER BY w.study_id, w.site_id
         ON CONFLICT DO NOTHING"
    );
    sqlx::query(AssertSqlSafe(sql)).bind(&study_ids).bind(&site_ids).execute(&mut *conn).await?;
    let sql = format!(
        "SELECT 1 FROM {schema}.site_inventory
         WHERE (study_id, site_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
         ORDER BY study_id, site_id FOR UPDATE"
    );
    sqlx::query(AssertSqlSafe(sql)).bind(&study_ids).bind(&site_ids).fetch_all(&mut *conn).await?;
    Ok(())
}

/// Of the (study, site, arm) demands of a batch's assignments, the sites where fewer dispensable
/// kits of the study's enrollment kit type and that arm are on the shelf than the batch asks for
/// today: where an assignment may find no kit and take the site's lock ([`Handler::prepare`]
/// takes those in order beforehand). An estimate: kits other transactions are allocating count
/// as on the shelf, so a stock-out can still surprise a batch (then it locks the site late).
///
/// [`Handler::prepare`]: crate::handler::Handler::prepare
pub(crate) async fn short_sites(
    conn: &mut PgConnection,
    schema: &SchemaName,
    demand: &BTreeMap<(&str, &str, &str), i64>,
) -> Result<Vec<(String, String)>, HandlerError> {
    let mut columns: (Vec<&str>, Vec<&str>, Vec<&str>, Vec<i64>) = Default::default();
    for ((study, site, arm), n) in demand {
        columns.0.push(study);
        columns.1.push(site);
        columns.2.push(arm);
        columns.3.push(*n);
    }
    let sql = format!(
        "SELECT DISTINCT w.study_id, w.site_id
         FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS w(study_id, site_id, arm_code, demand)
         JOIN {schema}.study s USING (study_id)
         JOIN {schema}.kit_type t ON (t.study_id, t.kit_type) = (s.study_id, s.enrollment_kit_type)
         WHERE (SELECT count(*) FROM (
                    SELECT 1 FROM {schema}.kit k
                    WHERE (k.study_id, k.site_id, k.kit_type, k.arm_code)
                          = (w.study_id, w.site_id, s.enrollment_kit_type, w.arm_code)
                      AND k.status = 'available'
                      AND k.expiry_date - t.do_not_dispense_days > current_date
                    LIMIT w.demand) shelf) < w.demand"
    );
    Ok(sqlx::query_as(AssertSqlSafe(sql))
        .bind(columns.0)
        .bind(columns.1)
        .bind(columns.2)
        .bind(columns.3)
        .fetch_all(&mut *conn)
        .await?)
}

/// Stores a shipment's kits; a kit number already known is kept as it was. Returns how many
/// kits were new.
pub(crate) async fn receive_kits(
    conn: &mut PgConnection,
    schema: &SchemaName,
    e: &KitsReceived,
    site_id: &str,
    received_at: DateTime<Utc>,
) -> Result<u64, HandlerError> {
    let sql = format!(
        "INSERT INTO {schema}.kit (study_id, kit_number, site_id, shipment_id, sequence_number, kit_type,
                                   lot, expiry_date, arm_code, received_at)
         SELECT $1, k.kit_number, $2, $3, k.sequence_number, k.kit_type, k.lot, k.expiry_date, k.arm_code, $4
         FROM unnest($5::text[], $6::bigint[], $7::text[], $8::text[], $9::date[], $10::text[])
              AS k(kit_number, sequence_number, kit_type, lot, expiry_date, arm_code)
         ON CONFLICT (study_id, kit_number) DO NOTHING"
    );
    let expiry = e
        .kits
        .iter()
        .map(|k| {
            k.expiry_date.to_naive().ok_or_else(|| {
                HandlerError::permanent(format!("kit {}: expiry date out of range", k.kit_number))
            })
        })
        .collect::<Result<Vec<NaiveDate>, _>>()?;
    let done = sqlx::query(AssertSqlSafe(sql))
        .bind(&e.envelope.study_id)
        .bind(site_id)
        .bind(&e.shipment_id)
        .bind(received_at)
        .bind(e.kits.iter().map(|k| k.kit_number.as_str()).collect::<Vec<_>>())
        .bind(e.kits.iter().map(|k| k.sequence_number).collect::<Vec<_>>())
        .bind(e.kits.iter().map(|k| k.kit_type.as_str()).collect::<Vec<_>>())
        .bind(e.kits.iter().map(|k| k.lot.as_str()).collect::<Vec<_>>())
        .bind(expiry)
        .bind(e.kits.iter().map(|k| k.arm_code.as_str()).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}

/// How [`next_kit`] treats a kit another transaction holds (is allocating right now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    /// Passed over: the next free one is taken. Allocators at one site never wait for each other.
    Skip,
    /// Waited for: once the other transaction ends, the kit is taken if it is still available,
    /// or the next one is. Only with the site's row locked (a stock-out or a shipment), so that
    /// no subject starts waiting for a shipment while a kit is merely held by an allocation that
    /// could still roll back.
    Wait,
}

/// Locks and returns the kit of the request's arm and kit type to allocate on `today`: the
/// dispensable one (Do-Not-Dispense, [`super::rules::dispensable`], written here in SQL) with
/// the lowest sequence number, the closest expiry breaking ties ([`super::rules::choose`]);
/// kits held by a concurrent allocation are skipped or waited for as `held` says. The kit is
/// locked until the transaction ends, so no other transaction can allocate it.
pub(crate) async fn next_kit(
    conn: &mut PgConnection,
    schema: &SchemaName,
    request: &Request,
    today: NaiveDate,
    dnd_days: u32,
    held: Held,
) -> Result<Option<Kit>, HandlerError> {
    let lock = match held {
        Held::Skip => "FOR UPDATE SKIP LOCKED",
        Held::Wait => "FOR UPDATE",
    };
    // `expiry_date - n` is the date n days earlier: dispensable while today < expiry - DND.
    let sql = format!(
        "SELECT kit_number, sequence_number, expiry_date FROM {schema}.kit
         WHERE study_id = $1 AND site_id = $2 AND kit_type = $3 AND arm_code = $4 AND status = 'available'
           AND expiry_date - $6::integer > $5::date
         ORDER BY sequence_number, expiry_date LIMIT 1 {lock}"
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(&request.study_id)
        .bind(&request.site_id)
        .bind(&request.kit_type)
        .bind(&request.arm_code)
        .bind(today)
        .bind(i32::try_from(dnd_days).unwrap_or(i32::MAX))
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| {
        Ok(Kit {
            kit_number: r.try_get(0)?,
            sequence_number: r.try_get(1)?,
            kit_type: request.kit_type.clone(),
            arm_code: request.arm_code.clone(),
            expiry: r.try_get(2)?,
            status: KitStatus::Available,
        })
    })
    .transpose()
}

/// A site's stock of one kit type and arm: the `stock_level` key.
pub(crate) type StockKey = (String, String, String, String);

/// Locks the `stock_level` rows of `keys` (study, site, kit type, arm), creating missing ones
/// first, in key order, and returns whether each was low. Held to the commit: one transaction at
/// a time re-counts a key's stock, after every allocation before it has committed.
///
/// Two statements, each in key order, as [`lock_sites`] does: a row one transaction inserts and
/// another needs makes the second wait in its insert, before it locks anything.
pub(crate) async fn lock_stock(
    conn: &mut PgConnection,
    schema: &SchemaName,
    keys: &[&StockKey],
) -> Result<Vec<bool>, HandlerError> {
    let columns = stock_columns(keys);
    let sql = format!(
        "INSERT INTO {schema}.stock_level (study_id, site_id, kit_type, arm_code, countable, low)
         SELECT w.*, 0, false FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
              AS w(study_id, site_id, kit_type, arm_code)
         ORDER BY 1, 2, 3, 4
         ON CONFLICT DO NOTHING"
    );
    bind_stock(sqlx::query(AssertSqlSafe(sql)), &columns).execute(&mut *conn).await?;
    let sql = format!(
        "SELECT study_id, site_id, kit_type, arm_code, low FROM {schema}.stock_level
         WHERE (study_id, site_id, kit_type, arm_code)
               IN (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]))
         ORDER BY 1, 2, 3, 4 FOR UPDATE"
    );
    let rows: Vec<(String, String, String, String, bool)> =
        bind_stock(sqlx::query_as(AssertSqlSafe(sql)), &columns).fetch_all(&mut *conn).await?;
    let low: std::collections::HashMap<StockKey, bool> =
        rows.into_iter().map(|(a, b, c, d, low)| ((a, b, c, d), low)).collect();
    keys.iter()
        .map(|key| {
            low.get(*key).copied().ok_or_else(|| {
                HandlerError::transient(format!("stock_level row of {key:?} vanished under its lock"))
            })
        })
        .collect()
}

/// The available kits of `keys` as (key index, expiry date, how many): what countable stock is
/// counted from ([`super::rules::countable`]), one row per distinct expiry.
pub(crate) async fn available_by_expiry(
    conn: &mut PgConnection,
    schema: &SchemaName,
    keys: &[&StockKey],
) -> Result<Vec<(usize, NaiveDate, i64)>, HandlerError> {
    let columns = stock_columns(keys);
    let sql = format!(
        "SELECT w.i, k.expiry_date, count(*)
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY
              AS w(study_id, site_id, kit_type, arm_code, i)
         JOIN {schema}.kit k USING (study_id, site_id, kit_type, arm_code)
         WHERE k.status = 'available'
         GROUP BY w.i, k.expiry_date"
    );
    let rows: Vec<(i64, NaiveDate, i64)> =
        bind_stock(sqlx::query_as(AssertSqlSafe(sql)), &columns).fetch_all(&mut *conn).await?;
    Ok(rows.into_iter().map(|(i, expiry, n)| ((i - 1) as usize, expiry, n)).collect())
}

/// Records the countable stock and whether it is low, for each key (rows locked by [`lock_stock`]).
pub(crate) async fn record_stock(
    conn: &mut PgConnection,
    schema: &SchemaName,
    keys: &[&StockKey],
    levels: &[(usize, bool)],
) -> Result<(), HandlerError> {
    let columns = stock_columns(keys);
    let sql = format!(
        "UPDATE {schema}.stock_level s SET countable = w.countable, low = w.low
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::integer[], $6::boolean[])
              AS w(study_id, site_id, kit_type, arm_code, countable, low)
         WHERE (s.study_id, s.site_id, s.kit_type, s.arm_code)
               = (w.study_id, w.site_id, w.kit_type, w.arm_code)"
    );
    let countable: Vec<i32> = levels.iter().map(|(n, _)| i32::try_from(*n).unwrap_or(i32::MAX)).collect();
    let low: Vec<bool> = levels.iter().map(|(_, low)| *low).collect();
    bind_stock(sqlx::query(AssertSqlSafe(sql)), &columns)
        .bind(countable)
        .bind(low)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

type StockColumns<'a> = [Vec<&'a str>; 4];

fn stock_columns<'a>(keys: &[&'a StockKey]) -> StockColumns<'a> {
    let mut columns: StockColumns<'a> = Default::default();
    for (study, site, kit_type, arm) in keys {
        columns[0].push(study);
        columns[1].push(site);
        columns[2].push(kit_type);
        columns[3].push(arm);
    }
    columns
}

fn bind_stock<'q, Q: Bindable<'q>>(query: Q, columns: &StockColumns<'q>) -> Q {
    columns.iter().fold(query, |q, column| q.bind_text(column.clone()))
}

/// `bind` of sqlx's query kinds, for [`bind_stock`].
trait Bindable<'q> {
    fn bind_text(self, values: Vec<&'q str>) -> Self;
}

impl<'q> Bindable<'q> for sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    fn bind_text(self, values: Vec<&'q str>) -> Self {
        self.bind(values)
    }
}

impl<'q, O> Bindable<'q> for sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    fn bind_text(self, values: Vec<&'q str>) -> Self {
        self.bind(values)
    }
}

/// Marks `kit` allocated to the request's subject. The primary key of `allocation` makes a second
/// allocation of the same kit impossible whatever the code above did.
pub(crate) async fn allocate(
    conn: &mut PgConnection,
    schema: &SchemaName,
    kit: &Kit,
    request: &Request,
    today: NaiveDate,
    caused_by: Uuid,
) -> Result<(), HandlerError> {
    let sql = format!(
        "UPDATE {schema}.kit SET status = 'allocated'
         WHERE study_id = $1 AND kit_number = $2 AND status = 'available'"
    );
    let done = sqlx::query(AssertSqlSafe(sql))
        .bind(&request.study_id)
        .bind(&kit.kit_number)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() != 1 {
        // Cannot happen under the site lock; if it does, retrying re-reads the inventory.
        return Err(HandlerError::transient(format!("kit {} is no longer available", kit.kit_number)));
    }
    let sql = format!(
        "INSERT INTO {schema}.allocation
             (study_id, kit_number, randomization_number, subject_id, site_id, allocated_on, caused_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7)"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(&request.study_id)
        .bind(&kit.kit_number)
        .bind(&request.randomization_number)
        .bind(&request.subject_id)
        .bind(&request.site_id)
        .bind(today)
        .bind(caused_by)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Whether the randomization already has a kit or is already waiting for one.
pub(crate) async fn known_request(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    randomization_number: &str,
) -> Result<bool, HandlerError> {
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {schema}.allocation WHERE study_id = $1 AND randomization_number = $2)
             OR EXISTS (SELECT 1 FROM {schema}.pending_allocation
                        WHERE study_id = $1 AND randomization_number = $2)"
    );
    Ok(sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(study_id)
        .bind(randomization_number)
        .fetch_one(&mut *conn)
        .await?)
}

pub(crate) async fn add_pending(
    conn: &mut PgConnection,
    schema: &SchemaName,
    request: &Request,
    since: DateTime<Utc>,
) -> Result<(), HandlerError> {
    let sql = format!(
        "INSERT INTO {schema}.pending_allocation (study_id, randomization_number, subject_id, site_id,
                                                  arm_code, kit_type, correlation_id, waiting_since)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(&request.study_id)
        .bind(&request.randomization_number)
        .bind(&request.subject_id)
        .bind(&request.site_id)
        .bind(&request.arm_code)
        .bind(&request.kit_type)
        .bind(request.correlation_id)
        .bind(since)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Subjects waiting for a kit at a site, longest waiting first.
pub(crate) async fn pending_at(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    site_id: &str,
) -> Result<Vec<Request>, HandlerError> {
    let sql = format!(
        "SELECT subject_id, randomization_number, arm_code, kit_type, correlation_id
         FROM {schema}.pending_allocation WHERE study_id = $1 AND site_id = $2
         ORDER BY waiting_since, randomization_number"
    );
    let rows = sqlx::query(AssertSqlSafe(sql)).bind(study_id).bind(site_id).fetch_all(&mut *conn).await?;
    rows.into_iter()
        .map(|r| {
            Ok(Request {
                study_id: study_id.to_string(),
                site_id: site_id.to_string(),
                subject_id: r.try_get(0)?,
                randomization_number: r.try_get(1)?,
                arm_code: r.try_get(2)?,
                kit_type: r.try_get(3)?,
                correlation_id: r.try_get(4)?,
            })
        })
        .collect()
}

pub(crate) async fn remove_pending(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    randomization_number: &str,
) -> Result<(), HandlerError> {
    let sql =
        format!("DELETE FROM {schema}.pending_allocation WHERE study_id = $1 AND randomization_number = $2");
    sqlx::query(AssertSqlSafe(sql)).bind(study_id).bind(randomization_number).execute(&mut *conn).await?;
    Ok(())
}

/// A withdrawn subject stops waiting for a kit. Returns whether they were waiting.
pub(crate) async fn withdraw(
    conn: &mut PgConnection,
    schema: &SchemaName,
    study_id: &str,
    subject_id: &str,
) -> Result<bool, HandlerError> {
    let sql = format!("DELETE FROM {schema}.pending_allocation WHERE study_id = $1 AND subject_id = $2");
    let done = sqlx::query(AssertSqlSafe(sql)).bind(study_id).bind(subject_id).execute(&mut *conn).await?;
    Ok(done.rows_affected() > 0)
}
