//! What the HTTP services share — the site API and the ePRO gateway (producers) and the
//! researchers' alert API (consumers) — and what the consumers that judge the same inputs need
//! of them. A crate of its own so that both sides depend on it, and neither on the other.
//!
//! * [`auth`]: who is calling — bearer tokens mapped to a user, a [`Role`](auth::Role) (site
//!   staff, investigators, pharmacists, admins, researchers, patient apps) and the studies and
//!   sites they may act on, and what each role may see.
//! * [`oidc`]: an identity provider's JWTs, verified against its JWKS.
//! * [`error`]: [`ApiError`], the `{"error": {"code", "message", "field"}}` body every service
//!   answers a failed request with.
//! * [`input`]: what the front doors accept — the rules for every string, body and instant,
//!   JSON bodies read with duplicate keys refused and errors naming the field's path, ids and
//!   required values — shared with the ePRO validation consumer, which refuses the same
//!   submissions when apps publish them straight to Kafka.
//! * [`limits`]: what one caller may send and how long one request may take — rate limits per
//!   bearer token and per client address (429 `rate_limited`) and the request timeout (503
//!   `timeout`).
//! * [`clock`]: where "now" comes from; a replay drives a virtual one (read by the ePRO gateway
//!   and by kit allocation).

pub mod auth;
pub mod clock;
pub mod error;
pub mod input;
pub mod limits;
pub mod oidc;

pub use error::ApiError;
