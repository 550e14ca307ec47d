//! Identity: who is calling. SPIFFE IDs, X509-SVID verification, trust bundles, and
//! the broker's own serving certificate.
//!
//! ## Layout
//!
//! - [`spiffe_id`]: [`SpiffeId`], the SPIFFE-ID.md syntax rules.
//! - [`pattern`]: [`IdentityPattern`], exact IDs or `spiffe://td/prefix/*`.
//! - `svid`: [`verify_svid`] (the security kernel, usable without TLS) and
//!   [`identity_of_leaf`].
//! - `bundle`: [`TrustBundles`] snapshots and the reloadable [`TrustBundleSource`].
//! - `serving`: the reloadable [`ServingCert`].
//! - `tls`: [`server_tls_config`] with [`SvidClientVerifier`], and [`client_tls_config`].
//! - [`jwt_svid`]: JWT-SVID verification (bearer tokens behind a TLS-terminating proxy).
//! - [`workload`]: serving SVID and bundles from the SPIFFE Workload API.
//! - [`pki`]: a throwaway CA for `leash dev` and tests.
//! - [`limits`]: the named input-size caps.
//!
//! ## Security defaults
//!
//! - An X509-SVID is accepted only if the leaf obeys X509-SVID.md to the letter (one
//!   URI SAN, a valid non-root SPIFFE ID, not a CA, critical key usage with
//!   digitalSignature and without keyCertSign/cRLSign), every CA certificate presented
//!   after it is a signing CA (cA=true, keyCertSign when it has a key usage
//!   extension, a SPIFFE ID, if any, without a path), **and** its chain validates to
//!   the bundle of the leaf's own trust domain. Nothing is trusted by default.
//! - The api layer re-runs [`verify_svid`] on every call against the bundles of that
//!   moment, so a bundle reload or an expiring SVID reaches open connections too.
//! - Reloads swap whole snapshots; a broken file keeps the last good material.
//! - Only ring is used for cryptography; no key material reaches `Debug` or logs.
//!
//! This module does not know about tonic: the api layer maps [`IdentityError`] to a
//! status.

mod bundle;
mod error;
mod files;
pub mod jwt_svid;
pub mod pattern;
pub mod pki;
mod serving;
pub mod spiffe_id;
mod svid;
mod tls;
pub mod workload;

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests;

use std::time::SystemTime;

use base64::Engine as _;

pub use bundle::{TrustBundleSource, TrustBundles};
pub use error::{IdentityError, SpiffeIdRule, SvidRule};
pub use pattern::IdentityPattern;
pub use serving::ServingCert;
pub use spiffe_id::{SpiffeId, validate_trust_domain};
pub use svid::{chain_valid_until, identity_of_leaf, verify_svid};
pub use tls::{
    RESUMABLE_SESSIONS, SvidClientVerifier, client_tls_config, oauth_tls_config, server_tls_config,
    server_tls_config_without_client_auth,
};

/// Named caps on untrusted input sizes; exceeding one is
/// [`IdentityError::LimitExceeded`] (or [`IdentityError::File`] for files).
pub mod limits {
    /// Longest SPIFFE ID in bytes (SPIFFE-ID.md 2.3).
    pub const MAX_SPIFFE_ID_LEN: usize = 2048;
    /// Longest trust domain name in bytes (SPIFFE-ID.md 2.1).
    pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
    /// Most certificates in a presented chain, leaf included.
    pub const MAX_CHAIN_LEN: usize = 8;
    /// Largest DER certificate in bytes.
    pub const MAX_CERT_DER_LEN: usize = 16 * 1024;
    /// Largest PEM file (bundle, certificate, key) in bytes.
    pub const MAX_PEM_FILE_LEN: usize = 1024 * 1024;
    /// Most certificates in one PEM file.
    pub const MAX_PEM_CERTS: usize = 256;
}

/// A verified caller: a SPIFFE ID plus what was learned verifying its X509-SVID.
///
/// Only [`verify_svid`] and [`identity_of_leaf`] construct one in this crate; the
/// fields are public so other modules and tests can build expected values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The SPIFFE ID from the leaf's URI SAN (never a trust domain root).
    pub spiffe_id: SpiffeId,
    /// The leaf's notAfter: nothing granted to this identity should outlive it.
    pub svid_not_after: SystemTime,
    /// SHA-256 of the leaf certificate's DER, for binding tokens to it (RFC 8705);
    /// `None` when the caller proved itself with a JWT-SVID (no certificate), and
    /// then nothing issued to it is certificate-bound.
    pub thumbprint_s256: Option<[u8; 32]>,
    /// SHA-256 of the leaf's SubjectPublicKeyInfo (DER): the key, whatever
    /// certificate carries it, for binding a task to its key. `None` exactly when
    /// [`thumbprint_s256`](Self::thumbprint_s256) is.
    pub spki_s256: Option<[u8; 32]>,
}

impl Identity {
    /// The trust domain of [`spiffe_id`](Self::spiffe_id).
    pub fn trust_domain(&self) -> &str {
        self.spiffe_id.trust_domain()
    }

    /// The thumbprint as base64url without padding: the RFC 8705 `x5t#S256` value.
    pub fn thumbprint_b64url(&self) -> Option<String> {
        self.thumbprint_s256
            .map(|t| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t))
    }

    /// The public-key digest as base64url without padding.
    pub fn spki_b64url(&self) -> Option<String> {
        self.spki_s256
            .map(|t| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t))
    }
}
