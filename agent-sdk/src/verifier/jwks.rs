//! The broker's JWK Set and JWS signature checks (EdDSA, ES256 only).

use std::collections::HashMap;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::signature::{self, UnparsedPublicKey};
use serde_json::{Map, Value};

use super::{MAX_TOKEN_LEN, VerifyError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    EdDSA,
    ES256,
}

#[derive(Debug, Clone)]
struct Key {
    alg: Alg,
    /// Raw public key: Ed25519 32 bytes, or the SEC1 uncompressed P-256 point.
    public: Vec<u8>,
}

/// Public keys by `kid`, parsed from a JWK Set (RFC 7517).
///
/// Only keys Leash signs with are kept: OKP/Ed25519 (`EdDSA`) and EC/P-256
/// (`ES256`); anything else in the set is ignored.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, Key>,
}

fn b64(v: Option<&Value>) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(v?.as_str()?).ok()
}

impl KeySet {
    /// Parses a JWK Set JSON document.
    ///
    /// # Errors
    /// A message if it is not a JSON object with a `keys` array.
    pub fn from_jwks(json: &str) -> Result<Self, String> {
        let doc: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("no \"keys\" array")?;
        let mut keys = HashMap::new();
        for jwk in list {
            let Some(kid) = jwk.get("kid").and_then(Value::as_str) else {
                continue;
            };
            let kty = jwk.get("kty").and_then(Value::as_str);
            let crv = jwk.get("crv").and_then(Value::as_str);
            let key =
                match (kty, crv) {
                    (Some("OKP"), Some("Ed25519")) => b64(jwk.get("x"))
                        .filter(|x| x.len() == 32)
                        .map(|public| Key {
                            alg: Alg::EdDSA,
                            public,
                        }),
                    (Some("EC"), Some("P-256")) => match (b64(jwk.get("x")), b64(jwk.get("y"))) {
                        (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                            let mut public = vec![4u8];
                            public.extend(x);
                            public.extend(y);
                            Some(Key {
                                alg: Alg::ES256,
                                public,
                            })
                        }
                        _ => None,
                    },
                    _ => None,
                };
            if let Some(k) = key {
                keys.insert(kid.to_owned(), k);
            }
        }
        Ok(Self { keys })
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True if no key is usable.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks the JWS signature and returns the claims (time and audience are
    /// judged by the caller).
    pub(super) fn verify(&self, token: &str) -> Result<Map<String, Value>, VerifyError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(VerifyError::Malformed("too long"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(VerifyError::Malformed("not a compact JWS"));
        };
        let object = |part: &str| -> Result<Map<String, Value>, VerifyError> {
            let bytes = URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| VerifyError::Malformed("not base64url"))?;
            match serde_json::from_slice(&bytes) {
                Ok(Value::Object(m)) => Ok(m),
                _ => Err(VerifyError::Malformed("not a JSON object")),
            }
        };
        let header = object(h)?;
        if header.contains_key("crit") {
            return Err(VerifyError::Malformed("crit header"));
        }
        let alg = match header.get("alg").and_then(Value::as_str) {
            Some("EdDSA") => Alg::EdDSA,
            Some("ES256") => Alg::ES256,
            _ => return Err(VerifyError::Algorithm),
        };
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .ok_or(VerifyError::UnknownKey)?;
        let key = self.keys.get(kid).ok_or(VerifyError::UnknownKey)?;
        if key.alg != alg {
            return Err(VerifyError::Algorithm);
        }
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| VerifyError::Malformed("not base64url"))?;
        let algorithm: &dyn signature::VerificationAlgorithm = match alg {
            Alg::EdDSA => &signature::ED25519,
            Alg::ES256 => &signature::ECDSA_P256_SHA256_FIXED,
        };
        let signing_input = &token[..h.len() + 1 + p.len()];
        UnparsedPublicKey::new(algorithm, &key.public)
            .verify(signing_input.as_bytes(), &sig)
            .map_err(|_| VerifyError::BadSignature)?;
        object(p)
    }
}
