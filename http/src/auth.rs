//! Who is calling: bearer tokens mapped to a user and a role, and what each role may see.
//!
//! Blinding is a property of the role: site staff and researchers are blinded (they never see a
//! treatment arm, a randomization ratio or a kit's arm); admins (study set-up) and pharmacists
//! (unblinded supply) are not. The randomization seed is shown to nobody.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use crate::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Sets up studies and sites; unblinded.
    Admin,
    /// Screens and enrolls subjects; blinded.
    SiteStaff,
    /// Receives kit shipments; unblinded (kits carry their arm).
    Pharmacist,
    /// Reads study set-up; blinded.
    Researcher,
}

impl Role {
    /// Whether the role may see treatment arms (arms, ratios, a kit's arm).
    pub fn is_unblinded(self) -> bool {
        matches!(self, Role::Admin | Role::Pharmacist)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::SiteStaff => "site_staff",
            Role::Pharmacist => "pharmacist",
            Role::Researcher => "researcher",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "site_staff" => Ok(Role::SiteStaff),
            "pharmacist" => Ok(Role::Pharmacist),
            "researcher" => Ok(Role::Researcher),
            other => Err(format!("unknown role `{other}`; use admin, site_staff, pharmacist or researcher")),
        }
    }
}

/// One accepted bearer token. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenGrant {
    pub token: String,
    pub role: Role,
    pub user: String,
}

impl fmt::Debug for TokenGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenGrant")
            .field("token", &"<redacted>")
            .field("role", &self.role)
            .field("user", &self.user)
            .finish()
    }
}

/// The tokens a service accepts: those configured (`*_TOKENS`), or, when that gives none, its
/// local demo tokens if the demo was asked for (`--demo-tokens`); `None` when no caller could be
/// authenticated (the service refuses to start).
pub fn accepted_tokens<T>(
    configured: Option<Vec<T>>,
    demo: bool,
    demo_tokens: impl FnOnce() -> Vec<T>,
) -> Option<Vec<T>> {
    match configured.unwrap_or_default() {
        tokens if !tokens.is_empty() => Some(tokens),
        _ if demo => Some(demo_tokens()),
        _ => None,
    }
}

#[cfg(test)]
mod accepted_tokens_tests {
    use super::accepted_tokens;

    #[test]
    fn configured_tokens_win_and_the_demo_tokens_only_when_asked() {
        let demo = || vec!["demo"];
        assert_eq!(accepted_tokens(Some(vec!["t"]), true, demo), Some(vec!["t"]));
        assert_eq!(accepted_tokens(Some(vec![]), true, demo), Some(vec!["demo"]));
        assert_eq!(accepted_tokens(None, true, demo), Some(vec!["demo"]));
        assert_eq!(accepted_tokens(None, false, demo), None);
        assert_eq!(accepted_tokens(Some(vec![]), false, demo), None);
    }
}

/// Parses `token=role:user` pairs separated by commas (`SITE_API_TOKENS`), e.g.
/// `tok1=admin:alice,tok2=site_staff:bob`. Blanks around items are ignored; an empty string is
/// no tokens.
pub fn parse_tokens(s: &str) -> Result<Vec<TokenGrant>, String> {
    let mut grants: Vec<TokenGrant> = Vec::new();
    for (i, item) in s.split(',').map(str::trim).enumerate() {
        if item.is_empty() {
            continue;
        }
        // Errors name the position and the user, never the token (it may end up in a log).
        let (token, grant) =
            item.split_once('=').ok_or_else(|| format!("token #{} is not `token=role:user`", i + 1))?;
        let (role, user) =
            grant.split_once(':').ok_or_else(|| format!("token #{} is not `token=role:user`", i + 1))?;
        let (token, user) = (token.trim(), user.trim());
        if token.is_empty() || user.is_empty() {
            return Err(format!("token #{} has an empty token or user", i + 1));
        }
        let role = role.trim().parse::<Role>().map_err(|e| format!("token #{} ({user}): {e}", i + 1))?;
        if grants.iter().any(|g| g.token == token) {
            return Err(format!("token #{} ({user}) is given twice", i + 1));
        }
        grants.push(TokenGrant { token: token.to_string(), role, user: user.to_string() });
    }
    Ok(grants)
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub role: Role,
}

