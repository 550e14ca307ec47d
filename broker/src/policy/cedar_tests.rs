//! The Cedar layer without a server: the shipped schema, the example policies
//! allowing and denying, file:line:col for bad files, and reload keeping the last
//! good set.

#![expect(
    clippy::unwrap_used,
    reason = "a test should panic on an unexpected value"
)]

use std::{collections::BTreeMap, path::Path, time::Duration};

use super::*;
use crate::{
    identity::Identity,
    policy::{self, Decision},
    templates::{TemplateSet, check_dir},
};

/// Wednesday 2026-12-09 09:00 UTC (10:00 in Berlin).
const WED_0900Z: u64 = 1_796_806_800_000;
/// Saturday 2026-12-12 09:00 UTC.
const SAT_0900Z: u64 = 1_797_066_000_000;
/// Wednesday 2026-12-09 17:30 UTC (18:30 in Berlin).
const WED_1730Z: u64 = 1_796_837_400_000;

fn examples() -> (TemplateSet, Policies) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    (
        check_dir(&root.join("templates")).unwrap(),
        load_dir(&root.join("policies"), "Europe/Berlin").unwrap(),
    )
}

fn caller(mtls: bool) -> Identity {
    Identity {
        spiffe_id: SpiffeId::parse("spiffe://acme.test/agent/reporting").unwrap(),
        svid_not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
        thumbprint_s256: mtls.then_some([7; 32]),
        spki_s256: mtls.then_some([7; 32]),
    }
}

fn decision(templates: &TemplateSet, template: &str, ttl: Option<u64>, now_ms: u64) -> Decision {
    let params: BTreeMap<String, String> = match template {
        "github-pr-review" => [("repo", "acme/widgets"), ("pr", "42")].as_slice(),
        "repo-cleanup" => [("repo", "sandbox/demo"), ("branch", "stale")].as_slice(),
        _ => [("database", "sales")].as_slice(),
    }
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    policy::decide(
        templates,
        &caller(true).spiffe_id,
        template,
        &params,
        ttl.map(Duration::from_secs),
        now_ms,
    )
    .unwrap()
}

struct Case {
    template: &'static str,
    ttl: Option<u64>,
    class: &'static str,
    mtls: bool,
    at: u64,
}

const BASE: Case = Case {
    template: "db-readonly",
    ttl: None,
    class: "agent",
    mtls: true,
    at: WED_0900Z,
};

fn verdict(policies: &Policies, templates: &TemplateSet, case: &Case) -> Verdict {
    let d = decision(templates, case.template, case.ttl, case.at);
    let who = caller(case.mtls);
    let req = policy::policy_request(&who, case.class, "default", &d, case.at);
    policies.evaluate(&req).unwrap()
}

#[test]
fn the_shipped_schema_parses() {
    schema().unwrap();
    assert!(SCHEMA.contains("action BeginTask"));
}

#[test]
fn the_examples_load_with_their_ids() {
    let (_, p) = examples();
    assert_eq!(
        p.ids().collect::<Vec<_>>(),
        vec![
            "baseline-permit",
            "destructive-low-short",
            "jwt-svid-no-destructive",
            "partner-no-destructive",
            "write-office-hours",
        ]
    );
    let o = p.origin("write-office-hours").unwrap();
    assert_eq!((o.effect, o.line), ("forbid", 2));
    assert!(o.file.ends_with("write-office-hours.cedar"));
}

#[test]
fn write_scopes_only_on_weekdays_in_office_hours_of_the_zone() {
    let (t, p) = examples();
    let write = Case {
        template: "github-pr-review",
        ..BASE
    };
    let allowed = verdict(&p, &t, &write);
    assert!(allowed.allowed, "{allowed:?}");
    assert_eq!(allowed.determining, vec!["baseline-permit"]);
    for at in [SAT_0900Z, WED_1730Z] {
        let denied = verdict(&p, &t, &Case { at, ..write });
        assert!(!denied.allowed);
        assert_eq!(denied.determining, vec!["write-office-hours"], "at {at}");
        assert!(
            p.denial_message(&denied).contains(
                "\"write-office-hours\" (write scopes are issued only on weekdays 09-18)"
            )
        );
    }
    // Reads are not bound to the window.
    assert!(
        verdict(
            &p,
            &t,
            &Case {
                at: SAT_0900Z,
                ..BASE
            }
        )
        .allowed
    );
    // The window is in the configured zone: 17:30Z is 17:30 in UTC, inside it.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let utc = load_dir(&root, "UTC").unwrap();
    assert!(
        verdict(
            &utc,
            &t,
            &Case {
                at: WED_1730Z,
                ..write
            }
        )
        .allowed
    );
}

