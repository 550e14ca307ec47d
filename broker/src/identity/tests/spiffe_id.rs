use crate::identity::{IdentityError, SpiffeId, SpiffeIdRule, validate_trust_domain};

fn rule_of(input: &str) -> Option<SpiffeIdRule> {
    match SpiffeId::parse(input) {
        Ok(_) => None,
        Err(IdentityError::InvalidSpiffeId { rule, .. }) => Some(rule),
        Err(other) => panic!("{input:?}: unexpected error kind {other:?}"),
    }
}

#[test]
fn valid_ids_parse_and_split() {
    let cases: &[(&str, &str, &str)] = &[
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/agent", "example.org", "/agent"),
        ("spiffe://example.org/agent/7", "example.org", "/agent/7"),
        ("spiffe://a", "a", ""),
        ("spiffe://td-1_x.y/A-b_c.d/9", "td-1_x.y", "/A-b_c.d/9"),
        ("spiffe://td/...", "td", "/..."),
        ("spiffe://td/.hidden", "td", "/.hidden"),
        ("spiffe://td/a..b", "td", "/a..b"),
        (
            "spiffe://0.0.0.0/ns/prod/sa/web",
            "0.0.0.0",
            "/ns/prod/sa/web",
        ),
        ("spiffe://_/-", "_", "/-"),
    ];
    for (input, td, path) in cases {
        let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(id.as_str(), *input);
        assert_eq!(id.to_string(), *input);
        assert_eq!(id.trust_domain(), *td, "{input}");
        assert_eq!(id.path(), *path, "{input}");
        assert_eq!(id.is_root(), path.is_empty(), "{input}");
        let reparsed: SpiffeId = input.parse().unwrap();
        assert_eq!(reparsed, id);
    }
}

#[test]
fn invalid_ids_name_the_rule() {
    use SpiffeIdRule::*;
    let cases: &[(&str, SpiffeIdRule)] = &[
        ("", Empty),
        ("example.org/agent", WrongScheme),
        ("http://example.org/agent", WrongScheme),
        ("https://example.org/agent", WrongScheme),
        ("SPIFFE://example.org/agent", WrongScheme),
        ("Spiffe://example.org/agent", WrongScheme),
        ("spiffe:/example.org/agent", WrongScheme),
        ("spiffe:example.org", WrongScheme),
        (" spiffe://example.org/agent", WrongScheme),
        ("spiffe://", TrustDomainEmpty),
        ("spiffe:///agent", TrustDomainEmpty),
        ("spiffe://Example.org/agent", TrustDomainUppercase),
        ("spiffe://EXAMPLE.ORG", TrustDomainUppercase),
        ("spiffe://exa mple.org/a", TrustDomainChar),
        ("spiffe://exämple.org/a", TrustDomainChar),
        ("spiffe://example.org*/a", TrustDomainChar),
        ("spiffe://[::1]/a", TrustDomainChar),
        ("spiffe://user@example.org/agent", Userinfo),
        ("spiffe://user:pw@example.org/agent", Userinfo),
        ("spiffe://example.org:8443/agent", Port),
        ("spiffe://example.org:/agent", Port),
        ("spiffe://example.org/agent?x=1", Query),
        ("spiffe://example.org?x", Query),
        ("spiffe://example.org/agent#frag", Fragment),
        ("spiffe://example.org#frag", Fragment),
        ("spiffe://example.org/ag%20ent", PercentEncoding),
        ("spiffe://example.org/agent/%2e%2e", PercentEncoding),
        ("spiffe://example.org//agent", EmptySegment),
        ("spiffe://example.org/a//b", EmptySegment),
        ("spiffe://example.org/", TrailingSlash),
        ("spiffe://example.org/agent/", TrailingSlash),
        ("spiffe://example.org/.", DotSegment),
        ("spiffe://example.org/..", DotSegment),
        ("spiffe://example.org/a/./b", DotSegment),
        ("spiffe://example.org/a/../b", DotSegment),
        ("spiffe://example.org/a b", PathChar),
        ("spiffe://example.org/a*", PathChar),
        ("spiffe://example.org/*", PathChar),
        ("spiffe://example.org/agent:1", PathChar),
        ("spiffe://example.org/agént", PathChar),
        ("spiffe://example.org/a\\b", PathChar),
        ("spiffe://example.org/a@b", PathChar),
    ];
    for (input, want) in cases {
        assert_eq!(rule_of(input), Some(*want), "{input:?}");
    }
}

#[test]
fn length_limits_are_exact() {
    let td_255 = "a".repeat(255);
    assert_eq!(rule_of(&format!("spiffe://{td_255}/x")), None);
    assert_eq!(validate_trust_domain(&td_255).ok(), Some(()));
    let td_256 = "a".repeat(256);
    assert_eq!(
        rule_of(&format!("spiffe://{td_256}/x")),
        Some(SpiffeIdRule::TrustDomainTooLong)
    );
    assert!(validate_trust_domain(&td_256).is_err());

    let prefix = "spiffe://td/";
    let exactly_2048 = format!("{prefix}{}", "p".repeat(2048 - prefix.len()));
    assert_eq!(exactly_2048.len(), 2048);
    assert_eq!(rule_of(&exactly_2048), None);
    let over = format!("{exactly_2048}q");
    assert_eq!(rule_of(&over), Some(SpiffeIdRule::TooLong));
    // A huge input is rejected without being echoed in full.
    let huge = format!("{prefix}{}", "p".repeat(100_000));
    let msg = SpiffeId::parse(&huge).unwrap_err().to_string();
    assert!(
        msg.len() < 600,
        "message not truncated: {} bytes",
        msg.len()
    );
    assert!(msg.contains("longer than 2048 bytes"), "{msg}");
}

#[test]
fn bare_trust_domains_are_validated() {
    for ok in ["example.org", "a", "td_1-x.y"] {
        assert!(validate_trust_domain(ok).is_ok(), "{ok}");
    }
    for bad in ["", "Example.org", "a/b", "a:1", "spiffe://a"] {
        assert!(validate_trust_domain(bad).is_err(), "{bad}");
    }
}

#[test]
fn ordering_equality_and_debug() {
    let a = SpiffeId::parse("spiffe://a.test/x").unwrap();
    let b = SpiffeId::parse("spiffe://a.test/y").unwrap();
    let a2 = a.clone();
    assert!(a < b);
    assert_eq!(a, a2);
    let set: std::collections::HashSet<_> = [a.clone(), a2, b].into_iter().collect();
    assert_eq!(set.len(), 2);
    assert_eq!(format!("{a:?}"), "SpiffeId(\"spiffe://a.test/x\")");
}

#[test]
fn error_messages_say_which_rule_failed() {
    let msg = SpiffeId::parse("spiffe://Example.org/a")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("trust domain must be lower case"), "{msg}");
    assert!(msg.contains("spiffe://Example.org/a"), "{msg}");
    let msg = SpiffeId::parse("spiffe://e.org/a/../b")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`.` and `..`"), "{msg}");
}
