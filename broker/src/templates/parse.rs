//! Node tree → [`Template`], collecting every problem with its line.
//!
//! Each checker reports into a [`Report`] and returns `Option`: `None` means "this
//! part was bad and already reported", so later checks go on with what is known and a
//! file with five mistakes gets five messages, not one.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use regex::{Regex, RegexBuilder};

use crate::identity::IdentityPattern;

use super::TemplateIssue;
use super::limits::{
    MAX_APPROVAL_VALIDITY, MAX_DESCRIPTION_BYTES, MAX_ENUM_VALUES, MAX_GRANTS, MAX_IDENTITIES,
    MAX_PARAMETERS, MAX_PATTERN_BYTES, MAX_PATTERN_COMPILED_BYTES, MAX_SCOPES_PER_GRANT,
    MAX_TEXT_BYTES, MAX_VALUE_BYTES, MIN_DURATION,
};
use super::model::{
    ApprovalGate, CredentialKind, DelegationPolicy, GrantSpec, LeasePolicy, MAX_DELEGATION_DEPTH,
    Parameter, ParameterConstraint, ParameterKind, ScopeClass, Sensitivity, Template,
};
use super::parameters::{ScopePiece, split_scope};
use super::yaml::{self, Key, Node, ScalarType, Value, scalar_type};

/// The outcome of parsing one file.
#[derive(Debug)]
pub(crate) struct Parsed {
    /// The template's name and its line, when the `name` key itself was valid, so
    /// duplicate names are found even in files with other problems.
    pub name: Option<(String, usize)>,
    /// The template, or every problem found in the file.
    pub result: Result<Template, Vec<TemplateIssue>>,
}

/// Collects problems for one file.
struct Report {
    file: PathBuf,
    issues: Vec<TemplateIssue>,
}

impl Report {
    fn at(&mut self, line: usize, message: impl Into<String>) {
        self.issues.push(TemplateIssue {
            file: self.file.clone(),
            line,
            message: message.into(),
        });
    }
}

/// Parses and validates one template file's text.
pub(crate) fn parse_template(file: &Path, src: &str) -> Parsed {
    let mut report = Report {
        file: file.to_owned(),
        issues: Vec::new(),
    };
    let root = match yaml::parse(src) {
        Ok(Some(root)) => root,
        Ok(None) => {
            report.at(1, "file is empty; expected a template mapping");
            return finish(report, None, None);
        }
        Err(e) => {
            report.at(e.line, e.message);
            return finish(report, None, None);
        }
    };
    let (name, template) = template(&root, file, &mut report);
    finish(report, name, template)
}

fn finish(report: Report, name: Option<(String, usize)>, template: Option<Template>) -> Parsed {
    let result = match template {
        Some(t) if report.issues.is_empty() => Ok(t),
        _ => Err(report.issues),
    };
    Parsed { name, result }
}

/// A checked mapping: unknown and duplicate keys already reported.
struct Mapping<'a> {
    line: usize,
    path: String,
    entries: BTreeMap<&'a str, (&'a Key, &'a Node)>,
}

impl<'a> Mapping<'a> {
    fn optional(&self, key: &str) -> Option<&'a Node> {
        self.entries.get(key).map(|(_, node)| *node)
    }

    fn key_line(&self, key: &str) -> usize {
        self.entries.get(key).map_or(self.line, |(k, _)| k.line)
    }

    fn required(&self, key: &str, report: &mut Report) -> Option<&'a Node> {
        let node = self.optional(key);
        if node.is_none() {
            report.at(
                self.line,
                format!("{}missing required key `{key}`", in_path(&self.path)),
            );
        }
        node
    }

    fn child(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }
}

fn in_path(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("`{path}`: ")
    }
}

fn wrong_type(node: &Node, path: &str, expected: &str, report: &mut Report) {
    let found = node.value.describe();
    let hint = match &node.value {
        Value::Scalar { text, plain }
            if expected.contains("string")
                && matches!(
                    scalar_type(text, *plain),
                    ScalarType::Bool | ScalarType::Integer | ScalarType::Float
                ) =>
        {
            " (quote it)"
        }
        _ => "",
    };
    report.at(
        node.line,
        format!("`{path}`: expected {expected}, found {found}{hint}"),
    );
}

/// Checks `node` is a mapping with only `allowed` keys, each once.
fn mapping<'a>(
    node: &'a Node,
    path: &str,
    allowed: &[&str],
    report: &mut Report,
) -> Option<Mapping<'a>> {
    let Value::Map(raw) = &node.value else {
        let what = if path.is_empty() { "the file" } else { path };
        report.at(
            node.line,
            format!(
                "{what}: expected a mapping, found {}",
                node.value.describe()
            ),
        );
        return None;
    };
    let mut entries: BTreeMap<&str, (&Key, &Node)> = BTreeMap::new();
    for (key, value) in raw {
        if !allowed.contains(&key.text.as_str()) {
            report.at(
                key.line,
                format!(
                    "{}unknown key `{}`; expected one of: {}",
                    in_path(path),
                    key.text,
                    allowed.join(", ")
                ),
            );
            continue;
        }
        if let Some((first, _)) = entries.get(key.text.as_str()) {
            report.at(
                key.line,
                format!(
                    "{}duplicate key `{}` (first at line {})",
                    in_path(path),
                    key.text,
                    first.line
                ),
            );
            continue;
        }
        entries.insert(&key.text, (key, value));
    }
    Some(Mapping {
        line: node.line,
        path: path.to_owned(),
        entries,
    })
}

fn sequence<'a>(node: &'a Node, path: &str, report: &mut Report) -> Option<&'a [Node]> {
    match &node.value {
        Value::Seq(items) => Some(items),
        _ => {
            wrong_type(node, path, "a list", report);
            None
        }
    }
}

