//! Kit shipments received at a site (`POST .../sites/{site_id}/shipments`) and the kits a site
//! holds (`GET .../sites/{site_id}/kits`).
//!
//! A kit's arm is UNBLINDED: KitsReceived goes to the restricted kit-inventory topic (keyed by
//! site id, so a site's stock changes stay in order), and the kit listing shows `arm_code` to
//! pharmacists and admins only; for site staff the key is absent.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use sqlx::AssertSqlSafe;
use trialflow_outbox::OutboxEvent;
use trialflow_schemas::{Date, Envelope, Event, KitsReceived, ReceivedKit};

use super::auth::{Principal, Role};
use super::error::{ApiError, unique_violation};
use super::idempotency::{self, Started};
use super::studies::{StudySetup, study_exists};
use super::{Api, CommandRequest, SOURCE_SYSTEM, check_id, check_text, occurred_at};

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
        check_text(&field("lot"), &kit.lot, 64)?;
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

pub(crate) async fn receive_shipment(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path((study_id, site_id)): Path<(String, String)>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    principal.require(&[Role::Pharmacist, Role::Admin])?;
    let key = request.key()?;
    let req: ReceiveShipment = request.json()?;
    let expiry = validate_shipment(&req)?;
    let occurred_at = occurred_at(req.occurred_at.as_deref())?;
    let mut command = match idempotency::start(&api, &principal, key, request.hash()).await? {
        Started::Run(command) => command,
        Started::Replay(response) => return Ok(response),
    };
    let tx = &mut command.tx;
    let s = &api.schema;

    let Some(setup) = StudySetup::load(tx, s, &study_id).await? else {
        return Err(ApiError::not_found(format!("no study `{study_id}`")));
    };
    let site: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT 1 FROM {s}.site WHERE study_id = $1 AND site_id = $2"
    )))
    .bind(&study_id)
    .bind(&site_id)
    .fetch_optional(&mut **tx)
    .await?;
    if site.is_none() {
        return Err(ApiError::not_found(format!("no site `{site_id}` in study `{study_id}`")));
    }
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

    let shipment_exists = || {
        ApiError::conflict(
            "shipment_exists",
            format!("shipment `{}` was already received in study `{study_id}`", req.shipment_id),
        )
        .with_field("shipment_id")
    };
    let kit_number_exists = |i: Option<usize>| {
        let field = i.map_or_else(|| "kits".to_string(), |i| format!("kits[{i}].kit_number"));
        let which = i.and_then(|i| req.kits.get(i)).map_or("a kit", |k| k.kit_number.as_str());
        ApiError::conflict(
            "kit_number_exists",
            format!("kit `{which}` was already received in study `{study_id}`"),
        )
        .with_field(field)
    };
    let shipment: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT 1 FROM {s}.shipment WHERE study_id = $1 AND shipment_id = $2"
    )))
    .bind(&study_id)
    .bind(&req.shipment_id)
    .fetch_optional(&mut **tx)
    .await?;
    if shipment.is_some() {
        return Err(shipment_exists());
    }
    let numbers: Vec<&str> = req.kits.iter().map(|k| k.kit_number.as_str()).collect();
    let known: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT kit_number FROM {s}.kit WHERE study_id = $1 AND kit_number = ANY($2)"
    )))
    .bind(&study_id)
    .bind(&numbers)
    .fetch_all(&mut **tx)
    .await?;
    if let Some(i) = numbers.iter().position(|n| known.iter().any(|k| k == n)) {
        return Err(kit_number_exists(Some(i)));
    }

    let mut envelope = Envelope::new(KitsReceived::NAME, &study_id, SOURCE_SYSTEM, occurred_at);
    envelope.site_id = Some(site_id.clone());
    envelope.actor = Some(principal.user.clone());
    let event = KitsReceived {
        envelope,
        shipment_id: req.shipment_id.clone(),
        kits: req
            .kits
            .iter()
            .zip(&expiry)
            .map(|(k, expiry)| ReceivedKit {
                kit_number: k.kit_number.clone(),
                sequence_number: k.sequence_number,
                kit_type: k.kit_type.clone(),
                lot: k.lot.clone(),
                expiry_date: Date::from(*expiry),
                arm_code: k.arm_code.clone(),
            })
            .collect(),
    };
    let event_id = event.envelope.event_id;

    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.shipment (study_id, shipment_id, site_id, received_by, received_at, event_id)
         VALUES ($1, $2, $3, $4, $5, $6)"
    )))
    .bind(&study_id)
    .bind(&req.shipment_id)
    .bind(&site_id)
    .bind(&principal.user)
    .bind(occurred_at.to_datetime().unwrap_or_default())
    .bind(event_id)
    .execute(&mut **tx)
    .await
    .map_err(|e| if unique_violation(&e) == Some("shipment_pk") { shipment_exists() } else { e.into() })?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.kit (study_id, kit_number, site_id, shipment_id, sequence_number, kit_type, lot,
                             expiry_date, arm_code)
         SELECT $1, n, $2, $3, q, t, l, e, a
         FROM unnest($4::text[], $5::bigint[], $6::text[], $7::text[], $8::date[], $9::text[])
              AS u(n, q, t, l, e, a)"
    )))
    .bind(&study_id)
    .bind(&site_id)
    .bind(&req.shipment_id)
    .bind(&numbers)
    .bind(req.kits.iter().map(|k| k.sequence_number).collect::<Vec<_>>())
    .bind(req.kits.iter().map(|k| k.kit_type.as_str()).collect::<Vec<_>>())
    .bind(req.kits.iter().map(|k| k.lot.as_str()).collect::<Vec<_>>())
    .bind(&expiry)
    .bind(req.kits.iter().map(|k| k.arm_code.as_str()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await
    // A concurrent shipment with one of these kits committed first.
    .map_err(|e| match unique_violation(&e) {
        Some("kit_number_unique") => kit_number_exists(None),
        _ => e.into(),
    })?;

    api.outbox
        .enqueue(tx, OutboxEvent::avro(&event, api.topics.of::<KitsReceived>(), site_id.clone())?)
        .await?;
    let kits = req.kits.len();
    tracing::info!(study_id, site_id, shipment_id = %req.shipment_id, kits, "Received kit shipment.");
    let body = serde_json::json!({
        "shipment_id": req.shipment_id,
        "kit_numbers": numbers,
        "event_ids": [event_id],
    });
    command.finish(&api, StatusCode::CREATED, body).await
}

pub(crate) async fn list_kits(
    State(api): State<Arc<Api>>,
    principal: Principal,
    Path((study_id, site_id)): Path<(String, String)>,
) -> Result<axum::Json<KitList>, ApiError> {
    principal.require(&[Role::SiteStaff, Role::Pharmacist, Role::Admin])?;
    let s = &api.schema;
    let mut conn = api.pool.acquire().await?;
    if !study_exists(&mut conn, s, &study_id).await? {
        return Err(ApiError::not_found(format!("no study `{study_id}`")));
    }
    let site: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT 1 FROM {s}.site WHERE study_id = $1 AND site_id = $2"
    )))
    .bind(&study_id)
    .bind(&site_id)
    .fetch_optional(&mut *conn)
    .await?;
    if site.is_none() {
        return Err(ApiError::not_found(format!("no site `{site_id}` in study `{study_id}`")));
    }
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
