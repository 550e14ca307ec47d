//! JWT-SVID as the second way in: a listener without client certificates where
//! each call carries `authorization: Bearer <JWT-SVID>`. Tokens are built here
//! with ring, independently of the broker's code, and each JWT-SVID.md rule is
//! broken once.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use leash_e2e::{BrokerOptions, TestBroker, free_port, pb, review_request};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use serde_json::{Value, json};
use tonic::{Code, Request, transport::Channel};

const AUDIENCE: &str = "spiffe://acme.test/leash";

/// A JWT authority of one trust domain: a P-256 key and its `kid`.
struct Authority {
    key: EcdsaKeyPair,
    kid: String,
}

impl Authority {
    fn new(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Self {
            key,
            kid: kid.to_owned(),
        }
    }

    /// The JWT bundle (SPIFFE bundle format: a JWK Set, `use: jwt-svid`).
    fn jwks(&self) -> String {
        let point = self.key.public_key().as_ref();
        json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
        .to_string()
    }

    fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    fn header(&self) -> Value {
        json!({ "alg": "ES256", "kid": self.kid, "typ": "JWT" })
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "aud": [AUDIENCE], "exp": now() + 240, "iat": now() })
}

struct Setup {
    broker: TestBroker,
    port: u16,
    acme: Authority,
    bundles: tempfile::TempDir,
}

async fn setup() -> Setup {
    let acme = Authority::new("acme-1");
    let other = Authority::new("other-1");
    let bundles = tempfile::tempdir().unwrap();
    std::fs::write(bundles.path().join("acme.json"), acme.jwks()).unwrap();
    std::fs::write(bundles.path().join("other.json"), other.jwks()).unwrap();
    let port = free_port();
    let mut options = BrokerOptions::memory();
    options.extra_toml = format!(
        r#"[jwt_svid]
listen = "127.0.0.1:{port}"
audience = "{AUDIENCE}"
leeway = "5s"
bundles = {{ "acme.test" = "{dir}/acme.json", "other.test" = "{dir}/other.json" }}
"#,
        dir = bundles.path().display()
    );
    let broker = TestBroker::start(options).await;
    Setup {
        broker,
        port,
        acme,
        bundles,
    }
}