fn string<'a>(node: &'a Node, path: &str, report: &mut Report) -> Option<&'a str> {
    match &node.value {
        Value::Scalar { text, plain } if scalar_type(text, *plain) == ScalarType::String => {
            Some(text)
        }
        _ => {
            wrong_type(node, path, "a string", report);
            None
        }
    }
}

/// A string that is non-empty, not longer than `max` bytes and free of control
/// characters (a newline in an owner or audience would forge log lines).
fn text<'a>(node: &'a Node, path: &str, max: usize, report: &mut Report) -> Option<&'a str> {
    let value = string(node, path, report)?;
    if value.trim().is_empty() {
        report.at(node.line, format!("`{path}`: must not be empty"));
        return None;
    }
    if value.len() > max {
        report.at(
            node.line,
            format!("`{path}`: {} bytes; at most {max} allowed", value.len()),
        );
        return None;
    }
    if value.chars().any(char::is_control) {
        report.at(node.line, format!("`{path}`: contains a control character"));
        return None;
    }
    Some(value)
}

fn boolean(node: &Node, path: &str, report: &mut Report) -> Option<bool> {
    match &node.value {
        Value::Scalar { text, plain } if scalar_type(text, *plain) == ScalarType::Bool => {
            Some(text.eq_ignore_ascii_case("true"))
        }
        _ => {
            wrong_type(node, path, "`true` or `false`", report);
            None
        }
    }
}

fn integer(node: &Node, path: &str, report: &mut Report) -> Option<i64> {
    match &node.value {
        Value::Scalar { text, plain } if scalar_type(text, *plain) == ScalarType::Integer => {
            let parsed = if let Some(hex) = text.strip_prefix("0x") {
                i64::from_str_radix(hex, 16)
            } else if let Some(oct) = text.strip_prefix("0o") {
                i64::from_str_radix(oct, 8)
            } else {
                text.parse()
            };
            match parsed {
                Ok(n) => Some(n),
                Err(_) => {
                    report.at(
                        node.line,
                        format!("`{path}`: {text} does not fit a 64-bit signed integer"),
                    );
                    None
                }
            }
        }
        _ => {
            wrong_type(node, path, "an integer", report);
            None
        }
    }
}

fn duration(node: &Node, path: &str, report: &mut Report) -> Option<Duration> {
    let text = match &node.value {
        Value::Scalar { text, plain } if scalar_type(text, *plain) == ScalarType::String => text,
        _ => {
            wrong_type(
                node,
                path,
                "a duration with a unit, like `60s` or `5m`",
                report,
            );
            return None;
        }
    };
    match humantime::parse_duration(text) {
        Ok(d) if d < MIN_DURATION => {
            report.at(
                node.line,
                format!("`{path}`: {text} is shorter than the minimum of 1s"),
            );
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            report.at(
                node.line,
                format!("`{path}`: {text:?} is not a duration like `60s` or `5m` ({e})"),
            );
            None
        }
    }
}

fn check_name(
    value: &str,
    first: impl Fn(char) -> bool,
    rest: impl Fn(char) -> bool,
    max: usize,
) -> bool {
    let mut chars = value.chars();
    chars.next().is_some_and(first) && chars.all(rest) && value.len() <= max
}

fn is_template_name(v: &str) -> bool {
    let lower_digit = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    check_name(
        v,
        lower_digit,
        |c| lower_digit(c) || matches!(c, '-' | '_' | '.'),
        63,
    )
}

fn is_parameter_name(v: &str) -> bool {
    check_name(
        v,
        |c| c.is_ascii_lowercase() || c == '_',
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_',
        32,
    )
}

fn is_grant_name(v: &str) -> bool {
    let lower_digit = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    check_name(
        v,
        lower_digit,
        |c| lower_digit(c) || matches!(c, '-' | '_'),
        32,
    )
}

const TEMPLATE_KEYS: &[&str] = &[
    "name",
    "version",
    "owner",
    "description",
    "identities",
    "parameters",
    "lease",
    "grants",
    "tenant",
    "classes",
    "sensitivity",
    "delegation",
    "approval",
];
const PARAMETER_KEYS: &[&str] = &[
    "type",
    "required",
    "pattern",
    "enum",
    "min",
    "max",
    "description",
];
const LEASE_KEYS: &[&str] = &["ttl", "max_ttl", "max_lifetime", "min_renew_interval"];
const GRANT_KEYS: &[&str] = &["name", "kind", "audience", "scopes", "ttl"];
const SCOPE_KEYS: &[&str] = &["scope", "class"];
const DELEGATION_KEYS: &[&str] = &["max_depth", "may_act"];
const APPROVAL_KEYS: &[&str] = &["grants", "approvers", "validity", "while_pending"];
const APPROVER_KEYS: &[&str] = &["identities", "classes"];

/// How long an approval request (and then an approval) lasts when the
/// template does not say (`approval.validity`).
const DEFAULT_APPROVAL_VALIDITY: Duration = Duration::from_secs(15 * 60);

