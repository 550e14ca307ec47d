//! Seed generator for Leash's fuzz targets.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml -p leash-fuzz-seedgen` (or
//! `scripts/fuzz seeds`) writes:
//!
//! - the fixed material `leash_broker::fuzzing` embeds, into
//!   `broker/src/fuzzing/fixtures/` — only where a file is missing, so re-running never
//!   invalidates a grown corpus: two CA certificates (a.test, b.test), the JWT-SVID
//!   signing keys of the fixed JWT bundle and the credential signing keys;
//! - the named seeds of every target into `fuzz/corpus/<target>/`, overwritten each run.
//!   `ok-*` seeds must be accepted and `no-*` seeds refused by the target's function
//!   (the replay test `broker/tests/fuzz_corpus.rs` checks both); `seed-*` are just
//!   interesting starting points.
//!
//! The CA private keys stay in `fuzz/seedgen/keys/` (never embedded anywhere) so the
//! same CAs sign new seeds on every run. None of this material trusts or protects
//! anything outside the fuzzing functions.
//!
//! The constants below must equal those of `broker/src/fuzzing/mod.rs`; if they drift,
//! the `ok-*` seeds stop being accepted and the replay test says so.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use ring::{
    rand::SystemRandom,
    signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
        EcdsaSigningAlgorithm, Ed25519KeyPair,
    },
};
use serde_json::{Value, json};

/// The fixed verification time of the X.509 and JWT targets: 2030-01-01T00:00:00Z.
const NOW_SECS: u64 = 1_893_456_000;
/// The audience the fixed JWT-SVID verifier expects.
const JWT_SVID_AUDIENCE: &str = "spiffe://a.test/leash";
/// A credential id in the documented form.
const CREDENTIAL_ID: &str = "tk_0123456789abcdef0123456789abcdef.c0011223344556677";

fn main() -> Result<()> {
    let root = match std::env::args().nth(1) {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .canonicalize()?,
    };
    if !root.join("broker/src/lib.rs").is_file() {
        bail!("{} is not the Leash repository root", root.display());
    }
    let g = Gen::new(&root)?;
    g.x509_svid()?;
    g.jwt_svid()?;
    g.credential()?;
    g.spiffe_id()?;
    g.store_ids()?;
    g.template()?;
    g.policy()?;
    g.config()?;
    println!("seeds written under {}", root.join("fuzz/corpus").display());
    Ok(())
}

struct Gen {
    root: PathBuf,
    ca_a: Issuer<'static, KeyPair>,
    ca_b: Issuer<'static, KeyPair>,
    jwt_a_p256: EcdsaKeyPair,
    jwt_b_p256: EcdsaKeyPair,
    jwt_b_p384: EcdsaKeyPair,
    cred_ed: Ed25519KeyPair,
    cred_es: EcdsaKeyPair,
}

fn fixtures(root: &Path) -> PathBuf {
    root.join("broker/src/fuzzing/fixtures")
}

/// Reads `path`, or writes what `make` returns there first.
fn read_or_create(path: &Path, make: impl FnOnce() -> Result<Vec<u8>>) -> Result<Vec<u8>> {
    if let Ok(bytes) = fs::read(path) {
        return Ok(bytes);
    }
    let bytes = make()?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    println!("created {}", path.display());
    Ok(bytes)
}

fn ecdsa(path: &Path, alg: &'static EcdsaSigningAlgorithm) -> Result<EcdsaKeyPair> {
    let rng = SystemRandom::new();
    let der = read_or_create(path, || {
        Ok(EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .map_err(|_| anyhow::anyhow!("key generation"))?
            .as_ref()
            .to_vec())
    })?;
    EcdsaKeyPair::from_pkcs8(alg, &der, &rng)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn ca_params(td: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Leash fuzzing CA {td}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").as_str().try_into()?)];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2035, 1, 1);
    Ok(params)
}

/// The CA of `td`: its key from `fuzz/seedgen/keys/`, its certificate in the fixtures.
fn ca(root: &Path, td: &str) -> Result<Issuer<'static, KeyPair>> {
    let key_path = root.join(format!("fuzz/seedgen/keys/{td}-ca.pk8"));
    let key_der = read_or_create(&key_path, || Ok(KeyPair::generate()?.serialize_der()))?;
    let key = KeyPair::try_from(key_der.as_slice())?;
    let params = ca_params(td)?;
    read_or_create(&fixtures(root).join(format!("{td}-ca.der")), || {
        Ok(params.self_signed(&key)?.der().to_vec())
    })?;
    Ok(Issuer::new(params, key))
}

