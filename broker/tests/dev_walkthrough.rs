//! The README walk-through, run with the real `leash` binary: `leash dev` serves,
//! and the printed CLI commands complete begin → introspect → complete.
#![allow(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed test"
)]

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const LEASH: &str = env!("CARGO_BIN_EXE_leash");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn leash(args: &[&str], dir: &Path, port: u16) -> Output {
    Command::new(LEASH)
        .args(args)
        .env("LEASH_DEV_DIR", dir)
        .env("LEASH_BROKER", format!("https://localhost:{port}"))
        .env_remove("LEASH_CA")
        .env_remove("LEASH_CERT")
        .env_remove("LEASH_KEY")
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "command failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn dev_serves_and_the_cli_completes_a_cycle() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let (agent, ops) = (free_port(), free_port());
    let child = Command::new(LEASH)
        .args(["dev", "--dir"])
        .arg(&dir)
        .args(["--agent-addr", &format!("127.0.0.1:{agent}")])
        .args(["--ops-addr", &format!("127.0.0.1:{ops}")])
        .args(["--oauth-addr", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut dev = Dev(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", agent)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "leash dev did not start"
        );
        assert!(
            dev.0.try_wait().unwrap().is_none(),
            "leash dev exited early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for f in [
        "bundle.pem",
        "agent.pem",
        "agent-key.pem",
        "resource.pem",
        "subagent.pem",
        "subagent-key.pem",
        "admin.pem",
        "admin-key.pem",
        "leash.toml",
        "templates/demo.yaml",
    ] {
        assert!(dir.join(f).is_file(), "{f} not written");
    }
    use std::os::unix::fs::PermissionsExt as _;
    for key in [
        "agent-key.pem",
        "subagent-key.pem",
        "resource-key.pem",
        "admin-key.pem",
    ] {
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "private keys must not be readable by others: {key}"
        );
    }
    the_written_config_classifies_the_dev_svids(&dir);

    let begun = json(&leash(
        &[
            "task",
            "begin",
            "--template",
            "demo",
            "--param",
            "repo=acme/widgets",
            "--intent",
            "review PR 42",
        ],
        &dir,
        agent,
    ));
    let task_id = begun["task_id"].as_str().unwrap().to_owned();
    let creds = begun["credentials"].as_array().unwrap();
    assert_eq!(creds.len(), 2);
    let value = creds[0]["value"].as_str().unwrap().to_owned();

    // The dev resource server serves the audience of every demo grant.
    for c in creds {
        let active = json(&leash(
            &["token", "introspect", c["value"].as_str().unwrap()],
            &dir,
            agent,
        ));
        assert_eq!(active["active"], true, "{c}");
        assert_eq!(active["sub"], "spiffe://leash.dev/agent/demo");
        assert_eq!(active["aud"], c["audience"], "{c}");
    }

    // The subagent SVID is picked with --cert/--key and may use the demo template.
    let sub_cert = dir.join("subagent.pem");
    let sub_key = dir.join("subagent-key.pem");
    let as_subagent = [
        "--cert",
        sub_cert.to_str().unwrap(),
        "--key",
        sub_key.to_str().unwrap(),
    ];
    let mut args = vec![
        "task",
        "begin",
        "--template",
        "demo",
        "--param",
        "repo=acme/widgets",
        "--intent",
        "delegated review",
    ];
    args.extend(as_subagent);
    let sub = json(&leash(&args, &dir, agent));
    let sub_value = sub["credentials"][0]["value"].as_str().unwrap();
    let seen = json(&leash(&["token", "introspect", sub_value], &dir, agent));
    assert_eq!(seen["sub"], "spiffe://leash.dev/subagent/demo");
    let mut args = vec!["task", "complete", sub["task_id"].as_str().unwrap()];
    args.extend(as_subagent);
    json(&leash(&args, &dir, agent));

    let renewed = json(&leash(&["task", "renew", &task_id], &dir, agent));
    assert_eq!(renewed["task_id"], task_id.as_str());

    let done = json(&leash(&["task", "complete", &task_id], &dir, agent));
    assert_eq!(done["state"], "LEASE_STATE_COMPLETED");

    let inactive = json(&leash(&["token", "introspect", &value], &dir, agent));
    assert_eq!(inactive, serde_json::json!({ "active": false }));

    let jwks = json(&leash(&["jwks"], &dir, agent));
    assert_eq!(jwks["keys"][0]["kty"], "OKP");

    // A refused call exits non-zero with the status on stderr.
    let out = leash(&["task", "renew", &task_id], &dir, agent);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition")
            || String::from_utf8_lossy(&out.stderr).contains("ended")
    );

    // Graceful stop on SIGTERM.
    let pid = dev.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = dev.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "leash dev did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "leash dev exited with {status}");
    let mut stderr = String::new();
    use std::io::Read as _;
    dev.0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        stderr.contains("task begin --template demo"),
        "next steps not printed:\n{stderr}"
    );
    for want in [
        "admin tasks",
        "subagent.pem   spiffe://leash.dev/subagent/demo",
        "admin.pem      spiffe://leash.dev/admin/demo",
    ] {
        assert!(
            stderr.contains(want),
            "{want:?} not in next steps:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains(&value),
        "a credential value reached the logs"
    );
}

