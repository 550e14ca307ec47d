//! The security kernel: X509-SVID leaf rules and chain verification.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::{extensions::GeneralName, prelude::X509Certificate};

use super::{
    Identity,
    bundle::TrustBundles,
    error::{IdentityError, SvidRule},
    limits::{MAX_CERT_DER_LEN, MAX_CHAIN_LEN},
    spiffe_id::SpiffeId,
};

/// What the leaf rules establish about a leaf, before any chain validation.
struct Leaf {
    spiffe_id: SpiffeId,
    not_after: SystemTime,
    spki_s256: [u8; 32],
}

/// Verifies an X509-SVID chain (leaf first, then any intermediates) at `now`.
///
/// On success the leaf obeys every X509-SVID leaf rule (one URI SAN holding a valid
/// SPIFFE ID with a non-root path; not a CA; critical key usage with `digitalSignature`
/// and neither `keyCertSign` nor `cRLSign`); every certificate presented after the
/// leaf is a signing CA (basicConstraints `cA=true`; `keyCertSign` whenever it has a
/// key usage extension; a SPIFFE ID, if it carries one, without a path); and the
/// chain validates with webpki, ring signature algorithms and EKU clientAuth
/// required-if-present, to a trust anchor of the leaf's **own** trust domain, every
/// certificate valid at `now`.
///
/// The intermediate rules apply to every presented certificate, not only to those
/// webpki ends up using, so a peer cannot slip an unfit CA past the check by
/// offering it beside a fit one; webpki itself ignores key usage on CAs.
///
/// # Errors
///
/// [`IdentityError::LimitExceeded`] when the chain is longer than
/// [`MAX_CHAIN_LEN`](super::limits::MAX_CHAIN_LEN) or a certificate is larger than
/// [`MAX_CERT_DER_LEN`](super::limits::MAX_CERT_DER_LEN);
/// [`IdentityError::InvalidSvid`] naming the rule that failed otherwise.
#[tracing::instrument(skip_all, name = "identity.verify_svid")]
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundles: &TrustBundles,
    now: SystemTime,
) -> Result<Identity, IdentityError> {
    check_sizes(chain)?;
    let Some(leaf_der) = chain.first() else {
        return Err(svid_error(None, SvidRule::EmptyChain));
    };
    let leaf = inspect_leaf(leaf_der)?;
    let fail = |rule| svid_error(Some(&leaf.spiffe_id), rule);
    for (i, der) in chain.iter().enumerate().skip(1) {
        inspect_signing_cert(der, i).map_err(fail)?;
    }

    let td = leaf.spiffe_id.trust_domain();
    // Anchors come from the leaf's own trust domain only: a CA trusted for another
    // domain must not be able to vouch for this one.
    let anchors = bundles
        .anchors(td)
        .ok_or_else(|| fail(SvidRule::UnknownTrustDomain(td.to_owned())))?;

    let ee = webpki::EndEntityCert::try_from(leaf_der)
        .map_err(|e| fail(SvidRule::Malformed(e.to_string())))?;
    // A clock before 1970 cannot be right; epoch zero makes every certificate
    // not-yet-valid, so the check fails closed.
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    ee.verify_for_usage(
        algs,
        anchors,
        &chain[1..],
        UnixTime::since_unix_epoch(since_epoch),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| fail(rule_of_webpki(&e)))?;

    Ok(identity(leaf, leaf_der))
}

