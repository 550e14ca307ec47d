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