impl Principal {
    /// 403 unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            return Ok(());
        }
        let allowed = roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ");
        Err(ApiError::forbidden(format!("role `{}` may not do this; allowed: {allowed}", self.role)))
    }
}

/// Accepted tokens, looked up by their sha256 digest: the lookup time then says nothing useful
/// about how much of a guessed token was right, and the tokens themselves are not kept.
#[derive(Debug, Clone, Default)]
pub struct Tokens(HashMap<[u8; 32], Principal>);

impl Tokens {
    pub fn new(grants: &[TokenGrant]) -> Self {
        Self(
            grants
                .iter()
                .map(|g| (digest(&g.token), Principal { user: g.user.clone(), role: g.role }))
                .collect(),
        )
    }

    /// The caller of an `Authorization` header value (`Bearer <token>`); `None` for any other value.
    pub fn principal(&self, authorization: Option<&str>) -> Option<&Principal> {
        self.0.get(&bearer_digest(authorization)?)
    }
}

/// The digest of the token in an `Authorization: Bearer <token>` value; `None` for any other
/// value. Shared with the ePRO gateway, whose app tokens are looked up the same way.
pub fn bearer_digest(authorization: Option<&str>) -> Option<[u8; 32]> {
    let value = authorization?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    Some(digest(token.trim()))
}

/// The sha256 of a token: how accepted tokens are kept and looked up.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The state of a service whose handlers take the caller as a [`Principal`] argument: where the
/// extractor finds the accepted tokens (the site API's state).
pub trait HasTokens {
    fn tokens(&self) -> &Tokens;
}

impl<S: HasTokens + Send + Sync> FromRequestParts<Arc<S>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<S>) -> Result<Self, ApiError> {
        let authorization = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        state.tokens().principal(authorization).cloned().ok_or_else(ApiError::unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_as_token_role_user() {
        let grants =
            parse_tokens(" tok1=admin:alice, tok2=site_staff:bob ,,tok3=pharmacist:carol,t4=researcher:dan");
        let Ok(grants) = grants else { panic!("valid tokens were rejected: {grants:?}") };
        let got: Vec<_> = grants.iter().map(|g| (g.token.as_str(), g.role, g.user.as_str())).collect();
        assert_eq!(
            got,
            [
                ("tok1", Role::Admin, "alice"),
                ("tok2", Role::SiteStaff, "bob"),
                ("tok3", Role::Pharmacist, "carol"),
                ("t4", Role::Researcher, "dan"),
            ]
        );
        assert_eq!(parse_tokens(""), Ok(vec![]));
    }

    #[test]
    fn bad_token_lists_are_rejected_without_showing_the_token() {
        for bad in [
            "secret",
            "secret=admin",
            "secret=root:alice",
            "=admin:alice",
            "secret=admin:",
            "secret=admin:a,secret=admin:b",
        ] {
            let err = parse_tokens(bad).err();
            assert!(err.as_ref().is_some_and(|e| !e.contains("secret")), "{bad:?} gave {err:?}");
        }
    }

    #[test]
    fn debug_output_hides_the_token() {
        let grant = TokenGrant { token: "s3cr3t".into(), role: Role::Admin, user: "alice".into() };
        assert!(!format!("{grant:?}").contains("s3cr3t"));
    }

    #[test]
    fn bearer_tokens_identify_the_caller() {
        let tokens =
            Tokens::new(&[TokenGrant { token: "tok".into(), role: Role::SiteStaff, user: "bob".into() }]);
        let bob = Some(&Principal { user: "bob".into(), role: Role::SiteStaff });
        assert_eq!(tokens.principal(Some("Bearer tok")), bob);
        assert_eq!(tokens.principal(Some("bearer  tok ")), bob);
        for bad in [None, Some("tok"), Some("Basic tok"), Some("Bearer other"), Some("Bearer ")] {
            assert_eq!(tokens.principal(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_admins_and_pharmacists_are_unblinded() {
        assert!(Role::Admin.is_unblinded() && Role::Pharmacist.is_unblinded());
        assert!(!Role::SiteStaff.is_unblinded() && !Role::Researcher.is_unblinded());
    }
}
