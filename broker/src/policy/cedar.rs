//! Cedar policies at request time: may this identity begin this task, with these
//! grants and scopes, now?
//!
//! Layout: [`SCHEMA`] (the shipped schema, `leash.cedarschema`), [`load_dir`]
//! (parse and validate every `*.cedar` file of a directory, with file:line:col for
//! every problem), [`Policies`] (one validated set, evaluated with
//! [`Policies::evaluate`]), [`PolicyCatalog`] (the live set, reloaded like the
//! templates) and [`Request`] (what one BeginTask is decided on).
//!
//! Security defaults:
//! - No policy file at all: policies are off and the template rules alone decide
//!   (the broker's behaviour before policies existed).
//! - At least one policy: **default deny**; a request needs a `permit` that applies
//!   and no `forbid` that applies (`forbid` wins, Cedar semantics).
//! - A policy that fails to evaluate denies the request (it could have been a
//!   `forbid`); a denial always names the policy id that caused it.
//! - Policies are parsed and validated against the schema once per load; a request
//!   only builds its few entities and its context.
//! - A bad edit never replaces a good set: the catalog keeps the last good one.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex, PoisonError},
};

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Effect, Entities, Entity, EntityUid, Policy,
    PolicyId, PolicySet, RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;

use crate::{
    identity::SpiffeId,
    templates::{GrantSpec, ScopeClass, Template},
};

/// The Cedar schema (human-readable syntax) that every policy is validated against.
pub const SCHEMA: &str = include_str!("leash.cedarschema");

/// The one action policies decide.
pub const BEGIN_TASK: &str = r#"Leash::Action::"BeginTask""#;

/// Largest policy file read; a bigger one is an error.
pub const MAX_POLICY_FILE_BYTES: u64 = 256 * 1024;

/// Most `*.cedar` files in a policy directory.
pub const MAX_POLICY_FILES: usize = 256;

/// One problem in a policy directory, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyIssue {
    /// The file (or the directory, for a problem with the directory itself).
    pub file: PathBuf,
    /// 1-based line; 0 when the problem has no position (an unreadable file).
    pub line: usize,
    /// 1-based column; 0 when unknown.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PolicyIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (0, _) => write!(f, "{}: {}", self.file.display(), self.message),
            (l, 0) => write!(f, "{}:{l}: {}", self.file.display(), self.message),
            (l, c) => write!(f, "{}:{l}:{c}: {}", self.file.display(), self.message),
        }
    }
}

/// Every problem found in a policy directory, one per line when displayed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct PolicyErrors(pub Vec<PolicyIssue>);

/// How the caller proved its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// Mutual TLS with an X509-SVID.
    Mtls,
    /// A JWT-SVID bearer token (behind a TLS-terminating proxy).
    JwtSvid,
}

impl Connection {
    /// The spelling policies see in `context.connection`: `mtls` or `jwt_svid`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mtls => "mtls",
            Self::JwtSvid => "jwt_svid",
        }
    }
}

/// What one BeginTask is decided on: everything in the request context.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The verified caller.
    pub identity: &'a SpiffeId,
    /// How it authenticated.
    pub connection: Connection,
    /// The caller's actor class.
    pub class: String,
    /// The caller's tenant.
    pub tenant: String,
    /// The template, as the template decision saw it.
    pub template: &'a Template,
    /// Validated parameter values.
    pub parameters: &'a BTreeMap<String, String>,
    /// Each grant with its rendered scopes and their classes.
    pub grants: &'a [(GrantSpec, Vec<(String, ScopeClass)>)],
    /// The lease TTL the task would get, in milliseconds.
    pub ttl_ms: u64,
    /// 0 for a task declared directly.
    pub delegation_depth: u32,
    /// The delegation chain, subagent first (empty for a task declared directly).
    pub actors: &'a [String],
    /// Now, Unix milliseconds (the broker's injectable clock).
    pub now_ms: u64,
}