impl Gen {
    fn new(root: &Path) -> Result<Self> {
        let fx = fixtures(root);
        let cred_ed_der = read_or_create(&fx.join("cred-ed25519.pk8"), || {
            Ok(Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| anyhow::anyhow!("key generation"))?
                .as_ref()
                .to_vec())
        })?;
        Ok(Self {
            root: root.to_owned(),
            ca_a: ca(root, "a.test")?,
            ca_b: ca(root, "b.test")?,
            jwt_a_p256: ecdsa(&fx.join("jwt-a-p256.pk8"), &ECDSA_P256_SHA256_FIXED_SIGNING)?,
            jwt_b_p256: ecdsa(&fx.join("jwt-b-p256.pk8"), &ECDSA_P256_SHA256_FIXED_SIGNING)?,
            jwt_b_p384: ecdsa(&fx.join("jwt-b-p384.pk8"), &ECDSA_P384_SHA384_FIXED_SIGNING)?,
            cred_ed: Ed25519KeyPair::from_pkcs8_maybe_unchecked(&cred_ed_der)
                .map_err(|e| anyhow::anyhow!("cred-ed25519.pk8: {e}"))?,
            cred_es: ecdsa(&fx.join("cred-es256.pk8"), &ECDSA_P256_SHA256_FIXED_SIGNING)?,
        })
    }

    fn seed(&self, target: &str, name: &str, bytes: impl AsRef<[u8]>) -> Result<()> {
        let dir = self.root.join("fuzz/corpus").join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(name), bytes.as_ref())?;
        Ok(())
    }

    // ---- X.509 -------------------------------------------------------------------

    fn x509_svid(&self) -> Result<()> {
        let t = "x509_svid";
        let leaf = |spec: Leaf, signer: &Issuer<'static, KeyPair>| spec.issue(Some(signer));
        self.seed(
            t,
            "ok-leaf-a",
            leaf(Leaf::new("spiffe://a.test/agent/1"), &self.ca_a)?,
        )?;
        self.seed(
            t,
            "ok-leaf-b",
            leaf(Leaf::new("spiffe://b.test/svc/web"), &self.ca_b)?,
        )?;
        self.seed(
            t,
            "ok-leaf-no-eku-dns-san",
            leaf(
                Leaf {
                    ekus: vec![],
                    dns: vec!["agent.local".into()],
                    ..Leaf::new("spiffe://a.test/agent/2")
                },
                &self.ca_a,
            )?,
        )?;
        let (inter_der, inter) = intermediate(
            &self.ca_a,
            "a.test",
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign],
        )?;
        self.seed(
            t,
            "ok-chain-via-intermediate",
            [
                leaf(Leaf::new("spiffe://a.test/agent/3"), &inter)?,
                inter_der.clone(),
            ]
            .concat(),
        )?;
        // X509-SVID 4.3: a signing certificate with keyUsage must have keyCertSign. Named
        // `seed-` because the rule is being added to path validation (issue 6 item 7).
        let (weak_der, weak) = intermediate(
            &self.ca_a,
            "a.test",
            vec![KeyUsagePurpose::DigitalSignature],
        )?;
        self.seed(
            t,
            "seed-chain-intermediate-without-keycertsign",
            [leaf(Leaf::new("spiffe://a.test/agent/4"), &weak)?, weak_der].concat(),
        )?;
        let mut too_long = Vec::new();
        for _ in 0..9 {
            too_long.extend_from_slice(&inter_der);
        }
        self.seed(t, "no-chain-too-long", too_long)?;

        let day = |y, m, d| rcgen::date_time_ymd(y, m, d);
        let cases: Vec<(&str, Leaf, Option<&Issuer<'static, KeyPair>>)> = vec![
            (
                "no-expired",
                Leaf {
                    not_after: day(2029, 12, 31),
                    ..Leaf::new("spiffe://a.test/agent/1")
                },
                Some(&self.ca_a),
            ),
            (
                "no-not-yet-valid",
                Leaf {
                    not_before: day(2030, 1, 2),
                    ..Leaf::new("spiffe://a.test/agent/1")
                },
                Some(&self.ca_a),
            ),
            ("no-self-signed", Leaf::new("spiffe://a.test/agent/1"), None),
            (
                "no-other-domains-ca",
                Leaf::new("spiffe://b.test/agent/1"),
                Some(&self.ca_a),
            ),
            (
                "no-unknown-trust-domain",
                Leaf::new("spiffe://c.test/agent/1"),
                Some(&self.ca_a),
            ),
            (
                "no-leaf-is-ca",
                Leaf {
                    is_ca: IsCa::Ca(BasicConstraints::Unconstrained),
                    ..Leaf::new("spiffe://a.test/agent/1")
                },
                Some(&self.ca_a),
            ),
            (
                "no-key-cert-sign",
                Leaf {
                    key_usages: vec![
                        KeyUsagePurpose::DigitalSignature,
                        KeyUsagePurpose::KeyCertSign,
                    ],
                    ..Leaf::new("spiffe://a.test/agent/1")
                },
                Some(&self.ca_a),
            ),
            (
                "no-key-usage",
                Leaf {
                    key_usages: vec![],
                    ..Leaf::new("spiffe://a.test/agent/1")
                },
                Some(&self.ca_a),
            ),
            (
                "no-key-usage-not-critical",
                Leaf {
                    key_usages: vec![],
                    custom: vec![CustomExtension::from_oid_content(
                        &[2, 5, 29, 15],
                        vec![0x03, 0x02, 0x07, 0x80],
                    )],
                    ..Leaf::new("spiffe://a.test/agent/1")
                },
                Some(&self.ca_a),
            ),
            (
                "no-two-uri-sans",
                Leaf {
                    uris: vec!["spiffe://a.test/x".into(), "spiffe://a.test/y".into()],
                    ..Leaf::new("")
                },
                Some(&self.ca_a),
            ),
            ("no-root-id", Leaf::new("spiffe://a.test"), Some(&self.ca_a)),
            (
                "no-bad-spiffe-id",
                Leaf::new("spiffe://A.test/agent/1"),
                Some(&self.ca_a),
            ),
            (
                "no-uri-san",
                Leaf {
                    uris: vec![],
                    dns: vec!["agent.local".into()],
                    ..Leaf::new("")
                },
                Some(&self.ca_a),
            ),
            (
                "no-server-auth-only",
                Leaf {
                    ekus: vec![ExtendedKeyUsagePurpose::ServerAuth],
                    ..Leaf::new("spiffe://a.test/agent/1")
                },
                Some(&self.ca_a),
            ),
        ];
        for (name, spec, signer) in cases {
            self.seed(t, name, spec.issue(signer)?)?;
        }
        // The CA certificate itself presented as a leaf.
        self.seed(
            t,
            "no-ca-as-leaf",
            fs::read(fixtures(&self.root).join("a.test-ca.der"))?,
        )?;
        self.seed(t, "no-garbage-der", [0x30, 0x03, 0x02, 0x01, 0x01])?;
        Ok(())
    }

    // ---- JWT-SVID ----------------------------------------------------------------

    fn jwt_svid(&self) -> Result<()> {
        let t = "jwt_svid";
        let exp = NOW_SECS + 300;
        let claims = |sub: &str| json!({ "sub": sub, "aud": JWT_SVID_AUDIENCE, "exp": exp });
        let es256 = |kid: &str| json!({ "alg": "ES256", "kid": kid, "typ": "JWT" });
        let a = "spiffe://a.test/agent/1";
        let b = "spiffe://b.test/svc/web";
        let sign = |key: &EcdsaKeyPair, h: &Value, c: &Value| jws(h, c, |m| ecdsa_sign(key, m));

        self.seed(
            t,
            "ok-a-p256",
            sign(&self.jwt_a_p256, &es256("p256"), &claims(a))?,
        )?;
        self.seed(
            t,
            "ok-b-p256",
            sign(&self.jwt_b_p256, &es256("p256"), &claims(b))?,
        )?;
        self.seed(
            // Two audiences: refused since JWT-SVIDs must name exactly one (issue 6 item 6).
            t,
            "no-b-p384-aud-array",
            sign(
                &self.jwt_b_p384,
                &json!({ "alg": "ES384", "kid": "p384" }),
                &json!({ "sub": b, "aud": ["other", JWT_SVID_AUDIENCE], "exp": exp, "iat": NOW_SECS }),
            )?,
        )?;
        self.seed(
            t,
            "ok-exp-within-leeway",
            sign(
                &self.jwt_a_p256,
                &es256("p256"),
                &json!({ "sub": a, "aud": JWT_SVID_AUDIENCE, "exp": NOW_SECS - 2 }),
            )?,
        )?;
        // a.test's key signing for b.test: b.test's "p256" is another key.
        self.seed(
            t,
            "no-cross-domain-key",
            sign(&self.jwt_a_p256, &es256("p256"), &claims(b))?,
        )?;
        self.seed(
            t,
            "no-expired",
            sign(
                &self.jwt_a_p256,
                &es256("p256"),
                &json!({ "sub": a, "aud": JWT_SVID_AUDIENCE, "exp": NOW_SECS - 6 }),
            )?,
        )?;
        self.seed(
            t,
            "no-wrong-audience",
            sign(
                &self.jwt_a_p256,
                &es256("p256"),
                &json!({ "sub": a, "aud": "spiffe://a.test/other", "exp": exp }),
            )?,
        )?;
        self.seed(
            t,
            "no-no-exp",
            sign(
                &self.jwt_a_p256,
                &es256("p256"),
                &json!({ "sub": a, "aud": JWT_SVID_AUDIENCE }),
            )?,
        )?;
        self.seed(
            t,
            "no-root-sub",
            sign(&self.jwt_a_p256, &es256("p256"), &claims("spiffe://a.test"))?,
        )?;
        self.seed(
            t,
            "no-typ",
            sign(
                &self.jwt_a_p256,
                &json!({ "alg": "ES256", "kid": "p256", "typ": "at+jwt" }),
                &claims(a),
            )?,
        )?;
        self.seed(
            t,
            "no-crit",
            sign(
                &self.jwt_a_p256,
                &json!({ "alg": "ES256", "kid": "p256", "crit": ["exp"] }),
                &claims(a),
            )?,
        )?;
        self.seed(
            t,
            "no-alg-none",
            jws(&json!({ "alg": "none", "kid": "p256" }), &claims(a), |_| {
                Ok(vec![])
            })?,
        )?;
        self.seed(
            t,
            "no-alg-hs256",
            jws(
                &json!({ "alg": "HS256", "kid": "p256" }),
                &claims(a),
                |_| Ok(vec![7; 32]),
            )?,
        )?;
        self.seed(
            t,
            "no-rsa-key-forged",
            jws(&json!({ "alg": "RS256", "kid": "rsa" }), &claims(a), |_| {
                Ok(vec![1; 256])
            })?,
        )?;
        let good = sign(&self.jwt_a_p256, &es256("p256"), &claims(a))?;
        let parts: Vec<&str> = good.split('.').collect();
        let evil = URL_SAFE_NO_PAD.encode(claims("spiffe://a.test/admin").to_string());
        self.seed(
            t,
            "no-tampered-claims",
            format!("{}.{evil}.{}", parts[0], parts[2]),
        )?;
        self.seed(t, "no-jwe", "a.b.c.d.e")?;
        self.seed(
            t,
            "no-json-serialization",
            r#"{"payload":"e30","signatures":[]}"#,
        )?;

        // Self-signing mode: `<header JSON>\n<claims JSON>`, signed by every fixed key.
        let two = |h: &Value, c: &Value| format!("{h}\n{c}");
        self.seed(t, "ok-sign-a-p256", two(&es256("p256"), &claims(a)))?;
        self.seed(
            t,
            "ok-sign-b-p384-float-exp",
            two(
                &json!({ "alg": "ES384", "kid": "p384", "typ": "JOSE" }),
                &json!({ "sub": b, "aud": [JWT_SVID_AUDIENCE], "exp": 1_893_456_100.5 }),
            ),
        )?;
        self.seed(
            t,
            "seed-sign-large-exp",
            two(
                &es256("p256"),
                &json!({ "sub": a, "aud": JWT_SVID_AUDIENCE, "exp": 9_000_000_000_000u64 }),
            ),
        )?;
        self.seed(t, "no-sign-unknown-kid", two(&es256("nope"), &claims(a)))?;

        // JWKS mode: the whole input as a JWT bundle document.
        self.seed(
            t,
            "ok-jwks",
            jwks(&[("p256", &self.jwt_a_p256, "P-256")]).to_string(),
        )?;
        self.seed(
            t,
            "no-jwks-duplicate-kid",
            json!({ "keys": [
                jwk("p256", &self.jwt_a_p256, "P-256"),
                jwk("p256", &self.jwt_b_p256, "P-256"),
            ]})
            .to_string(),
        )?;
        Ok(())
    }

    // ---- Introspection credentials -----------------------------------------------

    fn credential(&self) -> Result<()> {
        let t = "credential";
        let header = |alg: &str, kid: &str| json!({ "alg": alg, "kid": kid, "typ": "at+jwt" });
        let claims = json!({
            "iss": "https://leash.fuzz.test", "sub": "spiffe://a.test/agent/1",
            "aud": "https://api.fuzz.test", "scope": "repo:acme/widgets:read",
            "jti": CREDENTIAL_ID, "iat": NOW_SECS, "nbf": NOW_SECS, "exp": NOW_SECS + 60,
            "leash_task": "tk_0123456789abcdef0123456789abcdef",
            "cnf": { "x5t#S256": "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU" },
        });
        let ed = |m: &[u8]| Ok(self.cred_ed.sign(m).as_ref().to_vec());
        let es = |m: &[u8]| ecdsa_sign(&self.cred_es, m);
        self.seed(
            t,
            "ok-jwt-eddsa",
            jws(&header("EdDSA", "fuzz-ed"), &claims, ed)?,
        )?;
        self.seed(
            t,
            "ok-jwt-es256",
            jws(&header("ES256", "fuzz-es"), &claims, es)?,
        )?;
        let secret = URL_SAFE_NO_PAD.encode([0x5a; 32]);
        self.seed(t, "ok-opaque", format!("lsh_{CREDENTIAL_ID}.{secret}"))?;
        self.seed(
            t,
            "no-opaque-short-secret",
            format!("lsh_{CREDENTIAL_ID}.{}", &secret[1..]),
        )?;
        self.seed(
            t,
            "no-opaque-bad-id",
            format!("lsh_tk_0123456789ABCDEF0123456789abcdef.c0011223344556677.{secret}"),
        )?;
        self.seed(
            t,
            "no-jwt-alg-mismatch",
            jws(&header("ES256", "fuzz-ed"), &claims, ed)?,
        )?;
        self.seed(
            t,
            "no-jwt-unknown-kid",
            jws(&header("EdDSA", "other"), &claims, ed)?,
        )?;
        self.seed(
            t,
            "no-jwt-alg-none",
            jws(&json!({ "alg": "none", "kid": "fuzz-ed" }), &claims, |_| {
                Ok(vec![])
            })?,
        )?;
        let mut no_jti = claims.clone();
        if let Some(m) = no_jti.as_object_mut() {
            m.remove("jti");
        }
        self.seed(
            t,
            "no-jwt-without-jti",
            jws(&header("EdDSA", "fuzz-ed"), &no_jti, ed)?,
        )?;
        let good = jws(&header("EdDSA", "fuzz-ed"), &claims, ed)?;
        let parts: Vec<&str> = good.split('.').collect();
        let mut evil = claims.clone();
        evil["scope"] = json!("repo:acme/widgets:admin");
        let evil = URL_SAFE_NO_PAD.encode(evil.to_string());
        self.seed(
            t,
            "no-jwt-tampered",
            format!("{}.{evil}.{}", parts[0], parts[2]),
        )?;
        // Self-signing mode: `<header JSON>\n<claims JSON>`, signed by both keys.
        self.seed(
            t,
            "ok-sign-eddsa",
            format!("{}\n{claims}", header("EdDSA", "fuzz-ed")),
        )?;
        self.seed(
            t,
            "seed-sign-es256-big-nbf",
            format!(
                "{}\n{}",
                header("ES256", "fuzz-es"),
                json!({ "jti": CREDENTIAL_ID, "nbf": u64::MAX })
            ),
        )?;
        Ok(())
    }

    // ---- Text parsers ------------------------------------------------------------

    fn spiffe_id(&self) -> Result<()> {
        let t = "spiffe_id";
        for (name, text) in [
            ("ok-id", "spiffe://a.test/agent/1"),
            ("ok-root-id", "spiffe://a.test"),
            (
                "ok-long-path",
                "spiffe://example.org/ns/prod/sa/my-agent_v2.1",
            ),
            ("ok-pattern-below", "spiffe://a.test/agent/*"),
            (
                "ok-pattern-matches",
                "spiffe://a.test/agent/*\nspiffe://a.test/agent/7",
            ),
            (
                "ok-pattern-domain",
                "spiffe://a.test/*\nspiffe://a.test/x/y",
            ),
            ("ok-trust-domain", "a-b_c.example.org"),
            (
                "seed-pattern-not-below",
                "spiffe://a.test/agent/*\nspiffe://a.test/agentx/7",
            ),
            (
                "seed-pattern-exact",
                "spiffe://a.test/agent\nspiffe://a.test/agent",
            ),
            ("no-port", "spiffe://a.test:443/x"),
            ("no-userinfo", "spiffe://u@a.test/x"),
            ("no-uppercase-domain", "spiffe://A.test/x"),
            ("no-percent", "spiffe://a.test/x%2F"),
            ("no-query", "spiffe://a.test/x?y"),
            ("no-fragment", "spiffe://a.test/x#y"),
            ("no-dot-segment", "spiffe://a.test/x/../y"),
            ("no-trailing-slash", "spiffe://a.test/x/"),
            ("no-empty-segment", "spiffe://a.test//x"),
            ("no-scheme", "https://a.test/x"),
            ("no-star-inside", "spiffe://a.test/*/x"),
            ("no-ipv6", "spiffe://[::1]/x"),
        ] {
            self.seed(t, name, text)?;
        }
        Ok(())
    }

    fn store_ids(&self) -> Result<()> {
        let t = "store_ids";
        let cursor: Vec<String> = (0..16)
            .map(|i| format!("{}-{i}", 1_700_000_000_000u64 + i))
            .collect();
        for (name, text) in [
            (
                "ok-task-id",
                "tk_0123456789abcdef0123456789abcdef".to_owned(),
            ),
            ("ok-credential-id", CREDENTIAL_ID.to_owned()),
            ("ok-cursor", format!("v1:{}", cursor.join(","))),
            ("ok-log-id", "1700000000000-3".to_owned()),
            (
                "no-task-id-upper",
                "tk_0123456789ABCDEF0123456789abcdef".to_owned(),
            ),
            (
                "no-credential-id-short",
                "tk_0123456789abcdef0123456789abcdef.c00112233".to_owned(),
            ),
            (
                "no-cursor-15-shards",
                format!("v1:{}", cursor[..15].join(",")),
            ),
            ("no-cursor-v2", format!("v2:{}", cursor.join(","))),
        ] {
            self.seed(t, name, text)?;
        }
        Ok(())
    }

    fn policy(&self) -> Result<()> {
        let t = "policy";
        for entry in fs::read_dir(self.root.join("examples/policies"))? {
            let path = entry?.path();
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                self.seed(t, &format!("ok-example-{stem}"), fs::read(&path)?)?;
            }
        }
        for (name, text) in [
            ("ok-bare-permit", "permit (principal, action, resource);\n"),
            (
                "no-syntax",
                "@id(\"broken\")\nforbid (principal, action, resource)\n  when { context.class == };\n",
            ),
            (
                "no-schema-attribute",
                "@id(\"typo\")\nforbid (principal, action, resource)\n  when { context.scope_class.contains(\"write\") };\n",
            ),
            (
                "no-duplicate-id",
                "@id(\"x\")\npermit (principal, action, resource);\n@id(\"x\")\nforbid (principal, action, resource);\n",
            ),
            (
                "no-template-slot",
                "permit (principal == ?principal, action, resource);\n",
            ),
        ] {
            self.seed(t, name, text)?;
        }
        Ok(())
    }

    fn template(&self) -> Result<()> {
        let t = "template";
        for entry in fs::read_dir(self.root.join("examples/templates"))? {
            let path = entry?.path();
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                self.seed(t, &format!("ok-example-{stem}"), fs::read(&path)?)?;
            }
        }
        let base = r#"name: demo
