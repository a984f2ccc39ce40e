//! OpenID Connect bearer tokens: JWTs an identity provider signs, checked against its published
//! keys (a JWKS, from a file or a URL).
//!
//! What a token must be to be accepted ([`Oidc::verify`]):
//!
//! * a JWS in compact form, at most [`MAX_TOKEN_BYTES`];
//! * signed with an asymmetric algorithm (RS/PS 256–512, ES256/ES384, EdDSA) by a key of the JWKS,
//!   chosen by the header's `kid` (a JWKS of one key also takes tokens without `kid`). `alg: none`
//!   and HMAC (`HS*`) are refused before anything else: an HMAC token "signed" with the provider's
//!   public key as its secret is the classic confusion attack, and no key of a JWKS is ever used
//!   as a shared secret (`oct` keys in the JWKS are ignored);
//! * `iss` equal to the configured issuer, `aud` naming the configured audience, `exp` in the future
//!   and `nbf` (when present) in the past, each with [`OidcSettings::leeway_secs`] of clock skew
//!   allowed (default 60 s);
//! * carrying the user (claim `sub` by default), exactly one trialflow role among the values of the
//!   role claim, and the studies and sites it may act on (see [`crate::auth::Scope`]). Claim names
//!   are configurable and may be dotted paths into nested objects (`realm_access.roles`).
//!
//! A refusal is a [`Refusal`], whose [`Refusal::code`] the services send as the 401's `reason`.
//!
//! **Keys.** The JWKS is read when the service starts (it does not start without one), re-read
//! every [`OidcSettings::refresh_secs`] in the background (a failed read keeps the keys it has and
//! is logged), and re-read at once when a token names a `kid` it does not know — the provider
//! rotated its keys — at most once per [`MIN_REFRESH_INTERVAL`], so tokens with made-up `kid`s
//! cannot make the service hammer the provider.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::Args;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde_json::Value;
use trialflow_outbox::config::setting;

use crate::auth::{Ids, Principal, Role, Scope};

/// The longest token considered; longer ones are refused as malformed before any decoding.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The largest JWKS document read.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// An unknown `kid` re-reads the JWKS at most this often.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// How long a JWKS download may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest user name, study id or site id a token may carry.
const MAX_CLAIM_CHARS: usize = 256;

/// The identity provider's settings, shared by the site API, the ePRO gateway and the alert API
/// (one provider, one set of variables). OIDC is on when `OIDC_ISSUER` is set; the audience and
/// the JWKS are then required.
#[derive(Debug, Clone, Args)]
pub struct OidcArgs {
    /// Issuer of accepted tokens, exactly as in their `iss` claim (e.g.
    /// `https://idp.example.org/realms/trial`). Unset: no OIDC tokens are accepted.
    #[arg(long = "oidc-issuer", env = "OIDC_ISSUER", value_name = "URL", value_parser = setting(claim_value))]
    pub issuer: Option<String>,

    /// Audience the tokens must name in `aud` (the client id the provider issues them for).
    #[arg(long = "oidc-audience", env = "OIDC_AUDIENCE", value_name = "AUD", value_parser = setting(claim_value))]
    pub audience: Option<String>,

    /// The provider's signing keys: an `https://` (or `http://`) URL of its JWKS (its discovery
    /// document's `jwks_uri`), or a path to a JWKS file.
    #[arg(long = "oidc-jwks", env = "OIDC_JWKS", value_name = "URL|FILE", value_parser = setting(claim_value))]
    pub jwks: Option<String>,

    /// Clock skew allowed on `exp` and `nbf`, in seconds (at most 300).
    #[arg(long = "oidc-leeway-secs", env = "OIDC_LEEWAY_SECS", value_name = "SECS", default_value_t = 60, value_parser = setting(leeway))]
    pub leeway_secs: u64,

    /// How often the JWKS is re-read, in seconds (10 to 86400).
    #[arg(long = "oidc-jwks-refresh-secs", env = "OIDC_JWKS_REFRESH_SECS", value_name = "SECS", default_value_t = 300, value_parser = setting(refresh))]
    pub refresh_secs: u64,

    /// Claim naming the user (a dotted path for nested claims).
    #[arg(long = "oidc-user-claim", env = "OIDC_USER_CLAIM", value_name = "CLAIM", default_value = "sub", value_parser = setting(claim_name))]
    pub user_claim: String,