#[test]
fn destructive_scopes_need_low_sensitivity_and_a_short_lease() {
    let (t, p) = examples();
    let cleanup = Case {
        template: "repo-cleanup",
        ..BASE
    };
    assert!(verdict(&p, &t, &cleanup).allowed, "30 s default TTL, low");
    assert!(
        verdict(
            &p,
            &t,
            &Case {
                ttl: Some(60),
                ..cleanup
            }
        )
        .allowed
    );
    let long = verdict(
        &p,
        &t,
        &Case {
            ttl: Some(61),
            ..cleanup
        },
    );
    assert_eq!(long.determining, vec!["destructive-low-short"]);
    assert!(!long.allowed);
    // The same template at another sensitivity.
    let mut medium = (*t.get("repo-cleanup").unwrap()).clone();
    medium.sensitivity = crate::templates::Sensitivity::Medium;
    let mut d = decision(&t, "repo-cleanup", None, WED_0900Z);
    d.template = std::sync::Arc::new(medium);
    let who = caller(true);
    let v = p
        .evaluate(&policy::policy_request(
            &who, "agent", "default", &d, WED_0900Z,
        ))
        .unwrap();
    assert_eq!(v.determining, vec!["destructive-low-short"]);
}

#[test]
fn partner_classes_never_get_destructive_scopes() {
    let (t, p) = examples();
    let cleanup = Case {
        template: "repo-cleanup",
        class: "partner-acme",
        ..BASE
    };
    let v = verdict(&p, &t, &cleanup);
    assert!(!v.allowed);
    assert_eq!(v.determining, vec!["partner-no-destructive"]);
    // A partner may still read; a class merely containing "partner" is no partner.
    assert!(
        verdict(
            &p,
            &t,
            &Case {
                template: "db-readonly",
                ..cleanup
            }
        )
        .allowed
    );
    assert!(
        verdict(
            &p,
            &t,
            &Case {
                class: "agent-partnered",
                ..cleanup
            }
        )
        .allowed
    );
}

#[test]
fn jwt_svid_callers_never_get_destructive_scopes() {
    let (t, p) = examples();
    let cleanup = Case {
        template: "repo-cleanup",
        mtls: false,
        ..BASE
    };
    let v = verdict(&p, &t, &cleanup);
    assert_eq!(v.determining, vec!["jwt-svid-no-destructive"]);
    assert!(!v.allowed);
    assert!(
        verdict(
            &p,
            &t,
            &Case {
                template: "db-readonly",
                ..cleanup
            }
        )
        .allowed
    );
    assert!(
        verdict(
            &p,
            &t,
            &Case {
                mtls: true,
                ..cleanup
            }
        )
        .allowed
    );
}

#[test]
fn every_applying_policy_is_listed_and_forbid_wins() {
    let (t, p) = examples();
    let case = Case {
        template: "repo-cleanup",
        class: "partner-x",
        mtls: false,
        ttl: Some(120),
        ..BASE
    };
    let v = verdict(&p, &t, &case);
    assert!(
        !v.allowed,
        "the permit applies, but every forbid wins over it"
    );
    assert_eq!(
        v.determining,
        vec![
            "destructive-low-short",
            "jwt-svid-no-destructive",
            "partner-no-destructive"
        ]
    );
    let d = decision(&t, "repo-cleanup", Some(120), WED_0900Z);
    let who = caller(false);
    let applied = p
        .applied(&policy::policy_request(
            &who,
            "partner-x",
            "default",
            &d,
            WED_0900Z,
        ))
        .unwrap();
    assert_eq!(applied.first().map(String::as_str), Some("baseline-permit"));
    assert_eq!(applied.len(), 4);
}

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