version: "1"
owner: team@acme.test
description: A demo.
identities:
  - spiffe://acme.test/agent/*
parameters:
  repo:
    type: string
    pattern: "[a-z]+"
    required: true
  count:
    type: integer
    min: 1
    max: 10
  flag:
    type: boolean
    required: false
lease:
  ttl: 60s
  max_ttl: 5m
  max_lifetime: 1h
grants:
  - name: api
    kind: jwt
    audience: https://api.acme.test
    scopes: [{scope: "read:{repo}", class: read}, {scope: "n:{count}", class: read}]
    ttl: 60s
"#;
        self.seed(t, "ok-base", base)?;
        self.seed(
            t,
            "ok-flow-style",
            "{name: flow, version: 2, owner: o, identities: [spiffe://a.test/x], \
             lease: {ttl: 1s, max_ttl: 1s, max_lifetime: 1s}, \
             grants: [{name: g, kind: opaque, audience: aud, scopes: [{scope: s, class: read}], ttl: 1s}]}\n",
        )?;
        let edits: &[(&str, &str, &str)] = &[
            (
                "no-unknown-key",
                "owner: team@acme.test\n",
                "owner: team@acme.test\nextra: 1\n",
            ),
            (
                "no-ttl-above-max",
                "ttl: 60s\n  max_ttl: 5m",
                "ttl: 10m\n  max_ttl: 5m",
            ),
            (
                "no-optional-in-scope",
                "\"n:{count}\", class: read}]",
                "\"n:{count}\", class: read}, {scope: \"f:{flag}\", class: read}]",
            ),
            (
                "no-unclassified-scope",
                "{scope: \"n:{count}\", class: read}]",
                "\"n:{count}\"]",
            ),
            (
                "no-unknown-scope-class",
                "class: read}]",
                "class: delete}]",
            ),
            ("no-unconstrained-string", "    pattern: \"[a-z]+\"\n", ""),
            (
                "no-duplicate-key",
                "version: \"1\"\n",
                "version: \"1\"\nversion: \"2\"\n",
            ),
            (
                "no-alias",
                "description: A demo.\n",
                "description: &d A demo.\nowner2: *d\n",
            ),
            ("no-bad-pattern", "\"[a-z]+\"", "\"[a-z\""),
            (
                "no-bad-identity",
                "spiffe://acme.test/agent/*",
                "spiffe://acme.test/*/agent",
            ),
            ("no-tab-indent", "  repo:", "\trepo:"),
            (
                "ok-tenant-classes",
                "description: A demo.\n",
                "description: A demo.\ntenant: acme\nclasses: [agent, ci]\n",
            ),
            (
                "no-classes-empty",
                "description: A demo.\n",
                "description: A demo.\nclasses: []\n",
            ),
            (
                "no-bad-tenant",
                "description: A demo.\n",
                "description: A demo.\ntenant: Acme Corp\n",
            ),
        ];
        for (name, from, to) in edits {
            let text = base.replacen(from, to, 1);
            if text == base {
                bail!("template seed {name}: edit did not apply");
            }
            self.seed(t, name, text)?;
        }
        self.seed(
            t,
            "no-deep-nesting",
            format!("{}1{}\n", "[".repeat(40), "]".repeat(40)),
        )?;
        self.seed(t, "no-two-documents", format!("{base}---\n{base}"))?;
        Ok(())
    }

    fn config(&self) -> Result<()> {
        let t = "config";
        // Paths are relative to the fixture directory `leash_broker::fuzzing` loads from,
        // where these files exist (empty: loading the config only checks they exist).
        let example = fs::read_to_string(self.root.join("examples/leash.toml"))?;
        self.seed(t, "no-example-absolute-paths", &example)?;
        let mut relative = example.clone();
        for (from, to) in [
            ("/etc/leash/tls/broker.pem", "cert.pem"),
            ("/etc/leash/tls/broker-key.pem", "key.pem"),
            ("/etc/leash/bundles/acme.test.pem", "bundle.pem"),
            ("/etc/leash/templates", "templates"),
            ("/etc/leash/keys/2026-11.pem", "signing.pem"),
        ] {
            if !relative.contains(from) {
                bail!("examples/leash.toml no longer mentions {from}; update the config seeds");
            }
            relative = relative.replace(from, to);
        }
        self.seed(t, "ok-example", &relative)?;
        let jwt_svid = relative
            .replace("# [jwt_svid]", "[jwt_svid]")
            .replace("# listen = \"0.0.0.0:8444\"", "listen = \"0.0.0.0:8444\"")
            .replace("# audience = ", "audience = ")
            .replace(
                "# bundles = { \"acme.test\" = \"/etc/leash/bundles/acme.test.jwks.json\" }",
                "bundles = { \"acme.test\" = \"jwt-bundle.json\" }",
            )
            .replace("# leeway = ", "leeway = ");
        if jwt_svid == relative {
            bail!("examples/leash.toml's [jwt_svid] section changed; update the config seeds");
        }
        self.seed(t, "ok-example-jwt-svid", &jwt_svid)?;
        let small = r#"[listen]
agent = "127.0.0.1:8443"
ops = "127.0.0.1:8080"
[tls]
cert = "cert.pem"
key = "key.pem"
bundles = { "acme.test" = "bundle.pem" }
[templates]
dir = "templates"
[signing]
issuer = "https://leash.acme.test"
keys = [{ kid = "k1", path = "signing.pem" }]
[verifier]
callers = [
  { identity = "spiffe://acme.test/resource/github", audiences = ["https://api.github.test"] },
  { identity = "spiffe://acme.test/resource/*", audiences = ["https://api.acme.test", "postgres://db.acme.test"] },
  { identity = "spiffe://acme.test/ops/auditor", audiences = ["*"] },
]
"#;
        self.seed(t, "ok-small", small)?;
        // Environment overrides after a NUL byte, one `NAME=value` per line.
        self.seed(
            t,
            "ok-small-env-overrides",
            format!(
                "{small}\0LEASH_STORE__URL=redis://:secret@10.0.0.5:6379/0\n\
                 LEASH_REAPER__INTERVAL=100ms\nLEASH_REAPER__BATCH=64\nLEASH_STORE__KIND=memory\n\
                 LEASH_LOG=debug\n"
            ),
        )?;
        self.seed(
            t,
            "no-env-into-scalar",
            format!("{small}\0LEASH_SIGNING__ISSUER__X=1\n"),
        )?;
        self.seed(
            t,
            "no-unknown-key",
            small.replace("[templates]", "[templates]\nextra = 1"),
        )?;
        self.seed(
            t,
            "no-same-listen",
            small.replace("127.0.0.1:8080", "127.0.0.1:8443"),
        )?;
        self.seed(
            t,
            "no-workload-api-with-files",
            small.replace("[tls]", "[tls]\nsource = \"workload_api\""),
        )?;
        self.seed(t, "no-toml-syntax", "[listen\nagent = ")?;
        // `[verifier] callers`: the key it replaced, and each rule an entry must keep.
        let verifier = small
            .find("[verifier]")
            .context("the small config has a [verifier] section")?;
        let with_verifier = |body: &str| format!("{}[verifier]\n{body}\n", &small[..verifier]);
        for (name, body) in [
            (
                "no-verifier-introspect-callers",
                r#"introspect_callers = ["spiffe://acme.test/resource/*"]"#,
            ),
            (
                "no-verifier-empty-audiences",
                r#"callers = [{ identity = "spiffe://acme.test/resource/*", audiences = [] }]"#,
            ),
            (
                "no-verifier-star-mixed",
                r#"callers = [{ identity = "spiffe://acme.test/resource/*", audiences = ["*", "https://a.test"] }]"#,
            ),
            (
                "no-verifier-duplicate-audience",
                r#"callers = [{ identity = "spiffe://acme.test/resource/*", audiences = ["https://a.test", "https://a.test"] }]"#,
            ),
            (
                "no-verifier-bad-pattern",
                r#"callers = [{ identity = "spiffe://acme.test/res*", audiences = ["https://a.test"] }]"#,
            ),
            (
                "no-verifier-shadowed",
                r#"callers = [
  { identity = "spiffe://acme.test/resource/*", audiences = ["https://a.test"] },
  { identity = "spiffe://acme.test/resource/api", audiences = ["https://b.test"] },
]"#,
            ),
        ] {
            self.seed(t, name, with_verifier(body))?;
        }
        self.seed(t, "ok-verifier-none", with_verifier(""))?;
        // `[[actors.classes]]`: a good list, and each rule an entry must keep.
        let class = |body: &str| {
            format!(
                "{small}\n[[actors.classes]]\nname = \"agent\"\ntenant = \"acme\"\nowner = \"o\"\n{body}\n"
            )
        };
        for (name, body) in [
            (
                "ok-actors",
                "identities = [\"spiffe://acme.test/agent/*\"]\nmax_ttl = \"5m\"\nmax_concurrent_tasks = 10\nmax_concurrent_tasks_per_identity = 2\nbegin_rate = \"60/1m\"\nbegin_rate_per_identity = \"1/1m\"",
            ),
            ("no-actors-no-identities", "identities = []"),
            (
                "no-actors-bad-rate",
                "identities = [\"spiffe://acme.test/agent/*\"]\nbegin_rate = \"0/1m\"",
            ),
            (
                "no-actors-shadowed",
                "identities = [\"spiffe://acme.test/*\", \"spiffe://acme.test/agent/x\"]",
            ),
        ] {
            self.seed(t, name, class(body))?;
        }
        Ok(())
    }
}

