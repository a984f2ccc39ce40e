//! Kit shipments received at a site (`POST .../sites/{site_id}/shipments`) and the kits a site
//! holds (`GET .../sites/{site_id}/kits`).
//!
//! A kit's arm is UNBLINDED: KitsReceived goes to the restricted kit-inventory topic (keyed by
//! site id, so a site's stock changes stay in order), and the kit listing shows `arm_code` to
//! pharmacists and admins only; for site staff the key is absent.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection};
use trialflow_http::ApiError;
use trialflow_http::auth::{Principal, Role};
use trialflow_http::input::{MAX_CODE_CHARS, check_id, check_text};
use trialflow_outbox::{AuditRecord, SchemaName};
use trialflow_schemas::{Date, Envelope, Event, KitsReceived, ReceivedKit, Timestamp};

use super::error::conflict_on;
use super::studies::{StudySetup, require_site, require_study};
use super::{Api, CommandRequest, SOURCE_SYSTEM, occurred_at};

/// Most kits one shipment may carry (one request, one transaction, one event).
pub const MAX_KITS_PER_SHIPMENT: usize = 5_000;

/// `POST /v1/studies/{study_id}/sites/{site_id}/shipments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveShipment {
    pub shipment_id: String,
    pub kits: Vec<Kit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kit {
    pub kit_number: String,
    /// Dispensing order at the site: lowest first.
    pub sequence_number: i64,
    pub kit_type: String,
    pub lot: String,
    /// `YYYY-MM-DD`.
    pub expiry_date: String,
    /// UNBLINDED: the treatment the kit holds.
    pub arm_code: String,
}

/// `GET /v1/studies/{study_id}/sites/{site_id}/kits`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KitList {
    pub study_id: String,
    pub site_id: String,
    pub kits: Vec<KitView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KitView {
    pub kit_number: String,
    pub sequence_number: i64,
    pub kit_type: String,
    pub lot: String,
    pub expiry_date: String,
    pub shipment_id: String,
    /// Only for unblinded roles; the key is absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm_code: Option<String>,
}

/// Checks a shipment on its own and returns the kits' expiry dates.
pub fn validate_shipment(req: &ReceiveShipment) -> Result<Vec<NaiveDate>, ApiError> {
    check_id("shipment_id", &req.shipment_id)?;
    if req.kits.is_empty() {
        return Err(ApiError::validation("kits", "a shipment holds at least one kit"));
    }
    if req.kits.len() > MAX_KITS_PER_SHIPMENT {
        return Err(ApiError::validation(
            "kits",
            format!("at most {MAX_KITS_PER_SHIPMENT} kits per shipment; split it"),
        ));
    }
    let mut numbers = HashSet::new();
    let mut expiry = Vec::with_capacity(req.kits.len());
    for (i, kit) in req.kits.iter().enumerate() {
        let field = |name: &str| format!("kits[{i}].{name}");
        check_id(&field("kit_number"), &kit.kit_number)?;
        if !numbers.insert(kit.kit_number.as_str()) {
            return Err(ApiError::validation(
                field("kit_number"),
                format!("kit `{}` is listed twice in this shipment", kit.kit_number),
            ));
        }
        if kit.sequence_number < 0 {
            return Err(ApiError::validation(field("sequence_number"), "must not be negative"));
        }
        check_id(&field("kit_type"), &kit.kit_type)?;
        check_text(&field("lot"), &kit.lot, MAX_CODE_CHARS)?;
        check_id(&field("arm_code"), &kit.arm_code)?;
        let date = NaiveDate::parse_from_str(&kit.expiry_date, "%Y-%m-%d").map_err(|_| {
            ApiError::validation(
                field("expiry_date"),
                format!("`{}` is not a YYYY-MM-DD date", kit.expiry_date),
            )
        })?;
        expiry.push(date);
    }
    if let Some(at) = &req.occurred_at {
        occurred_at(Some(at))?;
    }
    Ok(expiry)
}
// ---- handlers ----------------------------------------------------------------------------------

