//! Which apps may submit: bearer app tokens, checked like the site API's (by digest, so the
//! tokens themselves are not kept and lookup time says nothing about a guess).

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use trialflow_http::ApiError;
use trialflow_http::auth::{bearer_digest, digest};

use super::Gateway;

/// The accepted app tokens.
#[derive(Debug, Clone, Default)]
pub(crate) struct AppTokens(HashSet<[u8; 32]>);

impl AppTokens {
    pub(crate) fn new(tokens: &[String]) -> Self {
        Self(tokens.iter().map(|t| digest(t)).collect())
    }

    pub(crate) fn accepts(&self, authorization: Option<&str>) -> bool {
        bearer_digest(authorization).is_some_and(|d| self.0.contains(&d))
    }
}

/// A request from an app with an accepted token (401 otherwise). Apps share tokens, so the token
/// says nothing about which patient is submitting: the envelope does, and checking it against
/// the study is the validation consumer's job.
#[derive(Debug, Clone, Copy)]
pub(crate) struct App;

impl FromRequestParts<Arc<Gateway>> for App {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, gateway: &Arc<Gateway>) -> Result<Self, ApiError> {
        let authorization = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        if gateway.tokens.accepts(authorization) { Ok(App) } else { Err(ApiError::unauthenticated()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_bearer_tokens_are_accepted() {
        let tokens = AppTokens::new(&["tok".to_string(), "other".to_string()]);
        assert!(tokens.accepts(Some("Bearer tok")));
        assert!(tokens.accepts(Some("bearer  other ")));
        for bad in [None, Some("tok"), Some("Basic tok"), Some("Bearer nope"), Some("Bearer ")] {
            assert!(!tokens.accepts(bad), "{bad:?}");
        }
        assert!(!AppTokens::new(&[]).accepts(Some("Bearer tok")));
    }
}
