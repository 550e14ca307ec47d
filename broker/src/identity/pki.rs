//! Throwaway PKI for `leash dev` and tests: a CA per trust domain that issues
//! X509-SVIDs and a loopback server certificate. Never use it in production: the CA
//! key lives only in memory and nothing here is rotated.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::{error::IdentityError, spiffe_id::SpiffeId, spiffe_id::validate_trust_domain};

// Issued certificates start a little in the past so small clock skew between the
// process that issues and the one that verifies does not make them "not yet valid".
const BACKDATE: Duration = Duration::from_secs(300);

fn pki_error(e: impl fmt::Display) -> IdentityError {
    IdentityError::Pki(e.to_string())
}

/// A PEM certificate and its PEM (PKCS#8) private key.
///
/// `Debug` prints the certificate only, never the key.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8). Secret.
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"...")
            .finish()
    }
}

/// A throwaway certificate authority for one trust domain (ECDSA P-256).
///
/// Guarantees: its certificate is an X509-SVID signing certificate (cA=true, key usage
/// keyCertSign + cRLSign, URI SAN `spiffe://<td>`), usable as that trust domain's
/// bundle; what it issues passes [`verify_svid`](super::verify_svid) against that
/// bundle while within its validity.
pub struct DevCa {
    trust_domain: String,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl DevCa {
    /// Generates a CA for `trust_domain`, valid from five minutes ago for `validity`.
    ///
    /// # Errors
    ///
    /// [`IdentityError::InvalidSpiffeId`] for a bad trust domain name;
    /// [`IdentityError::Pki`] when key generation or signing fails.
    pub fn generate(trust_domain: &str, validity: Duration) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::generate().map_err(pki_error)?;
        let mut params = base_params(validity)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Leash dev CA {trust_domain}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{trust_domain}"))?];
        let cert = params.self_signed(&key).map_err(pki_error)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The trust domain this CA vouches for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate, PEM: the trust bundle for [`trust_domain`](Self::trust_domain).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues an X509-SVID for `id`: one URI SAN, critical key usage digitalSignature,
    /// EKU clientAuth + serverAuth, cA=false, valid from five minutes ago for `validity`.
    ///
    /// # Errors
    ///
    /// [`IdentityError::Pki`] when `id` is outside this CA's trust domain or names the
    /// trust domain root, or when signing fails.
    pub fn issue_svid(
        &self,
        id: &SpiffeId,
        validity: Duration,
    ) -> Result<IssuedCert, IdentityError> {
        if id.trust_domain() != self.trust_domain {
            return Err(IdentityError::Pki(format!(
                "{id} is outside this CA's trust domain {}",
                self.trust_domain
            )));
        }
        if id.is_root() {
            return Err(IdentityError::Pki(format!(
                "{id} has no path; an X509-SVID must name a workload"
            )));
        }
        let mut params = base_params(validity)?;
        params.subject_alt_names = vec![uri_san(id.as_str())?];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        self.issue(params)
    }

    /// Issues a server certificate for the loopback broker: DNS SAN `localhost`, IP SAN
    /// `127.0.0.1`, EKU serverAuth, valid from five minutes ago for `validity`.
    ///
    /// # Errors
    ///
    /// [`IdentityError::Pki`] when signing fails.
    pub fn issue_server_cert(&self, validity: Duration) -> Result<IssuedCert, IdentityError> {
        let mut params = base_params(validity)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().map_err(pki_error)?),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// Issues an X509-SVID for a server (such as the broker) that clients dial by
    /// name: the URI SAN `id`, plus DNS SAN `localhost` and IP SAN `127.0.0.1` so
    /// clients verifying a host name accept it; EKU serverAuth and clientAuth.
    ///
    /// # Errors
    ///
    /// As [`issue_svid`](Self::issue_svid).
    pub fn issue_serving_svid(
        &self,
        id: &SpiffeId,
        validity: Duration,
    ) -> Result<IssuedCert, IdentityError> {
        if id.trust_domain() != self.trust_domain || id.is_root() {
            return Err(IdentityError::Pki(format!(
                "{id} is not a workload of trust domain {}",
                self.trust_domain
            )));
        }
        let mut params = base_params(validity)?;
        params.subject_alt_names = vec![
            uri_san(id.as_str())?,
            SanType::DnsName("localhost".try_into().map_err(pki_error)?),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Result<IssuedCert, IdentityError> {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(pki_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(pki_error)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("trust_domain", &self.trust_domain)
            .field("key", &"...")
            .finish()
    }
}

fn base_params(validity: Duration) -> Result<CertificateParams, IdentityError> {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    // rcgen's default subject is a placeholder CN; an SVID needs no subject.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.not_before = now
        .checked_sub(BACKDATE)
        .ok_or_else(|| IdentityError::Pki("clock before the epoch".into()))?
        .into();
    params.not_after = now
        .checked_add(validity)
        .ok_or_else(|| IdentityError::Pki("validity overflows the clock".into()))?
        .into();
    Ok(params)
}

fn uri_san(uri: &str) -> Result<SanType, IdentityError> {
    Ok(SanType::URI(uri.try_into().map_err(pki_error)?))
}
