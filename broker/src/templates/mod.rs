//! Templates: platform teams' task-scope templates, loaded from YAML files.
//!
//! A template says who may declare a task, which typed parameters the task takes, the
//! lease bounds, and the credentials ("grants") the task yields. Templates live one
//! per file in a directory (`*.yaml` / `*.yml`, not recursive, dotfiles skipped),
//! are validated as a whole by [`load_dir`] / [`check_dir`], and are reloaded without
//! a restart by [`TemplateCatalog`]. `docs/templates.md` is the user-facing guide.
//!
//! ## Layout
//!
//! - `model.rs`: the validated types ([`Template`], [`GrantSpec`], [`Parameter`], …).
//! - `yaml.rs`: a small YAML node tree that keeps line numbers.
//! - `parse.rs`: node tree → [`Template`], collecting every problem.
//! - `parameters.rs`: [`Template::bind_parameters`] and [`Template::scopes_for`].
//! - `load.rs`: reading a directory; `catalog.rs`: [`TemplateCatalog`].
//! - `limits.rs`: every size limit, as named constants.
//!
//! ## Format
//!
//! ```yaml
//! name: github-pr-review            # required; [a-z0-9][a-z0-9-_.]{0,62}, unique in the directory
//! version: "3"                      # required; string or integer
//! owner: platform-team@acme.test    # required; who to contact
//! description: Review one PR.       # optional
//! identities:                       # required, non-empty: SPIFFE IDs or `prefix/*` patterns
//!   - spiffe://acme.test/agent/*
//! parameters:                       # optional; at most 32; names [a-z_][a-z0-9_]{0,31}
//!   repo:
//!     type: string                  # string | integer | boolean
//!     pattern: "[a-z0-9-]+/[a-z0-9-]+"  # anchored: must match the whole value
//!     required: true                # optional, defaults to true
//!   env:
//!     type: string
//!     enum: [staging, prod]         # a string needs `pattern` or `enum`, never neither
//!     required: false
//!   pr:
//!     type: integer
//!     min: 1                        # integers may have min / max
//! lease:                            # required; 1s <= ttl <= max_ttl <= max_lifetime
//!   ttl: 60s
//!   max_ttl: 5m
//!   max_lifetime: 1h
//! grants:                           # required; 1 to 16
//!   - name: github                  # unique in the template; [a-z0-9][a-z0-9_-]{0,31}
//!     kind: jwt                     # jwt | opaque
//!     audience: https://api.github.test   # non-empty, no whitespace
//!     scopes:                       # 1 to 32; `{param}` must name a REQUIRED parameter
//!       - { scope: "repo:{repo}:read", class: read }  # class: read | write | destructive
//!     ttl: 60s                      # >= 1s; capped by the lease at mint time
//! delegation:                       # optional
//!   max_depth: 2                    # 0 (no delegation) to 4; default 2
//!   may_act: [spiffe://acme.test/agent/*]  # optional; who may be handed a child task
//! approval:                         # optional; grants that need a person's yes
//!   grants: [github]                # required; grants of this template, each once
//!   approvers:                      # required; at least one of:
//!     identities: [spiffe://acme.test/human/*]
//!     classes: [approvers]          # actor classes of the template's tenant
//!   validity: 15m                   # 1s to 24h; default 15m
//!   while_pending: issue_others     # or issue_none; default issue_others
//! ```
//!
//! ## Security defaults
//!
//! - Every string parameter is constrained (`pattern` or `enum`), patterns are
//!   anchored, and values substituted into scopes may not hold whitespace or control
//!   characters, so a parameter can never widen a scope.
//! - Only required parameters appear in scopes: a scope never renders without its value.
//! - Patterns use the `regex` crate (linear time) with a compiled-size limit.
//! - Files, templates, parameters, grants and scopes are capped (see `limits.rs`).
//! - A bad edit never replaces a good set: the catalog keeps serving the last good one.

mod catalog;
mod limits;
mod load;
mod model;
mod parameters;
mod parse;
mod yaml;

#[cfg(test)]
mod tests;

use std::{fmt, path::Path, path::PathBuf};

pub use catalog::TemplateCatalog;
pub use limits::*;
pub use model::{
    ApprovalGate, CredentialKind, DelegationPolicy, GrantSpec, LeasePolicy, MAX_DELEGATION_DEPTH,
    Parameter, ParameterConstraint, ParameterKind, ScopeClass, Sensitivity, Template, TemplateSet,
};
pub use parameters::ParameterProblem;

/// The tenant of a template without `tenant:`.
pub const DEFAULT_TENANT: &str = "default";

/// A check of a whole parsed set against what lives outside the template
/// files (the config's actor classes); its issues reject the set like parse errors.
pub type SetCheck = Box<dyn Fn(&TemplateSet) -> Vec<TemplateIssue> + Send + Sync>;

/// One problem in a template directory, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateIssue {
    /// The template file, or the directory for problems with the directory itself.
    pub file: PathBuf,
    /// 1-based line; 0 when the problem concerns the whole file or directory.
    pub line: usize,
    /// What is wrong, on one line.
    pub message: String,
}

impl fmt::Display for TemplateIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        }
    }
}

/// Every problem found in a template directory. Never empty when returned as an
/// error. `Display` prints one `file:line: message` per line, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateErrors(pub Vec<TemplateIssue>);

impl fmt::Display for TemplateErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TemplateErrors {}

/// Loads and validates every template file in `dir` (not recursive). On success,
/// every template is valid and names are unique.
///
/// # Errors
///
/// Every problem in every file (YAML syntax, unknown or missing keys, wrong types,
/// invalid values, limits, duplicate names across files), or an unreadable directory.
pub fn load_dir(dir: &Path) -> Result<TemplateSet, TemplateErrors> {
    load::build(&load::snapshot(dir))
}

/// Parses and validates one template from YAML text, exactly as [`load_dir`] parses
/// each file; `file` only names the source in issues and in [`Template::source`].
/// Names are not compared with other templates (that is [`load_dir`]'s job).
///
/// # Errors
///
/// Every problem in the text, each with its line.
pub fn parse_str(file: &Path, src: &str) -> Result<Template, TemplateErrors> {
    parse::parse_template(file, src)
        .result
        .map_err(TemplateErrors)
}

/// Validates `dir` exactly as the broker would load it; backs `leash templates check`.
///
/// # Errors
///
/// The same as [`load_dir`].
pub fn check_dir(dir: &Path) -> Result<TemplateSet, TemplateErrors> {
    load_dir(dir)
}
