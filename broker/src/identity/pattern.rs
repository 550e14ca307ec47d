//! Identity patterns: which SPIFFE IDs an actor class or template admits.

use std::fmt;

use super::{
    error::{IdentityError, truncate_for_log},
    spiffe_id::SpiffeId,
};

/// An exact SPIFFE ID, or `spiffe://td/prefix/*` for every ID strictly below a prefix.
///
/// Guarantees: a prefix pattern matches only IDs in its own trust domain whose path has
/// at least one more segment than the prefix, and matching respects segment boundaries
/// (`spiffe://td/agent/*` matches `spiffe://td/agent/x` but never `spiffe://td/agentx/y`
/// nor `spiffe://td/agent` itself). `spiffe://td/*` matches every workload of `td`. A
/// `*` anywhere other than as the whole last segment is rejected at parse time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdentityPattern {
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Kind {
    Exact(SpiffeId),
    // The ID whose descendants match; its path may be empty (the trust domain root).
    Below(SpiffeId),
}

impl IdentityPattern {
    /// Parses a pattern.
    ///
    /// # Errors
    ///
    /// [`IdentityError::InvalidPattern`] when the pattern has a `*` anywhere but as the
    /// whole last segment, when what precedes `/*` (or the whole exact pattern) is not a
    /// valid SPIFFE ID, or when an exact pattern names a trust domain root (which no
    /// X509-SVID can carry).
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let invalid = |reason: String| IdentityError::InvalidPattern {
            pattern: truncate_for_log(s),
            reason,
        };
        if let Some(base) = s.strip_suffix("/*") {
            if base.contains('*') {
                return Err(invalid(
                    "`*` is allowed only as the whole last segment (`.../*`)".into(),
                ));
            }
            let base = SpiffeId::parse(base).map_err(|e| invalid(reason_of(&e)))?;
            return Ok(Self {
                kind: Kind::Below(base),
            });
        }
        if s.contains('*') {
            return Err(invalid(
                "`*` is allowed only as the whole last segment (`.../*`)".into(),
            ));
        }
        let id = SpiffeId::parse(s).map_err(|e| invalid(reason_of(&e)))?;
        if id.is_root() {
            return Err(invalid(format!(
                "names a trust domain, not a workload; use `{id}/*` to match all of it"
            )));
        }
        Ok(Self {
            kind: Kind::Exact(id),
        })
    }

    /// True when `id` is admitted by this pattern (see the type's guarantees).
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match &self.kind {
            Kind::Exact(exact) => exact == id,
            Kind::Below(base) => {
                base.trust_domain() == id.trust_domain()
                    && id
                        .path()
                        .strip_prefix(base.path())
                        // A valid ID has no empty segments, so "/" plus anything is a
                        // whole further segment.
                        .is_some_and(|rest| rest.len() > 1 && rest.starts_with('/'))
            }
        }
    }

    /// True when every ID `other` matches is also matched by `self`, so that an
    /// entry with `other` placed after one with `self` in a first-match list can
    /// never apply. Equal patterns cover each other.
    pub fn covers(&self, other: &Self) -> bool {
        match (&self.kind, &other.kind) {
            (Kind::Exact(a), Kind::Exact(b)) => a == b,
            // An exact ID is one workload; a prefix pattern admits without bound.
            (Kind::Exact(_), Kind::Below(_)) => false,
            (Kind::Below(_), Kind::Exact(id)) => self.matches(id),
            // Everything below `inner` is below `base` if `inner` is `base` or below it.
            (Kind::Below(base), Kind::Below(inner)) => base == inner || self.matches(inner),
        }
    }

    /// The trust domain this pattern is confined to.
    pub fn trust_domain(&self) -> &str {
        match &self.kind {
            Kind::Exact(id) | Kind::Below(id) => id.trust_domain(),
        }
    }
}

fn reason_of(e: &IdentityError) -> String {
    match e {
        IdentityError::InvalidSpiffeId { rule, .. } => format!("not a SPIFFE ID: {rule}"),
        other => other.to_string(),
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Exact(id) => write!(f, "{id}"),
            Kind::Below(base) => write!(f, "{base}/*"),
        }
    }
}
