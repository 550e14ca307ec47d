//! The OAuth 2.0 front door (issue 13), end to end on a real `redis-server`
//! with real mTLS, through an HTTP/1.1 client of the harness's own:
//!
//! - RFC 8414 metadata under the configured public URL, public (no client
//!   certificate), and the ops discovery document's `jwks_uri` built from it;
//! - RFC 8693 token exchange: the happy path (audience-bound to the one
//!   resource, certificate-bound, of the same task, narrowed scopes, dying
//!   with the task; `act` for a delegated task) and each refusal as an RFC
//!   6749 JSON error that changes nothing;
//! - RFC 7662 introspection and RFC 7009 revocation with the Verifier's
//!   caller rules.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::{collections::HashMap, path::Path, sync::Mutex};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use leash_e2e::{
    BrokerOptions, HttpAnswer, RedisServer, SvidFiles, TestBroker, form, free_port, http_get,
    https_request, is_active, pb,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

const MCP: &str = "https://mcp.acme.test/mcp";
const DB: &str = "postgres://db.acme.test/app";

const TEMPLATE: &str = r#"
name: tools
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
lease: {ttl: 30s, max_ttl: 1m, max_lifetime: 10m, min_renew_interval: 0s}
delegation:
  max_depth: 1
  may_act: ["spiffe://acme.test/sub/*"]
grants:
  - name: tools
    kind: jwt
    audience: https://mcp.acme.test/mcp
    scopes:
      - {scope: "tools:read", class: read}
      - {scope: "tools:write", class: write}
    ttl: 60s
  - name: db
    kind: opaque
    audience: postgres://db.acme.test/app
    scopes: [{scope: "db:select", class: read}]
    ttl: 60s
"#;

const VERIFIERS: &str = r#"callers = [
  { identity = "spiffe://acme.test/resource/github", audiences = ["https://api.github.test"] },
  { identity = "spiffe://acme.test/resource/*", audiences = ["https://mcp.acme.test/mcp", "postgres://db.acme.test/app"] },
]"#;

struct Front {
    broker: TestBroker,
    port: u16,
    /// One SVID per identity, for gRPC and HTTP alike: the tokens are bound
    /// to the certificate that began the task.
    svids: Mutex<HashMap<String, SvidFiles>>,
    _redis: RedisServer,
}