/// A policy's origin, for messages and `leash policy explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOrigin {
    /// The file it was read from.
    pub file: PathBuf,
    /// Its first line.
    pub line: usize,
    /// `permit` or `forbid`.
    pub effect: &'static str,
    /// The `@reason("...")` annotation, if any: shown to a denied caller.
    pub reason: Option<String>,
}

/// The outcome of evaluating one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the request may go on.
    pub allowed: bool,
    /// The policies that decided: the permits that applied for an allow, the
    /// forbids that applied (or failed to evaluate) for a deny; empty for a deny
    /// because no permit applied.
    pub determining: Vec<String>,
    /// Policies that failed to evaluate, with why (each denies the request).
    pub errors: Vec<(String, String)>,
}

/// Why a policy evaluation could not even be run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvaluationError {
    /// The request did not fit the schema (a bug: the broker builds it).
    #[error("policy request does not fit the schema: {0}")]
    Request(String),
}

/// One validated policy set with its schema. Cheap to share; immutable.
#[derive(Debug)]
pub struct Policies {
    schema: Arc<Schema>,
    set: PolicySet,
    origins: BTreeMap<String, PolicyOrigin>,
    time_zone: jiff::tz::TimeZone,
    zone_name: String,
    action: EntityUid,
}

fn uid(kind: &str, id: &str) -> EntityUid {
    // Entity ids may hold any text; the type names are ours and fixed.
    EntityUid::from_type_name_and_id(
        #[expect(clippy::expect_used, reason = "type names are literals of this module")]
        cedar_policy::EntityTypeName::from_str(kind).expect("entity type name"),
        cedar_policy::EntityId::new(id),
    )
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

fn long(v: u64) -> RestrictedExpression {
    RestrictedExpression::new_long(i64::try_from(v).unwrap_or(i64::MAX))
}

fn set_of(items: impl IntoIterator<Item = RestrictedExpression>) -> RestrictedExpression {
    RestrictedExpression::new_set(items)
}

fn record(
    fields: impl IntoIterator<Item = (&'static str, RestrictedExpression)>,
) -> Result<RestrictedExpression, EvaluationError> {
    RestrictedExpression::new_record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)))
        .map_err(|e| EvaluationError::Request(e.to_string()))
}

impl Policies {
    /// How many policies the set holds.
    pub fn len(&self) -> usize {
        self.origins.len()
    }

    /// Whether the set holds no policy (then policies are off).
    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// Where the policy `id` came from.
    pub fn origin(&self, id: &str) -> Option<&PolicyOrigin> {
        self.origins.get(id)
    }

