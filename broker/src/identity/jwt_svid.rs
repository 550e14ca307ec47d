//! JWT-SVIDs (SPIFFE JWT-SVID.md): the second way an agent proves who it is, for
//! clients behind a TLS-terminating proxy that cannot pass a client certificate.
//!
//! A token is accepted only if every rule holds: compact JWS (three base64url
//! parts, no JSON serialization, no JWE), `alg` one of RS/PS/ES 256/384/512
//! (never `none` or HS*), no `crit` header, `typ` absent or `JWT`/`JOSE`, a `kid`
//! that names a key in the JWT bundle of **the trust domain of `sub`** (a key of
//! another trust domain never vouches), the key type matching `alg`, a valid
//! signature (ring), `sub` a valid non-root SPIFFE ID, `aud` naming exactly one
//! audience (a string, or an array of one), the broker's — a token for several
//! audiences could be replayed to the broker by any of them — and `exp` present,
//! not past (with a small leeway) and at most the configured maximum lifetime
//! ahead (default 5 minutes), so a long-lived token cannot stand in for short-lived
//! proof. Verification is done with ring; nothing else is trusted.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value};

use super::{
    Identity, IdentityError, SpiffeId,
    files::{Stamp, file_error, metadata_changed, read_stamped, same_content},
    validate_trust_domain,
};

/// Largest JWT-SVID accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The JWS algorithms JWT-SVID.md allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    Es512,
}

impl Alg {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "PS256" => Self::Ps256,
            "PS384" => Self::Ps384,
            "PS512" => Self::Ps512,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "ES512" => Self::Es512,
            _ => return None,
        })
    }
}

/// One public key of a JWT bundle.
#[derive(Clone)]
enum PublicKey {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    // Uncompressed SEC1 point.
    Ec { crv: &'static str, point: Vec<u8> },
}

/// The JWT bundles of every trusted trust domain: trust domain → `kid` → key.
///
/// Guarantees: every trust domain name is valid; every key has a `kid`, a
/// supported type (RSA ≥ 2048 bits is checked by ring at verification, EC P-256
/// or P-384) and, when it says `use`, `use` is `jwt-svid`.
#[derive(Clone, Default)]
pub struct JwtBundles {
    domains: BTreeMap<String, BTreeMap<String, PublicKey>>,
}

impl fmt::Debug for JwtBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.domains
                    .iter()
                    .map(|(td, keys)| (td, keys.keys().collect::<Vec<_>>())),
            )
            .finish()
    }
}

impl JwtBundles {
    /// Builds bundles from JWKS documents per trust domain (tests, other sources).
    ///
    /// # Errors
    /// As [`from_files`](Self::from_files), naming the trust domain instead of a file.
    pub fn from_jwks<'a>(
        domains: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, IdentityError> {
        let mut out = BTreeMap::new();
        for (td, jwks) in domains {
            validate_trust_domain(td)?;
            out.insert(td.to_owned(), parse_jwks(Path::new(td), jwks)?);
        }
        Ok(Self { domains: out })
    }
}

/// JWT bundles loaded from one JWKS file per trust domain, reloadable in place.
///
/// Guarantees: [`current`](Self::current) is always a complete set that loaded
/// without error; a reload swaps the whole set at once, and a broken file keeps
/// the last good set (the next reload tries again).
#[derive(Debug)]
pub struct JwtBundleSource {
    current: RwLock<Arc<JwtBundles>>,
    // Held for the whole of a reload.
    files: Mutex<BTreeMap<String, (PathBuf, Stamp)>>,
}

impl JwtBundleSource {
    /// Loads one JWKS file (SPIFFE bundle format) per trust domain.
    ///
    /// # Errors
    /// [`IdentityError::InvalidSpiffeId`] for a bad trust domain name;
    /// [`IdentityError::File`] when a file cannot be read, is over 1 MiB, is not a
    /// JWK Set, or holds a key without `kid` or of an unsupported type.
    pub fn from_files(files: &BTreeMap<String, PathBuf>) -> Result<Self, IdentityError> {
        let mut stamps = BTreeMap::new();
        let mut domains = BTreeMap::new();
        for (td, path) in files {
            validate_trust_domain(td)?;
            let (text, stamp) = read_stamped(path)?;
            domains.insert(td.clone(), parse_jwks(path, &text)?);
            stamps.insert(td.clone(), (path.clone(), stamp));
        }
        Ok(Self {
            current: RwLock::new(Arc::new(JwtBundles { domains })),
            files: Mutex::new(stamps),
        })
    }