impl Front {
    async fn start() -> Self {
        let redis = RedisServer::start();
        let port = free_port();
        let mut options = BrokerOptions::redis(&redis);
        options.templates = vec![TEMPLATE.to_owned()];
        options.verifier_toml = Some(VERIFIERS.to_owned());
        options.extra_toml = format!(
            "[admin]\ncallers = [\"spiffe://acme.test/admin/ops\"]\n[oauth]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"https://localhost:{port}/\"\n"
        );
        let broker = TestBroker::start(options).await;
        let front = Self {
            broker,
            port,
            svids: Mutex::new(HashMap::new()),
            _redis: redis,
        };
        // Up once the metadata answers (bounded).
        let up = leash_e2e::eventually(std::time::Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(up.is_some(), "the OAuth listener never came up");
        front
    }

    fn svid(&self, path: &str) -> SvidFiles {
        self.svids
            .lock()
            .unwrap()
            .entry(path.to_owned())
            .or_insert_with(|| self.broker.pki.svid(path))
            .clone()
    }

    async fn client(&self, path: &str) -> pb::broker_client::BrokerClient<Channel> {
        let files = self.svid(path);
        pb::broker_client::BrokerClient::new(
            self.broker.channel_with(&files.cert, &files.key).await,
        )
    }

    fn base(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// A form POST as `spiffe://acme.test/<as_path>` (no certificate for `None`).
    async fn post(&self, path: &str, as_path: Option<&str>, body: &str) -> HttpAnswer {
        let files = as_path.map(|p| self.svid(p));
        https_request(
            self.port,
            &self.broker.pki.bundle(),
            files.as_ref().map(|f| (f.cert.as_path(), f.key.as_path())),
            "POST",
            path,
            Some("application/x-www-form-urlencoded"),
            body,
        )
        .await
    }

    async fn get(&self, path: &str) -> HttpAnswer {
        https_request(
            self.port,
            &self.broker.pki.bundle(),
            None,
            "GET",
            path,
            None,
            "",
        )
        .await
    }

    async fn begin(&self, agent: &str) -> pb::BeginTaskResponse {
        self.client(agent)
            .await
            .begin_task(pb::BeginTaskRequest {
                template: "tools".into(),
                intent: "use the tools".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn exchange(&self, agent: &str, pairs: &[(&str, &str)]) -> HttpAnswer {
        self.post("/token", Some(agent), &form(pairs)).await
    }

    async fn introspect(&self, as_path: &str, token: &str) -> Value {
        let answer = self
            .post("/introspect", Some(as_path), &form(&[("token", token)]))
            .await;
        assert_eq!(answer.status, 200, "{answer:?}");
        answer.json()
    }
}

fn credential<'a>(begun: &'a pb::BeginTaskResponse, grant: &str) -> &'a str {
    &begun
        .credentials
        .iter()
        .find(|c| c.grant == grant)
        .unwrap()
        .value
}

fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// base64url SHA-256 of the first certificate of a PEM file (RFC 8705 §3.1).
fn x5t(cert: &Path) -> String {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let der = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &der))
}

const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";

fn error_of(answer: &HttpAnswer) -> (u16, String) {
    assert_eq!(
        answer.header("cache-control"),
        Some("no-store"),
        "{answer:?}"
    );
    let body = answer.json();
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "an error says why: {body}"
    );
    (answer.status, body["error"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_names_every_endpoint_under_the_public_url_and_needs_no_certificate() {
    let f = Front::start().await;
    let answer = f.get("/.well-known/oauth-authorization-server").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        answer
            .header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let m = answer.json();
    let base = f.base();
    assert_eq!(m["issuer"], "https://leash.acme.test");
    assert_eq!(m["token_endpoint"], format!("{base}/token"));
    assert_eq!(m["introspection_endpoint"], format!("{base}/introspect"));
    assert_eq!(m["revocation_endpoint"], format!("{base}/revoke"));
    assert_eq!(m["jwks_uri"], format!("{base}/.well-known/jwks.json"));
    assert_eq!(m["grant_types_supported"], json!([EXCHANGE]));
    assert_eq!(m["response_types_supported"], json!([]));
    for k in [
        "token_endpoint_auth_methods_supported",
        "introspection_endpoint_auth_methods_supported",
        "revocation_endpoint_auth_methods_supported",
    ] {
        assert_eq!(m[k], json!(["tls_client_auth"]), "{k}");
    }
    assert_eq!(m["tls_client_certificate_bound_access_tokens"], true);

    // The JWK Set the metadata names is served here too, without a certificate.
    let jwks = f.get("/.well-known/jwks.json").await;
    assert_eq!(jwks.status, 200);
    assert_eq!(
        jwks.header("content-type"),
        Some("application/jwk-set+json")
    );
    assert!(!jwks.json()["keys"].as_array().unwrap().is_empty());

    // The ops port's discovery document uses the public URL, not its address.
    let (status, body) = http_get(f.broker.ops_addr, "/.well-known/openid-configuration").await;
    assert_eq!(status, 200);
    let d: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(d["jwks_uri"], format!("{base}/.well-known/jwks.json"));

    // An unknown path is a JSON error, not an HTML page.
    let missing = f.get("/authorize").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchanged_token_is_bound_to_one_resource_and_the_callers_certificate_and_dies_with_the_task()
 {
    let f = Front::start().await;
    let begun = f.begin("agent/a").await;
    // The subject is the task's opaque db credential; the target is the
    // task's other grant, narrowed to one scope.
    let answer = f
        .exchange(
            "agent/a",
            &[
                ("grant_type", EXCHANGE),
                ("subject_token", credential(&begun, "db")),
                ("subject_token_type", ACCESS),
                ("resource", MCP),
                ("scope", "tools:read"),
                ("client_id", "spiffe://acme.test/agent/a"),
            ],
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    assert_eq!(answer.header("pragma"), Some("no-cache"));
    let t = answer.json();
    assert_eq!(t["issued_token_type"], ACCESS);
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["scope"], "tools:read");
    let expires_in = t["expires_in"].as_u64().unwrap();
    assert!(
        (1..=30).contains(&expires_in),
        "capped by the 30 s lease: {expires_in}"
    );
    let token = t["access_token"].as_str().unwrap();
    let c = claims(token);
    assert_eq!(c["aud"], MCP, "audience-bound to the one resource");
    assert_eq!(c["scope"], "tools:read");
    assert_eq!(c["task_id"], begun.task_id.as_str(), "of the same task");
    assert_eq!(c["sub"], "spiffe://acme.test/agent/a");
    assert_eq!(c["iss"], "https://leash.acme.test");
    assert_eq!(
        c["cnf"]["x5t#S256"],
        x5t(&f.svid("agent/a").cert),
        "bound to the caller's certificate (RFC 8705)"
    );
    assert!(c.get("act").is_none(), "no delegation, no act");
    let lease_end = begun.lease_expires_at.as_ref().unwrap().seconds;
    assert!(
        c["exp"].as_i64().unwrap() <= lease_end,
        "never past the lease"
    );

    // RFC 7662: active, with the claims a resource server needs.
    let i = f.introspect("resource/mcp", token).await;
    assert_eq!(i["active"], true, "{i}");
    assert_eq!(i["aud"], MCP);
    assert_eq!(i["scope"], "tools:read");
    assert_eq!(i["task_id"], begun.task_id.as_str());
    assert_eq!(i["jti"], c["jti"]);
    assert_eq!(i["token_type"], "Bearer");
    assert_eq!(i["cnf"], c["cnf"]);
    assert_eq!(i["scope_classes"], json!({"tools:read": "read"}));
    assert_eq!(i["exp"], c["exp"]);
    // The gRPC Verifier agrees.
    assert!(is_active(&f.broker, token).await);
    // A verifier of other audiences learns nothing (RFC 7662 §2.2).
    let other = f.introspect("resource/github", token).await;
    assert_eq!(other, json!({"active": false}));

    // Exchanging a JWT for itself narrowed works too (JWT subject token type).
    let again = f
        .exchange(
            "agent/a",
            &[
                ("grant_type", EXCHANGE),
                ("subject_token", token),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("audience", MCP),
            ],
        )
        .await;
    assert_eq!(again.status, 200, "{again:?}");
    let second = again.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        claims(&second)["scope"],
        "tools:read tools:write",
        "all scopes by default"
    );

    // The task ends: every exchanged token is inactive at once.
    f.client("agent/a")
        .await
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    for t in [token, second.as_str()] {
        assert_eq!(
            f.introspect("resource/mcp", t).await,
            json!({"active": false})
        );
    }
    // And it can no longer be exchanged.
    let after = f
        .exchange(
            "agent/a",
            &[
                ("grant_type", EXCHANGE),
                ("subject_token", token),
                ("subject_token_type", ACCESS),
                ("resource", MCP),
            ],
        )
        .await;
    assert_eq!(error_of(&after), (400, "invalid_grant".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_exchange_is_an_rfc_6749_error_and_issues_nothing() {
    let f = Front::start().await;
    let begun = f.begin("agent/a").await;
    let subject = credential(&begun, "db").to_owned();
    let others = f.begin("agent/b").await;
    let good = |extra: &'static [(&'static str, &'static str)]| {
        let mut p = vec![("grant_type", EXCHANGE), ("subject_token_type", ACCESS)];
        p.extend_from_slice(extra);
        p
    };
    let with_subject = |mut p: Vec<(&'static str, &'static str)>, s: &'static str| {
        p.push(("subject_token", s));
        p
    };
    let subject: &'static str = Box::leak(subject.into_boxed_str());
    let others_token: &'static str =
        Box::leak(credential(&others, "db").to_owned().into_boxed_str());
    let cases: Vec<(&str, Option<&str>, String, u16, &str)> = vec![
        (
            "wrong resource",
            Some("agent/a"),
            form(&with_subject(
                good(&[("resource", "https://elsewhere.acme.test/")]),
                subject,
            )),
            400,
            "invalid_target",
        ),
        (
            "resource with a fragment",
            Some("agent/a"),
            form(&with_subject(
                good(&[("resource", "https://mcp.acme.test/mcp#x")]),
                subject,
            )),
            400,
            "invalid_target",
        ),
        (
            "two resources",
            Some("agent/a"),
            form(&with_subject(
                good(&[("resource", MCP), ("resource", DB)]),
                subject,
            )),
            400,
            "invalid_target",
        ),
        (
            "scope not in the grant",
            Some("agent/a"),
            form(&with_subject(
                good(&[("resource", MCP), ("scope", "tools:read tools:admin")]),
                subject,
            )),
            400,
            "invalid_scope",
        ),
        (
            "subject token of another identity",
            Some("agent/a"),
            form(&with_subject(good(&[("resource", MCP)]), others_token)),
            400,
            "invalid_grant",
        ),
        (
            "forged subject token",
            Some("agent/a"),
            form(&with_subject(
                good(&[("resource", MCP)]),
                "lsh_not-a-credential",
            )),
            400,
            "invalid_grant",
        ),
        (
            "no certificate (a bearer caller)",
            None,
            form(&with_subject(good(&[("resource", MCP)]), subject)),
            401,
            "invalid_client",
        ),
        (
            "client_id of another identity",
            Some("agent/a"),
            form(&with_subject(
                good(&[
                    ("resource", MCP),
                    ("client_id", "spiffe://acme.test/agent/b"),
                ]),
                subject,
            )),
            401,
            "invalid_client",
        ),
        (
            "a client secret",
            Some("agent/a"),
            form(&with_subject(
                good(&[("resource", MCP), ("client_secret", "hunter2")]),
                subject,
            )),
            401,
            "invalid_client",
        ),
        (
            "another grant type",
            Some("agent/a"),
            form(&[("grant_type", "client_credentials"), ("resource", MCP)]),
            400,
            "unsupported_grant_type",
        ),
        (
            "no subject_token_type",
            Some("agent/a"),
            form(&[
                ("grant_type", EXCHANGE),
                ("subject_token", subject),
                ("resource", MCP),
            ]),
            400,
            "invalid_request",
        ),
        (
            "no resource",
            Some("agent/a"),
            form(&with_subject(good(&[]), subject)),
            400,
            "invalid_request",
        ),
        (
            "a repeated parameter",
            Some("agent/a"),
            form(&with_subject(
                good(&[("resource", MCP), ("scope", "tools:read"), ("scope", "x")]),
                subject,
            )),
            400,
            "invalid_request",
        ),
        (
            "an actor token",
            Some("agent/a"),
            form(&with_subject(
                good(&[("resource", MCP), ("actor_token", "x")]),
                subject,
            )),
            400,
            "invalid_request",
        ),
    ];
    for (what, agent, body, status, error) in cases {
        let answer = f.post("/token", agent, &body).await;
        assert_eq!(
            error_of(&answer),
            (status, error.to_owned()),
            "{what}: {answer:?}"
        );
        if status == 401 {
            assert!(answer.header("www-authenticate").is_some(), "{what}");
        }
    }
    // Not a form.
    let json_body = https_request(
        f.port,
        &f.broker.pki.bundle(),
        Some((
            f.svid("agent/a").cert.as_path(),
            f.svid("agent/a").key.as_path(),
        )),
        "POST",
        "/token",
        Some("application/json"),
        "{}",
    )
    .await;
    assert_eq!(error_of(&json_body), (400, "invalid_request".into()));

    // Nothing was issued: the task holds exactly its two begin credentials,
    // both still active.
    let mut admin = f.broker.admin("admin/ops").await;
    let got = admin
        .get_task(pb::GetTaskRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.credentials.len(), 2, "{got:?}");
    assert!(is_active(&f.broker, subject).await);

    // The same SPIFFE ID with another certificate: the subject token is
    // bound to the one that began the task (RFC 8705 proof of possession).
    // (Last: it rewrites agent/a's files.)
    let rotated = f.broker.pki.svid("agent/a");
    let answer = https_request(
        f.port,
        &f.broker.pki.bundle(),
        Some((rotated.cert.as_path(), rotated.key.as_path())),
        "POST",
        "/token",
        Some("application/x-www-form-urlencoded"),
        &form(&with_subject(good(&[("resource", MCP)]), subject)),
    )
    .await;
    assert_eq!(
        error_of(&answer),
        (400, "invalid_grant".into()),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegated_tasks_exchanged_token_carries_the_act_chain() {
    let f = Front::start().await;
    let parent = f.begin("agent/root").await;
    let mut root = f.client("agent/root").await;
    let d = root
        .delegate_task(pb::DelegateTaskRequest {
            parent_task_id: parent.task_id.clone(),
            subagent: "spiffe://acme.test/sub/one".into(),
            grants: vec![pb::GrantScopes {
                grant: "tools".into(),
                scopes: vec!["tools:read".into()],
            }],
            intent: "read only".into(),
            requested_ttl: None,
        })
        .await
        .unwrap()
        .into_inner();
    let child = f
        .client("sub/one")
        .await
        .redeem_delegation(pb::RedeemDelegationRequest {
            task_id: d.task_id.clone(),
            delegation_handle: d.delegation_handle.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let subject = credential(&child, "tools");
    // The child holds only tools:read: asking for write is refused.
    let wider = f
        .exchange(
            "sub/one",
            &[
                ("grant_type", EXCHANGE),
                ("subject_token", subject),
                ("subject_token_type", ACCESS),
                ("resource", MCP),
                ("scope", "tools:write"),
            ],
        )
        .await;
    assert_eq!(
        error_of(&wider),
        (400, "invalid_scope".into()),
        "delegation only narrows"
    );
    // And the db grant was not delegated.
    let db = f
        .exchange(
            "sub/one",
            &[
                ("grant_type", EXCHANGE),
                ("subject_token", subject),
                ("subject_token_type", ACCESS),
                ("resource", DB),
            ],
        )
        .await;
    assert_eq!(error_of(&db), (400, "invalid_target".into()));
    let answer = f
        .exchange(
            "sub/one",
            &[
                ("grant_type", EXCHANGE),
                ("subject_token", subject),
                ("subject_token_type", ACCESS),
                ("resource", MCP),
            ],
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let token = answer.json()["access_token"].as_str().unwrap().to_owned();
    let c = claims(&token);
    assert_eq!(c["sub"], "spiffe://acme.test/agent/root");
    assert_eq!(c["act"], json!({"sub": "spiffe://acme.test/sub/one"}));
    assert_eq!(c["scope"], "tools:read");
    let i = f.introspect("resource/mcp", &token).await;
    assert_eq!(i["act"], json!({"sub": "spiffe://acme.test/sub/one"}));
    assert_eq!(i["sub"], "spiffe://acme.test/agent/root");
    // The parent's completion ends the child and its exchanged token.
    root.complete_task(pb::CompleteTaskRequest {
        task_id: parent.task_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        f.introspect("resource/mcp", &token).await,
        json!({"active": false})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_and_revocation_follow_their_rfcs_and_the_verifier_rules() {
    let f = Front::start().await;
    let begun = f.begin("agent/a").await;
    let jwt = credential(&begun, "tools").to_owned();
    let opaque = credential(&begun, "db").to_owned();

    // RFC 7662: the token parameter is required; unknown tokens are inactive
    // with nothing else said; a caller that is no verifier is refused.
    let missing = f
        .post(
            "/introspect",
            Some("resource/mcp"),
            "token_type_hint=access_token",
        )
        .await;
    assert_eq!(error_of(&missing), (400, "invalid_request".into()));
    assert_eq!(
        f.introspect("resource/mcp", "lsh_unknown").await,
        json!({"active": false})
    );
    let agent = f
        .post("/introspect", Some("agent/a"), &form(&[("token", &jwt)]))
        .await;
    assert_eq!(error_of(&agent), (403, "unauthorized_client".into()));
    let anonymous = f.post("/introspect", None, &form(&[("token", &jwt)])).await;
    assert_eq!(error_of(&anonymous), (401, "invalid_client".into()));
    let i = f.introspect("resource/mcp", &opaque).await;
    assert_eq!(i["active"], true);
    assert_eq!(i["leash_token_kind"], "opaque");
    assert_eq!(i["client_id"], "spiffe://acme.test/agent/a");

    // RFC 7009: no certificate is refused; an unknown token is 200.
    let anonymous = f.post("/revoke", None, &form(&[("token", &jwt)])).await;
    assert_eq!(error_of(&anonymous), (401, "invalid_client".into()));
    let unknown = f
        .post(
            "/revoke",
            Some("agent/a"),
            &form(&[("token", "lsh_unknown")]),
        )
        .await;
    assert_eq!(unknown.status, 200, "{unknown:?}");
    // Another agent's revocation changes nothing, and is answered alike.
    let stranger = f
        .post("/revoke", Some("agent/b"), &form(&[("token", &jwt)]))
        .await;
    assert_eq!(stranger.status, 200);
    assert!(
        is_active(&f.broker, &jwt).await,
        "not the stranger's to revoke"
    );
    // A verifier of other audiences neither.
    let github = f
        .post(
            "/revoke",
            Some("resource/github"),
            &form(&[("token", &jwt)]),
        )
        .await;
    assert_eq!(github.status, 200);
    assert!(is_active(&f.broker, &jwt).await);
    // The owner revokes one credential: its task ends, with every credential.
    let revoked = f
        .post(
            "/revoke",
            Some("agent/a"),
            &form(&[("token", &jwt), ("token_type_hint", "access_token")]),
        )
        .await;
    assert_eq!(revoked.status, 200, "{revoked:?}");
    assert!(!is_active(&f.broker, &jwt).await);
    assert!(!is_active(&f.broker, &opaque).await, "the whole task ended");
    let renew = f
        .client("agent/a")
        .await
        .renew_lease(pb::RenewLeaseRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(renew.code(), tonic::Code::FailedPrecondition, "{renew:?}");
    // Revoking again is 200 too (RFC 7009 §2.2).
    let again = f
        .post("/revoke", Some("agent/a"), &form(&[("token", &jwt)]))
        .await;
    assert_eq!(again.status, 200);

    // A verifier serving the audience may revoke a token it was shown.
    let next = f.begin("agent/a").await;
    let token = credential(&next, "tools").to_owned();
    let by_resource = f
        .post("/revoke", Some("resource/mcp"), &form(&[("token", &token)]))
        .await;
    assert_eq!(by_resource.status, 200);
    assert!(!is_active(&f.broker, &token).await);
}
