//! Table-driven tests for loading, validation, binding and reloading.
#![expect(
    clippy::unwrap_used,
    reason = "a test should panic on an unexpected value"
)]

use std::{collections::BTreeMap, fs, path::Path, time::Duration};

use tempfile::TempDir;

use super::*;
use crate::identity::{IdentityPattern, SpiffeId};

/// A valid template whose line numbers the cases below rely on.
const BASE: &str = r#"name: demo
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

fn dir_with(files: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// Loads one file's text and returns its issues (empty when it loads).
fn issues_of(text: &str) -> Vec<TemplateIssue> {
    let dir = dir_with(&[("t.yaml", text)]);
    match load_dir(dir.path()) {
        Ok(_) => Vec::new(),
        Err(e) => e.0,
    }
}

fn base_template() -> Arc<Template> {
    let dir = dir_with(&[("t.yaml", BASE)]);
    load_dir(dir.path()).unwrap().get("demo").unwrap()
}

use std::sync::Arc;

fn edit(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "test edit target {from:?} not in BASE");
    BASE.replacen(from, to, 1)
}

#[test]
fn base_is_valid() {
    let t = base_template();
    assert_eq!(t.name, "demo");
    assert_eq!(t.version, "1");
    assert_eq!(t.owner, "team@acme.test");
    assert_eq!(t.description, "A demo.");
    assert_eq!(t.tenant, DEFAULT_TENANT, "no `tenant:`: the default tenant");
    assert!(
        t.classes.is_empty(),
        "no `classes:`: every class of the tenant"
    );
    assert_eq!(t.identities.len(), 1);
    assert_eq!(
        t.lease,
        LeasePolicy {
            ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(3600),
            min_renew_interval: Duration::from_secs(1),
        },
        "the default min_renew_interval is a quarter TTL, at most 1s"
    );
    assert_eq!(t.parameters.len(), 3);
    let repo = t.parameter("repo").unwrap();
    assert_eq!(repo.kind, ParameterKind::String);
    assert!(repo.required);
    assert!(
        matches!(&repo.constraint, ParameterConstraint::Pattern { source, .. } if source == "[a-z]+")
    );
    let count = t.parameter("count").unwrap();
    assert_eq!(count.kind, ParameterKind::Integer);
    assert!(matches!(
        count.constraint,
        ParameterConstraint::Range {
            min: Some(1),
            max: Some(10)
        }
    ));
    let flag = t.parameter("flag").unwrap();
    assert_eq!(flag.kind, ParameterKind::Boolean);
    assert!(!flag.required);
    let grant = t.grant("api").unwrap();
    assert_eq!(grant.kind, CredentialKind::Jwt);
    assert_eq!(grant.audience, "https://api.acme.test");
    assert_eq!(grant.scopes, vec!["read:{repo}", "n:{count}"]);
    assert_eq!(grant.ttl, Duration::from_secs(60));
    assert!(t.source.ends_with("t.yaml"));
}

#[test]
fn examples_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/templates");
    let set = match check_dir(&dir) {
        Ok(set) => set,
        Err(e) => panic!("examples must be valid:\n{e}"),
    };
    assert_eq!(
        set.names().collect::<Vec<_>>(),
        vec!["db-readonly", "github-pr-review", "repo-cleanup"]
    );
    let cleanup = set.get("repo-cleanup").unwrap();
    assert_eq!(cleanup.sensitivity, super::Sensitivity::Low);
    assert_eq!(
        cleanup.grants[0].scope_classes,
        vec![super::ScopeClass::Read, super::ScopeClass::Destructive]
    );
    let db = set.get("db-readonly").unwrap();
    assert_eq!(db.tenant, "acme");
    assert_eq!(db.classes, ["agent"]);
    let gh = set.get("github-pr-review").unwrap();
    assert_eq!(gh.tenant, "acme");
    assert!(
        gh.classes.is_empty(),
        "no `classes:`: every class of the tenant"
    );
    assert_eq!(gh.delegation.max_depth, 2);
    assert_eq!(
        gh.delegation.may_act,
        vec![IdentityPattern::parse("spiffe://acme.test/agent/*").unwrap()]
    );
    assert_eq!(gh.approval, None);
    let gate = cleanup.approval.as_ref().unwrap();
    assert_eq!(gate.grants, ["github"]);
    assert_eq!(
        gate.approvers,
        vec![IdentityPattern::parse("spiffe://acme.test/human/*").unwrap()]
    );
    assert!(!gate.issue_others);
    assert_eq!(gate.validity, Duration::from_secs(15 * 60));
    assert_eq!(db.delegation, DelegationPolicy::default());
    assert_eq!(db.version, "1", "an integer version is kept as text");
    assert_eq!(db.grants[0].kind, CredentialKind::Opaque);
    let gh = set.get("github-pr-review").unwrap();
    assert_eq!(gh.version, "3");
    let bound = gh
        .bind_parameters(&params(&[("repo", "acme/widgets"), ("pr", "42")]))
        .unwrap();
    assert_eq!(
        gh.scopes_for(&gh.grants[0], &bound),
        vec![
            "repo:acme/widgets:read",
            "pulls:acme/widgets:write",
            "pull:acme/widgets#42:comment"
        ]
    );
}

#[test]
fn format_variants_are_accepted() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "yml extension and integer version",
            "version: \"1\"",
            "version: 7",
        ),
        (
            "version string without quotes",
            "version: \"1\"",
            "version: v1.2.3",
        ),
        ("no description", "description: A demo.\n", ""),
        (
            "humantime compound duration",
            "  max_lifetime: 1h",
            "  max_lifetime: 1h 30m",
        ),
        ("required defaults to true", "    required: true\n", ""),
        (
            "enum instead of pattern",
            "    pattern: \"[a-z]+\"",
            "    enum: [a, b]",
        ),
        ("integer without bounds", "    min: 1\n    max: 10\n", ""),
        (
            "flow mapping grant",
            "  - name: api\n    kind: jwt\n    audience: https://api.acme.test\n    scopes: [{scope: \"read:{repo}\", class: read}, {scope: \"n:{count}\", class: read}]\n    ttl: 60s\n",
            "  - {name: api, kind: opaque, audience: x, scopes: [{scope: s, class: read}], ttl: 1s}\n",
        ),
        (
            "equal ttl bounds",
            "  ttl: 60s\n  max_ttl: 5m\n  max_lifetime: 1h",
            "  ttl: 1h\n  max_ttl: 1h\n  max_lifetime: 1h",
        ),
        ("explicit document start", "name: demo", "---\nname: demo"),
    ];
    for (what, from, to) in cases {
        let issues = issues_of(&edit(from, to));
        assert!(issues.is_empty(), "{what}: {issues:#?}");
    }
}

