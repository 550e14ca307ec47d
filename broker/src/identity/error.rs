//! The one error type of the identity area, and the rules it names.

use std::{fmt, path::PathBuf};

/// Why an identity could not be established, or identity material could not be loaded.
///
/// Every message names the rule that failed, so an operator reading a log line or a
/// client reading a status knows what to fix without reading this code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A string is not a valid SPIFFE ID (SPIFFE-ID.md); `rule` says which rule it broke.
    #[error("invalid SPIFFE ID {id:?}: {rule}")]
    InvalidSpiffeId {
        /// The rejected input, truncated to a loggable length.
        id: String,
        /// The syntax rule that failed.
        rule: SpiffeIdRule,
    },
    /// A string is not a valid identity pattern (an exact SPIFFE ID or `spiffe://td/prefix/*`).
    #[error("invalid identity pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The rejected pattern, truncated to a loggable length.
        pattern: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A certificate chain breaks an X509-SVID rule (X509-SVID.md), or does not chain to
    /// the trust bundle of its own trust domain; `rule` says which.
    #[error("invalid X509-SVID{}: {rule}", display_id(.spiffe_id))]
    InvalidSvid {
        /// The leaf's SPIFFE ID, when it could be parsed.
        spiffe_id: Option<String>,
        /// The rule that failed.
        rule: SvidRule,
    },
    /// An input was larger than a named limit in [`crate::identity::limits`].
    #[error("{what} is {actual}, over the limit of {limit}")]
    LimitExceeded {
        /// What was measured, with its unit.
        what: &'static str,
        /// The limit.
        limit: usize,
        /// The measured value.
        actual: usize,
    },
    /// A trust bundle, certificate or key file could not be read, parsed or used.
    #[error("{}: {reason}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why it could not be used.
        reason: String,
    },
    /// A rustls configuration could not be built from otherwise valid material.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A JWT-SVID breaks a JWT-SVID.md rule or does not verify; the reason says
    /// which (never the token).
    #[error("invalid JWT-SVID: {0}")]
    InvalidJwtSvid(String),
    /// The SPIFFE Workload API could not be reached, or what it delivered cannot be
    /// used.
    #[error("SPIFFE Workload API: {0}")]
    WorkloadApi(String),
    /// Generating throwaway PKI material (see [`crate::identity::pki`]) failed.
    #[error("certificate generation: {0}")]
    Pki(String),
}

fn display_id(id: &Option<String>) -> String {
    match id {
        Some(id) => format!(" for {id}"),
        None => String::new(),
    }
}

/// The SPIFFE ID syntax rule (SPIFFE-ID.md section 2) that an input broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpiffeIdRule {
    /// The input is empty.
    Empty,
    /// The whole ID is longer than [`crate::identity::limits::MAX_SPIFFE_ID_LEN`] bytes.
    TooLong,
    /// The scheme is not exactly `spiffe://` (lower case).
    WrongScheme,
    /// The trust domain is empty.
    TrustDomainEmpty,
    /// The trust domain is longer than [`crate::identity::limits::MAX_TRUST_DOMAIN_LEN`] bytes.
    TrustDomainTooLong,
    /// The trust domain contains an upper-case letter.
    TrustDomainUppercase,
    /// The trust domain contains a character outside `a-z 0-9 . - _`.
    TrustDomainChar,
    /// The authority carries userinfo (`user@`).
    Userinfo,
    /// The authority carries a port (`:8443`).
    Port,
    /// The ID carries a query (`?`).
    Query,
    /// The ID carries a fragment (`#`).
    Fragment,
    /// The ID contains percent-encoding (`%`).
    PercentEncoding,
    /// A path segment is empty (`//`).
    EmptySegment,
    /// The path ends with `/`.
    TrailingSlash,
    /// A path segment is `.` or `..`.
    DotSegment,
    /// A path segment contains a character outside `a-z A-Z 0-9 . - _`.
    PathChar,
}

impl fmt::Display for SpiffeIdRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "empty",
            Self::TooLong => "longer than 2048 bytes",
            Self::WrongScheme => "scheme must be exactly `spiffe://`",
            Self::TrustDomainEmpty => "trust domain is empty",
            Self::TrustDomainTooLong => "trust domain is longer than 255 bytes",
            Self::TrustDomainUppercase => "trust domain must be lower case",
            Self::TrustDomainChar => "trust domain may contain only a-z 0-9 . - _",
            Self::Userinfo => "userinfo (`user@`) is not allowed",
            Self::Port => "a port is not allowed",
            Self::Query => "a query (`?`) is not allowed",
            Self::Fragment => "a fragment (`#`) is not allowed",
            Self::PercentEncoding => "percent-encoding (`%`) is not allowed",
            Self::EmptySegment => "path has an empty segment (`//`)",
            Self::TrailingSlash => "path must not end with `/`",
            Self::DotSegment => "path segments `.` and `..` are not allowed",
            Self::PathChar => "path segments may contain only a-z A-Z 0-9 . - _",
        })
    }
}