/// The earliest notAfter among the certificates of `chain`: a verdict of
/// [`verify_svid`] on this chain (against unchanged bundles) holds at most until
/// then. `None` if a certificate does not parse or has a notAfter before 1970;
/// a caller then must not reuse the verdict at all.
pub fn chain_valid_until(chain: &[CertificateDer<'_>]) -> Option<SystemTime> {
    let mut until: Option<SystemTime> = None;
    for der in chain {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
        let t = UNIX_EPOCH + Duration::from_secs(secs);
        until = Some(until.map_or(t, |u| u.min(t)));
    }
    until
}

/// Extracts the [`Identity`] of a leaf that a TLS stack has already verified (for
/// example `tonic::Request::peer_certs()` behind [`server_tls_config`](super::server_tls_config)).
///
/// It re-checks the X509-SVID leaf rules (so a misconfigured stack cannot hand over a
/// non-SVID) but does **not** validate the chain or the validity period: only use it on
/// certificates that a verifier such as [`SvidClientVerifier`](super::SvidClientVerifier)
/// accepted.
///
/// # Errors
///
/// [`IdentityError::LimitExceeded`] for an oversize certificate;
/// [`IdentityError::InvalidSvid`] naming the leaf rule that failed.
pub fn identity_of_leaf(leaf: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
    check_sizes(std::slice::from_ref(leaf))?;
    let facts = inspect_leaf(leaf)?;
    Ok(identity(facts, leaf))
}

fn identity(leaf: Leaf, der: &CertificateDer<'_>) -> Identity {
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    let mut thumbprint_s256 = [0u8; 32];
    thumbprint_s256.copy_from_slice(digest.as_ref());
    Identity {
        spiffe_id: leaf.spiffe_id,
        svid_not_after: leaf.not_after,
        thumbprint_s256: Some(thumbprint_s256),
        spki_s256: Some(leaf.spki_s256),
    }
}

fn check_sizes(chain: &[CertificateDer<'_>]) -> Result<(), IdentityError> {
    if chain.len() > MAX_CHAIN_LEN {
        return Err(IdentityError::LimitExceeded {
            what: "certificate chain length",
            limit: MAX_CHAIN_LEN,
            actual: chain.len(),
        });
    }
    for cert in chain {
        if cert.as_ref().len() > MAX_CERT_DER_LEN {
            return Err(IdentityError::LimitExceeded {
                what: "certificate DER size in bytes",
                limit: MAX_CERT_DER_LEN,
                actual: cert.as_ref().len(),
            });
        }
    }
    Ok(())
}

fn svid_error(id: Option<&SpiffeId>, rule: SvidRule) -> IdentityError {
    IdentityError::InvalidSvid {
        spiffe_id: id.map(ToString::to_string),
        rule,
    }
}

/// Applies the X509-SVID leaf rules (X509-SVID.md 2, 3.1, 4.1, 4.3, 5.2).
fn inspect_leaf(der: &CertificateDer<'_>) -> Result<Leaf, IdentityError> {
    let malformed = |why: String| svid_error(None, SvidRule::Malformed(why));
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{} trailing bytes", rest.len())));
    }

    let spiffe_id = leaf_spiffe_id(&cert)?;
    let fail = |rule| svid_error(Some(&spiffe_id), rule);
    if spiffe_id.is_root() {
        return Err(fail(SvidRule::RootPath));
    }

    let bc = cert
        .basic_constraints()
        .map_err(|e| fail(SvidRule::Malformed(e.to_string())))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(fail(SvidRule::LeafIsCa));
    }

    let ku = cert
        .key_usage()
        .map_err(|e| fail(SvidRule::Malformed(e.to_string())))?
        .ok_or_else(|| fail(SvidRule::KeyUsageMissing))?;
    if ku.value.key_cert_sign() {
        return Err(fail(SvidRule::KeyCertSign));
    }
    if ku.value.crl_sign() {
        return Err(fail(SvidRule::CrlSign));
    }
    if !ku.value.digital_signature() {
        return Err(fail(SvidRule::NoDigitalSignature));
    }
    // X509-SVID.md 4.3: "MUST be marked critical".
    if !ku.critical {
        return Err(fail(SvidRule::KeyUsageNotCritical));
    }

    let not_after = u64::try_from(cert.validity().not_after.timestamp())
        .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
        .map_err(|_| fail(SvidRule::Expired))?;
    let spki = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    let mut spki_s256 = [0u8; 32];
    spki_s256.copy_from_slice(spki.as_ref());
    Ok(Leaf {
        spiffe_id,
        not_after,
        spki_s256,
    })
}

/// Applies the signing-certificate rules (RFC 5280 4.2.1.3 and 4.2.1.9, X509-SVID.md
/// 3.2 and 4.3) to intermediate #`n` (1 is the one next to the leaf).
fn inspect_signing_cert(der: &CertificateDer<'_>, n: usize) -> Result<(), SvidRule> {
    let malformed = |why: String| SvidRule::Malformed(format!("intermediate #{n}: {why}"));
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{} trailing bytes", rest.len())));
    }
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| malformed(e.to_string()))?
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(SvidRule::IntermediateNotCa(n));
    }
    // Without the extension every usage is allowed (RFC 5280 4.2.1.3).
    if let Some(ku) = cert.key_usage().map_err(|e| malformed(e.to_string()))?
        && !ku.value.key_cert_sign()
    {
        return Err(SvidRule::IntermediateNoKeyCertSign(n));
    }
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| malformed(e.to_string()))?
    else {
        return Ok(());
    };
    for name in &san.value.general_names {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        // Other URIs say nothing about SPIFFE; any spelling of the scheme is judged.
        let is_spiffe = uri
            .split_once(':')
            .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("spiffe"));
        if !is_spiffe {
            continue;
        }
        let id = SpiffeId::parse(uri).map_err(|e| match e {
            IdentityError::InvalidSpiffeId { rule, .. } => {
                SvidRule::IntermediateBadSpiffeId(n, rule)
            }
            other => malformed(other.to_string()),
        })?;
        if !id.is_root() {
            return Err(SvidRule::IntermediateIdHasPath(n));
        }
    }
    Ok(())
}

fn leaf_spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, IdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| svid_error(None, SvidRule::Malformed(e.to_string())))?
        .ok_or_else(|| svid_error(None, SvidRule::NoUriSan))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(svid_error(None, SvidRule::NoUriSan)),
        [uri] => SpiffeId::parse(uri).map_err(|e| match e {
            IdentityError::InvalidSpiffeId { rule, .. } => {
                svid_error(None, SvidRule::BadSpiffeId(rule))
            }
            other => other,
        }),
        many => Err(svid_error(None, SvidRule::MultipleUriSans(many.len()))),
    }
}

fn rule_of_webpki(e: &webpki::Error) -> SvidRule {
    match e {
        webpki::Error::CertExpired { .. } => SvidRule::Expired,
        webpki::Error::CertNotValidYet { .. } => SvidRule::NotYetValid,
        // webpki reports a bad signature when an issuer with the right name but the
        // wrong key is found (for example a rotated-out CA): either way no anchor of
        // this trust domain vouches for the leaf.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            SvidRule::UntrustedIssuer
        }
        other => SvidRule::ChainInvalid(format!("{other:?}")),
    }
}
