//! Entry points of the fuzz targets in `fuzz/`, shared with the corpus replay test
//! (`broker/tests/fuzz_corpus.rs`) so the two cannot drift.
//!
//! Each function takes arbitrary bytes, feeds them to one parser of untrusted or
//! operator-supplied input the way the broker does, and checks properties that must
//! hold for every input. It **panics** only when one of them breaks (or a parser
//! panics): that is what a fuzzer reports as a crash. A refused input is never a
//! failure; the returned [`Outcome`] says whether the input got through, which the
//! replay test checks against the `ok-`/`no-` names of the seeds.
//!
//! ## Fixed material
//!
//! Verification paths are only reached with keys and anchors to verify against, so the
//! functions use fixed material generated once by `fuzz/seedgen` into `fixtures/`: the
//! CA certificates of trust domains `a.test` and `b.test`, a JWT bundle (a.test: P-256
//! key `p256` and an RSA key `rsa` nobody holds; b.test: another P-256 key also called
//! `p256`, and P-384 key `p384`), and the credential signing keys `fuzz-ed` (EdDSA) and
//! `fuzz-es` (ES256). Time is fixed at [`NOW_SECS`]. This material trusts nothing
//! outside these functions; the private keys in it exist so the targets can sign what
//! the fuzzer writes and reach the checks that follow a valid signature.
//!
//! Nothing in the broker calls this module.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    rand::SystemRandom,
    signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
        EcdsaSigningAlgorithm, KeyPair as _,
    },
};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};

use crate::{
    config::Config,
    credentials::{Algorithm, KeySet, SigningKey, jwt, opaque},
    identity::{
        IdentityError, IdentityPattern, SpiffeId, TrustBundles, identity_of_leaf,
        jwt_svid::{self, JwtBundleSource, JwtBundles, JwtSvidVerifier},
        limits::{MAX_CHAIN_LEN, MAX_SPIFFE_ID_LEN},
        validate_trust_domain, verify_svid,
    },
    store::{CredentialId, LogId, MAX_CURSOR_LEN, RevocationCursor, SHARDS, TaskId},
    templates::{
        self, MAX_GRANTS, MAX_PARAMETERS, MAX_SCOPES_PER_GRANT, MIN_DURATION, ParameterConstraint,
        ParameterKind, Template,
    },
};

/// The fixed verification time of the X.509 and JWT functions: 2030-01-01T00:00:00Z.
pub const NOW_SECS: u64 = 1_893_456_000;
/// The audience the fixed JWT-SVID verifier accepts.
pub const JWT_SVID_AUDIENCE: &str = "spiffe://a.test/leash";
/// The clock skew the fixed JWT-SVID verifier allows on `exp`.
pub const JWT_SVID_LEEWAY: Duration = Duration::from_secs(5);

/// What a fuzzing function made of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The parser accepted the input (in at least one of the function's modes).
    Accepted,
    /// Every mode refused the input.
    Rejected,
}

impl Outcome {
    fn from_bool(accepted: bool) -> Self {
        if accepted {
            Self::Accepted
        } else {
            Self::Rejected
        }
    }
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW_SECS)
}

/// The material of the module documentation, built once per process.
struct Fixtures {
    bundles: TrustBundles,
    jwt_verifier: JwtSvidVerifier,
    /// JWT-SVID signing keys with their trust domain and JOSE `alg`.
    jwt_keys: Vec<(EcdsaKeyPair, &'static str, &'static str)>,
    credential_keys: KeySet,
}

// A fuzz harness cannot do anything useful without its fixtures, and this module runs
// only under a fuzzer or the replay test, so a broken fixture is a panic naming it.
fn fixture<T, E: std::fmt::Display>(name: &str, r: Result<T, E>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("fuzzing fixture {name}: {e} (regenerate with `scripts/fuzz seeds`)"),
    }
}

fn ecdsa(name: &str, alg: &'static EcdsaSigningAlgorithm, pkcs8: &[u8]) -> EcdsaKeyPair {
    fixture(
        name,
        EcdsaKeyPair::from_pkcs8(alg, pkcs8, &SystemRandom::new()).map_err(|e| e.to_string()),
    )
}