    /// A source holding `bundles`, with no files behind it (reload does nothing).
    pub fn fixed(bundles: JwtBundles) -> Self {
        Self {
            current: RwLock::new(Arc::new(bundles)),
            files: Mutex::new(BTreeMap::new()),
        }
    }

    /// The current set; cheap (one `Arc` clone).
    pub fn current(&self) -> Arc<JwtBundles> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Re-reads the files whose metadata changed and swaps in a new set if any
    /// content changed. Returns whether it did.
    ///
    /// # Errors
    /// [`IdentityError::File`] when a changed file cannot be read or parsed; the
    /// last good set stays current.
    pub fn reload(&self) -> Result<bool, IdentityError> {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = files.clone();
        let mut domains = self.current().domains.clone();
        let mut changed = false;
        for (td, (path, stamp)) in next.iter_mut() {
            if !metadata_changed(path, stamp)? {
                continue;
            }
            let (text, new_stamp) = read_stamped(path)?;
            if !same_content(stamp, &new_stamp) {
                domains.insert(td.clone(), parse_jwks(path, &text)?);
                changed = true;
            }
            *stamp = new_stamp;
        }
        if changed {
            *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                Arc::new(JwtBundles { domains });
        }
        *files = next;
        Ok(changed)
    }
}

fn parse_jwks(path: &Path, text: &[u8]) -> Result<BTreeMap<String, PublicKey>, IdentityError> {
    let doc: Value =
        serde_json::from_slice(text).map_err(|e| file_error(path, format!("not JSON: {e}")))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| file_error(path, "not a JWK Set (no \"keys\" array)"))?;
    let mut out = BTreeMap::new();
    for (i, jwk) in keys.iter().enumerate() {
        let bad = |why: &str| file_error(path, format!("key #{}: {why}", i + 1));
        let field = |name: &str| jwk.get(name).and_then(Value::as_str);
        if let Some(usage) = field("use")
            && usage != "jwt-svid"
        {
            // SPIFFE bundles also carry X.509 authorities (`use: x509-svid`); skip them.
            continue;
        }
        let kid = field("kid").ok_or_else(|| bad("no \"kid\""))?;
        let b64 = |name: &str| {
            field(name)
                .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
                .ok_or_else(|| bad(&format!("\"{name}\" missing or not base64url")))
        };
        let key = match field("kty") {
            Some("RSA") => PublicKey::Rsa {
                n: b64("n")?,
                e: b64("e")?,
            },
            Some("EC") => {
                let (crv, len) = match field("crv") {
                    Some("P-256") => ("P-256", 32),
                    Some("P-384") => ("P-384", 48),
                    other => return Err(bad(&format!("unsupported curve {other:?}"))),
                };
                let (x, y) = (b64("x")?, b64("y")?);
                if x.len() != len || y.len() != len {
                    return Err(bad("coordinates of the wrong length"));
                }
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                PublicKey::Ec { crv, point }
            }
            other => return Err(bad(&format!("unsupported key type {other:?}"))),
        };
        if out.insert(kid.to_owned(), key).is_some() {
            return Err(bad(&format!("duplicate kid {kid:?}")));
        }
    }
    Ok(out)
}

/// Checks JWT-SVIDs presented to this broker.
///
/// Guarantees: see the module documentation; the token itself never appears in an
/// error message or a log line.
#[derive(Debug, Clone)]
pub struct JwtSvidVerifier {
    bundles: Arc<JwtBundleSource>,
    audience: String,
    leeway: Duration,
    max_lifetime: Duration,
}

/// The default of [`JwtSvidVerifier::with_max_lifetime`]: 5 minutes, SPIRE's
/// default JWT-SVID lifetime.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(300);

fn reject(reason: impl Into<String>) -> IdentityError {
    IdentityError::InvalidJwtSvid(reason.into())
}

impl JwtSvidVerifier {
    /// A verifier accepting tokens for `audience` signed by keys of the current
    /// `bundles` (so a reload applies to the next call), allowing `leeway` of
    /// clock skew on `exp`, and tokens at most [`DEFAULT_MAX_LIFETIME`] from `exp`.
    pub fn new(
        bundles: Arc<JwtBundleSource>,
        audience: impl Into<String>,
        leeway: Duration,
    ) -> Self {
        Self {
            bundles,
            audience: audience.into(),
            leeway,
            max_lifetime: DEFAULT_MAX_LIFETIME,
        }
    }