/// A channel to the JWT-SVID listener: server-authenticated TLS only.
async fn channel(s: &Setup) -> Channel {
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(s.broker.pki.bundle())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    // The listener may still be binding right after start.
    for _ in 0..50 {
        if let Ok(c) = leash_broker::cli::client::connect_with(
            &format!("https://localhost:{}", s.port),
            Arc::new(config.clone()),
        )
        .await
        {
            return c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the JWT-SVID listener never came up");
}

fn with_bearer<T>(body: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(body);
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    request
}

async fn begin(ch: &Channel, token: Option<&str>) -> Result<pb::BeginTaskResponse, tonic::Status> {
    pb::broker_client::BrokerClient::new(ch.clone())
        .begin_task(with_bearer(review_request(), token))
        .await
        .map(tonic::Response::into_inner)
}

fn payload(jwt: &str) -> Value {
    serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_jwt_svid_is_accepted_and_its_credentials_say_they_are_unbound() {
    let s = setup().await;
    let ch = channel(&s).await;
    let token = s
        .acme
        .sign(&s.acme.header(), &claims("spiffe://acme.test/agent/jwt"));
    let begun = begin(&ch, Some(&token)).await.unwrap();
    let jwt = &begun.credentials[0].value;
    let p = payload(jwt);
    assert_eq!(p["sub"], "spiffe://acme.test/agent/jwt");
    assert!(
        p.get("cnf").is_none(),
        "bound to a certificate it never saw: {p}"
    );
    assert_eq!(p["leash_binding"], "none");

    // A resource server may introspect over the same listener with its own JWT-SVID.
    let resource = s
        .acme
        .sign(&s.acme.header(), &claims("spiffe://acme.test/resource/api"));
    let answer = pb::verifier_client::VerifierClient::new(ch.clone())
        .introspect(with_bearer(
            pb::IntrospectRequest {
                token: begun.credentials[1].value.clone(),
            },
            Some(&resource),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.active);
    assert_eq!(
        answer.cnf_x5t_s256, "",
        "an opaque credential of a JWT-SVID is unbound"
    );

    // Renewal and completion by the same SPIFFE ID with a fresh token.
    let again = s
        .acme
        .sign(&s.acme.header(), &claims("spiffe://acme.test/agent/jwt"));
    pb::broker_client::BrokerClient::new(ch.clone())
        .complete_task(with_bearer(
            pb::CompleteTaskRequest {
                task_id: begun.task_id.clone(),
                ..Default::default()
            },
            Some(&again),
        ))
        .await
        .unwrap();
    s.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broken_rule_is_refused_and_changes_nothing() {
    let s = setup().await;
    let ch = channel(&s).await;
    let a = &s.acme;
    let sub = "spiffe://acme.test/agent/refused";
    let unsigned = |header: Value, claims: Value| {
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    };
    let hs256 = {
        let header = json!({ "alg": "HS256", "kid": a.kid, "typ": "JWT" });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims(sub).to_string())
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, a.jwks().as_bytes());
        let tag = ring::hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    };
    let mut no_exp = claims(sub);
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut wrong_aud = claims(sub);
    wrong_aud["aud"] = json!("spiffe://acme.test/someone-else");
    let mut expired = claims(sub);
    expired["exp"] = json!(now() - 120);
    let mut unknown_kid = a.header();
    unknown_kid["kid"] = json!("nobody");
    let good = a.sign(&a.header(), &claims(sub));
    let mut tampered = good.clone();
    tampered.replace_range(tampered.len() - 4.., "AAAA");
    let mut bad_sub = claims(sub);
    bad_sub["sub"] = json!("spiffe://ACME.test/agent/x");
    // JWT-SVID.md 3: a token for several audiences can be replayed by any of them.
    let mut two_audiences = claims(sub);
    two_audiences["aud"] = json!(["spiffe://acme.test/other", AUDIENCE]);
    let mut no_audience = claims(sub);
    no_audience["aud"] = json!([]);
    // Longer-lived than `[jwt_svid] max_lifetime` (default 5 min) allows.
    let mut long_lived = claims(sub);
    long_lived["exp"] = json!(now() + 3600);

    let cases: Vec<(&str, Option<String>, &str)> = vec![
        (
            "alg none",
            Some(unsigned(
                json!({ "alg": "none", "kid": a.kid }),
                claims(sub),
            )),
            "not allowed",
        ),
        ("HS256", Some(hs256), "not allowed"),
        (
            "wrong audience",
            Some(a.sign(&a.header(), &wrong_aud)),
            "aud",
        ),
        ("expired", Some(a.sign(&a.header(), &expired)), "expired"),
        (
            "unknown kid",
            Some(a.sign(&unknown_kid, &claims(sub))),
            "not in the JWT bundle",
        ),
        // Signed by acme.test's key, claiming to be a workload of other.test.
        (
            "foreign trust domain",
            Some(a.sign(&a.header(), &claims("spiffe://other.test/agent/x"))),
            "not in the JWT bundle of \"other.test\"",
        ),
        (
            "unconfigured trust domain",
            Some(a.sign(&a.header(), &claims("spiffe://evil.test/agent/x"))),
            "no JWT bundle",
        ),
        ("missing exp", Some(a.sign(&a.header(), &no_exp)), "exp"),
        ("invalid sub", Some(a.sign(&a.header(), &bad_sub)), "sub"),
        (
            "two audiences",
            Some(a.sign(&a.header(), &two_audiences)),
            "exactly one audience",
        ),
        (
            "empty audience list",
            Some(a.sign(&a.header(), &no_audience)),
            "exactly one audience",
        ),
        (
            "exp too far ahead",
            Some(a.sign(&a.header(), &long_lived)),
            "max_lifetime",
        ),
        ("bad signature", Some(tampered), "bad signature"),
        ("JWE", Some("a.b.c.d.e".to_owned()), "JWE"),
        (
            "JSON serialization",
            Some("{\"payload\":\"x\"}".to_owned()),
            "compact",
        ),
        ("garbage", Some("not-a-token".to_owned()), "compact JWS"),
        (
            "crit header",
            Some(a.sign(
                &json!({ "alg": "ES256", "kid": a.kid, "crit": ["exp"] }),
                &claims(sub),
            )),
            "crit",
        ),
        ("no token", None, "Bearer"),
    ];
    for (name, token, why) in cases {
        let err = begin(&ch, token.as_deref()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{name}: {err:?}");
        assert!(
            err.message().contains(why),
            "{name}: {:?} lacks {why:?}",
            err.message()
        );
    }
    // Nothing was declared by a refused caller; the good token still works.
    assert!(
        !leash_e2e::logs()
            .lines()
            .any(|l| l.contains("task.begun") && l.contains("agent/refused")),
        "a refused caller declared a task"
    );
    begin(&ch, Some(&good)).await.unwrap();
    s.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mtls_port_ignores_bearer_tokens() {
    let s = setup().await;
    let token = s
        .acme
        .sign(&s.acme.header(), &claims("spiffe://acme.test/agent/sneaky"));
    // An mTLS caller's identity is its certificate, whatever header it adds.
    let begun = pb::broker_client::BrokerClient::new(s.broker.channel("agent/honest").await)
        .begin_task(with_bearer(review_request(), Some(&token)))
        .await
        .unwrap()
        .into_inner();
    let p = payload(&begun.credentials[0].value);
    assert_eq!(p["sub"], "spiffe://acme.test/agent/honest");
    assert!(p.get("cnf").is_some());
    s.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bundles_reload_without_restart() {
    let s = setup().await;
    let ch = channel(&s).await;
    let sub = "spiffe://acme.test/agent/rotating";
    let old = s.acme.sign(&s.acme.header(), &claims(sub));
    begin(&ch, Some(&old)).await.unwrap();

    // The trust domain rotates its JWT authority: new key, new kid.
    let next = Authority::new("acme-2");
    let path = s.bundles.path().join("acme.json");
    let tmp = s.bundles.path().join("acme.json.tmp");
    std::fs::write(&tmp, next.jwks()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let fresh = next.sign(&next.header(), &claims(sub));
    let took = leash_e2e::eventually(std::time::Duration::from_secs(5), || async {
        begin(&ch, Some(&fresh)).await.is_ok()
    })
    .await;
    assert!(took.is_some(), "the new JWT bundle was never loaded");
    let err = begin(&ch, Some(&old)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("not in the JWT bundle"), "{err:?}");

    // A broken edit keeps the last good bundle.
    std::fs::write(&tmp, "{ not json").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    begin(&ch, Some(&next.sign(&next.header(), &claims(sub))))
        .await
        .unwrap();
    s.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_just_past_exp_is_accepted_within_the_leeway() {
    let s = setup().await;
    let ch = channel(&s).await;
    // The listener allows 5 s of clock skew: 2 s past `exp` passes end to end.
    let mut late = claims("spiffe://acme.test/agent/skewed");
    late["exp"] = json!(now() - 2);
    begin(&ch, Some(&s.acme.sign(&s.acme.header(), &late)))
        .await
        .unwrap();
    s.broker.stop().await;
}
