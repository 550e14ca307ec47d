//! Signing keys for `jwt` credentials, from PKCS#8 PEM files, and the JWK Set
//! (RFC 7517) that publishes their public halves.
//!
//! The first configured key signs; every configured key verifies and is listed
//! in the JWK Set, so a rotation is: add the new key first, keep the old one
//! listed until every token it signed has expired, then drop it.

use std::{fmt, path::Path};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _},
};
use rustls::pki_types::{PrivatePkcs8KeyDer, pem::PemObject as _};
use serde::{Deserialize, Serialize};

use super::CredentialError;

/// Longest key id accepted.
pub const MAX_KID_LEN: usize = 64;

/// A JWS algorithm on the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    /// Ed25519 signatures (RFC 8037). The default.
    EdDSA,
    /// ECDSA P-256 with SHA-256 (RFC 7518 §3.4).
    ES256,
}

impl Algorithm {
    /// The JOSE `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EdDSA => "EdDSA",
            Self::ES256 => "ES256",
        }
    }

    /// Parses a JOSE `alg` name; `None` for anything off the allow-list.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "EdDSA" => Some(Self::EdDSA),
            "ES256" => Some(Self::ES256),
            _ => None,
        }
    }

    fn verification(self) -> &'static dyn signature::VerificationAlgorithm {
        match self {
            Self::EdDSA => &signature::ED25519,
            Self::ES256 => &signature::ECDSA_P256_SHA256_FIXED,
        }
    }
}

enum Pair {
    Ed25519(Ed25519KeyPair),
    Es256(EcdsaKeyPair),
}

/// One signing key: an id, an algorithm and a private key.
pub struct SigningKey {
    kid: String,
    alg: Algorithm,
    pair: Pair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

fn key_error(kid: &str, reason: impl Into<String>) -> CredentialError {
    CredentialError::Key {
        kid: kid.to_owned(),
        reason: reason.into(),
    }
}

impl SigningKey {
    /// Builds a key from PKCS#8 DER (v1 or v2 for Ed25519).
    ///
    /// # Errors
    /// [`CredentialError::Key`] if the kid is empty, too long or not printable
    /// ASCII, or the DER is not a key of `alg`.
    pub fn from_pkcs8(kid: &str, alg: Algorithm, der: &[u8]) -> Result<Self, CredentialError> {
        if kid.is_empty()
            || kid.len() > MAX_KID_LEN
            || !kid
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            return Err(key_error(
                kid,
                "kid must be 1-64 printable ASCII characters without quotes",
            ));
        }
        let pair = match alg {
            Algorithm::EdDSA => Pair::Ed25519(
                Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                    .map_err(|e| key_error(kid, format!("not an Ed25519 PKCS#8 key: {e}")))?,
            ),
            Algorithm::ES256 => Pair::Es256(
                EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    der,
                    &SystemRandom::new(),
                )
                .map_err(|e| key_error(kid, format!("not a P-256 PKCS#8 key: {e}")))?,
            ),
        };
        Ok(Self {
            kid: kid.to_owned(),
            alg,
            pair,
        })
    }

    /// Reads a key from a PEM file holding one `PRIVATE KEY` (PKCS#8) block.
    ///
    /// # Errors
    /// [`CredentialError::Key`] if the file cannot be read or holds no usable key.
    pub fn from_pem_file(kid: &str, alg: Algorithm, path: &Path) -> Result<Self, CredentialError> {
        let der = PrivatePkcs8KeyDer::from_pem_file(path)
            .map_err(|e| key_error(kid, format!("{}: {e}", path.display())))?;
        Self::from_pkcs8(kid, alg, der.secret_pkcs8_der())
    }

    /// Generates a fresh key and returns it with its PKCS#8 PEM, for `leash dev`.
    ///
    /// # Errors
    /// [`CredentialError::Random`] if the OS random source fails.
    pub fn generate(kid: &str, alg: Algorithm) -> Result<(Self, String), CredentialError> {
        let rng = SystemRandom::new();
        let doc = match alg {
            Algorithm::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng),
            Algorithm::ES256 => {
                EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            }
        }
        .map_err(|_| CredentialError::Random)?;
        let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", doc.as_ref().to_vec()));
        Ok((Self::from_pkcs8(kid, alg, doc.as_ref())?, pem))
    }

    /// The key id (`kid`).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm.
    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    /// Signs `message`.
    ///
    /// # Errors
    /// [`CredentialError::Mint`] if ECDSA signing fails (random source).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CredentialError> {
        match &self.pair {
            Pair::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
            Pair::Es256(k) => k
                .sign(&SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| CredentialError::Mint("ECDSA signing failed".into())),
        }
    }

    /// Verifies a signature made by this key.
    pub fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        let public = match &self.pair {
            Pair::Ed25519(k) => k.public_key().as_ref(),
            Pair::Es256(k) => k.public_key().as_ref(),
        };
        signature::UnparsedPublicKey::new(self.alg.verification(), public)
            .verify(message, sig)
            .is_ok()
    }

    /// The public key as a JWK (RFC 7517/7518/8037).
    pub fn jwk(&self) -> serde_json::Value {
        match &self.pair {
            Pair::Ed25519(k) => serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": self.kid,
                "x": URL_SAFE_NO_PAD.encode(k.public_key().as_ref()),
            }),
            Pair::Es256(k) => {
                // ring gives the uncompressed SEC1 point: 0x04 || X (32) || Y (32).
                let point = k.public_key().as_ref();
                let (x, y) = point
                    .get(1..)
                    .unwrap_or_default()
                    .split_at(32.min(point.len().saturating_sub(1)));
                serde_json::json!({
                    "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
                    "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
                })
            }
        }
    }
}

