//! Actor classes and tenants: who a caller is, beyond its SPIFFE ID
//! (`[[actors.classes]]` in the config file).
//!
//! Runs after the caller's SVID has been verified, before any template is
//! consulted. The classes are ordered, and so are each class's identity
//! patterns: the first pattern (of the first class) that matches the caller
//! decides its class, and with it the caller's tenant, owner and limits.
//!
//! Fail closed: an identity no class matches is denied every call that reads
//! or changes a task or credential (agents and verifiers alike), and a
//! configuration without classes denies everybody. `leash dev` writes classes
//! for the identities it issues.

use std::{collections::BTreeMap, time::Duration};

use super::FieldProblem;
use crate::identity::{IdentityPattern, SpiffeId};

/// A begin rate: a token bucket of `burst` begins, refilled by `burst` every
/// `per` (one begin every `per / burst`). Written `"<burst>/<duration>"`, e.g.
/// `"60/1m"` or `"1/1m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Most begins in a burst (the bucket's size); at least 1.
    pub burst: u64,
    /// How long the bucket takes to refill from empty; at least 1 ms.
    pub per: Duration,
}

impl Rate {
    /// Largest burst accepted.
    pub const MAX_BURST: u64 = 1_000_000;

    /// Parses `"<burst>/<duration>"`.
    ///
    /// # Errors
    /// A reason, in words, when the text has another form, the burst is 0 or
    /// above [`Rate::MAX_BURST`], or the duration is under 1 ms or over 24 h.
    pub fn parse(s: &str) -> Result<Self, String> {
        let form =
            "must be \"<burst>/<duration>\", e.g. \"60/1m\" (60 begins, refilled over a minute)";
        let Some((burst, per)) = s.split_once('/') else {
            return Err(format!("{s:?} {form}"));
        };
        let burst: u64 = burst.trim().parse().map_err(|_| format!("{s:?} {form}"))?;
        let per = humantime::parse_duration(per.trim()).map_err(|_| format!("{s:?} {form}"))?;
        if burst == 0 || burst > Self::MAX_BURST {
            return Err(format!(
                "{s:?}: the burst must be between 1 and {}",
                Self::MAX_BURST
            ));
        }
        if per < Duration::from_millis(1) || per > Duration::from_secs(86_400) {
            return Err(format!("{s:?}: the duration must be between 1ms and 24h"));
        }
        Ok(Self { burst, per })
    }

    /// Milliseconds one begin's token takes to come back (at least 1).
    pub fn refill_ms(&self) -> f64 {
        (crate::clock::duration_ms(self.per) as f64 / self.burst as f64).max(1.0)
    }
}

/// The limits of one actor class. `None` means no limit of that kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassLimits {
    /// TTL ceiling: a BeginTask asking for more is refused (`requested_ttl`);
    /// a template default above it is capped to it.
    pub max_ttl: Option<Duration>,
    /// Live tasks the whole class may hold at once.
    pub max_concurrent_tasks: Option<u64>,
    /// Live tasks one identity of the class may hold at once.
    pub max_concurrent_tasks_per_identity: Option<u64>,
    /// Begins of the whole class (one bucket shared by every replica).
    pub begin_rate: Option<Rate>,
    /// Begins of one identity of the class.
    pub begin_rate_per_identity: Option<Rate>,
}

/// What a caller is: its class, the tenant it belongs to, who owns the class,
/// and the limits it runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The class name.
    pub class: String,
    /// The tenant: the isolation boundary of its templates, tasks and tokens.
    pub tenant: String,
    /// Who to contact about the class.
    pub owner: String,
    /// The class's limits.
    pub limits: ClassLimits,
}

/// Why a caller has no class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{identity} is not allowed: no actor class matches it (see actors.classes)")]
pub struct Unclassified {
    /// The caller.
    pub identity: String,
}