fn jwk(kid: &str, key: &EcdsaKeyPair, crv: &str) -> Value {
    let point = key.public_key().as_ref();
    let n = point.len().saturating_sub(1) / 2;
    json!({
        "kty": "EC", "crv": crv, "kid": kid, "use": "jwt-svid",
        "x": URL_SAFE_NO_PAD.encode(point.get(1..=n).unwrap_or_default()),
        "y": URL_SAFE_NO_PAD.encode(point.get(n + 1..).unwrap_or_default()),
    })
}

static FIXTURES: LazyLock<Fixtures> = LazyLock::new(|| {
    let bundles = fixture(
        "trust bundles",
        TrustBundles::from_der([
            (
                "a.test".to_owned(),
                vec![CertificateDer::from(
                    include_bytes!("fixtures/a.test-ca.der").to_vec(),
                )],
            ),
            (
                "b.test".to_owned(),
                vec![CertificateDer::from(
                    include_bytes!("fixtures/b.test-ca.der").to_vec(),
                )],
            ),
        ]),
    );
    let a_p256 = ecdsa(
        "jwt-a-p256.pk8",
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        include_bytes!("fixtures/jwt-a-p256.pk8"),
    );
    let b_p256 = ecdsa(
        "jwt-b-p256.pk8",
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        include_bytes!("fixtures/jwt-b-p256.pk8"),
    );
    let b_p384 = ecdsa(
        "jwt-b-p384.pk8",
        &ECDSA_P384_SHA384_FIXED_SIGNING,
        include_bytes!("fixtures/jwt-b-p384.pk8"),
    );
    // An RSA-2048 public key nobody holds the private half of: it only takes RS*/PS*
    // tokens into ring's RSA verification, where every signature fails.
    let mut n = [0x5au8; 256];
    n[0] = 0xc1;
    n[255] = 0x01;
    let rsa = json!({ "kty": "RSA", "kid": "rsa", "n": URL_SAFE_NO_PAD.encode(n), "e": "AQAB" });
    let jwks_a = json!({ "keys": [jwk("p256", &a_p256, "P-256"), rsa] }).to_string();
    let jwks_b = json!({ "keys": [jwk("p256", &b_p256, "P-256"), jwk("p384", &b_p384, "P-384")] })
        .to_string();
    let jwt_bundles = fixture(
        "JWT bundles",
        JwtBundles::from_jwks([("a.test", jwks_a.as_bytes()), ("b.test", jwks_b.as_bytes())]),
    );
    let jwt_verifier = JwtSvidVerifier::new(
        Arc::new(JwtBundleSource::fixed(jwt_bundles)),
        JWT_SVID_AUDIENCE,
        JWT_SVID_LEEWAY,
    );
    let credential_keys = fixture(
        "credential keys",
        SigningKey::from_pkcs8(
            "fuzz-ed",
            Algorithm::EdDSA,
            include_bytes!("fixtures/cred-ed25519.pk8"),
        )
        .and_then(|ed| {
            let es = SigningKey::from_pkcs8(
                "fuzz-es",
                Algorithm::ES256,
                include_bytes!("fixtures/cred-es256.pk8"),
            )?;
            KeySet::new(vec![ed, es])
        }),
    );
    Fixtures {
        bundles,
        jwt_verifier,
        jwt_keys: vec![
            (a_p256, "a.test", "ES256"),
            (b_p256, "b.test", "ES256"),
            (b_p384, "b.test", "ES384"),
        ],
        credential_keys,
    }
});

/// `<header>.<payload>` of a compact JWS whose two parts are `data` split at its first
/// newline, base64url-encoded as they are (so the bytes need not be JSON).
fn signing_input(data: &[u8]) -> Option<String> {
    let i = data.iter().position(|&b| b == b'\n')?;
    let (header, rest) = data.split_at(i);
    Some(format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(rest.get(1..).unwrap_or_default())
    ))
}

// ---- SPIFFE IDs and identity patterns ----------------------------------------------

