//! Who is calling: a bearer token — an identity provider's JWT (see [`crate::oidc`]) or, for the
//! local demo, a static token — mapped to a [`Principal`]: a user, a role, and the studies and
//! sites the caller may act on ([`Scope`]).
//!
//! Blinding is a property of the role: site staff, investigators and researchers are blinded
//! (they never see a treatment arm, a randomization ratio or a kit's arm); admins (study set-up)
//! and pharmacists (unblinded supply) are not. The randomization seed is shown to nobody.
//!
//! Scope is a property of the token: a JWT names its studies and sites (`*` for all; none when
//! the claim is absent); a static token acts on every study and site (the demo's convenience).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use crate::ApiError;
use crate::oidc::{Oidc, OidcSettings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Sets up studies and sites; unblinded.
    Admin,
    /// Screens and enrolls subjects at their sites; blinded.
    SiteStaff,
    /// A site's investigator: what site staff do, and an emergency code break; blinded.
    Investigator,
    /// Receives kit shipments; unblinded (kits carry their arm).
    Pharmacist,
    /// Reads study set-up and works the alerts of their studies; blinded.
    Researcher,
    /// A patient app submitting questionnaire responses to the ePRO gateway.
    PatientApp,
}

impl Role {
    /// Every role, in the order the docs list them.
    pub const ALL: [Role; 6] = [
        Role::Admin,
        Role::SiteStaff,
        Role::Investigator,
        Role::Pharmacist,
        Role::Researcher,
        Role::PatientApp,
    ];

    /// Whether the role may see treatment arms (arms, ratios, a kit's arm).
    pub fn is_unblinded(self) -> bool {
        matches!(self, Role::Admin | Role::Pharmacist)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::SiteStaff => "site_staff",
            Role::Investigator => "investigator",
            Role::Pharmacist => "pharmacist",
            Role::Researcher => "researcher",
            Role::PatientApp => "patient_app",
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
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
            format!("unknown role `{s}`; use one of {}", names.join(", "))
        })
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

/// The static tokens a service accepts: those configured (`*_TOKENS`), or, when that gives none,
/// its local demo tokens if the demo was asked for (`--demo-tokens`); none at all when an identity
/// provider is configured (`oidc`) instead; `None` when no caller could be authenticated (the
/// service refuses to start).
pub fn accepted_tokens<T>(
    configured: Option<Vec<T>>,
    demo: bool,
    demo_tokens: impl FnOnce() -> Vec<T>,
    oidc: bool,
) -> Option<Vec<T>> {
    match configured.unwrap_or_default() {
        tokens if !tokens.is_empty() => Some(tokens),
        _ if demo => Some(demo_tokens()),
        _ if oidc => Some(Vec::new()),
        _ => None,
    }
}

#[cfg(test)]
mod accepted_tokens_tests {
    use super::accepted_tokens;

    #[test]
    fn configured_tokens_win_and_the_demo_tokens_only_when_asked() {
        let demo = || vec!["demo"];
        assert_eq!(accepted_tokens(Some(vec!["t"]), true, demo, false), Some(vec!["t"]));
        assert_eq!(accepted_tokens(Some(vec![]), true, demo, false), Some(vec!["demo"]));
        assert_eq!(accepted_tokens(None, true, demo, false), Some(vec!["demo"]));
        assert_eq!(accepted_tokens(None, false, demo, false), None);
        assert_eq!(accepted_tokens(Some(vec![]), false, demo, false), None);
        assert_eq!(accepted_tokens(None, false, demo, true), Some(vec![]));
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

/// Ids a caller may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ids {
    All,
    Only(BTreeSet<String>),
}

impl Ids {
    pub fn contains(&self, id: &str) -> bool {
        match self {
            Ids::All => true,
            Ids::Only(ids) => ids.contains(id),
        }
    }

    /// The ids, or `None` for all (a query filter: `study_id = ANY($1)` unless `None`).
    pub fn listed(&self) -> Option<Vec<String>> {
        match self {
            Ids::All => None,
            Ids::Only(ids) => Some(ids.iter().cloned().collect()),
        }
    }
}

/// The studies and sites a caller may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub studies: Ids,
    pub sites: Ids,
}

