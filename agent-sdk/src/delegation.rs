//! Delegation: a task hands a narrower task to a subagent, which redeems it.
//!
//! The parent calls [`Task::delegate`](crate::Task::delegate) and passes the
//! [`Delegation`] to the subagent process as one string
//! ([`Delegation::to_token`]); the subagent reads it back
//! ([`Delegation::from_token`]) and calls
//! [`Client::redeem_delegation`](crate::Client::redeem_delegation) over its own
//! SVID. The token holds the one-time delegation handle, a secret: pass it in
//! the environment or a private file, never in argv or a log.

use std::{
    collections::BTreeSet,
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use leash_proto::v1 as pb;

use crate::{Error, task::system_time};

/// The longest delegation token [`Delegation::from_token`] reads; a longer
/// string is refused before it is decoded.
pub const MAX_DELEGATION_TOKEN_BYTES: usize = 16 * 1024;

/// Every token starts with this (format version 1).
const TOKEN_PREFIX: &str = "lsd1.";

/// One grant a child task gets, with the scopes it keeps of the parent's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegatedGrant {
    /// The grant's name in the template.
    pub grant: String,
    /// The scopes; empty in a request means all of the parent's live scopes of
    /// this grant. In a [`Delegation`] they are what the child holds.
    pub scopes: Vec<String>,
}

/// What a parent task hands to a subagent: who, which grants and scopes, how
/// long, and why. Checked locally by [`Task::delegate`](crate::Task::delegate)
/// before any call; the broker checks the rest (every scope must be one of the
/// parent's live scopes; the delegation depth).
#[derive(Debug, Clone)]
pub struct DelegationRequest {
    subagent: String,
    grants: Vec<DelegatedGrant>,
    ttl: Option<Duration>,
    intent: String,
}

impl DelegationRequest {
    /// A delegation to the subagent whose SPIFFE ID is `subagent`; it alone can
    /// redeem it. Without [`grant`](Self::grant), the child gets every live grant
    /// of the parent with all its scopes.
    pub fn new(subagent: impl Into<String>) -> Self {
        Self {
            subagent: subagent.into(),
            grants: Vec::new(),
            ttl: None,
            intent: String::new(),
        }
    }

    /// Gives the child the parent's grant `name` with only `scopes` (each must be
    /// one of the parent's live scopes of it; none: all of them). Repeatable, each
    /// grant at most once.
    pub fn grant<I, S>(mut self, name: impl Into<String>, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.grants.push(DelegatedGrant {
            grant: name.into(),
            scopes: scopes.into_iter().map(Into::into).collect(),
        });
        self
    }

    /// The child's lease TTL wanted; the broker clamps it to the parent's
    /// remaining lease. Default: the parent's lease TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// What the subagent will do, for the audit trail. Required by the broker
    /// (at most 1024 bytes).
    pub fn intent(mut self, intent: impl Into<String>) -> Self {
        self.intent = intent.into();
        self
    }

    /// The wire request for the parent task `parent_task_id`.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the field: an empty or non-SPIFFE subagent, an
    /// empty grant name or scope, a grant given twice, a zero TTL.
    pub(crate) fn into_proto(self, parent_task_id: &str) -> Result<pb::DelegateTaskRequest, Error> {
        if self.subagent.is_empty() {
            return Err(Error::Invalid(
                "subagent: required (the SPIFFE ID of the subagent that will redeem the delegation)"
                    .into(),
            ));
        }
        if !self.subagent.starts_with("spiffe://") {
            return Err(Error::Invalid(format!(
                "subagent: {:?} is not a SPIFFE ID (spiffe://trust-domain/path)",
                self.subagent
            )));
        }
        let mut seen = BTreeSet::new();
        for g in &self.grants {
            if g.grant.is_empty() {
                return Err(Error::Invalid("grants: a grant name is empty".into()));
            }
            if !seen.insert(g.grant.as_str()) {
                return Err(Error::Invalid(format!(
                    "grants: grant {:?} is given more than once; list all its scopes in one grant(..) call",
                    g.grant
                )));
            }
            if g.scopes.iter().any(String::is_empty) {
                return Err(Error::Invalid(format!(
                    "grants: grant {:?} has an empty scope",
                    g.grant
                )));
            }
        }
        if self.ttl.is_some_and(|d| d.is_zero()) {
            return Err(Error::Invalid("requested_ttl: must be positive".into()));
        }
        Ok(pb::DelegateTaskRequest {
            parent_task_id: parent_task_id.to_owned(),
            subagent: self.subagent,
            grants: self
                .grants
                .into_iter()
                .map(|g| pb::GrantScopes {
                    grant: g.grant,
                    scopes: g.scopes,
                })
                .collect(),
            requested_ttl: self.ttl.map(proto_duration),
            intent: self.intent,
        })
    }
}