/// SPIFFE ID, trust domain and identity pattern parsing ([`SpiffeId::parse`],
/// [`validate_trust_domain`], [`IdentityPattern::parse`] and `matches`).
///
/// The input (UTF-8) is parsed whole as each of the three; when it has a newline, the
/// first line is also parsed as a pattern and the rest as an ID, and `matches` is
/// compared with a plain string definition of the pattern rules.
///
/// Checks: an accepted ID prints as its input, splits into trust domain and path
/// that rebuild it, has a valid trust domain and re-parses to itself; every error
/// message stays short whatever the input's length; an accepted pattern prints as its
/// input; a trust domain is accepted exactly when `spiffe://<td>` is a root ID.
pub fn spiffe_id(data: &[u8]) -> Outcome {
    let Ok(s) = std::str::from_utf8(data) else {
        return Outcome::Rejected;
    };
    let mut accepted = false;
    match SpiffeId::parse(s) {
        Ok(id) => {
            accepted = true;
            check_spiffe_id(s, &id);
        }
        Err(e) => {
            assert!(
                matches!(e, IdentityError::InvalidSpiffeId { .. }),
                "unexpected error kind {e:?}"
            );
            assert!(
                e.to_string().len() <= MAX_ERROR_LEN,
                "error message grows with input"
            );
        }
    }
    let td_ok = validate_trust_domain(s).is_ok();
    accepted |= td_ok;
    let root = format!("spiffe://{s}");
    if root.len() <= MAX_SPIFFE_ID_LEN && !s.contains(['/', '?', '#', '%', '@', ':']) {
        let as_root = SpiffeId::parse(&root);
        assert_eq!(
            td_ok,
            as_root.as_ref().is_ok_and(SpiffeId::is_root),
            "trust domain {s:?} and root ID {root:?} disagree"
        );
    }
    match IdentityPattern::parse(s) {
        Ok(p) => {
            accepted = true;
            assert_eq!(p.to_string(), s, "a pattern prints as written");
            assert!(validate_trust_domain(p.trust_domain()).is_ok());
        }
        Err(e) => assert!(
            e.to_string().len() <= MAX_ERROR_LEN,
            "error message grows with input"
        ),
    }
    if let Some((pattern, id)) = s.split_once('\n')
        && let (Ok(p), Ok(id)) = (IdentityPattern::parse(pattern), SpiffeId::parse(id))
    {
        let expected = match pattern.strip_suffix("/*") {
            Some(base) => id
                .as_str()
                .strip_prefix(base)
                .is_some_and(|rest| rest.len() > 1 && rest.starts_with('/')),
            None => id.as_str() == pattern,
        };
        assert_eq!(p.matches(&id), expected, "{pattern:?} vs {id:?}");
        accepted |= expected;
    }
    Outcome::from_bool(accepted)
}

/// Bound on an identity error message: the input is cut to 256 bytes before it is
/// quoted, and quoting makes at most 6 characters of a byte (`\u{7f}`).
const MAX_ERROR_LEN: usize = 256 * 6 + 512;

fn check_spiffe_id(s: &str, id: &SpiffeId) {
    assert_eq!(id.as_str(), s);
    assert_eq!(id.to_string(), s);
    assert!(s.len() <= MAX_SPIFFE_ID_LEN);
    assert_eq!(format!("spiffe://{}{}", id.trust_domain(), id.path()), s);
    assert!(validate_trust_domain(id.trust_domain()).is_ok());
    assert_eq!(id.is_root(), id.path().is_empty());
    assert!(id.path().is_empty() || (id.path().starts_with('/') && !id.path().ends_with('/')));
    assert_eq!(SpiffeId::parse(id.as_str()).ok().as_ref(), Some(id));
}

// ---- X509-SVIDs ----------------------------------------------------------------------

/// Splits concatenated DER values by their outer length (the rest, when a length
/// cannot be read, is one last value); at most [`MAX_CHAIN_LEN`] + 1 values, so the
/// chain-length limit is reachable.
fn split_der(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let n = if out.len() == MAX_CHAIN_LEN {
            data.len()
        } else {
            der_len(data).unwrap_or(data.len()).min(data.len())
        };
        let (head, rest) = data.split_at(n);
        out.push(head);
        data = rest;
    }
    out
}

/// Tag, length and contents of the DER value at the start of `d`, in bytes.
fn der_len(d: &[u8]) -> Option<usize> {
    let first = usize::from(*d.get(1)?);
    if first < 0x80 {
        return Some(2 + first);
    }
    let k = first & 0x7f;
    if k == 0 || k > 4 {
        return None;
    }
    let bytes = d.get(2..2 + k)?;
    let len = bytes
        .iter()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    len.checked_add(2 + k)
}