/// The SPIFFE ID in the URI SAN of the SVID in `pem`.
fn spiffe_id_of(pem: &Path) -> String {
    let pem = std::fs::read(pem).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .unwrap()
}

/// The config `leash dev` wrote loads, its admin caller is the identity in
/// admin.pem, and each SVID lands in its actor class of tenant `default`.
fn the_written_config_classifies_the_dev_svids(dir: &Path) {
    use leash_broker::{config::Config, identity::SpiffeId};
    let config = Config::load(&dir.join("leash.toml")).unwrap();
    let classes = config.actor_classes();
    let admins = config.admin_callers();
    for (file, id, class, admin) in [
        ("agent.pem", "spiffe://leash.dev/agent/demo", "agent", false),
        (
            "subagent.pem",
            "spiffe://leash.dev/subagent/demo",
            "subagent",
            false,
        ),
        (
            "resource.pem",
            "spiffe://leash.dev/resource/demo",
            "service",
            false,
        ),
        ("admin.pem", "spiffe://leash.dev/admin/demo", "admins", true),
    ] {
        assert_eq!(spiffe_id_of(&dir.join(file)), id, "{file}");
        let id = SpiffeId::parse(id).unwrap();
        let actor = classes.classify(&id).unwrap();
        assert_eq!(
            (actor.class.as_str(), actor.tenant.as_str()),
            (class, "default")
        );
        assert_eq!(admins.iter().any(|p| p.matches(&id)), admin, "{id} admin?");
    }
    // The demo template lets the subagent's class use it.
    let demo = std::fs::read_to_string(dir.join("templates/demo.yaml")).unwrap();
    assert!(demo.contains("spiffe://leash.dev/subagent/*"), "{demo}");
}

#[test]
fn templates_check_reports_every_problem_with_file_and_line() {
    let ok = Command::new(LEASH)
        .args(["templates", "check"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/templates"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("bad.yaml"),
        "name: bad\nversion: 1\nowner: o@x\ndescription: d\nidentities: [\"http://nope\"]\nlease: { ttl: 0s, max_ttl: 1m, max_lifetime: 1h }\ngrants: []\nbogus: 1\n",
    )
    .unwrap();
    let out = Command::new(LEASH)
        .args(["templates", "check"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:5"),
        "identity problem on line 5:\n{err}"
    );
    assert!(err.contains("bad.yaml:8"), "unknown key on line 8:\n{err}");
    assert!(
        err.lines().filter(|l| l.contains("bad.yaml:")).count() >= 4,
        "every problem:\n{err}"
    );
}

#[test]
fn serve_rejects_a_bad_config_listing_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("leash.toml");
    std::fs::write(
        &cfg,
        "[listen]\nagent = \"127.0.0.1:1\"\nops = \"127.0.0.1:2\"\nbogus = 3\n[tls]\ncert = \"missing.pem\"\nkey = \"k.pem\"\nbundles = {}\n[templates]\ndir = \"nope\"\n[signing]\nissuer = \"x\"\nkeys = []\n",
    )
    .unwrap();
    let out = Command::new(LEASH)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "listen.bogus",
        "missing.pem",
        "tls.bundles",
        "templates.dir",
        "signing.keys",
    ] {
        assert!(err.contains(want), "{want} not reported:\n{err}");
    }
}