/// (what, edited YAML, expected line, message fragment)
fn rule_cases() -> Vec<(&'static str, String, usize, &'static str)> {
    let many = |n: usize, f: &dyn Fn(usize) -> String| (0..n).map(f).collect::<String>();
    vec![
        (
            "YAML syntax",
            edit("  max_ttl: 5m", "  max_ttl: [5m"),
            22,
            "YAML syntax error",
        ),
        (
            "YAML bad indentation",
            edit("owner: team@acme.test", "owner: team@acme.test\n  oops: 1"),
            4,
            "YAML syntax error",
        ),
        (
            "alias",
            edit(
                "  max_ttl: 5m\n  max_lifetime: 1h",
                "  max_ttl: &x 5m\n  max_lifetime: *x",
            ),
            22,
            "aliases are not supported",
        ),
        (
            "second document",
            format!("{BASE}---\nname: other\n"),
            29,
            "exactly one YAML document",
        ),
        (
            "top level not a mapping",
            "- a\n- b\n".to_owned(),
            1,
            "expected a mapping, found a list",
        ),
        ("empty file", String::new(), 1, "file is empty"),
        (
            "unknown top-level key",
            edit("description: A demo.", "descripton: A demo."),
            4,
            "unknown key `descripton`",
        ),
        (
            "unknown parameter key",
            edit("    required: true", "    requird: true"),
            11,
            "`parameters.repo`: unknown key `requird`",
        ),
        (
            "unknown lease key",
            edit("  max_lifetime: 1h", "  max_lifetime: 1h\n  grace: 5s"),
            23,
            "`lease`: unknown key `grace`",
        ),
        (
            "unknown grant key",
            edit("    ttl: 60s\n", "    ttl: 60s\n    scope: x\n"),
            29,
            "`grants[0]`: unknown key `scope`",
        ),
        (
            "duplicate key",
            format!("{BASE}name: again\n"),
            29,
            "duplicate key `name` (first at line 1)",
        ),
        (
            "missing owner",
            edit("owner: team@acme.test\n", ""),
            1,
            "missing required key `owner`",
        ),
        (
            "missing name",
            edit("name: demo\n", ""),
            1,
            "missing required key `name`",
        ),
        (
            "missing version",
            edit("version: \"1\"\n", ""),
            1,
            "missing required key `version`",
        ),
        (
            "missing identities",
            edit("identities:\n  - spiffe://acme.test/agent/*\n", ""),
            1,
            "missing required key `identities`",
        ),
        (
            "missing lease",
            edit(
                "lease:\n  ttl: 60s\n  max_ttl: 5m\n  max_lifetime: 1h\n",
                "",
            ),
            1,
            "missing required key `lease`",
        ),
        (
            "missing lease ttl",
            edit("  ttl: 60s\n  max_ttl", "  max_ttl"),
            19,
            "`lease`: missing required key `ttl`",
        ),
        (
            "missing grants",
            edit("grants:", "unused:"),
            23,
            "unknown key `unused`",
        ),
        (
            "missing grant kind",
            edit("    kind: jwt\n", ""),
            24,
            "`grants[0]`: missing required key `kind`",
        ),
        (
            "missing grant ttl",
            edit("    ttl: 60s\n", ""),
            24,
            "`grants[0]`: missing required key `ttl`",
        ),
        (
            "missing parameter type",
            edit("    type: boolean\n", ""),
            16,
            "`parameters.flag`: missing required key `type`",
        ),
        (
            "owner not a string",
            edit("owner: team@acme.test", "owner: 12"),
            3,
            "`owner`: expected a string, found an integer (quote it)",
        ),
        (
            "owner empty",
            edit("owner: team@acme.test", "owner: \"\""),
            3,
            "`owner`: must not be empty",
        ),
        (
            "owner null",
            edit("owner: team@acme.test", "owner:"),
            3,
            "found null",
        ),
        (
            "version list",
            edit("version: \"1\"", "version: [1]"),
            2,
            "expected a string or an integer, found a list",
        ),
        (
            "version float",
            edit("version: \"1\"", "version: 1.5"),
            2,
            "found a float",
        ),
        (
            "version bool",
            edit("version: \"1\"", "version: true"),
            2,
            "found a boolean",
        ),
        (
            "description mapping",
            edit("description: A demo.", "description: {a: b}"),
            4,
            "expected a string, found a mapping",
        ),
        (
            "bad template name",
            edit("name: demo", "name: Demo!"),
            1,
            "not a valid template name",
        ),
        (
            "template name too long",
            edit("name: demo", &format!("name: {}", "a".repeat(64))),
            1,
            "not a valid template name",
        ),
        (
            "template name starts with dash",
            edit("name: demo", "name: -demo"),
            1,
            "not a valid template name",
        ),
        (
            "identities empty",
            edit(
                "identities:\n  - spiffe://acme.test/agent/*",
                "identities: []",
            ),
            5,
            "at least one SPIFFE ID",
        ),
        (
            "identities not a list",
            edit(
                "identities:\n  - spiffe://acme.test/agent/*",
                "identities: spiffe://acme.test/a",
            ),
            5,
            "`identities`: expected a list",
        ),
        (
            "identity not a string",
            edit("  - spiffe://acme.test/agent/*", "  - {a: b}"),
            6,
            "`identities[0]`: expected a string",
        ),
        (
            "too many identities",
            edit(
                "  - spiffe://acme.test/agent/*\n",
                &many(MAX_IDENTITIES + 1, &|i| {
                    format!("  - spiffe://acme.test/a{i}\n")
                }),
            ),
            5,
            "at most 64 allowed",
        ),
        (
            "parameters not a mapping",
            edit("parameters:\n", "parameters: []\nx:\n"),
            7,
            "`parameters`: expected a mapping of parameter names",
        ),
        (
            "parameter not a mapping",
            edit(
                "  flag:\n    type: boolean\n    required: false\n",
                "  flag: boolean\n",
            ),
            16,
            "parameters.flag: expected a mapping",
        ),
        (
            "bad parameter name",
            edit("  flag:", "  Flag:"),
            16,
            "not a valid parameter name",
        ),
        (
            "parameter name with dash",
            edit("  flag:", "  my-flag:"),
            16,
            "not a valid parameter name",
        ),
        (
            "parameter name too long",
            edit("  flag:", &format!("  {}:", "f".repeat(33))),
            16,
            "not a valid parameter name",
        ),
        (
            "duplicate parameter",
            edit("  flag:", "  repo:"),
            16,
            "duplicate",
        ),
        (
            "too many parameters",
            edit(
                "parameters:\n",
                &format!(
                    "parameters:\n{}",
                    many(MAX_PARAMETERS, &|i| format!("  p{i}:\n    type: boolean\n"))
                ),
            ),
            7,
            "at most 32 allowed",
        ),
        (
            "unknown parameter type",
            edit("    type: boolean", "    type: bool"),
            17,
            "\"bool\" is not a type",
        ),
        (
            "string without constraint",
            edit("    pattern: \"[a-z]+\"\n", ""),
            8,
            "needs a `pattern` or an `enum`; an unconstrained value substituted into a scope could widen it",
        ),
        (
            "pattern and enum",
            edit(
                "    pattern: \"[a-z]+\"",
                "    pattern: \"[a-z]+\"\n    enum: [a]",
            ),
            11,
            "not both",
        ),
        (
            "pattern does not compile",
            edit("    pattern: \"[a-z]+\"", "    pattern: \"[a-\""),
            10,
            "does not compile",
        ),
        (
            "pattern empty",
            edit("    pattern: \"[a-z]+\"", "    pattern: \"\""),
            10,
            "must not be empty",
        ),
        (
            "pattern too long",
            edit(
                "    pattern: \"[a-z]+\"",
                &format!("    pattern: \"{}\"", "a".repeat(MAX_PATTERN_BYTES + 1)),
            ),
            10,
            "at most 1024 allowed",
        ),
        (
            "pattern too big compiled",
            edit(
                "    pattern: \"[a-z]+\"",
                "    pattern: \"\\\\w{1000}\\\\w{1000}\"",
            ),
            10,
            "does not compile",
        ),
        (
            "enum empty",
            edit("    pattern: \"[a-z]+\"", "    enum: []"),
            10,
            "at least one value",
        ),
        (
            "enum not a list",
            edit("    pattern: \"[a-z]+\"", "    enum: abc"),
            10,
            "expected a list",
        ),
        (
            "enum value not a string",
            edit("    pattern: \"[a-z]+\"", "    enum: [a, 2]"),
            10,
            "`parameters.repo.enum[1]`: expected a string, found an integer",
        ),
        (
            "enum value empty",
            edit("    pattern: \"[a-z]+\"", "    enum: [a, \"\"]"),
            10,
            "`parameters.repo.enum[1]`: must not be empty",
        ),
        (
            "enum value padded",
            edit("    pattern: \"[a-z]+\"", "    enum: [\" a\"]"),
            10,
            "must not start or end with whitespace",
        ),
        (
            "enum duplicate value",
            edit("    pattern: \"[a-z]+\"", "    enum: [a, a]"),
            10,
            "duplicate value",
        ),
        (
            "enum value with whitespace used in a scope",
            edit("    pattern: \"[a-z]+\"", "    enum: [\"a b\"]"),
            10,
            "contains whitespace, which is not allowed in a value substituted into a scope",
        ),
        (
            "enum value with control character",
            edit("    pattern: \"[a-z]+\"", "    enum: [\"a\\tb\"]"),
            10,
            "control character",
        ),
        (
            "too many enum values",
            edit(
                "    pattern: \"[a-z]+\"",
                &format!(
                    "    enum: [{}]",
                    many(MAX_ENUM_VALUES + 1, &|i| format!("v{i},"))
                ),
            ),
            10,
            "at most 64 allowed",
        ),
        (
            "pattern on integer",
            edit("    min: 1", "    pattern: x"),
            14,
            "`parameters.count.pattern`: applies only to string parameters, not integer",
        ),
        (
            "min on string",
            edit("    required: true", "    required: true\n    min: 1"),
            12,
            "applies only to integer parameters, not string",
        ),
        (
            "enum on boolean",
            edit("    required: false", "    required: false\n    enum: [a]"),
            19,
            "applies only to string parameters, not boolean",
        ),
        (
            "min above max",
            edit("    min: 1", "    min: 20"),
            15,
            "max 10 is below min 20",
        ),
        (
            "min not an integer",
            edit("    min: 1", "    min: one"),
            14,
            "`parameters.count.min`: expected an integer, found a string",
        ),
        (
            "max overflows",
            edit("    max: 10", "    max: 99999999999999999999"),
            15,
            "does not fit a 64-bit signed integer",
        ),
        (
            "required not a boolean",
            edit("    required: false", "    required: no"),
            18,
            "expected `true` or `false`, found a string",
        ),
        (
            "lease not a mapping",
            edit(
                "lease:\n  ttl: 60s\n  max_ttl: 5m\n  max_lifetime: 1h",
                "lease: 60s",
            ),
            19,
            "lease: expected a mapping, found a string",
        ),
        (
            "duration unparsable",
            edit("  ttl: 60s\n  max_ttl", "  ttl: soon\n  max_ttl"),
            20,
            "`lease.ttl`: \"soon\" is not a duration",
        ),
        (
            "duration without unit",
            edit("  max_lifetime: 1h", "  max_lifetime: 3600"),
            22,
            "expected a duration with a unit",
        ),
        (
            "duration below 1s",
            edit("  ttl: 60s\n  max_ttl", "  ttl: 500ms\n  max_ttl"),
            20,
            "shorter than the minimum of 1s",
        ),
        (
            "duration zero",
            edit("  max_ttl: 5m", "  max_ttl: 0s"),
            21,
            "shorter than the minimum of 1s",
        ),
        (
            "ttl above max_ttl",
            edit("  ttl: 60s\n  max_ttl", "  ttl: 10m\n  max_ttl"),
            20,
            "`lease.ttl`: 10m exceeds `lease.max_ttl` 5m",
        ),
        (
            "max_ttl above max_lifetime",
            edit("  max_lifetime: 1h", "  max_lifetime: 2m"),
            21,
            "`lease.max_ttl`: 5m exceeds `lease.max_lifetime` 2m",
        ),
        (
            "no grants",
            edit(
                "grants:\n  - name: api\n    kind: jwt\n    audience: https://api.acme.test\n    scopes: [{scope: \"read:{repo}\", class: read}, {scope: \"n:{count}\", class: read}]\n    ttl: 60s\n",
                "grants: []\n",
            ),
            23,
            "at least one grant",
        ),
        (
            "grants not a list",
            edit(
                "grants:\n  - name: api\n    kind: jwt\n    audience: https://api.acme.test\n    scopes: [{scope: \"read:{repo}\", class: read}, {scope: \"n:{count}\", class: read}]\n    ttl: 60s\n",
                "grants: {}\n",
            ),
            23,
            "`grants`: expected a list, found a mapping",
        ),
        (
            "too many grants",
            format!(
                "{BASE}{}",
                many(MAX_GRANTS, &|i| format!(
                    "  - {{name: g{i}, kind: jwt, audience: a, scopes: [{{scope: s, class: read}}], ttl: 1s}}\n"
                ))
            ),
            23,
            "at most 16 allowed",
        ),
        (
            "grant not a mapping",
            format!("{BASE}  - api\n"),
            29,
            "grants[1]: expected a mapping, found a string",
        ),
        (
            "grant ttl below 1s",
            edit("    ttl: 60s\n", "    ttl: 0s\n"),
            28,
            "`grants[0].ttl`: 0s is shorter than the minimum of 1s",
        ),
        (
            "bad grant name",
            edit("  - name: api", "  - name: API"),
            24,
            "not a valid grant name",
        ),
        (
            "grant name with dot",
            edit("  - name: api", "  - name: a.b"),
            24,
            "not a valid grant name",
        ),
        (
            "duplicate grant name",
            format!(
                "{BASE}  - {{name: api, kind: opaque, audience: a, scopes: [{{scope: s, class: read}}], ttl: 1s}}\n"
            ),
            29,
            "duplicate grant name \"api\" (first at line 24)",
        ),
        (
            "bad kind",
            edit("    kind: jwt", "    kind: saml"),
            25,
            "\"saml\" is not a credential kind",
        ),
        (
            "audience with whitespace",
            edit(
                "    audience: https://api.acme.test",
                "    audience: \"https://api acme\"",
            ),
            26,
            "must not contain whitespace",
        ),
        (
            "audience empty",
            edit("    audience: https://api.acme.test", "    audience: \"\""),
            26,
            "`grants[0].audience`: must not be empty",
        ),
        (
            "audience too long",
            edit(
                "    audience: https://api.acme.test",
                &format!("    audience: {}", "a".repeat(MAX_TEXT_BYTES + 1)),
            ),
            26,
            "at most 256 allowed",
        ),
        (
            "scopes empty",
            edit(
                "    scopes: [{scope: \"read:{repo}\", class: read}, {scope: \"n:{count}\", class: read}]",
                "    scopes: []",
            ),
            27,
            "at least one scope",
        ),
        (
            "scopes not a list",
            edit(
                "    scopes: [{scope: \"read:{repo}\", class: read}, {scope: \"n:{count}\", class: read}]",
                "    scopes: read",
            ),
            27,
            "`grants[0].scopes`: expected a list",
        ),
        (
            "too many scopes",
            edit(
                "    scopes: [{scope: \"read:{repo}\", class: read}, {scope: \"n:{count}\", class: read}]",
                &format!(
                    "    scopes: [{}]",
                    many(MAX_SCOPES_PER_GRANT + 1, &|i| format!(
                        "{{scope: s{i}, class: read}},"
                    ))
                ),
            ),
            27,
            "at most 32 allowed",
        ),
        (
            "scope empty",
            edit("\"n:{count}\", class: read}]", "\"\", class: read}]"),
            27,
            "`grants[0].scopes[1].scope`: must not be empty",
        ),
        (
            "scope with whitespace",
            edit("\"read:{repo}\"", "\"read: {repo}\""),
            27,
            "`grants[0].scopes[0].scope`: \"read: {repo}\" must not contain whitespace",
        ),
        (
            "scope not a string",
            edit("\"read:{repo}\"", "{a: b}"),
            27,
            "`grants[0].scopes[0].scope`: expected a string",
        ),
        (
            "scope without a class",
            edit("{scope: \"read:{repo}\", class: read}", "\"read:{repo}\""),
            27,
            "`grants[0].scopes[0]`: scope \"read:{repo}\" declares no class; write `{scope: \"read:{repo}\", class: read}`",
        ),
        (
            "scope class missing",
            edit(
                "{scope: \"read:{repo}\", class: read}",
                "{scope: \"read:{repo}\"}",
            ),
            27,
            "`grants[0].scopes[0]`: missing required key `class`",
        ),
        (
            "scope class unknown",
            edit(
                "{scope: \"read:{repo}\", class: read}",
                "{scope: \"read:{repo}\", class: delete}",
            ),
            27,
            "`grants[0].scopes[0].class`: \"delete\" is not a scope class; use read, write or destructive",
        ),
        (
            "scope entry unknown key",
            edit(
                "{scope: \"read:{repo}\", class: read}",
                "{scope: \"read:{repo}\", class: read, destructive: true}",
            ),
            27,
            "unknown key `destructive`; expected one of: scope, class",
        ),
        (
            "sensitivity unknown",
            edit("grants:\n", "sensitivity: secret\ngrants:\n"),
            23,
            "`sensitivity`: \"secret\" is not a sensitivity; use low, medium or high",
        ),
        (
            "placeholder undeclared",
            edit("\"read:{repo}\"", "\"read:{nope}\""),
            27,
            "placeholder `{nope}` names no declared parameter (declared: repo, count, flag)",
        ),
        (
            "placeholder optional",
            edit("\"n:{count}\"", "\"x:{flag}\""),
            27,
            "uses optional parameter `flag`; only required parameters may appear in scopes",
        ),
        (
            "placeholder unclosed",
            edit("\"read:{repo}\"", "\"read:{repo\""),
            27,
            "has a `{` without a matching `}`",
        ),
        (
            "placeholder stray close",
            edit("\"read:{repo}\"", "\"read:repo}\""),
            27,
            "has a `}` without a matching `{`",
        ),
        (
            "placeholder empty",
            edit("\"read:{repo}\"", "\"read:{}\""),
            27,
            "empty placeholder",
        ),
        (
            "placeholder nested",
            edit("\"read:{repo}\"", "\"read:{{repo}}\""),
            27,
            "without a matching",
        ),
    ]
}