/// A delegated child task before the subagent redeemed it. Holds the one-time
/// delegation handle, a secret: `Debug` prints it as `"..."`; only
/// [`handle`](Self::handle) and [`to_token`](Self::to_token) reveal it.
#[derive(Clone, PartialEq, Eq)]
pub struct Delegation {
    task_id: String,
    handle: Arc<str>,
    lease_expires_at: SystemTime,
    max_lifetime_at: SystemTime,
    depth: u32,
    grants: Vec<DelegatedGrant>,
}

impl Delegation {
    /// Maps the DelegateTask answer.
    ///
    /// # Errors
    /// [`Error::Transport`] when the broker left out the task id or the handle.
    pub(crate) fn from_proto(r: pb::DelegateTaskResponse) -> Result<Self, Error> {
        if r.task_id.is_empty() || r.delegation_handle.is_empty() {
            return Err(Error::Transport(
                "DelegateTask answered without a task id or delegation handle".into(),
            ));
        }
        Ok(Self {
            task_id: r.task_id,
            handle: r.delegation_handle.into(),
            lease_expires_at: system_time(r.lease_expires_at),
            max_lifetime_at: system_time(r.max_lifetime_at),
            depth: r.depth,
            grants: r
                .grants
                .into_iter()
                .map(|g| DelegatedGrant {
                    grant: g.grant,
                    scopes: g.scopes,
                })
                .collect(),
        })
    }

    /// The child task's id (safe to log).
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// The one-time delegation handle. A secret: give it only to the subagent,
    /// never log it.
    pub fn handle(&self) -> &str {
        &self.handle
    }

    /// The child's lease ends at this instant unless the subagent redeems and
    /// renews it.
    pub fn lease_expires_at(&self) -> SystemTime {
        self.lease_expires_at
    }

    /// The child's max lifetime (never past the parent's).
    pub fn max_lifetime_at(&self) -> SystemTime {
        self.max_lifetime_at
    }

    /// The child's delegation depth: 1 for a child of a task begun directly.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// The grants and scopes the child holds.
    pub fn grants(&self) -> &[DelegatedGrant] {
        &self.grants
    }

    /// The whole delegation as one printable ASCII string (`lsd1.` and
    /// base64url, no `.` after the prefix, no `=`), for the subagent's
    /// environment. [`from_token`](Self::from_token) gives back an equal
    /// `Delegation` (instants to the millisecond). **It contains the handle**:
    /// treat it as a secret.
    pub fn to_token(&self) -> String {
        let grants: Vec<serde_json::Value> = self
            .grants
            .iter()
            .map(|g| serde_json::json!({ "grant": g.grant, "scopes": g.scopes }))
            .collect();
        let body = serde_json::json!({
            "t": self.task_id,
            "h": &*self.handle,
            "e": unix_millis(self.lease_expires_at),
            "m": unix_millis(self.max_lifetime_at),
            "d": self.depth,
            "g": grants,
        });
        format!(
            "{TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(body.to_string().as_bytes())
        )
    }