/// The configured signing keys: the first signs, all verify and are published.
#[derive(Debug)]
pub struct KeySet {
    keys: Vec<SigningKey>,
}

impl KeySet {
    /// A key set; `keys[0]` is the current signing key.
    ///
    /// # Errors
    /// [`CredentialError::NoKeys`] if `keys` is empty; [`CredentialError::Key`]
    /// if two keys share a kid.
    pub fn new(keys: Vec<SigningKey>) -> Result<Self, CredentialError> {
        if keys.is_empty() {
            return Err(CredentialError::NoKeys);
        }
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].iter().any(|o| o.kid == k.kid) {
                return Err(key_error(&k.kid, "duplicate kid"));
            }
        }
        Ok(Self { keys })
    }

    /// The key that signs new credentials.
    pub fn current(&self) -> &SigningKey {
        // `new` refuses an empty set.
        &self.keys[0]
    }

    /// The key with this kid, if configured.
    pub fn get(&self, kid: &str) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// The JWK Set JSON: `{"keys":[current, previous...]}`.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": self.keys.iter().map(SigningKey::jwk).collect::<Vec<_>>() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_sign_and_verify_for_both_algorithms() {
        for alg in [Algorithm::EdDSA, Algorithm::ES256] {
            let (key, pem) = SigningKey::generate("k1", alg).expect("generate");
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
            let sig = key.sign(b"hello").expect("sign");
            assert!(key.verify(b"hello", &sig));
            assert!(!key.verify(b"hellO", &sig));
            let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).expect("pem");
            let again = SigningKey::from_pkcs8("k1", alg, der.secret_pkcs8_der()).expect("reload");
            assert!(again.verify(b"hello", &sig));
        }
    }

    #[test]
    fn jwks_lists_every_key_current_first() {
        let (a, _) = SigningKey::generate("new", Algorithm::EdDSA).expect("gen");
        let (b, _) = SigningKey::generate("old", Algorithm::ES256).expect("gen");
        let set = KeySet::new(vec![a, b]).expect("set");
        let jwks = set.jwks();
        assert_eq!(jwks["keys"][0]["kid"], "new");
        assert_eq!(jwks["keys"][0]["kty"], "OKP");
        assert_eq!(jwks["keys"][1]["kty"], "EC");
        let x = jwks["keys"][1]["x"].as_str().expect("x");
        assert_eq!(URL_SAFE_NO_PAD.decode(x).map(|v| v.len()).ok(), Some(32));
        assert_eq!(set.current().kid(), "new");
    }

    #[test]
    fn bad_keys_and_kids_are_refused() {
        assert!(matches!(KeySet::new(vec![]), Err(CredentialError::NoKeys)));
        let (_, pem) = SigningKey::generate("k", Algorithm::EdDSA).expect("gen");
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).expect("pem");
        assert!(SigningKey::from_pkcs8("k", Algorithm::ES256, der.secret_pkcs8_der()).is_err());
        for kid in ["", "has space", "quo\"te", &"k".repeat(65)] {
            assert!(
                SigningKey::from_pkcs8(kid, Algorithm::EdDSA, der.secret_pkcs8_der()).is_err(),
                "{kid}"
            );
        }
        let (a, _) = SigningKey::generate("same", Algorithm::EdDSA).expect("gen");
        let (b, _) = SigningKey::generate("same", Algorithm::EdDSA).expect("gen");
        assert!(KeySet::new(vec![a, b]).is_err());
    }
}
