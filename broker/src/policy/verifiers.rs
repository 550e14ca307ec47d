//! Verifier callers: who may introspect credentials and watch revocations, and
//! of which audiences (`[verifier] callers`).
//!
//! Runs after the caller's SVID has been verified. The list is ordered: the
//! first entry whose identity pattern matches the caller decides its audiences,
//! later entries are not consulted, and an identity no entry matches is no
//! verifier at all. A verifier learns nothing of a credential issued for an
//! audience it does not serve.

use std::collections::BTreeSet;

use super::FieldProblem;
use crate::{
    identity::{IdentityPattern, SpiffeId},
    revocation::Audiences,
};

/// The one audience entry that means "every audience"; it must stand alone.
pub const ALL_AUDIENCES: &str = "*";

/// One entry of the list: the identities it matches and the audiences they serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierCaller {
    /// The identities this entry is for.
    pub identity: IdentityPattern,
    /// The audiences whose credentials they may introspect and hear revoked.
    pub audiences: Audiences,
}

/// The ordered `[verifier] callers` list. Empty (the default): nobody is a verifier.
///
/// Guarantees: built only through [`VerifierCallers::parse`], so every entry has
/// a valid pattern, a non-empty audience list without duplicates where `"*"`
/// stands alone, and no entry is unreachable behind an earlier one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifierCallers(Vec<VerifierCaller>);