/// One class as written in the config file (validated by [`ActorClasses::parse`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassSpec<'a> {
    /// `name`.
    pub name: &'a str,
    /// `tenant`.
    pub tenant: &'a str,
    /// `owner`.
    pub owner: &'a str,
    /// `identities`: exact SPIFFE IDs or `spiffe://<td>/<prefix>/*` patterns.
    pub identities: Vec<&'a str>,
    /// `max_ttl`, already a duration.
    pub max_ttl: Option<Duration>,
    /// `max_concurrent_tasks`.
    pub max_concurrent_tasks: Option<u64>,
    /// `max_concurrent_tasks_per_identity`.
    pub max_concurrent_tasks_per_identity: Option<u64>,
    /// `begin_rate`, as written.
    pub begin_rate: Option<&'a str>,
    /// `begin_rate_per_identity`, as written.
    pub begin_rate_per_identity: Option<&'a str>,
}

/// The ordered actor classes. Empty (no `[[actors.classes]]`): nobody is classified.
///
/// Guarantees: built only through [`ActorClasses::parse`], so class names and
/// tenants are unique valid names, every class has an owner and at least one
/// valid identity pattern, no pattern is unreachable behind an earlier one
/// (in any class), and limits are positive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActorClasses {
    /// (pattern, index into `actors`), in match order.
    patterns: Vec<(IdentityPattern, usize)>,
    actors: Vec<Actor>,
}

