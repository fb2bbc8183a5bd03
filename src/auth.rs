//! Signed access tokens: who may join which rooms, until when.
//!
//! A token is `base64url(claims JSON) "." base64url(HMAC-SHA256(secret, first part))`, with
//! claims `{"sub": userId, "rooms": ["7", "8"] or ["*"], "exp": unix seconds}`. The server
//! checks it before the WebSocket upgrade (401 when forged, expired or for another room) and
//! then refuses messages whose `userId` is not the token's (`UNAUTHORIZED`).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a token grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id every message on the connection must carry.
    pub sub: u32,
    /// Rooms the token opens; `"*"` opens every room.
    pub rooms: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

impl Claims {
    /// True when the token opens `room`.
    pub fn allows(&self, room: &str) -> bool {
        self.rooms.iter().any(|r| r == "*" || r == room)
    }
}

/// Why a token was refused. The text goes into the 401 body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `token` query parameter.
    #[error("a token is required: connect to /chat/{{roomId}}?token=...")]
    Missing,
    /// Not two base64url parts, or the claims are not the expected JSON.
    #[error("the token is malformed")]
    Malformed,
    /// The signature does not match: forged, or signed with another secret.
    #[error("the token's signature is not valid")]
    BadSignature,
    /// Past its `exp`.
    #[error("the token has expired")]
    Expired,
    /// Valid, but not for this room.
    #[error("the token does not open this room")]
    WrongRoom,
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

/// Signs `claims` with `secret`.
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let mut m = mac(secret);
    m.update(payload.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    format!("{payload}.{sig}")
}

/// Checks `token` for `room` at time `now` (Unix seconds) and returns its claims.
pub fn verify(secret: &[u8], token: &str, room: &str, now: u64) -> Result<Claims, TokenError> {
    let (payload, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| TokenError::Malformed)?;
    let mut m = mac(secret);
    m.update(payload.as_bytes());
    // Constant-time comparison.
    m.verify_slice(&sig).map_err(|_| TokenError::BadSignature)?;
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
    if claims.exp <= now {
        return Err(TokenError::Expired);
    }
    if !claims.allows(room) {
        return Err(TokenError::WrongRoom);
    }
    Ok(claims)
}

/// The value of `name` in a query string (`a=1&token=x`), without percent-decoding (tokens
/// are base64url and need none).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v)
    })
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            sub: 42,
            rooms: vec!["7".into(), "8".into()],
            exp: 2_000,
        }
    }

    #[test]
    fn a_minted_token_verifies_for_its_rooms_until_it_expires() {
        let t = mint(b"secret", &claims());
        assert_eq!(verify(b"secret", &t, "7", 1_000), Ok(claims()));
        assert_eq!(
            verify(b"secret", &t, "9", 1_000),
            Err(TokenError::WrongRoom)
        );
        assert_eq!(verify(b"secret", &t, "7", 2_000), Err(TokenError::Expired));
        let any = mint(
            b"secret",
            &Claims {
                rooms: vec!["*".into()],
                ..claims()
            },
        );
        assert!(verify(b"secret", &any, "anything", 1_000).is_ok());
    }

    #[test]
    fn forged_and_malformed_tokens_are_refused() {
        let t = mint(b"secret", &claims());
        assert_eq!(
            verify(b"other", &t, "7", 1_000),
            Err(TokenError::BadSignature)
        );
        // Claims changed after signing.
        let (_, sig) = t.split_once('.').unwrap_or_default();
        let forged_claims = Claims { sub: 1, ..claims() };
        let forged_payload =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).unwrap_or_default());
        let forged = format!("{forged_payload}.{sig}");
        assert_eq!(
            verify(b"secret", &forged, "7", 1_000),
            Err(TokenError::BadSignature)
        );
        for junk in ["", "abc", "a.b.c", "!!.!!", "e30.AAAA"] {
            assert!(verify(b"secret", junk, "7", 1_000).is_err(), "{junk}");
        }
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param("a=1&token=xyz&b", "token"), Some("xyz"));
        assert_eq!(query_param("tokens=1", "token"), None);
        assert_eq!(query_param("", "token"), None);
    }
}