impl Scope {
    /// Every study and site: static tokens.
    pub const fn everything() -> Self {
        Self { studies: Ids::All, sites: Ids::All }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub role: Role,
    pub scope: Scope,
    /// When the user last authenticated at the identity provider (OIDC `auth_time`, Unix
    /// seconds), when the token says.
    pub auth_time: Option<i64>,
}

impl Principal {
    /// A caller of a static token: every study and site.
    pub fn unscoped(user: impl Into<String>, role: Role) -> Self {
        Self { user: user.into(), role, scope: Scope::everything(), auth_time: None }
    }

    /// 403 unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            return Ok(());
        }
        let allowed = roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ");
        Err(ApiError::forbidden(format!("role `{}` may not do this; allowed: {allowed}", self.role)))
    }

    /// 403 `out_of_scope` unless the caller may act on `study_id`.
    pub fn require_study(&self, study_id: &str) -> Result<(), ApiError> {
        if self.scope.studies.contains(study_id) {
            return Ok(());
        }
        Err(ApiError::out_of_scope(format!("study `{study_id}` is not among the studies of your token")))
    }

    /// 403 `out_of_scope` unless the caller may act on `site_id` of `study_id`.
    pub fn require_site(&self, study_id: &str, site_id: &str) -> Result<(), ApiError> {
        self.require_study(study_id)?;
        if self.scope.sites.contains(site_id) {
            return Ok(());
        }
        Err(ApiError::out_of_scope(format!("site `{site_id}` is not among the sites of your token")))
    }

    /// 401 `authentication_too_old` unless the user signed in at the identity provider at most
    /// `max_age_secs` before `now` (Unix seconds) — the token's `auth_time`. A token without
    /// `auth_time` (every static token) never counts as fresh.
    pub fn require_fresh_authentication(&self, max_age_secs: u64, now: i64) -> Result<(), ApiError> {
        let max_age = i64::try_from(max_age_secs).unwrap_or(i64::MAX);
        match self.auth_time {
            Some(at) if at <= now.saturating_add(60) && now.saturating_sub(at) <= max_age => Ok(()),
            Some(_) => Err(ApiError::authentication_too_old(
                max_age_secs,
                format!(
                    "sign in again: this needs a sign-in at most {max_age_secs} s old (the token's auth_time)"
                ),
            )),
            None => Err(ApiError::authentication_too_old(
                max_age_secs,
                format!(
                    "sign in again at the identity provider: this needs a token with an auth_time at most \
                     {max_age_secs} s old"
                ),
            )),
        }
    }

    /// Whether the caller acts on every site (a subject lookup then may answer 404: nothing is
    /// revealed to someone who may see every site anyway).
    pub fn all_sites(&self) -> bool {
        self.scope.sites == Ids::All
    }
}

/// Accepted static tokens, looked up by their sha256 digest: the lookup time then says nothing
/// useful about how much of a guessed token was right, and the tokens themselves are not kept.
#[derive(Debug, Clone, Default)]
pub struct Tokens(HashMap<[u8; 32], Principal>);

impl Tokens {
    pub fn new(grants: &[TokenGrant]) -> Self {
        Self(grants.iter().map(|g| (digest(&g.token), Principal::unscoped(g.user.clone(), g.role))).collect())
    }

    /// The caller of an `Authorization` header value (`Bearer <token>`); `None` for any other value.
    pub fn principal(&self, authorization: Option<&str>) -> Option<&Principal> {
        self.0.get(&digest(bearer(authorization)?))
    }
}

/// The token of an `Authorization: Bearer <token>` value; `None` for any other value.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let value = authorization?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The digest of the token in an `Authorization: Bearer <token>` value; `None` for any other
/// value (the rate limiter's key of a caller).
pub fn bearer_digest(authorization: Option<&str>) -> Option<[u8; 32]> {
    bearer(authorization).map(digest)
}

/// The sha256 of a token: how accepted tokens are kept and looked up.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// How a service authenticates its callers: static tokens (the local demo's, or configured ones),
/// an identity provider's JWTs, or both.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    tokens: Tokens,
    oidc: Option<Arc<Oidc>>,
}

