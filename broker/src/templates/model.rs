//! The validated template model. Every value here has passed [`super::load_dir`]'s
//! checks; nothing in this file parses or validates.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use regex::Regex;

use crate::identity::{IdentityPattern, SpiffeId};

/// What kind of credential a grant yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// A signed JWT that resource servers verify offline against the broker's JWKS.
    Jwt,
    /// A random opaque token that resource servers check by introspection.
    Opaque,
}

impl CredentialKind {
    /// The spelling used in template files (`jwt`, `opaque`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::Opaque => "opaque",
        }
    }
}

/// What a scope lets its holder do, declared per scope in the template (never
/// inferred from the scope's text). Ordered: `Read < Write < Destructive`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ScopeClass {
    /// Reads data; changes nothing.
    Read,
    /// Creates or changes data.
    Write,
    /// Deletes data or does what cannot be undone; always declared explicitly.
    Destructive,
}

impl ScopeClass {
    /// Every class, in order.
    pub const ALL: [Self; 3] = [Self::Read, Self::Write, Self::Destructive];

    /// The spelling used in template files, JWT claims and policies
    /// (`read`, `write`, `destructive`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Destructive => "destructive",
        }
    }

    /// The class spelled `s`, if any (exact, lower case).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// How sensitive the data a template reaches is, declared by the template
/// (`sensitivity:`); policies read it. A template that does not declare it is
/// [`Sensitivity::High`], so an omission never loosens a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Sensitivity {
    /// Public or throwaway data.
    Low,
    /// Internal data.
    Medium,
    /// Customer, financial or secret data; the default.
    #[default]
    High,
}

impl Sensitivity {
    /// Every level, in order.
    pub const ALL: [Self; 3] = [Self::Low, Self::Medium, Self::High];

    /// The spelling used in template files and policies (`low`, `medium`, `high`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        }
    }

    /// The level spelled `s`, if any (exact, lower case).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// Lease bounds of a template. Loaded templates guarantee
/// `1s <= ttl <= max_ttl <= max_lifetime`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasePolicy {
    /// TTL a lease gets when BeginTask does not ask for one.
    pub ttl: Duration,
    /// Largest TTL a BeginTask or renewal may request.
    pub max_ttl: Duration,
    /// No renewal extends a lease past its begin time plus this.
    pub max_lifetime: Duration,
    /// Renewals sooner than this after the previous one (or the begin) are
    /// refused with RESOURCE_EXHAUSTED; at most `ttl / 2`, zero for no limit
    /// (`0s`, explicit). Default: a quarter of `ttl`, at most 1 s.
    pub min_renew_interval: Duration,
}

/// One credential a task yields. Loaded grants guarantee a valid unique name, a
/// non-empty audience without whitespace, 1 to [`super::MAX_SCOPES_PER_GRANT`] scopes
/// whose `{placeholders}` all name required parameters, and `ttl >= 1s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantSpec {
    /// Unique within the template; names the credential in responses and audit.
    pub name: String,
    /// What is minted.
    pub kind: CredentialKind,
    /// The resource server the credential is for.
    pub audience: String,
    /// Scopes as written, with `{param}` placeholders; see [`Template::scopes_for`].
    pub scopes: Vec<String>,
    /// The class of each scope, index for index: a loaded grant has exactly one per scope.
    pub scope_classes: Vec<ScopeClass>,
    /// Credential TTL; the lease caps it further at mint time.
    pub ttl: Duration,
}

/// The type of a parameter value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParameterKind {
    /// Any text allowed by the parameter's pattern or enum.
    String,
    /// A signed 64-bit decimal integer, normalized to its canonical form.
    Integer,
    /// Exactly `true` or `false`.
    Boolean,
}

impl ParameterKind {
    /// The spelling used in template files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Integer => "integer",
            Self::Boolean => "boolean",
        }
    }
}

/// What values a parameter accepts beyond its kind.
#[derive(Debug, Clone)]
pub enum ParameterConstraint {
    /// Nothing beyond the kind; only integers and booleans may be unconstrained.
    None,
    /// A string must match the whole pattern.
    Pattern {
        /// The pattern as written in the template.
        source: String,
        /// The pattern compiled as `^(?:source)$`.
        regex: Regex,
    },
    /// A string must equal one of these values.
    Enum(Vec<String>),
    /// An integer must lie within these inclusive bounds.
    Range {
        /// Smallest value allowed, if any.
        min: Option<i64>,
        /// Largest value allowed, if any.
        max: Option<i64>,
    },
}

