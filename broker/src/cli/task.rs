//! `leash task begin|renew|complete|delegate|redeem|watch`, `leash token introspect`, `leash jwks`:
//! a small client that prints JSON, for trying the flow without writing code.

use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use leash_proto::v1::{self as pb, broker_client::BrokerClient, verifier_client::VerifierClient};
use serde_json::{Value, json};

use super::ConnectArgs;

/// Task subcommands.
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Declare a task and print its lease and credentials (the values are secrets).
    Begin {
        /// Template name.
        #[arg(long, short)]
        template: String,
        /// Parameter, `name=value`; repeat for each.
        #[arg(long = "param", short = 'p', value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// What the task will do, in plain words.
        #[arg(long, short)]
        intent: String,
        /// Lease TTL wanted, e.g. `30s` [default: the template's].
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Retry key: the same key returns the same task.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Connection.
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Extend a task's lease and print fresh credentials.
    Renew {
        /// Task id from `task begin`.
        task_id: String,
        /// Connection.
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Hand a narrower child task to a subagent; prints the child task id and
    /// its delegation handle, a secret for that subagent only.
    Delegate {
        /// The parent task id (yours, live).
        parent_task_id: String,
        /// SPIFFE ID of the subagent that will own the child task.
        #[arg(long)]
        to: String,
        /// Grant the child gets, `NAME` (all the parent's scopes of it) or
        /// `NAME=SCOPE,SCOPE`; repeat for each [default: every live grant].
        #[arg(long = "grant", short = 'g', value_parser = parse_grant)]
        grants: Vec<pb::GrantScopes>,
        /// Lease TTL wanted, e.g. `30s` (clamped to the parent's remaining lease).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// What the subagent will do, in plain words.
        #[arg(long, short)]
        intent: String,
        /// Print only the JSON (no note on stderr about the handle).
        #[arg(long)]
        json: bool,
        /// Connection.
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Redeem a delegation handle (as the subagent: `--cert`/`--key` of its
    /// SVID) and print the child task's lease and credentials.
    Redeem {
        /// The child task id from `task delegate`.
        task_id: String,
        /// The delegation handle from `task delegate` (a secret; prefer the env variable).
        #[arg(long, env = "LEASH_DELEGATION_HANDLE", hide_env_values = true)]
        handle: String,
        /// Connection.
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Print the task's state at once and at every change (one JSON line each)
    /// until the broker ends the stream; Ctrl-C stops.
    Watch {
        /// Task id.
        task_id: String,
        /// Connection.
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// End a task: every credential of it stops working.
    Complete {
        /// Task id from `task begin`.
        task_id: String,
        /// How it went.
        #[arg(long, default_value = "succeeded")]
        outcome: OutcomeArg,
        /// A short account for the audit trail.
        #[arg(long, default_value = "")]
        summary: String,
        /// Connection.
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

/// Token subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Ask the broker whether a credential is active (as a resource server).
    Introspect {
        /// The credential value.
        token: String,
        /// Connection (defaults to the dev resource-server SVID).
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

/// Task outcomes for `task complete`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutcomeArg {
    /// It did what it declared.
    Succeeded,
    /// It failed.
    Failed,
    /// It was stopped.
    Cancelled,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not name=value"))
}

fn parse_grant(s: &str) -> Result<pb::GrantScopes, String> {
    let (grant, scopes) = match s.split_once('=') {
        Some((g, sc)) => (
            g,
            sc.split(',')
                .filter(|x| !x.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
        None => (s, Vec::new()),
    };
    if grant.is_empty() {
        return Err(format!("{s:?} is not NAME or NAME=SCOPE,SCOPE"));
    }
    Ok(pb::GrantScopes {
        grant: grant.to_owned(),
        scopes,
    })
}

fn state(s: i32) -> &'static str {
    pb::LeaseState::try_from(s).map_or("?", |s| s.as_str_name())
}

fn approval(a: Option<&pb::Approval>) -> Value {
    a.map_or(Value::Null, |a| {
        json!({
            "state": pb::ApprovalState::try_from(a.state).map_or("?", |s| s.as_str_name()),
            "grants": a.grants,
            "expires_at": time(a.expires_at.as_ref()),
            "decided_by": a.decided_by,
            "reason": a.reason,
            "decided_at": time(a.decided_at.as_ref()),
        })
    })
}

fn begin_json(r: &pb::BeginTaskResponse) -> Value {
    let mut v = json!({
        "task_id": r.task_id,
        "state": state(r.state),
        "lease_expires_at": time(r.lease_expires_at.as_ref()),
        "max_lifetime_at": time(r.max_lifetime_at.as_ref()),
        "replayed": r.replayed,
        "credentials": credentials(&r.credentials),
    });
    if let Some(o) = v.as_object_mut() {
        if r.approval.is_some() {
            o.insert("approval".into(), approval(r.approval.as_ref()));
        }
        if !r.actors.is_empty() {
            o.insert("actors".into(), json!(r.actors));
        }
    }
    v
}

fn grants_json(g: &[pb::GrantScopes]) -> Value {
    g.iter()
        .map(|g| json!({ "grant": g.grant, "scopes": g.scopes }))
        .collect()
}

/// An RFC 3339 instant (seconds), or `null` when absent or out of range.
pub(super) fn time(ts: Option<&prost_types::Timestamp>) -> Value {
    time_text(ts).map_or(Value::Null, Value::String)
}

/// [`time`] as text, `None` when absent or out of range.
pub(super) fn time_text(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    ts.and_then(|t| std::time::SystemTime::try_from(*t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

fn credentials(creds: &[pb::Credential]) -> Value {
    creds
        .iter()
        .map(|c| {
            json!({
                "id": c.id, "grant": c.grant,
                "kind": pb::CredentialKind::try_from(c.kind).map(|k| k.as_str_name()).unwrap_or("?"),
                "audience": c.audience, "scopes": c.scopes, "value": c.value,
                "expires_at": time(c.expires_at.as_ref()),
            })
        })
        .collect()
}

/// A client command failure, with the gRPC status when there is one.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Connecting failed.
    #[error(transparent)]
    Connect(#[from] super::client::ClientError),
    /// The broker refused.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// `leash bench` could not set up a measurement or write its report.
    #[error("bench: {0}")]
    Bench(String),
}

/// Runs a task command and returns the JSON to print.
///
/// # Errors
/// [`CommandError`] if the connection fails or the broker refuses.
pub async fn run_task(cmd: TaskCommand) -> Result<Value, CommandError> {
    match cmd {
        TaskCommand::Begin {
            template,
            params,
            intent,
            ttl,
            idempotency_key,
            connect,
        } => {
            let mut client = BrokerClient::new(connect.connect("agent").await?);
            let r = client
                .begin_task(pb::BeginTaskRequest {
                    template,
                    parameters: params.into_iter().collect(),
                    intent,
                    requested_ttl: ttl.and_then(|d| prost_types::Duration::try_from(d).ok()),
                    idempotency_key: idempotency_key.unwrap_or_default(),
                })
                .await?
                .into_inner();
            Ok(begin_json(&r))
        }
        TaskCommand::Delegate {
            parent_task_id,
            to,
            grants,
            ttl,
            intent,
            json,
            connect,
        } => {
            let mut client = BrokerClient::new(connect.connect("agent").await?);
            let r = client
                .delegate_task(pb::DelegateTaskRequest {
                    parent_task_id,
                    subagent: to.clone(),
                    grants,
                    requested_ttl: ttl.and_then(|d| prost_types::Duration::try_from(d).ok()),
                    intent,
                })
                .await?
                .into_inner();
            if !json {
                eprintln!(
                    "leash: the delegation handle is a one-time secret for {to} only: \
                     pass it to the subagent (e.g. LEASH_DELEGATION_HANDLE) and nowhere else"
                );
            }
            Ok(json!({
                "task_id": r.task_id,
                "delegation_handle": r.delegation_handle,
                "subagent": to,
                "depth": r.depth,
                "lease_expires_at": time(r.lease_expires_at.as_ref()),
                "max_lifetime_at": time(r.max_lifetime_at.as_ref()),
                "grants": grants_json(&r.grants),
            }))
        }
        TaskCommand::Redeem {
            task_id,
            handle,
            connect,
        } => {
            let mut client = BrokerClient::new(connect.connect("agent").await?);
            let r = client
                .redeem_delegation(pb::RedeemDelegationRequest {
                    task_id,
                    delegation_handle: handle,
                })
                .await?
                .into_inner();
            Ok(begin_json(&r))
        }
        TaskCommand::Watch { task_id, connect } => {
            let mut client = BrokerClient::new(connect.connect("agent").await?);
            let mut stream = client
                .watch_task(pb::WatchTaskRequest {
                    task_id: task_id.clone(),
                })
                .await?
                .into_inner();
            let mut events = 0_u64;
            while let Some(e) = stream.message().await? {
                events += 1;
                let mut line = json!({
                    "task_id": e.task_id,
                    "state": state(e.state),
                    "lease_expires_at": time(e.lease_expires_at.as_ref()),
                });
                if let (Some(o), Some(_)) = (line.as_object_mut(), e.approval.as_ref()) {
                    o.insert("approval".into(), approval(e.approval.as_ref()));
                }
                println!("{line}");
            }
            // The stream ended (the task ended, or the broker closed it).
            Ok(json!({ "task_id": task_id, "events": events, "stream": "ended" }))
        }
        TaskCommand::Renew { task_id, connect } => {
            let mut client = BrokerClient::new(connect.connect("agent").await?);
            let request = pb::RenewLeaseRequest { task_id };
            let r = match client.renew_lease(request.clone()).await {
                // Renewed sooner than the template's min_renew_interval: wait as
                // told (when it is a short wait) and try once more.
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    let wait = status
                        .metadata()
                        .get("retry-after-ms")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .filter(|ms| *ms <= 10_000)
                        .ok_or(status)?;
                    eprintln!("leash: renewed too soon; retrying in {wait} ms as the broker asks");
                    tokio::time::sleep(std::time::Duration::from_millis(wait + 10)).await;
                    client.renew_lease(request).await?
                }
                other => other?,
            }
            .into_inner();
            let mut v = json!({
                "task_id": r.task_id,
                "state": state(r.state),
                "lease_expires_at": time(r.lease_expires_at.as_ref()),
                "max_lifetime_at": time(r.max_lifetime_at.as_ref()),
                "credentials": credentials(&r.credentials),
            });
            if let (Some(o), Some(_)) = (v.as_object_mut(), r.approval.as_ref()) {
                o.insert("approval".into(), approval(r.approval.as_ref()));
            }
            Ok(v)
        }
        TaskCommand::Complete {
            task_id,
            outcome,
            summary,
            connect,
        } => {
            let mut client = BrokerClient::new(connect.connect("agent").await?);
            let outcome = match outcome {
                OutcomeArg::Succeeded => pb::Outcome::Succeeded,
                OutcomeArg::Failed => pb::Outcome::Failed,
                OutcomeArg::Cancelled => pb::Outcome::Cancelled,
            };
            let r = client
                .complete_task(pb::CompleteTaskRequest {
                    task_id,
                    outcome: outcome.into(),
                    summary,
                })
                .await?
                .into_inner();
            Ok(json!({
                "task_id": r.task_id,
                "state": pb::LeaseState::try_from(r.state).map(|s| s.as_str_name()).unwrap_or("?"),
                "revoked_credentials": r.revoked_credentials,
                "revoked_descendants": r.revoked_descendants,
            }))
        }
    }
}

/// Runs a token command and returns the JSON to print.
///
/// # Errors
/// [`CommandError`] if the connection fails or the broker refuses.
pub async fn run_token(cmd: TokenCommand) -> Result<Value, CommandError> {
    let TokenCommand::Introspect { token, connect } = cmd;
    let mut client = VerifierClient::new(connect.connect("resource").await?);
    let r = client
        .introspect(pb::IntrospectRequest { token })
        .await?
        .into_inner();
    if !r.active {
        return Ok(json!({ "active": false }));
    }
    Ok(json!({
        "active": true, "sub": r.sub, "aud": r.aud, "scope": r.scope, "iss": r.iss,
        "exp": time(r.exp.as_ref()), "iat": time(r.iat.as_ref()), "jti": r.jti,
        "token_type": r.token_type, "task_id": r.task_id, "template": r.template,
        "grant": r.grant, "cnf": { "x5t#S256": r.cnf_x5t_s256 },
        "actors": r.actors, "act": act_chain(&r.actors),
    }))
}

/// The RFC 8693 `act` claim of a delegated credential, from introspection's
/// actors (current actor first; the root task's owner is the `sub`, not in the
/// list); `null` for a credential of a task begun directly. The same nesting
/// as the JWT's claim.
fn act_chain(actors: &[String]) -> Value {
    actors.iter().rev().fold(Value::Null, |inner, a| {
        if inner.is_null() {
            json!({ "sub": a })
        } else {
            json!({ "sub": a, "act": inner })
        }
    })
}

/// Fetches the JWK Set.
///
/// # Errors
/// [`CommandError`] if the connection fails or the broker refuses.
pub async fn run_jwks(connect: ConnectArgs) -> Result<Value, CommandError> {
    let mut client = VerifierClient::new(connect.connect("resource").await?);
    let r = client.get_jwks(pb::GetJwksRequest {}).await?.into_inner();
    Ok(serde_json::from_str(&r.jwks_json).unwrap_or(Value::String(r.jwks_json)))
}