    /// The policy ids, in order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.origins.keys().map(String::as_str)
    }

    /// The IANA name of the zone `context.time` is computed in.
    pub fn time_zone(&self) -> &str {
        &self.zone_name
    }

    /// Decides `req`: default deny, `forbid` wins, an evaluation error denies.
    /// An empty set allows everything (policies are off).
    ///
    /// # Errors
    /// [`EvaluationError::Request`] if the request does not fit the schema (a bug).
    pub fn evaluate(&self, req: &Request<'_>) -> Result<Verdict, EvaluationError> {
        if self.is_empty() {
            return Ok(Verdict {
                allowed: true,
                determining: Vec::new(),
                errors: Vec::new(),
            });
        }
        let (entities, principal, resource) = self.entities(req)?;
        let context = self.context(req)?;
        let action = self.action.clone();
        let request =
            cedar_policy::Request::new(principal, action, resource, context, Some(&self.schema))
                .map_err(|e| EvaluationError::Request(e.to_string()))?;
        let response = Authorizer::new().is_authorized(&request, &self.set, &entities);
        let mut determining: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        determining.sort();
        let mut errors: Vec<(String, String)> = response
            .diagnostics()
            .errors()
            .map(|e| match e {
                cedar_policy::AuthorizationError::PolicyEvaluationError(e) => {
                    (e.policy_id().to_string(), e.to_string())
                }
            })
            .collect();
        errors.sort();
        let allowed = response.decision() == CedarDecision::Allow && errors.is_empty();
        if !errors.is_empty() {
            // Fail closed: the policy that failed may have been a forbid.
            determining = errors.iter().map(|(id, _)| id.clone()).collect();
        }
        Ok(Verdict {
            allowed,
            determining,
            errors,
        })
    }

    /// Every policy whose scope and conditions match `req`, permits and forbids
    /// alike, each judged on its own (for `leash policy explain`; the broker
    /// itself only asks [`Policies::evaluate`]).
    ///
    /// # Errors
    /// [`EvaluationError::Request`] if the request does not fit the schema.
    pub fn applied(&self, req: &Request<'_>) -> Result<Vec<String>, EvaluationError> {
        if self.is_empty() {
            return Ok(Vec::new());
        }
        let (entities, principal, resource) = self.entities(req)?;
        let context = self.context(req)?;
        let action = self.action.clone();
        let request =
            cedar_policy::Request::new(principal, action, resource, context, Some(&self.schema))
                .map_err(|e| EvaluationError::Request(e.to_string()))?;
        let authorizer = Authorizer::new();
        let mut applied = Vec::new();
        for policy in self.set.policies() {
            let one = PolicySet::from_policies([policy.clone()])
                .map_err(|e| EvaluationError::Request(e.to_string()))?;
            let response = authorizer.is_authorized(&request, &one, &entities);
            if response.diagnostics().reason().next().is_some() {
                applied.push(policy.id().to_string());
            }
        }
        applied.sort();
        Ok(applied)
    }

    /// The message a denied caller (and the audit trail) gets: the deciding policy
    /// ids, each with its `@reason` when it has one.
    pub fn denial_message(&self, verdict: &Verdict) -> String {
        if verdict.determining.is_empty() {
            return "denied by policy: no policy permits this request (default deny)".into();
        }
        let named: Vec<String> = verdict
            .determining
            .iter()
            .map(
                |id| match self.origins.get(id).and_then(|o| o.reason.as_deref()) {
                    Some(reason) => format!("{id:?} ({reason})"),
                    None => format!("{id:?}"),
                },
            )
            .collect();
        let failed = if verdict.errors.is_empty() {
            ""
        } else {
            " (failed to evaluate)"
        };
        format!("denied by policy {}{failed}", named.join(", "))
    }

    fn entities(
        &self,
        req: &Request<'_>,
    ) -> Result<(Entities, EntityUid, EntityUid), EvaluationError> {
        let bad = |e: &dyn fmt::Display| EvaluationError::Request(e.to_string());
        let tenant = uid("Leash::Tenant", &req.tenant);
        let class = uid("Leash::Class", &req.class);
        let principal = uid("Leash::Identity", req.identity.as_str());
        let resource = uid("Leash::Template", &req.template.name);
        let mut list = vec![
            Entity::new_no_attrs(tenant.clone(), HashSet::new()),
            Entity::new(
                class.clone(),
                HashMap::from([("name".to_owned(), string(&req.class))]),
                HashSet::from([tenant]),
            )
            .map_err(|e| bad(&e))?,
            Entity::new(
                principal.clone(),
                HashMap::from([
                    ("spiffe_id".to_owned(), string(req.identity.as_str())),
                    (
                        "trust_domain".to_owned(),
                        string(req.identity.trust_domain()),
                    ),
                    ("path".to_owned(), string(req.identity.path())),
                ]),
                HashSet::from([class]),
            )
            .map_err(|e| bad(&e))?,
            Entity::new(
                resource.clone(),
                HashMap::from([
                    ("name".to_owned(), string(&req.template.name)),
                    ("version".to_owned(), string(&req.template.version)),
                    ("owner".to_owned(), string(&req.template.owner)),
                    (
                        "sensitivity".to_owned(),
                        string(req.template.sensitivity.as_str()),
                    ),
                ]),
                HashSet::new(),
            )
            .map_err(|e| bad(&e))?,
        ];
        for (grant, scopes) in req.grants {
            let classes: BTreeSet<&str> = scopes.iter().map(|(_, c)| c.as_str()).collect();
            list.push(
                Entity::new(
                    uid(
                        "Leash::Grant",
                        &format!("{}/{}", req.template.name, grant.name),
                    ),
                    HashMap::from([
                        ("name".to_owned(), string(&grant.name)),
                        ("audience".to_owned(), string(&grant.audience)),
                        ("kind".to_owned(), string(grant.kind.as_str())),
                        (
                            "scope_classes".to_owned(),
                            set_of(classes.into_iter().map(string)),
                        ),
                    ]),
                    HashSet::from([resource.clone()]),
                )
                .map_err(|e| bad(&e))?,
            );
        }
        // The action entity, which a schema would add; the entities themselves are
        // built here from typed values, so they are not re-checked against the
        // schema on every request (the request and its context are, below).
        list.push(Entity::new_no_attrs(self.action.clone(), HashSet::new()));
        let entities = Entities::from_entities(list, None).map_err(|e| bad(&e))?;
        Ok((entities, principal, resource))
    }

    fn context(&self, req: &Request<'_>) -> Result<Context, EvaluationError> {
        let mut parameters = Vec::with_capacity(req.parameters.len());
        for (name, value) in req.parameters {
            parameters.push(record([("name", string(name)), ("value", string(value))])?);
        }
        let mut scopes = Vec::new();
        let mut classes = BTreeSet::new();
        for (grant, rendered) in req.grants {
            for (scope, class) in rendered {
                classes.insert(class.as_str());
                scopes.push(record([
                    ("grant", string(&grant.name)),
                    ("scope", string(scope)),
                    ("class", string(class.as_str())),
                ])?);
            }
        }
        let time = self.local_time(req.now_ms)?;
        let pairs: Vec<(String, RestrictedExpression)> = vec![
            ("identity".into(), string(req.identity.as_str())),
            ("class".into(), string(&req.class)),
            ("tenant".into(), string(&req.tenant)),
            ("template".into(), string(&req.template.name)),
            ("parameters".into(), set_of(parameters)),
            (
                "grants".into(),
                set_of(req.grants.iter().map(|(g, _)| string(&g.name))),
            ),
            ("scopes".into(), set_of(scopes)),
            (
                "scope_classes".into(),
                set_of(classes.into_iter().map(string)),
            ),
            ("ttl_seconds".into(), long(req.ttl_ms.div_ceil(1000))),
            (
                "delegation_depth".into(),
                long(u64::from(req.delegation_depth)),
            ),
            (
                "actors".into(),
                set_of(req.actors.iter().map(|a| string(a))),
            ),
            (
                "sensitivity".into(),
                string(req.template.sensitivity.as_str()),
            ),
            ("time".into(), time),
            ("connection".into(), string(req.connection.as_str())),
        ];
        Context::from_pairs(pairs).map_err(|e| EvaluationError::Request(e.to_string()))
    }

    fn local_time(&self, now_ms: u64) -> Result<RestrictedExpression, EvaluationError> {
        let ms = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let zoned = jiff::Timestamp::from_millisecond(ms)
            .map_err(|e| EvaluationError::Request(format!("time: {e}")))?
            .to_zoned(self.time_zone.clone());
        let weekday = zoned.weekday();
        let name = match weekday {
            jiff::civil::Weekday::Monday => "monday",
            jiff::civil::Weekday::Tuesday => "tuesday",
            jiff::civil::Weekday::Wednesday => "wednesday",
            jiff::civil::Weekday::Thursday => "thursday",
            jiff::civil::Weekday::Friday => "friday",
            jiff::civil::Weekday::Saturday => "saturday",
            jiff::civil::Weekday::Sunday => "sunday",
        };
        record([
            (
                "hour",
                RestrictedExpression::new_long(i64::from(zoned.hour())),
            ),
            (
                "minute",
                RestrictedExpression::new_long(i64::from(zoned.minute())),
            ),
            ("weekday", string(name)),
            (
                "weekday_number",
                RestrictedExpression::new_long(i64::from(weekday.to_monday_one_offset())),
            ),
            ("date", string(&zoned.date().to_string())),
            ("zone", string(&self.zone_name)),
        ])
    }
}