#[test]
fn with_policies_present_the_default_is_deny() {
    let (t, _) = examples();
    let dir = dir_with(&[(
        "only-forbid.cedar",
        "forbid (principal, action, resource) when { context.ttl_seconds > 3600 };",
    )]);
    let p = load_dir(dir.path(), "UTC").unwrap();
    let v = verdict(&p, &t, &BASE);
    assert!(!v.allowed);
    assert!(v.determining.is_empty());
    assert_eq!(
        p.denial_message(&v),
        "denied by policy: no policy permits this request (default deny)"
    );
    // No id annotation: the id is file:line.
    assert_eq!(p.ids().collect::<Vec<_>>(), vec!["only-forbid.cedar:1"]);
}

#[test]
fn no_policy_files_means_template_rules_alone() {
    let (t, _) = examples();
    let dir = dir_with(&[("README.md", "not a policy"), (".hidden.cedar", "garbage")]);
    let p = load_dir(dir.path(), "UTC").unwrap();
    assert!(p.is_empty());
    assert!(
        verdict(
            &p,
            &t,
            &Case {
                template: "repo-cleanup",
                ttl: Some(300),
                ..BASE
            }
        )
        .allowed
    );
}

#[test]
fn a_syntax_error_is_reported_with_file_line_and_column() {
    let dir = dir_with(&[(
        "bad.cedar",
        "// one\npermit (principal, action, resource);\n\nforbid (principal, action, resource)\n  when { context.class == };\n",
    )]);
    let e = load_dir(dir.path(), "UTC").unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    let issue = &e.0[0];
    assert!(issue.file.ends_with("bad.cedar"));
    assert_eq!((issue.line, issue.column), (5, 27), "{e}");
    assert!(issue.message.starts_with("syntax: "), "{e}");
    assert!(
        e.to_string()
            .contains("bad.cedar:5:27: syntax: unexpected token"),
        "{e}"
    );
}

#[test]
fn a_schema_violation_is_reported_with_file_and_line() {
    let dir = dir_with(&[
        ("good.cedar", "permit (principal, action, resource);\n"),
        (
            "typo.cedar",
            "\n\n@id(\"typo\")\nforbid (principal, action, resource)\nwhen { context.scope_class.contains(\"write\") };\n",
        ),
        (
            "wrong-type.cedar",
            "@id(\"wrong-type\")\nforbid (principal, action, resource)\nwhen { context.ttl_seconds == \"60\" || principal.nope };\n",
        ),
    ]);
    let e = load_dir(dir.path(), "UTC").unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("typo.cedar:5:8: schema: policy \"typo\": for policy `typo`, attribute `scope_class` in context"),
        "{text}"
    );
    assert!(text.contains("wrong-type.cedar:3:"), "{text}");
    assert!(!text.contains("good.cedar"), "{text}");
}

#[test]
fn duplicate_ids_and_unknown_zones_are_refused() {
    let dir = dir_with(&[
        (
            "a.cedar",
            "@id(\"x\")\npermit (principal, action, resource);\n",
        ),
        (
            "b.cedar",
            "\n@id(\"x\")\npermit (principal, action, resource);\n",
        ),
    ]);
    let e = load_dir(dir.path(), "UTC").unwrap_err();
    assert!(
        e.to_string()
            .contains("b.cedar:2:1: duplicate policy id \"x\" (first in"),
        "{e}"
    );
    let dir = dir_with(&[("a.cedar", "permit (principal, action, resource);\n")]);
    let e = load_dir(dir.path(), "Mars/Olympus").unwrap_err();
    assert!(
        e.to_string().contains("unknown time zone \"Mars/Olympus\""),
        "{e}"
    );
}