#[test]
fn each_rule_reports_line_and_reason() {
    for (what, text, line, fragment) in rule_cases() {
        let issues = issues_of(&text);
        assert!(
            issues
                .iter()
                .any(|i| i.line == line && i.message.contains(fragment)),
            "{what}: expected line {line} with {fragment:?}, got:\n{}",
            TemplateErrors(issues.clone())
        );
        assert!(
            issues.iter().all(|i| i.file.ends_with("t.yaml")),
            "{what}: every issue names the file"
        );
    }
}

#[test]
fn invalid_identity_pattern_is_reported_when_identity_rejects_it() {
    // The identity module decides what a valid pattern is; this checks that whatever it
    // rejects is reported with the entry's line.
    for bad in ["not-a-spiffe-id", "spiffe://", "https://acme.test/agent"] {
        if let Err(e) = IdentityPattern::parse(bad) {
            let issues = issues_of(&edit(
                "  - spiffe://acme.test/agent/*",
                &format!("  - \"{bad}\""),
            ));
            assert!(
                issues.iter().any(|i| i.line == 6
                    && i.message.contains("`identities[0]`")
                    && i.message.contains(&e.to_string())),
                "{bad}: {issues:#?}"
            );
        }
    }
}

#[test]
fn a_file_with_many_errors_reports_all_of_them() {
    let text = BASE
        .replacen("name: demo", "name: Demo", 1)
        .replacen("owner: team@acme.test\n", "", 1)
        .replacen("description: A demo.", "descripton: A demo.", 1)
        .replacen("    pattern: \"[a-z]+\"\n", "", 1)
        .replacen("    min: 1", "    min: 20", 1)
        .replacen("  max_lifetime: 1h", "  max_lifetime: 2m", 1)
        .replacen("    kind: jwt", "    kind: saml", 1)
        .replacen("\"n:{count}\"", "\"x:{flag}\"", 1);
    let issues = issues_of(&text);
    let expected: &[(usize, &str)] = &[
        (1, "not a valid template name"),
        (1, "missing required key `owner`"),
        (3, "unknown key `descripton`"),
        (7, "needs a `pattern` or an `enum`"),
        (13, "max 10 is below min 20"),
        (19, "exceeds `lease.max_lifetime`"),
        (23, "not a credential kind"),
        (25, "uses optional parameter `flag`"),
    ];
    for (line, fragment) in expected {
        assert!(
            issues
                .iter()
                .any(|i| i.line == *line && i.message.contains(fragment)),
            "missing line {line} {fragment:?} in:\n{}",
            TemplateErrors(issues.clone())
        );
    }
    assert_eq!(issues.len(), expected.len(), "{issues:#?}");
}