/// X509-SVID verification of arbitrary DER ([`verify_svid`], [`identity_of_leaf`],
/// and [`TrustBundles::from_der`] for bundle material from the Workload API).
///
/// The input is concatenated DER certificates, leaf first, verified at [`NOW_SECS`]
/// against the fixed bundles of `a.test` and `b.test`.
///
/// Checks: an accepted chain has a leaf that [`identity_of_leaf`] accepts with the same
/// identity, names a workload (not a trust domain root) of a configured trust domain,
/// and was not expired at the verification time; an accepted bundle holds only CA
/// certificates.
pub fn x509_svid(data: &[u8]) -> Outcome {
    let fx = &*FIXTURES;
    let chain: Vec<CertificateDer<'_>> = split_der(data)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let verified = verify_svid(&chain, &fx.bundles, now());
    if let Ok(id) = &verified {
        let leaf = chain.first().map(identity_of_leaf);
        assert!(
            matches!(&leaf, Some(Ok(l)) if l == id),
            "verify_svid accepted {id:?}, identity_of_leaf says {leaf:?}"
        );
        assert!(!id.spiffe_id.is_root());
        assert!(fx.bundles.anchors(id.trust_domain()).is_some());
        assert!(id.svid_not_after >= now(), "accepted after notAfter");
        assert!(id.thumbprint_s256.is_some());
    } else if let Some(Ok(id)) = chain.first().map(identity_of_leaf) {
        assert!(!id.spiffe_id.is_root());
        check_spiffe_id(id.spiffe_id.as_str(), &id.spiffe_id);
    }
    let owned: Vec<CertificateDer<'static>> =
        chain.iter().map(|c| c.clone().into_owned()).collect();
    if let Ok(b) = TrustBundles::from_der([("fuzz.test".to_owned(), owned)]) {
        for cert in b.certificates("fuzz.test").unwrap_or_default() {
            let ca = x509_parser::parse_x509_certificate(cert.as_ref())
                .ok()
                .and_then(|(_, c)| c.basic_constraints().ok().flatten().map(|bc| bc.value.ca));
            assert_eq!(ca, Some(true), "a bundle accepted a non-CA certificate");
        }
    }
    Outcome::from_bool(verified.is_ok())
}

// ---- JWT-SVIDs -----------------------------------------------------------------------

/// JWT-SVID parsing and verification ([`JwtSvidVerifier::verify`]) and JWT bundle
/// parsing ([`JwtBundles::from_jwks`]), against the fixed JWT bundles at [`NOW_SECS`].
///
/// Three modes on every input: the input as a token; the input as
/// `<header bytes>\n<claims bytes>`, signed by each fixed key (so the claim rules after
/// the signature check are reached with any claims); and the input as a JWKS document.
///
/// Checks: an accepted token names a workload of the signing key's own trust domain, is
/// unbound (no thumbprint), was not expired beyond the leeway, and no error message
/// echoes the token.
pub fn jwt_svid(data: &[u8]) -> Outcome {
    let fx = &*FIXTURES;
    let mut accepted = false;
    if let Ok(token) = std::str::from_utf8(data) {
        accepted |= check_jwt_svid(fx, token, None);
    }
    if let Some(input) = signing_input(data) {
        for (key, td, alg) in &fx.jwt_keys {
            let Ok(sig) = key.sign(&SystemRandom::new(), input.as_bytes()) else {
                continue;
            };
            let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
            if check_jwt_svid(fx, &token, Some((td, alg))) {
                accepted = true;
            }
        }
    }
    accepted |= JwtBundles::from_jwks([("a.test", data)]).is_ok();
    Outcome::from_bool(accepted)
}

fn check_jwt_svid(fx: &Fixtures, token: &str, signer: Option<(&str, &str)>) -> bool {
    match fx.jwt_verifier.verify(token, now()) {
        Ok(id) => {
            assert!(token.len() <= jwt_svid::MAX_TOKEN_LEN);
            assert!(!id.spiffe_id.is_root());
            assert!(
                id.thumbprint_s256.is_none(),
                "a JWT-SVID identity is unbound"
            );
            assert!(
                id.svid_not_after
                    .checked_add(JWT_SVID_LEEWAY)
                    .is_none_or(|t| t > now()),
                "accepted past exp + leeway"
            );
            if let Some((td, _)) = signer {
                assert_eq!(
                    id.trust_domain(),
                    td,
                    "a key of {td} vouched for {}",
                    id.spiffe_id
                );
            }
            true
        }
        Err(e) => {
            assert!(matches!(e, IdentityError::InvalidJwtSvid(_)), "{e:?}");
            if token.len() >= 16 {
                assert!(!e.to_string().contains(token), "an error echoes the token");
            }
            false
        }
    }
}

// ---- Introspection credentials -------------------------------------------------------

