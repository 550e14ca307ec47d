//! SPIFFE IDs (SPIFFE-ID.md): `spiffe://<trust domain><path>`.

use std::{fmt, str::FromStr};

use super::{
    error::{IdentityError, SpiffeIdRule, truncate_for_log},
    limits::{MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN},
};

const SCHEME: &str = "spiffe://";

/// A syntactically valid SPIFFE ID.
///
/// Holding one guarantees every SPIFFE-ID.md rule: scheme exactly `spiffe://`; a
/// non-empty trust domain of `a-z 0-9 . - _` at most 255 bytes; a path that is empty
/// or made of non-empty segments of `a-zA-Z0-9 . - _` other than `.` and `..`, with no
/// trailing `/`; no userinfo, port, query, fragment or percent-encoding; at most 2048
/// bytes in all. Two IDs are equal exactly when their strings are equal.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    // Byte length of the trust domain, so trust_domain() and path() are slices of `id`.
    td_len: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    ///
    /// # Errors
    ///
    /// [`IdentityError::InvalidSpiffeId`] naming the first rule the input breaks.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        match check(s) {
            Ok(td_len) => Ok(Self {
                id: s.to_owned(),
                td_len,
            }),
            Err(rule) => Err(IdentityError::InvalidSpiffeId {
                id: truncate_for_log(s),
                rule,
            }),
        }
    }

    /// The whole ID, e.g. `spiffe://example.org/agent/7`.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..SCHEME.len() + self.td_len]
    }

    /// The path, e.g. `/agent/7`; empty for a trust domain's root ID.
    pub fn path(&self) -> &str {
        &self.id[SCHEME.len() + self.td_len..]
    }

    /// True when the path is empty: the ID names a trust domain, not a workload.
    pub fn is_root(&self) -> bool {
        self.path().is_empty()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SpiffeId").field(&self.id).finish()
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Validates a bare trust domain name (as used for bundle configuration).
///
/// # Errors
///
/// [`IdentityError::InvalidSpiffeId`] naming the trust-domain rule that failed.
pub fn validate_trust_domain(td: &str) -> Result<(), IdentityError> {
    check_trust_domain(td).map_err(|rule| IdentityError::InvalidSpiffeId {
        id: truncate_for_log(td),
        rule,
    })
}

/// Returns the trust domain's byte length, or the first rule broken.
fn check(s: &str) -> Result<usize, SpiffeIdRule> {
    if s.is_empty() {
        return Err(SpiffeIdRule::Empty);
    }
    if s.len() > MAX_SPIFFE_ID_LEN {
        return Err(SpiffeIdRule::TooLong);
    }
    let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdRule::WrongScheme)?;
    // These generic-URI parts are each named on their own so the message says
    // "a port is not allowed" rather than "bad character ':'".
    if s.contains('?') {
        return Err(SpiffeIdRule::Query);
    }
    if s.contains('#') {
        return Err(SpiffeIdRule::Fragment);
    }
    if s.contains('%') {
        return Err(SpiffeIdRule::PercentEncoding);
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(SpiffeIdRule::Userinfo);
    }
    // `host:443` or `host:` is a port; other colons (such as an IPv6 literal) are
    // simply characters a trust domain may not contain.
    if authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(SpiffeIdRule::Port);
    }
    check_trust_domain(authority)?;
    check_path(path)?;
    Ok(authority.len())
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdRule> {
    if td.is_empty() {
        return Err(SpiffeIdRule::TrustDomainEmpty);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdRule::TrustDomainTooLong);
    }
    for b in td.bytes() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => {}
            b'A'..=b'Z' => return Err(SpiffeIdRule::TrustDomainUppercase),
            _ => return Err(SpiffeIdRule::TrustDomainChar),
        }
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), SpiffeIdRule> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first split item is the empty string before it.
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() {
            return Err(if i == last {
                SpiffeIdRule::TrailingSlash
            } else {
                SpiffeIdRule::EmptySegment
            });
        }
        if *seg == "." || *seg == ".." {
            return Err(SpiffeIdRule::DotSegment);
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(SpiffeIdRule::PathChar);
        }
    }
    Ok(())
}
