//! `leash policy check` and `leash policy explain`, run as the real binary.
#![allow(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed test"
)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

const LEASH: &str = env!("CARGO_BIN_EXE_leash");

fn examples(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(sub)
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn policy_check_accepts_the_examples_and_reports_file_line_for_each_problem() {
    let ok = Command::new(LEASH)
        .args(["policy", "check"])
        .arg(examples("policies"))
        .output()
        .unwrap();
    let (stdout, stderr) = text(&ok);
    assert!(ok.status.success(), "{stderr}");
    assert!(stdout.contains("5 policy(ies) OK"), "{stdout}");

    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("syntax.cedar"),
        "@id(\"ok\")\npermit (principal, action, resource);\n\n@id(\"broken\")\nforbid (principal, action, resource)\n  when { context.class == };\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("schema.cedar"),
        "// a typo in a context attribute\n@id(\"typo\")\nforbid (principal, action, resource)\n  when { context.scope_class.contains(\"write\") };\n",
    )
    .unwrap();
    let out = Command::new(LEASH)
        .args(["policy", "check"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    let syntax = tmp.path().join("syntax.cedar");
    let schema = tmp.path().join("schema.cedar");
    assert!(
        stderr.contains(&format!(
            "{}:6:27: syntax: unexpected token",
            syntax.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{}:4:10: schema: policy \"typo\": for policy `typo`, attribute `scope_class` in context",
            schema.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("2 problem(s)"), "{stderr}");
}

fn explain(extra: &[&str]) -> Output {
    Command::new(LEASH)
        .args(["policy", "explain", "--templates"])
        .arg(examples("templates"))
        .arg("--policies")
        .arg(examples("policies"))
        .args(["--time-zone", "Europe/Berlin"])
        .args(["--identity", "spiffe://acme.test/agent/reviewer"])
        .args(if extra.contains(&"--class") {
            &[][..]
        } else {
            &["--class", "agent", "--tenant", "acme"][..]
        })
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn policy_explain_prints_the_decision_and_the_policies_that_applied() {
    let review = [
        "--template",
        "github-pr-review",
        "--param",
        "repo=acme/widgets",
        "--param",
        "pr=42",
    ];
    // Wednesday 10:00 in Berlin: allowed by the baseline permit.
    let out = explain(&[&review[..], &["--at", "2026-12-09T09:00:00Z"]].concat());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.starts_with("decision: ALLOW\n"), "{stdout}");
    assert!(
        stdout.contains("pulls:acme/widgets:write (write)"),
        "{stdout}"
    );
    assert!(stdout.contains("baseline-permit (permit at"), "{stdout}");

    // Saturday: the time window forbids it; exit status 2.
    let out = explain(&[&review[..], &["--at", "2026-12-12T09:00:00Z"]].concat());
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.starts_with("decision: DENY\n"), "{stdout}");
    assert!(
        stdout.contains("determining:\n    write-office-hours (forbid at"),
        "{stdout}"
    );
    assert!(stdout.contains("in Europe/Berlin"), "{stdout}");

    // A destructive task over a JWT-SVID with a long lease: two forbids apply.
    let out = explain(&[
        "--template",
        "repo-cleanup",
        "--param",
        "repo=sandbox/demo",
        "--param",
        "branch=stale",
        "--connection",
        "jwt_svid",
        "--ttl",
        "2m",
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("destructive-low-short (forbid"), "{stdout}");
    assert!(
        stdout.contains("jwt-svid-no-destructive (forbid"),
        "{stdout}"
    );

    // A partner class (the explicit --class wins over the default) never gets destructive scopes.
    let cleanup = [
        "--template",
        "repo-cleanup",
        "--param",
        "repo=sandbox/demo",
        "--param",
        "branch=stale",
    ];
    let out = explain(
        &[
            &cleanup[..],
            &["--class", "partner-globex", "--tenant", "acme"],
        ]
        .concat(),
    );
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("class partner-globex, tenant acme"),
        "{stdout}"
    );
    assert!(
        stdout.contains("partner-no-destructive (forbid"),
        "{stdout}"
    );
    // A class of another tenant does not reach the template at all.
    let out = explain(&[&cleanup[..], &["--class", "agent", "--tenant", "globex"]].concat());
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("may not use template \"repo-cleanup\""),
        "{stdout}"
    );
    assert!(stdout.contains("policies: not reached"), "{stdout}");

    // The template rules decide first.
    let out = explain(&["--template", "db-readonly", "--param", "database=sales"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("template rules: refused"), "{stdout}");
    assert!(stdout.contains("policies: not reached"), "{stdout}");
}