    /// Claim holding the trialflow role: a string or an array of strings of which exactly one is
    /// a trialflow role (admin, site_staff, investigator, pharmacist, researcher, patient_app).
    #[arg(long = "oidc-role-claim", env = "OIDC_ROLE_CLAIM", value_name = "CLAIM", default_value = "trialflow_role", value_parser = setting(claim_name))]
    pub role_claim: String,

    /// Claim holding the studies the user may act on: an array of study ids or a string of ids
    /// separated by spaces or commas; `*` is every study. Absent: none.
    #[arg(long = "oidc-studies-claim", env = "OIDC_STUDIES_CLAIM", value_name = "CLAIM", default_value = "trialflow_studies", value_parser = setting(claim_name))]
    pub studies_claim: String,

    /// Claim holding the sites the user may act on, like the studies claim. Absent: none.
    #[arg(long = "oidc-sites-claim", env = "OIDC_SITES_CLAIM", value_name = "CLAIM", default_value = "trialflow_sites", value_parser = setting(claim_name))]
    pub sites_claim: String,
}

impl OidcArgs {
    /// The settings, or `None` when no issuer is configured (OIDC off).
    pub fn settings(&self) -> Result<Option<OidcSettings>, String> {
        let Some(issuer) = self.issuer.clone() else {
            if self.audience.is_some() || self.jwks.is_some() {
                return Err(
                    "OIDC_AUDIENCE or OIDC_JWKS is set without OIDC_ISSUER: set the issuer too".into()
                );
            }
            return Ok(None);
        };
        let audience = self.audience.clone().ok_or("OIDC_ISSUER is set: set OIDC_AUDIENCE too")?;
        let jwks = self.jwks.clone().ok_or("OIDC_ISSUER is set: set OIDC_JWKS (a JWKS URL or file) too")?;
        Ok(Some(OidcSettings {
            issuer,
            audience,
            jwks: JwksSource::parse(&jwks),
            leeway_secs: self.leeway_secs,
            refresh_secs: self.refresh_secs,
            user_claim: self.user_claim.clone(),
            role_claim: self.role_claim.clone(),
            studies_claim: self.studies_claim.clone(),
            sites_claim: self.sites_claim.clone(),
        }))
    }
}

/// The settings of an in-process service (`trialflow run`, the demo), read leniently from the
/// environment (`refused` lists the variables that did not parse): an error when any OIDC
/// variable was refused or they do not fit together — the service then accepts no one rather
/// than fall back to demo tokens; logged.
pub fn local_settings(args: &OidcArgs, refused: &[String]) -> Result<Option<OidcSettings>, String> {
    let result = match refused.iter().find(|var| var.starts_with("OIDC_")) {
        Some(var) => Err(format!("{var} is not valid")),
        None => args.settings(),
    };
    if let Err(e) = &result {
        tracing::error!(error = %e, "Identity provider misconfigured: no caller will be accepted.");
    }
    result
}

fn claim_value(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() || s.chars().any(char::is_control) || s.len() > 2048 {
        return Err("must be 1 to 2048 characters without control characters".into());
    }
    Ok(s.to_string())
}

fn claim_name(s: &str) -> Result<String, String> {
    let s = s.trim();
    let fine = |part: &str| {
        !part.is_empty()
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '/'))
    };
    if s.len() > 256 || !s.split('.').all(fine) {
        return Err("must be a claim name or a dotted path of them (letters, digits, `_-:/`)".into());
    }
    Ok(s.to_string())
}

fn leeway(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n <= 300 => Ok(n),
        _ => Err("must be a whole number of seconds from 0 to 300".into()),
    }
}

fn refresh(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if (10..=86_400).contains(&n) => Ok(n),
        _ => Err("must be a whole number of seconds from 10 to 86400".into()),
    }
}

/// Where the keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    Url(String),
    File(std::path::PathBuf),
}

impl JwksSource {
    fn parse(s: &str) -> Self {
        if s.starts_with("https://") || s.starts_with("http://") {
            Self::Url(s.to_string())
        } else {
            Self::File(s.into())
        }
    }
}

/// See [`OidcArgs`] for each setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcSettings {
    pub issuer: String,
    pub audience: String,
    pub jwks: JwksSource,
    pub leeway_secs: u64,
    pub refresh_secs: u64,
    pub user_claim: String,
    pub role_claim: String,
    pub studies_claim: String,
    pub sites_claim: String,
}

