//! A task's state and approval as the broker reports them (`WatchTask`), and the
//! decision [`Task::approval`](crate::Task::approval) takes at each event.

use std::{fmt, time::SystemTime};

use leash_proto::v1 as pb;

use crate::{Error, task::system_time};

/// The state of a task's lease as the broker reports it (the proto's
/// `LeaseState`). Compare [`LeaseStatus`](crate::LeaseStatus), which is the
/// guard's own view of its renewals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseState {
    /// The lease is live; the credentials may be active.
    Active,
    /// The lease is live, but grants the template gates are withheld until an
    /// approver approves them; see [`Task::approval`](crate::Task::approval).
    PendingApproval,
    /// The owner completed the task; every credential is revoked.
    Completed,
    /// The lease was not renewed before its deadline; every credential is revoked.
    Expired,
    /// A kill switch or the end of the parent task ended it; every credential is
    /// revoked.
    Revoked,
}

impl LeaseState {
    /// Maps the wire value; `None` for UNSPECIFIED (which the broker never
    /// sends) and for values this SDK does not know.
    pub(crate) fn from_proto(value: i32) -> Option<Self> {
        match pb::LeaseState::try_from(value).ok()? {
            pb::LeaseState::Unspecified => None,
            pb::LeaseState::Active => Some(Self::Active),
            pb::LeaseState::PendingApproval => Some(Self::PendingApproval),
            pb::LeaseState::Completed => Some(Self::Completed),
            pb::LeaseState::Expired => Some(Self::Expired),
            pb::LeaseState::Revoked => Some(Self::Revoked),
        }
    }

    /// True for the states a task never leaves (completed, expired, revoked).
    pub fn has_ended(self) -> bool {
        matches!(self, Self::Completed | Self::Expired | Self::Revoked)
    }
}

impl fmt::Display for LeaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::PendingApproval => "pending approval",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        })
    }
}

/// Where a task's approval stands (the proto's `ApprovalState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApprovalState {
    /// The task needs no approval (the template gates none of its grants).
    NotRequired,
    /// Waiting for an approver; the gated grants are withheld.
    Pending,
    /// Approved; the gated grants are issued at the next renewal, which must
    /// come before [`Approval::expires_at`].
    Approved,
    /// Denied; the gated grants are never issued.
    Denied,
    /// No approver decided in time, or the approval went unused in time.
    Expired,
    /// Approved and used: the gated grants are issued with every renewal.
    Redeemed,
}

impl ApprovalState {
    /// Maps the wire value; `None` for values this SDK does not know.
    pub(crate) fn from_proto(value: i32) -> Option<Self> {
        Some(match pb::ApprovalState::try_from(value).ok()? {
            pb::ApprovalState::Unspecified => Self::NotRequired,
            pb::ApprovalState::Pending => Self::Pending,
            pb::ApprovalState::Approved => Self::Approved,
            pb::ApprovalState::Denied => Self::Denied,
            pb::ApprovalState::Expired => Self::Expired,
            pb::ApprovalState::Redeemed => Self::Redeemed,
        })
    }
}

/// A task's approval: what the template gates, and what was decided, by whom
/// and why. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    /// Where it stands.
    pub state: ApprovalState,
    /// The gated grants (by name).
    pub grants: Vec<String>,
    /// While pending: when the request expires; while approved: when the
    /// approval expires unused. `None` when the broker gave no instant.
    pub expires_at: Option<SystemTime>,
    /// SPIFFE ID of the approver who decided; `None` until decided.
    pub decided_by: Option<String>,
    /// The approver's reason; `None` until decided.
    pub reason: Option<String>,
    /// When it was decided; `None` until decided.
    pub decided_at: Option<SystemTime>,
}

impl Approval {
    /// Maps the wire message.
    ///
    /// # Errors
    /// [`Error::Transport`] for an approval state this SDK does not know (the
    /// SDK fails closed rather than guess what it means).
    pub(crate) fn from_proto(a: pb::Approval) -> Result<Self, Error> {
        let state = ApprovalState::from_proto(a.state).ok_or_else(|| {
            Error::Transport(format!(
                "the broker sent an unknown approval state {}",
                a.state
            ))
        })?;
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        Ok(Self {
            state,
            grants: a.grants,
            expires_at: a.expires_at.map(|t| system_time(Some(t))),
            decided_by: non_empty(a.decided_by),
            reason: non_empty(a.reason),
            decided_at: a.decided_at.map(|t| system_time(Some(t))),
        })
    }
}

/// What [`Task::approval`](crate::Task::approval) reports when it succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApprovalOutcome {
    /// The task needed no approval: its credentials are all there already.
    NotRequired,
    /// An approver approved, and the lease was renewed so the gated grants'
    /// credentials are in [`Task::credentials`](crate::Task::credentials).
    Approved {
        /// SPIFFE ID of the approver (empty if the broker did not say).
        by: String,
        /// The approver's reason (empty if the broker did not say).
        reason: String,
    },
}