/// The credential parsers of the introspection path: [`opaque::credential_id`] for
/// `lsh_` values, else [`jwt::verify`] against the fixed key set and the `jti` and
/// `nbf` reads of `LeaseService::introspect`.
///
/// Two modes: the input as a presented token; and the input as
/// `<header bytes>\n<payload bytes>`, signed by each fixed key. [`Outcome::Accepted`]
/// means the introspection would go on to look the credential id up in the store.
///
/// Checks: an extracted id re-parses to itself and names a task id that parses; an
/// opaque value is exactly `lsh_<id>.<43 base64url characters>`; a verified JWT's
/// header names the verifying key and its `alg`, and its claims are the signed payload.
pub fn credential(data: &[u8]) -> Outcome {
    let fx = &*FIXTURES;
    let mut accepted = false;
    if let Ok(token) = std::str::from_utf8(data) {
        accepted |= introspection_id(fx, token).is_some();
    }
    if let Some(input) = signing_input(data) {
        for kid in ["fuzz-ed", "fuzz-es"] {
            let Some(key) = fx.credential_keys.get(kid) else {
                continue;
            };
            let Ok(sig) = key.sign(input.as_bytes()) else {
                continue;
            };
            let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig));
            if let Ok(claims) = jwt::verify(&token, &fx.credential_keys) {
                let header = decode_json(input.split('.').next().unwrap_or_default());
                assert_eq!(header.get("kid").and_then(Value::as_str), Some(kid));
                assert_eq!(
                    header.get("alg").and_then(Value::as_str),
                    Some(key.alg().as_str())
                );
                let payload = decode_json(input.split('.').nth(1).unwrap_or_default());
                assert_eq!(Value::Object(claims), payload);
            }
            accepted |= introspection_id(fx, &token).is_some();
        }
    }
    Outcome::from_bool(accepted)
}