impl OidcSettings {
    /// Settings with the default claim names, leeway and refresh period; `jwks` a URL or a file.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>, jwks: &str) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            jwks: JwksSource::parse(jwks),
            leeway_secs: 60,
            refresh_secs: 300,
            user_claim: "sub".into(),
            role_claim: "trialflow_role".into(),
            studies_claim: "trialflow_studies".into(),
            sites_claim: "trialflow_sites".into(),
        }
    }
}

/// Why a token was refused; [`Refusal::code`] is the reason the 401 names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a compact JWS, or parts that do not decode.
    Malformed,
    /// `alg: none`: an unsigned token.
    AlgNone,
    /// An algorithm that is not accepted: HMAC, or not the one the key is for.
    AlgorithmNotAllowed(String),
    /// No key of the JWKS has the token's `kid` (none given when the JWKS has several).
    UnknownKid,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    MissingClaim(String),
    InvalidClaim(String),
    /// The role claim holds no trialflow role, or more than one.
    NoRole,
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed_token",
            Self::AlgNone => "alg_none",
            Self::AlgorithmNotAllowed(_) => "algorithm_not_allowed",
            Self::UnknownKid => "unknown_kid",
            Self::BadSignature => "bad_signature",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::MissingClaim(_) => "missing_claim",
            Self::InvalidClaim(_) => "invalid_claim",
            Self::NoRole => "no_role",
        }
    }

    /// For the caller: what is wrong, never the token or its claims' values.
    pub fn message(&self) -> String {
        match self {
            Self::Malformed => "the bearer token is not a well-formed JWT".into(),
            Self::AlgNone => "unsigned tokens (`alg: none`) are refused".into(),
            Self::AlgorithmNotAllowed(alg) => format!("tokens signed with `{alg}` are refused"),
            Self::UnknownKid => "no key of the identity provider has the token's `kid`".into(),
            Self::BadSignature => "the token's signature does not verify".into(),
            Self::Expired => "the token has expired".into(),
            Self::NotYetValid => "the token is not valid yet (`nbf`)".into(),
            Self::WrongIssuer => "the token is from another issuer".into(),
            Self::WrongAudience => "the token is for another audience".into(),
            Self::MissingClaim(claim) => format!("the token lacks the `{claim}` claim"),
            Self::InvalidClaim(claim) => format!("the token's `{claim}` claim is not of the expected form"),
            Self::NoRole => "the token's role claim holds no trialflow role, or more than one".into(),
        }
    }
}

/// One usable key of the JWKS.
struct Key {
    decoding: DecodingKey,
    algorithms: Vec<Algorithm>,
}

struct KeySet {
    /// By `kid`; a key without one under `""`.
    keys: HashMap<String, Arc<Key>>,
    read_at: Instant,
}

/// A token verifier for one identity provider. Cheap to share (`Arc`).
pub struct Oidc {
    settings: OidcSettings,
    client: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    /// One JWKS read at a time.
    reading: tokio::sync::Mutex<()>,
    /// When an unknown `kid` last made the JWKS be re-read.
    kid_reread_at: std::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl Oidc {
    /// Reads the JWKS (an error when it cannot be read or holds no usable key) and starts
    /// re-reading it every `refresh_secs` while the verifier lives.
    pub async fn start(settings: OidcSettings) -> Result<Arc<Self>, String> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the JWKS client: {e}"))?;
        let keys = read_keys(&client, &settings.jwks).await?;
        let oidc = Arc::new(Self {
            settings,
            client,
            keys: RwLock::new(Arc::new(keys)),
            reading: tokio::sync::Mutex::new(()),
            kid_reread_at: std::sync::Mutex::new(None),
        });
        let period = Duration::from_secs(oidc.settings.refresh_secs);
        tokio::spawn(refresh_periodically(Arc::downgrade(&oidc), period));
        Ok(oidc)
    }

    pub fn settings(&self) -> &OidcSettings {
        &self.settings
    }