#[test]
fn errors_across_files_are_all_reported_in_file_order() {
    let dir = dir_with(&[
        ("a.yaml", &edit("    kind: jwt", "    kind: saml")),
        (
            "b.yml",
            &edit("name: demo", "name: other").replacen(
                "  ttl: 60s\n  max_ttl",
                "  ttl: x\n  max_ttl",
                1,
            ),
        ),
        ("c.yaml", &edit("name: demo", "name: third")),
    ]);
    let errors = load_dir(dir.path()).unwrap_err();
    let shown = errors.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 2, "{shown}");
    assert!(
        lines[0].ends_with(
            "a.yaml:25: `grants[0].kind`: \"saml\" is not a credential kind; use jwt or opaque"
        ),
        "{shown}"
    );
    assert!(lines[1].contains("b.yml:20: `lease.ttl`:"), "{shown}");
}

#[test]
fn duplicate_names_across_files_name_both_files() {
    let dir = dir_with(&[
        ("first.yaml", BASE),
        ("second.yaml", &edit("name: demo", "\nname: demo")),
    ]);
    let errors = load_dir(dir.path()).unwrap_err();
    assert_eq!(errors.0.len(), 1, "{errors}");
    let issue = &errors.0[0];
    assert!(issue.file.ends_with("second.yaml"));
    assert_eq!(issue.line, 2);
    assert!(
        issue.message.contains("duplicate template name \"demo\""),
        "{issue}"
    );
    assert!(issue.message.contains("first.yaml:1"), "{issue}");
}

#[test]
fn duplicate_names_are_found_even_when_a_file_has_other_errors() {
    let dir = dir_with(&[
        ("first.yaml", BASE),
        ("second.yaml", &edit("    kind: jwt", "    kind: saml")),
    ]);
    let errors = load_dir(dir.path()).unwrap_err();
    assert_eq!(errors.0.len(), 2, "{errors}");
    assert!(
        errors
            .0
            .iter()
            .any(|i| i.message.contains("duplicate template name"))
    );
    assert!(
        errors
            .0
            .iter()
            .any(|i| i.message.contains("not a credential kind"))
    );
}

#[test]
fn directory_rules() {
    // Only *.yaml / *.yml directly in the directory count; dotfiles and others are skipped.
    let dir = dir_with(&[
        ("a.yaml", BASE),
        ("b.yml", &edit("name: demo", "name: bee")),
        ("notes.txt", "not yaml: ["),
        (".hidden.yaml", "not yaml: ["),
        ("README.md", "# hi"),
    ]);
    fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    fs::create_dir(dir.path().join("nested")).unwrap();
    fs::write(dir.path().join("nested/x.yaml"), "broken: [").unwrap();
    let set = load_dir(dir.path()).unwrap();
    assert_eq!(set.names().collect::<Vec<_>>(), vec!["bee", "demo"]);
    assert_eq!(set.len(), 2);
    assert!(!set.is_empty());
    assert_eq!(set.iter().count(), 2);
    assert!(set.get("nope").is_none());

    let empty = tempfile::tempdir().unwrap();
    assert!(load_dir(empty.path()).unwrap().is_empty());
}

#[test]
fn file_level_problems() {
    let missing = Path::new("/definitely/not/here");
    let errors = load_dir(missing).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    assert_eq!(errors.0[0].line, 0);
    assert!(
        errors.0[0]
            .to_string()
            .starts_with("/definitely/not/here: cannot read template directory"),
        "{errors}"
    );

    let big = format!("{BASE}# {}\n", "x".repeat(MAX_FILE_BYTES as usize));
    let issues = issues_of(&big);
    assert_eq!(issues.len(), 1);
    assert!(
        issues[0].message.contains("larger than 65536 bytes"),
        "{issues:?}"
    );
    assert_eq!(issues[0].line, 0);
    assert!(
        !issues[0].to_string().contains(":0:"),
        "line 0 is not printed"
    );

    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("t.yaml"), b"name: demo\nowner: \xff\n").unwrap();
    let errors = load_dir(dir.path()).unwrap_err();
    assert_eq!(
        (errors.0[0].line, errors.0[0].message.as_str()),
        (2, "file is not valid UTF-8")
    );

    // Exactly at the limit is fine as far as size goes.
    let pad = MAX_FILE_BYTES as usize - BASE.len() - 3;
    let exact = format!("{BASE}# {}\n", "x".repeat(pad));
    assert_eq!(exact.len() as u64, MAX_FILE_BYTES);
    assert!(issues_of(&exact).is_empty());
}

#[test]
fn too_many_template_files() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..=MAX_TEMPLATES {
        fs::write(
            dir.path().join(format!("t{i:03}.yaml")),
            edit("name: demo", &format!("name: t{i}")),
        )
        .unwrap();
    }
    let errors = load_dir(dir.path()).unwrap_err();
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert!(
        errors.0[0]
            .message
            .contains("257 template files; at most 256 allowed")
    );
}

#[test]
fn errors_display_one_problem_per_line() {
    let errors = TemplateErrors(vec![
        TemplateIssue {
            file: "a.yaml".into(),
            line: 3,
            message: "first".into(),
        },
        TemplateIssue {
            file: "b.yaml".into(),
            line: 0,
            message: "second".into(),
        },
    ]);
    assert_eq!(errors.to_string(), "a.yaml:3: first\nb.yaml: second");
}

#[test]
fn allows_matches_identity_patterns() {
    let t = base_template();
    let cases = [
        ("spiffe://acme.test/agent/reviewer", true),
        ("spiffe://acme.test/service/api", false),
        ("spiffe://evil.test/agent/reviewer", false),
    ];
    for (id, want) in cases {
        let id = SpiffeId::parse(id).unwrap();
        assert_eq!(t.allows(&id), want, "{id}");
    }
    let mut nobody = (*t).clone();
    nobody.identities.clear();
    assert!(!nobody.allows(&SpiffeId::parse("spiffe://acme.test/agent/x").unwrap()));
}

