//! The `cursor` of `GET /v1/alerts`: where the next page starts, as an opaque string.
//!
//! A cursor is the key of the last alert of a page, `(raised_at, alert_id)`, with a tag that
//! binds it to the filters of the list that gave it out: base64url (no padding) of
//!
//! | bytes | what |
//! |-------|------|
//! | 1 | format version, [`VERSION`] |
//! | 8 | `raised_at`, microseconds since the Unix epoch, big-endian |
//! | 16 | `alert_id` |
//! | 8 | tag: the first 8 bytes of SHA-256 over a domain string, the 25 bytes above and the list's normalised filters |
//!
//! A cursor that does not decode, has another length or version, or whose tag does not match
//! the request's filters (it was altered, or the filters changed between pages) is refused with
//! 400 `invalid_cursor`. The tag is a checksum, not a signature: a client that computes one can
//! only move its own walk to another position of a list it may read anyway, so no server secret
//! (which every API instance would have to share) is needed.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Datelike, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The format version, first byte of every cursor.
const VERSION: u8 = 1;
/// Separates the tag's input from that of any other hash this service may compute.
const DOMAIN: &[u8] = b"trialflow.alert-api.cursor\0";
const KEY_BYTES: usize = 1 + 8 + 16;
const TAG_BYTES: usize = 8;
/// Characters of a cursor: base64 of 33 bytes, without padding.
pub(super) const CURSOR_CHARS: usize = (KEY_BYTES + TAG_BYTES).div_ceil(3) * 4;

/// The key of an alert in the list's order (newest first): the next page holds the alerts
/// ordered after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Position {
    pub(super) raised_at: DateTime<Utc>,
    pub(super) alert_id: Uuid,
}

/// The cursor of `position` in a list with the normalised `filters` (see
/// [`super::list::Filter::canonical`]).
pub(super) fn encode(position: Position, filters: &str) -> String {
    let mut bytes = Vec::with_capacity(KEY_BYTES + TAG_BYTES);
    bytes.push(VERSION);
    bytes.extend_from_slice(&position.raised_at.timestamp_micros().to_be_bytes());
    bytes.extend_from_slice(position.alert_id.as_bytes());
    let tag = tag(&bytes, filters);
    bytes.extend_from_slice(&tag);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The position `cursor` names in a list with `filters`, or why it names none (the answer's
/// message).
pub(super) fn decode(cursor: &str, filters: &str) -> Result<Position, &'static str> {
    const GARBLED: &str =
        "is not a cursor this API gave out; use the `next_cursor` of the previous page as it is";
    if cursor.len() != CURSOR_CHARS {
        return Err(GARBLED);
    }
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| GARBLED)?;
    let (key, given_tag) = bytes.split_at_checked(KEY_BYTES).ok_or(GARBLED)?;
    if key[0] != VERSION {
        return Err("is from another version of this API; start again without `cursor`");
    }
    if given_tag != tag(key, filters) {
        return Err("does not belong to a list with these filters (the cursor was changed, or the \
                    filters were); repeat the filters of the first page, or start again without `cursor`");
    }
    let micros = i64::from_be_bytes(key[1..9].try_into().map_err(|_| GARBLED)?);
    // Only instants PostgreSQL can compare with: a forged key must not become a database error.
    let raised_at =
        DateTime::from_timestamp_micros(micros).filter(|t| (1..=9999).contains(&t.year())).ok_or(GARBLED)?;
    let alert_id = Uuid::from_slice(&key[9..]).map_err(|_| GARBLED)?;
    Ok(Position { raised_at, alert_id })
}

fn tag(key: &[u8], filters: &str) -> [u8; TAG_BYTES] {
    let digest = Sha256::new().chain_update(DOMAIN).chain_update(key).chain_update(filters).finalize();
    let mut tag = [0; TAG_BYTES];
    tag.copy_from_slice(&digest[..TAG_BYTES]);
    tag
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position() -> Position {
        Position {
            raised_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap_or_default(),
            alert_id: Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001),
        }
    }

    #[test]
    fn a_cursor_names_its_position_under_its_filters_only() {
        let cursor = encode(position(), "status=open\n");
        assert_eq!(cursor.len(), CURSOR_CHARS);
        assert!(cursor.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{cursor}");
        assert_eq!(decode(&cursor, "status=open\n"), Ok(position()));
        assert!(decode(&cursor, "status=resolved\n").is_err(), "other filters");
        assert!(decode(&cursor, "").is_err(), "no filters");
    }

    #[test]
    fn altered_or_garbled_cursors_are_refused() {
        let cursor = encode(position(), "");
        // Every single character changed to another base64url character.
        for i in 0..cursor.len() {
            let mut altered = cursor.clone().into_bytes();
            altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(altered).unwrap_or_default();
            assert!(decode(&altered, "").is_err(), "position {i}: {altered}");
        }
        let too_long = format!("{cursor}A");
        let padded = format!("{}=", &cursor[..CURSOR_CHARS - 1]);
        // Same length as a cursor: standard base64's alphabet, and multi-byte characters.
        let (standard, accented) = ("+/".repeat(CURSOR_CHARS / 2), "é".repeat(CURSOR_CHARS / 2));
        for garbage in ["", "x", "AAAA", &too_long, &padded, &standard, &accented] {
            assert!(decode(garbage, "").is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn a_forged_key_beyond_the_database_range_is_refused() {
        // A well-formed cursor (correct tag) for an instant PostgreSQL cannot hold.
        let mut key = vec![VERSION];
        key.extend_from_slice(&i64::MIN.to_be_bytes());
        key.extend_from_slice(Uuid::nil().as_bytes());
        let tag = tag(&key, "");
        key.extend_from_slice(&tag);
        assert!(decode(&URL_SAFE_NO_PAD.encode(key), "").is_err());
    }
}
