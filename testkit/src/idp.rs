//! The signing side of an identity provider, for the tests of OIDC bearer tokens: keys made with
//! `openssl` (RSA 2048 and EC P-256), their JWKS served over HTTP on 127.0.0.1 or written to a
//! file, and tokens signed with any header and claims — including the forgeries a hostile client
//! would try (`alg: none`, HMAC with the public key as the secret, a key the provider never
//! published). Not a stand-in for an identity provider's login: only its keys and signatures.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::tls::TempDir;

/// One signing key of the provider.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    /// The public key as PEM (what an attacker can read from the JWKS).
    pub public_pem: Vec<u8>,
    pub jwk: Jwk,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).field("alg", &self.alg).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh RSA 2048 key (RS256) or EC P-256 key (ES256) named `kid`.
    pub fn generate(dir: &TempDir, kid: &str, alg: Algorithm) -> anyhow::Result<Self> {
        let private = dir.path().join(format!("{kid}.key"));
        let public = dir.path().join(format!("{kid}.pub"));
        let (private_s, public_s) = (path_str(&private)?, path_str(&public)?);
        match alg {
            Algorithm::RS256 => crate::tls::openssl(
                dir.path(),
                &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", private_s],
            )?,
            Algorithm::ES256 => crate::tls::openssl(
                dir.path(),
                &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", private_s],
            )?,
            other => anyhow::bail!("no test keys for {other:?}"),
        }
        crate::tls::openssl(dir.path(), &["pkey", "-in", private_s, "-pubout", "-out", public_s])?;
        let pem = std::fs::read(&private)?;
        let encoding = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem)?,
            _ => EncodingKey::from_ec_pem(&pem)?,
        };
        let mut jwk = Jwk::from_encoding_key(&encoding, alg)?;
        jwk.common.key_id = Some(kid.to_string());
        Ok(Self { kid: kid.to_string(), alg, encoding, public_pem: std::fs::read(&public)?, jwk })
    }

    /// `claims` signed with this key, the header naming its `kid`.
    pub fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.encoding)?)
    }
}

fn path_str(path: &std::path::Path) -> anyhow::Result<&str> {
    path.to_str().ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", path.display()))
}

/// The provider: its keys, the JWKS it publishes (served at [`TestIdp::jwks_url`] and written to
/// [`TestIdp::jwks_file`]), and its issuer and the audience its tokens name.
#[derive(Debug)]
pub struct TestIdp {
    pub issuer: String,
    pub audience: String,
    /// The key tokens are signed with by default (RS256, kid `k1`).
    pub key: SigningKey,
    /// Published next to `key`: an ES256 key (kid `k2`).
    pub ec_key: SigningKey,
    pub jwks_url: String,
    pub jwks_file: PathBuf,
    published: Arc<RwLock<Value>>,
    fetches: Arc<AtomicUsize>,
    dir: TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl TestIdp {
    /// Two keys (RS256 `k1`, ES256 `k2`), published over HTTP on a free port and in a file.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = TempDir::new("trialflow-idp")?;
        let key = SigningKey::generate(&dir, "k1", Algorithm::RS256)?;
        let ec_key = SigningKey::generate(&dir, "k2", Algorithm::ES256)?;
        let published = Arc::new(RwLock::new(Value::Null));
        let fetches = Arc::new(AtomicUsize::new(0));
        let app = {
            let (published, fetches) = (published.clone(), fetches.clone());
            axum::Router::new().route(
                "/jwks",
                axum::routing::get(move || {
                    let (published, fetches) = (published.clone(), fetches.clone());
                    async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        let jwks = published.read().map(|v| v.clone()).unwrap_or(Value::Null);
                        axum::Json(jwks)
                    }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let jwks_file = dir.path().join("jwks.json");
        let idp = Self {
            issuer: format!("http://{addr}/realms/trial"),
            audience: "trialflow".to_string(),
            key,
            ec_key,
            jwks_url: format!("http://{addr}/jwks"),
            jwks_file,
            published,
            fetches,
            dir,
            server,
        };
        idp.publish(&[&idp.key, &idp.ec_key])?;
        Ok(idp)
    }

    /// Publishes exactly `keys` (served and written to the file).
    pub fn publish(&self, keys: &[&SigningKey]) -> anyhow::Result<()> {
        let set = JwkSet { keys: keys.iter().map(|k| k.jwk.clone()).collect() };
        let value = serde_json::to_value(&set)?;
        std::fs::write(&self.jwks_file, serde_json::to_vec_pretty(&value)?)?;
        *self.published.write().map_err(|_| anyhow::anyhow!("JWKS lock poisoned"))? = value;
        Ok(())
    }

    /// A new key of this provider (not published until [`TestIdp::publish`]).
    pub fn new_key(&self, kid: &str) -> anyhow::Result<SigningKey> {
        SigningKey::generate(&self.dir, kid, Algorithm::RS256)
    }

    /// How many times the JWKS was fetched over HTTP.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Valid claims for `user` with `role` and scope, expiring in five minutes, authenticated now.
    pub fn claims(&self, user: &str, role: &str, studies: &[&str], sites: &[&str]) -> Value {
        let now = now();
        json!({
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user,
            "iat": now,
            "exp": now + 300,
            "auth_time": now,
            "trialflow_role": role,
            "trialflow_studies": studies,
            "trialflow_sites": sites,
        })
    }

    /// `claims` signed with the default key.
    pub fn token(&self, claims: &Value) -> anyhow::Result<String> {
        self.key.sign(claims)
    }

    /// `claims` under `alg: none`, unsigned.
    pub fn unsigned(&self, claims: &Value) -> String {
        let header = json!({"alg": "none", "typ": "JWT", "kid": self.key.kid});
        format!("{}.{}.", encode_part(&header), encode_part(claims))
    }

    /// `claims` as HS256 with the default key's public PEM as the HMAC secret: the
    /// algorithm-confusion forgery.
    pub fn hmac_with_public_key(&self, claims: &Value) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.key.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(&self.key.public_pem)?)?)
    }
}

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn encode_part(value: &Value) -> String {
    base64url(value.to_string())
}

/// Base64url without padding, as JWT parts are encoded.
pub fn base64url(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}
