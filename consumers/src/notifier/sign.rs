//! Webhook signatures: `X-Trialflow-Signature: sha256=<hex HMAC-SHA256 of the exact body>`, keyed
//! with the subscription's secret. A receiver recomputes it over the bytes it received, before
//! parsing them, and compares in constant time ([`verify`] does).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-Trialflow-Signature";
/// When the attempt was made (Unix seconds): lets a receiver reject very old replays.
pub const TIMESTAMP_HEADER: &str = "X-Trialflow-Timestamp";
/// `<alert_id>:<recipient_id>:<channel>:<level>`: the same on every attempt of one delivery.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

const PREFIX: &str = "sha256=";

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length (long ones are hashed), so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC-SHA256 takes keys of any length"));
    mac.update(body);
    mac
}

/// The header value for `body`: `sha256=<lowercase hex>`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!("{PREFIX}{}", hex::encode(mac(secret, body).finalize().into_bytes()))
}

/// Whether `header` is the signature of `body` under `secret` (constant-time comparison).
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_digest) = header.trim().strip_prefix(PREFIX) else { return false };
    let Ok(digest) = hex::decode(hex_digest) else { return false };
    mac(secret, body).verify_slice(&digest).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_for_its_body_and_secret_only() {
        let body = br#"{"alert_id":"0190","severity":"HIGH"}"#;
        let header = sign(b"s3cret", body);
        assert!(header.starts_with("sha256="));
        assert_eq!(header.len(), "sha256=".len() + 64);
        assert!(verify(b"s3cret", body, &header));
        assert!(!verify(b"s3cret", br#"{"alert_id":"0190","severity":"LOW"}"#, &header));
        assert!(!verify(b"other", body, &header));
        assert!(!verify(b"s3cret", body, header.trim_start_matches("sha256=")));
        assert!(!verify(b"s3cret", body, "sha256=zz"));
    }

    #[test]
    fn signing_is_deterministic() {
        assert_eq!(sign(b"k", b"body"), sign(b"k", b"body"));
        assert_ne!(sign(b"k", b"body"), sign(b"k", b"body "));
    }
}