/// The shipped schema, parsed.
///
/// # Errors
/// Never for the shipped schema (a test parses it); the message otherwise.
pub fn schema() -> Result<Schema, String> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(schema, _warnings)| schema)
        .map_err(|e| e.to_string())
}

/// The time zone called `name` (IANA, e.g. `Europe/Berlin`, or `UTC`).
///
/// # Errors
/// A message naming the zone when it is unknown.
pub fn time_zone(name: &str) -> Result<jiff::tz::TimeZone, String> {
    jiff::tz::TimeZone::get(name).map_err(|e| format!("unknown time zone {name:?}: {e}"))
}

/// 1-based line and column of byte `offset` in `src`.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The first labelled position of a Cedar diagnostic, as (line, column).
fn position(diag: &dyn Diagnostic, src: &str) -> (usize, usize) {
    diag.labels()
        .and_then(|mut labels| labels.next())
        .map_or((1, 0), |label| line_col(src, label.offset()))
}

/// A diagnostic's message with its help, on one line.
fn describe(diag: &dyn Diagnostic) -> String {
    let mut message = diag.to_string();
    if let Some(help) = diag.help() {
        message.push_str("; ");
        message.push_str(&help.to_string());
    }
    message.replace('\n', " ")
}

/// The `*.cedar` files directly in `dir` (no dotfiles, no subdirectories), sorted.
fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyErrors> {
    let at_dir = |message: String| {
        PolicyErrors(vec![PolicyIssue {
            file: dir.to_owned(),
            line: 0,
            column: 0,
            message,
        }])
    };
    let entries = std::fs::read_dir(dir).map_err(|e| at_dir(format!("cannot read: {e}")))?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".cedar") || !path.is_file() {
            continue;
        }
        files.push(path);
    }
    files.sort();
    if files.len() > MAX_POLICY_FILES {
        return Err(at_dir(format!(
            "{} policy files; at most {MAX_POLICY_FILES} allowed",
            files.len()
        )));
    }
    Ok(files)
}