pub(crate) async fn receive_shipment(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path((study_id, site_id)): Path<(String, String)>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(&[Role::Pharmacist, Role::Admin])?;
    principal.require_site(&study_id, &site_id)?;
    let (key, req): (_, ReceiveShipment) = request.parse()?;
    let expiry = validate_shipment(&req)?;
    let occurred_at = api.occurred_at(req.occurred_at.as_deref())?;
    api.run_once(&principal, key, &request, async |command| {
        let s = &api.schema;
        let setup = StudySetup::require(&mut command.tx, s, &study_id).await?;
        require_site(&mut command.tx, s, &study_id, &site_id).await?;
        check_kits_against_study(&req, &setup)?;
        refuse_received(&mut command.tx, s, &study_id, &req).await?;
        let event = kits_received(&study_id, &site_id, &req, &expiry, &principal, occurred_at);
        insert_shipment(&mut command.tx, s, &event)
            .await
            .map_err(conflict_on("shipment_pk", || shipment_exists(&study_id, &req)))?;
        // A concurrent shipment with one of these kits may have committed first.
        insert_kits(&mut command.tx, s, &event, &expiry)
            .await
            .map_err(conflict_on("kit_number_unique", || kit_number_exists(&study_id, &req, None)))?;
        api.audit(
            &mut command.tx,
            shipment_audit(request.audit(&principal, "kits.received", "shipment", &req.shipment_id), &event),
        )
        .await?;
        command.emit(&event, &site_id).await?;
        let kits = req.kits.len();
        tracing::info!(study_id, site_id, shipment_id = %req.shipment_id, kits, "Received kit shipment.");
        Ok(serde_json::json!({
            "shipment_id": req.shipment_id,
            "kit_numbers": kit_numbers(&req),
            "event_ids": [event.envelope.event_id],
        }))
    })
    .await
}

pub(crate) async fn list_kits(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path((study_id, site_id)): Path<(String, String)>,
) -> Result<axum::Json<KitList>, ApiError> {
    principal.require(&[Role::SiteStaff, Role::Investigator, Role::Pharmacist, Role::Admin])?;
    principal.require_site(&study_id, &site_id)?;
    let s = &api.schema;
    let mut conn = api.pool.acquire().await?;
    require_study(&mut conn, s, &study_id).await?;
    require_site(&mut conn, s, &study_id, &site_id).await?;
    let rows: Vec<(String, i64, String, String, NaiveDate, String, String)> =
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT kit_number, sequence_number, kit_type, lot, expiry_date, shipment_id, arm_code
         FROM {s}.kit WHERE study_id = $1 AND site_id = $2 ORDER BY sequence_number, kit_number"
        )))
        .bind(&study_id)
        .bind(&site_id)
        .fetch_all(&mut *conn)
        .await?;
    let unblinded = principal.role.is_unblinded();
    let kits = rows
        .into_iter()
        .map(|(kit_number, sequence_number, kit_type, lot, expiry_date, shipment_id, arm_code)| KitView {
            kit_number,
            sequence_number,
            kit_type,
            lot,
            expiry_date: expiry_date.format("%Y-%m-%d").to_string(),
            shipment_id,
            arm_code: unblinded.then_some(arm_code),
        })
        .collect();
    Ok(axum::Json(KitList { study_id, site_id, kits }))
}

// ---- the shipment's checks, event and rows -----------------------------------------------------

fn kit_numbers(req: &ReceiveShipment) -> Vec<&str> {
    req.kits.iter().map(|k| k.kit_number.as_str()).collect()
}

/// Every kit's type and arm must be the study's: a kit of another study cannot be dispensed here.
fn check_kits_against_study(req: &ReceiveShipment, setup: &StudySetup) -> Result<(), ApiError> {
    let study_id = &setup.study_id;
    for (i, kit) in req.kits.iter().enumerate() {
        if !setup.kit_types.iter().any(|k| k.kit_type == kit.kit_type) {
            return Err(ApiError::validation(
                format!("kits[{i}].kit_type"),
                format!("`{}` is not a kit type of study `{study_id}`", kit.kit_type),
            ));
        }
        if !setup.arms.iter().any(|a| a.arm_code == kit.arm_code) {
            return Err(ApiError::validation(
                format!("kits[{i}].arm_code"),
                format!("`{}` is not an arm of study `{study_id}`", kit.arm_code),
            ));
        }
    }
    Ok(())
}