fn template(
    root: &Node,
    file: &Path,
    report: &mut Report,
) -> (Option<(String, usize)>, Option<Template>) {
    let Some(map) = mapping(root, "", TEMPLATE_KEYS, report) else {
        return (None, None);
    };
    let name = map.required("name", report).and_then(|node| {
        let value = string(node, "name", report)?;
        if is_template_name(value) {
            Some((value.to_owned(), node.line))
        } else {
            report.at(
                node.line,
                format!(
                    "`name`: {value:?} is not a valid template name; use 1 to 63 characters \
                     `[a-z0-9][a-z0-9-_.]*`"
                ),
            );
            None
        }
    });
    let version = map
        .required("version", report)
        .and_then(|node| version(node, report));
    let owner = map
        .required("owner", report)
        .and_then(|node| text(node, "owner", MAX_TEXT_BYTES, report));
    let description = match map.optional("description") {
        None => Some(String::new()),
        Some(node) => string(node, "description", report).and_then(|d| {
            if d.len() > MAX_DESCRIPTION_BYTES {
                report.at(
                    node.line,
                    format!("`description`: at most {MAX_DESCRIPTION_BYTES} bytes allowed"),
                );
                None
            } else {
                Some(d.to_owned())
            }
        }),
    };
    let identities = map
        .required("identities", report)
        .and_then(|node| identities(node, report));
    let (tenant, classes) = tenancy(map.optional("tenant"), map.optional("classes"), report);
    let declared = match map.optional("parameters") {
        None => Some(Vec::new()),
        Some(node) => parameters(node, report),
    };
    let lease = map
        .required("lease", report)
        .and_then(|node| lease(node, report));
    let grants = map
        .required("grants", report)
        .and_then(|node| grants(node, declared.as_deref().unwrap_or_default(), report));
    let sensitivity = match map.optional("sensitivity") {
        None => Some(Sensitivity::default()),
        Some(node) => string(node, "sensitivity", report).and_then(|v| {
            let level = Sensitivity::parse(v);
            if level.is_none() {
                report.at(
                    node.line,
                    format!("`sensitivity`: {v:?} is not a sensitivity; use low, medium or high"),
                );
            }
            level
        }),
    };
    let delegation = match map.optional("delegation") {
        None => Some(DelegationPolicy::default()),
        Some(node) => delegation(node, report),
    };
    let approval = match map.optional("approval") {
        None => Some(None),
        Some(node) => approval(node, grants.as_deref(), report).map(Some),
    };
    let declared = declared.map(|list| {
        list.into_iter()
            .map(|d| d.parameter)
            .collect::<Option<Vec<Parameter>>>()
    });

    let template = match (
        &name,
        version,
        owner,
        description,
        identities,
        lease,
        grants,
        declared,
        tenant,
        classes,
        sensitivity,
        delegation,
        approval,
    ) {
        (
            Some((name, _)),
            Some(version),
            Some(owner),
            Some(description),
            Some(identities),
            Some(lease),
            Some(grants),
            Some(Some(parameters)),
            Some(tenant),
            Some(classes),
            Some(sensitivity),
            Some(delegation),
            Some(approval),
        ) => Some(Template {
            name: name.clone(),
            version,
            owner: owner.to_owned(),
            description,
            identities,
            lease,
            grants,
            parameters,
            sensitivity,
            source: file.to_owned(),
            tenant,
            classes,
            delegation,
            approval,
        }),
        _ => None,
    };
    (name, template)
}

/// Most classes a template may list.
const MAX_CLASSES: usize = 64;

/// `tenant` (default [`super::DEFAULT_TENANT`]) and `classes` (default: none
/// listed, so any class of the tenant). Whether the classes exist, and belong
/// to the tenant, is checked against the config when the broker loads the set.
fn tenancy(
    tenant: Option<&Node>,
    classes: Option<&Node>,
    report: &mut Report,
) -> (Option<String>, Option<Vec<String>>) {
    let rule = "use 1 to 63 characters `[a-z0-9][a-z0-9-_.]*`";
    let tenant = match tenant {
        None => Some(super::DEFAULT_TENANT.to_owned()),
        Some(node) => string(node, "tenant", report).and_then(|t| {
            if crate::policy::actors::is_name(t) {
                Some(t.to_owned())
            } else {
                report.at(
                    node.line,
                    format!("`tenant`: {t:?} is not a tenant name; {rule}"),
                );
                None
            }
        }),
    };
    let classes = match classes {
        None => Some(Vec::new()),
        Some(node) => class_names(
            node,
            "classes",
            "leave it out for every class of the tenant",
            report,
        ),
    };
    (tenant, classes)
}