// ---- helpers ---------------------------------------------------------------------

struct Leaf {
    uris: Vec<String>,
    dns: Vec<String>,
    is_ca: IsCa,
    key_usages: Vec<KeyUsagePurpose>,
    ekus: Vec<ExtendedKeyUsagePurpose>,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
    custom: Vec<CustomExtension>,
}

impl Leaf {
    /// A valid X509-SVID for `uri` (no URI SAN when `uri` is empty).
    fn new(uri: &str) -> Self {
        Self {
            uris: if uri.is_empty() {
                vec![]
            } else {
                vec![uri.to_owned()]
            },
            dns: vec![],
            is_ca: IsCa::ExplicitNoCa,
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
            ekus: vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
            not_before: rcgen::date_time_ymd(2025, 1, 1),
            not_after: rcgen::date_time_ymd(2034, 1, 1),
            custom: vec![],
        }
    }

    /// The leaf's DER, signed by `signer` or self-signed.
    fn issue(self, signer: Option<&Issuer<'static, KeyPair>>) -> Result<Vec<u8>> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let mut sans = Vec::new();
        for u in &self.uris {
            sans.push(SanType::URI(u.as_str().try_into()?));
        }
        for d in &self.dns {
            sans.push(SanType::DnsName(d.as_str().try_into()?));
        }
        params.subject_alt_names = sans;
        params.is_ca = self.is_ca;
        params.key_usages = self.key_usages;
        params.extended_key_usages = self.ekus;
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        params.custom_extensions = self.custom;
        params.use_authority_key_identifier_extension = signer.is_some();
        let cert = match signer {
            Some(issuer) => params.signed_by(&key, issuer)?,
            None => params.self_signed(&key)?,
        };
        Ok(cert.der().to_vec())
    }
}

