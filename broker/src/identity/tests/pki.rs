use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, pem::PemObject};

use crate::identity::{IdentityError, SpiffeId, TrustBundles, pki::DevCa, verify_svid};

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn dev_ca_issues_svids_that_verify() {
    let dev = DevCa::generate("dev.leash", HOUR).unwrap();
    assert_eq!(dev.trust_domain(), "dev.leash");
    let id = SpiffeId::parse("spiffe://dev.leash/agent/sample").unwrap();
    let svid = dev.issue_svid(&id, HOUR).unwrap();
    let bundles = TrustBundles::from_pem([("dev.leash", dev.cert_pem().as_bytes())]).unwrap();
    let leaf = CertificateDer::from_pem_slice(svid.cert_pem.as_bytes()).unwrap();
    let identity = verify_svid(&[leaf], &bundles, SystemTime::now()).unwrap();
    assert_eq!(identity.spiffe_id, id);
    // Expires after the requested validity, not before.
    assert!(identity.svid_not_after > SystemTime::now() + HOUR - Duration::from_secs(60));
    assert!(identity.svid_not_after <= SystemTime::now() + HOUR);
    // Keys are PKCS#8 PEM and never shown by Debug.
    assert!(svid.key_pem.contains("BEGIN PRIVATE KEY"));
    assert!(!format!("{svid:?}").contains("PRIVATE KEY"));
    assert!(!format!("{dev:?}").contains("PRIVATE KEY"));
}

#[test]
fn dev_ca_refuses_what_would_not_be_an_svid() {
    let dev = DevCa::generate("dev.leash", HOUR).unwrap();
    let other = SpiffeId::parse("spiffe://other/agent").unwrap();
    assert!(matches!(
        dev.issue_svid(&other, HOUR),
        Err(IdentityError::Pki(_))
    ));
    let root = SpiffeId::parse("spiffe://dev.leash").unwrap();
    assert!(matches!(
        dev.issue_svid(&root, HOUR),
        Err(IdentityError::Pki(_))
    ));
    assert!(matches!(
        DevCa::generate("Dev.Leash", HOUR),
        Err(IdentityError::InvalidSpiffeId { .. })
    ));
}

#[test]
fn dev_server_cert_names_loopback() {
    let dev = DevCa::generate("dev.leash", HOUR).unwrap();
    let server = dev.issue_server_cert(HOUR).unwrap();
    let der = CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap();
    let ee = webpki::EndEntityCert::try_from(&der).unwrap();
    for name in ["localhost", "127.0.0.1"] {
        let name = rustls::pki_types::ServerName::try_from(name).unwrap();
        ee.verify_is_valid_for_subject_name(&name).unwrap();
    }
    let other = rustls::pki_types::ServerName::try_from("example.com").unwrap();
    assert!(ee.verify_is_valid_for_subject_name(&other).is_err());
}