/// One declared task parameter. Loaded parameters guarantee a valid unique name and,
/// for strings, a `Pattern` or `Enum` constraint.
#[derive(Debug, Clone)]
pub struct Parameter {
    /// Name, `[a-z_][a-z0-9_]{0,31}`.
    pub name: String,
    /// Value type.
    pub kind: ParameterKind,
    /// Whether BeginTask must supply it. Every parameter used in a scope is required.
    pub required: bool,
    /// Allowed values.
    pub constraint: ParameterConstraint,
    /// Free text for people; empty when not given.
    pub description: String,
}

/// A platform team's task-scope template, validated.
#[derive(Debug, Clone)]
pub struct Template {
    /// Unique across the directory, `[a-z0-9][a-z0-9-_.]{0,62}`.
    pub name: String,
    /// As written (an integer version is kept as its decimal text).
    pub version: String,
    /// Who to contact about the template.
    pub owner: String,
    /// Free text; empty when not given.
    pub description: String,
    /// Who may declare it; never empty for a loaded template.
    pub identities: Vec<IdentityPattern>,
    /// Lease bounds.
    pub lease: LeasePolicy,
    /// The credentials a task yields, one per grant; never empty for a loaded template.
    pub grants: Vec<GrantSpec>,
    /// Declared parameters, in file order.
    pub parameters: Vec<Parameter>,
    /// Declared data sensitivity; [`Sensitivity::High`] when not declared.
    pub sensitivity: Sensitivity,
    /// The file the template was loaded from.
    pub source: PathBuf,
    /// The tenant the template belongs to (`tenant:`, default
    /// [`super::DEFAULT_TENANT`]): only that tenant's identities reach it.
    pub tenant: String,
    /// The actor classes that may use it (`classes:`); empty: every class of
    /// its tenant. Checked against the config's classes when loaded.
    pub classes: Vec<String>,
    /// How tasks of it may be delegated to subagents (`delegation:`).
    pub delegation: DelegationPolicy,
    /// Grants that need a person's approval first (`approval:`); `None`: none do.
    pub approval: Option<ApprovalGate>,
}

/// Most delegation levels any template may allow below a task.
pub const MAX_DELEGATION_DEPTH: u32 = 4;

/// How a template's tasks may be handed to subagents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegationPolicy {
    /// Most levels below a task begun directly (`max_depth`, default 2, at
    /// most [`MAX_DELEGATION_DEPTH`]); 0 forbids delegation.
    pub max_depth: u32,
    /// Who may be handed a child task (`may_act`, SPIFFE ID patterns); empty:
    /// any identity whose actor class may use the template. Checked again at
    /// every level.
    pub may_act: Vec<IdentityPattern>,
}

impl Default for DelegationPolicy {
    fn default() -> Self {
        Self {
            max_depth: 2,
            may_act: Vec::new(),
        }
    }
}

/// Grants a template gates behind a person's approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalGate {
    /// The gated grants (`grants`, names of grants of the template; never empty).
    pub grants: Vec<String>,
    /// Who may approve, by SPIFFE ID pattern (`approvers.identities`).
    pub approvers: Vec<IdentityPattern>,
    /// Who may approve, by actor class of the template's tenant
    /// (`approvers.classes`). At least one approver identity or class is given.
    pub approver_classes: Vec<String>,
    /// How long a request waits for a decision, and then how long an
    /// approval waits to be used (`validity`, default 15 minutes, 1 s to 24 h).
    pub validity: Duration,
    /// Whether the grants that are not gated are issued while the approval is
    /// pending (`while_pending: issue_others`, the default) or none is
    /// (`while_pending: issue_none`).
    pub issue_others: bool,
}

impl Template {
    /// Whether `id` matches one of the template's identity patterns. A template with no
    /// patterns allows nobody.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        self.identities.iter().any(|p| p.matches(id))
    }

    /// Whether an actor of `class` in `tenant` may use the template: the
    /// tenant is the template's and the class is listed (or none is).
    pub fn admits_class(&self, class: &str, tenant: &str) -> bool {
        self.tenant == tenant
            && (self.classes.is_empty() || self.classes.iter().any(|c| c == class))
    }

    /// The declared parameter called `name`, if any.
    pub fn parameter(&self, name: &str) -> Option<&Parameter> {
        self.parameters.iter().find(|p| p.name == name)
    }

    /// The grant called `name`, if any.
    pub fn grant(&self, name: &str) -> Option<&GrantSpec> {
        self.grants.iter().find(|g| g.name == name)
    }
}

/// The templates of one directory, by name. Names are unique.
#[derive(Debug, Default)]
pub struct TemplateSet(pub(crate) BTreeMap<String, Arc<Template>>);

impl TemplateSet {
    /// The template called `name`, if loaded.
    pub fn get(&self, name: &str) -> Option<Arc<Template>> {
        self.0.get(name).cloned()
    }

    /// How many templates the set holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set holds no template.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Templates in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Template>> {
        self.0.values()
    }

    /// Template names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}