/// An intermediate CA of `td` below `parent` with `key_usages`: its DER and issuer.
fn intermediate(
    parent: &Issuer<'static, KeyPair>,
    td: &str,
    key_usages: Vec<KeyUsagePurpose>,
) -> Result<(Vec<u8>, Issuer<'static, KeyPair>)> {
    let key = KeyPair::generate()?;
    let mut params = ca_params(td)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Leash fuzzing intermediate {td}"),
    );
    params.key_usages = key_usages;
    params.not_after = rcgen::date_time_ymd(2034, 6, 1);
    params.use_authority_key_identifier_extension = true;
    let der = params.signed_by(&key, parent)?.der().to_vec();
    Ok((der, Issuer::new(params, key)))
}

fn ecdsa_sign(key: &EcdsaKeyPair, message: &[u8]) -> Result<Vec<u8>> {
    key.sign(&SystemRandom::new(), message)
        .map(|s| s.as_ref().to_vec())
        .map_err(|_| anyhow::anyhow!("signing"))
}

/// A compact JWS of `header` and `claims` with the signature `sign` makes.
fn jws(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Result<Vec<u8>>) -> Result<String> {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = sign(input.as_bytes())?;
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

fn jwk(kid: &str, key: &EcdsaKeyPair, crv: &str) -> Value {
    use ring::signature::KeyPair as _;
    let point = key.public_key().as_ref();
    let n = (point.len() - 1) / 2;
    json!({
        "kty": "EC", "crv": crv, "kid": kid, "use": "jwt-svid",
        "x": URL_SAFE_NO_PAD.encode(&point[1..=n]),
        "y": URL_SAFE_NO_PAD.encode(&point[n + 1..]),
    })
}

fn jwks(keys: &[(&str, &EcdsaKeyPair, &str)]) -> Value {
    json!({ "keys": keys.iter().map(|(kid, key, crv)| jwk(kid, key, crv)).collect::<Vec<_>>() })
}