/// One `TaskEvent` of `WatchTask`, mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskEvent {
    pub(crate) task_id: String,
    pub(crate) state: LeaseState,
    pub(crate) approval: Option<Approval>,
    pub(crate) lease_expires_at: Option<SystemTime>,
}

impl TaskEvent {
    /// Maps the wire message; an event for another task, or with an
    /// unspecified or unknown state, is a broker fault.
    ///
    /// # Errors
    /// [`Error::Transport`] naming what is wrong with the event.
    pub(crate) fn from_proto(event: pb::TaskEvent, want_task: &str) -> Result<Self, Error> {
        if event.task_id != want_task {
            return Err(Error::Transport(format!(
                "WatchTask for task {want_task} sent an event for task {:?}",
                event.task_id
            )));
        }
        let state = LeaseState::from_proto(event.state).ok_or_else(|| {
            Error::Transport(format!(
                "WatchTask sent an unspecified or unknown lease state {}",
                event.state
            ))
        })?;
        let approval = event.approval.map(Approval::from_proto).transpose()?;
        Ok(Self {
            task_id: event.task_id,
            state,
            approval,
            lease_expires_at: event.lease_expires_at.map(|t| system_time(Some(t))),
        })
    }
}

/// What to do after one event, while waiting for an approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Still pending: wait for the next event.
    Wait,
    /// Nothing to wait for.
    NotRequired,
    /// Approved (or already used): renew unless the gated grants are held, then
    /// report who approved.
    Approved {
        by: String,
        reason: String,
        grants: Vec<String>,
    },
    /// The wait ends with this error.
    Fail(Error),
}