/// Parameter name/value pairs in a case table.
type Pairs = &'static [(&'static str, &'static str)];
/// The same, when a value is built at run time.
type PairList<'a> = Vec<(&'a str, &'a str)>;

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn bind_parameters_accepts_and_normalizes() {
    let t = base_template();
    let cases: &[(Pairs, Pairs)] = &[
        (
            &[("repo", "abc"), ("count", "3")],
            &[("repo", "abc"), ("count", "3")],
        ),
        (
            &[("repo", "abc"), ("count", "+07")],
            &[("repo", "abc"), ("count", "7")],
        ),
        (
            &[("repo", "abc"), ("count", "10"), ("flag", "true")],
            &[("repo", "abc"), ("count", "10"), ("flag", "true")],
        ),
        (
            &[("repo", "abc"), ("count", "1"), ("flag", "false")],
            &[("repo", "abc"), ("count", "1"), ("flag", "false")],
        ),
    ];
    for (given, want) in cases {
        assert_eq!(
            t.bind_parameters(&params(given)).unwrap(),
            params(want),
            "{given:?}"
        );
    }
}

#[test]
fn bind_parameters_reports_every_problem() {
    let t = base_template();
    let long = "a".repeat(MAX_VALUE_BYTES + 1);
    let cases: Vec<(PairList<'_>, PairList<'_>)> = vec![
        (
            vec![],
            vec![
                ("parameters.repo", "required string parameter is missing"),
                ("parameters.count", "required integer parameter is missing"),
            ],
        ),
        (
            vec![("repo", "abc"), ("count", "3"), ("other", "x")],
            vec![(
                "parameters.other",
                "unknown parameter; template `demo` declares `repo`, `count`, `flag`",
            )],
        ),
        (
            vec![("repo", "ABC"), ("count", "3")],
            vec![(
                "parameters.repo",
                "\"ABC\" does not match the pattern `[a-z]+`",
            )],
        ),
        (
            vec![("repo", "abc\ndef"), ("count", "3")],
            vec![("parameters.repo", "control character")],
        ),
        (
            vec![("repo", "abc def"), ("count", "3")],
            vec![("parameters.repo", "whitespace")],
        ),
        (
            vec![("repo", &long), ("count", "3")],
            vec![("parameters.repo", "257 bytes; at most 256 allowed")],
        ),
        (
            vec![("repo", "abc"), ("count", "three")],
            vec![("parameters.count", "expected a decimal integer")],
        ),
        (
            vec![("repo", "abc"), ("count", "3.0")],
            vec![("parameters.count", "expected a decimal integer")],
        ),
        (
            vec![("repo", "abc"), ("count", "0")],
            vec![("parameters.count", "0 is below the minimum 1")],
        ),
        (
            vec![("repo", "abc"), ("count", "11")],
            vec![("parameters.count", "11 is above the maximum 10")],
        ),
        (
            vec![("repo", "abc"), ("count", "99999999999999999999")],
            vec![("parameters.count", "expected a decimal integer")],
        ),
        (
            vec![("repo", "abc"), ("count", "3"), ("flag", "yes")],
            vec![("parameters.flag", "expected `true` or `false`")],
        ),
        (
            vec![("repo", "abc"), ("count", "3"), ("flag", "TRUE")],
            vec![("parameters.flag", "expected `true` or `false`")],
        ),
        (
            vec![("repo", "abc"), ("count", "3"), ("bad key\n", "x")],
            vec![("parameters.\"bad key\\n\"", "unknown parameter")],
        ),
        (
            vec![("repo", "A"), ("count", "0"), ("flag", "1"), ("x", "y")],
            vec![
                ("parameters.x", "unknown"),
                ("parameters.repo", "pattern"),
                ("parameters.count", "minimum"),
                ("parameters.flag", "true"),
            ],
        ),
    ];
    for (given, want) in cases {
        let problems = t.bind_parameters(&params(&given)).unwrap_err();
        assert_eq!(problems.len(), want.len(), "{given:?}: {problems:#?}");
        for (field, fragment) in want {
            assert!(
                problems
                    .iter()
                    .any(|p| p.field == field && p.reason.contains(fragment)),
                "{given:?}: want {field} {fragment:?} in {problems:#?}"
            );
        }
    }
}

#[test]
fn bind_parameters_whitespace_rule_depends_on_scope_use() {
    // `note` is not used in any scope, so whitespace is fine there; control characters never are.
    let text = edit(
        "  flag:\n    type: boolean\n    required: false\n",
        "  note:\n    type: string\n    enum: [\"two words\", \"x\"]\n    required: false\n  flag:\n    type: boolean\n    required: false\n",
    );
    let dir = dir_with(&[("t.yaml", &text)]);
    let t = load_dir(dir.path()).unwrap().get("demo").unwrap();
    let ok = t
        .bind_parameters(&params(&[
            ("repo", "a"),
            ("count", "1"),
            ("note", "two words"),
        ]))
        .unwrap();
    assert_eq!(ok.get("note").map(String::as_str), Some("two words"));
    let bad = t
        .bind_parameters(&params(&[("repo", "a"), ("count", "1"), ("note", "y")]))
        .unwrap_err();
    assert!(
        bad[0]
            .reason
            .contains("is not one of [\"two words\", \"x\"]"),
        "{bad:?}"
    );
}

#[test]
fn bind_parameters_caps_the_number_of_keys() {
    let t = base_template();
    let many: BTreeMap<String, String> = (0..1000)
        .map(|i| (format!("k{i}"), "v".to_owned()))
        .collect();
    let problems = t.bind_parameters(&many).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].field, "parameters");
    assert_eq!(
        problems[0].to_string(),
        "parameters: 1000 parameters given; a template declares at most 32"
    );
}

