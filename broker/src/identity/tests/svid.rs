use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{BasicConstraints, CustomExtension, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose};
use rustls::pki_types::CertificateDer;

use super::{Ca, DAY, LeafSpec, bundles, ca, intermediate, leaf};
use crate::identity::{
    IdentityError, SpiffeIdRule, SvidRule, TrustBundles, identity_of_leaf,
    limits::{MAX_CERT_DER_LEN, MAX_CHAIN_LEN},
    verify_svid,
};

/// What a case must be rejected with.
#[derive(Debug)]
enum Want {
    Rule(SvidRule),
    /// `ChainInvalid` whose webpki reason contains this text.
    ChainInvalid(&'static str),
    Limit(&'static str),
}

fn check(name: &str, result: Result<crate::identity::Identity, IdentityError>, want: &Want) {
    match (result, want) {
        (Err(IdentityError::InvalidSvid { rule, .. }), Want::Rule(w)) if &rule == w => {}
        (
            Err(IdentityError::InvalidSvid {
                rule: SvidRule::ChainInvalid(why),
                ..
            }),
            Want::ChainInvalid(w),
        ) if why.contains(w) => {}
        (Err(IdentityError::LimitExceeded { what, .. }), Want::Limit(w)) if what.contains(w) => {}
        (got, want) => panic!("{name}: want {want:?}, got {got:?}"),
    }
}

struct World {
    a: Ca,
    b: Ca,
    bundles: TrustBundles,
}

fn world() -> World {
    let a = ca("a.test");
    let b = ca("b.test");
    let bundles = bundles(&[("a.test", &a), ("b.test", &b)]);
    World { a, b, bundles }
}

#[test]
fn valid_svid_is_accepted_with_its_facts() {
    let w = world();
    let spec = LeafSpec::default();
    let (der, _) = leaf(&spec, Some(&w.a));
    let id = verify_svid(std::slice::from_ref(&der), &w.bundles, SystemTime::now()).unwrap();
    assert_eq!(id.spiffe_id.as_str(), "spiffe://a.test/agent/1");
    assert_eq!(id.trust_domain(), "a.test");
    let want_secs = spec.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let got_secs = id
        .svid_not_after
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(got_secs, want_secs);
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    assert_eq!(&id.thumbprint_s256.unwrap()[..], digest.as_ref());
    // RFC 8705 x5t#S256: 32 bytes → 43 base64url characters, no padding.
    let b64 = id.thumbprint_b64url().unwrap();
    assert_eq!(b64.len(), 43);
    assert!(!b64.contains('=') && !b64.contains('+') && !b64.contains('/'));
    // The same leaf, read back as an already-verified peer certificate.
    assert_eq!(identity_of_leaf(&der).unwrap(), id);
}

#[test]
fn valid_variants_are_accepted() {
    let w = world();
    let inter = intermediate(&w.a, "a.test");
    let now = SystemTime::now();
    let cases: Vec<(&str, Vec<CertificateDer<'static>>)> = vec![
        (
            "leaf in b.test",
            vec![leaf(&LeafSpec::uri("spiffe://b.test/svc"), Some(&w.b)).0],
        ),
        (
            "via an intermediate",
            vec![
                leaf(&LeafSpec::default(), Some(&inter)).0,
                inter.der.clone(),
            ],
        ),
        (
            "no EKU extension (clientAuth is required only if EKUs are present)",
            vec![
                leaf(
                    &LeafSpec {
                        ekus: vec![],
                        ..LeafSpec::default()
                    },
                    Some(&w.a),
                )
                .0,
            ],
        ),
        (
            "no basicConstraints extension",
            vec![
                leaf(
                    &LeafSpec {
                        is_ca: IsCa::NoCa,
                        ..LeafSpec::default()
                    },
                    Some(&w.a),
                )
                .0,
            ],
        ),
        (
            "keyEncipherment and keyAgreement beside digitalSignature",
            vec![
                leaf(
                    &LeafSpec {
                        key_usages: vec![
                            KeyUsagePurpose::DigitalSignature,
                            KeyUsagePurpose::KeyEncipherment,
                            KeyUsagePurpose::KeyAgreement,
                        ],
                        ..LeafSpec::default()
                    },
                    Some(&w.a),
                )
                .0,
            ],
        ),
        (
            "a DNS SAN beside the URI SAN",
            vec![
                leaf(
                    &LeafSpec {
                        dns: vec!["agent.local".into()],
                        ..LeafSpec::default()
                    },
                    Some(&w.a),
                )
                .0,
            ],
        ),
        (
            "a 2048-byte SPIFFE ID",
            vec![
                leaf(
                    &LeafSpec::uri(&format!(
                        "spiffe://a.test/{}",
                        "x".repeat(2048 - "spiffe://a.test/".len())
                    )),
                    Some(&w.a),
                )
                .0,
            ],
        ),
    ];
    for (name, chain) in cases {
        if let Err(e) = verify_svid(&chain, &w.bundles, now) {
            panic!("{name}: rejected: {e}");
        }
    }
}

/// A leaf key usage extension that is not marked critical (DER BIT STRING with
/// digitalSignature only).
fn non_critical_key_usage() -> CustomExtension {
    CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80])
}