    fn key_set(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Re-reads the JWKS unless it was read less than `min_age` ago; keeps the old keys when the
    /// read fails.
    async fn reread(&self, min_age: Duration) {
        let _one = self.reading.lock().await;
        if self.key_set().read_at.elapsed() < min_age {
            return;
        }
        match read_keys(&self.client, &self.settings.jwks).await {
            Ok(keys) => {
                tracing::debug!(keys = keys.keys.len(), "JWKS read.");
                *self.keys.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(keys);
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot re-read the identity provider's JWKS; keeping the keys read before.");
                // Do not retry on every unknown kid until the next allowance.
                let old = self.key_set();
                let kept = KeySet { keys: old.keys.clone(), read_at: Instant::now() };
                *self.keys.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(kept);
            }
        }
    }

    /// The caller of a token, or why it is refused.
    pub async fn verify(&self, token: &str) -> Result<Principal, Refusal> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::Malformed);
        }
        let header = TokenHeader::read(token)?;
        let key = match self.find_key(header.kid.as_deref()) {
            Some(key) => key,
            None => {
                // The provider may have rotated its keys: re-read, unless a kid did that lately.
                let due = {
                    let mut last = self.kid_reread_at.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    let due = last.is_none_or(|at| at.elapsed() >= MIN_REFRESH_INTERVAL);
                    if due {
                        *last = Some(Instant::now());
                    }
                    due
                };
                if due {
                    self.reread(Duration::ZERO).await;
                }
                self.find_key(header.kid.as_deref()).ok_or(Refusal::UnknownKid)?
            }
        };
        if !key.algorithms.contains(&header.alg) {
            return Err(Refusal::AlgorithmNotAllowed(format!("{:?}", header.alg)));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.settings.leeway_secs;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = jsonwebtoken::decode::<Value>(token, &key.decoding, &validation)
            .map_err(|e| refusal(e.into_kind()))?
            .claims;
        self.principal(&claims)
    }

    fn find_key(&self, kid: Option<&str>) -> Option<Arc<Key>> {
        let set = self.key_set();
        match kid {
            Some(kid) => set.keys.get(kid).cloned(),
            None if set.keys.len() == 1 => set.keys.values().next().cloned(),
            None => None,
        }
    }

    fn principal(&self, claims: &Value) -> Result<Principal, Refusal> {
        let s = &self.settings;
        let user = match claim(claims, &s.user_claim) {
            Some(Value::String(user)) if valid_id(user) => user.clone(),
            Some(_) => return Err(Refusal::InvalidClaim(s.user_claim.clone())),
            None => return Err(Refusal::MissingClaim(s.user_claim.clone())),
        };
        let role = role_of(claim(claims, &s.role_claim), &s.role_claim)?;
        let scope = Scope {
            studies: ids_of(claim(claims, &s.studies_claim), &s.studies_claim)?,
            sites: ids_of(claim(claims, &s.sites_claim), &s.sites_claim)?,
        };
        let auth_time = match claims.get("auth_time") {
            None => None,
            Some(Value::Number(n)) => {
                Some(n.as_i64().ok_or_else(|| Refusal::InvalidClaim("auth_time".into()))?)
            }
            Some(_) => return Err(Refusal::InvalidClaim("auth_time".into())),
        };
        Ok(Principal { user, role, scope, auth_time })
    }
}

async fn refresh_periodically(oidc: Weak<Oidc>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        let Some(oidc) = oidc.upgrade() else { return };
        oidc.reread(period / 2).await;
    }
}

/// What the header says, read before any key is chosen.
struct TokenHeader {
    alg: Algorithm,
    kid: Option<String>,
}

impl TokenHeader {
    fn read(token: &str) -> Result<Self, Refusal> {
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Malformed);
        };
        let bytes = URL_SAFE_NO_PAD.decode(header).map_err(|_| Refusal::Malformed)?;
        let Ok(Value::Object(header)) = serde_json::from_slice::<Value>(&bytes) else {
            return Err(Refusal::Malformed);
        };
        let alg = match header.get("alg") {
            Some(Value::String(alg)) => alg,
            _ => return Err(Refusal::Malformed),
        };
        if alg.eq_ignore_ascii_case("none") {
            return Err(Refusal::AlgNone);
        }
        let alg: Algorithm = alg.parse().map_err(|_| Refusal::AlgorithmNotAllowed(printable(alg)))?;
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(Refusal::AlgorithmNotAllowed(format!("{alg:?}")));
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(kid)) if kid.len() <= MAX_CLAIM_CHARS => Some(kid.clone()),
            Some(_) => return Err(Refusal::Malformed),
        };
        Ok(Self { alg, kid })
    }
}

/// A value quoted in a message: at most 32 characters, control characters escaped.
fn printable(s: &str) -> String {
    s.chars().take(32).flat_map(char::escape_debug).collect()
}