/// The contents of every policy file of `dir`, for change detection and loading.
fn read_files(dir: &Path) -> Result<Vec<(PathBuf, String)>, PolicyErrors> {
    let mut out = Vec::new();
    let mut issues = Vec::new();
    for file in policy_files(dir)? {
        let issue = |message: String| PolicyIssue {
            file: file.clone(),
            line: 0,
            column: 0,
            message,
        };
        match std::fs::metadata(&file) {
            Ok(m) if m.len() > MAX_POLICY_FILE_BYTES => {
                issues.push(issue(format!(
                    "{} bytes; at most {MAX_POLICY_FILE_BYTES} allowed",
                    m.len()
                )));
                continue;
            }
            Err(e) => {
                issues.push(issue(format!("cannot read: {e}")));
                continue;
            }
            Ok(_) => {}
        }
        match std::fs::read_to_string(&file) {
            Ok(text) => out.push((file, text)),
            Err(e) => issues.push(issue(format!("cannot read: {e}"))),
        }
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(PolicyErrors(issues))
    }
}

/// Parses and validates `files` (path, text) into one set.
fn build(
    files: &[(PathBuf, String)],
    schema: &Arc<Schema>,
    zone_name: &str,
) -> Result<Policies, PolicyErrors> {
    let time_zone = time_zone(zone_name).map_err(|message| {
        PolicyErrors(vec![PolicyIssue {
            file: PathBuf::from("policy.time_zone"),
            line: 0,
            column: 0,
            message,
        }])
    })?;
    let mut issues = Vec::new();
    let mut set = PolicySet::new();
    let mut origins: BTreeMap<String, PolicyOrigin> = BTreeMap::new();
    // Policy id → (file index), to place validation errors.
    let mut file_of: HashMap<String, usize> = HashMap::new();
    for (index, (file, src)) in files.iter().enumerate() {
        let parsed = match PolicySet::from_str(src) {
            Ok(parsed) => parsed,
            Err(errors) => {
                for e in errors.iter() {
                    let (line, column) = position(e, src);
                    issues.push(PolicyIssue {
                        file: file.clone(),
                        line,
                        column,
                        message: format!("syntax: {}", describe(e)),
                    });
                }
                continue;
            }
        };
        if parsed.templates().next().is_some() {
            issues.push(PolicyIssue {
                file: file.clone(),
                line: 1,
                column: 0,
                message: "policy templates (`?principal`, `?resource`) are not supported".into(),
            });
            continue;
        }
        // The parser names policies policy0, policy1, ... in file order.
        let mut list: Vec<&Policy> = parsed.policies().collect();
        list.sort_by_key(|p| {
            p.id()
                .to_string()
                .trim_start_matches("policy")
                .parse::<usize>()
                .unwrap_or(usize::MAX)
        });
        let mut cursor = 0;
        let file_name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for policy in list {
            let text = policy.to_string();
            let start = src
                .get(cursor..)
                .and_then(|rest| rest.find(text.as_str()))
                .map_or(cursor, |at| cursor + at);
            cursor = start + text.len().min(src.len().saturating_sub(start));
            let (line, column) = line_col(src, start);
            let id = match policy.annotation("id") {
                Some(id) => id.to_owned(),
                None => format!("{file_name}:{line}"),
            };
            if let Some(first) = origins.get(&id) {
                issues.push(PolicyIssue {
                    file: file.clone(),
                    line,
                    column,
                    message: format!(
                        "duplicate policy id {id:?} (first in {}:{})",
                        first.file.display(),
                        first.line
                    ),
                });
                continue;
            }
            let effect = match policy.effect() {
                Effect::Permit => "permit",
                Effect::Forbid => "forbid",
            };
            let renamed = policy.new_id(PolicyId::new(id.clone()));
            if let Err(e) = set.add(renamed) {
                issues.push(PolicyIssue {
                    file: file.clone(),
                    line,
                    column,
                    message: e.to_string(),
                });
                continue;
            }
            origins.insert(
                id.clone(),
                PolicyOrigin {
                    file: file.clone(),
                    line,
                    effect,
                    reason: policy.annotation("reason").map(str::to_owned),
                },
            );
            file_of.insert(id, index);
        }
    }
    let validation = Validator::new((**schema).clone()).validate(&set, ValidationMode::Strict);
    for e in validation.validation_errors() {
        let id = e.policy_id().to_string();
        let (file, src) = match file_of.get(&id).and_then(|i| files.get(*i)) {
            Some((file, src)) => (file.clone(), src.as_str()),
            None => (PathBuf::from(&id), ""),
        };
        let (line, column) = position(e, src);
        issues.push(PolicyIssue {
            file,
            line,
            column,
            message: format!("schema: policy {id:?}: {}", describe(e)),
        });
    }
    if !issues.is_empty() {
        return Err(PolicyErrors(issues));
    }
    let action = EntityUid::from_str(BEGIN_TASK).map_err(|e| {
        PolicyErrors(vec![PolicyIssue {
            file: PathBuf::from("leash.cedarschema"),
            line: 0,
            column: 0,
            message: e.to_string(),
        }])
    })?;
    Ok(Policies {
        action,
        schema: Arc::clone(schema),
        set,
        origins,
        time_zone,
        zone_name: zone_name.to_owned(),
    })
}

