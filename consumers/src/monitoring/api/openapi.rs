//! The alert API's OpenAPI 3.1 document, generated: [`super::routes`] registers every handler
//! with utoipa-axum's `routes!`, which builds the router and the document from the same
//! `#[utoipa::path]` annotations, so no route is served undocumented or documented unserved.
//! This module adds what belongs to no single handler: the document's info, the error body, the
//! shared error answers and the two ways to send a token.
//!
//! Served at `GET /openapi.json` (no token needed). A copy is committed as
//! `consumers/openapi/alert-api.json` for readers and tools; the OpenAPI test
//! (`trialflow/tests/openapi.rs`) fails when it differs from the generated document.

use std::borrow::Cow;
use std::sync::LazyLock;

use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Response};
use utoipa::Modify;
use utoipa::openapi::header::Header;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{AdditionalProperties, KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Object, Ref, RefOr, Required, Schema};

/// The alert id of the document's examples (`GET /v1/alerts/{alert_id}` and the decisions).
pub const EXAMPLE_ALERT_ID: &str = "0190f3c2-7a4e-7c1d-9b2a-5e8f4d3c2b1a";

/// What the document says before its paths.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "trialflow alert API",
        description = "The researchers' alert API: the alerts the monitoring service raises, \
            their evidence and timeline, the two decisions researchers take on them (acknowledge, \
            resolve), a live stream of changes, the inbox page, and the dashboard (a study's site \
            risk table and funnel plots, sites, subjects' vital signs) with its data.\n\n\
            **Tokens.** Every `/v1` route needs a researcher's or an admin's token as \
            `Authorization: Bearer <token>` (401 without a valid one, 403 for other roles); the \
            stream also takes it as `?access_token=`, because browsers' `EventSource` cannot \
            send headers. The pages, probes and this document need none.\n\n\
            **Errors** are `{\"error\": {\"code\", \"message\", \"field\"?}}`: `code` is \
            machine-readable, `field` names the parameter, path segment or body field to blame. \
            On every route, a control character in (or a value beyond 2,048 characters of) a \
            query parameter or path segment is refused with 422 `invalid_characters` / \
            `too_long`, and a body beyond 64 KiB with 413 `payload_too_large`, before the route \
            reads anything. Every route but the probes is rate limited per token and per client \
            address (429 `rate_limited`, with `Retry-After`), and a request that takes longer than \
            the service's request timeout is stopped, keeping nothing it did (503 `timeout`, with \
            `Retry-After`); a stream's events are not cut.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(
        schemas(ErrorBody),
        responses(
            Unauthenticated,
            Forbidden,
            NoSuchAlert,
            NotKnown,
            InvalidId,
            InvalidText,
            InvalidReason,
            BadBody,
            TooLarge,
            AckConflict,
            ResolveConflict,
            Internal,
            Unavailable,
            RateLimited
        )
    ),
    modifiers(&TokenSchemes),
    tags(
        (name = "alerts", description = "Alerts, their detail, the decisions on them and the stream of changes."),
        (name = "dashboard", description = "The researcher dashboard's data: a study's site risk table and funnel limits, a site, a subject's vital signs with their thresholds and alerts."),
        (name = "pages", description = "The researcher's inbox and dashboard pages (static; they ask the API with the researcher's token)."),
        (name = "queries", description = "The risk service's data queries: the list, and closing an answered one."),
        (name = "service", description = "Probes and this document."),
    )
)]
pub(super) struct ApiDoc;

/// The two ways a token travels.
struct TokenSchemes;

impl Modify for TokenSchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A researcher's or an admin's API token."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "access_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "access_token",
                "The same token as a query parameter; only `GET /v1/alerts/stream` takes it.",
            ))),
        );
    }
}

/// A string schema with the values `allowed`.
pub(super) fn one_of(allowed: &[&str], description: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(allowed.iter().copied()))
        .description(Some(description))
        .build()
}

/// The body of every error answer (`trialflow_http::ApiError`).
pub(super) struct ErrorBody;

impl utoipa::PartialSchema for ErrorBody {
    fn schema() -> RefOr<Schema> {
        let text =
            |description: &str| ObjectBuilder::new().schema_type(Type::String).description(Some(description));
        let detail = ObjectBuilder::new()
            .property("code", text("Machine-readable reason, e.g. `invalid_parameter`."))
            .required("code")
            .property("message", text("What was wrong and what to do, for people."))
            .required("message")
            .property("field", text("The parameter, path segment or body field to blame, when there is one."))
            .property("reason", text("Why a bearer token was refused (401 only), e.g. `token_expired`."))
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        ObjectBuilder::new()
            .property("error", detail)
            .required("error")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .description(Some("An error answer."))
            .into()
    }
}

impl utoipa::ToSchema for ErrorBody {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Error")
    }
}

/// An error answer of `description`, with the headers it carries.
fn error_response(description: &str, headers: &[(&str, &str)]) -> RefOr<utoipa::openapi::Response> {
    let body = ContentBuilder::new().schema(Some(Ref::from_schema_name("Error"))).build();
    let mut response = ResponseBuilder::new().description(description).content("application/json", body);
    for (name, what) in headers {
        let mut header = Header::default();
        header.description = Some((*what).to_string());
        response = response.header(*name, header);
    }
    response.build().into()
}