fn decode_json(part: &str) -> Value {
    URL_SAFE_NO_PAD
        .decode(part)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// What `LeaseService::introspect` reads from a token before the store lookup.
fn introspection_id(fx: &Fixtures, token: &str) -> Option<(CredentialId, u64)> {
    let (id, nbf_ms) = if token.starts_with(opaque::PREFIX) {
        let id = opaque::credential_id(token)?;
        let rest = token.strip_prefix(opaque::PREFIX).unwrap_or_default();
        let (head, secret) = rest.rsplit_once('.').unwrap_or_default();
        assert_eq!(head, id.as_str());
        assert_eq!(secret.len(), 43);
        assert!(
            secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        (id, 0)
    } else {
        let claims = jwt::verify(token, &fx.credential_keys).ok()?;
        assert!(token.len() <= jwt::MAX_TOKEN_LEN);
        let id = claims
            .get("jti")
            .and_then(Value::as_str)
            .and_then(CredentialId::parse)?;
        let nbf = claims.get("nbf").and_then(Value::as_u64).unwrap_or(0);
        (id, nbf.saturating_mul(1000))
    };
    check_credential_id(id.as_str(), &id);
    Some((id, nbf_ms))
}

// ---- Store ids and cursors -----------------------------------------------------------

/// The store model parsers: [`TaskId::parse`], [`CredentialId::parse`],
/// [`RevocationCursor::parse`] and [`LogId::parse`], plus the serde forms of the ids.
///
/// Checks: accepted ids keep their text, rebuild from their bytes, and pick a shard in
/// range; a credential id names a task id that parses; a cursor or log id re-parses to
/// itself from its printed form; serde accepts exactly what `parse` accepts.
pub fn store_ids(data: &[u8]) -> Outcome {
    let Ok(s) = std::str::from_utf8(data) else {
        return Outcome::Rejected;
    };
    let mut accepted = false;
    let task = TaskId::parse(s);
    if let Some(t) = &task {
        accepted = true;
        assert_eq!(t.as_str(), s);
        assert!(t.shard() < SHARDS);
        let hex = s.get(3..).unwrap_or_default();
        let bytes = hex_bytes::<16>(hex);
        assert_eq!(bytes.map(TaskId::from_bytes).as_ref(), Some(t));
    }
    let serde_task = serde_json::from_value::<TaskId>(Value::String(s.to_owned())).ok();
    assert_eq!(serde_task, task, "serde and parse disagree on a task id");
    let cred = CredentialId::parse(s);
    if let Some(c) = &cred {
        accepted = true;
        check_credential_id(s, c);
    }
    let serde_cred = serde_json::from_value::<CredentialId>(Value::String(s.to_owned())).ok();
    assert_eq!(
        serde_cred, cred,
        "serde and parse disagree on a credential id"
    );
    if let Some(c) = RevocationCursor::parse(s) {
        accepted = true;
        assert!(s.len() <= MAX_CURSOR_LEN);
        assert_eq!(RevocationCursor::parse(&c.to_string()), Some(c));
    }
    if let Some(l) = LogId::parse(s) {
        accepted = true;
        assert_eq!(LogId::parse(&l.to_string()), Some(l));
    }
    Outcome::from_bool(accepted)
}

fn check_credential_id(s: &str, c: &CredentialId) {
    assert_eq!(c.as_str(), s);
    let task = c.task_id();
    assert_eq!(TaskId::parse(task.as_str()).as_ref(), Some(&task));
    let suffix = s
        .strip_prefix(task.as_str())
        .and_then(|r| r.strip_prefix(".c"));
    let random = hex_bytes::<8>(suffix.unwrap_or_default());
    assert_eq!(
        random.map(|r| CredentialId::new(&task, r)).as_ref(),
        Some(c)
    );
}

fn hex_bytes<const N: usize>(hex: &str) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

// ---- Policies ------------------------------------------------------------------------

/// A template every accepted policy is evaluated against: one read, one write and
/// one destructive scope, low sensitivity.
static POLICY_TEMPLATE: LazyLock<Option<Template>> = LazyLock::new(|| {
    templates::parse_str(
        Path::new("fuzz.yaml"),
        "name: fuzz\nversion: 1\nowner: o@x\nsensitivity: low\nidentities: [spiffe://acme.test/agent/*]\n\
         parameters: { repo: { type: string, enum: [a/b] } }\n\
         lease: { ttl: 30s, max_ttl: 1m, max_lifetime: 1h }\n\
         grants: [{name: g, kind: jwt, audience: aud, ttl: 30s, scopes: [\
         {scope: \"r:{repo}\", class: read}, {scope: w, class: write}, {scope: d, class: destructive}]}]\n",
    )
    .ok()
});

/// The Cedar policy loader ([`crate::policy::cedar::parse_str`]: parse, ids and
/// lines, schema validation), then one evaluation of what loads.
///
/// Checks: an accepted file names every policy with a line inside the file; a
/// refused one has at least one issue, each inside the file (line 0 only for a
/// problem without a position); evaluating an accepted set never fails on a
/// request the broker builds, and a deny always has a message.
pub fn policy(data: &[u8]) -> Outcome {
    use crate::policy::cedar;
    let Ok(src) = std::str::from_utf8(data) else {
        return Outcome::Rejected;
    };
    let lines = src.lines().count().max(1) + 1;
    match cedar::parse_str(Path::new("fuzz.cedar"), src, "UTC") {
        Ok(policies) => {
            for id in policies.ids() {
                let origin = policies.origin(id).expect("every id has an origin");
                assert!(
                    (1..=lines).contains(&origin.line),
                    "{id} at line {}",
                    origin.line
                );
            }
            let Some(template) = POLICY_TEMPLATE.as_ref() else {
                panic!("the fixed policy template must load");
            };
            let spiffe_id = SpiffeId::parse("spiffe://acme.test/agent/fuzz").expect("id");
            let parameters = BTreeMap::from([("repo".to_owned(), "a/b".to_owned())]);
            let grants: Vec<_> = template
                .grants
                .iter()
                .map(|g| (g.clone(), template.classified_scopes_for(g, &parameters)))
                .collect();
            for connection in [cedar::Connection::Mtls, cedar::Connection::JwtSvid] {
                let request = cedar::Request {
                    identity: &spiffe_id,
                    connection,
                    class: "partner-fuzz".into(),
                    tenant: "default".into(),
                    template,
                    parameters: &parameters,
                    grants: &grants,
                    ttl_ms: 30_000,
                    delegation_depth: 0,
                    actors: &[],
                    now_ms: 1_796_806_800_000,
                };
                let verdict = policies
                    .evaluate(&request)
                    .expect("a broker-built request fits");
                if !verdict.allowed {
                    assert!(!policies.denial_message(&verdict).is_empty());
                }
            }
            Outcome::Accepted
        }
        Err(e) => {
            assert!(!e.0.is_empty(), "refused without an issue");
            for issue in &e.0 {
                assert!(issue.line <= lines, "issue past the end: {issue}");
            }
            Outcome::Rejected
        }
    }
}

// ---- Templates -----------------------------------------------------------------------

/// Values tried for string parameters with a pattern (the first that matches is bound).
const PATTERN_CANDIDATES: &[&str] = &["a", "abc", "acme/widgets", "main", "42", "a-b_c.d"];

/// The template YAML loader ([`templates::parse_str`]), then parameter binding and
/// scope rendering on what loads.
///
/// Checks: a loaded template keeps every guarantee its types document (valid name,
/// identities and 1 to 16 grants, `1s <= ttl <= max_ttl <= max_lifetime`, constrained
/// strings, placeholders naming required parameters, ...); a refused one has at least
/// one issue; parameters bound from the template's own enums and bounds render every
/// scope, without whitespace or control characters; an undeclared parameter is refused.
pub fn template(data: &[u8]) -> Outcome {
    let Ok(src) = std::str::from_utf8(data) else {
        return Outcome::Rejected;
    };
    match templates::parse_str(Path::new("fuzz.yaml"), src) {
        Ok(t) => {
            check_template(&t);
            Outcome::Accepted
        }
        Err(e) => {
            assert!(!e.0.is_empty(), "refused without an issue");
            Outcome::Rejected
        }
    }
}

fn check_template(t: &Template) {
    let name_ok = t.name.len() <= 63
        && t.name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || (i > 0 && matches!(b, b'-' | b'_' | b'.'))
        });
    assert!(name_ok && !t.name.is_empty(), "template name {:?}", t.name);
    assert!(!t.identities.is_empty());
    assert!((1..=MAX_GRANTS).contains(&t.grants.len()));
    assert!(t.parameters.len() <= MAX_PARAMETERS);
    let l = &t.lease;
    assert!(MIN_DURATION <= l.ttl && l.ttl <= l.max_ttl && l.max_ttl <= l.max_lifetime);
    let mut grant_names = std::collections::BTreeSet::new();
    for g in &t.grants {
        assert!(grant_names.insert(&g.name), "duplicate grant {:?}", g.name);
        assert!(!g.audience.is_empty() && !g.audience.chars().any(char::is_whitespace));
        assert!((1..=MAX_SCOPES_PER_GRANT).contains(&g.scopes.len()));
        assert_eq!(
            g.scope_classes.len(),
            g.scopes.len(),
            "a scope without its class"
        );
        assert!(g.ttl >= MIN_DURATION);
    }
    let mut parameter_names = std::collections::BTreeSet::new();
    for p in &t.parameters {
        assert!(
            parameter_names.insert(&p.name),
            "duplicate parameter {:?}",
            p.name
        );
        if p.kind == ParameterKind::String {
            assert!(matches!(
                p.constraint,
                ParameterConstraint::Pattern { .. } | ParameterConstraint::Enum(_)
            ));
        }
    }
    for name in t.scope_parameters() {
        assert!(
            t.parameter(name).is_some_and(|p| p.required),
            "scope placeholder {name:?} is not a required parameter"
        );
    }

    let mut given = BTreeMap::new();
    for p in &t.parameters {
        let value = match (&p.kind, &p.constraint) {
            (ParameterKind::Boolean, _) => Some("true".to_owned()),
            (ParameterKind::Integer, ParameterConstraint::Range { min, max }) => {
                Some(min.or(*max).unwrap_or(0).to_string())
            }
            (ParameterKind::Integer, _) => Some("0".to_owned()),
            (ParameterKind::String, ParameterConstraint::Enum(values)) => values.first().cloned(),
            (ParameterKind::String, ParameterConstraint::Pattern { regex, .. }) => {
                PATTERN_CANDIDATES
                    .iter()
                    .find(|c| regex.is_match(c))
                    .map(|c| (*c).to_owned())
            }
            (ParameterKind::String, _) => None,
        };
        if let Some(v) = value {
            given.insert(p.name.clone(), v);
        }
    }
    if let Ok(bound) = t.bind_parameters(&given) {
        for p in &t.parameters {
            if p.required {
                assert!(bound.contains_key(&p.name), "required {:?} unbound", p.name);
            }
            if let (Some(v), ParameterConstraint::Range { min, max }) =
                (bound.get(&p.name), &p.constraint)
            {
                let n: i64 = v.parse().unwrap_or(i64::MIN);
                assert!(min.is_none_or(|m| n >= m) && max.is_none_or(|m| n <= m));
            }
        }
        for g in &t.grants {
            let scopes = t.scopes_for(g, &bound);
            assert_eq!(scopes.len(), g.scopes.len(), "a scope did not render");
            for s in &scopes {
                assert!(
                    !s.chars().any(|c| c.is_whitespace() || c.is_control()),
                    "rendered scope {s:?}"
                );
            }
        }
    }
    let mut unknown = given;
    unknown.insert("not_declared_anywhere".into(), "x".into());
    if t.parameter("not_declared_anywhere").is_none() {
        assert!(
            t.bind_parameters(&unknown).is_err(),
            "undeclared parameter bound"
        );
    }
}