#[test]
fn bad_certificates_are_rejected_with_the_expected_reason() {
    let w = world();
    let now = SystemTime::now();
    let other_a = ca("a.test"); // a CA for a.test that is not in the bundle
    let inter_b = intermediate(&w.b, "b.test");
    let uri = |u: &str| LeafSpec::uri(u);
    let one = |spec: LeafSpec, signer: &Ca| vec![leaf(&spec, Some(signer)).0];

    let cases: Vec<(&str, Vec<CertificateDer<'static>>, Want)> = vec![
        ("empty chain", vec![], Want::Rule(SvidRule::EmptyChain)),
        (
            "garbage DER",
            vec![CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01])],
            Want::Rule(SvidRule::Malformed(String::new())),
        ),
        (
            "two URI SANs",
            one(
                LeafSpec {
                    uris: vec!["spiffe://a.test/x".into(), "spiffe://a.test/y".into()],
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::Rule(SvidRule::MultipleUriSans(2)),
        ),
        (
            "a SPIFFE URI plus an https URI",
            one(
                LeafSpec {
                    uris: vec!["spiffe://a.test/x".into(), "https://a.test/y".into()],
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::Rule(SvidRule::MultipleUriSans(2)),
        ),
        (
            "no URI SAN (DNS only)",
            one(
                LeafSpec {
                    uris: vec![],
                    dns: vec!["agent.local".into()],
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::Rule(SvidRule::NoUriSan),
        ),
        (
            "no SAN extension at all",
            one(
                LeafSpec {
                    uris: vec![],
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::Rule(SvidRule::NoUriSan),
        ),
        (
            "http scheme",
            one(uri("http://a.test/agent/1"), &w.a),
            Want::Rule(SvidRule::BadSpiffeId(SpiffeIdRule::WrongScheme)),
        ),
        (
            "upper-case trust domain",
            one(uri("spiffe://A.test/agent/1"), &w.a),
            Want::Rule(SvidRule::BadSpiffeId(SpiffeIdRule::TrustDomainUppercase)),
        ),
        (
            "empty path segment",
            one(uri("spiffe://a.test/agent//1"), &w.a),
            Want::Rule(SvidRule::BadSpiffeId(SpiffeIdRule::EmptySegment)),
        ),
        (
            "trailing slash",
            one(uri("spiffe://a.test/agent/"), &w.a),
            Want::Rule(SvidRule::BadSpiffeId(SpiffeIdRule::TrailingSlash)),
        ),
        (
            "dot segment",
            one(uri("spiffe://a.test/agent/../admin"), &w.a),
            Want::Rule(SvidRule::BadSpiffeId(SpiffeIdRule::DotSegment)),
        ),
        (
            "query",
            one(uri("spiffe://a.test/agent?admin=1"), &w.a),
            Want::Rule(SvidRule::BadSpiffeId(SpiffeIdRule::Query)),
        ),
        (
            "fragment",
            one(uri("spiffe://a.test/agent#1"), &w.a),
            Want::Rule(SvidRule::BadSpiffeId(SpiffeIdRule::Fragment)),
        ),
        (
            "port",
            one(uri("spiffe://a.test:443/agent"), &w.a),
            Want::Rule(SvidRule::BadSpiffeId(SpiffeIdRule::Port)),
        ),
        (
            "userinfo",
            one(uri("spiffe://admin@a.test/agent"), &w.a),
            Want::Rule(SvidRule::BadSpiffeId(SpiffeIdRule::Userinfo)),
        ),
        (
            "percent-encoding",
            one(uri("spiffe://a.test/ag%65nt"), &w.a),
            Want::Rule(SvidRule::BadSpiffeId(SpiffeIdRule::PercentEncoding)),
        ),
        (
            "SPIFFE ID over 2048 bytes",
            one(
                uri(&format!(
                    "spiffe://a.test/{}",
                    "x".repeat(2049 - "spiffe://a.test/".len())
                )),
                &w.a,
            ),
            Want::Rule(SvidRule::BadSpiffeId(SpiffeIdRule::TooLong)),
        ),
        (
            "root path (no path)",
            one(uri("spiffe://a.test"), &w.a),
            Want::Rule(SvidRule::RootPath),
        ),
        (
            "leaf is a CA",
            one(
                LeafSpec {
                    is_ca: IsCa::Ca(BasicConstraints::Unconstrained),
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::Rule(SvidRule::LeafIsCa),
        ),
        (
            "keyCertSign set",
            one(
                LeafSpec {
                    key_usages: vec![
                        KeyUsagePurpose::DigitalSignature,
                        KeyUsagePurpose::KeyCertSign,
                    ],
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::Rule(SvidRule::KeyCertSign),
        ),
        (
            "cRLSign set",
            one(
                LeafSpec {
                    key_usages: vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign],
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::Rule(SvidRule::CrlSign),
        ),
        (
            "missing digitalSignature",
            one(
                LeafSpec {
                    key_usages: vec![KeyUsagePurpose::KeyEncipherment],
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::Rule(SvidRule::NoDigitalSignature),
        ),
        (
            "no key usage extension",
            one(
                LeafSpec {
                    key_usages: vec![],
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::Rule(SvidRule::KeyUsageMissing),
        ),
        (
            "key usage not critical",
            one(
                LeafSpec {
                    key_usages: vec![],
                    custom: vec![non_critical_key_usage()],
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::Rule(SvidRule::KeyUsageNotCritical),
        ),
        (
            "signed by another trust domain's CA (b.test CA vouching for a.test)",
            one(LeafSpec::default(), &w.b),
            Want::Rule(SvidRule::UntrustedIssuer),
        ),
        (
            "via another trust domain's intermediate",
            vec![
                leaf(&LeafSpec::default(), Some(&inter_b)).0,
                inter_b.der.clone(),
            ],
            Want::Rule(SvidRule::UntrustedIssuer),
        ),
        (
            "signed by a CA of the right name that is not in the bundle",
            one(LeafSpec::default(), &other_a),
            Want::Rule(SvidRule::UntrustedIssuer),
        ),
        (
            "unknown trust domain",
            one(uri("spiffe://c.test/agent/1"), &w.a),
            Want::Rule(SvidRule::UnknownTrustDomain("c.test".into())),
        ),
        (
            "expired",
            one(
                LeafSpec {
                    not_before: now - 3 * DAY,
                    not_after: now - DAY,
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::Rule(SvidRule::Expired),
        ),
        (
            "not yet valid",
            one(
                LeafSpec {
                    not_before: now + DAY,
                    not_after: now + 3 * DAY,
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::Rule(SvidRule::NotYetValid),
        ),
        (
            "self-signed leaf not in the bundle",
            vec![leaf(&LeafSpec::default(), None).0],
            Want::Rule(SvidRule::UntrustedIssuer),
        ),
        (
            "EKU present without clientAuth",
            one(
                LeafSpec {
                    ekus: vec![ExtendedKeyUsagePurpose::ServerAuth],
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::ChainInvalid("RequiredEku"),
        ),
        (
            "chain longer than the limit",
            std::iter::repeat_n(leaf(&LeafSpec::default(), Some(&w.a)).0, MAX_CHAIN_LEN + 1)
                .collect(),
            Want::Limit("chain length"),
        ),
        (
            "oversize certificate",
            one(
                LeafSpec {
                    dns: (0..400)
                        .map(|i| format!("host-{i:04}.{}.example", "x".repeat(40)))
                        .collect(),
                    ..LeafSpec::default()
                },
                &w.a,
            ),
            Want::Limit("DER size"),
        ),
    ];
    for (name, chain, want) in &cases {
        // Malformed carries parser text; compare by kind only.
        if let Want::Rule(SvidRule::Malformed(_)) = want {
            match verify_svid(chain, &w.bundles, now) {
                Err(IdentityError::InvalidSvid {
                    rule: SvidRule::Malformed(_),
                    ..
                }) => continue,
                other => panic!("{name}: want Malformed, got {other:?}"),
            }
        }
        check(name, verify_svid(chain, &w.bundles, now), want);
    }
    assert!(cases.len() >= 30);
}

#[test]
fn the_oversize_case_is_really_over_the_limit() {
    let w = world();
    let spec = LeafSpec {
        dns: (0..400)
            .map(|i| format!("host-{i:04}.{}.example", "x".repeat(40)))
            .collect(),
        ..LeafSpec::default()
    };
    let (der, _) = leaf(&spec, Some(&w.a));
    assert!(der.as_ref().len() > MAX_CERT_DER_LEN);
    check(
        "identity_of_leaf oversize",
        identity_of_leaf(&der),
        &Want::Limit("DER size"),
    );
}

#[test]
fn validity_is_checked_at_the_given_time_not_the_wall_clock() {
    let w = world();
    let (der, _) = leaf(&LeafSpec::default(), Some(&w.a));
    let chain = [der];
    let now = SystemTime::now();
    assert!(verify_svid(&chain, &w.bundles, now).is_ok());
    check(
        "future",
        verify_svid(&chain, &w.bundles, now + 2 * DAY),
        &Want::Rule(SvidRule::Expired),
    );
    check(
        "past",
        verify_svid(&chain, &w.bundles, now - 2 * DAY),
        &Want::Rule(SvidRule::NotYetValid),
    );
    // A clock before the epoch fails closed.
    check(
        "pre-epoch clock",
        verify_svid(&chain, &w.bundles, UNIX_EPOCH - DAY),
        &Want::Rule(SvidRule::NotYetValid),
    );
}

#[test]
fn an_expired_intermediate_fails_the_chain() {
    let root = ca("a.test");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.not_before = (SystemTime::now() - 5 * DAY).into();
    params.not_after = (SystemTime::now() - DAY).into();
    let inter_cert = params.signed_by(&key, &root.issuer).unwrap();
    let inter = Ca {
        der: inter_cert.der().clone(),
        pem: inter_cert.pem(),
        issuer: rcgen::Issuer::new(params, key),
    };
    let b = bundles(&[("a.test", &root)]);
    let chain = [
        leaf(&LeafSpec::default(), Some(&inter)).0,
        inter.der.clone(),
    ];
    check(
        "expired intermediate",
        verify_svid(&chain, &b, SystemTime::now()),
        &Want::Rule(SvidRule::Expired),
    );
}

#[test]
fn identity_of_leaf_rechecks_leaf_rules_but_not_trust() {
    let w = world();
    // Not trusted by anyone, but a well-formed SVID: identity_of_leaf is for leaves a
    // verifier already accepted, so it extracts the facts.
    let (self_signed, _) = leaf(&LeafSpec::default(), None);
    assert_eq!(
        identity_of_leaf(&self_signed).unwrap().spiffe_id.as_str(),
        "spiffe://a.test/agent/1"
    );
    let cases: Vec<(&str, LeafSpec, SvidRule)> = vec![
        (
            "root path",
            LeafSpec::uri("spiffe://a.test"),
            SvidRule::RootPath,
        ),
        (
            "two URIs",
            LeafSpec {
                uris: vec!["spiffe://a.test/x".into(), "spiffe://a.test/y".into()],
                ..LeafSpec::default()
            },
            SvidRule::MultipleUriSans(2),
        ),
        (
            "CA",
            LeafSpec {
                is_ca: IsCa::Ca(BasicConstraints::Unconstrained),
                ..LeafSpec::default()
            },
            SvidRule::LeafIsCa,
        ),
        (
            "bad ID",
            LeafSpec::uri("spiffe://a.test/a/./b"),
            SvidRule::BadSpiffeId(SpiffeIdRule::DotSegment),
        ),
    ];
    for (name, spec, rule) in cases {
        let (der, _) = leaf(&spec, Some(&w.a));
        check(name, identity_of_leaf(&der), &Want::Rule(rule));
    }
}

#[test]
fn rejection_messages_name_the_id_and_the_rule() {
    let w = world();
    let (der, _) = leaf(&LeafSpec::default(), Some(&w.b));
    let msg = verify_svid(&[der], &w.bundles, SystemTime::now())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("spiffe://a.test/agent/1"), "{msg}");
    assert!(
        msg.contains("trust anchor of the leaf's trust domain"),
        "{msg}"
    );
    let (der, _) = leaf(
        &LeafSpec {
            uris: vec![],
            ..LeafSpec::default()
        },
        Some(&w.a),
    );
    let msg = verify_svid(&[der], &w.bundles, SystemTime::now())
        .unwrap_err()
        .to_string();
    assert_eq!(msg, "invalid X509-SVID: leaf has no URI SAN");
}

#[test]
fn bundles_refuse_non_ca_anchors_and_bad_names() {
    let w = world();
    let (leaf_der, _) = leaf(&LeafSpec::default(), None);
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            leaf_der.as_ref()
        )
    );
    let err = TrustBundles::from_pem([("a.test", pem.as_bytes())]).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");
    assert!(TrustBundles::from_pem([("A.test", w.a.pem.as_bytes())]).is_err());
    assert!(TrustBundles::from_pem([("a.test", b"no pem here".as_slice())]).is_err());
    let ok = TrustBundles::from_pem([("a.test", w.a.pem.as_bytes())]).unwrap();
    assert_eq!(ok.trust_domains().collect::<Vec<_>>(), ["a.test"]);
    assert_eq!(ok.certificates("a.test").unwrap()[0], w.a.der);
    assert!(ok.anchors("b.test").is_none());
}

#[test]
fn der_bundles_from_the_workload_api_keep_the_size_limits() {
    use crate::identity::limits::{MAX_CERT_DER_LEN, MAX_PEM_CERTS};
    let w = world();
    let too_many = vec![w.a.der.clone(); MAX_PEM_CERTS + 1];
    let err = TrustBundles::from_der([("a.test".to_owned(), too_many)]).unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    let huge = CertificateDer::from(vec![0x30; MAX_CERT_DER_LEN + 1]);
    let err = TrustBundles::from_der([("a.test".to_owned(), vec![huge])]).unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    let ok = TrustBundles::from_der([("a.test".to_owned(), vec![w.a.der.clone()])]).unwrap();
    assert_eq!(ok.trust_domains().collect::<Vec<_>>(), ["a.test"]);
}