#[test]
fn templates_check_with_a_config_checks_tenants_and_classes() {
    let tmp = tempfile::tempdir().unwrap();
    // Config loading checks that these files exist, not what they hold.
    for f in ["cert.pem", "key.pem", "bundle.pem", "signing.pem"] {
        std::fs::write(tmp.path().join(f), "x").unwrap();
    }
    let tpl = tmp.path().join("templates");
    std::fs::create_dir(&tpl).unwrap();
    let cfg = tmp.path().join("leash.toml");
    std::fs::write(
        &cfg,
        r#"[listen]
agent = "127.0.0.1:1"
ops = "127.0.0.1:2"
[tls]
cert = "cert.pem"
key = "key.pem"
bundles = { "acme.test" = "bundle.pem" }
[templates]
dir = "templates"
[signing]
issuer = "https://leash.acme.test"
keys = [{ kid = "k1", path = "signing.pem" }]
[[actors.classes]]
name = "agent"
tenant = "acme"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/agent/*"]
"#,
    )
    .unwrap();
    let template = |classes: &str| {
        format!(
            "name: t\nversion: 1\nowner: o@x\ntenant: acme\nclasses: [{classes}]\nidentities: [\"spiffe://acme.test/agent/*\"]\nlease: {{ ttl: 1m, max_ttl: 1m, max_lifetime: 1h }}\ngrants: [{{ name: g, kind: opaque, audience: a, scopes: [{{scope: s, class: read}}], ttl: 1m }}]\n"
        )
    };
    let check = || {
        Command::new(LEASH)
            .args(["templates", "check"])
            .arg(&tpl)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap()
    };
    std::fs::write(tpl.join("t.yaml"), template("agent")).unwrap();
    let ok = check();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::write(tpl.join("t.yaml"), template("agent, ci")).unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("t.yaml: template \"t\": `classes`: \"ci\" is not an actor class"),
        "{err}"
    );
    // Without --config the classes cannot be checked, and the file is fine.
    let alone = Command::new(LEASH)
        .args(["templates", "check"])
        .arg(&tpl)
        .output()
        .unwrap();
    assert!(alone.status.success());
}

/// Starts `leash dev` in `dir` on free loopback ports; returns it and its agent port.
fn start_dev(dir: &Path) -> (Dev, u16) {
    let (agent, ops) = (free_port(), free_port());
    let child = Command::new(LEASH)
        .args(["dev", "--dir"])
        .arg(dir)
        .args(["--agent-addr", &format!("127.0.0.1:{agent}")])
        .args(["--ops-addr", &format!("127.0.0.1:{ops}")])
        .args(["--oauth-addr", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut dev = Dev(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", agent)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "leash dev did not start"
        );
        assert!(
            dev.0.try_wait().unwrap().is_none(),
            "leash dev exited early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (dev, agent)
}

/// The payload of a JWS compact JWT, decoded (no signature check: the
/// broker's introspection is what vouches for it).
fn jwt_payload(jwt: &str) -> serde_json::Value {
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn dev_walkthrough_delegates_approves_and_kills() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let (_dev, port) = start_dev(&dir);
    let run = |args: &[&str]| leash(args, &dir, port);
    let subagent_cert = dir.join("subagent.pem").display().to_string();
    let subagent_key = dir.join("subagent-key.pem").display().to_string();

    // Delegation: begin as the agent, hand the read scope to the subagent.
    let parent = json(&run(&[
        "task",
        "begin",
        "--template",
        "demo",
        "--param",
        "repo=acme/widgets",
        "--intent",
        "review PR 42",
    ]));
    let parent_id = parent["task_id"].as_str().unwrap().to_owned();
    let delegated = json(&run(&[
        "task",
        "delegate",
        &parent_id,
        "--to",
        "spiffe://leash.dev/subagent/demo",
        "--grant",
        "github=repo:acme/widgets:read",
        "--ttl",
        "30s",
        "--intent",
        "read the diff",
        "--json",
    ]));
    assert_eq!(delegated["depth"], 1);
    let child_id = delegated["task_id"].as_str().unwrap().to_owned();
    let handle = delegated["delegation_handle"].as_str().unwrap().to_owned();

    // Redeem as the subagent, with the handle from the environment.
    let out = Command::new(LEASH)
        .args(["task", "redeem", &child_id])
        .args(["--cert", &subagent_cert, "--key", &subagent_key])
        .env("LEASH_DEV_DIR", &dir)
        .env("LEASH_BROKER", format!("https://localhost:{port}"))
        .env("LEASH_DELEGATION_HANDLE", &handle)
        .env_remove("LEASH_CA")
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&handle)
            && !String::from_utf8_lossy(&out.stderr).contains(&handle),
        "redeem must not echo the handle"
    );
    let redeemed = json(&out);
    assert_eq!(redeemed["state"], "LEASE_STATE_ACTIVE");
    let creds = redeemed["credentials"].as_array().unwrap();
    assert_eq!(creds.len(), 1, "only the delegated grant: {redeemed}");
    assert_eq!(
        creds[0]["scopes"],
        serde_json::json!(["repo:acme/widgets:read"])
    );
    let child_jwt = creds[0]["value"].as_str().unwrap().to_owned();

    // The child's JWT: sub is the root owner, act names the subagent.
    let claims = jwt_payload(&child_jwt);
    assert_eq!(claims["sub"], "spiffe://leash.dev/agent/demo");
    assert_eq!(
        claims["act"],
        serde_json::json!({ "sub": "spiffe://leash.dev/subagent/demo" })
    );
    let active = json(&run(&["token", "introspect", &child_jwt]));
    assert_eq!(active["active"], true);
    assert_eq!(active["act"], claims["act"], "the CLI shows the same chain");

    // A second redeem of the same handle is refused.
    let again = Command::new(LEASH)
        .args(["task", "redeem", &child_id, "--handle", &handle])
        .args(["--cert", &subagent_cert, "--key", &subagent_key])
        .env("LEASH_DEV_DIR", &dir)
        .env("LEASH_BROKER", format!("https://localhost:{port}"))
        .env_remove("LEASH_CA")
        .output()
        .unwrap();
    assert!(!again.status.success(), "a handle works once");

    // The parent ends: the child ends with it.
    let done = json(&run(&["task", "complete", &parent_id]));
    assert_eq!(done["revoked_descendants"], 1);
    let inactive = json(&run(&["token", "introspect", &child_jwt]));
    assert_eq!(inactive["active"], false);

    // Approval: the gated grant is withheld until an admin approves.
    let gated = json(&run(&[
        "task",
        "begin",
        "--template",
        "demo-deploy",
        "--param",
        "repo=acme/widgets",
        "--intent",
        "deploy to staging",
    ]));
    assert_eq!(gated["state"], "LEASE_STATE_PENDING_APPROVAL");
    assert_eq!(gated["approval"]["state"], "APPROVAL_STATE_PENDING");
    assert_eq!(gated["approval"]["grants"], serde_json::json!(["deploy"]));
    let grants = |v: &serde_json::Value| -> Vec<String> {
        v["credentials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["grant"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(grants(&gated), ["github"], "issue_others: the rest at once");
    let gated_id = gated["task_id"].as_str().unwrap().to_owned();
    let pending = run(&["admin", "tasks", "--state", "pending-approval"]);
    assert!(pending.status.success());
    assert!(String::from_utf8_lossy(&pending.stdout).contains(&gated_id));
    // The agent cannot approve its own task (it is no approver).
    let agent_cert = dir.join("agent.pem").display().to_string();
    let agent_key = dir.join("agent-key.pem").display().to_string();
    let own = run(&[
        "admin",
        "approve",
        &gated_id,
        "--reason",
        "me",
        "--cert",
        &agent_cert,
        "--key",
        &agent_key,
    ]);
    assert!(!own.status.success());
    let approved = run(&["admin", "approve", &gated_id, "--reason", "CHG-7 reviewed"]);
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    let renewed = json(&run(&["task", "renew", &gated_id]));
    assert_eq!(renewed["state"], "LEASE_STATE_ACTIVE");
    assert_eq!(grants(&renewed), ["github", "deploy"]);
    assert_eq!(
        renewed["approval"]["decided_by"],
        "spiffe://leash.dev/admin/demo"
    );
    // `task watch` prints the current state, then every change, and ends
    // with the task.
    let watch = Command::new(LEASH)
        .args(["task", "watch", &gated_id])
        .env("LEASH_DEV_DIR", &dir)
        .env("LEASH_BROKER", format!("https://localhost:{port}"))
        .env_remove("LEASH_CA")
        .env_remove("LEASH_CERT")
        .env_remove("LEASH_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = json(&run(&["task", "complete", &gated_id]));
    let watched = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&watched.stdout);
    assert!(watched.status.success(), "{text}");
    assert!(text.contains("LEASE_STATE_ACTIVE"), "{text}");
    assert!(text.contains("LEASE_STATE_COMPLETED"), "{text}");

    // Kill switch: revoke the agent, a new begin is refused until lifted.
    let killed = run(&[
        "admin",
        "revoke",
        "identity",
        "spiffe://leash.dev/agent/demo",
        "--reason",
        "INC-12",
    ]);
    assert!(killed.status.success());
    let refused = run(&[
        "task",
        "begin",
        "--template",
        "demo",
        "--param",
        "repo=acme/widgets",
        "--intent",
        "again",
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("kill switch"));
    let switches = run(&["admin", "kill-switches"]);
    assert!(String::from_utf8_lossy(&switches.stdout).contains("spiffe://leash.dev/agent/demo"));
    let lifted = run(&[
        "admin",
        "lift",
        "identity",
        "spiffe://leash.dev/agent/demo",
        "--reason",
        "resolved",
    ]);
    assert!(lifted.status.success());
    let after = json(&run(&[
        "task",
        "begin",
        "--template",
        "demo",
        "--param",
        "repo=acme/widgets",
        "--intent",
        "after the lift",
    ]));
    assert_eq!(after["state"], "LEASE_STATE_ACTIVE");
}

#[test]
fn bench_runs_every_mode_with_its_ceilings_and_writes_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let (dev, port) = start_dev(&dir);
    let report = tmp.path().join("bench.json");
    let pid = dev.0.id().to_string();
    let out = leash(
        &[
            "bench",
            "--mode",
            "begin,cycle,introspect,verify,connect",
            "--concurrency",
            "1,2",
            "--duration",
            "300ms",
            "--ceilings",
            "--template",
            "bench-jwt",
            "--broker-pid",
            &pid,
            "--json",
            report.to_str().unwrap(),
        ],
        &dir,
        port,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    let named = |prefix: &str| {
        rows.iter()
            .filter(|r| r["name"].as_str().unwrap().starts_with(prefix))
            .collect::<Vec<_>>()
    };
    for figure in [
        "echo: grpc.health.v1.Health/Check",
        "BeginTask (begin)",
        "BeginTask (cycle)",
        "RenewLease (cycle)",
        "CompleteTask (cycle)",
        "Introspect",
        "SDK offline verify",
        "ring Ed25519 verify",
        "ring Ed25519 sign",
        "raw rustls mTLS handshake",
        "derived BeginTask ceiling",
    ] {
        let found = named(figure);
        assert!(!found.is_empty(), "no {figure:?} row in\n{text}");
        for row in found {
            assert!(row["rate"].as_f64().unwrap() > 0.0, "{row}");
            assert!(
                row["errors"].as_object().unwrap().is_empty(),
                "calls failed: {row}"
            );
            // Every figure printed is in the table too.
            assert!(text.contains(row["name"].as_str().unwrap()), "{text}");
        }
    }
    // BeginTask is compared with the derived ceiling and with the same run's
    // echo; the figures carry the broker's CPU time per call.
    for (figure, ceiling) in [
        ("BeginTask (begin)", "derived BeginTask ceiling"),
        ("BeginTask (begin, vs echo)", "echo"),
        ("CompleteTask (cycle)", "echo"),
        ("Introspect (JWT)", "echo"),
    ] {
        for row in named(figure) {
            assert_eq!(row["ceiling"][0], ceiling, "{row}");
            assert!(row["ratio"].as_f64().unwrap() > 0.0, "{row}");
            assert!(row["broker_cpu_us"].as_f64().unwrap() > 0.0, "{row}");
            // The broker's resident set after warm-up and at the end (MiB).
            let rss = row["broker_rss_mib"].as_array().unwrap();
            assert!(rss.iter().all(|m| m.as_f64().unwrap() > 1.0), "{row}");
        }
    }
    drop(dev);
}