fn refusal(kind: ErrorKind) -> Refusal {
    match kind {
        ErrorKind::InvalidSignature => Refusal::BadSignature,
        ErrorKind::ExpiredSignature => Refusal::Expired,
        ErrorKind::ImmatureSignature => Refusal::NotYetValid,
        ErrorKind::InvalidIssuer => Refusal::WrongIssuer,
        ErrorKind::InvalidAudience => Refusal::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => Refusal::MissingClaim(claim),
        ErrorKind::InvalidClaimFormat(claim) => Refusal::InvalidClaim(claim),
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            Refusal::AlgorithmNotAllowed("that algorithm".into())
        }
        _ => Refusal::Malformed,
    }
}

/// The value at a dotted path (`realm_access.roles`); a claim whose own name holds dots wins.
fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(path) {
        return Some(value);
    }
    path.split('.').try_fold(claims, |value, part| value.get(part))
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= MAX_CLAIM_CHARS && !s.chars().any(char::is_control)
}

fn role_of(value: Option<&Value>, name: &str) -> Result<Role, Refusal> {
    let values: Vec<&str> = match value {
        None => return Err(Refusal::MissingClaim(name.to_string())),
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().ok_or_else(|| Refusal::InvalidClaim(name.to_string())))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(Refusal::InvalidClaim(name.to_string())),
    };
    // Other entries (the provider's own roles) are ignored; exactly one must be ours.
    let roles: Vec<Role> = values.iter().filter_map(|v| v.parse().ok()).collect();
    match roles.as_slice() {
        [role] => Ok(*role),
        _ => Err(Refusal::NoRole),
    }
}

fn ids_of(value: Option<&Value>, name: &str) -> Result<Ids, Refusal> {
    let invalid = || Refusal::InvalidClaim(name.to_string());
    let ids: Vec<String> = match value {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => s.split([' ', ',']).filter(|s| !s.is_empty()).map(str::to_string).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(invalid))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid()),
    };
    if ids.iter().any(|id| id == "*") {
        return Ok(Ids::All);
    }
    if ids.len() > 10_000 || !ids.iter().all(|id| valid_id(id)) {
        return Err(invalid());
    }
    Ok(Ids::Only(ids.into_iter().collect()))
}

async fn read_keys(client: &reqwest::Client, source: &JwksSource) -> Result<KeySet, String> {
    let bytes = match source {
        JwksSource::File(path) => {
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read the JWKS {}: {e}", path.display()))?;
            if bytes.len() > MAX_JWKS_BYTES {
                return Err(format!("the JWKS {} is larger than {MAX_JWKS_BYTES} bytes", path.display()));
            }
            bytes
        }
        JwksSource::Url(url) => fetch(client, url).await?,
    };
    let set: JwkSet =
        serde_json::from_slice(&bytes).map_err(|e| format!("the JWKS is not a JWK set: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        if let Some(key) = usable(jwk) {
            keys.insert(jwk.common.key_id.clone().unwrap_or_default(), Arc::new(key));
        }
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable signing key (RSA, EC P-256/P-384 or Ed25519)".into());
    }
    Ok(KeySet { keys, read_at: Instant::now() })
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut response = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| format!("cannot fetch the JWKS from {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("fetching the JWKS from {url} answered {}", response.status()));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("reading the JWKS from {url}: {e}"))? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(format!("the JWKS at {url} is larger than {MAX_JWKS_BYTES} bytes"));
        }
    }
    Ok(bytes)
}

