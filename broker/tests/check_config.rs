//! `leash serve --check-config`, run as the real binary on the files `leash
//! dev` writes: exit 0 with what it found when the broker would start, 64
//! naming the problem when it would not; it never listens or connects.
#![allow(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed test"
)]

use std::{path::Path, process::Command};

use leash_broker::cli::dev::{DevArgs, prepare};

const LEASH: &str = env!("CARGO_BIN_EXE_leash");

/// Runs the check on `dir/leash.toml` with `env` overrides: (exit code, stdout, stderr).
fn check(dir: &Path, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(LEASH)
        .args(["serve", "--check-config", "--config"])
        .arg(dir.join("leash.toml"))
        .envs(env.iter().copied())
        .env("LEASH_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A broken config: what is broken, the environment that breaks it, and what
/// the refusal must name.
type Problem = (
    &'static str,
    Vec<(&'static str, &'static str)>,
    &'static str,
);

#[test]
fn check_config_accepts_a_good_config_and_names_each_kind_of_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    prepare(&DevArgs {
        dir: dir.clone(),
        // Ports nobody listens on: the check must not bind them.
        agent_addr: "127.0.0.1:1".parse().unwrap(),
        ops_addr: "127.0.0.1:2".parse().unwrap(),
        oauth_addr: "127.0.0.1:3".parse().unwrap(),
        redis: None,
        trust_domain: "leash.dev".into(),
        policies: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies")),
    })
    .unwrap();

    let (code, stdout, stderr) = check(&dir, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    for want in [
        "leash.toml: ok",
        "tls: files, certificate and key load, 1 trust bundle(s)",
        "templates: 6 template(s)",
        "policy: the Cedar policies in",
        "signing: 1 key(s) load",
        "store: memory",
        "oauth: listener 127.0.0.1:3 at https://localhost:3",
    ] {
        assert!(stdout.contains(want), "{want:?} missing from:\n{stdout}");
    }

    // A Redis store is described, not contacted (nothing listens on port 1).
    let (code, stdout, stderr) = check(
        &dir,
        &[
            ("LEASH_STORE__KIND", "redis"),
            ("LEASH_STORE__TOPOLOGY", "cluster"),
            ("LEASH_STORE__CLUSTER__NODES", r#"["127.0.0.1:1"]"#),
            ("LEASH_STORE__DURABILITY", "replicas = 1"),
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("store: redis cluster (1 seed node(s)), not contacted"),
        "{stdout}"
    );

    let problems: [Problem; 6] = [
        (
            "an OAuth public URL that is not https",
            vec![("LEASH_OAUTH__PUBLIC_URL", "http://leash.example")],
            "oauth.public_url: must be an https:// URL",
        ),
        (
            "an OAuth listener on the agent port",
            vec![("LEASH_OAUTH__LISTEN", "127.0.0.1:1")],
            "oauth.listen: must differ",
        ),
        (
            "an unknown config key",
            vec![("LEASH_STORE__DURABLITY", "none")],
            "durablity",
        ),
        (
            "a missing certificate",
            vec![("LEASH_TLS__CERT", "/nonexistent/broker.pem")],
            "tls.cert",
        ),
        (
            "a Workload API source without an endpoint",
            vec![
                ("LEASH_TLS__SOURCE", "workload_api"),
                ("SPIFFE_ENDPOINT_SOCKET", ""),
            ],
            "tls.workload_api_socket: required",
        ),
        (
            "a cluster without nodes",
            vec![
                ("LEASH_STORE__KIND", "redis"),
                ("LEASH_STORE__TOPOLOGY", "cluster"),
            ],
            "store.cluster.nodes",
        ),
    ];
    for (what, env, want) in problems {
        let (code, _, stderr) = check(&dir, &env);
        assert_eq!(code, Some(64), "{what}: {stderr}");
        assert!(
            stderr.contains(want),
            "{what}: {want:?} missing from:\n{stderr}"
        );
    }

    // A broken template is named with its file and line.
    std::fs::write(
        dir.join("templates/broken.yaml"),
        "name: broken\ngrants: [\n",
    )
    .unwrap();
    let (code, _, stderr) = check(&dir, &[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("broken.yaml:"), "{stderr}");
}
