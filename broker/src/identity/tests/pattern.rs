use crate::identity::{IdentityError, IdentityPattern, SpiffeId};

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

#[test]
fn pattern_matching_table() {
    // (pattern, id, matches)
    let cases: &[(&str, &str, bool)] = &[
        // exact
        ("spiffe://td/agent/1", "spiffe://td/agent/1", true),
        ("spiffe://td/agent/1", "spiffe://td/agent/10", false),
        ("spiffe://td/agent/1", "spiffe://td/agent/1/x", false),
        ("spiffe://td/agent/1", "spiffe://other/agent/1", false),
        ("spiffe://td/agent", "spiffe://td/Agent", false),
        // prefix, segment-boundary aware
        ("spiffe://td/agent/*", "spiffe://td/agent/x", true),
        ("spiffe://td/agent/*", "spiffe://td/agent/x/y/z", true),
        ("spiffe://td/agent/*", "spiffe://td/agent", false),
        ("spiffe://td/agent/*", "spiffe://td/agentx/y", false),
        ("spiffe://td/agent/*", "spiffe://td/agentx", false),
        ("spiffe://td/agent/*", "spiffe://td/agen/t", false),
        ("spiffe://td/agent/*", "spiffe://td/other/agent/x", false),
        ("spiffe://td/agent/*", "spiffe://td2/agent/x", false),
        ("spiffe://td/agent/*", "spiffe://t/agent/x", false),
        ("spiffe://td/a/b/*", "spiffe://td/a/b/c", true),
        ("spiffe://td/a/b/*", "spiffe://td/a/bc/d", false),
        ("spiffe://td/a/b/*", "spiffe://td/a/b", false),
        // whole trust domain
        ("spiffe://td/*", "spiffe://td/x", true),
        ("spiffe://td/*", "spiffe://td/x/y", true),
        ("spiffe://td/*", "spiffe://td", false),
        ("spiffe://td/*", "spiffe://tdx/x", false),
        ("spiffe://td/*", "spiffe://t/d", false),
        ("spiffe://a.b/*", "spiffe://a.bc/x", false),
    ];
    for (pattern, candidate, want) in cases {
        let p = IdentityPattern::parse(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
        assert_eq!(p.matches(&id(candidate)), *want, "{pattern} vs {candidate}");
    }
}

#[test]
fn pattern_cover_table() {
    // (earlier, later, earlier covers later: later can never match first)
    let cases: &[(&str, &str, bool)] = &[
        ("spiffe://td/a/1", "spiffe://td/a/1", true),
        ("spiffe://td/a/1", "spiffe://td/a/2", false),
        ("spiffe://td/a/1", "spiffe://td/a/1/*", false),
        ("spiffe://td/a/1", "spiffe://td/a/*", false),
        ("spiffe://td/a/*", "spiffe://td/a/1", true),
        ("spiffe://td/a/*", "spiffe://td/a/1/2", true),
        ("spiffe://td/a/*", "spiffe://td/a", false),
        ("spiffe://td/a/*", "spiffe://td/ab/1", false),
        ("spiffe://td/a/*", "spiffe://td/a/*", true),
        ("spiffe://td/a/*", "spiffe://td/a/b/*", true),
        ("spiffe://td/a/b/*", "spiffe://td/a/*", false),
        ("spiffe://td/a/*", "spiffe://td/ab/*", false),
        ("spiffe://td/a/*", "spiffe://td2/a/*", false),
        ("spiffe://td/a/*", "spiffe://td2/a/1", false),
        ("spiffe://td/*", "spiffe://td/a/*", true),
        ("spiffe://td/*", "spiffe://td/a", true),
        ("spiffe://td/*", "spiffe://td/*", true),
        ("spiffe://td/a/*", "spiffe://td/*", false),
        ("spiffe://td/*", "spiffe://tdx/*", false),
    ];
    for (earlier, later, want) in cases {
        let e = IdentityPattern::parse(earlier).unwrap();
        let l = IdentityPattern::parse(later).unwrap();
        assert_eq!(e.covers(&l), *want, "{earlier} covers {later}");
    }
}

#[test]
fn invalid_patterns_are_rejected_with_a_reason() {
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        ("*", "last segment"),
        ("spiffe://*", "scheme"),
        ("spiffe://*/x", "last segment"),
        ("spiffe://td*/x", "last segment"),
        ("spiffe://td/*/x", "last segment"),
        ("spiffe://td/a*", "last segment"),
        ("spiffe://td/a/*b", "last segment"),
        ("spiffe://td/**", "last segment"),
        ("spiffe://td/*/*", "last segment"),
        ("spiffe://td/a/**", "last segment"),
        ("spiffe://td//*", "must not end with"),
        ("spiffe://td/a//*", "must not end with"),
        ("spiffe://TD/*", "lower case"),
        ("http://td/*", "scheme"),
        ("spiffe://td/../*", "`.` and `..`"),
        ("spiffe://td", "trust domain"),
        ("spiffe://td/a?x/*", "query"),
        ("spiffe://td:1/*", "port"),
    ];
    for (pattern, reason) in cases {
        match IdentityPattern::parse(pattern) {
            Err(e @ IdentityError::InvalidPattern { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(reason), "{pattern:?}: {msg}");
            }
            other => panic!("{pattern:?}: expected InvalidPattern, got {other:?}"),
        }
    }
}

#[test]
fn patterns_display_as_written() {
    for p in [
        "spiffe://td/agent/1",
        "spiffe://td/agent/*",
        "spiffe://td/*",
    ] {
        let parsed = IdentityPattern::parse(p).unwrap();
        assert_eq!(parsed.to_string(), p);
        assert_eq!(parsed.trust_domain(), "td");
        assert_eq!(IdentityPattern::parse(&parsed.to_string()).unwrap(), parsed);
    }
}