/// The key of a JWK and the algorithms it verifies, or `None` for keys that are not signing keys
/// we accept (encryption keys, symmetric keys, unknown types).
fn usable(jwk: &Jwk) -> Option<Key> {
    if jwk.common.public_key_use.as_ref().is_some_and(|u| *u != PublicKeyUse::Signature) {
        return None;
    }
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        _ => {
            tracing::warn!(kid = ?jwk.common.key_id, "Ignoring a JWKS key that is not an asymmetric signing key.");
            return None;
        }
    };
    // A key that states its algorithm verifies that one only.
    let algorithms = match jwk.common.key_algorithm.map(|a| a.to_string().parse::<Algorithm>()) {
        None => family,
        Some(Ok(alg)) if family.contains(&alg) => vec![alg],
        Some(_) => return None,
    };
    let decoding = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key { decoding, algorithms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claims_are_read_by_name_or_dotted_path() {
        let claims = json!({"sub": "u1", "realm_access": {"roles": ["x", "researcher"]}, "a.b": 1});
        assert_eq!(claim(&claims, "realm_access.roles"), Some(&json!(["x", "researcher"])));
        assert_eq!(claim(&claims, "a.b"), Some(&json!(1)));
        assert_eq!(claim(&claims, "nope.deeper"), None);
    }

    #[test]
    fn exactly_one_trialflow_role() {
        assert_eq!(role_of(Some(&json!("researcher")), "r"), Ok(Role::Researcher));
        assert_eq!(role_of(Some(&json!(["offline_access", "site_staff"])), "r"), Ok(Role::SiteStaff));
        assert_eq!(role_of(Some(&json!(["admin", "researcher"])), "r"), Err(Refusal::NoRole));
        assert_eq!(role_of(Some(&json!(["root"])), "r"), Err(Refusal::NoRole));
        assert_eq!(role_of(Some(&json!(7)), "r"), Err(Refusal::InvalidClaim("r".into())));
        assert_eq!(role_of(Some(&json!([7])), "r"), Err(Refusal::InvalidClaim("r".into())));
        assert_eq!(role_of(None, "r"), Err(Refusal::MissingClaim("r".into())));
    }

    #[test]
    fn scopes_from_arrays_strings_and_stars() {
        let only = |ids: &[&str]| Ids::Only(ids.iter().map(|s| s.to_string()).collect());
        assert_eq!(ids_of(Some(&json!(["S1", "S2"])), "s"), Ok(only(&["S1", "S2"])));
        assert_eq!(ids_of(Some(&json!("S1 S2,S3")), "s"), Ok(only(&["S1", "S2", "S3"])));
        assert_eq!(ids_of(Some(&json!(["*"])), "s"), Ok(Ids::All));
        assert_eq!(ids_of(None, "s"), Ok(only(&[])));
        assert!(ids_of(Some(&json!(["ok", "bad\u{0}"])), "s").is_err());
        assert!(ids_of(Some(&json!({"S1": true})), "s").is_err());
        assert!(ids_of(Some(&json!(["x".repeat(300)])), "s").is_err());
    }

    #[test]
    fn headers_refused_before_any_key_is_chosen() {
        let token = |header: Value| format!("{}.e30.sig", URL_SAFE_NO_PAD.encode(header.to_string()));
        let read = |t: &str| TokenHeader::read(t).map(|h| (h.alg, h.kid));
        assert_eq!(read(&token(json!({"alg": "none"}))).err(), Some(Refusal::AlgNone));
        assert_eq!(read(&token(json!({"alg": "NONE"}))).err(), Some(Refusal::AlgNone));
        assert!(matches!(read(&token(json!({"alg": "HS256"}))), Err(Refusal::AlgorithmNotAllowed(_))));
        assert!(matches!(read(&token(json!({"alg": "XX\u{0}"}))), Err(Refusal::AlgorithmNotAllowed(_))));
        assert_eq!(read(&token(json!({"kid": "k"}))).err(), Some(Refusal::Malformed));
        assert_eq!(read(&token(json!({"alg": "RS256", "kid": 5}))).err(), Some(Refusal::Malformed));
        assert_eq!(read(&token(json!(["RS256"]))).err(), Some(Refusal::Malformed));
        for garbage in ["", "a.b", "a.b.c.d", "!!!.e30.x", "\u{0}.\u{0}.\u{0}"] {
            assert_eq!(read(garbage).err(), Some(Refusal::Malformed), "{garbage:?}");
        }
        assert_eq!(
            read(&token(json!({"alg": "RS256", "kid": "k1"}))).ok(),
            Some((Algorithm::RS256, Some("k1".into())))
        );
    }

    #[test]
    fn oidc_needs_issuer_audience_and_keys_together() {
        let args = |issuer: Option<&str>, audience: Option<&str>, jwks: Option<&str>| OidcArgs {
            issuer: issuer.map(Into::into),
            audience: audience.map(Into::into),
            jwks: jwks.map(Into::into),
            leeway_secs: 60,
            refresh_secs: 300,
            user_claim: "sub".into(),
            role_claim: "trialflow_role".into(),
            studies_claim: "trialflow_studies".into(),
            sites_claim: "trialflow_sites".into(),
        };
        assert_eq!(args(None, None, None).settings(), Ok(None));
        assert!(args(Some("https://idp"), None, Some("k.json")).settings().is_err());
        assert!(args(Some("https://idp"), Some("aud"), None).settings().is_err());
        assert!(args(None, Some("aud"), None).settings().is_err());
        let on = args(Some("https://idp"), Some("aud"), Some("https://idp/keys")).settings();
        assert_eq!(on.ok().flatten().map(|s| s.jwks), Some(JwksSource::Url("https://idp/keys".into())));
    }
}