impl Authenticator {
    pub fn new(tokens: Tokens, oidc: Option<Arc<Oidc>>) -> Self {
        Self { tokens, oidc }
    }

    /// The static `tokens` and, when configured, the identity provider (its JWKS read now: an
    /// error when it cannot be).
    pub async fn start(tokens: &[TokenGrant], oidc: Option<&OidcSettings>) -> Result<Self, String> {
        let oidc = match oidc {
            Some(settings) => Some(Oidc::start(settings.clone()).await?),
            None => None,
        };
        Ok(Self::new(Tokens::new(tokens), oidc))
    }

    /// Whether any caller could be authenticated.
    pub fn accepts_anyone(&self) -> bool {
        !self.tokens.0.is_empty() || self.oidc.is_some()
    }

    /// The caller of an `Authorization` header value, or 401 with the reason: `missing_token`,
    /// `unknown_token` (not a static token, and not a JWT while OIDC is on), or the reason a JWT
    /// was refused (see [`Refusal::code`]).
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, ApiError> {
        let Some(token) = bearer(authorization) else {
            return Err(ApiError::unauthenticated());
        };
        if let Some(principal) = self.tokens.0.get(&digest(token)) {
            return Ok(principal.clone());
        }
        match &self.oidc {
            // Not a static token: with a provider configured, it must be one of its JWTs.
            Some(oidc) => oidc.verify(token).await.map_err(|refusal| {
                tracing::debug!(reason = refusal.code(), "Bearer token refused.");
                ApiError::unauthenticated_because(refusal.code(), refusal.message())
            }),
            None => {
                Err(ApiError::unauthenticated_because("unknown_token", "the bearer token is not accepted"))
            }
        }
    }
}

/// The state of a service whose handlers take the caller as a [`Principal`] argument: where the
/// extractor finds how to authenticate.
pub trait HasAuth {
    fn auth(&self) -> &Authenticator;
}

impl<S: HasAuth + Send + Sync> FromRequestParts<Arc<S>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<S>) -> Result<Self, ApiError> {
        let authorization = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        state.auth().authenticate(authorization).await
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
        let bob = Some(&Principal::unscoped("bob", Role::SiteStaff));
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
        assert!(!Role::Investigator.is_unblinded() && !Role::PatientApp.is_unblinded());
    }

    #[test]
    fn roles_read_back_from_their_names() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().is_err_and(|e| e.contains("patient_app")));
    }

    #[test]
    fn scope_limits_studies_and_sites() {
        let only = |ids: &[&str]| Ids::Only(ids.iter().map(|s| s.to_string()).collect());
        let sam = Principal {
            scope: Scope { studies: only(&["S1"]), sites: only(&["701"]) },
            ..Principal::unscoped("sam", Role::SiteStaff)
        };
        assert!(sam.require_site("S1", "701").is_ok());
        for (study, site) in [("S1", "702"), ("S2", "701")] {
            let refused = sam.require_site(study, site).err();
            assert_eq!(
                refused.map(|e| (e.status.as_u16(), e.code)),
                Some((403, "out_of_scope")),
                "{study}/{site}"
            );
        }
        assert!(!sam.all_sites() && Principal::unscoped("ada", Role::Admin).all_sites());
        assert_eq!(only(&["b", "a"]).listed(), Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(Ids::All.listed(), None);
    }

    #[test]
    fn fresh_authentication_is_an_auth_time_within_the_age_and_not_ahead_of_the_clock() {
        let now = 1_800_000_000;
        let signed_in =
            |at: Option<i64>| Principal { auth_time: at, ..Principal::unscoped("ian", Role::Investigator) };
        assert!(signed_in(Some(now - 300)).require_fresh_authentication(300, now).is_ok());
        assert!(signed_in(Some(now + 30)).require_fresh_authentication(300, now).is_ok(), "clock skew");
        for stale in [None, Some(now - 301), Some(now + 3_600), Some(i64::MIN)] {
            let refused = signed_in(stale).require_fresh_authentication(300, now).err();
            assert_eq!(
                refused.as_ref().map(|e| (e.status, e.reason, e.max_auth_age)),
                Some((axum::http::StatusCode::UNAUTHORIZED, Some("authentication_too_old"), Some(300))),
                "{stale:?}"
            );
        }
    }
}
