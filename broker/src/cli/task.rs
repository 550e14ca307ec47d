//! `leash task begin|renew|complete`, `leash token introspect`, `leash jwks`:
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

fn time(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.and_then(|t| std::time::SystemTime::try_from(*t).ok())
        .map_or(Value::Null, |t| {
            json!(humantime::format_rfc3339_seconds(t).to_string())
        })
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
            Ok(json!({
                "task_id": r.task_id,
                "lease_expires_at": time(r.lease_expires_at.as_ref()),
                "max_lifetime_at": time(r.max_lifetime_at.as_ref()),
                "replayed": r.replayed,
                "credentials": credentials(&r.credentials),
            }))
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
            Ok(json!({
                "task_id": r.task_id,
                "lease_expires_at": time(r.lease_expires_at.as_ref()),
                "max_lifetime_at": time(r.max_lifetime_at.as_ref()),
                "credentials": credentials(&r.credentials),
            }))
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
    }))
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