impl VerifierCallers {
    /// Parses `(identity, audiences)` entries, in order, of the list named
    /// `field` (`verifier.callers` in the config file).
    ///
    /// # Errors
    /// Every problem at once, each naming its field as `<field>[i].identity`,
    /// `<field>[i].audiences` or `<field>[i].audiences[j]`: an empty or invalid
    /// identity pattern; an entry that can never apply because an earlier
    /// entry's pattern matches every identity it does; an empty audience list;
    /// `"*"` beside other audiences; an empty audience, one with whitespace, or
    /// one holding a `*` (audiences match exactly, never as patterns); an
    /// audience listed twice.
    pub fn parse<'a, I, A>(field: &str, entries: I) -> Result<Self, Vec<FieldProblem>>
    where
        I: IntoIterator<Item = (&'a str, A)>,
        A: IntoIterator<Item = &'a str>,
    {
        let mut problems = Vec::new();
        let mut parsed: Vec<(usize, IdentityPattern)> = Vec::new();
        let mut callers = Vec::new();
        let list = field;
        for (i, (identity, audiences)) in entries.into_iter().enumerate() {
            let field = format!("{list}[{i}]");
            let identity = match parse_identity(identity) {
                Ok(p) => {
                    if let Some((j, earlier)) = parsed.iter().find(|(_, e)| e.covers(&p)) {
                        problems.push(FieldProblem::new(
                            format!("{field}.identity"),
                            format!(
                                "{p} never applies: {list}[{j}] ({earlier}) matches every identity it does, and only the first matching entry counts; list narrower patterns first"
                            ),
                        ));
                    }
                    parsed.push((i, p.clone()));
                    Some(p)
                }
                Err(reason) => {
                    problems.push(FieldProblem::new(format!("{field}.identity"), reason));
                    None
                }
            };
            let audiences = parse_audiences(&field, audiences, &mut problems);
            if let (Some(identity), Some(audiences)) = (identity, audiences) {
                callers.push(VerifierCaller {
                    identity,
                    audiences,
                });
            }
        }
        if problems.is_empty() {
            Ok(Self(callers))
        } else {
            Err(problems)
        }
    }

    /// The audiences `id` serves as a verifier: those of the first entry whose
    /// pattern matches it, or `None` when no entry does.
    pub fn audiences_of(&self, id: &SpiffeId) -> Option<&Audiences> {
        self.0
            .iter()
            .find(|c| c.identity.matches(id))
            .map(|c| &c.audiences)
    }

    /// The entries, in order.
    pub fn entries(&self) -> &[VerifierCaller] {
        &self.0
    }
}

fn parse_identity(identity: &str) -> Result<IdentityPattern, String> {
    if identity.is_empty() {
        return Err("required: an exact SPIFFE ID or `spiffe://<trust domain>/<prefix>/*`".into());
    }
    IdentityPattern::parse(identity).map_err(|e| e.to_string())
}

/// The audiences of entry `field`, or `None` after recording why not.
fn parse_audiences<'a>(
    field: &str,
    audiences: impl IntoIterator<Item = &'a str>,
    problems: &mut Vec<FieldProblem>,
) -> Option<Audiences> {
    let before = problems.len();
    let audiences: Vec<&str> = audiences.into_iter().collect();
    if audiences.is_empty() {
        problems.push(FieldProblem::new(
            format!("{field}.audiences"),
            format!("must list at least one audience, or [\"{ALL_AUDIENCES}\"] for every audience"),
        ));
        return None;
    }
    if audiences.len() > 1 && audiences.contains(&ALL_AUDIENCES) {
        problems.push(FieldProblem::new(
            format!("{field}.audiences"),
            format!(
                "\"{ALL_AUDIENCES}\" means every audience and must be the only entry; list exact audiences or [\"{ALL_AUDIENCES}\"] alone"
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    for (j, audience) in audiences.iter().enumerate() {
        let at = format!("{field}.audiences[{j}]");
        if *audience == ALL_AUDIENCES {
            continue;
        }
        if audience.is_empty() || audience.chars().any(char::is_whitespace) {
            problems.push(FieldProblem::new(
                at,
                format!("{audience:?} is not an audience: it must be non-empty without whitespace"),
            ));
        } else if audience.contains('*') {
            problems.push(FieldProblem::new(
                at,
                format!(
                    "{audience:?}: audiences match exactly, never as patterns; \"{ALL_AUDIENCES}\" alone means every audience"
                ),
            ));
        } else if !seen.insert(*audience) {
            problems.push(FieldProblem::new(
                at,
                format!("{audience:?} is listed twice"),
            ));
        }
    }
    if problems.len() > before {
        return None;
    }
    Some(if audiences == [ALL_AUDIENCES] {
        Audiences::All
    } else {
        Audiences::Only(seen.into_iter().map(str::to_owned).collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(path: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://acme.test/{path}")).expect("id")
    }

    /// `(identity, audiences)` entries as written.
    type Entries<'a> = &'a [(&'a str, &'a [&'a str])];

    fn parse(entries: Entries<'_>) -> Result<VerifierCallers, Vec<FieldProblem>> {
        VerifierCallers::parse(
            "callers",
            entries.iter().map(|(i, a)| (*i, a.iter().copied())),
        )
    }

    fn only(audiences: &[&str]) -> Audiences {
        Audiences::Only(audiences.iter().map(|a| (*a).to_owned()).collect())
    }

    #[test]
    fn the_first_matching_entry_decides() {
        let callers = parse(&[
            (
                "spiffe://acme.test/resource/github",
                &["https://api.github.test"],
            ),
            (
                "spiffe://acme.test/resource/*",
                &["postgres://db", "https://b.test"],
            ),
            ("spiffe://acme.test/ops/auditor", &["*"]),
        ])
        .expect("valid");
        let cases: &[(&str, Option<Audiences>)] = &[
            // Also matched by resource/*, whose audiences it does not get.
            ("resource/github", Some(only(&["https://api.github.test"]))),
            (
                "resource/db",
                Some(only(&["postgres://db", "https://b.test"])),
            ),
            (
                "resource/github/x",
                Some(only(&["postgres://db", "https://b.test"])),
            ),
            ("ops/auditor", Some(Audiences::All)),
            ("ops/auditor/x", None),
            ("resource", None),
            ("agent/reviewer", None),
        ];
        for (path, want) in cases {
            assert_eq!(callers.audiences_of(&id(path)), want.as_ref(), "{path}");
        }
        let other_td = SpiffeId::parse("spiffe://other.test/resource/db").expect("id");
        assert_eq!(callers.audiences_of(&other_td), None);
        assert_eq!(callers.entries().len(), 3);
    }

    #[test]
    fn no_entries_means_nobody() {
        let callers = parse(&[]).expect("valid");
        assert_eq!(callers, VerifierCallers::default());
        assert_eq!(callers.audiences_of(&id("resource/api")), None);
    }

    #[test]
    fn bad_entries_are_refused_naming_the_field() {
        // (entries, field, part of the reason)
        let cases: &[(Entries<'_>, &str, &str)] = &[
            (&[("", &["a"])], "callers[0].identity", "required"),
            (&[("resource/*", &["a"])], "callers[0].identity", "scheme"),
            (
                &[("spiffe://acme.test/a*", &["a"])],
                "callers[0].identity",
                "last segment",
            ),
            (
                &[("spiffe://acme.test", &["a"])],
                "callers[0].identity",
                "trust domain",
            ),
            (
                &[("spiffe://acme.test/r/x", &[])],
                "callers[0].audiences",
                "at least one audience",
            ),
            (
                &[("spiffe://acme.test/r/x", &["*", "https://a.test"])],
                "callers[0].audiences",
                "must be the only entry",
            ),
            (
                &[("spiffe://acme.test/r/x", &["https://a.test", "*"])],
                "callers[0].audiences",
                "must be the only entry",
            ),
            (
                &[("spiffe://acme.test/r/x", &["*", "*"])],
                "callers[0].audiences",
                "must be the only entry",
            ),
            (
                &[("spiffe://acme.test/r/x", &["a", "b", "a"])],
                "callers[0].audiences[2]",
                "listed twice",
            ),
            (
                &[("spiffe://acme.test/r/x", &[""])],
                "callers[0].audiences[0]",
                "non-empty",
            ),
            (
                &[("spiffe://acme.test/r/x", &["https://a .test"])],
                "callers[0].audiences[0]",
                "without whitespace",
            ),
            (
                &[("spiffe://acme.test/r/x", &["https://*.acme.test"])],
                "callers[0].audiences[0]",
                "never as patterns",
            ),
            (
                &[
                    ("spiffe://acme.test/r/x", &["a"]),
                    ("spiffe://acme.test/r/x", &["b"]),
                ],
                "callers[1].identity",
                "callers[0] (spiffe://acme.test/r/x) matches every identity",
            ),
            (
                &[
                    ("spiffe://acme.test/r/*", &["a"]),
                    ("spiffe://acme.test/r/x", &["b"]),
                ],
                "callers[1].identity",
                "list narrower patterns first",
            ),
            (
                &[
                    ("spiffe://acme.test/*", &["a"]),
                    ("spiffe://acme.test/r/x/*", &["b"]),
                ],
                "callers[1].identity",
                "never applies",
            ),
        ];
        for (entries, field, reason) in cases {
            let problems = parse(entries).expect_err(field);
            assert!(
                problems
                    .iter()
                    .any(|p| p.field == *field && p.reason.contains(reason)),
                "{entries:?}: want {field}: ...{reason}..., got {problems:?}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let problems = parse(&[
            ("nope", &[]),
            ("spiffe://acme.test/r/x", &["a", "a", "*"]),
            ("spiffe://acme.test/r/*", &["b"]),
        ])
        .expect_err("invalid");
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "callers[0].identity",
                "callers[0].audiences",
                "callers[1].audiences",
                "callers[1].audiences[1]",
            ],
            "{problems:?}"
        );
    }

    #[test]
    fn narrower_patterns_before_wider_ones_are_fine() {
        let callers = parse(&[
            ("spiffe://acme.test/r/x", &["a"]),
            ("spiffe://acme.test/r/*", &["b"]),
            ("spiffe://acme.test/*", &["*"]),
            ("spiffe://other.test/*", &["c", "d"]),
        ])
        .expect("valid");
        assert_eq!(callers.audiences_of(&id("r/x")), Some(&only(&["a"])));
        assert_eq!(callers.audiences_of(&id("q")), Some(&Audiences::All));
    }
}
