//! Task binding: a task can only be renewed, completed or replayed with the kind
//! of proof it was begun with, so its credentials never lose their binding.
//!
//! The rule, per the [`TaskBinding`] recorded at begin:
//!
//! - Begun over mTLS ([`TaskBinding::Certificate`], and records older than the
//!   field, [`TaskBinding::Unrecorded`]): the caller must present an X509-SVID of
//!   the task's SPIFFE ID (the owner check does the ID). A JWT-SVID of the same ID
//!   is refused: it is a bearer token, and renewing with it would hand out unbound
//!   credentials for a task whose credentials are certificate-bound. With
//!   [`BindingRule::SpiffeId`] (the default) any current X509-SVID of the ID is
//!   accepted: the SPIFFE Workload API (and sidecars that write its SVIDs to
//!   files, and certificate renewals with key rotation) issue a fresh key at every
//!   rotation, the broker cannot tell such a rotation from another instance of the
//!   same workload, and SPIFFE defines the workload by its ID. With
//!   [`BindingRule::Key`] the X509-SVID must also carry the public key (SPKI) that
//!   began the task — a re-issued certificate for the same key is fine, another
//!   key is not. Either way every credential is bound to the certificate of the
//!   call that received it, so no credential of the task is ever unbound.
//! - Begun with a JWT-SVID ([`TaskBinding::JwtSvid`]): the caller must present a
//!   JWT-SVID; an mTLS call is refused (the proof kind is fixed for the task's life).

use crate::{identity::Identity, store::TaskBinding};

/// How strictly a certificate-bound task is tied to the certificate key that began it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BindingRule {
    /// Any X509-SVID of the task's SPIFFE ID; for rotating SVIDs (Workload API).
    SpiffeId,
    /// The same public key (SPKI) as at begin; for SVIDs that do not change key
    /// during a task.
    Key,
}

/// The binding a task begun by `caller` records.
pub(super) fn binding_of(caller: &Identity) -> TaskBinding {
    match (caller.thumbprint_b64url(), caller.spki_b64url()) {
        (Some(x5t_s256), Some(spki_s256)) => TaskBinding::Certificate {
            x5t_s256,
            spki_s256,
        },
        _ => TaskBinding::JwtSvid,
    }
}

/// Checks that `caller` proves itself the way `binding` demands under `rule`;
/// `Err` carries the reason, in words the caller can act on.
pub(super) fn check(
    binding: &TaskBinding,
    caller: &Identity,
    rule: BindingRule,
    task: &str,
) -> Result<(), String> {
    let by_certificate = caller.thumbprint_s256.is_some();
    match binding {
        TaskBinding::Delegated => Err(format!(
            "task {task} is a delegated task not yet redeemed; its subagent must call RedeemDelegation with its delegation handle first"
        )),
        TaskBinding::JwtSvid if by_certificate => Err(format!(
            "task {task} was begun with a JWT-SVID; renew and complete it with a JWT-SVID on the JWT-SVID listener"
        )),
        TaskBinding::JwtSvid => Ok(()),
        TaskBinding::Certificate { .. } | TaskBinding::Unrecorded if !by_certificate => {
            Err(format!(
                "task {task} was begun over mutual TLS and its credentials are certificate-bound; renew and complete it over mutual TLS with its X509-SVID, not with a JWT-SVID"
            ))
        }
        TaskBinding::Certificate { spki_s256, .. } if rule == BindingRule::Key => {
            if caller.spki_b64url().as_deref() == Some(spki_s256.as_str()) {
                Ok(())
            } else {
                Err(format!(
                    "task {task} is bound to the key of the X509-SVID that began it; this certificate has another key (tls.task_binding = \"key\")"
                ))
            }
        }
        TaskBinding::Certificate { .. } | TaskBinding::Unrecorded => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::identity::SpiffeId;

    fn caller(cert: Option<(u8, u8)>) -> Identity {
        Identity {
            spiffe_id: SpiffeId::parse("spiffe://a.test/agent").expect("id"),
            svid_not_after: UNIX_EPOCH,
            thumbprint_s256: cert.map(|(c, _)| [c; 32]),
            spki_s256: cert.map(|(_, k)| [k; 32]),
        }
    }

    #[test]
    fn the_proof_kind_and_under_key_binding_the_key_must_match() {
        let begun = caller(Some((1, 1)));
        let bound = binding_of(&begun);
        let jwt = caller(None);
        let same_cert = caller(Some((1, 1)));
        let same_key_new_cert = caller(Some((2, 1)));
        let other_key = caller(Some((3, 3)));
        use BindingRule::{Key, SpiffeId};
        let cases = [
            (&bound, &same_cert, Key, true),
            (&bound, &same_key_new_cert, Key, true),
            (&bound, &other_key, Key, false),
            (&bound, &other_key, SpiffeId, true),
            (&bound, &jwt, Key, false),
            (&bound, &jwt, SpiffeId, false),
            (&TaskBinding::JwtSvid, &jwt, Key, true),
            (&TaskBinding::JwtSvid, &same_cert, SpiffeId, false),
            (&TaskBinding::Unrecorded, &other_key, Key, true),
            (&TaskBinding::Unrecorded, &jwt, SpiffeId, false),
        ];
        for (i, (binding, who, rule, ok)) in cases.into_iter().enumerate() {
            assert_eq!(
                check(binding, who, rule, "tk_x").is_ok(),
                ok,
                "case {i}: {binding:?} {rule:?}"
            );
        }
        assert_eq!(binding_of(&jwt), TaskBinding::JwtSvid);
    }

    #[test]
    fn records_without_the_field_read_as_unrecorded() {
        let task = crate::store::TaskRecord {
            id: crate::store::TaskId::from_bytes([3; 16]),
            owner: "spiffe://a.test/agent".into(),
            template: "t".into(),
            template_version: "1".into(),
            parameters: Default::default(),
            intent: "i".into(),
            fingerprint: "f".into(),
            created_at_ms: 0,
            lease_ttl_ms: 1,
            lease_deadline_ms: 1,
            max_deadline_ms: 1,
            state: crate::store::TaskState::Active,
            ended_at_ms: None,
            outcome: None,
            binding: binding_of(&caller(Some((1, 2)))),
            class: String::new(),
            tenant: String::new(),
            parent: None,
            root: None,
            depth: 0,
            actors: Vec::new(),
            delegated: None,
            approval: None,
            policies: Vec::new(),
        };
        let mut json = serde_json::to_value(&task).expect("json");
        assert_eq!(json["binding"]["kind"], "certificate");
        let back: crate::store::TaskRecord = serde_json::from_value(json.clone()).expect("parse");
        assert_eq!(back, task);
        // A record stored before the field existed.
        json.as_object_mut().expect("object").remove("binding");
        let old: crate::store::TaskRecord = serde_json::from_value(json).expect("old record");
        assert_eq!(old.binding, TaskBinding::Unrecorded);
    }
}