#[test]
fn bind_parameters_with_no_declared_parameters() {
    let text = r#"name: plain
version: 1
owner: o
identities: [spiffe://acme.test/a]
lease: {ttl: 1s, max_ttl: 1s, max_lifetime: 1s}
grants: [{name: g, kind: opaque, audience: a, scopes: [{scope: read, class: read}], ttl: 1s}]
"#;
    let dir = dir_with(&[("p.yaml", text)]);
    let t = load_dir(dir.path()).unwrap().get("plain").unwrap();
    assert!(t.bind_parameters(&BTreeMap::new()).unwrap().is_empty());
    let problems = t.bind_parameters(&params(&[("x", "1")])).unwrap_err();
    assert!(
        problems[0].reason.contains("declares no parameters"),
        "{problems:?}"
    );
    assert_eq!(t.scopes_for(&t.grants[0], &BTreeMap::new()), vec!["read"]);
}

#[test]
fn hand_built_unconstrained_string_accepts_nothing() {
    let mut t = (*base_template()).clone();
    if let Some(p) = t.parameters.iter_mut().find(|p| p.name == "repo") {
        p.constraint = ParameterConstraint::None;
    }
    let problems = t
        .bind_parameters(&params(&[("repo", "abc"), ("count", "1")]))
        .unwrap_err();
    assert!(
        problems[0].reason.contains("no pattern or enum"),
        "{problems:?}"
    );
}

#[test]
fn scopes_substitution() {
    let t = base_template();
    let grant = &t.grants[0];
    let cases: &[(Pairs, &[&str])] = &[
        (&[("repo", "abc"), ("count", "7")], &["read:abc", "n:7"]),
        // One pass only: a value that looks like a placeholder is not expanded again.
        (
            &[("repo", "{count}"), ("count", "7")],
            &["read:{count}", "n:7"],
        ),
        // A scope whose value is missing is dropped, never emitted with `{repo}` in it.
        (&[("count", "7")], &["n:7"]),
        (&[], &[]),
    ];
    for (bound, want) in cases {
        assert_eq!(t.scopes_for(grant, &params(bound)), *want, "{bound:?}");
    }
    // Bound through bind_parameters, the normalized value is what lands in the scope.
    let bound = t
        .bind_parameters(&params(&[("repo", "xyz"), ("count", "+3")]))
        .unwrap();
    assert_eq!(t.scopes_for(grant, &bound), vec!["read:xyz", "n:3"]);
    assert_eq!(
        t.scope_parameters().into_iter().collect::<Vec<_>>(),
        vec!["count", "repo"]
    );
}

#[test]
fn scope_placeholders_repeat_and_abut() {
    let text = edit(
        "{scope: \"read:{repo}\", class: read}, {scope: \"n:{count}\", class: read}",
        "{scope: \"{repo}{count}:{repo}\", class: read}",
    );
    let dir = dir_with(&[("t.yaml", &text)]);
    let t = load_dir(dir.path()).unwrap().get("demo").unwrap();
    let bound = t
        .bind_parameters(&params(&[("repo", "ab"), ("count", "2")]))
        .unwrap();
    assert_eq!(t.scopes_for(&t.grants[0], &bound), vec!["ab2:ab"]);
}

#[test]
fn split_scope_table() {
    use super::parameters::{ScopePiece::*, split_scope};
    let ok: &[(&str, &[super::parameters::ScopePiece<'_>])] = &[
        ("read", &[Literal("read")]),
        ("{a}", &[Placeholder("a")]),
        ("x:{a}:y", &[Literal("x:"), Placeholder("a"), Literal(":y")]),
        ("{a}{b}", &[Placeholder("a"), Placeholder("b")]),
        ("", &[]),
    ];
    for (scope, want) in ok {
        assert_eq!(split_scope(scope).unwrap(), *want, "{scope:?}");
    }
    for bad in ["{", "}", "a{b", "a}b", "{}", "{a{b}}", "{a}}"] {
        assert!(split_scope(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn pattern_is_anchored() {
    let t = base_template();
    for value in ["abc1", "1abc", "ab-c", "abc\u{0}"] {
        assert!(
            t.bind_parameters(&params(&[("repo", value), ("count", "1")]))
                .is_err(),
            "{value:?} must not match an anchored [a-z]+"
        );
    }
    // Alternation must not escape the anchors: `a|b` means exactly "a" or "b".
    let text = edit("    pattern: \"[a-z]+\"", "    pattern: \"a|b\"");
    let dir = dir_with(&[("t.yaml", &text)]);
    let t = load_dir(dir.path()).unwrap().get("demo").unwrap();
    assert!(
        t.bind_parameters(&params(&[("repo", "b"), ("count", "1")]))
            .is_ok()
    );
    assert!(
        t.bind_parameters(&params(&[("repo", "ab"), ("count", "1")]))
            .is_err()
    );
    assert!(
        t.bind_parameters(&params(&[("repo", "bz"), ("count", "1")]))
            .is_err()
    );
}

mod catalog {
    use super::*;

    fn catalog_with(files: &[(&str, &str)]) -> (TempDir, TemplateCatalog) {
        let dir = dir_with(files);
        let catalog = TemplateCatalog::new(dir.path().to_owned()).unwrap();
        (dir, catalog)
    }

    #[test]
    fn starts_only_from_a_valid_directory() {
        let dir = dir_with(&[("t.yaml", "name: [")]);
        let errors = TemplateCatalog::new(dir.path().to_owned()).unwrap_err();
        assert!(errors.to_string().contains("YAML syntax error"));
        let (dir, catalog) = catalog_with(&[("t.yaml", BASE)]);
        assert_eq!(catalog.dir(), dir.path());
        assert_eq!(catalog.current().len(), 1);
    }

    #[test]
    fn unchanged_directory_is_not_reloaded() {
        let (_dir, catalog) = catalog_with(&[("t.yaml", BASE)]);
        let before = catalog.current();
        assert!(!catalog.reload().unwrap());
        assert!(Arc::ptr_eq(&before, &catalog.current()));
    }

    #[test]
    fn good_edit_is_picked_up() {
        let (dir, catalog) = catalog_with(&[("t.yaml", BASE)]);
        let before = catalog.current();
        // Same length, so only the content hash can notice the change.
        let edited = edit("owner: team@acme.test", "owner: mob@acme.test.");
        assert_eq!(edited.len(), BASE.len());
        fs::write(dir.path().join("t.yaml"), &edited).unwrap();
        assert!(catalog.reload().unwrap());
        assert_eq!(
            catalog.current().get("demo").unwrap().owner,
            "mob@acme.test."
        );
        // Holders of the old set keep a consistent view.
        assert_eq!(before.get("demo").unwrap().owner, "team@acme.test");
        assert!(!catalog.reload().unwrap());
    }

    #[test]
    fn added_file_is_picked_up() {
        let (dir, catalog) = catalog_with(&[("t.yaml", BASE)]);
        fs::write(dir.path().join("u.yml"), edit("name: demo", "name: second")).unwrap();
        assert!(catalog.reload().unwrap());
        assert_eq!(
            catalog.current().names().collect::<Vec<_>>(),
            vec!["demo", "second"]
        );
    }

    #[test]
    fn bad_edit_keeps_last_good_set() {
        let (dir, catalog) = catalog_with(&[("t.yaml", BASE)]);
        let good = catalog.current();
        fs::write(
            dir.path().join("t.yaml"),
            edit("    kind: jwt", "    kind: saml"),
        )
        .unwrap();
        let errors = catalog.reload().unwrap_err();
        assert!(errors.to_string().contains("t.yaml:25:"), "{errors}");
        assert!(Arc::ptr_eq(&good, &catalog.current()));
        // The same bad state is reported once, not on every poll.
        assert!(!catalog.reload().unwrap());
        assert!(Arc::ptr_eq(&good, &catalog.current()));
        // Fixing it installs the fix.
        fs::write(
            dir.path().join("t.yaml"),
            edit("    kind: jwt", "    kind: opaque"),
        )
        .unwrap();
        assert!(catalog.reload().unwrap());
        assert_eq!(
            catalog.current().get("demo").unwrap().grants[0].kind,
            CredentialKind::Opaque
        );
    }

    #[test]
    fn duplicate_added_keeps_last_good_set() {
        let (dir, catalog) = catalog_with(&[("t.yaml", BASE)]);
        fs::write(dir.path().join("u.yaml"), BASE).unwrap();
        let errors = catalog.reload().unwrap_err();
        assert!(errors.to_string().contains("duplicate template name"));
        assert_eq!(catalog.current().len(), 1);
    }

    #[test]
    fn deleted_file_is_handled() {
        let (dir, catalog) = catalog_with(&[
            ("t.yaml", BASE),
            ("u.yaml", &edit("name: demo", "name: other")),
        ]);
        assert_eq!(catalog.current().len(), 2);
        fs::remove_file(dir.path().join("u.yaml")).unwrap();
        assert!(catalog.reload().unwrap());
        assert_eq!(catalog.current().names().collect::<Vec<_>>(), vec!["demo"]);
        fs::remove_file(dir.path().join("t.yaml")).unwrap();
        assert!(catalog.reload().unwrap());
        assert!(catalog.current().is_empty());
    }

    #[test]
    fn deleted_directory_keeps_last_good_set() {
        let (dir, catalog) = catalog_with(&[("t.yaml", BASE)]);
        let path = dir.path().to_owned();
        drop(dir);
        let errors = catalog.reload().unwrap_err();
        assert!(
            errors
                .to_string()
                .contains("cannot read template directory"),
            "{errors}"
        );
        assert_eq!(catalog.current().len(), 1);
        // Re-creating it with the same content brings the catalog back in sync.
        fs::create_dir(&path).unwrap();
        fs::write(path.join("t.yaml"), BASE).unwrap();
        assert!(catalog.reload().unwrap());
        assert_eq!(catalog.current().len(), 1);
        fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn renamed_file_is_a_change() {
        let (dir, catalog) = catalog_with(&[("t.yaml", BASE)]);
        fs::rename(dir.path().join("t.yaml"), dir.path().join("renamed.yaml")).unwrap();
        assert!(catalog.reload().unwrap());
        assert!(
            catalog
                .current()
                .get("demo")
                .unwrap()
                .source
                .ends_with("renamed.yaml")
        );
    }
}

#[test]
fn readers_always_see_a_complete_set_during_reloads() {
    let dir = dir_with(&[("t.yaml", BASE)]);
    let catalog = Arc::new(TemplateCatalog::new(dir.path().to_owned()).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let catalog = Arc::clone(&catalog);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut seen = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let set = catalog.current();
                    // Every set ever installed holds `demo`, valid, with one grant.
                    let t = set.get("demo").unwrap();
                    assert_eq!(t.grants.len(), 1);
                    seen += 1;
                }
                seen
            })
        })
        .collect();
    for i in 0..20 {
        let owner = format!("owner: team{i}@acme.test");
        let text = if i % 3 == 0 {
            // Every third edit is bad and must never become visible.
            edit("    kind: jwt", "    kind: saml")
        } else {
            edit("owner: team@acme.test", &owner)
        };
        fs::write(dir.path().join("t.yaml"), text).unwrap();
        let result = catalog.reload();
        assert_eq!(result.is_err(), i % 3 == 0, "edit {i}: {result:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    assert_eq!(
        catalog.current().get("demo").unwrap().owner,
        "team19@acme.test"
    );
}

#[test]
fn min_renew_interval_is_bounded_and_can_be_turned_off() {
    let load = |text: &str| {
        let dir = dir_with(&[("t.yaml", text)]);
        load_dir(dir.path()).map(|c| c.get("demo").unwrap().lease.min_renew_interval)
    };
    let with = |v: &str| {
        edit(
            "  max_lifetime: 1h",
            &format!("  max_lifetime: 1h\n  min_renew_interval: {v}"),
        )
    };
    assert_eq!(
        load(&with("0s")).unwrap(),
        Duration::ZERO,
        "0s turns the limit off"
    );
    assert_eq!(load(&with("10s")).unwrap(), Duration::from_secs(10));
    let issues = issues_of(&with("31s"));
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert!(
        issues[0]
            .to_string()
            .contains("more than half of `lease.ttl`"),
        "{issues:?}"
    );
    let issues = issues_of(&with("soon"));
    assert!(
        issues[0].to_string().contains("min_renew_interval"),
        "{issues:?}"
    );
    // A short TTL gets a proportionally short default.
    let short = edit("  ttl: 60s", "  ttl: 2s");
    assert_eq!(load(&short).unwrap(), Duration::from_millis(500));
}

#[test]
fn scope_classes_and_sensitivity_are_loaded() {
    let t = base_template();
    assert_eq!(
        t.sensitivity,
        super::Sensitivity::High,
        "undeclared is high"
    );
    assert_eq!(
        t.grants[0].scope_classes,
        vec![super::ScopeClass::Read, super::ScopeClass::Read]
    );
    let text = edit(
        "{scope: \"n:{count}\", class: read}",
        "{scope: \"n:{count}\", class: destructive}",
    )
    .replace("grants:\n", "sensitivity: low\ngrants:\n");
    let dir = dir_with(&[("t.yaml", &text)]);
    let t = load_dir(dir.path()).unwrap().get("demo").unwrap();
    assert_eq!(t.sensitivity, super::Sensitivity::Low);
    let bound = t
        .bind_parameters(&params(&[("repo", "ab"), ("count", "2")]))
        .unwrap();
    assert_eq!(
        t.classified_scopes_for(&t.grants[0], &bound),
        vec![
            ("read:ab".to_owned(), super::ScopeClass::Read),
            ("n:2".to_owned(), super::ScopeClass::Destructive)
        ]
    );
}

/// `BASE` with `extra` appended; `extra`'s first line is line 29.
fn with_sections(extra: &str) -> String {
    assert_eq!(
        BASE.lines().count(),
        28,
        "the line numbers below rely on BASE"
    );
    format!("{BASE}{extra}")
}

/// `BASE` with a second grant, `admin`, so a gate can name one of two.
fn two_grants(extra: &str) -> String {
    with_sections(&format!(
        "  - {{name: admin, kind: opaque, audience: x, scopes: [{{scope: s, class: destructive}}], ttl: 30s}}\n{extra}"
    ))
}

#[test]
fn delegation_and_approval_are_loaded() {
    let text = two_grants(
        "delegation:
  max_depth: 1
  may_act:
    - spiffe://acme.test/subagent/*
    - spiffe://acme.test/agent/reviewer
approval:
  grants: [admin]
  approvers:
    identities: [spiffe://acme.test/human/*]
    classes: [operators, oncall]
  validity: 2h
  while_pending: issue_none
",
    );
    let dir = dir_with(&[("t.yaml", &text)]);
    let t = load_dir(dir.path()).unwrap().get("demo").unwrap();
    assert_eq!(
        t.delegation,
        DelegationPolicy {
            max_depth: 1,
            may_act: vec![
                IdentityPattern::parse("spiffe://acme.test/subagent/*").unwrap(),
                IdentityPattern::parse("spiffe://acme.test/agent/reviewer").unwrap(),
            ],
        }
    );
    assert_eq!(
        t.approval,
        Some(ApprovalGate {
            grants: vec!["admin".to_owned()],
            approvers: vec![IdentityPattern::parse("spiffe://acme.test/human/*").unwrap()],
            approver_classes: vec!["operators".to_owned(), "oncall".to_owned()],
            validity: Duration::from_secs(2 * 3600),
            issue_others: false,
        })
    );
}

#[test]
fn delegation_and_approval_defaults() {
    let t = base_template();
    assert_eq!(
        t.delegation,
        DelegationPolicy {
            max_depth: 2,
            may_act: Vec::new()
        },
        "no `delegation:`: two levels, anyone the template's classes admit"
    );
    assert_eq!(t.approval, None, "no `approval:`: nothing is gated");

    let load = |text: &str| {
        let dir = dir_with(&[("t.yaml", text)]);
        match load_dir(dir.path()) {
            Ok(set) => set.get("demo").unwrap(),
            Err(e) => panic!("{text}\n{e}"),
        }
    };
    let t = load(&with_sections("delegation: {}\n"));
    assert_eq!(
        t.delegation,
        DelegationPolicy::default(),
        "an empty section"
    );
    let t = load(&with_sections("delegation:\n  max_depth: 0\n"));
    assert_eq!(t.delegation.max_depth, 0, "0 forbids delegation");
    let t = load(&with_sections(&format!(
        "delegation:\n  max_depth: {MAX_DELEGATION_DEPTH}\n"
    )));
    assert_eq!(t.delegation.max_depth, MAX_DELEGATION_DEPTH);

    let t = load(&with_sections(
        "approval:\n  grants: [api]\n  approvers:\n    classes: [operators]\n",
    ));
    assert_eq!(
        t.approval,
        Some(ApprovalGate {
            grants: vec!["api".to_owned()],
            approvers: Vec::new(),
            approver_classes: vec!["operators".to_owned()],
            validity: Duration::from_secs(15 * 60),
            issue_others: true,
        }),
        "validity 15m and issue_others by default"
    );
    let t = load(&with_sections(
        "approval:\n  grants: [api]\n  approvers:\n    identities: [spiffe://acme.test/human/*]\n  validity: 24h\n  while_pending: issue_others\n",
    ));
    let gate = t.approval.as_ref().unwrap();
    assert!(gate.approver_classes.is_empty());
    assert_eq!(gate.approvers.len(), 1);
    assert_eq!(gate.validity, MAX_APPROVAL_VALIDITY, "24h is allowed");
    assert!(gate.issue_others);
    let t = load(&with_sections(
        "approval:\n  grants: [api]\n  approvers: {classes: [a]}\n  validity: 1s\n",
    ));
    assert_eq!(
        t.approval.as_ref().unwrap().validity,
        Duration::from_secs(1)
    );
}

/// (what, YAML appended to BASE (or to BASE with the `admin` grant), expected
/// line, message fragment). The appended text starts at line 29.
fn section_cases() -> Vec<(&'static str, String, usize, &'static str)> {
    let gate = |rest: &str| {
        with_sections(&format!(
            "approval:\n  grants: [api]\n  approvers:\n    classes: [ops]\n{rest}"
        ))
    };
    vec![
        (
            "delegation not a mapping",
            with_sections("delegation: 2\n"),
            29,
            "delegation: expected a mapping",
        ),
        (
            "delegation unknown key",
            with_sections("delegation:\n  depth: 1\n"),
            30,
            "`delegation`: unknown key `depth`; expected one of: max_depth, may_act",
        ),
        (
            "delegation duplicate key",
            with_sections("delegation:\n  max_depth: 1\n  max_depth: 2\n"),
            31,
            "`delegation`: duplicate key `max_depth` (first at line 30)",
        ),
        (
            "max_depth too deep",
            with_sections("delegation:\n  max_depth: 5\n"),
            30,
            "`delegation.max_depth`: 5 is out of range; use 0 (no delegation) to 4",
        ),
        (
            "max_depth negative",
            with_sections("delegation:\n  max_depth: -1\n"),
            30,
            "`delegation.max_depth`: -1 is out of range",
        ),
        (
            "max_depth not an integer",
            with_sections("delegation:\n  max_depth: two\n"),
            30,
            "`delegation.max_depth`: expected an integer, found",
        ),
        (
            "may_act not a list",
            with_sections("delegation:\n  may_act: spiffe://acme.test/a\n"),
            30,
            "`delegation.may_act`: expected a list",
        ),
        (
            "may_act empty",
            with_sections("delegation:\n  may_act: []\n"),
            30,
            "`delegation.may_act`: must list at least one SPIFFE ID or pattern; leave it out",
        ),
        (
            "may_act bad pattern",
            with_sections(
                "delegation:\n  may_act:\n    - spiffe://acme.test/a/*\n    - https://acme.test/b\n",
            ),
            32,
            "`delegation.may_act[1]`: \"https://acme.test/b\"",
        ),
        (
            "may_act with depth 0",
            with_sections("delegation:\n  max_depth: 0\n  may_act: [spiffe://acme.test/a/*]\n"),
            31,
            "`delegation.may_act`: `delegation.max_depth` is 0, which forbids delegation",
        ),
        (
            "approval not a mapping",
            with_sections("approval: [api]\n"),
            29,
            "approval: expected a mapping",
        ),
        (
            "approval unknown key",
            gate("  approver: me\n"),
            33,
            "`approval`: unknown key `approver`; expected one of: grants, approvers, validity, while_pending",
        ),
        (
            "approval without grants",
            with_sections("approval:\n  approvers:\n    classes: [ops]\n"),
            29,
            "`approval`: missing required key `grants`",
        ),
        (
            "approval without approvers",
            with_sections("approval:\n  grants: [api]\n"),
            29,
            "`approval`: missing required key `approvers`",
        ),
        (
            "approval grants empty",
            with_sections("approval:\n  grants: []\n  approvers: {classes: [ops]}\n"),
            30,
            "`approval.grants`: must list at least one grant; leave `approval` out",
        ),
        (
            "approval grants not a list",
            with_sections("approval:\n  grants: api\n  approvers: {classes: [ops]}\n"),
            30,
            "`approval.grants`: expected a list, found",
        ),
        (
            "approval grant unknown",
            two_grants(
                "approval:\n  grants:\n    - admin\n    - x\n  approvers: {classes: [ops]}\n",
            ),
            33,
            "`approval.grants[1]`: \"x\" is not a grant of this template; grants: api, admin",
        ),
        (
            "approval grant listed twice",
            two_grants("approval:\n  grants: [admin, api, admin]\n  approvers: {classes: [ops]}\n"),
            31,
            "`approval.grants[2]`: \"admin\" is listed twice",
        ),
        (
            "approval grant not a string",
            with_sections("approval:\n  grants: [7]\n  approvers: {classes: [ops]}\n"),
            30,
            "`approval.grants[0]`: expected a string, found",
        ),
        (
            "approvers name nobody",
            with_sections("approval:\n  grants: [api]\n  approvers: {}\n"),
            31,
            "`approval.approvers`: names nobody",
        ),
        (
            "approvers not a mapping",
            with_sections("approval:\n  grants: [api]\n  approvers: [ops]\n"),
            31,
            "approval.approvers: expected a mapping",
        ),
        (
            "approvers unknown key",
            with_sections("approval:\n  grants: [api]\n  approvers:\n    people: [x]\n"),
            32,
            "`approval.approvers`: unknown key `people`; expected one of: identities, classes",
        ),
        (
            "approver identities empty",
            with_sections(
                "approval:\n  grants: [api]\n  approvers:\n    identities: []\n    classes: [ops]\n",
            ),
            32,
            "`approval.approvers.identities`: must list at least one SPIFFE ID or pattern",
        ),
        (
            "approver identity bad",
            with_sections(
                "approval:\n  grants: [api]\n  approvers:\n    identities:\n      - not-an-id\n",
            ),
            33,
            "`approval.approvers.identities[0]`: \"not-an-id\"",
        ),
        (
            "approver classes empty",
            with_sections("approval:\n  grants: [api]\n  approvers:\n    classes: []\n"),
            32,
            "`approval.approvers.classes`: must list at least one actor class",
        ),
        (
            "approver class bad name",
            with_sections("approval:\n  grants: [api]\n  approvers:\n    classes: [ops, Ops]\n"),
            32,
            "`approval.approvers.classes[1]`: \"Ops\" is not a class name",
        ),
        (
            "approver class twice",
            with_sections(
                "approval:\n  grants: [api]\n  approvers:\n    classes:\n      - ops\n      - ops\n",
            ),
            34,
            "`approval.approvers.classes[1]`: \"ops\" is listed twice",
        ),
        (
            "validity too long",
            gate("  validity: 25h\n"),
            33,
            "`approval.validity`: 1day 1h is longer than the maximum of 1day",
        ),
        (
            "validity too short",
            gate("  validity: 500ms\n"),
            33,
            "`approval.validity`: 500ms is shorter than the minimum of 1s",
        ),
        (
            "validity not a duration",
            gate("  validity: soon\n"),
            33,
            "`approval.validity`: \"soon\" is not a duration",
        ),
        (
            "validity without unit",
            gate("  validity: 60\n"),
            33,
            "`approval.validity`: expected a duration with a unit",
        ),
        (
            "while_pending unknown",
            gate("  while_pending: wait\n"),
            33,
            "`approval.while_pending`: \"wait\" is not a choice; use issue_others",
        ),
        (
            "while_pending not a string",
            gate("  while_pending: true\n"),
            33,
            "`approval.while_pending`: expected a string, found",
        ),
    ]
}

#[test]
fn each_delegation_and_approval_rule_reports_line_and_reason() {
    for (what, text, line, fragment) in section_cases() {
        let issues = issues_of(&text);
        assert!(
            issues
                .iter()
                .any(|i| i.line == line && i.message.contains(fragment)),
            "{what}: expected line {line} with {fragment:?}, got:\n{}",
            TemplateErrors(issues.clone())
        );
    }
}

#[test]
fn bad_delegation_and_approval_are_all_reported_at_once() {
    let issues = issues_of(&with_sections(
        "delegation:\n  max_depth: 9\n  may_act: []\napproval:\n  grants: [nope]\n  approvers: {}\n  validity: 2d\n",
    ));
    let lines: Vec<usize> = issues.iter().map(|i| i.line).collect();
    assert_eq!(lines, vec![30, 31, 33, 34, 35], "{issues:#?}");
}

#[test]
fn approver_classes_must_be_configured_classes_of_the_template_tenant() {
    use crate::policy::actors::{ActorClasses, ClassSpec};
    let spec = |name, tenant, identity| ClassSpec {
        name,
        tenant,
        owner: "platform@acme.test",
        identities: vec![identity],
        ..ClassSpec::default()
    };
    let classes = ActorClasses::parse(
        "classes",
        [
            spec("agent", "acme", "spiffe://acme.test/agent/*"),
            spec("approvers", "acme", "spiffe://acme.test/human/*"),
            spec("partner-ops", "partner", "spiffe://partner.test/*"),
        ],
    )
    .unwrap();
    let with_approvers = |list: &str| {
        edit(
            "identities:\n",
            &format!(
                "tenant: acme\nclasses: [agent]\napproval:\n  grants: [api]\n  approvers:\n    classes: [{list}]\nidentities:\n"
            ),
        )
    };
    let problems = |text: &str| {
        let dir = dir_with(&[("t.yaml", text)]);
        let set = load_dir(dir.path()).unwrap();
        crate::policy::actors::template_check(classes.clone())(&set)
    };
    assert_eq!(problems(&with_approvers("approvers")), Vec::new());
    let issues = problems(&with_approvers("approvers, nobody, partner-ops"));
    let messages: Vec<&str> = issues.iter().map(|i| i.message.as_str()).collect();
    assert_eq!(
        messages,
        vec![
            "template \"demo\": `approval.approvers.classes`: \"nobody\" is not an actor class of the config (actors.classes)",
            "template \"demo\": `approval.approvers.classes`: \"partner-ops\" belongs to tenant \"partner\", not the template's tenant \"acme\"",
        ]
    );
    assert!(issues.iter().all(|i| i.file.ends_with("t.yaml")));
    // `classes:` is still checked, and reported before the approvers.
    let issues = problems(&with_approvers("nobody").replace("classes: [agent]", "classes: [x]"));
    assert_eq!(issues.len(), 2, "{issues:#?}");
    assert!(
        issues[0].message.contains("`classes`: \"x\""),
        "{issues:#?}"
    );
}