/// A class or tenant name: `[a-z0-9][a-z0-9-_.]{0,62}`.
pub fn is_name(v: &str) -> bool {
    let mut chars = v.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first_ok
        && v.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

const NAME_RULE: &str = "1 to 63 characters `[a-z0-9][a-z0-9-_.]*`";

impl ActorClasses {
    /// Parses the classes, in order, of the list named `field`
    /// (`actors.classes` in the config file).
    ///
    /// # Errors
    /// Every problem at once, each naming its field as `<field>[i].<key>` or
    /// `<field>[i].identities[j]`: a missing or invalid `name` or `tenant`, a
    /// class name used twice, a missing `owner`, an empty identity list, an
    /// invalid pattern, a pattern that never applies because an earlier one
    /// (of this or an earlier class) matches every identity it does, a zero
    /// `max_ttl` or concurrency limit, a malformed rate.
    pub fn parse<'a>(
        field: &str,
        classes: impl IntoIterator<Item = ClassSpec<'a>>,
    ) -> Result<Self, Vec<FieldProblem>> {
        let mut problems = Vec::new();
        let mut out = Self::default();
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        let mut reachable: Vec<(String, IdentityPattern)> = Vec::new();
        for (i, spec) in classes.into_iter().enumerate() {
            let at = |key: &str| format!("{field}[{i}].{key}");
            let before = problems.len();
            if spec.name.is_empty() {
                problems.push(FieldProblem::new(at("name"), "required"));
            } else if !is_name(spec.name) {
                problems.push(FieldProblem::new(
                    at("name"),
                    format!("{:?} is not a class name; use {NAME_RULE}", spec.name),
                ));
            } else if let Some(j) = names.insert(spec.name, i) {
                problems.push(FieldProblem::new(
                    at("name"),
                    format!("{:?} is already the name of {field}[{j}]", spec.name),
                ));
            }
            if spec.tenant.is_empty() {
                problems.push(FieldProblem::new(at("tenant"), "required"));
            } else if !is_name(spec.tenant) {
                problems.push(FieldProblem::new(
                    at("tenant"),
                    format!("{:?} is not a tenant name; use {NAME_RULE}", spec.tenant),
                ));
            }
            if spec.owner.trim().is_empty() {
                problems.push(FieldProblem::new(
                    at("owner"),
                    "required: who to contact about the class",
                ));
            } else if spec.owner.chars().any(char::is_control) {
                problems.push(FieldProblem::new(
                    at("owner"),
                    "must not contain control characters",
                ));
            }
            if spec.identities.is_empty() {
                problems.push(FieldProblem::new(
                    at("identities"),
                    "must list at least one SPIFFE ID or `spiffe://<trust domain>/<prefix>/*` pattern",
                ));
            }
            let mut patterns = Vec::new();
            for (j, identity) in spec.identities.iter().enumerate() {
                let at = format!("{field}[{i}].identities[{j}]");
                let parsed = if identity.is_empty() {
                    Err(
                        "required: an exact SPIFFE ID or `spiffe://<trust domain>/<prefix>/*`"
                            .to_owned(),
                    )
                } else {
                    IdentityPattern::parse(identity).map_err(|e| e.to_string())
                };
                match parsed {
                    Ok(p) => {
                        if let Some((where_, earlier)) =
                            reachable.iter().find(|(_, e)| e.covers(&p))
                        {
                            problems.push(FieldProblem::new(
                                at,
                                format!(
                                    "{p} never applies: {where_} ({earlier}) matches every identity it does, and only the first match counts; list narrower patterns first"
                                ),
                            ));
                        }
                        reachable.push((format!("{field}[{i}].identities[{j}]"), p.clone()));
                        patterns.push(p);
                    }
                    Err(reason) => problems.push(FieldProblem::new(at, reason)),
                }
            }
            for (key, value) in [
                ("max_concurrent_tasks", spec.max_concurrent_tasks),
                (
                    "max_concurrent_tasks_per_identity",
                    spec.max_concurrent_tasks_per_identity,
                ),
            ] {
                if value == Some(0) {
                    problems.push(FieldProblem::new(
                        at(key),
                        "must be positive (leave it out for no limit)",
                    ));
                }
            }
            if spec.max_ttl.is_some_and(|t| t < Duration::from_secs(1)) {
                problems.push(FieldProblem::new(
                    at("max_ttl"),
                    "at least 1s (leave it out for no ceiling)",
                ));
            }
            let mut rate = |key: &str, value: Option<&str>| match value.map(Rate::parse) {
                None => None,
                Some(Ok(r)) => Some(r),
                Some(Err(reason)) => {
                    problems.push(FieldProblem::new(at(key), reason));
                    None
                }
            };
            let begin_rate = rate("begin_rate", spec.begin_rate);
            let begin_rate_per_identity =
                rate("begin_rate_per_identity", spec.begin_rate_per_identity);
            if problems.len() > before {
                continue;
            }
            let index = out.actors.len();
            out.actors.push(Actor {
                class: spec.name.to_owned(),
                tenant: spec.tenant.to_owned(),
                owner: spec.owner.to_owned(),
                limits: ClassLimits {
                    max_ttl: spec.max_ttl,
                    max_concurrent_tasks: spec.max_concurrent_tasks,
                    max_concurrent_tasks_per_identity: spec.max_concurrent_tasks_per_identity,
                    begin_rate,
                    begin_rate_per_identity,
                },
            });
            out.patterns
                .extend(patterns.into_iter().map(|p| (p, index)));
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }

    /// The class of `id`: that of the first pattern matching it.
    ///
    /// # Errors
    /// [`Unclassified`] when no pattern matches (always, with no classes).
    pub fn classify(&self, id: &SpiffeId) -> Result<&Actor, Unclassified> {
        self.patterns
            .iter()
            .find(|(p, _)| p.matches(id))
            .and_then(|(_, i)| self.actors.get(*i))
            .ok_or_else(|| Unclassified {
                identity: id.to_string(),
            })
    }

    /// The class called `name`, if configured.
    pub fn class(&self, name: &str) -> Option<&Actor> {
        self.actors.iter().find(|a| a.class == name)
    }

    /// The classes, in order.
    pub fn classes(&self) -> &[Actor] {
        &self.actors
    }

    /// Every tenant some class belongs to, sorted, each once.
    pub fn tenants(&self) -> Vec<String> {
        let set: std::collections::BTreeSet<&str> =
            self.actors.iter().map(|a| a.tenant.as_str()).collect();
        set.into_iter().map(str::to_owned).collect()
    }

    /// Problems of `templates` against these classes, as `(file, message)`:
    /// a template listing a class (in `classes:` or `approval.approvers.classes`)
    /// that is not configured, or a class of another tenant than the template's.
    pub fn template_problems(
        &self,
        templates: &crate::templates::TemplateSet,
    ) -> Vec<(std::path::PathBuf, String)> {
        let mut out = Vec::new();
        for t in templates.iter() {
            let approver_classes = t.approval.iter().flat_map(|a| &a.approver_classes);
            let listed = t
                .classes
                .iter()
                .map(|c| ("classes", c))
                .chain(approver_classes.map(|c| ("approval.approvers.classes", c)));
            for (key, class) in listed {
                match self.class(class) {
                    None => out.push((
                        t.source.clone(),
                        format!(
                            "template {:?}: `{key}`: {class:?} is not an actor class of the config (actors.classes)",
                            t.name
                        ),
                    )),
                    Some(a) if a.tenant != t.tenant => out.push((
                        t.source.clone(),
                        format!(
                            "template {:?}: `{key}`: {class:?} belongs to tenant {:?}, not the template's tenant {:?}",
                            t.name, a.tenant, t.tenant
                        ),
                    )),
                    Some(_) => {}
                }
            }
        }
        out
    }
}

/// The check a template catalog runs on every set it loads: the classes each
/// template lists (as users and as approvers) exist and belong to its tenant (see
/// [`ActorClasses::template_problems`]). A set that fails it is refused at
/// start and, at a reload, the last good set stays.
pub fn template_check(classes: ActorClasses) -> crate::templates::SetCheck {
    Box::new(move |set| {
        classes
            .template_problems(set)
            .into_iter()
            .map(|(file, message)| crate::templates::TemplateIssue {
                file,
                line: 0,
                message,
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("id")
    }

    fn spec<'a>(name: &'a str, tenant: &'a str, identities: &[&'a str]) -> ClassSpec<'a> {
        ClassSpec {
            name,
            tenant,
            owner: "platform@acme.test",
            identities: identities.to_vec(),
            ..ClassSpec::default()
        }
    }

    #[test]
    fn the_first_matching_pattern_decides() {
        let classes = ActorClasses::parse(
            "classes",
            [
                spec("ci", "acme", &["spiffe://acme.test/ci/deploy"]),
                spec(
                    "agent",
                    "acme",
                    &["spiffe://acme.test/agent/*", "spiffe://acme.test/ci/*"],
                ),
                spec("partner-x", "partner-x", &["spiffe://x.test/*"]),
            ],
        )
        .expect("valid");
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("spiffe://acme.test/ci/deploy", Some(("ci", "acme"))),
            ("spiffe://acme.test/ci/other", Some(("agent", "acme"))),
            ("spiffe://acme.test/agent/a/b", Some(("agent", "acme"))),
            ("spiffe://x.test/anything", Some(("partner-x", "partner-x"))),
            ("spiffe://acme.test/resource/api", None),
            ("spiffe://y.test/agent/a", None),
        ];
        for (who, want) in cases {
            let got = classes
                .classify(&id(who))
                .ok()
                .map(|a| (a.class.as_str(), a.tenant.as_str()));
            assert_eq!(got, *want, "{who}");
        }
        let err = classes
            .classify(&id("spiffe://acme.test/resource/api"))
            .expect_err("unclassified");
        assert!(err.to_string().contains("no actor class matches"), "{err}");
    }

    #[test]
    fn no_classes_means_nobody() {
        let classes = ActorClasses::parse("classes", []).expect("valid");
        assert!(classes.classify(&id("spiffe://acme.test/agent/a")).is_err());
    }

    #[test]
    fn limits_are_kept() {
        let classes = ActorClasses::parse(
            "classes",
            [ClassSpec {
                max_ttl: Some(Duration::from_secs(60)),
                max_concurrent_tasks: Some(10),
                max_concurrent_tasks_per_identity: Some(2),
                begin_rate: Some("60/1m"),
                begin_rate_per_identity: Some("1/1m"),
                ..spec("agent", "acme", &["spiffe://acme.test/*"])
            }],
        )
        .expect("valid");
        let a = classes.class("agent").expect("class");
        assert_eq!(a.limits.max_ttl, Some(Duration::from_secs(60)));
        assert_eq!(
            a.limits.begin_rate_per_identity,
            Some(Rate {
                burst: 1,
                per: Duration::from_secs(60)
            })
        );
        assert!((a.limits.begin_rate.expect("rate").refill_ms() - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn bad_classes_are_refused_naming_the_field() {
        let base = || spec("agent", "acme", &["spiffe://acme.test/agent/*"]);
        let cases: Vec<(Vec<ClassSpec<'_>>, &str, &str)> = vec![
            (
                vec![ClassSpec { name: "", ..base() }],
                "c[0].name",
                "required",
            ),
            (
                vec![ClassSpec {
                    name: "Agent",
                    ..base()
                }],
                "c[0].name",
                "not a class name",
            ),
            (
                vec![
                    base(),
                    ClassSpec {
                        identities: vec!["spiffe://b.test/*"],
                        ..base()
                    },
                ],
                "c[1].name",
                "already the name of c[0]",
            ),
            (
                vec![ClassSpec {
                    tenant: "",
                    ..base()
                }],
                "c[0].tenant",
                "required",
            ),
            (
                vec![ClassSpec {
                    tenant: "a b",
                    ..base()
                }],
                "c[0].tenant",
                "not a tenant name",
            ),
            (
                vec![ClassSpec {
                    owner: " ",
                    ..base()
                }],
                "c[0].owner",
                "required",
            ),
            (
                vec![ClassSpec {
                    owner: "a\nb",
                    ..base()
                }],
                "c[0].owner",
                "control",
            ),
            (
                vec![ClassSpec {
                    identities: vec![],
                    ..base()
                }],
                "c[0].identities",
                "at least one",
            ),
            (
                vec![ClassSpec {
                    identities: vec![""],
                    ..base()
                }],
                "c[0].identities[0]",
                "required",
            ),
            (
                vec![ClassSpec {
                    identities: vec!["agent/*"],
                    ..base()
                }],
                "c[0].identities[0]",
                "invalid identity pattern",
            ),
            (
                vec![
                    ClassSpec {
                        identities: vec!["spiffe://acme.test/*"],
                        ..base()
                    },
                    ClassSpec {
                        name: "ci",
                        identities: vec!["spiffe://acme.test/ci/*"],
                        ..base()
                    },
                ],
                "c[1].identities[0]",
                "never applies: c[0].identities[0] (spiffe://acme.test/*)",
            ),
            (
                vec![ClassSpec {
                    identities: vec!["spiffe://acme.test/a/*", "spiffe://acme.test/a/b"],
                    ..base()
                }],
                "c[0].identities[1]",
                "list narrower patterns first",
            ),
            (
                vec![ClassSpec {
                    max_concurrent_tasks: Some(0),
                    ..base()
                }],
                "c[0].max_concurrent_tasks",
                "must be positive",
            ),
            (
                vec![ClassSpec {
                    max_concurrent_tasks_per_identity: Some(0),
                    ..base()
                }],
                "c[0].max_concurrent_tasks_per_identity",
                "must be positive",
            ),
            (
                vec![ClassSpec {
                    max_ttl: Some(Duration::from_millis(10)),
                    ..base()
                }],
                "c[0].max_ttl",
                "at least 1s",
            ),
            (
                vec![ClassSpec {
                    begin_rate: Some("10"),
                    ..base()
                }],
                "c[0].begin_rate",
                "<burst>/<duration>",
            ),
            (
                vec![ClassSpec {
                    begin_rate: Some("0/1m"),
                    ..base()
                }],
                "c[0].begin_rate",
                "between 1 and",
            ),
            (
                vec![ClassSpec {
                    begin_rate_per_identity: Some("5/2d"),
                    ..base()
                }],
                "c[0].begin_rate_per_identity",
                "between 1ms and 24h",
            ),
            (
                vec![ClassSpec {
                    begin_rate_per_identity: Some("5/soon"),
                    ..base()
                }],
                "c[0].begin_rate_per_identity",
                "<burst>/<duration>",
            ),
        ];
        for (specs, field, reason) in cases {
            let problems = ActorClasses::parse("c", specs).expect_err(field);
            assert!(
                problems
                    .iter()
                    .any(|p| p.field == field && p.reason.contains(reason)),
                "want {field}: ...{reason}..., got {problems:?}"
            );
        }
    }

    #[test]
    fn names_follow_the_rule() {
        for good in ["agent", "partner-acme", "ci.v2", "0"] {
            assert!(is_name(good), "{good}");
        }
        for bad in ["", "-a", "A", "a b", "a/b", &"a".repeat(64)] {
            assert!(!is_name(bad), "{bad}");
        }
    }
}