fn shipment_exists(study_id: &str, req: &ReceiveShipment) -> ApiError {
    ApiError::conflict(
        "shipment_exists",
        format!("shipment `{}` was already received in study `{study_id}`", req.shipment_id),
    )
    .with_field("shipment_id")
}

/// 409 for kit `i` of the shipment, or for some kit of it when the database does not say which
/// (a concurrent shipment's).
fn kit_number_exists(study_id: &str, req: &ReceiveShipment, i: Option<usize>) -> ApiError {
    let field = i.map_or_else(|| "kits".to_string(), |i| format!("kits[{i}].kit_number"));
    let which = i.and_then(|i| req.kits.get(i)).map_or("a kit", |k| k.kit_number.as_str());
    ApiError::conflict(
        "kit_number_exists",
        format!("kit `{which}` was already received in study `{study_id}`"),
    )
    .with_field(field)
}

/// Refuses (409) a shipment the study already received, or one with a kit it already has: kit
/// numbers are unique within a study, whatever the site.
async fn refuse_received(
    conn: &mut PgConnection,
    s: &SchemaName,
    study_id: &str,
    req: &ReceiveShipment,
) -> Result<(), ApiError> {
    let shipment: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT 1 FROM {s}.shipment WHERE study_id = $1 AND shipment_id = $2"
    )))
    .bind(study_id)
    .bind(&req.shipment_id)
    .fetch_optional(&mut *conn)
    .await?;
    if shipment.is_some() {
        return Err(shipment_exists(study_id, req));
    }
    let numbers = kit_numbers(req);
    let known: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT kit_number FROM {s}.kit WHERE study_id = $1 AND kit_number = ANY($2)"
    )))
    .bind(study_id)
    .bind(&numbers)
    .fetch_all(&mut *conn)
    .await?;
    match numbers.iter().position(|n| known.iter().any(|k| k == n)) {
        Some(i) => Err(kit_number_exists(study_id, req, Some(i))),
        None => Ok(()),
    }
}

/// The audit record of a shipment: the kits received (blinded: number, sequence, type, lot,
/// expiry) and, unblinded, each kit's arm.
fn shipment_audit(record: AuditRecord, event: &KitsReceived) -> AuditRecord {
    let kits: Vec<Value> = event
        .kits
        .iter()
        .map(|k| {
            serde_json::json!({
                "kit_number": k.kit_number,
                "sequence_number": k.sequence_number,
                "kit_type": k.kit_type,
                "lot": k.lot,
                "expiry_date": k.expiry_date.to_naive().map(|d| d.format("%Y-%m-%d").to_string()),
            })
        })
        .collect();
    let arms: serde_json::Map<String, Value> =
        event.kits.iter().map(|k| (k.kit_number.clone(), Value::from(k.arm_code.as_str()))).collect();
    record
        .study(&event.envelope.study_id)
        .site(event.envelope.site_id.as_deref())
        .change("kits", Value::Null, kits)
        .unblinded_change("kit_arms", Value::Null, arms)
}

/// The KitsReceived event of a shipment; its rows are written from it.
fn kits_received(
    study_id: &str,
    site_id: &str,
    req: &ReceiveShipment,
    expiry: &[NaiveDate],
    principal: &Principal,
    occurred_at: Timestamp,
) -> KitsReceived {
    let mut envelope = Envelope::new(KitsReceived::NAME, study_id, SOURCE_SYSTEM, occurred_at);
    envelope.site_id = Some(site_id.to_string());
    envelope.actor = Some(principal.user.clone());
    KitsReceived {
        envelope,
        shipment_id: req.shipment_id.clone(),
        kits: req
            .kits
            .iter()
            .zip(expiry)
            .map(|(k, expiry)| ReceivedKit {
                kit_number: k.kit_number.clone(),
                sequence_number: k.sequence_number,
                kit_type: k.kit_type.clone(),
                lot: k.lot.clone(),
                expiry_date: Date::from(*expiry),
                arm_code: k.arm_code.clone(),
            })
            .collect(),
    }
}