/// The X509-SVID rule (X509-SVID.md sections 2-5) that a certificate chain broke.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SvidRule {
    /// No certificate was presented.
    EmptyChain,
    /// A certificate is not parsable DER X.509 (or has trailing bytes).
    Malformed(String),
    /// The leaf has no URI SAN.
    NoUriSan,
    /// The leaf has more than one URI SAN (the count).
    MultipleUriSans(usize),
    /// The leaf's URI SAN is not a valid SPIFFE ID.
    BadSpiffeId(SpiffeIdRule),
    /// The leaf's SPIFFE ID has no path, so it names a trust domain, not a workload.
    RootPath,
    /// The leaf's basic constraints say `cA = true`.
    LeafIsCa,
    /// The leaf has no key usage extension.
    KeyUsageMissing,
    /// The leaf's key usage extension is not marked critical.
    KeyUsageNotCritical,
    /// The leaf's key usage lacks `digitalSignature`.
    NoDigitalSignature,
    /// The leaf's key usage sets `keyCertSign`.
    KeyCertSign,
    /// The leaf's key usage sets `cRLSign`.
    CrlSign,
    /// No trust bundle is configured for the leaf's trust domain (the domain).
    UnknownTrustDomain(String),
    /// A certificate in the chain has expired at the verification time.
    Expired,
    /// A certificate in the chain is not yet valid at the verification time.
    NotYetValid,
    /// The chain does not lead to a trust anchor of the leaf's own trust domain.
    UntrustedIssuer,
    /// Path validation failed for another reason (webpki's reason).
    ChainInvalid(String),
    /// A CA certificate presented after the leaf (intermediate #n, counting from 1
    /// next to the leaf) lacks basicConstraints `cA=true` (RFC 5280 4.2.1.9).
    IntermediateNotCa(usize),
    /// Intermediate #n has a key usage extension without `keyCertSign`
    /// (RFC 5280 4.2.1.3, X509-SVID.md 4.3).
    IntermediateNoKeyCertSign(usize),
    /// Intermediate #n carries a `spiffe://` URI SAN that is not a valid SPIFFE ID.
    IntermediateBadSpiffeId(usize, SpiffeIdRule),
    /// Intermediate #n carries a SPIFFE ID with a path: a signing certificate may
    /// only name a trust domain (X509-SVID.md 3.2).
    IntermediateIdHasPath(usize),
}

impl fmt::Display for SvidRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EmptyChain => f.write_str("no certificate presented"),
            Self::Malformed(why) => write!(f, "certificate is not valid DER X.509: {why}"),
            Self::NoUriSan => f.write_str("leaf has no URI SAN"),
            Self::MultipleUriSans(n) => write!(f, "leaf has {n} URI SANs, exactly one is allowed"),
            Self::BadSpiffeId(rule) => write!(f, "leaf URI SAN is not a SPIFFE ID: {rule}"),
            Self::RootPath => {
                f.write_str("leaf SPIFFE ID has no path; a leaf must name a workload")
            }
            Self::LeafIsCa => f.write_str("leaf has basicConstraints cA=true"),
            Self::KeyUsageMissing => f.write_str("leaf has no key usage extension"),
            Self::KeyUsageNotCritical => f.write_str("leaf key usage extension is not critical"),
            Self::NoDigitalSignature => f.write_str("leaf key usage lacks digitalSignature"),
            Self::KeyCertSign => f.write_str("leaf key usage sets keyCertSign"),
            Self::CrlSign => f.write_str("leaf key usage sets cRLSign"),
            Self::UnknownTrustDomain(td) => write!(f, "no trust bundle for trust domain {td:?}"),
            Self::Expired => f.write_str("certificate has expired"),
            Self::NotYetValid => f.write_str("certificate is not yet valid"),
            Self::UntrustedIssuer => {
                f.write_str("chain does not lead to a trust anchor of the leaf's trust domain")
            }
            Self::ChainInvalid(why) => write!(f, "path validation failed: {why}"),
            Self::IntermediateNotCa(n) => write!(
                f,
                "intermediate #{n} is not a CA (basicConstraints cA=true is required)"
            ),
            Self::IntermediateNoKeyCertSign(n) => write!(
                f,
                "intermediate #{n} key usage lacks keyCertSign, so it may not sign certificates"
            ),
            Self::IntermediateBadSpiffeId(n, rule) => {
                write!(f, "intermediate #{n} URI SAN is not a SPIFFE ID: {rule}")
            }
            Self::IntermediateIdHasPath(n) => write!(
                f,
                "intermediate #{n} SPIFFE ID has a path; a signing certificate may only name a trust domain"
            ),
        }
    }
}

/// Cuts untrusted input to a length that is safe to put in a log line or a status.
pub(crate) fn truncate_for_log(s: &str) -> String {
    const MAX: usize = 256;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
