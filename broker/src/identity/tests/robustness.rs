//! Error texts, small helpers, and tampering: whatever bytes change, nothing forged is
//! accepted and nothing panics.

use std::time::SystemTime;

use rustls::pki_types::CertificateDer;

use super::{LeafSpec, bundles, ca, intermediate, leaf};
use crate::identity::{
    Identity, IdentityError, SpiffeId, SpiffeIdRule, SvidRule, error::truncate_for_log,
    identity_of_leaf, limits::MAX_CHAIN_LEN, verify_svid,
};

#[test]
fn every_byte_flip_of_a_valid_svid_is_rejected_without_panicking() {
    let a = ca("a.test");
    let b = bundles(&[("a.test", &a)]);
    let (der, _) = leaf(&LeafSpec::default(), Some(&a));
    let now = SystemTime::now();
    assert!(verify_svid(std::slice::from_ref(&der), &b, now).is_ok());
    for i in 0..der.as_ref().len() {
        for mask in [0x01u8, 0x80] {
            let mut bytes = der.as_ref().to_vec();
            bytes[i] ^= mask;
            let tampered = CertificateDer::from(bytes);
            assert!(
                verify_svid(std::slice::from_ref(&tampered), &b, now).is_err(),
                "byte {i} ^ {mask:#x} was accepted"
            );
            // Must not panic either (the result may be Ok: no chain check here).
            let _ = identity_of_leaf(&tampered);
        }
    }
}

#[test]
fn truncated_and_empty_der_are_malformed() {
    let a = ca("a.test");
    let b = bundles(&[("a.test", &a)]);
    let (der, _) = leaf(&LeafSpec::default(), Some(&a));
    let now = SystemTime::now();
    for len in [0, 1, 2, 10, der.as_ref().len() / 2, der.as_ref().len() - 1] {
        let cut = CertificateDer::from(der.as_ref()[..len].to_vec());
        match verify_svid(&[cut], &b, now) {
            Err(IdentityError::InvalidSvid {
                rule: SvidRule::Malformed(_),
                ..
            }) => {}
            other => panic!("truncated to {len}: {other:?}"),
        }
    }
    let mut trailing = der.as_ref().to_vec();
    trailing.push(0);
    match identity_of_leaf(&CertificateDer::from(trailing)) {
        Err(IdentityError::InvalidSvid {
            rule: SvidRule::Malformed(why),
            ..
        }) => {
            assert!(why.contains("trailing"), "{why}");
        }
        other => panic!("trailing byte: {other:?}"),
    }
}

#[test]
fn chain_length_limit_is_inclusive() {
    // root → i1 → … → i7 → leaf: the leaf plus seven intermediates is exactly the limit.
    let root = ca("a.test");
    let b = bundles(&[("a.test", &root)]);
    let mut cas = vec![intermediate(&root, "a.test")];
    while cas.len() < MAX_CHAIN_LEN - 1 {
        let next = intermediate(cas.last().unwrap(), "a.test");
        cas.push(next);
    }
    let (leaf_der, _) = leaf(&LeafSpec::default(), cas.last());
    let mut chain = vec![leaf_der];
    chain.extend(cas.iter().rev().map(|c| c.der.clone()));
    assert_eq!(chain.len(), MAX_CHAIN_LEN);
    let verdict = verify_svid(&chain, &b, SystemTime::now());
    // webpki has its own path-depth budget; either it accepts, or it refuses for depth,
    // but our limit must not be what refuses a chain of exactly MAX_CHAIN_LEN.
    assert!(
        !matches!(verdict, Err(IdentityError::LimitExceeded { .. })),
        "{verdict:?}"
    );
    chain.push(root.der.clone());
    assert!(matches!(
        verify_svid(&chain, &b, SystemTime::now()),
        Err(IdentityError::LimitExceeded { limit: MAX_CHAIN_LEN, actual, .. }) if actual == MAX_CHAIN_LEN + 1
    ));
}

