//! Rules for the CA certificates between a leaf and its trust anchor (RFC 5280
//! 4.2.1.3 and 4.2.1.9, X509-SVID.md 3.2 and 4.3): each is a CA, carries
//! keyCertSign when it has a key usage extension, and its SPIFFE ID (if any) has
//! no path. Table-driven: one row per rule, each with a passing control.

use std::time::SystemTime;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

use super::{Ca, DAY, LeafSpec, bundles, ca, leaf};
use crate::identity::verify_svid;

/// An intermediate CA for `a.test` signed by `parent`, built from valid signing-CA
/// parameters with `change` applied.
fn intermediate_with(parent: &Ca, name: &str, change: impl FnOnce(&mut CertificateParams)) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("intermediate {name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI("spiffe://a.test".try_into().unwrap())];
    params.not_before = (SystemTime::now() - DAY).into();
    params.not_after = (SystemTime::now() + DAY).into();
    params.use_authority_key_identifier_extension = true;
    change(&mut params);
    let cert = params.signed_by(&key, &parent.issuer).unwrap();
    Ca {
        der: cert.der().clone(),
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// (name, how the intermediate differs from a valid one, words the rejection must hold;
/// `None` when the chain must be accepted).
type Row = (
    &'static str,
    fn(&mut CertificateParams),
    Option<&'static str>,
);

fn rows() -> Vec<Row> {
    vec![
        ("valid signing CA", |_| {}, None),
        (
            "no key usage extension (all usages allowed, RFC 5280 4.2.1.3)",
            |p| p.key_usages.clear(),
            None,
        ),
        ("no URI SAN", |p| p.subject_alt_names.clear(), None),
        (
            "a non-SPIFFE URI SAN",
            |p| p.subject_alt_names = vec![uri("https://ca.a.test/")],
            None,
        ),
        (
            "key usage without keyCertSign",
            |p| p.key_usages = vec![KeyUsagePurpose::CrlSign],
            Some("intermediate #1 key usage lacks keyCertSign"),
        ),
        (
            "key usage digitalSignature only",
            |p| p.key_usages = vec![KeyUsagePurpose::DigitalSignature],
            Some("intermediate #1 key usage lacks keyCertSign"),
        ),
        (
            "not a CA (cA=false)",
            |p| p.is_ca = IsCa::ExplicitNoCa,
            Some("intermediate #1 is not a CA"),
        ),
        (
            "no basic constraints",
            |p| p.is_ca = IsCa::NoCa,
            Some("intermediate #1 is not a CA"),
        ),
        (
            "SPIFFE ID with a path",
            |p| p.subject_alt_names = vec![uri("spiffe://a.test/ca/issuing")],
            Some("intermediate #1 SPIFFE ID has a path"),
        ),
        (
            "malformed SPIFFE ID",
            |p| p.subject_alt_names = vec![uri("spiffe://A.test")],
            Some("intermediate #1 URI SAN is not a SPIFFE ID"),
        ),
    ]
}

#[test]
fn every_ca_between_leaf_and_anchor_must_be_a_signing_ca() {
    let root = ca("a.test");
    let b = bundles(&[("a.test", &root)]);
    let mut wrong = Vec::new();
    for (name, change, want) in rows() {
        let inter = intermediate_with(&root, name, change);
        let chain = [
            leaf(&LeafSpec::default(), Some(&inter)).0,
            inter.der.clone(),
        ];
        let got = verify_svid(&chain, &b, SystemTime::now());
        match (want, &got) {
            (None, Ok(_)) => {}
            (Some(words), Err(e)) if e.to_string().contains(words) => {}
            _ => wrong.push(format!("{name}: want {want:?}, got {got:?}")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_rule_holds_for_every_intermediate_of_a_longer_chain() {
    let root = ca("a.test");
    let b = bundles(&[("a.test", &root)]);
    // root → upper (no keyCertSign) → lower (valid) → leaf: the upper one breaks it.
    let upper = intermediate_with(&root, "upper", |p| {
        p.key_usages = vec![KeyUsagePurpose::CrlSign];
    });
    let lower = intermediate_with(&upper, "lower", |_| {});
    let chain = [
        leaf(&LeafSpec::default(), Some(&lower)).0,
        lower.der.clone(),
        upper.der.clone(),
    ];
    let err = verify_svid(&chain, &b, SystemTime::now()).unwrap_err();
    assert!(
        err.to_string()
            .contains("intermediate #2 key usage lacks keyCertSign"),
        "{err}"
    );
    // The same shape with a valid upper CA is accepted (the control).
    let upper = intermediate_with(&root, "upper", |_| {});
    let lower = intermediate_with(&upper, "lower", |_| {});
    let chain = [
        leaf(&LeafSpec::default(), Some(&lower)).0,
        lower.der.clone(),
        upper.der.clone(),
    ];
    verify_svid(&chain, &b, SystemTime::now()).unwrap();
}