/// Error answers shared by several operations, each a `components/responses` entry.
macro_rules! error_responses {
    ($($name:ident: $description:expr $(, $header:literal = $what:literal)*;)*) => {$(
        pub(super) struct $name;

        impl<'r> utoipa::ToResponse<'r> for $name {
            fn response() -> (&'r str, RefOr<utoipa::openapi::Response>) {
                (stringify!($name), error_response($description, &[$(($header, $what)),*]))
            }
        }
    )*};
}

error_responses! {
    Unauthenticated: "`unauthenticated`: no valid token.",
        "WWW-Authenticate" = "`Bearer`";
    Forbidden: "`forbidden`: the token's role may not use this API (researchers and admins may); \
        `out_of_scope`: the alert's study, or the `study_id` asked for, is not among the token's.";
    NoSuchAlert: "`not_found`: no alert with this id (an id that is not a UUID names none either).";
    NotKnown: "`not_found`: neither the risk nor the monitoring service knows this study, site or \
        subject (a subject of a site outside the token's sites is not found either).";
    InvalidId: "`validation_failed`: a path segment that is not an id (1 to 64 letters, digits, \
        `.`, `_`, `-`); `invalid_characters` or `too_long`: a control character in, or an \
        over-long, path segment or query value (`field` names it).";
    InvalidText: "`invalid_characters` or `too_long`: a control character in, or an over-long, \
        query value or path segment (`field` names it).";
    InvalidReason: "`validation_failed` (the reason is missing or blank), `invalid_characters` \
        (a control character other than tab and line breaks) or `too_long` (over 2,000 \
        characters); `field` names it.";
    BadBody: "`invalid_json` (not JSON, or a value that does not fit; `field` names it), \
        `duplicate_key` or `invalid_body`.";
    TooLarge: "`payload_too_large`: a body beyond 64 KiB.";
    AckConflict: "`already_acknowledged` or `already_resolved`: only an open alert can be \
        acknowledged.";
    ResolveConflict: "`already_resolved`.";
    Internal: "`internal`: a fault of the service.";
    Unavailable: "`unavailable`: the database is unreachable or busy; or `timeout`: the request \
        took longer than the request timeout and was stopped, its transaction rolled back. Retry.",
        "Retry-After" = "Seconds to wait before retrying.";
    RateLimited: "`rate_limited`: more requests than this token's or this address's rate limit; \
        retry after `Retry-After` seconds.",
        "Retry-After" = "Whole seconds to wait before retrying (at least 1).";
}

/// The `{alert_id}` path parameter.
pub(super) struct AlertIdParam;

impl utoipa::IntoParams for AlertIdParam {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let uuid = ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)));
        vec![
            ParameterBuilder::new()
                .name("alert_id")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some("The alert's id."))
                .schema(Some(uuid))
                .example(Some(serde_json::json!(EXAMPLE_ALERT_ID)))
                .build(),
        ]
    }
}

/// The document, built once: the same routes as the router, from [`super::routes`].
pub(super) static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> =
    LazyLock::new(|| with_rate_limits(super::routes().split_for_parts().1));

/// `doc` with a 429 answer on every operation the rate limits apply to (all but the probes):
/// they are the middleware's, not any handler's.
fn with_rate_limits(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    for (path, item) in doc.paths.paths.iter_mut() {
        if trialflow_http::limits::PROBES.contains(&path.as_str()) {
            continue;
        }
        let operations = [&mut item.get, &mut item.post, &mut item.put, &mut item.patch, &mut item.delete];
        for operation in operations.into_iter().flatten() {
            let rate_limited = RefOr::Ref(Ref::from_response_name("RateLimited"));
            operation.responses.responses.insert("429".to_string(), rate_limited);
        }
    }
    doc
}

/// The document as JSON.
pub fn document() -> serde_json::Value {
    serde_json::to_value(&*DOCUMENT).unwrap_or_else(|e| {
        tracing::error!(error = %e, "The OpenAPI document does not serialize.");
        serde_json::Value::Null
    })
}

/// This document
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "service",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API.", content_type = "application/json", body = Object)),
)]
pub(super) async fn openapi_json() -> Response {
    static JSON: LazyLock<String> = LazyLock::new(|| document().to_string());
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], JSON.as_str()).into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// `(METHOD, path)` of every operation of the document.
    fn operations(doc: &serde_json::Value) -> BTreeSet<(String, String)> {
        let mut found = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for method in item.as_object().into_iter().flat_map(|m| m.keys()) {
                found.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
        found
    }

    #[test]
    fn the_document_has_an_operation_for_every_route_and_no_other() {
        let doc = document();
        let routes: BTreeSet<(String, String)> =
            super::super::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        assert_eq!(operations(&doc), routes);
        assert_eq!(doc["openapi"], "3.1.0");
    }
}