/// The schema the project ships, shared by every set built from it; a problem
/// in it is reported as an issue of `leash.cedarschema`.
fn shipped_schema() -> Result<Arc<Schema>, PolicyErrors> {
    schema().map(Arc::new).map_err(|message| {
        PolicyErrors(vec![PolicyIssue {
            file: PathBuf::from("leash.cedarschema"),
            line: 0,
            column: 0,
            message,
        }])
    })
}

/// Loads and validates every `*.cedar` file directly in `dir`, computing
/// `context.time` in `zone` (IANA name).
///
/// # Errors
/// Every problem found, each with file:line:col where it has a position: syntax
/// errors, schema violations, duplicate ids, unreadable or oversized files.
pub fn load_dir(dir: &Path, zone: &str) -> Result<Policies, PolicyErrors> {
    let schema = shipped_schema()?;
    build(&read_files(dir)?, &schema, zone)
}

/// Parses and validates one policy file's text `src`, named `file` in messages
/// (what `leash policy check` does per file; the fuzz target's entry point).
///
/// # Errors
/// Every problem in the text, with file:line:col.
pub fn parse_str(file: &Path, src: &str, zone: &str) -> Result<Policies, PolicyErrors> {
    let schema = shipped_schema()?;
    build(&[(file.to_owned(), src.to_owned())], &schema, zone)
}