    /// Refuses tokens whose `exp` is more than `max_lifetime` (plus the leeway, for
    /// an issuer whose clock runs ahead) after the verification time.
    #[must_use]
    pub fn with_max_lifetime(mut self, max_lifetime: Duration) -> Self {
        self.max_lifetime = max_lifetime;
        self
    }

    /// Verifies `token` at `now` and returns the caller's identity: its SPIFFE ID,
    /// the token's `exp` as the end of what may be granted, and no certificate
    /// thumbprint (so nothing issued to it is bound to a certificate).
    ///
    /// # Errors
    /// [`IdentityError::InvalidJwtSvid`] naming the rule that failed.
    #[tracing::instrument(skip_all, name = "identity.verify_jwt_svid")]
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Identity, IdentityError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(reject(format!("longer than {MAX_TOKEN_LEN} bytes")));
        }
        if token.starts_with('{') {
            return Err(reject(
                "JWS JSON serialization is not allowed; use the compact form",
            ));
        }
        let parts: Vec<&str> = token.split('.').collect();
        match parts.len() {
            3 => {}
            5 => return Err(reject("a JWE is not a JWT-SVID")),
            _ => return Err(reject("not a compact JWS (three dot-separated parts)")),
        }
        let header = decode_object(parts[0], "header")?;
        let claims = decode_object(parts[1], "payload")?;
        let signature = URL_SAFE_NO_PAD
            .decode(parts[2])
            .map_err(|_| reject("signature is not base64url"))?;

        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or_else(|| reject("header has no \"alg\""))?;
        let alg = Alg::parse(alg_name)
            .ok_or_else(|| reject(format!("alg {alg_name:?} is not allowed for JWT-SVIDs")))?;
        if header.contains_key("crit") {
            return Err(reject("\"crit\" header parameters are not supported"));
        }
        if let Some(typ) = header.get("typ")
            && !matches!(typ.as_str(), Some("JWT" | "JOSE"))
        {
            return Err(reject("\"typ\" must be JWT or JOSE when present"));
        }
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .ok_or_else(|| reject("header has no \"kid\""))?;

        // Who does it claim to be? The key must come from that trust domain.
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or_else(|| reject("no \"sub\" claim"))?;
        let spiffe_id = SpiffeId::parse(sub).map_err(|e| reject(format!("\"sub\": {e}")))?;
        if spiffe_id.is_root() {
            return Err(reject("\"sub\" names a trust domain, not a workload"));
        }
        let bundles = self.bundles.current();
        let keys = bundles
            .domains
            .get(spiffe_id.trust_domain())
            .ok_or_else(|| {
                reject(format!(
                    "no JWT bundle for trust domain {:?}",
                    spiffe_id.trust_domain()
                ))
            })?;
        let key = keys.get(kid).ok_or_else(|| {
            reject(format!(
                "kid {kid:?} is not in the JWT bundle of {:?}",
                spiffe_id.trust_domain()
            ))
        })?;
        let signed = &token.as_bytes()[..parts[0].len() + 1 + parts[1].len()];
        check_signature(alg, key, signed, &signature)?;

        // Claims, after the signature: nothing unsigned is believed.
        let audiences: Vec<&Value> = match claims.get("aud") {
            Some(one @ Value::String(_)) => vec![one],
            Some(Value::Array(list)) => list.iter().collect(),
            _ => return Err(reject("no \"aud\" claim")),
        };
        let [audience] = audiences.as_slice() else {
            return Err(reject(format!(
                "\"aud\" names {} audiences; a JWT-SVID for this broker must name exactly one audience, {:?}",
                audiences.len(),
                self.audience
            )));
        };
        if audience.as_str() != Some(self.audience.as_str()) {
            return Err(reject(format!(
                "\"aud\" is not this broker's audience {:?}",
                self.audience
            )));
        }
        let exp = match claims.get("exp") {
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .ok_or_else(|| reject("\"exp\" is not a NumericDate"))?,
            None => return Err(reject("no \"exp\" claim")),
        };
        // `SystemTime + Duration` panics past what the clock can hold (a signed `exp`
        // of u64::MAX, or 1e300 read as it); no real token expires there.
        let Some((expires, deadline)) = UNIX_EPOCH
            .checked_add(Duration::from_secs(exp))
            .and_then(|e| Some((e, e.checked_add(self.leeway)?)))
        else {
            return Err(reject("\"exp\" is out of range"));
        };
        if deadline <= now {
            return Err(reject("expired"));
        }
        if expires > now + self.max_lifetime + self.leeway {
            let ahead = expires.duration_since(now).unwrap_or_default().as_secs();
            return Err(reject(format!(
                "\"exp\" is {ahead}s away, more than jwt_svid.max_lifetime ({}s) allows; use a shorter-lived token",
                self.max_lifetime.as_secs()
            )));
        }
        Ok(Identity {
            spiffe_id,
            svid_not_after: expires,
            thumbprint_s256: None,
            spki_s256: None,
        })
    }
}

