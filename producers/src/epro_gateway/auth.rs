//! Which apps may submit: bearer tokens of the `patient_app` role — an identity provider's JWTs
//! (scoped to their studies) or static app tokens (every study; checked by digest, so the tokens
//! themselves are not kept and lookup time says nothing about a guess).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use trialflow_http::ApiError;
use trialflow_http::auth::{Principal, Role, TokenGrant};

use super::Gateway;

/// The user static app tokens authenticate as.
pub const STATIC_APP_USER: &str = "app";

/// Static app tokens as grants of the `patient_app` role.
pub(crate) fn app_grants(tokens: &[String]) -> Vec<TokenGrant> {
    tokens
        .iter()
        .map(|token| TokenGrant {
            token: token.clone(),
            role: Role::PatientApp,
            user: STATIC_APP_USER.to_string(),
        })
        .collect()
}

/// A request from an app with an accepted token (401 otherwise; 403 for a token of another
/// role). Static tokens are shared by apps, so they say nothing about which patient is submitting:
/// the envelope does, and checking it against the study is the validation consumer's job. A JWT
/// limits the studies it may submit to.
#[derive(Debug, Clone)]
pub(crate) struct App(pub(crate) Principal);

impl FromRequestParts<Arc<Gateway>> for App {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, gateway: &Arc<Gateway>) -> Result<Self, ApiError> {
        let authorization = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        let principal = gateway.auth.authenticate(authorization).await?;
        principal.require(&[Role::PatientApp])?;
        Ok(App(principal))
    }
}