/// A list of 1 to [`MAX_CLASSES`] distinct actor class names at `path`; `why`
/// says what leaving the key out means, for an empty list. Whether the classes
/// exist is checked against the config when the broker loads the set.
fn class_names(node: &Node, path: &str, why: &str, report: &mut Report) -> Option<Vec<String>> {
    let items = sequence(node, path, report)?;
    if items.is_empty() {
        report.at(
            node.line,
            format!("`{path}`: must list at least one actor class; {why}"),
        );
        return None;
    }
    if items.len() > MAX_CLASSES {
        report.at(
            node.line,
            format!(
                "`{path}`: {} entries; at most {MAX_CLASSES} allowed",
                items.len()
            ),
        );
        return None;
    }
    let mut out: Vec<String> = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        match string(item, &item_path, report) {
            Some(c) if !crate::policy::actors::is_name(c) => {
                report.at(
                    item.line,
                    format!(
                        "`{item_path}`: {c:?} is not a class name; use 1 to 63 characters \
                         `[a-z0-9][a-z0-9-_.]*`"
                    ),
                );
                ok = false;
            }
            Some(c) if out.iter().any(|o| o == c) => {
                report.at(item.line, format!("`{item_path}`: {c:?} is listed twice"));
                ok = false;
            }
            Some(c) => out.push(c.to_owned()),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn version(node: &Node, report: &mut Report) -> Option<String> {
    match &node.value {
        Value::Scalar { text: value, plain } => match scalar_type(value, *plain) {
            ScalarType::Integer => integer(node, "version", report).map(|n| n.to_string()),
            ScalarType::String => text(node, "version", MAX_TEXT_BYTES, report).map(str::to_owned),
            _ => {
                wrong_type(node, "version", "a string or an integer", report);
                None
            }
        },
        _ => {
            wrong_type(node, "version", "a string or an integer", report);
            None
        }
    }
}

fn identities(node: &Node, report: &mut Report) -> Option<Vec<IdentityPattern>> {
    patterns(
        node,
        "identities",
        "an empty list would let nobody declare the template",
        report,
    )
}

/// A list of 1 to [`MAX_IDENTITIES`] SPIFFE IDs or patterns at `path`, in the
/// syntax of `identities:`; `why` says why an empty list is refused.
fn patterns(
    node: &Node,
    path: &str,
    why: &str,
    report: &mut Report,
) -> Option<Vec<IdentityPattern>> {
    let items = sequence(node, path, report)?;
    if items.is_empty() {
        report.at(
            node.line,
            format!("`{path}`: must list at least one SPIFFE ID or pattern; {why}"),
        );
        return None;
    }
    if items.len() > MAX_IDENTITIES {
        report.at(
            node.line,
            format!(
                "`{path}`: {} entries; at most {MAX_IDENTITIES} allowed",
                items.len()
            ),
        );
        return None;
    }
    let mut patterns = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let Some(value) = string(item, &item_path, report) else {
            ok = false;
            continue;
        };
        match IdentityPattern::parse(value) {
            Ok(p) => patterns.push(p),
            Err(e) => {
                ok = false;
                report.at(item.line, format!("`{item_path}`: {value:?}: {e}"));
            }
        }
    }
    ok.then_some(patterns)
}

/// `delegation:`: `max_depth` (0 to [`MAX_DELEGATION_DEPTH`], default 2) and
/// `may_act` (optional patterns). Listing who may act while forbidding
/// delegation is refused as the contradiction it is.
fn delegation(node: &Node, report: &mut Report) -> Option<DelegationPolicy> {
    let map = mapping(node, "delegation", DELEGATION_KEYS, report)?;
    let max_depth = match map.optional("max_depth") {
        None => Some(DelegationPolicy::default().max_depth),
        Some(node) => integer(node, "delegation.max_depth", report).and_then(|depth| {
            match u32::try_from(depth) {
                Ok(d) if d <= MAX_DELEGATION_DEPTH => Some(d),
                _ => {
                    report.at(
                        node.line,
                        format!(
                            "`delegation.max_depth`: {depth} is out of range; use 0 (no \
                             delegation) to {MAX_DELEGATION_DEPTH}"
                        ),
                    );
                    None
                }
            }
        }),
    };
    let may_act = match map.optional("may_act") {
        None => Some(Vec::new()),
        Some(node) => patterns(
            node,
            "delegation.may_act",
            "leave it out to let any identity whose actor class may use the template act",
            report,
        ),
    };
    if max_depth == Some(0) && may_act.as_ref().is_some_and(|m| !m.is_empty()) {
        report.at(
            map.key_line("may_act"),
            "`delegation.may_act`: `delegation.max_depth` is 0, which forbids delegation, so \
             nobody may act; leave `may_act` out or allow a depth of 1 or more",
        );
        return None;
    }
    Some(DelegationPolicy {
        max_depth: max_depth?,
        may_act: may_act?,
    })
}

/// `approval:`. `grants` are the template's grant names, when its `grants:`
/// section loaded; without them the names are not checked (that section's
/// problems are already reported and the template fails anyway).
fn approval(
    node: &Node,
    grants: Option<&[GrantSpec]>,
    report: &mut Report,
) -> Option<ApprovalGate> {
    let map = mapping(node, "approval", APPROVAL_KEYS, report)?;
    let gated = map
        .required("grants", report)
        .and_then(|node| gated_grants(node, grants, report));
    let approvers = map
        .required("approvers", report)
        .and_then(|node| approvers(node, report));
    let validity = match map.optional("validity") {
        None => Some(DEFAULT_APPROVAL_VALIDITY),
        Some(node) => duration(node, "approval.validity", report).and_then(|d| {
            if d > MAX_APPROVAL_VALIDITY {
                report.at(
                    node.line,
                    format!(
                        "`approval.validity`: {} is longer than the maximum of {}",
                        humantime::format_duration(d),
                        humantime::format_duration(MAX_APPROVAL_VALIDITY)
                    ),
                );
                None
            } else {
                Some(d)
            }
        }),
    };
    let issue_others = match map.optional("while_pending") {
        None => Some(true),
        Some(node) => match string(node, "approval.while_pending", report)? {
            "issue_others" => Some(true),
            "issue_none" => Some(false),
            other => {
                report.at(
                    node.line,
                    format!(
                        "`approval.while_pending`: {other:?} is not a choice; use issue_others \
                         (the grants that are not gated are issued at once) or issue_none"
                    ),
                );
                None
            }
        },
    };
    let (approvers, approver_classes) = approvers?;
    Some(ApprovalGate {
        grants: gated?,
        approvers,
        approver_classes,
        validity: validity?,
        issue_others: issue_others?,
    })
}

/// `approval.grants`: 1 to [`MAX_GRANTS`] distinct names of grants of the template.
fn gated_grants(
    node: &Node,
    grants: Option<&[GrantSpec]>,
    report: &mut Report,
) -> Option<Vec<String>> {
    let path = "approval.grants";
    let items = sequence(node, path, report)?;
    if items.is_empty() {
        report.at(
            node.line,
            format!(
                "`{path}`: must list at least one grant; leave `approval` out when no grant \
                 needs approval"
            ),
        );
        return None;
    }
    if items.len() > MAX_GRANTS {
        report.at(
            node.line,
            format!(
                "`{path}`: {} entries; at most {MAX_GRANTS} allowed",
                items.len()
            ),
        );
        return None;
    }
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let Some(name) = string(item, &item_path, report) else {
            ok = false;
            continue;
        };
        if let Some(grants) = grants
            && !grants.iter().any(|g| g.name == name)
        {
            let known: Vec<&str> = grants.iter().map(|g| g.name.as_str()).collect();
            report.at(
                item.line,
                format!(
                    "`{item_path}`: {name:?} is not a grant of this template; grants: {}",
                    known.join(", ")
                ),
            );
            ok = false;
        } else if out.iter().any(|o| o == name) {
            report.at(
                item.line,
                format!("`{item_path}`: {name:?} is listed twice"),
            );
            ok = false;
        } else {
            out.push(name.to_owned());
        }
    }
    ok.then_some(out)
}

