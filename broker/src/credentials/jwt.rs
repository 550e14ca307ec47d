//! JWS compact serialization (RFC 7515) of JWT credentials, on `ring`.
//!
//! Kept to what Leash issues: a protected header `{"alg","kid","typ":"at+jwt"}`
//! and a JSON object payload. Verification accepts only algorithms on the
//! allow-list ([`Algorithm`]), only keys this broker holds, and requires the
//! header `alg` to equal the key's algorithm, so `none`, HMAC and algorithm
//! confusion are refused before any signature is checked.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Map, Value};

use super::{Algorithm, CredentialError, KeySet, SigningKey};

/// Largest token accepted for verification.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The JWT `typ` of Leash credentials (RFC 9068 access tokens).
pub const TYP: &str = "at+jwt";

/// Signs `claims` with `key` and returns the compact JWS.
///
/// # Errors
/// [`CredentialError::Mint`] if the claims cannot be encoded or signing fails.
pub fn sign(key: &SigningKey, claims: &Map<String, Value>) -> Result<String, CredentialError> {
    let header = serde_json::json!({ "alg": key.alg().as_str(), "kid": key.kid(), "typ": TYP });
    let signing_input = format!("{}.{}", b64_json(&header)?, b64_json(claims)?);
    let sig = key.sign(signing_input.as_bytes())?;
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

fn b64_json<T: serde::Serialize>(value: &T) -> Result<String, CredentialError> {
    serde_json::to_vec(value)
        .map(|b| URL_SAFE_NO_PAD.encode(b))
        .map_err(|e| CredentialError::Mint(format!("encode: {e}")))
}

fn decode_part(part: &str) -> Result<Vec<u8>, CredentialError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| CredentialError::Rejected("not base64url"))
}

fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, CredentialError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(CredentialError::Rejected("not a JSON object")),
    }
}

/// Checks the signature of a compact JWS against `keys` and returns its claims.
///
/// Does not judge time claims: the caller compares `exp`/`nbf` with its clock
/// and the store.
///
/// # Errors
/// [`CredentialError::Rejected`] naming the first problem: size, shape,
/// encoding, `alg` not allowed, unknown `kid`, `alg` not the key's, bad signature.
pub fn verify(token: &str, keys: &KeySet) -> Result<Map<String, Value>, CredentialError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(CredentialError::Rejected("too long"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(CredentialError::Rejected("not a compact JWS"));
    };
    let header = json_object(&decode_part(h)?)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(Algorithm::parse)
        .ok_or(CredentialError::Rejected("alg not allowed"))?;
    if header.contains_key("crit") {
        return Err(CredentialError::Rejected("crit header not supported"));
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(CredentialError::Rejected("no kid"))?;
    let key = keys
        .get(kid)
        .ok_or(CredentialError::Rejected("unknown kid"))?;
    if key.alg() != alg {
        return Err(CredentialError::Rejected("alg does not match key"));
    }
    let sig = decode_part(s)?;
    let signing_input = &token[..h.len() + 1 + p.len()];
    if !key.verify(signing_input.as_bytes(), &sig) {
        return Err(CredentialError::Rejected("bad signature"));
    }
    json_object(&decode_part(p)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyset(alg: Algorithm) -> KeySet {
        let (k, _) = SigningKey::generate("k1", alg).expect("gen");
        KeySet::new(vec![k]).expect("set")
    }

    fn claims() -> Map<String, Value> {
        let Value::Object(m) = serde_json::json!({"sub": "spiffe://td/a", "jti": "x"}) else {
            unreachable!()
        };
        m
    }

    #[test]
    fn round_trip_both_algorithms() {
        for alg in [Algorithm::EdDSA, Algorithm::ES256] {
            let keys = keyset(alg);
            let token = sign(keys.current(), &claims()).expect("sign");
            assert_eq!(verify(&token, &keys).expect("verify"), claims());
        }
    }

    fn forge(header: Value, payload: &Map<String, Value>, sig: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(Value::Object(payload.clone()).to_string()),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    #[test]
    fn forged_and_malformed_tokens_are_rejected() {
        let keys = keyset(Algorithm::EdDSA);
        let other = keyset(Algorithm::EdDSA);
        let good = sign(keys.current(), &claims()).expect("sign");
        let (signing_input, _) = good.rsplit_once('.').expect("dots");
        let mut tampered_payload = claims();
        tampered_payload.insert("sub".into(), "spiffe://td/evil".into());
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "not a compact JWS"),
            ("a.b".into(), "not a compact JWS"),
            ("a.b.c.d".into(), "not a compact JWS"),
            ("!!.b.c".into(), "not base64url"),
            (
                forge(serde_json::json!({"alg":"none","kid":"k1"}), &claims(), b""),
                "alg not allowed",
            ),
            (
                forge(
                    serde_json::json!({"alg":"HS256","kid":"k1"}),
                    &claims(),
                    b"x",
                ),
                "alg not allowed",
            ),
            (
                forge(
                    serde_json::json!({"alg":"ES256","kid":"k1"}),
                    &claims(),
                    &[0; 64],
                ),
                "alg does not match key",
            ),
            (
                forge(
                    serde_json::json!({"alg":"EdDSA","kid":"zz"}),
                    &claims(),
                    &[0; 64],
                ),
                "unknown kid",
            ),
            (
                forge(serde_json::json!({"alg":"EdDSA"}), &claims(), &[0; 64]),
                "no kid",
            ),
            (
                forge(
                    serde_json::json!({"alg":"EdDSA","kid":"k1","crit":["x"]}),
                    &claims(),
                    &[0; 64],
                ),
                "crit header not supported",
            ),
            (
                forge(
                    serde_json::json!({"alg":"EdDSA","kid":"k1"}),
                    &tampered_payload,
                    &[0; 64],
                ),
                "bad signature",
            ),
            (
                sign(other.current(), &claims()).expect("sign"),
                "bad signature",
            ),
            (format!("{signing_input}.AAAA"), "bad signature"),
            ("a".repeat(MAX_TOKEN_LEN + 1), "too long"),
        ];
        for (token, want) in cases {
            match verify(&token, &keys) {
                Err(CredentialError::Rejected(why)) => assert_eq!(why, want, "{token}"),
                other => panic!("{token}: expected rejection {want}, got {other:?}"),
            }
        }
    }
}
