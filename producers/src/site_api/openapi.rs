//! The site API's OpenAPI 3.1 document, `GET /openapi.json` (no token needed).
//!
//! Written by hand (`producers/openapi/site-api.json`, embedded here) because the request and
//! response types are plain serde types; the OpenAPI test (`trialflow/tests/openapi.rs`) keeps it
//! honest: it must list exactly the routes of [`super::ROUTES`] (from which the router is built),
//! each documented request (its examples) must be served and answered with a documented status
//! whose body fits the documented schema, and a foreign validator must accept the document.

use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Response};

/// The document, as served.
pub const DOCUMENT: &str = include_str!("../../openapi/site-api.json");

/// `document` as a JSON answer: the handler of a service's `GET /openapi.json`.
pub fn serve(document: &'static str) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], document).into_response()
}