/// `approval.approvers`: `identities` (patterns) and `classes` (actor class
/// names), at least one of them.
fn approvers(node: &Node, report: &mut Report) -> Option<(Vec<IdentityPattern>, Vec<String>)> {
    let map = mapping(node, "approval.approvers", APPROVER_KEYS, report)?;
    let identities = map.optional("identities").map(|node| {
        patterns(
            node,
            "approval.approvers.identities",
            "leave it out when `classes` names the approvers",
            report,
        )
    });
    let classes = map.optional("classes").map(|node| {
        class_names(
            node,
            "approval.approvers.classes",
            "leave it out when `identities` names the approvers",
            report,
        )
    });
    if identities.is_none() && classes.is_none() {
        report.at(
            map.line,
            "`approval.approvers`: names nobody; list approver SPIFFE ID patterns under \
             `identities`, actor classes under `classes`, or both",
        );
        return None;
    }
    Some((
        identities.unwrap_or(Some(Vec::new()))?,
        classes.unwrap_or(Some(Vec::new()))?,
    ))
}

/// What the scope checks need to know about a declared parameter, even a broken one.
struct Declared {
    name: String,
    /// `None` when the `required` key itself was bad.
    required: Option<bool>,
    /// Enum values and their lines, to refuse whitespace once scope use is known.
    enum_values: Vec<(String, usize)>,
    /// The parameter, when it was entirely valid.
    parameter: Option<Parameter>,
}

fn parameters(node: &Node, report: &mut Report) -> Option<Vec<Declared>> {
    let Value::Map(entries) = &node.value else {
        wrong_type(node, "parameters", "a mapping of parameter names", report);
        return None;
    };
    if entries.len() > MAX_PARAMETERS {
        report.at(
            node.line,
            format!(
                "`parameters`: {} declared; at most {MAX_PARAMETERS} allowed",
                entries.len()
            ),
        );
        return None;
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut declared = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let path = format!("parameters.{}", key.text);
        if let Some(first) = seen.get(key.text.as_str()) {
            report.at(
                key.line,
                format!("`{path}`: duplicate parameter (first at line {first})"),
            );
            continue;
        }
        seen.insert(&key.text, key.line);
        let name_ok = is_parameter_name(&key.text);
        if !name_ok {
            report.at(
                key.line,
                format!(
                    "`{path}`: {:?} is not a valid parameter name; use 1 to 32 characters \
                     `[a-z_][a-z0-9_]*`",
                    key.text
                ),
            );
        }
        let mut d = parameter(&key.text, value, &path, report);
        if !name_ok {
            d.parameter = None;
        }
        declared.push(d);
    }
    Some(declared)
}

fn parameter(name: &str, node: &Node, path: &str, report: &mut Report) -> Declared {
    let mut declared = Declared {
        name: name.to_owned(),
        required: None,
        enum_values: Vec::new(),
        parameter: None,
    };
    let Some(map) = mapping(node, path, PARAMETER_KEYS, report) else {
        return declared;
    };
    let kind = map.required("type", report).and_then(|node| {
        let path = map.child("type");
        match string(node, &path, report)? {
            "string" => Some(ParameterKind::String),
            "integer" => Some(ParameterKind::Integer),
            "boolean" => Some(ParameterKind::Boolean),
            other => {
                report.at(
                    node.line,
                    format!("`{path}`: {other:?} is not a type; use string, integer or boolean"),
                );
                None
            }
        }
    });
    // Optional parameters must be marked as such: a missing `required` means required,
    // so an omission can only make a template stricter.
    declared.required = match map.optional("required") {
        None => Some(true),
        Some(node) => boolean(node, &map.child("required"), report),
    };
    let description = match map.optional("description") {
        None => Some(String::new()),
        Some(node) => string(node, &map.child("description"), report).map(str::to_owned),
    };

    let constraint = match kind {
        None => None,
        Some(kind) => {
            not_for_kind(&map, kind, report);
            match kind {
                ParameterKind::String => string_constraint(&map, &mut declared, report),
                ParameterKind::Integer => integer_constraint(&map, report),
                ParameterKind::Boolean => Some(ParameterConstraint::None),
            }
        }
    };
    if let (Some(kind), Some(required), Some(constraint), Some(description)) =
        (kind, declared.required, constraint, description)
    {
        declared.parameter = Some(Parameter {
            name: name.to_owned(),
            kind,
            required,
            constraint,
            description,
        });
    }
    declared
}

/// Reports constraint keys that do not apply to `kind`.
fn not_for_kind(map: &Mapping<'_>, kind: ParameterKind, report: &mut Report) {
    let applies: &[&str] = match kind {
        ParameterKind::String => &["pattern", "enum"],
        ParameterKind::Integer => &["min", "max"],
        ParameterKind::Boolean => &[],
    };
    for key in ["pattern", "enum", "min", "max"] {
        if map.optional(key).is_some() && !applies.contains(&key) {
            let for_kind = if matches!(key, "pattern" | "enum") {
                "string"
            } else {
                "integer"
            };
            report.at(
                map.key_line(key),
                format!(
                    "`{}`: applies only to {for_kind} parameters, not {}",
                    map.child(key),
                    kind.as_str()
                ),
            );
        }
    }
}