#[test]
fn a_bad_edit_at_reload_keeps_the_last_good_set() {
    let (t, _) = examples();
    let dir = dir_with(&[(
        "p.cedar",
        "@id(\"all\")\npermit (principal, action, resource);\n",
    )]);
    let catalog = PolicyCatalog::new(dir.path().to_owned(), "UTC").unwrap();
    assert!(!catalog.reload().unwrap(), "nothing changed");
    assert!(verdict(&catalog.current(), &t, &BASE).allowed);

    // A broken edit: refused with its line; the permit stays in force.
    std::fs::write(
        dir.path().join("p.cedar"),
        "@id(\"all\")\npermit (principal, action,\n",
    )
    .unwrap();
    let e = catalog.reload().unwrap_err();
    assert!(
        e.to_string()
            .contains("p.cedar:2:27: syntax: unexpected end of input"),
        "{e}"
    );
    assert!(verdict(&catalog.current(), &t, &BASE).allowed);
    assert!(
        !catalog.reload().unwrap(),
        "the same bad state is reported once"
    );

    // A schema violation is refused the same way.
    std::fs::write(
        dir.path().join("p.cedar"),
        "@id(\"all\")\npermit (principal, action, resource) when { context.nope };\n",
    )
    .unwrap();
    assert!(catalog.reload().is_err());
    assert!(verdict(&catalog.current(), &t, &BASE).allowed);

    // A good edit installs: now a forbid denies.
    std::fs::write(
        dir.path().join("p.cedar"),
        "@id(\"all\")\npermit (principal, action, resource);\n@id(\"no-reads\")\nforbid (principal, action, resource) when { context.scope_classes.contains(\"read\") };\n",
    )
    .unwrap();
    assert!(catalog.reload().unwrap());
    assert_eq!(
        verdict(&catalog.current(), &t, &BASE).determining,
        vec!["no-reads"]
    );
}

#[test]
fn identities_are_in_their_class_and_tenant_and_grants_in_their_template() {
    let (t, _) = examples();
    let dir = dir_with(&[(
        "h.cedar",
        "@id(\"all\")\npermit (principal, action, resource);\n\
         @id(\"tenant\")\nforbid (principal in Leash::Tenant::\"acme\", action, resource);\n\
         @id(\"class\")\nforbid (principal in Leash::Class::\"ci\", action, resource == Leash::Template::\"db-readonly\");\n\
         @id(\"attrs\")\nforbid (principal, action, resource)\n  when { principal.trust_domain == \"acme.test\" && principal.path == \"/agent/reporting\" && resource.sensitivity == \"low\" };\n",
    )]);
    let p = load_dir(dir.path(), "UTC").unwrap();
    let d = decision(&t, "db-readonly", None, WED_0900Z);
    let who = caller(true);
    let judge = |class: &str, tenant: &str, d: &Decision| {
        p.evaluate(&policy::policy_request(&who, class, tenant, d, WED_0900Z))
            .unwrap()
            .determining
    };
    assert_eq!(judge("agent", "default", &d), vec!["all"]);
    assert_eq!(judge("agent", "acme", &d), vec!["tenant"]);
    assert_eq!(judge("ci", "default", &d), vec!["class"]);
    let low = decision(&t, "repo-cleanup", None, WED_0900Z);
    assert_eq!(judge("agent", "default", &low), vec!["attrs"]);
}

#[test]
fn delegation_depth_and_the_actor_chain_reach_policies() {
    let (t, _) = examples();
    let dir = dir_with(&[(
        "d.cedar",
        "@id(\"all\")\npermit (principal, action, resource);\n\
         @id(\"shallow\")\nforbid (principal, action, resource) when { context.delegation_depth > 1 };\n\
         @id(\"no-evil\")\nforbid (principal, action, resource)\n  when { context.actors.contains(\"spiffe://acme.test/sub/evil\") };\n",
    )]);
    let p = load_dir(dir.path(), "UTC").unwrap();
    let who = caller(true);
    let judge = |d: &Decision| {
        p.evaluate(&policy::policy_request(
            &who, "agent", "default", d, WED_0900Z,
        ))
        .unwrap()
        .determining
    };
    let mut d = decision(&t, "db-readonly", None, WED_0900Z);
    assert_eq!(judge(&d), vec!["all"], "a task begun directly");
    d.delegation_depth = 1;
    d.actors = vec![
        "spiffe://acme.test/sub/good".into(),
        "spiffe://acme.test/agent/root".into(),
    ];
    assert_eq!(judge(&d), vec!["all"]);
    d.actors.insert(0, "spiffe://acme.test/sub/evil".into());
    assert_eq!(judge(&d), vec!["no-evil"]);
    d.actors.remove(0);
    d.delegation_depth = 2;
    assert_eq!(judge(&d), vec!["shallow"]);
}