    /// Reads a token made by [`to_token`](Self::to_token). Surrounding
    /// whitespace (a trailing newline from a file) is ignored.
    ///
    /// # Errors
    /// [`Error::BadDelegationToken`] when the string is longer than
    /// [`MAX_DELEGATION_TOKEN_BYTES`], lacks the `lsd1.` prefix, or does not
    /// decode to a delegation with a task id and a handle. The message never
    /// contains the token.
    pub fn from_token(token: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::BadDelegationToken(why.to_owned());
        let token = token.trim();
        if token.len() > MAX_DELEGATION_TOKEN_BYTES {
            return Err(bad(&format!(
                "longer than {MAX_DELEGATION_TOKEN_BYTES} bytes"
            )));
        }
        let body = token.strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            bad("it does not start with \"lsd1.\" (not made by Delegation::to_token)")
        })?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| bad("not base64url after the prefix (truncated or damaged?)"))?;
        let v: serde_json::Value = serde_json::from_slice(&json)
            .map_err(|_| bad("its body is not JSON (truncated or damaged?)"))?;
        let text = |key: &str, what: &str| {
            v.get(key)
                .and_then(serde_json::Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| bad(&format!("no {what}")))
        };
        let number = |key: &str, what: &str| {
            v.get(key)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| bad(&format!("no {what}")))
        };
        let task_id = text("t", "task id")?;
        let handle = text("h", "delegation handle")?;
        let lease_expires_at = UNIX_EPOCH + Duration::from_millis(number("e", "lease expiry")?);
        let max_lifetime_at = UNIX_EPOCH + Duration::from_millis(number("m", "max lifetime")?);
        let depth = u32::try_from(number("d", "depth")?).map_err(|_| bad("depth out of range"))?;
        let grants = v
            .get("g")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| bad("no grants"))?
            .iter()
            .map(|g| {
                let grant = g
                    .get("grant")
                    .and_then(serde_json::Value::as_str)
                    .ok_or_else(|| bad("a grant without a name"))?
                    .to_owned();
                let scopes = g
                    .get("scopes")
                    .and_then(serde_json::Value::as_array)
                    .ok_or_else(|| bad("a grant without scopes"))?
                    .iter()
                    .map(|s| {
                        s.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| bad("a scope is not a string"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(DelegatedGrant { grant, scopes })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Self {
            task_id,
            handle: handle.into(),
            lease_expires_at,
            max_lifetime_at,
            depth,
            grants,
        })
    }

    /// The RedeemDelegation request.
    pub(crate) fn redeem_request(&self) -> pb::RedeemDelegationRequest {
        pb::RedeemDelegationRequest {
            task_id: self.task_id.clone(),
            delegation_handle: self.handle.to_string(),
        }
    }
}

impl fmt::Debug for Delegation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delegation")
            .field("task_id", &self.task_id)
            .field("handle", &"...")
            .field("lease_expires_at", &self.lease_expires_at)
            .field("max_lifetime_at", &self.max_lifetime_at)
            .field("depth", &self.depth)
            .field("grants", &self.grants)
            .finish()
    }
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A `Duration` on the wire, saturating at the largest representable value.
pub(crate) fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use super::*;

    const SECRET: &str = "lsdh_very-secret-handle";

    fn delegation() -> Delegation {
        Delegation::from_proto(pb::DelegateTaskResponse {
            task_id: "task-child-1".into(),
            delegation_handle: SECRET.into(),
            lease_expires_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 250_000_000,
            }),
            max_lifetime_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_600,
                nanos: 0,
            }),
            depth: 2,
            grants: vec![
                pb::GrantScopes {
                    grant: "github".into(),
                    scopes: vec!["repo:read".into(), "issues:write \"x\"".into()],
                },
                pb::GrantScopes {
                    grant: "db".into(),
                    scopes: vec![],
                },
            ],
        })
        .unwrap()
    }

    #[test]
    fn the_token_round_trips() {
        let d = delegation();
        let token = d.to_token();
        assert!(token.starts_with("lsd1."));
        assert!(
            token.bytes().all(|b| b.is_ascii_graphic()) && !token[5..].contains('.'),
            "{token}"
        );
        let back = Delegation::from_token(&token).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.handle(), SECRET);
        assert_eq!(back.task_id(), "task-child-1");
        assert_eq!(back.depth(), 2);
        assert_eq!(back.grants()[0].scopes[1], "issues:write \"x\"");
        assert_eq!(
            Delegation::from_token(&format!("  {token}\n")).unwrap(),
            d,
            "whitespace from a file is ignored"
        );
    }

    #[test]
    fn debug_never_shows_the_handle() {
        let d = delegation();
        let shown = format!("{d:?} {d:#?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("task-child-1"));
    }

    #[test]
    fn bad_tokens_are_refused_without_echoing_them() {
        let good = delegation().to_token();
        let cases = [
            ("", "lsd1."),
            ("task-child-1.lsdh_x", "lsd1."),
            ("lsd1.***", "base64url"),
            (&good[..good.len() - 7], "damaged"),
            (&good[..good.len() - 8], "damaged"),
            ("lsd1.bm90IGpzb24", "JSON"),
            (
                &format!("lsd1.{}", URL_SAFE_NO_PAD.encode(r#"{"t":"x"}"#)),
                "handle",
            ),
            (
                &format!(
                    "lsd1.{}",
                    URL_SAFE_NO_PAD.encode(r#"{"t":"","h":"s","e":1,"m":1,"d":1,"g":[]}"#)
                ),
                "task id",
            ),
            (
                &format!("lsd1.{}", "A".repeat(MAX_DELEGATION_TOKEN_BYTES)),
                "longer",
            ),
        ];
        for (token, want) in cases {
            match Delegation::from_token(token) {
                Err(Error::BadDelegationToken(m)) => {
                    assert!(m.contains(want), "{token:?}: {m}");
                    assert!(!m.contains(SECRET));
                }
                other => panic!("{token:?} accepted: {other:?}"),
            }
        }
    }

    #[test]
    fn a_response_without_a_handle_is_refused() {
        let r = pb::DelegateTaskResponse {
            task_id: "t".into(),
            ..Default::default()
        };
        assert!(matches!(
            Delegation::from_proto(r),
            Err(Error::Transport(_))
        ));
    }

    #[test]
    fn requests_are_built_and_checked_locally() {
        let r = DelegationRequest::new("spiffe://acme.test/agent/sub")
            .grant("github", ["repo:read"])
            .grant("db", Vec::<String>::new())
            .ttl(Duration::from_millis(2500))
            .intent("summarise issues")
            .into_proto("parent-1")
            .unwrap();
        assert_eq!(r.parent_task_id, "parent-1");
        assert_eq!(r.subagent, "spiffe://acme.test/agent/sub");
        assert_eq!(r.intent, "summarise issues");
        assert_eq!(r.grants.len(), 2);
        assert_eq!(r.grants[0].grant, "github");
        assert_eq!(r.grants[0].scopes, ["repo:read"]);
        assert!(r.grants[1].scopes.is_empty());
        let ttl = r.requested_ttl.unwrap();
        assert_eq!((ttl.seconds, ttl.nanos), (2, 500_000_000));

        let everything = DelegationRequest::new("spiffe://acme.test/agent/sub")
            .intent("all of it")
            .into_proto("p")
            .unwrap();
        assert!(everything.grants.is_empty() && everything.requested_ttl.is_none());

        let refused = [
            (DelegationRequest::new(""), "subagent: required"),
            (DelegationRequest::new("agent/sub"), "not a SPIFFE ID"),
            (
                DelegationRequest::new("spiffe://a/b")
                    .grant("github", ["repo:read"])
                    .grant("github", ["issues:read"]),
                "\"github\" is given more than once",
            ),
            (
                DelegationRequest::new("spiffe://a/b").grant("", ["x"]),
                "name is empty",
            ),
            (
                DelegationRequest::new("spiffe://a/b").grant("github", [""]),
                "empty scope",
            ),
            (
                DelegationRequest::new("spiffe://a/b").ttl(Duration::ZERO),
                "requested_ttl",
            ),
        ];
        for (request, want) in refused {
            match request.into_proto("p") {
                Err(Error::Invalid(m)) => assert!(m.contains(want), "{m}"),
                other => panic!("accepted, wanted {want:?}: {other:?}"),
            }
        }
    }
}