fn string_constraint(
    map: &Mapping<'_>,
    declared: &mut Declared,
    report: &mut Report,
) -> Option<ParameterConstraint> {
    match (map.optional("pattern"), map.optional("enum")) {
        (None, None) => {
            report.at(
                map.line,
                format!(
                    "`{}`: a string parameter needs a `pattern` or an `enum`; an unconstrained \
                     value substituted into a scope could widen it (e.g. `*` or `a b`)",
                    map.path
                ),
            );
            None
        }
        (Some(_), Some(_)) => {
            report.at(
                map.key_line("enum"),
                format!("`{}`: give a `pattern` or an `enum`, not both", map.path),
            );
            None
        }
        (Some(node), None) => pattern(node, &map.child("pattern"), report),
        (None, Some(node)) => enumeration(node, &map.child("enum"), declared, report),
    }
}

fn pattern(node: &Node, path: &str, report: &mut Report) -> Option<ParameterConstraint> {
    let source = string(node, path, report)?;
    if source.is_empty() {
        report.at(node.line, format!("`{path}`: must not be empty"));
        return None;
    }
    if source.len() > MAX_PATTERN_BYTES {
        report.at(
            node.line,
            format!(
                "`{path}`: {} bytes; at most {MAX_PATTERN_BYTES} allowed",
                source.len()
            ),
        );
        return None;
    }
    match compile_anchored(source) {
        Ok(regex) => Some(ParameterConstraint::Pattern {
            source: source.to_owned(),
            regex,
        }),
        Err(e) => {
            report.at(node.line, format!("`{path}`: does not compile: {e}"));
            None
        }
    }
}

/// Compiles `source` so it must match a whole value: a pattern `[a-z]+` written
/// unanchored would otherwise accept `ok; anything`.
fn compile_anchored(source: &str) -> Result<Regex, String> {
    RegexBuilder::new(&format!("^(?:{source})$"))
        .size_limit(MAX_PATTERN_COMPILED_BYTES)
        .build()
        .map_err(|e| {
            // regex's message spans several lines with a caret diagram; keep the line
            // that says what is wrong so the `file:line: message` output stays one line.
            let full = e.to_string();
            full.lines()
                .find_map(|l| l.strip_prefix("error: "))
                .map_or_else(
                    || full.split_whitespace().collect::<Vec<_>>().join(" "),
                    str::to_owned,
                )
        })
}

fn enumeration(
    node: &Node,
    path: &str,
    declared: &mut Declared,
    report: &mut Report,
) -> Option<ParameterConstraint> {
    let items = sequence(node, path, report)?;
    if items.is_empty() {
        report.at(node.line, format!("`{path}`: must list at least one value"));
        return None;
    }
    if items.len() > MAX_ENUM_VALUES {
        report.at(
            node.line,
            format!(
                "`{path}`: {} values; at most {MAX_ENUM_VALUES} allowed",
                items.len()
            ),
        );
        return None;
    }
    let mut values = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        match text(item, &item_path, MAX_VALUE_BYTES, report) {
            Some(value) if value.is_empty() || value != value.trim() => {
                ok = false;
                report.at(
                    item.line,
                    format!("`{item_path}`: must not start or end with whitespace"),
                );
            }
            Some(value) if values.iter().any(|v| v == value) => {
                ok = false;
                report.at(
                    item.line,
                    format!("`{item_path}`: duplicate value {value:?}"),
                );
            }
            Some(value) => {
                values.push(value.to_owned());
                declared.enum_values.push((value.to_owned(), item.line));
            }
            None => ok = false,
        }
    }
    ok.then_some(ParameterConstraint::Enum(values))
}

fn integer_constraint(map: &Mapping<'_>, report: &mut Report) -> Option<ParameterConstraint> {
    let read = |key: &str, report: &mut Report| match map.optional(key) {
        None => Some(None),
        Some(node) => integer(node, &map.child(key), report).map(Some),
    };
    let min = read("min", report);
    let max = read("max", report);
    let (min, max) = (min?, max?);
    if let (Some(lo), Some(hi)) = (min, max)
        && lo > hi
    {
        report.at(
            map.key_line("max"),
            format!("`{}`: max {hi} is below min {lo}", map.path),
        );
        return None;
    }
    Some(match (min, max) {
        (None, None) => ParameterConstraint::None,
        _ => ParameterConstraint::Range { min, max },
    })
}

fn lease(node: &Node, report: &mut Report) -> Option<LeasePolicy> {
    let map = mapping(node, "lease", LEASE_KEYS, report)?;
    let read = |key: &str, report: &mut Report| {
        map.required(key, report)
            .and_then(|node| duration(node, &map.child(key), report))
    };
    let ttl = read("ttl", report);
    let max_ttl = read("max_ttl", report);
    let max_lifetime = read("max_lifetime", report);
    // `0s` turns the limit off explicitly; any other value is a normal duration.
    let min_renew = map.optional("min_renew_interval").map(|node| {
        let zero = matches!(&node.value, Value::Scalar { text, .. } if text == "0s" || text == "0");
        if zero {
            Some(Duration::ZERO)
        } else {
            duration(node, "lease.min_renew_interval", report)
        }
    });
    let (ttl, max_ttl, max_lifetime) = (ttl?, max_ttl?, max_lifetime?);
    let mut ok = true;
    // A renewal loop must not be able to mint credentials as fast as it likes;
    // by default a lease may be renewed every quarter TTL (at most every second).
    let min_renew_interval = match min_renew {
        None => (ttl / 4).min(Duration::from_secs(1)),
        Some(None) => return None,
        Some(Some(d)) if d > ttl / 2 => {
            report.at(
                map.key_line("min_renew_interval"),
                format!(
                    "`lease.min_renew_interval`: {} is more than half of `lease.ttl` {}; agents renew at about half the TTL",
                    humantime::format_duration(d),
                    humantime::format_duration(ttl)
                ),
            );
            return None;
        }
        Some(Some(d)) => d,
    };
    if ttl > max_ttl {
        ok = false;
        report.at(
            map.key_line("ttl"),
            format!(
                "`lease.ttl`: {} exceeds `lease.max_ttl` {}",
                humantime::format_duration(ttl),
                humantime::format_duration(max_ttl)
            ),
        );
    }
    if max_ttl > max_lifetime {
        ok = false;
        report.at(
            map.key_line("max_ttl"),
            format!(
                "`lease.max_ttl`: {} exceeds `lease.max_lifetime` {}",
                humantime::format_duration(max_ttl),
                humantime::format_duration(max_lifetime)
            ),
        );
    }
    ok.then_some(LeasePolicy {
        ttl,
        max_ttl,
        max_lifetime,
        min_renew_interval,
    })
}