/// The decision at one event. An ended task ends the wait with
/// [`Error::LeaseLost`] whatever its approval says.
pub(crate) fn step(event: &TaskEvent) -> Step {
    if event.state.has_ended() {
        return Step::Fail(Error::LeaseLost(format!(
            "the task ended ({}) before its approval was used",
            event.state
        )));
    }
    let Some(approval) = &event.approval else {
        return Step::NotRequired;
    };
    let decided = || {
        (
            approval.decided_by.clone().unwrap_or_default(),
            approval.reason.clone().unwrap_or_default(),
        )
    };
    match approval.state {
        ApprovalState::NotRequired => Step::NotRequired,
        ApprovalState::Pending => Step::Wait,
        ApprovalState::Approved | ApprovalState::Redeemed => {
            let (by, reason) = decided();
            Step::Approved {
                by,
                reason,
                grants: approval.grants.clone(),
            }
        }
        ApprovalState::Denied => {
            let (by, reason) = decided();
            Step::Fail(Error::ApprovalDenied { by, reason })
        }
        ApprovalState::Expired => Step::Fail(Error::ApprovalExpired),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn ts(secs: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        })
    }

    fn event(state: pb::LeaseState, approval: Option<pb::Approval>) -> pb::TaskEvent {
        pb::TaskEvent {
            task_id: "t-1".into(),
            state: state.into(),
            approval,
            lease_expires_at: ts(100),
        }
    }

    fn approval(state: pb::ApprovalState) -> pb::Approval {
        pb::Approval {
            state: state.into(),
            grants: vec!["deploy".into()],
            expires_at: ts(200),
            decided_by: String::new(),
            reason: String::new(),
            decided_at: None,
        }
    }

    fn decided(state: pb::ApprovalState) -> pb::Approval {
        pb::Approval {
            decided_by: "spiffe://acme.test/human/alice".into(),
            reason: "change 7 is approved".into(),
            decided_at: ts(150),
            ..approval(state)
        }
    }

    #[test]
    fn every_lease_state_maps() {
        let cases = [
            (pb::LeaseState::Active, Some(LeaseState::Active)),
            (
                pb::LeaseState::PendingApproval,
                Some(LeaseState::PendingApproval),
            ),
            (pb::LeaseState::Completed, Some(LeaseState::Completed)),
            (pb::LeaseState::Expired, Some(LeaseState::Expired)),
            (pb::LeaseState::Revoked, Some(LeaseState::Revoked)),
            (pb::LeaseState::Unspecified, None),
        ];
        for (wire, want) in cases {
            assert_eq!(LeaseState::from_proto(wire.into()), want, "{wire:?}");
        }
        assert_eq!(LeaseState::from_proto(99), None);
        assert!(LeaseState::Revoked.has_ended());
        assert!(!LeaseState::PendingApproval.has_ended());
    }

    #[test]
    fn every_approval_state_maps() {
        let cases = [
            (pb::ApprovalState::Unspecified, ApprovalState::NotRequired),
            (pb::ApprovalState::Pending, ApprovalState::Pending),
            (pb::ApprovalState::Approved, ApprovalState::Approved),
            (pb::ApprovalState::Denied, ApprovalState::Denied),
            (pb::ApprovalState::Expired, ApprovalState::Expired),
            (pb::ApprovalState::Redeemed, ApprovalState::Redeemed),
        ];
        for (wire, want) in cases {
            assert_eq!(ApprovalState::from_proto(wire.into()), Some(want));
        }
        assert_eq!(ApprovalState::from_proto(42), None);
    }

    #[test]
    fn an_approval_maps_with_empty_strings_as_none() {
        let a = Approval::from_proto(approval(pb::ApprovalState::Pending)).unwrap();
        assert_eq!(a.state, ApprovalState::Pending);
        assert_eq!(a.grants, ["deploy"]);
        assert_eq!(a.expires_at, Some(UNIX_EPOCH + Duration::from_secs(200)));
        assert_eq!((a.decided_by, a.reason, a.decided_at), (None, None, None));

        let d = Approval::from_proto(decided(pb::ApprovalState::Denied)).unwrap();
        assert_eq!(
            d.decided_by.as_deref(),
            Some("spiffe://acme.test/human/alice")
        );
        assert_eq!(d.reason.as_deref(), Some("change 7 is approved"));
        assert_eq!(d.decided_at, Some(UNIX_EPOCH + Duration::from_secs(150)));

        let unknown = pb::Approval {
            state: 42,
            ..approval(pb::ApprovalState::Pending)
        };
        assert!(matches!(
            Approval::from_proto(unknown),
            Err(Error::Transport(m)) if m.contains("approval state 42")
        ));
    }

    #[test]
    fn a_task_event_maps_and_bad_events_are_refused() {
        let e = TaskEvent::from_proto(
            event(
                pb::LeaseState::PendingApproval,
                Some(approval(pb::ApprovalState::Pending)),
            ),
            "t-1",
        )
        .unwrap();
        assert_eq!(e.task_id, "t-1");
        assert_eq!(e.state, LeaseState::PendingApproval);
        assert_eq!(e.approval.as_ref().unwrap().state, ApprovalState::Pending);
        assert_eq!(
            e.lease_expires_at,
            Some(UNIX_EPOCH + Duration::from_secs(100))
        );

        let plain = TaskEvent::from_proto(event(pb::LeaseState::Active, None), "t-1").unwrap();
        assert_eq!(plain.approval, None);

        let other = TaskEvent::from_proto(event(pb::LeaseState::Active, None), "t-2");
        assert!(matches!(other, Err(Error::Transport(m)) if m.contains("t-2")));
        let unspecified = TaskEvent::from_proto(event(pb::LeaseState::Unspecified, None), "t-1");
        assert!(matches!(unspecified, Err(Error::Transport(_))));
        let bad_approval = pb::TaskEvent {
            approval: Some(pb::Approval {
                state: 9,
                ..approval(pb::ApprovalState::Pending)
            }),
            ..event(pb::LeaseState::Active, None)
        };
        assert!(TaskEvent::from_proto(bad_approval, "t-1").is_err());
    }

    #[test]
    fn each_event_leads_to_the_right_step() {
        let map = |e| TaskEvent::from_proto(e, "t-1").unwrap();
        let pending = pb::LeaseState::PendingApproval;
        let active = pb::LeaseState::Active;

        assert_eq!(step(&map(event(active, None))), Step::NotRequired);
        assert_eq!(
            step(&map(event(
                active,
                Some(approval(pb::ApprovalState::Unspecified))
            ))),
            Step::NotRequired
        );
        assert_eq!(
            step(&map(event(
                pending,
                Some(approval(pb::ApprovalState::Pending))
            ))),
            Step::Wait
        );
        for state in [pb::ApprovalState::Approved, pb::ApprovalState::Redeemed] {
            assert_eq!(
                step(&map(event(active, Some(decided(state))))),
                Step::Approved {
                    by: "spiffe://acme.test/human/alice".into(),
                    reason: "change 7 is approved".into(),
                    grants: vec!["deploy".into()],
                },
                "{state:?}"
            );
        }
        assert_eq!(
            step(&map(event(
                active,
                Some(decided(pb::ApprovalState::Denied))
            ))),
            Step::Fail(Error::ApprovalDenied {
                by: "spiffe://acme.test/human/alice".into(),
                reason: "change 7 is approved".into(),
            })
        );
        assert_eq!(
            step(&map(event(
                pending,
                Some(approval(pb::ApprovalState::Expired))
            ))),
            Step::Fail(Error::ApprovalExpired)
        );
        for ended in [
            pb::LeaseState::Completed,
            pb::LeaseState::Expired,
            pb::LeaseState::Revoked,
        ] {
            let s = step(&map(event(
                ended,
                Some(decided(pb::ApprovalState::Approved)),
            )));
            assert!(
                matches!(&s, Step::Fail(Error::LeaseLost(m)) if m.contains("ended")),
                "{ended:?}: {s:?}"
            );
        }
    }
}