fn decode_object(part: &str, what: &str) -> Result<Map<String, Value>, IdentityError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| reject(format!("{what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(reject(format!("{what} is not a JSON object"))),
    }
}

fn check_signature(
    alg: Alg,
    key: &PublicKey,
    signed: &[u8],
    signature: &[u8],
) -> Result<(), IdentityError> {
    let mismatch = || reject("the key's type does not match \"alg\"");
    let ok = match (alg, key) {
        (
            Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256 | Alg::Ps384 | Alg::Ps512,
            PublicKey::Rsa { n, e },
        ) => {
            let params: &signature::RsaParameters = match alg {
                Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                Alg::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                _ => &signature::RSA_PSS_2048_8192_SHA512,
            };
            RsaPublicKeyComponents { n, e }
                .verify(params, signed, signature)
                .is_ok()
        }
        (
            Alg::Es256,
            PublicKey::Ec {
                crv: "P-256",
                point,
            },
        ) => UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(signed, signature)
            .is_ok(),
        (
            Alg::Es384,
            PublicKey::Ec {
                crv: "P-384",
                point,
            },
        ) => UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
            .verify(signed, signature)
            .is_ok(),
        // ring has no P-521; ES512 is allowed by the spec but no key here can carry it.
        _ => return Err(mismatch()),
    };
    if ok {
        Ok(())
    } else {
        Err(reject("bad signature"))
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use ring::{
        rand::SystemRandom,
        signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
    };
    use serde_json::json;

    use super::*;

    fn authority() -> (EcdsaKeyPair, String) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let p = key.public_key().as_ref().to_vec();
        let jwks = json!({ "keys": [
            { "kty": "EC", "crv": "P-256", "kid": "k1", "use": "jwt-svid",
              "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65]) },
            { "kty": "EC", "use": "x509-svid", "x5c": ["ignored"] },
        ]});
        (key, jwks.to_string())
    }

    fn token(key: &EcdsaKeyPair, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    #[test]
    fn a_valid_token_yields_an_unbound_identity_expiring_with_it() {
        let (key, jwks) = authority();
        let bundles = JwtBundles::from_jwks([("a.test", jwks.as_bytes())]).unwrap();
        let v = JwtSvidVerifier::new(
            Arc::new(JwtBundleSource::fixed(bundles)),
            "aud-1",
            Duration::from_secs(30),
        );
        let exp = 2_000_000_000u64;
        let t = token(
            &key,
            &json!({ "alg": "ES256", "kid": "k1", "typ": "JOSE" }),
            &json!({ "sub": "spiffe://a.test/w", "aud": "aud-1", "exp": exp }),
        );
        let id = v
            .verify(&t, UNIX_EPOCH + Duration::from_secs(exp - 10))
            .unwrap();
        assert_eq!(id.spiffe_id.as_str(), "spiffe://a.test/w");
        assert_eq!(id.thumbprint_s256, None);
        assert_eq!(id.svid_not_after, UNIX_EPOCH + Duration::from_secs(exp));
        // Within the leeway after exp: still accepted; past it: refused.
        assert!(
            v.verify(&t, UNIX_EPOCH + Duration::from_secs(exp + 29))
                .is_ok()
        );
        let late = v.verify(&t, UNIX_EPOCH + Duration::from_secs(exp + 30));
        assert!(late.unwrap_err().to_string().contains("expired"));
    }

    #[test]
    fn one_audience_and_a_bounded_lifetime() {
        let (key, jwks) = authority();
        let bundles = JwtBundles::from_jwks([("a.test", jwks.as_bytes())]).unwrap();
        let v = JwtSvidVerifier::new(
            Arc::new(JwtBundleSource::fixed(bundles)),
            "aud-1",
            Duration::from_secs(10),
        )
        .with_max_lifetime(Duration::from_secs(60));
        let now = 2_000_000_000u64;
        let at = UNIX_EPOCH + Duration::from_secs(now);
        let header = json!({ "alg": "ES256", "kid": "k1" });
        let sign = |aud: Value, exp: u64| {
            token(
                &key,
                &header,
                &json!({ "sub": "spiffe://a.test/w", "aud": aud, "exp": exp }),
            )
        };
        // One audience, as a string or an array of one; exp up to max + leeway ahead.
        assert!(v.verify(&sign(json!("aud-1"), now + 70), at).is_ok());
        assert!(v.verify(&sign(json!(["aud-1"]), now + 30), at).is_ok());
        for (aud, exp, why) in [
            (json!(["aud-1", "aud-2"]), now + 30, "exactly one audience"),
            (json!(["aud-2", "aud-1"]), now + 30, "exactly one audience"),
            (json!([]), now + 30, "exactly one audience"),
            (json!(["aud-2"]), now + 30, "not this broker's audience"),
            (json!(7), now + 30, "no \"aud\""),
            (json!("aud-1"), now + 71, "max_lifetime"),
            (json!("aud-1"), now + 86_400, "max_lifetime"),
        ] {
            let err = v.verify(&sign(aud.clone(), exp), at).unwrap_err();
            assert!(err.to_string().contains(why), "{aud} {exp}: {err}");
        }
    }

    #[test]
    fn an_exp_the_clock_cannot_hold_is_refused_not_a_panic() {
        let (key, jwks) = authority();
        let bundles = JwtBundles::from_jwks([("a.test", jwks.as_bytes())]).unwrap();
        let v = JwtSvidVerifier::new(
            Arc::new(JwtBundleSource::fixed(bundles)),
            "aud-1",
            Duration::from_secs(5),
        );
        // u64::MAX and 1e300 (read as u64::MAX) overflow UNIX_EPOCH + exp; i64::MAX
        // seconds fits, but not with the leeway added.
        for exp in [json!(u64::MAX), json!(1e300), json!(i64::MAX)] {
            let t = token(
                &key,
                &json!({ "alg": "ES256", "kid": "k1" }),
                &json!({ "sub": "spiffe://a.test/w", "aud": "aud-1", "exp": exp }),
            );
            let err = v.verify(&t, SystemTime::now()).unwrap_err();
            assert!(
                err.to_string().contains("\"exp\" is out of range"),
                "{exp}: {err}"
            );
        }
    }

    #[test]
    fn header_rules_are_enforced() {
        let (key, jwks) = authority();
        let bundles = JwtBundles::from_jwks([("a.test", jwks.as_bytes())]).unwrap();
        let v = JwtSvidVerifier::new(
            Arc::new(JwtBundleSource::fixed(bundles)),
            "aud-1",
            Duration::ZERO,
        );
        let claims = json!({ "sub": "spiffe://a.test/w", "aud": "aud-1", "exp": 4_000_000_000u64 });
        for (header, why) in [
            (
                json!({ "alg": "ES256", "kid": "k1", "typ": "at+jwt" }),
                "typ",
            ),
            (json!({ "alg": "ES256" }), "kid"),
            (json!({ "alg": "RS256", "kid": "k1" }), "does not match"),
            (json!({ "alg": "EdDSA", "kid": "k1" }), "not allowed"),
            (json!({ "kid": "k1" }), "alg"),
        ] {
            let err = v
                .verify(&token(&key, &header, &claims), SystemTime::now())
                .unwrap_err();
            assert!(err.to_string().contains(why), "{header}: {err}");
        }
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert!(v.verify(&long, SystemTime::now()).is_err());
    }

    #[test]
    fn bad_bundles_are_refused_with_the_reason() {
        for (jwks, why) in [
            ("[]", "not a JWK Set"),
            (
                r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#,
                "kid",
            ),
            (
                r#"{"keys":[{"kty":"oct","kid":"h","k":"AA"}]}"#,
                "unsupported key type",
            ),
            (
                r#"{"keys":[{"kty":"EC","crv":"P-521","kid":"e","x":"AA","y":"AA"}]}"#,
                "curve",
            ),
        ] {
            let err = JwtBundles::from_jwks([("a.test", jwks.as_bytes())]).unwrap_err();
            assert!(err.to_string().contains(why), "{jwks}: {err}");
        }
        assert!(JwtBundles::from_jwks([("A.test", b"{\"keys\":[]}".as_slice())]).is_err());
    }
}