fn grants(node: &Node, declared: &[Declared], report: &mut Report) -> Option<Vec<GrantSpec>> {
    let items = sequence(node, "grants", report)?;
    if items.is_empty() {
        report.at(
            node.line,
            "`grants`: must list at least one grant; a template that yields no credential is a mistake",
        );
        return None;
    }
    if items.len() > MAX_GRANTS {
        report.at(
            node.line,
            format!(
                "`grants`: {} grants; at most {MAX_GRANTS} allowed",
                items.len()
            ),
        );
        return None;
    }
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut in_scopes: BTreeSet<String> = BTreeSet::new();
    let mut specs = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let path = format!("grants[{i}]");
        match grant(item, &path, declared, &mut names, &mut in_scopes, report) {
            Some(spec) => specs.push(spec),
            None => ok = false,
        }
    }
    // Enum values are only checked for whitespace once it is known which parameters
    // end up inside scopes; elsewhere a value like "eu west" is harmless.
    for d in declared.iter().filter(|d| in_scopes.contains(&d.name)) {
        for (value, line) in &d.enum_values {
            if value.chars().any(char::is_whitespace) {
                ok = false;
                report.at(
                    *line,
                    format!(
                        "`parameters.{}.enum`: {value:?} contains whitespace, which is not \
                         allowed in a value substituted into a scope",
                        d.name
                    ),
                );
            }
        }
    }
    ok.then_some(specs)
}

fn grant(
    node: &Node,
    path: &str,
    declared: &[Declared],
    names: &mut BTreeMap<String, usize>,
    in_scopes: &mut BTreeSet<String>,
    report: &mut Report,
) -> Option<GrantSpec> {
    let map = mapping(node, path, GRANT_KEYS, report)?;
    let name = map.required("name", report).and_then(|node| {
        let name_path = map.child("name");
        let value = string(node, &name_path, report)?;
        if !is_grant_name(value) {
            report.at(
                node.line,
                format!(
                    "`{name_path}`: {value:?} is not a valid grant name; use 1 to 32 characters \
                     `[a-z0-9][a-z0-9_-]*`"
                ),
            );
            return None;
        }
        if let Some(first) = names.get(value) {
            report.at(
                node.line,
                format!("`{name_path}`: duplicate grant name {value:?} (first at line {first})"),
            );
            return None;
        }
        names.insert(value.to_owned(), node.line);
        Some(value.to_owned())
    });
    let kind = map.required("kind", report).and_then(|node| {
        let kind_path = map.child("kind");
        match string(node, &kind_path, report)? {
            "jwt" => Some(CredentialKind::Jwt),
            "opaque" => Some(CredentialKind::Opaque),
            other => {
                report.at(
                    node.line,
                    format!("`{kind_path}`: {other:?} is not a credential kind; use jwt or opaque"),
                );
                None
            }
        }
    });
    let audience = map.required("audience", report).and_then(|node| {
        let audience_path = map.child("audience");
        let value = text(node, &audience_path, MAX_TEXT_BYTES, report)?;
        if value.chars().any(char::is_whitespace) {
            report.at(
                node.line,
                format!("`{audience_path}`: {value:?} must not contain whitespace"),
            );
            return None;
        }
        Some(value.to_owned())
    });
    let scopes = map
        .required("scopes", report)
        .and_then(|node| scopes(node, &map.child("scopes"), declared, in_scopes, report));
    let ttl = map
        .required("ttl", report)
        .and_then(|node| duration(node, &map.child("ttl"), report));
    let (scopes, scope_classes) = scopes?.into_iter().unzip();
    Some(GrantSpec {
        name: name?,
        kind: kind?,
        audience: audience?,
        scopes,
        scope_classes,
        ttl: ttl?,
    })
}