/// The shipment's row, as its event tells it (study, site, receiver, time); the error is left raw
/// so the caller can tell a concurrent duplicate (`shipment_pk`) from other failures.
async fn insert_shipment(
    conn: &mut PgConnection,
    s: &SchemaName,
    event: &KitsReceived,
) -> Result<(), sqlx::Error> {
    let e = &event.envelope;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.shipment (study_id, shipment_id, site_id, received_by, received_at, event_id)
         VALUES ($1, $2, $3, $4, $5, $6)"
    )))
    .bind(&e.study_id)
    .bind(&event.shipment_id)
    .bind(&e.site_id)
    .bind(&e.actor)
    .bind(e.occurred_at.to_datetime().unwrap_or_default())
    .bind(e.event_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// One row per kit of the event, with one statement; `expiry` holds the kits' dates in order.
async fn insert_kits(
    conn: &mut PgConnection,
    s: &SchemaName,
    event: &KitsReceived,
    expiry: &[NaiveDate],
) -> Result<(), sqlx::Error> {
    let kits = &event.kits;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.kit (study_id, kit_number, site_id, shipment_id, sequence_number, kit_type, lot,
                             expiry_date, arm_code)
         SELECT $1, n, $2, $3, q, t, l, e, a
         FROM unnest($4::text[], $5::bigint[], $6::text[], $7::text[], $8::date[], $9::text[])
              AS u(n, q, t, l, e, a)"
    )))
    .bind(&event.envelope.study_id)
    .bind(&event.envelope.site_id)
    .bind(&event.shipment_id)
    .bind(kits.iter().map(|k| k.kit_number.as_str()).collect::<Vec<_>>())
    .bind(kits.iter().map(|k| k.sequence_number).collect::<Vec<_>>())
    .bind(kits.iter().map(|k| k.kit_type.as_str()).collect::<Vec<_>>())
    .bind(kits.iter().map(|k| k.lot.as_str()).collect::<Vec<_>>())
    .bind(expiry)
    .bind(kits.iter().map(|k| k.arm_code.as_str()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipment() -> ReceiveShipment {
        let kit = |n: &str, seq, arm: &str| Kit {
            kit_number: n.into(),
            sequence_number: seq,
            kit_type: "TTS".into(),
            lot: "L-2027-01".into(),
            expiry_date: "2027-03-31".into(),
            arm_code: arm.into(),
        };
        ReceiveShipment {
            shipment_id: "SHP-001".into(),
            kits: vec![kit("K0001", 1, "PBO"), kit("K0002", 2, "XAN_HI")],
            occurred_at: None,
        }
    }

    #[test]
    fn shipments_are_checked_kit_by_kit() {
        assert_eq!(validate_shipment(&shipment()).map(|d| d.len()), Ok(2));
        type Edit = fn(&mut ReceiveShipment);
        let cases: &[(Edit, &str)] = &[
            (|s| s.kits.clear(), "kits"),
            (|s| s.shipment_id = "a b".into(), "shipment_id"),
            (|s| s.kits[1].kit_number = "K0001".into(), "kits[1].kit_number"),
            (|s| s.kits[1].expiry_date = "31.03.2027".into(), "kits[1].expiry_date"),
            (|s| s.kits[0].expiry_date = "2027-02-30".into(), "kits[0].expiry_date"),
            (|s| s.kits[0].sequence_number = -1, "kits[0].sequence_number"),
            (|s| s.kits[0].lot = String::new(), "kits[0].lot"),
            (|s| s.kits[1].arm_code = String::new(), "kits[1].arm_code"),
        ];
        for (edit, field) in cases {
            let mut s = shipment();
            edit(&mut s);
            assert_eq!(validate_shipment(&s).err().and_then(|e| e.field).as_deref(), Some(*field));
        }
    }
}