#[test]
fn rule_texts_are_distinct_and_non_empty() {
    use SpiffeIdRule::*;
    let id_rules = [
        Empty,
        TooLong,
        WrongScheme,
        TrustDomainEmpty,
        TrustDomainTooLong,
        TrustDomainUppercase,
        TrustDomainChar,
        Userinfo,
        Port,
        Query,
        Fragment,
        PercentEncoding,
        EmptySegment,
        TrailingSlash,
        DotSegment,
        PathChar,
    ];
    let texts: std::collections::BTreeSet<String> =
        id_rules.iter().map(ToString::to_string).collect();
    assert_eq!(texts.len(), id_rules.len());
    let svid_rules = [
        SvidRule::EmptyChain,
        SvidRule::Malformed("x".into()),
        SvidRule::NoUriSan,
        SvidRule::MultipleUriSans(3),
        SvidRule::BadSpiffeId(Port),
        SvidRule::RootPath,
        SvidRule::LeafIsCa,
        SvidRule::KeyUsageMissing,
        SvidRule::KeyUsageNotCritical,
        SvidRule::NoDigitalSignature,
        SvidRule::KeyCertSign,
        SvidRule::CrlSign,
        SvidRule::UnknownTrustDomain("c.test".into()),
        SvidRule::Expired,
        SvidRule::NotYetValid,
        SvidRule::UntrustedIssuer,
        SvidRule::ChainInvalid("why".into()),
        SvidRule::IntermediateNotCa(1),
        SvidRule::IntermediateNoKeyCertSign(1),
        SvidRule::IntermediateBadSpiffeId(1, Port),
        SvidRule::IntermediateIdHasPath(1),
    ];
    let texts: std::collections::BTreeSet<String> =
        svid_rules.iter().map(ToString::to_string).collect();
    assert_eq!(texts.len(), svid_rules.len());
    assert!(texts.iter().all(|t| !t.is_empty()));
    assert_eq!(
        SvidRule::MultipleUriSans(3).to_string(),
        "leaf has 3 URI SANs, exactly one is allowed"
    );
}

#[test]
fn error_display_is_precise() {
    let cases: Vec<(IdentityError, &str)> = vec![
        (
            IdentityError::InvalidSvid {
                spiffe_id: Some("spiffe://a/b".into()),
                rule: SvidRule::LeafIsCa,
            },
            "invalid X509-SVID for spiffe://a/b: leaf has basicConstraints cA=true",
        ),
        (
            IdentityError::InvalidSvid {
                spiffe_id: None,
                rule: SvidRule::EmptyChain,
            },
            "invalid X509-SVID: no certificate presented",
        ),
        (
            IdentityError::LimitExceeded {
                what: "certificate chain length",
                limit: 8,
                actual: 9,
            },
            "certificate chain length is 9, over the limit of 8",
        ),
        (
            IdentityError::File {
                path: "/etc/leash/a.pem".into(),
                reason: "gone".into(),
            },
            "/etc/leash/a.pem: gone",
        ),
        (
            IdentityError::InvalidSpiffeId {
                id: "x".into(),
                rule: SpiffeIdRule::WrongScheme,
            },
            "invalid SPIFFE ID \"x\": scheme must be exactly `spiffe://`",
        ),
    ];
    for (err, want) in cases {
        assert_eq!(err.to_string(), want);
    }
}

#[test]
fn truncation_respects_char_boundaries() {
    assert_eq!(truncate_for_log("short"), "short");
    let exact = "a".repeat(256);
    assert_eq!(truncate_for_log(&exact), exact);
    let multibyte = "é".repeat(200); // 400 bytes, 2 per char
    let cut = truncate_for_log(&multibyte);
    assert!(cut.ends_with('…'));
    assert!(cut.len() <= 256 + '…'.len_utf8());
    let ascii = "b".repeat(1000);
    assert_eq!(truncate_for_log(&ascii).len(), 256 + '…'.len_utf8());
}

#[test]
fn thumbprint_is_base64url_without_padding() {
    let id = SpiffeId::parse("spiffe://a.test/x").unwrap();
    let mut identity = Identity {
        spiffe_id: id,
        svid_not_after: SystemTime::UNIX_EPOCH,
        thumbprint_s256: Some([0; 32]),
        spki_s256: Some([0; 32]),
    };
    assert_eq!(identity.thumbprint_b64url().unwrap(), "A".repeat(43));
    // SHA-256("abc"): the characters '-' and '_' show the URL-safe alphabet is used.
    let digest = ring::digest::digest(&ring::digest::SHA256, b"abc");
    identity.thumbprint_s256 = Some(digest.as_ref().try_into().unwrap());
    assert_eq!(
        identity.thumbprint_b64url().unwrap(),
        "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"
    );
    assert_eq!(identity.trust_domain(), "a.test");
    identity.thumbprint_s256 = None;
    assert_eq!(identity.thumbprint_b64url(), None);
}