fn scopes(
    node: &Node,
    path: &str,
    declared: &[Declared],
    in_scopes: &mut BTreeSet<String>,
    report: &mut Report,
) -> Option<Vec<(String, ScopeClass)>> {
    let items = sequence(node, path, report)?;
    if items.is_empty() {
        report.at(node.line, format!("`{path}`: must list at least one scope"));
        return None;
    }
    if items.len() > MAX_SCOPES_PER_GRANT {
        report.at(
            node.line,
            format!(
                "`{path}`: {} scopes; at most {MAX_SCOPES_PER_GRANT} allowed",
                items.len()
            ),
        );
        return None;
    }
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        match classified_scope(item, &item_path, declared, in_scopes, report) {
            Some(s) => out.push(s),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// One `{scope: "...", class: read|write|destructive}` entry. A plain string is
/// refused: every scope declares its class, so `destructive` is never inferred and a
/// forgotten class never passes as `read`.
fn classified_scope(
    node: &Node,
    path: &str,
    declared: &[Declared],
    in_scopes: &mut BTreeSet<String>,
    report: &mut Report,
) -> Option<(String, ScopeClass)> {
    if let Value::Scalar { text, .. } = &node.value {
        report.at(
            node.line,
            format!(
                "`{path}`: scope {text:?} declares no class; write \
                 `{{scope: {text:?}, class: read}}` (class: read, write or destructive)"
            ),
        );
        return None;
    }
    let map = mapping(node, path, SCOPE_KEYS, report)?;
    let scope_path = map.child("scope");
    let value = map
        .required("scope", report)
        .and_then(|n| scope(n, &scope_path, declared, in_scopes, report));
    let class = map.required("class", report).and_then(|n| {
        let class_path = map.child("class");
        let v = string(n, &class_path, report)?;
        let class = ScopeClass::parse(v);
        if class.is_none() {
            report.at(
                n.line,
                format!(
                    "`{class_path}`: {v:?} is not a scope class; use read, write or destructive"
                ),
            );
        }
        class
    });
    Some((value?, class?))
}

fn scope(
    node: &Node,
    path: &str,
    declared: &[Declared],
    in_scopes: &mut BTreeSet<String>,
    report: &mut Report,
) -> Option<String> {
    let value = text(node, path, MAX_TEXT_BYTES, report)?;
    if value.chars().any(char::is_whitespace) {
        report.at(
            node.line,
            format!("`{path}`: {value:?} must not contain whitespace"),
        );
        return None;
    }
    let pieces = match split_scope(value) {
        Ok(pieces) => pieces,
        Err(why) => {
            report.at(node.line, format!("`{path}`: {value:?} {why}"));
            return None;
        }
    };
    let mut ok = true;
    for piece in pieces {
        let ScopePiece::Placeholder(name) = piece else {
            continue;
        };
        in_scopes.insert(name.to_owned());
        match declared.iter().find(|d| d.name == name) {
            None => {
                ok = false;
                let known: Vec<&str> = declared.iter().map(|d| d.name.as_str()).collect();
                let known = if known.is_empty() {
                    "none are declared".to_owned()
                } else {
                    format!("declared: {}", known.join(", "))
                };
                report.at(
                    node.line,
                    format!(
                        "`{path}`: placeholder `{{{name}}}` names no declared parameter ({known})"
                    ),
                );
            }
            Some(d) if d.required == Some(false) => {
                ok = false;
                report.at(
                    node.line,
                    format!(
                        "`{path}`: placeholder `{{{name}}}` uses optional parameter `{name}`; only \
                         required parameters may appear in scopes, so a scope never renders \
                         without its value (set `required: true` or drop the placeholder)"
                    ),
                );
            }
            Some(_) => {}
        }
    }
    ok.then(|| value.to_owned())
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should panic on an unexpected value"
)]
mod tests {
    use super::*;

    #[test]
    fn name_grammars() {
        let (a32, a33, a63, a64) = (
            "a".repeat(32),
            "a".repeat(33),
            "a".repeat(63),
            "a".repeat(64),
        );
        // (value, template name?, parameter name?, grant name?)
        let cases: &[(&str, bool, bool, bool)] = &[
            ("a", true, true, true),
            ("demo", true, true, true),
            ("0day", true, false, true),
            ("_x", false, true, false),
            ("a-b", true, false, true),
            ("a_b", true, true, true),
            ("a.b", true, false, false),
            ("A", false, false, false),
            ("", false, false, false),
            ("-a", false, false, false),
            ("a b", false, false, false),
            ("é", false, false, false),
            (&a32, true, true, true),
            (&a33, true, false, false),
            (&a63, true, false, false),
            (&a64, false, false, false),
        ];
        for (value, template, parameter, grant) in cases {
            assert_eq!(is_template_name(value), *template, "template {value:?}");
            assert_eq!(is_parameter_name(value), *parameter, "parameter {value:?}");
            assert_eq!(is_grant_name(value), *grant, "grant {value:?}");
        }
    }

    #[test]
    fn anchored_compilation() {
        let cases: &[(&str, &str, bool)] = &[
            ("[a-z]+", "abc", true),
            ("[a-z]+", "abc1", false),
            ("a|b", "a", true),
            ("a|b", "ab", false),
            ("(x)", "x", true),
            ("", "", true),
            ("a", "\na", false),
        ];
        for (pattern, value, want) in cases {
            let regex = compile_anchored(pattern).unwrap();
            assert_eq!(regex.is_match(value), *want, "{pattern:?} on {value:?}");
        }
        for bad in ["(", "[a-", "a{2,1}", "(?P<x>a)(?P<x>b)"] {
            let message = compile_anchored(bad).unwrap_err();
            assert!(!message.contains('\n'), "one line: {message:?}");
            assert!(!message.is_empty());
        }
    }

    #[test]
    fn parse_never_panics_on_mangled_input() {
        // A poor man's fuzz pass: every prefix and every single-byte corruption of a
        // valid template either loads or yields issues, each with a plausible line.
        let base = include_str!("../../../examples/templates/github-pr-review.yaml");
        let lines = base.lines().count() + 1;
        let check = |text: &str| {
            let parsed = parse_template(Path::new("f.yaml"), text);
            if let Err(issues) = parsed.result {
                assert!(!issues.is_empty());
                for issue in issues {
                    assert!(
                        (1..=lines).contains(&issue.line),
                        "{text:?}: line {} out of range: {}",
                        issue.line,
                        issue.message
                    );
                    assert!(!issue.message.contains('\n'), "{}", issue.message);
                }
            }
        };
        for end in (0..base.len()).filter(|&i| base.is_char_boundary(i)) {
            check(&base[..end]);
        }
        for (i, _) in base.char_indices().step_by(3) {
            for replacement in [":", "[", "{", "\"", "-", " ", "\t", "&", "*", "!", "#"] {
                let mut mangled = base.to_owned();
                mangled.replace_range(i..i + 1, replacement);
                check(&mangled);
            }
        }
    }
}