/// The broker's current policies. Readers always see one complete, validated set:
/// a reload either installs a whole new set or leaves the last good one in place.
#[derive(Debug)]
pub struct PolicyCatalog {
    dir: PathBuf,
    zone: String,
    schema: Arc<Schema>,
    current: crate::reload::Current<Policies>,
    /// The file contents last parsed, good or bad; the lock also serializes reloads.
    seen: Mutex<Vec<(PathBuf, String)>>,
}

impl PolicyCatalog {
    /// Loads `dir`, computing `context.time` in `zone`.
    ///
    /// # Errors
    /// Every problem in the directory; the broker must not start without a valid set.
    pub fn new(dir: PathBuf, zone: &str) -> Result<Self, PolicyErrors> {
        let schema = shipped_schema()?;
        let files = read_files(&dir)?;
        let policies = build(&files, &schema, zone)?;
        if policies.is_empty() {
            tracing::info!(dir = %dir.display(), "no policy files: template rules alone decide");
        } else {
            tracing::info!(dir = %dir.display(), policies = policies.len(), "policies loaded");
        }
        Ok(Self {
            dir,
            zone: zone.to_owned(),
            schema,
            current: crate::reload::Current::new(policies),
            seen: Mutex::new(files),
        })
    }

    /// The directory the catalog reads.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current set; stays valid for the caller even if a reload installs a
    /// newer one meanwhile.
    pub fn current(&self) -> Arc<Policies> {
        // The only write is one Arc assignment, so a poisoned value is sound.
        self.current.get()
    }

    /// Re-reads the directory if any policy file was added, removed or changed.
    /// `Ok(true)` when a new set was installed, `Ok(false)` when nothing changed
    /// (including a directory still in a bad state already reported).
    ///
    /// # Errors
    /// Every problem in the changed directory. The last good set stays current
    /// and each problem is logged at warn level.
    pub fn reload(&self) -> Result<bool, PolicyErrors> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let files = read_files(&self.dir);
        let unchanged = match &files {
            Ok(files) => files == &*seen,
            Err(_) => false,
        };
        if unchanged {
            return Ok(false);
        }
        let result = files.and_then(|files| {
            let built = build(&files, &self.schema, &self.zone);
            *seen = files;
            built
        });
        match result {
            Ok(policies) => {
                let count = policies.len();
                self.current.set(policies);
                tracing::info!(dir = %self.dir.display(), policies = count, "policies reloaded");
                Ok(true)
            }
            Err(errors) => {
                for issue in &errors.0 {
                    tracing::warn!(
                        file = %issue.file.display(),
                        line = issue.line,
                        column = issue.column,
                        problem = %issue.message,
                        "policy reload rejected; keeping the last good set"
                    );
                }
                Err(errors)
            }
        }
    }
}

#[cfg(test)]
#[path = "cedar_tests.rs"]
mod tests;