// ---- Config --------------------------------------------------------------------------

/// The config loader ([`Config::from_toml`]), with relative paths resolved in
/// `fixtures/config/` (where `cert.pem`, `key.pem`, `bundle.pem`, `signing.pem`,
/// `jwt-bundle.json` and `templates/` exist, so a config can load).
///
/// The input is TOML; after a NUL byte, environment overrides follow, one
/// `NAME=value` per line.
///
/// Checks: a refused config lists at least one problem; a loaded one keeps the rules
/// [`Config::from_toml`] enforces (absolute paths, distinct listeners, reaper bounds,
/// parsable introspection callers), and its `Debug` never shows the store URL's
/// password.
pub fn config(data: &[u8]) -> Outcome {
    let (toml, env) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], data.get(i + 1..).unwrap_or_default()),
        None => (data, &[][..]),
    };
    let (Ok(toml), Ok(env)) = (std::str::from_utf8(toml), std::str::from_utf8(env)) else {
        return Outcome::Rejected;
    };
    let vars: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let base = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/fuzzing/fixtures/config"
    ));
    match Config::from_toml(toml, vars.into_iter(), base) {
        Ok(c) => {
            assert!(c.templates.dir.is_absolute());
            assert!(c.signing.keys.iter().all(|k| k.path.is_absolute()));
            assert!(!c.signing.keys.is_empty());
            assert_ne!(c.listen.agent, c.listen.ops);
            assert!(
                Duration::from_millis(10) <= c.reaper.interval
                    && c.reaper.interval <= Duration::from_secs(1)
            );
            assert!((1..=1000).contains(&c.reaper.batch));
            assert!(crate::store::Durability::parse(&c.store.durability).is_some());
            assert_eq!(
                c.verifier_callers().entries().len(),
                c.verifier.callers.len()
            );
            // A config that loads has every class it lists, valid.
            assert_eq!(c.actor_classes().classes().len(), c.actors.classes.len());
            let url = &c.store.url;
            if let (Some(s), Some(at)) = (url.find("://"), url.rfind('@'))
                && at > s
                && let Some((_, password)) = url[s + 3..at].split_once(':')
                && password.len() >= 6
            {
                let shown = format!("{:?}", c.store);
                assert!(!shown.contains(password), "Debug shows the store password");
            }
            Outcome::Accepted
        }
        Err(e) => {
            assert!(!e.0.is_empty(), "refused without a problem");
            Outcome::Rejected
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_values_are_split_by_their_outer_length() {
        assert_eq!(
            split_der(&[0x30, 1, 9, 0x30, 0]),
            vec![&[0x30, 1, 9][..], &[0x30, 0]]
        );
        assert_eq!(
            split_der(&[0x30, 0x81, 2, 1, 2, 7]),
            vec![&[0x30, 0x81, 2, 1, 2][..], &[7]]
        );
        // A length past the end takes the rest; an unreadable one too.
        assert_eq!(split_der(&[0x30, 9, 1]), vec![&[0x30, 9, 1][..]]);
        assert_eq!(split_der(&[0x30, 0x80, 1]), vec![&[0x30, 0x80, 1][..]]);
        let many = [0x30u8, 0].repeat(20);
        let split = split_der(&many);
        assert_eq!(split.len(), MAX_CHAIN_LEN + 1);
        assert_eq!(split[MAX_CHAIN_LEN].len(), many.len() - 2 * MAX_CHAIN_LEN);
    }

    #[test]
    fn the_self_signing_modes_split_at_the_first_newline() {
        assert_eq!(signing_input(b"ab"), None);
        assert_eq!(signing_input(b"{}\n{\n}").as_deref(), Some("e30.ewp9"));
    }
}
