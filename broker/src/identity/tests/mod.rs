//! Tests for the identity module. Certificates are generated with rcgen per test; no
//! fixtures come from outside.

mod chain;
mod pattern;
mod pki;
mod reload;
mod robustness;
mod spiffe_id;
mod svid;
mod tls;

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

use super::TrustBundles;

pub(super) const DAY: Duration = Duration::from_secs(86_400);

/// A test CA: its certificate and an issuer for signing below it.
pub(super) struct Ca {
    pub der: CertificateDer<'static>,
    pub pem: String,
    pub issuer: Issuer<'static, KeyPair>,
}

fn ca_params(td: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{td}").as_str().try_into().unwrap(),
    )];
    params.not_before = (SystemTime::now() - 10 * DAY).into();
    params.not_after = (SystemTime::now() + 10 * DAY).into();
    params
}

/// A self-signed root CA for `td`.
pub(super) fn ca(td: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = ca_params(td);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("root {td}"));
    let cert = params.self_signed(&key).unwrap();
    Ca {
        der: cert.der().clone(),
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// An intermediate CA for `td` signed by `parent`.
pub(super) fn intermediate(parent: &Ca, td: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = ca_params(td);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("intermediate {td}"));
    let cert = params.signed_by(&key, &parent.issuer).unwrap();
    Ca {
        der: cert.der().clone(),
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// What to put in a leaf; `LeafSpec::default()` is a valid SVID for
/// `spiffe://a.test/agent/1`.
#[derive(Clone)]
pub(super) struct LeafSpec {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub is_ca: IsCa,
    pub key_usages: Vec<KeyUsagePurpose>,
    pub ekus: Vec<ExtendedKeyUsagePurpose>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub custom: Vec<CustomExtension>,
}

impl Default for LeafSpec {
    fn default() -> Self {
        Self {
            uris: vec!["spiffe://a.test/agent/1".into()],
            dns: vec![],
            is_ca: IsCa::ExplicitNoCa,
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
            ekus: vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
            not_before: SystemTime::now() - DAY,
            not_after: SystemTime::now() + DAY,
            custom: vec![],
        }
    }
}

impl LeafSpec {
    pub fn uri(uri: &str) -> Self {
        Self {
            uris: vec![uri.into()],
            ..Self::default()
        }
    }
}

/// Issues a leaf per `spec`, signed by `signer` or self-signed when `None`.
pub(super) fn leaf(spec: &LeafSpec, signer: Option<&Ca>) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = spec
        .uris
        .iter()
        .map(|u| SanType::URI(u.as_str().try_into().unwrap()))
        .chain(
            spec.dns
                .iter()
                .map(|d| SanType::DnsName(d.as_str().try_into().unwrap())),
        )
        .collect();
    params.is_ca = spec.is_ca;
    params.key_usages = spec.key_usages.clone();
    params.extended_key_usages = spec.ekus.clone();
    params.not_before = spec.not_before.into();
    params.not_after = spec.not_after.into();
    params.custom_extensions = spec.custom.clone();
    params.use_authority_key_identifier_extension = signer.is_some();
    let cert = match signer {
        Some(ca) => params.signed_by(&key, &ca.issuer).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    (cert.der().clone(), key)
}

/// Bundles from (trust domain, CA) pairs.
pub(super) fn bundles(cas: &[(&str, &Ca)]) -> TrustBundles {
    TrustBundles::from_pem(cas.iter().map(|(td, ca)| (*td, ca.pem.as_bytes()))).unwrap()
}
